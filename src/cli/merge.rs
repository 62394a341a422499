//! `lora-studio merge --base MODEL --lora FILE:STRENGTH... --out FILE.safetensors`: a merged single-file
//! checkpoint in the original layout; for a language model folder (`config.json` with a `model_type`),
//! `--lora ADAPTER_FOLDER:STRENGTH... --out FOLDER` writes a merged model folder instead.

use std::path::{Path, PathBuf};

use candle_core::DType;
use clap::{Args, ValueEnum};

use crate::models::causal_lm::merge_into_folder;
use crate::models::checkpoint::ModelSource;
use crate::models::lm_inspect::is_language_model_folder;
use crate::models::merge::{MergeReport, merge_to_single_file};

#[derive(Debug, Args)]
pub struct MergeArgs {
    /// Base model: a single-file checkpoint, a diffusers folder, or a language model folder.
    #[arg(long, value_name = "MODEL")]
    pub base: PathBuf,
    /// A kohya LoRA file (a PEFT adapter folder for a language model) and its strength (repeatable;
    /// strength 1 if omitted).
    #[arg(long = "lora", value_name = "FILE[:STRENGTH]", required = true)]
    pub loras: Vec<String>,
    /// Element type of the written checkpoint (default fp16; bf16 for a language model).
    #[arg(long, value_enum)]
    pub precision: Option<Precision>,
    /// Where to write the merged `.safetensors` (a folder for a language model).
    #[arg(long, value_name = "FILE.safetensors")]
    pub out: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Precision {
    Fp16,
    Bf16,
    Fp32,
}

impl Precision {
    fn dtype(self) -> DType {
        match self {
            Precision::Fp16 => DType::F16,
            Precision::Bf16 => DType::BF16,
            Precision::Fp32 => DType::F32,
        }
    }
}

pub fn run(args: MergeArgs) -> anyhow::Result<()> {
    let language_model = is_language_model_folder(&args.base);
    let loras = args
        .loras
        .iter()
        .map(|spec| {
            if language_model {
                super::split_strength(spec)
            } else {
                super::parse_lora_spec(spec)
            }
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let report = if language_model {
        let dtype = args.precision.unwrap_or(Precision::Bf16).dtype();
        merge_into_folder(&args.base, &loras, &args.out, dtype)?
    } else {
        let source = ModelSource::open(&args.base)?;
        let dtype = args.precision.unwrap_or(Precision::Fp16).dtype();
        merge_to_single_file(&source, &loras, &args.out, dtype)?
    };
    print_report(&report, &args.out);
    Ok(())
}

fn print_report(report: &MergeReport, out: &Path) {
    for (path, count) in &report.unmatched {
        eprintln!(
            "warning: {count} modules of {} match no layer of this model and were skipped",
            path.display()
        );
    }
    eprintln!(
        "wrote {} ({} tensors, {} layers changed)",
        out.display(),
        report.tensors,
        report.merged_layers
    );
}
