//! Configs written for kohya sd-scripts (`--config_file`) and the GUIs built on it (lora-scripts' TOML,
//! kohya_ss's saved JSON): their sections are flattened as sd-scripts does, their names and values are
//! translated to ours (numbers written as text included), the settings that only tune the Python trainer
//! (xformers, data-loader workers, ...) are set aside with a note, and what lora-studio cannot do (another
//! optimizer, regularisation images) is one sentence naming the key.

use serde_json::{Map, Value};

use super::load::{ConfigError, canonical_key, default_table};

/// Settings that tune the Python stack or its logging and mean nothing here.
const PYTHON_ONLY: &[&str] = &[
    "xformers",
    "sdpa",
    "mem_eff_attn",
    "lowram",
    "lowvram",
    "highvram",
    "max_data_loader_n_workers",
    "persistent_data_loader_workers",
    "full_fp16",
    "full_bf16",
    "fp8_base",
    "no_half_vae",
    "vae_batch_size",
    "save_state",
    "save_state_on_train_end",
    "ddp_timeout",
    "ddp_gradient_as_bucket_view",
    "console_log_level",
    "console_log_simple",
    "debug_dataset",
    "num_cpu_threads_per_process",
    "no_token_padding",
    "sdxl_cache_text_encoder_outputs",
    "sdxl_no_half_vae",
    "save_last_n_steps_state",
];

/// Settings dropped without a note: labels, or settings that only act together with something absent.
const SILENT: &[&str] = &[
    "v2",
    "log_prefix",
    "log_tracker_name",
    "wandb_api_key",
    "wandb_run_name",
    "training_comment",
    "metadata_title",
    "metadata_author",
    "metadata_description",
    "metadata_license",
    "metadata_tags",
    "prior_loss_weight",
    "multires_noise_discount",
    "huber_c",
    "huber_schedule",
    "token_warmup_min",
    "model_list",
    "use_wandb",
    "dim_from_weights",
    "train_on_input",
];

/// sd-scripts training options lora-studio does not have, with the value that leaves them off: dropped at
/// that value, one sentence at any other.
const UNLESS_OFF: &[(&str, &str)] = &[
    ("min_timestep", "0"),
    ("max_timestep", "1000"),
    ("multires_noise_iterations", "0"),
    ("ip_noise_gamma", "0"),
    ("adaptive_noise_scale", "0"),
    ("noise_offset_random_strength", "false"),
    ("ip_noise_gamma_random_strength", "false"),
    ("loss_type", "\"l2\""),
    ("zero_terminal_snr", "false"),
    ("debiased_estimation_loss", "false"),
    ("scale_v_pred_loss_like_noise_pred", "false"),
    ("v_pred_like_loss", "0"),
    ("weighted_captions", "false"),
    ("caption_tag_dropout_rate", "0"),
    ("token_warmup_step", "0"),
    ("stop_text_encoder_training", "0"),
    ("scale_weight_norms", "0"),
    ("rank_dropout", "0"),
    ("module_dropout", "0"),
    ("sdxl", "false"),
    ("noise_offset_type", "\"Original\""),
    ("lr_warmup", "0"),
    // kohya_ss's per-block weights and extra command-line text (empty ones are dropped before).
    ("block_dims", "\"\""),
    ("block_alphas", "\"\""),
    ("conv_block_dims", "\"\""),
    ("conv_block_alphas", "\"\""),
    ("down_lr_weight", "\"\""),
    ("mid_lr_weight", "\"\""),
    ("up_lr_weight", "\"\""),
    ("block_lr_zero_threshold", "\"\""),
    ("lr_scheduler_args", "\"\""),
    ("additional_parameters", "\"\""),
    ("vae", "\"\""),
    ("lora_network_weights", "\"\""),
];

/// Optional whole-number settings (their default is unset, so the default config does not say they are
/// whole numbers).
const OPTIONAL_COUNTS: &[&str] = &[
    "max_train_steps",
    "sample_size",
    "min_bucket_reso",
    "max_bucket_reso",
    "conv_rank",
];

/// Other optional number settings, and kohya numbers read here before they are dropped.
const NUMBER_KEYS: &[&str] = &[
    "unet_lr",
    "text_encoder_lr",
    "min_snr_gamma",
    "conv_alpha",
    "max_token_length",
    "lr_scheduler_power",
    "lr_warmup",
    "stop_text_encoder_training",
    "caption_dropout_every_n_epochs",
    "save_last_n_epochs",
    "save_last_n_steps",
    "save_n_epoch_ratio",
    "conv_dim",
    "max_timestep",
    "min_timestep",
];

/// Translates the kohya settings of `map` (a config file's table) in place; returns notes on what was set
/// aside.
pub(crate) fn translate(map: &mut Map<String, Value>) -> Result<Vec<String>, ConfigError> {
    flatten_sections(map)?;
    super::kohya_dataset::expand(map)?;
    // The GUIs write "" for a setting left empty.
    map.retain(|_, value| value.as_str() != Some(""));
    numbers_from_text(map);
    let mut notes = Vec::new();
    lora_type(map)?;
    for key in ["max_resolution", "resolution"] {
        // A dataset config may give `[width, height]`.
        if let Some(Value::Array(sides)) = map.get(key) {
            let sides: Vec<String> = sides.iter().map(Value::to_string).collect();
            map.insert(key.into(), sides.join(",").into());
        }
        if let Some(Value::String(size)) = map.get(key).cloned() {
            map.remove(key);
            map.insert("resolution".into(), resolution(key, &size, &mut notes)?);
        }
    }
    notes.extend(set_aside(map, PYTHON_ONLY, "they tune the Python trainer"));
    for key in SILENT {
        map.remove(*key);
    }
    for (key, off) in UNLESS_OFF {
        if let Some(value) = map.remove(*key)
            && !is_off(&value, off)
        {
            return Err(bad(
                key,
                format!("{value} changes training in a way lora-studio does not offer; remove it"),
            ));
        }
    }
    if map.remove("resume").is_some() {
        return Err(bad(
            "resume",
            "kohya's saved state is not read; resume a lora-studio checkpoint with \
             --resume_from_checkpoint"
                .into(),
        ));
    }
    if map.remove("alpha_mask") == Some(Value::Bool(true)) {
        map.insert("alpha_mode".into(), "mask".into());
        map.insert("masked_loss".into(), true.into());
    }
    if let Some(value) = map.remove("optimizer_type") {
        optimizer(&text("optimizer_type", &value)?, map, &mut notes)?;
    }
    // kohya_ss calls it `optimizer`, as lora-studio does, with kohya's names.
    if let Some(Value::String(name)) = map.get("optimizer").cloned()
        && !matches!(name.as_str(), "adamw" | "adafactor")
    {
        optimizer(&name, map, &mut notes)?;
    }
    if map.remove("use_8bit_adam") == Some(Value::Bool(true)) {
        optimizer("AdamW8bit", map, &mut notes)?;
    }
    if let Some(value) = map.remove("optimizer_args") {
        optimizer_args(&value, map, &mut notes)?;
    }
    if let Some(value) = map.get("lr_scheduler").cloned() {
        lr_scheduler(&text("lr_scheduler", &value)?, map, &mut notes);
    }
    if let Some(value) = map.remove("lr_scheduler_power")
        && value.as_f64() != Some(1.0)
    {
        notes.push(format!(
            "ignored lr_scheduler_power = {value} (polynomial schedules run linear)"
        ));
    }
    if let Some(value) = map.remove("v_parameterization")
        && value == Value::Bool(true)
    {
        map.insert("prediction_type".into(), "v_prediction".into());
    }
    network(map, &mut notes)?;
    contrastive(map)?;
    saving(map, &mut notes)?;
    dataset(map, &mut notes)?;
    if map.get("min_snr_gamma").and_then(Value::as_f64) == Some(0.0) {
        map.remove("min_snr_gamma");
    }
    if let Some(value) = map.get("lr_warmup_steps")
        && value.as_f64().is_some_and(|v| v > 0.0 && v < 1.0)
    {
        return Err(bad(
            "lr_warmup_steps",
            format!("{value} is a fraction of the run; give a number of steps"),
        ));
    }
    Ok(notes)
}

/// kohya_ss writes numbers as text ("0.0001", "1234") and counts as decimals (64.0): turned into the
/// numbers our settings take.
fn numbers_from_text(map: &mut Map<String, Value>) {
    let defaults = default_table();
    for (key, value) in map.iter_mut() {
        let default = defaults.get(canonical_key(key));
        let optional_count = OPTIONAL_COUNTS.contains(&key.as_str());
        let numeric = default.is_some_and(Value::is_number)
            || optional_count
            || NUMBER_KEYS.contains(&key.as_str());
        if !numeric {
            continue;
        }
        if let Value::String(text) = value
            && let Some(number) = number_from_text(text)
        {
            *value = number;
        }
        let integral = optional_count || default.is_some_and(|d| d.is_u64() || d.is_i64());
        if integral
            && let Some(number) = value.as_f64()
            && number.fract() == 0.0
            && number >= 0.0
        {
            *value = (number as u64).into();
        }
    }
}

/// kohya_ss's `LoRA_type`: Standard is LoRA; the LoCon types add convolutions with `conv_dim`/`conv_alpha`.
fn lora_type(map: &mut Map<String, Value>) -> Result<(), ConfigError> {
    let Some(value) = map.remove("LoRA_type") else {
        return Ok(());
    };
    let kind = text("LoRA_type", &value)?;
    let conv_dim = map.remove("conv_dim");
    match kind.as_str() {
        "Standard" => {
            map.remove("conv_alpha");
        }
        "Kohya LoCon" | "LyCORIS/LoCon" => {
            map.insert("conv_lora".into(), true.into());
            if let Some(dim) = conv_dim {
                map.insert("conv_rank".into(), dim);
                if kind == "Kohya LoCon" {
                    kohya_conv_alpha_default(map);
                }
            }
        }
        other => {
            return Err(bad(
                "LoRA_type",
                format!("{other} is not available; lora-studio trains LoRA (Standard) and LoCon"),
            ));
        }
    }
    Ok(())
}

/// Whether `value` is unset or equal to `off` (a JSON text; numbers compare by value).
pub(super) fn is_off(value: &Value, off: &str) -> bool {
    let off: Value = serde_json::from_str(off).unwrap_or(Value::Null);
    value.is_null()
        || *value == off
        || value
            .as_f64()
            .is_some_and(|number| Some(number) == off.as_f64())
}

/// sd-scripts reads a table's sections (`[training_arguments]`, ...) as if their settings were at the top.
fn flatten_sections(map: &mut Map<String, Value>) -> Result<(), ConfigError> {
    let sections: Vec<String> = map
        .iter()
        .filter(|(_, value)| value.is_object())
        .map(|(key, _)| key.clone())
        .collect();
    for section in sections {
        let Some(Value::Object(settings)) = map.remove(&section) else {
            continue;
        };
        for (key, value) in settings {
            match map.get(&key) {
                Some(earlier) if *earlier != value => {
                    return Err(bad(
                        &key,
                        format!("it is set twice, to {earlier} and to {value} (in [{section}])"),
                    ));
                }
                _ => {
                    map.insert(key, value);
                }
            }
        }
    }
    Ok(())
}

fn optimizer(
    name: &str,
    map: &mut Map<String, Value>,
    notes: &mut Vec<String>,
) -> Result<(), ConfigError> {
    let lower = name.to_ascii_lowercase();
    let ours = match lower.as_str() {
        "adamw" | "adamw32bit" | "pagedadamw" | "pagedadamw32bit" | "torch.optim.adamw" => "adamw",
        "adamw8bit" | "pagedadamw8bit" | "bnb.optim.adamw8bit" => {
            notes.push(format!(
                "optimizer {name} runs as AdamW with full-precision state (8-bit state is not \
                 implemented)"
            ));
            "adamw"
        }
        "adafactor" | "transformers.optimization.adafactor" => "adafactor",
        _ => {
            return Err(bad(
                "optimizer_type",
                format!("{name} is not available; lora-studio trains with AdamW or Adafactor"),
            ));
        }
    };
    map.insert("optimizer".into(), ours.into());
    Ok(())
}

/// `["weight_decay=0.1", "betas=0.9,0.99", "eps=1e-6"]`.
fn optimizer_args(
    value: &Value,
    map: &mut Map<String, Value>,
    notes: &mut Vec<String>,
) -> Result<(), ConfigError> {
    for (name, arg) in arguments("optimizer_args", value)? {
        let number = |text: &str| {
            text.trim().parse::<f64>().map_err(|_| {
                bad(
                    "optimizer_args",
                    format!("`{name}={arg}`: `{text}` is not a number"),
                )
            })
        };
        match name.as_str() {
            "weight_decay" => {
                map.insert("weight_decay".into(), number(&arg)?.into());
            }
            "eps" => {
                map.insert("adam_epsilon".into(), number(&arg)?.into());
            }
            "betas" => {
                let betas: Vec<&str> = arg.trim_matches(['(', ')']).split(',').collect();
                let [beta1, beta2] = betas.as_slice() else {
                    return Err(bad(
                        "optimizer_args",
                        format!("`betas={arg}` needs two numbers"),
                    ));
                };
                map.insert("adam_beta1".into(), number(beta1)?.into());
                map.insert("adam_beta2".into(), number(beta2)?.into());
            }
            _ => notes.push(format!("ignored optimizer argument {name}={arg}")),
        }
    }
    Ok(())
}

fn lr_scheduler(name: &str, map: &mut Map<String, Value>, notes: &mut Vec<String>) {
    let ours = match name {
        "polynomial" => {
            notes.push("lr_scheduler polynomial runs as linear (power 1)".to_string());
            "linear"
        }
        "adafactor" => {
            notes.push("lr_scheduler adafactor runs as constant".to_string());
            "constant"
        }
        other => other,
    };
    map.insert("lr_scheduler".into(), ours.into());
}

/// `"512,512"` or `"512"`: the side of the square training area. A width and height that differ give
/// the side of a square of about their area (buckets keep each image's aspect either way).
fn resolution(key: &str, text: &str, notes: &mut Vec<String>) -> Result<Value, ConfigError> {
    let sides: Vec<&str> = text.split(',').map(str::trim).collect();
    let parsed: Option<Vec<u64>> = sides.iter().map(|s| s.parse().ok()).collect();
    match parsed.as_deref() {
        Some([side]) => Ok((*side).into()),
        Some([width, height]) if width == height => Ok((*width).into()),
        Some([width, height]) => {
            let area = *width as f64 * *height as f64;
            let side = (area.sqrt() / 64.0).round().max(1.0) as u64 * 64;
            notes.push(format!(
                "{key} {text}: trained on buckets of about the same area, {side}x{side}"
            ));
            Ok(side.into())
        }
        _ => Err(bad(
            key,
            format!("`{text}` is not a size such as 512 or \"512,512\""),
        )),
    }
}

/// kohya's `networks.lora` trains convolutions with alpha 1 when `conv_dim` comes without `conv_alpha`
/// (LyCORIS, like lora-studio, takes the network alpha).
fn kohya_conv_alpha_default(map: &mut Map<String, Value>) {
    map.entry("conv_alpha").or_insert(1.into());
}

/// kohya's network settings: the module, its `network_args`, and which parts train.
fn network(map: &mut Map<String, Value>, notes: &mut Vec<String>) -> Result<(), ConfigError> {
    let mut lycoris = false;
    if let Some(value) = map.remove("network_module") {
        let module = text("network_module", &value)?;
        if !matches!(module.as_str(), "networks.lora" | "lycoris.kohya") {
            return Err(bad(
                "network_module",
                format!("{module} is not available; lora-studio trains LoRA, LoCon and DoRA"),
            ));
        }
        lycoris = module == "lycoris.kohya";
    }
    if let Some(value) = map.remove("network_args") {
        for (name, arg) in arguments("network_args", &value)? {
            match name.as_str() {
                "conv_dim" | "conv_rank" => {
                    map.insert("conv_lora".into(), true.into());
                    map.insert("conv_rank".into(), number_value("network_args", &arg)?);
                    if !lycoris {
                        kohya_conv_alpha_default(map);
                    }
                }
                "conv_alpha" => {
                    map.insert("conv_alpha".into(), number_value("network_args", &arg)?);
                }
                "algo" if matches!(arg.as_str(), "lora" | "locon") => {}
                "dora_wd" if arg.eq_ignore_ascii_case("true") => {
                    map.insert("dora".into(), true.into());
                }
                "algo" => {
                    return Err(bad(
                        "network_args",
                        format!("algo={arg} is not available; lora-studio trains LoRA and LoCon"),
                    ));
                }
                _ => notes.push(format!("ignored network argument {name}={arg}")),
            }
        }
    }
    if let Some(value) = map.remove("network_train_unet_only") {
        map.insert(
            "train_text_encoder".into(),
            (value != Value::Bool(true)).into(),
        );
    }
    if map.remove("network_train_text_encoder_only") == Some(Value::Bool(true)) {
        return Err(bad(
            "network_train_text_encoder_only",
            "training the text encoder alone is not available; the UNet always trains".into(),
        ));
    }
    if map.remove("network_weights").is_some() {
        return Err(bad(
            "network_weights",
            "starting from an existing LoRA file is not available; remove it to train from \
             scratch, or resume a lora-studio checkpoint with --resume_from_checkpoint"
                .into(),
        ));
    }
    if let Some(value) = map.remove("network_dropout")
        && value.as_f64() != Some(0.0)
    {
        notes.push(format!("ignored network_dropout = {value}"));
    }
    Ok(())
}

/// Output settings: the file format, precision names, log folder and preview options.
fn saving(map: &mut Map<String, Value>, notes: &mut Vec<String>) -> Result<(), ConfigError> {
    // kohya keeps the last N epoch (or step) checkpoints; lora-studio the last N of either.
    for key in ["save_last_n_epochs", "save_last_n_steps"] {
        if let Some(value) = map.remove(key)
            && !map.contains_key("keep_last_checkpoints")
            && value.as_u64().is_some_and(|n| n > 0)
        {
            map.insert("keep_last_checkpoints".into(), value);
        }
    }
    if let Some(value) = map.remove("save_n_epoch_ratio")
        && value.as_f64() != Some(0.0)
    {
        notes.push(format!(
            "ignored save_n_epoch_ratio = {value} (save_every_n_epochs sets the epochs)"
        ));
    }
    if let Some(value) = map.remove("save_model_as") {
        let format = text("save_model_as", &value)?;
        if format != "safetensors" {
            notes.push(format!(
                "save_model_as {format}: the LoRA is written as .safetensors, which every UI reads"
            ));
        }
    }
    if let Some(value) = map.get("save_precision")
        && matches!(value.as_str(), Some("float" | "fp32" | "float32"))
    {
        map.insert("save_precision".into(), "fp32".into());
    }
    if let Some(value) = map.remove("logging_dir") {
        notes.push(format!(
            "logging_dir {}: TensorBoard logs go to OUTPUT_DIR/logs",
            value.as_str().unwrap_or_default()
        ));
    }
    if let Some(value) = map.remove("sample_sampler") {
        notes.push(format!(
            "sample_sampler {}: previews use DDIM",
            value.as_str().unwrap_or_default()
        ));
    }
    if !map.contains_key("sample_prompts") {
        // kohya skips previews without prompts (lora-scripts passes them on its command line).
        for key in ["sample_every_n_steps", "sample_every_n_epochs"] {
            if let Some(value) = map.remove(key)
                && value.as_u64() != Some(0)
            {
                notes.push(format!(
                    "{key} = {value} renders nothing: sample_prompts is not set"
                ));
            }
        }
    }
    if let Some(Value::String(file)) = map.get("sample_prompts").cloned() {
        let prompts = std::fs::read_to_string(&file).map_err(|e| {
            bad(
                "sample_prompts",
                format!("the prompt file {file} cannot be read ({e})"),
            )
        })?;
        // One prompt per line; kohya's per-prompt options (` --n negative --w 512 ...`) are dropped.
        let prompts: Vec<Value> = prompts
            .lines()
            .map(|line| line.split(" --").next().unwrap_or_default().trim())
            .filter(|line| !line.is_empty() && !line.starts_with('#'))
            .map(|line| Value::String(line.to_string()))
            .collect();
        map.insert("sample_prompts".into(), Value::Array(prompts));
    }
    Ok(())
}

/// lora-scripts' contrastive-loss extension: its settings only act when it is enabled.
fn contrastive(map: &mut Map<String, Value>) -> Result<(), ConfigError> {
    if map.remove("enable_contrastive") == Some(Value::Bool(true)) {
        return Err(bad(
            "enable_contrastive",
            "lora-scripts' contrastive loss is not available; set it to false".into(),
        ));
    }
    for key in [
        "negative_sampling_method",
        "noise_strength",
        "contrastive_weight",
        "contrastive_warmup_steps",
    ] {
        map.remove(key);
    }
    Ok(())
}

/// Dataset settings kohya has and lora-studio reads differently or not at all.
fn dataset(map: &mut Map<String, Value>, notes: &mut Vec<String>) -> Result<(), ConfigError> {
    if map.remove("reg_data_dir").is_some() {
        return Err(bad(
            "reg_data_dir",
            "regularisation images are not available; remove the setting".into(),
        ));
    }
    if let Some(value) = map.remove("max_token_length")
        && value.as_u64() != Some(75)
    {
        notes.push(format!(
            "max_token_length {value}: captions are read up to CLIP's 75 tokens"
        ));
    }
    for key in [
        "color_aug",
        "caption_dropout_every_n_epochs",
        "face_crop_aug_range",
    ] {
        if let Some(value) = map.remove(key)
            && !matches!(value, Value::Bool(false) | Value::Null)
            && value.as_f64() != Some(0.0)
        {
            notes.push(format!("ignored {key} = {value}"));
        }
    }
    Ok(())
}

/// The `name=value` items of a kohya argument list (a list of strings, or one space-separated string).
fn arguments(key: &str, value: &Value) -> Result<Vec<(String, String)>, ConfigError> {
    let items: Vec<String> = match value {
        Value::Array(items) => items
            .iter()
            .map(|item| text(key, item))
            .collect::<Result<_, _>>()?,
        Value::String(line) => line.split_whitespace().map(str::to_string).collect(),
        other => return Err(bad(key, format!("{other} is not a list of name=value"))),
    };
    items
        .iter()
        .map(|item| {
            let (name, arg) = item
                .split_once('=')
                .ok_or_else(|| bad(key, format!("`{item}` is not of the form name=value")))?;
            Ok((name.trim().to_string(), arg.trim().to_string()))
        })
        .collect()
}

fn number_value(key: &str, text: &str) -> Result<Value, ConfigError> {
    number_from_text(text).ok_or_else(|| bad(key, format!("`{text}` is not a number")))
}

/// A number written as text: a whole one as an integer (what count settings take), else a decimal.
fn number_from_text(text: &str) -> Option<Value> {
    let number: f64 = text.trim().parse().ok().filter(|n: &f64| n.is_finite())?;
    Some(
        if number.fract() == 0.0 && (0.0..9.0e15).contains(&number) {
            (number as u64).into()
        } else {
            number.into()
        },
    )
}

pub(super) fn text(key: &str, value: &Value) -> Result<String, ConfigError> {
    value
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| bad(key, format!("{value} is not a text")))
}

pub(super) fn bad(key: &str, reason: String) -> ConfigError {
    ConfigError::BadValue {
        key: key.to_string(),
        reason,
    }
}

/// Removes those of `keys` that `map` holds and says so in one note (`why` they mean nothing here).
pub(super) fn set_aside(map: &mut Map<String, Value>, keys: &[&str], why: &str) -> Option<String> {
    let ignored: Vec<&str> = keys
        .iter()
        .copied()
        .filter(|key| map.remove(*key).is_some())
        .collect();
    (!ignored.is_empty()).then(|| format!("ignored ({why}): {}", ignored.join(", ")))
}
