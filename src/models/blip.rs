//! BLIP image captioning (`BlipForConditionalGeneration`, e.g. Salesforce/blip-image-captioning-large) in
//! the transformers layout: a ViT image encoder ([`super::vision`]) and a BERT-style text decoder
//! (`text_decoder.bert.*`) whose layers attend causally to the caption so far and across to the image
//! tokens; captions are decoded from the `[DEC]` token until `[SEP]` ([`super::decoding`]: beam search or
//! greedy).

use candle_core::{DType, IndexOp, Result, Tensor};
use candle_nn::{Embedding, Linear, Module, VarBuilder};
use serde::Deserialize;

use crate::kernels::frozen_linear;
use crate::kernels::gelu;
use crate::models::ModelError;
use crate::models::clip::causal_mask;
use crate::models::decoding::{Decoding, decode};
use crate::models::nn::{LayerNorm, attention};
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

/// `layer` over every row of `x` in one product; the few rows of a decoding step read the weight directly
/// instead of repacking it.
fn project(layer: &Linear, x: &Tensor) -> Result<Tensor> {
    let y = frozen_linear(x, layer.weight())?;
    match layer.bias() {
        Some(bias) => y.broadcast_add(bias),
        None => Ok(y),
    }
}

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
        Ok((project(&self.key, source)?, project(&self.value, source)?))
    }

    fn forward(
        &self,
        x: &Tensor,
        keys_values: &(Tensor, Tensor),
        mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let q = project(&self.query, x)?;
        let context = attention(&q, &keys_values.0, &keys_values.1, self.heads, mask)?;
        self.norm.forward(&(project(&self.dense, &context)? + x)?)
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

    /// The layer's output for the tokens `x` and its self-attention keys/values over the whole sequence:
    /// `past` holds those of the tokens before `x` (then `x` is one token and needs no mask), else `causal`
    /// masks the future.
    fn forward(
        &self,
        x: &Tensor,
        image_kv: &(Tensor, Tensor),
        past: Option<&(Tensor, Tensor)>,
        causal: Option<&Tensor>,
    ) -> Result<(Tensor, (Tensor, Tensor))> {
        let (k, v) = self.self_attention.keys_values(x)?;
        let own_kv = match past {
            Some((past_k, past_v)) => (
                Tensor::cat(&[past_k, &k], 1)?,
                Tensor::cat(&[past_v, &v], 1)?,
            ),
            None => (k, v),
        };
        let x = self.self_attention.forward(x, &own_kv, causal)?;
        let x = self.cross_attention.forward(&x, image_kv, None)?;
        let h = gelu(&project(&self.intermediate, &x)?)?;
        let out = self
            .output_norm
            .forward(&(project(&self.output, &h)? + x)?)?;
        Ok((out, own_kv))
    }
}

/// Each decoder layer's self-attention keys/values for the sequences of the last step, so that the next
/// step, whose sequences each extend one of them by a token, computes only the new tokens.
#[derive(Debug, Default)]
struct SelfAttentionCache {
    sequences: Vec<Vec<u32>>,
    layers: Vec<(Tensor, Tensor)>,
}

impl SelfAttentionCache {
    /// For each of `sequences`, the cached row it extends by one token; `None` when one extends none.
    fn parents(&self, sequences: &[Vec<u32>]) -> Option<Vec<u32>> {
        sequences
            .iter()
            .map(|sequence| {
                let (_, prefix) = sequence.split_last()?;
                let row = self.sequences.iter().position(|cached| cached == prefix)?;
                Some(row as u32)
            })
            .collect()
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
    /// each layer's image keys/values (with one row per sequence). Sequences that extend those of the
    /// last call by one token reuse `cache` and compute only that token.
    fn next_logits(
        &self,
        sequences: &[Vec<u32>],
        image_kv: &[(Tensor, Tensor)],
        cache: &mut SelfAttentionCache,
    ) -> Result<Tensor> {
        let device = self.position_embeddings.device();
        let tokens = sequences.first().map_or(0, Vec::len);
        let past: Option<Vec<(Tensor, Tensor)>> = match cache.parents(sequences) {
            Some(parents) if tokens > 1 => {
                let rows = Tensor::new(parents.as_slice(), device)?;
                let select = |t: &Tensor| t.index_select(&rows, 0);
                let past = cache
                    .layers
                    .iter()
                    .map(|(k, v)| Ok((select(k)?, select(v)?)));
                Some(past.collect::<Result<_>>()?)
            }
            _ => None,
        };
        let start = if past.is_some() { tokens - 1 } else { 0 };
        let new_ids: Vec<u32> = sequences.iter().flat_map(|s| s[start..].to_vec()).collect();
        let ids = Tensor::new(new_ids, device)?.reshape((sequences.len(), tokens - start))?;
        let h = self
            .word_embeddings
            .forward(&ids)?
            .broadcast_add(&self.position_embeddings.i(start..tokens)?)?;
        let mut h = self.embeddings_norm.forward(&h)?;
        let causal = match past {
            Some(_) => None,
            None => Some(causal_mask(tokens, device)?),
        };
        let mut layers_kv = Vec::with_capacity(self.layers.len());
        for (i, (layer, kv)) in self.layers.iter().zip(image_kv).enumerate() {
            let layer_past = past.as_ref().map(|p| &p[i]);
            let (out, own_kv) = layer.forward(&h, kv, layer_past, causal.as_ref())?;
            h = out;
            layers_kv.push(own_kv);
        }
        *cache = SelfAttentionCache {
            sequences: sequences.to_vec(),
            layers: layers_kv,
        };
        let new_tokens = tokens - start;
        let last = h.i((.., new_tokens - 1..new_tokens, ..))?;
        let last = self
            .transform_norm
            .forward(&gelu(&project(&self.transform, &last)?)?)?
            .squeeze(1)?;
        frozen_linear(&last, &self.vocab_weight)?.broadcast_add(&self.vocab_bias)
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
        let mut cache = SelfAttentionCache::default();
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
                    .next_logits(sequences, &rows_kv, &mut cache)?
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
