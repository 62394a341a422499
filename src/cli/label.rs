//! `lora-studio label`: a first caption for every image of a dataset folder, written to `metadata.csv` or
//! `.txt` sidecars, as lora-scripts' `auto_label.py` does. Models are named by folder, short name or Hub
//! repository and downloaded on first use; images that already have a caption keep it unless
//! `--overwrite`; Ctrl-C stops after the current image and a later run goes on from there.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, bail};
use clap::Args;
use indicatif::{HumanBytes, ProgressBar, ProgressStyle};

use super::cancel_on_ctrl_c;
use crate::device::{DeviceChoice, describe, open_device};
use crate::hub::{DownloadReporter, HubSettings};
use crate::label::interrogate::Vocabulary;
use crate::label::run::plan;
use crate::label::sources::model_folder;
use crate::label::{
    CaptionOutput, CaptionSettings, Captioner, LabelOptions, LabelReporter, label_folder,
};
use crate::models::decoding::Decoding;

#[derive(Debug, Args)]
pub struct LabelArgs {
    /// The dataset folder (images in it and in its `N_name` subfolders).
    #[arg(long, value_name = "DIR")]
    pub input: PathBuf,
    /// The `metadata.csv` to write (a bare file name is put in the input folder). Default: the folder's
    /// metadata.csv, or sidecars if its images already have `.txt` captions.
    #[arg(long, value_name = "FILE", conflicts_with = "sidecars")]
    pub output: Option<PathBuf>,
    /// Write a `.txt` caption next to each image instead of a CSV.
    #[arg(long)]
    pub sidecars: bool,
    /// Captioning model: a folder, `blip`, `blip-base`, `clip`, or a Hub repository (owner/name).
    /// Repeat to combine: `--model blip --model clip` writes BLIP's sentence, then CLIP's tags.
    #[arg(long = "model", value_name = "NAME_OR_DIR", default_value = "blip")]
    pub models: Vec<String>,
    /// Text put before every caption (a trigger word), followed by ", ".
    #[arg(long)]
    pub prefix: Option<String>,
    /// Replace captions that already exist.
    #[arg(long)]
    pub overwrite: bool,
    /// BLIP: the most tokens in a caption.
    #[arg(long, default_value_t = 40)]
    pub max_tokens: usize,
    /// BLIP: the fewest tokens in a caption.
    #[arg(long, default_value_t = 5)]
    pub min_tokens: usize,
    /// BLIP: how many candidate captions beam search keeps (1 decodes greedily, about 15 % faster).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=16))]
    pub beams: u16,
    /// BLIP: above 1 discourages words the caption already has (1.2-1.5 against "a red red car").
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f32,
    /// CLIP: how many of each vocabulary's best phrases to append.
    #[arg(long, default_value_t = 1)]
    pub tags: usize,
    /// CLIP: a folder of `*.txt` phrase lists (one phrase per line) to use instead of the built-in ones.
    #[arg(long, value_name = "DIR")]
    pub vocabulary: Option<PathBuf>,
    /// The Hub address (default: $HF_ENDPOINT or https://huggingface.co).
    #[arg(long, value_name = "URL")]
    pub hub_endpoint: Option<String>,
    /// The Hugging Face cache folder (default: $HF_HUB_CACHE, $HF_HOME/hub or ~/.cache/huggingface/hub).
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Use only models already on disk; download nothing.
    #[arg(long)]
    pub offline: bool,
    /// cpu, cuda, cuda:N, metal or auto.
    #[arg(long, default_value = "auto")]
    pub device: DeviceChoice,
}

pub fn run(args: LabelArgs) -> anyhow::Result<()> {
    if !args.input.is_dir() {
        bail!("the input folder {} does not exist", args.input.display());
    }
    if !(args.repetition_penalty.is_finite() && args.repetition_penalty > 0.0) {
        bail!(
            "--repetition-penalty must be a positive number (1 leaves captions as they are), not {}",
            args.repetition_penalty
        );
    }
    let output = match (&args.output, args.sidecars) {
        (_, true) => CaptionOutput::Sidecars {
            extension: "txt".to_string(),
        },
        (Some(path), false) if path.parent().is_none_or(|p| p.as_os_str().is_empty()) => {
            CaptionOutput::Csv(args.input.join(path))
        }
        (Some(path), false) => CaptionOutput::Csv(path.clone()),
        (None, false) => LabelOptions::default_output(&args.input),
    };
    let options = LabelOptions {
        input: args.input.clone(),
        output,
        prefix: args.prefix.clone(),
        overwrite: args.overwrite,
    };
    let planned = plan(&options)?;
    if planned.to_caption.is_empty() {
        eprintln!(
            "nothing to caption: {} images already have a caption (--overwrite replaces them)",
            planned.kept
        );
        return Ok(());
    }
    let settings = CaptionSettings {
        decoding: Decoding {
            min_tokens: args.min_tokens,
            max_tokens: args.max_tokens.max(1),
            beams: args.beams.into(),
            repetition_penalty: args.repetition_penalty,
        },
        tags_per_vocabulary: args.tags,
        vocabularies: match &args.vocabulary {
            Some(dir) => Vocabulary::from_folder(dir)?,
            None => Vocabulary::builtin(),
        },
    };
    let mut hub = HubSettings::from_env();
    if let Some(endpoint) = &args.hub_endpoint {
        hub.endpoint = endpoint.clone();
    }
    if let Some(cache) = &args.cache_dir {
        hub.cache_dir = cache.clone();
    }
    hub.offline |= args.offline;
    let device = open_device(args.device).map_err(anyhow::Error::msg)?;
    let mut captioners = Vec::new();
    for name in &args.models {
        let folder = model_folder(name, &hub, &mut TerminalDownload::default())?;
        let started = Instant::now();
        let captioner = Captioner::load(&folder, &device, &settings)
            .with_context(|| format!("loading the captioning model {name}"))?;
        eprintln!(
            "loaded {} from {} on {} in {:.1} s",
            captioner.kind(),
            folder.display(),
            describe(&device),
            started.elapsed().as_secs_f64()
        );
        captioners.push(captioner);
    }
    let cancel = cancel_on_ctrl_c("stopping after this image (press Ctrl-C again to quit now)");
    let mut reporter = TerminalLabel::default();
    let started = Instant::now();
    let report = label_folder(&options, &captioners, &device, &mut reporter, &|| {
        cancel.is_cancelled()
    })?;
    if let Some(bar) = &reporter.bar {
        bar.finish_and_clear();
    }
    let written_to = match &options.output {
        CaptionOutput::Csv(path) => path.display().to_string(),
        CaptionOutput::Sidecars { extension } => format!(".{extension} files next to the images"),
    };
    eprintln!(
        "{} {} {} in {written_to} ({:.2} s per image); {} kept {} caption{}{}",
        if report.cancelled {
            "stopped:"
        } else {
            "captioned"
        },
        report.captioned,
        if report.captioned == 1 {
            "image"
        } else {
            "images"
        },
        started.elapsed().as_secs_f64() / report.captioned.max(1) as f64,
        report.kept,
        if report.kept == 1 { "its" } else { "their" },
        if report.failed.is_empty() {
            String::new()
        } else {
            format!("; {} could not be captioned", report.failed.len())
        },
        if report.cancelled {
            "; run the same command again to go on"
        } else {
            ""
        }
    );
    Ok(())
}

/// Progress bars for downloads.
#[derive(Default)]
struct TerminalDownload {
    bar: Option<ProgressBar>,
}

impl DownloadReporter for TerminalDownload {
    fn planned(&mut self, repo: &str, files: &[(String, u64)]) {
        let total: u64 = files.iter().map(|(_, size)| size).sum();
        let names: Vec<String> = files
            .iter()
            .map(|(name, size)| format!("{name} ({})", HumanBytes(*size)))
            .collect();
        eprintln!(
            "downloading {} from {repo}: {}",
            HumanBytes(total),
            names.join(", ")
        );
    }

    fn started(&mut self, file: &str, size: u64) {
        if let Some(bar) = &self.bar
            && bar.length() == Some(size)
        {
            bar.set_position(0);
            return;
        }
        let bar = ProgressBar::new(size).with_style(
            ProgressStyle::with_template(
                "{msg} {bar:30} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar.set_message(file.to_string());
        self.bar = Some(bar);
    }

    fn advanced(&mut self, bytes: u64) {
        if let Some(bar) = &self.bar {
            bar.inc(bytes);
        }
    }

    fn finished(&mut self, file: &str) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
        eprintln!("downloaded {file}");
    }
}

/// A progress bar over the images, each caption printed above it.
#[derive(Default)]
struct TerminalLabel {
    bar: Option<ProgressBar>,
}

impl LabelReporter for TerminalLabel {
    fn planned(&mut self, to_caption: &[PathBuf], kept: usize) {
        let count = to_caption.len();
        eprintln!(
            "captioning {count} {} ({kept} already {} a caption)",
            if count == 1 { "image" } else { "images" },
            if kept == 1 { "has" } else { "have" }
        );
        let bar = ProgressBar::new(to_caption.len() as u64).with_style(
            ProgressStyle::with_template("{bar:30} {pos}/{len} {per_sec} eta {eta}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        self.bar = Some(bar);
    }

    fn captioned(&mut self, relative: &Path, caption: &str, _target: &Path) {
        self.say(format!("{}: {caption}", relative.display()));
        if let Some(bar) = &self.bar {
            bar.inc(1);
        }
    }

    fn failed(&mut self, relative: &Path, reason: &str) {
        self.say(format!("skipped {}: {reason}", relative.display()));
    }
}

impl TerminalLabel {
    /// A line above the bar (or plainly when there is no terminal to draw the bar on).
    fn say(&self, line: String) {
        match &self.bar {
            Some(bar) if !bar.is_hidden() => bar.println(line),
            _ => eprintln!("{line}"),
        }
    }
}
