//! Where captioning weights come from: a local model folder, the Hugging Face cache (the layout
//! `huggingface_hub` and every Hub client share), or the Hub itself, downloaded on first use with the size
//! announced before any byte is fetched. An interrupted download resumes from its `.part` file. The endpoint
//! is configurable (`HF_ENDPOINT`, a mirror, or a local server in the tests).

use std::path::{Path, PathBuf};

use hf_hub::api::Progress;
use hf_hub::api::sync::{Api, ApiBuilder, ApiError};
use hf_hub::{Cache, Repo};

use super::LabelError;

/// Short names for the captioners users ask for most.
pub const KNOWN_MODELS: [(&str, &str); 3] = [
    ("blip", "Salesforce/blip-image-captioning-large"),
    ("blip-base", "Salesforce/blip-image-captioning-base"),
    ("clip", "openai/clip-vit-large-patch14"),
];

/// The Hub's address.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// Weight files, in order of preference.
const WEIGHT_FILES: [&str; 2] = ["model.safetensors", "pytorch_model.bin"];
/// Files BLIP's caption decoder reads its vocabulary from (the first that exists).
const VOCABULARY_FILES: [&str; 2] = ["vocab.txt", "tokenizer.json"];
/// How many times a broken transfer is resumed before giving up.
const DOWNLOAD_RETRIES: usize = 3;

/// How to reach the Hub and where its cache is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubSettings {
    pub endpoint: String,
    /// The hub cache folder (`…/huggingface/hub`).
    pub cache_dir: PathBuf,
    /// Only the cache is used; nothing is downloaded.
    pub offline: bool,
}

impl HubSettings {
    /// The settings `huggingface_hub` reads: `HF_ENDPOINT`, `HF_HUB_CACHE` or `HF_HOME`, `HF_HUB_OFFLINE`.
    pub fn from_env() -> Self {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let cache_dir = var("HF_HUB_CACHE").map(PathBuf::from).unwrap_or_else(|| {
            var("HF_HOME")
                .map(PathBuf::from)
                .or_else(|| var("HOME").map(|h| Path::new(&h).join(".cache/huggingface")))
                .unwrap_or_else(|| PathBuf::from(".cache/huggingface"))
                .join("hub")
        });
        Self {
            endpoint: var("HF_ENDPOINT").unwrap_or_else(|| DEFAULT_ENDPOINT.to_string()),
            cache_dir,
            offline: var("HF_HUB_OFFLINE")
                .is_some_and(|v| v == "1" || v.eq_ignore_ascii_case("true")),
        }
    }
}

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
    let parts: Vec<&str> = name.split('/').collect();
    let valid_part = |p: &str| {
        !p.is_empty()
            && p != "."
            && p != ".."
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    if parts.len() == 2 && parts.iter().all(|p| valid_part(p)) {
        return Ok(ModelLocation::Hub(name.to_string()));
    }
    let short: Vec<&str> = KNOWN_MODELS.iter().map(|(s, _)| *s).collect();
    Err(LabelError::Input(format!(
        "the model `{name}` is neither a folder nor a known name ({}) nor a Hub repository (owner/name)",
        short.join(", ")
    )))
}

/// What the downloader tells its caller.
pub trait DownloadReporter {
    /// Before anything is fetched: the files to download and their sizes in bytes.
    fn planned(&mut self, repo: &str, files: &[(String, u64)]);
    /// A file starts (or resumes); `size` is its full size.
    fn started(&mut self, file: &str, size: u64);
    /// `bytes` more of the current file are on disk.
    fn advanced(&mut self, bytes: u64);
    fn finished(&mut self, file: &str);
}

/// A reporter that says nothing.
impl DownloadReporter for () {
    fn planned(&mut self, _: &str, _: &[(String, u64)]) {}
    fn started(&mut self, _: &str, _: u64) {}
    fn advanced(&mut self, _: u64) {}
    fn finished(&mut self, _: &str) {}
}

/// The local folder holding the model named `name`, downloading what the cache lacks.
pub fn model_folder(
    name: &str,
    settings: &HubSettings,
    reporter: &mut dyn DownloadReporter,
) -> Result<PathBuf, LabelError> {
    match locate(name)? {
        ModelLocation::Folder(folder) => Ok(folder),
        ModelLocation::Hub(repo) => HubModel::new(&repo, settings)?.fetch(reporter),
    }
}

/// One Hub repository, its cache and (when online) its API.
struct HubModel<'a> {
    repo: String,
    settings: &'a HubSettings,
    cache: hf_hub::CacheRepo,
    api: Option<Api>,
}

impl<'a> HubModel<'a> {
    fn new(repo: &str, settings: &'a HubSettings) -> Result<Self, LabelError> {
        let cache = Cache::new(settings.cache_dir.clone()).repo(Repo::model(repo.to_string()));
        let api = if settings.offline {
            None
        } else {
            let api = ApiBuilder::from_cache(Cache::new(settings.cache_dir.clone()))
                .with_endpoint(settings.endpoint.trim_end_matches('/').to_string())
                .with_progress(false)
                .with_retries(DOWNLOAD_RETRIES)
                .build()
                .map_err(|e| LabelError::Download {
                    repo: repo.to_string(),
                    file: String::new(),
                    endpoint: settings.endpoint.clone(),
                    reason: e.to_string(),
                })?;
            Some(api)
        };
        Ok(Self {
            repo: repo.to_string(),
            settings,
            cache,
            api,
        })
    }

    fn failed(&self, file: &str, error: &ApiError) -> LabelError {
        LabelError::Download {
            repo: self.repo.clone(),
            file: file.to_string(),
            endpoint: self.settings.endpoint.clone(),
            reason: plain_api_error(error),
        }
    }

    /// The snapshot folder with the config, the weights and (BLIP) the vocabulary.
    fn fetch(&self, reporter: &mut dyn DownloadReporter) -> Result<PathBuf, LabelError> {
        let (config, config_downloaded) = self.config(reporter)?;
        let folder_of = |file: &Path| {
            file.parent()
                .map(Path::to_path_buf)
                .unwrap_or_else(|| PathBuf::from("."))
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
            .filter(|alternatives| !alternatives.iter().any(|f| self.cache.get(f).is_some()))
            .collect();
        let Some(api) = &self.api else {
            if missing.is_empty() {
                return Ok(folder);
            }
            return Err(LabelError::Input(format!(
                "{} is not complete in the Hugging Face cache {} (it lacks {}) and downloads are off (--offline or HF_HUB_OFFLINE=1)",
                self.repo,
                self.settings.cache_dir.display(),
                missing[0].join(" or ")
            )));
        };
        if missing.is_empty() {
            return Ok(folder);
        }
        let mut plan: Vec<(String, u64)> = Vec::new();
        if !config_downloaded {
            // A config cached from an older revision: fetch it again so every file lands in the snapshot
            // of the revision the Hub serves now.
            plan.push(self.first_available(api, &["config.json"])?);
        }
        for alternatives in &missing {
            plan.push(self.first_available(api, alternatives)?);
        }
        reporter.planned(&self.repo, &plan);
        let mut last = config;
        for (file, _) in &plan {
            last = self.download(api, file, reporter)?;
        }
        Ok(folder_of(&last))
    }

    /// `config.json` from the cache, or downloaded (then `true`).
    fn config(&self, reporter: &mut dyn DownloadReporter) -> Result<(PathBuf, bool), LabelError> {
        if let Some(path) = self.cache.get("config.json") {
            return Ok((path, false));
        }
        let Some(api) = &self.api else {
            return Err(LabelError::Input(format!(
                "{} is not in the Hugging Face cache {} and downloads are off (--offline or HF_HUB_OFFLINE=1)",
                self.repo,
                self.settings.cache_dir.display()
            )));
        };
        let (file, _) = self.first_available(api, &["config.json"])?;
        Ok((self.download(api, &file, reporter)?, true))
    }

    /// The first of `alternatives` the repository has, with its size.
    fn first_available(
        &self,
        api: &Api,
        alternatives: &[&str],
    ) -> Result<(String, u64), LabelError> {
        let repo = api.model(self.repo.clone());
        let mut first_error = None;
        for file in alternatives {
            match api.metadata(&repo.url(file)) {
                Ok(metadata) => return Ok((file.to_string(), metadata.size() as u64)),
                Err(error) if is_not_found(&error) => {}
                Err(error) => {
                    first_error.get_or_insert_with(|| self.failed(file, &error));
                }
            }
        }
        Err(first_error.unwrap_or_else(|| {
            LabelError::Input(format!(
                "the Hub repository {} (at {}) has no {}",
                self.repo,
                self.settings.endpoint,
                alternatives.join(" or ")
            ))
        }))
    }

    fn download(
        &self,
        api: &Api,
        file: &str,
        reporter: &mut dyn DownloadReporter,
    ) -> Result<PathBuf, LabelError> {
        let progress = ProgressAdapter { reporter };
        let path = api
            .model(self.repo.clone())
            .download_with_progress(file, progress)
            .map_err(|e| self.failed(file, &e))?;
        reporter.finished(file);
        Ok(path)
    }
}

/// Feeds hf-hub's progress calls to a [`DownloadReporter`].
struct ProgressAdapter<'a> {
    reporter: &'a mut dyn DownloadReporter,
}

impl Progress for ProgressAdapter<'_> {
    fn init(&mut self, size: usize, filename: &str) {
        self.reporter.started(filename, size as u64);
    }

    fn update(&mut self, size: usize) {
        self.reporter.advanced(size as u64);
    }

    fn finish(&mut self) {}
}

fn is_not_found(error: &ApiError) -> bool {
    matches!(error, ApiError::RequestError(e) if matches!(**e, ureq::Error::StatusCode(404)))
}

/// The error without hf-hub's nesting (`request error: …`), as a sentence fragment.
fn plain_api_error(error: &ApiError) -> String {
    match error {
        ApiError::RequestError(e) => match &**e {
            ureq::Error::StatusCode(code) => format!("the server answered HTTP {code}"),
            other => other.to_string(),
        },
        ApiError::TooManyRetries(inner) => format!(
            "the transfer kept breaking off ({}); run again to resume it",
            plain_api_error(inner)
        ),
        other => other.to_string(),
    }
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
