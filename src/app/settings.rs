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
    pub show_advanced: bool,
}

/// The key under which eframe stores the settings.
pub const STORAGE_KEY: &str = "lora-studio-settings";
