//! The base models offered for download to someone who has none: where each is on the Hugging Face Hub,
//! which file, and about how big (the exact size comes from the Hub before the download starts).

use std::path::PathBuf;

use super::Family;
use crate::hub::{DownloadReporter, HubError, HubSettings, fetch_file, fetch_files};

/// A base model offered for download.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recommended {
    /// The short name `lora-studio download` takes.
    pub name: &'static str,
    /// What it is, in a few words (`Stable Diffusion 1.5`).
    pub label: &'static str,
    /// What it is, exactly.
    pub title: &'static str,
    pub family: Family,
    /// The Hub repository.
    pub repo: &'static str,
    /// The file to fetch; `None` fetches the model folder ([`MODEL_FOLDER_FILES`]).
    pub file: Option<&'static str>,
    /// About how many bytes it is.
    pub approximate_bytes: u64,
}

/// The files of a Hugging Face model folder a chat model is read from (config, generation settings,
/// tokenizer and chat template, weights).
pub const MODEL_FOLDER_FILES: [&str; 5] = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "model.safetensors",
];

/// The recommended bases, most useful first.
pub const RECOMMENDED: [Recommended; 3] = [
    Recommended {
        name: "sd15",
        label: "Stable Diffusion 1.5",
        title: "Stable Diffusion 1.5 (pruned, EMA weights, fp16)",
        family: Family::Sd1,
        repo: "Comfy-Org/stable-diffusion-v1-5-archive",
        file: Some("v1-5-pruned-emaonly-fp16.safetensors"),
        approximate_bytes: 2_130_000_000,
    },
    Recommended {
        name: "sdxl",
        label: "SDXL base 1.0",
        title: "Stable Diffusion XL base 1.0 (fp16)",
        family: Family::Sdxl,
        repo: "stabilityai/stable-diffusion-xl-base-1.0",
        file: Some("sd_xl_base_1.0.safetensors"),
        approximate_bytes: 6_940_000_000,
    },
    Recommended {
        name: "qwen2.5-0.5b",
        label: "Qwen2.5 0.5B Instruct",
        title: "Qwen2.5 0.5B Instruct, a small chat model (bf16)",
        family: Family::ChatModel,
        repo: "Qwen/Qwen2.5-0.5B-Instruct",
        file: None,
        approximate_bytes: 995_000_000,
    },
];

impl Recommended {
    /// Downloads it into the Hugging Face cache (what the cache has is not fetched again) and returns its
    /// file, or its snapshot folder for a model folder.
    pub fn fetch(
        &self,
        settings: &HubSettings,
        reporter: &mut dyn DownloadReporter,
    ) -> Result<PathBuf, HubError> {
        match self.file {
            Some(file) => fetch_file(self.repo, file, settings, reporter),
            None => {
                let paths = fetch_files(self.repo, &MODEL_FOLDER_FILES, settings, reporter)?;
                Ok(paths[0].parent().map(PathBuf::from).unwrap_or_default())
            }
        }
    }
}

/// The recommended base called `name`.
pub fn find(name: &str) -> Option<&'static Recommended> {
    RECOMMENDED
        .iter()
        .find(|r| r.name.eq_ignore_ascii_case(name))
}
