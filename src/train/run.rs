//! The training function: setup, loop, report, save.

use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::checkpoint::{
    RngState, TrainState, list_checkpoints, load_checkpoint, prepare_output_folder, save_checkpoint,
};
use super::inputs::{ContextCache, LatentSource, gaussian, process_caption};
use super::metadata::{RunFacts, lora_metadata};
use super::noise::{add_noise, min_snr_weights, target};
use super::optimizer::{Optimizer, OptimizerSettings};
use super::report::{CancelToken, Flow, LiveRun, StepReport, TrainPlan, TrainReporter};
use super::samples::render_samples;
use super::schedule::lr_factor;
use super::tensorboard::EventWriter;
use super::{TrainError, TrainOutcome, TrainStop};
use crate::config::{DeviceChoice, LogWith, MixedPrecision, SavePrecision, TrainConfig};
use crate::data::batches::{Batch, epoch_batches};
use crate::data::buckets::BucketSettings;
use crate::data::images::file_hash;
use crate::data::latent_cache::LatentCache;
use crate::data::{Dataset, scan_dataset};
use crate::lora::{
    LoraNetwork, NetworkKind, NetworkSpec, TargetComponent, export_network, write_lora_file,
};
use crate::models::checkpoint::ModelSource;
use crate::models::checkpointing::CheckpointGrads;
use crate::models::pipeline::StableDiffusion;
use crate::models::schedulers::PredictionType;

/// Consecutive non-finite losses after which training stops.
const MAX_NONFINITE_STREAK: u32 = 5;

/// Everything the steps need, fixed for the run.
struct Run<'a> {
    config: &'a TrainConfig,
    model: &'a StableDiffusion,
    dataset: &'a Dataset,
    buckets: Vec<(u32, u32)>,
    alphas_cumprod: Vec<f32>,
    prediction: PredictionType,
    device: Device,
    dtype: DType,
}

/// A base model loaded for training, reusable across runs and previews.
pub struct LoadedBase {
    pub path: PathBuf,
    pub model: StableDiffusion,
    pub family: crate::models::checkpoint::ModelFamily,
    pub device: Device,
    pub dtype: DType,
}

/// Loads `config.base_model` on `config.device` in the training precision.
pub fn load_base(config: &TrainConfig) -> Result<LoadedBase, TrainError> {
    let choice: DeviceChoice = config.device.parse().map_err(TrainError::Device)?;
    let device = crate::device::open_device(choice).map_err(TrainError::Device)?;
    let dtype = compute_dtype(&device, config.mixed_precision);
    let mut source = ModelSource::open(&config.base_model)?;
    if let Some(prediction) = config.prediction_type {
        source.set_prediction_type(match prediction {
            crate::config::PredictionOverride::Epsilon => PredictionType::Epsilon,
            crate::config::PredictionOverride::VPrediction => PredictionType::VPrediction,
        });
    }
    let model = StableDiffusion::load(&source, &device, dtype)?;
    Ok(LoadedBase {
        path: config.base_model.clone(),
        model,
        family: source.config().family,
        device,
        dtype,
    })
}

/// Trains a LoRA as `config` says, optionally resuming from a checkpoint folder (or an output folder's newest).
pub fn train(
    config: &TrainConfig,
    resume: Option<&Path>,
    reporter: &mut dyn TrainReporter,
    cancel: &CancelToken,
) -> Result<TrainOutcome, TrainError> {
    // The output folder and the dataset are checked before the model is loaded, so that their problems
    // are reported at once.
    prepare_output(config, reporter)?;
    let dataset = scan_dataset(config)?;
    reporter.stage("loading the base model", 0, 1);
    let mut base = load_base(config)?;
    reporter.stage("loading the base model", 1, 1);
    train_scanned(&mut base, &dataset, config, resume, reporter, cancel)
}

/// [`train`] on an already loaded base model; the model is left without adapters afterwards.
pub fn train_on(
    base: &mut LoadedBase,
    config: &TrainConfig,
    resume: Option<&Path>,
    reporter: &mut dyn TrainReporter,
    cancel: &CancelToken,
) -> Result<TrainOutcome, TrainError> {
    prepare_output(config, reporter)?;
    let dataset = scan_dataset(config)?;
    train_scanned(base, &dataset, config, resume, reporter, cancel)
}

/// [`train_on`] with the dataset already scanned.
fn train_scanned(
    base: &mut LoadedBase,
    dataset: &Dataset,
    config: &TrainConfig,
    resume: Option<&Path>,
    reporter: &mut dyn TrainReporter,
    cancel: &CancelToken,
) -> Result<TrainOutcome, TrainError> {
    report_dataset(dataset, reporter);
    let (device, dtype, family) = (base.device.clone(), base.dtype, base.family);
    let checkpoint_grads = config.gradient_checkpointing.then(CheckpointGrads::default);
    base.model
        .unet
        .set_gradient_checkpointing(checkpoint_grads.clone());
    let result = run_training(
        &base.model,
        family,
        &device,
        dtype,
        checkpoint_grads.as_ref(),
        dataset,
        config,
        resume,
        reporter,
        cancel,
    );
    base.model.unet.set_gradient_checkpointing(None);
    result
}

/// Checks that the output folder can be written and clears what an interrupted run left half-written.
fn prepare_output(
    config: &TrainConfig,
    reporter: &mut dyn TrainReporter,
) -> Result<(), TrainError> {
    let removed = prepare_output_folder(&config.output_dir)?;
    if !removed.is_empty() {
        reporter.message(&format!(
            "removed what an interrupted run left half-written in {}: {}",
            config.output_dir.display(),
            removed.join(", ")
        ));
    }
    Ok(())
}

/// The setup after loading, the loop, and the final save.
#[allow(clippy::too_many_arguments)]
fn run_training(
    model: &StableDiffusion,
    family: crate::models::checkpoint::ModelFamily,
    device: &Device,
    dtype: DType,
    checkpoint_grads: Option<&CheckpointGrads>,
    dataset: &Dataset,
    config: &TrainConfig,
    resume: Option<&Path>,
    reporter: &mut dyn TrainReporter,
    cancel: &CancelToken,
) -> Result<TrainOutcome, TrainError> {
    let device = device.clone();
    let network = create_network(config, model, &device)?;
    let named = network.named_vars();
    let vars: Vec<&Var> = named.iter().map(|(_, _, v)| *v).collect();
    let group_lrs = [config.unet_lr(), config.text_encoder_lr()];
    let base_lrs: Vec<f64> = named
        .iter()
        .map(|(_, component, _)| group_lrs[*component])
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

    let fingerprint = dataset_fingerprint(dataset)?;
    let now = unix_seconds();
    let mut state = TrainState {
        format_version: 1,
        lora_studio_version: crate::build_info::LONG_VERSION.to_string(),
        step: 0,
        rng: RngState::capture(&ChaCha8Rng::seed_from_u64(config.seed)),
        nonfinite_streak: 0,
        loss_scale: if dtype == DType::F16 { 65536.0 } else { 1.0 },
        dataset_fingerprint: fingerprint.clone(),
        images: dataset.items.len(),
        training_started_at: now,
        config: config.clone(),
    };
    if let Some(path) = resume {
        let checkpoint = load_checkpoint(path, &device)?;
        if let Some(note) = &checkpoint.upgrade_note {
            reporter.message(note);
        }
        check_resumable(&checkpoint.state.config, config, &checkpoint.path)?;
        let bad = |reason: String| TrainError::Checkpoint {
            path: checkpoint.path.clone(),
            reason,
        };
        network.load_state(&checkpoint.adapters).map_err(bad)?;
        optimizer
            .load_state(&checkpoint.optimizer, checkpoint.state.step)
            .map_err(bad)?;
        checkpoint.state.rng.restore().map_err(bad)?;
        if checkpoint.state.dataset_fingerprint != fingerprint {
            reporter.message(&format!(
                "the dataset changed since {} ({} images then, {} now); training continues on the current images",
                checkpoint.path.display(),
                checkpoint.state.images,
                dataset.items.len()
            ));
        }
        reporter.message(&format!(
            "resuming from {} at step {}",
            checkpoint.path.display(),
            checkpoint.state.step
        ));
        state = TrainState {
            dataset_fingerprint: fingerprint,
            images: dataset.items.len(),
            config: config.clone(),
            ..checkpoint.state
        };
    }
    let mut rng = state
        .rng
        .restore()
        .map_err(|reason| TrainError::Checkpoint {
            path: config.output_dir.clone(),
            reason,
        })?;

    // ---- data plan
    let bucket_settings = BucketSettings::from_config(config);
    let buckets: Vec<(u32, u32)> = dataset
        .items
        .iter()
        .map(|i| bucket_settings.bucket_for(i.width, i.height))
        .collect();
    let repeats: Vec<u32> = dataset.items.iter().map(|i| i.repeats).collect();
    let batch_size = config.batch_size as usize;
    let accumulation = config.gradient_accumulation_steps as u64;
    let batches_per_epoch =
        epoch_batches(&buckets, &repeats, batch_size, config.seed, 0).len() as u64;
    let steps_per_epoch = batches_per_epoch.div_ceil(accumulation).max(1);
    let total_steps = config
        .max_train_steps
        .unwrap_or(config.epochs as u64 * steps_per_epoch);

    let run = Run {
        config,
        model,
        dataset,
        buckets,
        alphas_cumprod: model.config().scheduler.alphas_cumprod(),
        prediction: model.config().scheduler.prediction_type,
        device: device.clone(),
        dtype,
    };
    let mut latents = latent_source(&run, reporter)?;
    let mut contexts = ContextCache::default();
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
    reporter.plan(&TrainPlan {
        images: dataset.items.len(),
        samples_per_epoch: dataset.samples_per_epoch(),
        steps_per_epoch,
        total_steps,
        epochs: total_steps.div_ceil(steps_per_epoch),
        first_step: state.step,
        trainable_parameters: network.parameter_count(),
        adapters: network.modules().len(),
    });

    // ---- loop
    let mut stop = TrainStop::Finished;
    let (mut planned_epoch, mut batches): (Option<u64>, Vec<Batch>) = (None, Vec::new());
    let mut last_checkpoint = None;
    while state.step < total_steps {
        if cancel.is_cancelled() {
            stop = TrainStop::Cancelled;
            break;
        }
        let started = Instant::now();
        let epoch = state.step / steps_per_epoch;
        if planned_epoch != Some(epoch) {
            batches = epoch_batches(&run.buckets, &repeats, batch_size, config.seed, epoch);
            planned_epoch = Some(epoch);
        }
        let first = ((state.step % steps_per_epoch) * accumulation) as usize;
        let micro_batches =
            &batches[first.min(batches.len())..(first + accumulation as usize).min(batches.len())];

        let mut accumulated: Vec<Option<Tensor>> = vec![None; vars.len()];
        let mut loss_sum = 0f64;
        let mut finite = !micro_batches.is_empty();
        for batch in micro_batches {
            let loss = micro_batch_loss(&run, batch, &mut rng, &mut latents, &mut contexts)?;
            let value = loss.to_scalar::<f32>()? as f64;
            loss_sum += value;
            if !value.is_finite() {
                finite = false;
                continue;
            }
            let scaled = (loss * (state.loss_scale / micro_batches.len() as f64))?;
            let grads = scaled.backward()?;
            for (slot, var) in accumulated.iter_mut().zip(&vars) {
                if let Some(g) = variable_gradient(&grads, checkpoint_grads, var)? {
                    *slot = Some(match slot.take() {
                        Some(sum) => (sum + g)?,
                        None => g,
                    });
                }
            }
        }
        let loss = loss_sum / micro_batches.len().max(1) as f64;
        let factor = lr_factor(
            config.lr_scheduler,
            state.step,
            total_steps,
            config.lr_warmup_steps,
            config.lr_num_cycles,
        );
        let applied = finite
            && apply_update(
                &mut optimizer,
                &vars,
                accumulated,
                &base_lrs,
                factor,
                &mut state,
                config,
            )?;
        state.step += 1;
        state.nonfinite_streak = if applied {
            0
        } else {
            state.nonfinite_streak + 1
        };
        state.rng = RngState::capture(&rng);

        let report = StepReport {
            step: state.step,
            total_steps,
            epoch: epoch + 1,
            loss,
            lr: config.unet_lr() * factor,
            seconds: started.elapsed().as_secs_f64(),
            skipped: !applied,
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
            last_checkpoint = Some(save(&run, &network, &optimizer, &state, reporter)?);
        }
        if every(config.sample_every_n_steps, config.sample_every_n_epochs) {
            render_samples(
                model,
                &network,
                config,
                state.step,
                events.as_mut(),
                reporter,
            )?;
        }
        let live = LiveRun {
            model,
            network: &network,
            step: state.step,
        };
        if reporter.between_steps(&live) == Flow::Stop {
            cancel.cancel();
        }
    }

    // ---- save
    if state.step > 0
        && last_checkpoint
            .as_ref()
            .is_none_or(|(s, _)| *s != state.step)
    {
        last_checkpoint = Some(save(&run, &network, &optimizer, &state, reporter)?);
    }
    let lora_path = config
        .output_dir
        .join(format!("{}.safetensors", config.output_name));
    export(&run, &network, &state, family, &lora_path)?;
    if stop == TrainStop::NonFiniteLoss {
        reporter.message(&format!(
            "training stopped after {MAX_NONFINITE_STREAK} steps in a row with a non-finite loss; the last good \
             adapters are saved. Lower the learning rate{}",
            if dtype == DType::F16 { ", or use bf16 instead of fp16" } else { "" }
        ));
    }
    Ok(TrainOutcome {
        lora_path,
        checkpoint: last_checkpoint.map(|(_, p)| p),
        steps: state.step,
        stop,
    })
}

/// f32 on the CPU; on GPUs bf16 where supported (or as asked), else fp16.
fn compute_dtype(device: &Device, precision: MixedPrecision) -> DType {
    if device.is_cpu() {
        return DType::F32;
    }
    match precision {
        MixedPrecision::No => DType::F32,
        MixedPrecision::Fp16 => DType::F16,
        MixedPrecision::Bf16 => DType::BF16,
        MixedPrecision::Auto => crate::device::inference_dtype(device),
    }
}

fn report_dataset(dataset: &Dataset, reporter: &mut dyn TrainReporter) {
    for (path, reason) in &dataset.unreadable {
        reporter.message(&format!("skipping {}: {reason}", path.display()));
    }
    if !dataset.missing_captions.is_empty() {
        reporter.message(&format!(
            "{} {} no caption (no metadata.csv entry, sidecar or instance prompt), e.g. {}",
            dataset.missing_captions.len(),
            if dataset.missing_captions.len() == 1 {
                "image has"
            } else {
                "images have"
            },
            dataset.missing_captions[0].display()
        ));
    }
}

fn create_network(
    config: &TrainConfig,
    model: &StableDiffusion,
    device: &Device,
) -> Result<LoraNetwork, TrainError> {
    let mut targets = vec![TargetComponent {
        prefix: crate::lora::UNET_PREFIX,
        slots: model.unet.lora_targets(config.conv_lora),
    }];
    if config.train_text_encoder {
        targets.push(TargetComponent {
            prefix: crate::lora::TEXT_ENCODER_PREFIX,
            slots: model.text_encoder.layers().slots(),
        });
    }
    let spec = NetworkSpec {
        rank: config.lora_rank as usize,
        alpha: config.lora_alpha as f64,
        conv_rank: config.conv_rank() as usize,
        conv_alpha: config.conv_alpha() as f64,
        kind: if config.dora {
            NetworkKind::Dora
        } else if config.pissa {
            NetworkKind::Pissa
        } else {
            NetworkKind::Lora
        },
    };
    Ok(LoraNetwork::create(&targets, spec, config.seed, device)?)
}

/// The settings a checkpoint's network and optimizer depend on must not change on resume.
fn check_resumable(saved: &TrainConfig, now: &TrainConfig, path: &Path) -> Result<(), TrainError> {
    let fixed: [(&str, String, String); 9] = [
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

/// A hash of what the dataset holds: file contents, captions and repeats.
fn dataset_fingerprint(dataset: &Dataset) -> Result<String, TrainError> {
    let mut text = String::new();
    for item in &dataset.items {
        text.push_str(&format!(
            "{}|{}|{}|{}\n",
            item.relative.display(),
            file_hash(&item.path)?,
            item.caption,
            item.repeats
        ));
    }
    Ok(crate::hashing::sha256_hex(text.as_bytes()))
}

/// Prepares the latent source, encoding every image up front when latents are cached.
fn latent_source<'a>(
    run: &Run<'a>,
    reporter: &mut dyn TrainReporter,
) -> Result<LatentSource<'a>, TrainError> {
    let config = run.config;
    let caching = config.cache_latents && !config.random_crop;
    if config.cache_latents && config.random_crop {
        reporter.message("latents are not cached with random_crop (every step crops differently)");
    }
    let cache = if caching {
        let dir = config
            .cache_latents_to_disk
            .then(|| config.output_dir.join("cache").join("latents"));
        Some(LatentCache::new(dir)?)
    } else {
        None
    };
    let file_hashes = if caching {
        run.dataset
            .items
            .iter()
            .map(|i| file_hash(&i.path))
            .collect::<Result<Vec<_>, _>>()?
    } else {
        Vec::new()
    };
    let mut source = LatentSource {
        vae: &run.model.vae,
        config,
        cache,
        file_hashes,
        device: run.device.clone(),
        dtype: run.dtype,
    };
    if caching {
        let flips: &[bool] = if config.flip_aug {
            &[false, true]
        } else {
            &[false]
        };
        let total = run.dataset.items.len() * flips.len();
        let mut done = 0;
        for (index, item) in run.dataset.items.iter().enumerate() {
            for &flip in flips {
                let plan = crate::data::images::CropPlan::centred(
                    (item.width, item.height),
                    run.buckets[index],
                    flip,
                );
                source.latent(index, item, &plan)?;
                done += 1;
                reporter.stage("encoding latents", done, total);
            }
        }
        if let Some(cache) = &source.cache
            && cache.disk_hits > 0
        {
            reporter.message(&format!(
                "{} latents read from the cache, {} encoded",
                cache.disk_hits, cache.encoded
            ));
        }
    }
    Ok(source)
}

/// The loss of one micro-batch (a scalar f32 tensor, with its graph).
fn micro_batch_loss(
    run: &Run,
    batch: &Batch,
    rng: &mut ChaCha8Rng,
    latents: &mut LatentSource,
    contexts: &mut ContextCache,
) -> Result<Tensor, TrainError> {
    let config = run.config;
    let model = run.model;
    let scaling = model.config().vae.scaling_factor;
    let mut samples = Vec::with_capacity(batch.items.len());
    let mut masks = Vec::with_capacity(batch.items.len());
    let mut captions = Vec::with_capacity(batch.items.len());
    for &index in &batch.items {
        let item = &run.dataset.items[index];
        let plan = latents.plan(item, batch.bucket, rng);
        let latent = latents.latent(index, item, &plan)?;
        let eps = gaussian(rng, latent.mean.dims(), &run.device)?;
        let sample = (latent.mean.clone() + (latent.logvar.affine(0.5, 0.0)?.exp()? * eps)?)?
            .affine(scaling, 0.0)?;
        samples.push(sample);
        masks.push(latent.mask.clone());
        captions.push(process_caption(&item.caption, config, rng));
    }
    let x0 = Tensor::stack(&samples, 0)?;
    let dims = x0.dims().to_vec();
    let mut noise = gaussian(rng, &dims, &run.device)?;
    if config.noise_offset > 0.0 {
        let offset = gaussian(rng, &[dims[0], dims[1], 1, 1], &run.device)?;
        noise = noise.broadcast_add(&(offset * config.noise_offset)?)?;
    }
    let timesteps: Vec<usize> = (0..dims[0])
        .map(|_| rng.random_range(0..run.alphas_cumprod.len()))
        .collect();
    let alphas: Vec<f32> = timesteps.iter().map(|&t| run.alphas_cumprod[t]).collect();
    let noisy = add_noise(&x0, &noise, &alphas)?;
    let wanted = target(&x0, &noise, &alphas, run.prediction)?;
    let context = encode_captions(run, &captions, contexts)?;
    let t = Tensor::from_vec(
        timesteps.iter().map(|&t| t as f32).collect::<Vec<_>>(),
        dims[0],
        &run.device,
    )?;
    let prediction = model
        .unet
        .forward(&noisy.to_dtype(run.dtype)?, &t, &context)?
        .to_dtype(DType::F32)?;
    let error = (prediction - wanted)?.sqr()?;
    let per_sample = if config.masked_loss && masks.iter().all(Option::is_some) {
        let mask = Tensor::stack(&masks.into_iter().flatten().collect::<Vec<_>>(), 0)?;
        let weighted = error.broadcast_mul(&mask)?.sum((1, 2, 3))?;
        let area = (mask.sum((1, 2, 3))? * dims[1] as f64)?.clamp(1e-6f32, f32::MAX)?;
        weighted.div(&area)?
    } else {
        error.mean((1, 2, 3))?
    };
    let per_sample = match config.min_snr_gamma {
        Some(gamma) => {
            let weights: Vec<f32> = min_snr_weights(&alphas, gamma, run.prediction)
                .iter()
                .map(|&w| w as f32)
                .collect();
            (per_sample * Tensor::from_vec(weights, dims[0], &run.device)?)?
        }
        None => per_sample,
    };
    Ok(per_sample.mean_all()?)
}

/// The gradient of `var` after a backward pass, in f32 and detached. A variable inside a checkpointed
/// block gets (part of) its gradient from the recomputation in `checkpoint_grads`. candle leaves a
/// variable's own gradient attached to the forward graph (for a conv kernel it is a conv of the
/// activations); kept attached, the optimizer state would chain every step's activations together.
pub(super) fn variable_gradient(
    grads: &candle_core::backprop::GradStore,
    checkpoint_grads: Option<&CheckpointGrads>,
    var: &Var,
) -> candle_core::Result<Option<Tensor>> {
    let recomputed = checkpoint_grads.and_then(|store| store.take(var));
    let mut sum: Option<Tensor> = None;
    for g in [grads.get(var).cloned(), recomputed].into_iter().flatten() {
        let g = g.detach().to_dtype(DType::F32)?;
        sum = Some(match sum {
            Some(s) => (s + g)?,
            None => g,
        });
    }
    Ok(sum)
}

/// Text-encoder outputs for the captions (cached when the encoder is frozen and captions are fixed).
fn encode_captions(
    run: &Run,
    captions: &[String],
    contexts: &mut ContextCache,
) -> Result<Tensor, TrainError> {
    let config = run.config;
    let clip_skip = config.clip_skip as usize;
    let cacheable =
        !config.train_text_encoder && !config.shuffle_caption && config.caption_dropout_rate == 0.0;
    if !cacheable {
        let refs: Vec<&str> = captions.iter().map(String::as_str).collect();
        return Ok(run.model.encode_prompts(&refs, clip_skip)?);
    }
    let mut rows = Vec::with_capacity(captions.len());
    for caption in captions {
        let context = match contexts.get(caption) {
            Some(c) => c.clone(),
            None => {
                let c = run.model.encode_prompts(&[caption.as_str()], clip_skip)?;
                contexts.insert(caption.clone(), c.clone());
                c
            }
        };
        rows.push(context);
    }
    Ok(Tensor::cat(&rows, 0)?)
}

/// Clips, unscales and applies the accumulated gradients; false when they are not finite (fp16 overflow).
fn apply_update(
    optimizer: &mut Optimizer,
    vars: &[&Var],
    mut grads: Vec<Option<Tensor>>,
    base_lrs: &[f64],
    factor: f64,
    state: &mut TrainState,
    config: &TrainConfig,
) -> Result<bool, TrainError> {
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
        }
        return Ok(false);
    }
    if config.max_grad_norm > 0.0 && norm > config.max_grad_norm {
        let clip = config.max_grad_norm / (norm + 1e-6);
        for grad in grads.iter_mut().flatten() {
            *grad = (&*grad * clip)?;
        }
    }
    let lrs: Vec<f64> = base_lrs.iter().map(|lr| lr * factor).collect();
    optimizer.apply(vars, &grads, &lrs)?;
    if state.loss_scale > 1.0 && optimizer.step.is_multiple_of(2000) {
        state.loss_scale *= 2.0;
    }
    Ok(true)
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

/// Saves a resumable checkpoint with the LoRA exported beside it.
fn save(
    run: &Run,
    network: &LoraNetwork,
    optimizer: &Optimizer,
    state: &TrainState,
    reporter: &mut dyn TrainReporter,
) -> Result<(u64, PathBuf), TrainError> {
    let config = run.config;
    let path = save_checkpoint(
        &config.output_dir,
        state,
        &network.state(),
        &optimizer.state(),
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

/// Writes the kohya LoRA file (and the diffusers copy when asked).
fn export(
    run: &Run,
    network: &LoraNetwork,
    state: &TrainState,
    family: crate::models::checkpoint::ModelFamily,
    path: &Path,
) -> Result<(), TrainError> {
    let config = run.config;
    network.set_multiplier(1.0);
    let exported = export_network(network)?;
    let save_dtype = match config.save_precision {
        SavePrecision::Fp16 => DType::F16,
        SavePrecision::Bf16 => DType::BF16,
        SavePrecision::Fp32 => DType::F32,
    };
    let facts = RunFacts {
        family,
        prediction: run.prediction,
        dataset: run.dataset,
        steps: state.step,
        epoch: epoch_of(run, state.step),
        started_at: state.training_started_at,
        finished_at: unix_seconds(),
        dims: exported.network_dims(),
        network_kind: network.spec().kind.label(),
        exactness: exported.exactness.clone(),
    };
    let metadata = lora_metadata(config, &facts);
    write_lora_file(path, &exported.kohya_tensors(save_dtype)?, &metadata)?;
    if config.export_peft {
        let folder = config
            .output_dir
            .join(format!("{}_diffusers", config.output_name));
        std::fs::create_dir_all(&folder).map_err(|source| TrainError::Io {
            path: folder.clone(),
            source,
        })?;
        write_lora_file(
            &folder.join("pytorch_lora_weights.safetensors"),
            &exported.peft_tensors(save_dtype)?,
            &metadata,
        )?;
    }
    Ok(())
}

/// The (1-based) epoch a step count reaches.
fn epoch_of(run: &Run, step: u64) -> u64 {
    let repeats: Vec<u32> = run.dataset.items.iter().map(|i| i.repeats).collect();
    let batches = epoch_batches(
        &run.buckets,
        &repeats,
        run.config.batch_size as usize,
        run.config.seed,
        0,
    )
    .len() as u64;
    let per_epoch = batches
        .div_ceil(run.config.gradient_accumulation_steps as u64)
        .max(1);
    step.div_ceil(per_epoch)
}

fn unix_seconds() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The newest checkpoint folder in an output folder, if any (for `--resume_from_checkpoint latest`).
pub fn latest_checkpoint(output_dir: &Path) -> Option<PathBuf> {
    list_checkpoints(output_dir).pop().map(|(_, p)| p)
}

/// Exports the adapters of a checkpoint (any network kind) as a LoRA file at `out`, with the metadata of
/// its run; `config` changes only how it is written (`save_precision`, `export_peft`).
pub fn export_checkpoint(
    base: &LoadedBase,
    checkpoint: &Path,
    out: &Path,
    save_precision: SavePrecision,
    export_peft: bool,
) -> Result<PathBuf, TrainError> {
    if let Some(folder) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(folder).map_err(|source| TrainError::Io {
            path: folder.to_path_buf(),
            source,
        })?;
    }
    let (network, saved) = network_from_checkpoint(&base.model, &base.device, checkpoint)?;
    let config = TrainConfig {
        save_precision,
        export_peft,
        output_dir: out.parent().map(Path::to_path_buf).unwrap_or_default(),
        output_name: out
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default(),
        ..saved.state.config.clone()
    };
    let dataset = scan_dataset(&config)?;
    let bucket_settings = BucketSettings::from_config(&config);
    let run = Run {
        config: &config,
        model: &base.model,
        dataset: &dataset,
        buckets: dataset
            .items
            .iter()
            .map(|i| bucket_settings.bucket_for(i.width, i.height))
            .collect(),
        alphas_cumprod: Vec::new(),
        prediction: base.model.config().scheduler.prediction_type,
        device: base.device.clone(),
        dtype: base.dtype,
    };
    export(&run, &network, &saved.state, base.family, out)?;
    Ok(out.to_path_buf())
}

/// Rebuilds a checkpoint's network on `model` (attached, at strength 1).
pub fn network_from_checkpoint(
    model: &StableDiffusion,
    device: &Device,
    checkpoint: &Path,
) -> Result<(LoraNetwork, super::checkpoint::Checkpoint), TrainError> {
    let saved = load_checkpoint(checkpoint, device)?;
    let network = create_network(&saved.state.config, model, device)?;
    network
        .load_state(&saved.adapters)
        .map_err(|reason| TrainError::Checkpoint {
            path: saved.path.clone(),
            reason,
        })?;
    Ok((network, saved))
}
