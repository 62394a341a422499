//! The engine's language-model export: from a checkpoint of a language-model run, rebuilt on the kept
//! model, the PEFT adapter folder `DIR/NAME/`, the llama.cpp adapter `DIR/NAME.gguf`, a merged model folder
//! `DIR/NAME-merged/` (bf16) and an Ollama `DIR/Modelfile` (`FROM` the base folder, `ADAPTER` the GGUF
//! file), as the request asks. Must not load models: the engine hands it the kept one.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use candle_core::DType;

use crate::atomic_file::write_atomically;
use crate::config::TrainConfig;
use crate::lora::export_network;
use crate::messages::{LanguageExportRequest, LanguageExports};
use crate::models::causal_lm::{CausalLm, merge_into_folder};
use crate::train::{language_network_from_checkpoint, write_gguf_export, write_peft_export};

/// The name of Ollama's model description file.
pub const MODELFILE: &str = "Modelfile";

/// Writes what `request` asks from its checkpoint, with `model` the loaded `request.base_model`.
pub fn export(
    model: &CausalLm,
    request: &LanguageExportRequest,
) -> anyhow::Result<LanguageExports> {
    if !(request.peft || request.gguf || request.merged || request.ollama) {
        bail!(
            "nothing to export: choose the PEFT folder, the GGUF file, the merged model or Ollama"
        );
    }
    let (network, saved) = language_network_from_checkpoint(model, &request.checkpoint)?;
    let lora = export_network(&network)?;
    drop(network); // the model is left without adapters
    let config = TrainConfig {
        base_model: request.base_model.clone(),
        output_dir: request.output_dir.clone(),
        output_name: request.name.clone(),
        save_precision: request.precision,
        ..saved.state.config
    };
    let dir = &request.output_dir;
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create the export folder {}", dir.display()))?;
    let mut exports = LanguageExports::default();
    let peft_folder = dir.join(&request.name);
    if request.peft {
        write_peft_export(&lora, model, &config, config.use_rslora, &peft_folder)?;
        exports.peft_folder = Some(peft_folder.clone());
    }
    if request.gguf || request.ollama {
        // Ollama's ADAPTER takes the GGUF file.
        let gguf_file = dir.join(format!("{}.gguf", request.name));
        write_gguf_export(&lora, model, &config, &gguf_file)?;
        exports.gguf_file = Some(gguf_file);
    }
    if request.merged {
        let merged = dir.join(format!("{}-merged", request.name));
        let scratch = (!request.peft).then(|| ScratchFolder(scratch_name(dir, &request.name)));
        let adapter = match &scratch {
            Some(scratch) => {
                write_peft_export(&lora, model, &config, config.use_rslora, &scratch.0)?;
                scratch.0.clone()
            }
            None => peft_folder,
        };
        merge_into_folder(&request.base_model, &[(adapter, 1.0)], &merged, DType::BF16)?;
        exports.merged_folder = Some(merged);
    }
    if request.ollama
        && let Some(gguf_file) = &exports.gguf_file
    {
        let modelfile = dir.join(MODELFILE);
        write_modelfile(&modelfile, &request.base_model, gguf_file)?;
        let modelfile = std::path::absolute(&modelfile)?;
        exports.ollama_command = Some(format!(
            "ollama create {} -f {}",
            request.name,
            shell_word(&modelfile)
        ));
        exports.modelfile = Some(modelfile);
    }
    Ok(exports)
}

/// Writes the Modelfile (atomically): `FROM` the base folder, `ADAPTER` the GGUF file, both absolute.
fn write_modelfile(path: &Path, base: &Path, gguf_file: &Path) -> anyhow::Result<()> {
    let text = format!(
        "FROM {}\nADAPTER {}\n",
        std::path::absolute(base)?.display(),
        std::path::absolute(gguf_file)?.display()
    );
    write_atomically(path, |w| std::io::Write::write_all(w, text.as_bytes()))
        .with_context(|| format!("cannot write {}", path.display()))
}

/// A path as one word of a shell command (quoted when it holds spaces or quotes).
fn shell_word(path: &Path) -> String {
    let text = path.display().to_string();
    if text.contains(|c: char| c.is_whitespace() || c == '\'' || c == '"') {
        format!("'{}'", text.replace('\'', r"'\''"))
    } else {
        text
    }
}

/// Where a PEFT folder only needed for merging is written.
fn scratch_name(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!(".{name}-peft-{}", std::process::id()))
}

/// A folder removed when dropped, whatever happened meanwhile.
struct ScratchFolder(PathBuf);

impl Drop for ScratchFolder {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
