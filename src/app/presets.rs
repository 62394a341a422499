//! The presets shipped in `presets/`, built into the binary so the app offers them wherever it runs.

use std::path::Path;

use crate::config::{TrainConfig, config_from_text};

/// `(name, file name, text)` of every preset.
const PRESETS: [(&str, &str, &str); 6] = [
    (
        "24 GB GPU",
        "gpu-24gb.toml",
        include_str!("../../presets/gpu-24gb.toml"),
    ),
    (
        "16 GB GPU",
        "gpu-16gb.toml",
        include_str!("../../presets/gpu-16gb.toml"),
    ),
    (
        "8 GB GPU",
        "gpu-8gb.toml",
        include_str!("../../presets/gpu-8gb.toml"),
    ),
    ("CPU", "cpu.toml", include_str!("../../presets/cpu.toml")),
    (
        "Cyberpunk example",
        "cyberpunk.toml",
        include_str!("../../presets/cyberpunk.toml"),
    ),
    (
        "Default",
        "default.toml",
        include_str!("../../presets/default.toml"),
    ),
];

/// The names of the presets.
pub fn preset_names() -> impl Iterator<Item = &'static str> {
    PRESETS.iter().map(|(name, _, _)| *name)
}

/// The settings of a preset, keeping the user's dataset, base model and output from `current`.
pub fn apply_preset(name: &str, current: &TrainConfig) -> Result<TrainConfig, String> {
    let (_, file, text) = PRESETS
        .iter()
        .find(|(n, _, _)| *n == name)
        .ok_or_else(|| format!("there is no preset `{name}`"))?;
    let preset = config_from_text(text, Path::new(file)).map_err(|e| e.to_string())?;
    Ok(TrainConfig {
        train_data_dir: current.train_data_dir.clone(),
        metadata_path: current.metadata_path.clone(),
        trigger_word: current.trigger_word.clone().or(preset.trigger_word.clone()),
        base_model: current.base_model.clone(),
        output_dir: current.output_dir.clone(),
        output_name: current.output_name.clone(),
        ..preset
    })
}

#[cfg(test)]
mod tests {
    use super::{apply_preset, preset_names};
    use crate::config::TrainConfig;

    #[test]
    fn every_preset_applies_and_keeps_the_paths() {
        let current = TrainConfig {
            base_model: "mine.safetensors".into(),
            ..Default::default()
        };
        for name in preset_names() {
            let applied = apply_preset(name, &current).unwrap();
            assert_eq!(applied.base_model, current.base_model, "{name}");
        }
        assert_eq!(apply_preset("8 GB GPU", &current).unwrap().batch_size, 1);
    }
}
