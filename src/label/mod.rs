//! Auto-captioning: a first caption for every image of a dataset, which the user then corrects. BLIP writes
//! a sentence, CLIP interrogation appends the best phrases of each vocabulary; weights come from a local
//! folder, the Hugging Face cache, or a download from the Hub. Results go to `metadata.csv` or `.txt`
//! sidecars, one image at a time, never over an existing caption unless asked, so a stopped run resumes
//! where it was. Images are only read. Must not use egui, train or worker.

pub mod captioner;
pub mod interrogate;
pub mod run;
pub mod sources;

use std::path::PathBuf;

use crate::data::DataError;
use crate::models::ModelError;

pub use captioner::{CaptionSettings, Captioner};
pub use run::{CaptionOutput, LabelOptions, LabelReport, LabelReporter, label_folder};

/// What can go wrong auto-captioning.
#[derive(Debug, thiserror::Error)]
pub enum LabelError {
    #[error(transparent)]
    Model(Box<ModelError>),
    #[error(transparent)]
    Data(Box<DataError>),
    #[error("cannot read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Bad input, already one sentence.
    #[error("{0}")]
    Input(String),
    #[error("{context}: {}", crate::tensor_file::plain_error(source))]
    Compute {
        context: String,
        source: candle_core::Error,
    },
    #[error(transparent)]
    Hub(#[from] crate::hub::HubError),
}

impl From<ModelError> for LabelError {
    fn from(error: ModelError) -> Self {
        Self::Model(Box::new(error))
    }
}

impl From<DataError> for LabelError {
    fn from(error: DataError) -> Self {
        Self::Data(Box::new(error))
    }
}

impl LabelError {
    fn compute(context: &str, source: candle_core::Error) -> Self {
        Self::Compute {
            context: context.to_string(),
            source,
        }
    }
}
