//! The app state that survives a restart, saved with eframe's storage. The training config is stored with
//! its version, and settings an earlier (or later) release stored are read through the config's upgrade,
//! with notes on what changed, rather than dropped. Run data (losses, previews, thumbnails) is not saved.

use std::path::PathBuf;

use serde::{Deserialize, Deserializer, Serialize};

use crate::config::{SavePrecision, TrainConfig, restore_config};
use crate::messages::{ChatSettings, ExportFormat, PreviewSettings};

/// The views of the window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum Tab {
    #[default]
    Dataset,
    Train,
    Preview,
    Export,
}

/// What the views are for: LoRAs of image models, or adapters of language models. Picking a base model of
/// the other kind, or dropping a dataset of the other kind, switches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum Mode {
    #[default]
    Images,
    Text,
}

/// What a language model's export writes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TextExportSettings {
    /// The PEFT adapter folder (transformers, vLLM, LLaMA-Factory).
    pub peft: bool,
    /// The llama.cpp adapter.
    pub gguf: bool,
    /// A whole model folder with the adapter folded in.
    pub merged: bool,
    /// A Modelfile for `ollama create`.
    pub ollama: bool,
}

impl Default for TextExportSettings {
    fn default() -> Self {
        Self {
            peft: true,
            gguf: true,
            merged: false,
            ollama: false,
        }
    }
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
    #[serde(with = "crate::config::stored")]
    pub train: TrainConfig,
    pub preset: String,
    pub preview: PreviewSettings,
    pub export: ExportSettings,
    pub auto_caption: AutoCaptionSettings,
    pub show_advanced: bool,
    pub mode: Mode,
    pub chat: ChatSettings,
    pub text_export: TextExportSettings,
}

/// The key under which eframe stores the settings.
pub const STORAGE_KEY: &str = "lora-studio-settings";

/// Settings read back, with what reading them changed.
#[derive(Debug, Default)]
pub struct RestoredSettings {
    pub settings: AppSettings,
    /// Sentences to show once; empty when nothing changed.
    pub notes: Vec<String>,
}

/// The stored settings as JSON, whatever release stored them.
struct StoredSettings(serde_json::Value);

impl<'de> Deserialize<'de> for StoredSettings {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        crate::config::stored::any_value(deserializer).map(Self)
    }
}

/// Reads the settings this or another release stored in `storage`.
pub fn restore_settings(storage: &dyn eframe::Storage) -> RestoredSettings {
    let Some(StoredSettings(mut value)) = eframe::get_value(storage, STORAGE_KEY) else {
        let notes = storage
            .get_string(STORAGE_KEY)
            .map(|_| "the saved settings could not be read; they are back to their defaults".into())
            .into_iter()
            .collect();
        return RestoredSettings {
            settings: AppSettings::default(),
            notes,
        };
    };
    let train = value
        .as_object_mut()
        .and_then(|map| map.remove("train"))
        .unwrap_or_default();
    let restored = restore_config(train);
    let mut notes: Vec<String> = restored
        .summary("The training settings were saved by another lora-studio release")
        .into_iter()
        .collect();
    let mut settings: AppSettings = serde_json::from_value(value).unwrap_or_else(|e| {
        notes.push(format!(
            "the saved view, preview and export settings could not be read ({e}); they are back to \
             their defaults"
        ));
        AppSettings::default()
    });
    settings.train = restored.config;
    RestoredSettings { settings, notes }
}
