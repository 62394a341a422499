//! What one micro-batch feeds the UNet: latents (from the cache or freshly encoded), their loss masks, the
//! processed captions and their text-encoder outputs, and SDXL's size conditioning. All randomness comes from
//! the run's RNG, in a fixed order, so runs and resumed runs are reproducible.

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
use crate::models::pipeline::PromptEmbeddings;
use crate::models::unet::SizeConditioning;
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

/// SDXL's size conditioning of a training image of `original` (width, height) in `bucket` (width, height),
/// flipped or not, as kohya sd-scripts computes it: the original size, the bucket as the target size, and as
/// the crop's top-left corner the margins of the image *fitted inside* the bucket (sd-scripts'
/// `BucketManager.get_crop_ltrb`; with a flip, the left margin becomes the right one).
///
/// That is not the crop actually applied: the image is scaled to *cover* the bucket and what overflows is
/// cut off, so a portrait image in a square bucket reports a left margin although its top and bottom were
/// cut, and a random crop's offset is not reported at all. kohya reports these values, and so do we: SDXL
/// LoRAs trained here condition the model exactly as kohya's do. The original size is the image as displayed
/// (after its EXIF orientation, which is the image trained on); kohya reads the stored pixel size, the same
/// for images without an orientation tag.
pub fn kohya_size_conditioning(
    original: (u32, u32),
    bucket: (u32, u32),
    flip: bool,
) -> SizeConditioning {
    let (bucket_width, bucket_height) = (f64::from(bucket.0), f64::from(bucket.1));
    let image_aspect = f64::from(original.0) / f64::from(original.1.max(1));
    let (fitted_width, fitted_height) = if bucket_width / bucket_height > image_aspect {
        (bucket_height * image_aspect, bucket_height)
    } else {
        (bucket_width, bucket_width / image_aspect)
    };
    // Python's float `//`, then `int()` (truncation; `as` also saturates a rounding error below 0 to 0).
    let left = ((bucket_width - fitted_width) / 2.0).floor();
    let top = ((bucket_height - fitted_height) / 2.0).floor();
    let left = if flip {
        bucket_width - (left + fitted_width)
    } else {
        left
    };
    SizeConditioning {
        original: (original.1 as usize, original.0 as usize),
        crop_top_left: (top as usize, left as usize),
        target: (bucket.1 as usize, bucket.0 as usize),
    }
}

/// Encodes images to latents for training, through the cache when it is enabled.
pub struct LatentSource<'a> {
    pub vae: &'a AutoencoderKL,
    pub config: &'a TrainConfig,
    pub cache: Option<LatentCache>,
    /// Content hash of each item's file, for cache keys.
    pub file_hashes: Vec<String>,
    pub device: Device,
    /// The VAE's dtype (f32 for SDXL's VAE in an fp16 run).
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

/// Text-encoder outputs of captions (the context, and SDXL's pooled embedding), kept when the text encoders
/// are frozen and captions are not augmented.
#[derive(Default)]
pub struct ContextCache {
    entries: HashMap<String, PromptEmbeddings>,
}

impl ContextCache {
    pub fn get(&self, caption: &str) -> Option<&PromptEmbeddings> {
        self.entries.get(caption)
    }

    pub fn insert(&mut self, caption: String, embeddings: PromptEmbeddings) {
        self.entries.insert(caption, embeddings);
    }
}

#[cfg(test)]
mod tests {
    use super::kohya_size_conditioning;
    use crate::models::unet::SizeConditioning;

    /// Values of sd-scripts' `get_crop_ltrb` (and its flip rule) for the same sizes, worked through its
    /// float arithmetic.
    #[test]
    fn size_conditioning_reports_what_kohya_reports() {
        // A portrait image in a square bucket: fitted 341.33 wide, so a left margin of floor(85.33) = 85
        // although the real crop cut its top and bottom; flipped, 512 - (85 + 341.33) = 85.67 -> 85.
        for flip in [false, true] {
            assert_eq!(
                kohya_size_conditioning((512, 768), (512, 512), flip),
                SizeConditioning {
                    original: (768, 512),
                    crop_top_left: (0, 85),
                    target: (512, 512),
                }
            );
        }
        // A landscape image in a square bucket: a top margin of 85, no left margin either way.
        assert_eq!(
            kohya_size_conditioning((768, 512), (512, 512), true).crop_top_left,
            (85, 0)
        );
        // A wide bucket narrower than the image's aspect: fitted 1216 x 810.67, top floor(10.67) = 10.
        let wide = kohya_size_conditioning((1500, 1000), (1216, 832), false);
        assert_eq!((wide.crop_top_left, wide.target), ((10, 0), (832, 1216)));
        // An image of the bucket's aspect ratio has no margins.
        assert_eq!(
            kohya_size_conditioning((2048, 1024), (1024, 512), true).crop_top_left,
            (0, 0)
        );
    }
}
