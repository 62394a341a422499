//! The Hugging Face Hub and its cache, in the layout `huggingface_hub` and every Hub client share, so a file
//! downloaded here is found by the Python tools and the other way round. Downloads announce their size before
//! any byte is fetched, check that the disk has room, resume from their `.part` file after a cut (in the same
//! run or the next), and are checked against the Hub's SHA-256 (the ETag of a large file); a file that does
//! not match is deleted, never kept. The endpoint (`HF_ENDPOINT`, a mirror, a local server in the tests) and
//! offline mode are respected. Knows nothing about what the files are for: must not use models, train,
//! worker or the app.

mod disk;

use std::path::{Path, PathBuf};

use hf_hub::api::Progress;
use hf_hub::api::sync::{Api, ApiBuilder, ApiError};
use hf_hub::{Cache, Repo};

/// The Hub's address.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// How many times a broken transfer is resumed before giving up.
const DOWNLOAD_RETRIES: usize = 3;

/// Free space kept on top of a download's size: the disk is not filled to the last byte.
const SPARE_BYTES: u64 = 256 << 20;

/// What can go wrong reaching the Hub or its cache; each is one sentence.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// The file or repository cannot be had as things stand (offline, not on the Hub, a bad name).
    #[error("{0}")]
    Unavailable(String),
    #[error("could not download `{file}` of {repo} from {endpoint}: {reason}")]
    Download {
        repo: String,
        file: String,
        endpoint: String,
        reason: String,
    },
    #[error(
        "the downloaded `{file}` of {repo} does not match the Hub's SHA-256 ({expected}, the file has {found}); \
         it was deleted: run again to download it afresh"
    )]
    Corrupt {
        repo: String,
        file: String,
        expected: String,
        found: String,
    },
    #[error(
        "`{file}` of {repo} needs {} but {} has {} free; free some space or choose another cache folder",
        crate::hub::human_bytes(*needed),
        folder.display(),
        crate::hub::human_bytes(*available)
    )]
    NoSpace {
        repo: String,
        file: String,
        folder: PathBuf,
        needed: u64,
        available: u64,
    },
    #[error("cannot read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

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
        Self {
            endpoint: var("HF_ENDPOINT").unwrap_or_else(|| DEFAULT_ENDPOINT.to_string()),
            cache_dir: default_cache_dir(),
            offline: var("HF_HUB_OFFLINE")
                .is_some_and(|v| v == "1" || v.eq_ignore_ascii_case("true")),
        }
    }
}

/// The hub cache `huggingface_hub` uses: `HF_HUB_CACHE`, else `HF_HOME/hub`, else
/// `~/.cache/huggingface/hub`.
pub fn default_cache_dir() -> PathBuf {
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    var("HF_HUB_CACHE").map(PathBuf::from).unwrap_or_else(|| {
        var("HF_HOME")
            .map(PathBuf::from)
            .or_else(|| var("HOME").map(|h| Path::new(&h).join(".cache/huggingface")))
            .unwrap_or_else(|| PathBuf::from(".cache/huggingface"))
            .join("hub")
    })
}

/// `1.9 GiB`, `120 MiB`, `4.0 KiB`.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else if value >= 100.0 {
        format!("{value:.0} {}", UNITS[unit])
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// What a download tells its caller.
pub trait DownloadReporter {
    /// Before anything is fetched: the files to download and their sizes in bytes.
    fn planned(&mut self, repo: &str, files: &[(String, u64)]);
    /// A file starts (or resumes); `size` is its full size.
    fn started(&mut self, file: &str, size: u64);
    /// `bytes` more of the current file are on disk (a resumed file first reports what it already had).
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

/// The local path of `file` of the model repository `repo`, downloaded unless the cache has it.
pub fn fetch_file(
    repo: &str,
    file: &str,
    settings: &HubSettings,
    reporter: &mut dyn DownloadReporter,
) -> Result<PathBuf, HubError> {
    let mut paths = fetch_files(repo, &[file], settings, reporter)?;
    Ok(paths.remove(0))
}

/// The local paths of `files` of the model repository `repo` (one snapshot folder), downloading those the
/// cache lacks; every missing file is planned (with its size) before the first byte is fetched.
pub fn fetch_files(
    repo: &str,
    files: &[&str],
    settings: &HubSettings,
    reporter: &mut dyn DownloadReporter,
) -> Result<Vec<PathBuf>, HubError> {
    let hub = HubRepo::open(repo, settings)?;
    let missing: Vec<&str> = files
        .iter()
        .copied()
        .filter(|file| hub.cached(file).is_none())
        .collect();
    if !missing.is_empty() {
        if hub.api.is_none() {
            return Err(HubError::Unavailable(format!(
                "`{}` of {repo} is not in the Hugging Face cache {} and downloads are off (offline mode or \
                 HF_HUB_OFFLINE=1)",
                missing.join("`, `"),
                settings.cache_dir.display()
            )));
        }
        let planned = missing
            .iter()
            .map(|file| hub.first_available(&[file]))
            .collect::<Result<Vec<_>, _>>()?;
        reporter.planned(repo, &planned);
        for file in &missing {
            hub.download(file, reporter)?;
        }
    }
    files
        .iter()
        .map(|file| {
            hub.cached(file).ok_or_else(|| {
                HubError::Unavailable(format!(
                    "`{file}` of {repo} is not in the cache after its download"
                ))
            })
        })
        .collect()
}

/// One model repository of the Hub: its cache, and (when online) its API.
pub struct HubRepo<'a> {
    repo: String,
    settings: &'a HubSettings,
    cache: hf_hub::CacheRepo,
    api: Option<Api>,
}

impl<'a> HubRepo<'a> {
    pub fn open(repo: &str, settings: &'a HubSettings) -> Result<Self, HubError> {
        let cache = Cache::new(settings.cache_dir.clone()).repo(Repo::model(repo.to_string()));
        let api = if settings.offline {
            None
        } else {
            let api = ApiBuilder::from_cache(Cache::new(settings.cache_dir.clone()))
                .with_endpoint(settings.endpoint.trim_end_matches('/').to_string())
                .with_progress(false)
                .with_retries(DOWNLOAD_RETRIES)
                .build()
                .map_err(|e| HubError::Download {
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

    pub fn name(&self) -> &str {
        &self.repo
    }

    pub fn settings(&self) -> &HubSettings {
        self.settings
    }

    /// Whether downloads are possible (not offline).
    pub fn online(&self) -> bool {
        self.api.is_some()
    }

    /// The cached copy of `file` in the newest snapshot the cache knows, if any.
    pub fn cached(&self, file: &str) -> Option<PathBuf> {
        self.cache.get(file)
    }

    fn failed(&self, file: &str, error: &ApiError) -> HubError {
        HubError::Download {
            repo: self.repo.clone(),
            file: file.to_string(),
            endpoint: self.settings.endpoint.clone(),
            reason: plain_api_error(error),
        }
    }

    fn api(&self) -> Result<&Api, HubError> {
        self.api.as_ref().ok_or_else(|| {
            HubError::Unavailable(format!(
                "{} cannot be downloaded: downloads are off (offline mode or HF_HUB_OFFLINE=1)",
                self.repo
            ))
        })
    }

    /// The first of `alternatives` the repository has, with its size in bytes.
    pub fn first_available(&self, alternatives: &[&str]) -> Result<(String, u64), HubError> {
        let api = self.api()?;
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
            HubError::Unavailable(format!(
                "the Hub repository {} (at {}) has no {}",
                self.repo,
                self.settings.endpoint,
                alternatives.join(" or ")
            ))
        }))
    }

    /// Downloads `file` into the cache (resuming a `.part` file a cut left) after checking the disk has
    /// room for it, and checks it against the Hub's SHA-256 when the Hub gives one.
    pub fn download(
        &self,
        file: &str,
        reporter: &mut dyn DownloadReporter,
    ) -> Result<PathBuf, HubError> {
        let api = self.api()?;
        let repo = api.model(self.repo.clone());
        let metadata = api
            .metadata(&repo.url(file))
            .map_err(|e| self.failed(file, &e))?;
        let size = metadata.size() as u64;
        let blob = self.cache.blob_path(metadata.etag());
        self.check_space(file, size, &blob)?;
        let path = repo
            .download_with_progress(file, ProgressAdapter { reporter })
            .map_err(|e| self.failed(file, &e))?;
        self.verify(file, metadata.etag(), &path, &blob)?;
        reporter.finished(file);
        Ok(path)
    }

    /// Fails when the cache's disk lacks room for the rest of a `size`-byte file (what a `.part` file
    /// already holds counts as written).
    fn check_space(&self, file: &str, size: u64, blob: &Path) -> Result<(), HubError> {
        let part = blob.with_extension("part");
        let written = std::fs::metadata(&part).map_or(0, |m| m.len());
        let needed = size.saturating_sub(written);
        let folder = existing_ancestor(&self.settings.cache_dir);
        if let Some(available) = disk::available_bytes(&folder)
            && available < needed + SPARE_BYTES
        {
            return Err(HubError::NoSpace {
                repo: self.repo.clone(),
                file: file.to_string(),
                folder,
                needed,
                available,
            });
        }
        Ok(())
    }

    /// Checks a downloaded file against the Hub's SHA-256 (the ETag of a large, LFS-stored file; small
    /// files have a git hash instead and are not checked), deleting it when it does not match.
    fn verify(&self, file: &str, etag: &str, path: &Path, blob: &Path) -> Result<(), HubError> {
        let expected = etag.trim_matches('"').to_ascii_lowercase();
        if expected.len() != 64 || !expected.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Ok(());
        }
        let found = crate::hashing::sha256_file(path).map_err(|source| HubError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        if found == expected {
            return Ok(());
        }
        let _ = std::fs::remove_file(path);
        let _ = std::fs::remove_file(blob);
        Err(HubError::Corrupt {
            repo: self.repo.clone(),
            file: file.to_string(),
            expected,
            found,
        })
    }
}

/// The nearest folder of `path` (or `path` itself) that exists, whose disk a new file would land on.
fn existing_ancestor(path: &Path) -> PathBuf {
    path.ancestors()
        .find(|p| p.is_dir())
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
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
    use super::human_bytes;

    #[test]
    fn sizes_read_as_people_write_them() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(4096), "4.0 KiB");
        assert_eq!(human_bytes(2_132_000_000), "2.0 GiB");
        assert_eq!(human_bytes(300 << 20), "300 MiB");
    }
}
