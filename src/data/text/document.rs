//! A language model's dataset opened for editing: the same files `scan_text_dataset` reads, every row of a
//! known shape an entry (leniently: unknown roles and empty turns included, for the checks to point out),
//! every other row listed as unparsed and kept as it is.
//!
//! An edit changes the rows of the files it touches and writes them at once, atomically: rows of a JSON
//! Lines file that the edit does not touch keep their exact bytes (each row keeps its text and what follows
//! it), an edited row is written again in its own format with its keys in their order (`row_edit`). A file
//! that changed on disk since it was read is never overwritten. Rows are shared (`Arc`), so an edit or an
//! undo step copies pointers, not the dataset's text.
//!
//! Must not tokenize or know of chat templates (the worker counts tokens with `train`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use super::json_rows::{RowLayout, UNCLOSED_ARRAY, parse, row_spans};
use super::ordered_json::Json;
use super::row_edit::{empty_row, set_turns};
use super::rows::{RowTurns, TEXT_ROLE, read_row};
use super::{dataset_relative, text_files};
use crate::data::DataError;
use crate::messages::{ChatTurn, ConversationEntry, RowFormat};

/// How many edits can be undone.
pub const UNDO_DEPTH: usize = 100;

/// Why an edit was not made.
#[derive(Debug, thiserror::Error)]
pub enum EditError {
    #[error(transparent)]
    Data(#[from] DataError),
    #[error("{} changed on disk since it was opened; open it again", .path.display())]
    ChangedOnDisk { path: PathBuf },
    #[error("could not write {}: {source}", .path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("there is no sample {index} (the dataset has {count})")]
    NoSample { index: usize, count: usize },
    /// The edit does not fit the file or the row: one sentence naming where.
    #[error("{0}")]
    Refused(String),
}

/// One sample: its format and turns, and a hash of them (equal turns, equal fingerprints).
#[derive(Debug, PartialEq, Eq)]
pub struct Sample {
    pub format: RowFormat,
    pub turns: Vec<ChatTurn>,
    pub fingerprint: u64,
}

impl Sample {
    fn new(read: RowTurns) -> Self {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        for turn in &read.turns {
            turn.role.hash(&mut hasher);
            turn.content.hash(&mut hasher);
        }
        Self {
            fingerprint: hasher.finish(),
            format: read.format,
            turns: read.turns,
        }
    }
}

/// A row as the file has it: its text, what follows it up to the next row (a line end, a comma), and what
/// it reads as.
#[derive(Debug)]
struct Row {
    text: String,
    after: String,
    /// Line ends in `text` and `after`.
    newlines: usize,
    read: Result<Arc<Sample>, String>,
}

impl Row {
    fn new(text: String, after: String, read: Result<Arc<Sample>, String>) -> Self {
        let newlines = text.matches('\n').count() + after.matches('\n').count();
        Self {
            text,
            after,
            newlines,
            read,
        }
    }

    fn with_after(&self, after: String) -> Self {
        Row::new(self.text.clone(), after, self.read.clone())
    }
}

/// How a file is written.
#[derive(Debug, Clone, PartialEq, Eq)]
enum FileKind {
    /// A row a line.
    Lines,
    /// A `.json` array of rows.
    Array,
    /// A `.json` file holding one row (written as an array once it holds another number of rows).
    Single,
    /// A `.txt` file: one text.
    PlainText,
    /// A file that cannot be split into rows (not UTF-8, an unclosed array): listed, never written.
    Unreadable { line: usize, reason: String },
}

/// A file's rows and the text around them: the file is `head`, each row followed by its `after` (the
/// last row's is not written), then `tail`.
#[derive(Debug, Clone)]
struct FileContent {
    kind: FileKind,
    head: Arc<str>,
    rows: Vec<Arc<Row>>,
    tail: Arc<str>,
}

impl FileContent {
    fn to_text(&self) -> String {
        let mut text = String::from(&*self.head);
        let last = self.rows.len().saturating_sub(1);
        for (i, row) in self.rows.iter().enumerate() {
            text.push_str(&row.text);
            if i < last {
                text.push_str(&row.after);
            }
        }
        text.push_str(&self.tail);
        text
    }

    /// The 1-based line each row starts on.
    fn lines(&self) -> Vec<usize> {
        let mut line = 1 + self.head.matches('\n').count();
        self.rows
            .iter()
            .map(|row| {
                let at = line;
                line += row.newlines;
                at
            })
            .collect()
    }

    /// What goes between two rows: the file's own separator when it has one.
    fn separator(&self) -> String {
        match (self.rows.len() >= 2, &self.kind) {
            (true, _) => self.rows[0].after.clone(),
            (false, FileKind::Array) => {
                let indent = self.head.rsplit('\n').next().unwrap_or_default();
                if self.head.contains('\n') {
                    format!(",\n{indent}")
                } else {
                    ", ".into()
                }
            }
            _ if self.tail.starts_with("\r\n") => "\r\n".into(),
            _ => "\n".into(),
        }
    }

    /// The content with `row` at `position`.
    fn inserted(&self, position: usize, row: Row) -> FileContent {
        let mut content = self.single_as_array(self.rows.len() + 1);
        let separator = content.separator();
        if position == content.rows.len() {
            if let Some(last) = content.rows.last_mut() {
                *last = Arc::new(last.with_after(separator));
            }
            content
                .rows
                .push(Arc::new(Row::new(row.text, String::new(), row.read)));
        } else {
            content
                .rows
                .insert(position, Arc::new(Row::new(row.text, separator, row.read)));
        }
        content
    }

    fn removed(&self, position: usize) -> FileContent {
        let mut content = self.single_as_array(self.rows.len() - 1);
        content.rows.remove(position);
        content
    }

    /// A one-row `.json` file about to hold `count` rows becomes an array.
    fn single_as_array(&self, count: usize) -> FileContent {
        let mut content = self.clone();
        if self.kind == FileKind::Single && count != 1 {
            content.kind = FileKind::Array;
            content.head = "[\n".into();
            content.tail = "\n]\n".into();
            if let Some(first) = content.rows.first_mut() {
                *first = Arc::new(first.with_after(",\n".into()));
            }
        }
        content
    }

    /// A row's JSON as this file writes it: a line, or an element of an indented array.
    fn json_text(&self, value: &Json) -> Result<String, serde_json::Error> {
        Ok(match self.kind {
            FileKind::Lines => serde_json::to_string(value)?,
            FileKind::Array => serde_json::to_string_pretty(value)?.replace('\n', "\n  "),
            _ => serde_json::to_string_pretty(value)?,
        })
    }
}

/// A file's size and modification time when it was read or written, to tell whether someone else changed
/// it since.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FileStamp {
    len: u64,
    modified: Option<SystemTime>,
}

impl FileStamp {
    fn of(path: &Path) -> Option<FileStamp> {
        let metadata = std::fs::metadata(path).ok()?;
        Some(FileStamp {
            len: metadata.len(),
            modified: metadata.modified().ok(),
        })
    }
}

#[derive(Debug)]
struct DocumentFile {
    path: PathBuf,
    /// Relative to the document's root (its name for a single file).
    relative: PathBuf,
    content: FileContent,
    stamp: Option<FileStamp>,
}

/// The files an edit changed, as they were before it.
type UndoStep = Vec<(usize, FileContent)>;

/// An open conversation dataset.
#[derive(Debug)]
pub struct ConversationDocument {
    root: PathBuf,
    files: Vec<DocumentFile>,
    /// (file, row) of every entry, in order.
    entries: Vec<(usize, usize)>,
    undo: Vec<UndoStep>,
}

impl ConversationDocument {
    /// Reads the dataset at `path` (a `.jsonl`, `.json` or `.txt` file, or a folder of them).
    pub fn open(path: &Path) -> Result<Self, DataError> {
        let files = text_files(path)?
            .into_iter()
            .map(|file| {
                let bytes = std::fs::read(&file).map_err(|source| DataError::Io {
                    path: file.clone(),
                    source,
                })?;
                Ok(DocumentFile {
                    stamp: FileStamp::of(&file),
                    relative: dataset_relative(path, &file),
                    content: read_content(&file, bytes),
                    path: file,
                })
            })
            .collect::<Result<Vec<_>, DataError>>()?;
        let mut document = Self {
            root: path.to_path_buf(),
            files,
            entries: Vec::new(),
            undo: Vec::new(),
        };
        document.index_entries();
        Ok(document)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn can_undo(&self) -> bool {
        !self.undo.is_empty()
    }

    /// Every sample, in entry order (shared, not copied).
    pub fn samples(&self) -> Vec<Arc<Sample>> {
        self.entries
            .iter()
            .filter_map(|&(file, row)| self.files[file].content.rows[row].read.clone().ok())
            .collect()
    }

    /// Every entry, and the rows that are no sample: (file, line, reason).
    pub fn entries(&self) -> (Vec<ConversationEntry>, Vec<(PathBuf, usize, String)>) {
        let mut entries = Vec::with_capacity(self.entries.len());
        let mut unparsed = Vec::new();
        for file in &self.files {
            if let FileKind::Unreadable { line, reason } = &file.content.kind {
                unparsed.push((file.relative.clone(), *line, reason.clone()));
            }
            for (row, line) in file.content.rows.iter().zip(file.content.lines()) {
                match &row.read {
                    Ok(sample) => entries.push(entry(file, line, sample)),
                    Err(reason) => unparsed.push((file.relative.clone(), line, reason.clone())),
                }
            }
        }
        (entries, unparsed)
    }

    /// Entry `index` as the view shows it.
    pub fn entry(&self, index: usize) -> Result<ConversationEntry, EditError> {
        let (file, row) = self.place(index)?;
        let file = &self.files[file];
        let line = file.content.lines()[row];
        match &file.content.rows[row].read {
            Ok(sample) => Ok(entry(file, line, sample)),
            Err(_) => Err(self.no_sample(index)),
        }
    }

    /// Replaces the turns of sample `index`.
    pub fn set_turns(&mut self, index: usize, turns: &[ChatTurn]) -> Result<(), EditError> {
        let (file, row) = self.place(index)?;
        let edited = self.edited_row(file, row, turns)?;
        let mut content = self.files[file].content.clone();
        content.rows[row] = Arc::new(edited);
        self.change(vec![(file, content)], true)
    }

    /// A new sample with an empty user and assistant turn, after sample `after` in its file (in its format),
    /// or at the end of the first JSON file.
    pub fn add(&mut self, after: Option<usize>) -> Result<(), EditError> {
        let (file, position, format) = match after {
            Some(index) => {
                let (file, row) = self.place(index)?;
                self.refuse_plain_text(file, "take another sample")?;
                let format = self
                    .sample_at(file, row)
                    .map_or(RowFormat::OpenAi, |s| s.format);
                (file, row + 1, format)
            }
            None => {
                let file = self
                    .files
                    .iter()
                    .position(|f| {
                        matches!(
                            f.content.kind,
                            FileKind::Lines | FileKind::Array | FileKind::Single
                        )
                    })
                    .ok_or_else(|| {
                        EditError::Refused(format!(
                            "{} has no .jsonl or .json file to add a sample to",
                            self.root.display()
                        ))
                    })?;
                let content = &self.files[file].content;
                let format = (0..content.rows.len())
                    .find_map(|row| self.sample_at(file, row))
                    .or_else(|| self.samples().first().cloned())
                    .map_or(RowFormat::OpenAi, |s| s.format);
                (file, content.rows.len(), format)
            }
        };
        let content = &self.files[file].content;
        let text = content
            .json_text(&empty_row(format))
            .map_err(|e| EditError::Refused(format!("the new sample cannot be written ({e})")))?;
        let row = Row::new(text.clone(), String::new(), read_text(&text));
        let content = content.inserted(position, row);
        self.change(vec![(file, content)], true)
    }

    pub fn delete(&mut self, index: usize) -> Result<(), EditError> {
        let (file, row) = self.place(index)?;
        self.refuse_plain_text(file, "hold no other sample; delete the file itself")?;
        let content = self.files[file].content.removed(row);
        self.change(vec![(file, content)], true)
    }

    /// A copy of sample `index`, right after it.
    pub fn duplicate(&mut self, index: usize) -> Result<(), EditError> {
        let (file, row) = self.place(index)?;
        self.refuse_plain_text(file, "take another sample")?;
        let original = &self.files[file].content.rows[row];
        let copy = Row::new(original.text.clone(), String::new(), original.read.clone());
        let content = self.files[file].content.inserted(row + 1, copy);
        self.change(vec![(file, content)], true)
    }

    /// Replaces `find` with `replace` in every turn's content; returns how many samples changed.
    pub fn replace(
        &mut self,
        find: &str,
        replace: &str,
        match_case: bool,
    ) -> Result<usize, EditError> {
        if find.is_empty() {
            return Err(EditError::Refused("there is no text to find".into()));
        }
        let pattern = regex::RegexBuilder::new(&regex::escape(find))
            .case_insensitive(!match_case)
            .build()
            .map_err(|e| EditError::Refused(format!("“{find}” cannot be searched for ({e})")))?;
        let mut changed: Vec<(usize, FileContent)> = Vec::new();
        let mut count = 0;
        for index in 0..self.entries.len() {
            let (file, row) = self.entries[index];
            let Some(sample) = self.sample_at(file, row) else {
                continue;
            };
            if !sample.turns.iter().any(|t| pattern.is_match(&t.content)) {
                continue;
            }
            let turns: Vec<ChatTurn> = sample
                .turns
                .iter()
                .map(|t| {
                    let content = pattern.replace_all(&t.content, regex::NoExpand(replace));
                    ChatTurn::new(t.role.clone(), content)
                })
                .collect();
            let edited = self.edited_row(file, row, &turns)?;
            if changed.last().is_none_or(|(f, _)| *f != file) {
                changed.push((file, self.files[file].content.clone()));
            }
            if let Some((_, content)) = changed.last_mut() {
                content.rows[row] = Arc::new(edited);
            }
            count += 1;
        }
        if count > 0 {
            self.change(changed, true)?;
        }
        Ok(count)
    }

    /// Takes back the last edit; false when there is none.
    pub fn undo(&mut self) -> Result<bool, EditError> {
        let Some(step) = self.undo.pop() else {
            return Ok(false);
        };
        if let Err(e) = self.change(step.clone(), false) {
            self.undo.push(step);
            return Err(e);
        }
        Ok(true)
    }

    fn place(&self, index: usize) -> Result<(usize, usize), EditError> {
        self.entries
            .get(index)
            .copied()
            .ok_or_else(|| self.no_sample(index))
    }

    fn no_sample(&self, index: usize) -> EditError {
        EditError::NoSample {
            index,
            count: self.entries.len(),
        }
    }

    fn sample_at(&self, file: usize, row: usize) -> Option<Arc<Sample>> {
        self.files[file].content.rows[row].read.clone().ok()
    }

    fn refuse_plain_text(&self, file: usize, what: &str) -> Result<(), EditError> {
        let file = &self.files[file];
        if file.content.kind == FileKind::PlainText {
            return Err(EditError::Refused(format!(
                "{} is a .txt file, one text, and cannot {what}",
                file.relative.display()
            )));
        }
        Ok(())
    }

    /// Row `row` of `file` with `turns` written into it in its format.
    fn edited_row(&self, file: usize, row: usize, turns: &[ChatTurn]) -> Result<Row, EditError> {
        let document_file = &self.files[file];
        let content = &document_file.content;
        let old = &content.rows[row];
        let refused = |reason: String| {
            EditError::Refused(format!(
                "{} line {}: {reason}",
                document_file.relative.display(),
                content.lines()[row]
            ))
        };
        if content.kind == FileKind::PlainText {
            let [turn] = turns else {
                return Err(refused(format!(
                    "a .txt file holds one `{TEXT_ROLE}` turn, not {}",
                    turns.len()
                )));
            };
            let read = RowTurns {
                format: RowFormat::Text,
                turns: vec![ChatTurn::new(TEXT_ROLE, turn.content.clone())],
            };
            return Ok(Row::new(
                turn.content.clone(),
                old.after.clone(),
                Ok(Arc::new(Sample::new(read))),
            ));
        }
        let format = match &old.read {
            Ok(sample) => sample.format,
            Err(reason) => return Err(refused(reason.clone())),
        };
        let mut value: Json = serde_json::from_str(old.text.trim())
            .map_err(|e| refused(format!("the row no longer reads as JSON ({e})")))?;
        set_turns(&mut value, format, turns).map_err(refused)?;
        let text = content
            .json_text(&value)
            .map_err(|e| refused(format!("the row cannot be written ({e})")))?;
        let read = read_text(&text);
        Ok(Row::new(text, old.after.clone(), read))
    }

    /// Writes `changes` (new contents of files), refusing all of them when one of the files changed on
    /// disk; the old contents become an undo step when `record`.
    fn change(
        &mut self,
        changes: Vec<(usize, FileContent)>,
        record: bool,
    ) -> Result<(), EditError> {
        for (file, _) in &changes {
            let file = &self.files[*file];
            if FileStamp::of(&file.path) != file.stamp {
                return Err(EditError::ChangedOnDisk {
                    path: file.path.clone(),
                });
            }
        }
        let mut step = Vec::with_capacity(changes.len());
        let mut result = Ok(());
        for (index, content) in changes {
            let file = &mut self.files[index];
            let text = content.to_text();
            let written = crate::atomic_file::write_atomically(&file.path, |w| {
                std::io::Write::write_all(w, text.as_bytes())
            });
            if let Err(source) = written {
                result = Err(EditError::Write {
                    path: file.path.clone(),
                    source,
                });
                break;
            }
            file.stamp = FileStamp::of(&file.path);
            step.push((index, std::mem::replace(&mut file.content, content)));
        }
        if record && !step.is_empty() {
            self.undo.push(step);
            if self.undo.len() > UNDO_DEPTH {
                self.undo.remove(0);
            }
        }
        self.index_entries();
        result
    }

    fn index_entries(&mut self) {
        self.entries = self
            .files
            .iter()
            .enumerate()
            .flat_map(|(f, file)| {
                file.content
                    .rows
                    .iter()
                    .enumerate()
                    .filter(|(_, row)| row.read.is_ok())
                    .map(move |(r, _)| (f, r))
            })
            .collect();
    }
}

fn entry(file: &DocumentFile, line: usize, sample: &Sample) -> ConversationEntry {
    ConversationEntry {
        file: file.relative.clone(),
        line,
        format: sample.format,
        turns: sample.turns.clone(),
    }
}

/// What a row's JSON text reads as.
fn read_text(text: &str) -> Result<Arc<Sample>, String> {
    parse(text)
        .and_then(|value| read_row(&value))
        .map(|read| Arc::new(Sample::new(read)))
}

/// A file's rows, from its bytes.
fn read_content(path: &Path, bytes: Vec<u8>) -> FileContent {
    let unreadable = |line, reason: &str| FileContent {
        kind: FileKind::Unreadable {
            line,
            reason: reason.to_string(),
        },
        head: "".into(),
        rows: Vec::new(),
        tail: "".into(),
    };
    let Ok(text) = String::from_utf8(bytes) else {
        return unreadable(1, "the file is not UTF-8 text");
    };
    let bom = if text.starts_with('\u{feff}') {
        "\u{feff}"
    } else {
        ""
    };
    let body = &text[bom.len()..];
    let extension = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or_default()
        .to_ascii_lowercase();
    if extension == "txt" {
        let read = RowTurns {
            format: RowFormat::Text,
            turns: vec![ChatTurn::new(TEXT_ROLE, body)],
        };
        return FileContent {
            kind: FileKind::PlainText,
            head: bom.into(),
            rows: vec![Arc::new(Row::new(
                body.to_string(),
                String::new(),
                Ok(Arc::new(Sample::new(read))),
            ))],
            tail: "".into(),
        };
    }
    let spans = match row_spans(body, extension == "json") {
        Ok(spans) => spans,
        Err(line) => return unreadable(line, UNCLOSED_ARRAY),
    };
    let kind = match spans.layout {
        RowLayout::Lines => FileKind::Lines,
        RowLayout::Array => FileKind::Array,
        RowLayout::Single => FileKind::Single,
    };
    // Element spans may end in white space; it belongs to what follows the row.
    let ranges: Vec<(usize, usize)> = spans
        .rows
        .iter()
        .map(|(_, range)| {
            let row = &body[range.clone()];
            (range.start, range.start + row.trim_end().len())
        })
        .collect();
    let first = ranges.first().map_or(body.len(), |r| r.0);
    let last = ranges.last().map_or(body.len(), |r| r.1);
    let rows = ranges
        .iter()
        .enumerate()
        .map(|(i, &(start, end))| {
            let after = ranges.get(i + 1).map_or("", |next| &body[end..next.0]);
            let text = &body[start..end];
            Arc::new(Row::new(
                text.to_string(),
                after.to_string(),
                read_text(text),
            ))
        })
        .collect();
    FileContent {
        kind,
        head: format!("{bom}{}", &body[..first]).into(),
        rows,
        tail: body[last..].into(),
    }
}
