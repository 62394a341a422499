//! Turning BERT WordPiece token ids (BLIP's captions) back into text as transformers' `BertTokenizer.decode`
//! with `skip_special_tokens` does: special tokens dropped, `##` pieces glued to the word before, spaces
//! before punctuation and common English contractions removed.
//!
//! Only decoding is needed (captions start from an image, not from text), so only the vocabulary is read:
//! `vocab.txt` (one token per line, the id is the line number) or `tokenizer.json`, plus the added tokens.

use std::collections::HashSet;
use std::path::Path;

use crate::models::ModelError;

/// Tokens transformers' BERT tokenizers treat as special.
const SPECIAL_TOKENS: [&str; 7] = [
    "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "[ENC]",
];

/// A WordPiece vocabulary for decoding.
#[derive(Debug, Clone)]
pub struct WordPieceDecoder {
    tokens: Vec<String>,
    special: HashSet<u32>,
}

impl WordPieceDecoder {
    /// Reads the vocabulary of a model folder: `vocab.txt` + `added_tokens.json`, or `tokenizer.json`.
    pub fn from_folder(folder: &Path) -> Result<Self, ModelError> {
        let read = |name: &str| -> Result<Option<String>, ModelError> {
            let path = folder.join(name);
            match std::fs::read_to_string(&path) {
                Ok(text) => Ok(Some(text)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(source) => Err(ModelError::Io { path, source }),
            }
        };
        let mut tokens: Vec<String> = Vec::new();
        let mut added: Vec<(String, u32)> = Vec::new();
        if let Some(text) = read("vocab.txt")? {
            tokens = text.lines().map(str::to_string).collect();
            if let Some(json) = read("added_tokens.json")? {
                let map: std::collections::BTreeMap<String, u32> = serde_json::from_str(&json)
                    .map_err(|e| bad(folder, "added_tokens.json", &e.to_string()))?;
                added.extend(map);
            }
        } else if let Some(json) = read("tokenizer.json")? {
            let value: serde_json::Value = serde_json::from_str(&json)
                .map_err(|e| bad(folder, "tokenizer.json", &e.to_string()))?;
            let vocab = value
                .pointer("/model/vocab")
                .and_then(|v| v.as_object())
                .ok_or_else(|| bad(folder, "tokenizer.json", "it has no model.vocab"))?;
            let mut pairs: Vec<(String, u32)> = vocab
                .iter()
                .filter_map(|(k, v)| Some((k.clone(), u32::try_from(v.as_u64()?).ok()?)))
                .collect();
            pairs.extend(
                value
                    .get("added_tokens")
                    .and_then(|v| v.as_array())
                    .into_iter()
                    .flatten()
                    .filter_map(|t| {
                        let id = u32::try_from(t.get("id")?.as_u64()?).ok()?;
                        Some((t.get("content")?.as_str()?.to_string(), id))
                    }),
            );
            added = pairs;
        } else {
            return Err(ModelError::Config(format!(
                "{} has no vocab.txt or tokenizer.json, which the caption decoder needs",
                folder.display()
            )));
        }
        const MAX_ID: u32 = 10_000_000;
        for (token, id) in added {
            if id >= MAX_ID {
                return Err(bad(
                    folder,
                    "the vocabulary",
                    &format!("token id {id} is too large"),
                ));
            }
            let id = id as usize;
            if tokens.len() <= id {
                tokens.resize(id + 1, String::new());
            }
            tokens[id] = token;
        }
        let special = tokens
            .iter()
            .enumerate()
            .filter(|(_, t)| SPECIAL_TOKENS.contains(&t.as_str()))
            .map(|(i, _)| i as u32)
            .collect();
        Ok(Self { tokens, special })
    }

    /// The text of `ids`, special and unknown ids skipped.
    pub fn decode(&self, ids: &[u32]) -> String {
        let pieces: Vec<&str> = ids
            .iter()
            .filter(|id| !self.special.contains(id))
            .filter_map(|&id| self.tokens.get(id as usize))
            .map(String::as_str)
            .filter(|t| !t.is_empty())
            .collect();
        clean_up_spaces(pieces.join(" ").replace(" ##", "").trim())
    }
}

fn bad(folder: &Path, file: &str, reason: &str) -> ModelError {
    ModelError::Config(format!(
        "{}: {file} cannot be read: {reason}",
        folder.display()
    ))
}

/// transformers' `clean_up_tokenization`: no space before punctuation and common contractions.
fn clean_up_spaces(text: &str) -> String {
    [
        (" .", "."),
        (" ?", "?"),
        (" !", "!"),
        (" ,", ","),
        (" ' ", "'"),
        (" n't", "n't"),
        (" 'm", "'m"),
        (" 's", "'s"),
        (" 've", "'ve"),
        (" 're", "'re"),
    ]
    .iter()
    .fold(text.to_string(), |t, (from, to)| t.replace(from, to))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decoder(tokens: &[&str]) -> WordPieceDecoder {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("vocab.txt"), tokens.join("\n")).unwrap();
        WordPieceDecoder::from_folder(dir.path()).unwrap()
    }

    #[test]
    fn glues_pieces_and_drops_special_tokens() {
        let d = decoder(&[
            "[PAD]", "[CLS]", "[SEP]", "ar", "##af", "##ed", "cat", ",", "dog", "'", "s",
        ]);
        assert_eq!(
            d.decode(&[1, 3, 4, 5, 6, 7, 8, 9, 10, 2, 0]),
            "arafed cat, dog's"
        );
    }

    #[test]
    fn unknown_ids_are_skipped() {
        let d = decoder(&["[PAD]", "a", "cat"]);
        assert_eq!(d.decode(&[1, 99, 2]), "a cat");
    }

    #[test]
    fn a_folder_without_a_vocabulary_is_one_sentence() {
        let dir = tempfile::tempdir().unwrap();
        let message = WordPieceDecoder::from_folder(dir.path())
            .unwrap_err()
            .to_string();
        assert!(
            message.contains("no vocab.txt or tokenizer.json"),
            "{message}"
        );
    }
}
