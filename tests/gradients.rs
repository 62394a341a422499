//! LoRA gradients through the real models: compared with the reference implementation's (PyTorch autograd,
//! float64) for the same weights and inputs, and checked by finite differences in float64 through every
//! adapter of the tiny UNet (down, mid and up blocks, resnets' LoCon convs included) and text encoder, for
//! SD1, SD2 and SDXL (whose UNet is also conditioned on the pooled embedding and size values, and whose two
//! text encoders feed the context and the pooled embedding).

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};
use common::{FiniteDifferences, Reference, fixture, max_abs, max_abs_diff};
use lora_studio::lora::{KohyaLora, LayerShape, LoraAdapter, kohya_name};
use lora_studio::models::checkpoint::ModelSource;
use lora_studio::models::pipeline::StableDiffusion;
use lora_studio::models::unet::AddedConditions;

/// The `down`/`up` variables of every attached adapter, by kohya module name.
type AdapterVars = BTreeMap<String, (Var, Var)>;

/// Loads a tiny model and attaches the fixture LoRA with trainable (`Var`) tensors at multiplier 1.
fn model_with_trainable_lora(
    model_path: &str,
    lora_path: &str,
    dtype: DType,
) -> (StableDiffusion, AdapterVars) {
    let lora_modules = KohyaLora::load(&fixture(lora_path), &Device::Cpu)
        .unwrap()
        .modules()
        .len();
    let (model, vars) = model_with_adapters(model_path, lora_path, dtype, |_, up| Some(up));
    assert_eq!(
        vars.len(),
        lora_modules,
        "every module of the fixture LoRA attaches"
    );
    (model, vars)
}

/// [`model_with_trainable_lora`] with each module's up matrix as `up_of` gives it from the module's name
/// and the fixture's, or without the module where it gives none.
fn model_with_adapters(
    model_path: &str,
    lora_path: &str,
    dtype: DType,
    up_of: impl Fn(&str, Tensor) -> Option<Tensor>,
) -> (StableDiffusion, AdapterVars) {
    let source = ModelSource::open(&fixture(model_path)).unwrap();
    let model = StableDiffusion::load(&source, &Device::Cpu, dtype).unwrap();
    let lora = KohyaLora::load(&fixture(lora_path), &Device::Cpu).unwrap();
    let mut vars = AdapterVars::new();
    for (prefix, registry) in model.adapter_components() {
        for slot in registry.slots() {
            let name = kohya_name(prefix, slot.kohya_path());
            let Some(module) = lora.modules().get(&name) else {
                continue;
            };
            let Some(up) = up_of(&name, module.up.to_dtype(dtype).unwrap()) else {
                continue;
            };
            let down = Var::from_tensor(&module.down.to_dtype(dtype).unwrap()).unwrap();
            let up = Var::from_tensor(&up).unwrap();
            let adapter = LoraAdapter::new(
                down.as_tensor().clone(),
                up.as_tensor().clone(),
                module.alpha,
                slot.shape(),
            )
            .unwrap();
            slot.attach(Arc::new(adapter));
            vars.insert(name, (down, up));
        }
    }
    (model, vars)
}

fn unet_loss(model: &StableDiffusion, reference: &Reference, dtype: DType) -> Tensor {
    let input = |name: &str| reference.tensor(name).to_dtype(dtype).unwrap();
    let added = model.text_encoder_2.is_some().then(|| AddedConditions {
        text_embeds: input("unet.text_embeds"),
        time_ids: reference.f32("unet.time_ids"),
    });
    let out = model
        .unet
        .forward_with(
            &input("unet.sample"),
            &input("unet.timestep"),
            &input("unet.encoder_hidden_states"),
            added.as_ref(),
        )
        .unwrap();
    (out * input("grad.unet.R")).unwrap().sum_all().unwrap()
}

/// `sum(x · R)`.
fn weighted_sum(x: Tensor, reference: &Reference, r: &str) -> Tensor {
    let r = reference.tensor(r).to_dtype(x.dtype()).unwrap();
    (x * r).unwrap().sum_all().unwrap()
}

fn te_loss(model: &StableDiffusion, reference: &Reference, _dtype: DType) -> Tensor {
    let Some(second) = &model.text_encoder_2 else {
        let hidden = model
            .text_encoder
            .forward(&reference.tensor("te.input_ids"), 1)
            .unwrap();
        return weighted_sum(hidden, reference, "grad.te.R");
    };
    // SDXL: the context (both penultimate layers side by side) and the pooled projection.
    let (first, _) = model
        .text_encoder
        .penultimate_and_pooled(&reference.tensor("te.input_ids_1"))
        .unwrap();
    let (second, pooled) = second
        .penultimate_and_pooled(&reference.tensor("te.input_ids_2"))
        .unwrap();
    let context = Tensor::cat(&[&first, &second], 2).unwrap();
    (weighted_sum(context, reference, "grad.te.R_context")
        + weighted_sum(pooled.unwrap(), reference, "grad.te.R_pooled"))
    .unwrap()
}

/// Compares every adapter gradient with the reference's, relative to the gradient's own scale.
fn compare_with_reference(kind: &str, lora: &str) {
    let reference = Reference::open(kind);
    let (model, vars) = model_with_trainable_lora(kind, lora, DType::F32);
    for (component, loss) in [
        ("unet", unet_loss(&model, &reference, DType::F32)),
        ("te", te_loss(&model, &reference, DType::F32)),
    ] {
        let grads = loss.backward().unwrap();
        // `grad.te.…` (SD1/SD2), `grad.te1.…` and `grad.te2.…` (SDXL): `grad.COMPONENT.MODULE.lora_….weight`.
        let expected_names: Vec<String> = reference
            .names_with_prefix(&format!("grad.{component}"))
            .into_iter()
            .filter(|n| n.contains(".lora_"))
            .collect();
        assert!(!expected_names.is_empty());
        // Gradients are compared relative to their own scale. Each must be non-trivial: at least a thousandth
        // of the largest one (f32 rounding noise follows the activations, not the size of a particular
        // gradient, so a gradient near zero would compare rounding noise with rounding noise).
        let largest = expected_names
            .iter()
            .map(|n| max_abs(&reference.f32(n)))
            .fold(0f64, f64::max);
        let mut worst = (0f64, String::new());
        for name in &expected_names {
            let (_, key) = name.strip_prefix("grad.").unwrap().split_once('.').unwrap();
            let (module, tensor) = key.split_once('.').unwrap();
            let (down, up) = &vars[module];
            let var = if tensor.starts_with("lora_down") {
                down
            } else {
                up
            };
            let ours = grads
                .get(var)
                .unwrap_or_else(|| panic!("{kind}: no gradient reached {key}"));
            let expected = reference.f32(name);
            let scale = max_abs(&expected);
            assert!(
                scale >= 1e-3 * largest,
                "{kind} {key}: the reference gradient (max abs {scale:.2e}) is trivial next to the largest \
                 ({largest:.2e})"
            );
            let relative = max_abs_diff(ours, &expected) / scale;
            if relative > worst.0 {
                worst = (relative, key.to_string());
            }
            // f32 here against float64 there: long reductions (a conv kernel's gradient sums over every pixel)
            // carry ~1e-4 relative rounding.
            assert!(
                relative < 3e-4,
                "{kind} {key}: gradient differs by {relative:.2e} of its scale {scale:.2e}"
            );
        }
        eprintln!(
            "{kind} {component}: {} adapter gradients, worst relative difference {:.2e} ({})",
            expected_names.len(),
            worst.0,
            worst.1
        );
    }
}

#[test]
fn sd1_adapter_gradients_match_reference() {
    compare_with_reference("sd1", "lora_sd1.safetensors");
}

#[test]
fn sd2_adapter_gradients_match_reference() {
    compare_with_reference("sd2", "lora_sd2.safetensors");
}

#[test]
fn sdxl_adapter_gradients_match_reference() {
    compare_with_reference("sdxl", "lora_sdxl.safetensors");
}

/// The smallest directional derivative worth checking: the central difference's float64 rounding (about
/// 1e-13 of a loss that sums thousands of terms, over 2e-4) stays below a hundred-thousandth of it.
const FD_NON_TRIVIAL: f64 = 1e-4;

/// For every adapter tensor: the analytic directional derivative against a central difference in float64.
fn finite_difference_check(kind: &str, lora: &str, component: &str) {
    let reference = Reference::open(kind);
    let (model, vars) = model_with_trainable_lora(kind, lora, DType::F64);
    let loss = |model: &StableDiffusion| -> f64 {
        let l = if component == "unet" {
            unet_loss(model, &reference, DType::F64)
        } else {
            te_loss(model, &reference, DType::F64)
        };
        l.to_scalar::<f64>().unwrap()
    };
    let analytic = if component == "unet" {
        unet_loss(&model, &reference, DType::F64)
    } else {
        te_loss(&model, &reference, DType::F64)
    };
    let grads = analytic.backward().unwrap();
    // `lora_te_` (SD1/SD2), `lora_te1_` and `lora_te2_` (SDXL)
    let prefix = if component == "unet" {
        "lora_unet_"
    } else {
        "lora_te"
    };
    // Small enough that truncation (third derivatives, eps²) stays below 1e-6 relative, large enough that the
    // float64 rounding of the loss, divided by 2·eps, does too (at 1e-6 it reaches 4e-5 of the smallest
    // derivatives here).
    let mut check = FiniteDifferences::new(1e-4, FD_NON_TRIVIAL);
    for (index, (name, (down, up))) in vars
        .iter()
        .filter(|(n, _)| n.starts_with(prefix))
        .enumerate()
    {
        for (which, var) in [("down", down), ("up", up)] {
            let seed = index as u64 * 2 + (which == "up") as u64;
            let what = format!("{kind} {name}.{which}");
            match grads.get(var) {
                Some(grad) => check.check(&what, var, grad, seed, || loss(&model)),
                // Only an adapter the loss does not reach has no gradient (SDXL conditions on the penultimate
                // layer of text encoder 1, so its last layer is never run): the loss must not move either.
                None => check.check_unreached(&what, var, seed, || loss(&model)),
            }
        }
    }
    assert!(check.checked > 0);
    eprintln!(
        "{kind} {component}: {} adapter tensors pass the finite-difference check (worst {:.1e}, smallest \
         directional derivative {:.2e}); {} unreached by the loss",
        check.checked, check.worst, check.smallest, check.unreached
    );
}

#[test]
fn sd1_unet_adapter_gradients_pass_finite_differences() {
    finite_difference_check("sd1", "lora_sd1.safetensors", "unet");
}

#[test]
fn sd1_text_encoder_adapter_gradients_pass_finite_differences() {
    finite_difference_check("sd1", "lora_sd1.safetensors", "te");
}

#[test]
fn sd2_unet_adapter_gradients_pass_finite_differences() {
    finite_difference_check("sd2", "lora_sd2.safetensors", "unet");
}

#[test]
fn sdxl_unet_adapter_gradients_pass_finite_differences() {
    finite_difference_check("sdxl", "lora_sdxl.safetensors", "unet");
}

#[test]
fn sdxl_text_encoder_adapter_gradients_pass_finite_differences() {
    finite_difference_check("sdxl", "lora_sdxl.safetensors", "te");
}

/// Attaches `count` adapters that add nothing (zero matrices of rank 1) to every feed-forward layer of the
/// UNet: with more than one adapter a layer runs composed, outside the feed-forward's fused op.
fn add_idle_feed_forward_adapters(model: &StableDiffusion, count: usize) {
    for (prefix, registry) in model.adapter_components() {
        for slot in registry.slots() {
            let name = kohya_name(prefix, slot.kohya_path());
            let LayerShape::Linear {
                in_features,
                out_features,
            } = *slot.shape()
            else {
                continue;
            };
            if !(name.starts_with("lora_unet_") && name.contains("_ff_net_")) {
                continue;
            }
            for _ in 0..count {
                let down = Tensor::zeros((1, in_features), DType::F32, &Device::Cpu).unwrap();
                let up = Tensor::zeros((out_features, 1), DType::F32, &Device::Cpu).unwrap();
                let idle = LoraAdapter::new(down, up, None, slot.shape()).unwrap();
                slot.attach(Arc::new(idle));
            }
        }
    }
}

/// A transformer block's feed-forward runs as one op (its layer norm, both layers, their LoRAs and the
/// residual sum) when each layer has at most one plain LoRA. Its gradients are those of the composed
/// layers, which run when the feed-forward carries further adapters that add nothing: with the fixture's
/// feed-forward adapters (every adapter's gradient compared), and without them (the attention-only LoRA of
/// diffusers' default; the attention adapters' gradients pass through the frozen feed-forwards).
#[test]
fn the_fused_feed_forward_passes_the_gradients_of_its_composed_layers() {
    let reference = Reference::open("sdxl");
    let lora = "lora_sdxl.safetensors";
    let in_feed_forward = |name: &str| name.contains("_ff_net_");
    for trained in [true, false] {
        let keep = |name: &str, up: Tensor| (trained || !in_feed_forward(name)).then_some(up);
        let (fused, fused_vars) = model_with_adapters("sdxl", lora, DType::F32, keep);
        let (composed, composed_vars) = model_with_adapters("sdxl", lora, DType::F32, keep);
        add_idle_feed_forward_adapters(&composed, if trained { 1 } else { 2 });
        let composed_grads = unet_loss(&composed, &reference, DType::F32)
            .backward()
            .unwrap();
        let fused_grads = unet_loss(&fused, &reference, DType::F32)
            .backward()
            .unwrap();
        let mut compared = 0;
        for (name, (down, up)) in fused_vars
            .iter()
            .filter(|(n, _)| n.starts_with("lora_unet_"))
        {
            let (composed_down, composed_up) = &composed_vars[name];
            for (ours, theirs) in [(down, composed_down), (up, composed_up)] {
                let expected = composed_grads.get(theirs).unwrap();
                let scale = max_abs(expected);
                let diff = max_abs_diff(fused_grads.get(ours).unwrap(), expected) / scale;
                assert!(diff < 1e-5, "{name}: gradient differs by {diff:.2e}");
                compared += 1;
            }
        }
        let feed_forward = fused_vars.keys().filter(|n| in_feed_forward(n)).count();
        assert_eq!(feed_forward > 0, trained);
        assert!(compared > 100, "{compared} gradients compared");
    }
}

#[test]
fn gradient_checkpointing_gives_the_same_gradients() {
    let reference = Reference::open("sd1");
    let (mut model, vars) = model_with_trainable_lora("sd1", "lora_sd1.safetensors", DType::F32);
    let plain = unet_loss(&model, &reference, DType::F32)
        .backward()
        .unwrap();
    let store = lora_studio::models::checkpointing::CheckpointGrads::default();
    model.unet.set_gradient_checkpointing(Some(store.clone()));
    let checkpointed = unet_loss(&model, &reference, DType::F32)
        .backward()
        .unwrap();
    let mut compared = 0;
    for (name, (down, up)) in vars.iter().filter(|(n, _)| n.starts_with("lora_unet_")) {
        for var in [down, up] {
            let expected = plain
                .get(var)
                .unwrap_or_else(|| panic!("{name}: no plain gradient"));
            let recomputed = store.take(var);
            let direct = checkpointed.get(var).cloned();
            let got = match (recomputed, direct) {
                (Some(a), Some(b)) => (a + b).unwrap(),
                (Some(a), None) | (None, Some(a)) => a,
                (None, None) => panic!("{name}: no gradient with checkpointing"),
            };
            let scale = max_abs(expected);
            assert!(
                scale > 1e-3,
                "{name}: the gradient (max abs {scale:.2e}) is too small to compare"
            );
            let diff = max_abs_diff(&got, expected) / scale;
            assert!(
                diff < 1e-4,
                "{name}: checkpointed gradient differs by {diff:.2e}"
            );
            compared += 1;
        }
    }
    assert_eq!(compared, 392);
}

/// SDXL with gradient checkpointing and every adapter training: the loss runs from token ids through both
/// text encoders (the context, and the pooled embedding that enters every resnet through the time embedding)
/// and the UNet with its size conditioning, so the recomputed blocks must pass gradients back through their
/// auxiliary inputs as well as collect their own adapters'.
#[test]
fn sdxl_gradient_checkpointing_gives_the_same_gradients_through_both_text_encoders() {
    let reference = Reference::open("sdxl");
    let (mut model, vars) = model_with_trainable_lora("sdxl", "lora_sdxl.safetensors", DType::F32);
    let loss = |model: &StableDiffusion| {
        let (first, _) = model
            .text_encoder
            .penultimate_and_pooled(&reference.tensor("te.input_ids_1"))
            .unwrap();
        let second = model.text_encoder_2.as_ref().unwrap();
        let (second, pooled) = second
            .penultimate_and_pooled(&reference.tensor("te.input_ids_2"))
            .unwrap();
        // The reference's two prompts condition its two samples, each with its own sizes.
        let context = Tensor::cat(&[&first, &second], 2).unwrap();
        let added = AddedConditions {
            text_embeds: pooled.unwrap(),
            time_ids: reference.f32("unet.time_ids"),
        };
        let out = model
            .unet
            .forward_with(
                &reference.f32("unet.sample"),
                &reference.f32("unet.timestep"),
                &context,
                Some(&added),
            )
            .unwrap();
        (out * reference.f32("grad.unet.R"))
            .unwrap()
            .sum_all()
            .unwrap()
    };
    let plain = loss(&model).backward().unwrap();
    let store = lora_studio::models::checkpointing::CheckpointGrads::default();
    model.unet.set_gradient_checkpointing(Some(store.clone()));
    let checkpointed = loss(&model).backward().unwrap();
    let mut compared = BTreeMap::new();
    for (name, (down, up)) in &vars {
        for var in [down, up] {
            let recomputed = store.take(var);
            let direct = checkpointed.get(var).cloned();
            let got = match (recomputed, direct) {
                (Some(a), Some(b)) => (a + b).unwrap(),
                (Some(a), None) | (None, Some(a)) => a,
                (None, None) => {
                    // Text encoder 1's last layer: SDXL conditions on its penultimate one.
                    assert!(
                        plain.get(var).is_none(),
                        "{name}: no gradient with checkpointing"
                    );
                    continue;
                }
            };
            let expected = plain
                .get(var)
                .unwrap_or_else(|| panic!("{name}: no plain gradient"));
            let scale = max_abs(expected);
            assert!(
                scale > 1e-6,
                "{name}: the gradient (max abs {scale:.2e}) is too small to compare"
            );
            let diff = max_abs_diff(&got, expected) / scale;
            assert!(
                diff < 1e-4,
                "{name}: checkpointed gradient differs by {diff:.2e}"
            );
            let component = name.split('_').take(2).collect::<Vec<_>>().join("_");
            *compared.entry(component).or_insert(0) += 1;
        }
    }
    eprintln!("gradients compared with checkpointing: {compared:?}");
    assert_eq!(
        compared.keys().cloned().collect::<Vec<_>>(),
        ["lora_te1", "lora_te2", "lora_unet"]
    );
}

#[test]
fn kernels_follow_the_switch() {
    common::assert_kernels_follow_the_switch();
}

/// The adapter gradients through the candle-op paths CUDA and Metal take (composed norms, chunked attention
/// with candle's softmax, candle's convolutions), against the same reference.
#[test]
fn device_generic_paths_give_the_reference_gradients_too() {
    common::rerun_with_generic_kernels(&[
        "kernels_follow_the_switch",
        "sd1_adapter_gradients_match_reference",
        "sd2_adapter_gradients_match_reference",
        "sdxl_adapter_gradients_match_reference",
        "gradient_checkpointing_gives_the_same_gradients",
        "sdxl_gradient_checkpointing_gives_the_same_gradients_through_both_text_encoders",
    ]);
}
