//! Writing what a run trained as files other tools load: the kohya LoRA (fp16/bf16/fp32) with its metadata,
//! optionally the diffusers/PEFT copy, and the export kept inside every checkpoint (f32, with the module
//! paths PEFT names need), so that exporting a checkpoint later needs neither the base model nor the dataset
//! folder. Knows nothing about the model family: a task hands over [`ExportContents`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};

use super::TrainError;
use crate::config::SavePrecision;
use crate::lora::{ExportedLora, ExportedModule, write_lora_file};

/// The export kept in every checkpoint folder.
pub const CHECKPOINT_EXPORT_FILE: &str = "lora.safetensors";

/// Metadata key of the checkpoint copy only: `{kohya name: [prefix, module path]}`.
const MODULES_KEY: &str = "lora_studio.modules";

/// The adapters as plain LoRA modules, with the metadata of the file.
#[derive(Debug, Clone)]
pub struct ExportContents {
    pub lora: ExportedLora,
    pub metadata: BTreeMap<String, String>,
}

/// The tensor type of a save precision.
pub fn save_dtype(precision: SavePrecision) -> DType {
    match precision {
        SavePrecision::Fp16 => DType::F16,
        SavePrecision::Bf16 => DType::BF16,
        SavePrecision::Fp32 => DType::F32,
    }
}

/// The folder of the diffusers/PEFT copy of the LoRA file `path`: `NAME_diffusers` beside it.
pub fn peft_folder(path: &Path) -> PathBuf {
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!("{stem}_diffusers"))
}

/// Writes the kohya LoRA file `path` in `precision` and, with `peft`, the diffusers/PEFT layout as
/// `NAME_diffusers/pytorch_lora_weights.safetensors` beside it.
pub fn write_export(
    contents: &ExportContents,
    path: &Path,
    precision: SavePrecision,
    peft: bool,
) -> Result<(), TrainError> {
    let dtype = save_dtype(precision);
    write_lora_file(
        path,
        &contents.lora.kohya_tensors(dtype)?,
        &contents.metadata,
    )?;
    if peft {
        let folder = peft_folder(path);
        std::fs::create_dir_all(&folder).map_err(|source| TrainError::Io {
            path: folder.clone(),
            source,
        })?;
        write_lora_file(
            &folder.join("pytorch_lora_weights.safetensors"),
            &contents.lora.peft_tensors(dtype)?,
            &contents.metadata,
        )?;
    }
    Ok(())
}

/// Writes the f32 export of a checkpoint into its folder `dir` (still under its temporary name).
pub fn write_checkpoint_export(contents: &ExportContents, dir: &Path) -> Result<(), TrainError> {
    let modules: BTreeMap<&str, [&str; 2]> = contents
        .lora
        .modules
        .iter()
        .map(|m| {
            (
                m.kohya_name.as_str(),
                [m.prefix.as_str(), m.module_path.as_str()],
            )
        })
        .collect();
    let mut metadata = contents.metadata.clone();
    metadata.insert(
        MODULES_KEY.to_string(),
        serde_json::to_string(&modules).unwrap_or_default(),
    );
    write_lora_file(
        &dir.join(CHECKPOINT_EXPORT_FILE),
        &contents.lora.kohya_tensors(DType::F32)?,
        &metadata,
    )?;
    Ok(())
}

/// The export a checkpoint folder keeps, if it has one (checkpoints of format 1 do not).
pub fn read_checkpoint_export(dir: &Path) -> Result<Option<ExportContents>, TrainError> {
    let path = dir.join(CHECKPOINT_EXPORT_FILE);
    if !path.is_file() {
        return Ok(None);
    }
    let bad = |reason: String| TrainError::Checkpoint {
        path: dir.to_path_buf(),
        reason: format!("its {CHECKPOINT_EXPORT_FILE} {reason}"),
    };
    let file = crate::tensor_file::TensorFile::open(&path)
        .map_err(|e| bad(format!("cannot be read ({e})")))?;
    let mut metadata: BTreeMap<String, String> = file
        .metadata()
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let modules: BTreeMap<String, [String; 2]> = metadata
        .remove(MODULES_KEY)
        .and_then(|json| serde_json::from_str(&json).ok())
        .ok_or_else(|| bad("does not list its modules".to_string()))?;
    let load = |name: &str| {
        file.load(name, &Device::Cpu)
            .map_err(|e| bad(format!("lacks `{name}` ({e})")))
    };
    let mut exported = Vec::with_capacity(modules.len());
    for (kohya_name, [prefix, module_path]) in modules {
        let alpha = load(&format!("{kohya_name}.alpha"))?
            .to_dtype(DType::F64)
            .and_then(|a| a.to_scalar::<f64>())
            .map_err(|e| bad(format!("has an unreadable alpha for `{kohya_name}` ({e})")))?;
        exported.push(ExportedModule {
            down: load(&format!("{kohya_name}.lora_down.weight"))?,
            up: load(&format!("{kohya_name}.lora_up.weight"))?,
            kohya_name,
            module_path,
            prefix,
            alpha,
        });
    }
    let exactness = metadata
        .get("lora_studio.exactness")
        .cloned()
        .unwrap_or_default();
    Ok(Some(ExportContents {
        lora: ExportedLora {
            modules: exported,
            exactness,
        },
        metadata,
    }))
}

/// `contents` renamed to the output file `out` (its name is the LoRA's name in the UIs).
pub fn renamed(mut contents: ExportContents, out: &Path) -> ExportContents {
    let name = out
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    contents
        .metadata
        .insert("ss_output_name".to_string(), name.clone());
    contents
        .metadata
        .insert("modelspec.title".to_string(), name);
    contents
}

/// Creates the folder `out` goes into.
pub fn create_parent(out: &Path) -> Result<(), TrainError> {
    if let Some(folder) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(folder).map_err(|source| TrainError::Io {
            path: folder.to_path_buf(),
            source,
        })?;
    }
    Ok(())
}

/// Exports checkpoint `checkpoint` as the LoRA file `out` from the export it keeps: no base model and no
/// dataset folder needed. `None` when the checkpoint keeps no export (format 1), which needs the base model.
pub fn export_kept(
    checkpoint: &Path,
    out: &Path,
    precision: SavePrecision,
    peft: bool,
) -> Result<Option<PathBuf>, TrainError> {
    let dir = super::checkpoint::checkpoint_dir(checkpoint)?;
    let Some(contents) = read_checkpoint_export(&dir)? else {
        return Ok(None);
    };
    create_parent(out)?;
    write_export(&renamed(contents, out), out, precision, peft)?;
    Ok(Some(out.to_path_buf()))
}
