//! What one micro-batch feeds the UNet: latents (from the cache or freshly encoded), their loss masks, and
//! the processed captions. All randomness comes from the run's RNG, in a fixed order, so runs and resumed
//! runs are reproducible.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use rand::Rng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

use super::TrainError;
use crate::config::TrainConfig;
use crate::data::DatasetItem;
use crate::data::images::{CropPlan, load_oriented, prepare};
use crate::data::latent_cache::{CachedLatent, LatentCache, cache_key};
use crate::models::vae::AutoencoderKL;

/// Standard normal noise of the given shape, drawn from the run's RNG on the CPU.
pub fn gaussian(
    rng: &mut ChaCha8Rng,
    dims: &[usize],
    device: &Device,
) -> Result<Tensor, TrainError> {
    let count = dims.iter().product();
    let values: Vec<f32> = (0..count).map(|_| StandardNormal.sample(rng)).collect();
    Ok(Tensor::from_vec(values, dims, device)?)
}

/// Caption augmentation: tag shuffling (keeping the first `keep_tokens` tags) and caption dropout.
pub fn process_caption(caption: &str, config: &TrainConfig, rng: &mut ChaCha8Rng) -> String {
    let mut caption = caption.to_string();
    if config.shuffle_caption {
        let mut tags: Vec<&str> = caption
            .split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .collect();
        let keep = (config.keep_tokens as usize).min(tags.len());
        tags[keep..].shuffle(rng);
        caption = tags.join(", ");
    }
    if config.caption_dropout_rate > 0.0 && rng.random::<f32>() < config.caption_dropout_rate {
        caption.clear();
    }
    caption
}

/// Encodes images to latents for training, through the cache when it is enabled.
pub struct LatentSource<'a> {
    pub vae: &'a AutoencoderKL,
    pub config: &'a TrainConfig,
    pub cache: Option<LatentCache>,
    /// Content hash of each item's file, for cache keys.
    pub file_hashes: Vec<String>,
    pub device: Device,
    pub dtype: DType,
}

impl LatentSource<'_> {
    /// The crop and flip of an item for one step (random crop and flip draw from `rng`).
    pub fn plan(&self, item: &DatasetItem, bucket: (u32, u32), rng: &mut ChaCha8Rng) -> CropPlan {
        let flip = self.config.flip_aug && rng.random_bool(0.5);
        let size = (item.width, item.height);
        if self.config.random_crop {
            CropPlan::random(size, bucket, flip, |x, y| {
                (rng.random_range(0..x), rng.random_range(0..y))
            })
        } else {
            CropPlan::centred(size, bucket, flip)
        }
    }

    /// The latent distribution (and mask) of an item under a plan.
    pub fn latent(
        &mut self,
        index: usize,
        item: &DatasetItem,
        plan: &CropPlan,
    ) -> Result<CachedLatent, TrainError> {
        let key = cache_key(&self.file_hashes[index], &self.preprocessing_key(plan));
        let Self {
            vae,
            config,
            cache,
            device,
            dtype,
            ..
        } = self;
        let encode = || encode_item(vae, config, device, *dtype, item, plan);
        Ok(match cache {
            Some(cache) => cache.get_or_encode(&key, device, encode)?,
            None => encode()?,
        })
    }

    /// Everything besides the image bytes that changes the latents.
    fn preprocessing_key(&self, plan: &CropPlan) -> String {
        format!(
            "{}|alpha={:?}|vae-latent-dist-v1",
            plan.key(),
            self.config.alpha_mode
        )
    }
}

/// Decodes, preprocesses and VAE-encodes one image.
fn encode_item(
    vae: &AutoencoderKL,
    config: &TrainConfig,
    device: &Device,
    dtype: DType,
    item: &DatasetItem,
    plan: &CropPlan,
) -> Result<CachedLatent, crate::data::DataError> {
    let image = load_oriented(&item.path)?;
    let prepared = prepare(&image, plan, config.alpha_mode, device)?;
    let encoded = (|| -> candle_core::Result<CachedLatent> {
        let pixels = prepared.pixels.unsqueeze(0)?.to_dtype(dtype)?;
        let distribution = vae.encode(&pixels)?;
        let factor = vae.config().downscale_factor();
        let mask = match &prepared.mask {
            Some(mask) => Some(mask.unsqueeze(0)?.avg_pool2d(factor)?.squeeze(0)?),
            None => None,
        };
        Ok(CachedLatent {
            mean: distribution.mean.squeeze(0)?.to_dtype(DType::F32)?,
            logvar: distribution.logvar.squeeze(0)?.to_dtype(DType::F32)?,
            mask,
        })
    })();
    encoded.map_err(|e| crate::data::DataError::Tensor(crate::tensor_file::plain_error(&e)))
}

/// Text-encoder outputs of captions, kept when the text encoder is frozen and captions are not augmented.
#[derive(Default)]
pub struct ContextCache {
    entries: HashMap<String, Tensor>,
}

impl ContextCache {
    pub fn get(&self, caption: &str) -> Option<&Tensor> {
        self.entries.get(caption)
    }

    pub fn insert(&mut self, caption: String, context: Tensor) {
        self.entries.insert(caption, context);
    }
}
