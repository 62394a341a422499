//! How a model folder says replies end and are sampled: the stop ids from `generation_config.json`
//! (`eos_token_id`, one id or a list), `config.json` and the tokenizer's `eos_token` (all of them, in that
//! order: a chat model's end-of-turn token and its end-of-text token both end a reply), and the sampling
//! defaults (`do_sample`, `temperature`, `top_p`, `top_k`, `repetition_penalty`) of `generation_config.json`.

use std::path::Path;

use serde::Deserialize;

use super::ChatError;

/// The stop ids and sampling defaults of a model folder.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationDefaults {
    /// Ids that end a reply, without repeats.
    pub stop_ids: Vec<u32>,
    /// Whether the model's authors sample (otherwise greedy decoding).
    pub do_sample: bool,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<usize>,
    pub repetition_penalty: Option<f64>,
}

/// The keys read from `generation_config.json` or `config.json`.
#[derive(Debug, Default, Deserialize)]
struct StoredGeneration {
    eos_token_id: Option<OneOrMany>,
    #[serde(default)]
    do_sample: bool,
    temperature: Option<f64>,
    top_p: Option<f64>,
    top_k: Option<usize>,
    repetition_penalty: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(u32),
    Many(Vec<u32>),
}

impl OneOrMany {
    fn ids(&self) -> &[u32] {
        match self {
            Self::One(id) => std::slice::from_ref(id),
            Self::Many(ids) => ids,
        }
    }
}

impl GenerationDefaults {
    /// Reads `generation_config.json` and `config.json` in `folder` (either may be absent) and adds
    /// `eos_token_id`, the id of the tokenizer's `eos_token`.
    pub(super) fn read(folder: &Path, eos_token_id: Option<u32>) -> Result<Self, ChatError> {
        let generation = read_optional(&folder.join("generation_config.json"))?;
        let model = read_optional(&folder.join("config.json"))?;
        let mut stop_ids = Vec::new();
        let listed = [&generation, &model]
            .into_iter()
            .filter_map(|stored| stored.eos_token_id.as_ref())
            .flat_map(OneOrMany::ids)
            .copied()
            .chain(eos_token_id);
        for id in listed {
            if !stop_ids.contains(&id) {
                stop_ids.push(id);
            }
        }
        Ok(Self {
            stop_ids,
            do_sample: generation.do_sample,
            temperature: generation.temperature,
            top_p: generation.top_p,
            top_k: generation.top_k,
            repetition_penalty: generation.repetition_penalty,
        })
    }
}

/// The generation keys of a JSON file, or none if there is no such file.
fn read_optional(path: &Path) -> Result<StoredGeneration, ChatError> {
    if !path.is_file() {
        return Ok(StoredGeneration::default());
    }
    let text = std::fs::read_to_string(path).map_err(|source| ChatError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| ChatError::Invalid {
        path: path.to_path_buf(),
        reason: format!("its eos_token_id, do_sample, temperature, top_p, top_k or repetition_penalty cannot be read ({e})"),
    })
}
