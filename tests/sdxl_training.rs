//! Training LoRAs on the tiny SDXL model, through the same loop and diffusion task as SD1/SD2: the loss goes
//! down, resume is exact, the export has kohya's SDXL names, shapes, alphas and metadata (also when exported
//! later from a checkpoint), an unset resolution is SDXL's 1024, v-prediction fine-tunes train (and render
//! their sample previews) on their zero-terminal-SNR schedule, an fp16 run keeps the VAE in f32, cached text-encoder outputs (context and
//! pooled) train exactly like fresh ones, and SDXL's bucket step is checked as kohya checks it.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

use candle_core::{DType, Device};
use common::{fixture, make_dataset, max_abs, tiny_config};
use lora_studio::config::TrainConfig;
use lora_studio::tensor_file::TensorFile;
use lora_studio::train::{
    CancelToken, SilentReporter, StepReport, TrainOutcome, TrainReporter, TrainStop, export_kept,
    load_checkpoint, train, train_on,
};

/// The steps and messages a run reported.
#[derive(Default)]
struct Recorded {
    losses: Vec<f64>,
    skipped: Vec<bool>,
    messages: Vec<String>,
}

impl TrainReporter for Recorded {
    fn step(&mut self, report: &StepReport) {
        self.losses.push(report.loss);
        self.skipped.push(report.skipped);
    }

    fn message(&mut self, text: &str) {
        self.messages.push(text.to_string());
    }
}

/// A training config on the tiny SDXL model over `data`, writing to `output`.
fn sdxl_config(data: &Path, output: &Path) -> TrainConfig {
    TrainConfig {
        base_model: fixture("sdxl"),
        ..tiny_config(data, output)
    }
}

fn run(config: &TrainConfig) -> (TrainOutcome, Recorded) {
    let mut recorded = Recorded::default();
    let outcome = train(config, None, &mut recorded, &CancelToken::default())
        .unwrap_or_else(|e| panic!("{e}"));
    (outcome, recorded)
}

/// Shapes of every tensor of a safetensors file.
fn shapes(path: &Path) -> BTreeMap<String, Vec<usize>> {
    TensorFile::open(path)
        .unwrap()
        .infos()
        .iter()
        .map(|(k, v)| (k.clone(), v.shape.clone()))
        .collect()
}

/// The metadata of a safetensors file.
fn metadata_of(path: &Path) -> HashMap<String, String> {
    common::read_tensors(path).1
}

#[test]
fn training_sdxl_lowers_the_loss() {
    let dir = tempfile::tempdir().unwrap();
    let data = make_dataset(&dir.path().join("data"), 6);
    // The tiny SDXL UNet has attention only in its two deeper levels; with the transformer blocks alone its
    // loss hardly moves (1.19 to 1.03 here), with LoCon's convolutions too it does.
    let config = TrainConfig {
        max_train_steps: Some(80),
        learning_rate: 3e-3,
        conv_lora: true,
        ..sdxl_config(&data, &dir.path().join("out"))
    };
    let (outcome, recorded) = run(&config);
    assert_eq!(outcome.stop, TrainStop::Finished);
    let mean = |s: &[f64]| s.iter().sum::<f64>() / s.len() as f64;
    let (first, last) = (mean(&recorded.losses[..15]), mean(&recorded.losses[65..]));
    eprintln!("SDXL loss: first 15 steps {first:.4}, last 15 steps {last:.4}");
    assert!(last < 0.8 * first, "loss went from {first:.4} to {last:.4}");
}

/// 20 steps straight equal 10 steps, a resume from the checkpoint, and 10 more: adapters (both text encoders
/// included), optimizer state and RNG. Flips put kohya's mirrored crop margins into the size conditioning.
#[test]
fn sdxl_resume_is_exact() {
    let dir = tempfile::tempdir().unwrap();
    let data = make_dataset(&dir.path().join("data"), 5);
    let config = |out: &str, steps: u64, save_steps: u64| TrainConfig {
        max_train_steps: Some(steps),
        save_steps,
        train_text_encoder: true,
        flip_aug: true,
        ..sdxl_config(&data, &dir.path().join(out))
    };
    run(&config("straight", 20, 0));
    run(&config("resumed", 10, 5));
    train(
        &config("resumed", 20, 5),
        Some(&dir.path().join("resumed/checkpoint-10")),
        &mut SilentReporter,
        &CancelToken::default(),
    )
    .unwrap();
    common::assert_same_run(
        &dir.path().join("straight/checkpoint-20"),
        &dir.path().join("resumed/checkpoint-20"),
        20,
    );
    let adapters = load_checkpoint(&dir.path().join("straight/checkpoint-20"), &Device::Cpu)
        .unwrap()
        .adapters;
    for prefix in ["lora_unet_", "lora_te1_", "lora_te2_"] {
        assert!(
            adapters.keys().any(|k| k.starts_with(prefix)),
            "no {prefix} adapters"
        );
    }
}

/// The settings of the fixture LoRA, which the reference script made with kohya's rules on this model:
/// linear rank 4, alpha 2; LoCon rank 2, alpha 1; both text encoders.
fn like_the_fixture_lora(config: TrainConfig) -> TrainConfig {
    TrainConfig {
        lora_rank: 4,
        lora_alpha: 2.0,
        conv_lora: true,
        conv_rank: Some(2),
        conv_alpha: Some(1.0),
        train_text_encoder: true,
        ..config
    }
}

/// kohya's SDXL metadata, with SDXL's native 1024 px where the config set no resolution.
fn assert_sdxl_metadata(metadata: &HashMap<String, String>) {
    for (key, value) in [
        ("ss_base_model_version", "sdxl_base_v1-0"),
        ("ss_v2", "False"),
        ("ss_network_module", "networks.lora"),
        ("ss_network_dim", "4"),
        ("ss_network_alpha", "2"),
        ("ss_resolution", "(1024, 1024)"),
        ("ss_zero_terminal_snr", "False"),
        ("modelspec.architecture", "stable-diffusion-xl-v1-base/lora"),
        (
            "modelspec.implementation",
            "https://github.com/Stability-AI/generative-models",
        ),
        ("modelspec.resolution", "1024x1024"),
        ("modelspec.prediction_type", "epsilon"),
    ] {
        assert_eq!(metadata[key], value, "{key}");
    }
    let stored: TrainConfig = serde_json::from_str(&metadata["lora_studio.config"]).unwrap();
    assert_eq!(stored.resolution, Some(1024));
    // The bucket sides follow the resolution: half and twice it.
    assert_eq!(
        (
            metadata["ss_min_bucket_reso"].as_str(),
            metadata["ss_max_bucket_reso"].as_str()
        ),
        ("512", "2048")
    );
}

#[test]
fn sdxl_export_has_kohyas_names_shapes_alphas_and_metadata_also_from_a_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let data = make_dataset(&dir.path().join("data"), 3);
    let config = like_the_fixture_lora(TrainConfig {
        max_train_steps: Some(2),
        save_steps: 1,
        resolution: None,
        ..sdxl_config(&data, &dir.path().join("out"))
    });
    let (outcome, _) = run(&config);
    let ours = shapes(&outcome.lora_path);
    let reference = shapes(&fixture("lora_sdxl.safetensors"));
    let names = |m: &BTreeMap<String, Vec<usize>>| m.keys().cloned().collect::<BTreeSet<_>>();
    assert_eq!(
        names(&ours),
        names(&reference),
        "the exported keys differ from kohya's"
    );
    assert_eq!(ours, reference, "the exported shapes differ from kohya's");
    assert!(ours.contains_key("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.alpha"));
    assert!(ours.contains_key("lora_te2_text_model_encoder_layers_3_self_attn_q_proj.alpha"));

    let (tensors, metadata) = common::read_tensors(&outcome.lora_path);
    for (key, tensor) in tensors.iter().filter(|(k, _)| k.ends_with(".alpha")) {
        let down = &reference[&key.replace(".alpha", ".lora_down.weight")];
        let is_3x3 = down.len() == 4 && down[2] == 3;
        let alpha = tensor
            .to_dtype(DType::F32)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(alpha, if is_3x3 { 1.0 } else { 2.0 }, "{key}");
    }
    assert_sdxl_metadata(&metadata);
    let mut trained = 0;
    for (key, tensor) in tensors
        .iter()
        .filter(|(k, _)| k.ends_with("lora_up.weight"))
    {
        if max_abs(tensor) > 0.0 {
            trained += 1;
        } else {
            // Only text encoder 1's last layer stays as it started: SDXL conditions on its penultimate
            // layer, so the loss never reaches it (kohya creates, and never trains, the same modules).
            assert!(
                key.starts_with("lora_te1_text_model_encoder_layers_2_"),
                "{key}"
            );
        }
    }
    assert!(trained > 0);

    // The checkpoint's kept export gives the same file later, with no base model and no dataset folder.
    std::fs::remove_dir_all(&data).unwrap();
    let exported = dir.path().join("exported.safetensors");
    export_kept(
        &dir.path().join("out/checkpoint-1"),
        &exported,
        lora_studio::config::SavePrecision::Fp16,
        false,
    )
    .unwrap()
    .expect("the checkpoint keeps its export");
    assert_eq!(shapes(&exported), reference);
    let kept_metadata = metadata_of(&exported);
    assert_sdxl_metadata(&kept_metadata);
    assert_eq!(kept_metadata["ss_steps"], "1");
    assert_eq!(kept_metadata["ss_output_name"], "exported");
}

#[test]
fn sdxl_v_prediction_fine_tunes_train_on_their_zero_terminal_snr_schedule() {
    let dir = tempfile::tempdir().unwrap();
    let data = make_dataset(&dir.path().join("data"), 3);
    let config = TrainConfig {
        base_model: common::sdxl_v_prediction_file(dir.path()),
        max_train_steps: Some(6),
        // With zero terminal SNR the last timestep has SNR 0; its min-SNR weight must not be 0/0.
        min_snr_gamma: Some(5.0),
        sample_every_n_steps: 3,
        sample_prompts: vec!["neon city".into()],
        sample_steps: 2,
        ..sdxl_config(&data, &dir.path().join("out"))
    };
    let (outcome, recorded) = run(&config);
    assert_eq!(outcome.stop, TrainStop::Finished);
    // Sample previews render during the run, with the v-prediction model and its schedule.
    for step in [3, 6] {
        let sample = dir
            .path()
            .join(format!("out/samples/step{step:06}-prompt0-strength1.png"));
        let image = image::open(&sample).unwrap_or_else(|e| panic!("{}: {e}", sample.display()));
        assert_eq!((image.width(), image.height()), (64, 64));
    }
    assert!(
        recorded.losses.iter().all(|l| l.is_finite()),
        "{:?}",
        recorded.losses
    );
    assert!(
        recorded
            .messages
            .iter()
            .any(|m| m.contains("predicts v_prediction") && m.contains("zero terminal SNR")),
        "{:?}",
        recorded.messages
    );
    let metadata = metadata_of(&outcome.lora_path);
    for (key, value) in [
        ("ss_base_model_version", "sdxl_base_v1-0"),
        ("modelspec.architecture", "stable-diffusion-xl-v1-base/lora"),
        ("modelspec.prediction_type", "v"),
        ("ss_v_parameterization", "True"),
        ("ss_zero_terminal_snr", "True"),
        ("ss_min_snr_gamma", "5"),
    ] {
        assert_eq!(metadata[key], value, "{key}");
    }
}

fn train_in(dtype: DType, config: &TrainConfig) -> Recorded {
    let mut recorded = Recorded::default();
    train_on(
        &mut common::loaded_base("sdxl", dtype),
        config,
        None,
        &mut recorded,
        &CancelToken::default(),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    recorded
}

/// SDXL's VAE overflows in fp16, so an fp16 run encodes its latents in f32 (and says so once); the step's
/// loss is the f32 step's within fp16's rounding.
#[test]
fn an_fp16_sdxl_run_encodes_with_the_vae_in_f32() {
    let dir = tempfile::tempdir().unwrap();
    let data = make_dataset(&dir.path().join("data"), 2);
    let config = |name: &str| TrainConfig {
        max_train_steps: Some(1),
        ..sdxl_config(&data, &dir.path().join(name))
    };
    assert_eq!(
        common::loaded_base("sdxl", DType::F16).model.vae_dtype(),
        DType::F32
    );
    let f32_run = train_in(DType::F32, &config("f32"));
    let f16_run = train_in(DType::F16, &config("f16"));
    assert!(!f16_run.skipped[0], "the fp16 step was skipped");
    let relative = (f16_run.losses[0] - f32_run.losses[0]).abs() / f32_run.losses[0];
    eprintln!(
        "SDXL fp16 loss {:.6} vs f32 {:.6} (relative {relative:.2e})",
        f16_run.losses[0], f32_run.losses[0]
    );
    assert!(relative < 1e-2, "{relative}");
    let notes: Vec<&String> = f16_run
        .messages
        .iter()
        .filter(|m| m.contains("VAE runs in f32"))
        .collect();
    assert_eq!(notes.len(), 1, "{:?}", f16_run.messages);
}

/// With frozen text encoders and fixed captions the context and the pooled embedding are encoded once per
/// caption; the losses are those of encoding every step (which shuffling one-tag captions forces without
/// changing them).
#[test]
fn cached_sdxl_text_encoder_outputs_train_like_fresh_ones() {
    let dir = tempfile::tempdir().unwrap();
    let data = make_dataset(&dir.path().join("data"), 3);
    let csv: String = (0..3)
        .map(|i| format!("img{i}.png,neon city {i}\n"))
        .collect();
    std::fs::write(data.join("metadata.csv"), format!("file_name,text\n{csv}")).unwrap();
    let config = |name: &str, shuffle_caption: bool| TrainConfig {
        max_train_steps: Some(4),
        shuffle_caption,
        ..sdxl_config(&data, &dir.path().join(name))
    };
    let (_, cached) = run(&config("cached", false));
    let (_, fresh) = run(&config("fresh", true));
    for (step, (a, b)) in cached.losses.iter().zip(&fresh.losses).enumerate() {
        assert!(
            (a - b).abs() <= 1e-6 * b.abs(),
            "step {step}: cached {a} vs fresh {b}"
        );
    }
    assert_eq!(cached.losses.len(), 4);
}

/// SDXL's bucket step must be a multiple of 32 (kohya's rule); bucket sides the user set must include the
/// resolution an SDXL run gives an unset one (1024).
#[test]
fn sdxl_bucket_settings_are_checked_for_sdxl() {
    let dir = tempfile::tempdir().unwrap();
    let data = make_dataset(&dir.path().join("data"), 2);
    let error = |config: TrainConfig| {
        train(&config, None, &mut SilentReporter, &CancelToken::default())
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    };
    assert_eq!(
        error(TrainConfig {
            bucket_reso_steps: 16,
            ..sdxl_config(&data, &dir.path().join("out"))
        }),
        "setting `bucket_reso_steps`: must be a multiple of 32 for SDXL (as kohya sd-scripts requires), \
         not 16"
    );
    let unset_resolution = TrainConfig {
        resolution: None,
        max_bucket_reso: Some(768),
        ..sdxl_config(&data, &dir.path().join("out"))
    };
    lora_studio::config::validate(&unset_resolution).expect("fine for SD1/SD2's 512");
    assert_eq!(
        error(unset_resolution),
        "setting `max_bucket_reso`: buckets 512..768 must include the resolution 1024"
    );
}
