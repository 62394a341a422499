//! Training: one model-agnostic loop (`trainer`: optimizer, learning-rate schedule, accumulation,
//! precision, resumable checkpoints, TensorBoard logs) driving a task per kind of model (`task`; the
//! diffusion task for Stable Diffusion, `causal_lm` for language models), and the LoRA export. It reports through [`TrainReporter`] so the
//! terminal and the app's worker drive the same code. Must not use egui, messages or worker.

mod adamw;
pub mod bench;
mod causal_lm;
mod checkpoint;
mod cpu_products;
mod diffusion;
mod export;
mod inputs;
mod lm_batches;
pub mod lm_bench;
pub mod lm_chat;
mod lm_export;
mod lm_samples;
mod metadata;
mod noise;
mod optimizer;
mod report;
mod samples;
mod schedule;
mod task;
pub mod tensorboard;
mod trainer;

use std::path::PathBuf;

pub use causal_lm::{
    CausalLmTask, LANGUAGE_MODEL_PREFIX, LoadedLanguageModel, causal_lm_batch_loss,
    create_language_network, is_language_model_folder, language_network_from_checkpoint,
    load_language_model, train_causal_lm, train_causal_lm_on,
};
pub use checkpoint::{Checkpoint, TrainState, list_checkpoints, load_checkpoint};
pub use lm_batches::{LaidOutBatch, TextBatch, lay_out, text_epoch_batches};
pub use lm_samples::{TokenizedDataset, TokenizedSample, sample_token_count, tokenize_dataset};
pub use metadata::tag_frequency;
pub use optimizer::{Optimizer, OptimizerSettings};
pub use report::{
    CancelToken, Flow, LiveModel, LiveRun, SilentReporter, StepReport, TrainPlan, TrainReporter,
};

pub use diffusion::{
    LoadedBase, export_checkpoint_on, latest_checkpoint, load_base, network_from_checkpoint,
    prediction_type, train, train_on,
};
pub use export::{CHECKPOINT_EXPORT_FILE, export_kept};
pub use lm_export::{
    CausalLmExports, write_causal_lm_exports, write_gguf_export, write_peft_export,
};
pub use schedule::lr_factor;

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrainStop {
    Finished,
    Cancelled,
    /// Too many steps in a row had a non-finite loss.
    NonFiniteLoss,
}

/// The result of a run.
#[derive(Debug, Clone)]
pub struct TrainOutcome {
    /// The exported kohya LoRA file.
    pub lora_path: PathBuf,
    /// The last checkpoint written.
    pub checkpoint: Option<PathBuf>,
    /// Optimizer steps completed.
    pub steps: u64,
    pub stop: TrainStop,
}

/// What can stop a run.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Config(Box<crate::config::ConfigError>),
    #[error(transparent)]
    Data(Box<crate::data::DataError>),
    #[error(transparent)]
    Model(Box<crate::models::ModelError>),
    #[error(transparent)]
    Lora(Box<crate::lora::LoraError>),
    #[error(transparent)]
    Chat(Box<crate::chat::ChatError>),
    #[error("cannot write {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the checkpoint {}: {reason}", path.display())]
    Checkpoint { path: PathBuf, reason: String },
    #[error("the output folder {} is not writable: {source}", path.display())]
    OutputNotWritable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "checkpoint {step} could not be saved in {} ({reason}); {}",
        output_dir.display(),
        match kept {
            Some(kept) => format!("the previous checkpoint {} is kept; free some space and resume from it", kept.display()),
            None => "no earlier checkpoint exists".to_string(),
        }
    )]
    CheckpointNotSaved {
        output_dir: PathBuf,
        step: u64,
        reason: String,
        kept: Option<PathBuf>,
    },
    #[error("{0}")]
    Device(String),
    /// A bug, caught: the message says what was being done and what went wrong.
    #[error("{0}")]
    Internal(String),
    #[error("{}", crate::tensor_file::plain_error(.0))]
    Compute(Box<candle_core::Error>),
}

/// Boxed conversions keep `TrainError` small.
macro_rules! boxed_from {
    ($($source:ty => $variant:ident),*) => {$(
        impl From<$source> for TrainError {
            fn from(error: $source) -> Self {
                TrainError::$variant(Box::new(error))
            }
        }
    )*};
}

boxed_from!(
    crate::config::ConfigError => Config,
    crate::data::DataError => Data,
    crate::models::ModelError => Model,
    crate::lora::LoraError => Lora,
    crate::chat::ChatError => Chat,
    candle_core::Error => Compute
);
