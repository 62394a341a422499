//! The pre-norm transformer encoder layer of CLIP's text and vision towers and BLIP's vision tower:
//! `x + attention(layer_norm1(x))`, then `x + fc2(act(fc1(layer_norm2(x))))`, in the transformers layout
//! (`layer_norm1`, `self_attn.*`, `layer_norm2`, `mlp.fc1`, `mlp.fc2`).
//!
//! CLIP stores separate `q_proj`/`k_proj`/`v_proj`/`out_proj`; BLIP one packed `qkv` (rows ordered q, k, v)
//! and a `projection`.

use candle_core::{Result, Tensor};

use crate::kernels::gelu;
use crate::lora::{AdaptableLinear, LayerBuilder};
use crate::models::clip::ClipActivation;
use crate::models::nn::{LayerNorm, attention, quick_gelu};

/// The sizes of one encoder layer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EncoderDims {
    pub hidden: usize,
    pub intermediate: usize,
    pub heads: usize,
    pub activation: ClipActivation,
    pub layer_norm_eps: f64,
}

/// How the attention projections are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionLayout {
    /// `q_proj`, `k_proj`, `v_proj`, `out_proj` (CLIP).
    Separate,
    /// `qkv` (packed q, k, v rows) and `projection` (BLIP).
    Packed,
}

#[derive(Debug, Clone)]
enum Projections {
    Separate {
        q: AdaptableLinear,
        k: AdaptableLinear,
        v: AdaptableLinear,
    },
    Packed(AdaptableLinear),
}

/// One pre-norm encoder layer.
#[derive(Debug, Clone)]
pub struct EncoderLayer {
    layer_norm1: LayerNorm,
    projections: Projections,
    out: AdaptableLinear,
    layer_norm2: LayerNorm,
    fc1: AdaptableLinear,
    fc2: AdaptableLinear,
    dims: EncoderDims,
}

impl EncoderLayer {
    /// `lb` is rooted at the layer (`….layers.N`).
    pub fn new(lb: LayerBuilder, dims: EncoderDims, layout: AttentionLayout) -> Result<Self> {
        let d = dims.hidden;
        let attn = lb.pp("self_attn");
        let mlp = lb.pp("mlp");
        let (projections, out) = match layout {
            AttentionLayout::Separate => (
                Projections::Separate {
                    q: attn.pp("q_proj").linear(d, d, true)?,
                    k: attn.pp("k_proj").linear(d, d, true)?,
                    v: attn.pp("v_proj").linear(d, d, true)?,
                },
                attn.pp("out_proj").linear(d, d, true)?,
            ),
            AttentionLayout::Packed => (
                Projections::Packed(attn.pp("qkv").linear(d, 3 * d, true)?),
                attn.pp("projection").linear(d, d, true)?,
            ),
        };
        Ok(Self {
            layer_norm1: LayerNorm::new(lb.vb().pp("layer_norm1"), d, dims.layer_norm_eps)?,
            projections,
            out,
            layer_norm2: LayerNorm::new(lb.vb().pp("layer_norm2"), d, dims.layer_norm_eps)?,
            fc1: mlp.pp("fc1").linear(d, dims.intermediate, true)?,
            fc2: mlp.pp("fc2").linear(dims.intermediate, d, true)?,
            dims,
        })
    }

    /// `x`: `[batch, tokens, hidden]`; `mask` is added to every head's scores.
    pub fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let h = self.layer_norm1.forward(x)?;
        let (q, k, v) = match &self.projections {
            Projections::Separate { q, k, v } => (q.forward(&h)?, k.forward(&h)?, v.forward(&h)?),
            Projections::Packed(qkv) => {
                let packed = qkv.forward(&h)?;
                let d = self.dims.hidden;
                (
                    packed.narrow(2, 0, d)?,
                    packed.narrow(2, d, d)?,
                    packed.narrow(2, 2 * d, d)?,
                )
            }
        };
        let attended = attention(&q, &k, &v, self.dims.heads, mask)?;
        let x = (self.out.forward(&attended)? + x)?;
        let h = self.fc1.forward(&self.layer_norm2.forward(&x)?)?;
        let h = match self.dims.activation {
            ClipActivation::QuickGelu => quick_gelu(&h)?,
            ClipActivation::Gelu => gelu(&h)?,
        };
        self.fc2.forward(&h)? + x
    }
}
