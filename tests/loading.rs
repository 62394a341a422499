//! Loading the files users have, and refusing the ones that are not models with one clear sentence.

mod common;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use common::{Reference, assert_close, fixture, rewrite};
use lora_studio::models::checkpoint::{
    CheckpointLayout, ModelFamily, ModelSource, PredictionOrigin,
};
use lora_studio::models::pipeline::StableDiffusion;
use lora_studio::models::schedulers::PredictionType;
use lora_studio::tensor_file::TensorFile;

fn open_error(path: &Path) -> String {
    match ModelSource::open(path) {
        Ok(_) => panic!("{} opened as a model", path.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn single_files_and_folders_are_recognised() {
    let cases = [
        (
            "sd1_single.safetensors",
            CheckpointLayout::SingleFileSafetensors,
            ModelFamily::Sd1,
            PredictionType::Epsilon,
        ),
        (
            "sd1",
            CheckpointLayout::DiffusersFolder,
            ModelFamily::Sd1,
            PredictionType::Epsilon,
        ),
        (
            "sd2_single.safetensors",
            CheckpointLayout::SingleFileSafetensors,
            ModelFamily::Sd2,
            PredictionType::VPrediction,
        ),
        (
            "sd2_single.ckpt",
            CheckpointLayout::SingleFileCkpt,
            ModelFamily::Sd2,
            PredictionType::VPrediction,
        ),
        (
            "sd2",
            CheckpointLayout::DiffusersFolder,
            ModelFamily::Sd2,
            PredictionType::VPrediction,
        ),
        (
            "sdxl_single.safetensors",
            CheckpointLayout::SingleFileSafetensors,
            ModelFamily::Sdxl,
            PredictionType::Epsilon,
        ),
        (
            "sdxl",
            CheckpointLayout::DiffusersFolder,
            ModelFamily::Sdxl,
            PredictionType::Epsilon,
        ),
    ];
    for (path, layout, family, prediction) in cases {
        let source = ModelSource::open(&fixture(path)).unwrap();
        assert_eq!(source.layout(), layout, "{path}");
        assert_eq!(source.config().family, family, "{path}");
        assert_eq!(
            source.config().scheduler.prediction_type,
            prediction,
            "{path}"
        );
        let pad = if family == ModelFamily::Sd2 { 0 } else { 49407 };
        assert_eq!(source.config().pad_token, pad, "{path}");
        let config = source.config();
        if family == ModelFamily::Sdxl {
            assert_eq!(config.pad_token_2, 0, "{path}: tokenizer 2 pads with `!`");
            assert_eq!(config.vae.scaling_factor, 0.13025, "{path}");
            assert_eq!(config.unet.sample_size * 8, 64, "{path}: native size");
            assert!(config.text_encoder_2.is_some(), "{path}");
        } else {
            assert!(config.text_encoder_2.is_none(), "{path}");
        }
    }
}

#[test]
fn single_file_without_sidecars_infers_the_standard_rules() {
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("model.safetensors");
    std::fs::copy(fixture("sd1_single.safetensors"), &copy).unwrap();
    let source = ModelSource::open(&copy).unwrap();
    let with_sidecar = ModelSource::open(&fixture("sd1_single.safetensors")).unwrap();
    let (inferred, declared) = (&source.config().unet, &with_sidecar.config().unet);
    assert_eq!(inferred.block_out_channels, declared.block_out_channels);
    assert_eq!(inferred.down_attention, declared.down_attention);
    assert_eq!(inferred.up_attention, declared.up_attention);
    assert_eq!(inferred.layers_per_block, declared.layers_per_block);
    assert_eq!(inferred.cross_attention_dim, declared.cross_attention_dim);
    // SD1's rule is 8 heads; the tiny model's sidecar says 4.
    assert_eq!(inferred.attention_heads, vec![8; 3]);
    assert_eq!(source.config().vae, with_sidecar.config().vae);
    // An SD2 file without a config has 64-dimensional heads, and its prediction type is left to a test
    // prediction once it is loaded.
    let copy2 = dir.path().join("model2.safetensors");
    std::fs::copy(fixture("sd2_single.safetensors"), &copy2).unwrap();
    let sd2 = ModelSource::open(&copy2).unwrap();
    assert_eq!(sd2.config().family, ModelFamily::Sd2);
    assert_eq!(
        sd2.config().prediction_origin,
        PredictionOrigin::TestPrediction
    );
    assert!(sd2.config().unet.use_linear_projection);
    assert_eq!(
        sd2.config().text_encoder.num_hidden_layers,
        3,
        "OpenCLIP is used up to its penultimate layer"
    );
}

#[test]
fn truncated_checkpoint_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(fixture("sd1_single.safetensors")).unwrap();
    let path = dir.path().join("cut.safetensors");
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let message = open_error(&path);
    assert!(
        message.contains("cut.safetensors") && message.contains("truncated"),
        "{message}"
    );
}

#[test]
fn garbage_and_wrong_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let garbage = dir.path().join("garbage.safetensors");
    std::fs::write(&garbage, b"this is not a model at all, just some text").unwrap();
    let message = open_error(&garbage);
    assert!(
        message.contains("garbage.safetensors") && message.contains("not a valid safetensors file"),
        "{message}"
    );

    let text = dir.path().join("notes.txt");
    std::fs::write(&text, b"hello").unwrap();
    assert!(open_error(&text).contains("not a tensor file"));

    let message = open_error(&fixture("lora_sd1.safetensors"));
    assert!(message.contains("LoRA file, not a base model"), "{message}");

    let missing = dir.path().join("nowhere.safetensors");
    assert!(open_error(&missing).contains("no such file"));

    let empty_dir = dir.path().join("folder");
    std::fs::create_dir(&empty_dir).unwrap();
    assert!(open_error(&empty_dir).contains("no `unet/` subfolder"));

    let legacy = dir.path().join("legacy.ckpt");
    std::fs::write(&legacy, b"\x80\x02}q\x00.").unwrap();
    assert!(open_error(&legacy).contains("not a zip-format torch.save file"));
}

/// A zip-format `torch.save` file whose pickle holds `pickle` as `archive/data.pkl`.
fn torch_zip(path: &Path, pickle: &[u8]) {
    let mut zip = zip::ZipWriter::new(std::fs::File::create(path).unwrap());
    let stored =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    zip.start_file("archive/data.pkl", stored).unwrap();
    std::io::Write::write_all(&mut zip, pickle).unwrap();
    zip.finish().unwrap();
}

#[test]
fn a_ckpt_whose_pickle_calls_code_is_read_as_data_and_nothing_runs() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("pwned");
    let command = format!("touch {}", marker.display());
    let unicode = |text: &str| {
        let mut op = vec![b'X'];
        op.extend((text.len() as u32).to_le_bytes());
        op.extend(text.as_bytes());
        op
    };
    // {"weight": os.system(COMMAND)} and, at the top level, os.system(COMMAND) itself.
    let call = [
        b"cposix\nsystem\n".to_vec(),
        unicode(&command),
        b"\x85R".to_vec(),
    ]
    .concat();
    let in_dict = [
        b"\x80\x02}".to_vec(),
        unicode("weight"),
        call.clone(),
        b"s.".to_vec(),
    ]
    .concat();
    let top_level = [b"\x80\x02".to_vec(), call, b".".to_vec()].concat();
    for (name, pickle) in [("in_dict.ckpt", in_dict), ("top_level.ckpt", top_level)] {
        let path = dir.path().join(name);
        torch_zip(&path, &pickle);
        let message = open_error(&path);
        assert!(message.contains(name), "{message}");
        if let Ok(file) = TensorFile::open(&path) {
            assert!(file.infos().is_empty(), "{name}: {:?}", file.infos());
        }
        assert!(!marker.exists(), "{name} ran its pickle's code");
    }
}

#[test]
fn missing_tensor_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("incomplete.safetensors");
    let dropped = "model.diffusion_model.output_blocks.4.1.transformer_blocks.0.attn2.to_v.weight";
    rewrite(
        &fixture("sd1_single.safetensors"),
        &path,
        |k| k != dropped,
        &[],
    );
    for ext in ["yaml", "json"] {
        std::fs::copy(
            fixture(&format!("sd1_single.{ext}")),
            path.with_extension(ext),
        )
        .unwrap();
    }
    let source = ModelSource::open(&path).unwrap();
    let error = source
        .load_unet(&Device::Cpu, DType::F32)
        .expect_err("the UNet must not load")
        .to_string();
    assert!(
        error.contains("incomplete.safetensors")
            && error.contains(dropped)
            && error.contains("UNet"),
        "{error}"
    );
}

/// The SDXL refiner (OpenCLIP ViT-bigG as its only text encoder, conditioned on an aesthetic score) is
/// refused in one sentence, as a single file and as a diffusers folder.
#[test]
fn sdxl_refiner_is_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("refiner.safetensors");
    let extra = Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap();
    rewrite(
        &fixture("sdxl_single.safetensors"),
        &path,
        |k| !k.starts_with("conditioner."),
        &[("conditioner.embedders.0.model.ln_final.weight", extra)],
    );
    let message = open_error(&path);
    assert!(
        message.starts_with(&format!("{} is an SDXL refiner", path.display())),
        "{message}"
    );

    let folder = dir.path().join("refiner");
    copy_dir(&fixture("sdxl"), &folder);
    std::fs::remove_dir_all(folder.join("text_encoder")).unwrap();
    let message = open_error(&folder);
    assert!(message.contains("is an SDXL refiner"), "{message}");
}

/// An SDXL model missing its second text encoder, or not run by this program (EDM, fp8), is one sentence.
#[test]
fn incomplete_and_unsupported_sdxl_files_are_one_sentence() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("no_te2.safetensors");
    rewrite(
        &fixture("sdxl_single.safetensors"),
        &path,
        |k| !k.starts_with("conditioner.embedders.1."),
        &[],
    );
    // The tiny UNet's config (its heads and norm groups are not in the shapes); the text encoders are
    // inferred.
    let sidecar: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("sdxl_single.json")).unwrap())
            .unwrap();
    std::fs::write(
        path.with_extension("json"),
        serde_json::json!({ "unet": sidecar["unet"] }).to_string(),
    )
    .unwrap();
    let message = open_error(&path);
    assert!(
        message.contains("no_te2.safetensors")
            && message.contains("conditioner.embedders.1.model.token_embedding.weight")
            && message.contains("text encoder 2"),
        "{message}"
    );

    let folder = dir.path().join("no_te2");
    copy_dir(&fixture("sdxl"), &folder);
    std::fs::remove_dir_all(folder.join("text_encoder_2")).unwrap();
    let message = open_error(&folder);
    assert!(
        message.contains("no `text_encoder_2/` subfolder"),
        "{message}"
    );

    let marker = Tensor::zeros(0, DType::F32, &Device::Cpu).unwrap();
    for (key, what) in [
        ("edm_vpred.sigma_max", "CosXL"),
        ("edm_mean", "Playground"),
        ("scaled_fp8", "fp8"),
    ] {
        let path = dir.path().join("edm.safetensors");
        rewrite(
            &fixture("sdxl_single.safetensors"),
            &path,
            |_| true,
            &[(key, marker.clone())],
        );
        let message = open_error(&path);
        assert!(message.contains(what), "{key}: {message}");
    }
}

/// Asserts `message` is one sentence that starts with `path` and says `problem`.
fn assert_one_sentence_about(message: &str, path: &Path, problem: &str) {
    assert!(
        message.starts_with(&path.display().to_string())
            && message.contains(problem)
            && !message.contains('\n')
            && message.matches(". ").count() == 0,
        "expected one sentence naming {} and saying `{problem}`: {message}",
        path.display()
    );
}

/// An SDXL single file cut short, in the middle of its tensor data or in the middle of its JSON header (the
/// first 8 bytes still give the header's full length), is refused in one sentence naming the file and saying
/// it is truncated, when opened and when loaded.
#[test]
fn truncated_sdxl_single_files_are_one_sentence_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(fixture("sdxl_single.safetensors")).unwrap();
    let header_end = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    for (name, length) in [
        ("cut_in_data.safetensors", (header_end + bytes.len()) / 2),
        ("cut_in_header.safetensors", header_end / 2),
    ] {
        let path = dir.path().join(name);
        std::fs::write(&path, &bytes[..length]).unwrap();
        assert_one_sentence_about(&open_error(&path), &path, "truncated");
    }
}

/// A diffusers SDXL folder without its second text encoder (the folder, or the weights in it) is one
/// sentence naming the folder and what is missing.
#[test]
fn sdxl_folder_without_text_encoder_2_is_one_sentence_naming_the_folder() {
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("no_te2");
    copy_dir(&fixture("sdxl"), &folder);
    std::fs::remove_dir_all(folder.join("text_encoder_2")).unwrap();
    assert_one_sentence_about(
        &open_error(&folder),
        &folder,
        "no `text_encoder_2/` subfolder",
    );

    let folder = dir.path().join("no_te2_weights");
    copy_dir(&fixture("sdxl"), &folder);
    for entry in std::fs::read_dir(folder.join("text_encoder_2"))
        .unwrap()
        .flatten()
    {
        if entry
            .file_name()
            .to_string_lossy()
            .ends_with(".safetensors")
        {
            std::fs::remove_file(entry.path()).unwrap();
        }
    }
    let message = match ModelSource::open(&folder) {
        Err(e) => e.to_string(),
        Ok(source) => match StableDiffusion::load(&source, &Device::Cpu, DType::F32) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("an SDXL folder without text encoder 2's weights loaded"),
        },
    };
    assert_one_sentence_about(
        &message,
        &folder.join("text_encoder_2"),
        "it has no weights file",
    );
}

/// SDXL's VAE overflows in f16: a model loaded in f16 runs it in f32 and says so once.
#[test]
fn sdxl_vae_runs_in_f32_under_f16() {
    let source = ModelSource::open(&fixture("sdxl")).unwrap();
    let model = StableDiffusion::load(&source, &Device::Cpu, DType::F16).unwrap();
    assert_eq!(model.vae_dtype(), DType::F32);
    let note = model.vae_precision_note().expect("a log line");
    assert!(note.contains("f32") && note.contains("f16"), "{note}");
    let decoded = model
        .decode(&Tensor::zeros((1, 4, 8, 8), DType::F32, &Device::Cpu).unwrap())
        .unwrap();
    assert_eq!(decoded.dims(), &[1, 3, 64, 64]);
    // SD1's VAE stays in the model's dtype.
    let sd1 = StableDiffusion::load(
        &ModelSource::open(&fixture("sd1")).unwrap(),
        &Device::Cpu,
        DType::F16,
    )
    .unwrap();
    assert_eq!(sd1.vae_dtype(), DType::F16);
    assert!(sd1.vae_precision_note().is_none());
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap().flatten() {
        let target = to.join(entry.file_name());
        if entry.path().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

#[test]
fn sharded_weights_and_legacy_vae_names_load() {
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("model");
    copy_dir(&fixture("sd1"), &folder);

    // The UNet in two shards with an index, as large diffusers models are stored.
    let unet = folder.join("unet/diffusion_pytorch_model.safetensors");
    let file = TensorFile::open(&unet).unwrap();
    let keys: Vec<String> = file.infos().keys().cloned().collect();
    let (first, second) = keys.split_at(keys.len() / 2);
    let mut weight_map = serde_json::Map::new();
    for (shard, names) in [
        ("part-1.safetensors", first),
        ("part-2.safetensors", second),
    ] {
        let tensors: HashMap<String, Tensor> = names
            .iter()
            .map(|k| (k.clone(), file.load(k, &Device::Cpu).unwrap()))
            .collect();
        candle_core::safetensors::save(&tensors, folder.join("unet").join(shard)).unwrap();
        for name in names {
            weight_map.insert(name.clone(), shard.into());
        }
    }
    drop(file);
    std::fs::remove_file(&unet).unwrap();
    let index = serde_json::json!({ "metadata": {}, "weight_map": weight_map });
    std::fs::write(
        unet.with_extension("safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();

    // The VAE with the attention names older diffusers versions wrote (query/key/value/proj_attn).
    let vae = folder.join("vae/diffusion_pytorch_model.safetensors");
    let legacy = folder.join("vae/legacy.safetensors");
    std::fs::rename(&vae, &legacy).unwrap();
    let file = TensorFile::open(&legacy).unwrap();
    let renamed: HashMap<String, Tensor> = file
        .infos()
        .keys()
        .map(|k| {
            let old = k
                .replace(".to_q.", ".query.")
                .replace(".to_k.", ".key.")
                .replace(".to_v.", ".value.")
                .replace(".to_out.0.", ".proj_attn.");
            (old, file.load(k, &Device::Cpu).unwrap())
        })
        .collect();
    assert!(renamed.keys().any(|k| k.contains(".proj_attn.")));
    candle_core::safetensors::save(&renamed, &vae).unwrap();
    drop(file);
    std::fs::remove_file(&legacy).unwrap();

    let source = ModelSource::open(&folder).unwrap();
    let model = StableDiffusion::load(&source, &Device::Cpu, DType::F32).unwrap();
    let reference = Reference::open("sd1");
    let out = model
        .unet
        .forward(
            &reference.f32("unet.sample"),
            &reference.f32("unet.timestep"),
            &reference.f32("unet.encoder_hidden_states"),
        )
        .unwrap();
    assert_close("sharded UNet", &out, &reference.f32("unet.out"), 1e-4);
    let decoded = model.vae.decode(&reference.f32("vae.latents")).unwrap();
    assert_close(
        "legacy-named VAE",
        &decoded,
        &reference.f32("vae.decoded"),
        1e-4,
    );
}

/// The UNet output bias of an LDM single file, shifted by `shift`: the test prediction's mean moves by it.
fn with_output_bias_shifted(source: &Path, dest: &Path, shift: f64) {
    const BIAS: &str = "model.diffusion_model.out.2.bias";
    let bias = TensorFile::open(source)
        .unwrap()
        .load(BIAS, &Device::Cpu)
        .unwrap();
    let shifted = (bias.to_dtype(DType::F32).unwrap() + shift).unwrap();
    rewrite(source, dest, |k| k != BIAS, &[(BIAS, shifted)]);
}

#[test]
fn sd2_files_without_a_config_are_told_apart_by_a_test_prediction() {
    // The test prediction itself, on the tiny SD2 model with its config: as the reference computes it.
    let reference = Reference::open("sd2");
    let with_config = ModelSource::open(&fixture("sd2_single.safetensors")).unwrap();
    assert_eq!(
        with_config.config().prediction_origin,
        PredictionOrigin::Config
    );
    let model = StableDiffusion::load(&with_config, &Device::Cpu, DType::F32).unwrap();
    let expected = reference
        .f32("probe.mean")
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()[0] as f64;
    let ours = model.test_prediction().unwrap();
    assert!(
        (ours - expected).abs() < 1e-4,
        "test prediction {ours} vs the reference's {expected}"
    );
    assert_eq!(
        model.config().scheduler.prediction_type,
        PredictionType::VPrediction,
        "the config says v, whatever a test would say"
    );

    // Without the config: a model whose test prediction lands well below -1 predicts velocity, one near 0
    // noise (SD 2.x 768 and SD 2.x-base), and the log says which and why.
    let dir = tempfile::tempdir().unwrap();
    let plain = dir.path().join("plain.safetensors");
    std::fs::copy(fixture("sd2_single.safetensors"), &plain).unwrap();
    let load = |path: &Path| {
        let source = ModelSource::open(path).unwrap();
        StableDiffusion::load(&source, &Device::Cpu, DType::F32).unwrap()
    };
    let baseline = load(&plain).test_prediction().unwrap();
    assert!(
        baseline.abs() < 2.0,
        "the tiny model's test value is {baseline}"
    );
    for (shift, expected) in [
        (-3.0, PredictionType::VPrediction),
        (3.0, PredictionType::Epsilon),
    ] {
        let path = dir.path().join(format!("shifted{shift}.safetensors"));
        with_output_bias_shifted(&plain, &path, shift);
        let model = load(&path);
        assert_eq!(
            model.config().scheduler.prediction_type,
            expected,
            "{shift}"
        );
        let mean = model.test_prediction().unwrap();
        assert!(
            (mean - (baseline + shift)).abs() < 1e-4,
            "shift {shift}: {mean} vs {baseline}"
        );
        let note = model.prediction_note();
        assert!(
            note.contains(expected.as_str())
                && note.contains("test prediction")
                && note.contains(&format!("{mean:.3}")),
            "{note}"
        );
        // The user's prediction_type wins.
        let mut source = ModelSource::open(&path).unwrap();
        source.set_prediction_type(PredictionType::Epsilon);
        let overridden = StableDiffusion::load(&source, &Device::Cpu, DType::F32).unwrap();
        assert_eq!(
            overridden.config().scheduler.prediction_type,
            PredictionType::Epsilon
        );
        assert!(overridden.prediction_note().contains("prediction_type"));
    }
}

/// A copy of the sd1 folder in `dir`, with the path and contents of one of its config files (`vae/config.json`).
fn sd1_copy_and_config(
    dir: &Path,
    config: &str,
) -> (std::path::PathBuf, std::path::PathBuf, serde_json::Value) {
    let folder = dir.join("model");
    copy_dir(&fixture("sd1"), &folder);
    let config_path = folder.join(config);
    let json = serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    (folder, config_path, json)
}

#[test]
fn a_degenerate_vae_config_is_one_sentence_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let (folder, config_path, original) = sd1_copy_and_config(dir.path(), "vae/config.json");
    let cases: [(&str, serde_json::Value, &str); 10] = [
        ("block_out_channels", serde_json::json!([]), "no levels"),
        (
            "block_out_channels",
            serde_json::json!([32, 0, 32, 32]),
            "0 channels",
        ),
        (
            "block_out_channels",
            serde_json::json!([32, 48, 32, 32]),
            "48 channels",
        ),
        (
            "block_out_channels",
            serde_json::json!(vec![32; 70]),
            "70 levels",
        ),
        ("norm_num_groups", serde_json::json!(0), "groups"),
        ("latent_channels", serde_json::json!(0), "latent channels"),
        ("in_channels", serde_json::json!(0), "input channels"),
        ("out_channels", serde_json::json!(0), "output channels"),
        ("layers_per_block", serde_json::json!(0), "layers per block"),
        ("scaling_factor", serde_json::json!(0.0), "scaling factor"),
    ];
    for (key, value, expected) in cases {
        let mut config = original.clone();
        config[key] = value.clone();
        std::fs::write(&config_path, config.to_string()).unwrap();
        // Loading the whole model must not panic either (the error comes first).
        let loaded = std::panic::catch_unwind(|| {
            let source = ModelSource::open(&folder).map_err(|e| e.to_string())?;
            StableDiffusion::load(&source, &Device::Cpu, DType::F32)
                .map(|_| ())
                .map_err(|e| e.to_string())
        });
        let message = match loaded {
            Ok(Ok(())) => panic!("{key} = {value} loaded"),
            Ok(Err(message)) => message,
            Err(_) => panic!("{key} = {value} panicked"),
        };
        assert!(
            message.contains(&config_path.display().to_string())
                && message.contains(expected)
                && !message.contains('\n'),
            "{key} = {value}: {message}"
        );
    }
}

#[test]
fn a_unet_config_with_zero_norm_groups_is_a_sentence_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let (folder, config_path, mut config) = sd1_copy_and_config(dir.path(), "unet/config.json");
    config["norm_num_groups"] = 0.into();
    std::fs::write(&config_path, config.to_string()).unwrap();
    let opened = std::panic::catch_unwind(|| {
        ModelSource::open(&folder)
            .map(|_| ())
            .map_err(|e| e.to_string())
    });
    let message = match opened {
        Ok(result) => result.unwrap_err(),
        Err(_) => panic!("norm_num_groups = 0 panicked"),
    };
    assert!(
        message.contains(&config_path.display().to_string()) && message.contains("0 groups"),
        "{message}"
    );
}
