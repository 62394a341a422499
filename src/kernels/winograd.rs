//! 3x3 convolutions with stride 1 and padding 1 on the CPU by Winograd's minimal filtering F(4x4, 3x3).
//!
//! The output is cut into 4x4 tiles; each tile needs a 6x6 patch of the input. In the transformed domain
//! (`V = Bᵀ·d·B` for an input patch `d`, `U = G·g·Gᵀ` for a 3x3 kernel `g`) a tile of the convolution is an
//! element-wise product, so with the channels summed it becomes 36 independent matrix products
//! `U[p] · V[p]` (`[out, in] x [in, tiles]`), followed by `Aᵀ·M·A` back to a 4x4 tile. That is 4.5 multiplies
//! per output and input channel instead of 9·2 = 18 for the patch matrix, and the transformed input is 2.25x
//! the input instead of 9x. The transforms are exact but for rounding, which differs from the direct sum's
//! (their coefficients range from 1/24 to 8): the VAE's outputs still match diffusers' to 5e-6.
//!
//! The input gradient of such a convolution is the same convolution of the output gradient with the
//! spatially flipped, channel-transposed kernel, so the backward pass runs here too; the flipped kernel is
//! never built, its transform is read straight from the kernel. The kernel transform is 4x the kernel, built
//! on every call: with few output tiles it costs more than it saves, so small images (fewer than
//! [`MIN_TILES`] tiles in the batch) stay with the patch matrix. Inside a bf16-products scope
//! ([`super::products`]) the patch matrix is used throughout, so bf16 rounding applies to the inputs and
//! kernels themselves, not to their transforms: its AMX product, forward+backward, is as fast as Winograd in
//! f32 at 64x64 with 320 channels (39.5 vs 38.5 ms) and 2.2-2.6x faster at 32x32 and 16x16.

use std::mem::MaybeUninit;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use num_traits::Float;
use rayon::prelude::*;

use super::fast_math::{Simd, vectorised};

/// Side of an output tile.
const TILE: usize = 4;
/// Side of the input patch a tile needs (tile plus the kernel's reach of one on each side).
const PATCH: usize = TILE + 2;
/// Points of the transformed domain: one matrix product each.
const POINTS: usize = PATCH * PATCH;
/// Fewest output tiles in a batch for which the transforms pay for themselves (32x32 at batch 1). Measured
/// per layer of SD1.5: at 16x16 with 1280 channels the kernel transform (236 MB) costs about what the
/// products save.
const MIN_TILES: usize = 64;

/// Whether a convolution of `x` (`[b, c, h, w]`) with a `kernel` of that size, padding and stride runs here.
pub fn applies(x: &Tensor, kernel: (usize, usize), padding: usize, stride: usize) -> bool {
    let Ok((batch, _, height, width)) = x.dims4() else {
        return false;
    };
    super::cpu_kernels(x.device())
        && matches!(x.dtype(), DType::F32 | DType::F64)
        && !super::products::bf16_products()
        && kernel == (3, 3)
        && padding == 1
        && stride == 1
        && batch * height.div_ceil(TILE) * width.div_ceil(TILE) >= MIN_TILES
}

/// `conv2d(x, kernel)` with padding 1 and stride 1: `x` `[b, in, h, w]`, `kernel` `[out, in, 3, 3]`, output
/// `[b, out, h, w]`.
pub fn conv2d(x: &Tensor, kernel: &Tensor) -> Result<Tensor> {
    transformed_conv(x, kernel, KernelTransform { flipped: false })
}

/// The gradient of [`conv2d`]'s input given the output gradient `grad` (`[b, out, h, w]`): the same
/// convolution with the flipped, channel-transposed kernel.
pub fn conv2d_input_grad(grad: &Tensor, kernel: &Tensor) -> Result<Tensor> {
    transformed_conv(grad, kernel, KernelTransform { flipped: true })
}

fn transformed_conv(x: &Tensor, kernel: &Tensor, transform: KernelTransform) -> Result<Tensor> {
    let (batch, channels, height, width) = x.dims4()?;
    if x.elem_count() == 0 || kernel.elem_count() == 0 {
        candle_core::bail!(
            "winograd conv2d: the input {:?} or the kernel {:?} is empty",
            x.dims(),
            kernel.dims()
        );
    }
    let kernel_transform = kernel.contiguous()?.apply_op1_no_bwd(&transform)?;
    let (_, out_channels, in_channels) = kernel_transform.dims3()?;
    if in_channels != channels {
        candle_core::bail!(
            "winograd conv2d: the input has {channels} channels, the kernel expects {in_channels}"
        );
    }
    let tiles = Tiles {
        batch,
        height,
        width,
    };
    let input_transform = x.contiguous()?.apply_op1_no_bwd(&InputTransform(tiles))?;
    kernel_transform
        .matmul(&input_transform)?
        .apply_op1_no_bwd(&OutputTransform(tiles))?
        .reshape((batch, out_channels, height, width))
}

/// The tiling of a batch of `height`x`width` images; tiles are numbered image by image, row by row.
#[derive(Clone, Copy)]
struct Tiles {
    batch: usize,
    height: usize,
    width: usize,
}

impl Tiles {
    fn rows(&self) -> usize {
        self.height.div_ceil(TILE)
    }

    fn columns(&self) -> usize {
        self.width.div_ceil(TILE)
    }

    fn per_image(&self) -> usize {
        self.rows() * self.columns()
    }

    fn count(&self) -> usize {
        self.batch * self.per_image()
    }
}

/// `Bᵀ·d` for one column `d` of an input patch.
#[inline(always)]
fn input_1d<T: Float>(d: [T; PATCH], c: &Constants<T>) -> [T; PATCH] {
    let [d0, d1, d2, d3, d4, d5] = d;
    [
        c.four * d0 - c.five * d2 + d4,
        d3 + d4 - c.four * (d1 + d2),
        c.four * (d1 - d2) - d3 + d4,
        c.two * (d3 - d1) - d2 + d4,
        c.two * (d1 - d3) - d2 + d4,
        c.four * d1 - c.five * d3 + d5,
    ]
}

/// `Aᵀ·m` for one column `m` of a transformed tile.
#[inline(always)]
fn output_1d<T: Float>(m: [T; PATCH], c: &Constants<T>) -> [T; TILE] {
    let [m0, m1, m2, m3, m4, m5] = m;
    let (sum12, diff12, sum34, diff34) = (m1 + m2, m1 - m2, m3 + m4, m3 - m4);
    [
        m0 + sum12 + sum34,
        diff12 + c.two * diff34,
        sum12 + c.four * sum34,
        diff12 + c.eight * diff34 + m5,
    ]
}

/// `G·g` for one column `g` of a 3x3 kernel.
#[inline(always)]
fn kernel_1d<T: Float>(g: [T; 3], c: &Constants<T>) -> [T; PATCH] {
    let [g0, g1, g2] = g;
    let (outer, middle) = (g0 + g2, g1);
    [
        g0 * c.quarter,
        -(outer + middle) * c.sixth,
        (middle - outer) * c.sixth,
        (g0 * c.quarter + middle * c.half + g2) * c.sixth,
        (g0 * c.quarter - middle * c.half + g2) * c.sixth,
        g2,
    ]
}

/// The transforms' coefficients in the working precision.
struct Constants<T> {
    two: T,
    four: T,
    five: T,
    eight: T,
    half: T,
    quarter: T,
    sixth: T,
}

impl<T: Float> Constants<T> {
    fn new() -> Self {
        let of = |value: f64| T::from(value).unwrap_or_else(T::zero);
        Self {
            two: of(2.0),
            four: of(4.0),
            five: of(5.0),
            eight: of(8.0),
            half: of(0.5),
            quarter: of(0.25),
            sixth: of(1.0 / 6.0),
        }
    }
}

/// `outputs[k][t] = transform(inputs[0][t], …, inputs[N-1][t])[k]` for every lane `t`: a 1-D transform
/// applied to a row of tiles (or kernel pairs) at once, in a loop the compiler vectorises across lanes.
#[inline(always)]
fn across_lanes<T: Copy, S: Slot<T>, const N: usize, const M: usize>(
    inputs: [&[T]; N],
    outputs: [&mut [S]; M],
    transform: impl Fn([T; N]) -> [T; M],
) {
    let lanes = outputs.first().map_or(0, |output| output.len());
    let inputs = inputs.map(|input| &input[..lanes]);
    let mut outputs = outputs.map(|output| &mut output[..lanes]);
    for t in 0..lanes {
        let result = transform(std::array::from_fn(|j| inputs[j][t]));
        for (output, value) in outputs.iter_mut().zip(result) {
            output[t].set(value);
        }
    }
}

/// An element a transform writes: scratch space, or a result buffer that is filled without being zeroed
/// first (zeroing a transformed kernel of hundreds of megabytes costs as much as computing it).
trait Slot<T> {
    fn set(&mut self, value: T);
}

impl<T> Slot<T> for T {
    #[inline(always)]
    fn set(&mut self, value: T) {
        *self = value;
    }
}

impl<T> Slot<T> for MaybeUninit<T> {
    #[inline(always)]
    fn set(&mut self, value: T) {
        self.write(value);
    }
}

/// A vector of `len` elements written by `fill`, which is handed the vector's uninitialised storage.
///
/// # Safety
/// `fill` must write every one of the `len` elements.
unsafe fn filled<T>(len: usize, fill: impl FnOnce(&mut [MaybeUninit<T>])) -> Vec<T> {
    let mut buffer = Vec::with_capacity(len);
    fill(&mut buffer.spare_capacity_mut()[..len]);
    // SAFETY: the capacity is `len`, and the caller guarantees that `fill` initialised all of it.
    unsafe { buffer.set_len(len) };
    buffer
}

/// Rows `first, first + step, …` (`N` of them) of a buffer of `len`-long rows.
fn rows<T, const N: usize>(buffer: &[T], len: usize, first: usize, step: usize) -> [&[T]; N] {
    std::array::from_fn(|k| &buffer[(first + k * step) * len..][..len])
}

/// `M` consecutive `len`-long rows of `buffer`, starting at row `first`. A row past the buffer is an indexing
/// bug in a caller, which must not go on to leave part of an output unwritten: it panics.
fn rows_mut<T, const M: usize>(buffer: &mut [T], len: usize, first: usize) -> [&mut [T]; M] {
    let available = buffer.len() / len.max(1);
    let mut rows = buffer[first * len..].chunks_exact_mut(len);
    std::array::from_fn(|_| {
        rows.next().unwrap_or_else(|| {
            panic!(
                "rows {first}..{} of {len} are past a buffer of {available} rows",
                first + M
            )
        })
    })
}

/// The `M` segments `first, first + step, …` of `segments`, each narrowed to `range`. A segment past the
/// end is an indexing bug in a caller (its elements would stay uninitialised): it panics.
fn segments_mut<'a, T, const M: usize>(
    segments: &'a mut [&mut [T]],
    (first, step): (usize, usize),
    range: std::ops::Range<usize>,
) -> [&'a mut [T]; M] {
    let count = segments.len();
    let mut picked = segments.iter_mut().skip(first).step_by(step);
    std::array::from_fn(|k| match picked.next() {
        Some(segment) => &mut segment[range.clone()],
        None => panic!("segment {} is past the {count} segments", first + k * step),
    })
}

/// A `[36, rows, len]` result written row by row in parallel: `write(row, scratch, segments)` gets the
/// row's 36 segments (point `p`'s at index `p`, `len` long each) and a zeroed scratch buffer of
/// `scratch_len` per thread.
///
/// # Safety
/// `write` must write every element of every segment it is given.
unsafe fn points_by_row<T: Float + Send + Sync>(
    (rows, len): (usize, usize),
    scratch_len: usize,
    write: impl Fn(usize, &mut [T], &mut [&mut [MaybeUninit<T>]]) + Sync,
) -> Vec<T> {
    let fill = |data: &mut [MaybeUninit<T>]| {
        let mut by_row: Vec<Vec<&mut [MaybeUninit<T>]>> = (0..rows).map(|_| Vec::new()).collect();
        for slab in data.chunks_mut(rows * len) {
            for (segments, segment) in by_row.iter_mut().zip(slab.chunks_mut(len)) {
                segments.push(segment);
            }
        }
        by_row.into_par_iter().enumerate().for_each_init(
            || vec![T::zero(); scratch_len],
            |scratch, (row, mut segments)| write(row, scratch, &mut segments),
        );
    };
    // SAFETY: the segments cover the whole buffer, and the caller guarantees `write` fills each of them.
    unsafe { filled(POINTS * rows * len, fill) }
}

/// One of the three transforms' passes over the data, for either float type.
trait Transform {
    /// Transforms `data`, laid out as `dims` (checked by the op).
    fn apply<T: Float + Send + Sync>(&self, data: &[T], dims: &[usize]) -> Vec<T>;
}

/// Runs `transform` on contiguous f32 or f64 storage; `what` names the operand in errors.
fn apply_to_storage(
    transform: &impl Transform,
    storage: &CpuStorage,
    layout: &Layout,
    what: &str,
) -> Result<CpuStorage> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("winograd conv2d: the {what} is not contiguous");
    };
    let dims = layout.dims();
    Ok(match storage {
        CpuStorage::F32(v) => CpuStorage::F32(transform.apply(&v[start..end], dims)),
        CpuStorage::F64(v) => CpuStorage::F64(transform.apply(&v[start..end], dims)),
        other => candle_core::bail!("winograd conv2d: unsupported dtype {:?}", other.dtype()),
    })
}

/// The kernel `[out, in, 3, 3]` in the transformed domain, `[36, out, in]`; `flipped` gives that of the
/// input-gradient kernel, `[36, in, out]` (spatially flipped, channels swapped).
struct KernelTransform {
    flipped: bool,
}

impl Transform for KernelTransform {
    fn apply<T: Float + Send + Sync>(&self, kernel: &[T], dims: &[usize]) -> Vec<T> {
        let (out, inp) = (dims[0], dims[1]);
        let c = Constants::new();
        let simd = Simd::detect();
        let (rows_count, columns) = if self.flipped { (inp, out) } else { (out, inp) };
        // Scratch per task: the taps `[3, 3, columns]`, then `G·g` down the kernel rows `[3, 6, columns]`.
        let scratch_len = (9 + 3 * PATCH) * columns;
        let write = |row: usize, scratch: &mut [T], segments: &mut [&mut [MaybeUninit<T>]]| {
            let (taps, down) = scratch.split_at_mut(9 * columns);
            for (tap, lane) in taps.chunks_exact_mut(columns).enumerate() {
                for (column, value) in lane.iter_mut().enumerate() {
                    *value = if self.flipped {
                        kernel[(column * inp + row) * 9 + 8 - tap]
                    } else {
                        kernel[(row * inp + column) * 9 + tap]
                    };
                }
            }
            vectorised(
                simd,
                #[inline(always)]
                || {
                    for x in 0..3 {
                        let outputs = rows_mut(down, columns, x * PATCH);
                        across_lanes(rows(taps, columns, x, 3), outputs, |g| kernel_1d(g, &c));
                    }
                    for y in 0..PATCH {
                        let outputs = segments_mut(segments, (y * PATCH, 1), 0..columns);
                        across_lanes(rows(down, columns, y, PATCH), outputs, |g| kernel_1d(g, &c));
                    }
                },
            );
        };
        // SAFETY: `write` writes all `columns` elements of each of the row's 36 segments.
        unsafe { points_by_row((rows_count, columns), scratch_len, write) }
    }
}

impl CustomOp1 for KernelTransform {
    fn name(&self) -> &'static str {
        "winograd-kernel"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (out, inp, k_h, k_w) = layout.shape().dims4()?;
        if (k_h, k_w) != (3, 3) {
            candle_core::bail!("winograd conv2d: the kernel is {k_h}x{k_w}, not 3x3");
        }
        let transformed = apply_to_storage(self, storage, layout, "kernel")?;
        let (rows, columns) = if self.flipped { (inp, out) } else { (out, inp) };
        Ok((transformed, Shape::from((POINTS, rows, columns))))
    }
}

/// The input `[b, c, h, w]` in the transformed domain, `[36, c, tiles]`: each tile's 6x6 patch (zero
/// outside the image) as `Bᵀ·d·B`.
struct InputTransform(Tiles);

impl Transform for InputTransform {
    fn apply<T: Float + Send + Sync>(&self, input: &[T], dims: &[usize]) -> Vec<T> {
        let channels = dims[1];
        let (count, lanes) = (self.0.count(), self.0.columns());
        let (c, simd) = (Constants::new(), Simd::detect());
        // Scratch per task: an input row with a zero border, `[4·lanes + 2]`, and `d·B` of a row of tiles,
        // `[6 x-points, 6 patch rows, lanes]`.
        let scratch_len = TILE * lanes + 2 + POINTS * lanes;
        let write = |channel: usize, scratch: &mut [T], segments: &mut [&mut [MaybeUninit<T>]]| {
            let (padded, across) = scratch.split_at_mut(TILE * lanes + 2);
            for image in 0..self.0.batch {
                let plane = (image * channels + channel) * self.0.height * self.0.width;
                let plane = &input[plane..][..self.0.height * self.0.width];
                for tile_y in 0..self.0.rows() {
                    self.row_of_tiles(plane, tile_y, (padded, across), (&c, simd));
                    let first_tile = (image * self.0.rows() + tile_y) * lanes;
                    vectorised(
                        simd,
                        #[inline(always)]
                        || {
                            for x in 0..PATCH {
                                let outputs = segments_mut(
                                    segments,
                                    (x, PATCH),
                                    first_tile..first_tile + lanes,
                                );
                                let inputs = rows(across, lanes, x * PATCH, 1);
                                across_lanes(inputs, outputs, |d| input_1d(d, &c));
                            }
                        },
                    );
                }
            }
        };
        // SAFETY: `write` writes, for each of the 36 points (x-point x and y-point y at segment 6·y + x),
        // the `lanes` tiles of every row of tiles of every image: all `count` tiles of the channel.
        unsafe { points_by_row((channels, count), scratch_len, write) }
    }
}

impl InputTransform {
    /// `d·B` for the six patch rows of row of tiles `tile_y` of `plane`, into `across[x][i][t]`; `padded`
    /// (`4·lanes + 2` long) keeps zeros outside the image's columns.
    fn row_of_tiles<T: Float>(
        &self,
        plane: &[T],
        tile_y: usize,
        (padded, across): (&mut [T], &mut [T]),
        (c, simd): (&Constants<T>, Simd),
    ) {
        let (height, width) = (self.0.height, self.0.width);
        let lanes = self.0.columns();
        for i in 0..PATCH {
            let y = (tile_y * TILE + i).wrapping_sub(1);
            if y >= height {
                for x in 0..PATCH {
                    across[(x * PATCH + i) * lanes..][..lanes].fill(T::zero());
                }
                continue;
            }
            padded[1..=width].copy_from_slice(&plane[y * width..][..width]);
            vectorised(
                simd,
                #[inline(always)]
                || {
                    for t in 0..lanes {
                        let window = &padded[t * TILE..][..PATCH];
                        let row = input_1d(std::array::from_fn(|j| window[j]), c);
                        for (x, value) in row.into_iter().enumerate() {
                            across[(x * PATCH + i) * lanes + t] = value;
                        }
                    }
                },
            );
        }
    }
}

impl CustomOp1 for InputTransform {
    fn name(&self) -> &'static str {
        "winograd-input"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (batch, channels, height, width) = layout.shape().dims4()?;
        let tiles = self.0;
        if (batch, height, width) != (tiles.batch, tiles.height, tiles.width) {
            candle_core::bail!("winograd conv2d: the input is not the size it was planned for");
        }
        let transformed = apply_to_storage(self, storage, layout, "input")?;
        Ok((transformed, Shape::from((POINTS, channels, tiles.count()))))
    }
}

/// The products `[36, c, tiles]` back to the image domain, `[b, c, h, w]`: each tile as `Aᵀ·M·A`, cut to
/// the image.
struct OutputTransform(Tiles);

impl Transform for OutputTransform {
    fn apply<T: Float + Send + Sync>(&self, products: &[T], dims: &[usize]) -> Vec<T> {
        let channels = dims[1];
        let Tiles {
            batch,
            height,
            width,
        } = self.0;
        let (count, lanes) = (self.0.count(), self.0.columns());
        let (c, simd) = (Constants::new(), Simd::detect());
        // Scratch per task: `Aᵀ·M` of a row of tiles, `[6 x-points, 4 rows, lanes]`, and one output row of
        // it, `[4·lanes]`.
        let scratch_len = (PATCH + 1) * TILE * lanes;
        let fill = |output: &mut [MaybeUninit<T>]| {
            output
                .par_chunks_mut(height * width)
                .enumerate()
                .for_each_init(
                    || vec![T::zero(); scratch_len],
                    |scratch, (index, plane)| {
                        let (image, channel) = (index / channels, index % channels);
                        let (down, line) = scratch.split_at_mut(PATCH * TILE * lanes);
                        for tile_y in 0..self.0.rows() {
                            let first_tile = (image * self.0.rows() + tile_y) * lanes;
                            // Point p of this row of tiles: products[p][channel][first_tile..].
                            let point = |p: usize| {
                                &products[(p * channels + channel) * count + first_tile..][..lanes]
                            };
                            vectorised(
                                simd,
                                #[inline(always)]
                                || {
                                    for x in 0..PATCH {
                                        let inputs = std::array::from_fn(|y| point(y * PATCH + x));
                                        let outputs = rows_mut(down, lanes, x * TILE);
                                        across_lanes(inputs, outputs, |m| output_1d(m, &c));
                                    }
                                },
                            );
                            for i in 0..TILE {
                                let out_y = tile_y * TILE + i;
                                if out_y >= height {
                                    break;
                                }
                                vectorised(
                                    simd,
                                    #[inline(always)]
                                    || {
                                        for t in 0..lanes {
                                            let m = std::array::from_fn(|x| {
                                                down[(x * TILE + i) * lanes + t]
                                            });
                                            line[t * TILE..][..TILE]
                                                .copy_from_slice(&output_1d(m, &c));
                                        }
                                    },
                                );
                                let target = &mut plane[out_y * width..][..width];
                                for (target, &value) in target.iter_mut().zip(line.iter()) {
                                    target.write(value);
                                }
                            }
                        }
                    },
                );
        };
        // SAFETY: each plane's task writes the full `width` of every row `4·tile_y + i` below `height`
        // (`line` holds `4·lanes >= width` values): the whole plane.
        unsafe { filled(batch * channels * height * width, fill) }
    }
}

impl CustomOp1 for OutputTransform {
    fn name(&self) -> &'static str {
        "winograd-output"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (points, channels, count) = layout.shape().dims3()?;
        let tiles = self.0;
        if (points, count) != (POINTS, tiles.count()) {
            candle_core::bail!(
                "winograd conv2d: the products are not the size they were planned for"
            );
        }
        let output = apply_to_storage(self, storage, layout, "product matrix")?;
        Ok((
            output,
            Shape::from((tiles.batch, channels, tiles.height, tiles.width)),
        ))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};

    use crate::test_support::max_abs_diff;

    /// Batch, channels in and out, height, width: sizes that are and are not multiples of the tile.
    const CASES: [(usize, usize, usize, usize, usize); 4] = [
        (1, 3, 5, 8, 8),
        (2, 4, 3, 9, 7),
        (1, 2, 2, 5, 13),
        (3, 1, 4, 1, 6),
    ];

    fn input_and_kernel(
        (batch, inp, out, height, width): (usize, usize, usize, usize, usize),
        dtype: DType,
    ) -> (Tensor, Tensor) {
        let device = Device::Cpu;
        let x = Tensor::randn(0f64, 1.0, (batch, inp, height, width), &device).unwrap();
        let kernel = Tensor::randn(0f64, 1.0, (out, inp, 3, 3), &device).unwrap();
        (x.to_dtype(dtype).unwrap(), kernel.to_dtype(dtype).unwrap())
    }

    #[test]
    fn matches_the_direct_convolution_in_f64_and_f32() {
        for case in CASES {
            let (x, kernel) = input_and_kernel(case, DType::F64);
            let expected = x.conv2d(&kernel, 1, 1, 1, 1).unwrap();
            let got = super::conv2d(&x, &kernel).unwrap();
            assert_eq!(got.dims(), expected.dims());
            assert!(max_abs_diff(&got, &expected) < 1e-12, "{case:?}");

            let got = super::conv2d(
                &x.to_dtype(DType::F32).unwrap(),
                &kernel.to_dtype(DType::F32).unwrap(),
            )
            .unwrap();
            assert!(
                max_abs_diff(&got.to_dtype(DType::F64).unwrap(), &expected) < 1e-4,
                "{case:?}"
            );
        }
    }

    #[test]
    fn input_gradient_matches_the_transposed_convolution() {
        for case in CASES {
            let (x, kernel) = input_and_kernel(case, DType::F64);
            let (batch, _, out, height, width) = case;
            let grad = Tensor::randn(0f64, 1.0, (batch, out, height, width), &Device::Cpu).unwrap();
            let expected = grad.conv_transpose2d(&kernel, 1, 0, 1, 1).unwrap();
            let got = super::conv2d_input_grad(&grad, &kernel).unwrap();
            assert_eq!(got.dims(), x.dims());
            assert!(max_abs_diff(&got, &expected) < 1e-12, "{case:?}");
        }
    }

    #[test]
    fn small_images_and_other_kernels_are_left_to_the_patch_matrix() {
        let device = Device::Cpu;
        let large = Tensor::zeros((1, 2, 32, 32), DType::F32, &device).unwrap();
        let small = Tensor::zeros((1, 2, 16, 16), DType::F32, &device).unwrap();
        let batched = Tensor::zeros((4, 2, 16, 16), DType::F32, &device).unwrap();
        assert!(super::applies(&large, (3, 3), 1, 1));
        assert!(super::applies(&batched, (3, 3), 1, 1));
        assert!(!super::applies(&small, (3, 3), 1, 1));
        assert!(!super::applies(&large, (3, 3), 1, 2));
        assert!(!super::applies(&large, (3, 3), 0, 1));
        assert!(!super::applies(&large, (5, 5), 1, 1));
        assert!(!super::applies(
            &large.to_dtype(DType::F16).unwrap(),
            (3, 3),
            1,
            1
        ));
    }

    #[test]
    fn empty_channels_are_an_error_not_a_panic() {
        let device = Device::Cpu;
        let x = Tensor::zeros((1, 0, 32, 32), DType::F32, &device).unwrap();
        let kernel = Tensor::zeros((4, 0, 3, 3), DType::F32, &device).unwrap();
        assert!(super::conv2d(&x, &kernel).is_err());
        let x = Tensor::zeros((1, 2, 32, 32), DType::F32, &device).unwrap();
        let kernel = Tensor::zeros((0, 2, 3, 3), DType::F32, &device).unwrap();
        assert!(super::conv2d(&x, &kernel).is_err());
    }

    #[test]
    #[should_panic(expected = "past a buffer of 3 rows")]
    fn a_row_past_the_buffer_panics_instead_of_going_unwritten() {
        let mut buffer = [0f32; 12];
        let _: [&mut [f32]; 2] = super::rows_mut(&mut buffer, 4, 2);
    }

    #[test]
    #[should_panic(expected = "segment 4 is past the 4 segments")]
    fn a_segment_past_the_end_panics_instead_of_going_unwritten() {
        let mut data = [0f32; 8];
        let mut segments: Vec<&mut [f32]> = data.chunks_mut(2).collect();
        let _: [&mut [f32]; 3] = super::segments_mut(&mut segments, (0, 2), 0..2);
    }

    #[test]
    fn rows_and_segments_in_range_are_the_ones_asked_for() {
        let mut buffer: Vec<f32> = (0..12).map(|v| v as f32).collect();
        let [a, b]: [&mut [f32]; 2] = super::rows_mut(&mut buffer, 4, 1);
        assert_eq!((a[0], b[3]), (4.0, 11.0));
        let mut data: Vec<f32> = (0..8).map(|v| v as f32).collect();
        let mut segments: Vec<&mut [f32]> = data.chunks_mut(2).collect();
        let [c, d]: [&mut [f32]; 2] = super::segments_mut(&mut segments, (1, 2), 1..2);
        assert_eq!((c[0], d[0]), (3.0, 7.0));
    }
}
