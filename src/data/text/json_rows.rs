//! The rows of a `.jsonl` file (one JSON value a line, blank lines skipped) or a `.json` file (an array of
//! rows, or one row), each with the 1-based line it starts on, so a bad row can be named by file and line.
//! A row that does not parse is an error of that row only.

use std::ops::Range;

use serde_json::Value;

/// How a file holds its rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum RowLayout {
    /// JSON Lines: a row a line.
    Lines,
    /// A `.json` file holding an array of rows.
    Array,
    /// A `.json` file holding one row.
    Single,
}

/// Where each row of `text` is: its 1-based line and its bytes (a JSON Lines row without its line end).
pub(super) struct RowSpans {
    pub layout: RowLayout,
    pub rows: Vec<(usize, Range<usize>)>,
}

/// Every row of `text` with its line: a `.json` file (`json_file`) holding an array gives its elements, any
/// other text is read as JSON Lines.
pub(super) fn json_rows(text: &str, json_file: bool) -> Vec<(usize, Result<Value, String>)> {
    match row_spans(text, json_file) {
        Ok(spans) => spans
            .rows
            .into_iter()
            .map(|(line, range)| (line, parse(&text[range])))
            .collect(),
        Err(broken) => vec![(broken, Err(UNCLOSED_ARRAY.into()))],
    }
}

/// Why a `.json` array cannot be split into rows.
pub(super) const UNCLOSED_ARRAY: &str =
    "the file is not a complete JSON array (a bracket or quote is not closed)";

/// The rows of `text` (see [`json_rows`]), or the line of a `.json` array that does not close.
pub(super) fn row_spans(text: &str, json_file: bool) -> Result<RowSpans, usize> {
    let trimmed = text.trim_start();
    let start = text.len() - trimmed.len();
    if json_file && trimmed.starts_with('[') {
        let mut lines = LineCounter::default();
        let spans = array_elements(text, start).ok_or_else(|| lines.line_of(text, start))?;
        return Ok(RowSpans {
            layout: RowLayout::Array,
            rows: spans
                .into_iter()
                .map(|(from, to)| (lines.line_of(text, from), from..to))
                .collect(),
        });
    }
    if json_file && !text.trim().is_empty() && serde_json::from_str::<Value>(text).is_ok() {
        let end = text.trim_end().len();
        return Ok(RowSpans {
            layout: RowLayout::Single,
            rows: vec![(LineCounter::default().line_of(text, start), start..end)],
        });
    }
    let mut rows = Vec::new();
    let mut offset = 0;
    for (index, line) in text.split_inclusive('\n').enumerate() {
        let content = line
            .strip_suffix('\n')
            .map_or(line, |l| l.strip_suffix('\r').unwrap_or(l));
        if !content.trim().is_empty() {
            rows.push((index + 1, offset..offset + content.len()));
        }
        offset += line.len();
    }
    Ok(RowSpans {
        layout: RowLayout::Lines,
        rows,
    })
}

pub(super) fn parse(text: &str) -> Result<Value, String> {
    serde_json::from_str(text.trim()).map_err(|e| format!("invalid JSON ({e})"))
}

/// 1-based lines of increasing byte offsets, counted from where the last one was.
#[derive(Default)]
struct LineCounter {
    offset: usize,
    newlines: usize,
}

impl LineCounter {
    fn line_of(&mut self, text: &str, offset: usize) -> usize {
        self.newlines += text.as_bytes()[self.offset..offset]
            .iter()
            .filter(|&&b| b == b'\n')
            .count();
        self.offset = offset;
        self.newlines + 1
    }
}

/// The byte ranges of the elements of the array opening at `open` (a `[`), found by bracket depth outside
/// strings; none when the array does not close.
fn array_elements(text: &str, open: usize) -> Option<Vec<(usize, usize)>> {
    let bytes = text.as_bytes();
    let mut spans = Vec::new();
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    let mut element_start: Option<usize> = None;
    for (i, &b) in bytes.iter().enumerate().skip(open) {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => {
                in_string = true;
                if depth == 1 && element_start.is_none() {
                    element_start = Some(i);
                }
            }
            b'[' | b'{' => {
                if depth == 1 && element_start.is_none() {
                    element_start = Some(i);
                }
                depth += 1;
            }
            b']' | b'}' => {
                depth = depth.checked_sub(1)?;
                if depth == 0 {
                    if let Some(start) = element_start.take() {
                        spans.push((start, i));
                    }
                    return Some(spans);
                }
            }
            b',' if depth == 1 => {
                if let Some(start) = element_start.take() {
                    spans.push((start, i));
                }
            }
            _ if depth == 1 && element_start.is_none() && !b.is_ascii_whitespace() => {
                element_start = Some(i);
            }
            _ => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn array_elements_keep_their_lines_and_fail_alone() {
        let text = "[\n  {\"a\": \"x,]\"},\n  {\"a\": 2,},\n  [1, 2]\n]\n";
        let rows = json_rows(text, true);
        assert_eq!(rows.len(), 3);
        assert_eq!(rows[0].0, 2);
        assert_eq!(rows[0].1.as_ref().unwrap()["a"], "x,]");
        assert_eq!(rows[1].0, 3);
        assert!(rows[1].1.is_err());
        assert_eq!(rows[2].0, 4);
        assert!(rows[2].1.is_ok());
    }

    #[test]
    fn json_lines_skip_blank_lines() {
        let rows = json_rows("{\"a\": 1}\n\n{oops\n", false);
        assert_eq!(rows.iter().map(|r| r.0).collect::<Vec<_>>(), [1, 3]);
        assert!(rows[0].1.is_ok() && rows[1].1.is_err());
        let unclosed = json_rows("[{\"a\": 1},", true);
        assert_eq!(unclosed.len(), 1);
        assert!(unclosed[0].1.is_err());
    }
}
