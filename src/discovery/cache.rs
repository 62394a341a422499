//! The descriptions of models seen before, kept between scans and keyed by path with the size and
//! modification time that were read (for a folder, of its config file), so a model is read again only when
//! it changed. Kept as JSON in the data folder, written atomically; a damaged cache is ignored.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use serde::{Deserialize, Serialize};

use super::Family;
use super::classify::describe;

/// Size and modification time (nanoseconds since 1970) of what a description was read from.
type Stamp = (u64, u128);

/// One remembered description; `None` for a file that is no base model (a LoRA in a checkpoints folder).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Entry {
    stamp: Stamp,
    description: Option<(Family, String, u64)>,
}

/// Descriptions by path.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct DescriptionCache {
    entries: HashMap<PathBuf, Entry>,
    #[serde(skip)]
    changed: bool,
}

impl DescriptionCache {
    /// The cache in `file`; empty when it is missing or unreadable.
    pub fn load(file: &Path) -> Self {
        std::fs::read(file)
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default()
    }

    /// Writes the cache to `file` if anything changed (best effort: a scan is never failed by its cache).
    pub fn save(&self, file: &Path) {
        if !self.changed {
            return;
        }
        let Ok(json) = serde_json::to_vec(self) else {
            return;
        };
        if let Some(folder) = file.parent() {
            let _ = std::fs::create_dir_all(folder);
        }
        let _ = crate::atomic_file::write_atomically(file, |w| std::io::Write::write_all(w, &json));
    }

    /// The description of `path`: from the cache when the file is unchanged (counted in `hits`), else read
    /// from its header and remembered.
    pub fn describe(
        &mut self,
        path: &Path,
        hits: &mut usize,
    ) -> Result<Option<(Family, String, u64)>, String> {
        let stamp = stamp(path);
        if let (Some(stamp), Some(entry)) = (stamp, self.entries.get(path))
            && entry.stamp == stamp
        {
            *hits += 1;
            return Ok(entry.description.clone());
        }
        let description = describe(path)?;
        if let Some(stamp) = stamp {
            self.entries.insert(
                path.to_path_buf(),
                Entry {
                    stamp,
                    description: description.clone(),
                },
            );
            self.changed = true;
        }
        Ok(description)
    }
}

/// The size and modification time a description depends on: the file's, or a model folder's config
/// file's.
fn stamp(path: &Path) -> Option<Stamp> {
    let file = if path.is_dir() {
        ["model_index.json", "config.json"]
            .iter()
            .map(|name| path.join(name))
            .find(|p| p.is_file())?
    } else {
        path.to_path_buf()
    };
    let meta = std::fs::metadata(file).ok()?;
    let modified = meta
        .modified()
        .ok()?
        .duration_since(UNIX_EPOCH)
        .ok()?
        .as_nanos();
    Some((meta.len(), modified))
}
