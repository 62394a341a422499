//! Language-model adapters in the formats other tools read and write: PEFT adapter folders made by peft
//! (rsLoRA, rank and alpha patterns, DoRA, `.bin` weights) attached with peft's logits; lora-studio's own
//! exports (the PEFT folder and the llama.cpp GGUF adapter) read back; merged model folders.

mod common;

use std::path::Path;

use candle_core::{DType, Device};
use common::causal_lm::{
    at_positions, folder, load, padded_batch, padded_text_positions, reference,
};
use common::{Reference, assert_close, fixture};
use lora_studio::lora::PeftAdapter;

fn adapters_folder() -> std::path::PathBuf {
    fixture("causal_lm/adapters")
}

fn attach(model: &lora_studio::models::causal_lm::CausalLm, adapter: &Path) -> usize {
    let adapter = PeftAdapter::load(adapter, &Device::Cpu).unwrap_or_else(|e| panic!("{e}"));
    let report = adapter
        .attach(model.layers(), 1.0, model.dtype())
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(report.unmatched.is_empty(), "{:?}", report.unmatched);
    report.adapters.len()
}

/// The base model of `family` with the adapter `name` (made by peft) attached: logits of the padded
/// reference batch against peft's.
fn peft_variant_matches(family: &str, name: &str, modules: usize) {
    let model = load(family, DType::F32);
    assert_eq!(attach(&model, &adapters_folder().join(name)), modules);
    let base = reference(family);
    let text = padded_text_positions(&base);
    let logits = model.forward(&padded_batch(&base), None).unwrap();
    let expected = Reference::at(&adapters_folder().join("reference.safetensors"))
        .tensor(&format!("{name}.logits"));
    // The adapter must change the logits well beyond the tolerance, or the comparison shows nothing.
    let unadapted = at_positions(&base.tensor("padded.logits"), &text);
    let adapted = at_positions(&expected, &text);
    assert!(common::max_abs_diff(&unadapted, &adapted) > 1e-2);
    assert_close(
        &format!("{family} logits with {name}"),
        &at_positions(&logits, &text),
        &adapted,
        1e-4,
    );
}

#[test]
fn rslora_with_rank_and_alpha_patterns_matches_peft() {
    peft_variant_matches("qwen2", "qwen2_rslora", 14);
}

#[test]
fn dora_matches_peft() {
    peft_variant_matches("qwen2", "qwen2_dora", 6);
}

#[test]
fn adapters_saved_as_bin_match_peft() {
    peft_variant_matches("llama", "llama_bin", 14);
}

#[test]
fn an_adapter_for_another_base_names_the_shape_mismatch() {
    let model = load("llama", DType::F32);
    let adapter = PeftAdapter::load(&folder("qwen2").join("lora"), &Device::Cpu).unwrap();
    let error = adapter
        .attach(model.layers(), 1.0, DType::F32)
        .unwrap_err()
        .to_string();
    assert!(error.contains("another base model"), "{error}");
    assert!(error.contains("shape"), "{error}");
    assert_eq!(error.lines().count(), 1, "{error}");
    assert!(
        model
            .layers()
            .slots()
            .iter()
            .all(|s| s.adapters().is_empty()),
        "a failed attach must leave the model untouched"
    );
}
