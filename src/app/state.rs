//! The app's run-time state: the dataset with its editable captions and thumbnails, the training run, and
//! the previews. None of it is saved between sessions.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use eframe::egui;

use super::settings::AppSettings;
use crate::config::TrainConfig;
use crate::messages::{
    Badge, CaptionOrigin, DatasetView, Job, LossPoint, PreviewRequest, PreviewSource, RunEnd,
};
use crate::worker::WorkerHandle;

/// An error or a piece of information shown at the bottom of the window.
pub struct Notice {
    pub error: bool,
    pub text: String,
    pub hint: Option<String>,
}

/// Edits undone together (a single caption, or a bulk change).
type UndoBatch = Vec<(usize, String)>;

/// The dataset shown in the grid.
#[derive(Default)]
pub struct DatasetState {
    pub view: Option<DatasetView>,
    pub badges: Vec<Vec<Badge>>,
    /// Editable captions, in entry order.
    pub captions: Vec<String>,
    /// The caption each entry had when its current edit began.
    pub edit_anchor: HashMap<usize, String>,
    thumbnails: HashMap<PathBuf, egui::TextureHandle>,
    /// Images whose thumbnail could not be decoded, with the reason.
    pub thumbnail_failures: HashMap<PathBuf, String>,
    pub requested: HashSet<PathBuf>,
    pub selected: Option<usize>,
    pub tag_filter: Option<String>,
    pub trigger_input: String,
    pub find: String,
    pub replace: String,
    undo: Vec<UndoBatch>,
    /// Entries edited since they were last sent to be saved.
    unsaved: HashSet<usize>,
    /// Saves sent but not confirmed yet.
    pub saves_in_flight: usize,
}

impl DatasetState {
    pub fn set_view(&mut self, view: DatasetView) {
        self.captions = view.entries.iter().map(|e| e.caption.clone()).collect();
        self.badges = vec![Vec::new(); view.entries.len()];
        self.view = Some(view);
    }

    pub fn thumbnail(&self, path: &Path) -> Option<&egui::TextureHandle> {
        self.thumbnails.get(path)
    }

    pub fn add_thumbnail(
        &mut self,
        ctx: &egui::Context,
        path: PathBuf,
        width: u32,
        height: u32,
        rgba: &[u8],
    ) {
        let image =
            egui::ColorImage::from_rgba_unmultiplied([width as usize, height as usize], rgba);
        let texture = ctx.load_texture(path.to_string_lossy(), image, egui::TextureOptions::LINEAR);
        self.thumbnails.insert(path, texture);
    }

    /// Thumbnails requested and neither shown nor failed yet.
    pub fn thumbnails_waiting(&self) -> usize {
        self.requested.len() - self.thumbnails.len() - self.thumbnail_failures.len()
    }

    /// Records that entry `index` changed; it is saved on the next frame.
    pub fn edited(&mut self, index: usize) {
        self.unsaved.insert(index);
    }

    pub fn unsaved_count(&self) -> usize {
        self.unsaved.len()
    }

    /// An edit of one caption ended: it becomes one undo step.
    pub fn edit_finished(&mut self, index: usize) {
        if let Some(before) = self.edit_anchor.remove(&index)
            && self.captions.get(index) != Some(&before)
        {
            self.undo.push(vec![(index, before)]);
        }
    }

    /// Applies `change` to every caption (a bulk tool) as one undo step.
    pub fn change_all(&mut self, mut change: impl FnMut(&str) -> String) {
        let mut batch = Vec::new();
        for index in 0..self.captions.len() {
            let updated = change(&self.captions[index]);
            if updated != self.captions[index] {
                batch.push((index, std::mem::replace(&mut self.captions[index], updated)));
                self.unsaved.insert(index);
            }
        }
        if !batch.is_empty() {
            self.undo.push(batch);
        }
    }

    pub fn can_undo(&self) -> bool {
        !self.undo.is_empty()
    }

    pub fn undo(&mut self) {
        if let Some(batch) = self.undo.pop() {
            for (index, caption) in batch {
                self.captions[index] = caption;
                self.unsaved.insert(index);
            }
        }
    }

    /// Save jobs for the captions edited since the last call (each edit is saved at once, atomically).
    pub fn take_unsaved(&mut self, train: &TrainConfig) -> Vec<Job> {
        let Some(view) = &self.view else {
            return Vec::new();
        };
        let indices: Vec<usize> = self.unsaved.iter().copied().collect();
        let mut jobs = Vec::with_capacity(indices.len());
        for index in indices {
            self.unsaved.remove(&index);
            let entry = &view.entries[index];
            jobs.push(Job::SaveCaption {
                root: view.root.clone(),
                relative: entry.relative.clone(),
                caption: self.captions[index].clone(),
                origin: entry.origin,
                metadata_csv: view.metadata_csv.clone(),
                caption_extension: train.caption_extension.clone(),
            });
        }
        self.saves_in_flight += jobs.len();
        jobs
    }

    /// A save was confirmed: the entry's caption now lives at `target`.
    pub fn caption_saved(&mut self, relative: &Path, target: &Path) {
        self.saves_in_flight = self.saves_in_flight.saturating_sub(1);
        self.caption_stored(relative, target);
    }

    /// An auto-caption was saved: the grid shows it unless the user has typed a caption meanwhile (the
    /// worker never overwrites that one on disk either, except when re-captioning everything).
    pub fn auto_captioned(
        &mut self,
        relative: &Path,
        caption: &str,
        target: &Path,
        overwrite: bool,
    ) {
        let Some(view) = &self.view else { return };
        let Some(index) = view.entries.iter().position(|e| e.relative == relative) else {
            return;
        };
        if overwrite || self.captions[index].trim().is_empty() {
            self.captions[index] = caption.to_string();
        }
        self.caption_stored(relative, target);
    }

    /// The entry's caption now lives at `target`.
    fn caption_stored(&mut self, relative: &Path, target: &Path) {
        let Some(view) = &mut self.view else { return };
        if let Some(entry) = view.entries.iter_mut().find(|e| e.relative == relative) {
            entry.origin = if target.extension().is_some_and(|e| e == "csv") {
                CaptionOrigin::MetadataCsv
            } else {
                CaptionOrigin::Sidecar
            };
        }
        if let Some(index) = view.entries.iter().position(|e| e.relative == relative)
            && let Some(badges) = self.badges.get_mut(index)
        {
            badges.retain(|b| *b != Badge::MissingCaption);
        }
    }

    /// How often each comma-separated tag occurs in the captions, most frequent first.
    pub fn tag_counts(&self) -> Vec<(String, usize)> {
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        for caption in &self.captions {
            for tag in caption
                .split(',')
                .map(|t| t.trim().to_lowercase())
                .filter(|t| !t.is_empty())
            {
                *counts.entry(tag).or_insert(0) += 1;
            }
        }
        let mut counts: Vec<(String, usize)> = counts.into_iter().collect();
        counts.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        counts
    }

    /// The entries the grid shows (all, or those with the filter tag).
    pub fn visible(&self) -> Vec<usize> {
        (0..self.captions.len())
            .filter(|&i| match &self.tag_filter {
                Some(tag) => self.captions[i]
                    .split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case(tag)),
                None => true,
            })
            .collect()
    }
}

/// Where the run is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RunStatus {
    #[default]
    Idle,
    /// Sent, waiting for caption saves or for the run to start.
    Starting,
    Training,
    Paused,
    Stopping,
}

/// The training run.
#[derive(Default)]
pub struct RunState {
    pub status: RunStatus,
    pub losses: Vec<LossPoint>,
    pub total_steps: u64,
    pub steps_per_epoch: u64,
    pub first_step: u64,
    pub stage: Option<(String, usize, usize)>,
    /// Complete checkpoints of the output folder as (step, folder), oldest first.
    pub checkpoints: Vec<(u64, PathBuf)>,
    /// The output folder whose checkpoints were last asked for.
    pub listed_dir: Option<PathBuf>,
    /// The checkpoint the export view writes from (the newest when none was chosen).
    pub export_choice: Option<PathBuf>,
    pub lora: Option<PathBuf>,
    /// A run to start once pending caption saves are confirmed (`Some(resume)`).
    pub waiting_to_start: Option<Option<PathBuf>>,
    pub last_end: Option<RunEnd>,
}

impl RunState {
    pub fn started(&mut self, total_steps: u64, steps_per_epoch: u64, first_step: u64) {
        self.status = RunStatus::Training;
        self.total_steps = total_steps;
        self.steps_per_epoch = steps_per_epoch;
        self.first_step = first_step;
        self.stage = None;
        if first_step == 0 {
            self.losses.clear();
        }
    }

    pub fn ended(&mut self, end: RunEnd, lora: Option<PathBuf>, checkpoint: Option<PathBuf>) {
        self.status = RunStatus::Idle;
        self.last_end = Some(end);
        self.stage = None;
        if lora.is_some() {
            self.lora = lora;
        }
        if let Some(checkpoint) = checkpoint {
            let step = self.losses.last().map_or(0, |p| p.step);
            self.add_checkpoints([(step, checkpoint)]);
        }
        // Older checkpoints may have been pruned: list the folder again.
        self.listed_dir = None;
    }

    /// Adds checkpoints (from an event or a listing of the output folder), keeping them ordered by step.
    pub fn add_checkpoints(&mut self, found: impl IntoIterator<Item = (u64, PathBuf)>) {
        for (step, path) in found {
            if !self.checkpoints.iter().any(|(_, p)| *p == path) {
                self.checkpoints.push((step, path));
            }
        }
        self.checkpoints.sort();
    }

    /// The job that lists `output_dir`'s checkpoints, when they were not asked for yet.
    pub fn list_checkpoints_job(&mut self, output_dir: &Path) -> Option<Job> {
        if self.listed_dir.as_deref() == Some(output_dir) {
            return None;
        }
        self.listed_dir = Some(output_dir.to_path_buf());
        self.checkpoints.clear();
        self.export_choice = None;
        Some(Job::FindCheckpoints {
            output_dir: output_dir.to_path_buf(),
        })
    }

    /// The checkpoint an export is written from.
    pub fn export_checkpoint(&self) -> Option<&PathBuf> {
        self.export_choice
            .as_ref()
            .or_else(|| self.checkpoints.last().map(|(_, p)| p))
    }

    pub fn active(&self) -> bool {
        !matches!(self.status, RunStatus::Idle)
    }

    /// Steps done.
    pub fn step(&self) -> u64 {
        self.losses.last().map_or(self.first_step, |p| p.step)
    }

    /// Mean seconds per step over the last few steps.
    pub fn seconds_per_step(&self) -> Option<f64> {
        let recent: Vec<f64> = self
            .losses
            .iter()
            .rev()
            .take(10)
            .map(|p| p.seconds)
            .collect();
        (!recent.is_empty()).then(|| recent.iter().sum::<f64>() / recent.len() as f64)
    }

    /// `step/total  it/s  ETA` for the top bar.
    pub fn status_line(&self) -> String {
        match self.status {
            RunStatus::Idle => match self.last_end {
                Some(RunEnd::Finished) => format!("finished at step {}", self.step()),
                Some(RunEnd::Stopped) => format!("stopped at step {}", self.step()),
                Some(RunEnd::NonFiniteLoss) => "stopped: the loss was not finite".to_string(),
                None => "idle".to_string(),
            },
            RunStatus::Starting => match &self.stage {
                Some((stage, done, total)) => format!("{stage} {done}/{total}"),
                None => "starting".to_string(),
            },
            RunStatus::Paused => format!("paused at step {}/{}", self.step(), self.total_steps),
            RunStatus::Stopping => "stopping after this step".to_string(),
            RunStatus::Training => {
                let step = self.step();
                match self.seconds_per_step() {
                    Some(seconds) if seconds > 0.0 => {
                        let eta = Duration::from_secs_f64(
                            seconds * self.total_steps.saturating_sub(step) as f64,
                        );
                        format!(
                            "step {step}/{}  {:.2} it/s  ETA {}",
                            self.total_steps,
                            1.0 / seconds,
                            format_duration(eta)
                        )
                    }
                    _ => format!("step {step}/{}", self.total_steps),
                }
            }
        }
    }
}

/// `1h02m`, `3m05s`, `12s`.
pub fn format_duration(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, s % 3600 / 60)
    } else if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}

/// A preview on screen.
pub struct ShownPreview {
    pub id: u64,
    pub strength: f64,
    pub seconds: f64,
    pub texture: egui::TextureHandle,
}

/// Previews and exports.
#[derive(Default)]
pub struct PreviewState {
    next_id: u64,
    /// When the last change to the preview settings happened (a request goes out 300 ms later).
    changed_at: Option<Instant>,
    pub shown: Option<ShownPreview>,
    /// The newest request sent.
    pub requested_id: u64,
    /// Grid images by (checkpoint, strength in hundredths).
    pub grid: BTreeMap<(PathBuf, i64), egui::TextureHandle>,
    pub grid_checkpoints: Vec<PathBuf>,
    pub exported: Vec<PathBuf>,
}

/// Strengths the comparison grid renders.
pub const GRID_STRENGTHS: [f64; 4] = [0.0, 0.4, 0.8, 1.2];
const PREVIEW_DEBOUNCE: Duration = Duration::from_millis(300);

impl PreviewState {
    /// The preview settings changed: a new render is due after the debounce.
    pub fn changed(&mut self) {
        self.changed_at = Some(Instant::now());
    }

    pub fn waiting(&self) -> bool {
        self.changed_at.is_some()
    }

    /// A request for the current settings.
    pub fn request(&mut self, settings: &AppSettings, source: PreviewSource) -> PreviewRequest {
        self.next_id += 1;
        PreviewRequest {
            id: self.next_id,
            base_model: settings.train.base_model.clone(),
            device: settings.train.device.clone(),
            prediction_type: settings.train.prediction_type,
            source,
            settings: settings.preview.clone(),
        }
    }

    /// Sends the debounced request once the settings have been still for a moment.
    pub fn send_if_due(&mut self, settings: &AppSettings, worker: &WorkerHandle) {
        if self
            .changed_at
            .is_some_and(|t| t.elapsed() >= PREVIEW_DEBOUNCE)
        {
            self.changed_at = None;
            let request = self.request(settings, PreviewSource::Live);
            self.requested_id = request.id;
            worker.send(Job::Preview(request));
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub fn received(
        &mut self,
        ctx: &egui::Context,
        id: u64,
        strength: f64,
        checkpoint: Option<PathBuf>,
        width: u32,
        height: u32,
        rgba: &[u8],
        seconds: f64,
    ) {
        let image =
            egui::ColorImage::from_rgba_unmultiplied([width as usize, height as usize], rgba);
        let texture = ctx.load_texture(
            format!("preview-{id}-{strength}"),
            image,
            egui::TextureOptions::LINEAR,
        );
        match checkpoint {
            Some(checkpoint) if self.grid_checkpoints.contains(&checkpoint) => {
                self.grid
                    .insert((checkpoint, (strength * 100.0).round() as i64), texture);
            }
            _ => {
                // Older answers arriving late never replace a newer one.
                if self.shown.as_ref().is_none_or(|s| s.id <= id) {
                    self.shown = Some(ShownPreview {
                        id,
                        strength,
                        seconds,
                        texture,
                    });
                }
            }
        }
    }
}

impl super::StudioApp {
    /// Sends a run that was waiting for caption saves once they are confirmed.
    pub(super) fn start_waiting_run(&mut self) {
        if self.dataset.saves_in_flight > 0 || self.conversations.edits_in_flight > 0 {
            return;
        }
        if let Some(resume) = self.run.waiting_to_start.take() {
            self.worker.send(Job::Train {
                config: Box::new(self.settings.train.clone()),
                resume,
            });
        }
    }
}
