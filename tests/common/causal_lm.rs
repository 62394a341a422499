//! The language-model fixtures (`tests/fixtures/causal_lm/`, made by its `generate.py`): folders,
//! references, and the padded reference batch with the positions of its text tokens.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use lora_studio::models::causal_lm::{CausalLm, GenerationSettings, Sampling, TokenBatch};

use super::{Reference, fixture};

/// The three tiny families: Qwen2 (tied embeddings), Qwen3 (bf16 weights), Llama (sharded, llama3 rope).
pub const FAMILIES: [&str; 3] = ["qwen2", "qwen3", "llama"];

/// The model folder of a family.
pub fn folder(family: &str) -> PathBuf {
    fixture(&format!("causal_lm/{family}"))
}

/// The folder of the PEFT adapter peft wrote for a family (`lora/`).
pub fn peft_lora(family: &str) -> PathBuf {
    folder(family).join("lora")
}

pub fn reference(family: &str) -> Reference {
    Reference::at(&folder(family).join("reference.safetensors"))
}

pub fn reference_json(family: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(folder(family).join("reference.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

pub fn load(family: &str, dtype: DType) -> CausalLm {
    CausalLm::load(&folder(family), &Device::Cpu, dtype).unwrap_or_else(|e| panic!("{e}"))
}

/// The rows of an integer reference tensor `[rows, len]`.
pub fn int_rows(reference: &Reference, name: &str) -> Vec<Vec<i64>> {
    reference.tensor(name).to_vec2::<i64>().unwrap()
}

pub fn as_u32(rows: &[Vec<i64>]) -> Vec<Vec<u32>> {
    rows.iter()
        .map(|r| r.iter().map(|&v| v as u32).collect())
        .collect()
}

/// The padded batch of the reference: ids, the attention mask as segments (text 1, padding 0), positions.
pub fn padded_batch(reference: &Reference) -> TokenBatch {
    let ids = as_u32(&int_rows(reference, "padded.input_ids"));
    let segments = as_u32(&int_rows(reference, "padded.attention_mask"));
    let positions = as_u32(&int_rows(reference, "padded.position_ids"));
    TokenBatch::with_positions(ids, segments, positions).unwrap()
}

/// Row-major indices of the `[rows, len]` positions whose mask is 1.
pub fn text_positions(mask: &[Vec<i64>]) -> Tensor {
    let len = mask[0].len();
    let picked: Vec<u32> = mask
        .iter()
        .enumerate()
        .flat_map(|(r, row)| {
            row.iter()
                .enumerate()
                .filter(|(_, v)| **v == 1)
                .map(move |(t, _)| (r * len + t) as u32)
        })
        .collect();
    let count = picked.len();
    Tensor::from_vec(picked, count, &Device::Cpu).unwrap()
}

/// The text positions of the reference's padded batch.
pub fn padded_text_positions(reference: &Reference) -> Tensor {
    text_positions(&int_rows(reference, "padded.attention_mask"))
}

/// The `[rows, len, width]` values at `positions` (row-major indices), as `[count, width]` f64.
pub fn at_positions(values: &Tensor, positions: &Tensor) -> Tensor {
    let (rows, len, width) = values.dims3().unwrap();
    values
        .reshape((rows * len, width))
        .unwrap()
        .index_select(positions, 0)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
}

/// The reference's greedy-generation section of `family` and the settings it was made with (32 new tokens,
/// the model's stop ids).
pub fn greedy_reference(family: &str) -> (serde_json::Value, GenerationSettings) {
    let expected = reference_json(family)["generation"].clone();
    let settings = GenerationSettings {
        max_new_tokens: 32,
        stop_ids: serde_json::from_value(expected["stop_ids"].clone()).unwrap(),
        sampling: Sampling::GREEDY,
        seed: 0,
    };
    (expected, settings)
}

/// Token id rows as the references store them.
pub fn id_rows(value: &serde_json::Value) -> Vec<Vec<u32>> {
    serde_json::from_value(value.clone()).unwrap()
}

/// OpenAI rows of one question and its answer each.
pub fn chat_lines(rows: &[(&str, &str)]) -> String {
    let lines: Vec<String> = rows
        .iter()
        .map(|(q, a)| {
            serde_json::json!({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
                .to_string()
        })
        .collect();
    lines.join("\n")
}
