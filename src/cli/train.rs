//! `lora-studio train --config FILE [--resume_from_checkpoint DIR] [--set key=value]...` with a terminal
//! progress bar. Ctrl-C stops after the current step, saves a checkpoint and exports the LoRA.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use super::cancel_on_ctrl_c;
use crate::config::{LoadedConfig, load_config_noting};
use crate::train::{
    StepReport, TrainPlan, TrainReporter, TrainStop, is_language_model_folder, latest_checkpoint,
    train,
};

#[derive(Debug, Args)]
pub struct TrainArgs {
    /// A JSON, TOML or YAML config (see presets/).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Continue from a checkpoint folder, or from the newest checkpoint of an output folder (`latest` = the
    /// config's output_dir).
    #[arg(
        long = "resume_from_checkpoint",
        alias = "resume-from-checkpoint",
        value_name = "DIR"
    )]
    pub resume: Option<PathBuf>,
    /// Override a config value, e.g. `--set learning_rate=5e-5` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
}

pub fn run(args: TrainArgs) -> anyhow::Result<()> {
    let LoadedConfig { mut config, notes } =
        load_config_noting(args.config.as_deref(), &args.overrides)?;
    config.base_model = super::base_model_path(&config.base_model)?;
    for note in notes {
        eprintln!("note: {note}");
    }
    let resume = match &args.resume {
        Some(path) if path == Path::new("latest") => {
            Some(latest_checkpoint(&config.output_dir).with_context(|| {
                format!(
                    "{} holds no checkpoint to resume from",
                    config.output_dir.display()
                )
            })?)
        }
        other => other.clone(),
    };
    let cancel =
        cancel_on_ctrl_c("stopping after this step (press Ctrl-C again to quit without saving)");
    let mut reporter = TerminalReporter::default();
    let outcome = train(&config, resume.as_deref(), &mut reporter, &cancel)?;
    reporter.finish();
    match outcome.stop {
        TrainStop::Finished => eprintln!("finished {} steps", outcome.steps),
        TrainStop::Cancelled => eprintln!("stopped at step {}", outcome.steps),
        TrainStop::NonFiniteLoss => {
            eprintln!("stopped at step {} (non-finite loss)", outcome.steps)
        }
    }
    if let Some(checkpoint) = &outcome.checkpoint {
        eprintln!(
            "checkpoint: {} (resume with --resume_from_checkpoint)",
            checkpoint.display()
        );
    }
    if is_language_model_folder(&config.base_model) {
        let folder = outcome.lora_path.display();
        eprintln!(
            "adapters: {folder} (PEFT, for transformers, vLLM and LLaMA-Factory) and {folder}.gguf (llama.cpp, Ollama's ADAPTER)"
        );
        eprintln!(
            "try it: lora-studio chat --base {} --lora {folder}",
            config.base_model.display()
        );
        return Ok(());
    }
    let name = outcome
        .lora_path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    eprintln!(
        "LoRA: {}  (in WebUI: <lora:{name}:0.8>)",
        outcome.lora_path.display()
    );
    Ok(())
}

/// A progress bar with epoch, step/total, smoothed loss, learning rate, speed and ETA.
#[derive(Default)]
struct TerminalReporter {
    bar: Option<ProgressBar>,
    smoothed_loss: Option<f64>,
}

impl TerminalReporter {
    fn println(&self, text: &str) {
        match &self.bar {
            Some(bar) => bar.println(text),
            None => eprintln!("{text}"),
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish();
        }
    }
}

impl TrainReporter for TerminalReporter {
    fn stage(&mut self, stage: &str, done: usize, total: usize) {
        if done == total {
            eprintln!("{stage}: done");
        } else if done == 0 || done.is_multiple_of(25) {
            eprintln!("{stage}: {done}/{total}");
        }
    }

    fn plan(&mut self, plan: &TrainPlan) {
        let examples = match plan.tokens_per_epoch {
            Some(tokens) => format!(
                "{} {} ({tokens} tokens per epoch)",
                plan.images, plan.example_noun
            ),
            None => format!(
                "{} {} ({} per epoch with repeats)",
                plan.images, plan.example_noun, plan.samples_per_epoch
            ),
        };
        eprintln!(
            "{examples}, {} steps per epoch, {} steps, {} adapters ({} parameters)",
            plan.steps_per_epoch, plan.total_steps, plan.adapters, plan.trainable_parameters
        );
        let bar = ProgressBar::new(plan.total_steps).with_style(
            ProgressStyle::with_template("{bar:30} {pos}/{len} {msg} {per_sec} eta {eta}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar.set_position(plan.first_step);
        bar.reset_eta();
        self.bar = Some(bar);
    }

    fn step(&mut self, report: &StepReport) {
        if report.loss.is_finite() {
            self.smoothed_loss = Some(match self.smoothed_loss {
                Some(s) => 0.95 * s + 0.05 * report.loss,
                None => report.loss,
            });
        }
        let loss = self
            .smoothed_loss
            .map_or("-".to_string(), |l| format!("{l:.4}"));
        let skipped = if report.skipped {
            " (skipped: non-finite loss)"
        } else {
            ""
        };
        let speed = match report.tokens {
            Some(tokens) if report.seconds > 0.0 => {
                format!(" {:.0} tok/s", tokens as f64 / report.seconds)
            }
            _ => String::new(),
        };
        let message = format!(
            "epoch {} loss {loss} lr {:.2e}{speed}{skipped}",
            report.epoch, report.lr
        );
        if let Some(bar) = &self.bar {
            bar.set_position(report.step);
            if bar.is_hidden() {
                // Not a terminal (a log file, CI): a plain line now and then.
                let every = (report.total_steps / 20).max(1);
                if report.step.is_multiple_of(every) || report.step == report.total_steps {
                    eprintln!(
                        "step {}/{} {message} ({:.2} s/step)",
                        report.step, report.total_steps, report.seconds
                    );
                }
            }
            bar.set_message(message);
        }
    }

    fn sample(&mut self, path: &Path, step: u64) {
        self.println(&format!("step {step}: sample {}", path.display()));
    }

    fn checkpoint(&mut self, path: &Path, step: u64) {
        self.println(&format!("step {step}: saved {}", path.display()));
    }

    fn message(&mut self, text: &str) {
        self.println(text);
    }
}
