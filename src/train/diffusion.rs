//! Training Stable Diffusion LoRAs (SD1, SD2 and SDXL): the diffusion task the loop ([`super::trainer`])
//! drives (latents from the VAE or the cache, noise at random timesteps, the UNet's noise or velocity loss,
//! for SDXL with the pooled text embedding and each image's size conditioning, sample images) and the entry
//! points that load the base model and scan the dataset.

use std::path::{Path, PathBuf};

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use super::checkpoint::{Checkpoint, list_checkpoints, load_checkpoint};
use super::cpu_products::{cpu_products, loading_scope};
use super::export::{ExportContents, create_parent, renamed, write_export};
use super::inputs::{
    ContextCache, LatentSource, gaussian, kohya_size_conditioning, process_caption,
};
use super::metadata::{RunFacts, lora_metadata};
use super::noise::{add_noise, min_snr_weights, target};
use super::report::{CancelToken, LiveModel, LiveRun, TrainReporter};
use super::samples::render_samples;
use super::task::{ExportPoint, TrainingTask, draw_dropout};
use super::tensorboard::EventWriter;
use super::trainer::{
    TEXT_ENCODER_LR_GROUP, UNET_LR_GROUP, run_loop, steps_per_epoch, unix_seconds,
};
use super::{TrainError, TrainOutcome};
use crate::config::{
    ConfigError, DeviceChoice, MixedPrecision, PredictionOverride, SD_RESOLUTION, SDXL_RESOLUTION,
    SavePrecision, TrainConfig,
};
use crate::data::batches::{Batch, epoch_batches};
use crate::data::buckets::BucketSettings;
use crate::data::images::{CropPlan, file_hash};
use crate::data::latent_cache::LatentCache;
use crate::data::{Dataset, scan_dataset};
use crate::lora::{LoraNetwork, NetworkKind, NetworkSpec, TargetComponent, export_network};
use crate::models::checkpoint::{ModelFamily, ModelSource, PredictionOrigin};
use crate::models::checkpointing::CheckpointGrads;
use crate::models::pipeline::{PromptEmbeddings, StableDiffusion};
use crate::models::schedulers::{PredictionType, SchedulerConfig};

/// A base model loaded for training, reusable across runs and previews.
pub struct LoadedBase {
    pub path: PathBuf,
    pub model: StableDiffusion,
    pub family: ModelFamily,
    pub device: Device,
    pub dtype: DType,
}

/// Loads `config.base_model` on `config.device` in the training precision, with `prediction_type` applied.
pub fn load_base(config: &TrainConfig) -> Result<LoadedBase, TrainError> {
    let choice: DeviceChoice = config.device.parse().map_err(TrainError::Device)?;
    let device = crate::device::open_device(choice).map_err(TrainError::Device)?;
    let dtype = compute_dtype(&device, config.mixed_precision);
    let _products = loading_scope(&device, config.mixed_precision);
    let mut source = ModelSource::open(&config.base_model)?;
    if let Some(prediction) = config.prediction_type {
        source.set_prediction_type(prediction_type(prediction));
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

/// The scheduler's prediction type a config override asks for.
pub fn prediction_type(prediction: PredictionOverride) -> PredictionType {
    match prediction {
        PredictionOverride::Epsilon => PredictionType::Epsilon,
        PredictionOverride::VPrediction => PredictionType::VPrediction,
    }
}

/// f32 on the CPU; on GPUs bf16 where supported (or as asked), else fp16.
pub(super) fn compute_dtype(device: &Device, precision: MixedPrecision) -> DType {
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

/// Trains a LoRA as `config` says, optionally resuming from a checkpoint folder (or an output folder's newest).
/// A language model folder as the base model trains a language model ([`super::causal_lm`]).
pub fn train(
    config: &TrainConfig,
    resume: Option<&Path>,
    reporter: &mut dyn TrainReporter,
    cancel: &CancelToken,
) -> Result<TrainOutcome, TrainError> {
    if super::causal_lm::is_language_model_folder(&config.base_model) {
        return super::causal_lm::train_causal_lm(config, resume, reporter, cancel);
    }
    // The output folder and the dataset are checked before the model is loaded, so that their problems
    // are reported at once.
    prepare_output(config, reporter)?;
    let dataset = scan_dataset(config)?;
    reporter.stage("loading the base model", 0, 1);
    let mut base = load_base(config)?;
    reporter.stage("loading the base model", 1, 1);
    train_scanned(&mut base, &dataset, config, resume, reporter, cancel)
}

/// [`train`] on an already loaded base model (in the precision it was loaded in); the model is left without
/// adapters afterwards.
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
    let config = &for_family(config, base.family)?;
    let layers = [base.model.unet.layers(), base.model.vae.layers()]
        .into_iter()
        .chain(
            base.model
                .text_encoders()
                .into_iter()
                .map(|(_, e)| e.layers()),
        )
        .cloned()
        .collect();
    let _products = cpu_products(&base.device, config.mixed_precision, layers, reporter)?;
    report_dataset(dataset, reporter);
    if base.model.config().prediction_origin != PredictionOrigin::Config {
        reporter.message(&base.model.prediction_note());
    }
    if let Some(note) = base.model.vae_precision_note() {
        reporter.message(&note);
    }
    if base.family == ModelFamily::Sdxl && config.clip_skip != 1 {
        reporter.message(&format!(
            "clip_skip {} is not used: SDXL always conditions on both text encoders' penultimate layers",
            config.clip_skip
        ));
    }
    let checkpoint_grads = config.gradient_checkpointing.then(CheckpointGrads::default);
    base.model
        .unet
        .set_gradient_checkpointing(checkpoint_grads.clone());
    let result = (|| {
        let mut task = DiffusionTask::new(base, dataset, config, checkpoint_grads.as_ref())?;
        task.cache_latents(reporter)?;
        run_loop(&mut task, config, base.dtype, resume, reporter, cancel)
    })();
    base.model.unet.set_gradient_checkpointing(None);
    result
}

/// The resolution a run on `family` trains at when the config sets none: SDXL's native 1024, else 512 (as
/// kohya sd-scripts defaults for each).
fn native_resolution(family: ModelFamily) -> u32 {
    match family {
        ModelFamily::Sdxl => SDXL_RESOLUTION,
        ModelFamily::Sd1 | ModelFamily::Sd2 => SD_RESOLUTION,
    }
}

/// `config` for a base model of `family`: its resolution set (the family's native one when unset, the bucket
/// sides that are not set following it) and checked with the buckets again, and SDXL's bucket step checked as
/// kohya checks it (a multiple of 32).
fn for_family(config: &TrainConfig, family: ModelFamily) -> Result<TrainConfig, TrainError> {
    let resolved = config.with_resolution_default(native_resolution(family));
    crate::config::validate_resolution(&resolved)?;
    if family == ModelFamily::Sdxl && !resolved.bucket_reso_steps.is_multiple_of(32) {
        return Err(ConfigError::BadValue {
            key: "bucket_reso_steps".to_string(),
            reason: format!(
                "must be a multiple of 32 for SDXL (as kohya sd-scripts requires), not {}",
                resolved.bucket_reso_steps
            ),
        }
        .into());
    }
    Ok(resolved)
}

/// Checks that the output folder can be written and clears what an interrupted run left half-written.
pub(super) fn prepare_output(
    config: &TrainConfig,
    reporter: &mut dyn TrainReporter,
) -> Result<(), TrainError> {
    let removed = super::checkpoint::prepare_output_folder(&config.output_dir)?;
    if !removed.is_empty() {
        reporter.message(&format!(
            "removed what an interrupted run left half-written in {}: {}",
            config.output_dir.display(),
            removed.join(", ")
        ));
    }
    Ok(())
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

/// The bucket of every image of `dataset`.
fn buckets(config: &TrainConfig, dataset: &Dataset) -> Vec<(u32, u32)> {
    let settings = BucketSettings::from_config(config);
    dataset
        .items
        .iter()
        .map(|i| settings.bucket_for(i.width, i.height))
        .collect()
}

/// The micro-batches of epoch `epoch` of `dataset`, whose images fall in `buckets`.
fn batches_of(
    config: &TrainConfig,
    dataset: &Dataset,
    buckets: &[(u32, u32)],
    epoch: u64,
) -> Vec<Batch> {
    let repeats: Vec<u32> = dataset.items.iter().map(|i| i.repeats).collect();
    epoch_batches(
        buckets,
        &repeats,
        config.batch_size as usize,
        config.seed,
        epoch,
    )
}

/// The adapters `config` asks for, created and attached on `model`.
fn create_network(
    config: &TrainConfig,
    model: &StableDiffusion,
    device: &Device,
) -> Result<LoraNetwork, TrainError> {
    let mut targets = vec![TargetComponent {
        prefix: crate::lora::UNET_PREFIX,
        slots: model.unet.lora_targets(config.conv_lora),
        group: UNET_LR_GROUP,
    }];
    if config.train_text_encoder {
        // SDXL: both text encoders, at one learning rate (kohya's `networks.lora` has one for both).
        targets.extend(model.text_encoders().into_iter().map(|(prefix, encoder)| {
            TargetComponent {
                prefix,
                slots: encoder.lora_targets(),
                group: TEXT_ENCODER_LR_GROUP,
            }
        }));
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

/// Training a Stable Diffusion LoRA: everything the steps need, fixed for the run.
struct DiffusionTask<'a> {
    config: &'a TrainConfig,
    model: &'a StableDiffusion,
    family: ModelFamily,
    dataset: &'a Dataset,
    buckets: Vec<(u32, u32)>,
    alphas_cumprod: Vec<f32>,
    prediction: PredictionType,
    device: Device,
    dtype: DType,
    network: LoraNetwork,
    checkpoint_grads: Option<&'a CheckpointGrads>,
    latents: LatentSource<'a>,
    contexts: ContextCache,
}

impl<'a> DiffusionTask<'a> {
    fn new(
        base: &'a LoadedBase,
        dataset: &'a Dataset,
        config: &'a TrainConfig,
        checkpoint_grads: Option<&'a CheckpointGrads>,
    ) -> Result<Self, TrainError> {
        let model = &base.model;
        let network = create_network(config, model, &base.device)?;
        let buckets = buckets(config, dataset);
        let caching = config.cache_latents && !config.random_crop;
        let cache = if caching {
            let dir = config
                .cache_latents_to_disk
                .then(|| config.output_dir.join("cache").join("latents"));
            Some(LatentCache::new(dir)?)
        } else {
            None
        };
        let file_hashes = if caching {
            dataset
                .items
                .iter()
                .map(|i| file_hash(&i.path))
                .collect::<Result<Vec<_>, _>>()?
        } else {
            Vec::new()
        };
        Ok(Self {
            config,
            model,
            family: base.family,
            dataset,
            buckets,
            alphas_cumprod: model.config().scheduler.alphas_cumprod(),
            prediction: model.config().scheduler.prediction_type,
            device: base.device.clone(),
            dtype: base.dtype,
            network,
            checkpoint_grads,
            latents: LatentSource {
                vae: &model.vae,
                config,
                cache,
                file_hashes,
                device: base.device.clone(),
                dtype: model.vae_dtype(),
            },
            contexts: ContextCache::default(),
        })
    }

    /// Encodes every image up front when latents are cached.
    fn cache_latents(&mut self, reporter: &mut dyn TrainReporter) -> Result<(), TrainError> {
        let config = self.config;
        if config.cache_latents && config.random_crop {
            reporter
                .message("latents are not cached with random_crop (every step crops differently)");
        }
        if self.latents.cache.is_none() {
            return Ok(());
        }
        let flips: &[bool] = if config.flip_aug {
            &[false, true]
        } else {
            &[false]
        };
        let total = self.dataset.items.len() * flips.len();
        let mut done = 0;
        for (index, item) in self.dataset.items.iter().enumerate() {
            for &flip in flips {
                let plan = CropPlan::centred((item.width, item.height), self.buckets[index], flip);
                self.latents.latent(index, item, &plan)?;
                done += 1;
                reporter.stage("encoding latents", done, total);
            }
        }
        if let Some(cache) = &self.latents.cache
            && cache.disk_hits > 0
        {
            reporter.message(&format!(
                "{} latents read from the cache, {} encoded",
                cache.disk_hits, cache.encoded
            ));
        }
        Ok(())
    }

    /// Text-encoder outputs for the captions: the context and, for SDXL, the pooled embedding (both cached
    /// when the encoders are frozen and captions are fixed).
    fn encode_captions(&mut self, captions: &[String]) -> Result<PromptEmbeddings, TrainError> {
        let config = self.config;
        let clip_skip = config.clip_skip as usize;
        let cacheable = !config.train_text_encoder
            && !config.shuffle_caption
            && config.caption_dropout_rate == 0.0;
        if !cacheable {
            let refs: Vec<&str> = captions.iter().map(String::as_str).collect();
            return Ok(self.model.encode_prompts(&refs, clip_skip)?);
        }
        let mut rows = Vec::with_capacity(captions.len());
        for caption in captions {
            let embeddings = match self.contexts.get(caption) {
                Some(e) => e.clone(),
                None => {
                    let e = self
                        .model
                        .encode_prompts(&[caption.as_str()], clip_skip)?
                        .detach();
                    self.contexts.insert(caption.clone(), e.clone());
                    e
                }
            };
            rows.push(embeddings);
        }
        let contexts: Vec<&Tensor> = rows.iter().map(|e| &e.context).collect();
        let pooled = rows
            .iter()
            .map(|e| e.pooled.as_ref())
            .collect::<Option<Vec<&Tensor>>>()
            .map(|pooled| Tensor::cat(&pooled, 0))
            .transpose()?;
        Ok(PromptEmbeddings {
            context: Tensor::cat(&contexts, 0)?,
            pooled,
        })
    }
}

impl TrainingTask for DiffusionTask<'_> {
    type Batch = Batch;

    fn network(&self) -> &LoraNetwork {
        &self.network
    }

    fn examples(&self) -> (usize, usize) {
        (self.dataset.items.len(), self.dataset.samples_per_epoch())
    }

    /// A hash of the file contents, captions and repeats.
    fn fingerprint(&self) -> Result<String, TrainError> {
        let mut text = String::new();
        for item in &self.dataset.items {
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

    fn epoch_batches(&self, epoch: u64) -> Vec<Batch> {
        batches_of(self.config, self.dataset, &self.buckets, epoch)
    }

    fn loss(&mut self, batch: &Batch, rng: &mut ChaCha8Rng) -> Result<Tensor, TrainError> {
        let config = self.config;
        draw_dropout(&self.network, config.lora_dropout, rng);
        let scaling = self.model.config().vae.scaling_factor;
        let mut samples = Vec::with_capacity(batch.items.len());
        let mut masks = Vec::with_capacity(batch.items.len());
        let mut captions = Vec::with_capacity(batch.items.len());
        let mut sizes = Vec::with_capacity(batch.items.len());
        for &index in &batch.items {
            let item = &self.dataset.items[index];
            let plan = self.latents.plan(item, batch.bucket, rng);
            sizes.push(kohya_size_conditioning(
                (item.width, item.height),
                plan.bucket,
                plan.flip,
            ));
            let latent = self.latents.latent(index, item, &plan)?;
            let eps = gaussian(rng, latent.mean.dims(), &self.device)?;
            let sample = (latent.mean.clone() + (latent.logvar.affine(0.5, 0.0)?.exp()? * eps)?)?
                .affine(scaling, 0.0)?;
            samples.push(sample);
            masks.push(latent.mask.clone());
            captions.push(process_caption(&item.caption, config, rng));
        }
        let x0 = Tensor::stack(&samples, 0)?;
        let dims = x0.dims().to_vec();
        let mut noise = gaussian(rng, &dims, &self.device)?;
        if config.noise_offset > 0.0 {
            let offset = gaussian(rng, &[dims[0], dims[1], 1, 1], &self.device)?;
            noise = noise.broadcast_add(&(offset * config.noise_offset)?)?;
        }
        let timesteps: Vec<usize> = (0..dims[0])
            .map(|_| rng.random_range(0..self.alphas_cumprod.len()))
            .collect();
        let alphas: Vec<f32> = timesteps.iter().map(|&t| self.alphas_cumprod[t]).collect();
        let noisy = add_noise(&x0, &noise, &alphas)?;
        let wanted = target(&x0, &noise, &alphas, self.prediction)?;
        let embeddings = self.encode_captions(&captions)?;
        // SDXL: the pooled embedding and each image's size conditioning (`None` for SD1/SD2).
        let added = self.model.added_conditions(&embeddings, &sizes)?;
        let t = Tensor::from_vec(
            timesteps.iter().map(|&t| t as f32).collect::<Vec<_>>(),
            dims[0],
            &self.device,
        )?;
        let prediction = self
            .model
            .unet
            .forward_with(
                &noisy.to_dtype(self.dtype)?,
                &t,
                &embeddings.context,
                added.as_ref(),
            )?
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
                let weights: Vec<f32> = min_snr_weights(&alphas, gamma, self.prediction)
                    .iter()
                    .map(|&w| w as f32)
                    .collect();
                (per_sample * Tensor::from_vec(weights, dims[0], &self.device)?)?
            }
            None => per_sample,
        };
        Ok(per_sample.mean_all()?)
    }

    fn gradient(&self, grads: &GradStore, var: &Var) -> candle_core::Result<Option<Tensor>> {
        variable_gradient(grads, self.checkpoint_grads, var)
    }

    fn render_samples(
        &mut self,
        step: u64,
        events: Option<&mut EventWriter>,
        reporter: &mut dyn TrainReporter,
    ) -> Result<(), TrainError> {
        render_samples(
            self.model,
            &self.network,
            self.config,
            step,
            events,
            reporter,
        )
    }

    fn live(&self, step: u64) -> LiveRun<'_> {
        LiveRun {
            model: LiveModel::Image(self.model),
            network: &self.network,
            step,
        }
    }

    fn export_contents(&self, point: ExportPoint) -> Result<ExportContents, TrainError> {
        export_contents(
            &self.network,
            self.config,
            (self.family, &self.model.config().scheduler),
            self.dataset,
            point,
        )
    }

    /// The kohya LoRA file `output_dir/OUTPUT_NAME.safetensors` (and its diffusers copy if asked).
    fn write_final_export(
        &self,
        point: ExportPoint,
        _last_checkpoint: Option<&Path>,
    ) -> Result<PathBuf, TrainError> {
        let config = self.config;
        let path = config
            .output_dir
            .join(format!("{}.safetensors", config.output_name));
        write_export(
            &self.export_contents(point)?,
            &path,
            config.save_precision,
            config.export_peft,
        )?;
        Ok(path)
    }
}

/// The LoRA file `network` gives, with the metadata of its run on a `family` model with `schedule`.
fn export_contents(
    network: &LoraNetwork,
    config: &TrainConfig,
    (family, schedule): (ModelFamily, &SchedulerConfig),
    dataset: &Dataset,
    point: ExportPoint,
) -> Result<ExportContents, TrainError> {
    let lora = export_network(network)?;
    let facts = RunFacts {
        family,
        prediction: schedule.prediction_type,
        zero_terminal_snr: schedule.rescale_betas_zero_snr,
        dataset,
        steps: point.steps,
        epoch: point.epoch,
        started_at: point.started_at,
        finished_at: unix_seconds(),
        dims: lora.network_dims(),
        network_kind: network.spec().kind.label(),
        exactness: lora.exactness.clone(),
    };
    let metadata = lora_metadata(config, &facts);
    Ok(ExportContents { lora, metadata })
}

/// The gradient of `var` after a backward pass, in f32 and detached. A variable inside a checkpointed
/// block gets (part of) its gradient from the recomputation in `checkpoint_grads`. candle leaves a
/// variable's own gradient attached to the forward graph (for a conv kernel it is a conv of the
/// activations); kept attached, the optimizer state would chain every step's activations together.
pub(super) fn variable_gradient(
    grads: &GradStore,
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

/// The newest checkpoint folder in an output folder, if any (for `--resume_from_checkpoint latest`).
pub fn latest_checkpoint(output_dir: &Path) -> Option<PathBuf> {
    list_checkpoints(output_dir).pop().map(|(_, p)| p)
}

/// Exports a checkpoint written before checkpoints kept their export (format 1): its network is rebuilt on
/// `base` and its metadata taken from its state, with the dataset's tags if its folder still exists.
pub fn export_checkpoint_on(
    base: &LoadedBase,
    checkpoint: &Path,
    out: &Path,
    save_precision: SavePrecision,
    export_peft: bool,
) -> Result<PathBuf, TrainError> {
    create_parent(out)?;
    let (network, saved) = network_from_checkpoint(&base.model, &base.device, checkpoint)?;
    let config = &saved.state.config;
    let dataset = scan_dataset(config).unwrap_or_else(|_| Dataset {
        root: config.train_data_dir.clone(),
        ..Dataset::default()
    });
    let batches = batches_of(config, &dataset, &buckets(config, &dataset), 0).len();
    let point = ExportPoint {
        steps: saved.state.step,
        epoch: saved
            .state
            .step
            .div_ceil(steps_per_epoch(batches, config.gradient_accumulation_steps)),
        started_at: saved.state.training_started_at,
    };
    let contents = export_contents(
        &network,
        config,
        (base.family, &base.model.config().scheduler),
        &dataset,
        point,
    )?;
    write_export(&renamed(contents, out), out, save_precision, export_peft)?;
    Ok(out.to_path_buf())
}

/// Rebuilds a checkpoint's network on `model` (attached, at strength 1).
pub fn network_from_checkpoint(
    model: &StableDiffusion,
    device: &Device,
    checkpoint: &Path,
) -> Result<(LoraNetwork, Checkpoint), TrainError> {
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
