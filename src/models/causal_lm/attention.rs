//! The self-attention of Qwen2, Qwen3 and Llama: query, key and value projections (biases as the family
//! has them), Qwen3's per-head RMS norms on queries and keys, the rotary embedding, grouped-query attention
//! (each key/value head serves `heads / kv_heads` query heads) and the output projection, under the mask of
//! [`super::batch`]. The projections are adapter-capable layers named as transformers names them
//! (`model.layers.N.self_attn.q_proj`), the names of PEFT adapters.

use candle_core::{Result, Tensor};

use super::cache::{self, LayerCache};
use super::config::CausalLmConfig;
use crate::kernels::rotary_embedding;
use crate::lora::{AdaptableLinear, LayerBuilder};
use crate::models::nn::{RmsNorm, attention};

/// One layer's self-attention.
#[derive(Debug, Clone)]
pub(super) struct SelfAttention {
    q_proj: AdaptableLinear,
    k_proj: AdaptableLinear,
    v_proj: AdaptableLinear,
    o_proj: AdaptableLinear,
    /// Qwen3's norms of each head's queries and keys.
    head_norms: Option<(RmsNorm, RmsNorm)>,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

impl SelfAttention {
    /// `lb` is rooted at the attention (`model.layers.N.self_attn`).
    pub(super) fn new(lb: LayerBuilder, config: &CausalLmConfig) -> Result<Self> {
        let (hidden, heads, kv_heads, head_dim) = (
            config.hidden_size,
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
        );
        let head_norms = if config.qk_norm {
            let norm = |name: &str| RmsNorm::new(lb.vb().pp(name), head_dim, config.rms_norm_eps);
            Some((norm("q_norm")?, norm("k_norm")?))
        } else {
            None
        };
        Ok(Self {
            q_proj: lb
                .pp("q_proj")
                .linear(hidden, heads * head_dim, config.qkv_bias)?,
            k_proj: lb
                .pp("k_proj")
                .linear(hidden, kv_heads * head_dim, config.qkv_bias)?,
            v_proj: lb
                .pp("v_proj")
                .linear(hidden, kv_heads * head_dim, config.qkv_bias)?,
            o_proj: lb
                .pp("o_proj")
                .linear(heads * head_dim, hidden, config.o_bias)?,
            head_norms,
            heads,
            kv_heads,
            head_dim,
        })
    }

    /// `x`: `[rows, tokens, hidden]`; `rotary`: the cos and sin tables of the tokens' positions; `mask`:
    /// `[rows, 1, tokens, cached + tokens]`. With a cache, the tokens' keys and values are appended to it
    /// and the queries attend to all of them.
    pub(super) fn forward(
        &self,
        x: &Tensor,
        (cos, sin): (&Tensor, &Tensor),
        mask: &Tensor,
        cache: Option<&mut LayerCache>,
    ) -> Result<Tensor> {
        let (rows, tokens, _) = x.dims3()?;
        let (heads, kv_heads, head_dim) = (self.heads, self.kv_heads, self.head_dim);
        let q = self
            .q_proj
            .forward(x)?
            .reshape((rows, tokens, heads, head_dim))?;
        let k = self
            .k_proj
            .forward(x)?
            .reshape((rows, tokens, kv_heads, head_dim))?;
        let v = self.v_proj.forward(x)?;
        let (q, k) = match &self.head_norms {
            Some((q_norm, k_norm)) => (q_norm.forward(&q)?, k_norm.forward(&k)?),
            None => (q, k),
        };
        let q = rotary_embedding(&q, cos, sin)?.reshape((rows, tokens, heads * head_dim))?;
        let k = rotary_embedding(&k, cos, sin)?.reshape((rows, tokens, kv_heads * head_dim))?;
        let (k, v) = match cache {
            Some(cache) => cache::append(cache, k, v)?,
            None => (k, v),
        };
        let repeats = heads / kv_heads;
        let (k, v) = (
            repeat_heads(&k, kv_heads, repeats)?,
            repeat_heads(&v, kv_heads, repeats)?,
        );
        self.o_proj
            .forward(&attention(&q, &k, &v, heads, Some(mask))?)
    }
}

/// `[rows, tokens, kv_heads·d]` with every head repeated `repeats` times in place (head `h` serves query
/// heads `h·repeats .. (h+1)·repeats`, transformers' `repeat_kv`).
fn repeat_heads(t: &Tensor, kv_heads: usize, repeats: usize) -> Result<Tensor> {
    if repeats == 1 {
        return Ok(t.clone());
    }
    let (rows, tokens, width) = t.dims3()?;
    let head_dim = width / kv_heads;
    t.reshape((rows, tokens, kv_heads, 1, head_dim))?
        .broadcast_as((rows, tokens, kv_heads, repeats, head_dim))?
        .contiguous()?
        .reshape((rows, tokens, kv_heads * repeats * head_dim))
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::repeat_heads;

    #[test]
    fn each_key_value_head_serves_its_group_of_query_heads() {
        // Two heads of width 2: [a0 a1 | b0 b1] becomes [a a a | b b b] for three query heads each.
        let t = Tensor::new(&[[[1f32, 2.0, 3.0, 4.0]]], &Device::Cpu).unwrap();
        let repeated: Vec<f32> = repeat_heads(&t, 2, 3)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(
            repeated,
            [1.0, 2.0, 1.0, 2.0, 1.0, 2.0, 3.0, 4.0, 3.0, 4.0, 3.0, 4.0]
        );
    }
}
