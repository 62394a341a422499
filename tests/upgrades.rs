//! Reading what an earlier release stored: the checkpoint and the app settings lora-studio 0.1.0 wrote
//! (config version 1, kept under `tests/fixtures`) resume, export and load with this release, settings a
//! release does not know are dropped with a note instead of failing, and the upgrade says what it changed.

mod common;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use common::{fixture, max_abs_diff};
use lora_studio::config::{LogWith, SavePrecision, TrainConfig};
use lora_studio::tensor_file::TensorFile;
use lora_studio::train::{
    CancelToken, TrainReporter, TrainStop, export_checkpoint_on, export_kept, load_base,
    load_checkpoint, train,
};

#[derive(Default)]
struct Messages(Vec<String>);

impl TrainReporter for Messages {
    fn message(&mut self, text: &str) {
        self.0.push(text.to_string());
    }
}

/// The fixture checkpoint `checkpoint-2`, copied into `dir` (so that nothing can change the fixture).
fn version_1_checkpoint(dir: &Path) -> PathBuf {
    let copy = dir.join("checkpoint-2");
    std::fs::create_dir_all(&copy).unwrap();
    for entry in std::fs::read_dir(fixture("checkpoints/v1/checkpoint-2")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), copy.join(entry.file_name())).unwrap();
    }
    copy
}

/// The settings the fixture checkpoint was trained with, as this release writes them.
fn its_run(output_dir: &Path) -> TrainConfig {
    TrainConfig {
        train_data_dir: fixture("checkpoints/v1/data"),
        base_model: fixture("sd1"),
        output_dir: output_dir.to_path_buf(),
        output_name: "v1".to_string(),
        resolution: Some(64),
        lora_rank: 1,
        lora_alpha: 1.0,
        conv_lora: true,
        conv_rank: Some(1),
        conv_alpha: Some(1.0),
        batch_size: 1,
        max_train_steps: Some(4),
        learning_rate: 1e-3,
        log_with: LogWith::None,
        cache_latents_to_disk: false,
        keep_last_checkpoints: 1,
        device: "cpu".to_string(),
        ..Default::default()
    }
}

#[test]
fn a_checkpoint_of_config_version_1_resumes_and_exports() {
    let dir = tempfile::tempdir().unwrap();
    let checkpoint = version_1_checkpoint(dir.path());
    let loaded = load_checkpoint(&checkpoint, &Device::Cpu).unwrap();
    let note = loaded.upgrade_note.clone().expect("a note on the upgrade");
    assert!(
        note.contains("checkpoint-2 was written by lora-studio 0.1.0")
            && note.contains("with config version 1; read as version 2")
            && note.contains(
                "min_bucket_reso and max_bucket_reso (64..128) now follow the resolution"
            ),
        "{note}"
    );
    let stored = &loaded.state.config;
    assert_eq!(stored.bucket_sides(), (64, 128));
    assert_eq!((stored.conv_rank, stored.conv_alpha), (Some(1), Some(1.0)));

    // Resumed by this release: two more steps, and the run says what the upgrade changed.
    let run = its_run(&dir.path().join("out"));
    let mut messages = Messages::default();
    let outcome = train(
        &run,
        Some(&checkpoint),
        &mut messages,
        &CancelToken::default(),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((outcome.steps, outcome.stop), (4, TrainStop::Finished));
    assert!(messages.0.contains(&note), "{:?}", messages.0);

    // Exported by this release: 0.1.0's checkpoints keep no export of their own, so the network is rebuilt
    // on the base model; the very tensors 0.1.0 exported from it, with this release's metadata.
    let exported = dir.path().join("exported.safetensors");
    let kept = export_kept(&checkpoint, &exported, SavePrecision::Fp16, false).unwrap();
    assert_eq!(kept, None, "a format-1 checkpoint keeps no export");
    let base = load_base(&run).unwrap();
    export_checkpoint_on(&base, &checkpoint, &exported, SavePrecision::Fp16, false).unwrap();
    let ours = TensorFile::open(&exported).unwrap();
    let theirs = TensorFile::open(&fixture("checkpoints/v1/v1.safetensors")).unwrap();
    let names = |file: &TensorFile| file.infos().keys().cloned().collect::<Vec<_>>();
    assert_eq!(names(&ours), names(&theirs));
    for name in names(&theirs) {
        let load = |file: &TensorFile| {
            file.load(&name, &Device::Cpu)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
        };
        assert_eq!(max_abs_diff(&load(&ours), &load(&theirs)), 0.0, "{name}");
    }
    let metadata = ours.metadata();
    assert_eq!(
        (
            metadata["ss_network_dim"].as_str(),
            metadata["ss_network_alpha"].as_str()
        ),
        ("1", "1")
    );
    assert_eq!(
        metadata["ss_network_args"],
        r#"{"conv_alpha":"1","conv_dim":"1"}"#
    );
}

#[test]
fn a_stored_config_with_settings_this_release_does_not_know_loads_with_a_note() {
    let dir = tempfile::tempdir().unwrap();
    let checkpoint = version_1_checkpoint(dir.path());
    let state_path = checkpoint.join("state.json");
    let mut state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&state_path).unwrap()).unwrap();
    // As a later release might store it: a newer version, a setting this one lacks, one it has no more.
    let config = state["config"].as_object_mut().unwrap();
    config.insert("config_version".into(), 7.into());
    config.insert("ema_decay".into(), 0.999.into());
    config.remove("caption_extension");
    std::fs::write(&state_path, state.to_string()).unwrap();

    let loaded = load_checkpoint(&checkpoint, &Device::Cpu).unwrap_or_else(|e| panic!("{e}"));
    let note = loaded.upgrade_note.unwrap();
    assert!(
        note.contains("config version 7")
            && note.contains("newer release")
            && note.contains("dropped settings this release does not know: ema_decay"),
        "{note}"
    );
    assert_eq!(loaded.state.config.caption_extension, ".txt");
    assert_eq!(loaded.state.config.lora_rank, 1);
    assert_eq!(loaded.state.step, 2);
}

#[cfg(feature = "gui")]
mod app_settings {
    use std::collections::HashMap;
    use std::path::PathBuf;

    use lora_studio::app::{AppSettings, STORAGE_KEY, Tab, restore_settings};
    use lora_studio::config::{LrScheduler, OptimizerKind, PredictionOverride, TrainConfig};

    use super::fixture;

    /// eframe's storage, in memory.
    #[derive(Default)]
    struct MemoryStorage(HashMap<String, String>);

    impl eframe::Storage for MemoryStorage {
        fn get_string(&self, key: &str) -> Option<String> {
            self.0.get(key).cloned()
        }

        fn set_string(&mut self, key: &str, value: String) {
            self.0.insert(key.to_string(), value);
        }

        fn remove_string(&mut self, key: &str) {
            self.0.remove(key);
        }

        fn flush(&mut self) {}
    }

    fn storage_with(text: String) -> MemoryStorage {
        MemoryStorage(HashMap::from([(STORAGE_KEY.to_string(), text)]))
    }

    fn version_1_text() -> String {
        std::fs::read_to_string(fixture("settings/app-settings-v1.ron")).unwrap()
    }

    /// The training settings in the fixture, as this release holds them.
    fn its_training_settings() -> TrainConfig {
        TrainConfig {
            train_data_dir: PathBuf::from("/home/user/datasets/neon"),
            base_model: PathBuf::from("/home/user/models/v1-5-pruned-emaonly.safetensors"),
            output_dir: PathBuf::from("/home/user/lora/neon"),
            output_name: "neon_style".to_string(),
            trigger_word: Some("neon style".to_string()),
            resolution: Some(768),
            // 0.1.0's 256..1024 at 768 px is not what 768 px derives now: it stays as it trained.
            min_bucket_reso: Some(256),
            max_bucket_reso: Some(1024),
            lora_rank: 32,
            lora_alpha: 16.0,
            conv_lora: true,
            conv_rank: Some(4),
            conv_alpha: Some(2.0),
            optimizer: OptimizerKind::Adafactor,
            lr_scheduler: LrScheduler::CosineWithRestarts,
            unet_lr: Some(2e-4),
            prediction_type: Some(PredictionOverride::VPrediction),
            sample_prompts: vec!["neon style, a street".to_string()],
            sample_strengths: vec![0.0, 0.5, 1.0],
            max_train_steps: Some(1500),
            ..Default::default()
        }
    }

    #[test]
    fn app_settings_of_config_version_1_load_with_the_training_config_intact() {
        let restored = restore_settings(&storage_with(version_1_text()));
        assert_eq!(restored.settings.train, its_training_settings());
        assert_eq!(restored.settings.tab, Tab::Train);
        assert_eq!(restored.settings.preset, "gpu-8gb");
        assert!(restored.settings.show_advanced);
        assert!(restored.notes.is_empty(), "{:?}", restored.notes);

        // Stored again by this release, with its version, and read back the same.
        let mut storage = MemoryStorage::default();
        eframe::set_value(&mut storage, STORAGE_KEY, &restored.settings);
        assert!(storage.0[STORAGE_KEY].contains("\"config_version\":2"));
        let again = restore_settings(&storage);
        assert_eq!(again.settings, restored.settings);
        assert!(again.notes.is_empty(), "{:?}", again.notes);
    }

    #[test]
    fn stored_app_settings_with_a_setting_this_release_lacks_keep_the_rest_and_say_so() {
        let text = version_1_text()
            .replace("lora_rank:32,", "lora_rank:32,old_setting:5,")
            .replace("conv_lora:true", "conv_lora:false");
        let restored = restore_settings(&storage_with(text));
        let expected = TrainConfig {
            conv_lora: false,
            conv_rank: None,
            conv_alpha: None,
            ..its_training_settings()
        };
        assert_eq!(restored.settings.train, expected);
        assert_eq!(restored.settings.preset, "gpu-8gb");
        let notes = restored.notes.join("\n");
        assert!(
            notes.contains("with config version 1; read as version 2")
                && notes.contains("dropped settings this release does not know: old_setting")
                && notes.contains("conv_rank 4 and conv_alpha 2.0 (unused, conv_lora being off)"),
            "{notes}"
        );
        // Settings that cannot be read at all are the defaults, and the app says so.
        let garbage = restore_settings(&storage_with("(tab:".to_string()));
        assert_eq!(garbage.settings, AppSettings::default());
        assert_eq!(garbage.notes.len(), 1);
    }
}
