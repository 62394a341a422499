//! The base-model row of the Train view: a picker of the models found on this computer, grouped by family
//! with their sizes, file and folder dialogs for anything else, and the recommended bases to download with a
//! progress bar; on a first start with no model found, one line says so with the download next to it. The
//! family of the base model (from the list, or asked of the files thread for a browsed one) decides which
//! presets are offered, and picking a base of another family applies that family's preset for the same
//! hardware.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::presets::{Hardware, apply_preset, counterpart};
use super::{Dialog, DialogResult, StudioApp};
use crate::messages::{BaseFamily, DownloadChoice, Job, ModelChoice, ModelsFound};

/// What the app knows about the models on this computer.
#[derive(Debug, Default)]
pub struct ModelsState {
    /// The last search's result; `None` while the first search runs.
    pub found: Option<ModelsFound>,
    /// The download in progress: its name, bytes done and total, and speed.
    pub download: Option<(String, u64, u64, f64)>,
    /// Whether the list of recommended downloads is open.
    pub offering_downloads: bool,
    /// The families of base models that are not in the list, as the files thread told them (`None`: not a
    /// base model it reads).
    pub described: HashMap<PathBuf, Option<BaseFamily>>,
    /// The base model asked about and not answered yet.
    pub describing: Option<PathBuf>,
    /// The base model the user just picked, with the family the settings were for: once its family is
    /// known, the presets follow it.
    pub picked: Option<(PathBuf, BaseFamily)>,
}

impl ModelsState {
    /// The found model at `path`, or named `path` as the list names it (as a config may name its base).
    fn at(&self, path: &Path) -> Option<&ModelChoice> {
        let models = &self.found.as_ref()?.models;
        models.iter().find(|m| m.path == path).or_else(|| {
            let name = path.to_str().filter(|_| !path.exists())?;
            let mut named = models.iter().filter(|m| m.name.eq_ignore_ascii_case(name));
            named.next().filter(|_| named.next().is_none())
        })
    }

    /// What is known of the family of the base model at `path`: `None` while unknown, `Some(None)` when
    /// it is no base model lora-studio reads.
    fn family_of(&self, path: &Path) -> Option<Option<BaseFamily>> {
        match self.at(path) {
            Some(model) => Some(Some(model.base_family)),
            None => self.described.get(path).copied(),
        }
    }

    /// The files thread's answer about `path`.
    pub(super) fn described(&mut self, path: PathBuf, family: Option<BaseFamily>) {
        if self.describing.as_ref() == Some(&path) {
            self.describing = None;
        }
        self.described.insert(path, family);
    }
}

/// How a family is named beside a browsed base model.
fn family_label(family: BaseFamily) -> &'static str {
    match family {
        BaseFamily::Sd => "SD 1.x/2.x",
        BaseFamily::Sdxl => "SDXL",
        BaseFamily::Language => "chat model",
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
                    "the model the LoRA is trained for: a Stable Diffusion .safetensors/.ckpt file or \
                     diffusers folder, or a chat model's Hugging Face folder; one found on this \
                     computer, or a download",
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
            (None, _) if !current.as_os_str().is_empty() => {
                let name = current
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                match self.models.family_of(current).flatten() {
                    Some(family) => format!("{name} ({})", family_label(family)),
                    None => name,
                }
            }
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
            self.pick_base_model(path);
        }
        response
    }

    /// The family of the base model, once known (from the list or the files thread).
    pub(super) fn base_family(&self) -> Option<BaseFamily> {
        self.models
            .family_of(&self.settings.train.base_model)
            .flatten()
    }

    /// The family whose presets and estimate the Train view shows: chat models' in text mode; else the
    /// base model's, else the chosen preset's, else Stable Diffusion 1.x/2.x.
    pub(super) fn offered_family(&self) -> BaseFamily {
        if self.text_mode() {
            return BaseFamily::Language;
        }
        match self.base_family() {
            Some(family @ (BaseFamily::Sd | BaseFamily::Sdxl)) => family,
            _ => super::presets::preset_kind(&self.settings.preset)
                .map(|(family, _)| family)
                .filter(|family| *family != BaseFamily::Language)
                .unwrap_or(BaseFamily::Sd),
        }
    }

    /// The parameters of the base model, as its size in the model list tells them.
    pub(super) fn base_parameters(&self) -> Option<f64> {
        let model = self.models.at(&self.settings.train.base_model)?;
        let bytes_per_parameter = match model.precision.as_str() {
            "f32" | "fp32" => 4.0,
            _ => 2.0,
        };
        Some(model.size_bytes as f64 / bytes_per_parameter)
    }

    /// The user chose `path` as the base model (from the list, a dialog or a download).
    pub(super) fn pick_base_model(&mut self, path: PathBuf) {
        self.models.picked = Some((path.clone(), self.offered_family()));
        self.settings.train.base_model = path;
    }

    /// Once a frame: asks the files thread for the family of a base model the list does not name, and
    /// when a picked base turns out to be of another family than the settings were for, switches the
    /// views to its mode (a chat model: text) and applies that family's preset for the same hardware.
    pub(super) fn follow_base_model(&mut self) {
        let path = self.settings.train.base_model.clone();
        let Some(family) = self.models.family_of(&path) else {
            let asked = self.models.describing.as_ref() == Some(&path);
            if !path.as_os_str().is_empty() && self.models.found.is_some() && !asked {
                self.models.describing = Some(path.clone());
                self.worker.send(Job::DescribeModel { path });
            }
            return;
        };
        let Some((picked, before)) = self.models.picked.take() else {
            return;
        };
        let Some(family) = family else {
            return;
        };
        if picked != path {
            return;
        }
        self.set_mode(if family == BaseFamily::Language {
            super::Mode::Text
        } else {
            super::Mode::Images
        });
        if family == before {
            return;
        }
        let fallback = if self.on_gpu() {
            Hardware::GpuGib(8)
        } else {
            Hardware::Cpu
        };
        let Some(name) = counterpart(&self.settings.preset, family, fallback) else {
            return;
        };
        match apply_preset(name, &self.settings.train) {
            Ok(config) => {
                self.settings.train = config;
                self.settings.preset = name.to_string();
                self.notice(
                    false,
                    format!(
                        "the base model is {}: the settings follow the preset “{name}”",
                        family_label(family)
                    ),
                    None,
                );
            }
            Err(e) => self.notice(true, e, None),
        }
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

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::ModelsState;
    use crate::messages::{BaseFamily, ModelChoice, ModelsFound};

    fn found(name: &str, path: &str, base_family: BaseFamily) -> ModelChoice {
        ModelChoice {
            path: path.into(),
            name: name.to_string(),
            family: String::new(),
            base_family,
            group: String::new(),
            size_bytes: 0,
            precision: String::new(),
            source: String::new(),
        }
    }

    #[test]
    fn a_base_named_as_the_list_names_it_has_that_models_family() {
        let mut state = ModelsState {
            found: Some(ModelsFound {
                models: vec![
                    found(
                        "sd_xl_base_1.0",
                        "/m/sd_xl_base_1.0.safetensors",
                        BaseFamily::Sdxl,
                    ),
                    found("twin", "/a/twin.safetensors", BaseFamily::Sd),
                    found("twin", "/b/twin.safetensors", BaseFamily::Sdxl),
                ],
                lora_folders: Vec::new(),
                downloads: Vec::new(),
            }),
            ..Default::default()
        };
        let family = |state: &ModelsState, path: &str| state.family_of(Path::new(path));
        assert_eq!(
            family(&state, "SD_XL_BASE_1.0"),
            Some(Some(BaseFamily::Sdxl))
        );
        assert_eq!(
            family(&state, "/a/twin.safetensors"),
            Some(Some(BaseFamily::Sd))
        );
        // A name two models share says nothing; an unknown one waits for the files thread.
        assert_eq!(family(&state, "twin"), None);
        state.described("mine.safetensors".into(), None);
        assert_eq!(family(&state, "mine.safetensors"), Some(None));
    }
}
