//! What a candidate file or folder is, from its header and configs alone: the model family (and for SD2
//! and SDXL, what it predicts when the files say), the precision most of its tensors are stored in, and its
//! size on disk. LoRA files, VAEs and other tensor files are not base models and are left out.

use std::collections::BTreeMap;
use std::path::Path;

use super::Family;
use crate::models::checkpoint::{ModelFamily, PredictionOrigin};
use crate::models::inspect::{FileReport, dtype_counts, inspect};
use crate::models::schedulers::PredictionType;
use crate::tensor_file::TensorFile;

/// The `model_type`s of chat models in the Hugging Face layout.
const CHAT_MODEL_TYPES: [&str; 3] = ["qwen2", "qwen3", "llama"];

/// A base model's family, precision and size; `None` when `path` is no base model; an error (a sentence)
/// when it looks like one but cannot be read.
pub fn describe(path: &Path) -> Result<Option<(Family, String, u64)>, String> {
    if path.is_dir() && !path.join("model_index.json").is_file() {
        return Ok(chat_model(path));
    }
    let report = inspect(path).map_err(|e| e.to_string())?;
    let (family, dtypes) = match report {
        FileReport::Checkpoint(report) => {
            let config = &report.config;
            let family = match config.family {
                ModelFamily::Sd1 => Family::Sd1,
                ModelFamily::Sd2 => {
                    match (config.prediction_origin, config.scheduler.prediction_type) {
                        (PredictionOrigin::TestPrediction, _) => Family::Sd2,
                        (_, PredictionType::VPrediction) => Family::Sd2V,
                        (_, PredictionType::Epsilon) => Family::Sd2Epsilon,
                    }
                }
                ModelFamily::Sdxl => match config.scheduler.prediction_type {
                    PredictionType::VPrediction => Family::SdxlVPred,
                    PredictionType::Epsilon => Family::Sdxl,
                },
            };
            let dtypes = if report.dtypes.is_empty() {
                unet_dtypes(path)
            } else {
                report.dtypes.clone()
            };
            (family, dtypes)
        }
        _ => return Ok(None),
    };
    Ok(Some((family, dominant(&dtypes), size_on_disk(path))))
}

/// A Hugging Face chat model folder (`config.json` with a supported `model_type`).
fn chat_model(folder: &Path) -> Option<(Family, String, u64)> {
    let text = std::fs::read_to_string(folder.join("config.json")).ok()?;
    let config: serde_json::Value = serde_json::from_str(&text).ok()?;
    let model_type = config.get("model_type")?.as_str()?;
    if !CHAT_MODEL_TYPES.contains(&model_type) {
        return None;
    }
    let precision = match config.get("torch_dtype").and_then(|d| d.as_str()) {
        Some("bfloat16") => "bf16",
        Some("float16") => "f16",
        Some("float32") => "f32",
        _ => "unknown",
    };
    Some((
        Family::ChatModel,
        precision.to_string(),
        size_on_disk(folder),
    ))
}

/// The stored types of a diffusers folder's UNet weights.
fn unet_dtypes(folder: &Path) -> BTreeMap<String, usize> {
    [
        "diffusion_pytorch_model.safetensors",
        "diffusion_pytorch_model.fp16.safetensors",
    ]
    .iter()
    .map(|name| folder.join("unet").join(name))
    .find(|p| p.is_file())
    .and_then(|p| TensorFile::open(&p).ok())
    .map(|file| dtype_counts(&file))
    .unwrap_or_default()
}

/// The type most tensors are stored in.
fn dominant(counts: &BTreeMap<String, usize>) -> String {
    counts
        .iter()
        .max_by_key(|(_, n)| **n)
        .map_or_else(|| "unknown".to_string(), |(d, _)| d.clone())
}

/// Bytes a file takes, or the files of a folder (one level of subfolders deep, as a model folder is laid
/// out), following symlinks as the Hugging Face cache uses them.
pub fn size_on_disk(path: &Path) -> u64 {
    let size = |p: &Path| std::fs::metadata(p).map_or(0, |m| if m.is_file() { m.len() } else { 0 });
    if !path.is_dir() {
        return size(path);
    }
    let mut total = 0;
    for entry in std::fs::read_dir(path).into_iter().flatten().flatten() {
        let entry = entry.path();
        if entry.is_dir() {
            total += std::fs::read_dir(&entry)
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| size(&e.path()))
                .sum::<u64>();
        } else {
            total += size(&entry);
        }
    }
    total
}
