//! The base-model row of the Train view: a picker of the models found on this computer, grouped by family
//! with their sizes, file and folder dialogs for anything else, and the recommended bases to download with a
//! progress bar; on a first start with no model found, one line says so with the download next to it.

use std::path::PathBuf;

use super::{Dialog, DialogResult, StudioApp};
use crate::messages::{DownloadChoice, Job, ModelChoice, ModelsFound};

/// What the app knows about the models on this computer.
#[derive(Debug, Default)]
pub struct ModelsState {
    /// The last search's result; `None` while the first search runs.
    pub found: Option<ModelsFound>,
    /// The download in progress: its name, bytes done and total, and speed.
    pub download: Option<(String, u64, u64, f64)>,
    /// Whether the list of recommended downloads is open.
    pub offering_downloads: bool,
}

impl ModelsState {
    /// The found model at `path`.
    fn at(&self, path: &std::path::Path) -> Option<&ModelChoice> {
        self.found.as_ref()?.models.iter().find(|m| m.path == path)
    }
}

/// `2.0 GiB`.
fn size_text(bytes: u64) -> String {
    let gib = bytes as f64 / (1u64 << 30) as f64;
    if gib >= 1.0 {
        format!("{gib:.1} GiB")
    } else {
        format!("{:.0} MiB", bytes as f64 / (1u64 << 20) as f64)
    }
}

impl StudioApp {
    /// The base-model row.
    pub(super) fn base_model_ui(&mut self, ui: &mut egui::Ui) {
        let ctx = ui.ctx().clone();
        let current = self.settings.train.base_model.clone();
        let label = ui
            .horizontal(|ui| {
                let label = ui.label("Base model").on_hover_text(
                    "the Stable Diffusion model the LoRA is trained for: one found on this computer, a \
                     .safetensors/.ckpt file or diffusers folder, or a download",
                );
                if ui.button("File…").clicked() {
                    self.pick(&ctx, Dialog::ModelFile, DialogResult::BaseModel);
                }
                if ui.button("Folder…").clicked() {
                    self.pick(&ctx, Dialog::Folder, DialogResult::BaseModel);
                }
                if ui
                    .button("Download…")
                    .on_hover_text("recommended base models, into the Hugging Face cache")
                    .clicked()
                {
                    self.models.offering_downloads = !self.models.offering_downloads;
                }
                label
            })
            .inner;
        let picked = self.model_picker_ui(ui, &current);
        picked.labelled_by(label.id);
        if !current.as_os_str().is_empty() {
            super::train_view::path_label_ui(ui, &current);
        }
        let none_found = self
            .models
            .found
            .as_ref()
            .is_some_and(|f| f.models.is_empty());
        if none_found && current.as_os_str().is_empty() && self.models.download.is_none() {
            let first = self
                .models
                .found
                .as_ref()
                .and_then(|f| f.downloads.first().cloned());
            ui.horizontal_wrapped(|ui| {
                ui.label("No base model was found on this computer.");
                if let Some(choice) = first {
                    self.download_button_ui(ui, &choice);
                }
            });
        }
        self.download_progress_ui(ui);
        if self.models.offering_downloads {
            let choices = self
                .models
                .found
                .as_ref()
                .map(|f| f.downloads.clone())
                .unwrap_or_default();
            for choice in &choices {
                ui.horizontal_wrapped(|ui| {
                    self.download_button_ui(ui, choice);
                });
            }
        }
    }

    /// The picker of found models; choosing one sets the base model.
    fn model_picker_ui(&mut self, ui: &mut egui::Ui, current: &std::path::Path) -> egui::Response {
        let selected = match (self.models.at(current), &self.models.found) {
            (Some(model), _) => format!("{} ({})", model.name, model.family),
            (None, _) if !current.as_os_str().is_empty() => current
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            (None, None) => "looking for models…".to_string(),
            (None, Some(found)) if found.models.is_empty() => "none found".to_string(),
            (None, Some(found)) => format!("choose one of {} found…", found.models.len()),
        };
        let models = self
            .models
            .found
            .as_ref()
            .map(|f| f.models.clone())
            .unwrap_or_default();
        let mut chosen: Option<PathBuf> = None;
        let response = egui::ComboBox::from_id_salt("base model")
            .selected_text(selected)
            .width(ui.available_width().min(360.0))
            .show_ui(ui, |ui| {
                let mut group = "";
                for model in &models {
                    if model.group != group {
                        group = &model.group;
                        ui.label(egui::RichText::new(group).strong());
                    }
                    let text = format!(
                        "{}  —  {}, {} {}, {}",
                        model.name,
                        model.family,
                        size_text(model.size_bytes),
                        model.precision,
                        model.source
                    );
                    if ui
                        .selectable_label(model.path == current, text)
                        .on_hover_text(model.path.display().to_string())
                        .clicked()
                    {
                        chosen = Some(model.path.clone());
                    }
                }
            })
            .response;
        if let Some(path) = chosen {
            self.settings.train.base_model = path;
        }
        response
    }

    fn download_button_ui(&mut self, ui: &mut egui::Ui, choice: &DownloadChoice) {
        let busy = self.models.download.is_some();
        let text = format!(
            "Download {} (about {})",
            choice.label,
            size_text(choice.approximate_bytes)
        );
        if ui
            .add_enabled(!busy, egui::Button::new(text))
            .on_hover_text(format!(
                "{}, into the Hugging Face cache, where other tools find it too",
                choice.title
            ))
            .clicked()
        {
            self.models.download = Some((choice.name.clone(), 0, choice.approximate_bytes, 0.0));
            self.models.offering_downloads = false;
            self.worker.send(Job::DownloadModel {
                name: choice.name.clone(),
            });
        }
    }

    fn download_progress_ui(&mut self, ui: &mut egui::Ui) {
        let Some((name, done, total, speed)) = &self.models.download else {
            return;
        };
        let fraction = if *total > 0 {
            *done as f32 / *total as f32
        } else {
            0.0
        };
        ui.add(
            egui::ProgressBar::new(fraction.clamp(0.0, 1.0)).text(format!(
                "downloading {name}: {} of {}, {}/s",
                size_text(*done),
                size_text(*total),
                size_text(*speed as u64)
            )),
        );
    }
}
