//! A language model's training samples as token ids and labels: each conversation rendered with the
//! model's own chat template (`chat`), its tokens labelled for the loss on the assistant turns only (each
//! turn's text and the template's end of turn, `<|im_end|>` or `<|eot_id|>`) or on every token with
//! `train_on_prompt`; plain texts tokenised with the tokenizer's own special tokens and an end-of-text token,
//! every token trained, split into pieces of `max_seq_length`. Conversations longer than that are cut.
//!
//! Works on ids and labels only: no tensors, no model.

use std::ops::Range;

use crate::chat::{ChatError, ChatFiles, ChatMessage, RenderOptions};
use crate::config::TrainConfig;
use crate::data::text::{Role, RowPlace, TextDataset, TextSample, Turn};
use crate::models::causal_lm::IGNORE_INDEX;

/// One training sample: token ids and, aligned with them, the label of each token ([`IGNORE_INDEX`] where
/// it is not trained). As in transformers, the token at `t` is predicted from the tokens before it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenizedSample {
    pub ids: Vec<u32>,
    pub labels: Vec<i64>,
}

impl TokenizedSample {
    /// The tokens the loss covers (the first token is never predicted).
    pub fn trained_tokens(&self) -> usize {
        self.labels
            .iter()
            .skip(1)
            .filter(|&&l| l != IGNORE_INDEX)
            .count()
    }
}

/// A dataset's samples as tokens, and what was cut or left out on the way.
#[derive(Debug, Clone, Default)]
pub struct TokenizedDataset {
    pub samples: Vec<TokenizedSample>,
    /// Conversations cut at `max_seq_length`.
    pub truncated: usize,
    /// Plain texts split into several samples.
    pub split_texts: usize,
    /// Rows left out, with the reason (cut before any assistant token, or a template that changes the text).
    pub left_out: Vec<String>,
}

/// Tokenises every sample of `dataset` as `config` says (`max_seq_length`, `train_on_prompt`,
/// `system_prompt`).
pub fn tokenize_dataset(
    files: &ChatFiles,
    dataset: &TextDataset,
    config: &TrainConfig,
) -> Result<TokenizedDataset, ChatError> {
    let max_len = config.max_seq_length as usize;
    let end_of_turn = end_of_turn_text(files)?;
    let mut out = TokenizedDataset::default();
    for (sample, place) in &dataset.samples {
        match sample {
            TextSample::Text(text) => {
                let pieces = text_samples(files, text, max_len)?;
                if pieces.len() > 1 {
                    out.split_texts += 1;
                }
                out.samples.extend(pieces);
            }
            TextSample::Conversation(turns) => {
                let sample = match conversation_sample(files, turns, config, &end_of_turn) {
                    Ok(sample) => sample,
                    Err(RowProblem::Template(reason)) => {
                        out.left_out.push(format!("{place}: {reason}"));
                        continue;
                    }
                    Err(RowProblem::Chat(error)) => return Err(error),
                };
                let (sample, cut) = truncated(sample, max_len);
                out.truncated += usize::from(cut);
                if sample.trained_tokens() == 0 {
                    out.left_out.push(left_out_after_cut(place, max_len));
                    continue;
                }
                out.samples.push(sample);
            }
        }
    }
    Ok(out)
}

fn left_out_after_cut(place: &RowPlace, max_len: usize) -> String {
    format!(
        "{place}: no assistant token is left within max_seq_length ({max_len} tokens); raise it or shorten \
         the prompt"
    )
}

/// Why one conversation cannot be tokenised.
enum RowProblem {
    /// The row's own problem: it is left out.
    Template(String),
    /// The model's files fail: the run stops.
    Chat(ChatError),
}

impl From<ChatError> for RowProblem {
    fn from(error: ChatError) -> Self {
        match error {
            ChatError::Template(reason) => RowProblem::Template(format!(
                "the model's chat template refuses the conversation ({reason})"
            )),
            other => RowProblem::Chat(other),
        }
    }
}

/// The text the template writes after an assistant's reply (`<|im_end|>\n`, `<|eot_id|>`): what follows
/// a probe reply in a rendered two-turn chat.
fn end_of_turn_text(files: &ChatFiles) -> Result<String, ChatError> {
    const PROBE: &str = "PROBE-REPLY-7f3a";
    let probe = [
        ChatMessage::new("user", "Hello"),
        ChatMessage::new("assistant", PROBE),
    ];
    let text = files.render(&probe, &RenderOptions::default())?;
    Ok(text
        .rfind(PROBE)
        .map(|at| text[at + PROBE.len()..].to_string())
        .unwrap_or_default())
}

/// The ids and labels of one conversation.
fn conversation_sample(
    files: &ChatFiles,
    turns: &[Turn],
    config: &TrainConfig,
    end_of_turn: &str,
) -> Result<TokenizedSample, RowProblem> {
    let (messages, text) = rendered(files, turns, config.system_prompt.as_deref())?;
    let spans = assistant_spans(&text, &messages, end_of_turn)?;
    let tokens = files.tokenizer().encode_spans(&text)?;
    let ids: Vec<u32> = tokens.iter().map(|t| t.id).collect();
    let labels = tokens
        .iter()
        .map(|token| {
            let trained = config.train_on_prompt
                || spans
                    .iter()
                    .any(|span| span.contains(&token.bytes.start) && token.bytes.end <= span.end);
            if trained {
                i64::from(token.id)
            } else {
                IGNORE_INDEX
            }
        })
        .collect();
    Ok(TokenizedSample { ids, labels })
}

/// The conversation's messages (with `system_prompt` first when it has no system turn) and their text
/// under the model's chat template.
fn rendered(
    files: &ChatFiles,
    turns: &[Turn],
    system_prompt: Option<&str>,
) -> Result<(Vec<ChatMessage>, String), ChatError> {
    let mut messages: Vec<ChatMessage> = turns
        .iter()
        .map(|t| ChatMessage::new(t.role.name(), t.content.clone()))
        .collect();
    if let Some(system) = system_prompt
        && !turns.iter().any(|t| t.role == Role::System)
    {
        messages.insert(0, ChatMessage::new("system", system));
    }
    let text = files.render(&messages, &RenderOptions::default())?;
    Ok((messages, text))
}

/// How many tokens `sample` has when it is trained, before a conversation is cut to `max_seq_length` (or a
/// text split into pieces of it): a conversation rendered with the chat template as training renders it
/// (`system_prompt` is the run's default system message), a text with its special tokens and end of text.
pub fn sample_token_count(
    files: &ChatFiles,
    sample: &TextSample,
    system_prompt: Option<&str>,
) -> Result<usize, ChatError> {
    match sample {
        TextSample::Conversation(turns) => {
            let (_, text) = rendered(files, turns, system_prompt)?;
            Ok(files.tokenizer().encode_spans(&text)?.len())
        }
        TextSample::Text(text) => Ok(text_ids(files, text)?.len()),
    }
}

/// The byte ranges of `text` (a rendered conversation) that the assistant turns of `messages` cover: each
/// reply's text as the template wrote it (trimmed, as templates trim) and the end of turn after it. Turns
/// are found in order, each after the one before.
fn assistant_spans(
    text: &str,
    messages: &[ChatMessage],
    end_of_turn: &str,
) -> Result<Vec<Range<usize>>, RowProblem> {
    let mut cursor = 0;
    let mut spans = Vec::new();
    for (i, message) in messages.iter().enumerate() {
        let content = message.content.trim();
        if content.is_empty() {
            continue;
        }
        let Some(found) = text[cursor..].find(content) else {
            if message.role != "assistant" {
                // A template may rewrite a prompt (a default system text, dates); only replies must be found.
                continue;
            }
            return Err(RowProblem::Template(format!(
                "the model's chat template changes the text of turn {} (the assistant's reply), so its \
                 tokens cannot be found",
                i + 1
            )));
        };
        let start = cursor + found;
        let mut end = start + content.len();
        if message.role == "assistant" {
            let rest = &text[end..];
            let matched = rest
                .char_indices()
                .zip(end_of_turn.chars())
                .take_while(|((_, a), b)| a == b)
                .last()
                .map_or(0, |((at, c), _)| at + c.len_utf8());
            end += matched;
            spans.push(start..end);
        }
        cursor = end;
    }
    Ok(spans)
}

/// The sample cut to `max_len` tokens, and whether it was cut.
fn truncated(mut sample: TokenizedSample, max_len: usize) -> (TokenizedSample, bool) {
    let cut = sample.ids.len() > max_len;
    sample.ids.truncate(max_len);
    sample.labels.truncate(max_len);
    (sample, cut)
}

/// A plain text as samples: its tokens (with the tokenizer's own special tokens) and an end-of-text token,
/// in pieces of at most `max_len` tokens, every token trained.
fn text_samples(
    files: &ChatFiles,
    text: &str,
    max_len: usize,
) -> Result<Vec<TokenizedSample>, ChatError> {
    Ok(text_ids(files, text)?
        .chunks(max_len.max(2))
        .filter(|piece| piece.len() >= 2)
        .map(|piece| TokenizedSample {
            ids: piece.to_vec(),
            labels: piece.iter().map(|&id| i64::from(id)).collect(),
        })
        .collect())
}

/// A plain text's ids: its tokens with the tokenizer's own special tokens, then the end-of-text token.
fn text_ids(files: &ChatFiles, text: &str) -> Result<Vec<u32>, ChatError> {
    let mut ids = files.tokenizer().encode(text, true)?;
    if let Some(eos) = files
        .special_tokens()
        .get("eos_token")
        .and_then(|t| files.tokenizer().token_id(t))
    {
        ids.push(eos);
    }
    Ok(ids)
}
