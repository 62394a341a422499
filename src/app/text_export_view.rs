//! The export view of a language model's adapter: from any complete checkpoint of the output folder, the
//! PEFT adapter folder (transformers, vLLM, LLaMA-Factory), the llama.cpp GGUF adapter, a merged model
//! folder, and "Copy to Ollama": a Modelfile (`FROM` the base, `ADAPTER` the GGUF file) with the
//! `ollama create` command to run.

use eframe::egui;

use super::StudioApp;
use crate::messages::{Job, LanguageExportRequest, LanguageExports};

impl StudioApp {
    pub(super) fn text_export_tab_ui(&mut self, ui: &mut egui::Ui) {
        self.checkpoint_picker_ui(ui);
        let checkpoint = self.run.export_checkpoint().cloned();
        ui.horizontal(|ui| {
            let label = ui.label("Name");
            ui.add(egui::TextEdit::singleline(
                &mut self.settings.train.output_name,
            ))
            .labelled_by(label.id);
        });
        super::export_view::precision_ui(ui, &mut self.settings.export.precision);
        let x = &mut self.settings.text_export;
        ui.checkbox(
            &mut x.peft,
            "PEFT adapter folder (transformers + peft, vLLM, LLaMA-Factory)",
        );
        ui.checkbox(&mut x.gguf, "GGUF adapter (llama.cpp: llama-cli --lora)");
        ui.checkbox(
            &mut x.merged,
            "Merged model folder (the base with the adapter folded in, bf16)",
        );
        ui.checkbox(
            &mut x.ollama,
            "Copy to Ollama (a Modelfile next to the adapter)",
        );
        let anything = x.peft || x.gguf || x.merged || x.ollama;
        let button = ui.add_enabled(
            checkpoint.is_some() && anything,
            egui::Button::new("Export adapter"),
        );
        if checkpoint.is_none() {
            ui.label("No checkpoint in the output folder yet: train a run first (Stop saves one).");
        }
        if button.clicked()
            && let Some(checkpoint) = checkpoint
        {
            let t = &self.settings.train;
            let x = &self.settings.text_export;
            self.worker.send(Job::ExportLanguage(LanguageExportRequest {
                base_model: t.base_model.clone(),
                device: t.device.clone(),
                checkpoint,
                output_dir: t.output_dir.clone(),
                name: t.output_name.clone(),
                precision: self.settings.export.precision,
                peft: x.peft,
                gguf: x.gguf,
                merged: x.merged,
                ollama: x.ollama,
            }));
        }
        if let Some(exports) = &self.language_exports {
            ui.separator();
            exports_ui(ui, exports);
        }
    }
}

/// What the last export wrote, with the Ollama command to copy.
fn exports_ui(ui: &mut egui::Ui, exports: &LanguageExports) {
    let written = [
        ("PEFT adapter", &exports.peft_folder),
        ("GGUF adapter", &exports.gguf_file),
        ("merged model", &exports.merged_folder),
        ("Modelfile", &exports.modelfile),
    ];
    for (what, path) in written {
        if let Some(path) = path {
            ui.label(format!("{what}: {}", path.display()));
        }
    }
    if let Some(command) = &exports.ollama_command {
        ui.label("Make an Ollama model of it:");
        ui.horizontal(|ui| {
            ui.code(command);
            if ui.button("Copy command").clicked() {
                ui.ctx().copy_text(command.clone());
            }
        });
    }
}
