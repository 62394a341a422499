//! A model's `tokenizer.json` through the `tokenizers` crate (built with fancy-regex, no C library):
//! encoding with or without the special tokens its post-processor adds, decoding with or without special
//! tokens, and transformers' clean-up of spaces before punctuation when `tokenizer_config.json` asks for it
//! (`clean_up_tokenization_spaces`), so decoded text equals what `tokenizer.decode` returns.

use std::ops::Range;
use std::path::{Path, PathBuf};

use super::ChatError;

/// One token of an encoded text and the byte range of the text it covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenSpan {
    pub id: u32,
    pub bytes: Range<usize>,
}

/// A loaded tokenizer.
#[derive(Debug, Clone)]
pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
    clean_up_spaces: bool,
    path: PathBuf,
}

impl TextTokenizer {
    /// Reads `tokenizer.json` at `path`; `clean_up_spaces` is `tokenizer_config.json`'s
    /// `clean_up_tokenization_spaces`.
    pub fn from_file(path: &Path, clean_up_spaces: bool) -> Result<Self, ChatError> {
        let inner = tokenizers::Tokenizer::from_file(path).map_err(|e| ChatError::Invalid {
            path: path.to_path_buf(),
            reason: format!("it is not a tokenizer this program reads ({e})"),
        })?;
        Ok(Self {
            inner,
            clean_up_spaces,
            path: path.to_path_buf(),
        })
    }

    /// The token ids of `text`; `add_special_tokens` adds what the tokenizer's post-processor adds (Llama 3's
    /// `<|begin_of_text|>`). Special tokens written in the text are matched as such either way.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, ChatError> {
        Ok(self.encoding(text, add_special_tokens)?.get_ids().to_vec())
    }

    /// The tokens of `text` (without added special tokens), each with the bytes of `text` it stands for,
    /// so spans of a rendered chat (an assistant's reply) can be found among the tokens.
    pub fn encode_spans(&self, text: &str) -> Result<Vec<TokenSpan>, ChatError> {
        let encoding = self.encoding(text, false)?;
        Ok(encoding
            .get_ids()
            .iter()
            .zip(encoding.get_offsets())
            .map(|(&id, &(start, end))| TokenSpan {
                id,
                bytes: start..end,
            })
            .collect())
    }

    fn encoding(
        &self,
        text: &str,
        add_special_tokens: bool,
    ) -> Result<tokenizers::Encoding, ChatError> {
        self.inner.encode(text, add_special_tokens).map_err(|e| {
            ChatError::Tokenize(format!(
                "{} could not encode the text: {e}",
                self.path.display()
            ))
        })
    }

    /// The text of `ids`, without the special tokens if `skip_special_tokens`.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, ChatError> {
        let text = self.inner.decode(ids, skip_special_tokens).map_err(|e| {
            ChatError::Tokenize(format!(
                "{} could not decode the ids: {e}",
                self.path.display()
            ))
        })?;
        Ok(if self.clean_up_spaces {
            clean_up_tokenization(&text)
        } else {
            text
        })
    }

    /// The id of a token written out (`<|im_end|>`), if the vocabulary has it.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }
}

/// transformers' `clean_up_tokenization`: no space before `.`, `?`, `!`, `,` and English contractions.
fn clean_up_tokenization(text: &str) -> String {
    text.replace(" .", ".")
        .replace(" ?", "?")
        .replace(" !", "!")
        .replace(" ,", ",")
        .replace(" ' ", "'")
        .replace(" n't", "n't")
        .replace(" 'm", "'m")
        .replace(" 's", "'s")
        .replace(" 've", "'ve")
        .replace(" 're", "'re")
}

#[cfg(test)]
mod tests {
    use super::clean_up_tokenization;

    #[test]
    fn clean_up_removes_spaces_before_punctuation_and_contractions() {
        assert_eq!(
            clean_up_tokenization("I do n't know , it 's fine . Is it ?"),
            "I don't know, it's fine. Is it?"
        );
    }
}
