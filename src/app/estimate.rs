//! A rough memory and time estimate for a training step, shown before a run starts. It scales numbers
//! measured for SD1.5 (UNet with a rank-16 LoRA, batch 1, 256 px) with the pixel count and batch size.

use crate::config::TrainConfig;

/// What a step is expected to need.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepEstimate {
    pub memory_gb: f64,
    pub seconds: f64,
}

/// Measured on a 2-core CPU (f32): 4.3 GB of weights, about 11 GB of activations and 35 s per step at 256 px.
const CPU_WEIGHTS_GB: f64 = 4.3;
const CPU_ACTIVATIONS_GB_256: f64 = 11.0;
const CPU_SECONDS_256: f64 = 35.0;
/// A GPU step in bf16 is roughly two orders of magnitude faster, with half the memory per value.
const GPU_SPEEDUP: f64 = 80.0;

/// The estimate for `config` on a CPU (`on_gpu` false) or a GPU.
pub fn estimate(config: &TrainConfig, on_gpu: bool) -> StepEstimate {
    let pixels = (config.resolution as f64 / 256.0).powi(2) * config.batch_size as f64;
    let checkpointing = if config.gradient_checkpointing {
        0.5
    } else {
        1.0
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
        memory_gb: weights + activations * pixels * checkpointing,
        seconds: seconds * pixels.powf(1.15) * config.gradient_accumulation_steps as f64,
    }
}
