//! What can go wrong reading, applying or writing a LoRA in any of the formats this room knows (kohya
//! files, PEFT adapter folders): one error type, each message one sentence naming the file and the problem.

use std::path::PathBuf;

use crate::tensor_file::TensorFileError;

/// What can go wrong reading, applying or writing a LoRA.
#[derive(Debug, thiserror::Error)]
pub enum LoraError {
    #[error(transparent)]
    File(#[from] TensorFileError),
    #[error("{} is not a kohya-format LoRA: {reason}", path.display())]
    NotKohya { path: PathBuf, reason: String },
    #[error("{} is not a PEFT LoRA adapter: {reason}", path.display())]
    NotPeft { path: PathBuf, reason: String },
    #[error("{}: module `{module}`: {reason}", path.display())]
    Module {
        path: PathBuf,
        module: String,
        reason: String,
    },
    #[error(
        "{} was made for another base model ({base}): its module `{module}` {reason}",
        path.display()
    )]
    OtherBase {
        path: PathBuf,
        base: String,
        module: String,
        reason: String,
    },
    #[error(
        "none of the {count} modules in {} match this model's layers (the first is `{first}`); the LoRA was \
         probably made for another model family",
        path.display()
    )]
    NoMatch {
        path: PathBuf,
        count: usize,
        first: String,
    },
    #[error(
        "{} is a LoRA for {lora_family} and this is {model_family} model; a LoRA only works on the model \
         family it was trained for",
        path.display()
    )]
    OtherFamily {
        path: PathBuf,
        lora_family: &'static str,
        model_family: &'static str,
    },
    #[error("{}: {}", path.display(), crate::tensor_file::plain_error(.source))]
    Tensor {
        path: PathBuf,
        source: candle_core::Error,
    },
    #[error("cannot write {}: {reason}", path.display())]
    Write { path: PathBuf, reason: String },
}
