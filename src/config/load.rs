//! Reading a training config: a JSON, TOML or YAML file, then `--set key=value` overrides, then validation.
//! Every mistake is one sentence naming the key (and the nearest known key for a typo).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};
use yaml_rust2::parser::{Event, EventReceiver, Parser};
use yaml_rust2::{Yaml, YamlLoader};

use super::train_config::TrainConfig;
use super::validate::validate;

/// What can be wrong with a config.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the config {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the config {} is not valid {format}: {reason}", path.display())]
    Parse {
        path: PathBuf,
        format: &'static str,
        reason: String,
    },
    #[error("the config {} must be a table of settings at its top level", path.display())]
    NotATable { path: PathBuf },
    #[error("unknown setting `{key}`{}", suggestion.as_ref().map(|s| format!("; did you mean `{s}`?")).unwrap_or_default())]
    UnknownKey {
        key: String,
        suggestion: Option<String>,
    },
    #[error("`{alias}` and `{key}` both set the same thing; keep one")]
    DuplicateKey { key: String, alias: String },
    #[error("setting `{key}`: {reason}")]
    BadValue { key: String, reason: String },
    #[error("`--set {text}` is not of the form key=value")]
    BadOverride { text: String },
    #[error("cannot write the config {}: {reason}", path.display())]
    Write { path: PathBuf, reason: String },
    /// A mistake in a setting that comes from the config file (not from `--set`).
    #[error("{}: {error}", path.display())]
    InFile {
        path: PathBuf,
        // Not `source`: the message already holds it, and error chains would print it twice.
        error: Box<ConfigError>,
    },
}

impl ConfigError {
    /// The setting this error is about, if it is about one.
    fn key(&self) -> Option<&str> {
        match self {
            ConfigError::UnknownKey { key, .. }
            | ConfigError::DuplicateKey { key, .. }
            | ConfigError::BadValue { key, .. } => Some(key),
            _ => None,
        }
    }
}

/// kohya sd-scripts and diffusers names accepted for our keys.
const ALIASES: &[(&str, &str)] = &[
    ("pretrained_model_name_or_path", "base_model"),
    ("network_dim", "lora_rank"),
    ("rank", "lora_rank"),
    ("network_alpha", "lora_alpha"),
    ("train_batch_size", "batch_size"),
    ("max_train_epochs", "epochs"),
    ("num_train_epochs", "epochs"),
    ("save_every_n_steps", "save_steps"),
    ("checkpointing_steps", "save_steps"),
    ("save_total_limit", "keep_last_checkpoints"),
    ("lr_scheduler_num_cycles", "lr_num_cycles"),
    ("lr_restart_cycles", "lr_num_cycles"),
    ("epoch", "epochs"),
    ("instance_data_dir", "train_data_dir"),
    ("report_to", "log_with"),
];

/// A config read from a file, with notes on the settings in it that were set aside.
#[derive(Debug, Clone)]
pub struct LoadedConfig {
    pub config: TrainConfig,
    /// One sentence per kohya setting that does not apply here (see [`super::kohya`]).
    pub notes: Vec<String>,
}

/// Loads `path` (if any) and applies `overrides` (`key=value`), then validates the result.
pub fn load_config(path: Option<&Path>, overrides: &[String]) -> Result<TrainConfig, ConfigError> {
    load_config_noting(path, overrides).map(|loaded| loaded.config)
}

/// [`load_config`], keeping the notes on what was set aside.
pub fn load_config_noting(
    path: Option<&Path>,
    overrides: &[String],
) -> Result<LoadedConfig, ConfigError> {
    let Some(path) = path else {
        return config_from_table(Map::new(), overrides);
    };
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    config_from_table(parse_table(&text, path)?, overrides).map_err(|error| {
        let overridden = error.key().is_some_and(|key| {
            overrides
                .iter()
                .filter_map(|text| text.split_once('='))
                .any(|(set, _)| set.trim() == key)
        });
        if error.key().is_some() && !overridden {
            ConfigError::InFile {
                path: path.to_path_buf(),
                error: Box::new(error),
            }
        } else {
            error
        }
    })
}

/// Writes `config` as TOML to `path` (atomically); `load_config` reads it back unchanged.
pub fn save_config(config: &TrainConfig, path: &Path) -> Result<(), ConfigError> {
    let failed = |reason: String| ConfigError::Write {
        path: path.to_path_buf(),
        reason,
    };
    let text = toml::to_string(config).map_err(|e| failed(e.to_string()))?;
    crate::atomic_file::write_atomically(path, |w| std::io::Write::write_all(w, text.as_bytes()))
        .map_err(|e| failed(e.to_string()))
}

/// Parses config text; `name` (a file name such as `cyberpunk.toml`) gives the format and appears in errors.
pub fn config_from_text(text: &str, name: &Path) -> Result<TrainConfig, ConfigError> {
    config_from_table(parse_table(text, name)?, &[]).map(|loaded| loaded.config)
}

fn config_from_table(
    mut map: Map<String, Value>,
    overrides: &[String],
) -> Result<LoadedConfig, ConfigError> {
    let mut notes = super::llama_factory::translate(&mut map)?;
    notes.extend(super::kohya::translate(&mut map)?);
    canonicalise_aliases(&mut map)?;
    for text in overrides {
        let (key, value) = parse_override(text)?;
        map.insert(canonical_key(&key).to_string(), value);
    }
    let config = from_table(map)?;
    validate(&config)?;
    Ok(LoadedConfig { config, notes })
}

fn parse_table(text: &str, path: &Path) -> Result<Map<String, Value>, ConfigError> {
    let extension = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    let parse = |format: &'static str, reason: String| ConfigError::Parse {
        path: path.to_path_buf(),
        format,
        reason,
    };
    let value = match extension.as_str() {
        "toml" => {
            let table: toml::Table =
                toml::from_str(text).map_err(|e| parse("TOML", e.message().to_string()))?;
            serde_json::to_value(table).map_err(|e| parse("TOML", e.to_string()))?
        }
        "yaml" | "yml" => {
            let mut size = ExpandedSize::default();
            Parser::new_from_str(text)
                .load(&mut size, true)
                .map_err(|e| parse("YAML", e.to_string()))?;
            if size.values > MAX_YAML_VALUES {
                return Err(parse(
                    "YAML",
                    format!("its aliases expand to more than {MAX_YAML_VALUES} values"),
                ));
            }
            let docs = YamlLoader::load_from_str(text).map_err(|e| parse("YAML", e.to_string()))?;
            docs.first()
                .map(yaml_to_json)
                .unwrap_or(Value::Object(Map::new()))
        }
        _ => serde_json::from_str(text).map_err(|e| parse("JSON", e.to_string()))?,
    };
    match value {
        Value::Object(map) => Ok(map),
        _ => Err(ConfigError::NotATable {
            path: path.to_path_buf(),
        }),
    }
}

/// The most values a YAML config may hold once its aliases are expanded; real configs hold a few dozen.
const MAX_YAML_VALUES: u64 = 100_000;

/// Counts the values `YamlLoader` would build from a YAML text. It copies an anchor's whole value for every
/// alias to it, so a few hundred bytes of aliases to aliases ("billion laughs") would expand to 10^12 values
/// and exhaust memory; counting the parser's events first costs no memory.
#[derive(Default)]
struct ExpandedSize {
    /// Values built so far, copies included.
    values: u64,
    /// The size of each anchored value, by anchor id.
    anchors: HashMap<usize, u64>,
    /// The sequences and mappings being read: their anchor id and `values` at their start.
    open: Vec<(usize, u64)>,
}

impl EventReceiver for ExpandedSize {
    fn on_event(&mut self, event: Event) {
        match event {
            Event::Scalar(_, _, anchor, _) => {
                self.values = self.values.saturating_add(1);
                if anchor > 0 {
                    self.anchors.insert(anchor, 1);
                }
            }
            Event::SequenceStart(anchor, _) | Event::MappingStart(anchor, _) => {
                self.open.push((anchor, self.values));
                self.values = self.values.saturating_add(1);
            }
            Event::SequenceEnd | Event::MappingEnd => {
                if let Some((anchor, start)) = self.open.pop()
                    && anchor > 0
                {
                    self.anchors.insert(anchor, self.values - start);
                }
            }
            Event::Alias(anchor) => {
                let size = self.anchors.get(&anchor).copied().unwrap_or(0);
                self.values = self.values.saturating_add(size);
            }
            _ => {}
        }
    }
}

fn yaml_to_json(yaml: &Yaml) -> Value {
    match yaml {
        Yaml::Real(_) => yaml.as_f64().map_or(Value::Null, |f| serde_json::json!(f)),
        Yaml::Integer(i) => serde_json::json!(i),
        Yaml::String(s) => Value::String(s.clone()),
        Yaml::Boolean(b) => Value::Bool(*b),
        Yaml::Array(items) => Value::Array(items.iter().map(yaml_to_json).collect()),
        Yaml::Hash(hash) => Value::Object(
            hash.iter()
                .map(|(k, v)| {
                    let key = match k {
                        Yaml::String(s) => s.clone(),
                        Yaml::Integer(i) => i.to_string(),
                        other => format!("{other:?}"),
                    };
                    (key, yaml_to_json(v))
                })
                .collect(),
        ),
        _ => Value::Null,
    }
}

fn canonicalise_aliases(map: &mut Map<String, Value>) -> Result<(), ConfigError> {
    for (alias, key) in ALIASES {
        if let Some(value) = map.remove(*alias) {
            if map.contains_key(*key) {
                return Err(ConfigError::DuplicateKey {
                    key: key.to_string(),
                    alias: alias.to_string(),
                });
            }
            map.insert(key.to_string(), value);
        }
    }
    Ok(())
}

/// `key=value`: the value is read as JSON when it parses (numbers, booleans, lists, quoted strings), else as
/// a plain string.
fn parse_override(text: &str) -> Result<(String, Value), ConfigError> {
    let Some((key, raw)) = text.split_once('=') else {
        return Err(ConfigError::BadOverride {
            text: text.to_string(),
        });
    };
    let key = key.trim();
    if key.is_empty() {
        return Err(ConfigError::BadOverride {
            text: text.to_string(),
        });
    }
    let raw = raw.trim();
    let value = serde_json::from_str(raw).unwrap_or_else(|_| Value::String(raw.to_string()));
    Ok((key.to_string(), value))
}

/// Our name for `key`, which may be one of the [`ALIASES`].
pub(super) fn canonical_key(key: &str) -> &str {
    ALIASES
        .iter()
        .find(|(alias, _)| *alias == key)
        .map_or(key, |(_, canonical)| canonical)
}

/// The default config as a table: its keys are the known keys, its values say each key's kind.
pub(super) fn default_table() -> Map<String, Value> {
    match serde_json::to_value(TrainConfig::default()) {
        Ok(Value::Object(map)) => map,
        _ => Map::new(),
    }
}

/// The known keys: the fields of the default config.
pub(super) fn known_keys() -> Vec<String> {
    default_table().keys().cloned().collect()
}

fn from_table(map: Map<String, Value>) -> Result<TrainConfig, ConfigError> {
    let known = known_keys();
    for key in map.keys() {
        if !known.contains(key) {
            return Err(ConfigError::UnknownKey {
                key: key.clone(),
                suggestion: nearest(key, &known),
            });
        }
    }
    // A null means "not set": the default applies.
    let map: Map<String, Value> = map.into_iter().filter(|(_, v)| !v.is_null()).collect();
    serde_json::from_value(Value::Object(map.clone())).map_err(|whole| {
        // Find the key whose value is wrong, to name it.
        for (key, value) in &map {
            if let Some(reason) = value_error(key, value) {
                return ConfigError::BadValue {
                    key: key.clone(),
                    reason,
                };
            }
        }
        ConfigError::BadValue {
            key: "(config)".to_string(),
            reason: describe_serde_error(&whole),
        }
    })
}

/// Why `value` cannot be the setting `key`, if it cannot.
pub(super) fn value_error(key: &str, value: &Value) -> Option<String> {
    let single = Map::from_iter([(key.to_string(), value.clone())]);
    serde_json::from_value::<TrainConfig>(Value::Object(single))
        .err()
        .map(|e| describe_serde_error(&e))
}

fn describe_serde_error(e: &serde_json::Error) -> String {
    let text = e.to_string();
    // serde_json appends " at line L column C", which means nothing for a table built in memory.
    text.split(" at line ").next().unwrap_or(&text).to_string()
}

/// The known key closest to `key` by edit distance, when it is close enough to be a typo.
fn nearest(key: &str, known: &[String]) -> Option<String> {
    let (best, distance) = known
        .iter()
        .map(|k| (k, edit_distance(key, k)))
        .min_by_key(|(_, d)| *d)?;
    (distance <= (key.len() / 3).max(2)).then(|| best.clone())
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut current = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let substitution = previous[j] + usize::from(ca != *cb);
            current.push(substitution.min(previous[j + 1] + 1).min(current[j] + 1));
        }
        previous = current;
    }
    previous[b.len()]
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::{ConfigError, config_from_text, edit_distance, nearest};

    #[test]
    fn yaml_aliases_that_multiply_are_an_error_not_an_exhausted_memory() {
        // Levels of ten aliases to the level below ("billion laughs"): 12 levels, 700 bytes, would be 10^12
        // values; 6 levels (10^6 values) keep this test small should the check ever be lost.
        let mut text = "a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n".to_string();
        for level in 1..6 {
            let refs = vec![format!("*a{}", level - 1); 10].join(", ");
            text += &format!("a{level}: &a{level} [{refs}]\n");
        }
        match config_from_text(&text, Path::new("laughs.yaml")) {
            Err(e @ ConfigError::Parse { .. }) => {
                let message = e.to_string();
                assert!(
                    message.contains("laughs.yaml") && message.contains("aliases expand"),
                    "{message}"
                );
            }
            other => panic!("expected a YAML error, got {other:?}"),
        }
        // Aliases that copy a little are fine (and unknown keys are still named).
        let text = "base: &b {x: 1}\nother: *b\n";
        let message = config_from_text(text, Path::new("ok.yaml"))
            .unwrap_err()
            .to_string();
        assert!(message.contains("unknown setting `x`"), "{message}");
    }

    #[test]
    fn typos_find_their_key() {
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        let known = vec![
            "learning_rate".to_string(),
            "lora_rank".to_string(),
            "resolution".to_string(),
        ];
        assert_eq!(
            nearest("learnig_rate", &known).as_deref(),
            Some("learning_rate")
        );
        assert_eq!(nearest("lora_rnak", &known).as_deref(), Some("lora_rank"));
        assert_eq!(nearest("completely_different", &known), None);
    }
}
