//! SDXL against the reference implementation (diffusers' `StableDiffusionXLPipeline` + transformers, float64)
//! on the tiny SDXL made by `tests/fixtures/generate_sdxl.py`, loaded from its diffusers folder and from its
//! single file: both text encoders (context and pooled output), the UNet with the size conditioning, the VAE,
//! whole generations (DDIM, Euler a, Euler, DPM++ 2M Karras, v-prediction with zero terminal SNR), and a kohya
//! SDXL LoRA applied at two strengths.

mod common;

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use common::{Reference, assert_close, check_generation, fixture, max_abs_diff};
use lora_studio::lora::{KohyaLora, kohya_name};
use lora_studio::models::checkpoint::{ModelFamily, ModelSource, PredictionOrigin};
use lora_studio::models::pipeline::StableDiffusion;
use lora_studio::models::schedulers::{PredictionType, SamplerKind};
use lora_studio::models::unet::AddedConditions;
use lora_studio::tensor_file::TensorFile;

/// Network outputs must match to this (max abs).
const NET_TOLERANCE: f64 = 1e-4;

/// The samplers WebUI users pick for SDXL, by their key in the reference: diffusers' `EulerDiscreteScheduler`
/// and `DPMSolverMultistepScheduler` (dpmsolver++, order 2, Karras sigmas) from SDXL's scheduler config
/// (leading spacing), as `tests/fixtures/schedulers/generate.py` builds them for SD1/SD2.
const SAMPLER_REFERENCES: [(SamplerKind, &str); 2] = [
    (SamplerKind::Euler, "euler"),
    (
        SamplerKind::DpmSolverMultistep { karras: true },
        "dpmpp_2m_karras",
    ),
];

/// The sampler of the generation with the LoRA attached (`lora_dpmpp_2m_karras.*`, from the same initial noise
/// as `dpmpp_2m_karras.*`).
const LORA_SAMPLER: (SamplerKind, &str) = SAMPLER_REFERENCES[1];

fn load_path(path: &Path) -> StableDiffusion {
    let source = ModelSource::open(path).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(source.config().family, ModelFamily::Sdxl);
    StableDiffusion::load(&source, &Device::Cpu, DType::F32).unwrap_or_else(|e| panic!("{e}"))
}

fn load(name: &str) -> StableDiffusion {
    load_path(&fixture(name))
}

fn reference() -> Reference {
    Reference::open("sdxl")
}

fn check_text_encoders(model: &StableDiffusion, reference: &Reference) {
    let prompts: Vec<String> = serde_json::from_str(&reference.metadata("te.prompts")).unwrap();
    let refs: Vec<&str> = prompts.iter().map(String::as_str).collect();
    for (ours, name) in [
        (model.tokenize(&refs).unwrap(), "te.input_ids_1"),
        (model.tokenize_2(&refs).unwrap(), "te.input_ids_2"),
    ] {
        assert_eq!(
            ours.to_dtype(DType::I64).unwrap().to_vec2::<i64>().unwrap(),
            reference.tensor(name).to_vec2::<i64>().unwrap(),
            "{name}"
        );
    }
    let (first, none) = model
        .text_encoder
        .penultimate_and_pooled(&reference.tensor("te.input_ids_1"))
        .unwrap();
    assert!(none.is_none(), "text encoder 1 has no projection");
    assert_close(
        "text encoder 1, penultimate layer",
        &first,
        &reference.f32("te.hidden_1"),
        NET_TOLERANCE,
    );
    let (second, pooled) = model
        .text_encoder_2
        .as_ref()
        .expect("SDXL has a second text encoder")
        .penultimate_and_pooled(&reference.tensor("te.input_ids_2"))
        .unwrap();
    assert_close(
        "text encoder 2, penultimate layer",
        &second,
        &reference.f32("te.hidden_2"),
        NET_TOLERANCE,
    );
    assert_close(
        "text encoder 2, pooled projection",
        &pooled.unwrap(),
        &reference.f32("te.pooled"),
        NET_TOLERANCE,
    );
    let embeddings = model.encode_prompts(&refs, 1).unwrap();
    assert_close(
        "prompt context",
        &embeddings.context,
        &reference.f32("te.context"),
        NET_TOLERANCE,
    );
    assert_close(
        "prompt pooled embedding",
        &embeddings.pooled.unwrap(),
        &reference.f32("te.pooled"),
        NET_TOLERANCE,
    );
}

fn added(reference: &Reference) -> AddedConditions {
    AddedConditions {
        text_embeds: reference.f32("unet.text_embeds"),
        time_ids: reference.f32("unet.time_ids"),
    }
}

fn unet_out_with(
    model: &StableDiffusion,
    reference: &Reference,
    added: &AddedConditions,
) -> Tensor {
    model
        .unet
        .forward_with(
            &reference.f32("unet.sample"),
            &reference.f32("unet.timestep"),
            &reference.f32("unet.encoder_hidden_states"),
            Some(added),
        )
        .unwrap()
}

fn unet_out(model: &StableDiffusion, reference: &Reference) -> Tensor {
    unet_out_with(model, reference, &added(reference))
}

/// `tensor` with its two rows swapped.
fn swapped(tensor: Tensor) -> Tensor {
    tensor.flip(&[0]).unwrap()
}

fn check_unet(model: &StableDiffusion, reference: &Reference) {
    let out = unet_out(model, reference);
    assert_close("UNet", &out, &reference.f32("unet.out"), NET_TOLERANCE);
    // Each sample has its own timestep, pooled embedding and size values: swapping any of them between the
    // two samples must move the output far beyond the tolerance, or the comparison above never exercised it.
    let conditions = added(reference);
    let moved = |what: &str, other: Tensor| {
        let moved = max_abs_diff(&other, &out);
        assert!(
            moved > common::NON_TRIVIAL_FACTOR * NET_TOLERANCE,
            "the UNet output hardly depends on the {what} (it moves by {moved:.2e} when they are swapped)"
        );
    };
    let timesteps = swapped(reference.f32("unet.timestep"));
    moved(
        "timesteps",
        model
            .unet
            .forward_with(
                &reference.f32("unet.sample"),
                &timesteps,
                &reference.f32("unet.encoder_hidden_states"),
                Some(&conditions),
            )
            .unwrap(),
    );
    let time_ids = AddedConditions {
        time_ids: swapped(conditions.time_ids.clone()),
        ..conditions.clone()
    };
    moved("size values", unet_out_with(model, reference, &time_ids));
    let pooled = AddedConditions {
        text_embeds: swapped(conditions.text_embeds.clone()),
        ..conditions.clone()
    };
    moved(
        "pooled embeddings",
        unet_out_with(model, reference, &pooled),
    );
}

fn check_vae(model: &StableDiffusion, reference: &Reference) {
    common::check_vae(model, reference, NET_TOLERANCE);
    let scaling: f64 = reference.metadata("vae.scaling_factor").parse().unwrap();
    assert_eq!(model.config().vae.scaling_factor, scaling);
}

fn check_networks(model: &StableDiffusion, reference: &Reference) {
    check_text_encoders(model, reference);
    check_unet(model, reference);
    check_vae(model, reference);
}

fn check_lora(model: &StableDiffusion, reference: &Reference) {
    let lora = KohyaLora::load(&fixture("lora_sdxl.safetensors"), &Device::Cpu).unwrap();
    let strengths: Vec<f64> = serde_json::from_str(&reference.metadata("lora.strengths")).unwrap();
    let report = lora
        .attach(&model.adapter_components(), strengths[0], DType::F32)
        .unwrap();
    assert!(
        report.unmatched.is_empty(),
        "unmatched LoRA modules: {:?}",
        report.unmatched
    );
    assert_eq!(report.adapters.len(), lora.modules().len());
    let prompts: Vec<String> = serde_json::from_str(&reference.metadata("te.prompts")).unwrap();
    let refs: Vec<&str> = prompts.iter().map(String::as_str).collect();
    for strength in &strengths {
        for adapter in &report.adapters {
            adapter.set_multiplier(*strength);
        }
        assert_close(
            &format!("UNet + LoRA at {strength}"),
            &unet_out(model, reference),
            &reference.f32(&format!("lora.unet_out_{strength}")),
            NET_TOLERANCE,
        );
        let embeddings = model.encode_prompts(&refs, 1).unwrap();
        assert_close(
            &format!("prompt context + LoRA at {strength}"),
            &embeddings.context,
            &reference.f32(&format!("lora.te_context_{strength}")),
            NET_TOLERANCE,
        );
        assert_close(
            &format!("pooled embedding + LoRA at {strength}"),
            &embeddings.pooled.unwrap(),
            &reference.f32(&format!("lora.te_pooled_{strength}")),
            NET_TOLERANCE,
        );
    }
    for adapter in &report.adapters {
        adapter.set_multiplier(strengths[0]);
    }
    check_generation(model, reference, SamplerKind::Ddim, "ddim", "lora_ddim");
    let (sampler, key) = LORA_SAMPLER;
    check_generation(model, reference, sampler, key, &format!("lora_{key}"));
    for adapter in &report.adapters {
        adapter.set_multiplier(0.0);
    }
    check_unet(model, reference);
    for (_, registry) in model.adapter_components() {
        registry.detach_all();
    }
}

#[test]
fn sdxl_diffusers_folder_matches_reference() {
    let model = load("sdxl");
    let reference = reference();
    check_networks(&model, &reference);
    check_lora(&model, &reference);
}

#[test]
fn sdxl_single_file_matches_reference() {
    let model = load("sdxl_single.safetensors");
    let reference = reference();
    check_networks(&model, &reference);
    check_lora(&model, &reference);
}

#[test]
fn sdxl_generations_match_reference() {
    let reference = reference();
    for path in ["sdxl", "sdxl_single.safetensors"] {
        common::check_ddim_and_euler_a(&load(path), &reference);
    }
}

#[test]
fn sdxl_euler_and_dpmpp_2m_karras_schedules_match_reference() {
    let reference = reference();
    for path in ["sdxl", "sdxl_single.safetensors"] {
        common::check_schedules(path, &reference, &SAMPLER_REFERENCES);
    }
}

#[test]
fn sdxl_euler_and_dpmpp_2m_karras_generations_match_reference() {
    let reference = reference();
    for path in ["sdxl", "sdxl_single.safetensors"] {
        let model = load(path);
        for (sampler, key) in SAMPLER_REFERENCES {
            check_generation(&model, &reference, sampler, key, key);
        }
    }
}

#[test]
fn sdxl_v_prediction_markers_give_the_reference_zero_terminal_snr_generation() {
    let dir = tempfile::tempdir().unwrap();
    let model = load_path(&common::sdxl_v_prediction_file(dir.path()));
    let config = model.config();
    assert_eq!(config.prediction_origin, PredictionOrigin::Marker);
    assert_eq!(
        config.scheduler.prediction_type,
        PredictionType::VPrediction
    );
    assert!(config.scheduler.rescale_betas_zero_snr);
    let note = model.prediction_note();
    assert!(note.contains("v_pred") && note.contains("ztsnr"), "{note}");
    check_generation(
        &model,
        &reference(),
        SamplerKind::Ddim,
        "vpred_ddim",
        "vpred_ddim",
    );
}

/// Some tools name SDXL LoRA modules by the diffusers UNet paths and write `lora_te_` for the first text
/// encoder; such a file attaches to the same layers and gives the same outputs.
#[test]
fn sdxl_lora_with_diffusers_paths_and_lora_te_attaches_the_same() {
    let model = load("sdxl");
    let reference = reference();
    let lora = KohyaLora::load(&fixture("lora_sdxl.safetensors"), &Device::Cpu).unwrap();
    let mut renamed = std::collections::HashMap::new();
    let mut diffusers_named = 0;
    for (prefix, registry) in model.adapter_components() {
        for slot in registry.slots() {
            let Some(module) = lora.modules().get(&kohya_name(prefix, slot.kohya_path())) else {
                continue;
            };
            let prefix = if prefix == "lora_te1" {
                "lora_te"
            } else {
                prefix
            };
            let name = kohya_name(prefix, slot.name());
            diffusers_named += usize::from(name.contains("down_blocks"));
            renamed.insert(format!("{name}.lora_down.weight"), module.down.clone());
            renamed.insert(format!("{name}.lora_up.weight"), module.up.clone());
            let alpha = Tensor::new(module.alpha.unwrap() as f32, &Device::Cpu).unwrap();
            renamed.insert(format!("{name}.alpha"), alpha);
        }
    }
    assert!(diffusers_named > 0 && renamed.len() == 3 * lora.modules().len());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("diffusers_named.safetensors");
    candle_core::safetensors::save(&renamed, &path).unwrap();
    let strengths: Vec<f64> = serde_json::from_str(&reference.metadata("lora.strengths")).unwrap();
    let report = KohyaLora::load(&path, &Device::Cpu)
        .unwrap()
        .attach(&model.adapter_components(), strengths[0], DType::F32)
        .unwrap();
    assert!(report.unmatched.is_empty(), "{:?}", report.unmatched);
    assert_close(
        "UNet + diffusers-named LoRA",
        &unet_out(&model, &reference),
        &reference.f32(&format!("lora.unet_out_{}", strengths[0])),
        NET_TOLERANCE,
    );
    let prompts: Vec<String> = serde_json::from_str(&reference.metadata("te.prompts")).unwrap();
    let refs: Vec<&str> = prompts.iter().map(String::as_str).collect();
    assert_close(
        "context + LoRA with lora_te_",
        &model.encode_prompts(&refs, 1).unwrap().context,
        &reference.f32(&format!("lora.te_context_{}", strengths[0])),
        NET_TOLERANCE,
    );
}

/// `merge` writes one sgm single file with the LoRA folded in, from the folder and from the single file; it
/// gives the reference outputs of the LoRA merged at that strength.
#[test]
fn sdxl_merged_single_files_match_the_reference_merge() {
    let dir = tempfile::tempdir().unwrap();
    let reference = reference();
    let strengths: Vec<f64> = serde_json::from_str(&reference.metadata("lora.strengths")).unwrap();
    let original = TensorFile::open(&fixture("sdxl_single.safetensors")).unwrap();
    for source_path in ["sdxl", "sdxl_single.safetensors"] {
        let source = ModelSource::open(&fixture(source_path)).unwrap();
        let merged = dir.path().join("merged.safetensors");
        let report = lora_studio::models::merge::merge_to_single_file(
            &source,
            &[(fixture("lora_sdxl.safetensors"), strengths[0])],
            &merged,
            DType::F32,
        )
        .unwrap();
        assert!(report.unmatched.is_empty(), "{source_path}: {report:?}");
        // The original layout: every tensor of the reference single file but the ones a diffusers folder
        // does not keep (CLIP's position ids, OpenCLIP's logit scale).
        let written = TensorFile::open(&merged).unwrap();
        for (key, info) in written.infos() {
            let stored = original
                .info(key)
                .unwrap_or_else(|| panic!("{source_path}: `{key}` is not an sgm key"));
            assert_eq!(info.shape, stored.shape, "{source_path}: {key}");
        }
        for key in original.infos().keys() {
            assert!(
                written.info(key).is_some()
                    || key.ends_with("position_ids")
                    || key.ends_with("logit_scale"),
                "{source_path}: `{key}` is missing"
            );
        }
        std::fs::copy(fixture("sdxl_single.json"), merged.with_extension("json")).unwrap();
        let model = load_path(&merged);
        let what = |part: &str| format!("{source_path} merged at {}, {part}", strengths[0]);
        assert_close(
            &what("UNet"),
            &unet_out(&model, &reference),
            &reference.f32(&format!("lora.unet_out_{}", strengths[0])),
            NET_TOLERANCE,
        );
        let prompts: Vec<String> = serde_json::from_str(&reference.metadata("te.prompts")).unwrap();
        let refs: Vec<&str> = prompts.iter().map(String::as_str).collect();
        let embeddings = model.encode_prompts(&refs, 1).unwrap();
        assert_close(
            &what("context"),
            &embeddings.context,
            &reference.f32(&format!("lora.te_context_{}", strengths[0])),
            NET_TOLERANCE,
        );
        assert_close(
            &what("pooled"),
            &embeddings.pooled.unwrap(),
            &reference.f32(&format!("lora.te_pooled_{}", strengths[0])),
            NET_TOLERANCE,
        );
    }
}

#[test]
fn kernels_follow_the_switch() {
    common::assert_kernels_follow_the_switch();
}

/// The same comparisons through the candle-op paths CUDA and Metal take.
#[test]
fn device_generic_paths_match_the_reference_too() {
    common::rerun_with_generic_kernels(&[
        "kernels_follow_the_switch",
        "sdxl_diffusers_folder_matches_reference",
        "sdxl_single_file_matches_reference",
        "sdxl_generations_match_reference",
        "sdxl_euler_and_dpmpp_2m_karras_generations_match_reference",
        "sdxl_v_prediction_markers_give_the_reference_zero_terminal_snr_generation",
    ]);
}
