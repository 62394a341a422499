//! Rotary position embedding in the rotate-half layout (Llama, Qwen) with its own backward pass.
//!
//! candle's fused `rope` kernels (CPU, CUDA, Metal) return no gradient. The rotation is linear and
//! orthogonal: `y₁ = x₁·cos − x₂·sin`, `y₂ = x₁·sin + x₂·cos` for the two halves of every head, so its
//! backward pass is the same rotation by the opposite angle, `dx = rope(dy, cos, −sin)`. Both passes run
//! candle's fused kernel on any device; there is no separate CPU path to switch.

use candle_core::{Result, Tensor};
use candle_nn::rotary_emb::rope_thd;

use super::tied::{TiedBackward, tie};

/// Rotates `x` (`[batch, tokens, heads, head_dim]`) by the angles whose cosines and sines are `cos` and
/// `sin` (`[batch, tokens, head_dim / 2]`, `x`'s dtype): the first half of each head pairs with the second.
/// Differentiable in `x`.
pub fn rotary_embedding(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (cos, sin) = (cos.contiguous()?, sin.contiguous()?);
    let rotated = rope_thd(&x.detach().contiguous()?, &cos, &sin)?;
    tie(
        rotated,
        &[x],
        RotaryBackward {
            cos,
            negative_sin: sin.neg()?,
        },
    )
}

/// Rotates the output gradient back.
struct RotaryBackward {
    cos: Tensor,
    negative_sin: Tensor,
}

impl TiedBackward for RotaryBackward {
    fn name(&self) -> &'static str {
        "rotary-embedding"
    }

    fn bwd(&self, _: &[&Tensor], _: &Tensor, grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
        Ok(vec![Some(rope_thd(
            &grad.contiguous()?,
            &self.cos,
            &self.negative_sin,
        )?)])
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{D, DType, Device, Tensor, Var};

    use crate::test_support::max_abs_diff;

    use super::rotary_embedding;

    /// transformers' `q·cos + rotate_half(q)·sin` from candle ops, on `[batch, tokens, heads, d]`.
    fn composed(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
        let half = x.dim(D::Minus1).unwrap() / 2;
        let full = |t: &Tensor| {
            Tensor::cat(&[t, t], D::Minus1)
                .unwrap()
                .unsqueeze(2)
                .unwrap()
        };
        let rotated = Tensor::cat(
            &[
                &x.narrow(D::Minus1, half, half).unwrap().neg().unwrap(),
                &x.narrow(D::Minus1, 0, half).unwrap(),
            ],
            D::Minus1,
        )
        .unwrap();
        (x.broadcast_mul(&full(cos)).unwrap() + rotated.broadcast_mul(&full(sin)).unwrap()).unwrap()
    }

    #[test]
    fn matches_the_composed_rotation_and_its_gradient() {
        let device = Device::Cpu;
        let (batch, tokens, heads, head_dim) = (2, 5, 3, 8);
        let x = Tensor::arange(0f64, (batch * tokens * heads * head_dim) as f64, &device)
            .unwrap()
            .affine(0.13, 0.4)
            .unwrap()
            .sin()
            .unwrap()
            .reshape((batch, tokens, heads, head_dim))
            .unwrap();
        // Different positions per row, as a packed or left-padded batch has.
        let angles = Tensor::arange(0f64, (batch * tokens * head_dim / 2) as f64, &device)
            .unwrap()
            .affine(0.71, -1.0)
            .unwrap()
            .reshape((batch, tokens, head_dim / 2))
            .unwrap();
        let (cos, sin) = (angles.cos().unwrap(), angles.sin().unwrap());
        let probe = x.cos().unwrap();
        let var = Var::from_tensor(&x).unwrap();
        let ours = rotary_embedding(var.as_tensor(), &cos, &sin).unwrap();
        let reference = composed(var.as_tensor(), &cos, &sin);
        assert!(max_abs_diff(&ours, &reference) < 1e-14);
        let gradient = |y: &Tensor| {
            let grads = (y * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            grads.get(&var).unwrap().clone()
        };
        let diff = max_abs_diff(&gradient(&ours), &gradient(&reference));
        assert!(diff < 1e-14, "dx differs by {diff}");
        // bf16 through the same kernel.
        let half = |t: &Tensor| t.to_dtype(DType::BF16).unwrap();
        let ours_bf16 = rotary_embedding(&half(&x), &half(&cos), &half(&sin))
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap();
        assert!(max_abs_diff(&ours_bf16, &reference) < 3e-2);
    }
}
