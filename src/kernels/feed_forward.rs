//! A transformer block's feed-forward step with frozen layers, `x + geglu(norm(x)·W₁ᵀ + b₁)·W₂ᵀ + b₂`, as one
//! op on the CPU.
//!
//! Composed (layer norm, projection, GEGLU with its output layer, residual sum), the graph keeps the
//! normalised input (the projection's operand), the projection (eight times the model width) and the
//! step's output (the residual sum's operand) until the backward pass. The op keeps only the projection,
//! and inside a [`super::Bf16Products`] scope keeps it in bf16, as PyTorch's autocast keeps a linear
//! layer's output: the normalised input is recomputed from `x` and the row statistics in the backward
//! pass, which is `dx = g + norm'(x)·(geglu'(z, g·W₂)·W₁)` with `z` the projection and `g` the output
//! gradient.

use candle_core::{CpuStorage, D, Result, Tensor};
use half::bf16;
use rayon::prelude::*;

use super::frozen::affine_ready;
use super::fused_norm::{
    KernelAffine, KernelNormBackward, kernel_channels, kernel_normalized, with_values,
};
use super::tied::{Ready, TiedBackward, tie};

/// The frozen layers of one feed-forward step: the layer norm before it, the projection to the GEGLU's
/// value and gate, and the output layer.
pub struct FrozenFeedForward<'a> {
    /// The layer norm's scale, shift and epsilon.
    pub norm: (&'a Tensor, &'a Tensor, f64),
    /// The projection's weight `[2·inner, width]` and bias.
    pub proj: (&'a Tensor, &'a Tensor),
    /// The output layer's weight `[width, inner]` and bias.
    pub out: (&'a Tensor, &'a Tensor),
}

impl FrozenFeedForward<'_> {
    /// `x` plus the feed-forward of its layer norm, differentiable in `x` (`[.., width]`), when the CPU
    /// kernels apply (f32 on the CPU); `None` otherwise, for the caller to compose the layers.
    pub fn residual(&self, x: &Tensor) -> Result<Option<Tensor>> {
        let (norm_weight, norm_bias, eps) = self.norm;
        let rows = x.elem_count() / x.dim(D::Minus1)?.max(1);
        let Some(channels) = kernel_channels(x, rows, norm_weight, norm_bias) else {
            return Ok(None);
        };
        let scale_shift = KernelAffine::new(norm_weight, norm_bias, channels)?;
        let (normalized, norm) = kernel_normalized(x, rows, eps, scale_shift)?;
        let normalized = normalized.into_tensor();
        let projected = affine_ready(&normalized, self.proj.0, self.proj.1)?.into_tensor();
        drop(normalized);
        let activated = super::geglu(&projected)?;
        let kept = if super::bf16_products() {
            rounded_to_bf16(&projected)?
        } else {
            projected
        };
        let output = affine_ready(&activated, self.out.0, self.out.1)?;
        drop(activated);
        let output = super::add_term_into(output, &x.detach())?;
        let backward = FeedForwardBackward {
            norm,
            projected: kept,
            proj_weight: self.proj.0.clone(),
            out_weight: self.out.0.clone(),
        };
        tie(output, &[x], backward).map(Some)
    }
}

/// `values` (f32 on the CPU) rounded to bf16, in parallel.
fn rounded_to_bf16(values: &Tensor) -> Result<Tensor> {
    let rounded: Vec<bf16> = with_values(values, |values| {
        values.par_iter().map(|&v| bf16::from_f32(v)).collect()
    })?;
    let storage = CpuStorage::BF16(rounded);
    Ok(Ready::Cpu(storage, values.shape().clone()).into_tensor())
}

/// Routes the output gradient of [`FrozenFeedForward::residual`] to its input.
struct FeedForwardBackward {
    norm: KernelNormBackward,
    /// The projection `z`, f32 or (in bf16 products) bf16.
    projected: Tensor,
    proj_weight: Tensor,
    out_weight: Tensor,
}

impl TiedBackward for FeedForwardBackward {
    fn name(&self) -> &'static str {
        "frozen-feed-forward"
    }

    fn bwd(&self, x: &[&Tensor], _: &Tensor, grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let grad = grad.contiguous()?;
        let grad_activated = super::matmul(&grad, &self.out_weight)?;
        let grad_projected = super::activations::geglu_gradient(&self.projected, &grad_activated)?;
        drop(grad_activated);
        let grad_normalized = super::matmul(&grad_projected, &self.proj_weight)?;
        drop(grad_projected);
        let grad_x = self.norm.input_grad(x[0], &grad_normalized)?;
        Ok(vec![Some(super::add_into(grad_x, Some(&grad), None)?)])
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Tensor, Var};

    use super::FrozenFeedForward;
    use crate::kernels::{Bf16Products, frozen_affine, geglu_affine, normalize_affine};
    use crate::test_support::{probed_gradients, pseudo_random, relative_difference};

    /// The op's output and input gradient, and the composed layers', for `x` of `[2, 5, 24]`.
    fn fused_and_composed() -> [(Tensor, Tensor); 2] {
        let (width, inner) = (24, 16);
        let norm_weight = (pseudo_random(&[width], 1.0) + 1.0).unwrap();
        let norm_bias = pseudo_random(&[width], 2.0);
        let proj = (
            pseudo_random(&[2 * inner, width], 3.0),
            pseudo_random(&[2 * inner], 4.0),
        );
        let out = (
            pseudo_random(&[width, inner], 5.0),
            pseudo_random(&[width], 6.0),
        );
        let x = Var::from_tensor(&pseudo_random(&[2, 5, width], 7.0)).unwrap();
        let probe = pseudo_random(x.dims(), 8.0);
        let run = |y: Tensor| {
            let grads = probed_gradients(&y, &probe);
            (y, grads.get(&x).unwrap().clone())
        };
        let layers = FrozenFeedForward {
            norm: (&norm_weight, &norm_bias, 1e-5),
            proj: (&proj.0, &proj.1),
            out: (&out.0, &out.1),
        };
        let fused = layers.residual(x.as_tensor()).unwrap().unwrap();
        let normalized =
            normalize_affine(x.as_tensor(), 10, 1e-5, &norm_weight, &norm_bias).unwrap();
        let projected = frozen_affine(&normalized, &proj.0, &proj.1).unwrap();
        let composed = (geglu_affine(&projected, &out.0, &out.1).unwrap() + x.as_tensor()).unwrap();
        [run(fused), run(composed)]
    }

    #[test]
    fn the_op_is_the_composed_layers_and_their_gradient() {
        let [(ours, our_grad), (theirs, their_grad)] = fused_and_composed();
        assert!(relative_difference(&ours, &theirs) < 1e-6);
        assert!(relative_difference(&our_grad, &their_grad) < 1e-6);
    }

    #[test]
    fn in_bf16_products_only_the_kept_projection_is_rounded() {
        let Some(_scope) = Bf16Products::enter() else {
            return;
        };
        let [(ours, our_grad), (theirs, their_grad)] = fused_and_composed();
        assert!(relative_difference(&ours, &theirs) < 1e-6);
        // The projection kept in bf16 (8 significant bits) moves the gradient by about its rounding.
        let gradient_difference = relative_difference(&our_grad, &their_grad);
        assert!(gradient_difference < 1e-2, "{gradient_difference}");
        assert!(gradient_difference > 0.0);
    }

    #[test]
    fn other_dtypes_are_left_to_the_caller() {
        let x = pseudo_random(&[3, 4], 1.0).to_dtype(DType::F64).unwrap();
        let (weight, bias) = (
            x.narrow(0, 0, 1).unwrap().squeeze(0).unwrap(),
            x.get(1).unwrap(),
        );
        let layers = FrozenFeedForward {
            norm: (&weight, &bias, 1e-5),
            proj: (&weight, &bias),
            out: (&weight, &bias),
        };
        assert!(layers.residual(&x).unwrap().is_none());
    }
}
