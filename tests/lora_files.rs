//! Reading kohya LoRA files made by other trainers, and refusing the ones that do not fit with a sentence
//! naming the file and the module.

mod common;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use common::fixture;
use lora_studio::lora::{KohyaLora, LoraError};
use lora_studio::models::checkpoint::ModelSource;
use lora_studio::models::pipeline::StableDiffusion;

fn tiny_sd1() -> StableDiffusion {
    let source = ModelSource::open(&fixture("sd1")).unwrap();
    StableDiffusion::load(&source, &Device::Cpu, DType::F32).unwrap()
}

fn save(path: &Path, tensors: &[(&str, Tensor)]) {
    let map: HashMap<String, Tensor> = tensors
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    candle_core::safetensors::save(&map, path).unwrap();
}

fn zeros(dims: &[usize]) -> Tensor {
    Tensor::zeros(dims, DType::F32, &Device::Cpu).unwrap()
}

fn attach_error(path: &Path) -> String {
    let model = tiny_sd1();
    let error: LoraError = match KohyaLora::load(path, &Device::Cpu) {
        Err(e) => e,
        Ok(lora) => lora
            .attach(&model.adapter_components(), 1.0, DType::F32)
            .expect_err("must not attach"),
    };
    error.to_string()
}

#[test]
fn mis_shaped_module_is_named_and_nothing_is_attached() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("wrong.safetensors");
    // to_q of the first transformer is 64 -> 64; this module claims 40 inputs.
    let module = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q";
    let good = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k";
    save(
        &path,
        &[
            (&format!("{good}.lora_down.weight"), zeros(&[4, 64])),
            (&format!("{good}.lora_up.weight"), zeros(&[64, 4])),
            (&format!("{module}.lora_down.weight"), zeros(&[4, 40])),
            (&format!("{module}.lora_up.weight"), zeros(&[64, 4])),
            (
                &format!("{module}.alpha"),
                Tensor::new(2f32, &Device::Cpu).unwrap(),
            ),
        ],
    );
    let model = tiny_sd1();
    let lora = KohyaLora::load(&path, &Device::Cpu).unwrap();
    let message = lora
        .attach(&model.adapter_components(), 1.0, DType::F32)
        .unwrap_err()
        .to_string();
    assert!(
        message.contains("wrong.safetensors")
            && message.contains(module)
            && message.contains("[4, 40]"),
        "{message}"
    );
    let attached: usize = model
        .adapter_components()
        .iter()
        .flat_map(|(_, registry)| registry.slots())
        .map(|slot| slot.adapters().len())
        .sum();
    assert_eq!(attached, 0, "a failed attach leaves the model untouched");
}

#[test]
fn other_families_and_formats_are_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let sdxl = dir.path().join("sdxl_style.safetensors");
    save(
        &sdxl,
        &[
            (
                "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight",
                zeros(&[4, 768]),
            ),
            (
                "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight",
                zeros(&[3072, 4]),
            ),
        ],
    );
    let message = attach_error(&sdxl);
    assert!(
        message.contains("sdxl_style.safetensors is a LoRA for SDXL and this is an SD1/SD2 model"),
        "{message}"
    );

    // An SD1 LoRA on an SDXL model: its diffusers-path UNet names would partly match SDXL's layers.
    let sdxl_model = StableDiffusion::load(
        &ModelSource::open(&fixture("sdxl")).unwrap(),
        &Device::Cpu,
        DType::F32,
    )
    .unwrap();
    let message = KohyaLora::load(&fixture("lora_sd1.safetensors"), &Device::Cpu)
        .unwrap()
        .attach(&sdxl_model.adapter_components(), 1.0, DType::F32)
        .unwrap_err()
        .to_string();
    assert!(
        message.contains("lora_sd1.safetensors is a LoRA for SD1/SD2 and this is an SDXL model"),
        "{message}"
    );

    // Without metadata or names that tell, a LoRA matching nothing says so.
    let unknown = dir.path().join("unknown.safetensors");
    save(
        &unknown,
        &[
            ("lora_unet_foo_bar.lora_down.weight", zeros(&[4, 8])),
            ("lora_unet_foo_bar.lora_up.weight", zeros(&[8, 4])),
        ],
    );
    let message = attach_error(&unknown);
    assert!(
        message.contains("none of the 1 modules") && message.contains("another model family"),
        "{message}"
    );

    let peft = dir.path().join("pytorch_lora_weights.safetensors");
    save(
        &peft,
        &[(
            "unet.down_blocks.0.attentions.0.proj_in.lora_A.weight",
            zeros(&[4, 32]),
        )],
    );
    assert!(attach_error(&peft).contains("diffusers/PEFT naming"));

    let dora = dir.path().join("dora.safetensors");
    save(&dora, &[("lora_unet_conv_in.dora_scale", zeros(&[32, 1]))]);
    assert!(attach_error(&dora).contains("DoRA"));

    let loha = dir.path().join("loha.safetensors");
    save(&loha, &[("lora_unet_conv_in.hada_w1_a", zeros(&[32, 4]))]);
    assert!(attach_error(&loha).contains("LoHa/LoKr"));

    let incomplete = dir.path().join("incomplete.safetensors");
    save(
        &incomplete,
        &[("lora_unet_conv_in.lora_down.weight", zeros(&[4, 4, 3, 3]))],
    );
    let message = attach_error(&incomplete);
    assert!(
        message.contains("lora_unet_conv_in") && message.contains("lora_up.weight is missing"),
        "{message}"
    );
}

#[test]
fn two_dimensional_lora_on_a_1x1_conv_loads_like_a1111() {
    // A1111 and ComfyUI accept a linear-shaped LoRA for SD1's 1x1-conv proj_in; so does lora-studio.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("flat.safetensors");
    let module = "lora_unet_down_blocks_0_attentions_0_proj_in";
    let down = Tensor::ones((2, 64), DType::F32, &Device::Cpu).unwrap();
    let up = Tensor::ones((64, 2), DType::F32, &Device::Cpu).unwrap();
    save(
        &path,
        &[
            (&format!("{module}.lora_down.weight"), down),
            (&format!("{module}.lora_up.weight"), up),
        ],
    );
    let model = tiny_sd1();
    let lora = KohyaLora::load(&path, &Device::Cpu).unwrap();
    let report = lora
        .attach(&model.adapter_components(), 0.5, DType::F32)
        .unwrap();
    assert_eq!(report.adapters.len(), 1);
    let adapter = &report.adapters[0];
    assert_eq!(adapter.down().dims(), &[2, 64, 1, 1]);
    assert_eq!(adapter.scale(), 1.0, "no alpha means alpha = rank");
    assert_eq!(adapter.multiplier(), 0.5);
}
