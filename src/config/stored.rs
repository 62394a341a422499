//! The stored form of a [`TrainConfig`], kept in the app's settings and in every checkpoint's `state.json`,
//! which later releases must read. It carries `config_version`; reading applies the upgrade steps from that
//! version to [`CONFIG_VERSION`] to the JSON value, then drops the settings this release does not know and
//! resets the values it cannot read, each with a note, instead of failing. A config file the user writes
//! stays strict (an unknown key is an error naming the nearest one, see `load`); a stored one cannot be, or
//! a release that renames or removes a setting would reset the app's settings and make old checkpoints
//! impossible to resume. Must not validate (a stored config is whatever was stored; a run validates what it
//! starts with) nor touch files.
//!
//! Use it with `#[serde(with = "crate::config::stored")]` on a stored `TrainConfig` field (which reads any
//! version without reporting), and [`restore_config`] where the changes are to be shown.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};

use super::load::{known_keys, value_error};
use super::train_config::TrainConfig;

/// The version of the stored form this release writes.
///
/// 1. lora-studio 0.1.0, without a `config_version` key: every setting has a value, `min_bucket_reso`,
///    `max_bucket_reso`, `conv_rank` and `conv_alpha` included.
/// 2. Those four may be unset: the bucket sides then follow the resolution, LoCon the LoRA rank and alpha.
///
/// A setting added with a default that leaves earlier runs as they were needs no new version: a config
/// stored without it reads as that default, and an older release drops it with a note. So came
/// `lora_dropout`, `use_rslora`, `lr_warmup_ratio` and the language-model settings (`lora_target_modules`, `max_seq_length`,
/// `train_on_prompt`, `packing`, `system_prompt`) within version 2.
pub const CONFIG_VERSION: u32 = 2;

const VERSION_KEY: &str = "config_version";

/// Version 1's bucket sides, stored whether or not the user chose them.
const VERSION_1_BUCKET_SIDES: (u64, u64) = (256, 1024);

/// One upgrade step: it changes a stored table in place and adds what it changed to the notes.
type Upgrade = fn(&mut Map<String, Value>, &mut Vec<String>);

/// The upgrade from version `n` to `n + 1` is `UPGRADES[n - 1]`.
const UPGRADES: [Upgrade; CONFIG_VERSION as usize - 1] = [unset_what_version_1_always_stored];

/// A stored config read back.
#[derive(Debug, Clone, PartialEq)]
pub struct RestoredConfig {
    pub config: TrainConfig,
    /// The version it was stored with.
    pub stored_version: u32,
    /// What reading it changed, one phrase each; empty when nothing did.
    pub changes: Vec<String>,
}

impl RestoredConfig {
    /// One sentence on what reading it changed, after `stored` (`"checkpoint-20 was written by lora-studio
    /// 0.1.0"`); none when nothing did.
    pub fn summary(&self, stored: &str) -> Option<String> {
        (!self.changes.is_empty()).then(|| {
            format!(
                "{stored} with config version {}; read as version {CONFIG_VERSION}: {}",
                self.stored_version,
                self.changes.join("; ")
            )
        })
    }
}

/// `config` in its stored form: its settings and `config_version`.
pub fn stored_config(config: &TrainConfig) -> Value {
    let mut map = match serde_json::to_value(config) {
        Ok(Value::Object(map)) => map,
        _ => Map::new(),
    };
    map.insert(VERSION_KEY.into(), CONFIG_VERSION.into());
    Value::Object(map)
}

/// Reads a config stored by any release. Never fails: what cannot be read takes its default, with a note
/// (nothing stored, a null, is the default config without one).
pub fn restore_config(value: Value) -> RestoredConfig {
    let mut changes = Vec::new();
    let mut map = match value {
        Value::Object(map) => map,
        Value::Null => Map::new(),
        other => {
            changes.push(format!(
                "the stored settings ({}) are not a table; every setting takes its default",
                brief(&other)
            ));
            Map::new()
        }
    };
    let stored_version = match map.remove(VERSION_KEY) {
        None => 1,
        Some(version) => match version.as_u64().and_then(|v| u32::try_from(v).ok()) {
            Some(version) if version >= 1 => version,
            _ => {
                changes.push(format!(
                    "its config_version {} is not a version; read as {CONFIG_VERSION}",
                    brief(&version)
                ));
                CONFIG_VERSION
            }
        },
    };
    if stored_version > CONFIG_VERSION {
        changes.push(format!(
            "it comes from a newer release (this one reads up to version {CONFIG_VERSION})"
        ));
    }
    for upgrade in UPGRADES.iter().skip(stored_version as usize - 1) {
        upgrade(&mut map, &mut changes);
    }
    let config = config_from_stored(map, &mut changes);
    RestoredConfig {
        config,
        stored_version,
        changes,
    }
}

/// Writes a config in its stored form (for `#[serde(with = "crate::config::stored")]`).
pub fn serialize<S: Serializer>(config: &TrainConfig, serializer: S) -> Result<S::Ok, S::Error> {
    stored_config(config).serialize(serializer)
}

/// Reads a config stored by any release (for `#[serde(with = "crate::config::stored")]`); see
/// [`restore_config`].
pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<TrainConfig, D::Error> {
    any_value(deserializer).map(|value| restore_config(value).config)
}

/// Reads any self-describing value as JSON. It goes through serde's buffer for untagged enums because RON,
/// eframe's storage format, hands a unit enum variant (`optimizer: adafactor`) to a plain `Value` as `()`,
/// losing it, but to that buffer as its name.
pub fn any_value<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Value, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Buffered {
        Any(Value),
    }
    let Buffered::Any(value) = Buffered::deserialize(deserializer)?;
    Ok(value)
}

/// The config of an upgraded table: unknown settings are dropped and unreadable values reset, with notes.
fn config_from_stored(mut map: Map<String, Value>, changes: &mut Vec<String>) -> TrainConfig {
    let known = known_keys();
    let unknown: Vec<String> = map
        .keys()
        .filter(|key| !known.contains(key))
        .cloned()
        .collect();
    if !unknown.is_empty() {
        for key in &unknown {
            map.remove(key);
        }
        changes.push(format!(
            "dropped settings this release does not know: {}",
            unknown.join(", ")
        ));
    }
    // A null means "not set": the default applies.
    map.retain(|_, value| !value.is_null());
    let unreadable: Vec<(String, String)> = map
        .iter()
        .filter_map(|(key, value)| value_error(key, value).map(|reason| (key.clone(), reason)))
        .collect();
    for (key, reason) in unreadable {
        if let Some(value) = map.remove(&key) {
            changes.push(format!(
                "{key} is back to its default (the stored {} is not valid: {reason})",
                brief(&value)
            ));
        }
    }
    serde_json::from_value(Value::Object(map)).unwrap_or_else(|e| {
        changes.push(format!(
            "every setting takes its default (the stored ones do not fit together: {e})"
        ));
        TrainConfig::default()
    })
}

/// A stored value as a note shows it: its JSON, cut short.
fn brief(value: &Value) -> String {
    let text = value.to_string();
    match text.char_indices().nth(40) {
        Some((cut, _)) => format!("{}...", &text[..cut]),
        None => text,
    }
}

/// 1 → 2: version 1 stored the bucket sides and LoCon's rank and alpha whether or not the user chose them.
/// Bucket sides that the resolution now derives, or that are version 1's defaults and miss the resolution
/// (such a config could not train), are unset and follow the resolution; others stay as they were. LoCon's
/// rank and alpha are unset when `conv_lora` is off (they did nothing) and kept when it is on (the
/// checkpoint's network was made with them).
fn unset_what_version_1_always_stored(map: &mut Map<String, Value>, changes: &mut Vec<String>) {
    let number = |map: &Map<String, Value>, key: &str| map.get(key).and_then(Value::as_u64);
    if let (Some(min), Some(max)) = (
        number(map, "min_bucket_reso"),
        number(map, "max_bucket_reso"),
    ) {
        let defaults = TrainConfig::default();
        let u32_of = |key: &str, default: u32| {
            number(map, key)
                .and_then(|n| u32::try_from(n).ok())
                .unwrap_or(default)
        };
        // Version 1 always stored a resolution (512 by default).
        let resolution = u32_of("resolution", super::SD_RESOLUTION);
        let derived = TrainConfig {
            resolution: Some(resolution),
            bucket_reso_steps: u32_of("bucket_reso_steps", defaults.bucket_reso_steps),
            ..defaults
        }
        .bucket_sides();
        let derived = (u64::from(derived.0), u64::from(derived.1));
        let resolution = u64::from(resolution);
        let change = if (min, max) == derived {
            Some(format!(
                "min_bucket_reso and max_bucket_reso ({min}..{max}) now follow the resolution, which \
                 gives the same"
            ))
        } else if (min, max) == VERSION_1_BUCKET_SIDES && !(min..=max).contains(&resolution) {
            Some(format!(
                "min_bucket_reso and max_bucket_reso ({min}..{max}, the old defaults, which miss \
                 resolution {resolution}) now follow it: {}..{}",
                derived.0, derived.1
            ))
        } else {
            None
        };
        if let Some(change) = change {
            map.remove("min_bucket_reso");
            map.remove("max_bucket_reso");
            changes.push(change);
        }
    }
    if map.get("conv_lora") != Some(&Value::Bool(true)) {
        let unused: Vec<String> = ["conv_rank", "conv_alpha"]
            .into_iter()
            .filter_map(|key| map.remove(key).map(|value| format!("{key} {value}")))
            .collect();
        if !unused.is_empty() {
            changes.push(format!(
                "{} (unused, conv_lora being off) now follow lora_rank and lora_alpha",
                unused.join(" and ")
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::{CONFIG_VERSION, restore_config, stored_config};
    use crate::config::{OptimizerKind, TrainConfig};

    /// A version-1 stored config: every setting of the default config with a value, as 0.1.0 wrote them.
    fn version_1(changes: serde_json::Value) -> serde_json::Value {
        let mut value = serde_json::to_value(TrainConfig::default()).unwrap();
        value["min_bucket_reso"] = 256.into();
        value["max_bucket_reso"] = 1024.into();
        value["conv_rank"] = 8.into();
        value["conv_alpha"] = 1.0.into();
        for (key, setting) in changes.as_object().unwrap() {
            value[key] = setting.clone();
        }
        value
    }

    #[test]
    fn a_config_stored_by_this_release_reads_back_unchanged() {
        let config = TrainConfig {
            min_bucket_reso: Some(128),
            conv_lora: true,
            conv_alpha: Some(0.1),
            optimizer: OptimizerKind::Adafactor,
            unet_lr: Some(3e-4),
            ..TrainConfig::default()
        };
        let stored = stored_config(&config);
        assert_eq!(stored["config_version"], CONFIG_VERSION);
        let restored = restore_config(stored);
        assert_eq!(restored.config, config);
        assert_eq!(restored.stored_version, CONFIG_VERSION);
        assert!(restored.changes.is_empty(), "{:?}", restored.changes);
        assert_eq!(restored.summary("x"), None);
    }

    #[test]
    fn version_1_bucket_sides_follow_the_resolution_where_that_changes_nothing_or_they_could_not_run()
     {
        // 512 px: 256..1024 is what the resolution derives now.
        let restored = restore_config(version_1(json!({})));
        assert_eq!(restored.stored_version, 1);
        assert_eq!(
            (
                restored.config.min_bucket_reso,
                restored.config.max_bucket_reso
            ),
            (None, None)
        );
        assert_eq!(restored.config.bucket_sides(), (256, 1024));
        // 768 px: 256..1024 is not what it derives (384..1536) but trained that way: kept.
        let restored = restore_config(version_1(json!({ "resolution": 768 })));
        assert_eq!(
            (
                restored.config.min_bucket_reso,
                restored.config.max_bucket_reso
            ),
            (Some(256), Some(1024))
        );
        // 64 px: 256..1024 could not train; the sides follow the resolution.
        let restored = restore_config(version_1(json!({ "resolution": 64 })));
        assert_eq!(restored.config.bucket_sides(), (64, 128));
        let summary = restored.summary("the settings").unwrap();
        assert!(
            summary.contains("with config version 1; read as version 2")
                && summary.contains("miss resolution 64) now follow it: 64..128"),
            "{summary}"
        );
        // Sides the user chose stay.
        let restored = restore_config(version_1(
            json!({ "min_bucket_reso": 320, "max_bucket_reso": 768 }),
        ));
        assert_eq!(restored.config.bucket_sides(), (320, 768));
    }

    #[test]
    fn version_1_locon_rank_and_alpha_are_kept_only_where_locon_trained() {
        let off = restore_config(version_1(json!({ "lora_rank": 32, "lora_alpha": 16.0 })));
        assert_eq!((off.config.conv_rank, off.config.conv_alpha), (None, None));
        assert_eq!(
            (off.config.conv_rank(), off.config.conv_alpha()),
            (32, 16.0)
        );
        assert!(
            off.changes
                .iter()
                .any(|c| c.contains("conv_rank 8 and conv_alpha 1.0")),
            "{:?}",
            off.changes
        );
        let on = restore_config(version_1(json!({ "conv_lora": true })));
        assert_eq!(
            (on.config.conv_rank, on.config.conv_alpha),
            (Some(8), Some(1.0))
        );
    }

    #[test]
    fn unknown_settings_and_unreadable_values_are_notes_not_failures() {
        let restored = restore_config(version_1(json!({
            "xformers_level": 2,
            "lora_rank": "big",
            "seed": 7,
        })));
        assert_eq!(restored.config.seed, 7);
        assert_eq!(restored.config.lora_rank, TrainConfig::default().lora_rank);
        let changes = restored.changes.join("\n");
        assert!(
            changes.contains("dropped settings this release does not know: xformers_level")
                && changes.contains("lora_rank is back to its default (the stored \"big\""),
            "{changes}"
        );
        // From a newer release.
        let mut newer = stored_config(&TrainConfig::default());
        newer["config_version"] = 99.into();
        newer["shiny_new_setting"] = true.into();
        let restored = restore_config(newer);
        assert_eq!(restored.stored_version, 99);
        assert!(
            restored.changes[0].contains("newer release")
                && restored.changes[1].contains("shiny_new_setting"),
            "{:?}",
            restored.changes
        );
        // Nothing stored is the default config, without a note.
        let nothing = restore_config(serde_json::Value::Null);
        assert_eq!(nothing.config, TrainConfig::default());
        assert!(nothing.changes.is_empty());
    }
}
