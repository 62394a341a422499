//! Training configs: every preset loads, files in all three formats work, `--set` wins over the file, a
//! saved config loads back unchanged, and mistakes are one sentence naming the key.

use std::path::{Path, PathBuf};

use lora_studio::config::{ConfigError, LrScheduler, OptimizerKind, load_config, save_config};

fn presets() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("presets");
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files
}

#[test]
fn every_preset_loads() {
    let files = presets();
    assert!(files.len() >= 6, "presets: {files:?}");
    for file in files {
        let config =
            load_config(Some(&file), &[]).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        assert!(!config.output_name.is_empty());
    }
    let cyberpunk = load_config(Some(&presets_dir().join("cyberpunk.toml")), &[]).unwrap();
    assert!(cyberpunk.conv_lora && cyberpunk.train_text_encoder);
    assert_eq!(cyberpunk.lr_scheduler, LrScheduler::CosineWithRestarts);
    let small = load_config(Some(&presets_dir().join("gpu-8gb.toml")), &[]).unwrap();
    assert!(small.gradient_checkpointing);
    assert_eq!(small.optimizer, OptimizerKind::Adafactor);
}

#[test]
fn a_saved_config_loads_back_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    for preset in presets() {
        let mut config = load_config(Some(&preset), &[]).unwrap();
        config.train_data_dir = dir.path().join("my images");
        config.sample_prompts = vec!["neon city, \"rain\"".into()];
        let saved = dir.path().join("saved.toml");
        save_config(&config, &saved).unwrap();
        let loaded = load_config(Some(&saved), &[])
            .unwrap_or_else(|e| panic!("{} saved and loaded: {e}", preset.display()));
        assert_eq!(loaded, config, "{}", preset.display());
    }
}

fn presets_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("presets")
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

const REQUIRED: &str = "train_data_dir = \"data\"\nbase_model = \"model.safetensors\"\n";

#[test]
fn json_toml_and_yaml_give_the_same_config_and_set_wins() {
    let dir = tempfile::tempdir().unwrap();
    let toml = write(
        dir.path(),
        "a.toml",
        &format!("{REQUIRED}learning_rate = 1e-4\nlora_rank = 32\n"),
    );
    let yaml = write(
        dir.path(),
        "a.yaml",
        "train_data_dir: data\nbase_model: model.safetensors\nlearning_rate: 1.0e-4\nlora_rank: 32\n",
    );
    let json = write(
        dir.path(),
        "a.json",
        r#"{"train_data_dir": "data", "base_model": "model.safetensors", "learning_rate": 1e-4, "lora_rank": 32}"#,
    );
    let a = load_config(Some(&toml), &[]).unwrap();
    assert_eq!(a, load_config(Some(&yaml), &[]).unwrap());
    assert_eq!(a, load_config(Some(&json), &[]).unwrap());
    assert_eq!(a.lora_rank, 32);
    let overridden = load_config(
        Some(&toml),
        &[
            "learning_rate=5e-5".into(),
            "sample_prompts=[\"a\",\"b\"]".into(),
        ],
    )
    .unwrap();
    assert_eq!(overridden.learning_rate, 5e-5);
    assert_eq!(overridden.sample_prompts, vec!["a", "b"]);
    // kohya's names are accepted for ours.
    let kohya = write(
        dir.path(),
        "k.toml",
        &format!("{REQUIRED}network_dim = 8\nnetwork_alpha = 4\n"),
    );
    let k = load_config(Some(&kohya), &[]).unwrap();
    assert_eq!((k.lora_rank, k.lora_alpha), (8, 4.0));
}

fn error(text: &str, overrides: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "c.toml", text);
    let overrides: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    let e: ConfigError =
        load_config(Some(&path), &overrides).expect_err("the config must be refused");
    // Named relative to the temporary folder, as a user sees their own file.
    e.to_string()
        .replace(&format!("{}/", dir.path().display()), "")
}

#[test]
fn mistakes_name_the_key() {
    assert_eq!(
        error(&format!("{REQUIRED}learnig_rate = 1e-4\n"), &[]),
        "c.toml: unknown setting `learnig_rate`; did you mean `learning_rate`?"
    );
    assert_eq!(
        error(REQUIRED, &["lora_rnak=4"]),
        "unknown setting `lora_rnak`; did you mean `lora_rank`?",
        "a mistake in `--set` is not blamed on the file"
    );
    let message = error(&format!("{REQUIRED}lora_rank = \"big\"\n"), &[]);
    assert!(
        message.starts_with("c.toml: setting `lora_rank`: invalid type: string \"big\""),
        "{message}"
    );
    let message = error(&format!("{REQUIRED}resolution = 500\n"), &[]);
    assert!(
        message.starts_with("c.toml: setting `resolution`: must be a multiple of 64"),
        "{message}"
    );
    let message = error(&format!("{REQUIRED}lr_scheduler = \"cosin\"\n"), &[]);
    assert!(
        message.starts_with("c.toml: setting `lr_scheduler`: unknown variant `cosin`"),
        "{message}"
    );
    let message = error("base_model = \"m.safetensors\"\n", &[]);
    assert!(
        message.starts_with("c.toml: setting `train_data_dir`: is required"),
        "{message}"
    );
    assert!(error(REQUIRED, &["no_equals_sign"]).contains("not of the form key=value"));
    assert!(
        error(&format!("{REQUIRED}network_dim = 4\nlora_rank = 8\n"), &[])
            .contains("both set the same thing")
    );
    let message = error("train_data_dir = [1, 2\n", &[]);
    assert!(
        message.contains("c.toml") && message.contains("is not valid TOML"),
        "{message}"
    );
}
