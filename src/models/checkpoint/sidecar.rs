//! Config files placed beside a single-file checkpoint, which override what its shapes imply:
//!
//! * `<name>.yaml` — the original (LDM) inference config, as AUTOMATIC1111 reads it (`v1-inference.yaml`,
//!   `v2-inference-v.yaml`): UNet and VAE architecture, noise schedule, `parameterization: "v"`, and which
//!   text encoder (OpenCLIP for SD2).
//!   A sgm config (SDXL's `sd_xl_base.yaml`, `sd_xl_v.yaml`) gives the prediction type (its denoiser's
//!   scaling) and the VAE's scale factor.
//! * `<name>.json` — diffusers-style configs in sections: `{"unet": {...}, "vae": {...}, "text_encoder": {...},
//!   "text_encoder_2": {...}, "scheduler": {...}}`, each the content of the matching diffusers/transformers
//!   `config.json`.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use yaml_rust2::{Yaml, YamlLoader};

use crate::models::ModelError;
use crate::models::clip::{ClipTextConfig, TextEncoder2Config};
use crate::models::schedulers::{PredictionType, SchedulerConfig};
use crate::models::unet::UNetConfig;
use crate::models::vae::VaeConfig;

/// Everything the sidecars say; `None` where they are silent.
#[derive(Debug, Default)]
pub struct SidecarConfig {
    pub unet: Option<UNetConfig>,
    pub vae: Option<VaeConfig>,
    pub text_encoder: Option<ClipTextConfig>,
    pub text_encoder_2: Option<TextEncoder2Config>,
    pub scheduler: Option<SchedulerConfig>,
    /// The YAML names OpenCLIP as the text encoder (an SD2 model).
    pub open_clip: Option<bool>,
    /// A sgm YAML's latent scale factor, for the VAE inferred from the shapes.
    pub vae_scaling_factor: Option<f64>,
    /// The files that were read.
    pub sources: Vec<PathBuf>,
}

/// Reads `<stem>.yaml` and `<stem>.json` beside `checkpoint`; the JSON wins where both speak.
pub fn read_sidecars(checkpoint: &Path) -> Result<SidecarConfig, ModelError> {
    let mut config = SidecarConfig::default();
    let yaml_path = checkpoint.with_extension("yaml");
    if yaml_path.is_file() {
        let text = read_text(&yaml_path)?;
        apply_ldm_yaml(&mut config, &text).map_err(|reason| {
            ModelError::Config(format!(
                "{} is not a usable LDM config: {reason}",
                yaml_path.display()
            ))
        })?;
        config.sources.push(yaml_path);
    }
    let json_path = checkpoint.with_extension("json");
    if json_path.is_file() {
        let text = read_text(&json_path)?;
        apply_json(&mut config, &text).map_err(|reason| {
            ModelError::Config(format!(
                "{} is not a usable model config: {reason}",
                json_path.display()
            ))
        })?;
        config.sources.push(json_path);
    }
    Ok(config)
}

fn read_text(path: &Path) -> Result<String, ModelError> {
    std::fs::read_to_string(path).map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonSidecar {
    unet: Option<serde_json::Value>,
    vae: Option<serde_json::Value>,
    text_encoder: Option<serde_json::Value>,
    text_encoder_2: Option<serde_json::Value>,
    scheduler: Option<serde_json::Value>,
}

fn apply_json(config: &mut SidecarConfig, text: &str) -> Result<(), String> {
    let sidecar: JsonSidecar = serde_json::from_str(text).map_err(|e| e.to_string())?;
    if let Some(unet) = sidecar.unet {
        config.unet =
            Some(UNetConfig::from_diffusers_json(&unet.to_string()).map_err(|e| e.to_string())?);
    }
    if let Some(vae) = sidecar.vae {
        config.vae =
            Some(VaeConfig::from_diffusers_json(&vae.to_string()).map_err(|e| e.to_string())?);
    }
    if let Some(text_encoder) = sidecar.text_encoder {
        config.text_encoder = Some(
            ClipTextConfig::from_transformers_json(&text_encoder.to_string())
                .map_err(|e| e.to_string())?,
        );
    }
    if let Some(text_encoder) = sidecar.text_encoder_2 {
        config.text_encoder_2 = Some(
            TextEncoder2Config::from_transformers_json(&text_encoder.to_string())
                .map_err(|e| e.to_string())?,
        );
    }
    if let Some(scheduler) = sidecar.scheduler {
        config.scheduler = Some(
            SchedulerConfig::from_diffusers_json(&scheduler.to_string())
                .map_err(|e| e.to_string())?,
        );
    }
    Ok(())
}

/// A YAML number (integer or real) as f64.
fn number(y: &Yaml) -> Option<f64> {
    match y {
        Yaml::Integer(i) => Some(*i as f64),
        Yaml::Real(_) => y.as_f64(),
        _ => None,
    }
}

fn usize_of(y: &Yaml, what: &str) -> Result<usize, String> {
    y.as_i64()
        .and_then(|v| usize::try_from(v).ok())
        .ok_or_else(|| format!("`{what}` is missing or not a whole number"))
}

fn usize_list(y: &Yaml, what: &str) -> Result<Vec<usize>, String> {
    y.as_vec()
        .ok_or_else(|| format!("`{what}` is missing or not a list"))?
        .iter()
        .map(|v| usize_of(v, what))
        .collect()
}

fn apply_ldm_yaml(config: &mut SidecarConfig, text: &str) -> Result<(), String> {
    let docs = YamlLoader::load_from_str(text).map_err(|e| e.to_string())?;
    let doc = docs.first().ok_or("the file is empty")?;
    let params = &doc["model"]["params"];
    if params.is_badvalue() {
        return Err("it has no `model.params` section".to_string());
    }

    if !params["denoiser_config"].is_badvalue() {
        apply_sgm_yaml(config, params);
        return Ok(());
    }
    let mut scheduler = SchedulerConfig::default();
    if let Some(start) = number(&params["linear_start"]) {
        scheduler.beta_start = start;
    }
    if let Some(end) = number(&params["linear_end"]) {
        scheduler.beta_end = end;
    }
    if let Some(steps) = params["timesteps"].as_i64() {
        scheduler.num_train_timesteps =
            usize::try_from(steps).map_err(|_| "`timesteps` is negative")?;
    }
    scheduler.prediction_type = match params["parameterization"].as_str() {
        Some("v") => PredictionType::VPrediction,
        Some("eps") | None => PredictionType::Epsilon,
        Some(other) => return Err(format!("the parameterization `{other}` is not supported")),
    };
    config.scheduler = Some(scheduler.clone());

    let unet = &params["unet_config"]["params"];
    if !unet.is_badvalue() {
        let mut unet = unet_from_ldm(unet)?;
        if scheduler.prediction_type == PredictionType::VPrediction {
            unet.sample_size = 96;
        }
        config.unet = Some(unet);
    }
    let first_stage = &params["first_stage_config"]["params"];
    if !first_stage.is_badvalue() {
        let dd = &first_stage["ddconfig"];
        let ch = usize_of(&dd["ch"], "ddconfig.ch")?;
        let vae = VaeConfig {
            in_channels: usize_of(&dd["in_channels"], "ddconfig.in_channels")?,
            out_channels: usize_of(&dd["out_ch"], "ddconfig.out_ch")?,
            block_out_channels: usize_list(&dd["ch_mult"], "ddconfig.ch_mult")?
                .iter()
                .map(|m| ch * m)
                .collect(),
            layers_per_block: usize_of(&dd["num_res_blocks"], "ddconfig.num_res_blocks")?,
            latent_channels: usize_of(&dd["z_channels"], "ddconfig.z_channels")?,
            norm_num_groups: 32,
            scaling_factor: number(&params["scale_factor"]).unwrap_or(0.18215),
            force_upcast: true,
        };
        vae.validate().map_err(|e| e.to_string())?;
        config.vae = Some(vae);
    }
    if let Some(target) = params["cond_stage_config"]["target"].as_str() {
        config.open_clip = Some(target.contains("OpenCLIP"));
    }
    Ok(())
}

/// A sgm (SDXL) config: the prediction type from the denoiser's scaling (`VScaling` is v-prediction) and the
/// VAE's scale factor, applied by the caller to the VAE inferred from the shapes. The architecture comes from
/// the shapes, as SDXL's is fixed.
fn apply_sgm_yaml(config: &mut SidecarConfig, params: &Yaml) {
    let scaling = params["denoiser_config"]["params"]["scaling_config"]["target"]
        .as_str()
        .unwrap_or("");
    config.scheduler = Some(SchedulerConfig {
        prediction_type: if scaling.ends_with("VScaling") {
            PredictionType::VPrediction
        } else {
            PredictionType::Epsilon
        },
        ..SchedulerConfig::default()
    });
    config.vae_scaling_factor = number(&params["first_stage_config"]["params"]["scale_factor"])
        .or_else(|| number(&params["scale_factor"]));
}

/// Builds the UNet config from an LDM `UNetModel`'s params.
fn unet_from_ldm(p: &Yaml) -> Result<UNetConfig, String> {
    let model_channels = usize_of(&p["model_channels"], "model_channels")?;
    let channel_mult = usize_list(&p["channel_mult"], "channel_mult")?;
    let attention_resolutions = usize_list(&p["attention_resolutions"], "attention_resolutions")?;
    let levels = channel_mult.len();
    let block_out_channels: Vec<usize> = channel_mult.iter().map(|m| model_channels * m).collect();
    let heads_fixed = p["num_heads"].as_i64().filter(|&h| h > 0);
    let head_channels = p["num_head_channels"].as_i64().filter(|&c| c > 0);
    let attention_heads = block_out_channels
        .iter()
        .map(|&c| match (heads_fixed, head_channels) {
            (Some(h), _) => Ok(h as usize),
            (None, Some(dim)) => Ok(c / dim as usize),
            (None, None) => Err("neither `num_heads` nor `num_head_channels` is given".to_string()),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let depth = match &p["transformer_depth"] {
        Yaml::Integer(d) => vec![*d as usize; levels],
        Yaml::Array(_) => usize_list(&p["transformer_depth"], "transformer_depth")?,
        _ => vec![1; levels],
    };
    // Level i works at downsampling factor 2^i; attention is used where that factor is listed.
    let down_attention: Vec<bool> = (0..levels)
        .map(|i| attention_resolutions.contains(&(1 << i)))
        .collect();
    let up_attention = down_attention.iter().rev().copied().collect();
    let config = UNetConfig {
        in_channels: usize_of(&p["in_channels"], "in_channels")?,
        out_channels: usize_of(&p["out_channels"], "out_channels")?,
        block_out_channels,
        down_attention,
        up_attention,
        layers_per_block: usize_of(&p["num_res_blocks"], "num_res_blocks")?,
        transformer_layers_per_block: depth,
        attention_heads,
        cross_attention_dim: usize_of(&p["context_dim"], "context_dim")?,
        use_linear_projection: p["use_linear_in_transformer"].as_bool().unwrap_or(false),
        norm_num_groups: 32,
        norm_eps: 1e-5,
        // LDM's `image_size` is not the latent size; the caller sets it from the parameterization.
        sample_size: 64,
        addition: None,
    };
    config.validate().map_err(|e| e.to_string())?;
    Ok(config)
}
