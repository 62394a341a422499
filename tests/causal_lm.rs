//! The language models (Qwen2 with tied embeddings, Qwen3 stored in bf16, Llama with `rope_scaling`
//! llama3 and sharded weights) against transformers + peft computed in float64
//! (`tests/fixtures/causal_lm/generate.py`): logits of a padded batch and of a packed row, hidden states, the
//! masked loss, logits and every adapter gradient with a PEFT LoRA attached, finite differences in float64
//! through every adapter, and greedy generation with and without the adapter. Grouped-query attention
//! (4:2 and 4:1) and the llama3 frequencies are covered by the three models.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};
use common::causal_lm::{
    FAMILIES, as_u32, at_positions, folder, int_rows, load, padded_batch, peft_lora, reference,
    text_positions,
};
use common::{FiniteDifferences, Reference, assert_close, max_abs, max_abs_diff};
use lora_studio::lora::{LoraAdapter, PeftAdapter};
use lora_studio::models::causal_lm::{
    CausalLm, IGNORE_INDEX, TokenBatch, generate, next_token_loss,
};

fn labels(reference: &Reference) -> Vec<i64> {
    int_rows(reference, "padded.labels").concat()
}

/// The mean next-token loss of `logits` against the reference labels.
fn mean_loss(logits: &Tensor, labels: &[i64]) -> Tensor {
    let (sum, count) = next_token_loss(logits, labels).unwrap();
    (sum / count as f64).unwrap()
}

/// The adapter variables by module name (`model.layers.0.self_attn.q_proj`): `(lora_A, lora_B)`.
type AdapterVars = BTreeMap<String, (Var, Var)>;

/// Attaches the fixture's PEFT adapter (`lora/`) to every layer it names, as trainable variables.
fn attach_peft_adapter(model: &CausalLm, family: &str, dtype: DType) -> AdapterVars {
    let adapter = PeftAdapter::load(&peft_lora(family), &Device::Cpu).unwrap();
    let mut vars = AdapterVars::new();
    for (module, stored) in adapter.modules() {
        let slot = model
            .layers()
            .get(module)
            .unwrap_or_else(|| panic!("the model has no layer {module}"));
        let var = |t: &Tensor| Var::from_tensor(&t.to_dtype(dtype).unwrap()).unwrap();
        let (down, up) = (var(&stored.down), var(&stored.up));
        let adapter = LoraAdapter::new(
            down.as_tensor().clone(),
            up.as_tensor().clone(),
            stored.alpha,
            slot.shape(),
        )
        .unwrap();
        slot.attach(Arc::new(adapter));
        vars.insert(module.to_string(), (down, up));
    }
    let layers = model.config().num_hidden_layers;
    assert_eq!(
        vars.len(),
        7 * layers,
        "q, k, v, o, gate, up and down of every layer"
    );
    vars
}

fn logits_match(family: &str) {
    let reference = reference(family);
    let model = load(family, DType::F32);
    let batch = padded_batch(&reference);
    let text = text_positions(&int_rows(&reference, "padded.attention_mask"));
    let hidden = model.forward_hidden(&batch, None).unwrap();
    assert_close(
        &format!("{family} hidden states"),
        &at_positions(&hidden, &text),
        &at_positions(&reference.tensor("padded.hidden"), &text),
        1e-4,
    );
    let logits = model.logits(&hidden).unwrap();
    assert_close(
        &format!("{family} padded logits"),
        &at_positions(&logits, &text),
        &at_positions(&reference.tensor("padded.logits"), &text),
        1e-4,
    );
    let loss = mean_loss(&logits, &labels(&reference))
        .to_dtype(DType::F64)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    let expected = reference.tensor("padded.loss").to_vec1::<f64>().unwrap()[0];
    eprintln!("{family} loss {loss:.8} (transformers {expected:.8})");
    assert!(expected > 1.0 && (loss - expected).abs() < 1e-5 * expected);

    // Two texts packed in one row: each sees only itself, its positions restart.
    let ids = as_u32(&int_rows(&reference, "packed.input_ids"));
    let segments = as_u32(&int_rows(&reference, "packed.segments"));
    let packed = TokenBatch::new(ids, segments).unwrap();
    let positions = as_u32(&int_rows(&reference, "packed.position_ids")).concat();
    assert_eq!(packed.positions(), positions);
    let expected = reference.tensor("packed.logits");
    let texts = expected.dim(1).unwrap();
    let logits = model
        .forward(&packed, None)
        .unwrap()
        .narrow(1, 0, texts)
        .unwrap();
    assert_close(&format!("{family} packed logits"), &logits, &expected, 1e-4);
}

#[test]
fn qwen2_logits_loss_and_packing_match_transformers() {
    logits_match("qwen2");
}

#[test]
fn qwen3_logits_loss_and_packing_match_transformers() {
    logits_match("qwen3");
}

#[test]
fn llama_logits_loss_and_packing_match_transformers() {
    logits_match("llama");
}

/// With the PEFT adapter attached: logits, loss, and every lora_A/lora_B gradient of the loss.
fn adapter_matches(family: &str) {
    let reference = reference(family);
    let model = load(family, DType::F32);
    let vars = attach_peft_adapter(&model, family, DType::F32);
    let batch = padded_batch(&reference);
    let text = text_positions(&int_rows(&reference, "padded.attention_mask"));
    let logits = model.forward(&batch, None).unwrap();
    assert_close(
        &format!("{family} logits with the adapter"),
        &at_positions(&logits, &text),
        &at_positions(&reference.tensor("lora.logits"), &text),
        1e-4,
    );
    let loss = mean_loss(&logits, &labels(&reference));
    let expected = reference.tensor("lora.loss").to_vec1::<f64>().unwrap()[0];
    let value = loss
        .to_dtype(DType::F64)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    assert!(
        (value - expected).abs() < 1e-5 * expected,
        "loss {value} vs {expected}"
    );
    let grads = loss.backward().unwrap();
    let expected_names = reference.names_with_prefix("grad.");
    assert_eq!(expected_names.len(), 2 * vars.len());
    let largest = expected_names
        .iter()
        .map(|n| max_abs(&reference.f32(n)))
        .fold(0f64, f64::max);
    let mut worst = (0f64, String::new());
    for name in &expected_names {
        let key = name.strip_prefix("grad.").unwrap();
        let (module, tensor) = key.rsplit_once('.').unwrap();
        let (down, up) = &vars[module];
        let var = if tensor == "lora_A" { down } else { up };
        let ours = grads
            .get(var)
            .unwrap_or_else(|| panic!("{family}: no gradient reached {key}"));
        let expected = reference.f32(name);
        let scale = max_abs(&expected);
        // As for the image models: each reference gradient non-trivial next to the largest, compared
        // relative to its own scale (f32 here, float64 there).
        assert!(
            scale >= 1e-3 * largest,
            "{family} {key}: the reference gradient (max abs {scale:.2e}) is trivial next to the largest ({largest:.2e})"
        );
        let relative = max_abs_diff(ours, &expected) / scale;
        if relative > worst.0 {
            worst = (relative, key.to_string());
        }
        assert!(
            relative < 3e-4,
            "{family} {key}: gradient differs by {relative:.2e} of its scale {scale:.2e}"
        );
    }
    eprintln!(
        "{family}: {} adapter gradients, worst relative difference {:.2e} ({})",
        expected_names.len(),
        worst.0,
        worst.1
    );
}

#[test]
fn qwen2_adapter_logits_and_gradients_match_peft() {
    adapter_matches("qwen2");
}

#[test]
fn qwen3_adapter_logits_and_gradients_match_peft() {
    adapter_matches("qwen3");
}

#[test]
fn llama_adapter_logits_and_gradients_match_peft() {
    adapter_matches("llama");
}

/// For every adapter tensor of the float64 model: the analytic directional derivative of the loss against
/// a central difference.
fn finite_differences(family: &str) {
    let reference = reference(family);
    let model = load(family, DType::F64);
    let vars = attach_peft_adapter(&model, family, DType::F64);
    let batch = padded_batch(&reference);
    let labels = labels(&reference);
    let loss = || mean_loss(&model.forward(&batch, None).unwrap(), &labels);
    let grads = loss().backward().unwrap();
    // Small enough that the truncation error (third derivatives, eps²) stays below 1e-6 of the smallest
    // derivatives here, large enough that the float64 rounding of the loss over 2·eps does too.
    let mut check = FiniteDifferences::new(1e-5, 1e-4);
    for (index, (name, (down, up))) in vars.iter().enumerate() {
        for (which, var) in [("lora_A", down), ("lora_B", up)] {
            let grad = grads
                .get(var)
                .unwrap_or_else(|| panic!("{name}.{which}: no gradient"));
            let seed = 2 * index as u64 + (which == "lora_B") as u64;
            check.check(&format!("{family} {name}.{which}"), var, grad, seed, || {
                loss().to_scalar::<f64>().unwrap()
            });
        }
    }
    assert_eq!(check.checked, 14 * model.config().num_hidden_layers);
    eprintln!(
        "{family}: {} adapter tensors pass the finite-difference check (worst {:.1e}, smallest directional \
         derivative {:.2e})",
        check.checked, check.worst, check.smallest
    );
}

#[test]
fn qwen2_adapter_gradients_pass_finite_differences() {
    finite_differences("qwen2");
}

#[test]
fn qwen3_adapter_gradients_pass_finite_differences() {
    finite_differences("qwen3");
}

#[test]
fn llama_adapter_gradients_pass_finite_differences() {
    finite_differences("llama");
}

/// Greedy decoding of a left-padded batch of two chat prompts, 32 new tokens, with the KV cache: the
/// tokens transformers' `generate` chose, without and with the adapter.
fn greedy_generation_matches(family: &str) {
    let (expected, settings) = common::causal_lm::greedy_reference(family);
    let ids = common::causal_lm::id_rows;
    let model = load(family, DType::F32);
    for which in ["base", "lora"] {
        if which == "lora" {
            attach_peft_adapter(&model, family, DType::F32);
        }
        let prompts = ids(&expected[which]["prompts"]);
        let mut streamed = vec![Vec::new(); prompts.len()];
        let tokens = generate(&model, &prompts, &settings, |row, token| {
            streamed[row].push(token)
        })
        .unwrap();
        let reference = ids(&expected[which]["new_tokens"]);
        assert_eq!(tokens, reference, "{family} {which}");
        assert_eq!(streamed, reference);
        assert!(reference.iter().any(|r| r.len() == 32));
    }
}

#[test]
fn qwen2_greedy_generation_matches_transformers() {
    greedy_generation_matches("qwen2");
}

#[test]
fn qwen3_greedy_generation_matches_transformers() {
    greedy_generation_matches("qwen3");
}

#[test]
fn llama_greedy_generation_matches_transformers() {
    greedy_generation_matches("llama");
}

#[test]
fn a_model_computes_in_bf16_too() {
    // Qwen3's weights are stored in bf16; computing in bf16 stays near the float64 reference.
    let reference = reference("qwen3");
    let model = load("qwen3", DType::BF16);
    let text = text_positions(&int_rows(&reference, "padded.attention_mask"));
    let logits = model.forward(&padded_batch(&reference), None).unwrap();
    assert_eq!(logits.dtype(), DType::BF16);
    let expected = at_positions(&reference.tensor("padded.logits"), &text);
    let diff = max_abs_diff(&at_positions(&logits, &text), &expected);
    eprintln!(
        "qwen3 bf16 logits: max abs diff {diff:.3e} (reference max abs {:.3e})",
        max_abs(&expected)
    );
    assert!(
        diff < 0.1 * max_abs(&expected),
        "bf16 logits differ by {diff}"
    );
}

/// A copy of a fixture folder in a temporary directory, with `edit` applied to its config.json.
fn edited_copy(family: &str, edit: impl FnOnce(&mut serde_json::Value)) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(folder(family)).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            std::fs::copy(&path, dir.path().join(path.file_name().unwrap())).unwrap();
        }
    }
    let config_path = dir.path().join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    edit(&mut config);
    std::fs::write(&config_path, config.to_string()).unwrap();
    dir
}

fn load_error(path: &Path) -> String {
    CausalLm::load(path, &Device::Cpu, DType::F32)
        .unwrap_err()
        .to_string()
}

#[test]
fn bad_folders_are_one_sentence_naming_the_problem() {
    let other = edited_copy("qwen2", |c| c["model_type"] = "gpt2".into());
    let message = load_error(other.path());
    assert_eq!(
        message,
        format!(
            "{}: model_type `gpt2` is not a supported language model (supported: qwen2, qwen3, llama)",
            other.path().join("config.json").display()
        )
    );
    // Untied, but the file holds no lm_head.weight.
    let untied = edited_copy("qwen2", |c| c["tie_word_embeddings"] = false.into());
    let message = load_error(untied.path());
    assert!(
        message.contains("model.safetensors")
            && message.contains("lacks the tensor `lm_head.weight`"),
        "{message}"
    );
    let empty = tempfile::tempdir().unwrap();
    let message = load_error(empty.path());
    assert!(message.contains("has no config.json"), "{message}");
    let no_weights = tempfile::tempdir().unwrap();
    std::fs::copy(
        folder("llama").join("config.json"),
        no_weights.path().join("config.json"),
    )
    .unwrap();
    let message = load_error(no_weights.path());
    assert!(
        message.contains("is not a language model folder: it has no weights file"),
        "{message}"
    );
}

#[test]
fn labels_outside_the_loss_are_skipped() {
    // Every label ignored: nothing to learn from, a zero sum over zero tokens.
    let reference = reference("llama");
    let model = load("llama", DType::F32);
    let logits = model.forward(&padded_batch(&reference), None).unwrap();
    let ignored = vec![IGNORE_INDEX; labels(&reference).len()];
    let (sum, count) = next_token_loss(&logits, &ignored).unwrap();
    assert_eq!((sum.to_scalar::<f32>().unwrap(), count), (0.0, 0));
}

#[test]
fn kernels_follow_the_switch() {
    common::assert_kernels_follow_the_switch();
}

/// The same comparisons through the device-generic paths (composed RMS norm, candle's attention ops).
#[test]
fn device_generic_paths_match_the_references_too() {
    let tests: Vec<String> = FAMILIES
        .iter()
        .flat_map(|f| {
            [
                format!("{f}_logits_loss_and_packing_match_transformers"),
                format!("{f}_adapter_logits_and_gradients_match_peft"),
            ]
        })
        .chain(["kernels_follow_the_switch".to_string()])
        .collect();
    let names: Vec<&str> = tests.iter().map(String::as_str).collect();
    common::rerun_with_generic_kernels(&names);
}
