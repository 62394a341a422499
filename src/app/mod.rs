//! The desktop app (feature `gui`). The UI thread never touches candle: it sends jobs to the worker threads
//! and draws the events they send back (images as RGBA bytes, losses as numbers). Views: dataset (grid,
//! caption editing, checks), train (settings, run controls, live loss chart), preview (strength slider,
//! checkpoint grid) and export. In text mode (a chat model or a conversation dataset) the same tabs show
//! their language-model forms: conversations, the text settings, a chat, the adapter exports.

mod auto_caption_view;
mod chart;
mod chat_view;
mod conversations_view;
mod dataset_view;
mod estimate;
mod export_view;
mod models_view;
mod presets;
mod preview_view;
mod settings;
mod state;
mod text_export_view;
mod train_view;

use std::path::PathBuf;
use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender};
use eframe::egui;

use auto_caption_view::AutoCaptionState;
use chat_view::ChatState;
use conversations_view::ConversationsState;
use models_view::ModelsState;
pub use settings::{AppSettings, Mode, RestoredSettings, STORAGE_KEY, Tab, restore_settings};
pub use state::RunStatus;
use state::{DatasetState, Notice, PreviewState, RunState};

use crate::build_info::LONG_VERSION;
use crate::config::{LoadedConfig, load_config_noting, save_config};
use crate::messages::{Event, Job, LanguageExports};
use crate::worker::WorkerHandle;

/// Opens the main window (on `path`, a dataset folder or training config, when given) and runs until it
/// is closed.
pub fn run(path: Option<PathBuf>) -> anyhow::Result<()> {
    let options = eframe::NativeOptions {
        viewport: egui::ViewportBuilder::default()
            .with_title("lora-studio")
            .with_inner_size([1280.0, 820.0])
            .with_drag_and_drop(true),
        ..Default::default()
    };
    eframe::run_native(
        "lora-studio",
        options,
        Box::new(|cc| {
            let ctx = cc.egui_ctx.clone();
            let (worker, events) = WorkerHandle::spawn(Arc::new(move || ctx.request_repaint()))?;
            let restored = cc
                .storage
                .map(settings::restore_settings)
                .unwrap_or_default();
            let mut settings = restored.settings;
            if path.as_ref().is_some_and(|p| p.exists()) {
                // The named path replaces the remembered dataset; scanning that one too would be wasted.
                settings.train.train_data_dir = PathBuf::new();
            }
            let mut app = StudioApp::new(settings, worker, events);
            for note in restored.notes {
                app.notice(false, note, None);
            }
            if let Some(path) = path {
                app.open_path(path);
            }
            Ok(Box::new(app))
        }),
    )
    .map_err(|e| anyhow::anyhow!("the window could not be opened: {e}"))
}

/// Results of native dialogs, which run on their own threads.
enum DialogResult {
    DatasetFolder(PathBuf),
    BaseModel(PathBuf),
    OutputFolder(PathBuf),
    UiLoraFolder(PathBuf),
    OpenConfig(PathBuf),
    SaveConfig(PathBuf),
}

/// What a native dialog asks for.
#[derive(Clone, Copy)]
enum Dialog {
    Folder,
    ModelFile,
    OpenConfig,
    SaveConfig,
}

/// Extensions of the config files the app opens (those `lora-studio train --config` reads).
const CONFIG_EXTENSIONS: [&str; 4] = ["toml", "yaml", "yml", "json"];

/// The app.
pub struct StudioApp {
    settings: AppSettings,
    worker: WorkerHandle,
    events: Receiver<Event>,
    dialogs: (Sender<DialogResult>, Receiver<DialogResult>),
    dataset: DatasetState,
    run: RunState,
    preview: PreviewState,
    auto_caption: AutoCaptionState,
    models: ModelsState,
    conversations: ConversationsState,
    chat: ChatState,
    /// What the last export of a language model's adapter wrote.
    language_exports: Option<LanguageExports>,
    notices: Vec<Notice>,
}

/// Events handled per frame at most, so a burst never stalls the UI.
const EVENTS_PER_FRAME: usize = 256;

impl StudioApp {
    /// The app with remembered `settings`; the last dataset folder is opened again.
    pub fn new(settings: AppSettings, worker: WorkerHandle, events: Receiver<Event>) -> Self {
        let mut app = Self {
            settings,
            worker,
            events,
            dialogs: crossbeam_channel::unbounded(),
            dataset: DatasetState::default(),
            run: RunState::default(),
            preview: PreviewState::default(),
            auto_caption: AutoCaptionState::default(),
            models: ModelsState::default(),
            conversations: ConversationsState::default(),
            chat: ChatState::default(),
            language_exports: None,
            notices: Vec::new(),
        };
        app.worker.send(Job::FindModels);
        let data = app.settings.train.train_data_dir.clone();
        if app.settings.mode == Mode::Text && data.exists() {
            app.open_conversations(data);
        } else if data.is_dir() {
            app.open_dataset(data);
        }
        app
    }

    /// Whether the views are in their language-model forms.
    pub fn text_mode(&self) -> bool {
        self.settings.mode == Mode::Text
    }

    /// Switches the views to `mode`, opening the dataset of the settings in that mode's form when it is
    /// one.
    fn set_mode(&mut self, mode: Mode) {
        if self.settings.mode == mode {
            return;
        }
        self.settings.mode = mode;
        let data = self.settings.train.train_data_dir.clone();
        match mode {
            Mode::Text if is_text_dataset(&data) => self.open_conversations(data),
            Mode::Images if data.is_dir() && !is_text_dataset(&data) => self.open_dataset(data),
            _ => {}
        }
    }

    /// The number of images in the open dataset.
    pub fn dataset_len(&self) -> usize {
        self.dataset.view.as_ref().map_or(0, |v| v.entries.len())
    }

    /// Thumbnails the grid asked for that have not arrived yet.
    pub fn thumbnails_waiting(&self) -> usize {
        self.dataset.thumbnails_waiting()
    }

    /// Whether auto-captioning is running.
    pub fn auto_captioning(&self) -> bool {
        self.auto_caption.running
    }

    /// The captions the grid shows, in entry order.
    pub fn captions(&self) -> &[String] {
        &self.dataset.captions
    }

    /// Captions that are not yet confirmed saved.
    pub fn unsaved_captions(&self) -> usize {
        self.dataset.unsaved_count() + self.dataset.saves_in_flight
    }

    /// How many base models the last search found (`None` while the first one runs).
    pub fn models_found(&self) -> Option<usize> {
        self.models.found.as_ref().map(|f| f.models.len())
    }

    pub fn settings(&self) -> &AppSettings {
        &self.settings
    }

    pub fn settings_mut(&mut self) -> &mut AppSettings {
        &mut self.settings
    }

    /// The loss points of the current run.
    pub fn losses(&self) -> &[crate::messages::LossPoint] {
        &self.run.losses
    }

    /// Whether a run is training (or paused).
    pub fn run_status(&self) -> RunStatus {
        self.run.status
    }

    /// The id and strength of the preview on screen.
    pub fn shown_preview(&self) -> Option<(u64, f64)> {
        self.preview.shown.as_ref().map(|s| (s.id, s.strength))
    }

    /// The complete checkpoints in the output folder as (step, folder), oldest first.
    pub fn checkpoints(&self) -> &[(u64, PathBuf)] {
        &self.run.checkpoints
    }

    /// Files written by exports so far.
    pub fn exported(&self) -> &[PathBuf] {
        &self.preview.exported
    }

    /// The notices (errors and information) shown so far, newest last.
    pub fn notices(&self) -> Vec<String> {
        self.notices.iter().map(|n| n.text.clone()).collect()
    }

    /// Opens a dataset folder: scans it and shows its grid.
    pub fn open_dataset(&mut self, folder: PathBuf) {
        self.flush_captions();
        self.settings.train.train_data_dir = folder;
        self.dataset = DatasetState::default();
        self.worker.send(Job::ScanDataset {
            config: Box::new(self.settings.train.clone()),
        });
    }

    fn notice(&mut self, error: bool, text: String, hint: Option<String>) {
        self.notices.push(Notice { error, text, hint });
        if self.notices.len() > 50 {
            self.notices.remove(0);
        }
    }

    /// Handles the workers' events.
    fn process_events(&mut self, ctx: &egui::Context) {
        for event in self
            .events
            .try_iter()
            .take(EVENTS_PER_FRAME)
            .collect::<Vec<_>>()
        {
            match event {
                Event::Dataset(view) => self.dataset.set_view(view),
                Event::Checks { root, badges } => {
                    if self.dataset.view.as_ref().is_some_and(|v| v.root == root) {
                        self.dataset.badges = badges;
                    }
                }
                Event::Thumbnail {
                    path,
                    width,
                    height,
                    rgba,
                } => self.dataset.add_thumbnail(ctx, path, width, height, &rgba),
                Event::ThumbnailFailed { path, reason } => {
                    self.dataset.thumbnail_failures.insert(path, reason);
                }
                Event::CaptionSaved { relative, target } => {
                    self.dataset.caption_saved(&relative, &target)
                }
                Event::Stage { stage, done, total } => self.run.stage = Some((stage, done, total)),
                Event::RunStarted {
                    total_steps,
                    steps_per_epoch,
                    first_step,
                } => {
                    self.run.started(total_steps, steps_per_epoch, first_step);
                    // Chats use the adapters as they are while the run trains.
                    self.chat.source = None;
                }
                Event::Loss(point) => self.run.losses.push(point),
                Event::Checkpoint { path, step } => self.run.add_checkpoints([(step, path)]),
                Event::CheckpointsFound {
                    output_dir,
                    checkpoints,
                } => {
                    if self.run.listed_dir.as_ref() == Some(&output_dir) {
                        self.run.add_checkpoints(checkpoints);
                    }
                }
                Event::Paused => self.run.status = RunStatus::Paused,
                Event::Resumed => self.run.status = RunStatus::Training,
                Event::RunEnded {
                    end,
                    lora,
                    checkpoint,
                    steps,
                } => {
                    self.run.ended(end, lora.clone(), checkpoint);
                    if let Some(lora) = lora {
                        let text = if self.text_mode() {
                            // Chats go on with the adapter the run wrote.
                            self.chat.source = Some(lora.clone());
                            format!(
                                "run ended after {steps} steps; adapter written to {} (PEFT) and {0}.gguf (llama.cpp)",
                                lora.display()
                            )
                        } else {
                            format!(
                                "run ended after {steps} steps; LoRA written to {}",
                                lora.display()
                            )
                        };
                        self.notice(false, text, None);
                    }
                }
                Event::Preview {
                    id,
                    strength,
                    checkpoint,
                    width,
                    height,
                    rgba,
                    seconds,
                } => self
                    .preview
                    .received(ctx, id, strength, checkpoint, width, height, &rgba, seconds),
                Event::ModelsFound(found) => {
                    if self.settings.export.ui_lora_folder.is_none() {
                        self.settings.export.ui_lora_folder =
                            found.lora_folders.first().map(|(_, path)| path.clone());
                    }
                    self.models.found = Some(found);
                }
                Event::ModelDescribed { path, family } => self.models.described(path, family),
                Event::DownloadProgress {
                    name,
                    done_bytes,
                    total_bytes,
                    bytes_per_second,
                } => self.models.download = Some((name, done_bytes, total_bytes, bytes_per_second)),
                Event::Downloaded { name, path } => {
                    self.models.download = None;
                    if self.settings.train.base_model.as_os_str().is_empty() {
                        self.pick_base_model(path.clone());
                    }
                    self.notice(
                        false,
                        format!("downloaded {name} to {}", path.display()),
                        None,
                    );
                }
                Event::Exported { path, copied_to } => {
                    let copied = copied_to
                        .as_ref()
                        .map(|c| format!(" and copied to {}", c.display()))
                        .unwrap_or_default();
                    self.notice(false, format!("exported {}{copied}", path.display()), None);
                    self.preview.exported.push(path);
                }
                Event::AutoCaptionProgress {
                    activity,
                    done,
                    total,
                } => {
                    self.auto_caption.activity = activity;
                    self.auto_caption.done = done;
                    self.auto_caption.total = total;
                }
                Event::AutoCaptioned {
                    relative,
                    caption,
                    target,
                } => self.dataset.auto_captioned(
                    &relative,
                    &caption,
                    &target,
                    self.auto_caption.overwrite,
                ),
                Event::AutoCaptionEnded {
                    captioned,
                    kept,
                    failed,
                    cancelled,
                    errored,
                } => {
                    self.auto_caption = AutoCaptionState::default();
                    if errored {
                        continue;
                    }
                    let mut text = format!(
                        "auto-captioning {}: {captioned} captioned, {kept} kept",
                        if cancelled { "cancelled" } else { "finished" }
                    );
                    if let Some((path, reason)) = failed.first() {
                        text.push_str(&format!(
                            ", {} could not be captioned ({}: {reason})",
                            failed.len(),
                            path.display()
                        ));
                    }
                    self.notice(!failed.is_empty(), text, None);
                }
                Event::Error { message, hint } => {
                    // A refused edit is answered by this error alone.
                    self.conversations.edits_in_flight = 0;
                    self.notice(true, message, hint)
                }
                Event::Info(text) => self.notice(false, text, None),
                Event::Conversations(view) => self.conversations.set_view(view),
                Event::ConversationChanged {
                    root,
                    index,
                    entry,
                    can_undo,
                } => self.conversations.changed(&root, index, entry, can_undo),
                Event::ConversationChecks {
                    root,
                    tokens,
                    badges,
                } => self.conversations.checked(&root, tokens, badges),
                Event::ChatToken { id, lane, text } => self.chat.token(id, lane, &text),
                Event::ChatReply {
                    id,
                    lane,
                    text,
                    tokens,
                    seconds,
                } => self.chat.reply(id, lane, text, tokens, seconds),
                Event::LanguageExported(exports) => {
                    let written: Vec<PathBuf> = [
                        &exports.peft_folder,
                        &exports.gguf_file,
                        &exports.merged_folder,
                        &exports.modelfile,
                    ]
                    .into_iter()
                    .flatten()
                    .cloned()
                    .collect();
                    let list: Vec<String> =
                        written.iter().map(|p| p.display().to_string()).collect();
                    self.notice(false, format!("exported {}", list.join(", ")), None);
                    self.preview.exported.extend(written);
                    self.language_exports = Some(exports);
                }
            }
        }
        for result in self.dialogs.1.try_iter().collect::<Vec<_>>() {
            match result {
                DialogResult::DatasetFolder(folder) => self.open_dataset(folder),
                DialogResult::BaseModel(path) => self.pick_base_model(path),
                DialogResult::OutputFolder(path) => self.settings.train.output_dir = path,
                DialogResult::UiLoraFolder(path) => {
                    self.settings.export.ui_lora_folder = Some(path)
                }
                DialogResult::OpenConfig(path) => self.open_path(path),
                DialogResult::SaveConfig(path) => match save_config(&self.settings.train, &path) {
                    Ok(()) => self.notice(
                        false,
                        format!(
                            "settings saved to {}; run them headless with `lora-studio train --config {0}`",
                            path.display()
                        ),
                        None,
                    ),
                    Err(e) => self.notice(true, e.to_string(), None),
                },
            }
        }
    }

    /// Opens what a user dropped or named on the command line: a conversation dataset (a `.jsonl`/`.json`
    /// file or a folder of them: text mode), a training config (its settings and dataset), a dataset
    /// folder, or an image (the folder it is in).
    pub fn open_path(&mut self, path: PathBuf) {
        let extension = path
            .extension()
            .and_then(|e| e.to_str())
            .unwrap_or("")
            .to_ascii_lowercase();
        if is_text_dataset(&path) {
            self.settings.mode = Mode::Text;
            self.settings.tab = Tab::Dataset;
            self.open_conversations(path);
        } else if path.is_file() && CONFIG_EXTENSIONS.contains(&extension.as_str()) {
            match load_config_noting(Some(&path), &[]) {
                Ok(LoadedConfig { config, notes }) => {
                    let folder = config.train_data_dir.clone();
                    let text = is_text_dataset(&folder);
                    self.settings.train = config;
                    self.settings.tab = Tab::Train;
                    self.notice(
                        false,
                        format!("settings loaded from {}", path.display()),
                        None,
                    );
                    for note in notes {
                        self.notice(false, note, None);
                    }
                    if text {
                        self.settings.mode = Mode::Text;
                        self.open_conversations(folder);
                    } else if folder.is_dir() {
                        self.settings.mode = Mode::Images;
                        self.open_dataset(folder);
                    }
                }
                Err(e) => self.notice(true, e.to_string(), None),
            }
        } else if path.is_dir() {
            self.settings.tab = Tab::Dataset;
            self.settings.mode = Mode::Images;
            self.open_dataset(path);
        } else if let Some(folder) = path.parent().filter(|p| p.is_dir()) {
            self.settings.tab = Tab::Dataset;
            self.settings.mode = Mode::Images;
            self.open_dataset(folder.to_path_buf());
        } else {
            self.notice(true, format!("{} does not exist", path.display()), None);
        }
    }

    /// Whatever is dropped on the window opens with [`Self::open_path`].
    fn handle_drops(&mut self, ctx: &egui::Context) {
        let dropped = ctx.input(|i| i.raw.dropped_files.clone());
        if let Some(first) = dropped.first() {
            self.open_path(first.path().to_path_buf());
        }
    }

    /// Starts a native dialog on its own thread; its answer comes back through `dialogs`.
    fn pick(&mut self, ctx: &egui::Context, kind: Dialog, wrap: fn(PathBuf) -> DialogResult) {
        let tx = self.dialogs.0.clone();
        let ctx = ctx.clone();
        let spawned = std::thread::Builder::new()
            .name("lora-studio-dialog".into())
            .spawn(move || {
                let dialog = rfd::FileDialog::new();
                let picked = match kind {
                    Dialog::Folder => dialog.pick_folder(),
                    Dialog::ModelFile => dialog
                        .add_filter("Stable Diffusion model", &["safetensors", "ckpt"])
                        .pick_file(),
                    Dialog::OpenConfig => dialog
                        .add_filter("Training settings", &CONFIG_EXTENSIONS)
                        .pick_file(),
                    Dialog::SaveConfig => dialog
                        .add_filter("Training settings", &["toml"])
                        .set_file_name("lora-studio.toml")
                        .save_file(),
                };
                if let Some(path) = picked {
                    let _ = tx.send(wrap(path));
                    ctx.request_repaint();
                }
            });
        if let Err(e) = spawned {
            self.notice(
                true,
                format!("the file dialog could not be opened: {e}"),
                None,
            );
        }
    }

    /// Saves every caption edit still waiting for its debounce, and the conversation being edited.
    pub fn flush_captions(&mut self) {
        let jobs = self.dataset.take_unsaved(&self.settings.train);
        for job in jobs {
            self.worker.send(job);
        }
        self.flush_conversation_draft();
    }

    /// Draws the whole window.
    pub fn main_ui(&mut self, ui: &mut egui::Ui) {
        let ctx = ui.ctx().clone();
        self.process_events(&ctx);
        self.follow_base_model();
        self.handle_drops(&ctx);
        for job in self.dataset.take_unsaved(&self.settings.train) {
            self.worker.send(job);
        }
        self.start_waiting_run();
        if let Some(job) = self
            .run
            .list_checkpoints_job(&self.settings.train.output_dir)
        {
            self.worker.send(job);
        }
        self.follow_training_size();
        self.preview.send_if_due(&self.settings, &self.worker);
        self.send_chat_if_due();
        if self.dataset.unsaved_count() > 0 || self.preview.waiting() || self.chat_waiting() {
            ctx.request_repaint_after(std::time::Duration::from_millis(100));
        }

        egui::Panel::top("tabs").show(ui, |ui| {
            ui.horizontal(|ui| {
                ui.heading("lora-studio");
                ui.separator();
                for (tab, label) in [
                    (Tab::Dataset, "Dataset"),
                    (Tab::Train, "Train"),
                    (Tab::Preview, "Preview"),
                    (Tab::Export, "Export"),
                ] {
                    ui.selectable_value(&mut self.settings.tab, tab, label);
                }
                ui.separator();
                ui.label(self.run.status_line());
            });
        });
        egui::Panel::bottom("notices")
            .resizable(true)
            .default_size(70.0)
            .show(ui, |ui| self.notices_ui(ui));
        let text = self.text_mode();
        egui::CentralPanel::default().show(ui, |ui| match self.settings.tab {
            Tab::Dataset if text => self.conversations_tab_ui(ui),
            Tab::Dataset => self.dataset_tab_ui(ui),
            Tab::Train => self.train_tab_ui(ui),
            Tab::Preview if text => self.chat_tab_ui(ui),
            Tab::Preview => self.preview_tab_ui(ui),
            Tab::Export if text => self.text_export_tab_ui(ui),
            Tab::Export => self.export_tab_ui(ui),
        });
    }

    fn notices_ui(&mut self, ui: &mut egui::Ui) {
        egui::ScrollArea::vertical()
            .stick_to_bottom(true)
            .show(ui, |ui| {
                if self.notices.is_empty() {
                    let next_step = if self.text_mode() {
                        "Drop a .jsonl file of conversations on the window, pick a chat model on the Train tab."
                    } else if self.dataset.view.is_some() {
                        "Check the captions, then set up a run on the Train tab."
                    } else {
                        "Drop a folder of images on the window to begin."
                    };
                    ui.weak(format!("lora-studio {LONG_VERSION}. {next_step}"));
                }
                for notice in &self.notices {
                    let color = if notice.error {
                        ui.visuals().error_fg_color
                    } else {
                        ui.visuals().text_color()
                    };
                    ui.colored_label(color, &notice.text);
                    if let Some(hint) = &notice.hint {
                        ui.label(format!("    fix: {hint}"));
                    }
                }
            });
    }
}

/// File extensions of the images a dataset folder holds.
const IMAGE_EXTENSIONS: [&str; 5] = ["png", "jpg", "jpeg", "webp", "bmp"];

/// Whether `path` is a language model's dataset: a `.jsonl` or `.txt` file, a `.json` file holding an
/// array (a config is an object), or a folder with `.jsonl`/`.json` files and no images.
fn is_text_dataset(path: &std::path::Path) -> bool {
    let extension_of = |p: &std::path::Path| {
        p.extension()
            .and_then(|e| e.to_str())
            .unwrap_or("")
            .to_ascii_lowercase()
    };
    if path.is_file() {
        return match extension_of(path).as_str() {
            "jsonl" | "txt" => true,
            "json" => json_array(path),
            _ => false,
        };
    }
    let Ok(entries) = std::fs::read_dir(path) else {
        return false;
    };
    let extensions: Vec<String> = entries.flatten().map(|e| extension_of(&e.path())).collect();
    let has = |wanted: &[&str]| extensions.iter().any(|e| wanted.contains(&e.as_str()));
    has(&["jsonl", "json"]) && !has(&IMAGE_EXTENSIONS)
}

/// Whether the JSON file at `path` starts with an array.
fn json_array(path: &std::path::Path) -> bool {
    use std::io::Read;
    let mut start = [0u8; 512];
    let read = std::fs::File::open(path).and_then(|mut f| f.read(&mut start));
    read.is_ok_and(|n| {
        String::from_utf8_lossy(&start[..n])
            .trim_start_matches('\u{feff}')
            .trim_start()
            .starts_with('[')
    })
}

impl eframe::App for StudioApp {
    fn ui(&mut self, ui: &mut egui::Ui, _frame: &mut eframe::Frame) {
        self.main_ui(ui);
    }

    fn save(&mut self, storage: &mut dyn eframe::Storage) {
        self.flush_captions();
        eframe::set_value(storage, settings::STORAGE_KEY, &self.settings);
    }

    fn on_exit(&mut self) {
        self.flush_captions();
    }
}

#[cfg(test)]
mod tests {
    use super::is_text_dataset;

    #[test]
    fn conversation_files_and_folders_are_told_from_image_folders_and_configs() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, text).unwrap();
            path
        };
        assert!(is_text_dataset(&write("chats.jsonl", "{}\n")));
        assert!(is_text_dataset(&write("book.txt", "Once upon a time")));
        assert!(is_text_dataset(&write(
            "alpaca.json",
            "\u{feff} [{\"instruction\": \"a\"}]"
        )));
        assert!(!is_text_dataset(&write(
            "config.json",
            "{\"base_model\": \"x\"}"
        )));
        write("logs/a.jsonl", "{}\n");
        write("logs/dataset_info.json", "{}");
        assert!(is_text_dataset(&dir.path().join("logs")));
        write("photos/a.png", "");
        write("photos/a.txt", "a caption");
        write("photos/meta.json", "[]");
        assert!(!is_text_dataset(&dir.path().join("photos")));
        assert!(!is_text_dataset(&dir.path().join("missing")));
    }
}
