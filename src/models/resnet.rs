//! `ResnetBlock2D`, shared by the UNet (with a time embedding) and the VAE (without).

use candle_core::{Result, Tensor};

use crate::kernels::silu;
use crate::lora::{AdaptableConv2d, AdaptableLinear, LayerBuilder};
use crate::models::nn::GroupNorm;

/// GroupNorm → SiLU → 3x3 conv (+ projected time embedding) → GroupNorm → SiLU → 3x3 conv, plus a residual
/// through a 1x1 `conv_shortcut` when the channel count changes.
#[derive(Debug, Clone)]
pub struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: AdaptableConv2d,
    time_emb_proj: Option<AdaptableLinear>,
    norm2: GroupNorm,
    conv2: AdaptableConv2d,
    conv_shortcut: Option<AdaptableConv2d>,
}

/// Sizes of one resnet block.
#[derive(Debug, Clone, Copy)]
pub struct ResnetShape {
    pub in_channels: usize,
    pub out_channels: usize,
    /// Width of the time embedding, or `None` for the VAE's blocks.
    pub temb_channels: Option<usize>,
    pub groups: usize,
    pub eps: f64,
}

impl ResnetBlock2D {
    pub fn new(lb: LayerBuilder, shape: ResnetShape) -> Result<Self> {
        let ResnetShape {
            in_channels,
            out_channels,
            temb_channels,
            groups,
            eps,
        } = shape;
        let norm1 = GroupNorm::new(lb.vb().pp("norm1"), groups, in_channels, eps)?;
        let conv1 = lb.pp("conv1").conv2d(in_channels, out_channels, 3, 1, 1)?;
        let time_emb_proj = temb_channels
            .map(|t| lb.pp("time_emb_proj").linear(t, out_channels, true))
            .transpose()?;
        let norm2 = GroupNorm::new(lb.vb().pp("norm2"), groups, out_channels, eps)?;
        let conv2 = lb.pp("conv2").conv2d(out_channels, out_channels, 3, 1, 1)?;
        let conv_shortcut = (in_channels != out_channels)
            .then(|| {
                lb.pp("conv_shortcut")
                    .conv2d(in_channels, out_channels, 1, 1, 0)
            })
            .transpose()?;
        Ok(Self {
            norm1,
            conv1,
            time_emb_proj,
            norm2,
            conv2,
            conv_shortcut,
        })
    }

    /// `temb` is the (not yet activated) time embedding `[batch, temb_channels]`.
    pub fn forward(&self, x: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        let mut h = self.conv1.forward_silu(&self.norm1.forward(x)?)?;
        if let (Some(proj), Some(temb)) = (&self.time_emb_proj, temb) {
            let t = proj.forward(&silu(temb)?)?;
            h = h.broadcast_add(&t.unsqueeze(2)?.unsqueeze(3)?)?;
        }
        let h = self.conv2.forward_silu(&self.norm2.forward(&h)?)?;
        let shortcut = match &self.conv_shortcut {
            Some(conv) => conv.forward(x)?,
            None => x.clone(),
        };
        shortcut + h
    }
}
