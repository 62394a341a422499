//! Saying what a file is without loading its weights: an SD1/SD2/SDXL checkpoint, a kohya or diffusers
//! LoRA (with rank, alpha, targets and training metadata), a language model or its adapters (see
//! [`super::lm_inspect`]), or something else.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};

use crate::models::ModelError;
use crate::models::checkpoint::{ModelConfig, ModelSource, names, unsupported_checkpoint};
use crate::models::lm_inspect::{
    GgufModelReport, LanguageModelReport, LmAdapterReport, gguf_report, is_gguf_file,
    is_language_model_folder, is_peft_folder, language_model_report, peft_folder_report,
};
use crate::tensor_file::{StoredDType, TensorFile};

/// What a file turned out to be.
#[derive(Debug)]
pub enum FileReport {
    Checkpoint(Box<CheckpointReport>),
    /// A checkpoint of a family this program recognises but does not run.
    UnsupportedCheckpoint {
        path: PathBuf,
        what: String,
    },
    Lora(LoraReport),
    /// A transformers language model folder.
    LanguageModel(Box<LanguageModelReport>),
    /// A language model's LoRA adapter: a PEFT folder or a llama.cpp GGUF file.
    LmAdapter(LmAdapterReport),
    /// A GGUF file that is not an adapter (a llama.cpp model).
    GgufModel(GgufModelReport),
    Unknown {
        path: PathBuf,
        tensors: usize,
        first_keys: Vec<String>,
    },
}

/// A base model that can be loaded.
#[derive(Debug)]
pub struct CheckpointReport {
    pub path: PathBuf,
    pub layout: &'static str,
    pub config: ModelConfig,
    pub config_files: Vec<PathBuf>,
    /// Stored element types with their tensor counts (single files only).
    pub dtypes: BTreeMap<String, usize>,
    pub tensors: usize,
    /// Whether an EMA copy of the UNet (`model_ema.*`) is stored beside the weights.
    pub has_ema: bool,
}

/// A LoRA file.
#[derive(Debug)]
pub struct LoraReport {
    pub path: PathBuf,
    /// `kohya` or `diffusers/PEFT`.
    pub format: &'static str,
    /// `SD1/SD2`, `SDXL` or `unknown`.
    pub base: &'static str,
    pub unet_modules: usize,
    pub text_encoder_modules: usize,
    /// Modules whose down weight is a kxk (k>1) convolution (LoCon).
    pub conv_modules: usize,
    pub ranks: BTreeSet<usize>,
    pub alphas: BTreeSet<String>,
    pub dtypes: BTreeMap<String, usize>,
    pub has_dora: bool,
    pub metadata: BTreeMap<String, String>,
}

/// Inspects a checkpoint file, a diffusers folder or a LoRA file.
pub fn inspect(path: &Path) -> Result<FileReport, ModelError> {
    if path.is_dir() && is_peft_folder(path) {
        return Ok(FileReport::LmAdapter(peft_folder_report(path)?));
    }
    if path.is_dir() && is_language_model_folder(path) {
        return Ok(FileReport::LanguageModel(Box::new(language_model_report(
            path,
        )?)));
    }
    if is_gguf_file(path) {
        return gguf_report(path);
    }
    if path.is_dir() {
        let source = ModelSource::open(path)?;
        return Ok(FileReport::Checkpoint(Box::new(CheckpointReport {
            path: path.to_path_buf(),
            layout: source.layout().label(),
            config: source.config().clone(),
            config_files: source.config_files().to_vec(),
            dtypes: BTreeMap::new(),
            tensors: 0,
            has_ema: false,
        })));
    }
    let file = TensorFile::open(path)?;
    let keys: Vec<&String> = file.infos().keys().collect();
    let any = |prefix: &str| keys.iter().any(|k| k.starts_with(prefix));
    if let Some(what) = unsupported_checkpoint(any) {
        return Ok(FileReport::UnsupportedCheckpoint {
            path: path.to_path_buf(),
            what: what.to_string(),
        });
    }
    if any(names::LDM_UNET) {
        let source = ModelSource::open(path)?;
        return Ok(FileReport::Checkpoint(Box::new(CheckpointReport {
            path: path.to_path_buf(),
            layout: source.layout().label(),
            config: source.config().clone(),
            config_files: source.config_files().to_vec(),
            dtypes: dtype_counts(&file),
            tensors: keys.len(),
            has_ema: any("model_ema."),
        })));
    }
    if any("lora_unet_") || any("lora_te") {
        return Ok(FileReport::Lora(kohya_report(&file)?));
    }
    if keys
        .iter()
        .any(|k| k.contains(".lora_A.") || k.contains(".lora_B."))
    {
        return Ok(FileReport::Lora(peft_report(&file)));
    }
    Ok(FileReport::Unknown {
        path: path.to_path_buf(),
        tensors: keys.len(),
        first_keys: keys.iter().take(5).map(|k| k.to_string()).collect(),
    })
}

/// The stored element types of a file's tensors, with how many tensors have each.
pub fn dtype_counts(file: &TensorFile) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for info in file.infos().values() {
        *counts.entry(info.dtype.to_string()).or_insert(0) += 1;
    }
    counts
}

fn kohya_report(file: &TensorFile) -> Result<LoraReport, ModelError> {
    let mut report = LoraReport {
        path: file.path().to_path_buf(),
        format: "kohya",
        base: "SD1/SD2",
        unet_modules: 0,
        text_encoder_modules: 0,
        conv_modules: 0,
        ranks: BTreeSet::new(),
        alphas: BTreeSet::new(),
        dtypes: dtype_counts(file),
        has_dora: false,
        metadata: file.metadata().clone(),
    };
    for (key, info) in file.infos() {
        let Some((module, suffix)) = key.split_once('.') else {
            continue;
        };
        match suffix {
            "lora_down.weight" => {
                if module.starts_with("lora_unet_") {
                    report.unet_modules += 1;
                } else {
                    report.text_encoder_modules += 1;
                }
                if module.starts_with("lora_te1_") || module.starts_with("lora_te2_") {
                    report.base = "SDXL";
                }
                if let Some(&rank) = info.shape.first() {
                    report.ranks.insert(rank);
                }
                if info.shape.len() == 4 && (info.shape[2] > 1 || info.shape[3] > 1) {
                    report.conv_modules += 1;
                }
            }
            "alpha" => {
                // Scalars are tiny; reading them does not load the weights.
                if let StoredDType::Supported(_) = info.dtype {
                    let alpha = file
                        .load(key, &Device::Cpu)?
                        .to_dtype(DType::F64)
                        .and_then(|t| t.flatten_all())
                        .and_then(|t| t.to_vec1::<f64>())
                        .map_err(ModelError::compute(format!("reading `{key}`")))?;
                    if let Some(a) = alpha.first() {
                        report.alphas.insert(format!("{a}"));
                    }
                }
            }
            "dora_scale" => report.has_dora = true,
            _ => {}
        }
    }
    if report
        .metadata
        .get("ss_base_model_version")
        .is_some_and(|v| v.starts_with("sdxl"))
    {
        report.base = "SDXL";
    }
    Ok(report)
}

fn peft_report(file: &TensorFile) -> LoraReport {
    let mut report = LoraReport {
        path: file.path().to_path_buf(),
        format: "diffusers/PEFT",
        base: "unknown",
        unet_modules: 0,
        text_encoder_modules: 0,
        conv_modules: 0,
        ranks: BTreeSet::new(),
        alphas: BTreeSet::new(),
        dtypes: dtype_counts(file),
        has_dora: false,
        metadata: file.metadata().clone(),
    };
    for (key, info) in file.infos() {
        if key.contains(".lora_A.") {
            if key.starts_with("text_encoder") {
                report.text_encoder_modules += 1;
            } else {
                report.unet_modules += 1;
            }
            if let Some(&rank) = info.shape.first() {
                report.ranks.insert(rank);
            }
        }
        if key.contains("lora_magnitude_vector") {
            report.has_dora = true;
        }
    }
    report
}
