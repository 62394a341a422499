//! Training on the tiny fixture models: the loss goes down, the export has kohya's exact names, shapes and
//! alphas and reproduces the trained network in every loader, resume is exact, and bad runs stop cleanly.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use candle_core::{DType, Device, Tensor};
use common::{Reference, fixture, make_dataset, max_abs_diff, tiny_config};
use lora_studio::config::TrainConfig;
use lora_studio::lora::KohyaLora;
use lora_studio::models::checkpoint::ModelSource;
use lora_studio::models::pipeline::StableDiffusion;
use lora_studio::tensor_file::TensorFile;
use lora_studio::train::{
    CancelToken, SilentReporter, StepReport, TrainReporter, TrainStop, load_checkpoint, train,
};

#[derive(Default)]
struct Losses(Vec<f64>);

impl TrainReporter for Losses {
    fn step(&mut self, report: &StepReport) {
        self.0.push(report.loss);
    }
}

fn run(config: &TrainConfig) -> lora_studio::train::TrainOutcome {
    train(config, None, &mut SilentReporter, &CancelToken::default())
        .unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn training_lowers_the_loss() {
    let dir = tempfile::tempdir().unwrap();
    let data = make_dataset(&dir.path().join("data"), 6);
    let config = TrainConfig {
        max_train_steps: Some(80),
        learning_rate: 3e-3,
        ..tiny_config(&data, &dir.path().join("out"))
    };
    let mut losses = Losses::default();
    let outcome = train(&config, None, &mut losses, &CancelToken::default()).unwrap();
    assert_eq!(outcome.stop, TrainStop::Finished);
    let mean = |s: &[f64]| s.iter().sum::<f64>() / s.len() as f64;
    let (first, last) = (mean(&losses.0[..15]), mean(&losses.0[65..]));
    assert!(last < 0.8 * first, "loss went from {first:.4} to {last:.4}");
}

fn module_shapes(path: &std::path::Path) -> BTreeMap<String, Vec<usize>> {
    let file = TensorFile::open(path).unwrap();
    file.infos()
        .iter()
        .map(|(k, v)| (k.clone(), v.shape.clone()))
        .collect()
}

#[test]
fn export_matches_kohya_names_shapes_alpha_and_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let data = make_dataset(&dir.path().join("data"), 3);
    // The fixture LoRA was made by the reference script with kohya's rules on this model: linear rank 4,
    // alpha 2; LoCon rank 2, alpha 1; text encoder included.
    let config = TrainConfig {
        max_train_steps: Some(2),
        lora_alpha: 2.0,
        conv_lora: true,
        conv_rank: Some(2),
        conv_alpha: Some(1.0),
        train_text_encoder: true,
        trigger_word: Some("cyb3r".into()),
        ..tiny_config(&data, &dir.path().join("out"))
    };
    let outcome = run(&config);
    let ours = module_shapes(&outcome.lora_path);
    let reference = module_shapes(&fixture("lora_sd1.safetensors"));
    let names = |m: &BTreeMap<String, Vec<usize>>| m.keys().cloned().collect::<BTreeSet<_>>();
    assert_eq!(
        names(&ours),
        names(&reference),
        "the exported keys differ from kohya's"
    );
    assert_eq!(ours, reference, "the exported shapes differ from kohya's");

    let file = TensorFile::open(&outcome.lora_path).unwrap();
    for (key, info) in file.infos() {
        assert_eq!(
            info.dtype.to_string(),
            "f16",
            "{key} is saved in fp16 by default"
        );
        if key.ends_with(".alpha") {
            assert!(info.shape.is_empty(), "{key} is a 0-dim tensor");
            let alpha = file
                .load(key, &Device::Cpu)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            let expected = if reference[&key.replace(".alpha", ".lora_down.weight")].len() == 4
                && reference[&key.replace(".alpha", ".lora_down.weight")][2] == 3
            {
                1.0
            } else {
                2.0
            };
            assert_eq!(alpha, expected, "{key}");
        }
    }
    let md = file.metadata();
    for key in [
        "ss_network_module",
        "ss_network_dim",
        "ss_network_alpha",
        "ss_base_model_version",
        "ss_v2",
        "ss_output_name",
        "ss_resolution",
        "ss_num_train_images",
        "ss_learning_rate",
        "ss_num_epochs",
        "ss_training_started_at",
        "ss_tag_frequency",
        "ss_dataset_dirs",
        "ss_seed",
        "sshs_model_hash",
        "sshs_legacy_hash",
        "modelspec.architecture",
        "modelspec.title",
        "modelspec.resolution",
        "lora_studio.config",
    ] {
        assert!(md.contains_key(key), "metadata lacks {key}");
    }
    assert_eq!(md["ss_network_module"], "networks.lora");
    assert_eq!(md["ss_base_model_version"], "sd_v1");
    assert_eq!(md["ss_v2"], "False");
    assert_eq!(md["modelspec.architecture"], "stable-diffusion-v1/lora");
    let tags: serde_json::Value = serde_json::from_str(&md["ss_tag_frequency"]).unwrap();
    let folder = tags.as_object().unwrap().values().next().unwrap();
    assert_eq!(
        folder["cyb3r"], 3,
        "the trigger word is a tag of every caption"
    );
    assert_eq!(folder["magenta squares"], 3);
    let retrained: TrainConfig = serde_json::from_str(&md["lora_studio.config"]).unwrap();
    assert_eq!(retrained, config);
    // A1111 computes the model hash as SHA-256 of everything after the header.
    let bytes = std::fs::read(&outcome.lora_path).unwrap();
    let header = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    assert_eq!(
        md["sshs_model_hash"],
        lora_studio::hashing::sha256_hex(&bytes[8 + header..])
    );
}

/// UNet output on the reference inputs with the given LoRA file applied at `strength` (or none).
fn unet_with_lora(model_path: &std::path::Path, lora: Option<(&std::path::Path, f64)>) -> Tensor {
    let source = ModelSource::open(model_path).unwrap();
    let model = StableDiffusion::load(&source, &Device::Cpu, DType::F32).unwrap();
    if let Some((path, strength)) = lora {
        let file = KohyaLora::load(path, &Device::Cpu).unwrap();
        let report = file
            .attach(&model.adapter_components(), strength, DType::F32)
            .unwrap();
        assert!(report.unmatched.is_empty());
    }
    let reference = Reference::open("sd1");
    model
        .unet
        .forward(
            &reference.f32("unet.sample"),
            &reference.f32("unet.timestep"),
            &reference.f32("unet.encoder_hidden_states"),
        )
        .unwrap()
}

#[test]
fn exported_lora_at_strength_0_is_the_base_and_at_1_equals_the_merged_model() {
    let dir = tempfile::tempdir().unwrap();
    let data = make_dataset(&dir.path().join("data"), 4);
    let config = TrainConfig {
        max_train_steps: Some(15),
        learning_rate: 1e-2,
        conv_lora: true,
        save_precision: lora_studio::config::SavePrecision::Fp32,
        ..tiny_config(&data, &dir.path().join("out"))
    };
    let outcome = run(&config);
    let base = unet_with_lora(&fixture("sd1"), None);
    let at_zero = unet_with_lora(&fixture("sd1"), Some((&outcome.lora_path, 0.0)));
    assert_eq!(
        max_abs_diff(&base, &at_zero),
        0.0,
        "strength 0 must be the base model exactly"
    );
    let at_one = unet_with_lora(&fixture("sd1"), Some((&outcome.lora_path, 1.0)));
    assert!(
        max_abs_diff(&base, &at_one) > 1e-3,
        "the trained LoRA must change the output"
    );

    let merged = dir.path().join("merged.safetensors");
    let source = ModelSource::open(&fixture("sd1")).unwrap();
    lora_studio::models::merge::merge_to_single_file(
        &source,
        &[(outcome.lora_path.clone(), 1.0)],
        &merged,
        DType::F32,
    )
    .unwrap();
    for ext in ["yaml", "json"] {
        std::fs::copy(
            fixture(&format!("sd1_single.{ext}")),
            merged.with_extension(ext),
        )
        .unwrap();
    }
    let merged_out = unet_with_lora(&merged, None);
    let diff = max_abs_diff(&merged_out, &at_one);
    assert!(
        diff < 1e-4,
        "merged model differs from the LoRA at strength 1 by {diff}"
    );
}

#[test]
fn resume_is_exact() {
    let dir = tempfile::tempdir().unwrap();
    let data = make_dataset(&dir.path().join("data"), 5);
    let straight = TrainConfig {
        max_train_steps: Some(20),
        ..tiny_config(&data, &dir.path().join("straight"))
    };
    run(&straight);
    let first_half = TrainConfig {
        max_train_steps: Some(10),
        save_steps: 5,
        ..tiny_config(&data, &dir.path().join("resumed"))
    };
    run(&first_half);
    let second_half = TrainConfig {
        max_train_steps: Some(20),
        ..first_half.clone()
    };
    let checkpoint = dir.path().join("resumed/checkpoint-10");
    train(
        &second_half,
        Some(&checkpoint),
        &mut SilentReporter,
        &CancelToken::default(),
    )
    .unwrap();

    common::assert_same_run(
        &dir.path().join("straight/checkpoint-20"),
        &dir.path().join("resumed/checkpoint-20"),
        20,
    );
}

#[test]
fn checkpoints_follow_epochs_as_well_as_steps() {
    let dir = tempfile::tempdir().unwrap();
    let data = make_dataset(&dir.path().join("data"), 5);
    let out = dir.path().join("out");
    let config = TrainConfig {
        max_train_steps: Some(12),
        batch_size: 1,
        save_every_n_epochs: 2,
        save_steps: 3,
        keep_last_checkpoints: 10,
        ..tiny_config(&data, &out)
    };
    run(&config);
    let mut steps: Vec<u64> = std::fs::read_dir(&out)
        .unwrap()
        .filter_map(|e| {
            let name = e.unwrap().file_name().into_string().unwrap();
            name.strip_prefix("checkpoint-")?.parse().ok()
        })
        .collect();
    steps.sort();
    // Five images, one a step: the second epoch ends at step 10; every third step; and the end.
    assert_eq!(steps, [3, 6, 9, 10, 12]);
}

#[test]
fn a_diverging_run_stops_and_keeps_a_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let data = make_dataset(&dir.path().join("data"), 3);
    let config = TrainConfig {
        max_train_steps: Some(30),
        learning_rate: 1e30,
        max_grad_norm: 0.0,
        ..tiny_config(&data, &dir.path().join("out"))
    };
    let outcome = run(&config);
    assert_eq!(outcome.stop, TrainStop::NonFiniteLoss);
    assert!(outcome.steps < 30);
    assert!(
        outcome
            .checkpoint
            .is_some_and(|p| p.join("state.json").is_file())
    );
}

/// The UNet output on the reference inputs with a network restored from a checkpoint.
fn unet_with_checkpoint(
    checkpoint: &std::path::Path,
    kind: lora_studio::lora::NetworkKind,
    config: &TrainConfig,
) -> Tensor {
    use lora_studio::lora::{LoraNetwork, NetworkSpec, TargetComponent};
    let source = ModelSource::open(&fixture("sd1")).unwrap();
    let model = StableDiffusion::load(&source, &Device::Cpu, DType::F32).unwrap();
    let spec = NetworkSpec {
        rank: config.lora_rank as usize,
        alpha: config.lora_alpha as f64,
        conv_rank: config.conv_rank() as usize,
        conv_alpha: config.conv_alpha() as f64,
        kind,
    };
    let targets = [TargetComponent {
        prefix: "lora_unet",
        slots: model.unet.lora_targets(false),
        group: 0,
    }];
    let network = LoraNetwork::create(&targets, spec, config.seed, &Device::Cpu).unwrap();
    let saved = load_checkpoint(checkpoint, &Device::Cpu).unwrap();
    network.load_state(&saved.adapters).unwrap();
    let reference = Reference::open("sd1");
    model
        .unet
        .forward(
            &reference.f32("unet.sample"),
            &reference.f32("unet.timestep"),
            &reference.f32("unet.encoder_hidden_states"),
        )
        .unwrap()
}

#[test]
fn pissa_exports_exactly_and_dora_within_its_stated_error() {
    use lora_studio::lora::NetworkKind;
    let dir = tempfile::tempdir().unwrap();
    let data = make_dataset(&dir.path().join("data"), 3);
    let base = unet_with_lora(&fixture("sd1"), None);
    for (kind, name) in [(NetworkKind::Pissa, "pissa"), (NetworkKind::Dora, "dora")] {
        let config = TrainConfig {
            max_train_steps: Some(8),
            learning_rate: 5e-3,
            pissa: kind == NetworkKind::Pissa,
            dora: kind == NetworkKind::Dora,
            save_precision: lora_studio::config::SavePrecision::Fp32,
            ..tiny_config(&data, &dir.path().join(name))
        };
        let outcome = run(&config);
        let trained = unet_with_checkpoint(outcome.checkpoint.as_ref().unwrap(), kind, &config);
        assert!(
            max_abs_diff(&trained, &base) > 1e-3,
            "{name}: training changed nothing"
        );
        let exported = unet_with_lora(&fixture("sd1"), Some((&outcome.lora_path, 1.0)));
        let file = TensorFile::open(&outcome.lora_path).unwrap();
        let exactness = file.metadata()["lora_studio.exactness"].clone();
        let error = max_abs_diff(&exported, &trained);
        match kind {
            NetworkKind::Pissa => {
                assert!(error < 1e-4, "PiSSA export differs by {error}");
                assert!(exactness.starts_with("exact"), "{exactness}");
                assert_eq!(
                    file.metadata()["ss_network_dim"],
                    "8",
                    "PiSSA exports at twice the rank"
                );
            }
            _ => {
                let change = max_abs_diff(&trained, &base);
                assert!(
                    error < 0.05 * change,
                    "DoRA export differs by {error} for a change of {change}"
                );
                assert!(
                    exactness.starts_with("approximate") && exactness.contains("error"),
                    "{exactness}"
                );
            }
        }
    }
}

#[test]
fn a_dataset_problem_is_reported_before_the_base_model_is_loaded() {
    let dir = tempfile::tempdir().unwrap();
    let data = make_dataset(&dir.path().join("data"), 2);
    std::fs::write(
        data.join("metadata.csv"),
        "file_name,text\nimg0.png,\"never closed\n",
    )
    .unwrap();
    let config = TrainConfig {
        // Loading this would fail with a different message; the dataset's must come first.
        base_model: dir.path().join("no-such-model.safetensors"),
        ..tiny_config(&data, &dir.path().join("out"))
    };
    let error = train(&config, None, &mut SilentReporter, &CancelToken::default())
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(error.contains("metadata.csv"), "{error}");
}

/// The kohya network metadata of a run with `config`: `ss_network_dim`, `ss_network_alpha`, `ss_network_args`,
/// and the largest rank among the file's linear modules (1x1 convolutions included) and among its 3x3
/// convolutions.
fn network_metadata(config: &TrainConfig) -> (String, String, serde_json::Value, usize, usize) {
    let outcome = run(config);
    let file = TensorFile::open(&outcome.lora_path).unwrap();
    let md = file.metadata();
    let (mut linear, mut conv) = (0, 0);
    for (key, info) in file.infos() {
        if key.ends_with(".lora_down.weight") {
            let is_conv = info.shape.len() == 4 && info.shape[2] * info.shape[3] > 1;
            let rank = if is_conv { &mut conv } else { &mut linear };
            *rank = (*rank).max(info.shape[0]);
        }
    }
    (
        md["ss_network_dim"].clone(),
        md["ss_network_alpha"].clone(),
        serde_json::from_str(&md["ss_network_args"]).unwrap(),
        linear,
        conv,
    )
}

#[test]
fn network_metadata_gives_the_linear_rank_and_alpha_and_the_convolutions_in_the_args() {
    let dir = tempfile::tempdir().unwrap();
    let data = make_dataset(&dir.path().join("data"), 2);
    let base = |name: &str| TrainConfig {
        max_train_steps: Some(1),
        lora_rank: 4,
        lora_alpha: 2.0,
        ..tiny_config(&data, &dir.path().join(name))
    };
    let conv_args =
        |dim: &str, alpha: &str| serde_json::json!({ "conv_dim": dim, "conv_alpha": alpha });
    let locon = |name: &str| TrainConfig {
        conv_lora: true,
        conv_rank: Some(8),
        conv_alpha: Some(1.0),
        ..base(name)
    };
    // (config, ss_network_dim, ss_network_alpha, ss_network_args, linear rank, conv rank in the file)
    let cases = [
        // Plain LoRA: no convolutions, no arguments.
        (base("lora"), "4", "2", serde_json::json!({}), 4, 0),
        // LoCon with its own rank and alpha: the linear ones stay in ss_network_dim/alpha.
        (locon("locon"), "4", "2", conv_args("8", "1"), 4, 8),
        // LoCon without a conv rank or alpha: the convolutions take the linear ones.
        (
            TrainConfig {
                conv_lora: true,
                ..base("locon-default")
            },
            "4",
            "2",
            conv_args("4", "2"),
            4,
            4,
        ),
        // PiSSA exports twice the rank (and so twice the alpha, for the same scale), convolutions too.
        (
            TrainConfig {
                pissa: true,
                ..locon("pissa")
            },
            "8",
            "4",
            conv_args("16", "2"),
            8,
            16,
        ),
    ];
    for (config, dim, alpha, args, linear, conv) in cases {
        let name = config.output_dir.display().to_string();
        assert_eq!(
            network_metadata(&config),
            (dim.to_string(), alpha.to_string(), args, linear, conv),
            "{name}"
        );
    }

    // DoRA is folded at a rank of its own per layer with alpha = rank (scale 1): the metadata gives the
    // largest linear rank in the file.
    let (dim, alpha, args, linear, _) = network_metadata(&TrainConfig {
        dora: true,
        ..base("dora")
    });
    assert_eq!(
        (dim.clone(), alpha),
        (linear.to_string(), linear.to_string())
    );
    assert!(linear >= 8, "{dim}");
    assert_eq!(args, serde_json::json!({}));
}
