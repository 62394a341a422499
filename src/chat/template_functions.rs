//! The functions and filters transformers adds to the Jinja environment of chat templates:
//! `raise_exception(message)`, `strftime_now(format)` (the local time, as Python's
//! `datetime.now().strftime`) and its own `tojson` (Python's `json.dumps`, with `indent`, `separators`,
//! `sort_keys` and `ensure_ascii`, and no HTML escaping).

use minijinja::value::{Kwargs, Value};
use minijinja::{Error, ErrorKind};

use super::python_json::{JsonStyle, dumps};

/// Stops rendering with the template's own message.
pub(super) fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

/// The local date and time in `format` (strftime directives: `%d %b %Y`, ...).
pub(super) fn strftime_now(format: String) -> Result<Value, Error> {
    jiff::fmt::strtime::format(format.as_str(), &jiff::Zoned::now())
        .map(Value::from)
        .map_err(|e| Error::new(ErrorKind::InvalidOperation, format!("strftime_now: {e}")))
}

/// `value | tojson(indent=None, separators=None, sort_keys=False, ensure_ascii=False)`.
pub(super) fn tojson(value: Value, kwargs: Kwargs) -> Result<Value, Error> {
    let invalid = |message: String| Error::new(ErrorKind::InvalidOperation, message);
    let indent = match kwargs.get::<Option<Value>>("indent")? {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) if v.is_integer() => Some(" ".repeat(usize::try_from(v).unwrap_or(0))),
        Some(v) => Some(v.as_str().map(str::to_string).ok_or_else(|| {
            invalid(format!(
                "tojson: indent must be a number or a string, not {v}"
            ))
        })?),
    };
    let separators = match kwargs.get::<Option<Vec<String>>>("separators")? {
        None => None,
        Some(pair) => match <[String; 2]>::try_from(pair) {
            Ok([item, key]) => Some((item, key)),
            Err(_) => return Err(invalid("tojson: separators must be two strings".into())),
        },
    };
    let style = JsonStyle {
        indent,
        separators,
        sort_keys: kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false),
        ensure_ascii: kwargs.get::<Option<bool>>("ensure_ascii")?.unwrap_or(false),
    };
    kwargs.assert_all_used()?;
    dumps(&value, &style)
        .map(Value::from)
        .map_err(|e| invalid(format!("tojson: {e}")))
}
