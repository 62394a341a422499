//! The command line: `lora-studio [PATH]` opens the app (on a dataset folder or a training config);
//! subcommands run the engine headless with terminal
//! progress. Errors are printed as one sentence (with its causes) and exit code 1, never a panic.

mod bench;
mod chat;
mod generate;
mod inspect;
mod label;
mod merge;
mod models;
mod train;

use std::process::ExitCode;

use std::path::PathBuf;

use anyhow::bail;
use clap::{Parser, Subcommand};

use crate::build_info::LONG_VERSION;
use crate::kernels::on_compute_threads;
use crate::train::CancelToken;

/// Train LoRA adapters for Stable Diffusion on your own images, or for a chat model on your conversations.
#[derive(Debug, Parser)]
#[command(name = "lora-studio", version = LONG_VERSION, about, long_about = None)]
#[command(args_conflicts_with_subcommands = true)]
struct Cli {
    /// Open the app on this dataset folder or training config (.toml, .yaml, .json).
    path: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Generate an image from a prompt with a base model and optional LoRA files.
    Generate(Box<generate::GenerateArgs>),
    /// Say what a model, LoRA or tensor file is, without loading its weights.
    Inspect(inspect::InspectArgs),
    /// Train a LoRA from a folder of images, or a chat model's from conversations (the base model decides).
    Train(train::TrainArgs),
    /// Write a first caption for every image of a dataset folder (BLIP sentences, CLIP tags).
    Label(label::LabelArgs),
    /// Chat with a language model and its PEFT LoRA adapters (one reply with --prompt).
    Chat(Box<chat::ChatArgs>),
    /// Merge LoRA files into a base model and write one single-file checkpoint.
    Merge(merge::MergeArgs),
    /// Measure training speed and memory with a real-size model of random weights.
    Bench(bench::BenchArgs),
    /// List the base models and LoRA folders found on this computer.
    Models(models::ModelsArgs),
    /// Download a recommended base model (`sd15`, `sdxl`, `qwen2.5-0.5b`) or a file of a Hub repository.
    Download(models::DownloadArgs),
}

/// Parses the command line and runs it.
pub fn run() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        // Commands run on the compute threads (see `kernels::on_compute_threads`).
        Some(command) => on_compute_threads(move || run_command(command)),
        None => open_app(cli.path),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {}", one_line(&error));
            ExitCode::FAILURE
        }
    }
}

fn run_command(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Generate(args) => generate::run(*args),
        Command::Inspect(args) => inspect::run(args),
        Command::Train(args) => train::run(args),
        Command::Label(args) => label::run(args),
        Command::Chat(args) => chat::run(*args),
        Command::Merge(args) => merge::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Models(args) => models::run(args),
        Command::Download(args) => models::run_download(args),
    }
}

/// The error and its causes as one line, leaving out a cause whose words the line already holds (most
/// messages here quote their cause).
fn one_line(error: &anyhow::Error) -> String {
    let mut line = error.to_string();
    for cause in error.chain().skip(1) {
        let text = cause.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
    }
    line
}

#[cfg(feature = "gui")]
fn open_app(path: Option<PathBuf>) -> anyhow::Result<()> {
    crate::app::run(path)
}

#[cfg(not(feature = "gui"))]
fn open_app(_path: Option<PathBuf>) -> anyhow::Result<()> {
    anyhow::bail!(
        "this build has no desktop app (it was built without the `gui` feature); run `lora-studio --help` for the commands"
    )
}

/// The base model a command names: a path, or the name of a model found on this computer (see
/// `lora-studio models`).
pub(crate) fn base_model_path(argument: &std::path::Path) -> anyhow::Result<PathBuf> {
    use crate::discovery::{DiscoveryOptions, data_dir, discover, resolve};
    resolve(argument, || {
        discover(&DiscoveryOptions::from_env(&data_dir()))
    })
    .map_err(anyhow::Error::msg)
}

/// A cancel token that the first Ctrl-C sets, after printing `stopping`; a second Ctrl-C quits at once.
pub(crate) fn cancel_on_ctrl_c(stopping: &'static str) -> CancelToken {
    let cancel = CancelToken::default();
    let handler_token = cancel.clone();
    let _ = ctrlc::set_handler(move || {
        if handler_token.is_cancelled() {
            std::process::exit(130);
        }
        eprintln!("\n{stopping}");
        handler_token.cancel();
    });
    cancel
}

/// `PATH` or `PATH:STRENGTH`; a suffix that is not a number is part of the path (e.g. `C:\…`).
pub(crate) fn split_strength(spec: &str) -> anyhow::Result<(PathBuf, f64)> {
    let (path, strength) = match spec.rsplit_once(':') {
        Some((path, strength)) if !path.is_empty() => match strength.parse::<f64>() {
            Ok(s) if s.is_finite() => (path, s),
            Ok(_) => bail!("the LoRA strength in `{spec}` is not a finite number"),
            Err(_) => (spec, 1.0),
        },
        _ => (spec, 1.0),
    };
    Ok((PathBuf::from(path), strength))
}

/// `FILE` or `FILE:STRENGTH`, a kohya LoRA file that exists.
pub(crate) fn parse_lora_spec(spec: &str) -> anyhow::Result<(PathBuf, f64)> {
    let (path, strength) = split_strength(spec)?;
    if path.join("adapters.safetensors").is_file() {
        bail!(
            "{} is a training checkpoint, not a LoRA file; export it from the app's Export view, or pass the .safetensors file the run wrote",
            path.display()
        );
    }
    if path.is_dir() {
        bail!("{} is a folder, not a LoRA file", path.display());
    }
    if !path.is_file() {
        bail!("the LoRA file {} does not exist", path.display());
    }
    Ok((path, strength))
}

#[cfg(test)]
mod tests {
    use anyhow::Context;

    use super::one_line;

    #[test]
    fn a_cause_the_message_already_quotes_is_not_repeated() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        let quoted = anyhow::Error::new(io).context("cannot read a.safetensors: no such file");
        assert_eq!(one_line(&quoted), "cannot read a.safetensors: no such file");
        let unquoted: anyhow::Result<()> =
            Err(anyhow::anyhow!("disk full")).context("saving step 3");
        assert_eq!(one_line(&unquoted.unwrap_err()), "saving step 3: disk full");
    }
}
