//! Training configs: every preset loads, files in all three formats work, `--set` wins over the file, a
//! saved config loads back unchanged, kohya sd-scripts / lora-scripts configs load with notes on what is
//! set aside, and mistakes are one sentence naming the key.

use std::path::{Path, PathBuf};

use lora_studio::config::{
    AlphaMode, ConfigError, LrScheduler, MixedPrecision, OptimizerKind, PredictionOverride,
    SavePrecision, load_config, load_config_noting, save_config,
};

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
    let chat = load_config(Some(&presets_dir().join("chat.toml")), &[]).unwrap();
    assert!(chat.packing && !chat.train_on_prompt);
    assert_eq!((chat.max_seq_length, chat.lora_dropout), (1024, 0.05));
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

/// lora-scripts' training config as it ships (sections, kohya names, settings for the Python stack).
const LORA_SCRIPTS: &str = r#"
[model_arguments]
v2 = false
v_parameterization = false
pretrained_model_name_or_path = "./sd-models/model.safetensors"

[dataset_arguments]
train_data_dir = "./train/aki"
reg_data_dir = ""
prior_loss_weight = 1
cache_latents = true
shuffle_caption = true
enable_bucket = true

[additional_network_arguments]
network_dim = 32
network_alpha = 16
network_train_unet_only = false
network_train_text_encoder_only = false
network_module = "networks.lora"
network_args = []

[optimizer_arguments]
optimizer_type = "AdamW8bit"
unet_lr = 1e-4
text_encoder_lr = 1e-5
lr_scheduler = "cosine_with_restarts"
lr_warmup_steps = 0
lr_restart_cycles = 1

[training_arguments]
train_batch_size = 1
noise_offset = 0.0
keep_tokens = 0
min_bucket_reso = 256
max_bucket_reso = 1024
caption_extension = ".txt"
max_token_length = 225
seed = 1337
xformers = true
lowram = false
max_train_epochs = 10
resolution = "512,512"
clip_skip = 2
mixed_precision = "fp16"
enable_contrastive = false
contrastive_weight = 0.05

[sample_prompt_arguments]
sample_every_n_epochs = 5
sample_sampler = "euler_a"

[saving_arguments]
output_name = "aki"
save_every_n_epochs = 2
save_n_epoch_ratio = 0
save_last_n_epochs = 5
save_state = false
save_model_as = "safetensors"
output_dir = "./output"
logging_dir = "./logs"
log_prefix = ""
save_precision = "fp16"

[others]
min_bucket_reso = 256
seed = 1337
"#;

#[test]
fn a_lora_scripts_config_loads_with_notes_on_what_is_set_aside() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "lora-scripts.toml", LORA_SCRIPTS);
    let loaded = load_config_noting(Some(&path), &[]).unwrap();
    let c = &loaded.config;
    assert_eq!(c.base_model, PathBuf::from("./sd-models/model.safetensors"));
    assert_eq!(c.train_data_dir, PathBuf::from("./train/aki"));
    assert_eq!((c.lora_rank, c.lora_alpha), (32, 16.0));
    assert!(
        c.train_text_encoder,
        "network_train_unet_only = false trains it"
    );
    assert_eq!(c.optimizer, OptimizerKind::AdamW);
    assert_eq!((c.unet_lr, c.text_encoder_lr), (Some(1e-4), Some(1e-5)));
    assert_eq!(c.lr_scheduler, LrScheduler::CosineWithRestarts);
    assert_eq!(
        (c.lr_num_cycles, c.epochs, c.resolution),
        (1, 10, Some(512))
    );
    assert_eq!((c.seed, c.clip_skip, c.keep_tokens), (1337, 2, 0));
    assert_eq!(c.mixed_precision, MixedPrecision::Fp16);
    assert_eq!(c.save_precision, SavePrecision::Fp16);
    assert_eq!((c.save_every_n_epochs, c.sample_every_n_epochs), (2, 0));
    assert_eq!(c.output_name, "aki");
    assert_eq!(c.keep_last_checkpoints, 5);
    assert!(c.shuffle_caption && c.cache_latents && c.enable_bucket);
    assert_eq!(c.prediction_type, None);
    let notes = loaded.notes.join("\n");
    for expected in [
        "ignored (they tune the Python trainer): xformers, lowram, save_state",
        "optimizer AdamW8bit runs as AdamW with full-precision state",
        "sample_every_n_epochs = 5 renders nothing: sample_prompts is not set",
        "max_token_length 225: captions are read up to CLIP's 75 tokens",
        "logging_dir ./logs: TensorBoard logs go to OUTPUT_DIR/logs",
    ] {
        assert!(notes.contains(expected), "{expected}\nnot in:\n{notes}");
    }
}

#[test]
fn kohya_arguments_prompts_and_precisions_translate() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "prompts.txt",
        "# previews\na neon street --n blurry --w 512 --h 512\n\nan old harbour at dusk\n",
    );
    let prompts = dir.path().join("prompts.txt").display().to_string();
    let text = format!(
        r#"{REQUIRED}network_module = "lycoris.kohya"
network_args = ["conv_dim=4", "conv_alpha=1", "algo=locon"]
optimizer_type = "Adafactor"
optimizer_args = ["weight_decay=0.05", "betas=0.9,0.99", "relative_step=False"]
v_parameterization = true
save_precision = "float"
alpha_mask = true
loss_type = "l2"
max_timestep = 1000.0
resume = ""
sample_prompts = "{prompts}"
sample_every_n_steps = 50
min_snr_gamma = 0
"#
    );
    let path = write(dir.path(), "k.toml", &text);
    let loaded = load_config_noting(Some(&path), &[]).unwrap();
    let c = &loaded.config;
    assert!(c.conv_lora);
    assert_eq!((c.conv_rank, c.conv_alpha), (Some(4), Some(1.0)));
    assert_eq!(c.optimizer, OptimizerKind::Adafactor);
    assert_eq!(
        (c.weight_decay, c.adam_beta1, c.adam_beta2),
        (0.05, 0.9, 0.99)
    );
    assert_eq!(c.prediction_type, Some(PredictionOverride::VPrediction));
    assert_eq!(c.save_precision, SavePrecision::Fp32);
    assert_eq!(
        c.sample_prompts,
        ["a neon street", "an old harbour at dusk"]
    );
    assert_eq!(c.min_snr_gamma, None);
    assert!(c.masked_loss && c.alpha_mode == AlphaMode::Mask);
    assert_eq!(
        loaded.notes,
        ["ignored optimizer argument relative_step=False"]
    );
}

#[test]
fn kohya_settings_lora_studio_cannot_honour_are_one_sentence() {
    for (setting, expected) in [
        (
            "optimizer_type = \"Prodigy\"",
            "c.toml: setting `optimizer_type`: Prodigy is not available; lora-studio trains with AdamW or Adafactor",
        ),
        (
            "reg_data_dir = \"reg\"",
            "c.toml: setting `reg_data_dir`: regularisation images are not available; remove the setting",
        ),
        (
            "resolution = \"768x512\"",
            "c.toml: setting `resolution`: `768x512` is not a size such as 512 or \"512,512\"",
        ),
        (
            "network_module = \"networks.oft\"",
            "c.toml: setting `network_module`: networks.oft is not available; lora-studio trains LoRA, LoCon and DoRA",
        ),
        (
            "[a]\nseed = 1\n[b]\nseed = 2",
            "c.toml: setting `seed`: it is set twice, to 1 and to 2 (in [b])",
        ),
        (
            "min_timestep = 100",
            "c.toml: setting `min_timestep`: 100 changes training in a way lora-studio does not offer; remove it",
        ),
        (
            "loss_type = \"huber\"",
            "c.toml: setting `loss_type`: \"huber\" changes training in a way lora-studio does not offer; remove it",
        ),
        (
            "lr_warmup_steps = 0.1",
            "c.toml: setting `lr_warmup_steps`: 0.1 is a fraction of the run; give a number of steps",
        ),
    ] {
        assert_eq!(error(&format!("{REQUIRED}{setting}\n"), &[]), expected);
    }
}

#[test]
fn a_kohya_ss_json_with_numbers_as_text_loads() {
    let dir = tempfile::tempdir().unwrap();
    let text = r#"{
        "LoRA_type": "Kohya LoCon", "conv_dim": 8, "conv_alpha": 4, "conv_dims": "",
        "pretrained_model_name_or_path": "model.safetensors", "train_data_dir": "data",
        "reg_data_dir": "", "output_dir": "out", "output_name": "style", "logging_dir": "",
        "learning_rate": "0.0001", "unet_lr": "0.0001", "text_encoder_lr": "5e-05",
        "lr_scheduler": "constant", "lr_scheduler_num_cycles": "", "lr_scheduler_power": "",
        "lr_warmup": "0", "optimizer": "AdamW8bit", "optimizer_args": "",
        "max_resolution": "512,650", "enable_bucket": true, "bucket_reso_steps": 64.0,
        "bucket_no_upscale": true, "epoch": 4, "max_train_epochs": "", "max_train_steps": "",
        "train_batch_size": 2, "gradient_accumulation_steps": 1.0, "seed": "1234",
        "keep_tokens": "0", "noise_offset": "0.05", "min_snr_gamma": 0, "clip_skip": 2,
        "max_token_length": "75", "mixed_precision": "bf16", "save_precision": "bf16",
        "save_every_n_epochs": 1, "network_dim": 64, "network_alpha": 32,
        "stop_text_encoder_training": 0, "caption_dropout_every_n_epochs": 0.0,
        "xformers": "xformers", "mem_eff_attn": false, "full_fp16": false,
        "max_data_loader_n_workers": "1", "num_cpu_threads_per_process": 2,
        "v2": false, "v_parameterization": false, "sdxl": false, "block_dims": "",
        "down_lr_weight": "", "training_comment": "", "model_list": "custom", "vae": ""
    }"#;
    let path = write(dir.path(), "kohya_ss.json", text);
    let loaded = load_config_noting(Some(&path), &[]).unwrap();
    let c = &loaded.config;
    assert!(c.conv_lora);
    assert_eq!((c.conv_rank, c.conv_alpha), (Some(8), Some(4.0)));
    assert_eq!((c.lora_rank, c.lora_alpha), (64, 32.0));
    assert_eq!(c.learning_rate, 1e-4);
    assert_eq!((c.unet_lr, c.text_encoder_lr), (Some(1e-4), Some(5e-5)));
    assert_eq!(c.optimizer, OptimizerKind::AdamW);
    assert_eq!((c.resolution, c.bucket_reso_steps), (Some(576), 64));
    assert_eq!(
        (c.epochs, c.batch_size, c.gradient_accumulation_steps),
        (4, 2, 1)
    );
    assert_eq!((c.seed, c.keep_tokens, c.noise_offset), (1234, 0, 0.05));
    assert_eq!(c.max_train_steps, None);
    assert_eq!(c.mixed_precision, MixedPrecision::Bf16);
    let notes = loaded.notes.join("\n");
    assert!(
        notes
            .contains("max_resolution 512,650: trained on buckets of about the same area, 576x576"),
        "{notes}"
    );
    assert!(
        !notes.contains("max_token_length"),
        "75 is CLIP's own: {notes}"
    );
    // What kohya_ss offers and lora-studio does not is named.
    let lokr = write(
        dir.path(),
        "lokr.json",
        &text.replace("Kohya LoCon", "LyCORIS/LoKr"),
    );
    let message = load_config(Some(&lokr), &[]).unwrap_err().to_string();
    assert!(
        message.ends_with(
            "lokr.json: setting `LoRA_type`: LyCORIS/LoKr is not available; lora-studio trains LoRA (Standard) and LoCon"
        ),
        "{message}"
    );
}

#[test]
fn a_kohya_dataset_config_with_one_folder_becomes_its_settings() {
    let dir = tempfile::tempdir().unwrap();
    let dataset = write(
        dir.path(),
        "dataset.toml",
        "[general]\nshuffle_caption = true\ncaption_extension = '.caption'\nkeep_tokens = 2\n\n\
         [[datasets]]\nresolution = [640, 640]\nbatch_size = 4\nkeep_tokens = 1\n\n  \
         [[datasets.subsets]]\n  image_dir = 'images/style'\n  num_repeats = 10\n  \
         class_tokens = 'sks style'\n",
    );
    let config = format!(
        "pretrained_model_name_or_path = \"model.safetensors\"\ndataset_config = \"{}\"\n",
        dataset.display()
    );
    let path = write(dir.path(), "train.toml", &config);
    let c = load_config(Some(&path), &[]).unwrap();
    assert_eq!(c.train_data_dir, PathBuf::from("images/style"));
    assert_eq!((c.repeats, c.batch_size, c.resolution), (10, 4, Some(640)));
    assert_eq!(c.instance_prompt.as_deref(), Some("sks style"));
    assert_eq!(c.caption_extension, ".caption");
    assert_eq!(c.keep_tokens, 1, "the dataset's value wins over [general]");
    assert!(c.shuffle_caption);

    let two = format!(
        "{}\n  [[datasets.subsets]]\n  image_dir = 'images/other'\n",
        std::fs::read_to_string(&dataset).unwrap()
    );
    std::fs::write(&dataset, two).unwrap();
    let message = load_config(Some(&path), &[]).unwrap_err().to_string();
    assert!(
        message.contains("setting `dataset_config`: ")
            && message
                .contains("dataset.toml describes 2 image folders; lora-studio trains on one"),
        "{message}"
    );
}

#[test]
fn without_bucket_sides_the_buckets_follow_the_resolution() {
    use lora_studio::data::buckets::BucketSettings;
    let dir = tempfile::tempdir().unwrap();
    for resolution in [64u32, 128, 256, 512, 768, 1024] {
        let path = write(
            dir.path(),
            "c.toml",
            &format!("{REQUIRED}resolution = {resolution}\n"),
        );
        let config = load_config(Some(&path), &[]).unwrap_or_else(|e| panic!("{resolution}: {e}"));
        let buckets = BucketSettings::from_config(&config);
        let (min, max) = (buckets.min_reso, buckets.max_reso);
        assert!(
            min <= resolution && resolution <= max && min % 64 == 0 && max % 64 == 0,
            "{resolution}: {min}..{max}"
        );
        let predefined = buckets.predefined();
        assert!(
            predefined.contains(&(resolution, resolution)),
            "{resolution}: {predefined:?}"
        );
        for (width, height) in [(96, 64), (64, 96), (4000, 3000), (300, 2000)] {
            let (w, h) = buckets.bucket_for(width, height);
            assert!(
                w.max(h) <= max && w % 64 == 0 && h % 64 == 0,
                "{resolution}: {width}x{height} went to {w}x{h}"
            );
            // Sides never go below one step, so only a very long image can exceed the area.
            assert!(
                w * h <= resolution * resolution || height > 4 * width,
                "{resolution}: {width}x{height} went to {w}x{h}"
            );
        }
        if resolution == 512 {
            assert_eq!((min, max), (256, 1024), "kohya's defaults for 512 px");
        }
    }
    // A range the user wrote is theirs: one that misses the resolution is an error, as before.
    assert_eq!(
        error(
            &format!("{REQUIRED}resolution = 64\nmin_bucket_reso = 256\nmax_bucket_reso = 1024\n"),
            &[]
        ),
        "c.toml: setting `min_bucket_reso`: buckets 256..1024 must include the resolution 64"
    );
    assert_eq!(
        error(
            &format!("{REQUIRED}resolution = 64\nmin_bucket_reso = 256\n"),
            &[]
        ),
        "c.toml: setting `min_bucket_reso`: buckets 256..256 must include the resolution 64"
    );
    assert_eq!(
        error(
            &format!("{REQUIRED}resolution = 1024\nmax_bucket_reso = 768\n"),
            &[]
        ),
        "c.toml: setting `max_bucket_reso`: buckets 512..768 must include the resolution 1024"
    );
}

#[test]
fn a_kohya_conv_dim_without_conv_alpha_takes_each_trainers_default() {
    let dir = tempfile::tempdir().unwrap();
    for (module, expected) in [("networks.lora", Some(1.0)), ("lycoris.kohya", None)] {
        let text =
            format!("{REQUIRED}network_module = \"{module}\"\nnetwork_args = [\"conv_dim=4\"]\n");
        let c = load_config(Some(&write(dir.path(), "k.toml", &text)), &[]).unwrap();
        assert!(c.conv_lora);
        assert_eq!((c.conv_rank, c.conv_alpha), (Some(4), expected), "{module}");
    }
    // Without any conv setting, LoCon follows the linear rank and alpha.
    let text = format!("{REQUIRED}conv_lora = true\nlora_rank = 12\nlora_alpha = 6\n");
    let c = load_config(Some(&write(dir.path(), "c.toml", &text)), &[]).unwrap();
    assert_eq!((c.conv_rank(), c.conv_alpha()), (12, 6.0));
}

/// A config without a resolution leaves it to the base model (SD1/SD2 512, SDXL 1024, set when the run knows
/// its model); until then it counts as 512, and the bucket sides that are not set follow whichever it is.
#[test]
fn an_unset_resolution_is_the_base_models() {
    use lora_studio::config::{SD_RESOLUTION, SDXL_RESOLUTION};
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "c.toml", REQUIRED);
    let config = load_config(Some(&path), &[]).unwrap();
    assert_eq!(config.resolution, None);
    assert_eq!(config.training_resolution(), SD_RESOLUTION);
    assert_eq!(config.bucket_sides(), (256, 1024));
    let sdxl = config.with_resolution_default(SDXL_RESOLUTION);
    assert_eq!(sdxl.resolution, Some(1024));
    assert_eq!(sdxl.bucket_sides(), (512, 2048));
    // A resolution that is set stays.
    let set = load_config(Some(&path), &["resolution=768".to_string()]).unwrap();
    assert_eq!(
        set.with_resolution_default(SDXL_RESOLUTION).resolution,
        Some(768)
    );
}
