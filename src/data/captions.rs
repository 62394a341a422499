//! Where captions come from: `metadata.csv` (its layout is `metadata_csv`'s to decide), kohya
//! `.txt`/`.caption` sidecars, or one instance prompt; and keeping paths named in a CSV inside the dataset.

use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};

use super::DataError;
use super::metadata_csv::{MetadataCsv, row_path};

/// Where an image's caption was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CaptionSource {
    MetadataCsv,
    Sidecar,
    InstancePrompt,
}

/// Reads a `metadata.csv`: maps image paths (relative to `root`) to captions.
///
/// Paths that leave `root` (`..`, absolute paths, symlinks pointing outside) are refused.
pub fn read_metadata_csv(
    csv_path: &Path,
    root: &Path,
) -> Result<HashMap<PathBuf, String>, DataError> {
    let bad = |reason: String| DataError::Metadata {
        path: csv_path.to_path_buf(),
        reason,
    };
    let bytes = std::fs::read(csv_path).map_err(|source| DataError::Io {
        path: csv_path.to_path_buf(),
        source,
    })?;
    let csv = MetadataCsv::parse(csv_path, bytes)?;
    let canonical_root = root.canonicalize().map_err(|source| DataError::Io {
        path: root.to_path_buf(),
        source,
    })?;
    let mut captions = HashMap::new();
    for row in csv.rows() {
        let line = row.line;
        let file = csv.file(row);
        let Some(caption) = csv.caption(row) else {
            return Err(bad(format!("line {line} has no caption column")));
        };
        if file.is_empty() {
            return Err(bad(format!("line {line} names no file")));
        }
        if caption.contains(['\n', '\r']) {
            return Err(bad(format!(
                "line {line}: the caption of `{file}` runs over several lines; is a quote (\") left open?"
            )));
        }
        let relative = safe_relative_path(file, root, &canonical_root)
            .map_err(|reason| bad(format!("line {line}: `{file}` {reason}")))?;
        captions.insert(relative, caption.trim().to_string());
    }
    Ok(captions)
}

/// Checks that `file` names something inside `root` and returns it relative to `root`.
fn safe_relative_path(file: &str, root: &Path, canonical_root: &Path) -> Result<PathBuf, String> {
    let path = Path::new(file);
    if path.is_absolute()
        || path
            .components()
            .any(|c| matches!(c, Component::Prefix(_) | Component::RootDir))
    {
        return Err(
            "is an absolute path; paths must be relative to the dataset folder".to_string(),
        );
    }
    if path.components().any(|c| c == Component::ParentDir) {
        return Err("leaves the dataset folder (`..`)".to_string());
    }
    let full = root.join(path);
    if let Ok(resolved) = full.canonicalize()
        && !resolved.starts_with(canonical_root)
    {
        return Err("is a link that points outside the dataset folder".to_string());
    }
    Ok(row_path(file))
}

/// Reads the kohya sidecar caption of an image (`img.txt` or `img.caption`, or the configured extension).
pub fn read_sidecar(image: &Path, extension: &str) -> Result<Option<String>, DataError> {
    let extension = extension.trim_start_matches('.');
    let mut candidates = vec![image.with_extension(extension)];
    for other in ["txt", "caption"] {
        if other != extension {
            candidates.push(image.with_extension(other));
        }
    }
    for candidate in candidates {
        if candidate.is_file() {
            let bytes = std::fs::read(&candidate).map_err(|source| DataError::Io {
                path: candidate.clone(),
                source,
            })?;
            let text = String::from_utf8(bytes).map_err(|_| DataError::Caption {
                path: candidate.clone(),
                reason: "it is not UTF-8 text".to_string(),
            })?;
            let text = text.trim_start_matches('\u{feff}');
            // kohya reads the first line only.
            let caption = text.lines().next().unwrap_or("").trim().to_string();
            return Ok(Some(caption));
        }
    }
    Ok(None)
}

/// Prefixes the trigger word unless the caption already contains it.
pub fn with_trigger(caption: &str, trigger: Option<&str>) -> String {
    match trigger.map(str::trim).filter(|t| !t.is_empty()) {
        Some(trigger) if !caption.contains(trigger) => {
            if caption.is_empty() {
                trigger.to_string()
            } else {
                format!("{trigger}, {caption}")
            }
        }
        _ => caption.to_string(),
    }
}
