//! Normalisation (group norm, layer norm) with its own backward pass.
//!
//! Composed from candle ops, a normalisation keeps the centred input, the variance and its square root for
//! the backward pass and differentiates through broadcasting reductions, which costs 50-80 times its forward
//! on the CPU. Here the rows are normalised on detached tensors and a custom op ties the result to the
//! input; its backward applies the normalisation's gradient directly: with `x̂ = (x − mean)·r`,
//! `r = 1/√(var + eps)` and the incoming gradient `g` of `x̂`, per row
//! `dx = r·(g − mean(g) − x̂·mean(g ⊙ x̂))`. The affine scale and shift (frozen weights) stay ordinary ops.

use candle_core::{
    CpuStorage, CudaStorage, CustomOp2, Layout, MetalStorage, Result, Shape, Tensor,
};

use crate::lora::pass_through;

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
    normalized.apply_op2(x, NormBackward { inverse_std })
}

/// Ties the precomputed normalised rows (first operand) to the input (second); see the module docs.
struct NormBackward {
    /// `1/√(var + eps)` of each row, `[rows, 1]`.
    inverse_std: Tensor,
}

impl CustomOp2 for NormBackward {
    fn name(&self) -> &'static str {
        "fused-normalization"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        pass_through(s1, l1, "fused normalization")
    }

    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        _: &CudaStorage,
        _: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        pass_through(s1, l1, "fused normalization")
    }

    fn metal_fwd(
        &self,
        s1: &MetalStorage,
        l1: &Layout,
        _: &MetalStorage,
        _: &Layout,
    ) -> Result<(MetalStorage, Shape)> {
        pass_through(s1, l1, "fused normalization")
    }

    fn bwd(
        &self,
        _: &Tensor,
        _: &Tensor,
        normalized: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let normalized = normalized.detach();
        let grad = grad.contiguous()?;
        let grad_mean = grad.mean_keepdim(1)?;
        let projection = (&grad * &normalized)?.mean_keepdim(1)?;
        let grad_x = grad
            .broadcast_sub(&grad_mean)?
            .sub(&normalized.broadcast_mul(&projection)?)?
            .broadcast_mul(&self.inverse_std)?;
        Ok((None, Some(grad_x)))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{D, Device, Tensor, Var};

    use crate::test_support::max_abs_diff;

    use super::normalize_rows;

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
}
