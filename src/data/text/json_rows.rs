//! The rows of a `.jsonl` file (one JSON value a line, blank lines skipped) or a `.json` file (an array of
//! rows, or one row), each with the 1-based line it starts on, so a bad row can be named by file and line.
//! A row that does not parse is an error of that row only.

use serde_json::Value;

/// Every row of `text` with its line: a `.json` file (`json_file`) holding an array gives its elements, any
/// other text is read as JSON Lines.
pub(super) fn json_rows(text: &str, json_file: bool) -> Vec<(usize, Result<Value, String>)> {
    let trimmed = text.trim_start();
    if json_file && trimmed.starts_with('[') {
        let start = text.len() - trimmed.len();
        return match array_elements(text, start) {
            Some(spans) => spans
                .into_iter()
                .map(|(from, to)| (line_of(text, from), parse(&text[from..to])))
                .collect(),
            None => vec![(
                line_of(text, start),
                Err(
                    "the file is not a complete JSON array (a bracket or quote is not closed)"
                        .into(),
                ),
            )],
        };
    }
    if json_file && !text.trim().is_empty() && serde_json::from_str::<Value>(text).is_ok() {
        let start = text.len() - trimmed.len();
        return vec![(line_of(text, start), parse(text))];
    }
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(index, line)| (index + 1, parse(line)))
        .collect()
}

fn parse(text: &str) -> Result<Value, String> {
    serde_json::from_str(text.trim()).map_err(|e| format!("invalid JSON ({e})"))
}

/// The 1-based line of byte `offset`.
fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
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
