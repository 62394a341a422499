//! A rough memory and time estimate for a training step, shown before a run starts. It scales numbers
//! measured for SD1.5 (UNet with a rank-16 LoRA, batch 1, 256 and 512 px, `lora-studio bench`) with the
//! pixel count and batch size, and adds the adapters' own memory, which grows with the rank. SDXL's numbers
//! are SD1.5's scaled by what its UNet computes and keeps for the backward pass per pixel (counted, not
//! timed); its weights are its parameter count. It knows the family of the base model, nothing else about it.
//! A chat model's step is estimated from its parameter count and the tokens of a step, scaling what
//! `lora-studio bench --arch qwen2-0.5b` measured. A CPU run in bf16 on a processor with bf16 products is scaled by
//! what `bench --mixed-precision bf16` measured against f32 (weights in bf16, faster products).

use crate::config::{MixedPrecision, OptimizerKind, SD_RESOLUTION, SDXL_RESOLUTION, TrainConfig};
use crate::messages::BaseFamily;

/// What a step runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Processor {
    Gpu,
    /// The CPU; `bf16_products` where it has bf16 products (AMX or AVX-512 BF16), which a run with `mixed_precision = "bf16"`
    /// uses (frozen weights stored in bf16, products about twice as fast).
    Cpu {
        bf16_products: bool,
    },
}

impl Processor {
    /// Whether a run of `config` on this processor takes the CPU's bf16 products.
    fn cpu_bf16(self, config: &TrainConfig) -> bool {
        self == Processor::Cpu {
            bf16_products: true,
        } && config.mixed_precision == MixedPrecision::Bf16
    }
}

/// What a step is expected to need.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepEstimate {
    pub memory_gib: f64,
    pub seconds: f64,
}

/// What a family of models needs, on a 2-core CPU in f32, batch 1.
struct ModelSizes {
    /// The frozen weights: UNet, text encoders and VAE.
    weights_gib: f64,
    /// Activations kept for the backward pass per 256x256 pixels.
    activations_gib_256: f64,
    /// Time per 256x256 pixels.
    seconds_256: f64,
    /// Adapter parameters per unit of rank with kohya's targets: the UNet's attention, feed-forward and
    /// projection layers; the text encoders' attention and MLP; LoCon's convolutions (3x3, resamplers,
    /// time embeddings and shortcuts), summed over the layer shapes of the real model.
    unet_params_per_rank: f64,
    text_encoder_params_per_rank: f64,
    conv_params_per_rank: f64,
}

const GIB: f64 = (1u64 << 30) as f64;

/// Measured on a 2-core CPU (f32): 3.4 GiB of UNet weights plus the text encoder and VAE, activations of
/// about 0.75 GiB per 256x256 image (4.5 GiB peak at 256 px, 6.5 GiB at 512 px) and 2.8 s per 256 px step
/// (10.6-11.2 s at 512 px: the time grows with the pixel count). The weights measured include the rank-16
/// adapters the measurement trained (AdamW, 16 bytes a parameter); [`adapter_gib`] adds those of the chosen
/// rank instead.
const SD15: ModelSizes = ModelSizes {
    weights_gib: 4.3 - 423_936.0 * 16.0 * 16.0 / GIB,
    activations_gib_256: 0.75,
    seconds_256: 2.8,
    unet_params_per_rank: 423_936.0,
    text_encoder_params_per_rank: 165_888.0,
    conv_params_per_rank: 626_880.0,
};

/// SDXL 1.0: 2,567,463,684 UNet, 123,060,480 + 694,659,840 text-encoder and 83,653,863 VAE parameters in
/// f32. Per pixel at 1024 px its UNet's forward pass does 2.35x the operations of SD1.5's at 256 px (6,761
/// against 180 GFLOP for 16x the pixels) and keeps 1.81x the activations for the backward pass (adapters on
/// every linear layer, attention probabilities left out as the project's attention keeps none), counted
/// with PyTorch's `FlopCounterMode` and saved-tensor hooks on diffusers' UNets of both configurations
/// (`python bench/model_sizes.py`).
const SDXL: ModelSizes = ModelSizes {
    weights_gib: (2_567_463_684.0 + 123_060_480.0 + 694_659_840.0 + 83_653_863.0) * 4.0 / GIB,
    activations_gib_256: SD15.activations_gib_256 * 1.81,
    seconds_256: SD15.seconds_256 * 2.35,
    unet_params_per_rank: 2_659_840.0,
    text_encoder_params_per_rank: 903_168.0,
    conv_params_per_rank: 414_400.0,
};

fn sizes(family: BaseFamily) -> &'static ModelSizes {
    match family {
        BaseFamily::Sdxl => &SDXL,
        BaseFamily::Sd | BaseFamily::Language => &SD15,
    }
}

/// Qwen2.5-0.5B, the chat model the numbers below were measured on: its parameters.
pub const MEASURED_CHAT_PARAMETERS: f64 = 494_032_768.0;
/// Measured on a 2-core CPU in f32 (`bench --arch qwen2-0.5b --seq-len 512`, batch 1, every linear layer
/// adapted at rank 16): 21.8 tokens/s, 7.19 GiB at the peak.
const CHAT_TOKENS_PER_SECOND: f64 = 21.8;
/// What the peak memory above holds per token beside the weights and adapters: the logits and their
/// gradient (151,936 f32 values each) and the decoder layers' activations.
const CHAT_LOGITS_MIB_PER_TOKEN: f64 = 1.16;
const CHAT_LAYERS_MIB_PER_TOKEN: f64 = 9.3;
/// Adapter parameters per unit of rank on every linear layer of Qwen2.5-0.5B (8,798,208 at rank 16).
const CHAT_ADAPTER_PARAMS_PER_RANK: f64 = 549_888.0;
/// Assumed, not measured: gradient checkpointing per decoder layer keeps each layer's input and one
/// layer's activations at a time, a tenth of the layers' activations, for a third more time.
const CHAT_CHECKPOINTING_MEMORY: f64 = 0.1;
const CHAT_CHECKPOINTING_TIME: f64 = 1.33;

/// The estimate for `config` on a chat model of `parameters`, on a CPU or a GPU: its time and memory
/// scale with the parameters (time linearly; activations and adapters with their 2/3 power, as layers
/// grow in width and depth) and with the tokens of a step (`batch_size · max_seq_length` per
/// micro-batch: packing fills the rows).
pub fn estimate_chat(config: &TrainConfig, processor: Processor, parameters: f64) -> StepEstimate {
    let scale = parameters / MEASURED_CHAT_PARAMETERS;
    let width_scale = scale.powf(2.0 / 3.0);
    let tokens = (config.batch_size * config.max_seq_length) as f64;
    let (checkpoint_memory, checkpoint_time) = if config.gradient_checkpointing {
        (CHAT_CHECKPOINTING_MEMORY, CHAT_CHECKPOINTING_TIME)
    } else {
        (1.0, 1.0)
    };
    let (bytes_per_value, weight_bytes, speedup) = if processor == Processor::Gpu {
        (2.0, 2.0, GPU_SPEEDUP)
    } else if processor.cpu_bf16(config) {
        (4.0, CPU_BF16_CHAT_WEIGHT_BYTES, CPU_BF16_CHAT_SPEEDUP)
    } else {
        (4.0, 4.0, 1.0)
    };
    let mib_per_token = (CHAT_LAYERS_MIB_PER_TOKEN * width_scale * checkpoint_memory
        + CHAT_LOGITS_MIB_PER_TOKEN)
        * bytes_per_value
        / 4.0;
    let adapters = CHAT_ADAPTER_PARAMS_PER_RANK * width_scale * config.lora_rank as f64;
    StepEstimate {
        memory_gib: parameters * weight_bytes / GIB
            + tokens * mib_per_token / 1024.0
            + adapters * bytes_per_adapter_param(config.optimizer) / GIB,
        seconds: tokens * scale * checkpoint_time / (CHAT_TOKENS_PER_SECOND * speedup)
            * config.gradient_accumulation_steps as f64,
    }
}

/// The resolution a run trains at when none is set, for a base of `family`.
pub fn native_resolution(family: BaseFamily) -> u32 {
    match family {
        BaseFamily::Sdxl => SDXL_RESOLUTION,
        BaseFamily::Sd | BaseFamily::Language => SD_RESOLUTION,
    }
}

/// Gradient checkpointing measured at 256 and 512 px: half the activations, 1.5-1.6x the time.
const CHECKPOINTING_MEMORY: f64 = 0.5;
const CHECKPOINTING_TIME: f64 = 1.55;
/// Assumed, not measured: a GPU step in bf16 is well over an order of magnitude faster, with half the
/// memory per value (the adapters stay f32).
const GPU_SPEEDUP: f64 = 40.0;
/// A CPU step in bf16 products against f32, measured (`bench --mixed-precision bf16`) on AMX: 2.0x for SD
/// 1.5 at 256 px, 2.2-2.3x for SDXL at 512 px, 1.57x for Qwen2.5-0.5B over 512 tokens (AVX-512 BF16 dot
/// products: 1.8x for SDXL at 512 px); the frozen weights take
/// half the memory (a chat model's embedding table stays f32: 2.55 bytes a parameter for Qwen2.5-0.5B).
const CPU_BF16_SPEEDUP: f64 = 2.0;
const CPU_BF16_CHAT_SPEEDUP: f64 = 1.55;
const CPU_BF16_CHAT_WEIGHT_BYTES: f64 = 2.55;

/// Bytes an f32 adapter parameter holds during training: its value and gradient, plus AdamW's two moments
/// (Adafactor's factored moments are a few numbers per row and column: left out).
fn bytes_per_adapter_param(optimizer: OptimizerKind) -> f64 {
    match optimizer {
        OptimizerKind::AdamW => 16.0,
        OptimizerKind::Adafactor => 8.0,
    }
}

/// The memory the adapters of `config` take while training on a model of `sizes`.
fn adapter_gib(config: &TrainConfig, sizes: &ModelSizes) -> f64 {
    let mut params = sizes.unet_params_per_rank * config.lora_rank as f64;
    if config.train_text_encoder {
        params += sizes.text_encoder_params_per_rank * config.lora_rank as f64;
    }
    if config.conv_lora {
        params += sizes.conv_params_per_rank * config.conv_rank() as f64;
    }
    params * bytes_per_adapter_param(config.optimizer) / GIB
}

/// The estimate for `config` on a base of `family`, on `processor`. An unset resolution is the family's
/// native one, as in a run.
pub fn estimate(config: &TrainConfig, processor: Processor, family: BaseFamily) -> StepEstimate {
    if family == BaseFamily::Language {
        return estimate_chat(config, processor, MEASURED_CHAT_PARAMETERS);
    }
    let sizes = sizes(family);
    let resolution = config.resolution.unwrap_or(native_resolution(family));
    let pixels = (resolution as f64 / 256.0).powi(2) * config.batch_size as f64;
    let (memory_factor, time_factor) = if config.gradient_checkpointing {
        (CHECKPOINTING_MEMORY, CHECKPOINTING_TIME)
    } else {
        (1.0, 1.0)
    };
    // Factors of the weights' and the activations' memory, and the time of a 256 px step.
    let (weights_factor, activations_factor, seconds) = if processor == Processor::Gpu {
        (0.5, 0.5, sizes.seconds_256 / GPU_SPEEDUP)
    } else if processor.cpu_bf16(config) {
        (0.5, 1.0, sizes.seconds_256 / CPU_BF16_SPEEDUP)
    } else {
        (1.0, 1.0, sizes.seconds_256)
    };
    let activations_gib = sizes.activations_gib_256 * pixels * memory_factor;
    StepEstimate {
        memory_gib: sizes.weights_gib * weights_factor
            + activations_gib * activations_factor
            + adapter_gib(config, sizes),
        seconds: seconds * pixels * time_factor * config.gradient_accumulation_steps as f64,
    }
}

#[cfg(test)]
mod tests {
    use super::{Processor, StepEstimate, estimate};
    use crate::config::{MixedPrecision, OptimizerKind, TrainConfig};
    use crate::messages::BaseFamily;

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

    /// A CPU without bf16 products: the one the numbers were measured in f32 on.
    const F32_CPU: Processor = Processor::Cpu {
        bf16_products: false,
    };

    fn cpu(change: impl FnOnce(&mut TrainConfig)) -> StepEstimate {
        on(BaseFamily::Sd, change)
    }

    fn on(family: BaseFamily, change: impl FnOnce(&mut TrainConfig)) -> StepEstimate {
        let mut config = base();
        change(&mut config);
        estimate(&config, F32_CPU, family)
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1.0)
    }

    /// Adapter parameters per rank, counted from the reference implementation's listing of a model's kohya
    /// targets (`sd15`, `sdxl`; independent of the estimate's constants): `(unet, text_encoders, conv)`.
    fn params_per_rank_from_manifest(model: &str) -> (f64, f64, f64) {
        let path = format!(
            "{}/tests/fixtures/manifests/{model}.json",
            env!("CARGO_MANIFEST_DIR")
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
        let (unet, text_encoder, conv) = params_per_rank_from_manifest("sd15");
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
            Processor::Gpu,
            BaseFamily::Sd,
        );
        assert!(gpu.memory_gib < plain.memory_gib && gpu.seconds < plain.seconds / 10.0);
    }

    #[test]
    fn sdxl_is_estimated_with_its_own_sizes() {
        let (unet, text_encoders, conv) = params_per_rank_from_manifest("sdxl");
        let gib = (1u64 << 30) as f64;
        let sdxl = |change: fn(&mut TrainConfig)| on(BaseFamily::Sdxl, change);
        // Both text encoders' adapters count when they train; LoCon's convolutions are SDXL's.
        let rank_16 = sdxl(|_| {});
        let rank_48 = sdxl(|c| c.lora_rank = 48);
        assert!(close(
            rank_48.memory_gib - rank_16.memory_gib,
            32.0 * unet * 16.0 / gib
        ));
        let with_text_encoders = sdxl(|c| c.train_text_encoder = true);
        assert!(close(
            with_text_encoders.memory_gib - rank_16.memory_gib,
            16.0 * text_encoders * 16.0 / gib
        ));
        let locon = sdxl(|c| (c.conv_lora, c.conv_rank) = (true, Some(8)));
        assert!(close(
            locon.memory_gib - rank_16.memory_gib,
            8.0 * conv * 16.0 / gib
        ));
        // The same settings need more of everything than on SD1.5: three times the UNet's weights plus
        // the second text encoder, more activations and more time per pixel.
        let sd = cpu(|_| {});
        assert!(
            rank_16.memory_gib > sd.memory_gib + 8.0,
            "{rank_16:?} {sd:?}"
        );
        let sd_image = cpu(|c| c.batch_size = 2).memory_gib - sd.memory_gib;
        let sdxl_image = sdxl(|c| c.batch_size = 2).memory_gib - rank_16.memory_gib;
        assert!(sdxl_image > 1.5 * sd_image && rank_16.seconds > 2.0 * sd.seconds);
    }

    #[test]
    fn an_unset_resolution_is_the_familys_own() {
        let unset = |family| on(family, |c| c.resolution = None);
        let at = |family, px| on(family, move |c| c.resolution = Some(px));
        assert_eq!(unset(BaseFamily::Sd), at(BaseFamily::Sd, 512));
        assert_eq!(unset(BaseFamily::Sdxl), at(BaseFamily::Sdxl, 1024));
    }

    #[test]
    fn a_chat_step_reproduces_the_measured_one_and_each_chat_preset_fits_its_models() {
        use super::{MEASURED_CHAT_PARAMETERS, estimate_chat};
        let measured = TrainConfig {
            batch_size: 1,
            max_seq_length: 512,
            lora_rank: 16,
            gradient_accumulation_steps: 1,
            gradient_checkpointing: false,
            ..TrainConfig::default()
        };
        let step = estimate_chat(&measured, F32_CPU, MEASURED_CHAT_PARAMETERS);
        assert!((step.memory_gib - 7.19).abs() < 0.1, "{step:?}");
        assert!((step.seconds - 23.5).abs() < 0.5, "{step:?}");
        // The largest models each GPU preset's comment names.
        for (preset, gib, parameters) in [
            ("Chat, 8 GB GPU", 8.0, 1.5e9),
            ("Chat, 16 GB GPU", 16.0, 3.1e9),
            ("Chat, 24 GB GPU", 24.0, 8.0e9),
        ] {
            let config =
                crate::app::presets::apply_preset(preset, &TrainConfig::default()).unwrap();
            let step = estimate_chat(&config, Processor::Gpu, parameters);
            assert!(step.memory_gib <= gib, "{preset}: {step:?}");
        }
    }

    #[test]
    fn bf16_products_on_the_cpu_halve_the_weights_and_speed_the_step_as_measured() {
        let bf16_cpu = Processor::Cpu {
            bf16_products: true,
        };
        for family in [BaseFamily::Sd, BaseFamily::Sdxl, BaseFamily::Language] {
            let config = |precision| TrainConfig {
                mixed_precision: precision,
                ..base()
            };
            let f32_step = estimate(&config(MixedPrecision::No), F32_CPU, family);
            // Without bf16 products, or without bf16 asked for, the run is the f32 one.
            assert_eq!(
                estimate(&config(MixedPrecision::Bf16), F32_CPU, family),
                f32_step
            );
            assert_eq!(
                estimate(&config(MixedPrecision::No), bf16_cpu, family),
                f32_step
            );
            let bf16_step = estimate(&config(MixedPrecision::Bf16), bf16_cpu, family);
            let speedup = f32_step.seconds / bf16_step.seconds;
            assert!((1.5..=2.0).contains(&speedup), "{family:?}: {speedup}");
            assert!(bf16_step.memory_gib < f32_step.memory_gib, "{family:?}");
        }
        // SD 1.5 at 256 px: 4.3 GiB of f32 weights, half of them saved.
        let sd = |precision, processor| {
            let config = TrainConfig {
                mixed_precision: precision,
                ..base()
            };
            estimate(&config, processor, BaseFamily::Sd).memory_gib
        };
        let saved = sd(MixedPrecision::No, F32_CPU) - sd(MixedPrecision::Bf16, bf16_cpu);
        assert!(
            (saved - super::SD15.weights_gib / 2.0).abs() < 1e-9,
            "{saved}"
        );
    }
}
