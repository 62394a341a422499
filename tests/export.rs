//! Exported files hold what was trained: the kohya file in fp32, fp16 and bf16, the diffusers/PEFT layout
//! (lora_A = down, lora_B = up · alpha/rank, diffusers module paths), and the export of a checkpoint made
//! from the copy it keeps, with the dataset folder gone and no base model loaded, for LoRA, DoRA and PiSSA.

mod common;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use common::{make_dataset, max_abs_diff, tiny_config};
use lora_studio::config::{SavePrecision, TrainConfig};
use lora_studio::train::{CancelToken, SilentReporter, TrainOutcome, export_kept, train};

fn run(config: &TrainConfig) -> TrainOutcome {
    train(config, None, &mut SilentReporter, &CancelToken::default())
        .unwrap_or_else(|e| panic!("{e}"))
}

use common::read_tensors as read;

fn scalar(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
}

#[test]
fn the_peft_layout_holds_the_kohya_modules_under_diffusers_paths() {
    let dir = tempfile::tempdir().unwrap();
    let data = make_dataset(&dir.path().join("data"), 2);
    let config = TrainConfig {
        max_train_steps: Some(2),
        train_text_encoder: true,
        lora_alpha: 2.0,
        save_precision: SavePrecision::Fp32,
        export_peft: true,
        ..tiny_config(&data, &dir.path().join("out"))
    };
    let outcome = run(&config);
    let (kohya, _) = read(&outcome.lora_path);
    let (peft, peft_metadata) = read(
        &dir.path()
            .join("out/tiny_diffusers/pytorch_lora_weights.safetensors"),
    );
    assert_eq!(
        peft.len() * 3,
        kohya.len() * 2,
        "two PEFT tensors per three kohya ones"
    );
    assert_eq!(peft_metadata["ss_output_name"], "tiny");
    let pairs = [
        (
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
            "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
        ),
        (
            "lora_unet_mid_block_attentions_0_proj_in",
            "unet.mid_block.attentions.0.proj_in",
        ),
        (
            "lora_te_text_model_encoder_layers_1_mlp_fc2",
            "text_encoder.text_model.encoder.layers.1.mlp.fc2",
        ),
    ];
    for (kohya_name, path) in pairs {
        let down = &kohya[&format!("{kohya_name}.lora_down.weight")];
        let up = &kohya[&format!("{kohya_name}.lora_up.weight")];
        let alpha = scalar(&kohya[&format!("{kohya_name}.alpha")]);
        let rank = down.dims()[0] as f64;
        assert_eq!(alpha, 2.0);
        let a = &peft[&format!("{path}.lora_A.weight")];
        let b = &peft[&format!("{path}.lora_B.weight")];
        assert_eq!(
            max_abs_diff(a, down),
            0.0,
            "{path}: lora_A is the down projection"
        );
        let scaled_up = (up * (alpha / rank)).unwrap();
        assert!(
            max_abs_diff(b, &scaled_up) < 1e-7,
            "{path}: lora_B is the up projection times alpha/rank"
        );
        assert!(
            common::max_abs(b) > 0.0,
            "{path}: the trained up projection is not zero"
        );
    }
}

/// The export of `checkpoint` in `precision`, written with the dataset folder gone.
fn export_in(checkpoint: &Path, out: &Path, precision: SavePrecision) -> HashMap<String, Tensor> {
    let written = export_kept(checkpoint, out, precision, false)
        .unwrap_or_else(|e| panic!("{e}"))
        .expect("the checkpoint keeps its export");
    assert_eq!(written, out);
    let (tensors, metadata) = read(out);
    let name = out.file_stem().unwrap().to_string_lossy();
    assert_eq!(metadata["ss_output_name"], name);
    assert_eq!(metadata["modelspec.title"], name);
    assert!(
        !metadata.contains_key("lora_studio.modules"),
        "the checkpoint-only key is left out"
    );
    tensors
}

#[test]
fn checkpoints_export_in_every_precision_without_dataset_or_base_model() {
    for (label, dora, pissa) in [
        ("lora", false, false),
        ("dora", true, false),
        ("pissa", false, true),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let data = make_dataset(&dir.path().join("data"), 2);
        let config = TrainConfig {
            max_train_steps: Some(2),
            conv_lora: true,
            dora,
            pissa,
            save_precision: SavePrecision::Fp32,
            ..tiny_config(&data, &dir.path().join("out"))
        };
        let outcome = run(&config);
        let (trained, trained_metadata) = read(&outcome.lora_path);
        let checkpoint = outcome.checkpoint.unwrap();
        std::fs::remove_dir_all(&data).unwrap();

        let exported = export_in(
            &checkpoint,
            &dir.path().join("f32.safetensors"),
            SavePrecision::Fp32,
        );
        assert_eq!(exported.len(), trained.len(), "{label}");
        for (name, tensor) in &trained {
            assert_eq!(
                max_abs_diff(&exported[name], tensor),
                0.0,
                "{label} {name}: the checkpoint's export differs from the run's"
            );
        }
        let (_, metadata) = read(&dir.path().join("f32.safetensors"));
        for key in [
            "ss_network_dim",
            "ss_network_alpha",
            "ss_steps",
            "ss_tag_frequency",
            "lora_studio.exactness",
        ] {
            assert_eq!(metadata[key], trained_metadata[key], "{label} {key}");
        }
        for (precision, dtype) in [
            (SavePrecision::Fp16, DType::F16),
            (SavePrecision::Bf16, DType::BF16),
        ] {
            let out = dir.path().join(format!("{dtype:?}.safetensors"));
            let exported = export_in(&checkpoint, &out, precision);
            for (name, tensor) in &trained {
                let ours = &exported[name];
                assert_eq!(ours.dtype(), dtype, "{label} {name}");
                let rounded = tensor.to_dtype(dtype).unwrap();
                assert_eq!(
                    max_abs_diff(ours, &rounded),
                    0.0,
                    "{label} {name}: not the fp32 values rounded to {dtype:?}"
                );
            }
        }
    }
}

/// A network on SDXL is named as kohya names SDXL modules (the original UNet paths, `lora_te1`/`lora_te2`:
/// exactly the modules of the fixture LoRA the reference script made with kohya's rules); its PEFT copy uses
/// diffusers paths under `unet.`, `text_encoder.` and `text_encoder_2.`; the kohya file loads back onto every
/// layer it came from.
#[test]
fn sdxl_networks_export_kohya_and_peft_names() {
    use lora_studio::lora::{
        KohyaLora, LoraNetwork, NetworkKind, NetworkSpec, TEXT_ENCODER_1_PREFIX,
        TEXT_ENCODER_2_PREFIX, TargetComponent, UNET_PREFIX, export_network, write_lora_file,
    };
    use lora_studio::models::checkpoint::ModelSource;
    use lora_studio::models::pipeline::StableDiffusion;

    let source = ModelSource::open(&common::fixture("sdxl")).unwrap();
    let model = StableDiffusion::load(&source, &Device::Cpu, DType::F32).unwrap();
    let second = model.text_encoder_2.as_ref().unwrap();
    let targets = [
        TargetComponent {
            prefix: UNET_PREFIX,
            slots: model.unet.lora_targets(true),
            group: 0,
        },
        TargetComponent {
            prefix: TEXT_ENCODER_1_PREFIX,
            slots: model.text_encoder.lora_targets(),
            group: 1,
        },
        TargetComponent {
            prefix: TEXT_ENCODER_2_PREFIX,
            slots: second.lora_targets(),
            group: 1,
        },
    ];
    let spec = NetworkSpec {
        rank: 4,
        alpha: 2.0,
        conv_rank: 2,
        conv_alpha: 1.0,
        kind: NetworkKind::Lora,
    };
    let network = LoraNetwork::create(&targets, spec, 7, &Device::Cpu).unwrap();
    let exported = export_network(&network).unwrap();
    drop(network);

    let ours: std::collections::BTreeSet<&str> = exported
        .modules
        .iter()
        .map(|m| m.kohya_name.as_str())
        .collect();
    let fixture_lora =
        KohyaLora::load(&common::fixture("lora_sdxl.safetensors"), &Device::Cpu).unwrap();
    let kohya: std::collections::BTreeSet<&str> =
        fixture_lora.modules().keys().map(String::as_str).collect();
    assert_eq!(ours, kohya, "kohya's SDXL module names");

    let peft: Vec<String> = exported
        .peft_tensors(DType::F32)
        .unwrap()
        .into_iter()
        .map(|(name, _)| name)
        .collect();
    for expected in [
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight",
        "unet.up_blocks.0.upsamplers.0.conv.lora_B.weight",
        "text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_A.weight",
        "text_encoder_2.text_model.encoder.layers.3.self_attn.q_proj.lora_A.weight",
    ] {
        assert!(peft.iter().any(|n| n == expected), "no `{expected}`");
    }
    assert!(
        peft.iter()
            .all(|n| ["unet.", "text_encoder.", "text_encoder_2."]
                .iter()
                .any(|prefix| n.starts_with(prefix))
                && !n.contains("input_blocks")),
        "PEFT names use diffusers paths"
    );

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sdxl.safetensors");
    write_lora_file(
        &path,
        &exported.kohya_tensors(DType::F32).unwrap(),
        &Default::default(),
    )
    .unwrap();
    let report = KohyaLora::load(&path, &Device::Cpu)
        .unwrap()
        .attach(&model.adapter_components(), 1.0, DType::F32)
        .unwrap();
    assert!(report.unmatched.is_empty(), "{:?}", report.unmatched);
    assert_eq!(report.adapters.len(), exported.modules.len());
}
