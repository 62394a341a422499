//! Text-to-image with a loaded model: prompt encoding, classifier-free guidance, a sampler loop, and VAE
//! decoding, with the same arithmetic as diffusers' `StableDiffusionPipeline` and, for SDXL,
//! `StableDiffusionXLPipeline` (two text encoders, pooled-text and size conditioning, an f32 VAE under f16).

use candle_core::{DType, Device, Tensor};

use crate::lora::{
    LayerRegistry, TEXT_ENCODER_1_PREFIX, TEXT_ENCODER_2_PREFIX, TEXT_ENCODER_PREFIX, UNET_PREFIX,
};
use crate::models::ModelError;
use crate::models::checkpoint::{ModelConfig, ModelFamily, ModelSource, PredictionOrigin};
use crate::models::clip::ClipTextTransformer;
use crate::models::schedulers::{NoiseSource, PredictionType, SamplerKind};
use crate::models::tokenizer::ClipTokenizer;
use crate::models::unet::{AddedConditions, SizeConditioning, UNet2DConditionModel};
use crate::models::vae::AutoencoderKL;

/// What to generate.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub prompt: String,
    pub negative_prompt: String,
    pub width: usize,
    pub height: usize,
    pub steps: usize,
    /// Classifier-free guidance scale; at 1 or below the negative prompt is not used.
    pub guidance_scale: f64,
    pub sampler: SamplerKind,
    /// 1 = last CLIP layer, 2 = penultimate (A1111's "clip skip"). SDXL ignores it: it always conditions on
    /// both encoders' penultimate layers.
    pub clip_skip: usize,
}

/// What the text encoders make of prompts: the context the UNet attends to, and for SDXL the pooled
/// embedding of text encoder 2.
#[derive(Debug, Clone)]
pub struct PromptEmbeddings {
    /// `[prompts, 77, context width]` (SDXL: both encoders' hidden states side by side, 2048 wide).
    pub context: Tensor,
    /// `[prompts, pooled width]` for SDXL, `None` for SD1/SD2.
    pub pooled: Option<Tensor>,
}

impl PromptEmbeddings {
    /// The same embeddings cut from the backward graph.
    pub fn detach(&self) -> Self {
        Self {
            context: self.context.detach(),
            pooled: self.pooled.as_ref().map(Tensor::detach),
        }
    }
}

/// The result of a generation.
#[derive(Debug, Clone)]
pub struct Generated {
    /// Final latents `[1, 4, h/8, w/8]`, before the VAE.
    pub latents: Tensor,
    /// Decoded image `[1, 3, h, w]` in [0, 1].
    pub image: Tensor,
}

/// A Stable Diffusion model ready to run.
pub struct StableDiffusion {
    pub unet: UNet2DConditionModel,
    pub vae: AutoencoderKL,
    pub text_encoder: ClipTextTransformer,
    /// SDXL's second text encoder (OpenCLIP ViT-bigG with its projection).
    pub text_encoder_2: Option<ClipTextTransformer>,
    config: ModelConfig,
    /// The prediction type's test value, when a test prediction decided it.
    prediction_test: Option<f64>,
    device: Device,
    dtype: DType,
    /// The VAE's dtype: `dtype`, except f32 for SDXL's VAE when `dtype` is f16 (it overflows there).
    vae_dtype: DType,
}

/// Below this mean of `UNet(x) − x` in the test prediction the model predicts velocity (AUTOMATIC1111's
/// threshold).
const V_PREDICTION_BELOW: f64 = -1.0;

impl StableDiffusion {
    /// Loads every component of `source` onto `device` in `dtype` (SDXL's VAE in f32 when `dtype` is f16, as
    /// diffusers' `force_upcast` does). An SD2 file without a config has its prediction type decided here, by
    /// a test prediction of its UNet.
    pub fn load(source: &ModelSource, device: &Device, dtype: DType) -> Result<Self, ModelError> {
        let unet = source.load_unet(device, dtype)?;
        let mut config = source.config().clone();
        let mut prediction_test = None;
        if config.prediction_origin == PredictionOrigin::TestPrediction {
            let mean = test_prediction(&unet, &config, device, dtype)?;
            config.scheduler.prediction_type = if mean < V_PREDICTION_BELOW {
                PredictionType::VPrediction
            } else {
                PredictionType::Epsilon
            };
            prediction_test = Some(mean);
        }
        let vae_dtype =
            if config.family == ModelFamily::Sdxl && config.vae.force_upcast && dtype == DType::F16
            {
                DType::F32
            } else {
                dtype
            };
        Ok(Self {
            unet,
            vae: source.load_vae(device, vae_dtype)?,
            text_encoder: source.load_text_encoder(device, dtype)?,
            text_encoder_2: source.load_text_encoder_2(device, dtype)?,
            config,
            prediction_test,
            device: device.clone(),
            dtype,
            vae_dtype,
        })
    }

    /// The dtype the VAE runs in (see [`load`](Self::load)).
    pub fn vae_dtype(&self) -> DType {
        self.vae_dtype
    }

    /// A line for the log when the VAE runs in another dtype than the rest of the model.
    pub fn vae_precision_note(&self) -> Option<String> {
        (self.vae_dtype != self.dtype).then(|| {
            format!(
                "the SDXL VAE runs in {} (it overflows in {}), the rest of the model in {}",
                self.vae_dtype.as_str(),
                self.dtype.as_str(),
                self.dtype.as_str()
            )
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The mean of `UNet(x) − x` in the test prediction that tells v-prediction from epsilon (see
    /// [`PredictionOrigin::TestPrediction`]).
    pub fn test_prediction(&self) -> Result<f64, ModelError> {
        test_prediction(&self.unet, &self.config, &self.device, self.dtype)
    }

    /// What the model predicts and why, for the log: `v_prediction (by a test prediction: …)`.
    pub fn prediction_note(&self) -> String {
        let kind = self.config.scheduler.prediction_type.as_str();
        let why = match (self.config.prediction_origin, self.prediction_test) {
            (PredictionOrigin::TestPrediction, Some(mean)) => format!(
                "an SD2 file without a config, so decided by a test prediction as AUTOMATIC1111 does: the \
                 mean of UNet(x) - x at t = 999 is {mean:.3}, {} {V_PREDICTION_BELOW}; set prediction_type \
                 to override",
                if mean < V_PREDICTION_BELOW {
                    "below"
                } else {
                    "not below"
                }
            ),
            (PredictionOrigin::Config, _) => "as the model's config says".to_string(),
            (PredictionOrigin::Override, _) => "as prediction_type says".to_string(),
            (PredictionOrigin::Marker, _) => {
                if self.config.scheduler.rescale_betas_zero_snr {
                    "as the file's `v_pred` marker says, with the noise schedule rescaled to zero terminal SNR \
                     as its `ztsnr` marker says; set prediction_type to override"
                        .to_string()
                } else {
                    "as the file's `v_pred` marker says; set prediction_type to override"
                        .to_string()
                }
            }
            (PredictionOrigin::Default, _) | (PredictionOrigin::TestPrediction, None) => {
                "no config says otherwise".to_string()
            }
        };
        format!("the model predicts {kind}: {why}")
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The adapter-capable layers of the UNet and the text encoders, with their kohya prefixes.
    pub fn adapter_components(&self) -> Vec<(&'static str, &LayerRegistry)> {
        adapter_components(&self.unet, &self.text_encoder, self.text_encoder_2.as_ref())
    }

    /// The text encoders with their kohya prefixes (`lora_te`; SDXL: `lora_te1`, `lora_te2`).
    pub fn text_encoders(&self) -> Vec<(&'static str, &ClipTextTransformer)> {
        text_encoders(&self.text_encoder, self.text_encoder_2.as_ref())
    }

    /// Token ids `[prompts, 77]` of the prompts for the (first) text encoder, padded with its pad token.
    /// Prompts are cut to 75 tokens.
    pub fn tokenize(&self, prompts: &[&str]) -> Result<Tensor, ModelError> {
        self.token_ids(prompts, self.config.pad_token)
    }

    /// Token ids for SDXL's second text encoder, padded with its pad token (`!` = 0, which also turns every
    /// `!` of a prompt into 0, as transformers' tokenizer does).
    pub fn tokenize_2(&self, prompts: &[&str]) -> Result<Tensor, ModelError> {
        self.token_ids(prompts, self.config.pad_token_2)
    }

    fn token_ids(&self, prompts: &[&str], pad: u32) -> Result<Tensor, ModelError> {
        let tokenizer = ClipTokenizer::shared().map_err(ModelError::Config)?;
        let ids: Vec<u32> = prompts
            .iter()
            .flat_map(|p| tokenizer.encode_padded(p, pad))
            .collect();
        Tensor::from_vec(
            ids,
            (prompts.len(), crate::models::tokenizer::MAX_TOKENS),
            &self.device,
        )
        .map_err(ModelError::compute("tokenizing the prompt"))
    }

    /// The text encoders' embeddings of the prompts. SD1/SD2: the hidden states `[prompts, 77, dim]` at
    /// `clip_skip`. SDXL: both encoders' penultimate hidden states side by side (no final layer norm) and
    /// text encoder 2's pooled projection; `clip_skip` does not apply.
    pub fn encode_prompts(
        &self,
        prompts: &[&str],
        clip_skip: usize,
    ) -> Result<PromptEmbeddings, ModelError> {
        let run = ModelError::compute("encoding the prompt");
        let ids = self.tokenize(prompts)?;
        let Some(second) = &self.text_encoder_2 else {
            let context = self.text_encoder.forward(&ids, clip_skip).map_err(run)?;
            return Ok(PromptEmbeddings {
                context,
                pooled: None,
            });
        };
        let ids_2 = self.tokenize_2(prompts)?;
        (|| {
            let (first, _) = self.text_encoder.penultimate_and_pooled(&ids)?;
            let (second, pooled) = second.penultimate_and_pooled(&ids_2)?;
            Ok(PromptEmbeddings {
                context: Tensor::cat(&[&first, &second], 2)?,
                pooled,
            })
        })()
        .map_err(run)
    }

    /// The UNet's added conditions for embeddings whose rows are generated or trained at `sizes` (one per
    /// row); `None` for SD1/SD2.
    pub fn added_conditions(
        &self,
        embeddings: &PromptEmbeddings,
        sizes: &[SizeConditioning],
    ) -> Result<Option<AddedConditions>, ModelError> {
        embeddings
            .pooled
            .as_ref()
            .map(|pooled| AddedConditions::new(pooled.clone(), sizes, &self.device))
            .transpose()
            .map_err(ModelError::compute("preparing the size conditioning"))
    }

    /// The latent shape for an image size: `[1, latent_channels, height / f, width / f]`.
    pub fn latent_dims(&self, width: usize, height: usize) -> Result<[usize; 4], ModelError> {
        let factor = self.config.vae.downscale_factor();
        if width == 0
            || height == 0
            || !width.is_multiple_of(factor)
            || !height.is_multiple_of(factor)
        {
            return Err(ModelError::Config(format!(
                "the image size {width}x{height} must be a positive multiple of {factor} in both directions"
            )));
        }
        Ok([
            1,
            self.config.vae.latent_channels,
            height / factor,
            width / factor,
        ])
    }

    /// Runs the sampler from `init_noise` (standard normal, `latent_dims` shaped) and decodes the result.
    /// `on_step(done, total)` is called after every step; when it returns false the run stops with
    /// [`ModelError::Cancelled`].
    pub fn generate(
        &self,
        request: &GenerateRequest,
        init_noise: &Tensor,
        noise: &mut dyn NoiseSource,
        on_step: &mut dyn FnMut(usize, usize) -> bool,
    ) -> Result<Generated, ModelError> {
        let expected = self.latent_dims(request.width, request.height)?;
        if init_noise.dims() != expected {
            return Err(ModelError::Config(format!(
                "the initial noise has shape {:?}, but a {}x{} image needs {expected:?}",
                init_noise.dims(),
                request.width,
                request.height
            )));
        }
        if self.config.unet.in_channels != self.config.vae.latent_channels {
            return Err(ModelError::Unsupported(format!(
                "this UNet takes {} input channels (an inpainting or other special model); only text-to-image \
                 models with {} are supported",
                self.config.unet.in_channels, self.config.vae.latent_channels
            )));
        }
        let run = |e| ModelError::Compute {
            context: "generating the image".to_string(),
            source: e,
        };
        let guided = request.guidance_scale > 1.0;
        // Generation never back-propagates: detaching keeps trainable adapters from building graphs.
        let embeddings = if guided {
            self.encode_prompts(
                &[&request.negative_prompt, &request.prompt],
                request.clip_skip,
            )?
        } else {
            self.encode_prompts(&[&request.prompt], request.clip_skip)?
        }
        .detach();
        // SDXL: both halves of the guidance are conditioned on the requested size, uncropped.
        let size = SizeConditioning::uncropped(request.height, request.width);
        let added = self.added_conditions(
            &embeddings,
            &vec![size; embeddings.context.dim(0).map_err(run)?],
        )?;
        let context = embeddings.context;
        let mut sampler = request.sampler.build(&self.config.scheduler, request.steps);
        let mut latents = init_noise
            .to_device(&self.device)
            .and_then(|t| t.to_dtype(DType::F32))
            .map_err(run)?;
        latents = latents
            .affine(sampler.init_noise_sigma(), 0.0)
            .map_err(run)?;
        // Copied out: stepping a multistep sampler changes it.
        let sampler_timesteps = sampler.timesteps().to_vec();
        let total = sampler_timesteps.len();
        for (index, &t) in sampler_timesteps.iter().enumerate() {
            let output = (|| -> candle_core::Result<Tensor> {
                let batch = if guided {
                    Tensor::cat(&[&latents, &latents], 0)?
                } else {
                    latents.clone()
                };
                let input = sampler
                    .scale_model_input(&batch, index)?
                    .to_dtype(self.dtype)?;
                let timesteps = Tensor::full(t as f32, batch.dim(0)?, &self.device)?;
                let prediction = self
                    .unet
                    .forward_with(&input, &timesteps, &context, added.as_ref())?
                    .detach()
                    .to_dtype(DType::F32)?;
                if guided {
                    let uncond = prediction.narrow(0, 0, 1)?;
                    let cond = prediction.narrow(0, 1, 1)?;
                    uncond.clone() + ((cond - uncond)? * request.guidance_scale)?
                } else {
                    Ok(prediction)
                }
            })()
            .map_err(run)?;
            latents = sampler.step(&output, index, &latents, noise).map_err(run)?;
            if !on_step(index + 1, total) {
                return Err(ModelError::Cancelled);
            }
        }
        let image = self.decode(&latents)?;
        Ok(Generated { latents, image })
    }

    /// Decodes (scaled) latents to an image `[batch, 3, h, w]` in [0, 1].
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor, ModelError> {
        (|| -> candle_core::Result<Tensor> {
            let unscaled = latents
                .affine(1.0 / self.config.vae.scaling_factor, 0.0)?
                .to_dtype(self.vae_dtype)?;
            let decoded = self.vae.decode(&unscaled)?.detach().to_dtype(DType::F32)?;
            decoded.affine(0.5, 0.5)?.clamp(0f32, 1f32)
        })()
        .map_err(ModelError::compute("decoding the latents"))
    }
}

/// The adapter-capable layers of a model's UNet and text encoders with their kohya prefixes: `lora_unet` and
/// `lora_te` for SD1/SD2, `lora_unet`, `lora_te1` and `lora_te2` for SDXL (with a second text encoder).
pub fn adapter_components<'a>(
    unet: &'a UNet2DConditionModel,
    text_encoder: &'a ClipTextTransformer,
    text_encoder_2: Option<&'a ClipTextTransformer>,
) -> Vec<(&'static str, &'a LayerRegistry)> {
    std::iter::once((UNET_PREFIX, unet.layers()))
        .chain(
            text_encoders(text_encoder, text_encoder_2)
                .into_iter()
                .map(|(prefix, encoder)| (prefix, encoder.layers())),
        )
        .collect()
}

/// A model's text encoders with their kohya prefixes: `lora_te` for SD1/SD2, `lora_te1` and `lora_te2` for
/// SDXL (with a second text encoder).
fn text_encoders<'a>(
    text_encoder: &'a ClipTextTransformer,
    text_encoder_2: Option<&'a ClipTextTransformer>,
) -> Vec<(&'static str, &'a ClipTextTransformer)> {
    match text_encoder_2 {
        None => vec![(TEXT_ENCODER_PREFIX, text_encoder)],
        Some(second) => vec![
            (TEXT_ENCODER_1_PREFIX, text_encoder),
            (TEXT_ENCODER_2_PREFIX, second),
        ],
    }
}

/// Converts an image tensor `[1, 3, h, w]` in [0, 1] to 8-bit RGB, rounding as diffusers does.
pub fn to_rgb8(image: &Tensor) -> Result<image::RgbImage, ModelError> {
    let (_, channels, height, width) = image
        .dims4()
        .map_err(ModelError::compute("converting the image"))?;
    if channels != 3 {
        return Err(ModelError::Config(format!(
            "expected a 3-channel image, got {channels} channels"
        )));
    }
    let pixels: Vec<u8> = (|| -> candle_core::Result<Vec<u8>> {
        let hwc = image
            .squeeze(0)?
            .permute((1, 2, 0))?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        Ok(hwc
            .into_iter()
            .map(|v| (v * 255.0).round().clamp(0.0, 255.0) as u8)
            .collect())
    })()
    .map_err(ModelError::compute("converting the image"))?;
    image::RgbImage::from_raw(width as u32, height as u32, pixels)
        .ok_or_else(|| ModelError::Config("the decoded image has an unexpected size".to_string()))
}

/// The mean of `UNet(x) − x` for `x` = 0.5 everywhere (`[1, C, 8, 8]`) at t = 999 with a 0.5 context of two
/// tokens: about 0 for a model that predicts noise (at t = 999 the sample is nearly all noise), clearly
/// negative for one that predicts velocity.
fn test_prediction(
    unet: &UNet2DConditionModel,
    config: &ModelConfig,
    device: &Device,
    dtype: DType,
) -> Result<f64, ModelError> {
    let probe = || -> candle_core::Result<f64> {
        let x =
            Tensor::full(0.5f32, (1, config.unet.in_channels, 8, 8), device)?.to_dtype(dtype)?;
        let context = Tensor::full(0.5f32, (1, 2, config.unet.cross_attention_dim), device)?
            .to_dtype(dtype)?;
        let t = Tensor::new(&[999f32], device)?;
        let out = unet.forward(&x, &t, &context)?;
        (out - x)?
            .to_dtype(DType::F64)?
            .mean_all()?
            .to_scalar::<f64>()
    };
    probe().map_err(ModelError::compute(
        "running the test prediction that tells v-prediction from epsilon",
    ))
}
