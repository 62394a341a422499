//! `lora-studio inspect FILE`: what a file is, from its header alone.

use std::path::PathBuf;

use clap::Args;

use crate::models::checkpoint::{ModelConfig, ModelFamily, PredictionOrigin};
use crate::models::inspect::{CheckpointReport, FileReport, LoraReport, inspect};

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// A checkpoint (.safetensors/.ckpt), a diffusers model folder, or a LoRA file.
    pub path: PathBuf,
}

pub fn run(args: InspectArgs) -> anyhow::Result<()> {
    match inspect(&args.path)? {
        FileReport::Checkpoint(report) => print_checkpoint(&report),
        FileReport::UnsupportedCheckpoint { path, what } => println!("{}: {what}", path.display()),
        FileReport::Lora(report) => print_lora(&report),
        FileReport::Unknown {
            path,
            tensors,
            first_keys,
        } => {
            println!(
                "{}: not a Stable Diffusion model or LoRA ({tensors} tensors)",
                path.display()
            );
            if !first_keys.is_empty() {
                println!("  first tensors: {}", first_keys.join(", "));
            }
        }
    }
    Ok(())
}

fn print_checkpoint(report: &CheckpointReport) {
    let ModelConfig {
        family,
        unet,
        vae,
        text_encoder,
        text_encoder_2,
        scheduler,
        prediction_origin,
        ..
    } = &report.config;
    let kind = match (family, prediction_origin) {
        (ModelFamily::Sdxl, PredictionOrigin::Marker) => "v-prediction fine-tune",
        _ => "base model",
    };
    println!(
        "{}: {} {kind}, {}",
        report.path.display(),
        family.label(),
        report.layout
    );
    if report.tensors > 0 {
        let dtypes: Vec<String> = report
            .dtypes
            .iter()
            .map(|(d, n)| format!("{n} {d}"))
            .collect();
        println!("  tensors: {} ({})", report.tensors, dtypes.join(", "));
    }
    println!(
        "  UNet: channels {:?}, {} layers per block, heads {:?}, cross-attention {}, {} projections",
        unet.block_out_channels,
        unet.layers_per_block,
        unet.attention_heads,
        unet.cross_attention_dim,
        if unet.use_linear_projection {
            "linear"
        } else {
            "1x1 conv"
        }
    );
    println!(
        "  VAE: channels {:?}, {} latent channels, scaling factor {}",
        vae.block_out_channels, vae.latent_channels, vae.scaling_factor
    );
    match text_encoder_2 {
        None => println!(
            "  text encoder: {} layers used, width {}, {} heads",
            text_encoder.num_hidden_layers,
            text_encoder.hidden_size,
            text_encoder.num_attention_heads
        ),
        Some(second) => println!(
            "  text encoders: {} layers, width {}, {} heads (penultimate layer used); {} layers, width {}, {} \
             heads, pooled projection {} (penultimate layer and pooled output used)",
            text_encoder.num_hidden_layers,
            text_encoder.hidden_size,
            text_encoder.num_attention_heads,
            second.text.num_hidden_layers,
            second.text.hidden_size,
            second.text.num_attention_heads,
            second.projection_dim
        ),
    }
    match prediction_origin {
        PredictionOrigin::TestPrediction => println!(
            "  prediction: decided when the model is loaded, by a test prediction (an SD2 file without a \
             config may be SD 2.x-base, epsilon, or SD 2.x 768, v_prediction)"
        ),
        PredictionOrigin::Marker => println!(
            "  prediction: {} (`v_pred` marker){}",
            scheduler.prediction_type.as_str(),
            if scheduler.rescale_betas_zero_snr {
                ", zero terminal SNR (`ztsnr` marker)"
            } else {
                ""
            }
        ),
        _ => println!("  prediction: {}", scheduler.prediction_type.as_str()),
    }
    if report.has_ema {
        println!("  also stores EMA weights (model_ema.*), which are not used");
    }
    for file in &report.config_files {
        println!("  config read from {}", file.display());
    }
}

fn print_lora(report: &LoraReport) {
    println!(
        "{}: {} LoRA for {}",
        report.path.display(),
        report.format,
        report.base
    );
    println!(
        "  modules: {} UNet, {} text encoder ({} convolutional, LoCon)",
        report.unet_modules, report.text_encoder_modules, report.conv_modules
    );
    let ranks: Vec<String> = report.ranks.iter().map(usize::to_string).collect();
    println!("  rank: {}", ranks.join(", "));
    if !report.alphas.is_empty() {
        println!(
            "  alpha: {}",
            report.alphas.iter().cloned().collect::<Vec<_>>().join(", ")
        );
    }
    let dtypes: Vec<String> = report
        .dtypes
        .iter()
        .map(|(d, n)| format!("{n} {d}"))
        .collect();
    println!("  tensors: {}", dtypes.join(", "));
    if report.has_dora {
        println!("  contains DoRA magnitudes (dora_scale)");
    }
    for (key, value) in &report.metadata {
        let shown: String = value.chars().take(120).collect();
        let ellipsis = if value.chars().count() > 120 {
            "…"
        } else {
            ""
        };
        println!("  {key}: {shown}{ellipsis}");
    }
}
