//! A causal language model (Qwen2, Qwen3, Llama) in the transformers layout: token embedding, decoder
//! layers, final RMS norm and the output projection (`lm_head`, or the embedding when tied). Its linear
//! layers are adapter-capable and registered under their transformers names, so LoRA training, PEFT
//! adapters and merging find them. Loads from a Hugging Face folder, memory-mapped, each tensor read
//! straight into the compute dtype.

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, IndexOp, Result, Tensor};
use candle_nn::{Embedding, Module, VarBuilder};

use super::batch::TokenBatch;
use super::cache::KvCache;
use super::config::CausalLmConfig;
use super::layer::DecoderLayer;
use super::rope::RotaryFrequencies;
use crate::kernels::frozen_linear;
use crate::lora::{LayerBuilder, LayerRegistry};
use crate::models::ModelError;
use crate::models::checkpoint::{build, transformers_weights};
use crate::models::checkpointing::{CheckpointGrads, checkpointed, trainable_anchor};
use crate::models::nn::RmsNorm;

/// A decoder-only transformer with its adapter registry.
#[derive(Debug, Clone)]
pub struct CausalLm {
    embed_tokens: Embedding,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    /// `[vocab, hidden]`: `lm_head.weight`, or the embedding when the model ties them.
    lm_head: Tensor,
    rotary: RotaryFrequencies,
    config: CausalLmConfig,
    registry: LayerRegistry,
    dtype: DType,
    device: Device,
    /// Where recomputed decoder layers leave their adapters' gradients, when checkpointing.
    checkpointing: Option<CheckpointGrads>,
}

impl CausalLm {
    /// Builds the model from `vb` (rooted at the checkpoint: `model.embed_tokens.weight`, `lm_head.weight`).
    pub fn new(vb: VarBuilder, config: &CausalLmConfig) -> Result<Self> {
        let registry = LayerRegistry::default();
        let lb = LayerBuilder::new(vb.clone(), registry.clone());
        let model = lb.pp("model");
        let embedding = model
            .vb()
            .pp("embed_tokens")
            .get((config.vocab_size, config.hidden_size), "weight")?;
        let layers = (0..config.num_hidden_layers)
            .map(|i| DecoderLayer::new(model.pp("layers").pp(i), config))
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::new(
            model.vb().pp("norm"),
            config.hidden_size,
            config.rms_norm_eps,
        )?;
        let lm_head = if config.tie_word_embeddings {
            embedding.clone()
        } else {
            vb.pp("lm_head")
                .get((config.vocab_size, config.hidden_size), "weight")?
        };
        Ok(Self {
            embed_tokens: Embedding::new(embedding, config.hidden_size),
            layers,
            norm,
            lm_head,
            rotary: RotaryFrequencies::new(config),
            config: config.clone(),
            registry,
            dtype: vb.dtype(),
            device: vb.device().clone(),
            checkpointing: None,
        })
    }

    /// Loads the model of a Hugging Face folder (`config.json`, `model.safetensors` or shards with their
    /// index) in `dtype` on `device`.
    pub fn load(
        folder: &Path,
        device: &Device,
        dtype: DType,
    ) -> std::result::Result<Self, ModelError> {
        let config = CausalLmConfig::from_folder(folder)?;
        let weights = transformers_weights(folder).map_err(|e| match e {
            ModelError::NotAModel { path, reason } => ModelError::Config(format!(
                "{} is not a language model folder: {reason}",
                path.display()
            )),
            other => other,
        })?;
        let label = format!("{} language model", config.architecture.label());
        build(&weights, &label, device, dtype, |vb| Self::new(vb, &config))
    }

    pub fn config(&self) -> &CausalLmConfig {
        &self.config
    }

    /// The adapter-capable layers, by transformers module name (`model.layers.0.self_attn.q_proj`).
    pub fn layers(&self) -> &LayerRegistry {
        &self.registry
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Turns gradient checkpointing of the decoder layers on (each recomputed in the backward pass, its
    /// adapters' gradients left in `store`) or off. Passes with a key/value cache are never checkpointed.
    pub fn set_gradient_checkpointing(&mut self, store: Option<CheckpointGrads>) {
        self.checkpointing = store;
    }

    /// An empty key/value cache for incremental decoding.
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.layers.len())
    }

    /// The final hidden states `[rows, tokens, hidden]` (after the last norm) of `batch`. With a cache, the
    /// batch follows the cached tokens, and its keys and values are added to the cache.
    pub fn forward_hidden(
        &self,
        batch: &TokenBatch,
        mut cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let history = cache.as_ref().map_or(&[][..], |c| c.segments());
        let mask = batch.attention_mask(history, &self.device)?;
        let (cos, sin) =
            self.rotary
                .tables(batch.positions(), batch.rows(), self.dtype, &self.device)?;
        let mut x = self
            .embed_tokens
            .forward(&batch.ids_tensor(&self.device)?)?;
        let checkpointing = match (&self.checkpointing, &cache) {
            (Some(store), None) => {
                let adapters: Vec<_> = self
                    .registry
                    .slots()
                    .iter()
                    .flat_map(|s| s.adapters())
                    .collect();
                let anchor = trainable_anchor(adapters.iter().map(|a| a.down()), &self.device)?;
                Some((store, anchor))
            }
            _ => None,
        };
        for (i, layer) in self.layers.iter().enumerate() {
            x = match &checkpointing {
                Some((store, anchor)) => {
                    let (layer, cos, sin) = (layer.clone(), cos.clone(), sin.clone());
                    checkpointed(
                        Arc::new(move |x, mask| layer.forward(x, (&cos, &sin), mask, None)),
                        &x,
                        &mask,
                        anchor,
                        store,
                    )?
                }
                None => {
                    let layer_cache = cache.as_deref_mut().and_then(|c| c.layer_mut(i));
                    layer.forward(&x, (&cos, &sin), &mask, layer_cache)?
                }
            };
        }
        if let Some(cache) = cache {
            cache.record(batch)?;
        }
        self.norm.forward(&x)
    }

    /// The logits `[..., vocab]` of hidden states from [`Self::forward_hidden`], in the model's dtype.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        frozen_linear(hidden, &self.lm_head)
    }

    /// The logits `[rows, tokens, vocab]` of every token of `batch`.
    pub fn forward(&self, batch: &TokenBatch, cache: Option<&mut KvCache>) -> Result<Tensor> {
        self.logits(&self.forward_hidden(batch, cache)?)
    }

    /// The logits `[rows, vocab]` of each row's last token, in f32.
    pub fn last_logits(&self, batch: &TokenBatch, cache: Option<&mut KvCache>) -> Result<Tensor> {
        let hidden = self.forward_hidden(batch, cache)?;
        let last = hidden.i((.., hidden.dim(1)? - 1..))?;
        self.logits(&last)?.squeeze(1)?.to_dtype(DType::F32)
    }
}
