//! Normalisation (group norm, layer norm) with its own backward pass.
//!
//! Composed from candle ops, a normalisation keeps the centred input, the variance and its square root for
//! the backward pass and differentiates through broadcasting reductions, which costs 50-80 times its forward
//! on the CPU. Here the rows are normalised on detached tensors and a custom op ties the result to the
//! input; its backward applies the normalisation's gradient directly: with `x̂ = (x − mean)·r`,
//! `r = 1/√(var + eps)` and the incoming gradient `g` of `x̂`, per row
//! `dx = r·(g − mean(g) − x̂·mean(g ⊙ x̂))`. With the frozen affine scale and shift folded in
//! ([`normalize_affine`]), only the layer's output is kept for the backward pass.

use std::sync::{Arc, OnceLock};

use candle_core::{CpuStorage, DType, Result, Storage, Tensor};

use super::norm_kernel::{self, Affine, Channels};
use super::tied::{Ready, TiedBackward, tie};

/// `(x − mean)/√(var + eps)` over each row of `x` (`[rows, n]`, f32 or f64), differentiable in `x`.
pub fn normalize_rows(x: &Tensor, eps: f64) -> Result<Tensor> {
    let detached = x.detach().contiguous()?;
    let mean = detached.mean_keepdim(1)?;
    let centred = detached.broadcast_sub(&mean)?;
    let inverse_std = (centred.sqr()?.mean_keepdim(1)? + eps)?.sqrt()?.recip()?;
    let normalized = centred.broadcast_mul(&inverse_std)?;
    tie(normalized, &[x], NormBackward { inverse_std })
}

/// `normalize_rows` over `rows` rows of `x`, reshaped back to `x`'s shape, times `weight` plus `bias`
/// (both broadcast to `x`, frozen), as one autograd node that keeps only its output: the backward pass
/// recomputes `x̂` from the input and the row statistics, and the incoming gradient of `x̂` is
/// `g ⊙ weight`. `x` is f32 or f64.
pub fn normalize_affine(
    x: &Tensor,
    rows: usize,
    eps: f64,
    weight: &Tensor,
    bias: &Tensor,
) -> Result<Tensor> {
    if let Some(channels) = kernel_channels(x, rows, weight, bias) {
        return kernel_normalize_affine(x, rows, eps, (weight, bias), channels);
    }
    let detached = x.detach().contiguous()?.reshape((rows, ()))?;
    let mean = detached.mean_keepdim(1)?;
    let centred = detached.broadcast_sub(&mean)?;
    let inverse_std = (centred.sqr()?.mean_keepdim(1)? + eps)?.sqrt()?.recip()?;
    let y = centred
        .broadcast_mul(&inverse_std)?
        .reshape(x.shape())?
        .broadcast_mul(weight)?
        .broadcast_add(bias)?;
    tie(
        y,
        &[x],
        AffineNormBackward {
            mean,
            inverse_std,
            weight: weight.clone(),
        },
    )
}

/// The [`norm_kernel`] layout of `weight` over `x`, when the kernel applies (f32 on the CPU).
fn kernel_channels(x: &Tensor, rows: usize, weight: &Tensor, bias: &Tensor) -> Option<Channels> {
    let f32_on_cpu = |t: &Tensor| super::cpu_kernels(t.device()) && t.dtype() == DType::F32;
    if !(f32_on_cpu(x) && f32_on_cpu(weight) && f32_on_cpu(bias)) || weight.dims() != bias.dims() {
        return None;
    }
    Channels::of(x.dims(), weight.dims(), x.elem_count() / rows.max(1))
}

/// Calls `f` with the values of `t` (f32 on the CPU), without a copy when `t` is contiguous.
pub(super) fn with_values<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    match (&*storage, layout.contiguous_offsets()) {
        (Storage::Cpu(CpuStorage::F32(values)), Some((start, end))) => Ok(f(&values[start..end])),
        _ => candle_core::bail!("normalisation: expects f32 values on the CPU"),
    }
}

/// [`normalize_affine`] by [`norm_kernel`].
fn kernel_normalize_affine(
    x: &Tensor,
    rows: usize,
    eps: f64,
    (weight, bias): (&Tensor, &Tensor),
    channels: Channels,
) -> Result<Tensor> {
    let scale_shift = KernelAffine::new(weight, bias, channels)?;
    let (output, backward) = kernel_normalized(x, rows, eps, scale_shift)?;
    tie(output, &[x], backward)
}

/// `x` normalised by [`norm_kernel`] (f32 on the CPU, laid out as `scale_shift` says), not tied, and the
/// backward pass that takes a gradient back through it.
fn kernel_normalized(
    x: &Tensor,
    rows: usize,
    eps: f64,
    scale_shift: KernelAffine,
) -> Result<(Ready, KernelNormBackward)> {
    let (output, means, inverse_stds) = with_values(&x.detach(), |values| {
        norm_kernel::forward(values, rows, eps, &scale_shift.affine())
    })?;
    let output = Ready::Cpu(CpuStorage::F32(output), x.shape().clone());
    let backward = KernelNormBackward {
        scale_shift,
        eps,
        means,
        inverse_stds,
    };
    Ok((output, backward))
}

/// A layer norm's output `norm(x)` made for the layers that read it, which tie their outputs to `x` itself
/// and take their input gradients back through the norm ([`NormPath`]): the normalised values live only
/// while those layers' forward passes read them, and the backward pass recomputes them from `x` (one pass
/// over `x`, where keeping them would hold as much memory as `x` until the backward pass). f32 on the CPU.
pub struct NormalizedInput {
    input: Tensor,
    values: Tensor,
    path: NormPath,
    tracked: OnceLock<Tensor>,
}

impl NormalizedInput {
    /// `norm(x)` over the last dimension with a frozen scale, shift and epsilon, when the CPU kernels
    /// apply; `None` otherwise.
    pub fn new(x: &Tensor, (weight, bias, eps): (&Tensor, &Tensor, f64)) -> Result<Option<Self>> {
        let rows = x.elem_count() / x.dim(candle_core::D::Minus1)?.max(1);
        let Some(channels) = kernel_channels(x, rows, weight, bias) else {
            return Ok(None);
        };
        let scale_shift = KernelAffine::new(weight, bias, channels)?;
        let (values, backward) = kernel_normalized(x, rows, eps, scale_shift)?;
        Ok(Some(Self {
            input: x.clone(),
            values: values.into_tensor(),
            path: NormPath(Arc::new(backward)),
            tracked: OnceLock::new(),
        }))
    }

    /// The norm's input `x`, which the reading layers tie their outputs to.
    pub fn input(&self) -> &Tensor {
        &self.input
    }

    /// The normalised values, outside the graph.
    pub fn values(&self) -> &Tensor {
        &self.values
    }

    /// How the reading layers recompute the values and take gradients back through the norm.
    pub fn path(&self) -> &NormPath {
        &self.path
    }

    /// The normalised values as the output of an ordinary op (kept until the backward pass), for layers
    /// that read a tensor; made once.
    pub fn tracked(&self) -> Result<Tensor> {
        if let Some(tracked) = self.tracked.get() {
            return Ok(tracked.clone());
        }
        let tracked = tie(
            Ready::Tensor(self.values.clone()),
            &[&self.input],
            self.path.clone(),
        )?;
        Ok(self.tracked.get_or_init(|| tracked).clone())
    }
}

/// A layer norm's way back, for a layer fed by a [`NormalizedInput`]: its output recomputed from the input,
/// and the input gradient for a gradient of the output.
#[derive(Clone)]
pub struct NormPath(Arc<KernelNormBackward>);

impl NormPath {
    /// The norm's output for the input `x`, as the forward pass computed it.
    pub fn normalized(&self, x: &Tensor) -> Result<Tensor> {
        self.0.normalized(x)
    }

    /// The gradient of the norm's input `x` given the gradient of its output.
    pub fn input_grad(&self, x: &Tensor, grad: &Tensor) -> Result<Tensor> {
        self.0.input_grad(x, grad)
    }
}

impl TiedBackward for NormPath {
    fn name(&self) -> &'static str {
        self.0.name()
    }

    fn bwd(&self, x: &[&Tensor], output: &Tensor, grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
        self.0.bwd(x, output, grad)
    }
}

/// The frozen scale and shift of [`kernel_normalize_affine`], owned.
struct KernelAffine {
    weight: Vec<f32>,
    bias: Vec<f32>,
    channels: Channels,
}

impl KernelAffine {
    /// The values of `weight` and `bias` (f32), laid out over the input as `channels` says.
    fn new(weight: &Tensor, bias: &Tensor, channels: Channels) -> Result<Self> {
        Ok(Self {
            weight: weight.flatten_all()?.to_vec1()?,
            bias: bias.flatten_all()?.to_vec1()?,
            channels,
        })
    }

    fn affine(&self) -> Affine<'_> {
        Affine {
            weight: &self.weight,
            bias: &self.bias,
            channels: self.channels,
        }
    }
}

/// Routes the output gradient of [`kernel_normalize_affine`] to its input.
struct KernelNormBackward {
    scale_shift: KernelAffine,
    eps: f64,
    means: Vec<f32>,
    inverse_stds: Vec<f32>,
}

impl KernelNormBackward {
    /// The norm's output for the input `x`, as the forward pass computed it.
    fn normalized(&self, x: &Tensor) -> Result<Tensor> {
        let output = with_values(&x.detach(), |values| {
            let rows = self.means.len();
            norm_kernel::forward(values, rows, self.eps, &self.scale_shift.affine()).0
        })?;
        Tensor::from_vec(output, x.shape(), x.device())
    }

    /// The gradient of the input `x` given the output gradient.
    fn input_grad(&self, x: &Tensor, grad: &Tensor) -> Result<Tensor> {
        kernel_input_gradient(x, grad, |x_values, grad_values| {
            norm_kernel::backward(
                x_values,
                grad_values,
                (&self.means, &self.inverse_stds),
                &self.scale_shift.affine(),
            )
        })
    }
}

impl TiedBackward for KernelNormBackward {
    fn name(&self) -> &'static str {
        "affine-normalization-kernel"
    }

    fn bwd(&self, x: &[&Tensor], _: &Tensor, grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
        Ok(vec![Some(self.input_grad(x[0], grad)?)])
    }
}

/// The input gradient a CPU kernel computes from the values of `x` and of the output gradient `grad` (f32
/// on the CPU), shaped like `x`.
pub(super) fn kernel_input_gradient(
    x: &Tensor,
    grad: &Tensor,
    kernel: impl FnOnce(&[f32], &[f32]) -> Vec<f32>,
) -> Result<Tensor> {
    let grad_x = with_values(&x.detach(), |x_values| {
        with_values(grad, |grad_values| kernel(x_values, grad_values))
    })??;
    Tensor::from_vec(grad_x, x.shape(), x.device())
}

/// `dx` from the gradient `grad` of `x̂` (`[rows, n]`) and `x̂` itself.
fn rows_gradient(grad: &Tensor, normalized: &Tensor, inverse_std: &Tensor) -> Result<Tensor> {
    let grad_mean = grad.mean_keepdim(1)?;
    let projection = (grad * normalized)?.mean_keepdim(1)?;
    grad.broadcast_sub(&grad_mean)?
        .sub(&normalized.broadcast_mul(&projection)?)?
        .broadcast_mul(inverse_std)
}

/// Ties the precomputed affine result (first operand) to the input (second); see [`normalize_affine`].
struct AffineNormBackward {
    /// Row means and `1/√(var + eps)`, `[rows, 1]`.
    mean: Tensor,
    inverse_std: Tensor,
    weight: Tensor,
}

impl TiedBackward for AffineNormBackward {
    fn name(&self) -> &'static str {
        "fused-affine-normalization"
    }

    fn bwd(&self, x: &[&Tensor], _: &Tensor, grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let x = x[0];
        let rows = self.mean.dim(0)?;
        let normalized = x
            .detach()
            .contiguous()?
            .reshape((rows, ()))?
            .broadcast_sub(&self.mean)?
            .broadcast_mul(&self.inverse_std)?;
        let grad = grad.broadcast_mul(&self.weight)?.reshape((rows, ()))?;
        let grad_x = rows_gradient(&grad, &normalized, &self.inverse_std)?.reshape(x.shape())?;
        Ok(vec![Some(grad_x)])
    }
}

/// Ties the precomputed normalised rows (first operand) to the input (second); see the module docs.
struct NormBackward {
    /// `1/√(var + eps)` of each row, `[rows, 1]`.
    inverse_std: Tensor,
}

impl TiedBackward for NormBackward {
    fn name(&self) -> &'static str {
        "fused-normalization"
    }

    fn bwd(
        &self,
        _: &[&Tensor],
        normalized: &Tensor,
        grad: &Tensor,
    ) -> Result<Vec<Option<Tensor>>> {
        let grad_x = rows_gradient(&grad.contiguous()?, &normalized.detach(), &self.inverse_std)?;
        Ok(vec![Some(grad_x)])
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{D, DType, Device, Tensor, Var};

    use crate::test_support::max_abs_diff;

    use super::{normalize_affine, normalize_rows};

    fn composed(x: &Tensor, eps: f64) -> Tensor {
        let centred = x
            .broadcast_sub(&x.mean_keepdim(D::Minus1).unwrap())
            .unwrap();
        let variance = centred.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
        centred
            .broadcast_div(&(variance + eps).unwrap().sqrt().unwrap())
            .unwrap()
    }

    #[test]
    fn matches_composed_normalization_and_its_gradient() {
        let device = Device::Cpu;
        let values = Tensor::arange(0f64, 5.0 * 37.0, &device)
            .unwrap()
            .affine(0.61, 0.2)
            .unwrap()
            .sin()
            .unwrap()
            .reshape((5, 37))
            .unwrap();
        let x = Var::from_tensor(&values).unwrap();
        let weights = values.cos().unwrap();
        let eps = 1e-5;
        let ours = normalize_rows(x.as_tensor(), eps).unwrap();
        let reference = composed(x.as_tensor(), eps);
        assert!(max_abs_diff(&ours, &reference) < 1e-13);
        let loss = |out: &Tensor| (out * &weights).unwrap().sum_all().unwrap();
        let ours_grad = loss(&ours).backward().unwrap();
        let reference_grad = loss(&reference).backward().unwrap();
        let diff = max_abs_diff(ours_grad.get(&x).unwrap(), reference_grad.get(&x).unwrap());
        assert!(diff < 1e-12, "dx differs by {diff}");
    }

    #[test]
    fn the_affine_form_matches_the_composed_one_and_its_gradient() {
        // A group norm: batch 2, 6 channels in 3 groups, 3x4 pixels.
        let device = Device::Cpu;
        let values = Tensor::arange(0f64, 144.0, &device)
            .unwrap()
            .affine(0.37, 0.5)
            .unwrap()
            .sin()
            .unwrap()
            .reshape((2, 6, 3, 4))
            .unwrap();
        let x = Var::from_tensor(&values).unwrap();
        let per_channel = |seed: f64| {
            Tensor::arange(0f64, 6.0, &device)
                .unwrap()
                .affine(0.9, seed)
                .unwrap()
                .cos()
                .unwrap()
                .reshape((1, 6, 1, 1))
                .unwrap()
        };
        let (weight, bias) = (per_channel(0.3), per_channel(1.1));
        let eps = 1e-5;
        let ours = normalize_affine(x.as_tensor(), 6, eps, &weight, &bias).unwrap();
        let composed = normalize_rows(&x.as_tensor().reshape((6, ())).unwrap(), eps)
            .unwrap()
            .reshape((2, 6, 3, 4))
            .unwrap()
            .broadcast_mul(&weight)
            .unwrap()
            .broadcast_add(&bias)
            .unwrap();
        assert!(max_abs_diff(&ours, &composed) < 1e-13);
        let weights = values.cos().unwrap();
        let loss = |out: &Tensor| (out * &weights).unwrap().sum_all().unwrap();
        let ours_grad = loss(&ours).backward().unwrap();
        let composed_grad = loss(&composed).backward().unwrap();
        let diff = max_abs_diff(ours_grad.get(&x).unwrap(), composed_grad.get(&x).unwrap());
        assert!(diff < 1e-12, "dx differs by {diff}");
    }

    /// The f32 kernel against the f64 composed path: output and input gradient.
    fn kernel_matches_f64(x_dims: &[usize], rows: usize, weight_dims: &[usize]) {
        let device = Device::Cpu;
        let count: usize = x_dims.iter().product();
        let values = Tensor::arange(0f64, count as f64, &device)
            .unwrap()
            .affine(0.41, 0.3)
            .unwrap()
            .sin()
            .unwrap()
            .affine(3.0, 1.5)
            .unwrap()
            .reshape(x_dims)
            .unwrap();
        let channels: usize = weight_dims.iter().product();
        let per_channel = |seed: f64| {
            Tensor::arange(0f64, channels as f64, &device)
                .unwrap()
                .affine(0.7, seed)
                .unwrap()
                .cos()
                .unwrap()
                .reshape(weight_dims)
                .unwrap()
        };
        let (weight, bias) = (per_channel(0.2), per_channel(0.9));
        let probe = values.cos().unwrap();
        let run = |dtype: DType| {
            let x = Var::from_tensor(&values.to_dtype(dtype).unwrap()).unwrap();
            let (w, b) = (
                weight.to_dtype(dtype).unwrap(),
                bias.to_dtype(dtype).unwrap(),
            );
            let y = normalize_affine(x.as_tensor(), rows, 1e-5, &w, &b).unwrap();
            let grads = (&y * probe.to_dtype(dtype).unwrap())
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let grad = grads.get(&x).unwrap().to_dtype(DType::F64).unwrap();
            (y.to_dtype(DType::F64).unwrap(), grad)
        };
        let (y64, grad64) = run(DType::F64);
        let (y32, grad32) = run(DType::F32);
        let (y_diff, grad_diff) = (max_abs_diff(&y32, &y64), max_abs_diff(&grad32, &grad64));
        assert!(y_diff < 1e-5, "{x_dims:?}: output differs by {y_diff}");
        assert!(
            grad_diff < 1e-4,
            "{x_dims:?}: gradient differs by {grad_diff}"
        );
    }

    #[test]
    fn the_f32_kernel_matches_f64_for_group_and_layer_norm() {
        // Group norm: batch 2, 6 channels in 3 groups, 3x4 pixels (several runs per row, rows of both
        // images); layer norm over 37 features (more than the kernel's lanes, not a multiple of them).
        kernel_matches_f64(&[2, 6, 3, 4], 6, &[1, 6, 1, 1]);
        kernel_matches_f64(&[2, 5, 37], 10, &[37]);
        assert_eq!(
            super::Channels::of(&[2, 6, 3, 4], &[1, 6, 1, 1], 24),
            Some(super::Channels::PerRun { inner: 12 })
        );
        assert_eq!(
            super::Channels::of(&[2, 5, 37], &[37], 37),
            Some(super::Channels::PerElement)
        );
        // Per-token scales are runs too; a weight varying along two axes has no kernel layout.
        assert_eq!(
            super::Channels::of(&[2, 5, 37], &[5, 1], 37),
            Some(super::Channels::PerRun { inner: 37 })
        );
        assert_eq!(super::Channels::of(&[2, 5, 37], &[5, 37], 37), None);
    }
}
