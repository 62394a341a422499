//! The desktop app's text mode driven like a user would, headless with egui_kittest, on the tiny Qwen2
//! fixture: drop a JSONL file of conversations, read and edit a turn (saved to disk in the row's own
//! format), see the problems the checks find; train, pause, chat with the adapters as they are (a reply
//! streams in), move the strength slider (the reply is asked for again), compare with the base model,
//! resume, and export the PEFT folder, the GGUF adapter and an Ollama Modelfile.
#![cfg(feature = "gui")]

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::DroppedPath;
use egui::accesskit::Role;
use egui_kittest::Harness;
use egui_kittest::kittest::Queryable;
use lora_studio::app::{AppSettings, Mode, StudioApp, Tab};
use lora_studio::config::{LogWith, TrainConfig};
use lora_studio::worker::WorkerHandle;

fn qwen2() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/causal_lm/qwen2")
}

/// The app with `settings` and real workers that look for models nowhere. The fixture's random weights reply
/// with any bytes, some of them no font draws: they show as boxes, as in the window.
fn open_app(settings: AppSettings) -> Harness<'static, StudioApp> {
    open_app_with_hub(settings, None)
}

/// [`open_app`], finding the models of the Hugging Face cache `hub_cache`.
fn open_app_with_hub(
    settings: AppSettings,
    hub_cache: Option<PathBuf>,
) -> Harness<'static, StudioApp> {
    let places = common::offline_places(hub_cache);
    let (worker, events) = WorkerHandle::spawn_with(Arc::new(|| {}), places).unwrap();
    Harness::builder()
        .with_size([1280.0, 900.0])
        .allow_missing_glyphs()
        .build_ui_state(
            |ui, app: &mut StudioApp| app.main_ui(ui),
            StudioApp::new(settings, worker, events),
        )
}

/// Steps the app until `done` holds, failing after two minutes.
fn step_until(harness: &mut Harness<'_, StudioApp>, what: &str, done: impl Fn(&StudioApp) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !done(harness.state()) {
        assert!(
            Instant::now() < deadline,
            "gave up waiting for {what}; notices: {:?}",
            harness.state().notices()
        );
        std::thread::sleep(Duration::from_millis(20));
        harness.step();
    }
}

/// A conversation row in OpenAI's format.
fn openai_row(user: &str, assistant: &str) -> String {
    serde_json::json!({"messages": [
        {"role": "user", "content": user},
        {"role": "assistant", "content": assistant},
    ]})
    .to_string()
}

/// A JSONL file of `count` support-desk conversations, a ShareGPT one, one with an empty reply and a
/// line that is not JSON.
fn write_dataset(path: &Path, count: usize) -> PathBuf {
    let mut lines: Vec<String> = (0..count)
        .map(|i| {
            openai_row(
                &format!("My order {i} has not arrived."),
                &format!("Sorry about order {i}! It ships today."),
            )
        })
        .collect();
    lines.push(
        serde_json::json!({"conversations": [
            {"from": "human", "value": "Can I change my address?"},
            {"from": "gpt", "value": "Yes, in your account settings."},
        ]})
        .to_string(),
    );
    lines.push(openai_row("Hello?", ""));
    lines.push("this line is not JSON".to_string());
    std::fs::write(path, lines.join("\n") + "\n").unwrap();
    path.to_path_buf()
}

fn text_settings(data: PathBuf, out: PathBuf) -> AppSettings {
    AppSettings {
        train: TrainConfig {
            train_data_dir: data,
            base_model: qwen2(),
            output_dir: out,
            output_name: "voice".into(),
            lora_rank: 4,
            lora_alpha: 4.0,
            learning_rate: 1e-2,
            batch_size: 2,
            max_seq_length: 256,
            max_train_steps: Some(40),
            save_steps: 10,
            log_with: LogWith::None,
            device: "cpu".into(),
            ..Default::default()
        },
        chat: lora_studio::messages::ChatSettings {
            temperature: 0.0,
            max_new_tokens: 12,
            ..Default::default()
        },
        mode: Mode::Text,
        ..Default::default()
    }
}

#[test]
fn a_dropped_conversation_file_is_read_checked_and_edited_in_its_own_format() {
    let dir = tempfile::tempdir().unwrap();
    let data = write_dataset(&dir.path().join("chats.jsonl"), 3);
    let settings = AppSettings {
        train: TrainConfig {
            train_data_dir: PathBuf::new(),
            base_model: qwen2(),
            max_seq_length: 24,
            ..Default::default()
        },
        ..Default::default()
    };
    let mut harness = open_app(settings);
    assert!(!harness.state().text_mode());
    harness
        .input_mut()
        .dropped_files
        .push(Arc::new(DroppedPath(data.clone())));
    step_until(&mut harness, "the conversations", |app| {
        app.conversations_len() == 5
    });
    assert!(harness.state().text_mode(), "a JSONL file switches to text");
    harness.run_steps(2);
    // The unreadable line is listed with its line number; the empty reply is flagged.
    harness.get_by_label_contains("1 row could not be read");
    let deadline = Instant::now() + Duration::from_secs(60);
    while harness.query_by_label("empty reply").is_none() {
        assert!(Instant::now() < deadline, "no empty-reply badge");
        harness.step();
        std::thread::sleep(Duration::from_millis(20));
    }

    // Select the first sample and edit its reply.
    harness
        .get_by_label_contains("#1  My order 0 has not arrived.")
        .click();
    harness.run_steps(3);
    let reply = harness.get_by_role_and_label(Role::MultilineTextInput, "Turn 2");
    assert_eq!(
        reply.value().as_deref(),
        Some("Sorry about order 0! It ships today.")
    );
    reply.focus();
    harness.run_steps(2);
    harness
        .get_by_role_and_label(Role::MultilineTextInput, "Turn 2")
        .type_text(" Tracking: 42.");
    harness.run_steps(2);
    harness.key_press(egui::Key::Escape);
    harness.run_steps(2);
    step_until(&mut harness, "the edit to be saved", |app| {
        app.unsaved_conversation_edits() == 0
    });
    let saved = std::fs::read_to_string(&data).unwrap();
    let lines: Vec<&str> = saved.lines().collect();
    let first: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
    assert_eq!(
        first["messages"][1]["content"],
        "Sorry about order 0! It ships today. Tracking: 42."
    );
    assert_eq!(
        lines[3],
        write_dataset_line_sharegpt(),
        "other rows untouched"
    );
    assert_eq!(lines[5], "this line is not JSON");

    // The base model row names the folder's family.
    harness.state_mut().settings_mut().tab = Tab::Train;
    harness.run_steps(2);
    let deadline = Instant::now() + Duration::from_secs(60);
    let shown = |harness: &Harness<'_, StudioApp>| {
        harness
            .get_by_role_and_label(Role::ComboBox, "Base model")
            .value()
    };
    while shown(&harness).as_deref() != Some("qwen2 (chat model)") {
        assert!(
            Instant::now() < deadline,
            "the base model shows {:?}",
            shown(&harness)
        );
        harness.step();
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn picking_a_chat_model_switches_the_views_to_text_and_offers_the_chat_presets() {
    let dir = tempfile::tempdir().unwrap();
    // A Hugging Face cache holding the fixture as `tiny-chat`.
    let repo = dir.path().join("hub/models--acme--tiny-chat");
    let snapshot = repo.join("snapshots/0123abcd");
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "0123abcd").unwrap();
    for file in std::fs::read_dir(qwen2()).unwrap().flatten() {
        if file.path().is_file() {
            std::fs::copy(file.path(), snapshot.join(file.file_name())).unwrap();
        }
    }
    let data = write_dataset(&dir.path().join("chats.jsonl"), 3);
    let settings = AppSettings {
        train: TrainConfig {
            train_data_dir: data,
            base_model: PathBuf::new(),
            ..Default::default()
        },
        preset: "16 GB GPU".to_string(),
        tab: Tab::Train,
        ..Default::default()
    };
    let mut harness = open_app_with_hub(settings, Some(dir.path().join("hub")));
    step_until(&mut harness, "the search for models", |app| {
        app.models_found() == Some(1)
    });
    harness.run_steps(2);
    assert!(!harness.state().text_mode());
    harness
        .get_by_role_and_label(Role::ComboBox, "Base model")
        .click();
    harness.run_steps(2);
    harness
        .get_by_label_contains("tiny-chat  —  chat model")
        .click();
    step_until(&mut harness, "text mode", |app| app.text_mode());
    // The same GPU's chat preset, the dataset read as conversations, the text settings and estimate.
    assert_eq!(harness.state().settings().preset, "Chat, 16 GB GPU");
    assert!(harness.state().settings().train.packing);
    step_until(&mut harness, "the conversations", |app| {
        app.conversations_len() == 5
    });
    harness.run_steps(2);
    harness.get_by_role_and_label(Role::Slider, "Max sequence length");
    harness.get_by_label_contains("chat model on this");
    assert!(harness.query_by_label("Resolution").is_none());
}

fn write_dataset_line_sharegpt() -> String {
    serde_json::json!({"conversations": [
        {"from": "human", "value": "Can I change my address?"},
        {"from": "gpt", "value": "Yes, in your account settings."},
    ]})
    .to_string()
}

#[test]
fn a_chat_model_trains_chats_with_a_strength_slider_and_exports_for_llama_cpp_and_ollama() {
    let dir = tempfile::tempdir().unwrap();
    let data = write_dataset(&dir.path().join("chats.jsonl"), 8);
    let out = dir.path().join("out");
    let mut harness = open_app(text_settings(data, out.clone()));
    step_until(&mut harness, "the conversations", |app| {
        app.conversations_len() == 10
    });

    // Train, and pause after a few steps.
    harness.state_mut().settings_mut().tab = Tab::Train;
    harness.run_steps(2);
    harness.get_by_label("Start training").click();
    step_until(&mut harness, "loss points", |app| app.losses().len() >= 3);
    harness.get_by_label("Pause").click();
    step_until(&mut harness, "the pause", |app| {
        format!("{:?}", app.run_status()) == "Paused"
    });

    // Chat with the adapters as they are: the reply streams in.
    harness.state_mut().settings_mut().tab = Tab::Preview;
    harness.run_steps(2);
    harness
        .get_by_role_and_label(Role::MultilineTextInput, "Message")
        .focus();
    harness.run_steps(1);
    harness
        .get_by_role_and_label(Role::MultilineTextInput, "Message")
        .type_text("Where is my order?");
    harness.run_steps(1);
    harness.get_by_label("Send").click();
    step_until(&mut harness, "the reply", |app| app.chat_turns().len() == 2);
    assert_eq!(
        harness.state().chat_turns()[0].content,
        "Where is my order?"
    );
    assert!(
        harness.state().chat_pieces_streamed() > 1,
        "the reply arrived in one piece"
    );

    // Move the strength slider: the last reply is asked for again.
    let asked = harness.state().chat_requested_id();
    harness
        .get_by_role_and_label(Role::Slider, "LoRA strength")
        .set_value_accesskit(0.5);
    step_until(&mut harness, "a new request", |app| {
        app.chat_requested_id() > asked
    });
    step_until(&mut harness, "the new reply", |app| {
        app.chat_turns().len() == 2 && app.chat_streaming().is_none()
    });
    assert_eq!(harness.state().settings().chat.strength, 0.5);

    // Compare with the base model: both replies, side by side.
    harness.get_by_label("Compare with the base model").click();
    step_until(&mut harness, "the comparison", |app| {
        app.chat_comparison().is_some()
    });

    // Resume to the end of the run.
    harness.state_mut().settings_mut().tab = Tab::Train;
    harness.run_steps(2);
    harness.get_by_label("Resume").click();
    step_until(&mut harness, "the end of the run", |app| {
        format!("{:?}", app.run_status()) == "Idle" && !app.checkpoints().is_empty()
    });

    // Export the adapter for transformers, llama.cpp and Ollama.
    harness.state_mut().settings_mut().tab = Tab::Export;
    harness.run_steps(2);
    harness.get_by_label_contains("Copy to Ollama").click();
    harness.run_steps(1);
    harness.get_by_label("Export adapter").click();
    step_until(&mut harness, "the export", |app| !app.exported().is_empty());
    assert!(out.join("voice/adapter_config.json").is_file());
    assert!(out.join("voice.gguf").is_file());
    let modelfile = std::fs::read_to_string(out.join("Modelfile")).unwrap();
    assert!(
        modelfile.contains("FROM ") && modelfile.contains("ADAPTER "),
        "{modelfile}"
    );
    assert!(modelfile.contains("voice.gguf"), "{modelfile}");
    harness.run_steps(2);
    harness.get_by_label_contains("ollama create voice -f");
}
