//! 2-D convolution on the CPU as one matrix product.
//!
//! candle's CPU convolution gathers its patches element by element into tiles of 512 output pixels and
//! multiplies each tile separately (small products that use the cores poorly), rebuilding the reordered
//! kernel on every call. Here the patches of the whole batch are laid out once, row segment by row segment,
//! as a `[in·kh·kw, batch·out_h·out_w]` matrix in the kernel's own element order, so that one large product
//! with the kernel viewed as `[out, in·kh·kw]` gives the output. The input gradient is the same in reverse:
//! the transposed kernel times the output gradient, summed back through the patch layout; with stride 1
//! over many pixels, the convolution of the output gradient with the flipped kernel instead, whose product
//! is one long sum per value rather than a short one into a matrix nine times the input. 1x1 kernels with
//! stride 1 and no padding need no patches: the `[out, in]` kernel times each image's `[in, h·w]` pixels
//! (candle's own 1x1 path copies input and output element by element on one thread). 3x3 kernels with
//! stride 1 and padding 1 on images of 32x32 and more go to [`super::winograd`], which needs a quarter of
//! the products. In bf16 products on AMX tiles, stride-1 convolutions whose channels come in blocks of 32
//! and whose output rows in runs of 16 pixels (every convolution of the UNets but their first and last)
//! need no patch matrix at all: [`amx::conv`] sums the kernel taps' products straight from one rearranged
//! copy of the input, and computes their input gradients the same way. Other devices use candle's
//! convolution.

use std::ops::Range;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Storage, Tensor};

use super::amx::conv::{ConvDims, InputActivation, KernelOrder};
use super::amx::{self, Operand, Output, PackedLeft, Values};
use super::fill::par_filled;
use super::tied::Ready;

/// `conv2d(x, kernel)` with no groups and no dilation: `x` `[b, in, h, w]`, `kernel` `[out, in, kh, kw]`.
pub fn conv2d(x: &Tensor, kernel: &Tensor, padding: usize, stride: usize) -> Result<Tensor> {
    conv2d_ready(x, kernel, padding, stride).map(Ready::into_tensor)
}

/// [`conv2d`], its result as values ready to be tied where a product computed it.
pub(super) fn conv2d_ready(
    x: &Tensor,
    kernel: &Tensor,
    padding: usize,
    stride: usize,
) -> Result<Ready> {
    let (out_channels, in_channels, k_h, k_w) = kernel.dims4()?;
    if is_pointwise(x, (k_h, k_w), padding, stride) {
        let (batch, _, height, width) = x.dims4()?;
        let pixels = x
            .contiguous()?
            .reshape((batch, in_channels, height * width))?;
        let kernel = kernel.reshape((out_channels, in_channels))?;
        return super::products::matmul_ready(&kernel, &pixels)?.reshaped(&[
            batch,
            out_channels,
            height,
            width,
        ]);
    }
    let as_is = (kernel, KernelOrder::AsIs, None);
    if let Some(output) = direct_conv2d(x, as_is, (padding, stride), None)? {
        return Ok(output);
    }
    if super::winograd::applies(x, (k_h, k_w), padding, stride) {
        return Ok(Ready::Tensor(super::winograd::conv2d(
            x,
            &kernel.to_dtype(x.dtype())?,
        )?));
    }
    if !uses_patches(x, k_h, k_w) {
        let output = x.conv2d(&kernel.to_dtype(x.dtype())?, padding, stride, 1, 1)?;
        return Ok(Ready::Tensor(output));
    }
    let (batch, _, height, width) = x.dims4()?;
    let patches = Patches::new(kernel, (height, width), padding, stride)?;
    if let Some(output) = banded_conv2d(x, kernel, &patches, BAND_ELEMENTS)? {
        return Ok(output);
    }
    let (out_h, out_w) = patches.output_size()?;
    let columns = x.contiguous()?.apply_op1_no_bwd(&patches)?;
    let kernel_matrix = kernel
        .contiguous()?
        .reshape((out_channels, in_channels * k_h * k_w))?;
    let output = super::products::matmul_ready(&kernel_matrix, &columns)?;
    if batch == 1 {
        return output.reshaped(&[1, out_channels, out_h, out_w]);
    }
    let output = output
        .into_tensor()
        .reshape((out_channels, batch, out_h, out_w))?;
    Ok(Ready::Tensor(output.transpose(0, 1)?.contiguous()?))
}

/// The stride-1 convolution of `x` (f32 on the CPU) with `kernel` read in `order`, plus `bias` (one value
/// per output channel) where given, straight on AMX tiles ([`amx::conv`]) in bf16 products, `activation`
/// applied to `x` first, where the channels and the output width come in whole tiles; `None` otherwise
/// (other shapes, f32 products, other devices).
pub(super) fn direct_conv2d(
    x: &Tensor,
    (kernel, order, bias): (&Tensor, KernelOrder, Option<&Tensor>),
    (padding, stride): (usize, usize),
    activation: Option<InputActivation>,
) -> Result<Option<Ready>> {
    let applies = super::bf16_products()
        && stride == 1
        && x.dtype() == DType::F32
        && super::cpu_kernels(x.device());
    if !applies {
        return Ok(None);
    }
    let (batch, in_channels, height, width) = x.dims4()?;
    let (outs, ins, k_h, k_w) = kernel.dims4()?;
    let (out_channels, kernel_in) = match order {
        KernelOrder::AsIs => (outs, ins),
        KernelOrder::FlippedTransposed => (ins, outs),
    };
    if kernel_in != in_channels {
        candle_core::bail!("conv2d: the input has {in_channels} channels, the kernel {kernel_in}");
    }
    let dims = ConvDims {
        batch,
        in_channels,
        out_channels,
        height,
        width,
        kernel: (k_h, k_w),
        padding,
    };
    let Some((out_h, out_w)) = dims.output_size().filter(|_| dims.runs_directly()) else {
        return Ok(None);
    };
    let bias = match bias {
        Some(bias) if bias.elem_count() != out_channels => return Ok(None),
        Some(bias) => Some(bias.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?),
        None => None,
    };
    let len = batch * out_channels * out_h * out_w;
    let mut output = Vec::with_capacity(len);
    let convolved = with_kernel_values(kernel, |kernel| {
        super::fused_norm::with_values(x, |input| {
            amx::conv::conv2d(
                (input, activation),
                (kernel, order, bias.as_deref()),
                dims,
                &mut output.spare_capacity_mut()[..len],
            )
        })
    })?;
    if convolved.transpose()?.is_none() {
        return Ok(None);
    }
    // SAFETY: the convolution wrote all `len` values.
    unsafe { output.set_len(len) };
    let shape = Shape::from((batch, out_channels, out_h, out_w));
    Ok(Some(Ready::Cpu(CpuStorage::F32(output), shape)))
}

/// `f` of a kernel's values as a product operand reads them (f32, or bf16 as a bf16 run stores them), in
/// its stored element order; `None` for a kernel elsewhere than in CPU memory.
fn with_kernel_values<R>(kernel: &Tensor, f: impl FnOnce(Values) -> R) -> Result<Option<R>> {
    let kernel = kernel.contiguous()?;
    let (storage, layout) = kernel.storage_and_layout();
    let Storage::Cpu(storage) = &*storage else {
        return Ok(None);
    };
    Ok(super::products::cpu_values(storage)
        .and_then(|values| values.starting_at(layout.start_offset()))
        .map(f))
}

/// Whether [`conv2d`] and [`conv2d_input_grad`] compute `x` with a `kh`x`kw` kernel as a plain product.
fn is_pointwise(x: &Tensor, kernel: (usize, usize), padding: usize, stride: usize) -> bool {
    super::cpu_kernels(x.device()) && kernel == (1, 1) && padding == 0 && stride == 1
}

/// Whether [`conv2d`] and [`conv2d_input_grad`] use the patch matrix for `x` and a `kh`x`kw` kernel.
fn uses_patches(x: &Tensor, k_h: usize, k_w: usize) -> bool {
    super::cpu_kernels(x.device())
        && matches!(x.dtype(), DType::F32 | DType::F64)
        && (k_h, k_w) != (1, 1)
}

/// The gradient of [`conv2d`]'s input `[b, in, height, width]` given the output gradient `grad`, on the CPU
/// (else `None`): for a 1x1 kernel the transposed kernel times each image's output gradient; for 3x3 ones
/// on large maps [`super::winograd`]; with stride 1 over many pixels (at least four per output channel) the
/// convolution of the output gradient with the flipped, channel-transposed kernel; otherwise the product
/// of the transposed kernel `[in·kh·kw, out]` (a view, no copy) with the output gradient gives the gradient
/// of the patch matrix, whose entries are then added back to the input positions they were taken from.
pub fn conv2d_input_grad(
    grad: &Tensor,
    kernel: &Tensor,
    (height, width): (usize, usize),
    padding: usize,
    stride: usize,
) -> Result<Option<Tensor>> {
    let (out_channels, in_channels, k_h, k_w) = kernel.dims4()?;
    let (batch, _, out_h, out_w) = grad.dims4()?;
    if is_pointwise(grad, (k_h, k_w), padding, stride) {
        if (out_h, out_w) != (height, width) {
            candle_core::bail!(
                "conv2d input gradient: the output gradient does not fit the input size"
            );
        }
        let pixels = grad
            .contiguous()?
            .reshape((batch, out_channels, out_h * out_w))?;
        return Ok(Some(
            super::products::matmul(&kernel.reshape((out_channels, in_channels))?.t()?, &pixels)?
                .reshape((batch, in_channels, height, width))?,
        ));
    }
    if stride == 1 && k_h == k_w && padding < k_h {
        let flipped = (kernel, KernelOrder::FlippedTransposed, None);
        if let Some(output) = direct_conv2d(grad, flipped, (k_h - 1 - padding, 1), None)? {
            let output = output.into_tensor();
            if output.dims()[2..] != [height, width] {
                candle_core::bail!(
                    "conv2d input gradient: the output gradient does not fit the input size"
                );
            }
            return Ok(Some(output));
        }
    }
    if super::winograd::applies(grad, (k_h, k_w), padding, stride)
        && (out_h, out_w) == (height, width)
    {
        return super::winograd::conv2d_input_grad(grad, &kernel.to_dtype(grad.dtype())?).map(Some);
    }
    if !uses_patches(grad, k_h, k_w) {
        return Ok(None);
    }
    if stride == 1 && k_h == k_w && padding < k_h && batch * out_h * out_w >= 4 * out_channels {
        // Over many pixels the patch matrix's gradient (`in·kh·kw` rows, one column per pixel) is far
        // larger than the kernel, and its product runs over only `out` channels: the convolution of the
        // output gradient with the flipped kernel computes the same sums as one long product instead.
        let flipped = flipped_transposed(kernel)?;
        return conv2d(grad, &flipped, k_h - 1 - padding, 1).map(Some);
    }
    let patches = Patches::new(kernel, (height, width), padding, stride)?;
    if patches.output_size()? != (out_h, out_w) {
        candle_core::bail!(
            "conv2d input gradient: the output gradient does not fit the input size"
        );
    }
    let grad = if batch == 1 {
        grad.reshape((out_channels, out_h * out_w))?
    } else {
        grad.transpose(0, 1)?
            .contiguous()?
            .reshape((out_channels, batch * out_h * out_w))?
    };
    let kernel_t = kernel
        .contiguous()?
        .reshape((out_channels, in_channels * k_h * k_w))?
        .t()?;
    let column_grad = super::products::matmul(&kernel_t, &grad.contiguous()?)?;
    Ok(Some(
        column_grad.apply_op1_no_bwd(&PatchSum { patches, batch })?,
    ))
}

/// A `[out, in, kh, kw]` kernel as `[in, out, kh, kw]` with both spatial axes reversed: the kernel of the
/// input-gradient convolution. It is built anew in every backward pass (keeping one per layer would double
/// the model's convolution weights in memory), so on the CPU it is one pass over the weights.
pub(super) fn flipped_transposed(kernel: &Tensor) -> Result<Tensor> {
    let (_, _, k_h, k_w) = kernel.dims4()?;
    if k_h == 1 && k_w == 1 {
        return kernel.transpose(0, 1)?.contiguous();
    }
    if super::cpu_kernels(kernel.device()) {
        return kernel.contiguous()?.apply_op1_no_bwd(&FlipTranspose);
    }
    let reversed =
        |n: usize| Tensor::new((0..n as u32).rev().collect::<Vec<u32>>(), kernel.device());
    kernel
        .index_select(&reversed(k_h)?, 2)?
        .index_select(&reversed(k_w)?, 3)?
        .transpose(0, 1)?
        .contiguous()
}

/// The CPU kernel of [`flipped_transposed`].
struct FlipTranspose;

impl FlipTranspose {
    fn apply<T: Copy>(source: &[T], (outs, ins, k_h, k_w): (usize, usize, usize, usize)) -> Vec<T> {
        let window = k_h * k_w;
        let mut flipped = Vec::with_capacity(source.len());
        for i in 0..ins {
            for o in 0..outs {
                let start = (o * ins + i) * window;
                flipped.extend(source[start..start + window].iter().rev());
            }
        }
        flipped
    }
}

impl CustomOp1 for FlipTranspose {
    fn name(&self) -> &'static str {
        "flip-transpose-kernel"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let dims = layout.shape().dims4()?;
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("flip-transpose: the kernel is not contiguous");
        };
        let flipped = match storage {
            CpuStorage::F32(v) => CpuStorage::F32(Self::apply(&v[start..end], dims)),
            CpuStorage::F16(v) => CpuStorage::F16(Self::apply(&v[start..end], dims)),
            CpuStorage::BF16(v) => CpuStorage::BF16(Self::apply(&v[start..end], dims)),
            CpuStorage::F64(v) => CpuStorage::F64(Self::apply(&v[start..end], dims)),
            other => candle_core::bail!("flip-transpose: unsupported dtype {:?}", other.dtype()),
        };
        Ok((flipped, Shape::from((dims.1, dims.0, dims.2, dims.3))))
    }
}

/// The patch matrix of a convolution's input: row `(c, i, j)` holds, for every output pixel of every
/// image, the input value under kernel tap `(i, j)` of channel `c` (zero in the padding).
struct Patches {
    in_channels: usize,
    height: usize,
    width: usize,
    k_h: usize,
    k_w: usize,
    padding: usize,
    stride: usize,
}

impl Patches {
    /// The patches `kernel` (`[out, in, kh, kw]`) sees of a `height`x`width` input.
    fn new(
        kernel: &Tensor,
        (height, width): (usize, usize),
        padding: usize,
        stride: usize,
    ) -> Result<Self> {
        let (_, in_channels, k_h, k_w) = kernel.dims4()?;
        Ok(Self {
            in_channels,
            height,
            width,
            k_h,
            k_w,
            padding,
            stride,
        })
    }

    fn output_size(&self) -> Result<(usize, usize)> {
        let size = |input: usize, kernel: usize| {
            (input + 2 * self.padding)
                .checked_sub(kernel)
                .map(|span| span / self.stride + 1)
        };
        match (size(self.height, self.k_h), size(self.width, self.k_w)) {
            (Some(h), Some(w)) => Ok((h, w)),
            _ => candle_core::bail!("conv2d: the kernel is larger than the padded input"),
        }
    }

    /// The output columns `first..end` whose input column for kernel column `j` lies inside the image
    /// (`in_x = ox·stride + j − padding`).
    fn valid_columns(&self, j: usize, out_w: usize) -> (usize, usize) {
        let first = self.padding.saturating_sub(j).div_ceil(self.stride);
        let end = (self.width + self.padding)
            .saturating_sub(j)
            .div_ceil(self.stride)
            .min(out_w);
        (first, end)
    }

    /// Fills the patch matrix from `input` (`[batch, in, h, w]`, contiguous).
    fn fill<T: Copy + Send + Sync + num_traits::Zero>(
        &self,
        input: &[T],
        batch: usize,
    ) -> Result<Vec<T>> {
        let (out_h, out_w) = self.output_size()?;
        let image_len = out_h * out_w;
        let row_len = batch * image_len;
        let taps = self.k_h * self.k_w;
        let columns = par_filled(
            self.in_channels * taps * row_len,
            row_len,
            T::zero(),
            |row, out| {
                let (channel, tap) = (row / taps, row % taps);
                for (image, target) in out.chunks_exact_mut(image_len).enumerate() {
                    let source = self.plane(input, image, channel);
                    self.fill_tap(source, tap, (0..out_h, out_w), target);
                }
            },
        );
        Ok(columns)
    }

    /// The patch matrix of output rows `rows` of one image of `input` (`[batch, in, h, w]`, contiguous):
    /// `[in·kh·kw, rows·out_w]`.
    fn fill_band<T: Copy + Send + Sync + num_traits::Zero>(
        &self,
        input: &[T],
        image: usize,
        rows: Range<usize>,
    ) -> Result<Vec<T>> {
        let (_, out_w) = self.output_size()?;
        let row_len = rows.len() * out_w;
        let taps = self.k_h * self.k_w;
        Ok(par_filled(
            self.in_channels * taps * row_len,
            row_len,
            T::zero(),
            |row, out| {
                let source = self.plane(input, image, row / taps);
                self.fill_tap(source, row % taps, (rows.clone(), out_w), out);
            },
        ))
    }

    /// Channel `channel` of image `image` of `input` (`[batch, in, h, w]`, contiguous).
    fn plane<'a, T>(&self, input: &'a [T], image: usize, channel: usize) -> &'a [T] {
        let plane = self.height * self.width;
        &input[(image * self.in_channels + channel) * plane..][..plane]
    }

    /// The values under kernel tap `tap` (`i·kw + j`) of one input plane for output rows `rows` (each
    /// `out_w` wide), into `target`; values in the padding are left as they are.
    fn fill_tap<T: Copy>(
        &self,
        source: &[T],
        tap: usize,
        (rows, out_w): (Range<usize>, usize),
        target: &mut [T],
    ) {
        let (i, j) = (tap / self.k_w, tap % self.k_w);
        let (first_x, end_x) = self.valid_columns(j, out_w);
        for (index, oy) in rows.enumerate() {
            let Some(in_y) = (oy * self.stride + i).checked_sub(self.padding) else {
                continue;
            };
            if in_y >= self.height || first_x >= end_x {
                continue;
            }
            let line = &source[in_y * self.width..][..self.width];
            let target = &mut target[index * out_w..][..out_w];
            let first_in = first_x * self.stride + j - self.padding;
            if self.stride == 1 {
                target[first_x..end_x].copy_from_slice(&line[first_in..first_in + end_x - first_x]);
            } else {
                for (k, value) in target[first_x..end_x].iter_mut().enumerate() {
                    *value = line[first_in + k * self.stride];
                }
            }
        }
    }
}

/// Patch values per band of [`banded_conv2d`] in a model's convolutions (16 MiB of f32).
const BAND_ELEMENTS: usize = 1 << 22;

/// The patch-matrix convolution of `x` (f32) in bf16 products, when its patch matrix is larger than a band
/// of `band_elements` values: band by band of output rows, each band's patches are made, multiplied by the kernel (packed once for
/// all bands) into the band's output columns, and dropped, so the patch matrix (nine times the input for a
/// 3x3 kernel: 377 MB for SDXL's 640-channel convolutions at 1024 px) never exists whole. `None` otherwise.
fn banded_conv2d(
    x: &Tensor,
    kernel: &Tensor,
    patches: &Patches,
    band_elements: usize,
) -> Result<Option<Ready>> {
    let (batch, _, _, _) = x.dims4()?;
    let (out_h, out_w) = patches.output_size()?;
    let depth = patches.in_channels * patches.k_h * patches.k_w;
    let image_len = out_h * out_w;
    let applies = super::bf16_products() && x.dtype() == DType::F32 && x.device().is_cpu();
    if !applies || depth * batch * image_len <= band_elements {
        return Ok(None);
    }
    let out_channels = kernel.dim(0)?;
    let packed = with_kernel_values(kernel, |kernel_values| {
        let kernel_matrix = Operand {
            data: kernel_values,
            row_stride: depth,
            col_stride: 1,
        };
        PackedLeft::new(kernel_matrix, (out_channels, depth), true)
    })?;
    let Some(left) = packed else {
        return Ok(None);
    };
    let band_rows = (band_elements / (depth * out_w)).clamp(1, out_h);
    let mut output = par_filled(batch * out_channels * image_len, 1 << 14, 0f32, |_, _| {});
    super::fused_norm::with_values(&x.contiguous()?, |input| -> Result<()> {
        for image in 0..batch {
            for first in (0..out_h).step_by(band_rows) {
                let rows = first..(first + band_rows).min(out_h);
                let columns = rows.len() * out_w;
                let band = patches.fill_band(input, image, rows)?;
                let out = Output {
                    data: &mut output[image * out_channels * image_len + first * out_w..],
                    row_stride: image_len,
                    accumulate: false,
                    scale: 1.0,
                };
                amx::product_packed(&left, Operand::f32(&band, columns, 1), columns, out, true);
            }
        }
        Ok(())
    })??;
    let shape = Shape::from((batch, out_channels, out_h, out_w));
    Ok(Some(Ready::Cpu(CpuStorage::F32(output), shape)))
}

/// The inverse of [`Patches`]: adds each entry of a patch matrix (`[in·kh·kw, batch·out_h·out_w]`) back to
/// the input position it came from, giving `[batch, in, height, width]`.
struct PatchSum {
    patches: Patches,
    batch: usize,
}

impl PatchSum {
    fn sum<T: Copy + Send + Sync + num_traits::Zero + std::ops::AddAssign>(
        &self,
        columns: &[T],
    ) -> Result<Vec<T>> {
        let p = &self.patches;
        let (out_h, out_w) = p.output_size()?;
        let taps = p.k_h * p.k_w;
        let row_len = self.batch * out_h * out_w;
        let plane = p.height * p.width;
        let len = self.batch * p.in_channels * plane;
        // One input plane per task: its taps' rows are the only ones that write to it.
        let input = par_filled(len, plane, T::zero(), |index, target| {
            let (image, channel) = (index / p.in_channels, index % p.in_channels);
            for tap in 0..taps {
                let (i, j) = (tap / p.k_w, tap % p.k_w);
                let row = &columns[(channel * taps + tap) * row_len..][..row_len];
                let (first_x, end_x) = p.valid_columns(j, out_w);
                for oy in 0..out_h {
                    let Some(in_y) = (oy * p.stride + i).checked_sub(p.padding) else {
                        continue;
                    };
                    if in_y >= p.height || first_x >= end_x {
                        continue;
                    }
                    let line = &mut target[in_y * p.width..][..p.width];
                    let source = &row[(image * out_h + oy) * out_w..][first_x..end_x];
                    let first_in = first_x * p.stride + j - p.padding;
                    for (k, &value) in source.iter().enumerate() {
                        line[first_in + k * p.stride] += value;
                    }
                }
            }
        });
        Ok(input)
    }
}

impl CustomOp1 for PatchSum {
    fn name(&self) -> &'static str {
        "conv2d-patch-sum"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("conv2d patch sum: the patch gradient is not contiguous");
        };
        let input = match storage {
            CpuStorage::F32(v) => CpuStorage::F32(self.sum(&v[start..end])?),
            CpuStorage::F64(v) => CpuStorage::F64(self.sum(&v[start..end])?),
            other => candle_core::bail!("conv2d patch sum: unsupported dtype {:?}", other.dtype()),
        };
        let p = &self.patches;
        Ok((
            input,
            Shape::from((self.batch, p.in_channels, p.height, p.width)),
        ))
    }
}

impl CustomOp1 for Patches {
    fn name(&self) -> &'static str {
        "conv2d-patches"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (batch, channels, height, width) = layout.shape().dims4()?;
        if (channels, height, width) != (self.in_channels, self.height, self.width) {
            candle_core::bail!("conv2d patches: the input is not the size they were planned for");
        }
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("conv2d patches: the input is not contiguous");
        };
        let columns = match storage {
            CpuStorage::F32(v) => CpuStorage::F32(self.fill(&v[start..end], batch)?),
            CpuStorage::F64(v) => CpuStorage::F64(self.fill(&v[start..end], batch)?),
            other => candle_core::bail!("conv2d patches: unsupported dtype {:?}", other.dtype()),
        };
        let (out_h, out_w) = self.output_size()?;
        let rows = self.in_channels * self.k_h * self.k_w;
        Ok((columns, Shape::from((rows, batch * out_h * out_w))))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};

    use crate::test_support::max_abs_diff;

    /// Batch, input size, kernel size, padding and stride.
    type Case = (usize, (usize, usize), usize, usize, usize);

    /// Odd and even sizes, strides that do and do not cover the input exactly; 1x1 kernels as plain
    /// products (stride 1, no padding) and through candle (strided).
    const CASES: [Case; 11] = [
        (1, (9, 7), 3, 1, 1),
        (2, (9, 7), 3, 1, 2),
        (1, (8, 8), 3, 1, 2),
        (3, (8, 8), 3, 0, 1),
        (2, (7, 10), 3, 1, 1),
        (1, (6, 9), 3, 2, 1),
        (1, (6, 11), 3, 2, 2),
        (2, (10, 9), 5, 2, 3),
        (1, (4, 5), 1, 0, 1),
        (3, (5, 4), 1, 0, 1),
        (2, (6, 7), 1, 0, 2),
    ];

    #[test]
    fn bands_of_patches_give_the_whole_product() {
        let Some(_scope) = crate::kernels::Bf16Products::enter() else {
            // Without AMX there are no bf16 products, and no bands.
            return;
        };
        for (batch, size, k, padding, stride) in [CASES[1], CASES[4], CASES[7]] {
            let (x, kernel) = input_and_kernel(batch, size, k);
            let [x, kernel] = [x, kernel].map(|t| t.to_dtype(DType::F32).unwrap());
            let patches = super::Patches::new(&kernel, size, padding, stride).unwrap();
            let whole = super::conv2d(&x, &kernel, padding, stride).unwrap();
            // Bands of one and of two output rows.
            for band in [1, 4 * k * k * 2 * size.1] {
                let banded = super::banded_conv2d(&x, &kernel, &patches, band)
                    .unwrap()
                    .unwrap()
                    .into_tensor();
                let diff = max_abs_diff(
                    &banded.to_dtype(DType::F64).unwrap(),
                    &whole.to_dtype(DType::F64).unwrap(),
                );
                assert!(
                    diff < 1e-5,
                    "{batch} {size:?} k{k} p{padding} s{stride}: {diff}"
                );
            }
        }
    }

    fn input_and_kernel(batch: usize, size: (usize, usize), k: usize) -> (Tensor, Tensor) {
        let device = Device::Cpu;
        (
            Tensor::randn(0f64, 1.0, (batch, 4, size.0, size.1), &device).unwrap(),
            Tensor::randn(0f64, 1.0, (5, 4, k, k), &device).unwrap(),
        )
    }

    #[test]
    fn matches_candles_convolution_for_every_padding_stride_and_batch() {
        for (batch, size, k, padding, stride) in CASES {
            let (x, kernel) = input_and_kernel(batch, size, k);
            let ours = super::conv2d(&x, &kernel, padding, stride).unwrap();
            let reference = x.conv2d(&kernel, padding, stride, 1, 1).unwrap();
            let diff = max_abs_diff(&ours, &reference);
            assert!(
                diff < 1e-12,
                "{batch} {size:?} k{k} p{padding} s{stride}: {diff}"
            );
            let (x32, k32) = (
                x.to_dtype(DType::F32).unwrap(),
                kernel.to_dtype(DType::F32).unwrap(),
            );
            let ours = super::conv2d(&x32, &k32, padding, stride).unwrap();
            let reference = x32.conv2d(&k32, padding, stride, 1, 1).unwrap();
            let diff = max_abs_diff(
                &ours.to_dtype(DType::F64).unwrap(),
                &reference.to_dtype(DType::F64).unwrap(),
            );
            assert!(
                diff < 1e-4,
                "f32 {batch} {size:?} k{k} p{padding} s{stride}: {diff}"
            );
        }
        let (x, kernel) = input_and_kernel(1, (4, 4), 1);
        let diff = max_abs_diff(
            &super::conv2d(&x, &kernel, 0, 1).unwrap(),
            &x.conv2d(&kernel, 0, 1, 1, 1).unwrap(),
        );
        assert!(diff < 1e-12, "1x1: {diff}");
    }

    #[test]
    fn input_gradient_matches_the_transposed_convolution() {
        for (batch, size, k, padding, stride) in CASES {
            let (x, kernel) = input_and_kernel(batch, size, k);
            let output = x.conv2d(&kernel, padding, stride, 1, 1).unwrap();
            let weights = Tensor::randn(0f64, 1.0, output.dims(), &Device::Cpu).unwrap();
            // The gradient of sum(conv(x)·weights) by x: a transposed convolution with room for every
            // input row and column, cropped to the input.
            let reference = weights
                .conv_transpose2d(&kernel, padding, stride - 1, stride, 1)
                .unwrap()
                .narrow(2, 0, size.0)
                .unwrap()
                .narrow(3, 0, size.1)
                .unwrap();
            let Some(ours) =
                super::conv2d_input_grad(&weights, &kernel, size, padding, stride).unwrap()
            else {
                assert!(
                    (k, stride) == (1, 2),
                    "only strided 1x1 kernels are left to candle"
                );
                continue;
            };
            let diff = max_abs_diff(&ours, &reference);
            assert!(
                diff < 1e-12,
                "{batch} {size:?} k{k} p{padding} s{stride}: {diff}"
            );
        }
    }
}
