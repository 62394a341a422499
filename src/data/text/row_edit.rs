//! Writing a sample's turns back into its own row, in the row's own format, keeping every key the edit
//! does not change (and the order of the keys):
//! - OpenAI: `messages[i].role`/`content`; a message keeps its other keys (`name`, `weight`, ...) when a turn
//!   stays at its place. ShareGPT's role names are written as OpenAI's (`human` → `user`, `gpt` →
//!   `assistant`).
//! - ShareGPT: `conversations[i].from`/`value` with ShareGPT's names (`user` → `human`, `assistant` → `gpt`);
//!   a row that keeps its system text under `system` keeps it there.
//! - Alpaca: an optional system turn (`system`), then user and assistant turns in pairs: the last pair is
//!   `instruction` (with `input`) and `output`, earlier pairs are `history`. A user turn that still reads
//!   "instruction\ninput" keeps both; one edited to anything else becomes the instruction, and the input is
//!   emptied. Turns that do not fit this shape are refused.
//! - Text: `text`, from the one turn.
//!
//! Knows JSON values only; files are the document's.

use super::ordered_json::Json;
use super::rows::{TEXT_ROLE, alpaca_prompt};
use crate::messages::{ChatTurn, RowFormat};

/// Writes `turns` into `row` (an object of `format`), or says in one sentence why the format cannot hold
/// them.
pub(super) fn set_turns(
    row: &mut Json,
    format: RowFormat,
    turns: &[ChatTurn],
) -> Result<(), String> {
    match format {
        RowFormat::OpenAi => {
            set_chat(row, "messages", ("role", "content"), turns, openai_role);
            Ok(())
        }
        RowFormat::ShareGpt => {
            let system_key = row.get("system").is_some_and(|s| s.as_str().is_some())
                && !listed_roles(row, "conversations", "from").any(|r| r == "system");
            let listed = match turns.split_first() {
                Some((first, rest)) if system_key && first.role == "system" => {
                    row.set("system", Json::text(&first.content));
                    rest
                }
                _ if system_key => {
                    row.set("system", Json::text(""));
                    turns
                }
                _ => turns,
            };
            set_chat(
                row,
                "conversations",
                ("from", "value"),
                listed,
                sharegpt_role,
            );
            Ok(())
        }
        RowFormat::Alpaca => set_alpaca(row, turns),
        RowFormat::Text => match turns {
            [turn] => {
                row.set("text", Json::text(&turn.content));
                Ok(())
            }
            _ => Err(format!(
                "a text row holds one `{TEXT_ROLE}` turn, not {}",
                turns.len()
            )),
        },
    }
}

/// A new row of `format`: an empty user turn and an empty assistant turn (an empty text for a text row).
pub(super) fn empty_row(format: RowFormat) -> Json {
    let turn = |role: &str, role_key: &str, content_key: &str| {
        Json::object_of(&[(role_key, role), (content_key, "")])
    };
    match format {
        RowFormat::OpenAi => Json::Object(vec![(
            "messages".into(),
            Json::Array(vec![
                turn("user", "role", "content"),
                turn("assistant", "role", "content"),
            ]),
        )]),
        RowFormat::ShareGpt => Json::Object(vec![(
            "conversations".into(),
            Json::Array(vec![
                turn("human", "from", "value"),
                turn("gpt", "from", "value"),
            ]),
        )]),
        RowFormat::Alpaca => Json::object_of(&[("instruction", ""), ("input", ""), ("output", "")]),
        RowFormat::Text => Json::object_of(&[("text", "")]),
    }
}

fn openai_role(role: &str) -> &str {
    match role {
        "human" => "user",
        "gpt" => "assistant",
        other => other,
    }
}

fn sharegpt_role(role: &str) -> &str {
    match role {
        "user" => "human",
        "assistant" => "gpt",
        other => other,
    }
}

/// The role names of the turns listed under `key`.
fn listed_roles<'a>(row: &'a Json, key: &str, role_key: &'a str) -> impl Iterator<Item = &'a str> {
    let items = match row.get(key) {
        Some(Json::Array(items)) => items.as_slice(),
        _ => &[],
    };
    items
        .iter()
        .filter_map(move |item| item.get(role_key).and_then(Json::as_str))
}

/// Sets the list of turns under `key`; a turn that stays at its index keeps its object's other keys.
fn set_chat(
    row: &mut Json,
    key: &str,
    (role_key, content_key): (&str, &str),
    turns: &[ChatTurn],
    role_name: fn(&str) -> &str,
) {
    let old = match row.get(key) {
        Some(Json::Array(items)) => items.clone(),
        _ => Vec::new(),
    };
    let items = turns
        .iter()
        .enumerate()
        .map(|(i, turn)| {
            let mut item = match old.get(i) {
                Some(object @ Json::Object(_)) => object.clone(),
                _ => Json::Object(Vec::new()),
            };
            item.set(role_key, Json::text(role_name(&turn.role)));
            item.set(content_key, Json::text(&turn.content));
            item
        })
        .collect();
    row.set(key, Json::Array(items));
}

/// The Alpaca rule (see the module's description).
fn set_alpaca(row: &mut Json, turns: &[ChatTurn]) -> Result<(), String> {
    let (system, pairs) = match turns.split_first() {
        Some((first, rest)) if first.role == "system" => (Some(first.content.as_str()), rest),
        _ => (None, turns),
    };
    let first_in_pairs = turns.len() - pairs.len();
    let misfit = pairs.iter().enumerate().find(|(i, turn)| {
        let wanted: &[&str] = if i % 2 == 0 {
            &["user", "human"]
        } else {
            &["assistant", "gpt"]
        };
        !wanted.contains(&turn.role.as_str())
    });
    if let Some((i, turn)) = misfit {
        return Err(format!(
            "an Alpaca row holds a system turn, then user and assistant turns in pairs, so turn {} cannot \
             be `{}`",
            first_in_pairs + i + 1,
            turn.role
        ));
    }
    if pairs.len() % 2 != 0 {
        return Err(
            "an Alpaca row holds user and assistant turns in pairs, so its last turn must be an assistant's"
                .into(),
        );
    }
    let [history @ .., user, assistant] = pairs else {
        return Err(
            "an Alpaca row holds a system turn, then user and assistant turns in pairs, and needs at least \
             one pair"
                .into(),
        );
    };
    match system {
        Some(text) => row.set("system", Json::text(text)),
        None if row.get("system").is_some() => row.set("system", Json::text("")),
        None => {}
    }
    if !history.is_empty() || row.get("history").is_some() {
        let pairs = history
            .chunks(2)
            .map(|pair| Json::Array(pair.iter().map(|turn| Json::text(&turn.content)).collect()))
            .collect();
        row.set("history", Json::Array(pairs));
    }
    let old_text = |key: &str| row.get(key).and_then(Json::as_str).unwrap_or_default();
    if alpaca_prompt(old_text("instruction"), old_text("input")) != user.content {
        row.set("instruction", Json::text(&user.content));
        if row.get("input").is_some() {
            row.set("input", Json::text(""));
        }
    }
    row.set("output", Json::text(&assistant.content));
    Ok(())
}
