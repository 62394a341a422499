//! `lora-studio inspect FILE`: what a file is, from its header alone.

use std::path::PathBuf;

use clap::Args;

use crate::models::checkpoint::{ModelConfig, ModelFamily, PredictionOrigin};
use crate::models::inspect::{CheckpointReport, FileReport, LoraReport, inspect};
use crate::models::lm_inspect::{LanguageModelReport, LmAdapterReport};

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// A checkpoint (.safetensors/.ckpt), a diffusers model folder, a LoRA file, a language model folder, a
    /// PEFT adapter folder or a GGUF file.
    pub path: PathBuf,
}

pub fn run(args: InspectArgs) -> anyhow::Result<()> {
    match inspect(&args.path)? {
        FileReport::Checkpoint(report) => print_checkpoint(&report),
        FileReport::UnsupportedCheckpoint { path, what } => println!("{}: {what}", path.display()),
        FileReport::Lora(report) => print_lora(&report),
        FileReport::LanguageModel(report) => print_language_model(&report),
        FileReport::LmAdapter(report) => print_lm_adapter(&report),
        FileReport::GgufModel(report) => println!(
            "{}: llama.cpp model (GGUF), architecture {}{}, {} tensors",
            report.path.display(),
            report.architecture,
            report
                .name
                .as_ref()
                .map(|n| format!(", named {n}"))
                .unwrap_or_default(),
            report.tensors
        ),
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

/// `n` as `1.2M`, `494M`, `7.6B`.
fn short_count(n: usize) -> String {
    match n {
        0..1_000_000 => format!("{:.1}K", n as f64 / 1e3),
        1_000_000..1_000_000_000 => format!("{:.1}M", n as f64 / 1e6),
        _ => format!("{:.1}B", n as f64 / 1e9),
    }
}

fn joined<T: ToString>(items: impl IntoIterator<Item = T>) -> String {
    items
        .into_iter()
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

fn print_language_model(report: &LanguageModelReport) {
    let config = &report.config;
    println!(
        "{}: {} language model, {} parameters",
        report.path.display(),
        config.architecture.label(),
        short_count(report.parameters)
    );
    println!(
        "  {} layers, hidden {}, {} attention heads ({} key/value), head size {}, MLP {}, vocabulary {}{}",
        config.num_hidden_layers,
        config.hidden_size,
        config.num_attention_heads,
        config.num_key_value_heads,
        config.head_dim,
        config.intermediate_size,
        config.vocab_size,
        if config.tie_word_embeddings {
            ", tied embeddings"
        } else {
            ""
        }
    );
    let dtypes = joined(report.dtypes.iter().map(|(d, n)| format!("{n} {d}")));
    println!("  tensors: {dtypes} in {} file(s)", report.weight_files);
    if !report.has_tokenizer {
        println!(
            "  no tokenizer.json/tokenizer_config.json: it cannot chat or train until they are added"
        );
    }
}

fn print_lm_adapter(report: &LmAdapterReport) {
    let base = report
        .base
        .as_deref()
        .unwrap_or("a base model it does not name");
    println!("{}: {} for {base}", report.path.display(), report.format);
    if let Some(architecture) = &report.architecture {
        println!("  architecture: {architecture}");
    }
    println!(
        "  modules: {} ({})",
        report.modules,
        joined(&report.targets)
    );
    println!("  rank: {}", joined(&report.ranks));
    println!("  alpha: {}", joined(&report.alphas));
    let variants: Vec<&str> = [(report.use_rslora, "rsLoRA"), (report.use_dora, "DoRA")]
        .iter()
        .filter_map(|(on, name)| on.then_some(*name))
        .collect();
    if !variants.is_empty() {
        println!("  {}", variants.join(", "));
    }
    let dtypes = joined(report.dtypes.iter().map(|(d, n)| format!("{n} {d}")));
    println!("  tensors: {dtypes}");
}
