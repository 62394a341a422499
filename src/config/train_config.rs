//! `TrainConfig`: every setting of a training run, with the key names of the lora-scripts/kohya configs.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// What to do with an image's alpha channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum AlphaMode {
    /// Composite transparent pixels on white.
    #[default]
    White,
    /// Use alpha as the loss mask (transparent pixels do not count).
    Mask,
}

/// The optimizer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum OptimizerKind {
    #[default]
    #[serde(rename = "adamw", alias = "adam_w", alias = "AdamW")]
    AdamW,
    /// Factored second moments and no first moment: almost no optimizer memory.
    Adafactor,
}

/// How the learning rate changes over the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LrScheduler {
    #[default]
    Constant,
    ConstantWithWarmup,
    Linear,
    Cosine,
    CosineWithRestarts,
}

/// Compute precision of the frozen model on GPUs (adapters and optimizer state are always f32). On the CPU
/// everything is f32, except that `bf16` stores the frozen weights in bf16 and makes the matrix products
/// take bf16 operands on processors with AMX (Intel Xeon 4th generation and later) or AVX-512 BF16 (AMD
/// Zen 4 and later).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum MixedPrecision {
    /// bf16 where the GPU supports it, else fp16; f32 on the CPU.
    #[default]
    Auto,
    No,
    Fp16,
    Bf16,
}

/// Where training logs go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LogWith {
    #[default]
    Tensorboard,
    None,
}

/// Element type of the exported LoRA file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum SavePrecision {
    #[default]
    Fp16,
    Bf16,
    Fp32,
}

/// What the model predicts, when a checkpoint's own config is missing or wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PredictionOverride {
    Epsilon,
    #[serde(alias = "v")]
    VPrediction,
}

/// The training resolution of SD1/SD2 models when `resolution` is not set (kohya's default).
pub const SD_RESOLUTION: u32 = 512;

/// The training resolution of SDXL models when `resolution` is not set (SDXL's native size, kohya's
/// `--resolution` for SDXL).
pub const SDXL_RESOLUTION: u32 = 1024;

/// A whole training run. Missing keys take the defaults below; unknown keys are errors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    // ---- dataset
    /// Folder of training images (subfolders named `N_name` repeat their images N times).
    pub train_data_dir: PathBuf,
    /// A `metadata.csv` elsewhere than in `train_data_dir`.
    pub metadata_path: Option<PathBuf>,
    /// Extension of caption sidecar files (`.txt`; `.caption` is also read).
    pub caption_extension: String,
    /// Caption for images that have none (DreamBooth-style instance prompt).
    pub instance_prompt: Option<String>,
    /// Prefixed to every caption that does not already contain it.
    pub trigger_word: Option<String>,
    /// How often each image is seen per epoch (multiplied with a folder's `N_` prefix).
    pub repeats: u32,
    /// Training resolution (square side in pixels; buckets keep the same area). Unset: the base model's
    /// native size, [`SD_RESOLUTION`] or [`SDXL_RESOLUTION`] (see [`TrainConfig::with_resolution_default`]).
    pub resolution: Option<u32>,
    pub enable_bucket: bool,
    /// Shortest bucket side (default: half the resolution, see [`TrainConfig::bucket_sides`]).
    pub min_bucket_reso: Option<u32>,
    /// Longest bucket side (default: twice the resolution).
    pub max_bucket_reso: Option<u32>,
    pub bucket_reso_steps: u32,
    /// Never upscale a small image to a bucket (it gets its own smaller bucket).
    pub bucket_no_upscale: bool,
    pub random_crop: bool,
    pub flip_aug: bool,
    pub shuffle_caption: bool,
    /// Leading comma-separated tags kept in place when shuffling.
    pub keep_tokens: u32,
    /// Probability of training a step with an empty caption.
    pub caption_dropout_rate: f32,
    pub alpha_mode: AlphaMode,
    /// Encode images with the VAE once and reuse the latents.
    pub cache_latents: bool,
    /// Keep cached latents on disk under `output_dir/cache` for the next run.
    pub cache_latents_to_disk: bool,

    // ---- model
    /// Base checkpoint: a single-file .safetensors/.ckpt or a diffusers folder.
    pub base_model: PathBuf,
    pub prediction_type: Option<PredictionOverride>,
    /// 1 = last text-encoder layer, 2 = penultimate.
    pub clip_skip: u32,

    // ---- network
    pub lora_rank: u32,
    pub lora_alpha: f32,
    /// LoCon: also train the resnets' 3x3 convolutions and the resamplers.
    pub conv_lora: bool,
    /// LoCon rank (default: `lora_rank`, as LyCORIS does).
    pub conv_rank: Option<u32>,
    /// LoCon alpha (default: `lora_alpha`).
    pub conv_alpha: Option<f32>,
    pub train_text_encoder: bool,
    /// Weight-decomposed LoRA (magnitude and direction).
    pub dora: bool,
    /// Initialise adapters from the principal singular vectors of the frozen weights.
    pub pissa: bool,
    /// Dropout on each adapter's input while training (0 = none).
    pub lora_dropout: f32,
    /// Rank-stabilised LoRA: adapters scaled by alpha / sqrt(rank) instead of alpha / rank.
    pub use_rslora: bool,

    // ---- optimisation
    pub learning_rate: f64,
    /// UNet learning rate (default: `learning_rate`).
    pub unet_lr: Option<f64>,
    /// Text-encoder learning rate (default: `learning_rate`).
    pub text_encoder_lr: Option<f64>,
    pub optimizer: OptimizerKind,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_epsilon: f64,
    pub weight_decay: f64,
    pub lr_scheduler: LrScheduler,
    pub lr_warmup_steps: u64,
    /// The warm-up as a fraction of the run's steps, when `lr_warmup_steps` is 0 (transformers'
    /// `warmup_ratio`).
    pub lr_warmup_ratio: f64,
    /// Restarts of `cosine_with_restarts`.
    pub lr_num_cycles: u32,
    pub batch_size: u32,
    pub epochs: u32,
    /// Stops after this many optimizer steps (overrides `epochs`).
    pub max_train_steps: Option<u64>,
    pub gradient_accumulation_steps: u32,
    /// Clip the gradient's global norm (0 disables clipping).
    pub max_grad_norm: f64,
    pub noise_offset: f64,
    pub min_snr_gamma: Option<f64>,
    /// Weight the loss by the image's alpha (needs `alpha_mode: mask`).
    pub masked_loss: bool,
    pub mixed_precision: MixedPrecision,
    /// Recompute UNet blocks in the backward pass to save memory.
    pub gradient_checkpointing: bool,
    pub seed: u64,
    /// cpu, cuda, cuda:N, metal or auto.
    pub device: String,

    // ---- output
    pub output_dir: PathBuf,
    pub output_name: String,
    /// Save a resumable checkpoint every this many steps (0: only at the end).
    pub save_steps: u64,
    /// Also save one at the end of every this many epochs (0: no).
    pub save_every_n_epochs: u32,
    /// How many checkpoints to keep.
    pub keep_last_checkpoints: u32,
    pub save_precision: SavePrecision,
    pub log_with: LogWith,
    /// Also write the adapters in the diffusers/PEFT layout.
    pub export_peft: bool,

    // ---- language models
    /// The layers of a language model that get adapters: PEFT names (`q_proj`, `gate_proj`, ...), short
    /// names (`q`, `gate`, ...) or `all`.
    pub lora_target_modules: Vec<String>,
    /// Tokens per training sample; longer conversations are cut, longer texts split.
    pub max_seq_length: u32,
    /// Train on the prompt (system and user turns) as well as the assistant's replies.
    pub train_on_prompt: bool,
    /// Pack several samples into each row of max_seq_length tokens (no attention between them).
    pub packing: bool,
    /// The system message given to conversations that have none.
    pub system_prompt: Option<String>,

    // ---- sample previews
    /// Render sample images every this many steps (0 disables).
    pub sample_every_n_steps: u64,
    /// Also render them at the end of every this many epochs (0: no).
    pub sample_every_n_epochs: u32,
    pub sample_prompts: Vec<String>,
    pub sample_negative_prompt: String,
    pub sample_seed: u64,
    pub sample_steps: u32,
    pub sample_cfg: f64,
    pub sample_strengths: Vec<f64>,
    /// Sample size (default: `resolution`).
    pub sample_size: Option<u32>,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            train_data_dir: PathBuf::new(),
            metadata_path: None,
            caption_extension: ".txt".to_string(),
            instance_prompt: None,
            trigger_word: None,
            repeats: 1,
            resolution: None,
            enable_bucket: true,
            min_bucket_reso: None,
            max_bucket_reso: None,
            bucket_reso_steps: 64,
            bucket_no_upscale: true,
            random_crop: false,
            flip_aug: false,
            shuffle_caption: false,
            keep_tokens: 0,
            caption_dropout_rate: 0.0,
            alpha_mode: AlphaMode::White,
            cache_latents: true,
            cache_latents_to_disk: true,
            base_model: PathBuf::new(),
            prediction_type: None,
            clip_skip: 1,
            lora_rank: 16,
            lora_alpha: 8.0,
            conv_lora: false,
            conv_rank: None,
            conv_alpha: None,
            train_text_encoder: false,
            dora: false,
            pissa: false,
            lora_dropout: 0.0,
            use_rslora: false,
            learning_rate: 1e-4,
            unet_lr: None,
            text_encoder_lr: None,
            optimizer: OptimizerKind::AdamW,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_epsilon: 1e-8,
            weight_decay: 0.01,
            lr_scheduler: LrScheduler::Constant,
            lr_warmup_steps: 0,
            lr_warmup_ratio: 0.0,
            lr_num_cycles: 1,
            batch_size: 1,
            epochs: 10,
            max_train_steps: None,
            gradient_accumulation_steps: 1,
            max_grad_norm: 1.0,
            noise_offset: 0.0,
            min_snr_gamma: None,
            masked_loss: false,
            mixed_precision: MixedPrecision::Auto,
            gradient_checkpointing: false,
            seed: 42,
            device: "auto".to_string(),
            output_dir: PathBuf::from("output"),
            output_name: "lora".to_string(),
            save_steps: 0,
            save_every_n_epochs: 0,
            keep_last_checkpoints: 3,
            save_precision: SavePrecision::Fp16,
            log_with: LogWith::Tensorboard,
            export_peft: false,
            lora_target_modules: vec!["all".to_string()],
            max_seq_length: 1024,
            train_on_prompt: false,
            packing: false,
            system_prompt: None,
            sample_every_n_steps: 0,
            sample_every_n_epochs: 0,
            sample_prompts: Vec::new(),
            sample_negative_prompt: String::new(),
            sample_seed: 1234,
            sample_steps: 20,
            sample_cfg: 7.5,
            sample_strengths: vec![1.0],
            sample_size: None,
        }
    }
}

/// The linear layers of a language model's decoder layers that can take adapters: short name and PEFT
/// (transformers) name, in the order the models build them.
pub const LANGUAGE_MODEL_TARGETS: [(&str, &str); 7] = [
    ("q", "q_proj"),
    ("k", "k_proj"),
    ("v", "v_proj"),
    ("o", "o_proj"),
    ("gate", "gate_proj"),
    ("up", "up_proj"),
    ("down", "down_proj"),
];

impl TrainConfig {
    /// The PEFT names of the layers `lora_target_modules` names (`all`: every one), in the models' order;
    /// the first name that is none of them is the error.
    pub fn language_model_targets(&self) -> Result<Vec<&'static str>, String> {
        let mut wanted = Vec::new();
        for name in &self.lora_target_modules {
            let name = name.trim();
            if name == "all" {
                wanted.extend(LANGUAGE_MODEL_TARGETS.map(|(_, peft)| peft));
                continue;
            }
            let found = LANGUAGE_MODEL_TARGETS
                .iter()
                .find(|(short, peft)| name == *short || name == *peft);
            match found {
                Some((_, peft)) => wanted.push(*peft),
                None => return Err(name.to_string()),
            }
        }
        Ok(LANGUAGE_MODEL_TARGETS
            .iter()
            .map(|(_, peft)| *peft)
            .filter(|peft| wanted.contains(peft))
            .collect())
    }

    /// The warm-up steps of a run of `total_steps`: `lr_warmup_steps`, or else `lr_warmup_ratio` of the
    /// steps rounded up (as transformers rounds it).
    pub fn warmup_steps(&self, total_steps: u64) -> u64 {
        if self.lr_warmup_steps > 0 {
            self.lr_warmup_steps
        } else {
            (self.lr_warmup_ratio * total_steps as f64).ceil() as u64
        }
    }

    pub fn unet_lr(&self) -> f64 {
        self.unet_lr.unwrap_or(self.learning_rate)
    }

    pub fn text_encoder_lr(&self) -> f64 {
        self.text_encoder_lr.unwrap_or(self.learning_rate)
    }

    pub fn conv_rank(&self) -> u32 {
        self.conv_rank.unwrap_or(self.lora_rank)
    }

    pub fn conv_alpha(&self) -> f32 {
        self.conv_alpha.unwrap_or(self.lora_alpha)
    }

    /// The resolution trained at: `resolution`, or [`SD_RESOLUTION`] when it is not set. A run resolves an
    /// unset resolution for its base model first ([`with_resolution_default`](Self::with_resolution_default)).
    pub fn training_resolution(&self) -> u32 {
        self.resolution.unwrap_or(SD_RESOLUTION)
    }

    /// The config with `resolution` set: as it was, or `native` (the base model's native size) when unset.
    /// The bucket sides that are not set follow it.
    pub fn with_resolution_default(&self, native: u32) -> Self {
        Self {
            resolution: Some(self.resolution.unwrap_or(native)),
            ..self.clone()
        }
    }

    /// The shortest and longest bucket sides: the ones set, else half and twice the resolution (kohya's
    /// 256 and 1024 at 512 px) on the bucket step, never below one step, and never crossing a side that is
    /// set.
    pub fn bucket_sides(&self) -> (u32, u32) {
        let step = self.bucket_reso_steps.max(1);
        let resolution = self.training_resolution();
        let derived_min = (resolution / 2 / step * step).max(step).min(resolution);
        let derived_max = (resolution.saturating_mul(2) / step * step).max(resolution);
        match (self.min_bucket_reso, self.max_bucket_reso) {
            (Some(min), Some(max)) => (min, max),
            (Some(min), None) => (min, derived_max.max(min)),
            (None, Some(max)) => (derived_min.min(max), max),
            (None, None) => (derived_min, derived_max),
        }
    }
}
