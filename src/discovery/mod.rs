//! Finding the models a user already has: base models and LoRA folders where AUTOMATIC1111, Forge, SD.Next,
//! ComfyUI, InvokeAI and Fooocus keep them, models in the Hugging Face cache, and folders the user added.
//! Each model is described from its file headers and configs only (family, precision, size, where it came
//! from), never loaded, and the descriptions are cached by path, size and modification time, so a second
//! scan is instant. Searches are bounded (depth, entries, time) and safe against symlink loops: a home folder
//! full of unrelated files is never walked whole. Must not use egui, train, worker or the app.

mod cache;
mod classify;
mod installs;
pub mod recommended;
mod walk;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

pub use cache::DescriptionCache;
pub use installs::{InstallKind, short_name};

/// The model families lora-studio tells apart from a file's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Family {
    /// Stable Diffusion 1.x.
    Sd1,
    /// Stable Diffusion 2.x-base (predicts noise).
    Sd2Epsilon,
    /// Stable Diffusion 2.x 768 (predicts velocity).
    Sd2V,
    /// Stable Diffusion 2.x without a config saying which: told apart by a test prediction when loaded.
    Sd2,
    /// Stable Diffusion XL and its fine-tunes.
    Sdxl,
    /// An SDXL fine-tune marked as predicting velocity (`v_pred`).
    SdxlVPred,
    /// A chat model in the Hugging Face layout (`model_type` qwen2, qwen3, llama).
    ChatModel,
}

impl Family {
    /// How the family reads in a list: `SD 1.x`, `SD 2.x (v-prediction)`.
    pub fn label(&self) -> &'static str {
        match self {
            Family::Sd1 => "SD 1.x",
            Family::Sd2Epsilon => "SD 2.x-base (epsilon)",
            Family::Sd2V => "SD 2.x (v-prediction)",
            Family::Sd2 => "SD 2.x (epsilon or v, decided when loaded)",
            Family::Sdxl => "SDXL",
            Family::SdxlVPred => "SDXL (v-prediction)",
            Family::ChatModel => "chat model",
        }
    }

    /// The group it is listed under in a picker.
    pub fn group(&self) -> &'static str {
        match self {
            Family::Sd1 => "Stable Diffusion 1.x",
            Family::Sd2Epsilon | Family::Sd2V | Family::Sd2 => "Stable Diffusion 2.x",
            Family::Sdxl | Family::SdxlVPred => "Stable Diffusion XL",
            Family::ChatModel => "Language models",
        }
    }
}

/// A base model found on disk.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DiscoveredModel {
    /// The file, or the folder of a diffusers or Hugging Face model.
    pub path: PathBuf,
    /// The name `train` and `generate` accept in place of the path: the file or folder name without its
    /// extension (for the Hugging Face cache, the repository's name).
    pub name: String,
    pub family: Family,
    /// Bytes on disk.
    pub size_bytes: u64,
    /// The precision most of its tensors are stored in (`f16`, `bf16`, `f32`).
    pub precision: String,
    pub source: InstallKind,
    /// The install (or cache, or added folder) it was found in.
    pub source_root: PathBuf,
}

/// A folder a UI loads LoRA files from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoraFolder {
    pub path: PathBuf,
    pub source: InstallKind,
}

/// What a scan found.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Discovery {
    /// Base models, grouped by family and sorted by name within a family.
    pub models: Vec<DiscoveredModel>,
    pub lora_folders: Vec<LoraFolder>,
    /// Files that looked like models but could not be read, with the reason.
    pub skipped: Vec<(PathBuf, String)>,
    /// Descriptions served from the cache (the rest were read from headers).
    pub cached: usize,
    /// The time or entry budget ran out before every candidate folder was looked at.
    pub incomplete: bool,
}

/// Where to look and how long.
#[derive(Debug, Clone)]
pub struct DiscoveryOptions {
    /// The user's home folder, under which UIs are usually installed.
    pub home: Option<PathBuf>,
    /// The Hugging Face hub cache.
    pub hub_cache: Option<PathBuf>,
    /// Install folders named by environment variables (`INVOKEAI_ROOT`, ...) and folders the user added.
    pub extra_roots: Vec<PathBuf>,
    /// Where the descriptions are cached between scans; `None` keeps no cache.
    pub cache_file: Option<PathBuf>,
    /// How long a scan may take before it returns what it has.
    pub time_limit: Duration,
}

impl DiscoveryOptions {
    /// The usual places: the home folder, the Hugging Face cache, `INVOKEAI_ROOT`, `SD_WEBUI_DIR`,
    /// `COMFYUI_DIR`, the folders added with `lora-studio models --add`, and the cache in `data_dir`.
    pub fn from_env(data_dir: &Path) -> Self {
        let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
        let mut extra_roots: Vec<PathBuf> = ["INVOKEAI_ROOT", "SD_WEBUI_DIR", "COMFYUI_DIR"]
            .iter()
            .filter_map(|name| var(name).map(PathBuf::from))
            .collect();
        extra_roots.extend(added_folders(data_dir));
        Self {
            home: var("HOME")
                .or_else(|| var("USERPROFILE"))
                .map(PathBuf::from),
            hub_cache: Some(crate::hub::default_cache_dir()),
            extra_roots,
            cache_file: Some(data_dir.join(CACHE_FILE)),
            time_limit: DEFAULT_TIME_LIMIT,
        }
    }
}

/// A scan's default time budget.
pub const DEFAULT_TIME_LIMIT: Duration = Duration::from_secs(5);

/// The descriptions cache, in the data folder.
const CACHE_FILE: &str = "models-cache.json";

/// The folders the user added, one per line, in the data folder.
const ADDED_FILE: &str = "model-folders.txt";

/// The folders added with [`add_folder`].
pub fn added_folders(data_dir: &Path) -> Vec<PathBuf> {
    std::fs::read_to_string(data_dir.join(ADDED_FILE))
        .unwrap_or_default()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(PathBuf::from)
        .collect()
}

/// Adds `folder` to the folders every scan looks in (kept in the data folder, written atomically).
pub fn add_folder(data_dir: &Path, folder: &Path) -> std::io::Result<PathBuf> {
    let folder = folder.canonicalize()?;
    if !folder.is_dir() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::NotADirectory,
            format!("{} is not a folder", folder.display()),
        ));
    }
    let mut folders = added_folders(data_dir);
    if !folders.contains(&folder) {
        folders.push(folder.clone());
    }
    std::fs::create_dir_all(data_dir)?;
    let text: String = folders
        .iter()
        .map(|f| format!("{}\n", f.display()))
        .collect();
    crate::atomic_file::write_atomically(&data_dir.join(ADDED_FILE), |w| {
        std::io::Write::write_all(w, text.as_bytes())
    })?;
    Ok(folder)
}

/// The folder lora-studio keeps its own data in: `LORA_STUDIO_DATA_DIR`, else the platform's data folder
/// (`$XDG_DATA_HOME/lora-studio`, `~/.local/share/lora-studio`, `~/Library/Application Support/lora-studio`,
/// `%APPDATA%\lora-studio`).
pub fn data_dir() -> PathBuf {
    let var = |name: &str| {
        std::env::var_os(name)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(dir) = var("LORA_STUDIO_DATA_DIR") {
        return dir;
    }
    if cfg!(windows) {
        return var("APPDATA").unwrap_or_default().join("lora-studio");
    }
    if cfg!(target_os = "macos") {
        return var("HOME")
            .unwrap_or_default()
            .join("Library/Application Support/lora-studio");
    }
    var("XDG_DATA_HOME")
        .or_else(|| var("HOME").map(|h| h.join(".local/share")))
        .unwrap_or_default()
        .join("lora-studio")
}

/// Scans the places `options` names.
pub fn discover(options: &DiscoveryOptions) -> Discovery {
    let deadline = Instant::now() + options.time_limit;
    let mut budget = walk::Budget::new(deadline);
    let mut cache = options
        .cache_file
        .as_deref()
        .map(DescriptionCache::load)
        .unwrap_or_default();
    let mut found = Discovery::default();
    let mut roots = installs::find_installs(options, &mut budget);
    if let Some(hub) = &options.hub_cache {
        roots.push((InstallKind::HuggingFaceCache, hub.clone()));
    }
    for (kind, root) in roots {
        let layout = installs::layout(kind, &root);
        for folder in &layout.lora_folders {
            found.lora_folders.push(LoraFolder {
                path: folder.clone(),
                source: kind,
            });
        }
        for candidate in installs::candidates(kind, &layout, &mut budget) {
            match cache.describe(&candidate, &mut found.cached) {
                Ok(Some((family, precision, size_bytes))) => found.models.push(DiscoveredModel {
                    name: installs::short_name(kind, &candidate),
                    path: candidate,
                    family,
                    size_bytes,
                    precision,
                    source: kind,
                    source_root: root.clone(),
                }),
                Ok(None) => {}
                Err(reason) => found.skipped.push((candidate, reason)),
            }
        }
    }
    found.incomplete = budget.exhausted();
    dedup(&mut found);
    found
        .models
        .sort_by(|a, b| (a.family, &a.name, &a.path).cmp(&(b.family, &b.name, &b.path)));
    if let Some(file) = &options.cache_file {
        cache.save(file);
    }
    found
}

/// The same model reached twice (a symlinked models folder, an install named twice) is listed once.
fn dedup(found: &mut Discovery) {
    let mut seen = std::collections::HashSet::new();
    found
        .models
        .retain(|m| seen.insert(m.path.canonicalize().unwrap_or_else(|_| m.path.clone())));
    let mut seen = std::collections::HashSet::new();
    found
        .lora_folders
        .retain(|f| seen.insert(f.path.canonicalize().unwrap_or_else(|_| f.path.clone())));
}

/// The path a model argument means: an existing file or folder as it is, else the path of the discovered
/// model of that name (case-insensitive). An unknown name is one sentence listing the names there are.
pub fn resolve(argument: &Path, discovery: impl FnOnce() -> Discovery) -> Result<PathBuf, String> {
    if argument.exists() || argument.as_os_str().is_empty() {
        return Ok(argument.to_path_buf());
    }
    let name = argument.to_string_lossy();
    let looks_like_a_path = name.contains('/') || name.contains('\\') || name.contains('.');
    let found = discovery();
    let matches: Vec<&DiscoveredModel> = found
        .models
        .iter()
        .filter(|m| m.name.eq_ignore_ascii_case(&name))
        .collect();
    match matches.as_slice() {
        [one] => Ok(one.path.clone()),
        [] if looks_like_a_path => Err(format!("{name} does not exist")),
        [] => {
            let names: Vec<&str> = found.models.iter().map(|m| m.name.as_str()).collect();
            Err(if names.is_empty() {
                format!(
                    "{name} is neither a file nor a folder, and no models were found to match it by name \
                     (`lora-studio models` lists them; `lora-studio download` fetches one)"
                )
            } else {
                format!(
                    "{name} is neither a file nor a folder nor the name of a model found on this computer ({})",
                    names.join(", ")
                )
            })
        }
        several => Err(format!(
            "{name} names several models found on this computer ({}); give the path instead",
            several
                .iter()
                .map(|m| m.path.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}
