//! The vision transformers (ViT) of CLIP and BLIP in the transformers layout (`vision_model.*`): the image is
//! cut into patches, each projected to a token, a class token and position embeddings added, then encoder
//! layers. CLIP normalises before the layers (`pre_layrnorm`) and only the class token after them
//! (`post_layernorm`); BLIP normalises the whole last sequence, which its text decoder attends to.

use candle_core::{IndexOp, Result, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;

use crate::lora::{LayerBuilder, LayerRegistry};
use crate::models::ModelError;
use crate::models::clip::ClipActivation;
use crate::models::nn::LayerNorm;
use crate::models::transformer_layer::{AttentionLayout, EncoderDims, EncoderLayer};

/// Which model family's vision tower (defaults, key names and normalisation differ).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VisionFamily {
    Clip,
    Blip,
}

/// A `vision_config` as transformers writes it; missing fields take transformers' defaults for the family.
#[derive(Debug, Clone, Default, Deserialize)]
struct StoredVisionConfig {
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    image_size: Option<usize>,
    patch_size: Option<usize>,
    hidden_act: Option<ClipActivation>,
    layer_norm_eps: Option<f64>,
}

/// Architecture of a vision tower.
#[derive(Debug, Clone, PartialEq)]
pub struct VisionConfig {
    pub family: VisionFamily,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// Side of the square input image in pixels.
    pub image_size: usize,
    pub patch_size: usize,
    pub hidden_act: ClipActivation,
    pub layer_norm_eps: f64,
}

impl VisionConfig {
    /// Reads a `vision_config` object (or `null`, meaning every default).
    pub fn from_json(
        value: Option<&serde_json::Value>,
        family: VisionFamily,
    ) -> std::result::Result<Self, ModelError> {
        let stored: StoredVisionConfig = match value {
            Some(v) if !v.is_null() => serde_json::from_value(v.clone())
                .map_err(|e| ModelError::Config(format!("the vision_config is not valid: {e}")))?,
            _ => StoredVisionConfig::default(),
        };
        let (image_size, patch_size, hidden_act) = match family {
            VisionFamily::Clip => (224, 32, ClipActivation::QuickGelu),
            VisionFamily::Blip => (384, 16, ClipActivation::Gelu),
        };
        let config = Self {
            family,
            hidden_size: stored.hidden_size.unwrap_or(768),
            intermediate_size: stored.intermediate_size.unwrap_or(3072),
            num_hidden_layers: stored.num_hidden_layers.unwrap_or(12),
            num_attention_heads: stored.num_attention_heads.unwrap_or(12),
            image_size: stored.image_size.unwrap_or(image_size),
            patch_size: stored.patch_size.unwrap_or(patch_size),
            hidden_act: stored.hidden_act.unwrap_or(hidden_act),
            layer_norm_eps: stored.layer_norm_eps.unwrap_or(1e-5),
        };
        let consistent = config.num_attention_heads > 0
            && config
                .hidden_size
                .is_multiple_of(config.num_attention_heads)
            && config.patch_size > 0
            && config.image_size.is_multiple_of(config.patch_size);
        if !consistent {
            return Err(ModelError::Config(format!(
                "the vision_config is inconsistent: hidden size {} in {} heads, image size {} in patches of {}",
                config.hidden_size,
                config.num_attention_heads,
                config.image_size,
                config.patch_size
            )));
        }
        Ok(config)
    }

    /// Patches per image side.
    fn patches_per_side(&self) -> usize {
        self.image_size / self.patch_size
    }
}

/// A ViT image encoder.
#[derive(Debug, Clone)]
pub struct VisionTransformer {
    patch_weight: Tensor,
    patch_bias: Option<Tensor>,
    class_embedding: Tensor,
    position_embedding: Tensor,
    pre_layer_norm: Option<LayerNorm>,
    layers: Vec<EncoderLayer>,
    post_layer_norm: LayerNorm,
    config: VisionConfig,
}

impl VisionTransformer {
    /// `vb` is rooted at the tower (`vision_model`).
    pub fn new(vb: VarBuilder, config: &VisionConfig) -> Result<Self> {
        let d = config.hidden_size;
        let p = config.patch_size;
        let positions = config.patches_per_side().pow(2) + 1;
        let embeddings = vb.pp("embeddings");
        let patch = embeddings.pp("patch_embedding");
        let patch_weight = patch.get((d, 3, p, p), "weight")?.reshape((d, 3 * p * p))?;
        let eps = config.layer_norm_eps;
        let (patch_bias, class_embedding, position_embedding, pre_layer_norm) = match config.family
        {
            VisionFamily::Clip => (
                None,
                embeddings.get(d, "class_embedding")?,
                embeddings
                    .pp("position_embedding")
                    .get((positions, d), "weight")?,
                Some(LayerNorm::new(vb.pp("pre_layrnorm"), d, eps)?),
            ),
            VisionFamily::Blip => (
                Some(patch.get(d, "bias")?),
                embeddings.get((1, 1, d), "class_embedding")?.reshape(d)?,
                embeddings
                    .get((1, positions, d), "position_embedding")?
                    .reshape((positions, d))?,
                None,
            ),
        };
        let layout = match config.family {
            VisionFamily::Clip => AttentionLayout::Separate,
            VisionFamily::Blip => AttentionLayout::Packed,
        };
        let dims = EncoderDims {
            hidden: d,
            intermediate: config.intermediate_size,
            heads: config.num_attention_heads,
            activation: config.hidden_act,
            layer_norm_eps: eps,
        };
        let lb = LayerBuilder::new(vb.clone(), LayerRegistry::default());
        let layers = (0..config.num_hidden_layers)
            .map(|i| EncoderLayer::new(lb.pp("encoder").pp("layers").pp(i), dims, layout))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            patch_weight,
            patch_bias,
            class_embedding,
            position_embedding,
            pre_layer_norm,
            layers,
            post_layer_norm: LayerNorm::new(vb.pp("post_layernorm"), d, eps)?,
            config: config.clone(),
        })
    }

    pub fn config(&self) -> &VisionConfig {
        &self.config
    }

    /// The token sequence after the encoder layers, `[batch, 1 + patches, hidden]` (class token first);
    /// `pixels` is `[batch, 3, image_size, image_size]`, normalised as the family's image processor does.
    fn encode(&self, pixels: &Tensor) -> Result<Tensor> {
        let (batch, channels, height, width) = pixels.dims4()?;
        let size = self.config.image_size;
        if channels != 3 || height != size || width != size {
            candle_core::bail!(
                "the vision encoder takes [batch, 3, {size}, {size}] pixels, not {:?}",
                pixels.dims()
            );
        }
        let p = self.config.patch_size;
        let side = size / p;
        let d = self.config.hidden_size;
        // [b, 3, side, p, side, p] -> [b, side, side, 3, p, p]: one row per patch, in the conv weight's order.
        let patches = pixels
            .reshape((batch, 3, side, p, side, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .reshape((batch * side * side, 3 * p * p))?;
        let mut tokens = patches.matmul(&self.patch_weight.t()?)?;
        if let Some(bias) = &self.patch_bias {
            tokens = tokens.broadcast_add(bias)?;
        }
        let tokens = tokens.reshape((batch, side * side, d))?;
        let class = self
            .class_embedding
            .reshape((1, 1, d))?
            .repeat((batch, 1, 1))?;
        let mut h = Tensor::cat(&[&class, &tokens], 1)?.broadcast_add(&self.position_embedding)?;
        if let Some(norm) = &self.pre_layer_norm {
            h = norm.forward(&h)?;
        }
        for layer in &self.layers {
            h = layer.forward(&h, None)?;
        }
        Ok(h)
    }

    /// BLIP: the whole normalised last sequence, `[batch, 1 + patches, hidden]`.
    pub fn sequence(&self, pixels: &Tensor) -> Result<Tensor> {
        self.post_layer_norm.forward(&self.encode(pixels)?)
    }

    /// CLIP: the normalised class token, `[batch, hidden]`.
    pub fn pooled(&self, pixels: &Tensor) -> Result<Tensor> {
        let h = self.encode(pixels)?;
        self.post_layer_norm.forward(&h.i((.., 0))?)
    }
}
