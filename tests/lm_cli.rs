//! The language-model commands as a user runs them on the tiny models: `chat` (the reply is the library's
//! greedy generation, adapters change it, a conversation carries its turns, bad input is one sentence),
//! `merge` into a model folder, and `inspect` of model folders and adapters.

mod common;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use candle_core::{DType, Device};
use common::causal_lm::{folder, load, peft_lora};
use lora_studio::chat::{ChatFiles, ChatMessage, RenderOptions};
use lora_studio::lora::PeftAdapter;
use lora_studio::models::causal_lm::{GenerationSettings, Sampling, generate};

/// Runs `lora-studio chat` with `args` and `stdin`: (success, stdout, stderr).
fn chat(args: &[&str], stdin: &str) -> (bool, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_lora-studio"))
        .arg("chat")
        .args(args)
        .args(["--device", "cpu"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The library's greedy replies (32 tokens at most) to each user turn of a conversation, the model's own
/// replies carried into the next turn, with the adapter (at strength 1) if one is given.
fn library_replies(
    family: &str,
    adapter: Option<&Path>,
    system: &str,
    turns: &[&str],
) -> Vec<String> {
    let model = load(family, DType::F32);
    if let Some(adapter) = adapter {
        let adapter = PeftAdapter::load(adapter, &Device::Cpu).unwrap();
        adapter.attach(model.layers(), 1.0, DType::F32).unwrap();
    }
    let files = ChatFiles::open(&folder(family)).unwrap();
    let settings = GenerationSettings {
        max_new_tokens: 32,
        stop_ids: files.generation().stop_ids.clone(),
        sampling: Sampling::GREEDY,
        seed: 0,
    };
    let options = RenderOptions {
        add_generation_prompt: true,
        ..Default::default()
    };
    let mut messages = vec![ChatMessage::new("system", system)];
    let mut replies = Vec::new();
    for turn in turns {
        messages.push(ChatMessage::new("user", *turn));
        let prompt = files.encode_chat(&messages, &options).unwrap();
        let mut tokens = generate(&model, &[prompt], &settings, |_, _| {})
            .unwrap()
            .remove(0);
        tokens.retain(|t| !settings.stop_ids.contains(t));
        let reply = files.tokenizer().decode(&tokens, true).unwrap();
        messages.push(ChatMessage::new("assistant", reply.as_str()));
        replies.push(reply);
    }
    replies
}

const SYSTEM: &str = "You are a terse assistant.";

#[test]
fn a_prompt_prints_the_greedy_reply_only_and_an_adapter_changes_it() {
    let base = folder("qwen2");
    let args = |extra: &[&str]| -> (bool, String, String) {
        let mut all = vec![
            "--base",
            path(&base),
            "--system",
            SYSTEM,
            "--prompt",
            "Hello, who are you?",
            "--max-new-tokens",
            "32",
            "--temperature",
            "0",
        ];
        all.extend_from_slice(extra);
        chat(&all, "")
    };
    let (ok, stdout, stderr) = args(&[]);
    assert!(ok, "{stderr}");
    let expected = library_replies("qwen2", None, SYSTEM, &["Hello, who are you?"]);
    assert!(!expected[0].is_empty(), "{expected:?}");
    assert_eq!(stdout, format!("{}\n", expected[0]));
    assert!(stderr.contains("new tokens in"), "{stderr}");

    let adapter = peft_lora("qwen2");
    let (ok, with_adapter, stderr) = args(&["--lora", path(&adapter)]);
    assert!(ok, "{stderr}");
    let expected = library_replies("qwen2", Some(&adapter), SYSTEM, &["Hello, who are you?"]);
    assert_eq!(with_adapter, format!("{}\n", expected[0]));
    assert_ne!(with_adapter, stdout);

    let at_zero = format!("{}:0", path(&adapter));
    let (ok, unchanged, stderr) = args(&["--lora", &at_zero]);
    assert!(ok, "{stderr}");
    assert_eq!(
        unchanged, stdout,
        "strength 0 leaves the base model's reply"
    );
}

#[test]
fn a_conversation_carries_its_turns() {
    let turns = ["Hi!", "Tell me more."];
    let (ok, stdout, stderr) = chat(
        &[
            "--base",
            path(&folder("llama")),
            "--system",
            SYSTEM,
            "--max-new-tokens",
            "32",
            "--temperature",
            "0",
        ],
        &format!("{}\n{}\n", turns[0], turns[1]),
    );
    assert!(ok, "{stderr}");
    let expected = library_replies("llama", None, SYSTEM, &turns);
    assert!(expected.iter().all(|r| !r.is_empty()), "{expected:?}");
    assert_eq!(stdout, format!("{}\n{}\n", expected[0], expected[1]));
    assert_eq!(stderr.matches("new tokens in").count(), 2, "{stderr}");
}

#[test]
fn an_adapter_for_another_base_is_one_sentence_naming_the_shapes() {
    let (ok, stdout, stderr) = chat(
        &[
            "--base",
            path(&folder("llama")),
            "--lora",
            path(&peft_lora("qwen2")),
            "--prompt",
            "Hi",
        ],
        "",
    );
    assert!(!ok);
    assert!(stdout.is_empty(), "{stdout}");
    let error = stderr.trim_end();
    assert_eq!(error.lines().count(), 1, "{stderr}");
    assert!(error.starts_with("error: "), "{stderr}");
    assert!(error.contains("another base model"), "{stderr}");
    assert!(error.contains("shape [4, 96]"), "{stderr}");
}

#[test]
fn a_folder_without_tokenizer_files_is_one_sentence() {
    let copy = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(folder("qwen2")).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name();
        if entry.path().is_file() && !name.to_string_lossy().starts_with("tokenizer") {
            std::fs::copy(entry.path(), copy.path().join(&name)).unwrap();
        }
    }
    let (ok, _, stderr) = chat(&["--base", path(copy.path()), "--prompt", "Hi"], "");
    assert!(!ok);
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("has no tokenizer.json"), "{stderr}");
}

#[test]
fn a_missing_adapter_folder_is_one_sentence() {
    let (ok, _, stderr) = chat(
        &[
            "--base",
            path(&folder("qwen2")),
            "--lora",
            "no/such/adapter:0.5",
            "--prompt",
            "Hi",
        ],
        "",
    );
    assert!(!ok);
    assert_eq!(
        stderr.trim_end(),
        "error: the adapter folder no/such/adapter does not exist"
    );
}

#[test]
fn a_merged_folder_replies_as_the_base_with_its_adapter() {
    let out = tempfile::tempdir().unwrap();
    let merged = out.path().join("merged");
    let adapter = format!("{}:0.8", path(&peft_lora("llama")));
    let output = Command::new(env!("CARGO_BIN_EXE_lora-studio"))
        .args([
            "merge",
            "--base",
            path(&folder("llama")),
            "--lora",
            &adapter,
        ])
        .args(["--precision", "fp32", "--out", path(&merged)])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(stderr.contains("14 layers changed"), "{stderr}");
    let ask = |base: &Path, extra: &[&str]| {
        let mut args = vec!["--base", path(base), "--prompt", "Hi", "--temperature", "0"];
        args.extend_from_slice(extra);
        let (ok, stdout, stderr) = chat(&args, "");
        assert!(ok, "{stderr}");
        stdout
    };
    let with_adapter = ask(&folder("llama"), &["--lora", &adapter]);
    assert_eq!(ask(&merged, &[]), with_adapter);
    assert_ne!(ask(&folder("llama"), &[]), with_adapter);
}

#[test]
fn inspect_describes_language_models_and_their_adapters() {
    let run = |target: &Path| {
        let output = Command::new(env!("CARGO_BIN_EXE_lora-studio"))
            .args(["inspect", path(target)])
            .output()
            .unwrap();
        assert!(output.status.success());
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    let model = run(&folder("qwen3"));
    assert!(model.contains("Qwen3 language model"), "{model}");
    assert!(model.contains("2 layers, hidden 64"), "{model}");
    let adapter = run(&peft_lora("qwen3"));
    assert!(
        adapter.contains("PEFT adapter folder for ") && adapter.contains("modules: 14"),
        "{adapter}"
    );
    assert!(adapter.contains("rank: 4"), "{adapter}");
}
