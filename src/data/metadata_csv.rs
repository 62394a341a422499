//! The layout of a `metadata.csv`, one set of rules for reading it and for editing it: which record is the
//! header, which columns hold the file name and the caption (in any order, among any other columns), and how
//! a row's file name compares with an image's path. Every record keeps its exact bytes, so an edit changes
//! only the row it is about: other rows, extra columns, quoting, a byte-order mark and the line endings stay
//! as they were, and an edit whose result would not read back as intended is refused. Must not touch the
//! file system: callers read the file, and write it atomically.

use std::ops::Range;
use std::path::{Component, Path, PathBuf};

use super::DataError;

/// Header names of the file-name column (compared trimmed, ignoring case).
const FILE_COLUMN_NAMES: [&str; 3] = ["file_name", "file", "filename"];
/// Header names of the caption column, preferred over any other column.
const TEXT_COLUMN_NAMES: [&str; 3] = ["text", "caption", "prompt"];
/// The header of a file created by an edit.
const NEW_HEADER: [&str; 2] = ["file_name", "text"];
const BYTE_ORDER_MARK: char = '\u{feff}';

/// A parsed `metadata.csv`.
#[derive(Debug)]
pub struct MetadataCsv {
    path: PathBuf,
    /// The whole file, a byte-order mark included.
    text: String,
    /// Where the records start in `text` (after a byte-order mark).
    body_start: usize,
    /// The number of header fields, if the file has a header.
    header_width: Option<usize>,
    file_column: usize,
    text_column: usize,
    /// The records after the header, blank ones included, in file order.
    rows: Vec<Row>,
}

/// One record after the header.
#[derive(Debug)]
pub struct Row {
    fields: Vec<String>,
    /// The line the record starts on, counting from 1.
    pub line: u64,
    /// Its bytes in the file, with the line breaks around it.
    bytes: Range<usize>,
}

impl MetadataCsv {
    /// Parses the bytes of the `metadata.csv` at `path` (empty for a file that does not exist yet).
    pub fn parse(path: &Path, bytes: Vec<u8>) -> Result<Self, DataError> {
        let bad = |reason: String| DataError::Metadata {
            path: path.to_path_buf(),
            reason,
        };
        let text = String::from_utf8(bytes).map_err(|_| bad("it is not UTF-8 text".to_string()))?;
        let body_start = if text.starts_with(BYTE_ORDER_MARK) {
            BYTE_ORDER_MARK.len_utf8()
        } else {
            0
        };
        let body = &text[body_start..];
        let mut reader = csv::ReaderBuilder::new()
            .has_headers(false)
            .flexible(true)
            .from_reader(body.as_bytes());
        let mut records: Vec<(Vec<String>, u64, usize)> = Vec::new();
        let mut line = 0;
        for record in reader.records() {
            let record =
                record.map_err(|e| bad(format!("line {} cannot be read ({e})", line + 1)))?;
            let (start_line, start_byte) = record
                .position()
                .map_or((line + 1, body.len()), |p| (p.line(), p.byte() as usize));
            line = start_line;
            records.push((
                record.iter().map(str::to_string).collect(),
                start_line,
                start_byte,
            ));
        }
        let header = records
            .first()
            .and_then(|(fields, _, _)| header_columns(fields));
        let (header_width, (file_column, text_column)) = match header {
            Some(columns) => (Some(records[0].0.len()), columns.map_err(bad)?),
            None => (None, (0, 1)),
        };
        let ends: Vec<usize> = records
            .iter()
            .skip(1)
            .map(|(_, _, start)| *start)
            .chain([body.len()])
            .collect();
        let rows = records
            .into_iter()
            .zip(ends)
            .map(|((fields, line, start), end)| Row {
                fields,
                line,
                bytes: body_start + start..body_start + end,
            })
            .skip(usize::from(header_width.is_some()))
            .collect();
        Ok(Self {
            path: path.to_path_buf(),
            text,
            body_start,
            header_width,
            file_column,
            text_column,
            rows,
        })
    }

    /// The records after the header that hold something (all-blank records are skipped, as readers do).
    pub fn rows(&self) -> impl Iterator<Item = &Row> {
        self.rows
            .iter()
            .filter(|row| row.fields.iter().any(|f| !f.trim().is_empty()))
    }

    /// A row's file name, trimmed ("" when the row has no such column).
    pub fn file<'a>(&self, row: &'a Row) -> &'a str {
        row.fields.get(self.file_column).map_or("", |f| f.trim())
    }

    /// A row's caption as written (`None` when the row has no caption column).
    pub fn caption<'a>(&self, row: &'a Row) -> Option<&'a str> {
        row.fields.get(self.text_column).map(String::as_str)
    }

    /// The caption readers take for `relative` (the last row naming it wins).
    pub fn caption_of(&self, relative: &Path) -> Option<&str> {
        self.row_of(relative).and_then(|(_, row)| self.caption(row))
    }

    /// The row readers take for `relative`, with its index among `rows()`.
    fn row_of(&self, relative: &Path) -> Option<(usize, &Row)> {
        self.rows()
            .enumerate()
            .filter(|(_, row)| row_path(self.file(row)) == relative)
            .last()
    }

    /// The file's new text with the caption of `relative` set to `caption`: its row changed, or a row added
    /// at the end; every other byte stays.
    pub fn with_caption(&self, relative: &Path, caption: &str) -> Result<String, DataError> {
        if caption.contains(['\n', '\r']) {
            // Readers refuse a caption that runs over several lines (it is how an open quote shows).
            return Err(self.error(format!(
                "the caption of `{}` has a line break, which a metadata.csv caption cannot hold; it was not saved",
                relative.display()
            )));
        }
        let mut expected: Vec<Vec<String>> = self.rows().map(|row| row.fields.clone()).collect();
        let text = match self.row_of(relative) {
            Some((index, row)) => {
                let mut fields = row.fields.clone();
                let width = fields.len().max(self.file_column.max(self.text_column) + 1);
                fields.resize(width, String::new());
                fields[self.text_column] = caption.to_string();
                let raw = &self.text[row.bytes.clone()];
                let inner = raw.trim_start_matches(['\r', '\n']);
                let before = &raw[..raw.len() - inner.len()];
                let inner = inner.trim_end_matches(['\r', '\n']);
                let after = &raw[before.len() + inner.len()..];
                let edited = format!("{before}{}{after}", self.serialise(&fields)?);
                expected[index] = fields;
                format!(
                    "{}{edited}{}",
                    &self.text[..row.bytes.start],
                    &self.text[row.bytes.end..]
                )
            }
            None => {
                let width = self
                    .header_width
                    .unwrap_or(0)
                    .max(self.file_column.max(self.text_column) + 1);
                let mut fields = vec![String::new(); width];
                fields[self.file_column] = relative.to_string_lossy().replace('\\', "/");
                fields[self.text_column] = caption.to_string();
                let ending = self.line_ending();
                let mut text = if self.header_width.is_none() && self.rows().next().is_none() {
                    format!(
                        "{}{}{ending}",
                        &self.text[..self.body_start],
                        NEW_HEADER.join(",")
                    )
                } else {
                    self.text.clone()
                };
                if !text.ends_with(['\n', '\r']) {
                    text.push_str(ending);
                }
                text.push_str(&self.serialise(&fields)?);
                text.push_str(ending);
                expected.push(fields);
                text
            }
        };
        self.check_reads_back(&text, &expected)?;
        Ok(text)
    }

    /// The line break the file uses (that of its first line; `\n` for a new file).
    fn line_ending(&self) -> &'static str {
        let body = &self.text[self.body_start..];
        match body.find('\n') {
            Some(end) if body[..end].ends_with('\r') => "\r\n",
            _ => "\n",
        }
    }

    /// One record as CSV, without a line break.
    fn serialise(&self, fields: &[String]) -> Result<String, DataError> {
        let bad = |e: &dyn std::fmt::Display| self.error(format!("a row cannot be written ({e})"));
        let mut writer = csv::WriterBuilder::new()
            .flexible(true)
            .terminator(csv::Terminator::Any(b'\n'))
            .from_writer(Vec::new());
        writer.write_record(fields).map_err(|e| bad(&e))?;
        let bytes = writer.into_inner().map_err(|e| bad(&e))?;
        let text = String::from_utf8(bytes).map_err(|e| bad(&e))?;
        Ok(text.trim_end_matches('\n').to_string())
    }

    /// Checks that `text` parses to the rows `expected`; an edit that would change anything else (a file
    /// ending in an open quote, say) is refused.
    fn check_reads_back(&self, text: &str, expected: &[Vec<String>]) -> Result<(), DataError> {
        let reread = Self::parse(&self.path, text.as_bytes().to_vec())?;
        let rows: Vec<&Vec<String>> = reread.rows().map(|row| &row.fields).collect();
        let same = rows.len() == expected.len() && rows.iter().zip(expected).all(|(a, b)| *a == b);
        if same && (reread.file_column, reread.text_column) == (self.file_column, self.text_column)
        {
            Ok(())
        } else {
            Err(self.error(
                "an edit would change other rows of it (is a quote (\") left open?); it was left as it is"
                    .to_string(),
            ))
        }
    }

    fn error(&self, reason: String) -> DataError {
        DataError::Metadata {
            path: self.path.clone(),
            reason,
        }
    }
}

/// The file-name and caption columns of `fields` if they are a header (a field names the file-name
/// column); an error when such a header has no caption column.
fn header_columns(fields: &[String]) -> Option<Result<(usize, usize), String>> {
    let names: Vec<String> = fields
        .iter()
        .map(|f| f.trim().to_ascii_lowercase())
        .collect();
    let file = names
        .iter()
        .position(|n| FILE_COLUMN_NAMES.contains(&n.as_str()))?;
    let text = names
        .iter()
        .position(|n| TEXT_COLUMN_NAMES.contains(&n.as_str()))
        .or_else(|| (0..names.len()).find(|&i| i != file));
    Some(
        text.map(|text| (file, text))
            .ok_or_else(|| "its header has no caption column".to_string()),
    )
}

/// The path a row's file name stands for, relative to the dataset folder (`./a.png` is `a.png`).
pub fn row_path(file: &str) -> PathBuf {
    Path::new(file)
        .components()
        .filter(|c| *c != Component::CurDir)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<MetadataCsv, DataError> {
        MetadataCsv::parse(Path::new("metadata.csv"), text.as_bytes().to_vec())
    }

    fn edited(text: &str, file: &str, caption: &str) -> Result<String, DataError> {
        parse(text)?.with_caption(Path::new(file), caption)
    }

    #[test]
    fn of_rows_naming_the_same_image_the_one_readers_take_is_edited() {
        let text = "file_name,text\na.png,first\nb.png,other\n./a.png,second\n";
        let csv = parse(text).unwrap();
        assert_eq!(csv.caption_of(Path::new("a.png")), Some("second"));
        assert_eq!(
            edited(text, "a.png", "third").unwrap(),
            "file_name,text\na.png,first\nb.png,other\n./a.png,third\n"
        );
    }

    #[test]
    fn a_row_missing_its_caption_column_gets_one() {
        let text = "file_name,text,notes\r\na.png\r\nb.png,kept,n\r\n";
        assert_eq!(
            edited(text, "a.png", "new").unwrap(),
            "file_name,text,notes\r\na.png,new\r\nb.png,kept,n\r\n"
        );
    }

    #[test]
    fn an_edit_that_would_change_other_rows_is_refused() {
        // A file that ends inside an open quote: a row added after it would become part of that caption.
        let text = "file_name,text\na.png,\"an open quote";
        let message = edited(text, "b.png", "new").unwrap_err().to_string();
        assert!(
            message.starts_with("metadata.csv: an edit would change other rows"),
            "{message}"
        );
        assert_eq!(
            edited(text, "a.png", "closed").unwrap(),
            "file_name,text\na.png,closed"
        );
    }

    #[test]
    fn a_header_without_a_caption_column_is_one_sentence() {
        let message = parse("file_name\na.png\n").unwrap_err().to_string();
        assert_eq!(message, "metadata.csv: its header has no caption column");
    }
}
