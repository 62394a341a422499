//! `UNet2DConditionModel` of Stable Diffusion 1.x/2.x and SDXL in the diffusers module layout. Each layer's
//! path is the name kohya LoRA keys are made of for SD1/SD2; for SDXL, which kohya trains on a UNet in the
//! original (sgm) layout, the registry also knows every layer's original path.

mod added;
mod blocks;
mod config;
mod transformer;

use candle_core::{DType, Device, Result, Tensor};

use std::sync::Arc;

use crate::kernels::silu;
use crate::lora::{AdaptableConv2d, AdaptableLinear, AdapterSlot, LayerBuilder, LayerRegistry};
use crate::models::checkpoint::names::unet_to_ldm;
use crate::models::checkpointing::{CheckpointGrads, trainable_anchor};
use crate::models::nn::GroupNorm;
use added::AddEmbedding;
pub use added::{AddedConditions, SizeConditioning};
use blocks::{BlockInputs, BlockShape, DownBlock, LevelAttention, MidBlock, UpBlock, UpChannels};
pub use config::{TextTimeEmbedding, UNetConfig};

/// The denoising network: predicts noise (or velocity) from a noisy latent, a timestep and text context.
#[derive(Debug, Clone)]
pub struct UNet2DConditionModel {
    conv_in: AdaptableConv2d,
    time_linear_1: AdaptableLinear,
    time_linear_2: AdaptableLinear,
    add_embedding: Option<AddEmbedding>,
    down_blocks: Vec<DownBlock>,
    mid_block: MidBlock,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: AdaptableConv2d,
    config: UNetConfig,
    layers: LayerRegistry,
    checkpointing: Option<CheckpointGrads>,
}

impl UNet2DConditionModel {
    pub fn new(vb: candle_nn::VarBuilder, config: &UNetConfig) -> Result<Self> {
        config
            .validate()
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let layers = LayerRegistry::default();
        let lb = LayerBuilder::new(vb, layers.clone());
        let channels = &config.block_out_channels;
        let levels = config.levels();
        let temb = config.time_embed_dim();
        let shape = BlockShape {
            temb_channels: temb,
            context_dim: config.cross_attention_dim,
            groups: config.norm_num_groups,
            eps: config.norm_eps,
            linear_projection: config.use_linear_projection,
        };
        let level_attention = |level: usize, has_attention: bool| {
            has_attention.then(|| LevelAttention {
                heads: config.attention_heads[level],
                depth: config.transformer_layers_per_block[level],
            })
        };

        let conv_in = lb
            .pp("conv_in")
            .conv2d(config.in_channels, channels[0], 3, 1, 1)?;
        let time_linear_1 =
            lb.pp("time_embedding")
                .pp("linear_1")
                .linear(channels[0], temb, true)?;
        let time_linear_2 = lb
            .pp("time_embedding")
            .pp("linear_2")
            .linear(temb, temb, true)?;
        let add_embedding = config
            .addition
            .map(|shape| AddEmbedding::new(lb.pp("add_embedding"), shape, temb))
            .transpose()?;

        let mut down_blocks = Vec::with_capacity(levels);
        for level in 0..levels {
            let in_channels = if level == 0 {
                channels[0]
            } else {
                channels[level - 1]
            };
            down_blocks.push(DownBlock::new(
                lb.pp("down_blocks").pp(level),
                &shape,
                in_channels,
                channels[level],
                config.layers_per_block,
                level_attention(level, config.down_attention[level]),
                level + 1 < levels,
            )?);
        }

        let last = levels - 1;
        let mid_attention = LevelAttention {
            heads: config.attention_heads[last],
            depth: config.transformer_layers_per_block[last],
        };
        let mid_block = MidBlock::new(lb.pp("mid_block"), &shape, channels[last], mid_attention)?;

        let mut up_blocks = Vec::with_capacity(levels);
        for i in 0..levels {
            // Up block i works at the resolution of down level `levels - 1 - i`.
            let level = last - i;
            let up_channels = UpChannels {
                prev_output: if i == 0 {
                    channels[last]
                } else {
                    channels[level + 1]
                },
                output: channels[level],
                level_input: channels[level.saturating_sub(1)],
            };
            up_blocks.push(UpBlock::new(
                lb.pp("up_blocks").pp(i),
                &shape,
                up_channels,
                config.layers_per_block + 1,
                level_attention(level, config.up_attention[i]),
                i < last,
            )?);
        }

        let conv_norm_out = GroupNorm::new(
            lb.vb().pp("conv_norm_out"),
            config.norm_num_groups,
            channels[0],
            config.norm_eps,
        )?;
        let conv_out = lb
            .pp("conv_out")
            .conv2d(channels[0], config.out_channels, 3, 1, 1)?;
        if config.addition.is_some() {
            // kohya trains SDXL on its own UNet in the original layout, so its files name these layers by
            // their original paths (`input_blocks.4.1.transformer_blocks.0.attn1.to_q`).
            layers.set_kohya_paths(|name| {
                unet_to_ldm(name, config.layers_per_block, &config.up_attention)
            });
        }
        Ok(Self {
            conv_in,
            time_linear_1,
            time_linear_2,
            add_embedding,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out,
            conv_out,
            config: config.clone(),
            layers,
            checkpointing: None,
        })
    }

    pub fn config(&self) -> &UNetConfig {
        &self.config
    }

    /// Every adapter-capable layer of the UNet, named by its diffusers module path (and, for SDXL, by its
    /// original path for kohya).
    pub fn layers(&self) -> &LayerRegistry {
        &self.layers
    }

    /// Turns gradient checkpointing of the resnets and transformers on (recomputed in the backward pass, their
    /// variables' gradients left in `store`) or off.
    pub fn set_gradient_checkpointing(&mut self, store: Option<CheckpointGrads>) {
        self.checkpointing = store;
    }

    /// The layers kohya sd-scripts trains: every Linear and 1x1 convolution inside the transformer blocks
    /// (`Transformer2DModel`), and with `conv` (LoCon) also the resnets' convolutions, `time_emb_proj` and
    /// shortcuts, and the down/upsamplers.
    pub fn lora_targets(&self, conv: bool) -> Vec<Arc<AdapterSlot>> {
        self.layers
            .slots()
            .into_iter()
            .filter(|slot| {
                let name = slot.name();
                let in_transformer = name.contains(".attentions.");
                let in_conv_block = name.contains(".resnets.")
                    || name.contains(".downsamplers.")
                    || name.contains(".upsamplers.");
                in_transformer || (conv && in_conv_block)
            })
            .collect()
    }

    /// `sample`: `[batch, in_channels, h, w]`; `timesteps`: `[batch]` (any float dtype, values 0..1000);
    /// `context`: `[batch, tokens, cross_attention_dim]`. For a UNet without added conditioning (SD1/SD2).
    pub fn forward(&self, sample: &Tensor, timesteps: &Tensor, context: &Tensor) -> Result<Tensor> {
        self.forward_with(sample, timesteps, context, None)
    }

    /// [`forward`](Self::forward) with SDXL's added conditions (pooled text embedding and size values),
    /// which a UNet with [`UNetConfig::addition`] requires and any other refuses.
    pub fn forward_with(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        context: &Tensor,
        added: Option<&AddedConditions>,
    ) -> Result<Tensor> {
        let dtype = sample.dtype();
        let emb = timestep_embedding(
            timesteps,
            self.config.block_out_channels[0],
            sample.device(),
        )?
        .to_dtype(dtype)?;
        let mut temb = self
            .time_linear_2
            .forward(&silu(&self.time_linear_1.forward(&emb)?)?)?;
        match (&self.add_embedding, added) {
            (Some(embedding), Some(added)) => {
                let added = AddedConditions {
                    text_embeds: added.text_embeds.to_dtype(dtype)?,
                    time_ids: added.time_ids.clone(),
                };
                temb = (temb + embedding.forward(&added)?)?;
            }
            (None, None) => {}
            (Some(_), None) => candle_core::bail!(
                "this UNet (SDXL) needs a pooled text embedding and size values besides the text context"
            ),
            (None, Some(_)) => candle_core::bail!(
                "this UNet takes no pooled text embedding or size values (only SDXL UNets do)"
            ),
        }

        let anchor = match &self.checkpointing {
            Some(_) => {
                let slots = self.layers.slots();
                let adapters: Vec<_> = slots.iter().flat_map(|s| s.adapters()).collect();
                Some(trainable_anchor(
                    adapters.iter().map(|a| a.down()),
                    sample.device(),
                )?)
            }
            None => None,
        };
        let checkpointing = self.checkpointing.as_ref().zip(anchor.as_ref());
        let inputs = BlockInputs {
            temb: &temb,
            context,
            checkpointing,
        };
        let mut h = self.conv_in.forward(sample)?;
        let mut skips = vec![h.clone()];
        for block in &self.down_blocks {
            let (out, block_skips) = block.forward(&h, inputs)?;
            h = out;
            skips.extend(block_skips);
        }
        h = self.mid_block.forward(&h, inputs)?;
        for block in &self.up_blocks {
            // The skips left after this block's are the next level's; their size is where to upsample to.
            let remaining = skips.len().saturating_sub(block.skips_needed());
            let upsample_to = remaining
                .checked_sub(1)
                .map(|i| skips[i].dims4())
                .transpose()?
                .map(|(_, _, h, w)| (h, w));
            h = block.forward(&h, &mut skips, inputs, upsample_to)?;
        }
        self.conv_out.forward_silu(&self.conv_norm_out.forward(&h)?)
    }
}

/// diffusers' sinusoidal `Timesteps(dim, flip_sin_to_cos=True, downscale_freq_shift=0)`, computed in f32
/// with the same operation order as the reference so that large timesteps round identically.
fn timestep_embedding(timesteps: &Tensor, dim: usize, device: &Device) -> Result<Tensor> {
    let half = dim / 2;
    let exponent_scale = -(10000f64.ln()) as f32;
    let freqs: Vec<f32> = (0..half)
        .map(|i| (exponent_scale * i as f32 / half as f32).exp())
        .collect();
    let steps: Vec<f32> = timesteps.to_dtype(DType::F32)?.to_vec1()?;
    let mut rows = Vec::with_capacity(steps.len() * dim);
    for &t in &steps {
        let args: Vec<f32> = freqs.iter().map(|&f| t * f).collect();
        rows.extend(args.iter().map(|a| a.cos()));
        rows.extend(args.iter().map(|a| a.sin()));
    }
    Tensor::from_vec(rows, (steps.len(), dim), device)
}
