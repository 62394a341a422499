//! The models against the reference implementation (diffusers + transformers, float64), on tiny random-weight
//! SD1 and SD2 models made by `tests/fixtures/generate.py`: text encoder, UNet, VAE, whole generations, and
//! kohya LoRA files applied at two strengths. The Euler and DPM++ 2M references are
//! `tests/fixtures/schedulers/generate.py`'s, on the same models.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{Reference, assert_close, fixture, max_abs_diff};
use lora_studio::lora::KohyaLora;
use lora_studio::models::checkpoint::ModelSource;
use lora_studio::models::pipeline::StableDiffusion;
use lora_studio::models::schedulers::SamplerKind;

/// Network outputs must match to this (max abs).
const NET_TOLERANCE: f64 = 1e-4;

fn load(path: &str) -> StableDiffusion {
    let source = ModelSource::open(&fixture(path)).unwrap_or_else(|e| panic!("{e}"));
    StableDiffusion::load(&source, &Device::Cpu, DType::F32).unwrap_or_else(|e| panic!("{e}"))
}

fn check_text_encoder(model: &StableDiffusion, reference: &Reference) {
    let ids = reference.tensor("te.input_ids");
    let prompts: Vec<String> = serde_json::from_str(&reference.metadata("te.prompts")).unwrap();
    let refs: Vec<&str> = prompts.iter().map(String::as_str).collect();
    let ours = model.tokenize(&refs).unwrap().to_dtype(DType::I64).unwrap();
    assert_eq!(
        ours.to_vec2::<i64>().unwrap(),
        ids.to_vec2::<i64>().unwrap(),
        "token ids"
    );
    let hidden = model.text_encoder.forward(&ids, 1).unwrap();
    assert_close(
        "text encoder",
        &hidden,
        &reference.f32("te.last_hidden_state"),
        NET_TOLERANCE,
    );
    let skip2 = model.text_encoder.forward(&ids, 2).unwrap();
    assert_close(
        "text encoder, clip skip 2",
        &skip2,
        &reference.f32("te.clip_skip_2"),
        NET_TOLERANCE,
    );
}

fn unet_out(model: &StableDiffusion, reference: &Reference) -> Tensor {
    model
        .unet
        .forward(
            &reference.f32("unet.sample"),
            &reference.f32("unet.timestep"),
            &reference.f32("unet.encoder_hidden_states"),
        )
        .unwrap()
}

fn check_unet(model: &StableDiffusion, reference: &Reference) {
    let out = unet_out(model, reference);
    assert_close("UNet", &out, &reference.f32("unet.out"), NET_TOLERANCE);
    // The reference pairs each sample with its own timestep (981 and 1): with the timesteps swapped the
    // output must move far beyond the tolerance, or the comparison above never exercised the time embedding.
    let swapped = reference
        .f32("unet.timestep")
        .flip(&[0])
        .unwrap_or_else(|e| panic!("{e}"));
    let out_swapped = model
        .unet
        .forward(
            &reference.f32("unet.sample"),
            &swapped,
            &reference.f32("unet.encoder_hidden_states"),
        )
        .unwrap();
    let moved = max_abs_diff(&out_swapped, &out);
    assert!(
        moved > common::NON_TRIVIAL_FACTOR * NET_TOLERANCE,
        "the UNet output hardly depends on the timestep (it moves by {moved:.2e} when the timesteps are swapped)"
    );
}

fn check_vae(model: &StableDiffusion, reference: &Reference) {
    common::check_vae(model, reference, NET_TOLERANCE);
}

fn check_lora(model: &StableDiffusion, reference: &Reference, lora_file: &str) {
    let lora = KohyaLora::load(&fixture(lora_file), &Device::Cpu).unwrap();
    let report = lora
        .attach(&model.adapter_components(), 1.0, DType::F32)
        .unwrap();
    assert!(
        report.unmatched.is_empty(),
        "unmatched LoRA modules: {:?}",
        report.unmatched
    );
    assert_close(
        "UNet + LoRA at 1.0",
        &unet_out(model, reference),
        &reference.f32("lora.unet_out_1.0"),
        NET_TOLERANCE,
    );
    let ids = reference.tensor("te.input_ids");
    let hidden = model.text_encoder.forward(&ids, 1).unwrap();
    assert_close(
        "text encoder + LoRA at 1.0",
        &hidden,
        &reference.f32("lora.te_last_hidden_state_1.0"),
        NET_TOLERANCE,
    );
    for adapter in &report.adapters {
        adapter.set_multiplier(0.5);
    }
    assert_close(
        "UNet + LoRA at 0.5",
        &unet_out(model, reference),
        &reference.f32("lora.unet_out_0.5"),
        NET_TOLERANCE,
    );
    for adapter in &report.adapters {
        adapter.set_multiplier(0.0);
    }
    check_unet(model, reference);
    for (_, registry) in model.adapter_components() {
        registry.detach_all();
    }
}

/// Text encoder, UNet and VAE of one loaded model against the reference.
fn check_networks(model: &StableDiffusion, reference: &Reference) {
    check_text_encoder(model, reference);
    check_unet(model, reference);
    check_vae(model, reference);
}

/// The samplers `tests/fixtures/schedulers/generate.py` recorded, by their key there.
const SCHEDULER_REFERENCES: [(SamplerKind, &str); 3] = [
    (SamplerKind::Euler, "euler"),
    (
        SamplerKind::DpmSolverMultistep { karras: false },
        "dpmpp_2m",
    ),
    (
        SamplerKind::DpmSolverMultistep { karras: true },
        "dpmpp_2m_karras",
    ),
];

fn check_generations(kind: &str) {
    let model = load(kind);
    common::check_ddim_and_euler_a(&model, &Reference::open(kind));
    let schedulers = Reference::open(&format!("schedulers/{kind}"));
    for (sampler, key) in SCHEDULER_REFERENCES {
        common::check_generation(&model, &schedulers, sampler, key, key);
    }
}

#[test]
fn sampler_schedules_match_reference() {
    for kind in ["sd1", "sd2"] {
        common::check_schedules(
            kind,
            &Reference::open(&format!("schedulers/{kind}")),
            &SCHEDULER_REFERENCES,
        );
    }
}

#[test]
fn sd1_diffusers_folder_matches_reference() {
    let model = load("sd1");
    let reference = Reference::open("sd1");
    check_networks(&model, &reference);
    check_lora(&model, &reference, "lora_sd1.safetensors");
}

#[test]
fn sd1_generations_match_reference() {
    check_generations("sd1");
}

#[test]
fn sd1_single_file_matches_reference() {
    check_networks(&load("sd1_single.safetensors"), &Reference::open("sd1"));
}

#[test]
fn sd2_diffusers_fp16_variant_matches_reference() {
    let model = load("sd2");
    let reference = Reference::open("sd2");
    check_networks(&model, &reference);
    check_lora(&model, &reference, "lora_sd2.safetensors");
}

#[test]
fn sd2_generations_match_reference() {
    check_generations("sd2");
}

#[test]
fn sd2_single_file_safetensors_and_ckpt_with_open_clip_match_reference() {
    let reference = Reference::open("sd2");
    for file in ["sd2_single.safetensors", "sd2_single.ckpt"] {
        check_networks(&load(file), &reference);
    }
}

#[test]
fn kernels_follow_the_switch() {
    common::assert_kernels_follow_the_switch();
}

/// On CUDA and Metal every op takes its candle-op path (chunked attention, composed norms, candle's
/// convolutions), which the CPU kernels replace here: the same comparisons, through those paths.
#[test]
fn device_generic_paths_match_the_reference_too() {
    common::rerun_with_generic_kernels(&[
        "kernels_follow_the_switch",
        "sd1_diffusers_folder_matches_reference",
        "sd1_single_file_matches_reference",
        "sd1_generations_match_reference",
        "sd2_diffusers_fp16_variant_matches_reference",
        "sd2_generations_match_reference",
    ]);
}
