//! VAE latents computed once per image and preprocessing, kept in memory and optionally on disk under the
//! output folder. The key is a hash of the image's bytes and the preprocessing settings, so a second run
//! starts training at once and an edited image is re-encoded.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{Device, Tensor};

use super::DataError;
use crate::atomic_file::write_atomically;

/// An image's latent distribution (and loss mask) at latent resolution.
#[derive(Debug, Clone)]
pub struct CachedLatent {
    pub mean: Tensor,
    pub logvar: Tensor,
    pub mask: Option<Tensor>,
}

/// The cache.
#[derive(Debug)]
pub struct LatentCache {
    dir: Option<PathBuf>,
    memory: HashMap<String, CachedLatent>,
    /// How many entries were read back from disk rather than encoded.
    pub disk_hits: usize,
    pub encoded: usize,
}

/// The cache key for an image (by content) under a preprocessing description.
pub fn cache_key(image_hash: &str, preprocessing: &str) -> String {
    crate::hashing::sha256_hex(format!("{image_hash}|{preprocessing}").as_bytes())
}

impl LatentCache {
    /// A cache in memory, and on disk in `dir` when given.
    pub fn new(dir: Option<PathBuf>) -> Result<Self, DataError> {
        if let Some(dir) = &dir {
            std::fs::create_dir_all(dir).map_err(|source| DataError::Io {
                path: dir.clone(),
                source,
            })?;
        }
        Ok(Self {
            dir,
            memory: HashMap::new(),
            disk_hits: 0,
            encoded: 0,
        })
    }

    /// The entry for `key`, encoding it with `encode` on a miss.
    pub fn get_or_encode(
        &mut self,
        key: &str,
        device: &Device,
        encode: impl FnOnce() -> Result<CachedLatent, DataError>,
    ) -> Result<CachedLatent, DataError> {
        if let Some(hit) = self.memory.get(key) {
            return Ok(hit.clone());
        }
        if let Some(path) = self.path(key)
            && path.is_file()
            && let Some(hit) = read_entry(&path, device)
        {
            self.disk_hits += 1;
            self.memory.insert(key.to_string(), hit.clone());
            return Ok(hit);
        }
        let entry = encode()?;
        self.encoded += 1;
        if let Some(path) = self.path(key) {
            write_entry(&path, &entry)?;
        }
        self.memory.insert(key.to_string(), entry.clone());
        Ok(entry)
    }

    fn path(&self, key: &str) -> Option<PathBuf> {
        self.dir
            .as_ref()
            .map(|dir| dir.join(format!("{key}.safetensors")))
    }
}

/// A damaged cache file is not an error: the entry is simply encoded again.
fn read_entry(path: &std::path::Path, device: &Device) -> Option<CachedLatent> {
    let tensors = candle_core::safetensors::load(path, device).ok()?;
    Some(CachedLatent {
        mean: tensors.get("mean")?.clone(),
        logvar: tensors.get("logvar")?.clone(),
        mask: tensors.get("mask").cloned(),
    })
}

fn write_entry(path: &std::path::Path, entry: &CachedLatent) -> Result<(), DataError> {
    let mut tensors = vec![
        ("mean", entry.mean.clone()),
        ("logvar", entry.logvar.clone()),
    ];
    if let Some(mask) = &entry.mask {
        tensors.push(("mask", mask.clone()));
    }
    let bytes = safetensors_bytes(&tensors).map_err(|e| DataError::Tensor(e.to_string()))?;
    write_atomically(path, |w| std::io::Write::write_all(w, &bytes)).map_err(|source| {
        DataError::Io {
            path: path.to_path_buf(),
            source,
        }
    })
}

fn safetensors_bytes(tensors: &[(&str, Tensor)]) -> candle_core::Result<Vec<u8>> {
    let views = tensors
        .iter()
        .map(|(name, t)| (name.to_string(), t.clone()))
        .collect::<Vec<_>>();
    let data = safetensors::serialize(views.iter().map(|(n, t)| (n.as_str(), t)), None)
        .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    Ok(data)
}
