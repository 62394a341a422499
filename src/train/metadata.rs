//! The header metadata of an exported LoRA: kohya's `ss_*` keys (A1111 shows them on the Lora card, with the
//! tag frequencies, and tells SDXL LoRAs by `ss_base_model_version`), the Stability `modelspec.*` keys with
//! kohya's values for each family, and the full config so a file can be retrained from.

use std::collections::BTreeMap;

use serde_json::json;

use crate::config::TrainConfig;
use crate::data::Dataset;
use crate::lora::{NetworkDims, RankAlpha};
use crate::models::checkpoint::ModelFamily;
use crate::models::schedulers::PredictionType;

/// Facts about a run that are not in the config.
pub struct RunFacts<'a> {
    pub family: ModelFamily,
    pub prediction: PredictionType,
    /// The noise schedule was rescaled to zero terminal SNR.
    pub zero_terminal_snr: bool,
    pub dataset: &'a Dataset,
    pub steps: u64,
    pub epoch: u64,
    pub started_at: u64,
    pub finished_at: u64,
    /// The ranks and alphas in the exported file (which PiSSA doubles and DoRA folds).
    pub dims: NetworkDims,
    pub network_kind: &'static str,
    pub exactness: String,
}

/// Builds the string metadata of the exported file.
pub fn lora_metadata(config: &TrainConfig, facts: &RunFacts) -> BTreeMap<String, String> {
    let v2 = facts.family == ModelFamily::Sd2;
    let v_pred = facts.prediction == PredictionType::VPrediction;
    // kohya's names (`library/sai_model_spec.py`, `train_util.py`): an SDXL v-prediction fine-tune keeps
    // SDXL's base version and architecture, only `modelspec.prediction_type` says "v"; SDXL LoRAs name the
    // generative-models implementation, SD1/SD2 LoRAs diffusers.
    let (base_version, architecture, implementation) = match (facts.family, v_pred) {
        (ModelFamily::Sd1, _) => ("sd_v1", "stable-diffusion-v1/lora", "diffusers"),
        (ModelFamily::Sd2, false) => ("sd_v2", "stable-diffusion-v2-512/lora", "diffusers"),
        (ModelFamily::Sd2, true) => ("sd_v2_v", "stable-diffusion-v2-768-v/lora", "diffusers"),
        (ModelFamily::Sdxl, _) => (
            "sdxl_base_v1-0",
            "stable-diffusion-xl-v1-base/lora",
            "https://github.com/Stability-AI/generative-models",
        ),
    };
    let python_bool = |b: bool| if b { "True" } else { "False" }.to_string();
    let resolution = config.training_resolution();
    // kohya's `networks.lora` layout: the linear rank and alpha in their own keys, the convolutions' in the
    // arguments, as text (as sd-scripts passes `--network_args`). The file is a plain LoRA whatever was
    // trained, so no `algo` (the training method is `lora_studio.network_kind`).
    let linear = facts.dims.linear.unwrap_or(RankAlpha {
        rank: config.lora_rank as usize,
        alpha: config.lora_alpha as f64,
    });
    let mut network_args = serde_json::Map::new();
    if let Some(conv) = facts.dims.conv {
        network_args.insert("conv_dim".into(), json!(conv.rank.to_string()));
        network_args.insert("conv_alpha".into(), json!(alpha_text(conv.alpha)));
    }
    let base_name = config
        .base_model
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut m = BTreeMap::new();
    let mut put = |key: &str, value: String| {
        m.insert(key.to_string(), value);
    };
    put("ss_network_module", "networks.lora".into());
    put("ss_network_dim", linear.rank.to_string());
    put("ss_network_alpha", alpha_text(linear.alpha));
    put(
        "ss_network_args",
        serde_json::Value::Object(network_args).to_string(),
    );
    put("ss_base_model_version", base_version.into());
    put("ss_v2", python_bool(v2));
    put("ss_v_parameterization", python_bool(v_pred));
    put("ss_zero_terminal_snr", python_bool(facts.zero_terminal_snr));
    put("ss_output_name", config.output_name.clone());
    put("ss_sd_model_name", base_name);
    put("ss_resolution", format!("({resolution}, {resolution})"));
    put(
        "ss_num_train_images",
        facts.dataset.samples_per_epoch().to_string(),
    );
    put("ss_learning_rate", config.learning_rate.to_string());
    put("ss_unet_lr", config.unet_lr().to_string());
    put(
        "ss_text_encoder_lr",
        if config.train_text_encoder {
            config.text_encoder_lr().to_string()
        } else {
            "0".into()
        },
    );
    put("ss_num_epochs", facts.epoch.to_string());
    put("ss_epoch", facts.epoch.to_string());
    put("ss_steps", facts.steps.to_string());
    put(
        "ss_max_train_steps",
        config
            .max_train_steps
            .map_or("None".into(), |s| s.to_string()),
    );
    put("ss_batch_size_per_device", config.batch_size.to_string());
    put(
        "ss_total_batch_size",
        (config.batch_size * config.gradient_accumulation_steps).to_string(),
    );
    put(
        "ss_gradient_accumulation_steps",
        config.gradient_accumulation_steps.to_string(),
    );
    put("ss_lr_scheduler", serde_name(&config.lr_scheduler));
    put("ss_lr_warmup_steps", config.lr_warmup_steps.to_string());
    put("ss_optimizer", serde_name(&config.optimizer));
    put("ss_mixed_precision", serde_name(&config.mixed_precision));
    put(
        "ss_gradient_checkpointing",
        python_bool(config.gradient_checkpointing),
    );
    put("ss_max_grad_norm", config.max_grad_norm.to_string());
    put("ss_noise_offset", config.noise_offset.to_string());
    put(
        "ss_min_snr_gamma",
        config
            .min_snr_gamma
            .map_or("None".into(), |g| g.to_string()),
    );
    put("ss_clip_skip", config.clip_skip.to_string());
    put("ss_seed", config.seed.to_string());
    put("ss_cache_latents", python_bool(config.cache_latents));
    put("ss_shuffle_caption", python_bool(config.shuffle_caption));
    put("ss_keep_tokens", config.keep_tokens.to_string());
    put(
        "ss_caption_dropout_rate",
        config.caption_dropout_rate.to_string(),
    );
    put("ss_flip_aug", python_bool(config.flip_aug));
    put("ss_random_crop", python_bool(config.random_crop));
    put("ss_enable_bucket", python_bool(config.enable_bucket));
    let (min_bucket_side, max_bucket_side) = config.bucket_sides();
    put("ss_min_bucket_reso", min_bucket_side.to_string());
    put("ss_max_bucket_reso", max_bucket_side.to_string());
    put(
        "ss_bucket_no_upscale",
        python_bool(config.bucket_no_upscale),
    );
    put("ss_training_started_at", facts.started_at.to_string());
    put("ss_training_finished_at", facts.finished_at.to_string());
    put(
        "ss_session_id",
        (facts.started_at % 1_000_000_000).to_string(),
    );
    put("ss_tag_frequency", tag_frequency(facts.dataset).to_string());
    put("ss_dataset_dirs", dataset_dirs(facts.dataset).to_string());
    put("modelspec.sai_model_spec", "1.0.1".into());
    put("modelspec.architecture", architecture.into());
    put("modelspec.implementation", implementation.into());
    put("modelspec.title", config.output_name.clone());
    put("modelspec.resolution", format!("{resolution}x{resolution}"));
    put("modelspec.date", iso_date(facts.finished_at));
    put(
        "modelspec.prediction_type",
        if v_pred { "v" } else { "epsilon" }.into(),
    );
    if let Some(trigger) = &config.trigger_word {
        put("modelspec.trigger_phrase", trigger.clone());
    }
    put(
        "lora_studio.version",
        crate::build_info::LONG_VERSION.into(),
    );
    put("lora_studio.network_kind", facts.network_kind.into());
    put("lora_studio.exactness", facts.exactness.clone());
    put(
        "lora_studio.config",
        serde_json::to_string(config).unwrap_or_default(),
    );
    m
}

/// An alpha as the config wrote it: alphas are `f32` settings, so `0.1` and not its `f64` widening.
fn alpha_text(alpha: f64) -> String {
    (alpha as f32).to_string()
}

/// The serde name of a config enum (`cosine_with_restarts`).
fn serde_name<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_value(value)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

/// The folder name kohya uses as a dataset key (the dataset folder's own name for top-level images).
fn folder_key(dataset: &Dataset, folder: &str) -> String {
    if folder.is_empty() {
        dataset
            .root
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "dataset".into())
    } else {
        folder.to_string()
    }
}

/// `{folder: {tag: count}}` over the comma-separated, lower-cased caption tags.
pub fn tag_frequency(dataset: &Dataset) -> serde_json::Value {
    let mut frequency: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
    for item in &dataset.items {
        let folder = item
            .relative
            .parent()
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default();
        let counts = frequency.entry(folder_key(dataset, &folder)).or_default();
        for tag in item
            .caption
            .split(',')
            .map(|t| t.trim().to_lowercase())
            .filter(|t| !t.is_empty())
        {
            *counts.entry(tag).or_insert(0) += 1;
        }
    }
    json!(frequency)
}

fn dataset_dirs(dataset: &Dataset) -> serde_json::Value {
    let dirs: BTreeMap<String, serde_json::Value> = dataset
        .folders
        .iter()
        .map(|f| {
            (
                folder_key(dataset, &f.name),
                json!({ "n_repeats": f.repeats, "img_count": f.images }),
            )
        })
        .collect();
    json!(dirs)
}

/// `YYYY-MM-DDTHH:MM:SS` (UTC) from Unix seconds.
pub fn iso_date(seconds: u64) -> String {
    let days = (seconds / 86_400) as i64;
    let rest = seconds % 86_400;
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

#[cfg(test)]
mod tests {
    use super::iso_date;

    #[test]
    fn iso_dates() {
        assert_eq!(iso_date(0), "1970-01-01T00:00:00");
        assert_eq!(iso_date(1_795_000_000), "2026-11-18T11:06:40");
    }
}
