//! Stable Diffusion 1.x/2.x and SDXL in candle: UNet, VAE, CLIP text encoders, tokenizer, noise schedules and
//! samplers, checkpoint loading from the files users have, and the text-to-image pipeline; the captioning
//! models; and causal language models (Qwen2, Qwen3, Llama) for chat LoRAs.
//!
//! Models are plain structs (`new(vb, &config)` + `forward`) in the diffusers module layout, built from
//! adapter-capable layers so LoRA training, previews and merging share one code path. Must not use egui,
//! messages, train or worker.

pub mod blip;
pub mod causal_lm;
pub mod checkpoint;
pub mod checkpointing;
pub mod clip;
pub mod clip_embedder;
pub mod decoding;
pub mod image_processor;
pub mod inspect;
pub mod lm_inspect;
pub mod merge;
pub mod nn;
pub mod pipeline;
mod resample;
mod resnet;
pub mod schedulers;
mod text_clean;
pub mod tokenizer;
pub mod transformer_layer;
pub mod unet;
pub mod vae;
pub mod vision;
pub mod wordpiece;

use std::path::PathBuf;

use crate::tensor_file::TensorFileError;

/// What can go wrong finding, reading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    File(#[from] TensorFileError),
    #[error("cannot read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Config(String),
    #[error("{0}")]
    Unsupported(String),
    #[error("{} is not a Stable Diffusion model: {reason}", path.display())]
    NotAModel { path: PathBuf, reason: String },
    #[error("{} lacks the tensor `{tensor}` that the {component} needs (the file is incomplete or not this kind of model)", path.display())]
    MissingTensor {
        path: PathBuf,
        tensor: String,
        component: String,
    },
    #[error("{}: tensor `{tensor}` has shape {found:?}, but the {component} needs {expected:?}", path.display())]
    ShapeMismatch {
        path: PathBuf,
        tensor: String,
        component: String,
        found: Vec<usize>,
        expected: Vec<usize>,
    },
    /// The caller asked to stop (a newer request superseded this one).
    #[error("cancelled")]
    Cancelled,
    #[error("{context}: {}", crate::tensor_file::plain_error(.source))]
    Compute {
        context: String,
        source: candle_core::Error,
    },
}

impl ModelError {
    /// Wraps a candle error with what was being done.
    pub fn compute(context: impl Into<String>) -> impl FnOnce(candle_core::Error) -> Self {
        let context = context.into();
        move |source| ModelError::Compute { context, source }
    }
}
