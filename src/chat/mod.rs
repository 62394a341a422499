//! The text side of a language model folder: its `tokenizer.json` (through the `tokenizers` crate), its own
//! Jinja chat template (from `chat_template.jinja` or `tokenizer_config.json`, rendered with `minijinja` and
//! the functions Hugging Face templates use), its special tokens, and the ids that end a reply
//! (`generation_config.json`, `config.json`, the tokenizer's `eos_token`), and a reply's tokens turned into
//! text as they come (`stream`). Any model's template works as
//! transformers' `apply_chat_template` renders it; there is no hand-written list of formats.
//!
//! Knows text and token ids only: must not use candle, kernels, lora, models, train, data, worker, cli or app.

mod files;
mod generation;
mod python_json;
mod stream;
mod template;
mod template_functions;
mod tokenizer;
mod tokenizer_config;

use std::path::PathBuf;

pub use files::ChatFiles;
pub use generation::GenerationDefaults;
pub use stream::TextStream;
pub use template::{ChatMessage, ChatTemplate, RenderOptions, TemplateValue};
pub use tokenizer::{TextTokenizer, TokenSpan};
pub use tokenizer_config::SpecialTokens;

/// What can go wrong reading a model's tokenizer files, tokenizing or rendering a chat.
#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    #[error(
        "{} has no {file}, which a language model folder needs (tokenizer.json and tokenizer_config.json)",
        folder.display()
    )]
    MissingFile { folder: PathBuf, file: &'static str },
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {reason}", path.display())]
    Invalid { path: PathBuf, reason: String },
    #[error(
        "{} has no chat template (no chat_template.jinja, and tokenizer_config.json has no chat_template)",
        folder.display()
    )]
    NoTemplate { folder: PathBuf },
    #[error("the chat template failed: {0}")]
    Template(String),
    #[error("tokenizing failed: {0}")]
    Tokenize(String),
}
