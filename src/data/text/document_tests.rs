//! The conversation document's edits, read back from disk: each format keeps its shape and its other
//! keys, untouched rows keep their bytes, undo restores files, and a file changed by someone else is not
//! overwritten.

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::{ConversationDocument, EditError, conversation_badges};
use crate::messages::{ChatTurn, RowFormat, TextBadge};

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap()
}

fn line(path: &Path, number: usize) -> String {
    read(path).split('\n').nth(number - 1).unwrap().to_string()
}

fn turns(pairs: &[(&str, &str)]) -> Vec<ChatTurn> {
    pairs.iter().map(|(r, c)| ChatTurn::new(*r, *c)).collect()
}

/// The top-level keys of a JSON object's text, in the order written.
fn key_order(text: &str) -> Vec<String> {
    let value: super::ordered_json::Json = serde_json::from_str(text).unwrap();
    match value {
        super::ordered_json::Json::Object(entries) => entries.into_iter().map(|(k, _)| k).collect(),
        _ => panic!("not an object: {text}"),
    }
}

const MIXED: &str = concat!(
    r#"{"id": 7, "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi", "name": "ann"}, {"role": "assistant", "content": "Hello"}], "meta": {"z": 1, "a": 2}}"#,
    "\r\n",
    r#"{"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}], "system": "Sys", "source": "x"}"#,
    "\r\n",
    "not json at all\r\n",
    "\r\n",
    r#"{"instruction": "Sum", "input": "1 2", "output": "3", "history": [], "extra": true}"#,
    "\r\n",
    r#"{"text": "plain words"}"#,
    "\r\n",
    r#"{"unknown": 1}"#,
    "\r\n",
);

#[test]
fn an_openai_edit_keeps_its_format_its_keys_and_every_other_row() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "data.jsonl", MIXED);
    let mut document = ConversationDocument::open(&path).unwrap();
    let (entries, unparsed) = document.entries();
    assert_eq!(entries.len(), 4);
    assert_eq!(
        entries
            .iter()
            .map(|e| (e.line, e.format))
            .collect::<Vec<_>>(),
        [
            (1, RowFormat::OpenAi),
            (2, RowFormat::ShareGpt),
            (5, RowFormat::Alpaca),
            (6, RowFormat::Text)
        ]
    );
    assert_eq!(
        unparsed.iter().map(|u| u.1).collect::<Vec<_>>(),
        [3, 7],
        "{unparsed:?}"
    );
    assert!(unparsed.iter().all(|u| u.0 == Path::new("data.jsonl")));

    let new_turns = turns(&[
        ("system", "Be brief."),
        ("user", "Hi there"),
        ("assistant", "Hello!"),
        ("user", "More?"),
        ("assistant", "No."),
    ]);
    document.set_turns(0, &new_turns).unwrap();
    let text = read(&path);
    let mut old_lines = MIXED.split("\r\n");
    let mut new_lines = text.split("\r\n");
    let first = new_lines.next().unwrap();
    old_lines.next();
    assert_eq!(
        new_lines.collect::<Vec<_>>(),
        old_lines.collect::<Vec<_>>(),
        "the other rows keep their bytes"
    );
    assert_eq!(key_order(first), ["id", "messages", "meta"]);
    let row: Value = serde_json::from_str(first).unwrap();
    assert_eq!(row["messages"][1]["name"], "ann", "{first}");
    assert_eq!(row["meta"]["a"], 2);
    assert!(first.contains(r#""meta":{"z":1,"a":2}"#), "{first}");
    let reopened = ConversationDocument::open(&path).unwrap();
    assert_eq!(reopened.entry(0).unwrap().turns, new_turns);
    assert_eq!(reopened.entry(0).unwrap().format, RowFormat::OpenAi);
    assert_eq!(document.entry(0).unwrap(), reopened.entry(0).unwrap());
}

#[test]
fn sharegpt_rows_keep_their_role_names_and_system_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "data.jsonl", MIXED);
    let mut document = ConversationDocument::open(&path).unwrap();
    assert_eq!(
        document.entry(1).unwrap().turns,
        turns(&[("system", "Sys"), ("human", "Q"), ("gpt", "A")])
    );
    document
        .set_turns(
            1,
            &turns(&[("system", "New sys"), ("user", "Q2"), ("assistant", "A2")]),
        )
        .unwrap();
    let row_text = line(&path, 2);
    assert_eq!(key_order(&row_text), ["conversations", "system", "source"]);
    let row: Value = serde_json::from_str(&row_text).unwrap();
    assert_eq!(row["system"], "New sys");
    assert_eq!(row["source"], "x");
    assert_eq!(
        row["conversations"],
        serde_json::json!([{"from": "human", "value": "Q2"}, {"from": "gpt", "value": "A2"}])
    );
    let reopened = ConversationDocument::open(&path).unwrap();
    assert_eq!(reopened.entry(1).unwrap().format, RowFormat::ShareGpt);
}

#[test]
fn alpaca_rows_follow_the_pair_rule() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "data.jsonl", MIXED);
    let mut document = ConversationDocument::open(&path).unwrap();
    assert_eq!(
        document.entry(2).unwrap().turns,
        turns(&[("user", "Sum\n1 2"), ("assistant", "3")])
    );
    // The prompt unchanged: instruction and input stay apart.
    document
        .set_turns(2, &turns(&[("user", "Sum\n1 2"), ("assistant", "three")]))
        .unwrap();
    let row: Value = serde_json::from_str(&line(&path, 5)).unwrap();
    assert_eq!(
        (&row["instruction"], &row["input"], &row["output"]),
        (&"Sum".into(), &"1 2".into(), &"three".into())
    );
    // Earlier pairs become history, the system turn `system`, an edited prompt the instruction.
    document
        .set_turns(
            2,
            &turns(&[
                ("system", "Be exact."),
                ("user", "Add 1 and 2"),
                ("assistant", "3"),
                ("user", "Times 2?"),
                ("assistant", "6"),
            ]),
        )
        .unwrap();
    let row_text = line(&path, 5);
    let row: Value = serde_json::from_str(&row_text).unwrap();
    assert_eq!(row["instruction"], "Times 2?");
    assert_eq!(row["input"], "");
    assert_eq!(row["output"], "6");
    assert_eq!(row["system"], "Be exact.");
    assert_eq!(row["history"], serde_json::json!([["Add 1 and 2", "3"]]));
    assert_eq!(row["extra"], true);
    assert_eq!(
        key_order(&row_text),
        [
            "instruction",
            "input",
            "output",
            "history",
            "extra",
            "system"
        ]
    );
    let reopened = ConversationDocument::open(&path).unwrap();
    assert_eq!(
        reopened.entry(2).unwrap().turns,
        document.entry(2).unwrap().turns
    );
    // Turns an Alpaca row cannot hold are refused, and the file is left as it was.
    let before = read(&path);
    for bad in [
        turns(&[("user", "a"), ("user", "b")]),
        turns(&[("user", "a")]),
        turns(&[("user", "a"), ("assistant", "b"), ("user", "c")]),
    ] {
        let error = document.set_turns(2, &bad).unwrap_err();
        assert!(
            matches!(&error, EditError::Refused(m) if m.starts_with("data.jsonl line 5: an Alpaca row holds")),
            "{error}"
        );
    }
    assert_eq!(read(&path), before);
}

#[test]
fn text_rows_and_txt_files_hold_one_text() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "a.jsonl", MIXED);
    let txt = write(dir.path(), "b.txt", "\u{feff}A long story.\n");
    let mut document = ConversationDocument::open(dir.path()).unwrap();
    assert_eq!(document.len(), 5);
    let story = document.entry(4).unwrap();
    assert_eq!(story.file, Path::new("b.txt"));
    assert_eq!(story.turns, turns(&[("text", "A long story.\n")]));
    document
        .set_turns(4, &turns(&[("text", "A short story.")]))
        .unwrap();
    assert_eq!(read(&txt), "\u{feff}A short story.");
    document
        .set_turns(3, &turns(&[("text", "other words")]))
        .unwrap();
    assert_eq!(
        line(&dir.path().join("a.jsonl"), 6),
        "{\"text\":\"other words\"}\r"
    );
    assert!(matches!(
        document.set_turns(3, &turns(&[("text", "a"), ("text", "b")])),
        Err(EditError::Refused(_))
    ));
    assert!(matches!(document.delete(4), Err(EditError::Refused(m)) if m.contains("b.txt")));
    assert!(matches!(document.duplicate(4), Err(EditError::Refused(_))));
}

#[test]
fn add_delete_duplicate_replace_and_undo_back_to_the_first_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "data.jsonl", MIXED);
    let mut document = ConversationDocument::open(&path).unwrap();
    assert!(!document.can_undo());

    document.add(Some(1)).unwrap();
    let added = document.entry(2).unwrap();
    assert_eq!(added.format, RowFormat::ShareGpt);
    assert_eq!(added.turns, turns(&[("human", ""), ("gpt", "")]));
    assert_eq!(added.line, 3);
    assert_eq!(document.entry(3).unwrap().line, 6, "later rows move down");
    assert!(read(&path).contains("\r\n{\"conversations\":[{\"from\":\"human\",\"value\":\"\"},{\"from\":\"gpt\",\"value\":\"\"}]}\r\n"));

    document.add(None).unwrap();
    assert_eq!(document.len(), 6);
    let last = document.entry(5).unwrap();
    assert_eq!((last.format, last.line), (RowFormat::OpenAi, 9));
    assert!(read(&path).ends_with("{\"unknown\": 1}\r\n{\"messages\":[{\"role\":\"user\",\"content\":\"\"},{\"role\":\"assistant\",\"content\":\"\"}]}\r\n"));

    document.duplicate(0).unwrap();
    assert_eq!(
        document.entry(1).unwrap().turns,
        document.entry(0).unwrap().turns
    );
    assert_eq!(line(&path, 2), line(&path, 1));

    document.delete(0).unwrap();
    assert_eq!(document.len(), 6);

    let replaced = document.replace("HELLO", "Howdy $1", false).unwrap();
    assert_eq!(replaced, 1);
    assert_eq!(document.entry(0).unwrap().turns[2].content, "Howdy $1");
    assert_eq!(document.replace("howdy", "x", true).unwrap(), 0);

    for _ in 0..5 {
        assert!(document.undo().unwrap());
    }
    assert!(!document.undo().unwrap());
    assert_eq!(read(&path), MIXED, "undo writes the first bytes back");
    assert_eq!(document.len(), 4);
}

#[test]
fn a_json_array_is_rewritten_as_a_whole_with_its_other_elements_as_they_were() {
    let dir = tempfile::tempdir().unwrap();
    let text = "[\n  {\"messages\": [{\"role\": \"user\", \"content\": \"a\"}, {\"role\": \"assistant\", \"content\": \"b\"}]},\n  {\"bad\":\n    1},\n  {\"text\": \"t\"}\n]\n";
    let path = write(dir.path(), "data.json", text);
    let mut document = ConversationDocument::open(&path).unwrap();
    let (entries, unparsed) = document.entries();
    assert_eq!(entries.iter().map(|e| e.line).collect::<Vec<_>>(), [2, 5]);
    assert_eq!(unparsed.len(), 1);
    assert_eq!(unparsed[0].1, 3);
    document.set_turns(1, &turns(&[("text", "u")])).unwrap();
    document.duplicate(0).unwrap();
    let written = read(&path);
    let value: Value = serde_json::from_str(&written).unwrap();
    assert_eq!(value.as_array().unwrap().len(), 4);
    assert_eq!(value[0], value[1]);
    assert_eq!(value[3], serde_json::json!({"text": "u"}));
    assert!(written.contains("\n  {\"bad\":\n    1},\n"), "{written}");
    let reopened = ConversationDocument::open(&path).unwrap();
    assert_eq!(reopened.entries().0, document.entries().0);
    document.undo().unwrap();
    document.undo().unwrap();
    assert_eq!(
        read(&path).replace(char::is_whitespace, ""),
        text.replace(char::is_whitespace, "")
    );
}

#[test]
fn a_file_changed_on_disk_is_not_overwritten() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "data.jsonl", MIXED);
    let mut document = ConversationDocument::open(&path).unwrap();
    let theirs = format!("{MIXED}{{\"text\": \"added elsewhere\"}}\n");
    std::fs::write(&path, &theirs).unwrap();
    let error = document
        .set_turns(3, &turns(&[("text", "mine")]))
        .unwrap_err();
    assert_eq!(
        error.to_string(),
        format!(
            "{} changed on disk since it was opened; open it again",
            path.display()
        )
    );
    assert_eq!(read(&path), theirs);
    assert!(!document.can_undo());
}

#[test]
fn badges_point_out_what_training_would_refuse_and_duplicates() {
    let dir = tempfile::tempdir().unwrap();
    let rows = [
        r#"{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}"#,
        r#"{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": " "}]}"#,
        r#"{"messages": [{"role": "user", "content": "a"}]}"#,
        r#"{"messages": [{"role": "robot", "content": "a"}, {"role": "assistant", "content": "b"}]}"#,
        r#"{"conversations": [{"from": "user", "value": "a"}, {"from": "assistant", "value": "b"}]}"#,
        r#"{"text": "hi"}"#,
    ];
    let path = write(dir.path(), "data.jsonl", &rows.join("\n"));
    let document = ConversationDocument::open(&path).unwrap();
    assert_eq!(
        conversation_badges(&document.samples()),
        [
            vec![],
            vec![TextBadge::EmptyAssistantTurn],
            vec![TextBadge::NoAssistantTurn],
            vec![TextBadge::UnknownRole("robot".into())],
            vec![TextBadge::Duplicate { of: 0 }],
            vec![],
        ]
    );
}
