//! Saving captions back to where they came from, atomically and one save at a time: a caption from
//! `metadata.csv` is rewritten there (every other row kept byte for byte), one from a sidecar in its sidecar,
//! and a new caption goes to the dataset's `metadata.csv` if it has one, else to a `.txt` sidecar. Every
//! caption write of the program (edits in the app, auto-captioning in the app and in `lora-studio label`)
//! goes through `save_caption`. Must not modify images.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::DataError;
use super::captions::CaptionSource;
use super::metadata_csv::MetadataCsv;
use crate::atomic_file::write_atomically;

/// Where one image's caption is saved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CaptionTarget {
    /// A row of this `metadata.csv`.
    Csv(PathBuf),
    /// This sidecar file.
    Sidecar(PathBuf),
}

/// Decides where the caption of `relative` is saved.
pub fn caption_target(
    root: &Path,
    relative: &Path,
    metadata_csv: Option<&Path>,
    source: Option<CaptionSource>,
    caption_extension: &str,
) -> CaptionTarget {
    let image = root.join(relative);
    let sidecar = |ext: &str| image.with_extension(ext.trim_start_matches('.'));
    match (source, metadata_csv) {
        (Some(CaptionSource::Sidecar), _) => {
            let configured = sidecar(caption_extension);
            if configured.is_file() {
                return CaptionTarget::Sidecar(configured);
            }
            ["txt", "caption"]
                .iter()
                .map(|e| sidecar(e))
                .find(|p| p.is_file())
                .map_or(CaptionTarget::Sidecar(configured), CaptionTarget::Sidecar)
        }
        (_, Some(csv)) => CaptionTarget::Csv(csv.to_path_buf()),
        (_, None) => CaptionTarget::Sidecar(sidecar(caption_extension)),
    }
}

/// What a save does where the image already has a caption.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IfCaptioned {
    /// Replace it (an edit typed by the user, a run asked to overwrite).
    Replace,
    /// Keep it and write nothing (an auto-caption for an image captioned since the run was planned).
    Keep,
}

/// What a save did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Saved {
    Written,
    /// The image had a caption and `IfCaptioned::Keep` was asked.
    KeptExisting,
}

/// Caption writes of this process, one at a time: a save reads, changes and rewrites a whole file, so two
/// threads saving into the same `metadata.csv` (an edit in the app, the auto-captioner) would otherwise
/// each write back what they read and lose the other's row. Saves take milliseconds, so one lock for all
/// caption files costs nothing.
static CAPTION_WRITES: Mutex<()> = Mutex::new(());

/// Writes `caption` for `relative` (a path relative to the dataset folder) to `target`. Whether the image
/// already has a caption there is decided in the same step as the write, so no other save can come between.
pub fn save_caption(
    target: &CaptionTarget,
    relative: &Path,
    caption: &str,
    if_captioned: IfCaptioned,
) -> Result<Saved, DataError> {
    // A panic while holding the lock cannot leave a file half-written (writes are atomic), so carry on.
    let _one_at_a_time = CAPTION_WRITES
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let keep = if_captioned == IfCaptioned::Keep;
    let (path, text) = match target {
        CaptionTarget::Sidecar(path) => {
            // Read only when it matters: an edit replaces whatever the sidecar holds.
            let kept = keep
                && !String::from_utf8_lossy(&read_if_any(path)?)
                    .trim()
                    .is_empty();
            if kept {
                return Ok(Saved::KeptExisting);
            }
            (path, caption.to_string())
        }
        CaptionTarget::Csv(path) => {
            let csv = MetadataCsv::parse(path, read_if_any(path)?)?;
            let captioned = csv
                .caption_of(relative)
                .is_some_and(|c| !c.trim().is_empty());
            if keep && captioned {
                return Ok(Saved::KeptExisting);
            }
            (path, csv.with_caption(relative, caption)?)
        }
    };
    write_atomically(path, |w| std::io::Write::write_all(w, text.as_bytes())).map_err(
        |source| DataError::Io {
            path: path.clone(),
            source,
        },
    )?;
    Ok(Saved::Written)
}

/// The bytes of `path`, or none when it does not exist yet.
fn read_if_any(path: &Path) -> Result<Vec<u8>, DataError> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(bytes),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(source) => Err(DataError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}
