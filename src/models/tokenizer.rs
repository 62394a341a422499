//! The CLIP byte-level BPE tokenizer, identical to the reference (transformers' `CLIPTokenizer` with ftfy, as
//! kohya sd-scripts and AUTOMATIC1111 run it): text cleaning, lower-casing, the OpenAI word-split pattern,
//! BPE merges by rank, `<|startoftext|>`/`<|endoftext|>` around at most 75 tokens, padding to 77.
//!
//! The vocabulary is OpenAI CLIP's `bpe_simple_vocab_16e6.txt.gz` (MIT), embedded in the binary so single-file
//! checkpoints, which carry no tokenizer, work offline.

use std::collections::HashMap;
use std::io::Read;
use std::sync::{Mutex, OnceLock, PoisonError};

use regex::Regex;

use super::text_clean::clean_text;

/// Id of `<|startoftext|>`.
pub const START_OF_TEXT: u32 = 49406;
/// Id of `<|endoftext|>`.
pub const END_OF_TEXT: u32 = 49407;
/// Token window of the CLIP text encoders, start and end tokens included.
pub const MAX_TOKENS: usize = 77;

static VOCABULARY_GZ: &[u8] = include_bytes!("../../assets/bpe_simple_vocab_16e6.txt.gz");
/// Merges used by CLIP: the first 49152 - 256 - 2 lines after the header.
const MERGE_COUNT: usize = 49152 - 256 - 2;

/// A CLIP tokenizer. Cheap to share: the vocabulary is parsed once per process.
#[derive(Debug)]
pub struct ClipTokenizer {
    encoder: HashMap<String, u32>,
    /// Vocabulary strings by id (byte-level characters, `</w>` marking word ends).
    vocab: Vec<String>,
    ranks: HashMap<(String, String), usize>,
    byte_to_char: [char; 256],
    word_split: Regex,
    cache: Mutex<HashMap<String, Vec<u32>>>,
}

impl ClipTokenizer {
    /// The process-wide tokenizer over OpenAI's vocabulary. It fails only if the vocabulary compiled into
    /// the binary is damaged.
    pub fn shared() -> Result<&'static ClipTokenizer, String> {
        static TOKENIZER: OnceLock<Result<ClipTokenizer, String>> = OnceLock::new();
        TOKENIZER
            .get_or_init(Self::build)
            .as_ref()
            .map_err(Clone::clone)
    }

    fn build() -> Result<Self, String> {
        let mut text = String::new();
        flate2::read::GzDecoder::new(VOCABULARY_GZ)
            .read_to_string(&mut text)
            .map_err(|e| format!("the built-in CLIP vocabulary is damaged ({e})"))?;
        let merges: Vec<(String, String)> = text
            .lines()
            .skip(1)
            .take(MERGE_COUNT)
            .filter_map(|line| {
                line.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
            })
            .collect();

        let byte_to_char = bytes_to_unicode();
        let byte_order = byte_order();
        let mut vocab: Vec<String> = byte_order
            .iter()
            .map(|&b| byte_to_char[b as usize].to_string())
            .collect();
        let with_end: Vec<String> = vocab.iter().map(|v| format!("{v}</w>")).collect();
        vocab.extend(with_end);
        vocab.extend(merges.iter().map(|(a, b)| format!("{a}{b}")));
        vocab.push("<|startoftext|>".to_string());
        vocab.push("<|endoftext|>".to_string());
        let encoder = vocab
            .iter()
            .enumerate()
            .map(|(i, token)| (token.clone(), i as u32))
            .collect();
        let ranks = merges
            .into_iter()
            .enumerate()
            .map(|(rank, pair)| (pair, rank))
            .collect();
        let word_split = Regex::new(
            r"(?i)<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+",
        )
        .map_err(|e| format!("the tokenizer's word-split pattern is invalid ({e})"))?;
        Ok(Self {
            encoder,
            vocab,
            ranks,
            byte_to_char,
            word_split,
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// Token ids of `text`, without start/end tokens and without truncation (SD1's tokenizer).
    pub fn encode(&self, text: &str) -> Vec<u32> {
        self.encode_with_pad(text, END_OF_TEXT)
    }

    /// Token ids of `text` for a tokenizer padding with `pad`. The reference registers its pad token as a
    /// special token, so with SD2's pad `!` (id 0) every `!` in a prompt becomes id 0.
    pub fn encode_with_pad(&self, text: &str, pad: u32) -> Vec<u32> {
        let mut specials = vec![
            ("<|startoftext|>".to_string(), START_OF_TEXT),
            ("<|endoftext|>".to_string(), END_OF_TEXT),
        ];
        if let Some(pad_text) = self.plain_token_text(pad) {
            specials.push((pad_text, pad));
        }
        let mut ids = Vec::new();
        for piece in split_special(text, &specials) {
            match piece {
                Piece::Special(id) => ids.push(id),
                Piece::Text(raw) => {
                    let cleaned = clean_text(raw);
                    for word in self.word_split.find_iter(&cleaned) {
                        ids.extend(self.encode_word(word.as_str()));
                    }
                }
            }
        }
        ids
    }

    /// `<|startoftext|>`, the first 75 tokens of `text`, `<|endoftext|>`, then `pad` up to 77 ids.
    pub fn encode_padded(&self, text: &str, pad: u32) -> Vec<u32> {
        let mut ids = Vec::with_capacity(MAX_TOKENS);
        ids.push(START_OF_TEXT);
        ids.extend(
            self.encode_with_pad(text, pad)
                .into_iter()
                .take(MAX_TOKENS - 2),
        );
        ids.push(END_OF_TEXT);
        ids.resize(MAX_TOKENS, pad);
        ids
    }

    /// The text of an ordinary (not start/end, not word-final) token, e.g. `!` for id 0.
    fn plain_token_text(&self, id: u32) -> Option<String> {
        if id == START_OF_TEXT || id == END_OF_TEXT {
            return None;
        }
        let token = self.vocab.get(id as usize)?;
        if token.ends_with("</w>") {
            return None;
        }
        let bytes: Option<Vec<u8>> = token
            .chars()
            .map(|c| {
                self.byte_to_char
                    .iter()
                    .position(|&b| b == c)
                    .map(|p| p as u8)
            })
            .collect();
        String::from_utf8(bytes?).ok()
    }

    /// Number of tokens `text` takes, without start/end tokens (over 75 means the rest is cut off).
    pub fn count(&self, text: &str) -> usize {
        self.encode(text).len()
    }

    fn encode_word(&self, word: &str) -> Vec<u32> {
        let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(ids) = cache.get(word) {
            return ids.clone();
        }
        let encoded: String = word
            .bytes()
            .map(|b| self.byte_to_char[b as usize])
            .collect();
        let ids = self
            .bpe(&encoded)
            .iter()
            .filter_map(|symbol| self.encoder.get(symbol).copied())
            .collect::<Vec<_>>();
        if cache.len() < 100_000 {
            cache.insert(word.to_string(), ids.clone());
        }
        ids
    }

    /// Merges the characters of one word (the last marked `</w>`) by merge rank until no pair merges.
    fn bpe(&self, word: &str) -> Vec<String> {
        let chars: Vec<char> = word.chars().collect();
        let Some((last, rest)) = chars.split_last() else {
            return Vec::new();
        };
        let mut symbols: Vec<String> = rest.iter().map(|c| c.to_string()).collect();
        symbols.push(format!("{last}</w>"));
        while symbols.len() > 1 {
            let best = symbols
                .windows(2)
                .filter_map(|pair| {
                    self.ranks
                        .get(&(pair[0].clone(), pair[1].clone()))
                        .map(|&rank| (rank, pair))
                })
                .min_by_key(|(rank, _)| *rank);
            let Some((_, pair)) = best else { break };
            let (first, second) = (pair[0].clone(), pair[1].clone());
            let mut merged = Vec::with_capacity(symbols.len());
            let mut i = 0;
            while i < symbols.len() {
                if i + 1 < symbols.len() && symbols[i] == first && symbols[i + 1] == second {
                    merged.push(format!("{first}{second}"));
                    i += 2;
                } else {
                    merged.push(symbols[i].clone());
                    i += 1;
                }
            }
            symbols = merged;
        }
        symbols
    }
}

/// A piece of cleaned text: either a special token written out literally, or ordinary text.
enum Piece<'a> {
    Special(u32),
    Text(&'a str),
}

/// Splits out the special tokens written literally in the text, as the reference does before cleaning.
fn split_special<'a>(text: &'a str, specials: &[(String, u32)]) -> Vec<Piece<'a>> {
    let mut pieces = Vec::new();
    let mut rest = text;
    while let Some((position, length, id)) = specials
        .iter()
        .filter_map(|(token, id)| rest.find(token.as_str()).map(|p| (p, token.len(), *id)))
        .min_by_key(|(p, _, _)| *p)
    {
        if position > 0 {
            pieces.push(Piece::Text(&rest[..position]));
        }
        pieces.push(Piece::Special(id));
        rest = &rest[position + length..];
    }
    if !rest.is_empty() {
        pieces.push(Piece::Text(rest));
    }
    pieces
}

/// The printable bytes first, then the rest: the order of the first 256 vocabulary entries.
fn byte_order() -> Vec<u8> {
    let mut order: Vec<u8> = (0..=255u8).filter(|&b| is_printable(b)).collect();
    order.extend((0..=255u8).filter(|&b| !is_printable(b)));
    order
}

/// The bytes GPT-2's byte-level BPE shows as themselves.
fn is_printable(b: u8) -> bool {
    (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b)
}

/// GPT-2's reversible byte-to-character map: printable bytes map to themselves, others to 256 + n.
fn bytes_to_unicode() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut next = 256u32;
    for b in 0..=255u8 {
        table[b as usize] = if is_printable(b) {
            char::from(b)
        } else {
            let c = char::from_u32(next).unwrap_or('\u{FFFD}');
            next += 1;
            c
        };
    }
    table
}
