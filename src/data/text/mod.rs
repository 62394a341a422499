//! The training data of a language model: a `.jsonl`, `.json` or `.txt` file, or a folder of them (its
//! subfolders included), read into conversations and plain texts. Rows may be OpenAI chats
//! (`{"messages": [{"role", "content"}]}`), ShareGPT chats (`{"conversations": [{"from", "value"}]}`),
//! Alpaca instructions (`{"instruction", "input", "output", "system", "history"}`) or texts (`{"text"}`);
//! a `.txt` file is one text (continued pre-training). A bad row (invalid JSON, an unknown role, an empty
//! or missing assistant turn) is listed with its file and line and skipped; the dataset is an error only
//! when nothing trainable remains.
//!
//! The same files open for editing as a `ConversationDocument` (`document`): every row of a known shape
//! is an entry there, bad ones included, for the checks (`conversation_checks`) to point out.
//!
//! Knows text only: tokens, chat templates and what is trained on are the training task's. Scanning only
//! reads files; only the document writes them. Must not use train, worker or app.

mod conversation_checks;
mod document;
#[cfg(test)]
mod document_tests;
mod json_rows;
mod ordered_json;
mod row_edit;
mod rows;

use std::path::{Path, PathBuf};

pub use conversation_checks::conversation_badges;
pub use document::{ConversationDocument, EditError, Sample, UNDO_DEPTH};
pub use rows::{Role, TEXT_ROLE, Turn};

use super::DataError;

/// File extensions read as training text.
pub const TEXT_EXTENSIONS: [&str; 3] = ["jsonl", "json", "txt"];

/// LLaMA-Factory's description of the datasets in its data folder, which is not data.
const DATASET_INFO: &str = "dataset_info.json";

/// One trainable example.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TextSample {
    /// A conversation with at least one non-empty assistant turn.
    Conversation(Vec<Turn>),
    /// A text trained on as a whole.
    Text(String),
}

/// Where a row is: its file and (1-based) line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowPlace {
    pub file: PathBuf,
    pub line: usize,
}

impl std::fmt::Display for RowPlace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} line {}", self.file.display(), self.line)
    }
}

/// A row that is skipped, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadRow {
    pub place: RowPlace,
    pub reason: String,
}

impl std::fmt::Display for BadRow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.place, self.reason)
    }
}

/// The rows read from a dataset.
#[derive(Debug, Clone, Default)]
pub struct TextDataset {
    /// The file or folder given.
    pub root: PathBuf,
    /// The good rows, in file and line order.
    pub samples: Vec<(TextSample, RowPlace)>,
    pub bad_rows: Vec<BadRow>,
    /// The files read, relative to the root folder (the file's name for a single file).
    pub files: Vec<PathBuf>,
    /// A hash of the files' names and contents.
    pub fingerprint: String,
}

/// Reads the text dataset at `path` (a file, or a folder of files).
pub fn scan_text_dataset(path: &Path) -> Result<TextDataset, DataError> {
    let files = text_files(path)?;
    let mut dataset = TextDataset {
        root: path.to_path_buf(),
        ..TextDataset::default()
    };
    let mut fingerprint = String::new();
    for file in &files {
        let bytes = std::fs::read(file).map_err(|source| DataError::Io {
            path: file.clone(),
            source,
        })?;
        let relative = dataset_relative(path, file);
        fingerprint.push_str(&format!(
            "{}|{}\n",
            relative.display(),
            crate::hashing::sha256_hex(&bytes)
        ));
        read_file(file, &bytes, &mut dataset);
        dataset.files.push(relative);
    }
    dataset.fingerprint = crate::hashing::sha256_hex(fingerprint.as_bytes());
    if dataset.samples.is_empty() {
        return Err(nothing_to_train(path, &dataset.bad_rows));
    }
    Ok(dataset)
}

/// `file` relative to the dataset's `root` (its name when the root is the file itself).
fn dataset_relative(root: &Path, file: &Path) -> PathBuf {
    match file.strip_prefix(root) {
        Ok(relative) if !relative.as_os_str().is_empty() => relative.to_path_buf(),
        _ => file.file_name().map_or(file.to_path_buf(), PathBuf::from),
    }
}

/// The text files of `path`: itself, or every one in the folder and its subfolders (hidden ones and
/// `dataset_info.json` left out), sorted.
fn text_files(path: &Path) -> Result<Vec<PathBuf>, DataError> {
    let is_text = |p: &Path| {
        p.extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| TEXT_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
    };
    if path.is_file() {
        return if is_text(path) {
            Ok(vec![path.to_path_buf()])
        } else {
            Err(DataError::NotText {
                path: path.to_path_buf(),
            })
        };
    }
    if !path.is_dir() {
        return Err(DataError::NotAFolder {
            path: path.to_path_buf(),
        });
    }
    let mut found = Vec::new();
    let mut folders = vec![path.to_path_buf()];
    while let Some(folder) = folders.pop() {
        let entries = std::fs::read_dir(&folder).map_err(|source| DataError::Io {
            path: folder.clone(),
            source,
        })?;
        for entry in entries.flatten() {
            let entry_path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') || name == DATASET_INFO {
                continue;
            }
            if entry_path.is_dir() {
                folders.push(entry_path);
            } else if is_text(&entry_path) {
                found.push(entry_path);
            }
        }
    }
    if found.is_empty() {
        return Err(DataError::NoTextFiles {
            path: path.to_path_buf(),
        });
    }
    found.sort();
    Ok(found)
}

/// Adds the rows of one file (its bytes read) to `dataset`.
fn read_file(file: &Path, bytes: &[u8], dataset: &mut TextDataset) {
    let place = |line| RowPlace {
        file: file.to_path_buf(),
        line,
    };
    let Ok(text) = std::str::from_utf8(bytes) else {
        dataset.bad_rows.push(BadRow {
            place: place(1),
            reason: "the file is not UTF-8 text".into(),
        });
        return;
    };
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let extension = file
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or_default()
        .to_ascii_lowercase();
    if extension == "txt" {
        if text.trim().is_empty() {
            dataset.bad_rows.push(BadRow {
                place: place(1),
                reason: "the file is empty".into(),
            });
        } else {
            dataset
                .samples
                .push((TextSample::Text(text.to_string()), place(1)));
        }
        return;
    }
    for (line, row) in json_rows::json_rows(text, extension == "json") {
        match row.and_then(|value| rows::sample_of(&value)) {
            Ok(sample) => dataset.samples.push((sample, place(line))),
            Err(reason) => dataset.bad_rows.push(BadRow {
                place: place(line),
                reason,
            }),
        }
    }
}

/// The error of a dataset with no trainable row: one sentence, naming the first bad rows.
fn nothing_to_train(path: &Path, bad_rows: &[BadRow]) -> DataError {
    let reason = if bad_rows.is_empty() {
        "it holds no rows".to_string()
    } else if bad_rows.iter().all(|b| b.reason == rows::NO_ASSISTANT_TURN) {
        format!(
            "none of its {} conversations has an assistant turn to learn from",
            bad_rows.len()
        )
    } else {
        let shown: Vec<String> = bad_rows.iter().take(3).map(BadRow::to_string).collect();
        format!(
            "all {} rows are unusable ({}{})",
            bad_rows.len(),
            shown.join("; "),
            if bad_rows.len() > 3 { "; ..." } else { "" }
        )
    };
    DataError::NothingToTrain {
        path: path.to_path_buf(),
        reason,
    }
}
