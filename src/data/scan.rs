//! Finding the training images and their captions.
//!
//! Images sit in the dataset folder itself or in its subfolders; a subfolder named `N_name` (kohya's
//! convention) repeats its images N times. Captions are taken, in this order, from `metadata.csv`, then a
//! `.txt`/`.caption` sidecar, then the instance prompt. Images are only read, never written.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use super::DataError;
use super::captions::{CaptionSource, read_metadata_csv, read_sidecar, with_trigger};
use super::images::oriented_dimensions;
use crate::config::TrainConfig;

/// Image file extensions that are read.
pub const IMAGE_EXTENSIONS: [&str; 5] = ["jpg", "jpeg", "png", "webp", "bmp"];

/// One training image.
#[derive(Debug, Clone, PartialEq)]
pub struct DatasetItem {
    pub path: PathBuf,
    /// Path relative to the dataset folder (the name `metadata.csv` uses).
    pub relative: PathBuf,
    /// The caption with the trigger word applied ("" when there is none).
    pub caption: String,
    /// The caption as stored in its source, without the trigger word.
    pub raw_caption: Option<String>,
    pub caption_source: Option<CaptionSource>,
    pub repeats: u32,
    /// Size after the EXIF orientation is applied.
    pub width: u32,
    pub height: u32,
}

/// The images of one folder of the dataset.
#[derive(Debug, Clone, PartialEq)]
pub struct FolderSummary {
    /// The folder's name relative to the dataset (empty for the dataset folder itself).
    pub name: String,
    pub repeats: u32,
    pub images: usize,
}

/// A scanned dataset.
#[derive(Debug, Clone, Default)]
pub struct Dataset {
    pub root: PathBuf,
    /// The `metadata.csv` captions were read from, if any (edits to its captions go back there).
    pub metadata_csv: Option<PathBuf>,
    pub items: Vec<DatasetItem>,
    pub folders: Vec<FolderSummary>,
    /// Images with no caption from any source (they train with the trigger word or an empty caption).
    pub missing_captions: Vec<PathBuf>,
    /// Images that could not be read, or whose caption file could not be, with the reason; they are skipped.
    pub unreadable: Vec<(PathBuf, String)>,
}

impl Dataset {
    /// Images per epoch, repeats included.
    pub fn samples_per_epoch(&self) -> usize {
        self.items.iter().map(|i| i.repeats as usize).sum()
    }
}

/// Scans `config.train_data_dir`.
pub fn scan_dataset(config: &TrainConfig) -> Result<Dataset, DataError> {
    let root = &config.train_data_dir;
    if !root.is_dir() {
        return Err(DataError::NotAFolder { path: root.clone() });
    }
    let csv_path = config.metadata_path.clone().or_else(|| {
        let inside = root.join("metadata.csv");
        inside.is_file().then_some(inside)
    });
    let csv = match &csv_path {
        Some(path) => read_metadata_csv(path, root)?,
        None => Default::default(),
    };

    let mut folders: BTreeMap<PathBuf, u32> = BTreeMap::new();
    folders.insert(PathBuf::new(), config.repeats);
    for entry in read_dir_sorted(root)? {
        let name = entry
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if entry.is_dir() && !name.starts_with('.') {
            folders.insert(
                PathBuf::from(&name),
                folder_repeats(&name).unwrap_or(1) * config.repeats,
            );
        }
    }

    let mut dataset = Dataset {
        root: root.clone(),
        metadata_csv: csv_path.clone(),
        items: Vec::new(),
        folders: Vec::new(),
        missing_captions: Vec::new(),
        unreadable: Vec::new(),
    };
    for (folder, repeats) in folders {
        let mut count = 0;
        for path in read_dir_sorted(&root.join(&folder))? {
            if !path.is_file() || !is_image(&path) {
                continue;
            }
            let relative = folder.join(path.file_name().unwrap_or_default());
            let (width, height) = match oriented_dimensions(&path) {
                Ok(size) => size,
                Err(reason) => {
                    dataset.unreadable.push((path, reason));
                    continue;
                }
            };
            // An empty caption counts as none, so the instance prompt or the missing-caption list applies.
            let from_csv = csv.get(&relative).filter(|c| !c.is_empty());
            let from_sidecar = match from_csv {
                Some(_) => None,
                None => match read_sidecar(&path, &config.caption_extension) {
                    Ok(sidecar) => sidecar.filter(|c| !c.is_empty()),
                    Err(error) => {
                        dataset.unreadable.push((path, error.to_string()));
                        continue;
                    }
                },
            };
            let (caption, source) = if let Some(caption) = from_csv {
                (Some(caption.clone()), Some(CaptionSource::MetadataCsv))
            } else if let Some(caption) = from_sidecar {
                (Some(caption), Some(CaptionSource::Sidecar))
            } else if let Some(prompt) = &config.instance_prompt {
                (Some(prompt.clone()), Some(CaptionSource::InstancePrompt))
            } else {
                (None, None)
            };
            if caption.is_none() {
                dataset.missing_captions.push(relative.clone());
            }
            let trained = with_trigger(
                caption.as_deref().unwrap_or(""),
                config.trigger_word.as_deref(),
            );
            dataset.items.push(DatasetItem {
                path,
                relative,
                caption: trained,
                raw_caption: caption,
                caption_source: source,
                repeats,
                width,
                height,
            });
            count += 1;
        }
        if count > 0 {
            dataset.folders.push(FolderSummary {
                name: folder.to_string_lossy().into_owned(),
                repeats,
                images: count,
            });
        }
    }
    list_csv_rows_without_images(&csv, &mut dataset);
    if dataset.items.is_empty() {
        return Err(DataError::NoImages {
            path: root.clone(),
            unreadable: dataset.unreadable.len(),
        });
    }
    Ok(dataset)
}

/// Adds the `metadata.csv` rows that name no image of the dataset to `dataset.unreadable`.
fn list_csv_rows_without_images(csv: &HashMap<PathBuf, String>, dataset: &mut Dataset) {
    let known: HashSet<PathBuf> = dataset
        .items
        .iter()
        .map(|item| dataset.root.join(&item.relative))
        .chain(dataset.unreadable.iter().map(|(path, _)| path.clone()))
        .collect();
    let mut orphans: Vec<PathBuf> = csv
        .keys()
        .map(|relative| dataset.root.join(relative))
        .filter(|path| !known.contains(path))
        .collect();
    orphans.sort();
    for path in orphans {
        let reason = if !path.is_file() {
            "metadata.csv names it, but there is no such file in the dataset folder"
        } else if !is_image(&path) {
            "metadata.csv names it, but it is not an image lora-studio reads (jpg, png, webp, bmp)"
        } else {
            "metadata.csv names it, but it is in a folder that is not scanned (hidden, or more than one level deep)"
        };
        dataset.unreadable.push((path, reason.to_string()));
    }
}

fn read_dir_sorted(dir: &Path) -> Result<Vec<PathBuf>, DataError> {
    let entries = std::fs::read_dir(dir).map_err(|source| DataError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    paths.sort();
    Ok(paths)
}

/// The `N` of a kohya `N_name` folder.
fn folder_repeats(name: &str) -> Option<u32> {
    let (number, rest) = name.split_once('_')?;
    if rest.is_empty() {
        return None;
    }
    number.parse().ok().filter(|&n| n > 0)
}

pub fn is_image(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}
