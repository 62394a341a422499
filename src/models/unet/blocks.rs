//! The UNet's down, mid and up blocks (`CrossAttnDownBlock2D`/`DownBlock2D`, `UNetMidBlock2DCrossAttn`,
//! `CrossAttnUpBlock2D`/`UpBlock2D`) with their resamplers.

use candle_core::{Result, Tensor};

use std::sync::Arc;

use super::transformer::{SpatialTransformer, TransformerShape};
use crate::lora::{AdaptableConv2d, LayerBuilder};
use crate::models::checkpointing::{CheckpointGrads, checkpointed};
use crate::models::resnet::{ResnetBlock2D, ResnetShape};

/// What every block of one UNet shares.
#[derive(Debug, Clone, Copy)]
pub struct BlockShape {
    pub temb_channels: usize,
    pub context_dim: usize,
    pub groups: usize,
    pub eps: f64,
    pub linear_projection: bool,
}

impl BlockShape {
    fn resnet(&self, in_channels: usize, out_channels: usize) -> ResnetShape {
        ResnetShape {
            in_channels,
            out_channels,
            temb_channels: Some(self.temb_channels),
            groups: self.groups,
            eps: self.eps,
        }
    }

    fn transformer(&self, channels: usize, heads: usize, depth: usize) -> TransformerShape {
        TransformerShape {
            channels,
            heads,
            depth,
            context_dim: self.context_dim,
            groups: self.groups,
            linear_projection: self.linear_projection,
        }
    }
}

/// What every block's forward pass receives besides its input.
#[derive(Clone, Copy)]
pub struct BlockInputs<'a> {
    /// The (not yet activated) time embedding.
    pub temb: &'a Tensor,
    /// The text-encoder hidden states.
    pub context: &'a Tensor,
    /// Where recomputed blocks leave their variables' gradients, and the anchor that keeps them in the
    /// graph, when checkpointing.
    pub checkpointing: Option<(&'a CheckpointGrads, &'a Tensor)>,
}

/// Runs a resnet, recomputing it in the backward pass when checkpointing.
fn run_resnet(
    resnet: &ResnetBlock2D,
    x: &Tensor,
    temb: &Tensor,
    ckpt: Option<(&CheckpointGrads, &Tensor)>,
) -> Result<Tensor> {
    match ckpt {
        None => resnet.forward(x, Some(temb)),
        Some((store, anchor)) => {
            let resnet = resnet.clone();
            checkpointed(
                Arc::new(move |x, temb| resnet.forward(x, Some(temb))),
                x,
                temb,
                anchor,
                store,
            )
        }
    }
}

/// Runs a spatial transformer, recomputing it in the backward pass when checkpointing.
fn run_attention(
    attention: &SpatialTransformer,
    x: &Tensor,
    context: &Tensor,
    ckpt: Option<(&CheckpointGrads, &Tensor)>,
) -> Result<Tensor> {
    match ckpt {
        None => attention.forward(x, context),
        Some((store, anchor)) => {
            let attention = attention.clone();
            checkpointed(
                Arc::new(move |x, context| attention.forward(x, context)),
                x,
                context,
                anchor,
                store,
            )
        }
    }
}

/// Attention settings of one level, or none for a plain block.
#[derive(Debug, Clone, Copy)]
pub struct LevelAttention {
    pub heads: usize,
    pub depth: usize,
}

/// A down block: resnets (each followed by a transformer when the level has attention) and an optional
/// stride-2 downsampler.
#[derive(Debug, Clone)]
pub struct DownBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<SpatialTransformer>,
    downsampler: Option<AdaptableConv2d>,
}

impl DownBlock {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        lb: LayerBuilder,
        shape: &BlockShape,
        in_channels: usize,
        out_channels: usize,
        layers: usize,
        attention: Option<LevelAttention>,
        downsample: bool,
    ) -> Result<Self> {
        let resnets = (0..layers)
            .map(|j| {
                let c_in = if j == 0 { in_channels } else { out_channels };
                ResnetBlock2D::new(lb.pp("resnets").pp(j), shape.resnet(c_in, out_channels))
            })
            .collect::<Result<Vec<_>>>()?;
        let attentions = match attention {
            Some(a) => (0..layers)
                .map(|j| {
                    SpatialTransformer::new(
                        lb.pp("attentions").pp(j),
                        shape.transformer(out_channels, a.heads, a.depth),
                    )
                })
                .collect::<Result<Vec<_>>>()?,
            None => Vec::new(),
        };
        let downsampler = downsample
            .then(|| {
                lb.pp("downsamplers")
                    .pp("0")
                    .pp("conv")
                    .conv2d(out_channels, out_channels, 3, 2, 1)
            })
            .transpose()?;
        Ok(Self {
            resnets,
            attentions,
            downsampler,
        })
    }

    /// Returns the block output and the skip connections it produces (one per resnet, plus the downsampled).
    pub fn forward(&self, x: &Tensor, inputs: BlockInputs) -> Result<(Tensor, Vec<Tensor>)> {
        let BlockInputs {
            temb,
            context,
            checkpointing: ckpt,
        } = inputs;
        let mut h = x.clone();
        let mut skips = Vec::with_capacity(self.resnets.len() + 1);
        for (j, resnet) in self.resnets.iter().enumerate() {
            h = run_resnet(resnet, &h, temb, ckpt)?;
            if let Some(attention) = self.attentions.get(j) {
                h = run_attention(attention, &h, context, ckpt)?;
            }
            skips.push(h.clone());
        }
        if let Some(down) = &self.downsampler {
            h = down.forward(&h)?;
            skips.push(h.clone());
        }
        Ok((h, skips))
    }
}

/// `UNetMidBlock2DCrossAttn`: resnet, transformer(s), resnet.
#[derive(Debug, Clone)]
pub struct MidBlock {
    first: ResnetBlock2D,
    attention: SpatialTransformer,
    second: ResnetBlock2D,
}

impl MidBlock {
    pub fn new(
        lb: LayerBuilder,
        shape: &BlockShape,
        channels: usize,
        attention: LevelAttention,
    ) -> Result<Self> {
        Ok(Self {
            first: ResnetBlock2D::new(lb.pp("resnets").pp(0), shape.resnet(channels, channels))?,
            attention: SpatialTransformer::new(
                lb.pp("attentions").pp(0),
                shape.transformer(channels, attention.heads, attention.depth),
            )?,
            second: ResnetBlock2D::new(lb.pp("resnets").pp(1), shape.resnet(channels, channels))?,
        })
    }

    pub fn forward(&self, x: &Tensor, inputs: BlockInputs) -> Result<Tensor> {
        let BlockInputs {
            temb,
            context,
            checkpointing: ckpt,
        } = inputs;
        let h = run_resnet(&self.first, x, temb, ckpt)?;
        let h = run_attention(&self.attention, &h, context, ckpt)?;
        run_resnet(&self.second, &h, temb, ckpt)
    }
}

/// Channel counts of one up block.
#[derive(Debug, Clone, Copy)]
pub struct UpChannels {
    /// Channels coming from the previous (lower-resolution) up block.
    pub prev_output: usize,
    pub output: usize,
    /// Channels of the skip connection consumed by the last resnet (the level's input channels).
    pub level_input: usize,
}

/// An up block: resnets over the concatenation with skip connections (each followed by a transformer when
/// the level has attention) and an optional nearest-neighbour upsampler with a 3x3 conv.
#[derive(Debug, Clone)]
pub struct UpBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<SpatialTransformer>,
    upsampler: Option<AdaptableConv2d>,
}

impl UpBlock {
    pub fn new(
        lb: LayerBuilder,
        shape: &BlockShape,
        channels: UpChannels,
        layers: usize,
        attention: Option<LevelAttention>,
        upsample: bool,
    ) -> Result<Self> {
        let UpChannels {
            prev_output,
            output,
            level_input,
        } = channels;
        let resnets = (0..layers)
            .map(|j| {
                let skip = if j + 1 == layers { level_input } else { output };
                let c_in = if j == 0 { prev_output } else { output };
                ResnetBlock2D::new(lb.pp("resnets").pp(j), shape.resnet(c_in + skip, output))
            })
            .collect::<Result<Vec<_>>>()?;
        let attentions = match attention {
            Some(a) => (0..layers)
                .map(|j| {
                    SpatialTransformer::new(
                        lb.pp("attentions").pp(j),
                        shape.transformer(output, a.heads, a.depth),
                    )
                })
                .collect::<Result<Vec<_>>>()?,
            None => Vec::new(),
        };
        let upsampler = upsample
            .then(|| {
                lb.pp("upsamplers")
                    .pp("0")
                    .pp("conv")
                    .conv2d(output, output, 3, 1, 1)
            })
            .transpose()?;
        Ok(Self {
            resnets,
            attentions,
            upsampler,
        })
    }

    /// Number of skip connections this block consumes.
    pub fn skips_needed(&self) -> usize {
        self.resnets.len()
    }

    /// `skips` are consumed from the end (the most recent first). `upsample_to` is the spatial size of the next
    /// level's skip connections, so odd sizes round-trip exactly.
    pub fn forward(
        &self,
        x: &Tensor,
        skips: &mut Vec<Tensor>,
        inputs: BlockInputs,
        upsample_to: Option<(usize, usize)>,
    ) -> Result<Tensor> {
        let BlockInputs {
            temb,
            context,
            checkpointing: ckpt,
        } = inputs;
        let mut h = x.clone();
        for (j, resnet) in self.resnets.iter().enumerate() {
            let Some(skip) = skips.pop() else {
                candle_core::bail!("the UNet ran out of skip connections");
            };
            h = run_resnet(resnet, &Tensor::cat(&[&h, &skip], 1)?, temb, ckpt)?;
            if let Some(attention) = self.attentions.get(j) {
                h = run_attention(attention, &h, context, ckpt)?;
            }
        }
        if let Some(conv) = &self.upsampler {
            let (_, _, height, width) = h.dims4()?;
            let (target_h, target_w) = upsample_to.unwrap_or((height * 2, width * 2));
            h = conv.forward(&h.upsample_nearest2d(target_h, target_w)?)?;
        }
        Ok(h)
    }
}
