//! The engine thread: owns the loaded base model and runs training, previews and exports on it. While a run
//! trains, jobs that arrive are handled between steps: pause (everything stays in memory), resume, stop,
//! and previews of the adapters as they are, so the strength slider works during training.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crossbeam_channel::Receiver;

use super::Outbox;
use crate::config::TrainConfig;
use crate::lora::LoraNetwork;
use crate::messages::{
    Event, ExportFormat, Job, LossPoint, PreviewRequest, PreviewSettings, PreviewSource, RunEnd,
};
use crate::models::pipeline::{GenerateRequest, StableDiffusion, to_rgb8};
use crate::models::schedulers::{NoiseSource, SamplerKind, SeededNoise};
use crate::train::{
    CancelToken, Flow, LiveRun, LoadedBase, StepReport, TrainError, TrainPlan, TrainReporter,
    TrainStop, export_checkpoint, load_base, network_from_checkpoint, train_on,
};

/// The engine's state between jobs.
struct Engine {
    jobs: Receiver<Job>,
    outbox: Outbox,
    /// Jobs taken from the channel but not handled yet (preview requests collapse to the newest).
    pending: VecDeque<Job>,
    base: Option<(BaseKey, LoadedBase)>,
}

/// What a loaded base model was loaded as.
#[derive(Debug, Clone, PartialEq)]
struct BaseKey {
    path: PathBuf,
    device: String,
    config_dtype: String,
}

pub fn run(jobs: Receiver<Job>, outbox: Outbox) {
    let mut engine = Engine {
        jobs,
        outbox,
        pending: VecDeque::new(),
        base: None,
    };
    while let Some(job) = engine.next_job() {
        engine.handle(job);
    }
}

/// Replaces an older waiting preview with a newer one: the last request wins.
fn collapse_previews(first: Job, queue: &mut VecDeque<Job>, jobs: &Receiver<Job>) -> Job {
    queue.extend(jobs.try_iter());
    let mut job = first;
    if matches!(job, Job::Preview(_)) {
        while let Some(position) = queue.iter().position(|j| matches!(j, Job::Preview(_))) {
            if let Some(newer) = queue.remove(position) {
                job = newer;
            }
        }
    }
    job
}

impl Engine {
    fn next_job(&mut self) -> Option<Job> {
        let job = match self.pending.pop_front() {
            Some(job) => job,
            None => self.jobs.recv().ok()?,
        };
        Some(collapse_previews(job, &mut self.pending, &self.jobs))
    }

    fn handle(&mut self, job: Job) {
        match job {
            Job::Train { config, resume } => self.train(&config, resume.as_deref()),
            Job::Preview(request) => {
                if let Err(e) = self.preview(&request) {
                    self.outbox.error(e.to_string());
                }
            }
            Job::PreviewGrid {
                request,
                strengths,
                checkpoints,
            } => {
                for checkpoint in checkpoints {
                    for &strength in &strengths {
                        let one = PreviewRequest {
                            source: PreviewSource::Checkpoint(checkpoint.clone()),
                            settings: PreviewSettings {
                                strength,
                                ..request.settings.clone()
                            },
                            ..request.clone()
                        };
                        if let Err(e) = self.preview(&one) {
                            return self.outbox.error(e.to_string());
                        }
                    }
                }
            }
            Job::Export(request) => {
                let result = self
                    .base(&request.base_model, &request.device)
                    .and_then(|base| {
                        let peft = request.format == ExportFormat::KohyaAndPeft;
                        export_checkpoint(
                            base,
                            &request.checkpoint,
                            &request.output,
                            request.precision,
                            peft,
                        )
                    });
                match result {
                    Ok(path) => {
                        let copied_to = request.copy_to.as_deref().map(|dir| copy_into(&path, dir));
                        match copied_to.transpose() {
                            Ok(copied_to) => self.outbox.send(Event::Exported { path, copied_to }),
                            Err(e) => self.outbox.error(e),
                        }
                    }
                    Err(e) => self.outbox.error(e.to_string()),
                }
            }
            Job::Pause | Job::Resume | Job::Stop => {
                self.outbox.send(Event::Info("nothing is training".into()))
            }
            other => self.outbox.error(format!("the engine cannot do {other:?}")),
        }
    }

    /// The base model for previews and exports, loaded once and kept.
    fn base(&mut self, path: &Path, device: &str) -> Result<&mut LoadedBase, TrainError> {
        let config = TrainConfig {
            base_model: path.to_path_buf(),
            device: device.to_string(),
            ..Default::default()
        };
        self.base_for(&config)
    }

    fn base_for(&mut self, config: &TrainConfig) -> Result<&mut LoadedBase, TrainError> {
        let key = BaseKey {
            path: config.base_model.clone(),
            device: config.device.clone(),
            config_dtype: format!("{:?}/{:?}", config.mixed_precision, config.prediction_type),
        };
        if self.base.as_ref().is_none_or(|(k, _)| *k != key) {
            self.base = None; // free the old model before loading the next
            self.outbox.send(Event::Stage {
                stage: "loading the base model".into(),
                done: 0,
                total: 1,
            });
            let loaded = load_base(config)?;
            self.outbox.send(Event::Stage {
                stage: "loading the base model".into(),
                done: 1,
                total: 1,
            });
            self.base = Some((key, loaded));
        }
        match &mut self.base {
            Some((_, base)) => Ok(base),
            None => Err(TrainError::Device(
                "the base model could not be kept".into(),
            )),
        }
    }

    fn preview(&mut self, request: &PreviewRequest) -> Result<(), TrainError> {
        let base = self.base(&request.base_model, &request.device)?;
        let event = render_preview(&base.model, &base.device, None, request)?;
        self.outbox.send(event);
        Ok(())
    }

    fn train(&mut self, config: &TrainConfig, resume: Option<&Path>) {
        let outbox = self.outbox.clone();
        let jobs = self.jobs.clone();
        let mut pending = std::mem::take(&mut self.pending);
        let result = self.base_for(config).and_then(|base| {
            let device = base.device.clone();
            let mut reporter = EngineReporter {
                outbox: outbox.clone(),
                jobs,
                pending: &mut pending,
                device,
                losses: Vec::new(),
            };
            let cancel = CancelToken::default();
            let outcome = train_on(base, config, resume, &mut reporter, &cancel);
            let flat = reporter.loss_is_flat();
            outcome.map(|o| (o, flat))
        });
        self.pending = pending;
        match result {
            Ok((outcome, flat)) => {
                let end = match outcome.stop {
                    TrainStop::Finished => RunEnd::Finished,
                    TrainStop::Cancelled => RunEnd::Stopped,
                    TrainStop::NonFiniteLoss => RunEnd::NonFiniteLoss,
                };
                if end == RunEnd::NonFiniteLoss {
                    outbox.error(
                        "the loss became non-finite several steps in a row, so training stopped"
                            .into(),
                    );
                }
                if flat {
                    outbox.send(Event::Info(
                        "the loss barely moved: raise the rank, train longer, or improve the captions".into(),
                    ));
                }
                outbox.send(Event::RunEnded {
                    end,
                    lora: Some(outcome.lora_path),
                    checkpoint: outcome.checkpoint,
                    steps: outcome.steps,
                });
            }
            Err(e) => {
                outbox.error(e.to_string());
                outbox.send(Event::RunEnded {
                    end: RunEnd::Stopped,
                    lora: None,
                    checkpoint: None,
                    steps: 0,
                });
            }
        }
    }
}

/// Copies an exported file into a UI's LoRA folder.
fn copy_into(file: &Path, dir: &Path) -> Result<PathBuf, String> {
    let name = file
        .file_name()
        .ok_or_else(|| format!("{} has no file name", file.display()))?;
    let target = dir.join(name);
    let bytes = std::fs::read(file).map_err(|e| format!("cannot read {}: {e}", file.display()))?;
    crate::atomic_file::write_atomically(&target, |w| std::io::Write::write_all(w, &bytes))
        .map_err(|e| format!("cannot copy the LoRA into {}: {e}", dir.display()))?;
    Ok(target)
}

/// Renders a preview with the adapters `live` (the run in progress) or of a checkpoint.
fn render_preview(
    model: &StableDiffusion,
    device: &candle_core::Device,
    live: Option<&LoraNetwork>,
    request: &PreviewRequest,
) -> Result<Event, TrainError> {
    let started = Instant::now();
    let checkpoint_network = match &request.source {
        PreviewSource::Checkpoint(path) => Some(network_from_checkpoint(model, device, path)?.0),
        PreviewSource::Live => None,
    };
    // Exactly one network is applied, at the requested strength.
    let (shown, hidden) = match &checkpoint_network {
        Some(network) => (Some(network), live),
        None => (live, None),
    };
    let settings = &request.settings;
    if let Some(network) = shown {
        network.set_multiplier(settings.strength);
    }
    if let Some(network) = hidden {
        network.set_multiplier(0.0);
    }
    let generate = || -> Result<Event, TrainError> {
        let (width, height) = (settings.width as usize, settings.height as usize);
        let generation = GenerateRequest {
            prompt: settings.prompt.clone(),
            negative_prompt: settings.negative_prompt.clone(),
            width,
            height,
            steps: settings.steps as usize,
            guidance_scale: settings.cfg,
            sampler: SamplerKind::Ddim,
            clip_skip: 1,
        };
        let mut noise = SeededNoise::new(settings.seed);
        let init = noise.next(
            &model.latent_dims(width, height)?,
            &candle_core::Device::Cpu,
        )?;
        let generated = model.generate(&generation, &init, &mut noise, &mut |_, _| {})?;
        let rgb = to_rgb8(&generated.image)?;
        let rgba = image::DynamicImage::ImageRgb8(rgb).to_rgba8();
        Ok(Event::Preview {
            id: request.id,
            strength: settings.strength,
            checkpoint: match &request.source {
                PreviewSource::Checkpoint(path) => Some(path.clone()),
                PreviewSource::Live => None,
            },
            width: rgba.width(),
            height: rgba.height(),
            rgba: rgba.into_raw(),
            seconds: started.elapsed().as_secs_f64(),
        })
    };
    let result = generate();
    if let Some(network) = live {
        network.set_multiplier(1.0);
    }
    result
}

/// Turns training progress into events and handles the jobs that arrive between steps.
struct EngineReporter<'a> {
    outbox: Outbox,
    jobs: Receiver<Job>,
    pending: &'a mut VecDeque<Job>,
    device: candle_core::Device,
    losses: Vec<f64>,
}

impl EngineReporter<'_> {
    /// Whether the loss of the last tenth of the run is within 2 % of the first tenth's.
    fn loss_is_flat(&self) -> bool {
        let n = self.losses.len();
        if n < 50 {
            return false;
        }
        let tenth = n / 10;
        let mean = |s: &[f64]| s.iter().sum::<f64>() / s.len() as f64;
        let (first, last) = (mean(&self.losses[..tenth]), mean(&self.losses[n - tenth..]));
        (first - last).abs() < 0.02 * first.abs()
    }

    /// Handles one job taken during a run; returns false when the run should stop.
    fn handle_during_run(&mut self, job: Job, live: &LiveRun) -> bool {
        match job {
            Job::Stop => return false,
            Job::Preview(request) => self.preview(live, &request),
            Job::PreviewGrid {
                request,
                strengths,
                checkpoints,
            } => {
                for checkpoint in checkpoints {
                    for &strength in &strengths {
                        let one = PreviewRequest {
                            source: PreviewSource::Checkpoint(checkpoint.clone()),
                            settings: PreviewSettings {
                                strength,
                                ..request.settings.clone()
                            },
                            ..request.clone()
                        };
                        self.preview(live, &one);
                    }
                }
            }
            Job::Resume => {}
            Job::Train { .. } => self
                .outbox
                .send(Event::Info("a run is already training".into())),
            // Exports and anything else wait for the run to end.
            other => self.pending.push_back(other),
        }
        true
    }

    fn preview(&mut self, live: &LiveRun, request: &PreviewRequest) {
        match render_preview(live.model, &self.device, Some(live.network), request) {
            Ok(event) => self.outbox.send(event),
            Err(e) => self.outbox.error(e.to_string()),
        }
    }
}

impl TrainReporter for EngineReporter<'_> {
    fn between_steps(&mut self, live: &LiveRun) -> Flow {
        while let Some(job) = self
            .jobs
            .try_recv()
            .ok()
            .map(|j| collapse_previews(j, self.pending, &self.jobs))
        {
            if job == Job::Pause {
                self.outbox.send(Event::Paused);
                loop {
                    let Ok(job) = self.jobs.recv() else {
                        return Flow::Stop;
                    };
                    let job = collapse_previews(job, self.pending, &self.jobs);
                    if job == Job::Resume {
                        self.outbox.send(Event::Resumed);
                        break;
                    }
                    if job == Job::Pause {
                        continue;
                    }
                    if !self.handle_during_run(job, live) {
                        return Flow::Stop;
                    }
                }
            } else if !self.handle_during_run(job, live) {
                return Flow::Stop;
            }
        }
        Flow::Continue
    }

    fn stage(&mut self, stage: &str, done: usize, total: usize) {
        self.outbox.send(Event::Stage {
            stage: stage.to_string(),
            done,
            total,
        });
    }

    fn plan(&mut self, plan: &TrainPlan) {
        self.outbox.send(Event::RunStarted {
            total_steps: plan.total_steps,
            steps_per_epoch: plan.steps_per_epoch,
            first_step: plan.first_step,
        });
    }

    fn step(&mut self, report: &StepReport) {
        if report.loss.is_finite() {
            self.losses.push(report.loss);
        }
        self.outbox.send(Event::Loss(LossPoint {
            step: report.step,
            epoch: report.epoch,
            loss: report.loss,
            lr: report.lr,
            seconds: report.seconds,
        }));
    }

    fn sample(&mut self, path: &Path, step: u64) {
        self.outbox.send(Event::Info(format!(
            "step {step}: sample saved to {}",
            path.display()
        )));
    }

    fn checkpoint(&mut self, path: &Path, step: u64) {
        self.outbox.send(Event::Checkpoint {
            path: path.to_path_buf(),
            step,
        });
    }

    fn message(&mut self, text: &str) {
        self.outbox.send(Event::Info(text.to_string()));
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use super::collapse_previews;
    use crate::messages::{Job, PreviewRequest, PreviewSettings, PreviewSource};

    fn preview(id: u64) -> Job {
        Job::Preview(PreviewRequest {
            id,
            base_model: "m".into(),
            device: "cpu".into(),
            source: PreviewSource::Live,
            settings: PreviewSettings::default(),
        })
    }

    #[test]
    fn waiting_previews_collapse_to_the_newest_and_other_jobs_stay_in_order() {
        let (tx, rx) = crossbeam_channel::unbounded();
        for job in [preview(2), Job::Pause, preview(3), Job::Stop] {
            tx.send(job).unwrap();
        }
        let mut queue = VecDeque::new();
        assert_eq!(collapse_previews(preview(1), &mut queue, &rx), preview(3));
        assert_eq!(queue, VecDeque::from([Job::Pause, Job::Stop]));
        assert_eq!(
            collapse_previews(Job::Resume, &mut queue, &rx),
            Job::Resume,
            "only previews collapse"
        );
    }
}
