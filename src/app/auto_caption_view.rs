//! The dataset view's auto-caption bar: which models, a prefix, "Caption empty images", "Re-caption all…"
//! (after a confirmation), and while it runs what it is doing, how far along, and Cancel. Captions stream
//! into the grid as the worker saves them.

use eframe::egui;

use super::StudioApp;
use crate::messages::{AutoCaptionRequest, Job};

/// Where auto-captioning is.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AutoCaptionState {
    pub running: bool,
    /// The running job replaces existing captions.
    pub overwrite: bool,
    /// What the worker is doing (downloading, loading, captioning) and how far along.
    pub activity: String,
    pub done: u64,
    pub total: u64,
    /// "Re-caption all…" was pressed and waits for a yes.
    pub confirming: bool,
    pub cancelling: bool,
}

impl StudioApp {
    pub(super) fn auto_caption_ui(&mut self, ui: &mut egui::Ui) {
        let state = self.auto_caption.clone();
        ui.horizontal(|ui| {
            if state.running {
                let fraction = if state.total > 0 {
                    state.done as f32 / state.total as f32
                } else {
                    0.0
                };
                ui.label(format!("Auto-caption: {}", state.activity));
                ui.add(
                    egui::ProgressBar::new(fraction)
                        .desired_width(180.0)
                        .text(format!("{}/{}", state.done, state.total)),
                );
                let cancel = ui.add_enabled(!state.cancelling, egui::Button::new("Cancel"));
                if cancel.clicked() {
                    self.auto_caption.cancelling = true;
                    self.worker.send(Job::CancelAutoCaption);
                }
                return;
            }
            let label = ui.label("Auto-caption with");
            ui.add(
                egui::TextEdit::singleline(&mut self.settings.auto_caption.models)
                    .desired_width(160.0)
                    .hint_text("blip, clip"),
            )
            .labelled_by(label.id)
            .on_hover_text(
                "blip (a sentence), clip (style tags), a model folder or a Hugging Face repository; \
                 separate several with commas",
            );
            let label = ui.label("prefix");
            ui.add(
                egui::TextEdit::singleline(&mut self.settings.auto_caption.prefix)
                    .desired_width(100.0),
            )
            .labelled_by(label.id);
            let missing = self.dataset.captions.iter().filter(|c| c.trim().is_empty()).count();
            let has_models = !self.settings.auto_caption.model_names().is_empty();
            let empty = ui
                .add_enabled(
                    has_models && missing > 0,
                    egui::Button::new(format!("Caption {missing} empty")),
                )
                .on_hover_text("write a caption for every image that has none");
            if empty.clicked() {
                self.start_auto_caption(false);
            }
            if ui
                .add_enabled(has_models, egui::Button::new("Re-caption all…"))
                .clicked()
            {
                self.auto_caption.confirming = true;
            }
        });
        if self.auto_caption.confirming {
            let count = self.dataset.captions.len();
            ui.horizontal(|ui| {
                ui.colored_label(
                    ui.visuals().warn_fg_color,
                    format!("Replace the captions of all {count} images with new ones?"),
                );
                if ui.button("Replace all").clicked() {
                    self.auto_caption.confirming = false;
                    self.start_auto_caption(true);
                }
                if ui.button("Keep them").clicked() {
                    self.auto_caption.confirming = false;
                }
            });
        }
    }

    fn start_auto_caption(&mut self, overwrite: bool) {
        let Some(view) = &self.dataset.view else {
            return;
        };
        let prefix = self.settings.auto_caption.prefix.trim();
        self.worker.send(Job::AutoCaption(AutoCaptionRequest {
            root: view.root.clone(),
            models: self.settings.auto_caption.model_names(),
            prefix: (!prefix.is_empty()).then(|| prefix.to_string()),
            overwrite,
            metadata_csv: view.metadata_csv.clone(),
            caption_extension: self.settings.train.caption_extension.clone(),
            device: self.settings.train.device.to_string(),
        }));
        self.auto_caption = AutoCaptionState {
            running: true,
            overwrite,
            activity: "starting".to_string(),
            ..AutoCaptionState::default()
        };
    }
}
