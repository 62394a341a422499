//! Where captioning weights come from: a local model folder, a short name for a well-known captioner, or a
//! Hub repository, fetched through [`crate::hub`] (cache first, then download) with the files a captioner
//! needs: its config, its weights and, for BLIP, its vocabulary.

use std::path::{Path, PathBuf};

use super::LabelError;
use crate::hub::{DownloadReporter, HubRepo, HubSettings};

/// Short names for the captioners users ask for most.
pub const KNOWN_MODELS: [(&str, &str); 3] = [
    ("blip", "Salesforce/blip-image-captioning-large"),
    ("blip-base", "Salesforce/blip-image-captioning-base"),
    ("clip", "openai/clip-vit-large-patch14"),
];

/// Weight files, in order of preference.
const WEIGHT_FILES: [&str; 2] = ["model.safetensors", "pytorch_model.bin"];
/// Files BLIP's caption decoder reads its vocabulary from (the first that exists).
const VOCABULARY_FILES: [&str; 2] = ["vocab.txt", "tokenizer.json"];

/// Where a model named on the command line is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelLocation {
    Folder(PathBuf),
    /// A Hub repository id (`owner/name`).
    Hub(String),
}

/// Reads a model name: an existing folder, a short name from [`KNOWN_MODELS`], or a Hub repository id.
pub fn locate(name: &str) -> Result<ModelLocation, LabelError> {
    let path = Path::new(name);
    if path.is_dir() {
        return Ok(ModelLocation::Folder(path.to_path_buf()));
    }
    if let Some((_, repo)) = KNOWN_MODELS.iter().find(|(short, _)| *short == name) {
        return Ok(ModelLocation::Hub(repo.to_string()));
    }
    if is_repository_id(name) {
        return Ok(ModelLocation::Hub(name.to_string()));
    }
    let short: Vec<&str> = KNOWN_MODELS.iter().map(|(s, _)| *s).collect();
    Err(LabelError::Input(format!(
        "the model `{name}` is neither a folder nor a known name ({}) nor a Hub repository (owner/name)",
        short.join(", ")
    )))
}

/// Whether `name` reads as a Hub repository id, `owner/name`.
pub fn is_repository_id(name: &str) -> bool {
    let parts: Vec<&str> = name.split('/').collect();
    let valid_part = |p: &str| {
        !p.is_empty()
            && p != "."
            && p != ".."
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    parts.len() == 2 && parts.iter().all(|p| valid_part(p))
}

/// The local folder holding the model named `name`, downloading what the cache lacks.
pub fn model_folder(
    name: &str,
    settings: &HubSettings,
    reporter: &mut dyn DownloadReporter,
) -> Result<PathBuf, LabelError> {
    match locate(name)? {
        ModelLocation::Folder(folder) => Ok(folder),
        ModelLocation::Hub(repo) => Ok(fetch(&HubRepo::open(&repo, settings)?, reporter)?),
    }
}

/// The snapshot folder of `hub` with the config, the weights and (BLIP) the vocabulary.
fn fetch(
    hub: &HubRepo,
    reporter: &mut dyn DownloadReporter,
) -> Result<PathBuf, crate::hub::HubError> {
    let folder_of = |file: &Path| {
        file.parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."))
    };
    let (config, config_downloaded) = match hub.cached("config.json") {
        Some(path) => (path, false),
        None => {
            if !hub.online() {
                return Err(crate::hub::HubError::Unavailable(format!(
                    "{} is not in the Hugging Face cache {} and downloads are off (--offline or HF_HUB_OFFLINE=1)",
                    hub.name(),
                    hub.settings().cache_dir.display()
                )));
            }
            let (file, _) = hub.first_available(&["config.json"])?;
            (hub.download(&file, reporter)?, true)
        }
    };
    let folder = folder_of(&config);
    let text = std::fs::read_to_string(&config).unwrap_or_default();
    let is_blip = serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| Some(v.get("model_type")?.as_str()? == "blip"))
        .unwrap_or(false);
    let mut wanted: Vec<&[&str]> = vec![&WEIGHT_FILES];
    if is_blip {
        wanted.push(&VOCABULARY_FILES);
    }
    let missing: Vec<&[&str]> = wanted
        .into_iter()
        .filter(|alternatives| !alternatives.iter().any(|f| hub.cached(f).is_some()))
        .collect();
    if missing.is_empty() {
        return Ok(folder);
    }
    if !hub.online() {
        return Err(crate::hub::HubError::Unavailable(format!(
            "{} is not complete in the Hugging Face cache {} (it lacks {}) and downloads are off (--offline or \
             HF_HUB_OFFLINE=1)",
            hub.name(),
            hub.settings().cache_dir.display(),
            missing[0].join(" or ")
        )));
    }
    let mut plan: Vec<(String, u64)> = Vec::new();
    if !config_downloaded {
        // A config cached from an older revision: fetch it again so every file lands in the snapshot of the
        // revision the Hub serves now.
        plan.push(hub.first_available(&["config.json"])?);
    }
    for alternatives in &missing {
        plan.push(hub.first_available(alternatives)?);
    }
    reporter.planned(hub.name(), &plan);
    let mut last = config;
    for (file, _) in &plan {
        last = hub.download(file, reporter)?;
    }
    Ok(folder_of(&last))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_folders_short_names_or_repositories() {
        let dir = tempfile::tempdir().unwrap();
        let folder = dir.path().to_str().unwrap();
        assert_eq!(
            locate(folder).unwrap(),
            ModelLocation::Folder(dir.path().to_path_buf())
        );
        assert_eq!(
            locate("blip").unwrap(),
            ModelLocation::Hub("Salesforce/blip-image-captioning-large".to_string())
        );
        assert_eq!(
            locate("me/my-captioner").unwrap(),
            ModelLocation::Hub("me/my-captioner".to_string())
        );
        for bad in [
            "nonsense",
            "a/b/c",
            "../lora-studio-no-such-model",
            "lora-studio-no-such-owner/..",
            "/no/such/folder",
        ] {
            let message = locate(bad).unwrap_err().to_string();
            assert!(message.contains("neither a folder"), "{bad}: {message}");
        }
    }
}
