//! The CLIP tokenizer against the ids transformers' `CLIPTokenizer` (with ftfy) produced for 59 varied
//! prompts: unicode, punctuation, emoji, numbers, HTML entities, whitespace, prompts over 77 tokens.

mod common;

use lora_studio::models::tokenizer::{ClipTokenizer, END_OF_TEXT, START_OF_TEXT};
use serde::Deserialize;

#[derive(Deserialize)]
struct Expected {
    prompts: Vec<String>,
    sd1_ids: Vec<Vec<u32>>,
    sd2_ids: Vec<Vec<u32>>,
    unpadded_ids: Vec<Vec<u32>>,
    sd2_unpadded_ids: Vec<Vec<u32>>,
}

fn expected() -> Expected {
    let text = std::fs::read_to_string(common::fixture("tokens.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

#[test]
fn padded_ids_match_reference_for_sd1_and_sd2() {
    let expected = expected();
    assert!(expected.prompts.len() >= 40);
    let tokenizer = ClipTokenizer::shared().unwrap();
    let mut mismatches = Vec::new();
    for (i, prompt) in expected.prompts.iter().enumerate() {
        if tokenizer.encode_padded(prompt, END_OF_TEXT) != expected.sd1_ids[i] {
            mismatches.push(format!("SD1 {prompt:?}"));
        }
        if tokenizer.encode_padded(prompt, 0) != expected.sd2_ids[i] {
            mismatches.push(format!("SD2 {prompt:?}"));
        }
    }
    assert!(
        mismatches.is_empty(),
        "{} prompts tokenize differently: {mismatches:#?}",
        mismatches.len()
    );
}

#[test]
fn unpadded_ids_match_reference() {
    let expected = expected();
    let tokenizer = ClipTokenizer::shared().unwrap();
    for (i, prompt) in expected.prompts.iter().enumerate() {
        for (pad, ids) in [
            (END_OF_TEXT, &expected.unpadded_ids[i]),
            (0, &expected.sd2_unpadded_ids[i]),
        ] {
            let mut ours = vec![START_OF_TEXT];
            ours.extend(tokenizer.encode_with_pad(prompt, pad));
            ours.push(END_OF_TEXT);
            assert_eq!(&ours, ids, "prompt {prompt:?} with pad {pad}");
        }
    }
}

#[test]
fn known_ids() {
    let tokenizer = ClipTokenizer::shared().unwrap();
    assert_eq!(
        tokenizer.encode("a photo of a cat"),
        vec![320, 1125, 539, 320, 2368]
    );
    assert_eq!(tokenizer.count(""), 0);
}
