//! BLIP image captioning (`BlipForConditionalGeneration`, e.g. Salesforce/blip-image-captioning-large) in
//! the transformers layout: a ViT image encoder ([`super::vision`]) and a BERT-style text decoder
//! (`text_decoder.bert.*`) whose layers attend causally to the caption so far and across to the image
//! tokens; captions are decoded from the `[DEC]` token until `[SEP]` ([`super::decoding`]: beam search or
//! greedy).

use candle_core::{DType, IndexOp, Result, Tensor};
use candle_nn::{Embedding, Linear, Module, VarBuilder};
use serde::Deserialize;

use crate::models::ModelError;
use crate::models::clip::causal_mask;
use crate::models::decoding::{Decoding, decode};
use crate::models::nn::{LayerNorm, attention};
use crate::models::ops::gelu;
use crate::models::vision::{VisionConfig, VisionFamily, VisionTransformer};

/// Architecture of the text decoder; defaults are transformers' `BlipTextConfig` defaults.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct BlipTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub encoder_hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    pub layer_norm_eps: f64,
    /// The `[DEC]` token every caption starts from.
    pub bos_token_id: u32,
    /// The `[SEP]` token that ends a caption.
    pub sep_token_id: u32,
    pub pad_token_id: u32,
}

impl Default for BlipTextConfig {
    fn default() -> Self {
        Self {
            vocab_size: 30524,
            hidden_size: 768,
            encoder_hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 8,
            max_position_embeddings: 512,
            layer_norm_eps: 1e-12,
            bos_token_id: 30522,
            sep_token_id: 102,
            pad_token_id: 0,
        }
    }
}

/// A BLIP captioning model's `config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct BlipConfig {
    pub text: BlipTextConfig,
    pub vision: VisionConfig,
}

impl BlipConfig {
    pub fn from_json(json: &serde_json::Value) -> std::result::Result<Self, ModelError> {
        let mut text: BlipTextConfig = match json.get("text_config") {
            Some(v) if !v.is_null() => serde_json::from_value(v.clone())
                .map_err(|e| ModelError::Config(format!("the text_config is not valid: {e}")))?,
            _ => BlipTextConfig::default(),
        };
        let vision = VisionConfig::from_json(json.get("vision_config"), VisionFamily::Blip)?;
        // transformers ties the decoder's cross-attention width to the vision tower, whatever is stored.
        text.encoder_hidden_size = vision.hidden_size;
        let heads_fit = text.num_attention_heads > 0
            && text.hidden_size.is_multiple_of(text.num_attention_heads);
        let ids_fit = [text.bos_token_id, text.sep_token_id, text.pad_token_id]
            .iter()
            .all(|&id| (id as usize) < text.vocab_size);
        if !heads_fit || !ids_fit {
            return Err(ModelError::Config(format!(
                "the text_config is inconsistent: hidden size {} in {} heads, special tokens {}/{}/{} in a vocabulary of {}",
                text.hidden_size,
                text.num_attention_heads,
                text.bos_token_id,
                text.sep_token_id,
                text.pad_token_id,
                text.vocab_size
            )));
        }
        Ok(Self { text, vision })
    }
}

/// How captions are decoded by default: BLIP's own captioning setting (3 beams, at least 5 tokens), with
/// room for a long sentence.
pub const DEFAULT_DECODING: Decoding = Decoding {
    min_tokens: 5,
    max_tokens: 40,
    beams: 3,
    repetition_penalty: 1.0,
};

/// Query/key/value projections and the output projection + residual layer norm of one BERT attention.
#[derive(Debug, Clone)]
struct BertAttention {
    query: Linear,
    key: Linear,
    value: Linear,
    dense: Linear,
    norm: LayerNorm,
    heads: usize,
}

impl BertAttention {
    fn new(
        vb: VarBuilder,
        hidden: usize,
        kv_hidden: usize,
        config: &BlipTextConfig,
    ) -> Result<Self> {
        let own = vb.pp("self");
        let output = vb.pp("output");
        Ok(Self {
            query: candle_nn::linear(hidden, hidden, own.pp("query"))?,
            key: candle_nn::linear(kv_hidden, hidden, own.pp("key"))?,
            value: candle_nn::linear(kv_hidden, hidden, own.pp("value"))?,
            dense: candle_nn::linear(hidden, hidden, output.pp("dense"))?,
            norm: LayerNorm::new(output.pp("LayerNorm"), hidden, config.layer_norm_eps)?,
            heads: config.num_attention_heads,
        })
    }

    fn keys_values(&self, source: &Tensor) -> Result<(Tensor, Tensor)> {
        Ok((self.key.forward(source)?, self.value.forward(source)?))
    }

    fn forward(
        &self,
        x: &Tensor,
        keys_values: &(Tensor, Tensor),
        mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let q = self.query.forward(x)?;
        let context = attention(&q, &keys_values.0, &keys_values.1, self.heads, mask)?;
        self.norm.forward(&(self.dense.forward(&context)? + x)?)
    }
}

/// One decoder layer: causal self-attention, cross-attention to the image, feed-forward; post-norm.
#[derive(Debug, Clone)]
struct DecoderLayer {
    self_attention: BertAttention,
    cross_attention: BertAttention,
    intermediate: Linear,
    output: Linear,
    output_norm: LayerNorm,
}

impl DecoderLayer {
    fn new(vb: VarBuilder, config: &BlipTextConfig) -> Result<Self> {
        let h = config.hidden_size;
        Ok(Self {
            self_attention: BertAttention::new(vb.pp("attention"), h, h, config)?,
            cross_attention: BertAttention::new(
                vb.pp("crossattention"),
                h,
                config.encoder_hidden_size,
                config,
            )?,
            intermediate: candle_nn::linear(
                h,
                config.intermediate_size,
                vb.pp("intermediate.dense"),
            )?,
            output: candle_nn::linear(config.intermediate_size, h, vb.pp("output.dense"))?,
            output_norm: LayerNorm::new(vb.pp("output.LayerNorm"), h, config.layer_norm_eps)?,
        })
    }

    fn forward(&self, x: &Tensor, image_kv: &(Tensor, Tensor), causal: &Tensor) -> Result<Tensor> {
        let own_kv = self.self_attention.keys_values(x)?;
        let x = self.self_attention.forward(x, &own_kv, Some(causal))?;
        let x = self.cross_attention.forward(&x, image_kv, None)?;
        let h = gelu(&self.intermediate.forward(&x)?)?;
        self.output_norm.forward(&(self.output.forward(&h)? + x)?)
    }
}

/// The BERT text decoder with its language-model head.
#[derive(Debug, Clone)]
struct TextDecoder {
    word_embeddings: Embedding,
    position_embeddings: Tensor,
    embeddings_norm: LayerNorm,
    layers: Vec<DecoderLayer>,
    transform: Linear,
    transform_norm: LayerNorm,
    vocab_weight: Tensor,
    vocab_bias: Tensor,
}

impl TextDecoder {
    /// `vb` is rooted at `text_decoder`.
    fn new(vb: VarBuilder, config: &BlipTextConfig) -> Result<Self> {
        let h = config.hidden_size;
        let bert = vb.pp("bert");
        let embeddings = bert.pp("embeddings");
        let word_weight = embeddings
            .pp("word_embeddings")
            .get((config.vocab_size, h), "weight")?;
        let predictions = vb.pp("cls").pp("predictions");
        // The output projection is tied to the word embeddings unless the file stores its own.
        let vocab_weight = if predictions.contains_tensor("decoder.weight") {
            predictions
                .pp("decoder")
                .get((config.vocab_size, h), "weight")?
        } else {
            word_weight.clone()
        };
        let vocab_bias = if predictions.contains_tensor("bias") {
            predictions.get(config.vocab_size, "bias")?
        } else {
            predictions.pp("decoder").get(config.vocab_size, "bias")?
        };
        let layers = (0..config.num_hidden_layers)
            .map(|i| DecoderLayer::new(bert.pp("encoder").pp("layer").pp(i), config))
            .collect::<Result<Vec<_>>>()?;
        let transform = predictions.pp("transform");
        Ok(Self {
            word_embeddings: Embedding::new(word_weight, h),
            position_embeddings: embeddings
                .pp("position_embeddings")
                .get((config.max_position_embeddings, h), "weight")?,
            embeddings_norm: LayerNorm::new(embeddings.pp("LayerNorm"), h, config.layer_norm_eps)?,
            layers,
            transform: candle_nn::linear(h, h, transform.pp("dense"))?,
            transform_norm: LayerNorm::new(transform.pp("LayerNorm"), h, config.layer_norm_eps)?,
            vocab_weight,
            vocab_bias,
        })
    }

    /// Logits of the token after each of `sequences` (of equal length), `[sequences, vocabulary]`, given
    /// each layer's image keys/values (with one row per sequence).
    fn next_logits(&self, sequences: &[Vec<u32>], image_kv: &[(Tensor, Tensor)]) -> Result<Tensor> {
        let device = self.position_embeddings.device();
        let tokens = sequences.first().map_or(0, Vec::len);
        let ids = Tensor::new(sequences.concat(), device)?.reshape((sequences.len(), tokens))?;
        let h = self
            .word_embeddings
            .forward(&ids)?
            .broadcast_add(&self.position_embeddings.i(0..tokens)?)?;
        let mut h = self.embeddings_norm.forward(&h)?;
        let causal = causal_mask(tokens, device)?;
        for (layer, kv) in self.layers.iter().zip(image_kv) {
            h = layer.forward(&h, kv, &causal)?;
        }
        let last = h.i((.., tokens - 1..tokens, ..))?;
        let last = self
            .transform_norm
            .forward(&gelu(&self.transform.forward(&last)?)?)?
            .squeeze(1)?;
        last.matmul(&self.vocab_weight.t()?)?
            .broadcast_add(&self.vocab_bias)
    }
}

/// A BLIP captioning model.
#[derive(Debug, Clone)]
pub struct BlipCaptioner {
    vision: VisionTransformer,
    decoder: TextDecoder,
    config: BlipConfig,
}

impl BlipCaptioner {
    /// `vb` is rooted at the model (`vision_model.*`, `text_decoder.*`).
    pub fn new(vb: VarBuilder, config: &BlipConfig) -> Result<Self> {
        Ok(Self {
            vision: VisionTransformer::new(vb.pp("vision_model"), &config.vision)?,
            decoder: TextDecoder::new(vb.pp("text_decoder"), &config.text)?,
            config: config.clone(),
        })
    }

    pub fn config(&self) -> &BlipConfig {
        &self.config
    }

    /// The image tokens the decoder attends to, `[batch, 1 + patches, vision hidden]`.
    pub fn image_embeds(&self, pixels: &Tensor) -> Result<Tensor> {
        self.vision.sequence(pixels)
    }

    /// The caption of one image (`pixels`: `[1, 3, size, size]`): the token ids from `[DEC]` up to and
    /// including `[SEP]` (or the length limit).
    pub fn caption_ids(&self, pixels: &Tensor, decoding: &Decoding) -> Result<Vec<u32>> {
        let image = self.image_embeds(pixels)?;
        let text = &self.config.text;
        let decoding = Decoding {
            max_tokens: decoding
                .max_tokens
                .min(text.max_position_embeddings.saturating_sub(1)),
            ..*decoding
        };
        let image_kv = self
            .decoder
            .layers
            .iter()
            .map(|layer| layer.cross_attention.keys_values(&image))
            .collect::<Result<Vec<_>>>()?;
        // The same keys/values with a row for every sequence a step decodes.
        let mut rows_kv = image_kv.clone();
        decode(
            &[text.bos_token_id],
            text.sep_token_id,
            &decoding,
            |sequences| {
                let rows = sequences.len();
                if rows_kv
                    .first()
                    .is_some_and(|(k, _)| k.dim(0).ok() != Some(rows))
                {
                    let repeat = |t: &Tensor| t.repeat((rows, 1, 1));
                    rows_kv = image_kv
                        .iter()
                        .map(|(k, v)| Ok((repeat(k)?, repeat(v)?)))
                        .collect::<Result<_>>()?;
                }
                self.decoder
                    .next_logits(sequences, &rows_kv)?
                    .to_dtype(DType::F32)?
                    .to_vec2::<f32>()
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cross_attention_width_follows_the_vision_tower() {
        let json = serde_json::json!({
            "text_config": {"encoder_hidden_size": 768, "num_attention_heads": 12},
            "vision_config": {"hidden_size": 1024, "num_attention_heads": 16},
        });
        let config = BlipConfig::from_json(&json).unwrap();
        assert_eq!(config.text.encoder_hidden_size, 1024);
        assert_eq!(
            (config.vision.image_size, config.vision.patch_size),
            (384, 16)
        );
        assert_eq!(config.text.bos_token_id, 30522);
    }

    #[test]
    fn special_tokens_outside_the_vocabulary_are_refused() {
        let json = serde_json::json!({"text_config": {"vocab_size": 100}});
        let message = BlipConfig::from_json(&json).unwrap_err().to_string();
        assert!(message.contains("in a vocabulary of 100"), "{message}");
    }
}
