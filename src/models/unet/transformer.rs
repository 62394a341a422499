//! The UNet's spatial transformer (`Transformer2DModel`): self-attention, cross-attention to the text
//! embedding, and a GEGLU feed-forward, with diffusers' module names (`attn1.to_q`, `ff.net.0.proj`, ...).

use candle_core::{Result, Tensor};

use crate::kernels::{FusedFeedForward, NormalizedInput};
use crate::lora::{AdaptableConv2d, AdaptableLinear, LayerBuilder};
use crate::models::nn::{GroupNorm, LayerNorm, attention};

/// Multi-head attention with separate q/k/v projections and an output projection (`to_out.0`).
#[derive(Debug, Clone)]
pub struct Attention {
    to_q: AdaptableLinear,
    to_k: AdaptableLinear,
    to_v: AdaptableLinear,
    to_out: AdaptableLinear,
    heads: usize,
}

impl Attention {
    /// `context_dim` is `None` for self-attention.
    pub fn new(
        lb: LayerBuilder,
        query_dim: usize,
        context_dim: Option<usize>,
        heads: usize,
    ) -> Result<Self> {
        let context_dim = context_dim.unwrap_or(query_dim);
        Ok(Self {
            to_q: lb.pp("to_q").linear(query_dim, query_dim, false)?,
            to_k: lb.pp("to_k").linear(context_dim, query_dim, false)?,
            to_v: lb.pp("to_v").linear(context_dim, query_dim, false)?,
            to_out: lb.pp("to_out").pp("0").linear(query_dim, query_dim, true)?,
            heads,
        })
    }

    /// `x` plus the attention of `norm(x)` to `context`, or to itself.
    pub fn forward_residual(
        &self,
        norm: &LayerNorm,
        x: &Tensor,
        context: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (q, k, v) = match NormalizedInput::new(x, norm.parts())? {
            // The projections take the norm's output without the graph keeping it.
            Some(normalized) => {
                let q = self.to_q.forward_normalized(&normalized)?;
                let (k, v) = match context {
                    Some(context) => (self.to_k.forward(context)?, self.to_v.forward(context)?),
                    None => (
                        self.to_k.forward_normalized(&normalized)?,
                        self.to_v.forward_normalized(&normalized)?,
                    ),
                };
                (q, k, v)
            }
            None => {
                let normalized = norm.forward(x)?;
                let context = context.unwrap_or(&normalized);
                let q = self.to_q.forward(&normalized)?;
                (q, self.to_k.forward(context)?, self.to_v.forward(context)?)
            }
        };
        self.to_out
            .forward_residual(&attention(&q, &k, &v, self.heads, None)?, x)
    }
}

/// `proj(x)` split into value and gate, `value · gelu(gate)`, then back to the model width.
#[derive(Debug, Clone)]
struct FeedForward {
    proj: AdaptableLinear,
    out: AdaptableLinear,
}

impl FeedForward {
    fn new(lb: LayerBuilder, dim: usize) -> Result<Self> {
        let inner = dim * 4;
        Ok(Self {
            proj: lb
                .pp("net")
                .pp("0")
                .pp("proj")
                .linear(dim, inner * 2, true)?,
            out: lb.pp("net").pp("2").linear(inner, dim, true)?,
        })
    }

    /// `x + ff(norm(x))`: one op when each layer is frozen or has one plain LoRA (only the projection is
    /// kept for the backward pass, [`FusedFeedForward`]), else the layers composed.
    fn residual(&self, norm: &LayerNorm, x: &Tensor) -> Result<Tensor> {
        if let (Some(proj), Some(out)) = (self.proj.affine_parts(), self.out.affine_parts()) {
            let layers = FusedFeedForward {
                norm: norm.parts(),
                proj: proj.layer(),
                out: out.layer(),
            };
            if let Some(y) = layers.residual(x)? {
                return Ok(y);
            }
        }
        self.out
            .forward_geglu(&self.proj.forward(&norm.forward(x)?)?)?
            + x
    }
}

/// One `BasicTransformerBlock`: pre-norm self-attention, cross-attention and feed-forward, each residual.
#[derive(Debug, Clone)]
struct BasicTransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff: FeedForward,
}

impl BasicTransformerBlock {
    fn new(lb: LayerBuilder, dim: usize, context_dim: usize, heads: usize) -> Result<Self> {
        Ok(Self {
            norm1: LayerNorm::new(lb.vb().pp("norm1"), dim, 1e-5)?,
            attn1: Attention::new(lb.pp("attn1"), dim, None, heads)?,
            norm2: LayerNorm::new(lb.vb().pp("norm2"), dim, 1e-5)?,
            attn2: Attention::new(lb.pp("attn2"), dim, Some(context_dim), heads)?,
            norm3: LayerNorm::new(lb.vb().pp("norm3"), dim, 1e-5)?,
            ff: FeedForward::new(lb.pp("ff"), dim)?,
        })
    }

    fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let x = self.attn1.forward_residual(&self.norm1, x, None)?;
        let x = self
            .attn2
            .forward_residual(&self.norm2, &x, Some(context))?;
        self.ff.residual(&self.norm3, &x)
    }
}

/// `proj_in`/`proj_out`: 1x1 convolutions in SD1, Linear layers in SD2.
#[derive(Debug, Clone)]
enum Projection {
    Conv(AdaptableConv2d),
    Linear(AdaptableLinear),
}

/// Sizes of one spatial transformer.
#[derive(Debug, Clone, Copy)]
pub struct TransformerShape {
    pub channels: usize,
    pub heads: usize,
    pub depth: usize,
    pub context_dim: usize,
    pub groups: usize,
    pub linear_projection: bool,
}

/// `Transformer2DModel`: group norm, `proj_in`, transformer blocks over the flattened pixels, `proj_out`,
/// plus the input as a residual.
#[derive(Debug, Clone)]
pub struct SpatialTransformer {
    norm: GroupNorm,
    proj_in: Projection,
    blocks: Vec<BasicTransformerBlock>,
    proj_out: Projection,
}

impl SpatialTransformer {
    pub fn new(lb: LayerBuilder, shape: TransformerShape) -> Result<Self> {
        let c = shape.channels;
        let projection = |name: &str| -> Result<Projection> {
            Ok(if shape.linear_projection {
                Projection::Linear(lb.pp(name).linear(c, c, true)?)
            } else {
                Projection::Conv(lb.pp(name).conv2d(c, c, 1, 1, 0)?)
            })
        };
        let proj_in = projection("proj_in")?;
        let blocks = (0..shape.depth)
            .map(|i| {
                BasicTransformerBlock::new(
                    lb.pp("transformer_blocks").pp(i),
                    c,
                    shape.context_dim,
                    shape.heads,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let proj_out = projection("proj_out")?;
        let norm = GroupNorm::new(lb.vb().pp("norm"), shape.groups, c, 1e-6)?;
        Ok(Self {
            norm,
            proj_in,
            blocks,
            proj_out,
        })
    }

    pub fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let (batch, channels, height, width) = x.dims4()?;
        let to_tokens = |t: &Tensor| {
            t.permute((0, 2, 3, 1))?
                .reshape((batch, height * width, channels))
        };
        let to_image = |t: &Tensor| {
            t.reshape((batch, height, width, channels))?
                .permute((0, 3, 1, 2))?
                .contiguous()
        };
        let normed = self.norm.forward(x)?;
        let mut h = match &self.proj_in {
            Projection::Conv(conv) => to_tokens(&conv.forward(&normed)?)?,
            Projection::Linear(linear) => linear.forward(&to_tokens(&normed)?)?,
        };
        for block in &self.blocks {
            h = block.forward(&h, context)?;
        }
        let h = match &self.proj_out {
            Projection::Conv(conv) => conv.forward(&to_image(&h)?)?,
            Projection::Linear(linear) => to_image(&linear.forward(&h)?)?,
        };
        h + x
    }
}
