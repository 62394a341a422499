//! A language model in the app's engine thread, without the UI: a run on the tiny Qwen2 fixture with pause,
//! resume and stop; chats while it is paused (streamed pieces that add up to the reply, strengths, the
//! compare lanes); chats from its PEFT folder and checkpoint that answer as `lora-studio chat` does; the
//! model left clean after the run; exports (PEFT, GGUF, merged, Ollama's Modelfile); and a newer chat
//! abandoning the one being answered.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use common::causal_lm::{chat_lines, folder};
use common::wait_for;
use crossbeam_channel::Receiver;
use lora_studio::config::{SavePrecision, TrainConfig};
use lora_studio::messages::{
    ChatLane, ChatRequest, ChatSettings, ChatTurn, Event, Job, LanguageExportRequest,
    LanguageExports, PreviewSource, RunEnd,
};
use lora_studio::worker::{ModelPlaces, WorkerHandle};

const SYSTEM: &str = "You are a terse assistant.";
const QUESTION: &str = "Hello, who are you?";
const MAX_NEW_TOKENS: usize = 24;

/// A worker that finds no models on this computer and downloads nothing.
fn spawn_worker(dir: &Path) -> (WorkerHandle, Receiver<Event>) {
    let empty = dir.join("computer");
    std::fs::create_dir_all(&empty).unwrap();
    let places = ModelPlaces {
        discovery: lora_studio::discovery::DiscoveryOptions {
            home: Some(empty.clone()),
            hub_cache: Some(empty.clone()),
            extra_roots: Vec::new(),
            cache_file: None,
            time_limit: Duration::from_secs(5),
        },
        hub: lora_studio::hub::HubSettings {
            endpoint: "http://127.0.0.1:9".into(),
            cache_dir: empty,
            offline: true,
        },
    };
    WorkerHandle::spawn_with(Arc::new(|| {}), places).unwrap()
}

fn chat_dataset(dir: &Path) -> PathBuf {
    let rows = [
        ("What colour is the sky?", "Blue, on a clear day."),
        ("Name a fruit.", "An apple."),
        ("How many legs has a cat?", "Four legs."),
        (QUESTION, "I am a tiny model that learned to answer."),
    ];
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("chats.jsonl"), chat_lines(&rows)).unwrap();
    data
}

fn chat_request(id: u64, source: PreviewSource, strength: f64, compare: bool) -> ChatRequest {
    ChatRequest {
        id,
        base_model: folder("qwen2"),
        device: "cpu".into(),
        source,
        messages: vec![ChatTurn::new("user", QUESTION)],
        settings: ChatSettings {
            system_prompt: SYSTEM.into(),
            strength,
            seed: 7,
            temperature: 0.0,
            max_new_tokens: MAX_NEW_TOKENS,
        },
        compare,
    }
}

/// One lane's reply: the streamed pieces joined, and the reply's text.
#[derive(Debug, Default, Clone, PartialEq)]
struct Lane {
    streamed: String,
    text: String,
    tokens: usize,
}

/// Sends `request` and collects its lanes in the order their replies end.
fn ask(
    worker: &WorkerHandle,
    events: &Receiver<Event>,
    request: ChatRequest,
) -> Vec<(ChatLane, Lane)> {
    let id = request.id;
    let lanes = if request.compare { 2 } else { 1 };
    worker.send(Job::Chat(request));
    let mut streamed = Lane::default();
    let mut done = Vec::new();
    while done.len() < lanes {
        wait_for(events, "a chat reply", |event| match event {
            Event::ChatToken {
                id: got,
                lane,
                text,
            } if *got == id => {
                assert!(!text.is_empty(), "an empty piece was sent");
                assert!(
                    done.len() == usize::from(*lane == ChatLane::Adapter && lanes == 2),
                    "{lane:?} streams after the lanes before it ended"
                );
                streamed.streamed.push_str(text);
                Some(())
            }
            Event::ChatReply {
                id: got,
                lane,
                text,
                tokens,
                seconds,
            } if *got == id => {
                assert!(*seconds >= 0.0);
                let lane_reply = Lane {
                    streamed: std::mem::take(&mut streamed.streamed),
                    text: text.clone(),
                    tokens: *tokens,
                };
                done.push((*lane, lane_reply));
                Some(())
            }
            _ => None,
        });
    }
    done
}

/// The adapter lane's text of a plain (not compare) request, checking the stream added up to it.
fn reply_text(worker: &WorkerHandle, events: &Receiver<Event>, request: ChatRequest) -> String {
    let lanes = ask(worker, events, request);
    assert_eq!(lanes.len(), 1);
    let (lane, reply) = &lanes[0];
    assert_eq!(*lane, ChatLane::Adapter);
    assert_eq!(reply.streamed, reply.text, "the pieces add up to the reply");
    assert!(reply.tokens > 0);
    reply.text.clone()
}

/// `lora-studio chat --prompt` (greedy) with the same system prompt and budget: its stdout without the
/// final newline.
fn cli_reply(adapter: Option<&Path>) -> String {
    let base = folder("qwen2");
    let max = MAX_NEW_TOKENS.to_string();
    let mut command = Command::new(env!("CARGO_BIN_EXE_lora-studio"));
    command.args(["chat", "--base", base.to_str().unwrap(), "--system", SYSTEM]);
    command.args(["--prompt", QUESTION, "--max-new-tokens", &max]);
    command.args(["--temperature", "0", "--device", "cpu"]);
    if let Some(adapter) = adapter {
        command.args(["--lora", adapter.to_str().unwrap()]);
    }
    let output = command.output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let stdout = String::from_utf8(output.stdout).unwrap();
    stdout.strip_suffix('\n').unwrap().to_string()
}

#[test]
fn a_language_model_trains_chats_and_exports_through_the_engine() {
    let dir = tempfile::tempdir().unwrap();
    let data = chat_dataset(dir.path());
    let out = dir.path().join("out");
    let (worker, events) = spawn_worker(dir.path());
    let config = TrainConfig {
        base_model: folder("qwen2"),
        train_data_dir: data,
        output_dir: out.clone(),
        output_name: "voice".into(),
        lora_rank: 4,
        lora_alpha: 8.0,
        learning_rate: 1e-2,
        batch_size: 2,
        max_train_steps: Some(1000),
        save_steps: 4,
        save_precision: SavePrecision::Fp32,
        log_with: lora_studio::config::LogWith::None,
        device: "cpu".into(),
        seed: 3,
        ..TrainConfig::default()
    };
    worker.send(Job::Train {
        config: Box::new(config),
        resume: None,
    });
    let total = wait_for(&events, "the run's start", |e| match e {
        Event::RunStarted { total_steps, .. } => Some(*total_steps),
        _ => None,
    });
    assert_eq!(total, 1000);
    wait_for(&events, "step 6", |e| match e {
        Event::Loss(point) => (point.step >= 6).then_some(()),
        _ => None,
    });
    worker.send(Job::Pause);
    wait_for(&events, "the pause", |e| {
        matches!(e, Event::Paused).then_some(())
    });

    // While paused: the run's adapters as they are, at strength 1 and 0, alone and compared.
    let live_one = reply_text(
        &worker,
        &events,
        chat_request(1, PreviewSource::Live, 1.0, false),
    );
    let live_zero = reply_text(
        &worker,
        &events,
        chat_request(2, PreviewSource::Live, 0.0, false),
    );
    assert_ne!(
        live_one, live_zero,
        "the trained adapters change the greedy reply"
    );
    let compared = ask(
        &worker,
        &events,
        chat_request(3, PreviewSource::Live, 1.0, true),
    );
    let lanes: Vec<ChatLane> = compared.iter().map(|(lane, _)| *lane).collect();
    assert_eq!(lanes, [ChatLane::Base, ChatLane::Adapter]);
    for (_, reply) in &compared {
        assert_eq!(reply.streamed, reply.text);
    }
    assert_eq!(compared[0].1.text, live_zero, "the Base lane is strength 0");
    assert_eq!(compared[1].1.text, live_one);

    worker.send(Job::Resume);
    wait_for(&events, "the resume", |e| {
        matches!(e, Event::Resumed).then_some(())
    });
    let resumed_at = wait_for(&events, "a step after the resume", |e| match e {
        Event::Loss(point) => Some(point.step),
        _ => None,
    });
    assert!(resumed_at > 6);
    worker.send(Job::Stop);
    let mut checkpoints = Vec::new();
    let (end, lora, checkpoint, steps) = wait_for(&events, "the run's end", |e| match e {
        Event::Checkpoint { path, .. } => {
            checkpoints.push(path.clone());
            None
        }
        Event::RunEnded {
            end,
            lora,
            checkpoint,
            steps,
        } => Some((*end, lora.clone(), checkpoint.clone(), *steps)),
        _ => None,
    });
    assert_eq!(end, RunEnd::Stopped);
    assert!(steps > 6 && steps < 1000, "{steps}");
    let peft = lora.unwrap();
    assert_eq!(peft, out.join("voice"));
    assert!(peft.join("adapter_config.json").is_file());
    let checkpoint = checkpoint.unwrap();
    assert_eq!(checkpoint, out.join(format!("checkpoint-{steps}")));
    assert_eq!(checkpoints.last(), Some(&checkpoint));

    // After the run: Live is the base model alone (the run left no adapters behind), and the run's PEFT
    // folder and last checkpoint answer as `lora-studio chat --lora` does.
    let base_reply = cli_reply(None);
    let trained_reply = cli_reply(Some(&peft));
    assert_ne!(base_reply, trained_reply);
    assert_eq!(
        reply_text(
            &worker,
            &events,
            chat_request(4, PreviewSource::Live, 1.0, false)
        ),
        base_reply
    );
    let from_peft = PreviewSource::Checkpoint(peft.clone());
    assert_eq!(
        reply_text(
            &worker,
            &events,
            chat_request(5, from_peft.clone(), 1.0, false)
        ),
        trained_reply
    );
    let from_checkpoint = PreviewSource::Checkpoint(checkpoint.clone());
    assert_eq!(
        reply_text(
            &worker,
            &events,
            chat_request(6, from_checkpoint, 1.0, false)
        ),
        trained_reply
    );
    let compared = ask(&worker, &events, chat_request(7, from_peft, 1.0, true));
    assert_eq!(compared[0].1.text, base_reply);
    assert_eq!(compared[1].1.text, trained_reply);
    // The adapters were detached again.
    assert_eq!(
        reply_text(
            &worker,
            &events,
            chat_request(8, PreviewSource::Live, 1.0, false)
        ),
        base_reply
    );

    // Exports from the checkpoint: the merged model without the PEFT folder (written aside, then
    // removed), the GGUF file Ollama needs, and the Modelfile.
    let exports_dir = dir.path().join("exports");
    let request = LanguageExportRequest {
        base_model: folder("qwen2"),
        device: "cpu".into(),
        checkpoint: checkpoint.clone(),
        output_dir: exports_dir.clone(),
        name: "voice".into(),
        precision: SavePrecision::Fp32,
        peft: false,
        gguf: false,
        merged: true,
        ollama: true,
    };
    let exports = export(&worker, &events, request.clone());
    let gguf = exports_dir.join("voice.gguf");
    let modelfile = exports_dir.join("Modelfile");
    assert_eq!(
        exports,
        LanguageExports {
            peft_folder: None,
            gguf_file: Some(gguf.clone()),
            merged_folder: Some(exports_dir.join("voice-merged")),
            modelfile: Some(modelfile.clone()),
            ollama_command: Some(format!("ollama create voice -f {}", modelfile.display())),
        }
    );
    assert_eq!(&std::fs::read(&gguf).unwrap()[..4], b"GGUF");
    assert!(exports_dir.join("voice-merged/model.safetensors").is_file());
    assert!(exports_dir.join("voice-merged/tokenizer.json").is_file());
    let mut names: Vec<String> = std::fs::read_dir(&exports_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["Modelfile", "voice-merged", "voice.gguf"]);
    let text = std::fs::read_to_string(&modelfile).unwrap();
    assert_eq!(
        text,
        format!(
            "FROM {}\nADAPTER {}\n",
            folder("qwen2").display(),
            gguf.display()
        )
    );

    // The PEFT folder alone: the run's own export, tensor for tensor.
    let exports = export(
        &worker,
        &events,
        LanguageExportRequest {
            name: "again".into(),
            peft: true,
            merged: false,
            ollama: false,
            ..request
        },
    );
    let again = exports_dir.join("again");
    assert_eq!(exports.peft_folder.as_ref(), Some(&again));
    assert_eq!(exports.gguf_file, None);
    assert!(!exports_dir.join("again.gguf").exists());
    assert_eq!(
        std::fs::read(again.join("adapter_model.safetensors")).unwrap(),
        std::fs::read(peft.join("adapter_model.safetensors")).unwrap()
    );
}

fn export(
    worker: &WorkerHandle,
    events: &Receiver<Event>,
    request: LanguageExportRequest,
) -> LanguageExports {
    worker.send(Job::ExportLanguage(request));
    wait_for(events, "the export", |e| match e {
        Event::LanguageExported(exports) => Some(exports.clone()),
        _ => None,
    })
}

#[test]
fn a_newer_chat_abandons_the_reply_being_generated() {
    let dir = tempfile::tempdir().unwrap();
    let (worker, events) = spawn_worker(dir.path());
    // A prompt whose greedy reply has no end within the budget.
    let long = |id| ChatRequest {
        messages: vec![ChatTurn::new("user", "Tell me a long story.")],
        settings: ChatSettings {
            max_new_tokens: 400,
            ..chat_request(id, PreviewSource::Live, 1.0, false).settings
        },
        ..chat_request(id, PreviewSource::Live, 1.0, false)
    };
    // The long reply, answered alone, runs to its budget (so that it is still generating below).
    let whole = ask(&worker, &events, long(1));
    assert_eq!(whole[0].1.tokens, 400);

    worker.send(Job::Chat(long(2)));
    wait_for(&events, "the long reply's first piece", |e| {
        matches!(e, Event::ChatToken { id: 2, .. }).then_some(())
    });
    worker.send(Job::Chat(chat_request(3, PreviewSource::Live, 1.0, false)));
    // The older request stops between two tokens and never ends; the newer one is answered whole.
    let mut replies_of_2 = 0;
    let mut streamed_3 = String::new();
    let text_3 = wait_for(&events, "the newer reply", |e| match e {
        Event::ChatReply { id: 2, .. } => {
            replies_of_2 += 1;
            None
        }
        Event::ChatToken { id: 3, text, .. } => {
            streamed_3.push_str(text);
            None
        }
        Event::ChatReply { id: 3, text, .. } => Some(text.clone()),
        _ => None,
    });
    assert_eq!(streamed_3, text_3);
    assert!(!text_3.is_empty());
    while let Ok(event) = events.recv_timeout(Duration::from_millis(300)) {
        assert!(
            !matches!(
                event,
                Event::ChatToken { id: 2, .. } | Event::ChatReply { id: 2, .. }
            ),
            "the older reply went on"
        );
    }
    assert_eq!(replies_of_2, 0);
}
