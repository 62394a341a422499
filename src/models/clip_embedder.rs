//! CLIP as an image-text matcher (`CLIPModel`, e.g. openai/clip-vit-large-patch14): the vision tower's
//! class token and the text tower's end-of-text token, each projected into the shared embedding space
//! (`visual_projection`, `text_projection`), where cosine similarity says how well a phrase fits an image.

use candle_core::{D, IndexOp, Result, Tensor};
use candle_nn::VarBuilder;

use crate::models::ModelError;
use crate::models::clip::{ClipTextConfig, ClipTextTransformer};
use crate::models::tokenizer::END_OF_TEXT;
use crate::models::vision::{VisionConfig, VisionFamily, VisionTransformer};

/// A `CLIPModel`'s `config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct ClipEmbedderConfig {
    pub text: ClipTextConfig,
    pub vision: VisionConfig,
    pub projection_dim: usize,
}

impl ClipEmbedderConfig {
    pub fn from_json(json: &serde_json::Value) -> std::result::Result<Self, ModelError> {
        let text = json
            .get("text_config")
            .ok_or_else(|| ModelError::Config("the CLIP config has no text_config".to_string()))?;
        let text = ClipTextConfig::from_transformers_json(&text.to_string())?;
        let vision = VisionConfig::from_json(json.get("vision_config"), VisionFamily::Clip)?;
        let projection_dim = json
            .get("projection_dim")
            .and_then(|v| v.as_u64())
            .map_or(512, |v| v as usize);
        Ok(Self {
            text,
            vision,
            projection_dim,
        })
    }
}

/// CLIP's two towers and their projections.
#[derive(Debug, Clone)]
pub struct ClipEmbedder {
    vision: VisionTransformer,
    visual_projection: Tensor,
    text: ClipTextTransformer,
    text_projection: Tensor,
}

impl ClipEmbedder {
    /// `vb` is rooted at the model (`vision_model.*`, `text_model.*`, the projections).
    pub fn new(vb: VarBuilder, config: &ClipEmbedderConfig) -> Result<Self> {
        let p = config.projection_dim;
        Ok(Self {
            vision: VisionTransformer::new(vb.pp("vision_model"), &config.vision)?,
            visual_projection: vb
                .pp("visual_projection")
                .get((p, config.vision.hidden_size), "weight")?,
            text: ClipTextTransformer::new(vb.clone(), &config.text)?,
            text_projection: vb
                .pp("text_projection")
                .get((p, config.text.hidden_size), "weight")?,
        })
    }

    /// Side of the square images the vision tower takes.
    pub fn image_size(&self) -> usize {
        self.vision.config().image_size
    }

    /// Projected image embeddings `[batch, projection]` of normalised `[batch, 3, size, size]` pixels.
    pub fn image_embeds(&self, pixels: &Tensor) -> Result<Tensor> {
        self.vision
            .pooled(pixels)?
            .matmul(&self.visual_projection.t()?)
    }

    /// Projected text embeddings `[batch, projection]` of token sequences that each start with
    /// `<|startoftext|>` and end with `<|endoftext|>` (shorter ones are padded with it; the embedding is
    /// taken at the first).
    pub fn text_embeds(&self, sequences: &[Vec<u32>]) -> Result<Tensor> {
        let length = sequences.iter().map(Vec::len).max().unwrap_or(0);
        let limit = self.text.config().max_position_embeddings;
        if length == 0 || length > limit {
            candle_core::bail!("CLIP text takes 1 to {limit} tokens, not {length}");
        }
        let mut ids = Vec::with_capacity(sequences.len() * length);
        let mut ends = Vec::with_capacity(sequences.len());
        for sequence in sequences {
            ends.push(
                sequence
                    .iter()
                    .position(|&t| t == END_OF_TEXT)
                    .unwrap_or(sequence.len() - 1),
            );
            ids.extend(sequence);
            ids.extend(std::iter::repeat_n(END_OF_TEXT, length - sequence.len()));
        }
        let device = self.text_projection.device();
        let ids = Tensor::from_vec(ids, (sequences.len(), length), device)?;
        let hidden = self.text.forward(&ids, 1)?;
        let pooled = ends
            .iter()
            .enumerate()
            .map(|(row, &end)| hidden.i((row, end)))
            .collect::<Result<Vec<_>>>()?;
        Tensor::stack(&pooled, 0)?.matmul(&self.text_projection.t()?)
    }
}

/// Rows scaled to unit length.
pub fn unit_rows(x: &Tensor) -> Result<Tensor> {
    x.broadcast_div(&x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?)
}
