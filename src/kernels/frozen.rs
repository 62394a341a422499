//! Frozen base layers whose backward pass computes only the gradient of their input.
//!
//! candle's autograd differentiates every operand of an op, frozen weights included: a plain `matmul` or
//! `conv2d` against a base weight spends as much time on the weight's (discarded) gradient as on the input's.
//! LoRA training never needs the base weight's gradient, so the base layers run through the custom ops here,
//! whose backward returns the input gradient alone. Convolutions on the CPU run as one matrix product
//! ([`super::im2col`]); a product with only a few input rows reads the weight directly
//! ([`super::few_rows`]). This module must not hold adapters or know about models.

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CudaStorage, CustomOp1, Device, Layout, MetalStorage, Result, Shape, Storage,
    Tensor,
};

use super::amx::conv::{InputActivation, KernelOrder};
use super::amx::{Operand, Orientation};
use super::frozen_weight::FrozenWeight;
use super::products::{Right, right_matmul};
use super::tied::{Ready, TiedBackward, tie};

/// `x · Wᵀ` for a frozen `W` of shape `[out, in]`, over any number of leading batch dimensions.
pub fn frozen_linear(x: &Tensor, weight: impl Into<FrozenWeight>) -> Result<Tensor> {
    match weight.into() {
        FrozenWeight::Tensor(weight) => x.contiguous()?.apply_op1(FrozenMatmul { weight }),
        weight => {
            let output = affine_ready(&x.detach(), &weight, None)?;
            tie(output, &[x], FrozenAffineBackward { weight })
        }
    }
}

/// `x · Wᵀ + b` with a frozen `W` and `b`, keeping only its output for the backward pass (the bias sum of
/// a separate op would keep the product as well).
pub fn frozen_affine(x: &Tensor, weight: impl Into<FrozenWeight>, bias: &Tensor) -> Result<Tensor> {
    let weight = weight.into();
    let output = affine_ready(&x.detach(), &weight, Some(bias))?;
    tie(output, &[x], FrozenAffineBackward { weight })
}

/// `geglu(projected) · Wᵀ + b` with a frozen `W` and `b` (a feed-forward's output layer without adapters),
/// keeping only `projected` for the backward pass: the GEGLU output, half as wide as `projected`, exists
/// while the product reads it (as the input of a separate op it would be kept until the backward pass).
/// The backward pass takes the product's input gradient `g·W` through GEGLU's.
pub fn geglu_affine(
    projected: &Tensor,
    weight: impl Into<FrozenWeight>,
    bias: &Tensor,
) -> Result<Tensor> {
    let weight = weight.into();
    let activated = super::geglu(&projected.detach())?;
    let output = affine_ready(&activated, &weight, Some(bias))?;
    drop(activated);
    tie(
        output,
        &[projected],
        GegluAffineBackward(FrozenAffineBackward { weight }),
    )
}

/// `x · Wᵀ (+ b)` for a detached `x`, as a result to tie (moved, not copied, on the CPU).
pub(super) fn affine_ready(
    x: &Tensor,
    weight: &FrozenWeight,
    bias: Option<&Tensor>,
) -> Result<Ready> {
    let x = x.contiguous()?;
    let product = match weight {
        FrozenWeight::Tensor(weight) if x.device().is_cpu() => {
            let op = FrozenMatmul {
                weight: weight.clone(),
            };
            Ready::from_cpu_op(&x, &op)?
        }
        FrozenWeight::Tensor(weight) => Ready::Tensor(frozen_linear(&x, weight)?),
        FrozenWeight::Tiled(_) => {
            let (out_features, _) = weight.dims2()?;
            crate::flops::add_layer(x.elem_count() * out_features);
            right_matmul(&x, &Right::of_weight(weight, Orientation::Transposed)?)?
        }
    };
    super::add_bias_into(product, bias)
}

/// Routes the output gradient of [`geglu_affine`] through the product and GEGLU to the projection.
struct GegluAffineBackward(FrozenAffineBackward);

impl TiedBackward for GegluAffineBackward {
    fn name(&self) -> &'static str {
        "geglu-affine"
    }

    fn bwd(&self, projected: &[&Tensor], _: &Tensor, grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let grad_activated = self.0.input_grad(grad)?;
        Ok(vec![Some(super::activations::geglu_gradient(
            projected[0],
            &grad_activated,
        )?)])
    }
}

/// Routes the output gradient of [`frozen_affine`] to its input.
struct FrozenAffineBackward {
    weight: FrozenWeight,
}

impl FrozenAffineBackward {
    /// The gradient of the layer's input given the output gradient: `g·W`.
    fn input_grad(&self, grad: &Tensor) -> Result<Tensor> {
        let weight = Right::of_weight(&self.weight, Orientation::Upright)?;
        Ok(right_matmul(grad, &weight)?.into_tensor())
    }
}

impl TiedBackward for FrozenAffineBackward {
    fn name(&self) -> &'static str {
        "frozen-affine"
    }

    fn bwd(&self, _: &[&Tensor], _: &Tensor, grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
        Ok(vec![Some(self.input_grad(grad)?)])
    }
}

/// A 2-D convolution (no groups, no dilation) with a frozen kernel `[out, in, kh, kw]` and, optionally, a
/// frozen bias `[1, out, 1, 1]` added before the result is tied to the input (so only one tensor is kept).
pub fn frozen_conv2d(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    padding: usize,
    stride: usize,
) -> Result<Tensor> {
    let output = conv_ready(&x.detach(), weight, bias, (padding, stride))?;
    tie(
        output,
        &[x],
        FrozenConvBackward {
            weight: weight.clone(),
            padding,
            stride,
        },
    )
}

/// `conv(silu(x))` with a frozen kernel and bias (a resnet's convolutions without adapters), keeping only
/// `x` for the backward pass: the activated input exists only while the convolution reads it (as the input
/// of a separate op it would be kept until the backward pass), and not at all where the convolution runs
/// directly on AMX tiles, which apply SiLU as they rearrange the input. The backward pass takes the convolution's input
/// gradient through SiLU's.
pub fn silu_conv2d(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    padding: usize,
    stride: usize,
) -> Result<Tensor> {
    let output = match silu_conv_ready(&x.detach(), weight, bias, (padding, stride))? {
        Some(output) => output,
        None => {
            let activated = super::silu(&x.detach())?;
            conv_ready(&activated, weight, Some(bias), (padding, stride))?
        }
    };
    tie(
        output,
        &[x],
        SiluConvBackward(FrozenConvBackward {
            weight: weight.clone(),
            padding,
            stride,
        }),
    )
}

/// `conv(silu(x)) + bias` for a detached `x` as a direct convolution, which applies SiLU as it reads the
/// input (no activated copy is made), where one runs; else `None`.
fn silu_conv_ready(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    (padding, stride): (usize, usize),
) -> Result<Option<Ready>> {
    let kernel = (&weight.detach(), KernelOrder::AsIs, Some(bias));
    let silu: InputActivation = &super::activations::silu_in_place;
    let steps = (padding, stride);
    let Some(output) = super::im2col::direct_conv2d(x, kernel, steps, Some(silu))? else {
        return Ok(None);
    };
    let (_, in_channels, kh, kw) = weight.dims4()?;
    crate::flops::add_layer(output.elem_count() * in_channels * kh * kw);
    Ok(Some(output))
}

/// The convolution of a detached `x` plus `bias`, as a result to tie.
fn conv_ready(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    (padding, stride): (usize, usize),
) -> Result<Ready> {
    let weight = weight.detach();
    let direct = (&weight, KernelOrder::AsIs, bias);
    let output = match super::im2col::direct_conv2d(x, direct, (padding, stride), None)? {
        // The bias is where the direct convolution's sums start.
        Some(output) => output,
        None => {
            let output = super::im2col::conv2d_ready(x, &weight, padding, stride)?;
            super::add_bias_into(output, bias)?
        }
    };
    let (_, in_channels, kh, kw) = weight.dims4()?;
    crate::flops::add_layer(output.elem_count() * in_channels * kh * kw);
    Ok(output)
}

/// The forward pass of [`frozen_linear`]: a matmul straight on the storages, with no copy.
struct FrozenMatmul {
    weight: Tensor,
}

impl FrozenMatmul {
    fn forward<S: BackendStorage>(
        x: &S,
        x_layout: &Layout,
        w: &S,
        w_layout: &Layout,
    ) -> Result<(S, Shape)> {
        let (out_features, in_features) = w_layout.shape().dims2()?;
        let dims = x_layout.dims();
        let Some((&last, leading)) = dims.split_last() else {
            candle_core::bail!("frozen linear: the input is a scalar");
        };
        if last != in_features {
            candle_core::bail!(
                "frozen linear: input width {last} does not match the weight's {in_features}"
            );
        }
        let Some((start, _)) = x_layout.contiguous_offsets() else {
            candle_core::bail!("frozen linear: the input is not contiguous");
        };
        let rows = x_layout.shape().elem_count() / in_features.max(1);
        crate::flops::add_layer(rows * in_features * out_features);
        let x_2d = Layout::contiguous_with_offset((rows, in_features), start);
        let w_t = w_layout.transpose(0, 1)?;
        let output = x.matmul(w, (1, rows, out_features, in_features), &x_2d, &w_t)?;
        let mut out_dims = leading.to_vec();
        out_dims.push(out_features);
        Ok((output, Shape::from(out_dims)))
    }
}

/// [`FrozenMatmul`]'s forward pass in bf16 products, for an f32 input and a contiguous f32 or bf16 weight
/// (else `None`).
fn bf16_forward(
    x: &CpuStorage,
    x_layout: &Layout,
    w: &CpuStorage,
    w_layout: &Layout,
) -> Result<Option<(CpuStorage, Shape)>> {
    let (Some(x), Some(w)) = (
        super::products::cpu_values(x),
        super::products::cpu_values(w),
    ) else {
        return Ok(None);
    };
    let (Some((x_start, x_end)), Some((w_start, w_end))) =
        (x_layout.contiguous_offsets(), w_layout.contiguous_offsets())
    else {
        return Ok(None);
    };
    let (out_features, in_features) = w_layout.shape().dims2()?;
    let dims = x_layout.dims();
    if dims.last() != Some(&in_features) || in_features == 0 {
        return Ok(None);
    }
    let rows = (x_end - x_start) / in_features;
    crate::flops::add_layer(rows * in_features * out_features);
    let mut output = Vec::with_capacity(rows * out_features);
    let Some(x) = x.starting_at(x_start) else {
        return Ok(None);
    };
    let input = Operand {
        data: x,
        row_stride: in_features,
        col_stride: 1,
    };
    // The product's right operand is `Wᵀ`: column `o` is row `o` of the weight.
    let Some(weight) = w.starting_at(w_start) else {
        return Ok(None);
    };
    let weight_t = Operand {
        data: weight,
        row_stride: 1,
        col_stride: in_features,
    };
    debug_assert!(w_end - w_start == in_features * out_features);
    let dims3 = (rows, in_features, out_features);
    let out = output.spare_capacity_mut();
    super::amx::product_into_uninit(dims3, (input, weight_t.into()), out, true);
    // SAFETY: the product wrote all `rows · out_features` values.
    unsafe { output.set_len(rows * out_features) };
    let mut out_dims = dims[..dims.len() - 1].to_vec();
    out_dims.push(out_features);
    Ok(Some((CpuStorage::F32(output), Shape::from(out_dims))))
}

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (weight, w_layout) = self.weight.storage_and_layout();
        match &*weight {
            Storage::Cpu(w) => {
                if super::products::bf16_products()
                    && let Some(product) = bf16_forward(storage, layout, w, w_layout)?
                {
                    return Ok(product);
                }
                if w.dtype() != storage.dtype() {
                    // A weight stored in bf16 outside bf16 products: converted for this product.
                    let weight = self.weight.to_dtype(storage.dtype())?;
                    return Self { weight }.cpu_fwd(storage, layout);
                }
                let few_rows = super::cpu_kernels(&Device::Cpu)
                    .then(|| super::few_rows::try_matmul(storage, layout, w, w_layout))
                    .flatten();
                match few_rows {
                    Some(product) => Ok(product),
                    None => Self::forward(storage, layout, w, w_layout),
                }
            }
            _ => candle_core::bail!("frozen linear: the weight is not on the CPU"),
        }
    }

    fn cuda_fwd(&self, storage: &CudaStorage, layout: &Layout) -> Result<(CudaStorage, Shape)> {
        let (weight, w_layout) = self.weight.storage_and_layout();
        match &*weight {
            Storage::Cuda(w) => Self::forward(storage, layout, w, w_layout),
            _ => candle_core::bail!("frozen linear: the weight is not on the CUDA device"),
        }
    }

    fn metal_fwd(&self, storage: &MetalStorage, layout: &Layout) -> Result<(MetalStorage, Shape)> {
        let (weight, w_layout) = self.weight.storage_and_layout();
        match &*weight {
            Storage::Metal(w) => Self::forward(storage, layout, w, w_layout),
            _ => candle_core::bail!("frozen linear: the weight is not on the Metal device"),
        }
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(super::products::matmul(grad_res, &self.weight)?))
    }
}

/// Attaches the input gradient of a frozen convolution to its (detached) output.
///
/// The first operand is the convolution's output, computed by candle's own kernel without a graph; the
/// forward pass hands it through unchanged (one copy of the output), and the backward pass routes the
/// output gradient to the second operand, the convolution's input.
struct FrozenConvBackward {
    weight: Tensor,
    padding: usize,
    stride: usize,
}

impl FrozenConvBackward {
    /// The gradient of the convolution's input `[b, in, h, w]` given the output gradient.
    fn input_grad(&self, input: &Tensor, grad: &Tensor) -> Result<Tensor> {
        let (_, _, in_h, in_w) = input.dims4()?;
        let (_, _, k_h, k_w) = self.weight.dims4()?;
        if let Some(grad) = super::im2col::conv2d_input_grad(
            grad,
            &self.weight,
            (in_h, in_w),
            self.padding,
            self.stride,
        )? {
            return Ok(grad);
        }
        if self.stride == 1 && self.padding < k_h && self.padding < k_w && k_h == k_w {
            // A stride-1 convolution's input gradient is a convolution of the output gradient with the
            // spatially flipped, channel-transposed kernel; candle's conv2d is much faster than its
            // conv_transpose2d.
            let flipped = super::im2col::flipped_transposed(&self.weight)?;
            return super::im2col::conv2d(grad, &flipped, k_h - 1 - self.padding, 1);
        }
        let weight = self.weight.to_dtype(grad.dtype())?;
        // Strided: a transposed convolution with one extra row and column of output, cropped to the
        // input, handles odd and even sizes (and mixed parity) alike.
        let full = grad.conv_transpose2d(&weight, self.padding, self.stride - 1, self.stride, 1)?;
        full.narrow(2, 0, in_h)?.narrow(3, 0, in_w)
    }
}

impl TiedBackward for FrozenConvBackward {
    fn name(&self) -> &'static str {
        "frozen-conv2d"
    }

    fn bwd(&self, input: &[&Tensor], _: &Tensor, grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
        Ok(vec![Some(self.input_grad(input[0], grad)?)])
    }
}

/// Routes the output gradient of [`silu_conv2d`] through the convolution and SiLU to its input.
struct SiluConvBackward(FrozenConvBackward);

impl TiedBackward for SiluConvBackward {
    fn name(&self) -> &'static str {
        "silu-conv2d"
    }

    fn bwd(&self, input: &[&Tensor], _: &Tensor, grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let x = input[0];
        let grad_activated = self.0.input_grad(x, grad)?;
        Ok(vec![Some(super::activations::silu_gradient(
            x,
            &grad_activated,
        )?)])
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor, Var};

    use super::{frozen_affine, frozen_conv2d, frozen_linear, geglu_affine, silu_conv2d};

    fn random(dims: &[usize], seed: u64) -> Tensor {
        let mut state = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let values: Vec<f64> = (0..dims.iter().product::<usize>())
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state % 2001) as f64 / 1000.0 - 1.0
            })
            .collect();
        Tensor::from_vec(values, dims, &Device::Cpu).unwrap()
    }

    /// Checks the input gradient of `op` against central differences at every element, in f64.
    fn check_input_gradient(input_dims: &[usize], op: impl Fn(&Tensor) -> Tensor) {
        let x = Var::from_tensor(&random(input_dims, 1)).unwrap();
        let probe = random(op(x.as_tensor()).dims(), 2);
        let loss = |t: &Tensor| {
            (op(t) * &probe)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        let grads = (op(x.as_tensor()) * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let analytic = grads
            .get(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let base = x
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        for (i, &g) in analytic.iter().enumerate() {
            let shifted = |delta: f64| {
                let mut v = base.clone();
                v[i] += delta;
                Tensor::from_vec(v, input_dims, &Device::Cpu).unwrap()
            };
            let numeric = (loss(&shifted(1e-6)) - loss(&shifted(-1e-6))) / 2e-6;
            assert!(
                (g - numeric).abs() < 1e-6 * (1.0 + numeric.abs()),
                "element {i}: {g} vs {numeric}"
            );
        }
    }

    #[test]
    fn frozen_linear_input_gradient_is_exact() {
        let weight = random(&[4, 5], 3);
        check_input_gradient(&[2, 3, 5], |x| frozen_linear(x, &weight).unwrap());
    }

    #[test]
    fn frozen_linear_forward_matches_matmul() {
        let weight = random(&[4, 5], 3);
        let x = random(&[2, 3, 5], 4);
        let expected = x.broadcast_matmul(&weight.t().unwrap()).unwrap();
        let diff = (frozen_linear(&x, &weight).unwrap() - expected)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        assert!(diff.to_scalar::<f64>().unwrap() < 1e-12);
    }

    #[test]
    fn frozen_affine_adds_the_bias_and_its_input_gradient_is_exact() {
        let weight = random(&[4, 5], 3);
        let bias = random(&[4], 7);
        let x = random(&[2, 3, 5], 4);
        let expected = frozen_linear(&x, &weight)
            .unwrap()
            .broadcast_add(&bias)
            .unwrap();
        let diff = (frozen_affine(&x, &weight, &bias).unwrap() - expected)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        assert!(diff.to_scalar::<f64>().unwrap() < 1e-12);
        check_input_gradient(&[2, 3, 5], |x| frozen_affine(x, &weight, &bias).unwrap());
        let biased_conv = random(&[3, 2, 3, 3], 5);
        let conv_bias = random(&[1, 3, 1, 1], 8);
        check_input_gradient(&[1, 2, 5, 4], |x| {
            frozen_conv2d(x, &biased_conv, Some(&conv_bias), 1, 1).unwrap()
        });
    }

    /// Checks in f32 on the CPU (the activations' own kernels) that `fused` gives the same output and input
    /// gradient as `composed` for an input of `input_dims`.
    fn check_same_as_composed(
        input_dims: &[usize],
        fused: impl Fn(&Tensor) -> Tensor,
        composed: impl Fn(&Tensor) -> Tensor,
    ) {
        let x = Var::from_tensor(&random(input_dims, 4).to_dtype(DType::F32).unwrap()).unwrap();
        let run = |op: &dyn Fn(&Tensor) -> Tensor| {
            let output = op(x.as_tensor());
            let probe = random(output.dims(), 9).to_dtype(DType::F32).unwrap();
            let grads = (&output * &probe)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let grad = grads.get(&x).unwrap().flatten_all().unwrap();
            (output.flatten_all().unwrap(), grad)
        };
        let (ours, theirs) = (run(&fused), run(&composed));
        for (ours, theirs) in [(ours.0, theirs.0), (ours.1, theirs.1)] {
            let diff = (ours - theirs).unwrap().abs().unwrap().max_all().unwrap();
            assert!(diff.to_scalar::<f32>().unwrap() < 1e-6);
        }
    }

    #[test]
    fn geglu_affine_is_the_product_of_geglu_and_its_input_gradient_is_exact() {
        let weight = random(&[4, 3], 3);
        let bias = random(&[4], 7);
        check_input_gradient(&[2, 5, 6], |p| geglu_affine(p, &weight, &bias).unwrap());
        let [weight, bias] = [weight, bias].map(|t| t.to_dtype(DType::F32).unwrap());
        check_same_as_composed(
            &[2, 5, 6],
            |p| geglu_affine(p, &weight, &bias).unwrap(),
            |p| frozen_affine(&crate::kernels::geglu(p).unwrap(), &weight, &bias).unwrap(),
        );
    }

    #[test]
    fn silu_conv_is_the_convolution_of_silu_and_its_input_gradient_is_exact() {
        let kernel = random(&[3, 2, 3, 3], 5);
        let bias = random(&[1, 3, 1, 1], 8);
        check_input_gradient(&[1, 2, 5, 4], |x| {
            silu_conv2d(x, &kernel, &bias, 1, 1).unwrap()
        });
        let [kernel, bias] = [kernel, bias].map(|t| t.to_dtype(DType::F32).unwrap());
        check_same_as_composed(
            &[1, 2, 6, 5],
            |x| silu_conv2d(x, &kernel, &bias, 1, 1).unwrap(),
            |x| {
                let activated = crate::kernels::silu(x).unwrap();
                frozen_conv2d(&activated, &kernel, Some(&bias), 1, 1).unwrap()
            },
        );
    }

    #[test]
    fn frozen_conv_input_gradients_are_exact() {
        // stride 1 with 3x3 and 1x1 kernels, and stride 2 on odd, even and mixed-parity sizes.
        for (kernel, stride, padding, height, width) in [
            (3, 1, 1, 6, 5),
            (1, 1, 0, 4, 4),
            (3, 2, 1, 7, 6),
            (3, 2, 1, 8, 8),
            (3, 2, 0, 7, 7),
            (3, 1, 0, 5, 6),
        ] {
            let weight = random(&[3, 2, kernel, kernel], 5);
            check_input_gradient(&[2, 2, height, width], |x| {
                frozen_conv2d(x, &weight, None, padding, stride).unwrap()
            });
        }
    }

    /// Output and input gradient of a convolution op in f32 against the same in f64 from candle's own
    /// convolution: the largest difference relative to the largest reference value.
    fn relative_to_f64(
        op: impl Fn(&Tensor) -> Tensor,
        reference: impl Fn(&Tensor) -> Tensor,
        dims: &[usize],
    ) -> [f64; 2] {
        let x64 = Var::from_tensor(&random(dims, 3)).unwrap();
        let x = Var::from_tensor(&x64.to_dtype(DType::F32).unwrap()).unwrap();
        let out64 = reference(x64.as_tensor());
        let probe = random(out64.dims(), 4);
        let grads64 = (&out64 * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let out = op(x.as_tensor());
        let probe32 = probe.to_dtype(DType::F32).unwrap();
        let grads = (&out * &probe32)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let relative = |ours: &Tensor, theirs: &Tensor| {
            let theirs = theirs.to_dtype(DType::F64).unwrap();
            let ours = ours.to_dtype(DType::F64).unwrap();
            let worst = (ours - &theirs).unwrap().abs().unwrap().max_all().unwrap();
            let scale = theirs.abs().unwrap().max_all().unwrap();
            (worst / scale).unwrap().to_scalar::<f64>().unwrap()
        };
        [
            relative(&out, &out64),
            relative(grads.get(&x).unwrap(), grads64.get(&x64).unwrap()),
        ]
    }

    #[test]
    fn in_bf16_products_convolutions_on_whole_tiles_keep_to_the_convolution_and_its_gradient() {
        let Some(_scope) = crate::kernels::Bf16Products::enter() else {
            return;
        };
        // Whole tiles of channels (32) and pixels (16 per row): the direct convolution, stored in bf16 as
        // a bf16 run stores frozen weights.
        let dims = [2, 32, 3, 16];
        let kernel64 = (random(&[64, 32, 3, 3], 5) * 0.2).unwrap();
        let bias64 = random(&[1, 64, 1, 1], 6);
        let kernel = kernel64.to_dtype(DType::BF16).unwrap();
        let bias = bias64.to_dtype(DType::F32).unwrap();
        let conv64 = |x: &Tensor| {
            let wide = kernel.to_dtype(DType::F64).unwrap();
            x.conv2d(&wide, 1, 1, 1, 1)
                .unwrap()
                .broadcast_add(&bias64)
                .unwrap()
        };
        let plain = relative_to_f64(
            |x| frozen_conv2d(x, &kernel, Some(&bias), 1, 1).unwrap(),
            conv64,
            &dims,
        );
        let activated = relative_to_f64(
            |x| silu_conv2d(x, &kernel, &bias, 1, 1).unwrap(),
            |x| conv64(&x.silu().unwrap()),
            &dims,
        );
        // bf16 operands (8 bits of mantissa) summed in f32 over 288 products.
        for (name, [output, gradient]) in [("conv", plain), ("silu-conv", activated)] {
            assert!(output < 1e-2, "{name} output: {output}");
            assert!(gradient < 1e-2, "{name} input gradient: {gradient}");
            assert!(
                output > 0.0,
                "{name}: the products were not rounded to bf16"
            );
        }
    }

    #[test]
    fn frozen_ops_leave_the_weight_without_gradient() {
        let weight = Var::from_tensor(&random(&[3, 2, 3, 3], 5)).unwrap();
        let x = Var::from_tensor(&random(&[1, 2, 5, 5], 6)).unwrap();
        let y = frozen_conv2d(x.as_tensor(), weight.as_tensor(), None, 1, 1).unwrap();
        let grads = y.sum_all().unwrap().backward().unwrap();
        assert!(grads.get(&x).is_some());
        assert!(
            grads.get(&weight).is_none(),
            "the frozen weight must not get a gradient"
        );
        assert_eq!(y.dtype(), DType::F64);
    }
}
