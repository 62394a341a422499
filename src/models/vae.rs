//! `AutoencoderKL`, the VAE that maps images to Stable Diffusion's latents (encoder, for training data) and
//! back (decoder, for previews), in the diffusers module layout.

use candle_core::{D, Result, Tensor};
use serde::Deserialize;

use crate::lora::{AdaptableConv2d, AdaptableLinear, LayerBuilder, LayerRegistry};
use crate::models::ModelError;
use crate::models::nn::{GroupNorm, attention};
use crate::models::resnet::{ResnetBlock2D, ResnetShape};

/// Architecture of an `AutoencoderKL`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct VaeConfig {
    #[serde(default = "default_3")]
    pub in_channels: usize,
    #[serde(default = "default_3")]
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    #[serde(default = "default_2")]
    pub layers_per_block: usize,
    #[serde(default = "default_4")]
    pub latent_channels: usize,
    #[serde(default = "default_32")]
    pub norm_num_groups: usize,
    /// Latents are `scaling_factor · sample` (0.18215 for SD1/SD2, 0.13025 for SDXL).
    #[serde(default = "default_scaling_factor")]
    pub scaling_factor: f64,
    /// diffusers' `force_upcast` (default true): the SDXL pipeline runs a VAE with this set in f32 when the
    /// model is in f16, since SDXL's VAE overflows f16.
    #[serde(default = "default_true")]
    pub force_upcast: bool,
}

fn default_2() -> usize {
    2
}
fn default_3() -> usize {
    3
}
fn default_4() -> usize {
    4
}
fn default_32() -> usize {
    32
}
fn default_scaling_factor() -> f64 {
    0.18215
}
fn default_true() -> bool {
    true
}

/// The latent scaling of SDXL's VAE.
pub const SDXL_SCALING_FACTOR: f64 = 0.13025;

impl VaeConfig {
    /// The SD1/SD2 VAE (128/256/512/512 channels, 8x downsampling).
    pub fn sd() -> Self {
        Self {
            in_channels: 3,
            out_channels: 3,
            block_out_channels: vec![128, 256, 512, 512],
            layers_per_block: 2,
            latent_channels: 4,
            norm_num_groups: 32,
            scaling_factor: 0.18215,
            force_upcast: true,
        }
    }

    pub fn from_diffusers_json(json: &str) -> std::result::Result<Self, ModelError> {
        let config: Self = serde_json::from_str(json)
            .map_err(|e| ModelError::Config(format!("the VAE config is not valid: {e}")))?;
        config.validate()?;
        Ok(config)
    }

    /// Checks that the VAE can be built from this config: every size the layers take is positive and the
    /// channels split into the norm groups.
    pub fn validate(&self) -> std::result::Result<(), ModelError> {
        let bad = |what: String| {
            Err(ModelError::Config(format!(
                "the VAE config is inconsistent: {what}"
            )))
        };
        let levels = self.block_out_channels.len();
        if levels == 0 {
            return bad("it has no levels (block_out_channels is empty)".to_string());
        }
        if levels > MAX_VAE_LEVELS {
            return bad(format!(
                "{levels} levels is more than the {MAX_VAE_LEVELS} a VAE can have"
            ));
        }
        for (what, size) in [
            ("input channels", self.in_channels),
            ("output channels", self.out_channels),
            ("latent channels", self.latent_channels),
            ("layers per block", self.layers_per_block),
            ("norm groups", self.norm_num_groups),
        ] {
            if size == 0 {
                return bad(format!("it has 0 {what}"));
            }
        }
        for (level, &channels) in self.block_out_channels.iter().enumerate() {
            if channels == 0 {
                return bad(format!("level {level} has 0 channels"));
            }
            if !channels.is_multiple_of(self.norm_num_groups) {
                return bad(format!(
                    "level {level} has {channels} channels, not divisible into {} groups",
                    self.norm_num_groups
                ));
            }
        }
        if !(self.scaling_factor.is_finite() && self.scaling_factor > 0.0) {
            return bad(format!(
                "its scaling factor {} is not a positive number",
                self.scaling_factor
            ));
        }
        Ok(())
    }

    /// How many pixels one latent cell covers along each side.
    pub fn downscale_factor(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }
}

const VAE_EPS: f64 = 1e-6;

/// Each level halves the image; past this many the downscale factor would not fit in a `usize`.
const MAX_VAE_LEVELS: usize = 16;

/// The VAE's single-head self-attention over pixels (mid block).
#[derive(Debug, Clone)]
struct PixelAttention {
    group_norm: GroupNorm,
    to_q: AdaptableLinear,
    to_k: AdaptableLinear,
    to_v: AdaptableLinear,
    to_out: AdaptableLinear,
}

impl PixelAttention {
    fn new(lb: LayerBuilder, channels: usize, groups: usize) -> Result<Self> {
        Ok(Self {
            group_norm: GroupNorm::new(lb.vb().pp("group_norm"), groups, channels, VAE_EPS)?,
            to_q: lb.pp("to_q").linear(channels, channels, true)?,
            to_k: lb.pp("to_k").linear(channels, channels, true)?,
            to_v: lb.pp("to_v").linear(channels, channels, true)?,
            to_out: lb.pp("to_out").pp("0").linear(channels, channels, true)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (batch, channels, height, width) = x.dims4()?;
        let h = self
            .group_norm
            .forward(x)?
            .reshape((batch, channels, height * width))?
            .transpose(1, 2)?;
        let attended = attention(
            &self.to_q.forward(&h)?,
            &self.to_k.forward(&h)?,
            &self.to_v.forward(&h)?,
            1,
            None,
        )?;
        let out = self
            .to_out
            .forward(&attended)?
            .transpose(1, 2)?
            .reshape((batch, channels, height, width))?;
        out + x
    }
}

/// `UNetMidBlock2D`: resnet, attention, resnet.
#[derive(Debug, Clone)]
struct VaeMidBlock {
    first: ResnetBlock2D,
    attention: PixelAttention,
    second: ResnetBlock2D,
}

impl VaeMidBlock {
    fn new(lb: LayerBuilder, channels: usize, groups: usize) -> Result<Self> {
        let shape = resnet_shape(channels, channels, groups);
        Ok(Self {
            first: ResnetBlock2D::new(lb.pp("resnets").pp(0), shape)?,
            attention: PixelAttention::new(lb.pp("attentions").pp(0), channels, groups)?,
            second: ResnetBlock2D::new(lb.pp("resnets").pp(1), shape)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.first.forward(x, None)?;
        let h = self.attention.forward(&h)?;
        self.second.forward(&h, None)
    }
}

fn resnet_shape(in_channels: usize, out_channels: usize, groups: usize) -> ResnetShape {
    ResnetShape {
        in_channels,
        out_channels,
        temb_channels: None,
        groups,
        eps: VAE_EPS,
    }
}

/// One resolution level: resnets and an optional resampler conv.
#[derive(Debug, Clone)]
struct VaeLevel {
    resnets: Vec<ResnetBlock2D>,
    resample: Option<AdaptableConv2d>,
}

#[derive(Debug, Clone)]
struct Encoder {
    conv_in: AdaptableConv2d,
    down: Vec<VaeLevel>,
    mid: VaeMidBlock,
    norm_out: GroupNorm,
    conv_out: AdaptableConv2d,
}

impl Encoder {
    fn new(lb: LayerBuilder, config: &VaeConfig) -> Result<Self> {
        let channels = &config.block_out_channels;
        let groups = config.norm_num_groups;
        let conv_in = lb
            .pp("conv_in")
            .conv2d(config.in_channels, channels[0], 3, 1, 1)?;
        let mut down = Vec::with_capacity(channels.len());
        for (i, &out) in channels.iter().enumerate() {
            let block = lb.pp("down_blocks").pp(i);
            let mut input = if i == 0 { channels[0] } else { channels[i - 1] };
            let mut resnets = Vec::with_capacity(config.layers_per_block);
            for j in 0..config.layers_per_block {
                resnets.push(ResnetBlock2D::new(
                    block.pp("resnets").pp(j),
                    resnet_shape(input, out, groups),
                )?);
                input = out;
            }
            let resample = (i + 1 < channels.len())
                .then(|| {
                    block
                        .pp("downsamplers")
                        .pp(0)
                        .pp("conv")
                        .conv2d(out, out, 3, 2, 0)
                })
                .transpose()?;
            down.push(VaeLevel { resnets, resample });
        }
        let last = *channels.last().unwrap_or(&channels[0]);
        Ok(Self {
            conv_in,
            down,
            mid: VaeMidBlock::new(lb.pp("mid_block"), last, groups)?,
            norm_out: GroupNorm::new(lb.vb().pp("conv_norm_out"), groups, last, VAE_EPS)?,
            conv_out: lb
                .pp("conv_out")
                .conv2d(last, 2 * config.latent_channels, 3, 1, 1)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.conv_in.forward(x)?;
        for level in &self.down {
            for resnet in &level.resnets {
                h = resnet.forward(&h, None)?;
            }
            if let Some(conv) = &level.resample {
                // diffusers pads right and bottom by one, then convolves with stride 2 and no padding.
                h = conv.forward(&h.pad_with_zeros(D::Minus1, 0, 1)?.pad_with_zeros(
                    D::Minus2,
                    0,
                    1,
                )?)?;
            }
        }
        let h = self.mid.forward(&h)?;
        self.conv_out.forward(&self.norm_out.forward(&h)?.silu()?)
    }
}

#[derive(Debug, Clone)]
struct Decoder {
    conv_in: AdaptableConv2d,
    mid: VaeMidBlock,
    up: Vec<VaeLevel>,
    norm_out: GroupNorm,
    conv_out: AdaptableConv2d,
}

impl Decoder {
    fn new(lb: LayerBuilder, config: &VaeConfig) -> Result<Self> {
        let reversed: Vec<usize> = config.block_out_channels.iter().rev().copied().collect();
        let groups = config.norm_num_groups;
        let conv_in = lb
            .pp("conv_in")
            .conv2d(config.latent_channels, reversed[0], 3, 1, 1)?;
        let mid = VaeMidBlock::new(lb.pp("mid_block"), reversed[0], groups)?;
        let mut up = Vec::with_capacity(reversed.len());
        let mut input = reversed[0];
        for (i, &out) in reversed.iter().enumerate() {
            let block = lb.pp("up_blocks").pp(i);
            let mut resnets = Vec::with_capacity(config.layers_per_block + 1);
            for j in 0..=config.layers_per_block {
                resnets.push(ResnetBlock2D::new(
                    block.pp("resnets").pp(j),
                    resnet_shape(input, out, groups),
                )?);
                input = out;
            }
            let resample = (i + 1 < reversed.len())
                .then(|| {
                    block
                        .pp("upsamplers")
                        .pp(0)
                        .pp("conv")
                        .conv2d(out, out, 3, 1, 1)
                })
                .transpose()?;
            up.push(VaeLevel { resnets, resample });
        }
        let first = config.block_out_channels[0];
        Ok(Self {
            conv_in,
            mid,
            up,
            norm_out: GroupNorm::new(lb.vb().pp("conv_norm_out"), groups, first, VAE_EPS)?,
            conv_out: lb
                .pp("conv_out")
                .conv2d(first, config.out_channels, 3, 1, 1)?,
        })
    }

    fn forward(&self, z: &Tensor) -> Result<Tensor> {
        let mut h = self.mid.forward(&self.conv_in.forward(z)?)?;
        for level in &self.up {
            for resnet in &level.resnets {
                h = resnet.forward(&h, None)?;
            }
            if let Some(conv) = &level.resample {
                let (_, _, height, width) = h.dims4()?;
                h = conv.forward(&h.upsample_nearest2d(height * 2, width * 2)?)?;
            }
        }
        self.conv_out.forward(&self.norm_out.forward(&h)?.silu()?)
    }
}

/// The mean and log-variance of the latent distribution of an image.
#[derive(Debug, Clone)]
pub struct LatentDistribution {
    pub mean: Tensor,
    /// Clamped to [-30, 20] as diffusers does.
    pub logvar: Tensor,
}

impl LatentDistribution {
    /// `mean + std · noise`, with `noise` shaped like the mean.
    pub fn sample_with(&self, noise: &Tensor) -> Result<Tensor> {
        self.mean
            .broadcast_add(&(self.logvar.affine(0.5, 0.0)?.exp()? * noise)?)
    }
}

/// The Stable Diffusion VAE.
#[derive(Debug, Clone)]
pub struct AutoencoderKL {
    encoder: Encoder,
    quant_conv: AdaptableConv2d,
    post_quant_conv: AdaptableConv2d,
    decoder: Decoder,
    config: VaeConfig,
    layers: LayerRegistry,
}

impl AutoencoderKL {
    pub fn new(vb: candle_nn::VarBuilder, config: &VaeConfig) -> Result<Self> {
        let layers = LayerRegistry::default();
        let lb = LayerBuilder::new(vb, layers.clone());
        let latent2 = 2 * config.latent_channels;
        Ok(Self {
            encoder: Encoder::new(lb.pp("encoder"), config)?,
            quant_conv: lb.pp("quant_conv").conv2d(latent2, latent2, 1, 1, 0)?,
            post_quant_conv: lb.pp("post_quant_conv").conv2d(
                config.latent_channels,
                config.latent_channels,
                1,
                1,
                0,
            )?,
            decoder: Decoder::new(lb.pp("decoder"), config)?,
            config: config.clone(),
            layers,
        })
    }

    pub fn config(&self) -> &VaeConfig {
        &self.config
    }

    pub fn layers(&self) -> &LayerRegistry {
        &self.layers
    }

    /// Encodes images in [-1, 1] (`[batch, 3, h, w]`) to the (unscaled) latent distribution.
    pub fn encode(&self, images: &Tensor) -> Result<LatentDistribution> {
        let moments = self.quant_conv.forward(&self.encoder.forward(images)?)?;
        let latent = self.config.latent_channels;
        Ok(LatentDistribution {
            mean: moments.narrow(1, 0, latent)?,
            logvar: moments.narrow(1, latent, latent)?.clamp(-30f32, 20f32)?,
        })
    }

    /// Decodes unscaled latents to images in roughly [-1, 1].
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        self.decoder
            .forward(&self.post_quant_conv.forward(latents)?)
    }
}
