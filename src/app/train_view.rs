//! The training view: base model and output, a preset by hardware, the settings people tune most (with
//! help on hover), everything else under "Advanced", an estimate of a step's memory and time, the run
//! controls, the progress bar and the live loss chart.

use std::path::{Path, PathBuf};

use eframe::egui;

use super::chart::loss_chart_ui;
use super::estimate::{
    MEASURED_CHAT_PARAMETERS, Processor, estimate, estimate_chat, native_resolution,
};
use super::presets::{apply_preset, preset_names};
use super::state::RunStatus;
use super::{Dialog, DialogResult, StudioApp};
use crate::config::{
    LANGUAGE_MODEL_TARGETS, LrScheduler, MixedPrecision, OptimizerKind, TrainConfig, validate,
};
use crate::messages::{BaseFamily, Job};

/// A slider that never changes a value loaded from a config file, even one outside its range.
fn setting_slider<'a, N: egui::emath::Numeric>(
    value: &'a mut N,
    range: std::ops::RangeInclusive<N>,
) -> egui::Slider<'a> {
    egui::Slider::new(value, range).clamping(egui::SliderClamping::Edits)
}

/// A path setting with the dialogs that choose it.
struct PathChoice {
    label: &'static str,
    help: &'static str,
    path: PathBuf,
    buttons: &'static [(&'static str, Dialog)],
    result: fn(PathBuf) -> DialogResult,
}

/// A path in the width left: shortened in the middle when it does not fit (its start and its file name
/// stay), the full path on hover. A full long path would widen the settings panel.
pub(super) fn path_label_ui(ui: &mut egui::Ui, path: &Path) -> egui::Response {
    let full = path.display().to_string();
    let font = egui::TextStyle::Body.resolve(ui.style());
    let width_of = |text: &str| {
        ui.painter()
            .layout_no_wrap(text.to_string(), font.clone(), egui::Color32::PLACEHOLDER)
            .size()
            .x
    };
    let shown = elide_middle(&full, ui.available_width(), width_of);
    ui.add(egui::Label::new(shown).wrap_mode(egui::TextWrapMode::Extend))
        .on_hover_text(full)
}

/// `text` with characters from its middle replaced by "…" until `width_of` it is at most `max_width`
/// (keeping three times as much of the end, where the file name is, as of the start; just "…" when
/// nothing else fits).
fn elide_middle(text: &str, max_width: f32, width_of: impl Fn(&str) -> f32) -> String {
    if width_of(text) <= max_width {
        return text.to_string();
    }
    let chars: Vec<char> = text.chars().collect();
    let keeping = |kept: usize| {
        let head = kept / 4;
        let tail = kept - head;
        let start: String = chars[..head].iter().collect();
        let end: String = chars[chars.len() - tail..].iter().collect();
        format!("{start}…{end}")
    };
    // The most characters kept that still fit: fewer kept is never wider.
    let (mut fits, mut too_many) = (0, chars.len());
    while too_many - fits > 1 {
        let middle = (fits + too_many) / 2;
        if width_of(&keeping(middle)) <= max_width {
            fits = middle;
        } else {
            too_many = middle;
        }
    }
    keeping(fits)
}

/// A labelled row with hover help; the label names the widget `add` returns (for screen readers).
fn row(
    ui: &mut egui::Ui,
    label: &str,
    help: &str,
    add: impl FnOnce(&mut egui::Ui) -> egui::Response,
) -> egui::Response {
    ui.horizontal(|ui| {
        let label = ui.label(label).on_hover_text(help);
        add(ui).labelled_by(label.id)
    })
    .inner
}

impl StudioApp {
    /// Whether a run would train on a GPU: a GPU build with no CPU device asked for.
    pub(super) fn on_gpu(&self) -> bool {
        crate::build_info::BACKENDS != "cpu" && self.settings.train.device != "cpu"
    }

    pub(super) fn train_tab_ui(&mut self, ui: &mut egui::Ui) {
        egui::Panel::left("train-settings")
            .resizable(true)
            .default_size(380.0)
            .show(ui, |ui| {
                egui::ScrollArea::vertical().show(ui, |ui| self.settings_ui(ui));
            });
        egui::CentralPanel::default().show(ui, |ui| self.run_ui(ui));
    }

    fn settings_ui(&mut self, ui: &mut egui::Ui) {
        let ctx = ui.ctx().clone();
        let running = self.run.active();
        ui.add_enabled_ui(!running, |ui| {
            ui.horizontal(|ui| {
                if ui
                    .button("Open settings…")
                    .on_hover_text("a TOML, YAML or JSON training config, kohya key names included")
                    .clicked()
                {
                    self.pick(&ctx, Dialog::OpenConfig, DialogResult::OpenConfig);
                }
                if ui
                    .button("Save settings…")
                    .on_hover_text(
                        "a TOML file that `lora-studio train --config FILE` runs headless",
                    )
                    .clicked()
                {
                    self.pick(&ctx, Dialog::SaveConfig, DialogResult::SaveConfig);
                }
            });
            ui.heading("Model and output");
            self.base_model_ui(ui);
            let choices = [PathChoice {
                    label: "Output folder",
                    help: "checkpoints, logs, samples and the LoRA file go here",
                    path: self.settings.train.output_dir.clone(),
                    buttons: &[("Choose…", Dialog::Folder)],
                    result: DialogResult::OutputFolder,
            }];
            for choice in choices {
                // The path goes on its own line, where it has the panel's whole width.
                let label = ui
                    .horizontal(|ui| {
                        let label = ui.label(choice.label).on_hover_text(choice.help);
                        for &(text, dialog) in choice.buttons {
                            if ui.button(text).clicked() {
                                self.pick(&ctx, dialog, choice.result);
                            }
                        }
                        label
                    })
                    .inner;
                let path = if choice.path.as_os_str().is_empty() {
                    ui.weak("not chosen")
                } else {
                    path_label_ui(ui, &choice.path)
                };
                path.labelled_by(label.id);
            }
            row(
                ui,
                "Output name",
                "the LoRA file name; in WebUI you write <lora:NAME:0.8>",
                |ui| ui.text_edit_singleline(&mut self.settings.train.output_name),
            );
            ui.separator();
            let before = self.settings.preset.clone();
            let family = self.offered_family();
            row(
                ui,
                "Preset",
                "settings for your hardware; you can change any of them afterwards",
                |ui| {
                    egui::ComboBox::from_id_salt("preset")
                        .selected_text(if before.is_empty() {
                            "choose…"
                        } else {
                            before.as_str()
                        })
                        .show_ui(ui, |ui| {
                            for name in preset_names(family) {
                                ui.selectable_value(
                                    &mut self.settings.preset,
                                    name.to_string(),
                                    name,
                                );
                            }
                        })
                        .response
                },
            );
            if self.settings.preset != before {
                match apply_preset(&self.settings.preset, &self.settings.train) {
                    Ok(config) => self.settings.train = config,
                    Err(e) => self.notice(true, e, None),
                }
            }
            ui.separator();
            ui.heading("Training");
            let text = self.text_mode();
            let t = &mut self.settings.train;
            row(
                ui,
                "Rank",
                "adapter size; 8-32 for a style, higher learns more detail and overfits sooner",
                |ui| ui.add(setting_slider(&mut t.lora_rank, 1..=128).logarithmic(true)),
            );
            row(
                ui,
                "Alpha",
                "scales the adapter by alpha/rank; rank/2 is a common choice",
                |ui| ui.add(setting_slider(&mut t.lora_alpha, 0.5..=128.0).logarithmic(true)),
            );
            if text {
                text_settings_ui(ui, t);
            } else {
                row(
                    ui,
                    "Conv LoRA (LoCon)",
                    "also adapt the 3x3 convolutions: more texture, bigger file",
                    |ui| ui.checkbox(&mut t.conv_lora, ""),
                );
                row(
                    ui,
                    "Train text encoder",
                    "also adapt CLIP; helps trigger words, can overfit captions",
                    |ui| ui.checkbox(&mut t.train_text_encoder, ""),
                );
            }
            row(
                ui,
                "Learning rate",
                "1e-4 is a safe start; too high breaks details",
                |ui| {
                    ui.add(
                        setting_slider(&mut t.learning_rate, 1e-6..=1e-2)
                            .logarithmic(true)
                            .custom_formatter(|v, _| format!("{v:.1e}")),
                    )
                },
            );
            let mut by_steps = t.max_train_steps.is_some();
            row(
                ui,
                "Length",
                "epochs go through every image (times its repeats) once",
                |ui| {
                    ui.radio_value(&mut by_steps, false, "epochs")
                        | ui.radio_value(&mut by_steps, true, "steps")
                },
            );
            if by_steps {
                let mut steps = t.max_train_steps.unwrap_or(1000);
                row(ui, "Steps", "optimizer steps to train", |ui| {
                    ui.add(egui::DragValue::new(&mut steps).range(1..=1_000_000))
                });
                t.max_train_steps = Some(steps);
            } else {
                t.max_train_steps = None;
                row(ui, "Epochs", "passes over the dataset", |ui| {
                    ui.add(setting_slider(&mut t.epochs, 1..=100))
                });
            }
            row(
                ui,
                "Batch size",
                if text {
                    "rows of max-sequence-length tokens per step; lower it first when memory runs out"
                } else {
                    "images per step; lower it first when memory runs out"
                },
                |ui| ui.add(setting_slider(&mut t.batch_size, 1..=16)),
            );
            if !text {
                row(
                    ui,
                    "Resolution",
                    "training size in pixels; buckets keep the same area for other aspect ratios",
                    |ui| {
                        let mut resolution = t.resolution.unwrap_or(native_resolution(family));
                        let response =
                            ui.add(setting_slider(&mut resolution, 256..=1024).step_by(64.0));
                        if response.changed() {
                            t.resolution = Some(resolution);
                        }
                        response
                    },
                );
            }
            row(
                ui,
                "Gradient accumulation",
                "steps whose gradients are summed before an update",
                |ui| ui.add(setting_slider(&mut t.gradient_accumulation_steps, 1..=16)),
            );
            row(
                ui,
                "Save every N steps",
                "a resumable checkpoint every N steps (0: only at the end)",
                |ui| ui.add(egui::DragValue::new(&mut t.save_steps).range(0..=100_000)),
            );
            row(
                ui,
                "Save every N epochs",
                "also a checkpoint at the end of every N epochs, to compare epochs afterwards (0: no)",
                |ui| ui.add(egui::DragValue::new(&mut t.save_every_n_epochs).range(0..=1_000)),
            );
            row(
                ui,
                "Mixed precision",
                "GPU compute precision; on the CPU, Bf16 stores the frozen weights in bf16 and makes the \
                 matrix products bf16 ones on processors with AMX (Xeon 4th generation and later) or \
                 AVX-512 BF16 (AMD Zen 4 and later), 1.6-2.3x \
                 faster; adapters always stay f32",
                |ui| {
                    egui::ComboBox::from_id_salt("precision")
                        .selected_text(format!("{:?}", t.mixed_precision))
                        .show_ui(ui, |ui| {
                            for p in [
                                MixedPrecision::Auto,
                                MixedPrecision::Bf16,
                                MixedPrecision::Fp16,
                                MixedPrecision::No,
                            ] {
                                ui.selectable_value(&mut t.mixed_precision, p, format!("{p:?}"));
                            }
                        })
                        .response
                },
            );
            row(ui, "Seed", "the same seed gives the same run", |ui| {
                ui.add(egui::DragValue::new(&mut t.seed))
            });
            egui::CollapsingHeader::new("Advanced").show(ui, |ui| advanced_ui(ui, t));
        });
        ui.separator();
        ui.label(self.estimate_line());
    }

    /// The rough estimate of a step's memory and time (tokens per second for a chat model).
    fn estimate_line(&self) -> String {
        let on_gpu = self.on_gpu();
        let family = self.offered_family();
        let hardware = if on_gpu { "GPU" } else { "CPU" };
        let processor = if on_gpu {
            Processor::Gpu
        } else {
            Processor::Cpu {
                bf16_products: crate::device::cpu_has_bf16_products(),
            }
        };
        let t = &self.settings.train;
        if family == BaseFamily::Language {
            let parameters = self.base_parameters().unwrap_or(MEASURED_CHAT_PARAMETERS);
            let step = estimate_chat(t, processor, parameters);
            let tokens = (t.batch_size * t.max_seq_length * t.gradient_accumulation_steps) as f64;
            return format!(
                "Rough estimate for a {:.1}B-parameter chat model on this {hardware}: {:.1} GiB of \
                 memory, {:.0} tokens/s ({:.1} s per step of up to {tokens} tokens)",
                parameters / 1e9,
                step.memory_gib,
                tokens / step.seconds,
                step.seconds,
            );
        }
        let step = estimate(t, processor, family);
        format!(
            "Rough estimate for {} model on this {hardware}: {:.1} GiB of memory, {:.1} s per step",
            match family {
                BaseFamily::Sdxl => "an SDXL",
                BaseFamily::Sd | BaseFamily::Language => "an SD 1.5",
            },
            step.memory_gib,
            step.seconds
        )
    }

    fn run_ui(&mut self, ui: &mut egui::Ui) {
        ui.horizontal(|ui| {
            match self.run.status {
                RunStatus::Idle => {
                    if ui.button("Start training").clicked() {
                        self.start_run(None);
                    }
                    let newest = self.run.checkpoints.last().map(|(step, _)| *step);
                    let resume = ui
                        .add_enabled(
                            newest.is_some(),
                            egui::Button::new(match newest {
                                Some(step) => format!("Resume from step {step}"),
                                None => "Resume from checkpoint".to_string(),
                            }),
                        )
                        .on_hover_text("continue from the newest checkpoint in the output folder")
                        .on_disabled_hover_text("no checkpoint in the output folder yet");
                    if resume.clicked() {
                        let output = self.settings.train.output_dir.clone();
                        self.start_run(Some(output));
                    }
                }
                RunStatus::Training => {
                    if ui.button("Pause").clicked() {
                        self.worker.send(Job::Pause);
                    }
                    if ui
                        .button("Stop")
                        .on_hover_text("saves a checkpoint and the LoRA")
                        .clicked()
                    {
                        self.worker.send(Job::Stop);
                        self.run.status = RunStatus::Stopping;
                    }
                }
                RunStatus::Paused => {
                    if ui.button("Resume").clicked() {
                        self.worker.send(Job::Resume);
                    }
                    if ui.button("Stop").clicked() {
                        self.worker.send(Job::Stop);
                        self.run.status = RunStatus::Stopping;
                    }
                }
                RunStatus::Starting | RunStatus::Stopping => {
                    ui.spinner();
                }
            }
            ui.label(self.run.status_line());
        });
        if self.run.total_steps > 0 {
            let fraction = self.run.step() as f32 / self.run.total_steps as f32;
            ui.add(egui::ProgressBar::new(fraction).text(format!(
                "{}/{}",
                self.run.step(),
                self.run.total_steps
            )));
        }
        if let Some((stage, done, total)) = &self.run.stage {
            ui.label(format!("{stage}: {done}/{total}"));
        }
        loss_chart_ui(ui, &self.run.losses, self.run.steps_per_epoch);
        ui.collapsing("When the results are not right", |ui| {
            ui.label("Out of memory: lower the batch size to 1-2 and the rank to 4-8, or turn on gradient checkpointing.");
            ui.label("The loss stays flat: raise the rank, train longer, improve the captions.");
            ui.label("Details break or colours burn: fewer epochs, learning rate 1e-4.");
        });
    }

    /// Validates the settings, saves pending caption edits, and starts (or resumes) a run.
    fn start_run(&mut self, resume: Option<std::path::PathBuf>) {
        let t = &self.settings.train;
        let missing = if t.train_data_dir.as_os_str().is_empty() {
            Some(if self.text_mode() {
                "Open a dataset first: drop a .jsonl file of conversations (or a folder of them) on the window."
            } else {
                "Open a dataset folder first (Dataset tab, or drop it on the window)."
            })
        } else if t.base_model.as_os_str().is_empty() && self.text_mode() {
            Some("Choose a chat model first: a Hugging Face model folder (Folder…) or a download.")
        } else if self.text_mode()
            && self
                .base_family()
                .is_some_and(|family| family != BaseFamily::Language)
        {
            Some(
                "The base model makes images, and the dataset holds conversations: choose a chat model (a Hugging Face model folder) to train on them.",
            )
        } else if t.base_model.as_os_str().is_empty() {
            Some(
                "Choose a base model first: a Stable Diffusion file (File…) or diffusers folder (Folder…).",
            )
        } else {
            None
        };
        if let Some(message) = missing {
            self.notice(true, message.to_string(), None);
            return;
        }
        if let Err(e) = validate(&self.settings.train) {
            self.notice(true, e.to_string(), None);
            return;
        }
        self.flush_captions();
        self.run.status = RunStatus::Starting;
        self.run.waiting_to_start = Some(resume);
        self.start_waiting_run();
    }
}

fn advanced_ui(ui: &mut egui::Ui, t: &mut TrainConfig) {
    row(
        ui,
        "Optimizer",
        "Adafactor keeps almost no optimizer state",
        |ui| {
            egui::ComboBox::from_id_salt("optimizer")
                .selected_text(format!("{:?}", t.optimizer))
                .show_ui(ui, |ui| {
                    ui.selectable_value(&mut t.optimizer, OptimizerKind::AdamW, "AdamW");
                    ui.selectable_value(&mut t.optimizer, OptimizerKind::Adafactor, "Adafactor");
                })
                .response
        },
    );
    row(
        ui,
        "LR schedule",
        "how the learning rate changes over the run",
        |ui| {
            egui::ComboBox::from_id_salt("scheduler")
                .selected_text(format!("{:?}", t.lr_scheduler))
                .show_ui(ui, |ui| {
                    for s in [
                        LrScheduler::Constant,
                        LrScheduler::ConstantWithWarmup,
                        LrScheduler::Linear,
                        LrScheduler::Cosine,
                        LrScheduler::CosineWithRestarts,
                    ] {
                        ui.selectable_value(&mut t.lr_scheduler, s, format!("{s:?}"));
                    }
                })
                .response
        },
    );
    row(
        ui,
        "Warmup steps",
        "steps over which the learning rate rises",
        |ui| ui.add(egui::DragValue::new(&mut t.lr_warmup_steps)),
    );
    row(
        ui,
        "Conv rank / alpha",
        "LoCon's rank and alpha (the LoRA's until changed)",
        |ui| {
            let (mut rank, mut alpha) = (t.conv_rank(), t.conv_alpha());
            let rank_response = ui.add(egui::DragValue::new(&mut rank).range(1..=128));
            let alpha_response = ui.add(egui::DragValue::new(&mut alpha).range(0.1..=128.0));
            if rank_response.changed() {
                t.conv_rank = Some(rank);
            }
            if alpha_response.changed() {
                t.conv_alpha = Some(alpha);
            }
            rank_response | alpha_response
        },
    );
    row(
        ui,
        "Text encoder LR",
        "0 means the same as the learning rate",
        |ui| {
            let mut lr = t.text_encoder_lr.unwrap_or(0.0);
            let response = ui.add(egui::DragValue::new(&mut lr).speed(1e-6).range(0.0..=1e-2));
            t.text_encoder_lr = (lr > 0.0).then_some(lr);
            response
        },
    );
    row(
        ui,
        "Noise offset",
        "helps very dark and very bright images; 0.05 is typical",
        |ui| ui.add(setting_slider(&mut t.noise_offset, 0.0..=0.2)),
    );
    row(
        ui,
        "Min-SNR gamma",
        "reweights timesteps for faster convergence (5 is typical; 0 off)",
        |ui| {
            let mut gamma = t.min_snr_gamma.unwrap_or(0.0);
            let response = ui.add(setting_slider(&mut gamma, 0.0..=20.0));
            t.min_snr_gamma = (gamma > 0.0).then_some(gamma);
            response
        },
    );
    row(
        ui,
        "Flip images",
        "horizontal flips double the variety (not for asymmetric subjects)",
        |ui| ui.checkbox(&mut t.flip_aug, ""),
    );
    row(
        ui,
        "Shuffle tags",
        "shuffles comma-separated tags each step",
        |ui| ui.checkbox(&mut t.shuffle_caption, ""),
    );
    row(
        ui,
        "Keep first tags",
        "tags kept in place when shuffling",
        |ui| ui.add(egui::DragValue::new(&mut t.keep_tokens).range(0..=20)),
    );
    row(
        ui,
        "Caption dropout",
        "share of steps trained with an empty caption",
        |ui| ui.add(setting_slider(&mut t.caption_dropout_rate, 0.0..=0.5)),
    );
    row(
        ui,
        "Buckets",
        "aspect-ratio buckets instead of square crops",
        |ui| ui.checkbox(&mut t.enable_bucket, ""),
    );
    row(
        ui,
        "Cache latents",
        "encode images once (kept on disk for the next run)",
        |ui| ui.checkbox(&mut t.cache_latents, ""),
    );
    row(
        ui,
        "Clip skip",
        "2 for anime models trained that way",
        |ui| ui.add(setting_slider(&mut t.clip_skip, 1..=4)),
    );
    row(
        ui,
        "DoRA",
        "weight-decomposed LoRA (exported as a plain LoRA)",
        |ui| {
            let response = ui.checkbox(&mut t.dora, "");
            if response.changed() && t.dora {
                t.pissa = false;
            }
            response
        },
    );
    row(
        ui,
        "PiSSA init",
        "start from the weights' principal directions",
        |ui| {
            let response = ui.checkbox(&mut t.pissa, "");
            if response.changed() && t.pissa {
                t.dora = false;
            }
            response
        },
    );
    row(
        ui,
        "Gradient checkpointing",
        "recompute instead of storing activations: less memory, slower",
        |ui| ui.checkbox(&mut t.gradient_checkpointing, ""),
    );
    row(ui, "Device", "cpu, cuda, cuda:N, metal or auto", |ui| {
        ui.text_edit_singleline(&mut t.device)
    });
}

/// The settings of a language model's run: the layers that get adapters, the sequence length, what is
/// trained on, packing, the default system prompt and dropout.
fn text_settings_ui(ui: &mut egui::Ui, t: &mut TrainConfig) {
    ui.horizontal_wrapped(|ui| {
        ui.label("Adapted layers").on_hover_text(
            "the linear layers of attention (q, k, v, o) and of the MLP (gate, up, down) that get adapters",
        );
        let mut chosen = t.language_model_targets().unwrap_or_default();
        let mut changed = false;
        for (short, layer) in LANGUAGE_MODEL_TARGETS {
            let mut on = chosen.contains(&layer);
            if ui.checkbox(&mut on, short).on_hover_text(layer).changed() {
                changed = true;
                if on {
                    chosen.push(layer);
                } else {
                    chosen.retain(|l| *l != layer);
                }
            }
        }
        if changed && !chosen.is_empty() {
            t.lora_target_modules = LANGUAGE_MODEL_TARGETS
                .iter()
                .filter(|(_, layer)| chosen.contains(layer))
                .map(|(_, layer)| layer.to_string())
                .collect();
        }
    });
    row(
        ui,
        "Max sequence length",
        "tokens per training row; longer conversations are cut (the dataset view marks them)",
        |ui| {
            ui.add(
                setting_slider(&mut t.max_seq_length, 128..=8192)
                    .logarithmic(true)
                    .step_by(64.0),
            )
        },
    );
    row(
        ui,
        "Train on prompt",
        "also learn the system and user turns, not only the assistant's replies",
        |ui| ui.checkbox(&mut t.train_on_prompt, ""),
    );
    row(
        ui,
        "Packing",
        "put several short conversations in one row (they never see each other): faster",
        |ui| ui.checkbox(&mut t.packing, ""),
    );
    row(
        ui,
        "LoRA dropout",
        "drops adapter inputs at random while training; 0.05 guards small datasets against overfitting",
        |ui| ui.add(setting_slider(&mut t.lora_dropout, 0.0..=0.5)),
    );
    let mut system = t.system_prompt.clone().unwrap_or_default();
    let label = ui.label("System prompt").on_hover_text(
        "given to the conversations that have none, in training and in the chat preview",
    );
    let response = ui
        .add(
            egui::TextEdit::multiline(&mut system)
                .desired_rows(2)
                .desired_width(f32::INFINITY),
        )
        .labelled_by(label.id);
    if response.changed() {
        t.system_prompt = (!system.trim().is_empty()).then_some(system);
    }
}

#[cfg(test)]
mod tests {
    use super::elide_middle;

    /// Width in a font where every character is 7 points wide.
    fn width_of(text: &str) -> f32 {
        text.chars().count() as f32 * 7.0
    }

    #[test]
    fn long_paths_lose_their_middle_and_keep_both_ends() {
        let path = "/home/me/models/stable-diffusion/checkpoints/v1-5-pruned-emaonly.safetensors";
        assert_eq!(elide_middle(path, 1000.0, width_of), path);
        let shown = elide_middle(path, 35.0 * 7.0, width_of);
        assert_eq!(shown.chars().count(), 35, "{shown}");
        assert!(
            shown.starts_with("/home/me") && shown.ends_with("pruned-emaonly.safetensors"),
            "{shown}"
        );
        assert!(shown.contains('…'), "{shown}");
        assert_eq!(elide_middle(path, 3.0, width_of), "…");
    }
}
