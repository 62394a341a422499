//! The desktop app (feature `gui`). The UI thread never touches candle: it sends jobs to the worker and
//! draws the events it gets back. This first version opens the window and shows what the build can do.

use eframe::egui;

use crate::build_info::LONG_VERSION;

/// Opens the main window and runs until it is closed.
pub fn run() -> anyhow::Result<()> {
    let options = eframe::NativeOptions {
        viewport: egui::ViewportBuilder::default()
            .with_title("lora-studio")
            .with_inner_size([960.0, 640.0]),
        ..Default::default()
    };
    eframe::run_native(
        "lora-studio",
        options,
        Box::new(|_cc| Ok(Box::new(StudioApp))),
    )
    .map_err(|e| anyhow::anyhow!("the window could not be opened: {e}"))
}

/// The app state.
#[derive(Debug, Default)]
pub struct StudioApp;

impl StudioApp {
    /// Draws the whole window.
    pub fn main_ui(&mut self, ui: &mut egui::Ui) {
        ui.heading("lora-studio");
        ui.label(format!("version {LONG_VERSION}"));
        ui.add_space(8.0);
        ui.label("Train LoRA style adapters for Stable Diffusion on your own images.");
        ui.label(
            "The dataset, training and preview views arrive in the next releases; the command line",
        );
        ui.label("already generates images: lora-studio generate --help");
    }
}

impl eframe::App for StudioApp {
    fn ui(&mut self, ui: &mut egui::Ui, _frame: &mut eframe::Frame) {
        egui::CentralPanel::default().show(ui, |ui| self.main_ui(ui));
    }
}
