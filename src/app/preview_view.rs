//! The preview view: prompt, seed, steps and size, and a LoRA strength slider that re-renders the same
//! prompt and seed with the current adapters (debounced; the newest request wins), during or after
//! training. A grid compares strengths over the last checkpoints. The WebUI prompt is shown, copyable.

use eframe::egui;

use super::StudioApp;
use super::estimate::native_resolution;
use super::state::GRID_STRENGTHS;
use crate::config::TrainConfig;
use crate::messages::{BaseFamily, Job, PreviewSource};

/// The side of the square bucket training at `train.resolution` (unset: the native size of a base of
/// `family`) uses: the size previews render at until the user chooses one (within the size fields' range).
fn training_preview_side(train: &TrainConfig, family: BaseFamily) -> u32 {
    let step = train.bucket_reso_steps.max(8);
    let resolution = train.resolution.unwrap_or(native_resolution(family));
    ((resolution / step).max(1) * step).clamp(*PREVIEW_SIDES.start(), *PREVIEW_SIDES.end())
}

/// The preview sizes the fields offer.
const PREVIEW_SIDES: std::ops::RangeInclusive<u32> = 64..=1536;

impl StudioApp {
    /// Until the user sets a preview size, previews render at the training resolution.
    pub(super) fn follow_training_size(&mut self) {
        let family = self.offered_family();
        let preview = &mut self.settings.preview;
        if !preview.size_chosen {
            let side = training_preview_side(&self.settings.train, family);
            (preview.width, preview.height) = (side, side);
        }
    }

    pub(super) fn preview_tab_ui(&mut self, ui: &mut egui::Ui) {
        let mut changed = false;
        // A caption from the dataset is the natural first prompt to try.
        let example = self
            .dataset
            .captions
            .iter()
            .find(|c| !c.trim().is_empty())
            .map_or_else(
                || "a city street at night".to_string(),
                |c| format!("e.g. {c}"),
            );
        let p = &mut self.settings.preview;
        for (label, text, hint) in [
            ("Prompt", &mut p.prompt, example.as_str()),
            ("Negative prompt", &mut p.negative_prompt, ""),
        ] {
            ui.horizontal(|ui| {
                let label = ui.label(label);
                changed |= ui
                    .add(
                        egui::TextEdit::singleline(text)
                            .hint_text(hint)
                            .desired_width(480.0),
                    )
                    .labelled_by(label.id)
                    .changed();
            });
        }
        ui.horizontal(|ui| {
            let mut labelled = |ui: &mut egui::Ui, label: &str, value: egui::DragValue<'_>| {
                let label = ui.label(label);
                changed |= ui.add(value).labelled_by(label.id).changed();
            };
            labelled(ui, "Seed", egui::DragValue::new(&mut p.seed));
            labelled(
                ui,
                "Steps",
                egui::DragValue::new(&mut p.steps).range(1..=150),
            );
            let size = |value| egui::DragValue::new(value).range(PREVIEW_SIDES).speed(8);
            let size_before = (p.width, p.height);
            labelled(ui, "Width", size(&mut p.width));
            labelled(ui, "Height", size(&mut p.height));
            p.size_chosen |= (p.width, p.height) != size_before;
            labelled(
                ui,
                "CFG",
                egui::DragValue::new(&mut p.cfg)
                    .range(1.0..=30.0)
                    .speed(0.1),
            );
            p.width -= p.width % 8;
            p.height -= p.height % 8;
            if p.size_chosen
                && ui
                    .button("Training size")
                    .on_hover_text("render at the training resolution again")
                    .clicked()
            {
                p.size_chosen = false;
                changed = true;
            }
        });
        ui.horizontal(|ui| {
            changed |= ui
                .add(
                    egui::Slider::new(&mut p.strength, 0.0..=1.5)
                        .text("LoRA strength")
                        .step_by(0.05),
                )
                .changed();
        });
        let name = self.settings.train.output_name.clone();
        let webui = format!("<lora:{name}:{:.2}>", self.settings.preview.strength);
        ui.horizontal(|ui| {
            ui.label("In WebUI:");
            ui.code(&webui);
            if ui.button("Copy").clicked() {
                ui.ctx().copy_text(webui.clone());
            }
            if ui.button("Render").clicked() {
                changed = true;
            }
        });
        if changed && !self.settings.preview.prompt.trim().is_empty() {
            self.preview.changed();
        }
        let shown_id = self.preview.shown.as_ref().map_or(0, |s| s.id);
        if self.preview.requested_id > shown_id {
            ui.horizontal(|ui| {
                ui.spinner();
                ui.label("rendering…");
            });
        }
        match &self.preview.shown {
            Some(shown) => {
                ui.label(format!(
                    "strength {:.2}, rendered in {:.1} s",
                    shown.strength, shown.seconds
                ));
                let size = egui::vec2(
                    self.settings.preview.width as f32,
                    self.settings.preview.height as f32,
                );
                let scale = (ui.available_height() - 160.0).max(128.0) / size.y;
                ui.add(egui::Image::new(&shown.texture).fit_to_exact_size(size * scale.min(1.0)));
            }
            None if self.settings.preview.prompt.trim().is_empty() => {
                ui.label("Type a prompt: the preview renders with the current adapters at the chosen strength.");
            }
            None => {}
        }
        self.comparison_grid_ui(ui);
    }

    fn comparison_grid_ui(&mut self, ui: &mut egui::Ui) {
        ui.separator();
        let checkpoints: Vec<_> = self
            .run
            .checkpoints
            .iter()
            .rev()
            .take(4)
            .rev()
            .map(|(_, p)| p.clone())
            .collect();
        ui.horizontal(|ui| {
            let button = ui.add_enabled(
                !checkpoints.is_empty(),
                egui::Button::new("Compare checkpoints"),
            );
            if button
                .on_hover_text("strengths 0, 0.4, 0.8, 1.2 over the last 4 checkpoints")
                .clicked()
            {
                self.preview.grid.clear();
                self.preview.grid_checkpoints = checkpoints.clone();
                let request = self.preview.request(&self.settings, PreviewSource::Live);
                self.worker.send(Job::PreviewGrid {
                    request,
                    strengths: GRID_STRENGTHS.to_vec(),
                    checkpoints: checkpoints.clone(),
                });
            }
        });
        if self.preview.grid_checkpoints.is_empty() {
            return;
        }
        egui::Grid::new("strength-grid").show(ui, |ui| {
            ui.label("");
            for strength in GRID_STRENGTHS {
                ui.label(format!("{strength:.1}"));
            }
            ui.end_row();
            for checkpoint in &self.preview.grid_checkpoints {
                ui.label(
                    checkpoint
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                );
                for strength in GRID_STRENGTHS {
                    match self
                        .preview
                        .grid
                        .get(&(checkpoint.clone(), (strength * 100.0).round() as i64))
                    {
                        Some(texture) => ui.add(
                            egui::Image::new(texture).fit_to_exact_size(egui::vec2(128.0, 128.0)),
                        ),
                        None => ui.spinner(),
                    };
                }
                ui.end_row();
            }
        });
    }
}
