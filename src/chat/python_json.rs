//! JSON text as Python's `json.dumps` writes it, which is what transformers' `tojson` filter calls: `", "`
//! and `": "` between items (`","` between items when indented), non-ASCII kept unless `ensure_ascii`, the
//! Python spelling of floats (`1.0`, `1e-05`, `Infinity`), keys in their own order unless sorted. A
//! template's `tojson` output is part of the text a model is trained on, so it must match byte for byte.

use std::fmt::Write;

use minijinja::value::{Value, ValueKind};

/// How `json.dumps` was asked to write.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct JsonStyle {
    /// Indentation per level (spaces, or the given text); `None` writes one line.
    pub indent: Option<String>,
    /// `(item, key)` separators; `None` takes Python's defaults for the indentation.
    pub separators: Option<(String, String)>,
    pub sort_keys: bool,
    pub ensure_ascii: bool,
}

/// `value` as `json.dumps(value, ...)` writes it.
pub(super) fn dumps(value: &Value, style: &JsonStyle) -> Result<String, String> {
    let (item, key) = match (&style.separators, &style.indent) {
        (Some((item, key)), _) => (item.clone(), key.clone()),
        (None, Some(_)) => (",".to_string(), ": ".to_string()),
        (None, None) => (", ".to_string(), ": ".to_string()),
    };
    let mut writer = Writer {
        out: String::new(),
        style,
        item,
        key,
    };
    writer.value(value, 0)?;
    Ok(writer.out)
}

struct Writer<'a> {
    out: String,
    style: &'a JsonStyle,
    item: String,
    key: String,
}

impl Writer<'_> {
    fn value(&mut self, value: &Value, level: usize) -> Result<(), String> {
        match value.kind() {
            ValueKind::Undefined | ValueKind::None => self.out.push_str("null"),
            ValueKind::Bool => self
                .out
                .push_str(if value.is_true() { "true" } else { "false" }),
            ValueKind::Number if value.is_integer() => {
                let _ = write!(self.out, "{value}");
            }
            ValueKind::Number => {
                let number = f64::try_from(value.clone()).map_err(|e| e.to_string())?;
                self.out.push_str(&python_float(number));
            }
            ValueKind::String => self.string(value.as_str().unwrap_or_default()),
            ValueKind::Map | ValueKind::Plain => self.map(value, level)?,
            ValueKind::Seq | ValueKind::Iterable => {
                let items: Vec<Value> = value.try_iter().map_err(|e| e.to_string())?.collect();
                self.container(('[', ']'), &items, level, |writer, item, level| {
                    writer.value(item, level)
                })?;
            }
            _ => {
                return Err(format!(
                    "Object of type {} is not JSON serializable",
                    value.kind()
                ));
            }
        }
        Ok(())
    }

    fn map(&mut self, value: &Value, level: usize) -> Result<(), String> {
        let mut entries = Vec::new();
        for key in value.try_iter().map_err(|e| e.to_string())? {
            let item = value.get_item(&key).map_err(|e| e.to_string())?;
            entries.push((key_text(&key)?, item));
        }
        if self.style.sort_keys {
            entries.sort_by(|a, b| a.0.cmp(&b.0));
        }
        self.container(('{', '}'), &entries, level, |writer, (key, item), level| {
            writer.string(key);
            let separator = writer.key.clone();
            writer.out.push_str(&separator);
            writer.value(item, level)
        })
    }

    /// `open item, item, ... close`, one item per line when indented.
    fn container<T>(
        &mut self,
        (open, close): (char, char),
        items: &[T],
        level: usize,
        mut write_item: impl FnMut(&mut Self, &T, usize) -> Result<(), String>,
    ) -> Result<(), String> {
        self.out.push(open);
        if items.is_empty() {
            self.out.push(close);
            return Ok(());
        }
        let indent = self.style.indent.clone();
        for (i, item) in items.iter().enumerate() {
            if i > 0 {
                let separator = self.item.clone();
                self.out.push_str(&separator);
            }
            if let Some(unit) = &indent {
                self.out.push('\n');
                self.out.push_str(&unit.repeat(level + 1));
            }
            write_item(self, item, level + 1)?;
        }
        if let Some(unit) = &indent {
            self.out.push('\n');
            self.out.push_str(&unit.repeat(level));
        }
        self.out.push(close);
        Ok(())
    }

    fn string(&mut self, text: &str) {
        self.out.push('"');
        for c in text.chars() {
            match c {
                '"' => self.out.push_str("\\\""),
                '\\' => self.out.push_str("\\\\"),
                '\n' => self.out.push_str("\\n"),
                '\r' => self.out.push_str("\\r"),
                '\t' => self.out.push_str("\\t"),
                '\u{8}' => self.out.push_str("\\b"),
                '\u{c}' => self.out.push_str("\\f"),
                c if (c as u32) < 0x20 || (self.style.ensure_ascii && !c.is_ascii()) => {
                    let mut units = [0u16; 2];
                    for unit in c.encode_utf16(&mut units) {
                        let _ = write!(self.out, "\\u{unit:04x}");
                    }
                }
                c => self.out.push(c),
            }
        }
        self.out.push('"');
    }
}

/// A dictionary key as `json.dumps` writes it: strings as they are, numbers, booleans and None spelled as
/// JSON spells them.
fn key_text(key: &Value) -> Result<String, String> {
    match key.kind() {
        ValueKind::String => Ok(key.as_str().unwrap_or_default().to_string()),
        ValueKind::Number if key.is_integer() => Ok(key.to_string()),
        ValueKind::Number => Ok(python_float(
            f64::try_from(key.clone()).map_err(|e| e.to_string())?,
        )),
        ValueKind::Bool => Ok(if key.is_true() { "true" } else { "false" }.to_string()),
        ValueKind::None => Ok("null".to_string()),
        kind => Err(format!(
            "keys must be str, int, float, bool or None, not {kind}"
        )),
    }
}

/// Python's `repr` of a float: the shortest text that reads back, in fixed notation for exponents from
/// -4 to 15 (with `.0` when whole), otherwise `1.5e-05` / `1e+16`.
fn python_float(x: f64) -> String {
    if x.is_nan() {
        return "NaN".to_string();
    }
    if x.is_infinite() {
        return if x > 0.0 { "Infinity" } else { "-Infinity" }.to_string();
    }
    let scientific = format!("{x:e}");
    let (mantissa, exponent) = scientific.split_once('e').unwrap_or((&scientific, "0"));
    let exponent: i32 = exponent.parse().unwrap_or(0);
    if (-4..16).contains(&exponent) {
        let fixed = format!("{x}");
        if fixed.contains('.') {
            fixed
        } else {
            format!("{fixed}.0")
        }
    } else {
        let sign = if exponent < 0 { '-' } else { '+' };
        format!("{mantissa}e{sign}{:02}", exponent.abs())
    }
}

#[cfg(test)]
mod tests {
    use minijinja::value::Value;

    use super::*;

    fn value(json: &str) -> Value {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn writes_what_python_writes() {
        let v = value(
            r#"{"b": [1, 2.0, 1e-05, 1e16, 0.1, true, null], "a": "Zürich \"q\"\n\u0001", "e": {}, "f": []}"#,
        );
        let plain = dumps(&v, &JsonStyle::default()).unwrap();
        assert_eq!(
            plain,
            r#"{"b": [1, 2.0, 1e-05, 1e+16, 0.1, true, null], "a": "Zürich \"q\"\n\u0001", "e": {}, "f": []}"#
        );
        let indented = dumps(
            &value(r#"{"k": [1, {"x": 2}], "a": 1}"#),
            &JsonStyle {
                indent: Some("  ".to_string()),
                sort_keys: true,
                ..JsonStyle::default()
            },
        )
        .unwrap();
        assert_eq!(
            indented,
            "{\n  \"a\": 1,\n  \"k\": [\n    1,\n    {\n      \"x\": 2\n    }\n  ]\n}"
        );
        let ascii = dumps(
            &value(r#"["é🙂"]"#),
            &JsonStyle {
                ensure_ascii: true,
                separators: Some((",".to_string(), ":".to_string())),
                ..JsonStyle::default()
            },
        )
        .unwrap();
        assert_eq!(ascii, r#"["\u00e9\ud83d\ude42"]"#);
    }

    #[test]
    fn floats_take_pythons_spelling() {
        for (x, text) in [
            (1.0, "1.0"),
            (-0.5, "-0.5"),
            (123456789012345.0, "123456789012345.0"),
            (1e16, "1e+16"),
            (0.0001, "0.0001"),
            (0.00001, "1e-05"),
            (1.5e-7, "1.5e-07"),
            (f64::INFINITY, "Infinity"),
        ] {
            assert_eq!(python_float(x), text);
        }
    }
}
