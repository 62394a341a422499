//! A rough memory and time estimate for a training step, shown before a run starts. It scales numbers
//! measured for SD1.5 (UNet with a rank-16 LoRA, batch 1, 256 and 512 px, `lora-studio bench`) with the
//! pixel count and batch size, and adds the adapters' own memory, which grows with the rank. It knows
//! nothing about the model actually chosen.

use crate::config::{OptimizerKind, TrainConfig};

/// What a step is expected to need.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepEstimate {
    pub memory_gib: f64,
    pub seconds: f64,
}

/// Measured on a 2-core CPU (f32): 3.4 GiB of UNet weights plus the text encoder and VAE, activations of
/// about 0.75 GiB per 256x256 image (4.5 GiB peak at 256 px, 6.5 GiB at 512 px) and 2.8 s per 256 px step
/// (10.6-11.2 s at 512 px: the time grows with the pixel count). The weights include the rank-16 adapters
/// the measurement trained; [`adapter_gib`] adds those of the chosen rank instead.
const CPU_WEIGHTS_WITH_RANK_16_GIB: f64 = 4.3;
const MEASURED_RANK: u32 = 16;
const CPU_ACTIVATIONS_GIB_256: f64 = 0.75;
const CPU_SECONDS_256: f64 = 2.8;
/// Gradient checkpointing measured at 256 and 512 px: half the activations, 1.5-1.6x the time.
const CHECKPOINTING_MEMORY: f64 = 0.5;
const CHECKPOINTING_TIME: f64 = 1.55;
/// Assumed, not measured: a GPU step in bf16 is well over an order of magnitude faster, with half the
/// memory per value (the adapters stay f32).
const GPU_SPEEDUP: f64 = 40.0;

/// Adapter parameters per unit of rank on SD1.5 with kohya's targets: the UNet's attention, feed-forward and
/// projection layers; the text encoder's attention and MLP; LoCon's 3x3 convolutions, resamplers,
/// time embeddings and shortcuts (summed over the layer shapes of the real model).
const UNET_PARAMS_PER_RANK: f64 = 423_936.0;
const TEXT_ENCODER_PARAMS_PER_RANK: f64 = 165_888.0;
const CONV_PARAMS_PER_RANK: f64 = 626_880.0;

/// Bytes an f32 adapter parameter holds during training: its value and gradient, plus AdamW's two moments
/// (Adafactor's factored moments are a few numbers per row and column: left out).
fn bytes_per_adapter_param(optimizer: OptimizerKind) -> f64 {
    match optimizer {
        OptimizerKind::AdamW => 16.0,
        OptimizerKind::Adafactor => 8.0,
    }
}

/// The memory the adapters of `config` take while training, at rank `rank` for the linear layers.
fn adapter_gib(config: &TrainConfig, rank: u32) -> f64 {
    let mut params = UNET_PARAMS_PER_RANK * rank as f64;
    if config.train_text_encoder {
        params += TEXT_ENCODER_PARAMS_PER_RANK * rank as f64;
    }
    if config.conv_lora {
        params += CONV_PARAMS_PER_RANK * config.conv_rank() as f64;
    }
    params * bytes_per_adapter_param(config.optimizer) / GIB
}

const GIB: f64 = (1u64 << 30) as f64;

/// The estimate for `config` on a CPU (`on_gpu` false) or a GPU.
pub fn estimate(config: &TrainConfig, on_gpu: bool) -> StepEstimate {
    let pixels = (config.training_resolution() as f64 / 256.0).powi(2) * config.batch_size as f64;
    let (memory_factor, time_factor) = if config.gradient_checkpointing {
        (CHECKPOINTING_MEMORY, CHECKPOINTING_TIME)
    } else {
        (1.0, 1.0)
    };
    let measured_adapters =
        UNET_PARAMS_PER_RANK * MEASURED_RANK as f64 * bytes_per_adapter_param(OptimizerKind::AdamW)
            / GIB;
    let weights = CPU_WEIGHTS_WITH_RANK_16_GIB - measured_adapters;
    let (precision_factor, seconds) = if on_gpu {
        (0.5, CPU_SECONDS_256 / GPU_SPEEDUP)
    } else {
        (1.0, CPU_SECONDS_256)
    };
    StepEstimate {
        memory_gib: (weights + CPU_ACTIVATIONS_GIB_256 * pixels * memory_factor) * precision_factor
            + adapter_gib(config, config.lora_rank),
        seconds: seconds * pixels * time_factor * config.gradient_accumulation_steps as f64,
    }
}

#[cfg(test)]
mod tests {
    use super::{StepEstimate, estimate};
    use crate::config::{OptimizerKind, TrainConfig};

    fn base() -> TrainConfig {
        TrainConfig {
            resolution: Some(256),
            batch_size: 1,
            lora_rank: 16,
            gradient_accumulation_steps: 1,
            gradient_checkpointing: false,
            train_text_encoder: false,
            conv_lora: false,
            optimizer: OptimizerKind::AdamW,
            ..TrainConfig::default()
        }
    }

    fn cpu(change: impl FnOnce(&mut TrainConfig)) -> StepEstimate {
        let mut config = base();
        change(&mut config);
        estimate(&config, false)
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1.0)
    }

    /// Adapter parameters per rank, counted from the reference implementation's listing of SD1.5's kohya
    /// targets (independent of the estimate's constants): `(unet, text_encoder, conv)`.
    fn params_per_rank_from_manifest() -> (f64, f64, f64) {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/manifests/sd15.json"
        );
        let manifest: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let count = |set: &str, prefix: &str| -> f64 {
            let targets = manifest["kohya_targets"][set].as_object().unwrap();
            let mut params = 0u64;
            let mut rank = 0u64;
            for (name, shapes) in targets.iter().filter(|(n, _)| n.starts_with(prefix)) {
                let dims = |key: &str| -> Vec<u64> {
                    shapes[key]
                        .as_array()
                        .unwrap_or_else(|| panic!("{name}: no {key}"))
                        .iter()
                        .map(|d| d.as_u64().unwrap())
                        .collect()
                };
                let (down, up) = (dims("down"), dims("up"));
                rank = down[0];
                params += down.iter().product::<u64>() + up.iter().product::<u64>();
            }
            params as f64 / rank as f64
        };
        (
            count("default", "lora_unet"),
            count("default", "lora_te"),
            count("conv", "lora_unet"),
        )
    }

    #[test]
    fn activations_grow_with_the_pixel_count_and_the_batch() {
        let at_256 = cpu(|_| {});
        let at_512 = cpu(|c| c.resolution = Some(512));
        let batch_2 = cpu(|c| c.batch_size = 2);
        let batch_4_at_512 = cpu(|c| (c.batch_size, c.resolution) = (4, Some(512)));
        // What one more 256x256 image adds is the same however it is added; 512 px is four of them.
        let one_image = batch_2.memory_gib - at_256.memory_gib;
        assert!(
            one_image > 0.1 && one_image < 2.0,
            "{one_image} GiB per image"
        );
        assert!(close(
            at_512.memory_gib - at_256.memory_gib,
            3.0 * one_image
        ));
        assert!(close(
            batch_4_at_512.memory_gib - at_256.memory_gib,
            15.0 * one_image
        ));
        // Time is proportional to the pixels a step computes, accumulation steps included.
        assert!(close(at_512.seconds, 4.0 * at_256.seconds));
        assert!(close(batch_2.seconds, 2.0 * at_256.seconds));
        let accumulated = cpu(|c| c.gradient_accumulation_steps = 3);
        assert!(close(accumulated.seconds, 3.0 * at_256.seconds));
        assert!(close(accumulated.memory_gib, at_256.memory_gib));
    }

    #[test]
    fn the_adapters_memory_follows_sd15s_layer_shapes() {
        let (unet, text_encoder, conv) = params_per_rank_from_manifest();
        let gib = (1u64 << 30) as f64;
        // AdamW holds value, gradient and two moments: 16 bytes per f32 parameter.
        let rank_16 = cpu(|_| {});
        let rank_48 = cpu(|c| c.lora_rank = 48);
        assert!(close(
            rank_48.memory_gib - rank_16.memory_gib,
            32.0 * unet * 16.0 / gib
        ));
        // The text encoder's adapters count only when it trains, the convolutions' only with LoCon.
        let with_text_encoder = cpu(|c| c.train_text_encoder = true);
        assert!(close(
            with_text_encoder.memory_gib - rank_16.memory_gib,
            16.0 * text_encoder * 16.0 / gib
        ));
        let locon = cpu(|c| (c.conv_lora, c.conv_rank) = (true, Some(8)));
        assert!(close(
            locon.memory_gib - rank_16.memory_gib,
            8.0 * conv * 16.0 / gib
        ));
        // Adafactor keeps no moments: half the bytes of the adapters.
        let adafactor = cpu(|c| c.optimizer = OptimizerKind::Adafactor);
        assert!(close(
            rank_16.memory_gib - adafactor.memory_gib,
            16.0 * unet * 8.0 / gib
        ));
        // Rank 128 on the UNet alone is about 0.8 GiB of adapter state: worth showing before a run.
        let rank_128 = cpu(|c| c.lora_rank = 128);
        assert!(rank_128.memory_gib - rank_16.memory_gib > 0.7);
    }

    #[test]
    fn the_cpu_estimate_is_near_the_benchmarked_steps() {
        // `lora-studio bench` (README "Performance"): 2.84 s and 4.15 GiB peak at 256 px, 10.56 s and
        // 6.15 GiB at 512 px for the UNet alone; a run also holds the text encoder and VAE (0.8 GiB in f32).
        let within = |estimated: f64, measured: f64, share: f64| {
            (estimated - measured).abs() <= share * measured
        };
        for (resolution, seconds, unet_gib) in [(256, 2.84, 4.15), (512, 10.56, 6.15)] {
            let step = cpu(|c| c.resolution = Some(resolution));
            assert!(
                within(step.seconds, seconds, 0.15),
                "{resolution} px: {step:?}"
            );
            assert!(
                within(step.memory_gib, unet_gib + 0.8, 0.15),
                "{resolution} px: {step:?}"
            );
        }
    }

    #[test]
    fn checkpointing_and_a_gpu_trade_as_described() {
        let plain = cpu(|c| c.resolution = Some(512));
        let checkpointed = cpu(|c| (c.resolution, c.gradient_checkpointing) = (Some(512), true));
        assert!(checkpointed.memory_gib < plain.memory_gib && checkpointed.seconds > plain.seconds);
        let gpu = estimate(
            &TrainConfig {
                resolution: Some(512),
                ..base()
            },
            true,
        );
        assert!(gpu.memory_gib < plain.memory_gib && gpu.seconds < plain.seconds / 10.0);
    }
}
