//! What a causal language model's run exports, beside the checkpoints: `output_dir/OUTPUT_NAME/`, a PEFT
//! adapter folder (transformers + peft, LLaMA-Factory, vLLM and `lora-studio chat --lora` load it), and
//! `output_dir/OUTPUT_NAME.gguf`, a llama.cpp LoRA adapter (`llama-cli --lora`, Ollama's `ADAPTER`).
//! DoRA and PiSSA networks are exported as plain LoRA, as for images (see [`export_network`]).

use std::path::{Path, PathBuf};

use candle_core::DType;

use super::TrainError;
use super::export::{create_parent, save_dtype};
use crate::config::{SavePrecision, TrainConfig};
use crate::lora::{ExportedLora, LoraNetwork, PeftExport, export_network, write_peft_adapter};
use crate::models::causal_lm::{AdapterNames, CausalLm, write_gguf_adapter};

/// The files a causal language model's export wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct CausalLmExports {
    /// `output_dir/OUTPUT_NAME/`: `adapter_config.json` and `adapter_model.safetensors`.
    pub peft_folder: PathBuf,
    /// `output_dir/OUTPUT_NAME.gguf`.
    pub gguf_file: PathBuf,
    /// How exactly the files reproduce the trained network (exact, or DoRA's folding error).
    pub exactness: String,
}

/// Writes the PEFT adapter folder and the llama.cpp adapter of `network`, trained on `model` (the base
/// `config.base_model`), into `config.output_dir` under `config.output_name`. The PEFT tensors are in the
/// save precision, the GGUF ones in f32 for `save_precision = "fp32"` and f16 otherwise. `use_rslora`
/// writes the scales as peft's rsLoRA (`lora_alpha / √r`); the files give the trained network's outputs
/// either way.
pub fn write_causal_lm_exports(
    network: &LoraNetwork,
    model: &CausalLm,
    config: &TrainConfig,
    use_rslora: bool,
) -> Result<CausalLmExports, TrainError> {
    let lora = export_network(network)?;
    let peft_folder = config.output_dir.join(&config.output_name);
    let gguf_file = config
        .output_dir
        .join(format!("{}.gguf", config.output_name));
    write_peft_export(&lora, model, config, use_rslora, &peft_folder)?;
    write_gguf_export(&lora, model, config, &gguf_file)?;
    Ok(CausalLmExports {
        peft_folder,
        gguf_file,
        exactness: lora.exactness,
    })
}

/// Writes `lora` (exported from a network on `model`) as the PEFT adapter folder `folder`, its tensors in
/// `config.save_precision`, naming `config.base_model` as its base.
pub fn write_peft_export(
    lora: &ExportedLora,
    model: &CausalLm,
    config: &TrainConfig,
    use_rslora: bool,
    folder: &Path,
) -> Result<(), TrainError> {
    let export = PeftExport {
        base_model_name_or_path: config.base_model.to_string_lossy().into_owned(),
        use_rslora,
        layers: model.layers(),
    };
    write_peft_adapter(folder, lora, &export, save_dtype(config.save_precision))?;
    Ok(())
}

/// Writes `lora` (exported from a network on `model`) as the llama.cpp adapter `file`, named
/// `config.output_name`, in f32 for `save_precision = "fp32"` and f16 otherwise.
pub fn write_gguf_export(
    lora: &ExportedLora,
    model: &CausalLm,
    config: &TrainConfig,
    file: &Path,
) -> Result<(), TrainError> {
    create_parent(file)?;
    let gguf_dtype = match config.save_precision {
        SavePrecision::Fp32 => DType::F32,
        SavePrecision::Fp16 | SavePrecision::Bf16 => DType::F16,
    };
    write_gguf_adapter(
        file,
        lora,
        model.config(),
        AdapterNames {
            name: &config.output_name,
            base_model: &config.base_model.to_string_lossy(),
        },
        gguf_dtype,
    )?;
    Ok(())
}
