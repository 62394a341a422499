//! The UNet's architecture description, read from a diffusers `config.json` or built by presets.
//!
//! diffusers' `attention_head_dim` historically means the *number of heads* for SD1/SD2/SDXL UNets (its
//! `num_attention_heads` falls back to it); this type stores the head count per level unambiguously.

use serde::Deserialize;

use crate::models::ModelError;

/// SDXL's added conditioning (diffusers `addition_embed_type = "text_time"`): a pooled text embedding and
/// six size values ("time ids": original height and width, crop top and left, target height and width), each
/// embedded like a timestep, go through `add_embedding` and are added to the time embedding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TextTimeEmbedding {
    /// Width of each time id's sinusoidal embedding (`addition_time_embed_dim`; 256 in SDXL).
    pub time_embed_dim: usize,
    /// Width of `add_embedding`'s input (`projection_class_embeddings_input_dim`): the pooled text embedding
    /// plus six time-id embeddings (2816 = 1280 + 6 x 256 in SDXL).
    pub input_dim: usize,
}

impl TextTimeEmbedding {
    /// How many size values condition the model.
    pub const TIME_IDS: usize = 6;

    /// Width of the pooled text embedding the model takes.
    pub fn pooled_dim(&self) -> usize {
        self.input_dim
            .saturating_sub(Self::TIME_IDS * self.time_embed_dim)
    }
}

/// Architecture of a `UNet2DConditionModel` (SD1.x / SD2.x / SDXL).
#[derive(Debug, Clone, PartialEq)]
pub struct UNetConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    /// Output channels of each resolution level, first (full resolution) to last.
    pub block_out_channels: Vec<usize>,
    /// Whether each down level has cross-attention transformers (`CrossAttnDownBlock2D`).
    pub down_attention: Vec<bool>,
    /// Whether each up level (in up-block order, lowest resolution first) has cross-attention transformers.
    pub up_attention: Vec<bool>,
    pub layers_per_block: usize,
    /// Transformer blocks inside each level's `Transformer2DModel`.
    pub transformer_layers_per_block: Vec<usize>,
    /// Attention heads of each level's transformers (the mid block uses the last level's).
    pub attention_heads: Vec<usize>,
    pub cross_attention_dim: usize,
    /// SD2: `proj_in`/`proj_out` are Linear layers; SD1: 1x1 convolutions.
    pub use_linear_projection: bool,
    pub norm_num_groups: usize,
    pub norm_eps: f64,
    /// The native latent size (64 for 512 px models, 96 for 768 px, 128 for SDXL's 1024 px).
    pub sample_size: usize,
    /// SDXL's pooled-text and size conditioning; `None` for SD1/SD2.
    pub addition: Option<TextTimeEmbedding>,
}

impl UNetConfig {
    /// Stable Diffusion 1.x (859.5 M parameters).
    pub fn sd15() -> Self {
        Self {
            in_channels: 4,
            out_channels: 4,
            block_out_channels: vec![320, 640, 1280, 1280],
            down_attention: vec![true, true, true, false],
            up_attention: vec![false, true, true, true],
            layers_per_block: 2,
            transformer_layers_per_block: vec![1; 4],
            attention_heads: vec![8; 4],
            cross_attention_dim: 768,
            use_linear_projection: false,
            norm_num_groups: 32,
            norm_eps: 1e-5,
            sample_size: 64,
            addition: None,
        }
    }

    /// Stable Diffusion 2.x (64-dimensional heads, linear projections, OpenCLIP-H context).
    pub fn sd21() -> Self {
        Self {
            attention_heads: vec![5, 10, 20, 20],
            cross_attention_dim: 1024,
            use_linear_projection: true,
            sample_size: 96,
            ..Self::sd15()
        }
    }

    /// SDXL 1.0 base (2,567,463,684 parameters): three levels, no attention at the first, 10 transformer
    /// blocks at the last, 64-dimensional heads, a 2048-wide context and the pooled-text and size conditioning.
    pub fn sdxl() -> Self {
        Self {
            block_out_channels: vec![320, 640, 1280],
            down_attention: vec![false, true, true],
            up_attention: vec![true, true, false],
            transformer_layers_per_block: vec![1, 2, 10],
            attention_heads: vec![5, 10, 20],
            cross_attention_dim: 2048,
            use_linear_projection: true,
            sample_size: 128,
            addition: Some(TextTimeEmbedding {
                time_embed_dim: 256,
                input_dim: 2816,
            }),
            ..Self::sd15()
        }
    }

    pub fn levels(&self) -> usize {
        self.block_out_channels.len()
    }

    /// Time-embedding width (4x the first level's channels).
    pub fn time_embed_dim(&self) -> usize {
        self.block_out_channels[0] * 4
    }

    /// Parses a diffusers `unet/config.json`.
    pub fn from_diffusers_json(json: &str) -> Result<Self, ModelError> {
        let raw: DiffusersUNetConfig = serde_json::from_str(json)
            .map_err(|e| ModelError::Config(format!("the UNet config is not valid: {e}")))?;
        raw.into_config()
    }

    /// Checks the invariants the model code relies on.
    pub fn validate(&self) -> Result<(), ModelError> {
        let levels = self.levels();
        let bad = |what: String| {
            Err(ModelError::Config(format!(
                "the UNet config is inconsistent: {what}"
            )))
        };
        if levels == 0 || self.layers_per_block == 0 {
            return bad("it has no levels or no layers per block".to_string());
        }
        if self.norm_num_groups == 0 {
            return bad("it has 0 groups for its norms".to_string());
        }
        for (name, len) in [
            ("down block types", self.down_attention.len()),
            ("up block types", self.up_attention.len()),
            ("attention heads", self.attention_heads.len()),
            (
                "transformer layers per block",
                self.transformer_layers_per_block.len(),
            ),
        ] {
            if len != levels {
                return bad(format!("{len} {name} for {levels} levels"));
            }
        }
        for (level, (&channels, &heads)) in self
            .block_out_channels
            .iter()
            .zip(&self.attention_heads)
            .enumerate()
        {
            if heads == 0 || channels % heads != 0 {
                return bad(format!(
                    "level {level} has {channels} channels, not divisible into {heads} heads"
                ));
            }
            if channels % self.norm_num_groups != 0 {
                return bad(format!(
                    "level {level} has {channels} channels, not divisible into {} groups",
                    self.norm_num_groups
                ));
            }
        }
        // The up blocks' resnets normalise the concatenation of their input with a skip connection.
        for width in self.up_concat_widths() {
            if width % self.norm_num_groups != 0 {
                return bad(format!(
                    "an up block concatenates {width} channels, not divisible into {} groups",
                    self.norm_num_groups
                ));
            }
        }
        if let Some(addition) = &self.addition {
            let times = TextTimeEmbedding::TIME_IDS * addition.time_embed_dim;
            if addition.time_embed_dim == 0
                || !addition.time_embed_dim.is_multiple_of(2)
                || addition.input_dim <= times
            {
                return bad(format!(
                    "its added embedding takes {} values, which is not a pooled text embedding plus {} \
                     time ids of width {}",
                    addition.input_dim,
                    TextTimeEmbedding::TIME_IDS,
                    addition.time_embed_dim
                ));
            }
        }
        Ok(())
    }

    /// The input widths of every up-block resnet (previous output plus skip connection).
    fn up_concat_widths(&self) -> Vec<usize> {
        let channels = &self.block_out_channels;
        let last = self.levels() - 1;
        let mut widths = Vec::new();
        for i in 0..self.levels() {
            let level = last - i;
            let previous = if i == 0 {
                channels[last]
            } else {
                channels[level + 1]
            };
            for j in 0..=self.layers_per_block {
                let skip = if j == self.layers_per_block {
                    channels[level.saturating_sub(1)]
                } else {
                    channels[level]
                };
                let input = if j == 0 { previous } else { channels[level] };
                widths.push(input + skip);
            }
        }
        widths
    }
}

/// The subset of diffusers' `UNet2DConditionModel` config this program reads.
#[derive(Debug, Deserialize)]
struct DiffusersUNetConfig {
    #[serde(default = "default_4")]
    in_channels: usize,
    #[serde(default = "default_4")]
    out_channels: usize,
    block_out_channels: Vec<usize>,
    down_block_types: Vec<String>,
    up_block_types: Vec<String>,
    #[serde(default = "default_2")]
    layers_per_block: usize,
    #[serde(default)]
    transformer_layers_per_block: Option<PerLevel>,
    #[serde(default)]
    attention_head_dim: Option<PerLevel>,
    #[serde(default)]
    num_attention_heads: Option<PerLevel>,
    cross_attention_dim: usize,
    #[serde(default)]
    use_linear_projection: bool,
    #[serde(default = "default_32")]
    norm_num_groups: usize,
    #[serde(default = "default_norm_eps")]
    norm_eps: f64,
    #[serde(default = "default_64")]
    sample_size: usize,
    #[serde(default)]
    addition_embed_type: Option<String>,
    #[serde(default)]
    addition_time_embed_dim: Option<usize>,
    #[serde(default)]
    projection_class_embeddings_input_dim: Option<usize>,
    #[serde(default)]
    class_embed_type: Option<String>,
    #[serde(default)]
    mid_block_type: Option<String>,
    #[serde(default)]
    only_cross_attention: Option<serde_json::Value>,
    #[serde(default)]
    dual_cross_attention: bool,
}

/// A value that diffusers stores either once for all levels or per level.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum PerLevel {
    One(usize),
    Each(Vec<usize>),
}

impl PerLevel {
    fn expand(&self, levels: usize) -> Vec<usize> {
        match self {
            PerLevel::One(v) => vec![*v; levels],
            PerLevel::Each(v) => v.clone(),
        }
    }
}

fn default_2() -> usize {
    2
}
fn default_4() -> usize {
    4
}
fn default_32() -> usize {
    32
}
fn default_64() -> usize {
    64
}
fn default_norm_eps() -> f64 {
    1e-5
}

impl DiffusersUNetConfig {
    fn into_config(self) -> Result<UNetConfig, ModelError> {
        let unsupported = |what: String| {
            Err(ModelError::Unsupported(format!(
                "this UNet uses {what}, which is not supported"
            )))
        };
        let addition = match self.addition_embed_type.as_deref() {
            None => None,
            Some("text_time") => match (
                self.addition_time_embed_dim,
                self.projection_class_embeddings_input_dim,
            ) {
                (Some(time_embed_dim), Some(input_dim)) => Some(TextTimeEmbedding {
                    time_embed_dim,
                    input_dim,
                }),
                _ => {
                    return Err(ModelError::Config(
                        "the UNet config has addition_embed_type \"text_time\" without \
                         addition_time_embed_dim and projection_class_embeddings_input_dim"
                            .to_string(),
                    ));
                }
            },
            Some(other) => return unsupported(format!("the added embedding \"{other}\"")),
        };
        if let Some(kind) = &self.class_embed_type {
            return unsupported(format!("a class embedding ({kind})"));
        }
        if let Some(kind) = self
            .mid_block_type
            .as_deref()
            .filter(|k| *k != "UNetMidBlock2DCrossAttn")
        {
            return unsupported(format!("the mid block type {kind}"));
        }
        if self.dual_cross_attention {
            return unsupported("dual cross-attention".to_string());
        }
        if let Some(v) = &self.only_cross_attention {
            let any_true = match v {
                serde_json::Value::Bool(b) => *b,
                serde_json::Value::Array(items) => items.iter().any(|i| i.as_bool() == Some(true)),
                _ => false,
            };
            if any_true {
                return unsupported("cross-attention-only transformer blocks".to_string());
            }
        }
        let levels = self.block_out_channels.len();
        let down_attention = self
            .down_block_types
            .iter()
            .map(|t| match t.as_str() {
                "CrossAttnDownBlock2D" => Ok(true),
                "DownBlock2D" => Ok(false),
                other => Err(ModelError::Unsupported(format!(
                    "the UNet down block type {other} is not supported"
                ))),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let up_attention = self
            .up_block_types
            .iter()
            .map(|t| match t.as_str() {
                "CrossAttnUpBlock2D" => Ok(true),
                "UpBlock2D" => Ok(false),
                other => Err(ModelError::Unsupported(format!(
                    "the UNet up block type {other} is not supported"
                ))),
            })
            .collect::<Result<Vec<_>, _>>()?;
        // diffusers: num_attention_heads = num_attention_heads or attention_head_dim (a historical misnomer).
        let heads = self
            .num_attention_heads
            .as_ref()
            .or(self.attention_head_dim.as_ref())
            .map(|h| h.expand(levels))
            .unwrap_or_else(|| vec![8; levels]);
        let config = UNetConfig {
            in_channels: self.in_channels,
            out_channels: self.out_channels,
            block_out_channels: self.block_out_channels,
            down_attention,
            up_attention,
            layers_per_block: self.layers_per_block,
            transformer_layers_per_block: self
                .transformer_layers_per_block
                .map(|t| t.expand(levels))
                .unwrap_or_else(|| vec![1; levels]),
            attention_heads: heads,
            cross_attention_dim: self.cross_attention_dim,
            use_linear_projection: self.use_linear_projection,
            norm_num_groups: self.norm_num_groups,
            norm_eps: self.norm_eps,
            sample_size: self.sample_size,
            addition,
        };
        config.validate()?;
        Ok(config)
    }
}
