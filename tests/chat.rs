//! The chat room against transformers (tests/fixtures/causal_lm/generate.py): every family's own chat
//! template rendered byte-identical to `apply_chat_template` (single and multi-turn, with and without a
//! system prompt, a thinking turn, tools with tool calls; with and without the generation prompt) with the
//! same token ids, tokenization and decoding identical to the fast tokenizer's, the stop ids of each
//! folder, and one-sentence errors for folders without tokenizer files or a template.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;

use common::fixture;
use lora_studio::chat::{ChatError, ChatFiles, ChatMessage, RenderOptions, TemplateValue};
use serde::Deserialize;

const FAMILIES: [&str; 3] = ["qwen2", "qwen3", "llama"];

fn folder(family: &str) -> PathBuf {
    fixture(&format!("causal_lm/{family}"))
}

/// What `reference.json` holds for the chat room (read from the text, so objects keep their key order).
#[derive(Debug, Deserialize)]
struct Reference {
    chat: BTreeMap<String, ChatCase>,
    tokenization: Vec<TokenizationCase>,
    generation: GenerationCase,
}

#[derive(Debug, Deserialize)]
struct ChatCase {
    messages: Vec<ChatMessage>,
    tools: Option<Vec<TemplateValue>>,
    kwargs: BTreeMap<String, TemplateValue>,
    add_generation_prompt: bool,
    text: String,
    ids: Vec<u32>,
}

#[derive(Debug, Deserialize)]
struct TokenizationCase {
    text: String,
    ids: Vec<u32>,
    ids_with_special_tokens: Vec<u32>,
    decoded: String,
    decoded_without_special: String,
}

#[derive(Debug, Deserialize)]
struct GenerationCase {
    stop_ids: Vec<u32>,
}

fn reference(family: &str) -> Reference {
    let text = std::fs::read_to_string(folder(family).join("reference.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn open(family: &str) -> ChatFiles {
    ChatFiles::open(&folder(family)).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn chat_templates_render_byte_identical_to_transformers() {
    let mut compared = 0;
    for family in FAMILIES {
        let files = open(family);
        for (name, case) in reference(family).chat {
            let options = RenderOptions {
                add_generation_prompt: case.add_generation_prompt,
                tools: case.tools.clone(),
                extra: case.kwargs.clone(),
            };
            let text = files
                .render(&case.messages, &options)
                .unwrap_or_else(|e| panic!("{family} {name}: {e}"));
            assert_eq!(text, case.text, "{family} {name}");
            let ids = files.encode_chat(&case.messages, &options).unwrap();
            assert_eq!(ids, case.ids, "{family} {name}");
            compared += 1;
        }
    }
    assert_eq!(compared, 3 * 5 * 2);
}

#[test]
fn the_generation_prompt_is_what_follows_the_conversation() {
    // What a chat appends before the model speaks: the rendering with the prompt extends the one without.
    for family in FAMILIES {
        let chats = reference(family).chat;
        let (plain, prompted) = (
            &chats["single_system.plain"],
            &chats["single_system.generation"],
        );
        assert!(
            prompted.text.starts_with(&plain.text) && prompted.text.len() > plain.text.len(),
            "{family}"
        );
    }
}

#[test]
fn tokenization_and_decoding_match_the_fast_tokenizer() {
    for family in FAMILIES {
        let files = open(family);
        let tokenizer = files.tokenizer();
        for case in reference(family).tokenization {
            let what = format!("{family} {:?}", case.text);
            assert_eq!(
                tokenizer.encode(&case.text, false).unwrap(),
                case.ids,
                "{what}"
            );
            assert_eq!(
                tokenizer.encode(&case.text, true).unwrap(),
                case.ids_with_special_tokens,
                "{what}"
            );
            assert_eq!(
                tokenizer
                    .decode(&case.ids_with_special_tokens, false)
                    .unwrap(),
                case.decoded,
                "{what}"
            );
            assert_eq!(
                tokenizer
                    .decode(&case.ids_with_special_tokens, true)
                    .unwrap(),
                case.decoded_without_special,
                "{what}"
            );
            let spans = tokenizer.encode_spans(&case.text).unwrap();
            let ids: Vec<u32> = spans.iter().map(|s| s.id).collect();
            assert_eq!(ids, case.ids, "{what}");
            if case.text.is_ascii() {
                let pieces: String = spans.iter().map(|s| &case.text[s.bytes.clone()]).collect();
                assert_eq!(pieces, case.text, "{what}: the spans cover the text");
            }
        }
    }
}

#[test]
fn stop_ids_come_from_the_generation_config_and_the_eos_token() {
    for family in FAMILIES {
        let files = open(family);
        let expected = reference(family).generation.stop_ids;
        let stops = &files.generation().stop_ids;
        assert_eq!(stops[..expected.len()], expected, "{family}");
        let eos = files.special_tokens().get("eos_token").unwrap();
        assert!(
            stops.contains(&files.tokenizer().token_id(eos).unwrap()),
            "{family}"
        );
    }
    let qwen2 = open("qwen2");
    let generation = qwen2.generation();
    assert_eq!(generation.stop_ids, [302, 300]);
    assert!(generation.do_sample);
    assert_eq!(
        (generation.temperature, generation.top_p),
        (Some(0.7), Some(0.8))
    );
}

/// A copy of a fixture folder's files except `leave_out`.
fn copy_without(family: &str, leave_out: &[&str]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(folder(family)).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if path.is_file() && !leave_out.contains(&name.as_str()) {
            std::fs::copy(&path, dir.path().join(&name)).unwrap();
        }
    }
    dir
}

#[test]
fn folders_without_tokenizer_files_or_a_template_are_one_sentence() {
    for file in ["tokenizer.json", "tokenizer_config.json"] {
        let dir = copy_without("qwen2", &[file]);
        let message = ChatFiles::open(dir.path()).unwrap_err().to_string();
        assert_eq!(
            message,
            format!(
                "{} has no {file}, which a language model folder needs (tokenizer.json and tokenizer_config.json)",
                dir.path().display()
            )
        );
    }
    // Qwen3 keeps its template in chat_template.jinja; without it the folder has none.
    let dir = copy_without("qwen3", &["chat_template.jinja"]);
    let files = ChatFiles::open(dir.path()).unwrap();
    let error = files
        .render(&[ChatMessage::new("user", "hi")], &RenderOptions::default())
        .unwrap_err();
    assert!(matches!(error, ChatError::NoTemplate { .. }));
    assert!(
        error.to_string().contains("has no chat template"),
        "{error}"
    );
    // A tokenizer.json that is not one.
    let dir = copy_without("qwen2", &[]);
    std::fs::write(dir.path().join("tokenizer.json"), "{\"model\": 3}").unwrap();
    let message = ChatFiles::open(dir.path()).unwrap_err().to_string();
    assert!(
        message.starts_with(&format!(
            "{}: it is not a tokenizer",
            dir.path().join("tokenizer.json").display()
        )),
        "{message}"
    );
}

#[test]
fn named_templates_give_tool_use_when_tools_are_given() {
    // The legacy list form of tokenizer_config.json's chat_template: `tool_use` serves renderings with tools.
    let dir = copy_without("qwen2", &[]);
    let path = dir.path().join("tokenizer_config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    config["chat_template"] = serde_json::json!([
        {"name": "default", "template": "plain:{{ messages[0].content }}"},
        {"name": "tool_use", "template": "tools:{{ tools | length }}"}
    ]);
    std::fs::write(&path, config.to_string()).unwrap();
    let files = ChatFiles::open(dir.path()).unwrap();
    let messages = [ChatMessage::new("user", "hi")];
    let plain = files.render(&messages, &RenderOptions::default()).unwrap();
    let with_tools = RenderOptions {
        tools: Some(vec![TemplateValue::from("a tool")]),
        ..RenderOptions::default()
    };
    assert_eq!(plain, "plain:hi");
    assert_eq!(files.render(&messages, &with_tools).unwrap(), "tools:1");
}
