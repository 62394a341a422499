//! The CLIP text encoder in the transformers layout (`text_model.encoder.layers.N.self_attn.q_proj`): OpenAI
//! CLIP ViT-L/14 for SD1 and as SDXL's first encoder, OpenCLIP ViT-H (loaded up to its penultimate layer) for
//! SD2, and OpenCLIP ViT-bigG with its pooled-output projection (`CLIPTextModelWithProjection`) as SDXL's
//! second encoder.

use std::sync::Arc;

use candle_core::{DType, Device, IndexOp, Result, Tensor};
use candle_nn::{Embedding, Module};
use serde::Deserialize;

use crate::lora::{AdaptableLinear, AdapterSlot, LayerBuilder, LayerRegistry};
use crate::models::ModelError;
use crate::models::nn::LayerNorm;
use crate::models::transformer_layer::{AttentionLayout, EncoderDims, EncoderLayer};

/// The activation of the MLPs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClipActivation {
    /// `x · sigmoid(1.702x)` (OpenAI CLIP).
    QuickGelu,
    /// Exact (erf) GELU (OpenCLIP).
    Gelu,
}

/// Architecture of a CLIP text transformer.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ClipTextConfig {
    #[serde(default = "default_vocab")]
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default = "default_positions")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_activation")]
    pub hidden_act: ClipActivation,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
}

fn default_vocab() -> usize {
    49408
}
fn default_positions() -> usize {
    77
}
fn default_activation() -> ClipActivation {
    ClipActivation::QuickGelu
}
fn default_eps() -> f64 {
    1e-5
}

impl ClipTextConfig {
    /// OpenAI CLIP ViT-L/14, SD1's text encoder.
    pub fn sd1() -> Self {
        Self {
            vocab_size: 49408,
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            max_position_embeddings: 77,
            hidden_act: ClipActivation::QuickGelu,
            layer_norm_eps: 1e-5,
        }
    }

    /// OpenCLIP ViT-H/14 up to its penultimate layer (23 of 24), SD2's text encoder.
    pub fn sd2() -> Self {
        Self {
            hidden_size: 1024,
            intermediate_size: 4096,
            num_hidden_layers: 23,
            num_attention_heads: 16,
            hidden_act: ClipActivation::Gelu,
            ..Self::sd1()
        }
    }

    /// The sizes of one encoder layer.
    pub fn encoder_dims(&self) -> EncoderDims {
        EncoderDims {
            hidden: self.hidden_size,
            intermediate: self.intermediate_size,
            heads: self.num_attention_heads,
            activation: self.hidden_act,
            layer_norm_eps: self.layer_norm_eps,
        }
    }

    /// Parses a transformers `text_encoder/config.json`.
    pub fn from_transformers_json(json: &str) -> std::result::Result<Self, ModelError> {
        let config: Self = serde_json::from_str(json).map_err(|e| {
            ModelError::Config(format!("the text encoder config is not valid: {e}"))
        })?;
        if config.num_attention_heads == 0
            || !config
                .hidden_size
                .is_multiple_of(config.num_attention_heads)
        {
            return Err(ModelError::Config(format!(
                "the text encoder config is inconsistent: hidden size {} is not divisible into {} heads",
                config.hidden_size, config.num_attention_heads
            )));
        }
        Ok(config)
    }
}

/// SDXL's second text encoder (OpenCLIP ViT-bigG/14): a CLIP text transformer whose pooled output is
/// projected (`text_projection`, no bias).
#[derive(Debug, Clone, PartialEq)]
pub struct TextEncoder2Config {
    pub text: ClipTextConfig,
    /// Width of the projected pooled embedding (1280 for bigG).
    pub projection_dim: usize,
}

impl TextEncoder2Config {
    /// OpenCLIP ViT-bigG/14 as SDXL uses it: all 32 layers (the last one feeds the pooled output).
    pub fn sdxl() -> Self {
        Self {
            text: ClipTextConfig {
                hidden_size: 1280,
                intermediate_size: 5120,
                num_hidden_layers: 32,
                num_attention_heads: 20,
                hidden_act: ClipActivation::Gelu,
                ..ClipTextConfig::sd1()
            },
            projection_dim: 1280,
        }
    }

    /// Parses a transformers `text_encoder_2/config.json` (`CLIPTextModelWithProjection`).
    pub fn from_transformers_json(json: &str) -> std::result::Result<Self, ModelError> {
        #[derive(Deserialize)]
        struct Projection {
            projection_dim: Option<usize>,
        }
        let text = ClipTextConfig::from_transformers_json(json)?;
        let projection: Projection = serde_json::from_str(json).map_err(|e| {
            ModelError::Config(format!("the text encoder 2 config is not valid: {e}"))
        })?;
        Ok(Self {
            // transformers' default
            projection_dim: projection.projection_dim.unwrap_or(512),
            text,
        })
    }
}

/// The CLIP text transformer (embeddings, encoder layers, final layer norm), and for SDXL's second encoder
/// the projection of its pooled output.
#[derive(Debug, Clone)]
pub struct ClipTextTransformer {
    token_embedding: Embedding,
    position_embedding: Tensor,
    layers: Vec<EncoderLayer>,
    final_layer_norm: LayerNorm,
    text_projection: Option<AdaptableLinear>,
    config: ClipTextConfig,
    registry: LayerRegistry,
}

impl ClipTextTransformer {
    /// `vb` is rooted at the text encoder (its tensors are `text_model.…`).
    pub fn new(vb: candle_nn::VarBuilder, config: &ClipTextConfig) -> Result<Self> {
        Self::build(vb, config, None)
    }

    /// SDXL's second text encoder, with `text_projection` (rooted like [`new`](Self::new); the projection is
    /// `text_projection.weight`).
    pub fn with_projection(vb: candle_nn::VarBuilder, config: &TextEncoder2Config) -> Result<Self> {
        Self::build(vb, &config.text, Some(config.projection_dim))
    }

    fn build(
        vb: candle_nn::VarBuilder,
        config: &ClipTextConfig,
        projection_dim: Option<usize>,
    ) -> Result<Self> {
        let registry = LayerRegistry::default();
        let root = LayerBuilder::new(vb, registry.clone());
        let lb = root.pp("text_model");
        let embeddings = lb.vb().pp("embeddings");
        let token_weight = embeddings
            .pp("token_embedding")
            .get((config.vocab_size, config.hidden_size), "weight")?;
        let position_embedding = embeddings.pp("position_embedding").get(
            (config.max_position_embeddings, config.hidden_size),
            "weight",
        )?;
        let layers = (0..config.num_hidden_layers)
            .map(|i| {
                EncoderLayer::new(
                    lb.pp("encoder").pp("layers").pp(i),
                    config.encoder_dims(),
                    AttentionLayout::Separate,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let final_layer_norm = LayerNorm::new(
            lb.vb().pp("final_layer_norm"),
            config.hidden_size,
            config.layer_norm_eps,
        )?;
        let text_projection = projection_dim
            .map(|dim| {
                root.pp("text_projection")
                    .linear(config.hidden_size, dim, false)
            })
            .transpose()?;
        Ok(Self {
            token_embedding: Embedding::new(token_weight, config.hidden_size),
            position_embedding,
            layers,
            final_layer_norm,
            text_projection,
            config: config.clone(),
            registry,
        })
    }

    pub fn config(&self) -> &ClipTextConfig {
        &self.config
    }

    pub fn layers(&self) -> &LayerRegistry {
        &self.registry
    }

    /// The layers kohya sd-scripts trains: the attention projections and MLPs of the encoder layers
    /// (`CLIPAttention`, `CLIPMLP`), not `text_projection`.
    pub fn lora_targets(&self) -> Vec<Arc<AdapterSlot>> {
        self.registry
            .slots()
            .into_iter()
            .filter(|slot| slot.name().contains(".encoder.layers."))
            .collect()
    }

    /// Token embeddings plus positions, and the causal mask, for `input_ids` `[batch, tokens]`.
    fn embed(&self, input_ids: &Tensor) -> Result<(Tensor, Tensor)> {
        let (_, tokens) = input_ids.dims2()?;
        let ids = input_ids.to_dtype(DType::U32)?;
        let positions = self.position_embedding.i(0..tokens)?;
        let h = self
            .token_embedding
            .forward(&ids)?
            .broadcast_add(&positions)?;
        let mask = causal_mask(tokens, h.device())?;
        Ok((h, mask))
    }

    /// Encodes token ids `[batch, tokens]` to the hidden states the UNet is conditioned on.
    ///
    /// `clip_skip` follows A1111/kohya: 1 uses the last layer, 2 the penultimate (then the final layer norm),
    /// and so on.
    pub fn forward(&self, input_ids: &Tensor, clip_skip: usize) -> Result<Tensor> {
        let (mut h, mask) = self.embed(input_ids)?;
        let used_layers = self
            .layers
            .len()
            .saturating_sub(clip_skip.max(1) - 1)
            .max(1);
        for layer in &self.layers[..used_layers] {
            h = layer.forward(&h, Some(&mask))?;
        }
        self.final_layer_norm.forward(&h)
    }

    /// What SDXL conditions on: the hidden states that enter the last layer (transformers'
    /// `hidden_states[-2]`), without the final layer norm; and, for an encoder with a projection, the pooled
    /// embedding `text_projection(final_layer_norm(last layer's output)[eos])`, where `eos` is the position
    /// of each row's largest id (`<|endoftext|>`, the first of them), as transformers and open_clip take it.
    pub fn penultimate_and_pooled(&self, input_ids: &Tensor) -> Result<(Tensor, Option<Tensor>)> {
        let (mut h, mask) = self.embed(input_ids)?;
        let Some((last, earlier)) = self.layers.split_last() else {
            candle_core::bail!("the text encoder has no layers");
        };
        for layer in earlier {
            h = layer.forward(&h, Some(&mask))?;
        }
        let Some(projection) = &self.text_projection else {
            return Ok((h, None));
        };
        let out = self
            .final_layer_norm
            .forward(&last.forward(&h, Some(&mask))?)?;
        let (batch, tokens, hidden) = out.dims3()?;
        let rows: Vec<u32> = input_ids
            .to_dtype(DType::U32)?
            .to_vec2::<u32>()?
            .iter()
            .enumerate()
            .map(|(row, ids)| (row * tokens + end_of_text_position(ids)) as u32)
            .collect();
        let rows = Tensor::from_vec(rows, batch, out.device())?;
        let pooled = out
            .reshape((batch * tokens, hidden))?
            .index_select(&rows, 0)?;
        Ok((h, Some(projection.forward(&pooled)?)))
    }
}

/// The position of the first largest id of a token sequence (its `<|endoftext|>`).
fn end_of_text_position(ids: &[u32]) -> usize {
    ids.iter()
        .enumerate()
        .fold((0, 0), |(best, best_id), (i, &id)| {
            if id > best_id {
                (i, id)
            } else {
                (best, best_id)
            }
        })
        .0
}

/// `[tokens, tokens]`, zero on and below the diagonal and -inf above it.
pub(crate) fn causal_mask(tokens: usize, device: &Device) -> Result<Tensor> {
    let values: Vec<f32> = (0..tokens)
        .flat_map(|i| (0..tokens).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(values, (tokens, tokens), device)
}
