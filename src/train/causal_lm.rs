//! Training LoRA adapters for causal language models (Qwen2/Qwen2.5, Qwen3, Llama 3.x): the task the loop
//! ([`super::trainer`]) drives — the next-token cross-entropy over the trained tokens of a micro-batch
//! (assistant turns, or everything with `train_on_prompt`), weighed by those tokens so that an accumulated
//! step is the mean over every trained token — and the entry points: loading a model folder with its
//! tokenizer files (which the app's engine keeps between runs and chats), training on a loaded model (the
//! conversations read, tokenised with its chat template, and what the data held reported), and both at
//! once for the CLI.
//!
//! The data's rows are `data::text`'s; their tokens and labels `lm_samples`'; their order and packing
//! `lm_batches`'. Must not copy anything of the loop.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use rand_chacha::ChaCha8Rng;

use super::checkpoint::{Checkpoint, load_checkpoint};
use super::diffusion::variable_gradient;
use super::export::ExportContents;
use super::lm_batches::{LaidOutBatch, TextBatch, lay_out, text_epoch_batches};
use super::lm_export::write_causal_lm_exports;
use super::lm_samples::{TokenizedDataset, TokenizedSample, tokenize_dataset};
use super::report::{CancelToken, LiveModel, LiveRun, TrainReporter};
use super::task::{BatchShare, ExportPoint, TrainingTask, draw_dropout};
use super::tensorboard::EventWriter;
use super::trainer::run_loop;
use super::{TrainError, TrainOutcome};
use crate::chat::ChatFiles;
use crate::config::{DeviceChoice, TrainConfig};
use crate::data::text::{TextDataset, scan_text_dataset};
use crate::lora::{LoraNetwork, NetworkKind, NetworkSpec, TargetComponent, export_network};
use crate::models::causal_lm::{CausalLm, TokenBatch, next_token_loss};
use crate::models::checkpointing::CheckpointGrads;

/// The prefix of a language model's adapter names in checkpoints (`lora_lm_model_layers_0_self_attn_q_proj`).
pub const LANGUAGE_MODEL_PREFIX: &str = "lora_lm";

/// Bad rows listed one by one before the rest are counted.
const LISTED_BAD_ROWS: usize = 20;

/// Whether `path` is a Hugging Face language model folder (a `config.json`, and not a diffusers pipeline):
/// such a base model makes `train` train a language model.
pub fn is_language_model_folder(path: &Path) -> bool {
    path.is_dir() && path.join("config.json").is_file() && !path.join("model_index.json").exists()
}

/// A language model folder loaded for training and chat: the model and its tokenizer files.
pub struct LoadedLanguageModel {
    pub path: PathBuf,
    pub model: CausalLm,
    pub files: ChatFiles,
    pub device: Device,
}

/// Loads the language model folder `config.base_model` on `config.device` in the training precision.
pub fn load_language_model(config: &TrainConfig) -> Result<LoadedLanguageModel, TrainError> {
    let files = ChatFiles::open(&config.base_model)?;
    let choice: DeviceChoice = config.device.parse().map_err(TrainError::Device)?;
    let device = crate::device::open_device(choice).map_err(TrainError::Device)?;
    let dtype = super::diffusion::compute_dtype(&device, config.mixed_precision);
    let _products = super::cpu_products::loading_scope(&device, config.mixed_precision);
    let model = CausalLm::load(&config.base_model, &device, dtype)?;
    Ok(LoadedLanguageModel {
        path: config.base_model.clone(),
        model,
        files,
        device,
    })
}

/// Trains LoRA adapters on the language model folder `config.base_model` with the conversations and texts
/// of `config.train_data_dir`, optionally resuming from a checkpoint folder.
pub fn train_causal_lm(
    config: &TrainConfig,
    resume: Option<&Path>,
    reporter: &mut dyn TrainReporter,
    cancel: &CancelToken,
) -> Result<TrainOutcome, TrainError> {
    // The output folder and the dataset are checked before the model is loaded, so that their problems
    // are reported at once.
    let dataset = prepare_run(config, reporter)?;
    reporter.stage("loading the base model", 0, 1);
    let mut loaded = load_language_model(config)?;
    reporter.stage("loading the base model", 1, 1);
    train_scanned(
        &mut loaded.model,
        &loaded.files,
        &dataset,
        config,
        resume,
        reporter,
        cancel,
    )
}

/// [`train_causal_lm`] on an already loaded model (`config.base_model`'s, with its tokenizer `files`, in the
/// precision it was loaded in); the model is left without adapters afterwards.
pub fn train_causal_lm_on(
    model: &mut CausalLm,
    files: &ChatFiles,
    config: &TrainConfig,
    resume: Option<&Path>,
    reporter: &mut dyn TrainReporter,
    cancel: &CancelToken,
) -> Result<TrainOutcome, TrainError> {
    let dataset = prepare_run(config, reporter)?;
    train_scanned(model, files, &dataset, config, resume, reporter, cancel)
}

/// Checks the output folder and reads the dataset, reporting its bad rows.
fn prepare_run(
    config: &TrainConfig,
    reporter: &mut dyn TrainReporter,
) -> Result<TextDataset, TrainError> {
    super::diffusion::prepare_output(config, reporter)?;
    let dataset = scan_text_dataset(&config.train_data_dir)?;
    report_bad_rows(&dataset, reporter);
    Ok(dataset)
}

/// Trains on `model` with the dataset already read; the adapters are detached when the run ends (the task
/// owns them) and gradient checkpointing is turned off again.
fn train_scanned(
    model: &mut CausalLm,
    files: &ChatFiles,
    dataset: &TextDataset,
    config: &TrainConfig,
    resume: Option<&Path>,
    reporter: &mut dyn TrainReporter,
    cancel: &CancelToken,
) -> Result<TrainOutcome, TrainError> {
    let _products = super::cpu_products::cpu_products(
        model.device(),
        config.mixed_precision,
        vec![model.layers().clone()],
        reporter,
    )?;
    let tokenized = tokenize_dataset(files, dataset, config)?;
    report_tokenized(&tokenized, config, reporter);
    if tokenized.samples.is_empty() {
        return Err(crate::data::DataError::NothingToTrain {
            path: config.train_data_dir.clone(),
            reason: "no sample has a token to train on once tokenised".into(),
        }
        .into());
    }
    let checkpoint_grads = config.gradient_checkpointing.then(CheckpointGrads::default);
    model.set_gradient_checkpointing(checkpoint_grads.clone());
    let dtype = model.dtype();
    let result = CausalLmTask::new(
        &*model,
        tokenized.samples,
        dataset.fingerprint.clone(),
        pad_id(files),
        config,
    )
    .and_then(|task| {
        let mut task = task.with_checkpoint_grads(checkpoint_grads);
        run_loop(&mut task, config, dtype, resume, reporter, cancel)
    });
    model.set_gradient_checkpointing(None);
    result
}

/// The padding id: the tokenizer's pad token, else its end of text, else 0 (padding is never attended to
/// nor trained, so any id does).
fn pad_id(files: &ChatFiles) -> u32 {
    ["pad_token", "eos_token"]
        .iter()
        .find_map(|name| {
            files
                .special_tokens()
                .get(name)
                .and_then(|t| files.tokenizer().token_id(t))
        })
        .unwrap_or(0)
}

fn report_bad_rows(dataset: &TextDataset, reporter: &mut dyn TrainReporter) {
    for bad in dataset.bad_rows.iter().take(LISTED_BAD_ROWS) {
        reporter.message(&format!("skipping {bad}"));
    }
    if dataset.bad_rows.len() > LISTED_BAD_ROWS {
        reporter.message(&format!(
            "... and {} more bad rows skipped",
            dataset.bad_rows.len() - LISTED_BAD_ROWS
        ));
    }
}

fn report_tokenized(
    tokenized: &TokenizedDataset,
    config: &TrainConfig,
    reporter: &mut dyn TrainReporter,
) {
    for reason in tokenized.left_out.iter().take(LISTED_BAD_ROWS) {
        reporter.message(&format!("skipping {reason}"));
    }
    if tokenized.truncated > 0 {
        reporter.message(&format!(
            "{} {} longer than max_seq_length ({} tokens) and {} cut",
            tokenized.truncated,
            if tokenized.truncated == 1 {
                "conversation is"
            } else {
                "conversations are"
            },
            config.max_seq_length,
            if tokenized.truncated == 1 {
                "was"
            } else {
                "were"
            },
        ));
    }
    if tokenized.split_texts > 0 {
        reporter.message(&format!(
            "{} texts longer than max_seq_length ({} tokens) are split into pieces",
            tokenized.split_texts, config.max_seq_length
        ));
    }
}

/// The adapters `config` asks for (`lora_target_modules`, rank, alpha, rsLoRA, DoRA/PiSSA), created and
/// attached on `model`. rsLoRA's scale alpha/√rank is kept as an alpha of `alpha·√rank` over the rank.
pub fn create_language_network(
    config: &TrainConfig,
    model: &CausalLm,
) -> Result<LoraNetwork, TrainError> {
    let targets = config.language_model_targets().map_err(|name| {
        TrainError::Config(Box::new(crate::config::ConfigError::BadValue {
            key: "lora_target_modules".into(),
            reason: format!("`{name}` is not a layer that takes adapters"),
        }))
    })?;
    let slots = model
        .layers()
        .slots()
        .into_iter()
        .filter(|slot| {
            slot.name()
                .rsplit('.')
                .next()
                .is_some_and(|layer| targets.contains(&layer))
        })
        .collect();
    let rank = config.lora_rank as usize;
    let alpha = if config.use_rslora {
        config.lora_alpha as f64 * (rank as f64).sqrt()
    } else {
        config.lora_alpha as f64
    };
    let spec = NetworkSpec {
        rank,
        alpha,
        conv_rank: rank,
        conv_alpha: alpha,
        kind: if config.dora {
            NetworkKind::Dora
        } else if config.pissa {
            NetworkKind::Pissa
        } else {
            NetworkKind::Lora
        },
    };
    let component = TargetComponent {
        prefix: LANGUAGE_MODEL_PREFIX,
        slots,
        // The main group: trained at `learning_rate`.
        group: super::trainer::UNET_LR_GROUP,
    };
    Ok(LoraNetwork::create(
        &[component],
        spec,
        config.seed,
        model.device(),
    )?)
}

/// Rebuilds the network of a language model run's checkpoint folder on `model` (attached, at strength 1),
/// from the run's saved settings.
pub fn language_network_from_checkpoint(
    model: &CausalLm,
    checkpoint: &Path,
) -> Result<(LoraNetwork, Checkpoint), TrainError> {
    let saved = load_checkpoint(checkpoint, model.device())?;
    let bad = |reason: String| TrainError::Checkpoint {
        path: saved.path.clone(),
        reason,
    };
    if !saved
        .adapters
        .keys()
        .any(|name| name.starts_with(LANGUAGE_MODEL_PREFIX))
    {
        return Err(bad(
            "it was saved by a run that trains an image model, not a language model".into(),
        ));
    }
    let network = create_language_network(&saved.state.config, model)?;
    network.load_state(&saved.adapters).map_err(bad)?;
    Ok((network, saved))
}

/// The mean next-token loss (f32 scalar) over the trained tokens of a laid-out batch, and their count.
pub fn causal_lm_batch_loss(
    model: &CausalLm,
    batch: &LaidOutBatch,
) -> Result<(Tensor, usize), TrainError> {
    let tokens = TokenBatch::new(batch.ids.clone(), batch.segments.clone())?;
    let logits = model.forward(&tokens, None)?;
    let (sum, count) = next_token_loss(&logits, &batch.labels)?;
    let mean = (sum / count.max(1) as f64)?.to_dtype(DType::F32)?;
    Ok((mean, count))
}

/// Training a language model's adapters: everything the steps need, fixed for the run.
pub struct CausalLmTask<'a> {
    config: &'a TrainConfig,
    model: &'a CausalLm,
    samples: Vec<TokenizedSample>,
    lengths: Vec<usize>,
    trained_tokens: Vec<usize>,
    fingerprint: String,
    pad_id: u32,
    network: LoraNetwork,
    /// The adapters' gradients from recomputed layers, with gradient checkpointing.
    checkpoint_grads: Option<CheckpointGrads>,
}

impl<'a> CausalLmTask<'a> {
    /// The task over `samples` on `model`, with new adapters attached.
    pub fn new(
        model: &'a CausalLm,
        samples: Vec<TokenizedSample>,
        fingerprint: String,
        pad_id: u32,
        config: &'a TrainConfig,
    ) -> Result<Self, TrainError> {
        let network = create_language_network(config, model)?;
        Ok(Self {
            config,
            model,
            lengths: samples.iter().map(|s| s.ids.len()).collect(),
            trained_tokens: samples
                .iter()
                .map(TokenizedSample::trained_tokens)
                .collect(),
            samples,
            fingerprint,
            pad_id,
            network,
            checkpoint_grads: None,
        })
    }

    /// Collects the gradients that layers recomputed under gradient checkpointing leave in `store` (the
    /// store the model was given).
    pub fn with_checkpoint_grads(mut self, store: Option<CheckpointGrads>) -> Self {
        self.checkpoint_grads = store;
        self
    }
}

impl TrainingTask for CausalLmTask<'_> {
    type Batch = TextBatch;

    fn network(&self) -> &LoraNetwork {
        &self.network
    }

    fn examples(&self) -> (usize, usize) {
        (self.samples.len(), self.samples.len())
    }

    fn example_noun(&self) -> &'static str {
        "samples"
    }

    fn share(&self, batch: &TextBatch) -> BatchShare {
        let samples = || batch.rows.iter().flatten();
        BatchShare {
            loss_units: samples().map(|&i| self.trained_tokens[i]).sum::<usize>() as f64,
            tokens: Some(samples().map(|&i| self.lengths[i] as u64).sum()),
        }
    }

    fn fingerprint(&self) -> Result<String, TrainError> {
        Ok(self.fingerprint.clone())
    }

    fn epoch_batches(&self, epoch: u64) -> Vec<TextBatch> {
        let config = self.config;
        text_epoch_batches(
            &self.lengths,
            config.batch_size as usize,
            config.packing.then_some(config.max_seq_length as usize),
            config.seed,
            epoch,
        )
    }

    fn loss(&mut self, batch: &TextBatch, rng: &mut ChaCha8Rng) -> Result<Tensor, TrainError> {
        draw_dropout(&self.network, self.config.lora_dropout, rng);
        let laid = lay_out(batch, &self.samples, self.pad_id);
        Ok(causal_lm_batch_loss(self.model, &laid)?.0)
    }

    fn gradient(&self, grads: &GradStore, var: &Var) -> candle_core::Result<Option<Tensor>> {
        variable_gradient(grads, self.checkpoint_grads.as_ref(), var)
    }

    fn render_samples(
        &mut self,
        _step: u64,
        _events: Option<&mut EventWriter>,
        _reporter: &mut dyn TrainReporter,
    ) -> Result<(), TrainError> {
        Ok(())
    }

    fn live(&self, step: u64) -> LiveRun<'_> {
        LiveRun {
            model: LiveModel::Language(self.model),
            network: &self.network,
            step,
        }
    }

    fn export_contents(&self, point: ExportPoint) -> Result<ExportContents, TrainError> {
        let lora = export_network(&self.network)?;
        let config = self.config;
        let metadata = BTreeMap::from([
            ("lora_studio.task".to_string(), "causal_lm".to_string()),
            (
                "lora_studio.base_model".to_string(),
                config.base_model.to_string_lossy().into_owned(),
            ),
            (
                "lora_studio.architecture".to_string(),
                self.model.config().architecture.label().to_string(),
            ),
            ("ss_network_dim".to_string(), config.lora_rank.to_string()),
            (
                "ss_network_alpha".to_string(),
                config.lora_alpha.to_string(),
            ),
            (
                "lora_studio.use_rslora".to_string(),
                config.use_rslora.to_string(),
            ),
            ("ss_steps".to_string(), point.steps.to_string()),
            ("ss_epoch".to_string(), point.epoch.to_string()),
        ]);
        Ok(ExportContents { lora, metadata })
    }

    fn write_final_export(
        &self,
        _point: ExportPoint,
        _last_checkpoint: Option<&Path>,
    ) -> Result<PathBuf, TrainError> {
        let exports = write_causal_lm_exports(
            &self.network,
            self.model,
            self.config,
            self.config.use_rslora,
        )?;
        Ok(exports.peft_folder)
    }
}
