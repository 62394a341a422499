//! The engine thread: owns the loaded base model — a Stable Diffusion model or a language model, one at a
//! time — and runs training, previews, chats and exports on it. While a run trains, jobs that arrive are
//! handled between steps: pause (everything stays in memory), resume, stop, and previews or chats with the
//! adapters as they are, so the strength slider works during training.

use std::path::{Path, PathBuf};
use std::time::Instant;

use crossbeam_channel::Receiver;

use super::inbox::{Inbox, Supersedable};
use super::{Outbox, chat, contain, internal_error, lm_export};
use crate::chat::ChatFiles;
use crate::config::{PredictionOverride, TrainConfig};
use crate::discovery::{DiscoveryOptions, discover, resolve};
use crate::lora::LoraNetwork;
use crate::messages::{
    ChatRequest, Event, ExportFormat, Job, LanguageExportRequest, LossPoint, PreviewRequest,
    PreviewSettings, PreviewSource, RunEnd,
};
use crate::models::ModelError;
use crate::models::pipeline::{GenerateRequest, StableDiffusion, to_rgb8};
use crate::models::schedulers::{NoiseSource, SamplerKind, SeededNoise};
use crate::train::{
    CancelToken, Flow, LiveModel, LiveRun, LoadedBase, LoadedLanguageModel, StepReport, TrainError,
    TrainOutcome, TrainPlan, TrainReporter, TrainStop, export_checkpoint_on, export_kept,
    is_language_model_folder, load_base, load_language_model, network_from_checkpoint,
    train_causal_lm_on, train_on,
};

/// The engine's state between jobs.
struct Engine {
    inbox: Inbox,
    outbox: Outbox,
    base: Option<(BaseKey, Kept)>,
    /// Where models named by their short name are looked for.
    models: DiscoveryOptions,
}

/// The base model the engine keeps.
enum Kept {
    Image(Box<LoadedBase>),
    Language(Box<LoadedLanguageModel>),
}

/// What a loaded base model was loaded as.
#[derive(Debug, Clone, PartialEq)]
struct BaseKey {
    path: PathBuf,
    device: String,
    prediction: Option<PredictionOverride>,
    /// The training precision asked for; previews and exports take a model in any precision.
    precision: crate::config::MixedPrecision,
}

pub fn run(jobs: Receiver<Job>, outbox: Outbox, models: DiscoveryOptions) {
    let mut engine = Engine {
        inbox: Inbox::new(jobs),
        outbox,
        base: None,
        models,
    };
    while let Some(job) = engine.inbox.next(true) {
        let what = job.name();
        if contain(&engine.outbox.clone(), what, || engine.handle(job)).is_none() {
            // The model may have been left half-changed (adapters attached); load it afresh next time.
            engine.base = None;
        }
        // Until the next job, the memory this one freed is nobody's.
        crate::kernels::return_free_memory();
    }
}

/// The single previews a strength x checkpoint grid consists of.
fn grid_requests(
    request: &PreviewRequest,
    strengths: &[f64],
    checkpoints: &[PathBuf],
) -> Vec<PreviewRequest> {
    checkpoints
        .iter()
        .flat_map(|checkpoint| {
            strengths.iter().map(|&strength| PreviewRequest {
                source: PreviewSource::Checkpoint(checkpoint.clone()),
                settings: PreviewSettings {
                    strength,
                    ..request.settings.clone()
                },
                ..request.clone()
            })
        })
        .collect()
}

impl Engine {
    fn handle(&mut self, job: Job) {
        match job {
            Job::Train { mut config, resume } => {
                // A config may name its base model the way `lora-studio models` lists it.
                match resolve(&config.base_model, || discover(&self.models)) {
                    Ok(path) => {
                        config.base_model = path;
                        self.train(&config, resume.as_deref())
                    }
                    Err(message) => {
                        self.outbox.error(message);
                        self.outbox.send(Event::RunEnded {
                            end: RunEnd::Stopped,
                            lora: None,
                            checkpoint: None,
                            steps: 0,
                        });
                    }
                }
            }
            Job::Preview(request) => {
                if let Err(e) = self.preview(&request, true) {
                    self.outbox.error(e.to_string());
                }
            }
            Job::PreviewGrid {
                request,
                strengths,
                checkpoints,
            } => {
                for one in grid_requests(&request, &strengths, &checkpoints) {
                    if let Err(e) = self.preview(&one, false) {
                        return self.outbox.error(e.to_string());
                    }
                }
            }
            Job::Export(request) => {
                let peft = request.format == ExportFormat::KohyaAndPeft;
                let result = export_kept(
                    &request.checkpoint,
                    &request.output,
                    request.precision,
                    peft,
                )
                .transpose()
                .unwrap_or_else(|| {
                    let base = self.base(
                        &request.base_model,
                        &request.device,
                        request.prediction_type,
                    )?;
                    export_checkpoint_on(
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
            Job::Chat(request) => {
                if let Err(e) = self.chat(&request) {
                    self.outbox.error(e.to_string());
                }
            }
            Job::ExportLanguage(request) => match self.export_language(&request) {
                Ok(exports) => self.outbox.send(Event::LanguageExported(exports)),
                Err(e) => self.outbox.error(e.to_string()),
            },
            Job::Pause | Job::Resume | Job::Stop => {
                self.outbox.send(Event::Info("nothing is training".into()))
            }
            other => self.outbox.error(format!("the engine cannot do {other:?}")),
        }
    }

    /// The image model for previews and exports, loaded once and kept: the one training used when the
    /// path, device and prediction type agree, whatever its precision.
    fn base(
        &mut self,
        path: &Path,
        device: &str,
        prediction_type: Option<PredictionOverride>,
    ) -> Result<&mut LoadedBase, TrainError> {
        if is_language_model_folder(path) {
            return Err(TrainError::Device(format!(
                "{} is a language model; previews render images with a Stable Diffusion model",
                path.display()
            )));
        }
        let config = TrainConfig {
            base_model: path.to_path_buf(),
            device: device.to_string(),
            prediction_type,
            ..Default::default()
        };
        match self.base_for(&config, true)? {
            Kept::Image(base) => Ok(base.as_mut()),
            Kept::Language(_) => Err(TrainError::Internal("an image model was expected".into())),
        }
    }

    /// The language model for chats and exports, loaded once and kept: the one training used when the path
    /// and device agree, whatever its precision.
    fn language_model(
        &mut self,
        path: &Path,
        device: &str,
    ) -> Result<&mut LoadedLanguageModel, TrainError> {
        if !is_language_model_folder(path) {
            return Err(TrainError::Device(format!(
                "{} is not a language model folder (a Hugging Face folder with config.json)",
                path.display()
            )));
        }
        let config = TrainConfig {
            base_model: path.to_path_buf(),
            device: device.to_string(),
            ..Default::default()
        };
        match self.base_for(&config, true)? {
            Kept::Language(model) => Ok(model.as_mut()),
            Kept::Image(_) => Err(TrainError::Internal("a language model was expected".into())),
        }
    }

    /// The base model `config` trains on (in its precision unless `any_precision`), loaded when the one
    /// kept differs: a language model for a language model folder, else a Stable Diffusion model.
    fn base_for(
        &mut self,
        config: &TrainConfig,
        any_precision: bool,
    ) -> Result<&mut Kept, TrainError> {
        let key = BaseKey {
            path: config.base_model.clone(),
            device: config.device.clone(),
            prediction: config.prediction_type,
            precision: config.mixed_precision,
        };
        let usable = |kept: &BaseKey| {
            kept.path == key.path
                && kept.device == key.device
                && kept.prediction == key.prediction
                && (any_precision || kept.precision == key.precision)
        };
        if self.base.as_ref().is_none_or(|(k, _)| !usable(k)) {
            self.base = None; // free the old model before loading the next
            self.outbox.send(Event::Stage {
                stage: "loading the base model".into(),
                done: 0,
                total: 1,
            });
            let loaded = if is_language_model_folder(&config.base_model) {
                Kept::Language(Box::new(load_language_model(config)?))
            } else {
                Kept::Image(Box::new(load_base(config)?))
            };
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

    /// Answers a chat with the kept language model (no run trains: `Live` is the base model alone); the
    /// reply is abandoned when a newer chat request arrives.
    fn chat(&mut self, request: &ChatRequest) -> anyhow::Result<()> {
        self.language_model(&request.base_model, &request.device)?;
        let (Some((_, Kept::Language(loaded))), inbox) = (&self.base, &mut self.inbox) else {
            return Ok(());
        };
        let superseded = &mut || inbox.newer_waiting(Supersedable::Chat);
        chat::answer(
            &loaded.model,
            &loaded.files,
            None,
            request,
            &self.outbox,
            superseded,
        )
    }

    /// Writes a language model's exports from a checkpoint with the kept language model.
    fn export_language(
        &mut self,
        request: &LanguageExportRequest,
    ) -> anyhow::Result<crate::messages::LanguageExports> {
        let loaded = self.language_model(&request.base_model, &request.device)?;
        lm_export::export(&loaded.model, request)
    }

    /// Renders a preview with the base model; a `cancellable` one is abandoned when a newer request
    /// arrives.
    fn preview(&mut self, request: &PreviewRequest, cancellable: bool) -> Result<(), TrainError> {
        self.base(
            &request.base_model,
            &request.device,
            request.prediction_type,
        )?;
        let (Some((_, Kept::Image(base))), inbox) = (&self.base, &mut self.inbox) else {
            return Ok(());
        };
        let superseded = &mut || cancellable && inbox.newer_waiting(Supersedable::Preview);
        if let Some(event) = render_preview(&base.model, &base.device, None, request, superseded)? {
            self.outbox.send(event);
        }
        Ok(())
    }

    fn train(&mut self, config: &TrainConfig, resume: Option<&Path>) {
        let outbox = self.outbox.clone();
        // The run reads the inbox between steps; the engine gets it back (with the jobs the run held
        // back in front) when the run ends.
        let mut inbox = std::mem::replace(&mut self.inbox, Inbox::new(crossbeam_channel::never()));
        let mut deferred = Vec::new();
        let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.base_for(config, false).and_then(|kept| {
                let mut reporter = EngineReporter {
                    outbox: outbox.clone(),
                    inbox: &mut inbox,
                    deferred: &mut deferred,
                    chat_files: None,
                    losses: Vec::new(),
                };
                let cancel = CancelToken::default();
                let outcome = train_kept(kept, config, resume, &mut reporter, &cancel);
                let flat = reporter.loss_is_flat();
                outcome.map(|o| (o, flat))
            })
        }));
        // A panic (a bug) ends the run like an error; the inbox is given back either way.
        let result = run.unwrap_or_else(|payload| {
            self.base = None;
            Err(TrainError::Internal(internal_error("training", &*payload)))
        });
        inbox.put_back(deferred);
        self.inbox = inbox;
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

/// Trains `config` on the kept model, whichever kind it is; the reporter gets a language model's tokenizer
/// files for chats between steps.
fn train_kept<'a>(
    kept: &'a mut Kept,
    config: &TrainConfig,
    resume: Option<&Path>,
    reporter: &mut EngineReporter<'a>,
    cancel: &CancelToken,
) -> Result<TrainOutcome, TrainError> {
    match kept {
        Kept::Image(base) => train_on(base, config, resume, reporter, cancel),
        Kept::Language(loaded) => {
            reporter.chat_files = Some(&loaded.files);
            train_causal_lm_on(
                &mut loaded.model,
                &loaded.files,
                config,
                resume,
                reporter,
                cancel,
            )
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
    superseded: &mut dyn FnMut() -> bool,
) -> Result<Option<Event>, TrainError> {
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
    let _shown = shown.map(|network| network.rendering_at(settings.strength));
    let _hidden = hidden.map(|network| network.rendering_at(0.0));
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
    let generated = match model.generate(&generation, &init, &mut noise, &mut |_, _| !superseded())
    {
        Err(ModelError::Cancelled) => return Ok(None),
        other => other?,
    };
    let rgb = to_rgb8(&generated.image)?;
    let rgba = image::DynamicImage::ImageRgb8(rgb).to_rgba8();
    Ok(Some(Event::Preview {
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
    }))
}

/// Turns training progress into events and handles the jobs that arrive between steps.
struct EngineReporter<'a> {
    outbox: Outbox,
    inbox: &'a mut Inbox,
    /// Jobs that wait for the run to end (exports, scans of other folders).
    deferred: &'a mut Vec<Job>,
    /// The tokenizer files of the language model a run trains, for chats.
    chat_files: Option<&'a ChatFiles>,
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
            Job::Preview(request) => self.preview(live, &request, true),
            Job::Chat(request) => self.chat(live, &request),
            Job::PreviewGrid {
                request,
                strengths,
                checkpoints,
            } => {
                for one in grid_requests(&request, &strengths, &checkpoints) {
                    self.preview(live, &one, false);
                }
            }
            Job::Resume => {}
            Job::Train { .. } => self
                .outbox
                .send(Event::Info("a run is already training".into())),
            // Exports and anything else wait for the run to end.
            other => self.deferred.push(other),
        }
        true
    }

    /// Renders a preview between steps; a `cancellable` one is abandoned when a newer request arrives.
    fn preview(&mut self, live: &LiveRun, request: &PreviewRequest, cancellable: bool) {
        let LiveModel::Image(model) = live.model else {
            self.outbox.send(Event::Info(
                "previews render images; this run trains a language model".into(),
            ));
            return;
        };
        let inbox = &mut *self.inbox;
        let superseded = &mut || cancellable && inbox.newer_waiting(Supersedable::Preview);
        let device = model.device();
        match render_preview(model, device, Some(live.network), request, superseded) {
            Ok(Some(event)) => self.outbox.send(event),
            Ok(None) => {}
            Err(e) => self.outbox.error(e.to_string()),
        }
    }

    /// Answers a chat between steps with the run's adapters as they are (or a checkpoint's); abandoned when
    /// a newer chat request arrives.
    fn chat(&mut self, live: &LiveRun, request: &ChatRequest) {
        let (LiveModel::Language(model), Some(files)) = (live.model, self.chat_files) else {
            return self.outbox.error(
                "a Stable Diffusion run is training; chat with a language model once it ends"
                    .into(),
            );
        };
        let inbox = &mut *self.inbox;
        let superseded = &mut || inbox.newer_waiting(Supersedable::Chat);
        let answered = chat::answer(
            model,
            files,
            Some(live.network),
            request,
            &self.outbox,
            superseded,
        );
        if let Err(e) = answered {
            self.outbox.error(e.to_string());
        }
    }
}

impl TrainReporter for EngineReporter<'_> {
    fn between_steps(&mut self, live: &LiveRun) -> Flow {
        while let Some(job) = self.inbox.next(false) {
            if job == Job::Pause {
                self.outbox.send(Event::Paused);
                loop {
                    let Some(job) = self.inbox.next(true) else {
                        return Flow::Stop;
                    };
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
