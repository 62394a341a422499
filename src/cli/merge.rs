//! `lora-studio merge --base MODEL --lora FILE:STRENGTH... --out FILE.safetensors`: a merged single-file
//! checkpoint in the original layout.

use std::path::PathBuf;

use candle_core::DType;
use clap::{Args, ValueEnum};

use crate::models::checkpoint::ModelSource;
use crate::models::merge::merge_to_single_file;

#[derive(Debug, Args)]
pub struct MergeArgs {
    /// Base model: a single-file checkpoint or a diffusers folder.
    #[arg(long, value_name = "MODEL")]
    pub base: PathBuf,
    /// A kohya LoRA file and its strength (repeatable; strength 1 if omitted).
    #[arg(long = "lora", value_name = "FILE[:STRENGTH]", required = true)]
    pub loras: Vec<String>,
    /// Element type of the written checkpoint.
    #[arg(long, value_enum, default_value_t = Precision::Fp16)]
    pub precision: Precision,
    /// Where to write the merged `.safetensors`.
    #[arg(long, value_name = "FILE.safetensors")]
    pub out: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Precision {
    Fp16,
    Bf16,
    Fp32,
}

pub fn run(args: MergeArgs) -> anyhow::Result<()> {
    let loras = args
        .loras
        .iter()
        .map(|spec| super::parse_lora_spec(spec))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let source = ModelSource::open(&args.base)?;
    let dtype = match args.precision {
        Precision::Fp16 => DType::F16,
        Precision::Bf16 => DType::BF16,
        Precision::Fp32 => DType::F32,
    };
    let report = merge_to_single_file(&source, &loras, &args.out, dtype)?;
    for (path, count) in &report.unmatched {
        eprintln!(
            "warning: {count} modules of {} match no layer of this model and were skipped",
            path.display()
        );
    }
    eprintln!(
        "wrote {} ({} tensors, {} layers changed)",
        args.out.display(),
        report.tensors,
        report.merged_layers
    );
    Ok(())
}
