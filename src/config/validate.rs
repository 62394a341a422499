//! Checks that a config's values make sense together, with one sentence per problem.

use super::load::ConfigError;
use super::train_config::{AlphaMode, TrainConfig};

fn bad(key: &str, reason: impl Into<String>) -> Result<(), ConfigError> {
    Err(ConfigError::BadValue {
        key: key.to_string(),
        reason: reason.into(),
    })
}

fn positive_finite(key: &str, value: f64) -> Result<(), ConfigError> {
    if value.is_finite() && value > 0.0 {
        Ok(())
    } else {
        bad(key, format!("must be a positive number, not {value}"))
    }
}

/// Validates `config` as a whole.
pub fn validate(config: &TrainConfig) -> Result<(), ConfigError> {
    if config.train_data_dir.as_os_str().is_empty() {
        return bad(
            "train_data_dir",
            "is required: the folder with your training images (or, for a language model, the \
             folder or file of conversations and texts)",
        );
    }
    if config.base_model.as_os_str().is_empty() {
        return bad(
            "base_model",
            "is required: a Stable Diffusion checkpoint file or diffusers folder, or a language model \
             folder",
        );
    }
    if config.output_name.is_empty()
        || config.output_name.contains(['/', '\\'])
        || config.output_name.starts_with('.')
    {
        return bad(
            "output_name",
            format!(
                "`{}` must be a plain file name without folders",
                config.output_name
            ),
        );
    }
    validate_resolution(config)?;
    if config.repeats == 0 {
        return bad("repeats", "must be at least 1");
    }
    if !(0.0..=1.0).contains(&config.caption_dropout_rate) {
        return bad("caption_dropout_rate", "must be between 0 and 1");
    }
    if config.lora_rank == 0 {
        return bad("lora_rank", "must be at least 1");
    }
    positive_finite("lora_alpha", config.lora_alpha as f64)?;
    if config.conv_rank == Some(0) {
        return bad("conv_rank", "must be at least 1");
    }
    if let Some(alpha) = config.conv_alpha {
        positive_finite("conv_alpha", alpha as f64)?;
    }
    if !(0.0..1.0).contains(&config.lora_dropout) {
        return bad(
            "lora_dropout",
            format!(
                "must be at least 0 and below 1, not {}",
                config.lora_dropout
            ),
        );
    }
    if config.lora_target_modules.is_empty() {
        return bad(
            "lora_target_modules",
            "must name at least one layer (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, \
             down_proj) or all",
        );
    }
    if let Err(name) = config.language_model_targets() {
        return bad(
            "lora_target_modules",
            format!(
                "`{name}` is not a layer that takes adapters (q_proj, k_proj, v_proj, o_proj, \
                 gate_proj, up_proj, down_proj, their short names q, k, v, o, gate, up, down, or all)"
            ),
        );
    }
    if config.max_seq_length < 2 {
        return bad(
            "max_seq_length",
            format!(
                "must be at least 2 tokens (a token and the one it predicts), not {}",
                config.max_seq_length
            ),
        );
    }
    if config.dora && config.pissa {
        return bad("pissa", "cannot be combined with dora; choose one");
    }
    positive_finite("learning_rate", config.learning_rate)?;
    if let Some(lr) = config.unet_lr {
        positive_finite("unet_lr", lr)?;
    }
    if let Some(lr) = config.text_encoder_lr {
        positive_finite("text_encoder_lr", lr)?;
    }
    for (key, beta) in [
        ("adam_beta1", config.adam_beta1),
        ("adam_beta2", config.adam_beta2),
    ] {
        if !(0.0..1.0).contains(&beta) {
            return bad(key, format!("must be at least 0 and below 1, not {beta}"));
        }
    }
    positive_finite("adam_epsilon", config.adam_epsilon)?;
    if !(config.weight_decay >= 0.0 && config.weight_decay.is_finite()) {
        return bad("weight_decay", "must be zero or positive");
    }
    if !(0.0..1.0).contains(&config.lr_warmup_ratio) {
        return bad(
            "lr_warmup_ratio",
            format!(
                "must be at least 0 and below 1 (a fraction of the steps), not {}",
                config.lr_warmup_ratio
            ),
        );
    }
    if config.batch_size == 0 {
        return bad("batch_size", "must be at least 1");
    }
    if config.gradient_accumulation_steps == 0 {
        return bad("gradient_accumulation_steps", "must be at least 1");
    }
    match config.max_train_steps {
        Some(0) => return bad("max_train_steps", "must be at least 1"),
        None if config.epochs == 0 => {
            return bad("epochs", "must be at least 1 (or set max_train_steps)");
        }
        _ => {}
    }
    if !(config.max_grad_norm >= 0.0 && config.max_grad_norm.is_finite()) {
        return bad("max_grad_norm", "must be zero (no clipping) or positive");
    }
    if !(config.noise_offset >= 0.0 && config.noise_offset.is_finite()) {
        return bad("noise_offset", "must be zero or positive");
    }
    if let Some(gamma) = config.min_snr_gamma {
        positive_finite("min_snr_gamma", gamma)?;
    }
    if config.masked_loss && config.alpha_mode != AlphaMode::Mask {
        return bad(
            "masked_loss",
            "needs `alpha_mode: mask` (the mask is the images' alpha channel)",
        );
    }
    if config.clip_skip == 0 {
        return bad("clip_skip", "must be at least 1 (1 = last layer)");
    }
    if config.keep_last_checkpoints == 0 {
        return bad("keep_last_checkpoints", "must be at least 1");
    }
    if config.sample_every_n_steps > 0 || config.sample_every_n_epochs > 0 {
        if config.sample_prompts.is_empty() {
            return bad(
                "sample_prompts",
                "must list at least one prompt when sample_every_n_steps or sample_every_n_epochs is set",
            );
        }
        if config.sample_steps == 0 {
            return bad("sample_steps", "must be at least 1");
        }
        if let Some(s) = config.sample_strengths.iter().find(|s| !s.is_finite()) {
            return bad("sample_strengths", format!("{s} is not a finite number"));
        }
    }
    if let Some(size) = config.sample_size
        && (size < 64 || size % 8 != 0)
    {
        return bad("sample_size", "must be a multiple of 8 of at least 64");
    }
    if config.device.parse::<super::DeviceChoice>().is_err() {
        return bad(
            "device",
            format!(
                "`{}` is not cpu, cuda, cuda:N, metal or auto",
                config.device
            ),
        );
    }
    Ok(())
}

/// Validates the resolution, the bucket step and the bucket sides (the part of [`validate`] a run repeats once
/// it has given an unset resolution its base model's).
pub fn validate_resolution(config: &TrainConfig) -> Result<(), ConfigError> {
    if let Some(resolution) = config.resolution
        && (resolution < 64 || !resolution.is_multiple_of(64))
    {
        return bad(
            "resolution",
            format!("must be a multiple of 64 of at least 64, not {resolution}"),
        );
    }
    if config.bucket_reso_steps < 8 || !config.bucket_reso_steps.is_multiple_of(8) {
        return bad(
            "bucket_reso_steps",
            format!("must be a multiple of 8, not {}", config.bucket_reso_steps),
        );
    }
    // Only sides the user set can miss the resolution: derived ones follow it. An unset resolution is the
    // base model's, checked when the run knows it.
    let (min_side, max_side) = config.bucket_sides();
    if let Some(resolution) = config.resolution
        && config.enable_bucket
        && (min_side > resolution || max_side < resolution)
    {
        return bad(
            if min_side > resolution {
                "min_bucket_reso"
            } else {
                "max_bucket_reso"
            },
            format!("buckets {min_side}..{max_side} must include the resolution {resolution}"),
        );
    }
    Ok(())
}
