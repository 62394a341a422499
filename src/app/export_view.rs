//! The export view: name, precision, format, and "Copy to WebUI" (the LoRA folder is picked once and
//! remembered), writing a LoRA file from any complete checkpoint in the output folder (the newest unless
//! another is picked).

use eframe::egui;

use super::{Dialog, DialogResult, StudioApp};
use crate::config::SavePrecision;
use crate::messages::{ExportFormat, ExportRequest, Job};

impl StudioApp {
    pub(super) fn export_tab_ui(&mut self, ui: &mut egui::Ui) {
        let ctx = ui.ctx().clone();
        self.checkpoint_picker_ui(ui);
        let checkpoint = self.run.export_checkpoint().cloned();
        ui.horizontal(|ui| {
            let label = ui.label("Name");
            ui.add(egui::TextEdit::singleline(
                &mut self.settings.train.output_name,
            ))
            .labelled_by(label.id);
        });
        let e = &mut self.settings.export;
        precision_ui(ui, &mut e.precision);
        ui.horizontal(|ui| {
            ui.label("Format");
            ui.radio_value(
                &mut e.format,
                ExportFormat::Kohya,
                "kohya (AUTOMATIC1111, Forge, ComfyUI)",
            );
            ui.radio_value(
                &mut e.format,
                ExportFormat::KohyaAndPeft,
                "kohya + diffusers/PEFT",
            );
        });
        let mut pick_folder = false;
        ui.horizontal(|ui| {
            ui.checkbox(&mut e.copy_to_ui, "Copy to WebUI / ComfyUI");
            pick_folder = ui.button("LoRA folder…").clicked();
            match &e.ui_lora_folder {
                Some(folder) => ui.label(folder.display().to_string()),
                None => ui.label("models/Lora (WebUI) or models/loras (ComfyUI)"),
            };
        });
        if pick_folder {
            self.pick(&ctx, Dialog::Folder, DialogResult::UiLoraFolder);
        }
        let button = ui.add_enabled(checkpoint.is_some(), egui::Button::new("Export LoRA"));
        if checkpoint.is_none() {
            ui.label("No checkpoint in the output folder yet: train a run first (Stop saves one).");
        }
        if button.clicked()
            && let Some(checkpoint) = checkpoint
        {
            let e = &self.settings.export;
            let t = &self.settings.train;
            self.worker.send(Job::Export(ExportRequest {
                base_model: t.base_model.clone(),
                device: t.device.clone(),
                prediction_type: t.prediction_type,
                checkpoint,
                output: t.output_dir.join(format!("{}.safetensors", t.output_name)),
                precision: e.precision,
                format: e.format,
                copy_to: if e.copy_to_ui {
                    e.ui_lora_folder.clone()
                } else {
                    None
                },
            }));
        }
        for path in &self.preview.exported {
            ui.label(format!("written: {}", path.display()));
        }
    }

    /// Chooses which checkpoint of the output folder is exported (the newest unless picked).
    pub(super) fn checkpoint_picker_ui(&mut self, ui: &mut egui::Ui) {
        let name = |path: &std::path::Path| {
            path.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        };
        ui.horizontal(|ui| {
            let label = ui.label("Checkpoint");
            let shown = self
                .run
                .export_checkpoint()
                .map_or_else(|| "none".to_string(), |p| name(p));
            let mut choice = self.run.export_checkpoint().cloned();
            egui::ComboBox::from_id_salt("export checkpoint")
                .selected_text(shown)
                .show_ui(ui, |ui| {
                    for (step, path) in self.run.checkpoints.iter().rev() {
                        ui.selectable_value(
                            &mut choice,
                            Some(path.clone()),
                            format!("{} (step {step})", name(path)),
                        );
                    }
                })
                .response
                .labelled_by(label.id);
            if choice.as_ref() != self.run.export_checkpoint() {
                self.run.export_choice = choice;
            }
            ui.label(format!("in {}", self.settings.train.output_dir.display()));
        });
    }
}

/// The element type an export writes its tensors in.
pub(super) fn precision_ui(ui: &mut egui::Ui, precision: &mut SavePrecision) {
    ui.horizontal(|ui| {
        ui.label("Precision");
        ui.radio_value(precision, SavePrecision::Fp16, "fp16");
        ui.radio_value(precision, SavePrecision::Bf16, "bf16");
        ui.radio_value(precision, SavePrecision::Fp32, "fp32");
    });
}
