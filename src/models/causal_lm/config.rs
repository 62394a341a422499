//! The architecture of a causal language model, read from a Hugging Face `config.json`: Qwen2/Qwen2.5,
//! Qwen3 and Llama (3.x with its `llama3` `rope_scaling`), with transformers' defaults for what a file
//! leaves out. Any other `model_type` is refused with one sentence naming it. Knows nothing about weights or
//! computation.

use std::path::Path;

use serde::Deserialize;

use crate::models::ModelError;

/// The model families this program runs as language models.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// Qwen2 and Qwen2.5: biases on q/k/v (not o), GQA.
    Qwen2,
    /// Qwen3: RMS norms on each head's queries and keys, `head_dim` from the config, no q/k/v bias.
    Qwen3,
    /// Llama 3.x: optional `attention_bias`/`mlp_bias`, `rope_scaling` type `llama3`.
    Llama,
}

impl Architecture {
    /// The `model_type` values read, for messages.
    pub const SUPPORTED: &'static str = "qwen2, qwen3, llama";

    fn from_model_type(model_type: &str) -> Option<Self> {
        match model_type {
            "qwen2" => Some(Self::Qwen2),
            "qwen3" => Some(Self::Qwen3),
            "llama" => Some(Self::Llama),
            _ => None,
        }
    }

    pub fn label(&self) -> &'static str {
        match self {
            Self::Qwen2 => "Qwen2",
            Self::Qwen3 => "Qwen3",
            Self::Llama => "Llama",
        }
    }
}

/// How rotary frequencies are rescaled for long contexts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RopeScaling {
    /// The frequencies `theta^(-2i/d)` as they are.
    None,
    /// Llama 3.1's rule: low frequencies divided by `factor`, high ones kept, a smooth blend between
    /// (wavelengths measured against `original_max_position_embeddings`).
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
}

/// Everything that decides the shapes and the computation of a model.
#[derive(Debug, Clone, PartialEq)]
pub struct CausalLmConfig {
    pub architecture: Architecture,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// Fewer than `num_attention_heads` for grouped-query attention.
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub max_position_embeddings: usize,
    /// The output projection is the token embedding (no `lm_head.weight` stored).
    pub tie_word_embeddings: bool,
    /// Biases on the query, key and value projections.
    pub qkv_bias: bool,
    /// A bias on the attention's output projection.
    pub o_bias: bool,
    /// Biases on the MLP's gate, up and down projections.
    pub mlp_bias: bool,
    /// RMS norms on each head's queries and keys (Qwen3).
    pub qk_norm: bool,
    pub bos_token_id: Option<u32>,
    /// The end-of-sequence ids `config.json` lists (one or several).
    pub eos_token_ids: Vec<u32>,
}

/// `config.json` as stored; absent keys take transformers' defaults.
#[derive(Debug, Deserialize)]
struct StoredConfig {
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_scaling: Option<StoredRopeScaling>,
    max_position_embeddings: Option<usize>,
    #[serde(default)]
    tie_word_embeddings: bool,
    #[serde(default)]
    attention_bias: bool,
    #[serde(default)]
    mlp_bias: bool,
    hidden_act: Option<String>,
    #[serde(default)]
    use_sliding_window: bool,
    bos_token_id: Option<OneOrMany>,
    eos_token_id: Option<OneOrMany>,
}

#[derive(Debug, Deserialize)]
struct StoredRopeScaling {
    rope_type: Option<String>,
    #[serde(rename = "type")]
    legacy_type: Option<String>,
    factor: Option<f64>,
    low_freq_factor: Option<f64>,
    high_freq_factor: Option<f64>,
    original_max_position_embeddings: Option<f64>,
}

/// A token id or a list of them (`eos_token_id` is either).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(u32),
    Many(Vec<u32>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<u32> {
        match self {
            Self::One(id) => vec![id],
            Self::Many(ids) => ids,
        }
    }
}

impl CausalLmConfig {
    /// Reads `config.json` in `folder`.
    pub fn from_folder(folder: &Path) -> Result<Self, ModelError> {
        let path = folder.join("config.json");
        if !path.is_file() {
            return Err(ModelError::Config(format!(
                "{} has no config.json, which a language model folder needs (model_type {})",
                folder.display(),
                Architecture::SUPPORTED
            )));
        }
        let text = std::fs::read_to_string(&path).map_err(|source| ModelError::Io {
            path: path.clone(),
            source,
        })?;
        Self::from_json(&text, &path)
    }

    /// Parses the text of `config.json`; `path` names it in messages.
    pub fn from_json(text: &str, path: &Path) -> Result<Self, ModelError> {
        let bad = |reason: String| ModelError::Config(format!("{}: {reason}", path.display()));
        let model_type = serde_json::from_str::<serde_json::Value>(text)
            .map_err(|e| bad(format!("it is not valid JSON ({e})")))?
            .get("model_type")
            .and_then(|t| t.as_str().map(str::to_string));
        let Some(model_type) = model_type else {
            return Err(bad(format!(
                "it names no model_type (supported: {})",
                Architecture::SUPPORTED
            )));
        };
        let Some(architecture) = Architecture::from_model_type(&model_type) else {
            return Err(ModelError::Unsupported(format!(
                "{}: model_type `{model_type}` is not a supported language model (supported: {})",
                path.display(),
                Architecture::SUPPORTED
            )));
        };
        let stored: StoredConfig = serde_json::from_str(text)
            .map_err(|e| bad(format!("it is not a valid config ({e})")))?;
        Self::from_stored(architecture, stored).map_err(bad)
    }

    fn from_stored(architecture: Architecture, stored: StoredConfig) -> Result<Self, String> {
        if let Some(act) = stored.hidden_act.as_deref()
            && act != "silu"
        {
            return Err(format!(
                "hidden_act `{act}` is not supported (these models use silu)"
            ));
        }
        if stored.use_sliding_window {
            return Err(
                "use_sliding_window is true; sliding-window attention is not supported".into(),
            );
        }
        let heads = stored.num_attention_heads;
        if heads == 0 || stored.hidden_size == 0 {
            return Err("num_attention_heads and hidden_size must not be 0".into());
        }
        let kv_heads = stored.num_key_value_heads.unwrap_or(heads);
        if kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
            return Err(format!(
                "num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}"
            ));
        }
        let head_dim = match (stored.head_dim, architecture) {
            (Some(d), _) => d,
            // transformers' Qwen3Config default.
            (None, Architecture::Qwen3) => 128,
            (None, _) => stored.hidden_size / heads,
        };
        if head_dim == 0 || !head_dim.is_multiple_of(2) {
            return Err(format!("head_dim {head_dim} is not a positive even number"));
        }
        let (qkv_bias, o_bias, mlp_bias, qk_norm) = match architecture {
            Architecture::Qwen2 => (true, false, false, false),
            Architecture::Qwen3 => (stored.attention_bias, stored.attention_bias, false, true),
            Architecture::Llama => (
                stored.attention_bias,
                stored.attention_bias,
                stored.mlp_bias,
                false,
            ),
        };
        Ok(Self {
            architecture,
            vocab_size: stored.vocab_size,
            hidden_size: stored.hidden_size,
            intermediate_size: stored.intermediate_size,
            num_hidden_layers: stored.num_hidden_layers,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim,
            rms_norm_eps: stored.rms_norm_eps.unwrap_or(1e-6),
            rope_theta: stored.rope_theta.unwrap_or(10_000.0),
            rope_scaling: rope_scaling(stored.rope_scaling)?,
            max_position_embeddings: stored.max_position_embeddings.unwrap_or(32_768),
            tie_word_embeddings: stored.tie_word_embeddings,
            qkv_bias,
            o_bias,
            mlp_bias,
            qk_norm,
            bos_token_id: stored
                .bos_token_id
                .and_then(|ids| ids.into_vec().first().copied()),
            eos_token_ids: stored
                .eos_token_id
                .map(OneOrMany::into_vec)
                .unwrap_or_default(),
        })
    }
}

/// The supported `rope_scaling` entries: none, type `default`, and type `llama3`.
fn rope_scaling(stored: Option<StoredRopeScaling>) -> Result<RopeScaling, String> {
    let Some(stored) = stored else {
        return Ok(RopeScaling::None);
    };
    let kind = stored
        .rope_type
        .clone()
        .or(stored.legacy_type.clone())
        .unwrap_or_else(|| "default".to_string());
    match kind.as_str() {
        "default" => Ok(RopeScaling::None),
        "llama3" => {
            let field = |value: Option<f64>, name: &str| {
                value.ok_or_else(|| format!("rope_scaling of type llama3 lacks `{name}`"))
            };
            let scaling = RopeScaling::Llama3 {
                factor: field(stored.factor, "factor")?,
                low_freq_factor: field(stored.low_freq_factor, "low_freq_factor")?,
                high_freq_factor: field(stored.high_freq_factor, "high_freq_factor")?,
                original_max_position_embeddings: field(
                    stored.original_max_position_embeddings,
                    "original_max_position_embeddings",
                )?,
            };
            if let RopeScaling::Llama3 {
                low_freq_factor,
                high_freq_factor,
                ..
            } = scaling
                && high_freq_factor <= low_freq_factor
            {
                return Err(format!(
                    "rope_scaling high_freq_factor {high_freq_factor} is not above low_freq_factor {low_freq_factor}"
                ));
            }
            Ok(scaling)
        }
        other => Err(format!(
            "rope_scaling type `{other}` is not supported (supported: default, llama3)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn parse(json: &str) -> Result<CausalLmConfig, ModelError> {
        CausalLmConfig::from_json(json, Path::new("model/config.json"))
    }

    const SIZES: &str = r#""vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
        "num_hidden_layers": 1, "num_attention_heads": 2"#;

    #[test]
    fn families_set_their_biases_norms_and_head_sizes() {
        let qwen2 = parse(&format!(
            r#"{{"model_type": "qwen2", {SIZES}, "num_key_value_heads": 1}}"#
        ))
        .unwrap();
        assert_eq!(
            (
                qwen2.qkv_bias,
                qwen2.o_bias,
                qwen2.qk_norm,
                qwen2.head_dim,
                qwen2.num_key_value_heads
            ),
            (true, false, false, 4, 1)
        );
        let qwen3 = parse(&format!(
            r#"{{"model_type": "qwen3", {SIZES}, "head_dim": 6}}"#
        ))
        .unwrap();
        assert_eq!(
            (qwen3.qkv_bias, qwen3.qk_norm, qwen3.head_dim),
            (false, true, 6)
        );
        let llama = parse(&format!(
            r#"{{"model_type": "llama", {SIZES}, "attention_bias": true, "eos_token_id": [3, 4],
                "rope_scaling": {{"type": "llama3", "factor": 8, "low_freq_factor": 1,
                "high_freq_factor": 4, "original_max_position_embeddings": 8192}}}}"#
        ))
        .unwrap();
        assert_eq!((llama.qkv_bias, llama.o_bias), (true, true));
        assert_eq!(llama.eos_token_ids, [3, 4]);
        assert!(matches!(
            llama.rope_scaling,
            RopeScaling::Llama3 { factor: 8.0, .. }
        ));
    }

    #[test]
    fn unsupported_input_is_one_sentence_naming_it() {
        let message = |json: String| parse(&json).unwrap_err().to_string();
        let other = message(format!(r#"{{"model_type": "mistral", {SIZES}}}"#));
        assert_eq!(
            other,
            "model/config.json: model_type `mistral` is not a supported language model (supported: qwen2, qwen3, llama)"
        );
        let yarn = message(format!(
            r#"{{"model_type": "qwen2", {SIZES}, "rope_scaling": {{"rope_type": "yarn", "factor": 4}}}}"#
        ));
        assert!(
            yarn.contains("rope_scaling type `yarn` is not supported"),
            "{yarn}"
        );
        let gqa = message(format!(
            r#"{{"model_type": "llama", {SIZES}, "num_key_value_heads": 3}}"#
        ));
        assert!(
            gqa.contains("not a multiple of num_key_value_heads 3"),
            "{gqa}"
        );
        let missing = message(r#"{"model_type": "llama", "vocab_size": 3}"#.to_string());
        assert!(
            missing.starts_with("model/config.json: it is not a valid config"),
            "{missing}"
        );
        assert!(missing.contains("hidden_size"), "{missing}");
        let untyped = message(format!("{{{SIZES}}}"));
        assert!(untyped.contains("names no model_type"), "{untyped}");
    }
}
