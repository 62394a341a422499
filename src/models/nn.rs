//! Building blocks shared by the models, written only with ops whose candle backward is right.
//!
//! candle's fused `softmax_last_dim` and `layer_norm` kernels return no gradient at all, so unmasked
//! attention runs through [`super::fused_attention`] (its own backward) and masked attention (CLIP's causal
//! mask) uses `ops::softmax`; layer norm is the composed form, group norm candle-nn's composed one.
//! Finite-difference tests in `tests/` keep these honest.

use candle_core::{D, DType, Result, Tensor};
use candle_nn::VarBuilder;

/// Layer normalisation over the last dimension with a learned scale and shift.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub fn new(vb: VarBuilder, size: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: vb.get(size, "weight")?,
            bias: vb.get(size, "bias")?,
            eps,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let x = x.to_dtype(internal_dtype(dtype))?;
        let mean = x.mean_keepdim(D::Minus1)?;
        let centered = x.broadcast_sub(&mean)?;
        let variance = centered.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = centered.broadcast_div(&(variance + self.eps)?.sqrt()?)?;
        normed
            .to_dtype(dtype)?
            .broadcast_mul(&self.weight)?
            .broadcast_add(&self.bias)
    }
}

/// Reduced-precision activations are normalised in f32.
fn internal_dtype(dtype: DType) -> DType {
    match dtype {
        DType::F16 | DType::BF16 => DType::F32,
        other => other,
    }
}

/// Multi-head scaled dot-product attention.
///
/// `q`: `[batch, q_len, heads·head_dim]`, `k`/`v`: `[batch, kv_len, heads·head_dim]`; `mask` (optional) is
/// added to the `[q_len, kv_len]` scores of every head. Scores and softmax run in f32.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    let (batch, q_len, width) = q.dims3()?;
    let (_, kv_len, _) = k.dims3()?;
    let head_dim = width / heads;
    let split = |t: &Tensor, len: usize| -> Result<Tensor> {
        t.reshape((batch, len, heads, head_dim))?
            .transpose(1, 2)?
            .contiguous()
    };
    let dtype = q.dtype();
    let q = split(q, q_len)?.to_dtype(internal_dtype(dtype))?;
    let k = split(k, kv_len)?.to_dtype(internal_dtype(dtype))?;
    let v = split(v, kv_len)?;
    let scale = 1.0 / (head_dim as f64).sqrt();
    crate::flops::add_attention(2 * batch * heads * q_len * kv_len * head_dim);
    if mask.is_none() {
        let v = v.to_dtype(q.dtype())?;
        return super::fused_attention::fused_attention(&q, &k, &v, scale)?
            .to_dtype(dtype)?
            .transpose(1, 2)?
            .reshape((batch, q_len, width));
    }
    let mut scores = (q.matmul(&k.t()?)? * scale)?;
    if let Some(mask) = mask {
        scores = scores.broadcast_add(&mask.to_dtype(scores.dtype())?)?;
    }
    let probs = candle_nn::ops::softmax(&scores, D::Minus1)?.to_dtype(dtype)?;
    probs
        .matmul(&v)?
        .transpose(1, 2)?
        .reshape((batch, q_len, width))
}

/// `x · sigmoid(1.702·x)`, CLIP's activation.
pub fn quick_gelu(x: &Tensor) -> Result<Tensor> {
    x.broadcast_mul(&candle_nn::ops::sigmoid(&(x * 1.702)?)?)
}
