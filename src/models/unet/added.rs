//! SDXL's added conditioning of the UNet ("text_time"): the pooled text embedding and the six size values
//! (time ids) each image is conditioned on, embedded and added to the time embedding.
//!
//! Knows nothing of text encoders or images: callers pass the pooled embedding and the sizes.

use candle_core::{Device, Result, Tensor};

use super::TextTimeEmbedding;
use super::timestep_embedding;
use crate::kernels::silu;
use crate::lora::{AdaptableLinear, LayerBuilder};

/// The size conditioning of one image: the size it had, where it was cropped, and the size it is made at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SizeConditioning {
    /// `(height, width)` of the original image.
    pub original: (usize, usize),
    /// `(top, left)` of the crop.
    pub crop_top_left: (usize, usize),
    /// `(height, width)` of the image the model makes or learns from.
    pub target: (usize, usize),
}

impl SizeConditioning {
    /// An uncropped image of `height` x `width`, as generation uses it (original = target, crop 0, 0).
    pub fn uncropped(height: usize, width: usize) -> Self {
        Self {
            original: (height, width),
            crop_top_left: (0, 0),
            target: (height, width),
        }
    }

    /// The six time ids in SDXL's order: original h, w, crop top, left, target h, w.
    pub fn time_ids(&self) -> [f32; TextTimeEmbedding::TIME_IDS] {
        [
            self.original.0,
            self.original.1,
            self.crop_top_left.0,
            self.crop_top_left.1,
            self.target.0,
            self.target.1,
        ]
        .map(|v| v as f32)
    }
}

/// What an SDXL UNet is conditioned on besides the timestep and the text context.
#[derive(Debug, Clone)]
pub struct AddedConditions {
    /// The pooled text embedding `[batch, pooled]` (text encoder 2's projection).
    pub text_embeds: Tensor,
    /// The size values `[batch, 6]` (f32), one row per sample.
    pub time_ids: Tensor,
}

impl AddedConditions {
    /// The conditions for `text_embeds` `[batch, pooled]` and one size per sample.
    pub fn new(text_embeds: Tensor, sizes: &[SizeConditioning], device: &Device) -> Result<Self> {
        let values: Vec<f32> = sizes.iter().flat_map(|s| s.time_ids()).collect();
        let time_ids =
            Tensor::from_vec(values, (sizes.len(), TextTimeEmbedding::TIME_IDS), device)?;
        Ok(Self {
            text_embeds,
            time_ids,
        })
    }
}

/// `add_embedding`: `linear_2(silu(linear_1(cat(pooled, sinusoid(time ids)))))`.
#[derive(Debug, Clone)]
pub struct AddEmbedding {
    linear_1: AdaptableLinear,
    linear_2: AdaptableLinear,
    shape: TextTimeEmbedding,
}

impl AddEmbedding {
    /// `lb` is rooted at `add_embedding`; `out` is the time-embedding width.
    pub fn new(lb: LayerBuilder, shape: TextTimeEmbedding, out: usize) -> Result<Self> {
        Ok(Self {
            linear_1: lb.pp("linear_1").linear(shape.input_dim, out, true)?,
            linear_2: lb.pp("linear_2").linear(out, out, true)?,
            shape,
        })
    }

    /// The embedding to add to the time embedding, in the dtype of `text_embeds`. Each time id is embedded
    /// like a timestep (cos first, in f32, as the reference does whatever the model's dtype).
    pub fn forward(&self, conditions: &AddedConditions) -> Result<Tensor> {
        let AddedConditions {
            text_embeds,
            time_ids,
        } = conditions;
        let (batch, ids) = time_ids.dims2()?;
        let (embeds_batch, pooled) = text_embeds.dims2()?;
        if ids != TextTimeEmbedding::TIME_IDS
            || embeds_batch != batch
            || pooled != self.shape.pooled_dim()
        {
            candle_core::bail!(
                "this UNet takes a pooled text embedding of width {} and {} time ids per sample, not {:?} and \
                 {:?}",
                self.shape.pooled_dim(),
                TextTimeEmbedding::TIME_IDS,
                text_embeds.dims(),
                time_ids.dims()
            );
        }
        let time_embeds = timestep_embedding(
            &time_ids.flatten_all()?,
            self.shape.time_embed_dim,
            text_embeds.device(),
        )?
        .reshape((batch, ids * self.shape.time_embed_dim))?
        .to_dtype(text_embeds.dtype())?;
        let input = Tensor::cat(&[text_embeds, &time_embeds], 1)?;
        self.linear_2
            .forward(&silu(&self.linear_1.forward(&input)?)?)
    }
}
