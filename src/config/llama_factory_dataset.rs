//! Where a LLaMA-Factory config's data is: `dataset_dir` (default `data`) and `dataset`, a name that the
//! folder's `dataset_info.json` maps to a file (`file_name`), or a file of that name in the folder.
//! lora-studio reads the row formats themselves (Alpaca, ShareGPT, OpenAI messages, text), so an entry
//! whose `columns` or `tags` rename the fields, or that holds preference pairs (`ranking`), is one sentence;
//! so are several datasets and datasets on the Hub.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use super::kohya::{bad, text};
use super::load::ConfigError;

/// LLaMA-Factory's default `dataset_dir`.
const DEFAULT_DIR: &str = "data";

/// The `columns` an entry may give: they name the fields lora-studio reads anyway.
const STANDARD_COLUMNS: &[(&str, &str)] = &[
    ("prompt", "instruction"),
    ("prompt", "text"),
    ("query", "input"),
    ("response", "output"),
    ("system", "system"),
    ("history", "history"),
    ("messages", "conversations"),
    ("messages", "messages"),
];

/// The `tags` an entry may give (ShareGPT's and OpenAI's role and content names).
const STANDARD_TAGS: &[(&str, &str)] = &[
    ("role_tag", "from"),
    ("role_tag", "role"),
    ("content_tag", "value"),
    ("content_tag", "content"),
    ("user_tag", "human"),
    ("user_tag", "user"),
    ("assistant_tag", "gpt"),
    ("assistant_tag", "assistant"),
    ("system_tag", "system"),
];

/// The file or folder to train on, as text for `train_data_dir`.
pub(super) fn dataset_path(
    dataset_dir: Option<&Value>,
    dataset: Option<&Value>,
) -> Result<String, ConfigError> {
    let dir = match dataset_dir {
        Some(value) => PathBuf::from(text("dataset_dir", value)?),
        None => PathBuf::from(DEFAULT_DIR),
    };
    let Some(dataset) = dataset else {
        return Ok(dir.to_string_lossy().into_owned());
    };
    let names: Vec<String> = match dataset {
        Value::Array(items) => items
            .iter()
            .map(|item| text("dataset", item))
            .collect::<Result<_, _>>()?,
        other => text("dataset", other)?
            .split(',')
            .map(|name| name.trim().to_string())
            .filter(|name| !name.is_empty())
            .collect(),
    };
    let [name] = names.as_slice() else {
        return Err(bad(
            "dataset",
            format!(
                "it names {} datasets ({}); lora-studio trains from one file or folder: put the files in \
                 one folder and give it as dataset_dir without dataset",
                names.len(),
                names.join(", ")
            ),
        ));
    };
    let path = match read_info(&dir)? {
        Some(info) => match info.get(name.as_str()) {
            Some(entry) => entry_path(&dir, name, entry)?,
            None => {
                return Err(bad(
                    "dataset",
                    format!(
                        "{} does not list `{name}`",
                        dir.join("dataset_info.json").display()
                    ),
                ));
            }
        },
        None => file_in(&dir, name)?,
    };
    Ok(path.to_string_lossy().into_owned())
}

/// `dataset_info.json` in `dir`, if there is one.
fn read_info(dir: &Path) -> Result<Option<Map<String, Value>>, ConfigError> {
    let path = dir.join("dataset_info.json");
    if !path.is_file() {
        return Ok(None);
    }
    let unreadable = |reason: String| bad("dataset_dir", format!("{}: {reason}", path.display()));
    let text =
        std::fs::read_to_string(&path).map_err(|e| unreadable(format!("cannot be read ({e})")))?;
    match serde_json::from_str(&text) {
        Ok(Value::Object(map)) => Ok(Some(map)),
        Ok(_) => Err(unreadable("is not a table of datasets".into())),
        Err(e) => Err(unreadable(format!("is not valid JSON ({e})"))),
    }
}

/// The file an entry of `dataset_info.json` names, once its fields are known to be the standard ones.
fn entry_path(dir: &Path, name: &str, entry: &Value) -> Result<PathBuf, ConfigError> {
    let refuse = |reason: String| bad("dataset", format!("`{name}` in dataset_info.json {reason}"));
    if entry.get("ranking") == Some(&Value::Bool(true)) {
        return Err(refuse(
            "holds preference pairs (ranking), which supervised training does not read".into(),
        ));
    }
    for (field, standard) in [("columns", STANDARD_COLUMNS), ("tags", STANDARD_TAGS)] {
        if let Some(Value::Object(renames)) = entry.get(field) {
            for (theirs, column) in renames {
                let known = standard
                    .iter()
                    .any(|(key, value)| key == theirs && column.as_str() == Some(value));
                if !known {
                    return Err(refuse(format!(
                        "maps its {field} ({theirs}: {column}), which lora-studio does not read; rename \
                         the fields in the file to the standard ones (instruction/input/output, \
                         conversations with from/value, messages with role/content, or text)"
                    )));
                }
            }
        }
    }
    match entry.get("file_name").and_then(Value::as_str) {
        Some(file) => Ok(dir.join(file)),
        None => {
            let hub = ["hf_hub_url", "ms_hub_url", "om_hub_url", "script_url"]
                .into_iter()
                .find(|key| entry.get(*key).is_some());
            Err(refuse(match hub {
                Some(key) => format!(
                    "is on a hub ({key}); download it and name the file (file_name) or give its path"
                ),
                None => "has no file_name".into(),
            }))
        }
    }
}

/// A file named `name` in `dir`, with or without a `.jsonl`, `.json` or `.txt` extension.
fn file_in(dir: &Path, name: &str) -> Result<PathBuf, ConfigError> {
    let candidates = [
        dir.join(name),
        dir.join(format!("{name}.jsonl")),
        dir.join(format!("{name}.json")),
        dir.join(format!("{name}.txt")),
    ];
    candidates
        .into_iter()
        .find(|path| path.exists())
        .ok_or_else(|| {
            bad(
                "dataset",
                format!(
                    "`{name}` is neither listed in a dataset_info.json in {} nor a file there",
                    dir.display()
                ),
            )
        })
}
