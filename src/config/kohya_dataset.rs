//! sd-scripts' dataset config (`dataset_config = "dataset.toml"`): `[general]`, then `[[datasets]]` each
//! with `[[datasets.subsets]]`, later levels overriding earlier ones. lora-studio trains on one image folder,
//! so a file describing one subset becomes that folder's settings (`image_dir`, `num_repeats`,
//! `class_tokens`, and the caption, bucket and batch settings); more folders, regularisation subsets or
//! fine-tuning metadata are one sentence.

use std::path::Path;

use serde_json::{Map, Value};

use super::load::ConfigError;

/// Dataset-config names that differ from lora-studio's.
const RENAMED: &[(&str, &str)] = &[
    ("image_dir", "train_data_dir"),
    ("num_repeats", "repeats"),
    ("class_tokens", "instance_prompt"),
];

/// Replaces `dataset_config` in `map` by the settings of the one image folder its file describes.
pub(super) fn expand(map: &mut Map<String, Value>) -> Result<(), ConfigError> {
    let Some(value) = map.remove("dataset_config") else {
        return Ok(());
    };
    let Some(path) = value.as_str() else {
        return Err(bad(format!("{value} is not a file name")));
    };
    let text = std::fs::read_to_string(path)
        .map_err(|e| bad(format!("the dataset config {path} cannot be read ({e})")))?;
    let table: toml::Table = toml::from_str(&text).map_err(|e| {
        bad(format!(
            "the dataset config {path} is not valid TOML: {}",
            e.message()
        ))
    })?;
    let settings = one_subset(&table, Path::new(path))?;
    for (key, value) in settings {
        let key = RENAMED
            .iter()
            .find(|(theirs, _)| *theirs == key)
            .map_or(key.as_str(), |(_, ours)| ours)
            .to_string();
        map.insert(key, value);
    }
    Ok(())
}

/// The general, dataset and subset settings of the file's single subset, in that order of precedence.
fn one_subset(table: &toml::Table, path: &Path) -> Result<Map<String, Value>, ConfigError> {
    let json = |value: &toml::Value| serde_json::to_value(value).unwrap_or(Value::Null);
    let mut settings = Map::new();
    if let Some(toml::Value::Table(general)) = table.get("general") {
        settings.extend(general.iter().map(|(k, v)| (k.clone(), json(v))));
    }
    let datasets = match table.get("datasets") {
        Some(toml::Value::Array(datasets)) => datasets.as_slice(),
        _ => &[],
    };
    let subsets: Vec<(&toml::Table, &toml::Table)> = datasets
        .iter()
        .filter_map(toml::Value::as_table)
        .flat_map(|dataset| {
            let subsets = match dataset.get("subsets") {
                Some(toml::Value::Array(subsets)) => subsets.as_slice(),
                _ => &[],
            };
            subsets
                .iter()
                .filter_map(toml::Value::as_table)
                .map(move |subset| (dataset, subset))
        })
        .collect();
    let [(dataset, subset)] = subsets.as_slice() else {
        return Err(bad(format!(
            "{} describes {} image folders; lora-studio trains on one folder (set train_data_dir to \
             it; its `N_name` subfolders give each their repeats)",
            path.display(),
            subsets.len()
        )));
    };
    for (key, value) in dataset.iter().filter(|(key, _)| *key != "subsets") {
        settings.insert(key.clone(), json(value));
    }
    for (key, value) in subset.iter() {
        settings.insert(key.clone(), json(value));
    }
    if settings.remove("is_reg") == Some(Value::Bool(true)) {
        return Err(bad(format!(
            "{}: regularisation subsets are not available",
            path.display()
        )));
    }
    for key in ["metadata_file", "conditioning_data_dir"] {
        if settings.contains_key(key) {
            return Err(bad(format!(
                "{}: `{key}` is not read; lora-studio takes an image folder with captions beside the \
                 images or in its metadata.csv",
                path.display()
            )));
        }
    }
    Ok(settings)
}

fn bad(reason: String) -> ConfigError {
    ConfigError::BadValue {
        key: "dataset_config".to_string(),
        reason,
    }
}
