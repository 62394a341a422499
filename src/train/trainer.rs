//! The training loop, for any [`TrainingTask`]: optimizer and learning-rate schedule, gradient accumulation
//! and clipping, fp16 loss scaling, resumable checkpoints, TensorBoard scalars, progress reports, pause and
//! stop between steps, and the final export. What a batch is and how its loss is computed is the task's.

use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use candle_core::{DType, Tensor, Var};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::checkpoint::{RngState, TrainState, list_checkpoints, load_checkpoint, save_checkpoint};
use super::export::write_checkpoint_export;
use super::optimizer::{Optimizer, OptimizerSettings};
use super::report::{CancelToken, Flow, StepReport, TrainPlan, TrainReporter};
use super::schedule::lr_factor;
use super::task::{BatchShare, ExportPoint, TrainingTask};
use super::tensorboard::EventWriter;
use super::{TrainError, TrainOutcome, TrainStop};
use crate::config::{LogWith, TrainConfig};

/// The learning-rate group (see [`crate::lora::TargetComponent::group`]) of adapters trained at `unet_lr`.
pub(super) const UNET_LR_GROUP: usize = 0;

/// The learning-rate group of adapters trained at `text_encoder_lr`.
pub(super) const TEXT_ENCODER_LR_GROUP: usize = 1;

/// Consecutive steps whose loss (or, without loss scaling, gradient) is not finite, after which training
/// stops.
const MAX_NONFINITE_STREAK: u32 = 5;

/// The fp16 loss scale a run starts with (PyTorch's `GradScaler` default).
const INITIAL_LOSS_SCALE: f64 = 65536.0;

/// Steps without an overflow after which the fp16 loss scale doubles.
const LOSS_SCALE_GROWTH_STEPS: u64 = 2000;

/// Trains `task`'s adapters as `config` says, in `dtype` (which decides loss scaling: fp16 only), optionally
/// resuming from a checkpoint, and writes the task's final export.
pub fn run_loop<T: TrainingTask>(
    task: &mut T,
    config: &TrainConfig,
    dtype: DType,
    resume: Option<&Path>,
    reporter: &mut dyn TrainReporter,
    cancel: &CancelToken,
) -> Result<TrainOutcome, TrainError> {
    let network = task.network();
    let named = network.named_vars();
    let vars: Vec<Var> = named.iter().map(|(_, _, v)| (*v).clone()).collect();
    let mut group_lrs = [0.0; 2];
    group_lrs[UNET_LR_GROUP] = config.unet_lr();
    group_lrs[TEXT_ENCODER_LR_GROUP] = config.text_encoder_lr();
    let base_lrs: Vec<f64> = named
        .iter()
        .map(|(_, group, _)| group_lrs[*group])
        .collect();
    let optimizer_vars: Vec<(String, &Var)> =
        named.iter().map(|(n, _, v)| (n.clone(), *v)).collect();
    let mut optimizer = Optimizer::new(
        OptimizerSettings {
            kind: config.optimizer,
            beta1: config.adam_beta1,
            beta2: config.adam_beta2,
            eps: config.adam_epsilon,
            weight_decay: config.weight_decay,
        },
        &optimizer_vars,
    )?;
    let (trainable_parameters, adapters) = (network.parameter_count(), network.modules().len());

    let fingerprint = task.fingerprint()?;
    let (examples, examples_per_epoch) = task.examples();
    let mut state = TrainState {
        format_version: 1,
        lora_studio_version: crate::build_info::LONG_VERSION.to_string(),
        step: 0,
        rng: RngState::capture(&ChaCha8Rng::seed_from_u64(config.seed)),
        nonfinite_streak: 0,
        loss_scale: if dtype == DType::F16 {
            INITIAL_LOSS_SCALE
        } else {
            1.0
        },
        dataset_fingerprint: fingerprint.clone(),
        images: examples,
        training_started_at: unix_seconds(),
        config: config.clone(),
    };
    if let Some(path) = resume {
        state = resumed_state(
            task,
            &mut optimizer,
            path,
            config,
            (fingerprint, examples),
            reporter,
        )?;
    }
    let mut rng = state
        .rng
        .restore()
        .map_err(|reason| TrainError::Checkpoint {
            path: config.output_dir.clone(),
            reason,
        })?;

    let accumulation = config.gradient_accumulation_steps as u64;

    let first_epoch = task.epoch_batches(0);
    let steps_per_epoch = steps_per_epoch(first_epoch.len(), config.gradient_accumulation_steps);
    let total_steps = config
        .max_train_steps
        .unwrap_or(config.epochs as u64 * steps_per_epoch);
    let mut events = match config.log_with {
        LogWith::Tensorboard => Some(
            EventWriter::create(&config.output_dir.join("logs")).map_err(|source| {
                TrainError::Io {
                    path: config.output_dir.join("logs"),
                    source,
                }
            })?,
        ),
        LogWith::None => None,
    };
    let tokens_per_epoch = first_epoch
        .iter()
        .map(|b| task.share(b).tokens)
        .sum::<Option<u64>>();
    reporter.plan(&TrainPlan {
        images: examples,
        example_noun: task.example_noun(),
        samples_per_epoch: examples_per_epoch,
        tokens_per_epoch,
        steps_per_epoch,
        total_steps,
        epochs: total_steps.div_ceil(steps_per_epoch),
        first_step: state.step,
        trainable_parameters,
        adapters,
    });

    // What preparing the run held (cached latents and text embeddings computed, models loaded) is not what
    // the steps will need.
    crate::kernels::return_free_memory();
    let mut stop = TrainStop::Finished;
    let (mut planned_epoch, mut batches): (Option<u64>, Vec<T::Batch>) = (None, Vec::new());
    let mut last_checkpoint = None;
    while state.step < total_steps {
        if cancel.is_cancelled() {
            stop = TrainStop::Cancelled;
            break;
        }
        let started = Instant::now();
        let epoch = state.step / steps_per_epoch;
        if planned_epoch != Some(epoch) {
            batches = task.epoch_batches(epoch);
            planned_epoch = Some(epoch);
        }
        let first = ((state.step % steps_per_epoch) * accumulation) as usize;
        let micro_batches =
            &batches[first.min(batches.len())..(first + accumulation as usize).min(batches.len())];

        let mut accumulated: Vec<Option<Tensor>> = vec![None; vars.len()];
        let shares: Vec<BatchShare> = micro_batches.iter().map(|b| task.share(b)).collect();
        let units: f64 = shares.iter().map(|s| s.loss_units).sum();
        let units = if units > 0.0 { units } else { 1.0 };
        let mut loss_sum = 0f64;
        let mut loss_finite = !micro_batches.is_empty();
        for (batch, share) in micro_batches.iter().zip(&shares) {
            let loss = task.loss(batch, &mut rng)?;
            let value = loss.to_scalar::<f32>()? as f64;
            loss_sum += value * share.loss_units;
            if !value.is_finite() {
                loss_finite = false;
                continue;
            }
            // Each micro-batch's loss is a mean over its units; weighed by its share of the step's units,
            // the accumulated gradient is that of the mean over all of them.
            let scaled = (loss * (state.loss_scale * share.loss_units / units))?;
            let grads = scaled.backward()?;
            for (slot, var) in accumulated.iter_mut().zip(&vars) {
                if let Some(g) = task.gradient(&grads, var)? {
                    *slot = Some(match slot.take() {
                        Some(sum) => (sum + g)?,
                        None => g,
                    });
                }
            }
        }
        let loss = loss_sum / units;
        let factor = lr_factor(
            config.lr_scheduler,
            state.step,
            total_steps,
            config.warmup_steps(total_steps),
            config.lr_num_cycles,
        );
        let update = if loss_finite {
            let lrs: Vec<f64> = base_lrs.iter().map(|lr| lr * factor).collect();
            apply_update(&mut optimizer, &vars, accumulated, &lrs, &mut state, config)?
        } else {
            Update::NonFinite
        };
        state.step += 1;
        state.nonfinite_streak = match update {
            Update::Applied => 0,
            // An fp16 overflow is expected now and then with dynamic loss scaling: the scale was lowered and
            // the step is simply retried with the next batch; it says nothing about the run's health.
            Update::Overflow => state.nonfinite_streak,
            Update::NonFinite => state.nonfinite_streak + 1,
        };
        state.rng = RngState::capture(&rng);

        let report = StepReport {
            step: state.step,
            total_steps,
            epoch: epoch + 1,
            loss,
            lr: config.unet_lr() * factor,
            seconds: started.elapsed().as_secs_f64(),
            tokens: shares.iter().map(|s| s.tokens).sum(),
            skipped: update != Update::Applied,
        };
        reporter.step(&report);
        if let Some(events) = &mut events {
            log_scalars(events, &report, config, factor)?;
        }
        if state.nonfinite_streak >= MAX_NONFINITE_STREAK {
            stop = TrainStop::NonFiniteLoss;
            break;
        }
        let every = |steps: u64, epochs: u32| {
            (steps > 0 && state.step.is_multiple_of(steps))
                || (epochs > 0
                    && state
                        .step
                        .is_multiple_of(u64::from(epochs) * steps_per_epoch))
        };
        if every(config.save_steps, config.save_every_n_epochs) && state.step < total_steps {
            let point = export_point(&state, steps_per_epoch);
            last_checkpoint = Some(save(task, &optimizer, &state, point, config, reporter)?);
        }
        if every(config.sample_every_n_steps, config.sample_every_n_epochs) {
            task.render_samples(state.step, events.as_mut(), reporter)?;
            // The previews' memory is not the training step's.
            crate::kernels::return_free_memory();
        }
        if reporter.between_steps(&task.live(state.step)) == Flow::Stop {
            cancel.cancel();
        }
    }

    let point = export_point(&state, steps_per_epoch);
    if state.step > 0
        && last_checkpoint
            .as_ref()
            .is_none_or(|(s, _)| *s != state.step)
    {
        last_checkpoint = Some(save(task, &optimizer, &state, point, config, reporter)?);
    }
    task.network().set_multiplier(1.0);
    let lora_path =
        task.write_final_export(point, last_checkpoint.as_ref().map(|(_, p)| p.as_path()))?;
    if stop == TrainStop::NonFiniteLoss {
        reporter.message(&format!(
            "training stopped after {MAX_NONFINITE_STREAK} steps in a row with a non-finite loss; the last good \
             adapters are saved. Lower the learning rate{}",
            if dtype == DType::F16 {
                ", or use bf16 instead of fp16"
            } else {
                ""
            }
        ));
    }
    Ok(TrainOutcome {
        lora_path,
        checkpoint: last_checkpoint.map(|(_, p)| p),
        steps: state.step,
        stop,
    })
}

/// The state of a run resumed from the checkpoint at `path`: adapters, optimizer and RNG restored.
fn resumed_state<T: TrainingTask>(
    task: &T,
    optimizer: &mut Optimizer,
    path: &Path,
    config: &TrainConfig,
    (fingerprint, examples): (String, usize),
    reporter: &mut dyn TrainReporter,
) -> Result<TrainState, TrainError> {
    let device = task
        .network()
        .modules()
        .first()
        .map_or(candle_core::Device::Cpu, |m| m.down.device().clone());
    let checkpoint = load_checkpoint(path, &device)?;
    if let Some(note) = &checkpoint.upgrade_note {
        reporter.message(note);
    }
    check_resumable(&checkpoint.state.config, config, &checkpoint.path)?;
    let bad = |reason: String| TrainError::Checkpoint {
        path: checkpoint.path.clone(),
        reason,
    };
    task.network()
        .load_state(&checkpoint.adapters)
        .map_err(bad)?;
    optimizer
        .load_state(&checkpoint.optimizer, checkpoint.state.step)
        .map_err(bad)?;
    checkpoint.state.rng.restore().map_err(bad)?;
    if checkpoint.state.dataset_fingerprint != fingerprint {
        reporter.message(&format!(
            "the dataset changed since {} ({} {noun} then, {examples} now); training continues on the current \
             {noun}",
            checkpoint.path.display(),
            checkpoint.state.images,
            noun = task.example_noun(),
        ));
    }
    reporter.message(&format!(
        "resuming from {} at step {}",
        checkpoint.path.display(),
        checkpoint.state.step
    ));
    Ok(TrainState {
        dataset_fingerprint: fingerprint,
        images: examples,
        config: config.clone(),
        ..checkpoint.state
    })
}

/// Optimizer steps in an epoch of `batches` micro-batches, `accumulation` to a step (at least one).
pub(super) fn steps_per_epoch(batches: usize, accumulation: u32) -> u64 {
    (batches as u64)
        .div_ceil(u64::from(accumulation.max(1)))
        .max(1)
}

/// Where the run stands after `state.step` steps, for exports.
fn export_point(state: &TrainState, steps_per_epoch: u64) -> ExportPoint {
    ExportPoint {
        steps: state.step,
        epoch: state.step.div_ceil(steps_per_epoch),
        started_at: state.training_started_at,
    }
}

/// The settings a checkpoint's network and optimizer depend on must not change on resume.
fn check_resumable(saved: &TrainConfig, now: &TrainConfig, path: &Path) -> Result<(), TrainError> {
    let fixed: [(&str, String, String); 11] = [
        (
            "lora_rank",
            saved.lora_rank.to_string(),
            now.lora_rank.to_string(),
        ),
        (
            "lora_alpha",
            saved.lora_alpha.to_string(),
            now.lora_alpha.to_string(),
        ),
        (
            "conv_lora",
            saved.conv_lora.to_string(),
            now.conv_lora.to_string(),
        ),
        (
            "conv_rank",
            saved.conv_rank().to_string(),
            now.conv_rank().to_string(),
        ),
        (
            "conv_alpha",
            saved.conv_alpha().to_string(),
            now.conv_alpha().to_string(),
        ),
        (
            "train_text_encoder",
            saved.train_text_encoder.to_string(),
            now.train_text_encoder.to_string(),
        ),
        ("dora", saved.dora.to_string(), now.dora.to_string()),
        (
            "use_rslora",
            saved.use_rslora.to_string(),
            now.use_rslora.to_string(),
        ),
        (
            "lora_target_modules",
            format!("{:?}", saved.language_model_targets()),
            format!("{:?}", now.language_model_targets()),
        ),
        ("pissa", saved.pissa.to_string(), now.pissa.to_string()),
        (
            "optimizer",
            format!("{:?}", saved.optimizer),
            format!("{:?}", now.optimizer),
        ),
    ];
    for (key, was, is) in fixed {
        if was != is {
            return Err(TrainError::Checkpoint {
                path: path.to_path_buf(),
                reason: format!("it was trained with {key} = {was}, but the config now says {is}"),
            });
        }
    }
    Ok(())
}

/// What became of a step's gradients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Update {
    /// The optimizer took the step.
    Applied,
    /// The scaled fp16 gradients overflowed: the loss scale was halved and the step skipped.
    Overflow,
    /// The loss or the gradients were not finite without loss scaling to blame: the step was skipped.
    NonFinite,
}

/// Unscales, clips and applies the accumulated gradients at the learning rates `lrs`.
fn apply_update(
    optimizer: &mut Optimizer,
    vars: &[Var],
    mut grads: Vec<Option<Tensor>>,
    lrs: &[f64],
    state: &mut TrainState,
    config: &TrainConfig,
) -> Result<Update, TrainError> {
    let unscale = 1.0 / state.loss_scale;
    let mut squared = 0f64;
    for grad in grads.iter_mut().flatten() {
        *grad = (&*grad * unscale)?;
        squared += grad.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
    }
    let norm = squared.sqrt();
    if !norm.is_finite() {
        if state.loss_scale > 1.0 {
            state.loss_scale /= 2.0;
            return Ok(Update::Overflow);
        }
        return Ok(Update::NonFinite);
    }
    if config.max_grad_norm > 0.0 && norm > config.max_grad_norm {
        let clip = config.max_grad_norm / (norm + 1e-6);
        for grad in grads.iter_mut().flatten() {
            *grad = (&*grad * clip)?;
        }
    }
    let vars: Vec<&Var> = vars.iter().collect();
    optimizer.apply(&vars, &grads, lrs)?;
    if state.loss_scale > 1.0 && optimizer.step.is_multiple_of(LOSS_SCALE_GROWTH_STEPS) {
        state.loss_scale *= 2.0;
    }
    Ok(Update::Applied)
}

fn log_scalars(
    events: &mut EventWriter,
    report: &StepReport,
    config: &TrainConfig,
    factor: f64,
) -> Result<(), TrainError> {
    let path = events.path().to_path_buf();
    let io = |source| TrainError::Io { path, source };
    let mut write = || -> std::io::Result<()> {
        events.scalar("loss", report.loss as f32, report.step)?;
        events.scalar("lr/unet", (config.unet_lr() * factor) as f32, report.step)?;
        if config.train_text_encoder {
            events.scalar(
                "lr/text_encoder",
                (config.text_encoder_lr() * factor) as f32,
                report.step,
            )?;
        }
        Ok(())
    };
    write().map_err(io)
}

/// Saves a resumable checkpoint, with the LoRA export it would give kept inside.
fn save<T: TrainingTask>(
    task: &T,
    optimizer: &Optimizer,
    state: &TrainState,
    point: ExportPoint,
    config: &TrainConfig,
    reporter: &mut dyn TrainReporter,
) -> Result<(u64, PathBuf), TrainError> {
    let contents = task.export_contents(point)?;
    let path = save_checkpoint(
        &config.output_dir,
        state,
        (&task.network().state(), &optimizer.state()),
        &|dir| write_checkpoint_export(&contents, dir),
        config.keep_last_checkpoints as usize,
    )
    .map_err(|error| TrainError::CheckpointNotSaved {
        output_dir: config.output_dir.clone(),
        step: state.step,
        reason: match error {
            TrainError::Io { source, .. } => source.to_string(),
            other => other.to_string(),
        },
        kept: list_checkpoints(&config.output_dir)
            .pop()
            .map(|(_, path)| path),
    })?;
    reporter.checkpoint(&path, state.step);
    Ok((state.step, path))
}

/// Seconds since the Unix epoch.
pub(super) fn unix_seconds() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
