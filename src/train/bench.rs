//! The training benchmark behind `lora-studio bench`: a UNet of the chosen architecture with random
//! weights (nothing is downloaded), a LoRA on the attention projections (`to_q`, `to_k`, `to_v`,
//! `to_out.0`, as the diffusers/peft reference script trains), AdamW, and latents and text embeddings
//! drawn at random, as a run with cached latents and a frozen text encoder sees them (for SDXL also a
//! random pooled text embedding and the size values of an uncropped image at the bench resolution). It
//! times the forward pass alone and whole training steps, counts the arithmetic (see [`crate::flops`])
//! and reads the peak resident memory. It must not load or download a model.

use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::var_builder::{SimpleBackend, VarBuilder};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use super::diffusion::variable_gradient;
use super::inputs::gaussian;
use super::{Optimizer, OptimizerSettings, TrainError};
use crate::config::OptimizerKind;
use crate::flops::FlopCount;
use crate::lora::{
    AdapterSlot, LoraNetwork, NetworkKind, NetworkSpec, TargetComponent, UNET_PREFIX,
};
use crate::models::checkpointing::CheckpointGrads;
use crate::models::unet::{AddedConditions, SizeConditioning, UNet2DConditionModel, UNetConfig};

/// The architectures the benchmark builds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BenchArch {
    /// Stable Diffusion 1.5's UNet (859.5 M parameters).
    Sd15,
    /// SDXL 1.0 base's UNet (2,567.5 M parameters), with its pooled-text and size conditioning.
    Sdxl,
    /// A small UNet of the same layout, for a quick check.
    Tiny,
}

impl BenchArch {
    fn unet(self) -> UNetConfig {
        match self {
            Self::Sd15 => UNetConfig::sd15(),
            Self::Sdxl => UNetConfig::sdxl(),
            Self::Tiny => UNetConfig {
                block_out_channels: vec![32, 64, 64, 64],
                attention_heads: vec![2; 4],
                cross_attention_dim: 64,
                ..UNetConfig::sd15()
            },
        }
    }
}

/// The UNet layers that get a LoRA.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BenchTargets {
    /// The attention projections (`to_q`, `to_k`, `to_v`, `to_out.0`): the diffusers training scripts'
    /// default.
    Attention,
    /// Every linear layer of the spatial transformers (the attention projections, the feed-forward's two
    /// layers, `proj_in` and `proj_out`): kohya's LoRA, which lora-studio trains by default.
    Transformer,
}

impl BenchTargets {
    /// The module names (their last components) that get a LoRA.
    fn modules(self) -> &'static [&'static str] {
        match self {
            Self::Attention => &["to_q", "to_k", "to_v", "to_out.0"],
            Self::Transformer => &[
                "to_q",
                "to_k",
                "to_v",
                "to_out.0",
                "ff.net.0.proj",
                "ff.net.2",
                "proj_in",
                "proj_out",
            ],
        }
    }
}

/// What to measure.
#[derive(Debug, Clone)]
pub struct BenchSettings {
    pub arch: BenchArch,
    /// Image side in pixels (the latent side is an eighth of it).
    pub resolution: usize,
    pub batch_size: usize,
    pub rank: usize,
    pub targets: BenchTargets,
    /// Timed training steps (one more runs first as a warm-up).
    pub steps: usize,
    pub gradient_checkpointing: bool,
    pub device: Device,
}

/// The measurements, as `--json` prints them.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub arch: BenchArch,
    pub resolution: usize,
    pub batch_size: usize,
    pub rank: usize,
    pub targets: BenchTargets,
    pub device: String,
    pub gradient_checkpointing: bool,
    /// The CPU kernels' matrix product arithmetic: `f32`, or `bf16` operands (summed in f32) under
    /// `--mixed-precision bf16`.
    pub products: &'static str,
    /// Adapted layers (four per attention block, with `transformer` targets six per transformer block
    /// and two per transformer more).
    pub adapters: usize,
    pub trainable_parameters: usize,
    /// Median seconds of a training step (forward, backward, optimizer).
    pub seconds_per_step: f64,
    pub step_seconds: Vec<f64>,
    /// Median seconds of a forward pass without gradients.
    pub forward_seconds: f64,
    /// Arithmetic of one forward pass, in GFLOP.
    pub forward_gflop: f64,
    /// Arithmetic of one training step, in GFLOP: the forward pass, the input gradients of every frozen
    /// layer (as much again) and attention's backward (twice its forward); the adapters' share is
    /// negligible.
    pub step_gflop: f64,
    pub step_gflops_per_second: f64,
    pub forward_gflops_per_second: f64,
    /// Peak resident memory of the process, in GiB (Linux only).
    pub peak_rss_gib: Option<f64>,
}

/// Builds the model and measures; `progress` hears what is being done.
pub fn run_bench(
    settings: &BenchSettings,
    progress: &mut dyn FnMut(&str),
) -> Result<BenchReport, TrainError> {
    let device = &settings.device;
    let config = settings.arch.unet();
    progress("building the UNet with random weights");
    let vb = VarBuilder::from_backend(Box::new(RandomWeights), DType::F32, device.clone());
    let (mut unet, network) = bench_unet(vb, &config, (settings.rank, settings.targets), device)?;
    let (vars, mut optimizer) = adamw(&network)?;
    let store = settings
        .gradient_checkpointing
        .then(CheckpointGrads::default);
    unet.set_gradient_checkpointing(store.clone());

    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let side = settings.resolution / 8;
    let batch = settings.batch_size;
    let latents = gaussian(&mut rng, &[batch, config.in_channels, side, side], device)?;
    let target = gaussian(&mut rng, latents.dims(), device)?;
    let context = gaussian(&mut rng, &[batch, 77, config.cross_attention_dim], device)?;
    let timesteps = Tensor::full(500f32, batch, device)?;
    let added = match config.addition {
        Some(addition) => {
            let pooled = gaussian(&mut rng, &[batch, addition.pooled_dim()], device)?;
            let size = SizeConditioning::uncropped(settings.resolution, settings.resolution);
            Some(AddedConditions::new(pooled, &vec![size; batch], device)?)
        }
        None => None,
    };
    let predict = || unet.forward_with(&latents, &timesteps, &context, added.as_ref());

    let mut forward_seconds = Vec::new();
    let mut forward_flops = FlopCount::default();
    for index in 0..2 {
        progress(&format!("forward pass {}/2", index + 1));
        let _rendering = network.rendering_at(1.0);
        let (seconds, flops) = timed(device, || Ok(predict()?.detach()))?;
        forward_seconds.push(seconds);
        forward_flops = flops;
    }
    crate::kernels::return_free_memory();
    let step_seconds = timed_steps(device, settings.steps, progress, || {
        let prediction = predict()?;
        let loss = (prediction - &target)?.sqr()?.mean_all()?;
        adapter_step(&loss, &vars, &mut optimizer, store.as_ref())?;
        Ok(loss)
    })?;
    unet.set_gradient_checkpointing(None);

    let forward_gflop = forward_flops.total() as f64 / 1e9;
    let step_gflop = (2 * forward_flops.layers + 3 * forward_flops.attention) as f64 / 1e9;
    let seconds_per_step = median(&step_seconds);
    let forward = median(&forward_seconds);
    Ok(BenchReport {
        arch: settings.arch,
        resolution: settings.resolution,
        batch_size: batch,
        rank: settings.rank,
        targets: settings.targets,
        device: crate::device::describe(device),
        products: crate::kernels::product_arithmetic(),
        gradient_checkpointing: settings.gradient_checkpointing,
        adapters: network.modules().len(),
        trainable_parameters: network.parameter_count(),
        seconds_per_step,
        step_seconds,
        forward_seconds: forward,
        forward_gflop,
        step_gflop,
        step_gflops_per_second: step_gflop / seconds_per_step,
        forward_gflops_per_second: forward_gflop / forward,
        peak_rss_gib: peak_rss_gib(),
    })
}

/// The UNet of `config` with weights from `vb`, and the benchmark's LoRA of rank `rank` on `targets`.
fn bench_unet(
    vb: VarBuilder,
    config: &UNetConfig,
    (rank, targets): (usize, BenchTargets),
    device: &Device,
) -> Result<(UNet2DConditionModel, LoraNetwork), TrainError> {
    let unet = UNet2DConditionModel::new(vb, config)?;
    let network = bench_network(
        unet.lora_targets(false),
        targets.modules(),
        UNET_PREFIX,
        rank,
        device,
    )?;
    Ok((unet, network))
}

/// A LoRA of rank `rank` (alpha = rank) on the layers of `slots` whose names end in one of `targets`.
pub(super) fn bench_network(
    slots: Vec<Arc<AdapterSlot>>,
    targets: &[&str],
    prefix: &'static str,
    rank: usize,
    device: &Device,
) -> Result<LoraNetwork, TrainError> {
    let slots = slots
        .into_iter()
        .filter(|slot| {
            targets
                .iter()
                .any(|target| slot.name().ends_with(&format!(".{target}")))
        })
        .collect();
    let spec = NetworkSpec {
        rank,
        alpha: rank as f64,
        conv_rank: rank,
        conv_alpha: rank as f64,
        kind: NetworkKind::Lora,
    };
    Ok(LoraNetwork::create(
        &[TargetComponent {
            prefix,
            slots,
            group: super::trainer::UNET_LR_GROUP,
        }],
        spec,
        0,
        device,
    )?)
}

/// The benchmarks' optimizer over every variable of `network`: AdamW as the reference scripts configure it
/// (betas 0.9/0.999, epsilon 1e-8, weight decay 0.01).
pub(super) fn adamw(network: &LoraNetwork) -> Result<(Vec<&Var>, Optimizer), TrainError> {
    let named: Vec<(String, &Var)> = network
        .named_vars()
        .into_iter()
        .map(|(name, _, var)| (name, var))
        .collect();
    let optimizer = Optimizer::new(
        OptimizerSettings {
            kind: OptimizerKind::AdamW,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        },
        &named,
    )?;
    Ok((named.into_iter().map(|(_, var)| var).collect(), optimizer))
}

/// The backward pass of `loss` and one optimizer step at learning rate 1e-4.
pub(super) fn adapter_step(
    loss: &Tensor,
    vars: &[&Var],
    optimizer: &mut Optimizer,
    store: Option<&CheckpointGrads>,
) -> candle_core::Result<()> {
    let grads = loss.backward()?;
    let collected = vars
        .iter()
        .map(|var| variable_gradient(&grads, store, var))
        .collect::<candle_core::Result<Vec<_>>>()?;
    optimizer.apply(vars, &collected, &vec![1e-4; vars.len()])
}

/// The seconds of `steps` training steps, after one warm-up step that is not counted.
pub(super) fn timed_steps(
    device: &Device,
    steps: usize,
    progress: &mut dyn FnMut(&str),
    mut step: impl FnMut() -> candle_core::Result<Tensor>,
) -> Result<Vec<f64>, TrainError> {
    let mut seconds = Vec::new();
    for index in 0..=steps {
        progress(&format!(
            "training step {index}/{steps}{}",
            if index == 0 { " (warm-up)" } else { "" }
        ));
        let (elapsed, _) = timed(device, &mut step)?;
        if index > 0 {
            seconds.push(elapsed);
        }
    }
    Ok(seconds)
}

/// Runs `work`, waits for the device to finish, and returns the seconds and the arithmetic counted.
pub(super) fn timed(
    device: &Device,
    work: impl FnOnce() -> candle_core::Result<Tensor>,
) -> Result<(f64, FlopCount), TrainError> {
    let before = FlopCount::now();
    let started = Instant::now();
    let output = work()?;
    // Reading a value waits for queued GPU work.
    output
        .flatten_all()?
        .get(0)?
        .to_dtype(DType::F32)?
        .to_scalar::<f32>()?;
    device.synchronize()?;
    Ok((
        started.elapsed().as_secs_f64(),
        FlopCount::now().since(before),
    ))
}

pub(super) fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

/// The peak resident set size (`VmHWM`), where the system reports it.
pub(super) fn peak_rss_gib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / (1024.0 * 1024.0))
}

/// Weights drawn at random with the scale a trained model has: matrices and kernels with standard
/// deviation 1/√fan-in (activations keep their size through the layers, so no denormals slow the CPU),
/// norm scales 1, biases 0.
pub(super) struct RandomWeights;

impl SimpleBackend for RandomWeights {
    fn get(
        &self,
        shape: candle_core::Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let dims = shape.dims();
        if dims.len() >= 2 {
            let fan_in: usize = dims[1..].iter().product();
            (Tensor::randn(0f32, 1.0, dims, device)? / (fan_in as f64).sqrt())?.to_dtype(dtype)
        } else if name.ends_with("bias") {
            Tensor::zeros(dims, dtype, device)
        } else {
            Tensor::ones(dims, dtype, device)
        }
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("the benchmark model has no tensor `{name}` without a shape")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};
    use candle_nn::VarBuilder;

    use super::{BenchArch, BenchSettings, BenchTargets, bench_unet, run_bench};
    use crate::models::merge::ShapeOnly;

    #[test]
    fn the_tiny_benchmark_trains_and_counts() {
        let settings = BenchSettings {
            arch: BenchArch::Tiny,
            resolution: 64,
            batch_size: 1,
            rank: 4,
            targets: BenchTargets::Attention,
            steps: 2,
            gradient_checkpointing: true,
            device: candle_core::Device::Cpu,
        };
        let report = run_bench(&settings, &mut |_| {}).unwrap();
        assert_eq!(report.step_seconds.len(), 2);
        assert!(report.seconds_per_step > 0.0 && report.forward_seconds > 0.0);
        assert!(report.forward_gflop > 0.0 && report.step_gflop > 2.0 * report.forward_gflop);
        // 16 transformer blocks, two attentions each, four projections per attention.
        assert_eq!(report.adapters, 128);
        assert!(report.trainable_parameters > 0);
    }

    #[test]
    fn the_sdxl_benchmark_adapts_what_the_reference_adapts() {
        // Zero-stride weights: the real-size layout without its 10 GB.
        let vb = VarBuilder::from_backend(Box::new(ShapeOnly), DType::F32, Device::Cpu);
        let config = BenchArch::Sdxl.unet();
        let targets = BenchTargets::Attention;
        let (_, network) = bench_unet(vb.clone(), &config, (1, targets), &Device::Cpu).unwrap();
        // What peft counts on diffusers' UNet2DConditionModel with SDXL base's config
        // (bench/reference_pytorch.py --arch sdxl): 70 transformer blocks, two attentions each, four
        // projections per attention; rank 1 adds one input and one output width per projection.
        assert_eq!(network.modules().len(), 560);
        assert_eq!(network.parameter_count(), 1_451_520);
        assert_eq!(config.addition.unwrap().pooled_dim(), 1280);
        // Plus each block's feed-forward (in 1280 -> 10240 and 5120 -> 1280 at the deepest level) and each
        // of the 11 transformers' proj_in and proj_out: kohya's 722 UNet modules.
        let targets = BenchTargets::Transformer;
        let (_, network) = bench_unet(vb, &config, (1, targets), &Device::Cpu).unwrap();
        assert_eq!(network.modules().len(), 722);
        assert_eq!(network.parameter_count(), 2_659_840);
    }
}
