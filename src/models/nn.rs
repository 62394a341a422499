//! Building blocks shared by the models, written only with ops whose candle backward is right.
//!
//! candle's fused `softmax_last_dim`, `layer_norm` and `rms_norm` kernels return no gradient at all, so
//! unmasked attention runs through [`crate::kernels::fused_attention`] (its own backward) and masked
//! attention (CLIP's causal mask; language models' causal, padding and packing masks) uses `ops::softmax`;
//! layer and group norm run through [`crate::kernels::normalize_affine`] and RMS norm through
//! [`crate::kernels::rms_norm`] (each with its own backward). Finite-difference tests in `tests/` keep these
//! honest.

use candle_core::{D, DType, Result, Tensor};
use candle_nn::VarBuilder;

use crate::kernels::{fused_attention, normalize_affine, normalize_rows, rms_norm, silu};

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

    /// The scale, shift and epsilon, for ops that fold the norm in.
    pub fn parts(&self) -> (&Tensor, &Tensor, f64) {
        (&self.weight, &self.bias, self.eps)
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let size = x.dim(D::Minus1)?;
        let rows = x.elem_count() / size.max(1);
        if !is_reduced(x.dtype()) {
            return normalize_affine(x, rows, self.eps, &self.weight, &self.bias);
        }
        normalized(&x.reshape((rows, size))?, self.eps)?
            .reshape(x.shape())?
            .broadcast_mul(&self.weight)?
            .broadcast_add(&self.bias)
    }
}

/// RMS normalisation over the last dimension with a learned scale (Llama, Qwen): `x / √(mean(x²) + eps) ·
/// weight`, in f32 for f16/bf16 activations.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    pub fn new(vb: VarBuilder, size: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: vb.get(size, "weight")?,
            eps,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        rms_norm(x, &self.weight, self.eps)
    }
}

/// Group normalisation of `[batch, channels, ...]` with a learned per-channel scale and shift.
#[derive(Debug, Clone)]
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
}

impl GroupNorm {
    pub fn new(vb: VarBuilder, groups: usize, channels: usize, eps: f64) -> Result<Self> {
        if !channels.is_multiple_of(groups) {
            candle_core::bail!("group norm: {channels} channels do not split into {groups} groups");
        }
        Ok(Self {
            weight: vb.get(channels, "weight")?,
            bias: vb.get(channels, "bias")?,
            groups,
            eps,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (batch, channels) = (x.dim(0)?, x.dim(1)?);
        let mut per_channel = vec![1; x.rank()];
        per_channel[1] = channels;
        let weight = self.weight.reshape(per_channel.as_slice())?;
        let bias = self.bias.reshape(per_channel.as_slice())?;
        if !is_reduced(x.dtype()) {
            return normalize_affine(x, batch * self.groups, self.eps, &weight, &bias);
        }
        normalized(&x.reshape((batch * self.groups, ()))?, self.eps)?
            .reshape(x.shape())?
            .broadcast_mul(&weight)?
            .broadcast_add(&bias)
    }
}

/// The rows of `rows` normalised, computed in f32 for reduced-precision activations.
fn normalized(rows: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = rows.dtype();
    normalize_rows(&rows.to_dtype(internal_dtype(dtype))?, eps)?.to_dtype(dtype)
}

/// Reduced-precision activations are normalised in f32.
fn internal_dtype(dtype: DType) -> DType {
    if is_reduced(dtype) { DType::F32 } else { dtype }
}

/// f16 and bf16, which are normalised in f32 (through the composed affine form).
fn is_reduced(dtype: DType) -> bool {
    matches!(dtype, DType::F16 | DType::BF16)
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
    let dtype = q.dtype();
    let scale = 1.0 / (head_dim as f64).sqrt();
    crate::flops::add_attention(2 * batch * heads * q_len * kv_len * head_dim);
    let Some(mask) = mask else {
        let [q, k, v] = [q, k, v].map(|t| t.to_dtype(internal_dtype(dtype)));
        return fused_attention(&q?, &k?, &v?, heads, scale)?.to_dtype(dtype);
    };
    let split = |t: &Tensor, len: usize| -> Result<Tensor> {
        t.reshape((batch, len, heads, head_dim))?
            .transpose(1, 2)?
            .contiguous()
    };
    let q = split(q, q_len)?.to_dtype(internal_dtype(dtype))?;
    let k = split(k, kv_len)?.to_dtype(internal_dtype(dtype))?;
    let v = split(v, kv_len)?;
    let scores = (q.matmul(&k.t()?)? * scale)?.broadcast_add(&mask.to_dtype(q.dtype())?)?;
    let probs = candle_nn::ops::softmax(&scores, D::Minus1)?.to_dtype(dtype)?;
    probs
        .matmul(&v)?
        .transpose(1, 2)?
        .reshape((batch, q_len, width))
}

/// `x · sigmoid(1.702·x)`, CLIP's activation, computed as `silu(1.702·x) / 1.702`: one parallel pass with
/// an exact backward instead of candle's single-threaded sigmoid and a product.
pub fn quick_gelu(x: &Tensor) -> Result<Tensor> {
    const SLOPE: f64 = 1.702;
    silu(&x.affine(SLOPE, 0.0)?)?.affine(1.0 / SLOPE, 0.0)
}
