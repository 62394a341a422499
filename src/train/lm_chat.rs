//! Answering a conversation with a loaded language model, for `lora-studio chat` and the app's chat: the
//! sampling settings (what the caller asks, the model's `generation_config.json` filling in the rest), the
//! prompt rendered with the model's chat template and a generation prompt, and the reply generated and
//! streamed as text pieces. Knows nothing of adapters (the caller attaches them) and must not print.

use std::time::Instant;

use crate::chat::{ChatError, ChatFiles, ChatMessage, RenderOptions, TextStream};
use crate::models::causal_lm::{CausalLm, GenerationSettings, Sampling, generate_while};

/// The sampling a caller asks for; what it leaves out comes from the model's generation config.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SamplingChoice {
    /// 0 is greedy; default: the model's when it samples, else 0.
    pub temperature: Option<f64>,
    /// Default: the model's, else 1.
    pub top_p: Option<f64>,
    /// Default: the model's, else 0 (all tokens).
    pub top_k: Option<usize>,
    /// Default: the model's, else 1.
    pub repetition_penalty: Option<f64>,
}

/// What can go wrong answering.
#[derive(Debug, thiserror::Error)]
pub enum ReplyError {
    #[error("the temperature must be 0 (greedy) or more")]
    Temperature,
    #[error("top_p must be above 0 and at most 1")]
    TopP,
    #[error("the repetition penalty must be above 0 (1 leaves the logits as they are)")]
    RepetitionPenalty,
    #[error(transparent)]
    Chat(#[from] ChatError),
    #[error("generating the reply failed: {}", crate::tensor_file::plain_error(.0))]
    Generate(#[from] candle_core::Error),
}

/// A complete reply.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    /// Its text (special tokens left out).
    pub text: String,
    pub prompt_tokens: usize,
    /// The tokens generated, the stop token included.
    pub new_tokens: usize,
    /// From the start of generation to the first new token (reading the prompt).
    pub first_token_secs: f64,
    pub total_secs: f64,
}

/// The generation settings for `asked` with the model's defaults from `files`, up to `max_new_tokens`,
/// sampling with `seed`.
pub fn generation_settings(
    files: &ChatFiles,
    asked: &SamplingChoice,
    max_new_tokens: usize,
    seed: u64,
) -> Result<GenerationSettings, ReplyError> {
    let defaults = files.generation();
    let temperature = match asked.temperature {
        Some(t) => t,
        None if defaults.do_sample => defaults.temperature.unwrap_or(1.0),
        None => 0.0,
    };
    if !(temperature >= 0.0 && temperature.is_finite()) {
        return Err(ReplyError::Temperature);
    }
    let top_p = asked.top_p.or(defaults.top_p).unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ReplyError::TopP);
    }
    let repetition_penalty = asked
        .repetition_penalty
        .or(defaults.repetition_penalty)
        .unwrap_or(1.0);
    if !(repetition_penalty > 0.0 && repetition_penalty.is_finite()) {
        return Err(ReplyError::RepetitionPenalty);
    }
    Ok(GenerationSettings {
        max_new_tokens,
        stop_ids: defaults.stop_ids.clone(),
        sampling: Sampling {
            temperature,
            top_p,
            top_k: asked.top_k.or(defaults.top_k).unwrap_or(0),
            repetition_penalty,
        },
        seed,
    })
}

/// Generates the assistant's reply to `messages` (rendered with the model's chat template and a generation
/// prompt), handing the piece of text each token adds (empty for a stop token or an incomplete
/// character) to `on_piece` as it comes; the pieces add up to the reply's text. `None` when `on_piece` returned false: the reply was abandoned between two tokens.
pub fn reply(
    model: &CausalLm,
    files: &ChatFiles,
    messages: &[ChatMessage],
    settings: &GenerationSettings,
    mut on_piece: impl FnMut(&str) -> bool,
) -> Result<Option<Reply>, ReplyError> {
    let options = RenderOptions {
        add_generation_prompt: true,
        ..Default::default()
    };
    let prompt = files.encode_chat(messages, &options)?;
    let started = Instant::now();
    let mut first_token_secs = None;
    let mut stream = TextStream::new(files.tokenizer(), &settings.stop_ids);
    let mut failed = None;
    let mut abandoned = false;
    let tokens = generate_while(
        model,
        std::slice::from_ref(&prompt),
        settings,
        |_, token| {
            first_token_secs.get_or_insert_with(|| started.elapsed().as_secs_f64());
            match stream.push(token) {
                Ok(piece) => {
                    abandoned = !on_piece(&piece);
                    !abandoned
                }
                Err(e) => {
                    failed = Some(e);
                    false
                }
            }
        },
    )?;
    if let Some(error) = failed {
        return Err(error.into());
    }
    if abandoned {
        return Ok(None);
    }
    let rest = stream.finish()?;
    if !rest.is_empty() && !on_piece(&rest) {
        return Ok(None);
    }
    let total_secs = started.elapsed().as_secs_f64();
    Ok(Some(Reply {
        text: stream.text().to_string(),
        prompt_tokens: prompt.len(),
        new_tokens: tokens.first().map_or(0, Vec::len),
        first_token_secs: first_token_secs.unwrap_or(total_secs),
        total_secs,
    }))
}
