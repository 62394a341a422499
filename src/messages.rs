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
    /// Read a language model's dataset (a `.jsonl`/`.json` file or a folder of them) for editing, then
    /// check it: token counts with `base_model`'s tokenizer and chat template (when it is a language model
    /// folder) against `max_seq_length`.
    OpenConversations {
        path: PathBuf,
        base_model: PathBuf,
        max_seq_length: u32,
        system_prompt: Option<String>,
    },
    /// Change the open conversation dataset at `root`; the files touched are saved atomically in their own
    /// format, then checked again.
    EditConversations {
        root: PathBuf,
        edit: ConversationEdit,
    },
    /// Answer a conversation with a language model; the newest request wins over one still generating.
    Chat(ChatRequest),
    /// Write a language model's exports from a checkpoint.
    ExportLanguage(LanguageExportRequest),
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
            Job::OpenConversations { .. } => "reading the conversations",
            Job::EditConversations { .. } => "editing the conversations",
            Job::Chat(_) => "answering in the chat",
            Job::ExportLanguage(_) => "exporting the adapter",
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

/// One turn of a conversation as the dataset view shows and edits it. `role` is the name the row gives
/// (`system`, `user`, `assistant`, or ShareGPT's `human`/`gpt`, or an unknown one the checks point out);
/// a plain text row (`{"text"}`, `.txt`) is one turn with the role `text`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChatTurn {
    pub role: String,
    pub content: String,
}

impl ChatTurn {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// How a row of a conversation dataset is written, kept when it is saved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowFormat {
    /// `{"messages": [{"role", "content"}]}`
    OpenAi,
    /// `{"conversations": [{"from", "value"}]}`
    ShareGpt,
    /// `{"instruction", "input", "output", "system", "history"}`
    Alpaca,
    /// `{"text"}`, or a whole `.txt` file.
    Text,
}

/// One sample of a conversation dataset.
#[derive(Debug, Clone, PartialEq)]
pub struct ConversationEntry {
    /// The file it is in, relative to the dataset's root (its name for a single file).
    pub file: PathBuf,
    /// Its 1-based line (the line its object starts on in a `.json` array).
    pub line: usize,
    pub format: RowFormat,
    pub turns: Vec<ChatTurn>,
}

/// A conversation dataset opened for editing.
#[derive(Debug, Clone, PartialEq)]
pub struct ConversationsView {
    /// The file or folder opened.
    pub root: PathBuf,
    pub entries: Vec<ConversationEntry>,
    /// Rows that are not a JSON object of a known shape: (file relative to the root, line, reason). They are
    /// kept in the file as they are.
    pub unparsed: Vec<(PathBuf, usize, String)>,
    /// An edit can be undone.
    pub can_undo: bool,
}

/// A change to an open conversation dataset.
#[derive(Debug, Clone, PartialEq)]
pub enum ConversationEdit {
    /// Replace the turns of sample `index`.
    SetTurns {
        index: usize,
        turns: Vec<ChatTurn>,
    },
    /// A new sample (an empty user turn and an empty assistant turn, in the format of its neighbour) after
    /// sample `after` in the same file, or at the end of the first file.
    Add {
        after: Option<usize>,
    },
    Delete {
        index: usize,
    },
    /// A copy of sample `index`, right after it.
    Duplicate {
        index: usize,
    },
    /// Replace every occurrence of `find` in every turn's content.
    Replace {
        find: String,
        replace: String,
        match_case: bool,
    },
    /// Take back the last edit (its files are written again as they were).
    Undo,
}

/// A problem a conversation sample has, shown as a badge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TextBadge {
    /// An assistant turn with nothing in it.
    EmptyAssistantTurn,
    /// No assistant turn at all: nothing to learn from.
    NoAssistantTurn,
    /// A role the chat templates do not know.
    UnknownRole(String),
    /// The same turns as an earlier sample (its index).
    Duplicate { of: usize },
    /// Longer than `max_seq_length` once rendered with the chat template: it is cut when trained.
    OverLength { tokens: usize, max: usize },
}

/// The adapters a chat reply uses, and how it is sampled.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct ChatSettings {
    pub system_prompt: String,
    /// The adapter's strength (0 is the base model).
    pub strength: f64,
    pub seed: u64,
    /// 0 always picks the most likely token.
    pub temperature: f64,
    pub max_new_tokens: usize,
}

impl Default for ChatSettings {
    fn default() -> Self {
        Self {
            system_prompt: String::new(),
            strength: 1.0,
            seed: 1234,
            temperature: 0.7,
            max_new_tokens: 256,
        }
    }
}

/// Which reply of a chat request an event belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChatLane {
    /// With the adapters at the requested strength.
    Adapter,
    /// The base model alone (a compare request's other reply).
    Base,
}

/// A reply to a conversation.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatRequest {
    /// Increases with every request; events carry it back.
    pub id: u64,
    pub base_model: PathBuf,
    pub device: String,
    /// `Live`: the run in progress (the base model alone when nothing trains); `Checkpoint`: a checkpoint
    /// folder or a PEFT adapter folder.
    pub source: PreviewSource,
    /// The conversation so far (without the system prompt), ending with the user's turn.
    pub messages: Vec<ChatTurn>,
    pub settings: ChatSettings,
    /// Also answer with the base model alone (first), for a side-by-side comparison.
    pub compare: bool,
}

/// What a language model's export writes from a checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct LanguageExportRequest {
    pub base_model: PathBuf,
    pub device: String,
    pub checkpoint: PathBuf,
    /// The folder the exports go in, and their name: `DIR/NAME/` (PEFT), `DIR/NAME.gguf`, `DIR/NAME-merged/`.
    pub output_dir: PathBuf,
    pub name: String,
    pub precision: SavePrecision,
    pub peft: bool,
    pub gguf: bool,
    /// A full model folder with the adapter folded in (bf16).
    pub merged: bool,
    /// Write `DIR/Modelfile` (`FROM` the base, `ADAPTER` the GGUF file) for `ollama create` (needs `gguf`).
    pub ollama: bool,
}

/// What a language model's export wrote.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LanguageExports {
    pub peft_folder: Option<PathBuf>,
    pub gguf_file: Option<PathBuf>,
    pub merged_folder: Option<PathBuf>,
    pub modelfile: Option<PathBuf>,
    /// The command that makes an Ollama model of the Modelfile (`ollama create NAME -f PATH`).
    pub ollama_command: Option<String>,
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
    /// A conversation dataset was read, or changed in a way that moves its samples (add, delete,
    /// duplicate, replace, undo).
    Conversations(ConversationsView),
    /// One sample changed (and its file was saved).
    ConversationChanged {
        root: PathBuf,
        index: usize,
        entry: ConversationEntry,
        can_undo: bool,
    },
    /// Token counts (`None`: no tokenizer to count with) and badges of the samples, in entry order,
    /// computed after a read or an edit.
    ConversationChecks {
        root: PathBuf,
        tokens: Vec<Option<usize>>,
        badges: Vec<Vec<TextBadge>>,
    },
    /// A piece of a chat reply, as it is generated.
    ChatToken {
        id: u64,
        lane: ChatLane,
        text: String,
    },
    /// A chat reply is complete.
    ChatReply {
        id: u64,
        lane: ChatLane,
        text: String,
        tokens: usize,
        seconds: f64,
    },
    /// A language model's export was written.
    LanguageExported(LanguageExports),
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
    /// A language (chat) model folder.
    Language,
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
