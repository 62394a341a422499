//! `lora-studio models [--json] [--add DIR]`: the base models and LoRA folders found on this computer
//! (AUTOMATIC1111, Forge, SD.Next, ComfyUI, InvokeAI, Fooocus, the Hugging Face cache, added folders), and
//! `lora-studio download NAME | REPO FILE`: a recommended base model, or any file of a Hub repository, into
//! the Hugging Face cache.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, bail};
use clap::Args;
use indicatif::{HumanBytes, ProgressBar, ProgressStyle};
use serde_json::json;

use crate::discovery::recommended::{RECOMMENDED, find};
use crate::discovery::{
    Discovery, DiscoveryOptions, InstallKind, add_folder, data_dir, discover, short_name,
};
use crate::hub::{DownloadReporter, HubSettings, fetch_file, human_bytes};

#[derive(Debug, Args)]
pub struct ModelsArgs {
    /// Print the list as JSON (one object with `models` and `lora_folders`).
    #[arg(long)]
    pub json: bool,
    /// Look in this folder too, in this and every later scan (repeatable).
    #[arg(long = "add", value_name = "DIR")]
    pub add: Vec<PathBuf>,
}

pub fn run(args: ModelsArgs) -> anyhow::Result<()> {
    let data = data_dir();
    for folder in &args.add {
        let added = add_folder(&data, folder)
            .with_context(|| format!("cannot add {} to the model folders", folder.display()))?;
        eprintln!("added {}", added.display());
    }
    let started = Instant::now();
    let found = discover(&DiscoveryOptions::from_env(&data));
    if args.json {
        println!("{}", serde_json::to_string_pretty(&as_json(&found))?);
    } else {
        print_table(&found);
    }
    eprintln!(
        "{} models in {:.2} s ({} from the cache){}",
        found.models.len(),
        started.elapsed().as_secs_f64(),
        found.cached,
        if found.incomplete {
            "; the search stopped at its time limit, add folders with --add to be sure"
        } else {
            ""
        }
    );
    Ok(())
}

fn as_json(found: &Discovery) -> serde_json::Value {
    json!({
        "models": found.models.iter().map(|m| json!({
            "name": m.name,
            "family": m.family.label(),
            "size_bytes": m.size_bytes,
            "precision": m.precision,
            "source": m.source.label(),
            "path": m.path,
        })).collect::<Vec<_>>(),
        "lora_folders": found.lora_folders.iter().map(|f| json!({
            "source": f.source.label(),
            "path": f.path,
        })).collect::<Vec<_>>(),
        "skipped": found.skipped.iter().map(|(path, reason)| json!({
            "path": path,
            "reason": reason,
        })).collect::<Vec<_>>(),
    })
}

fn print_table(found: &Discovery) {
    if found.models.is_empty() {
        println!(
            "no base models found; `lora-studio download sd15` fetches Stable Diffusion 1.5 ({}), or add the \
             folder yours are in with `lora-studio models --add DIR`",
            human_bytes(RECOMMENDED[0].approximate_bytes)
        );
    }
    let mut group = "";
    for model in &found.models {
        if model.family.group() != group {
            group = model.family.group();
            println!("{group}");
        }
        println!(
            "  {:<32} {:<40} {:>9} {:<5} {:<18} {}",
            model.name,
            model.family.label(),
            human_bytes(model.size_bytes),
            model.precision,
            model.source.label(),
            model.path.display()
        );
    }
    if !found.lora_folders.is_empty() {
        println!("LoRA folders");
        for folder in &found.lora_folders {
            println!("  {:<18} {}", folder.source.label(), folder.path.display());
        }
    }
    for (path, reason) in &found.skipped {
        eprintln!("skipped {}: {reason}", path.display());
    }
}

#[derive(Debug, Args)]
pub struct DownloadArgs {
    /// A recommended base (`sd15`, `sdxl`, `qwen2.5-0.5b`) or a Hub repository (`owner/name`, then FILE).
    pub name: String,
    /// The file of the repository to fetch.
    pub file: Option<String>,
    /// The Hub's address (a mirror); default `HF_ENDPOINT` or https://huggingface.co.
    #[arg(long, value_name = "URL")]
    pub hub_endpoint: Option<String>,
    /// The Hugging Face hub cache to download into; default `HF_HUB_CACHE`, `HF_HOME/hub` or
    /// ~/.cache/huggingface/hub.
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
}

pub fn run_download(args: DownloadArgs) -> anyhow::Result<()> {
    let recommended = match (find(&args.name), &args.file) {
        (Some(recommended), None) => Some(recommended),
        (_, Some(_)) if crate::label::sources::is_repository_id(&args.name) => None,
        _ => {
            let names: Vec<String> = RECOMMENDED
                .iter()
                .map(|r| format!("{} ({})", r.name, r.title))
                .collect();
            bail!(
                "`{}` is not a recommended model ({}); for any other, give a Hub repository and a file: \
                 lora-studio download OWNER/NAME FILE",
                args.name,
                names.join(", ")
            )
        }
    };
    let mut settings = HubSettings::from_env();
    if let Some(endpoint) = args.hub_endpoint {
        settings.endpoint = endpoint;
    }
    if let Some(cache) = args.cache_dir {
        settings.cache_dir = cache;
    }
    let mut progress = TerminalDownload::default();
    let path = match recommended {
        Some(recommended) => recommended.fetch(&settings, &mut progress)?,
        None => fetch_file(
            &args.name,
            args.file.as_deref().unwrap_or_default(),
            &settings,
            &mut progress,
        )?,
    };
    progress.finish();
    println!("{}", path.display());
    eprintln!(
        "{} is in the Hugging Face cache; use it with --set base_model={}",
        path.file_name().unwrap_or_default().to_string_lossy(),
        short_name(InstallKind::HuggingFaceCache, &path)
    );
    Ok(())
}

/// A terminal progress bar with bytes, speed and time left.
#[derive(Default)]
struct TerminalDownload {
    bar: Option<ProgressBar>,
}

impl TerminalDownload {
    fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

impl DownloadReporter for TerminalDownload {
    fn planned(&mut self, repo: &str, files: &[(String, u64)]) {
        for (file, size) in files {
            eprintln!("downloading {file} of {repo} ({})", HumanBytes(*size));
        }
    }

    fn started(&mut self, file: &str, size: u64) {
        self.finish();
        let bar = ProgressBar::new(size).with_message(file.to_string());
        if let Ok(style) = ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        ) {
            bar.set_style(style.progress_chars("=> "));
        }
        self.bar = Some(bar);
    }

    fn advanced(&mut self, bytes: u64) {
        if let Some(bar) = &self.bar {
            bar.inc(bytes);
        }
    }

    fn finished(&mut self, _file: &str) {
        self.finish();
    }
}
