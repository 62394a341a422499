//! The app state that survives a restart, saved with eframe's storage. Run data (losses, previews,
//! thumbnails) is not saved.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::config::{SavePrecision, TrainConfig};
use crate::messages::{ExportFormat, PreviewSettings};

/// The views of the window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum Tab {
    #[default]
    Dataset,
    Train,
    Preview,
    Export,
}

/// Export settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct ExportSettings {
    pub precision: SavePrecision,
    pub format: ExportFormat,
    /// WebUI's `models/Lora` or ComfyUI's `models/loras`, picked once.
    pub ui_lora_folder: Option<PathBuf>,
    pub copy_to_ui: bool,
}

/// Auto-captioning choices.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AutoCaptionSettings {
    /// Model names, folders or Hub repositories, separated by commas (`blip, clip`).
    pub models: String,
    /// Text put before every caption.
    pub prefix: String,
}

impl Default for AutoCaptionSettings {
    fn default() -> Self {
        Self {
            models: "blip".to_string(),
            prefix: String::new(),
        }
    }
}

impl AutoCaptionSettings {
    /// The model names, trimmed, empty ones dropped.
    pub fn model_names(&self) -> Vec<String> {
        self.models
            .split(',')
            .map(str::trim)
            .filter(|m| !m.is_empty())
            .map(str::to_string)
            .collect()
    }
}

/// Everything the app remembers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct AppSettings {
    pub tab: Tab,
    /// The training settings, the dataset folder and base model included.
    pub train: TrainConfig,
    pub preset: String,
    pub preview: PreviewSettings,
    pub export: ExportSettings,
    pub auto_caption: AutoCaptionSettings,
    pub show_advanced: bool,
}

/// The key under which eframe stores the settings.
pub const STORAGE_KEY: &str = "lora-studio-settings";
