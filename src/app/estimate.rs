//! A rough memory and time estimate for a training step, shown before a run starts. It scales numbers
//! measured for SD1.5 (UNet with a rank-16 LoRA, batch 1, 256 and 512 px, `lora-studio bench`) with the
//! pixel count and batch size.

use crate::config::TrainConfig;

/// What a step is expected to need.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepEstimate {
    pub memory_gb: f64,
    pub seconds: f64,
}

/// Measured on a 2-core CPU (f32): 3.4 GB of UNet weights plus the text encoder and VAE, activations of
/// about 0.75 GB per 256x256 image (4.5 GB peak at 256 px, 6.5 GB at 512 px) and 2.8 s per 256 px step
/// (10.6-11.2 s at 512 px: the time grows with the pixel count).
const CPU_WEIGHTS_GB: f64 = 4.3;
const CPU_ACTIVATIONS_GB_256: f64 = 0.75;
const CPU_SECONDS_256: f64 = 2.8;
/// Gradient checkpointing measured at 256 and 512 px: half the activations, 1.5-1.6x the time.
const CHECKPOINTING_MEMORY: f64 = 0.5;
const CHECKPOINTING_TIME: f64 = 1.55;
/// Assumed, not measured: a GPU step in bf16 is well over an order of magnitude faster, with half the
/// memory per value.
const GPU_SPEEDUP: f64 = 40.0;

/// The estimate for `config` on a CPU (`on_gpu` false) or a GPU.
pub fn estimate(config: &TrainConfig, on_gpu: bool) -> StepEstimate {
    let pixels = (config.resolution as f64 / 256.0).powi(2) * config.batch_size as f64;
    let (memory_factor, time_factor) = if config.gradient_checkpointing {
        (CHECKPOINTING_MEMORY, CHECKPOINTING_TIME)
    } else {
        (1.0, 1.0)
    };
    let (weights, activations, seconds) = if on_gpu {
        (
            CPU_WEIGHTS_GB / 2.0,
            CPU_ACTIVATIONS_GB_256 / 2.0,
            CPU_SECONDS_256 / GPU_SPEEDUP,
        )
    } else {
        (CPU_WEIGHTS_GB, CPU_ACTIVATIONS_GB_256, CPU_SECONDS_256)
    };
    StepEstimate {
        memory_gb: weights + activations * pixels * memory_factor,
        seconds: seconds * pixels * time_factor * config.gradient_accumulation_steps as f64,
    }
}

#[cfg(test)]
mod tests {
    use super::estimate;
    use crate::config::TrainConfig;

    #[test]
    fn the_cpu_estimate_reproduces_the_measured_steps() {
        let mut config = TrainConfig {
            resolution: 512,
            batch_size: 1,
            gradient_accumulation_steps: 1,
            gradient_checkpointing: false,
            ..TrainConfig::default()
        };
        let at_512 = estimate(&config, false);
        assert!((at_512.seconds - 11.2).abs() < 0.1, "{at_512:?}");
        assert!((at_512.memory_gb - 7.3).abs() < 0.1, "{at_512:?}");
        config.gradient_checkpointing = true;
        let checkpointed = estimate(&config, false);
        assert!(checkpointed.memory_gb < at_512.memory_gb && checkpointed.seconds > at_512.seconds);
    }
}
