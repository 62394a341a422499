//! `lora-studio bench [--arch sd15|sdxl|tiny|qwen2-0.5b] [--resolution 256|512|1024] [--seq-len N]
//! [--steps N] [--rank R] [--targets attention|transformer] [--device D] [--gradient-checkpointing]
//! [--json]`: training speed and memory on
//! this machine, with a UNet or a language model of real size and random weights (nothing is downloaded).

use clap::{Args, ValueEnum};

use crate::device::{DeviceChoice, open_device};
use crate::kernels::Bf16Products;
use crate::train::bench::{BenchArch, BenchReport, BenchSettings, BenchTargets, run_bench};
use crate::train::lm_bench::{LmBenchReport, LmBenchSettings, run_lm_bench};

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// The model to build.
    #[arg(long, value_enum, default_value_t = Arch::Sd15)]
    pub arch: Arch,
    /// Image side in pixels (a multiple of 64), for the UNets.
    #[arg(long, default_value_t = 256)]
    pub resolution: usize,
    /// Tokens per sequence, for the language model.
    #[arg(long, default_value_t = 512)]
    pub seq_len: usize,
    /// Timed training steps (after one warm-up step).
    #[arg(long, default_value_t = 3)]
    pub steps: usize,
    #[arg(long, default_value_t = 1)]
    pub batch_size: usize,
    /// LoRA rank (UNets: on the layers --targets names; the language model: on every linear layer of
    /// attention and MLP).
    #[arg(long, default_value_t = 16)]
    pub rank: usize,
    /// The UNet layers that get a LoRA.
    #[arg(long, value_enum, default_value_t = Targets::Attention)]
    pub targets: Targets,
    /// `cpu`, `cuda`, `cuda:N`, `metal` or `auto`.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Recompute activations in the backward pass instead of keeping them.
    #[arg(long)]
    pub gradient_checkpointing: bool,
    /// `no`: f32 matrix products; `bf16`: bf16 operands summed in f32 on processors with AMX tiles (Intel
    /// Xeon 4th generation and later) or AVX-512 BF16 (AMD Zen 4 and later), as a CPU training run with
    /// `mixed_precision = "bf16"` computes.
    #[arg(long, value_enum, default_value_t = BenchPrecision::No)]
    pub mixed_precision: BenchPrecision,
    /// Print one JSON line instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BenchPrecision {
    No,
    Bf16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Targets {
    /// to_q, to_k, to_v and to_out.0 (the diffusers training scripts' default).
    Attention,
    /// Every linear layer of the spatial transformers: the attention projections, ff.net.0.proj, ff.net.2,
    /// proj_in and proj_out (kohya's LoRA, what lora-studio trains by default).
    Transformer,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Arch {
    /// Stable Diffusion 1.5's UNet (859.5 M parameters).
    Sd15,
    /// SDXL 1.0 base's UNet (2,567.5 M parameters), with a random pooled text embedding and the size
    /// values of an uncropped image at --resolution.
    Sdxl,
    /// A small UNet of the same layout.
    Tiny,
    /// Qwen2.5-0.5B (494 M parameters: 24 layers, hidden 896, 14 heads, 2 key/value heads, tied
    /// embeddings over a vocabulary of 151,936).
    #[value(name = "qwen2-0.5b")]
    Qwen2_0_5b,
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    if args.steps == 0 || args.batch_size == 0 || args.rank == 0 {
        anyhow::bail!("--steps, --batch-size and --rank must be at least 1");
    }
    let choice: DeviceChoice = args
        .device
        .parse()
        .map_err(|e| anyhow::anyhow!("--device {}: {e}", args.device))?;
    let device = open_device(choice).map_err(anyhow::Error::msg)?;
    let _products = match args.mixed_precision {
        BenchPrecision::No => None,
        BenchPrecision::Bf16 if !device.is_cpu() => {
            anyhow::bail!("--mixed-precision bf16 is a CPU setting; GPUs train in their own precision")
        }
        BenchPrecision::Bf16 => Some(Bf16Products::enter().ok_or_else(|| {
            anyhow::anyhow!(
                "--mixed-precision bf16 needs a processor with AMX (Intel Xeon 4th generation or later) or AVX-512 BF16 (AMD Zen 4 or later)"
            )
        })?),
    };
    match args.arch {
        Arch::Sd15 => run_unet(&args, device, BenchArch::Sd15),
        Arch::Sdxl => run_unet(&args, device, BenchArch::Sdxl),
        Arch::Tiny => run_unet(&args, device, BenchArch::Tiny),
        Arch::Qwen2_0_5b => run_language_model(&args, device),
    }
}

fn run_unet(args: &BenchArgs, device: candle_core::Device, arch: BenchArch) -> anyhow::Result<()> {
    if args.resolution == 0 || !args.resolution.is_multiple_of(64) {
        anyhow::bail!(
            "--resolution {} is not a positive multiple of 64",
            args.resolution
        );
    }
    let settings = BenchSettings {
        arch,
        resolution: args.resolution,
        batch_size: args.batch_size,
        rank: args.rank,
        targets: match args.targets {
            Targets::Attention => BenchTargets::Attention,
            Targets::Transformer => BenchTargets::Transformer,
        },
        steps: args.steps,
        gradient_checkpointing: args.gradient_checkpointing,
        device,
    };
    let report = run_bench(&settings, &mut |stage| eprintln!("{stage}"))?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_table(&report);
    }
    Ok(())
}

fn run_language_model(args: &BenchArgs, device: candle_core::Device) -> anyhow::Result<()> {
    if args.seq_len < 2 {
        anyhow::bail!(
            "--seq-len {} is too short: a sequence needs at least 2 tokens",
            args.seq_len
        );
    }
    if args.gradient_checkpointing {
        anyhow::bail!(
            "--gradient-checkpointing is measured on the UNets only (--arch sd15, sdxl or tiny)"
        );
    }
    if args.targets != Targets::Attention {
        anyhow::bail!(
            "--targets chooses the UNets' adapted layers (--arch sd15, sdxl or tiny); the language model adapts every linear layer"
        );
    }
    let settings = LmBenchSettings {
        seq_len: args.seq_len,
        batch_size: args.batch_size,
        rank: args.rank,
        steps: args.steps,
        device,
    };
    let report = run_lm_bench(&settings, &mut |stage| eprintln!("{stage}"))?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_lm_table(&report);
    }
    Ok(())
}

fn print_lm_table(r: &LmBenchReport) {
    println!(
        "Qwen2.5-0.5B, {} tokens, batch {}, rank {} ({} adapters, {} parameters), {}, {} products",
        r.seq_len, r.batch_size, r.rank, r.adapters, r.trainable_parameters, r.device, r.products
    );
    println!(
        "training step  {:>8.2} s  ({:.1} tokens/s)",
        r.seconds_per_step, r.tokens_per_second
    );
    println!("forward pass   {:>8.2} s", r.forward_seconds);
    print_peak(r.peak_rss_gib);
}

fn print_peak(peak_rss_gib: Option<f64>) {
    match peak_rss_gib {
        Some(gib) => println!("peak memory    {gib:>8.2} GiB resident"),
        None => println!("peak memory    not reported by this system"),
    }
}

fn print_table(r: &BenchReport) {
    let arch = match r.arch {
        BenchArch::Sd15 => "SD 1.5 UNet",
        BenchArch::Sdxl => "SDXL UNet",
        BenchArch::Tiny => "tiny UNet",
    };
    println!(
        "{arch}, {} px, batch {}, rank {} on {} ({} adapters, {} parameters), {}, {} products{}",
        r.resolution,
        r.batch_size,
        r.rank,
        match r.targets {
            BenchTargets::Attention => "the attention projections",
            BenchTargets::Transformer => "the transformers' linear layers",
        },
        r.adapters,
        r.trainable_parameters,
        r.device,
        r.products,
        if r.gradient_checkpointing {
            ", gradient checkpointing"
        } else {
            ""
        }
    );
    println!(
        "training step  {:>8.2} s  ({:.0} GFLOP, {:.1} GFLOP/s)",
        r.seconds_per_step, r.step_gflop, r.step_gflops_per_second
    );
    println!(
        "forward pass   {:>8.2} s  ({:.0} GFLOP, {:.1} GFLOP/s)",
        r.forward_seconds, r.forward_gflop, r.forward_gflops_per_second
    );
    print_peak(r.peak_rss_gib);
}
