//! Saving edited captions back to where they came from, atomically: a caption from `metadata.csv` is
//! rewritten there (every other row kept as it was), one from a sidecar in its sidecar, and a new caption
//! goes to the dataset's `metadata.csv` if it has one, else to a `.txt` sidecar.

use std::path::{Path, PathBuf};

use super::DataError;
use super::captions::CaptionSource;
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

/// Writes `caption` for `relative` (a path relative to the dataset folder) to `target`.
pub fn save_caption(
    target: &CaptionTarget,
    relative: &Path,
    caption: &str,
) -> Result<(), DataError> {
    match target {
        CaptionTarget::Sidecar(path) => {
            write_atomically(path, |w| std::io::Write::write_all(w, caption.as_bytes())).map_err(
                |source| DataError::Io {
                    path: path.clone(),
                    source,
                },
            )
        }
        CaptionTarget::Csv(path) => rewrite_csv(path, relative, caption),
    }
}

/// Replaces (or appends) the row of `relative` in a `metadata.csv`, keeping the other rows and the header.
fn rewrite_csv(path: &Path, relative: &Path, caption: &str) -> Result<(), DataError> {
    let bad = |reason: String| DataError::Metadata {
        path: path.to_path_buf(),
        reason,
    };
    let text = match std::fs::read(path) {
        Ok(bytes) => {
            String::from_utf8(bytes).map_err(|_| bad("it is not UTF-8 text".to_string()))?
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(source) => {
            return Err(DataError::Io {
                path: path.to_path_buf(),
                source,
            });
        }
    };
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    let mut rows: Vec<Vec<String>> = Vec::new();
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .from_reader(text.as_bytes());
    for record in reader.records() {
        let record = record.map_err(|e| bad(format!("it cannot be read ({e})")))?;
        rows.push(record.iter().map(str::to_string).collect());
    }
    let mut has_header = rows.first().is_some_and(|r| {
        r.first().is_some_and(|f| {
            matches!(
                f.trim().to_ascii_lowercase().as_str(),
                "file_name" | "file" | "filename"
            )
        })
    });
    if rows.is_empty() {
        rows.push(vec!["file_name".to_string(), "text".to_string()]);
        has_header = true;
    }
    let (file_column, text_column) = if has_header {
        let header: Vec<String> = rows[0]
            .iter()
            .map(|f| f.trim().to_ascii_lowercase())
            .collect();
        let file = header
            .iter()
            .position(|f| matches!(f.as_str(), "file_name" | "file" | "filename"))
            .unwrap_or(0);
        let text = header
            .iter()
            .position(|f| matches!(f.as_str(), "text" | "caption" | "prompt"))
            .unwrap_or(if file == 0 { 1 } else { 0 });
        (file, text)
    } else {
        (0, 1)
    };
    let name = relative.to_string_lossy().replace('\\', "/");
    let first_data = usize::from(has_header);
    let existing = rows
        .iter()
        .skip(first_data)
        .position(|r| r.get(file_column).is_some_and(|f| f.trim() == name));
    let width = file_column.max(text_column) + 1;
    match existing {
        Some(index) => {
            let row = &mut rows[index + first_data];
            row.resize(row.len().max(width), String::new());
            row[text_column] = caption.to_string();
        }
        None => {
            let mut row = vec![String::new(); width];
            row[file_column] = name;
            row[text_column] = caption.to_string();
            rows.push(row);
        }
    }
    let mut writer = csv::WriterBuilder::new()
        .flexible(true)
        .from_writer(Vec::new());
    for row in &rows {
        writer.write_record(row).map_err(|e| bad(e.to_string()))?;
    }
    let bytes = writer.into_inner().map_err(|e| bad(e.to_string()))?;
    write_atomically(path, |w| std::io::Write::write_all(w, &bytes)).map_err(|source| {
        DataError::Io {
            path: path.to_path_buf(),
            source,
        }
    })
}
