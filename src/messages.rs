//! What crosses the seam between the app's UI thread and the worker threads: jobs one way, events the
//! other. Plain data only (images as RGBA bytes, losses as numbers), so the UI never holds a tensor.
//! Must not use candle or egui.

use std::path::PathBuf;

use crate::config::{PredictionOverride, SavePrecision, TrainConfig};

/// Something for the workers to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Job {
    /// Scan a dataset folder with the caption settings of `config`, then check it.
    ScanDataset {
        config: Box<TrainConfig>,
    },
    /// Decode a thumbnail whose longer side is at most `max_side`.
    Thumbnail {
        path: PathBuf,
        max_side: u32,
    },
    /// Save an edited caption where the dataset keeps it (see `data::caption_store`).
    SaveCaption {
        root: PathBuf,
        relative: PathBuf,
        caption: String,
        origin: CaptionOrigin,
        metadata_csv: Option<PathBuf>,
        caption_extension: String,
    },
    /// Caption the dataset's images that have no caption (all of them with `overwrite`), saving each where
    /// the dataset keeps captions.
    AutoCaption(AutoCaptionRequest),
    /// Stop auto-captioning after the current image.
    CancelAutoCaption,
    /// Train (or resume) a LoRA.
    Train {
        config: Box<TrainConfig>,
        resume: Option<PathBuf>,
    },
    /// Pause a run between steps, keeping everything in memory.
    Pause,
    Resume,
    /// Stop a run after the current step; a checkpoint is saved and the LoRA exported.
    Stop,
    /// Render a preview; the newest request wins over older ones still waiting.
    Preview(PreviewRequest),
    /// Render every strength for every checkpoint.
    PreviewGrid {
        request: PreviewRequest,
        strengths: Vec<f64>,
        checkpoints: Vec<PathBuf>,
    },
    /// Write a LoRA file from a checkpoint.
    Export(ExportRequest),
    /// List the complete checkpoints in a run's output folder.
    FindCheckpoints {
        output_dir: PathBuf,
    },
    /// Find the base models and LoRA folders on this computer.
    FindModels,
    /// Download a recommended base model into the Hugging Face cache, then find the models again.
    DownloadModel {
        /// Its short name (`sd15`).
        name: String,
    },
    /// Tell the family of a base model file or folder from its headers (nothing is loaded).
    DescribeModel {
        path: PathBuf,
    },
}

impl Job {
    /// What the job does, for messages ("rendering a preview").
    pub fn name(&self) -> &'static str {
        match self {
            Job::ScanDataset { .. } => "scanning the dataset",
            Job::Thumbnail { .. } => "decoding a thumbnail",
            Job::SaveCaption { .. } => "saving a caption",
            Job::Train { .. } => "training",
            Job::Pause => "pausing",
            Job::Resume => "resuming",
            Job::Stop => "stopping",
            Job::Preview(_) => "rendering a preview",
            Job::PreviewGrid { .. } => "rendering a preview grid",
            Job::Export(_) => "exporting",
            Job::FindCheckpoints { .. } => "listing checkpoints",
            Job::AutoCaption(_) => "auto-captioning",
            Job::CancelAutoCaption => "cancelling auto-captioning",
            Job::FindModels => "finding models",
            Job::DownloadModel { .. } => "downloading a model",
            Job::DescribeModel { .. } => "describing a model",
        }
    }
}

/// An auto-captioning run over a dataset folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AutoCaptionRequest {
    pub root: PathBuf,
    /// Model folders, short names (`blip`, `clip`) or Hub repositories; their parts are joined with ", ".
    pub models: Vec<String>,
    /// Text put before every caption, followed by ", ".
    pub prefix: Option<String>,
    pub overwrite: bool,
    /// The dataset's `metadata.csv`, if captions live there; otherwise sidecars with `caption_extension`.
    pub metadata_csv: Option<PathBuf>,
    pub caption_extension: String,
    pub device: String,
}

/// The adapters a preview uses.
#[derive(Debug, Clone, PartialEq)]
pub enum PreviewSource {
    /// The run in progress (or the base model when nothing is training).
    Live,
    /// A saved checkpoint folder.
    Checkpoint(PathBuf),
}

/// What a preview renders: the prompt, the sampling settings and the LoRA strength. The app keeps the
/// user's choice of these between sessions.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct PreviewSettings {
    pub prompt: String,
    pub negative_prompt: String,
    pub seed: u64,
    pub steps: u32,
    pub width: u32,
    pub height: u32,
    /// The user set the width or height; until then both follow the training resolution.
    pub size_chosen: bool,
    pub cfg: f64,
    pub strength: f64,
}

impl Default for PreviewSettings {
    fn default() -> Self {
        Self {
            prompt: String::new(),
            negative_prompt: "blurry, lowres".to_string(),
            seed: 1234,
            steps: 20,
            width: 512,
            height: 512,
            size_chosen: false,
            cfg: 7.5,
            strength: 0.8,
        }
    }
}

/// One preview image.
#[derive(Debug, Clone, PartialEq)]
pub struct PreviewRequest {
    /// Increases with every request; events carry it back.
    pub id: u64,
    pub base_model: PathBuf,
    pub device: String,
    /// The training settings' `prediction_type`, which the base model is loaded with.
    pub prediction_type: Option<PredictionOverride>,
    pub source: PreviewSource,
    pub settings: PreviewSettings,
}

/// The file formats an export can write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum ExportFormat {
    /// kohya, read by AUTOMATIC1111, Forge, ComfyUI and diffusers.
    #[default]
    Kohya,
    /// Also the diffusers/PEFT layout.
    KohyaAndPeft,
}

/// Writing a LoRA file from a checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct ExportRequest {
    /// The base model, needed only for checkpoints that keep no export of their own (written by older
    /// releases).
    pub base_model: PathBuf,
    pub device: String,
    pub prediction_type: Option<PredictionOverride>,
    pub checkpoint: PathBuf,
    /// The `.safetensors` file to write.
    pub output: PathBuf,
    pub precision: SavePrecision,
    pub format: ExportFormat,
    /// A UI's LoRA folder (WebUI `models/Lora`, ComfyUI `models/loras`) to copy the file into.
    pub copy_to: Option<PathBuf>,
}

/// Where an image's caption came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CaptionOrigin {
    MetadataCsv,
    Sidecar,
    InstancePrompt,
    None,
}

/// A problem an image has, shown as a badge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Badge {
    MissingCaption,
    /// Smaller than the training resolution; `bucket` is the size it is trained at.
    Small {
        width: u32,
        height: u32,
        bucket: (u32, u32),
    },
    Duplicate {
        of: PathBuf,
    },
    NearDuplicate {
        of: PathBuf,
    },
    LongCaption {
        tokens: usize,
    },
    TriggerMissing,
}

/// One image of the dataset, as the UI shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct DatasetEntry {
    pub path: PathBuf,
    pub relative: PathBuf,
    /// The caption as stored (without the trigger word).
    pub caption: String,
    pub origin: CaptionOrigin,
    pub width: u32,
    pub height: u32,
    pub repeats: u32,
}

/// A scanned dataset.
#[derive(Debug, Clone, PartialEq)]
pub struct DatasetView {
    pub root: PathBuf,
    pub entries: Vec<DatasetEntry>,
    /// Files that are not readable images, with the reason.
    pub unreadable: Vec<(PathBuf, String)>,
    /// The `metadata.csv` in use, if any.
    pub metadata_csv: Option<PathBuf>,
}

/// One training step's numbers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossPoint {
    pub step: u64,
    pub epoch: u64,
    pub loss: f64,
    pub lr: f64,
    pub seconds: f64,
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunEnd {
    Finished,
    Stopped,
    NonFiniteLoss,
}

/// Something the workers did or found.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Dataset(DatasetView),
    /// Badges for the dataset's entries (same order), computed after the scan.
    Checks {
        root: PathBuf,
        badges: Vec<Vec<Badge>>,
    },
    Thumbnail {
        path: PathBuf,
        width: u32,
        height: u32,
        rgba: Vec<u8>,
    },
    /// The image could not be decoded for its thumbnail.
    ThumbnailFailed {
        path: PathBuf,
        reason: String,
    },
    CaptionSaved {
        relative: PathBuf,
        target: PathBuf,
    },
    /// A preparation stage advanced.
    Stage {
        stage: String,
        done: usize,
        total: usize,
    },
    /// A run started: its length.
    RunStarted {
        total_steps: u64,
        steps_per_epoch: u64,
        first_step: u64,
    },
    Loss(LossPoint),
    Checkpoint {
        path: PathBuf,
        step: u64,
    },
    /// The complete checkpoints in `output_dir` as (step, folder), oldest first.
    CheckpointsFound {
        output_dir: PathBuf,
        checkpoints: Vec<(u64, PathBuf)>,
    },
    Paused,
    Resumed,
    RunEnded {
        end: RunEnd,
        lora: Option<PathBuf>,
        checkpoint: Option<PathBuf>,
        steps: u64,
    },
    Preview {
        id: u64,
        strength: f64,
        checkpoint: Option<PathBuf>,
        width: u32,
        height: u32,
        rgba: Vec<u8>,
        seconds: f64,
    },
    Exported {
        path: PathBuf,
        copied_to: Option<PathBuf>,
    },
    /// The base models and LoRA folders found on this computer, and the bases offered for download.
    ModelsFound(ModelsFound),
    /// A download advanced.
    DownloadProgress {
        name: String,
        done_bytes: u64,
        total_bytes: u64,
        bytes_per_second: f64,
    },
    /// A download finished; the models are found again next.
    Downloaded {
        name: String,
        path: PathBuf,
    },
    /// The family of a base model (`None`: not a base model lora-studio reads).
    ModelDescribed {
        path: PathBuf,
        family: Option<BaseFamily>,
    },
    /// Auto-captioning advanced: what it is doing (downloading, loading, captioning) and how far along.
    AutoCaptionProgress {
        activity: String,
        done: u64,
        total: u64,
    },
    /// One image was auto-captioned and its caption saved.
    AutoCaptioned {
        relative: PathBuf,
        caption: String,
        target: PathBuf,
    },
    /// Auto-captioning ended (`failed` lists images that could not be captioned, with the reason);
    /// `errored` when it could not run at all (an `Error` event said why).
    AutoCaptionEnded {
        captioned: usize,
        kept: usize,
        failed: Vec<(PathBuf, String)>,
        cancelled: bool,
        errored: bool,
    },
    /// A problem, in one sentence, with the fix people usually need.
    Error {
        message: String,
        hint: Option<String>,
    },
    /// Something worth telling the user.
    Info(String),
}

/// What a search for models found.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ModelsFound {
    /// Base models, sorted by family group, then name.
    pub models: Vec<ModelChoice>,
    /// UIs' LoRA folders: (the UI, the folder).
    pub lora_folders: Vec<(String, PathBuf)>,
    pub downloads: Vec<DownloadChoice>,
}

/// The families of base models whose training defaults differ (resolution, presets, the estimate).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BaseFamily {
    /// Stable Diffusion 1.x and 2.x.
    Sd,
    /// Stable Diffusion XL and its fine-tunes.
    Sdxl,
    /// Something else the app lists (a chat model).
    Other,
}

/// A base model found on this computer.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelChoice {
    pub path: PathBuf,
    pub name: String,
    /// `SD 1.x`, `SD 2.x (v-prediction)`, ...
    pub family: String,
    pub base_family: BaseFamily,
    /// The group it is listed under (`Stable Diffusion 1.x`).
    pub group: String,
    pub size_bytes: u64,
    pub precision: String,
    /// Where it was found (`ComfyUI`, `Hugging Face cache`).
    pub source: String,
}

/// A base model offered for download.
#[derive(Debug, Clone, PartialEq)]
pub struct DownloadChoice {
    pub name: String,
    /// A few words (`Stable Diffusion 1.5`).
    pub label: String,
    /// The whole description.
    pub title: String,
    pub approximate_bytes: u64,
}
