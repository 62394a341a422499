//! Where each UI keeps its models: how an install folder is recognised (the files its own code ships with),
//! which of its folders hold base models and LoRA files, and where installs are usually put under the home
//! folder. The Hugging Face cache and folders the user added are read the same way.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::DiscoveryOptions;
use super::walk::Budget;

/// Where a model was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum InstallKind {
    Automatic1111,
    Forge,
    SdNext,
    ComfyUi,
    InvokeAi,
    Fooocus,
    HuggingFaceCache,
    /// A folder the user added (or named in an environment variable) that is none of the above.
    AddedFolder,
}

impl InstallKind {
    pub fn label(&self) -> &'static str {
        match self {
            InstallKind::Automatic1111 => "AUTOMATIC1111",
            InstallKind::Forge => "Forge",
            InstallKind::SdNext => "SD.Next",
            InstallKind::ComfyUi => "ComfyUI",
            InstallKind::InvokeAi => "InvokeAI",
            InstallKind::Fooocus => "Fooocus",
            InstallKind::HuggingFaceCache => "Hugging Face cache",
            InstallKind::AddedFolder => "added folder",
        }
    }
}

/// How deep below a home folder installs are looked for (`~/AI/ComfyUI` is depth 2).
const INSTALL_SEARCH_DEPTH: usize = 3;

/// How deep below a models folder model files are looked for (`checkpoints/SDXL/style/x.safetensors`).
const MODEL_SEARCH_DEPTH: usize = 3;

/// The install at `dir`, recognised by files its own code ships with.
pub fn detect(dir: &Path) -> Option<InstallKind> {
    let has = |relative: &str| dir.join(relative).exists();
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().to_lowercase())
        .unwrap_or_default();
    if has("webui.py") && has("models/Stable-diffusion") {
        return Some(if has("installer.py") {
            InstallKind::SdNext
        } else if has("modules_forge") || name.contains("forge") {
            InstallKind::Forge
        } else {
            InstallKind::Automatic1111
        });
    }
    if has("fooocus_version.py") && has("models/checkpoints") {
        return Some(InstallKind::Fooocus);
    }
    // ComfyUI's code (main.py, comfy/), or the desktop app's base folder (models/ and user/).
    if has("models/checkpoints") && ((has("main.py") && has("comfy")) || has("user/default")) {
        return Some(InstallKind::ComfyUi);
    }
    if has("invokeai.yaml") && has("models") {
        return Some(InstallKind::InvokeAi);
    }
    None
}

/// The installs under the home folder and the extra roots, with their kinds; an extra root that is not an
/// install is an added folder.
pub fn find_installs(
    options: &DiscoveryOptions,
    budget: &mut Budget,
) -> Vec<(InstallKind, PathBuf)> {
    let mut found = Vec::new();
    for root in &options.extra_roots {
        if root.is_dir() {
            found.push((
                detect(root).unwrap_or(InstallKind::AddedFolder),
                root.clone(),
            ));
        }
    }
    if let Some(home) = &options.home {
        let mut level = vec![home.clone()];
        for _ in 0..INSTALL_SEARCH_DEPTH {
            let mut next = Vec::new();
            for dir in level {
                for folder in budget.list(&dir).folders {
                    match detect(&folder) {
                        Some(kind) => found.push((kind, folder)),
                        None => next.push(folder),
                    }
                }
            }
            level = next;
        }
    }
    found
}

/// The folders of an install that hold base models and LoRA files.
#[derive(Debug, Default)]
pub struct Layout {
    pub model_folders: Vec<PathBuf>,
    pub lora_folders: Vec<PathBuf>,
}

/// Where `kind` keeps its models under `root` (the folders that exist).
pub fn layout(kind: InstallKind, root: &Path) -> Layout {
    let existing = |relative: &[&str]| -> Vec<PathBuf> {
        relative
            .iter()
            .map(|r| root.join(r))
            .filter(|p| p.is_dir())
            .collect()
    };
    match kind {
        InstallKind::Automatic1111 | InstallKind::Forge | InstallKind::SdNext => Layout {
            model_folders: existing(&["models/Stable-diffusion", "models/Diffusers"]),
            lora_folders: existing(&["models/Lora", "models/LyCORIS"]),
        },
        InstallKind::ComfyUi => Layout {
            model_folders: existing(&["models/checkpoints", "models/diffusers"]),
            lora_folders: existing(&["models/loras"]),
        },
        InstallKind::Fooocus => Layout {
            model_folders: existing(&["models/checkpoints"]),
            lora_folders: existing(&["models/loras"]),
        },
        InstallKind::InvokeAi => Layout {
            model_folders: existing(&["models"]),
            lora_folders: existing(&["models/sd-1/lora", "models/sdxl/lora"]),
        },
        InstallKind::HuggingFaceCache | InstallKind::AddedFolder => Layout {
            model_folders: existing(&["."]),
            lora_folders: Vec::new(),
        },
    }
}

/// The files and folders in `layout`'s model folders that may be base models: `.safetensors` and `.ckpt`
/// files, diffusers folders (`model_index.json`) and Hugging Face model folders (`config.json` beside
/// weights). In the Hugging Face cache, the snapshot each repository's `main` ref names.
pub fn candidates(kind: InstallKind, layout: &Layout, budget: &mut Budget) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for folder in &layout.model_folders {
        if kind == InstallKind::HuggingFaceCache {
            hub_cache_candidates(folder, budget, &mut found);
        } else {
            model_candidates(folder, MODEL_SEARCH_DEPTH, budget, &mut found);
        }
    }
    found
}

fn is_model_file(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("safetensors") || e.eq_ignore_ascii_case("ckpt"))
}

/// Whether `dir` is a model in folder form (diffusers, or a Hugging Face transformers model).
fn is_model_folder(dir: &Path) -> bool {
    dir.join("model_index.json").is_file()
        || (dir.join("config.json").is_file()
            && (dir.join("model.safetensors").is_file()
                || dir.join("model.safetensors.index.json").is_file()))
}

fn model_candidates(dir: &Path, depth: usize, budget: &mut Budget, found: &mut Vec<PathBuf>) {
    if is_model_folder(dir) {
        found.push(dir.to_path_buf());
        return;
    }
    let listing = budget.list(dir);
    found.extend(listing.files.into_iter().filter(|f| is_model_file(f)));
    if depth > 0 {
        for folder in listing.folders {
            model_candidates(&folder, depth - 1, budget, found);
        }
    }
}

/// The snapshot of every `models--OWNER--NAME` repository in a hub cache: the folder itself when it is a
/// model folder, else its top-level model files.
fn hub_cache_candidates(cache: &Path, budget: &mut Budget, found: &mut Vec<PathBuf>) {
    for repo in budget.list(cache).folders {
        let is_model_repo = repo
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("models--"));
        if !is_model_repo {
            continue;
        }
        let Ok(commit) = std::fs::read_to_string(repo.join("refs/main")) else {
            continue;
        };
        let snapshot = repo.join("snapshots").join(commit.trim());
        if is_model_folder(&snapshot) {
            found.push(snapshot);
        } else {
            found.extend(
                budget
                    .list(&snapshot)
                    .files
                    .into_iter()
                    .filter(|f| is_model_file(f)),
            );
        }
    }
}

/// The name a model goes by: its file or folder name without the extension, or for a Hugging Face cache
/// snapshot folder the repository's name (`stable-diffusion-v1-5` of `models--owner--stable-diffusion-v1-5`).
pub fn short_name(kind: InstallKind, path: &Path) -> String {
    if kind == InstallKind::HuggingFaceCache && path.is_dir() {
        let repo = path
            .ancestors()
            .find_map(|a| {
                a.file_name()?
                    .to_string_lossy()
                    .strip_prefix("models--")
                    .map(str::to_string)
            })
            .unwrap_or_default();
        if let Some((_, name)) = repo.split_once("--") {
            return name.to_string();
        }
    }
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if path.is_file() {
        return Path::new(&name)
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or(name);
    }
    name
}
