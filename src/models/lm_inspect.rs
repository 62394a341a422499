//! What `inspect` says of language-model files, from headers and configs alone: a Hugging Face model
//! folder (architecture, size, weights, whether it can chat), a PEFT adapter folder (modules, ranks,
//! alphas, targets, base model), and a GGUF file (a llama.cpp LoRA adapter, or a model). Loads no weights.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use super::ModelError;
use super::causal_lm::CausalLmConfig;
use super::checkpoint::transformers_weights;
use super::inspect::{FileReport, dtype_counts};
use crate::lora::{PeftConfig, TargetModules, adapter_weights_file, split_tensor_name};
use crate::tensor_file::TensorFile;
use crate::tensor_file::gguf::read_gguf_header;

/// A language model folder.
#[derive(Debug)]
pub struct LanguageModelReport {
    pub path: PathBuf,
    pub config: CausalLmConfig,
    pub parameters: usize,
    pub dtypes: BTreeMap<String, usize>,
    pub weight_files: usize,
    /// `tokenizer.json` and `tokenizer_config.json` are there (needed to chat and train).
    pub has_tokenizer: bool,
}

/// A language-model LoRA adapter: a PEFT folder or a llama.cpp GGUF file.
#[derive(Debug)]
pub struct LmAdapterReport {
    pub path: PathBuf,
    /// `PEFT adapter folder` or `llama.cpp LoRA adapter (GGUF)`.
    pub format: &'static str,
    /// The base model the adapter names (`base_model_name_or_path`, GGUF's `general.base_model.0.name`).
    pub base: Option<String>,
    /// llama.cpp's `general.architecture` (GGUF only).
    pub architecture: Option<String>,
    pub modules: usize,
    pub ranks: BTreeSet<usize>,
    pub alphas: BTreeSet<String>,
    /// The projections adapted (`q_proj`, `attn_q`, ...).
    pub targets: BTreeSet<String>,
    pub use_rslora: bool,
    pub use_dora: bool,
    pub dtypes: BTreeMap<String, usize>,
}

/// A GGUF file that is not a LoRA adapter.
#[derive(Debug)]
pub struct GgufModelReport {
    pub path: PathBuf,
    pub architecture: String,
    pub name: Option<String>,
    pub tensors: usize,
}

/// Whether `path` is a PEFT adapter folder.
pub fn is_peft_folder(path: &Path) -> bool {
    path.join(crate::lora::ADAPTER_CONFIG_FILE).is_file()
}

/// Whether `path` is a transformers model folder (a `config.json` with a `model_type`, no diffusers
/// `model_index.json`).
pub fn is_language_model_folder(path: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string(path.join("config.json")) else {
        return false;
    };
    !path.join("model_index.json").exists()
        && serde_json::from_str::<serde_json::Value>(&text)
            .is_ok_and(|config| config.get("model_type").is_some())
}

/// Whether `path` is a GGUF file (by its first four bytes).
pub fn is_gguf_file(path: &Path) -> bool {
    let mut magic = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
        .is_ok_and(|()| &magic == b"GGUF")
}

pub fn language_model_report(folder: &Path) -> Result<LanguageModelReport, ModelError> {
    let config = CausalLmConfig::from_folder(folder)?;
    let weights = transformers_weights(folder)?;
    let mut parameters = 0;
    for key in weights.files.keys() {
        parameters += weights
            .files
            .shape(key)
            .map_or(0, |s| s.iter().product::<usize>());
    }
    let files: BTreeSet<PathBuf> = weights
        .files
        .keys()
        .filter_map(|k| weights.files.file_of(k))
        .map(|f| f.path().to_path_buf())
        .collect();
    let mut dtypes = BTreeMap::new();
    for path in &files {
        for info in TensorFile::open(path)?.infos().values() {
            *dtypes.entry(info.dtype.to_string()).or_insert(0) += 1;
        }
    }
    Ok(LanguageModelReport {
        path: folder.to_path_buf(),
        config,
        parameters,
        dtypes,
        weight_files: files.len(),
        has_tokenizer: folder.join("tokenizer.json").is_file()
            && folder.join("tokenizer_config.json").is_file(),
    })
}

/// The last part of a module path (`model.layers.0.self_attn.q_proj` -> `q_proj`).
fn last_name(path: &str) -> &str {
    path.rsplit('.').next().unwrap_or(path)
}

pub fn peft_folder_report(folder: &Path) -> Result<LmAdapterReport, ModelError> {
    let bad = |e: crate::lora::LoraError| ModelError::Config(e.to_string());
    let config = PeftConfig::read(folder).map_err(bad)?;
    let weights = adapter_weights_file(folder).ok_or_else(|| {
        ModelError::Config(format!(
            "{} has an adapter_config.json but no adapter_model.safetensors or adapter_model.bin",
            folder.display()
        ))
    })?;
    let file = TensorFile::open(&weights)?;
    let mut report = LmAdapterReport {
        path: folder.to_path_buf(),
        format: "PEFT adapter folder",
        base: config
            .base_model_name_or_path
            .clone()
            .filter(|b| !b.is_empty()),
        architecture: None,
        modules: 0,
        ranks: BTreeSet::new(),
        alphas: std::iter::once(config.lora_alpha)
            .chain(config.alpha_pattern.iter().flatten().map(|(_, a)| *a))
            .map(|a| format!("{a}"))
            .collect(),
        targets: match &config.target_modules {
            Some(TargetModules::Names(names)) => names.iter().cloned().collect(),
            _ => BTreeSet::new(),
        },
        use_rslora: config.use_rslora,
        use_dora: config.use_dora,
        dtypes: dtype_counts(&file),
    };
    let mut pattern_targets = BTreeSet::new();
    for (name, info) in file.infos() {
        if let Ok((module, crate::lora::PeftTensor::A)) = split_tensor_name(name) {
            report.modules += 1;
            report.ranks.extend(info.shape.first());
            pattern_targets.insert(last_name(module).to_string());
        }
    }
    if report.targets.is_empty() {
        report.targets = pattern_targets;
    }
    Ok(report)
}

/// A GGUF file: a llama.cpp LoRA adapter, or a model.
pub fn gguf_report(path: &Path) -> Result<FileReport, ModelError> {
    let header = read_gguf_header(path)?;
    let architecture = header
        .string("general.architecture")
        .unwrap_or("unknown")
        .to_string();
    if header.string("general.type") != Some("adapter") {
        return Ok(FileReport::GgufModel(GgufModelReport {
            path: path.to_path_buf(),
            architecture,
            name: header.string("general.name").map(str::to_string),
            tensors: header.tensors.len(),
        }));
    }
    let mut report = LmAdapterReport {
        path: path.to_path_buf(),
        format: "llama.cpp LoRA adapter (GGUF)",
        base: header
            .string("general.base_model.0.name")
            .map(str::to_string),
        architecture: Some(architecture),
        modules: 0,
        ranks: BTreeSet::new(),
        alphas: header
            .float("adapter.lora.alpha")
            .map(|a| format!("{a}"))
            .into_iter()
            .collect(),
        targets: BTreeSet::new(),
        use_rslora: false,
        use_dora: false,
        dtypes: BTreeMap::new(),
    };
    for (name, info) in &header.tensors {
        *report
            .dtypes
            .entry(format!("{:?}", info.dtype))
            .or_insert(0) += 1;
        if let Some(weight) = name.strip_suffix(".weight.lora_a") {
            report.modules += 1;
            report.ranks.extend(info.shape.first());
            report.targets.insert(last_name(weight).to_string());
        }
    }
    Ok(FileReport::LmAdapter(report))
}
