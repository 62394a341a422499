//! The training data: finding images and captions, decoding and bucketing them, the order they are trained
//! in, and the latent cache; a language model's conversations and texts (`text`). Images are never modified. Must not use egui, train or worker.

pub mod batches;
pub mod buckets;
pub mod caption_store;
pub mod captions;
pub mod checks;
pub mod images;
pub mod latent_cache;
pub mod metadata_csv;
pub mod scan;
pub mod text;

use std::path::PathBuf;

pub use scan::{Dataset, DatasetItem, scan_dataset};

/// What can go wrong with the training data.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("cannot read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the dataset folder {} does not exist or is not a folder", path.display())]
    NotAFolder { path: PathBuf },
    #[error("{} contains no readable images (jpg, png, webp, bmp){}", path.display(), if *unreadable > 0 { format!("; {unreadable} files could not be read") } else { String::new() })]
    NoImages { path: PathBuf, unreadable: usize },
    #[error("{}: {reason}", path.display())]
    Metadata { path: PathBuf, reason: String },
    #[error("the caption file {}: {reason}", path.display())]
    Caption { path: PathBuf, reason: String },
    #[error("the image {} cannot be read: {reason}", path.display())]
    Image { path: PathBuf, reason: String },
    #[error("{0}")]
    Tensor(String),
    #[error("{} is not a .jsonl, .json or .txt file", path.display())]
    NotText { path: PathBuf },
    #[error("{} contains no .jsonl, .json or .txt files", path.display())]
    NoTextFiles { path: PathBuf },
    #[error("the dataset {} has nothing to train on: {reason}", path.display())]
    NothingToTrain { path: PathBuf, reason: String },
}
