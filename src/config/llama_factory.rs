//! Configs written for LLaMA-Factory (`llamafactory-cli train FILE.yaml`): its names are translated to
//! lora-studio's (`model_name_or_path`, `dataset_dir`/`dataset`, `lora_target`, `cutoff_len`,
//! `per_device_train_batch_size`, `lr_scheduler_type`, `warmup_ratio`, `bf16`, ...), the defaults it and
//! transformers' `TrainingArguments` give a setting the file leaves out are applied where they differ from
//! lora-studio's (rank 8, alpha twice the rank, learning rate 5e-5, 3 epochs, linear schedule, no weight
//! decay, batch size 8, 2048 tokens, a checkpoint every 500 steps, gradient checkpointing), settings that
//! only tune the Python stack or its evaluation are set aside with a note, and what lora-studio cannot do
//! (another stage than sft/pt, quantized bases, a dataset limit) is one sentence naming the key.
//!
//! A table is read this way when it has one of LLaMA-Factory's own keys ([`MARKERS`]). Reads the dataset
//! folder's `dataset_info.json` to find a named dataset (see [`super::llama_factory_dataset`]); touches no
//! other file.

use serde_json::{Map, Value};

use super::kohya::{bad, is_off, set_aside, text};
use super::llama_factory_dataset::dataset_path;
use super::load::ConfigError;

/// Keys only LLaMA-Factory configs have.
const MARKERS: &[&str] = &[
    "model_name_or_path",
    "finetuning_type",
    "stage",
    "cutoff_len",
    "lora_target",
    "per_device_train_batch_size",
    "dataset_dir",
    "dataset",
];

/// LLaMA-Factory names of lora-studio settings.
const RENAMED: &[(&str, &str)] = &[
    ("model_name_or_path", "base_model"),
    ("cutoff_len", "max_seq_length"),
    ("per_device_train_batch_size", "batch_size"),
    ("lr_scheduler_type", "lr_scheduler"),
    ("warmup_steps", "lr_warmup_steps"),
    ("warmup_ratio", "lr_warmup_ratio"),
    ("max_steps", "max_train_steps"),
    ("num_train_epochs", "epochs"),
    ("use_dora", "dora"),
    ("pissa_init", "pissa"),
    ("default_system", "system_prompt"),
];

/// What LLaMA-Factory (or transformers' `TrainingArguments`) uses when a file leaves a setting out, where
/// lora-studio's default differs. `lora_alpha` (twice the rank) is applied apart.
const THEIR_DEFAULTS: &[(&str, &str)] = &[
    ("lora_rank", "8"),
    ("learning_rate", "5e-5"),
    ("epochs", "3"),
    ("lr_scheduler", "\"linear\""),
    ("weight_decay", "0"),
    ("batch_size", "8"),
    ("max_seq_length", "2048"),
    ("save_steps", "500"),
];

/// Settings that tune the Python stack, its logging, or evaluation, and mean nothing to a training run here.
const SET_ASIDE: &[&str] = &[
    "trust_remote_code",
    "overwrite_cache",
    "preprocessing_num_workers",
    "dataloader_num_workers",
    "ddp_timeout",
    "flash_attn",
    "enable_liger_kernel",
    "use_unsloth",
    "use_unsloth_gc",
    "deepspeed",
    "plot_loss",
    "overwrite_output_dir",
    "save_only_model",
    "logging_steps",
    "logging_dir",
    "low_cpu_mem_usage",
    "cache_dir",
    "tokenized_path",
    "run_name",
    "disable_tqdm",
    "include_num_input_tokens_seen",
    "val_size",
    "eval_strategy",
    "eval_steps",
    "eval_dataset",
    "per_device_eval_batch_size",
    "do_eval",
    "do_predict",
    "predict_with_generate",
    "compute_accuracy",
];

/// Settings dropped without a note: labels, or settings of features that are off.
const SILENT: &[&str] = &[
    "create_new_adapter",
    "pissa_iter",
    "pissa_convert",
    "enable_thinking",
    "print_param_status",
    "streaming",
    "buffer_size",
    "mix_strategy",
    "interleave_probs",
];

/// LLaMA-Factory features lora-studio does not have, with the value that leaves them off: dropped at that
/// value, one sentence at any other.
const UNLESS_OFF: &[(&str, &str)] = &[
    ("adapter_name_or_path", "null"),
    ("additional_target", "null"),
    ("loraplus_lr_ratio", "null"),
    ("quantization_bit", "null"),
    ("mask_history", "false"),
    ("max_samples", "null"),
    ("rope_scaling", "null"),
    ("shift_attn", "false"),
    ("use_galore", "false"),
    ("use_badam", "false"),
    ("use_apollo", "false"),
    ("neftune_noise_alpha", "null"),
    ("resize_vocab", "false"),
    ("resume_from_checkpoint", "null"),
    ("pure_bf16", "false"),
];

/// Whether `map` is a LLaMA-Factory config.
pub(super) fn is_llama_factory(map: &Map<String, Value>) -> bool {
    MARKERS.iter().any(|key| map.contains_key(*key))
}

/// Translates a LLaMA-Factory config (`map`, if it is one) in place; returns notes on what was set aside.
pub(crate) fn translate(map: &mut Map<String, Value>) -> Result<Vec<String>, ConfigError> {
    if !is_llama_factory(map) {
        return Ok(Vec::new());
    }
    let mut notes = Vec::new();
    method(map)?;
    for key in SILENT {
        map.remove(*key);
    }
    notes.extend(set_aside(
        map,
        SET_ASIDE,
        "they tune LLaMA-Factory's Python stack or its evaluation",
    ));
    for (key, off) in UNLESS_OFF {
        if let Some(value) = map.remove(*key)
            && !is_off(&value, off)
        {
            return Err(bad(key, unavailable(key, &value)));
        }
    }
    if let Some(value) = map.remove("template") {
        notes.push(format!(
            "template {}: the model's own chat template (its tokenizer_config.json) is used",
            value.as_str().unwrap_or_default()
        ));
    }
    let dataset_dir = map.remove("dataset_dir");
    let dataset = map.remove("dataset");
    if dataset_dir.is_some() || dataset.is_some() {
        let path = dataset_path(dataset_dir.as_ref(), dataset.as_ref())?;
        map.insert("train_data_dir".into(), path.into());
    }
    for (theirs, ours) in RENAMED {
        if let Some(value) = map.remove(*theirs) {
            if map.contains_key(*ours) {
                return Err(ConfigError::DuplicateKey {
                    key: ours.to_string(),
                    alias: theirs.to_string(),
                });
            }
            map.insert(ours.to_string(), value);
        }
    }
    if let Some(value) = map.remove("lora_target") {
        map.insert("lora_target_modules".into(), target_list(&value)?);
    }
    precision(map)?;
    optimizer(map, &mut notes)?;
    saving(map)?;
    packing(map, &mut notes);
    if let Some(Value::Number(steps)) = map.get("max_train_steps")
        && steps.as_i64().is_some_and(|s| s <= 0)
    {
        // transformers' -1: train for num_train_epochs.
        map.remove("max_train_steps");
    }
    let disabled = map.remove("disable_gradient_checkpointing") == Some(Value::Bool(true));
    map.entry("gradient_checkpointing")
        .or_insert((!disabled).into());
    apply_their_defaults(map);
    Ok(notes)
}

/// `stage`, `do_train` and `finetuning_type`: supervised fine-tuning or pre-training with LoRA.
fn method(map: &mut Map<String, Value>) -> Result<(), ConfigError> {
    if let Some(value) = map.remove("stage") {
        let stage = text("stage", &value)?;
        if !matches!(stage.as_str(), "sft" | "pt") {
            return Err(bad(
                "stage",
                format!(
                    "{stage} is not available; lora-studio trains supervised fine-tuning (sft) and \
                     continued pre-training (pt)"
                ),
            ));
        }
    }
    if map.remove("do_train") == Some(Value::Bool(false)) {
        return Err(bad(
            "do_train",
            "false asks for no training, and lora-studio's train command trains; remove it".into(),
        ));
    }
    if let Some(value) = map.remove("finetuning_type") {
        let kind = text("finetuning_type", &value)?;
        if kind != "lora" {
            return Err(bad(
                "finetuning_type",
                format!("{kind} is not available; lora-studio trains LoRA adapters (lora)"),
            ));
        }
    }
    Ok(())
}

/// Why a LLaMA-Factory feature that is on cannot run here.
fn unavailable(key: &str, value: &Value) -> String {
    match key {
        "adapter_name_or_path" => {
            "starting from an existing adapter is not available; remove it to train \
             from scratch, or resume a lora-studio checkpoint with --resume_from_checkpoint"
                .into()
        }
        "resume_from_checkpoint" => "resume with lora-studio's --resume_from_checkpoint option (a \
             lora-studio checkpoint folder) instead"
            .into(),
        "quantization_bit" => format!(
            "{value}: quantized base models (QLoRA) are not available; remove it to train on the model \
             in bf16, fp16 or f32"
        ),
        "max_samples" => format!(
            "{value} limits the dataset, which lora-studio does not do; remove it (or cut the file)"
        ),
        "mask_history" => {
            "training on the last turn only is not available; every assistant turn is \
             trained"
                .into()
        }
        _ => format!("{value} changes training in a way lora-studio does not offer; remove it"),
    }
}

/// `lora_target`: `all`, or module names separated by commas (or a list).
fn target_list(value: &Value) -> Result<Value, ConfigError> {
    let names: Vec<String> = match value {
        Value::String(line) => line.split(',').map(|n| n.trim().to_string()).collect(),
        Value::Array(items) => items
            .iter()
            .map(|item| text("lora_target", item))
            .collect::<Result<_, _>>()?,
        other => {
            return Err(bad(
                "lora_target",
                format!("{other} is not a list of modules"),
            ));
        }
    };
    Ok(names
        .into_iter()
        .filter(|n| !n.is_empty())
        .map(Value::String)
        .collect())
}

/// `bf16` and `fp16` become `mixed_precision`.
fn precision(map: &mut Map<String, Value>) -> Result<(), ConfigError> {
    let bf16 = map.remove("bf16") == Some(Value::Bool(true));
    let fp16 = map.remove("fp16") == Some(Value::Bool(true));
    let chosen = match (bf16, fp16) {
        (true, true) => {
            return Err(bad("fp16", "bf16 and fp16 are both true; keep one".into()));
        }
        (true, false) => Some("bf16"),
        (false, true) => Some("fp16"),
        (false, false) => None,
    };
    if let Some(chosen) = chosen {
        if map.contains_key("mixed_precision") {
            return Err(ConfigError::DuplicateKey {
                key: "mixed_precision".into(),
                alias: chosen.into(),
            });
        }
        map.insert("mixed_precision".into(), chosen.into());
    }
    Ok(())
}

/// transformers' `optim` names.
fn optimizer(map: &mut Map<String, Value>, notes: &mut Vec<String>) -> Result<(), ConfigError> {
    let Some(value) = map.remove("optim") else {
        return Ok(());
    };
    let name = text("optim", &value)?;
    let ours = match name.as_str() {
        "adamw_torch" | "adamw_hf" | "adamw_torch_fused" => "adamw",
        "adamw_8bit" | "adamw_bnb_8bit" | "paged_adamw_8bit" | "paged_adamw_32bit" => {
            notes.push(format!(
                "optim {name} runs as AdamW with full-precision state (8-bit and paged states are not \
                 implemented)"
            ));
            "adamw"
        }
        "adafactor" => "adafactor",
        _ => {
            return Err(bad(
                "optim",
                format!("{name} is not available; lora-studio trains with AdamW or Adafactor"),
            ));
        }
    };
    map.insert("optimizer".into(), ours.into());
    Ok(())
}

/// `save_strategy`: steps (every `save_steps`), epoch (every epoch) or no (only at the end).
fn saving(map: &mut Map<String, Value>) -> Result<(), ConfigError> {
    let Some(value) = map.remove("save_strategy") else {
        return Ok(());
    };
    match text("save_strategy", &value)?.as_str() {
        "steps" => {}
        "epoch" => {
            map.insert("save_every_n_epochs".into(), 1.into());
            map.insert("save_steps".into(), 0.into());
        }
        "no" => {
            map.insert("save_steps".into(), 0.into());
        }
        other => {
            return Err(bad(
                "save_strategy",
                format!("{other} is not one of steps, epoch or no"),
            ));
        }
    }
    Ok(())
}

/// `packing` and `neat_packing`: lora-studio always packs without attention between samples.
fn packing(map: &mut Map<String, Value>, notes: &mut Vec<String>) {
    let neat = map.remove("neat_packing") == Some(Value::Bool(true));
    if neat {
        map.insert("packing".into(), true.into());
    } else if map.get("packing") == Some(&Value::Bool(true)) {
        notes.push(
            "packing: packed samples do not attend to each other here (LLaMA-Factory's neat_packing)"
                .into(),
        );
    }
}

/// LLaMA-Factory's and transformers' defaults for what the file leaves out.
fn apply_their_defaults(map: &mut Map<String, Value>) {
    for (key, default) in THEIR_DEFAULTS {
        if !map.contains_key(*key)
            && let Ok(value) = serde_json::from_str::<Value>(default)
        {
            map.insert(key.to_string(), value);
        }
    }
    if !map.contains_key("lora_alpha")
        && let Some(rank) = map.get("lora_rank").and_then(Value::as_f64)
    {
        map.insert("lora_alpha".into(), (rank * 2.0).into());
    }
}
