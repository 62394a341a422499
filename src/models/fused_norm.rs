//! Normalisation (group norm, layer norm) with its own backward pass.
//!
//! Composed from candle ops, a normalisation keeps the centred input, the variance and its square root for
//! the backward pass and differentiates through broadcasting reductions, which costs 50-80 times its forward
//! on the CPU. Here the rows are normalised on detached tensors and a custom op ties the result to the
//! input; its backward applies the normalisation's gradient directly: with `x̂ = (x − mean)·r`,
//! `r = 1/√(var + eps)` and the incoming gradient `g` of `x̂`, per row
//! `dx = r·(g − mean(g) − x̂·mean(g ⊙ x̂))`. With the frozen affine scale and shift folded in
//! ([`normalize_affine`]), only the layer's output is kept for the backward pass.

use candle_core::{Result, Tensor};

use crate::lora::{TiedBackward, tie};

/// `(x − mean)/√(var + eps)` over each row of `x` (`[rows, n]`, f32 or f64), differentiable in `x`.
pub(super) fn normalize_rows(x: &Tensor, eps: f64) -> Result<Tensor> {
    let detached = x.detach().contiguous()?;
    let mean = detached.mean_keepdim(1)?;
    let centred = detached.broadcast_sub(&mean)?;
    let inverse_std = (centred.sqr()?.mean_keepdim(1)? + eps)?.sqrt()?.recip()?;
    let normalized = centred.broadcast_mul(&inverse_std)?;
    if !x.track_op() {
        return Ok(normalized);
    }
    tie(normalized, &[x], NormBackward { inverse_std })
}

/// `normalize_rows` over `rows` rows of `x`, reshaped back to `x`'s shape, times `weight` plus `bias`
/// (both broadcast to `x`, frozen), as one autograd node that keeps only its output: the backward pass
/// recomputes `x̂` from the input and the row statistics, and the incoming gradient of `x̂` is
/// `g ⊙ weight`. `x` is f32 or f64.
pub(super) fn normalize_affine(
    x: &Tensor,
    rows: usize,
    eps: f64,
    weight: &Tensor,
    bias: &Tensor,
) -> Result<Tensor> {
    let detached = x.detach().contiguous()?.reshape((rows, ()))?;
    let mean = detached.mean_keepdim(1)?;
    let centred = detached.broadcast_sub(&mean)?;
    let inverse_std = (centred.sqr()?.mean_keepdim(1)? + eps)?.sqrt()?.recip()?;
    let y = centred
        .broadcast_mul(&inverse_std)?
        .reshape(x.shape())?
        .broadcast_mul(weight)?
        .broadcast_add(bias)?;
    if !x.track_op() {
        return Ok(y);
    }
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
    use candle_core::{D, Device, Tensor, Var};

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
}
