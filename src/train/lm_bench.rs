//! The language-model side of `lora-studio bench`: Qwen2.5-0.5B at its real size with random weights
//! (nothing is downloaded), a LoRA on every linear layer of attention and MLP (q, k, v, o, gate, up, down,
//! as LLaMA-Factory's `lora_target: all` and the peft reference script train), AdamW, and random token ids
//! whose next-token loss covers every position. It times the forward pass alone and whole training steps,
//! and reads the peak resident memory.

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use super::TrainError;
use super::bench::{
    RandomWeights, adamw, adapter_step, bench_network, median, peak_rss_gib, timed, timed_steps,
};
use crate::models::causal_lm::{
    CausalLm, CausalLmConfig, TEXT_SEGMENT, TokenBatch, next_token_loss,
};

/// Qwen2.5-0.5B-Instruct's `config.json` (the shapes and the computation; the weights are random).
const QWEN2_0_5B_CONFIG: &str = r#"{
  "model_type": "qwen2", "vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864,
  "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
  "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "max_position_embeddings": 32768,
  "tie_word_embeddings": true, "hidden_act": "silu", "bos_token_id": 151643, "eos_token_id": 151645
}"#;

/// The layers the benchmark adapts, by the last part of their module name.
const TARGET_MODULES: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// What to measure.
#[derive(Debug, Clone)]
pub struct LmBenchSettings {
    /// Tokens per sequence.
    pub seq_len: usize,
    pub batch_size: usize,
    pub rank: usize,
    /// Timed training steps (one more runs first as a warm-up).
    pub steps: usize,
    pub device: Device,
}

/// The measurements, as `--json` prints them (the field names `bench/reference_lm_pytorch.py` prints).
#[derive(Debug, Clone, Serialize)]
pub struct LmBenchReport {
    pub arch: &'static str,
    pub seq_len: usize,
    pub batch_size: usize,
    pub rank: usize,
    pub device: String,
    /// The CPU kernels' matrix product arithmetic: `f32`, or `bf16` operands (summed in f32) under
    /// `--mixed-precision bf16`.
    pub products: &'static str,
    /// Adapted layers (seven per decoder layer).
    pub adapters: usize,
    pub trainable_parameters: usize,
    /// Median seconds of a training step (forward, loss, backward, optimizer).
    pub seconds_per_step: f64,
    pub step_seconds: Vec<f64>,
    /// Median seconds of a forward pass (with the loss) without gradients.
    pub forward_seconds: f64,
    /// Tokens trained per second.
    pub tokens_per_second: f64,
    /// Peak resident memory of the process, in GiB (Linux only).
    pub peak_rss_gib: Option<f64>,
}

/// The architecture `--arch qwen2-0.5b` builds.
pub fn qwen2_0_5b() -> Result<CausalLmConfig, TrainError> {
    Ok(CausalLmConfig::from_json(
        QWEN2_0_5B_CONFIG,
        std::path::Path::new("qwen2-0.5b"),
    )?)
}

/// Builds the model and measures; `progress` hears what is being done.
pub fn run_lm_bench(
    settings: &LmBenchSettings,
    progress: &mut dyn FnMut(&str),
) -> Result<LmBenchReport, TrainError> {
    let device = &settings.device;
    let config = qwen2_0_5b()?;
    progress("building Qwen2.5-0.5B with random weights");
    let vb = VarBuilder::from_backend(Box::new(RandomWeights), DType::F32, device.clone());
    let model = CausalLm::new(vb, &config)?;
    let network = bench_network(
        model.layers().slots(),
        &TARGET_MODULES,
        "base_model.model",
        settings.rank,
        device,
    )?;
    let (vars, mut optimizer) = adamw(&network)?;

    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let rows: Vec<Vec<u32>> = (0..settings.batch_size)
        .map(|_| {
            (0..settings.seq_len)
                .map(|_| rng.random_range(0..config.vocab_size as u32))
                .collect()
        })
        .collect();
    let labels: Vec<i64> = rows.iter().flatten().map(|&id| i64::from(id)).collect();
    let segments = vec![vec![TEXT_SEGMENT; settings.seq_len]; settings.batch_size];
    let batch = TokenBatch::new(rows, segments)?;
    let loss = || -> candle_core::Result<Tensor> {
        let (sum, count) = next_token_loss(&model.forward(&batch, None)?, &labels)?;
        sum / count as f64
    };

    let mut forward_seconds = Vec::new();
    for index in 0..2 {
        progress(&format!("forward pass {}/2", index + 1));
        let _rendering = network.rendering_at(1.0);
        forward_seconds.push(timed(device, || Ok(loss()?.detach()))?.0);
    }
    let step_seconds = timed_steps(device, settings.steps, progress, || {
        let loss = loss()?;
        adapter_step(&loss, &vars, &mut optimizer, None)?;
        Ok(loss)
    })?;
    let seconds_per_step = median(&step_seconds);
    let trained_tokens = settings.batch_size * (settings.seq_len - 1);
    Ok(LmBenchReport {
        arch: "qwen2-0.5b",
        seq_len: settings.seq_len,
        batch_size: settings.batch_size,
        rank: settings.rank,
        device: crate::device::describe(device),
        products: crate::kernels::product_arithmetic(),
        adapters: network.modules().len(),
        trainable_parameters: network.parameter_count(),
        seconds_per_step,
        step_seconds,
        forward_seconds: median(&forward_seconds),
        tokens_per_second: trained_tokens as f64 / seconds_per_step,
        peak_rss_gib: peak_rss_gib(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_benchmark_model_has_qwen2_5_0_5b_s_shapes() {
        let config = qwen2_0_5b().unwrap();
        assert_eq!(
            (
                config.hidden_size,
                config.num_hidden_layers,
                config.num_attention_heads,
                config.num_key_value_heads,
                config.head_dim,
                config.intermediate_size,
                config.vocab_size,
            ),
            (896, 24, 14, 2, 64, 4864, 151936)
        );
        assert!(config.tie_word_embeddings && config.qkv_bias && !config.o_bias);
    }
}
