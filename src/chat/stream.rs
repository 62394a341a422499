//! A reply's tokens turned into text as they come, for streaming: each push returns what the text gained.
//! Special tokens (the stop token included) are left out, and a character whose bytes are still incomplete
//! waits for the next token. Knows token ids and text only.

use super::ChatError;
use super::tokenizer::TextTokenizer;

/// The text of a reply so far, and the ids it was decoded from.
pub struct TextStream<'a> {
    tokenizer: &'a TextTokenizer,
    stop_ids: &'a [u32],
    ids: Vec<u32>,
    text: String,
}

impl<'a> TextStream<'a> {
    pub fn new(tokenizer: &'a TextTokenizer, stop_ids: &'a [u32]) -> Self {
        Self {
            tokenizer,
            stop_ids,
            ids: Vec::new(),
            text: String::new(),
        }
    }

    /// What the text gains with `token` (empty for a stop token or an incomplete character).
    pub fn push(&mut self, token: u32) -> Result<String, ChatError> {
        if self.stop_ids.contains(&token) {
            return Ok(String::new());
        }
        self.ids.push(token);
        let decoded = self.tokenizer.decode(&self.ids, true)?;
        if decoded.ends_with('\u{FFFD}') || !decoded.starts_with(&self.text) {
            return Ok(String::new());
        }
        let piece = decoded[self.text.len()..].to_string();
        self.text = decoded;
        Ok(piece)
    }

    /// What the whole reply's text adds to what was returned so far (a character left incomplete by the
    /// last token, as its replacement character).
    pub fn finish(&mut self) -> Result<String, ChatError> {
        let decoded = self.tokenizer.decode(&self.ids, true)?;
        let piece = decoded
            .strip_prefix(self.text.as_str())
            .unwrap_or_default()
            .to_string();
        self.text = decoded;
        Ok(piece)
    }

    /// The text so far.
    pub fn text(&self) -> &str {
        &self.text
    }
}
