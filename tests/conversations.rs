//! The app's conversation dataset on the workers, without the UI: a JSONL file with good and bad rows is
//! opened against the tiny Qwen2 fixture, its samples get the badges the view shows (token counts as
//! training renders them), an edited turn is saved in the row's own format, and undo writes the file's
//! first bytes back.

mod common;

use std::path::Path;
use std::sync::Arc;

use common::{causal_lm, wait_for};
use crossbeam_channel::Receiver;
use lora_studio::chat::ChatFiles;
use lora_studio::config::TrainConfig;
use lora_studio::data::text::scan_text_dataset;
use lora_studio::messages::{ChatTurn, ConversationEdit, Event, Job, RowFormat, TextBadge};
use lora_studio::train::tokenize_dataset;
use lora_studio::worker::WorkerHandle;

const MAX_SEQ_LENGTH: u32 = 200;

fn rows() -> Vec<String> {
    let long_reply = "The printer needs a new cartridge and a restart. ".repeat(8);
    vec![
        r#"{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}"#.into(),
        r#"{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}"#.into(),
        r#"{"messages": [{"role": "user", "content": "Anyone?"}, {"role": "assistant", "content": ""}]}"#.into(),
        r#"{"messages": [{"role": "robot", "content": "Beep"}, {"role": "assistant", "content": "Boop"}]}"#.into(),
        format!(r#"{{"messages": [{{"role": "user", "content": "Fix it"}}, {{"role": "assistant", "content": "{long_reply}"}}]}}"#),
        "{ this row is broken".into(),
        r#"{"id": 3, "conversations": [{"from": "human", "value": "Ping"}, {"from": "gpt", "value": "Pong"}]}"#.into(),
    ]
}

/// The checks whose token counts are in (the fixture is a language model, so every countable sample has one).
fn checks(events: &Receiver<Event>) -> (Vec<Option<usize>>, Vec<Vec<TextBadge>>) {
    wait_for(events, "the conversation checks", |e| match e {
        Event::ConversationChecks { tokens, badges, .. } => Some((tokens.clone(), badges.clone())),
        _ => None,
    })
}

/// The token count of every trainable sample of `path`, as a training run counts them.
fn training_counts(path: &Path, base: &Path) -> Vec<usize> {
    let dataset = scan_text_dataset(path).unwrap();
    let files = ChatFiles::open(base).unwrap();
    let config = TrainConfig {
        max_seq_length: 100_000,
        ..TrainConfig::default()
    };
    let tokenized = tokenize_dataset(&files, &dataset, &config).unwrap();
    tokenized.samples.iter().map(|s| s.ids.len()).collect()
}

#[test]
fn a_conversation_dataset_is_checked_edited_in_its_format_and_undone() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("support.jsonl");
    let original = rows().join("\n") + "\n";
    std::fs::write(&path, &original).unwrap();
    let base = causal_lm::folder("qwen2");
    let (worker, events) = WorkerHandle::spawn(Arc::new(|| {})).unwrap();

    worker.send(Job::OpenConversations {
        path: path.clone(),
        base_model: base.clone(),
        max_seq_length: MAX_SEQ_LENGTH,
        system_prompt: None,
    });
    let view = wait_for(&events, "the conversations", |e| match e {
        Event::Conversations(view) => Some(view.clone()),
        _ => None,
    });
    assert_eq!(view.root, path);
    assert_eq!(view.entries.len(), 6);
    assert_eq!(
        view.entries.iter().map(|e| e.line).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5, 7]
    );
    assert_eq!(view.entries[5].format, RowFormat::ShareGpt);
    assert_eq!(view.unparsed.len(), 1);
    assert_eq!(
        (&view.unparsed[0].0, view.unparsed[0].1),
        (&Path::new("support.jsonl").to_path_buf(), 6)
    );
    assert!(!view.can_undo);

    let (tokens, badges) = checks(&events);
    // Training reads rows 0, 1, 4 and 6 (the empty reply and the unknown role are left out).
    let trained = training_counts(&path, &base);
    assert_eq!(
        [tokens[0], tokens[1], tokens[4], tokens[5]],
        [
            Some(trained[0]),
            Some(trained[1]),
            Some(trained[2]),
            Some(trained[3])
        ]
    );
    assert!(tokens[2].is_some(), "an empty reply is still counted");
    assert_eq!(
        tokens[3], None,
        "a conversation with an unknown role is not rendered"
    );
    let long = trained[2];
    assert!(long > MAX_SEQ_LENGTH as usize, "{long} tokens");
    assert_eq!(
        badges,
        [
            vec![],
            vec![TextBadge::Duplicate { of: 0 }],
            vec![TextBadge::EmptyAssistantTurn],
            vec![TextBadge::UnknownRole("robot".into())],
            vec![TextBadge::OverLength {
                tokens: long,
                max: MAX_SEQ_LENGTH as usize
            }],
            vec![],
        ]
    );

    let turns = vec![
        ChatTurn::new("human", "Ping?"),
        ChatTurn::new("gpt", "Pong, again."),
    ];
    worker.send(Job::EditConversations {
        root: path.clone(),
        edit: ConversationEdit::SetTurns {
            index: 5,
            turns: turns.clone(),
        },
    });
    let (index, entry, can_undo) = wait_for(&events, "the changed sample", |e| match e {
        Event::ConversationChanged {
            index,
            entry,
            can_undo,
            ..
        } => Some((*index, entry.clone(), *can_undo)),
        _ => None,
    });
    assert_eq!((index, entry.turns.clone(), entry.line), (5, turns, 7));
    assert!(can_undo);
    let saved = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<&str> = saved.lines().collect();
    assert_eq!(lines[..6], original.lines().collect::<Vec<_>>()[..6]);
    assert_eq!(
        lines[6],
        r#"{"id":3,"conversations":[{"from":"human","value":"Ping?"},{"from":"gpt","value":"Pong, again."}]}"#
    );
    let (tokens_after, _) = checks(&events);
    assert_eq!(tokens_after[..5], tokens[..5]);
    assert!(tokens_after[5] > tokens[5], "{tokens_after:?}");

    worker.send(Job::EditConversations {
        root: path.clone(),
        edit: ConversationEdit::Undo,
    });
    let undone = wait_for(&events, "the view after undo", |e| match e {
        Event::Conversations(view) => Some(view.clone()),
        _ => None,
    });
    assert_eq!(undone.entries, view.entries);
    assert!(!undone.can_undo);
    assert_eq!(std::fs::read_to_string(&path).unwrap(), original);
    assert_eq!(checks(&events), (tokens, badges));
}

#[test]
fn without_a_language_model_there_are_no_token_counts() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("support.jsonl");
    std::fs::write(&path, rows().join("\n")).unwrap();
    let (worker, events) = WorkerHandle::spawn(Arc::new(|| {})).unwrap();
    worker.send(Job::OpenConversations {
        path: path.clone(),
        base_model: dir.path().to_path_buf(),
        max_seq_length: MAX_SEQ_LENGTH,
        system_prompt: None,
    });
    let info = wait_for(&events, "why tokens are not counted", |e| match e {
        Event::Info(text) => Some(text.clone()),
        _ => None,
    });
    assert!(info.contains("is not a language model folder"), "{info}");
    let (tokens, badges) = checks(&events);
    assert_eq!(tokens, vec![None; 6]);
    assert!(
        badges
            .iter()
            .flatten()
            .all(|b| !matches!(b, TextBadge::OverLength { .. }))
    );
}
