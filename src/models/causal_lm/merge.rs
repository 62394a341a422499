//! Merging PEFT adapters into a causal language model and writing a merged model folder that transformers,
//! vLLM or llama.cpp's converter load like any other: `model.safetensors` (one file, every tensor of the
//! base with the adapters' weight changes folded in at their strengths) beside copies of the base folder's
//! other files (config, tokenizer, chat template, generation config).
//!
//! The model is built as a shape-only skeleton to match adapters to layers; tensors are then streamed one
//! at a time from the base files. Must not change the base folder.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use super::config::CausalLmConfig;
use super::model::CausalLm;
use crate::lora::PeftAdapter;
use crate::models::ModelError;
use crate::models::checkpoint::transformers_weights;
use crate::models::merge::{MergeReport, Planned, ShapeOnly, adapters_delta, write_streaming};

/// The weights file of a merged folder.
pub const MERGED_WEIGHTS_FILE: &str = "model.safetensors";

/// Merges `adapters` (PEFT adapter folder, strength) into the language model folder `base` and writes the
/// merged folder `out`, its floating-point tensors in `dtype`.
pub fn merge_into_folder(
    base: &Path,
    adapters: &[(PathBuf, f64)],
    out: &Path,
    dtype: DType,
) -> Result<MergeReport, ModelError> {
    if same_folder(base, out) {
        return Err(ModelError::Config(format!(
            "the merged model cannot be written into its base folder {}; choose another --out folder",
            base.display()
        )));
    }
    let config = CausalLmConfig::from_folder(base)?;
    let weights = transformers_weights(base)?;
    let vb = VarBuilder::from_backend(Box::new(ShapeOnly), DType::F32, Device::Cpu);
    let skeleton = CausalLm::new(vb, &config).map_err(|_| {
        ModelError::Config(format!(
            "building the {} layout failed",
            config.architecture.label()
        ))
    })?;
    let mut unmatched = Vec::new();
    for (folder, strength) in adapters {
        let adapter = PeftAdapter::load(folder, &Device::Cpu)
            .map_err(|e| ModelError::Config(e.to_string()))?;
        let report = adapter
            .attach(skeleton.layers(), *strength, DType::F32)
            .map_err(|e| ModelError::Config(e.to_string()))?;
        if !report.unmatched.is_empty() {
            unmatched.push((folder.clone(), report.unmatched.len()));
        }
    }

    let files = weights.files;
    let mut deltas: HashMap<String, Vec<(usize, Tensor)>> = HashMap::new();
    for slot in skeleton.layers().slots() {
        if slot.adapters().is_empty() {
            continue;
        }
        let key = format!("{}.weight", slot.name());
        let file = files
            .file_of(&key)
            .ok_or_else(|| ModelError::MissingTensor {
                path: files.display_path(),
                tensor: key.clone(),
                component: config.architecture.label().to_string(),
            })?;
        // The real weight, not the skeleton's stand-in.
        let weight = file.load(&key, &Device::Cpu)?;
        if let Some(delta) = adapters_delta(&slot, &weight)? {
            deltas.insert(key, vec![(0, delta)]);
        }
    }

    let mut keys: Vec<&String> = files.keys().collect();
    keys.sort();
    let plan: Vec<Planned> = keys
        .into_iter()
        .map(|key| Planned {
            key: key.clone(),
            shape: files.shape(key).map(<[usize]>::to_vec).unwrap_or_default(),
            parts: vec![(files.clone(), key.clone())],
            transposed: false,
        })
        .collect();
    std::fs::create_dir_all(out).map_err(|source| ModelError::Io {
        path: out.to_path_buf(),
        source,
    })?;
    copy_side_files(base, out, dtype)?;
    let merged: Vec<serde_json::Value> = adapters
        .iter()
        .map(|(p, s)| serde_json::json!({ "adapter": p.display().to_string(), "strength": s }))
        .collect();
    let metadata = BTreeMap::from([
        // transformers refuses safetensors files without this.
        ("format".to_string(), "pt".to_string()),
        (
            "lora_studio.version".to_string(),
            crate::build_info::LONG_VERSION.to_string(),
        ),
        (
            "lora_studio.merged_adapters".to_string(),
            serde_json::Value::Array(merged).to_string(),
        ),
    ]);
    write_streaming(
        &out.join(MERGED_WEIGHTS_FILE),
        &plan,
        &deltas,
        dtype,
        &metadata,
    )?;
    Ok(MergeReport {
        tensors: plan.len(),
        merged_layers: deltas.len(),
        unmatched,
    })
}

fn same_folder(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// Whether a file of a model folder holds weights (those are written merged, not copied).
fn is_weights_file(name: &str) -> bool {
    [
        ".safetensors",
        ".bin",
        ".pt",
        ".pth",
        ".ckpt",
        ".gguf",
        ".index.json",
    ]
    .iter()
    .any(|suffix| name.ends_with(suffix))
}

/// Copies every file of `base` but the weights into `out`; `config.json`'s `torch_dtype` (and `dtype`)
/// then name the written `dtype`.
fn copy_side_files(base: &Path, out: &Path, dtype: DType) -> Result<(), ModelError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ModelError::Io { path, source }
    };
    for entry in std::fs::read_dir(base).map_err(io(base))? {
        let entry = entry.map_err(io(base))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !entry.path().is_file() || is_weights_file(&name) {
            continue;
        }
        let target = out.join(&name);
        if name == "config.json" {
            let text = std::fs::read_to_string(entry.path()).map_err(io(&entry.path()))?;
            let text = with_dtype(&text, dtype).unwrap_or(text);
            crate::atomic_file::write_atomically(&target, |w| {
                std::io::Write::write_all(w, text.as_bytes())
            })
            .map_err(io(&target))?;
        } else {
            std::fs::copy(entry.path(), &target).map_err(io(&target))?;
        }
    }
    Ok(())
}

/// `config.json`'s text with its dtype keys naming `dtype` (transformers' spelling), if it parses.
fn with_dtype(text: &str, dtype: DType) -> Option<String> {
    let mut config: serde_json::Map<String, serde_json::Value> = serde_json::from_str(text).ok()?;
    let name = match dtype {
        DType::F16 => "float16",
        DType::BF16 => "bfloat16",
        _ => "float32",
    };
    for key in ["torch_dtype", "dtype"] {
        if config.contains_key(key) {
            config.insert(key.to_string(), serde_json::json!(name));
        }
    }
    serde_json::to_string_pretty(&config).ok().map(|t| t + "\n")
}
