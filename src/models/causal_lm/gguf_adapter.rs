//! The llama.cpp LoRA adapter of a causal language model, the file `llama-cli --lora` and Ollama's `ADAPTER`
//! read: a GGUF file with `general.architecture` (`qwen2`, `qwen3`, `llama`), `general.type = adapter`,
//! `adapter.type = lora` and `adapter.lora.alpha`, and one `.lora_a`/`.lora_b` pair per adapted layer under
//! llama.cpp's tensor names (`blk.0.attn_q.weight.lora_a`), laid out as llama.cpp's
//! `convert_lora_to_gguf.py` writes them: `lora_a` is PEFT's A `[r, in]`, `lora_b` is B `[out, r]`. For
//! Llama, the rows of q's and k's B are permuted as `convert_hf_to_gguf.py` permutes those base weights
//! (llama.cpp rotates adjacent pairs where transformers rotates halves); Qwen2/Qwen3 keep transformers'
//! order. llama.cpp scales each module by the file's one alpha over the module's rank, so a module trained
//! at another alpha has the ratio folded into its B.

use std::path::Path;

use candle_core::{DType, Tensor};

use super::config::{Architecture, CausalLmConfig};
use crate::lora::{ExportedLora, ExportedModule, most_common};
use crate::models::ModelError;
use crate::tensor_file::gguf::{GgufValue, write_gguf};

/// What a GGUF adapter is called and the base model it names.
#[derive(Debug, Clone, Copy)]
pub struct AdapterNames<'a> {
    /// `general.name`.
    pub name: &'a str,
    /// `general.base_model.0.name`: the base model's folder or Hub id.
    pub base_model: &'a str,
}

/// llama.cpp's `general.architecture` of a model family.
pub fn llama_cpp_architecture(architecture: Architecture) -> &'static str {
    match architecture {
        Architecture::Qwen2 => "qwen2",
        Architecture::Qwen3 => "qwen3",
        Architecture::Llama => "llama",
    }
}

/// llama.cpp's name of the weight of a transformers module (`model.layers.3.mlp.up_proj` →
/// `blk.3.ffn_up.weight`), for the adapter-capable layers of these models.
pub fn llama_cpp_tensor_name(module_path: &str) -> Option<String> {
    let rest = module_path.strip_prefix("model.layers.")?;
    let (layer, projection) = rest.split_once('.')?;
    layer.parse::<usize>().ok()?;
    let name = match projection {
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{layer}.{name}.weight"))
}

/// The file's alpha and its tensors in `dtype` (f32 or f16), by llama.cpp name.
pub fn gguf_adapter_tensors(
    lora: &ExportedLora,
    config: &CausalLmConfig,
    dtype: DType,
) -> Result<(f64, Vec<(String, Tensor)>), ModelError> {
    let alpha =
        most_common(lora.modules.iter().map(|m| m.alpha.to_bits())).map_or(1.0, f64::from_bits);
    let mut tensors = Vec::with_capacity(2 * lora.modules.len());
    for module in &lora.modules {
        let name = llama_cpp_tensor_name(&module.module_path).ok_or_else(|| {
            ModelError::Unsupported(format!(
                "the layer `{}` has no llama.cpp name, so the adapter cannot be written as GGUF",
                module.module_path
            ))
        })?;
        let compute = ModelError::compute(format!("writing `{name}` for llama.cpp"));
        let (a, b) = lora_a_b(module, alpha, config).map_err(compute)?;
        let convert = ModelError::compute(format!("converting `{name}` to {dtype:?}"));
        tensors.push((
            format!("{name}.lora_a"),
            a.to_dtype(dtype).map_err(convert)?,
        ));
        let convert = ModelError::compute(format!("converting `{name}` to {dtype:?}"));
        tensors.push((
            format!("{name}.lora_b"),
            b.to_dtype(dtype).map_err(convert)?,
        ));
    }
    Ok((alpha, tensors))
}

/// A module's `(lora_a, lora_b)`: B scaled so that `alpha / rank` gives the module's own scale, and for
/// Llama's q and k projections permuted into llama.cpp's row order.
fn lora_a_b(
    module: &ExportedModule,
    alpha: f64,
    config: &CausalLmConfig,
) -> candle_core::Result<(Tensor, Tensor)> {
    let rank = module.down.dims()[0];
    let out = module.up.dims()[0];
    let a = module.down.reshape((rank, ()))?.to_dtype(DType::F32)?;
    let mut b = module.up.reshape((out, rank))?.to_dtype(DType::F32)?;
    if module.alpha != alpha {
        b = b.affine(module.alpha / alpha, 0.0)?;
    }
    if config.architecture == Architecture::Llama {
        let heads = if module.module_path.ends_with("self_attn.q_proj") {
            Some(config.num_attention_heads)
        } else if module.module_path.ends_with("self_attn.k_proj") {
            Some(config.num_key_value_heads)
        } else {
            None
        };
        if let Some(heads) = heads {
            b = interleave_rotary_rows(&b, heads)?;
        }
    }
    Ok((a, b))
}

/// `convert_hf_to_gguf.py`'s `LlamaModel.permute` of a weight's rows: within each of `heads` heads, the
/// first and second halves are interleaved (row `i` of the first half goes to `2i`, of the second to
/// `2i + 1`).
fn interleave_rotary_rows(rows: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    let (out, columns) = rows.dims2()?;
    rows.reshape((heads, 2, out / heads / 2, columns))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((out, columns))
}

/// Writes `lora` as the llama.cpp adapter `path` for a model of `config` (named `base_model`), itself
/// named `name`, in `dtype` (f32 or f16).
pub fn write_gguf_adapter(
    path: &Path,
    lora: &ExportedLora,
    config: &CausalLmConfig,
    names: AdapterNames,
    dtype: DType,
) -> Result<(), ModelError> {
    let (alpha, tensors) = gguf_adapter_tensors(lora, config, dtype)?;
    let file_type = if dtype == DType::F16 { 1 } else { 0 };
    let metadata = [
        (
            "general.architecture",
            GgufValue::String(llama_cpp_architecture(config.architecture).to_string()),
        ),
        ("general.type", GgufValue::String("adapter".to_string())),
        ("general.name", GgufValue::String(names.name.to_string())),
        ("general.base_model.count", GgufValue::U32(1)),
        (
            "general.base_model.0.name",
            GgufValue::String(names.base_model.to_string()),
        ),
        ("general.file_type", GgufValue::U32(file_type)),
        ("general.quantization_version", GgufValue::U32(2)),
        ("adapter.type", GgufValue::String("lora".to_string())),
        ("adapter.lora.alpha", GgufValue::F32(alpha as f32)),
    ];
    Ok(write_gguf(path, &metadata, &tensors)?)
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    #[test]
    fn transformers_modules_take_llama_cpp_names() {
        let named = |path| llama_cpp_tensor_name(path);
        assert_eq!(
            named("model.layers.12.self_attn.o_proj").as_deref(),
            Some("blk.12.attn_output.weight")
        );
        assert_eq!(
            named("model.layers.0.mlp.gate_proj").as_deref(),
            Some("blk.0.ffn_gate.weight")
        );
        assert_eq!(named("lm_head"), None);
        assert_eq!(named("model.layers.x.mlp.up_proj"), None);
    }

    #[test]
    fn rotary_rows_interleave_within_each_head() {
        // Two heads of four rows: [a0 a1 a2 a3 | b0 b1 b2 b3] -> [a0 a2 a1 a3 | b0 b2 b1 b3].
        let rows = Tensor::arange(0f32, 8.0, &Device::Cpu)
            .unwrap()
            .reshape((8, 1))
            .unwrap();
        let permuted: Vec<f32> = interleave_rotary_rows(&rows, 2)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(permuted, [0.0, 2.0, 1.0, 3.0, 4.0, 6.0, 5.0, 7.0]);
    }
}
