//! One decoder layer of Qwen2, Qwen3 and Llama: `x + attention(input_layernorm(x))`, then
//! `x + mlp(post_attention_layernorm(x))` with the SwiGLU MLP `down(silu(gate(x)) · up(x))`, in the
//! transformers layout (`model.layers.N.{input_layernorm, self_attn, post_attention_layernorm, mlp}`).

use candle_core::{Result, Tensor};

use super::attention::SelfAttention;
use super::cache::LayerCache;
use super::config::CausalLmConfig;
use crate::kernels::silu;
use crate::lora::{AdaptableLinear, LayerBuilder};
use crate::models::nn::RmsNorm;

/// The SwiGLU feed-forward block.
#[derive(Debug, Clone)]
struct Mlp {
    gate_proj: AdaptableLinear,
    up_proj: AdaptableLinear,
    down_proj: AdaptableLinear,
}

impl Mlp {
    fn new(lb: LayerBuilder, config: &CausalLmConfig) -> Result<Self> {
        let (hidden, intermediate, bias) = (
            config.hidden_size,
            config.intermediate_size,
            config.mlp_bias,
        );
        Ok(Self {
            gate_proj: lb.pp("gate_proj").linear(hidden, intermediate, bias)?,
            up_proj: lb.pp("up_proj").linear(hidden, intermediate, bias)?,
            down_proj: lb.pp("down_proj").linear(intermediate, hidden, bias)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gated = (silu(&self.gate_proj.forward(x)?)? * self.up_proj.forward(x)?)?;
        self.down_proj.forward(&gated)
    }
}

/// One pre-norm decoder layer.
#[derive(Debug, Clone)]
pub(super) struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: SelfAttention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
}

impl DecoderLayer {
    /// `lb` is rooted at the layer (`model.layers.N`).
    pub(super) fn new(lb: LayerBuilder, config: &CausalLmConfig) -> Result<Self> {
        let norm =
            |name: &str| RmsNorm::new(lb.vb().pp(name), config.hidden_size, config.rms_norm_eps);
        Ok(Self {
            input_layernorm: norm("input_layernorm")?,
            self_attn: SelfAttention::new(lb.pp("self_attn"), config)?,
            post_attention_layernorm: norm("post_attention_layernorm")?,
            mlp: Mlp::new(lb.pp("mlp"), config)?,
        })
    }

    pub(super) fn forward(
        &self,
        x: &Tensor,
        rotary: (&Tensor, &Tensor),
        mask: &Tensor,
        cache: Option<&mut LayerCache>,
    ) -> Result<Tensor> {
        let attended =
            self.self_attn
                .forward(&self.input_layernorm.forward(x)?, rotary, mask, cache)?;
        let x = (x + attended)?;
        let mlp = self
            .mlp
            .forward(&self.post_attention_layernorm.forward(&x)?)?;
        x + mlp
    }
}
