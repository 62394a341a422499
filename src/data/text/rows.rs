//! One row of a text dataset read into a sample: an OpenAI chat (`messages` of `role`/`content`), a
//! ShareGPT chat (`conversations` of `from`/`value`), an Alpaca instruction (`instruction`, `input`,
//! `output`, `system`, `history` of `[question, answer]` pairs) or a text (`text`). [`read_row`] reads any
//! row of a known shape as it is (the editor's view, unknown roles and empty turns included);
//! [`sample_of`] is what training accepts: a row that names an unknown role, or has no (or an empty)
//! assistant turn is refused with the reason.

use serde_json::Value;

use super::TextSample;
use crate::messages::{ChatTurn, RowFormat};

/// The reason given for a conversation without an assistant turn.
pub(super) const NO_ASSISTANT_TURN: &str = "the conversation has no assistant turn to learn from";

/// Who speaks a turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    System,
    User,
    Assistant,
}

impl Role {
    /// The role's name in chat templates (`system`, `user`, `assistant`).
    pub fn name(&self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }

    /// OpenAI's and ShareGPT's names of the roles.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "system" => Some(Role::System),
            "user" | "human" => Some(Role::User),
            "assistant" | "gpt" | "model" => Some(Role::Assistant),
            _ => None,
        }
    }
}

/// One turn of a conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Turn {
    pub role: Role,
    pub content: String,
}

impl Turn {
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Self {
            role,
            content: content.into(),
        }
    }
}

/// A row of a known shape, read as it is: its format and its turns with the role names it gives (a text
/// row is one turn with the role `text`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowTurns {
    pub format: RowFormat,
    pub turns: Vec<ChatTurn>,
}

/// The role name of a text row's one turn.
pub const TEXT_ROLE: &str = "text";

/// The turns of one JSON row, or why it is of no known shape (not an object, no known keys, values of the
/// wrong type). Unknown roles and empty turns are read as they are.
pub fn read_row(row: &Value) -> Result<RowTurns, String> {
    let Value::Object(map) = row else {
        return Err(format!("a row must be a JSON object, not {}", kind(row)));
    };
    let (format, turns) = if let Some(messages) = map.get("messages") {
        (
            RowFormat::OpenAi,
            chat(messages, "messages", "role", "content")?,
        )
    } else if let Some(conversations) = map.get("conversations") {
        let mut turns = chat(conversations, "conversations", "from", "value")?;
        if let Some(system) = optional_text(map.get("system"), "system")?
            && !turns.iter().any(|t| t.role == "system")
        {
            turns.insert(0, ChatTurn::new("system", system));
        }
        (RowFormat::ShareGpt, turns)
    } else if map.contains_key("instruction") || map.contains_key("output") {
        (RowFormat::Alpaca, alpaca(map)?)
    } else if let Some(text) = map.get("text") {
        let text = text
            .as_str()
            .ok_or_else(|| format!("`text` must be a string, not {}", kind(text)))?;
        (RowFormat::Text, vec![ChatTurn::new(TEXT_ROLE, text)])
    } else {
        return Err(
            "the row is none of the formats read: OpenAI (messages), ShareGPT (conversations), Alpaca \
             (instruction, output) or text"
                .into(),
        );
    };
    Ok(RowTurns { format, turns })
}

/// The sample of one JSON row, or why it cannot be trained on.
pub(super) fn sample_of(row: &Value) -> Result<TextSample, String> {
    let read = read_row(row)?;
    if read.format == RowFormat::Text {
        let text = read.turns.into_iter().next().map(|t| t.content);
        return match text {
            Some(text) if !text.trim().is_empty() => Ok(TextSample::Text(text)),
            _ => Err("the text is empty".into()),
        };
    }
    let turns = read
        .turns
        .into_iter()
        .enumerate()
        .map(|(i, turn)| match Role::parse(&turn.role) {
            Some(role) => Ok(Turn::new(role, turn.content)),
            None => Err(format!(
                "turn {} has the unknown role `{}` (system, user or human, assistant or gpt)",
                i + 1,
                turn.role
            )),
        })
        .collect::<Result<Vec<_>, _>>()?;
    if read.format == RowFormat::Alpaca
        && turns
            .iter()
            .rev()
            .find(|t| t.role == Role::User)
            .is_some_and(|t| t.content.is_empty())
    {
        return Err("the instruction and the input are both empty".into());
    }
    check_turns(&turns)?;
    Ok(TextSample::Conversation(turns))
}

/// A list of turns with role and content under the keys given.
fn chat(
    list: &Value,
    key: &str,
    role_key: &str,
    content_key: &str,
) -> Result<Vec<ChatTurn>, String> {
    let Value::Array(items) = list else {
        return Err(format!("`{key}` must be a list, not {}", kind(list)));
    };
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let role = item
                .get(role_key)
                .and_then(Value::as_str)
                .ok_or_else(|| format!("turn {} of `{key}` has no `{role_key}` string", i + 1))?;
            let content = match item.get(content_key) {
                Some(Value::String(text)) => text.clone(),
                Some(Value::Null) | None => String::new(),
                Some(other) => {
                    return Err(format!(
                        "turn {} has a `{content_key}` that is {}, not a string",
                        i + 1,
                        kind(other)
                    ));
                }
            };
            Ok(ChatTurn::new(role, content))
        })
        .collect()
}

/// An Alpaca row: the system text, the history's pairs, then the instruction (with its input) and output.
fn alpaca(map: &serde_json::Map<String, Value>) -> Result<Vec<ChatTurn>, String> {
    let instruction = optional_text(map.get("instruction"), "instruction")?.unwrap_or_default();
    let input = optional_text(map.get("input"), "input")?.unwrap_or_default();
    let output = optional_text(map.get("output"), "output")?.unwrap_or_default();
    let mut turns = Vec::new();
    if let Some(system) = optional_text(map.get("system"), "system")?
        && !system.is_empty()
    {
        turns.push(ChatTurn::new("system", system));
    }
    if let Some(history) = map.get("history").filter(|h| !h.is_null()) {
        let pairs = history
            .as_array()
            .ok_or_else(|| "`history` must be a list of [question, answer] pairs".to_string())?;
        for pair in pairs {
            match pair.as_array().map(Vec::as_slice) {
                Some([Value::String(q), Value::String(a)]) => {
                    turns.push(ChatTurn::new("user", q.clone()));
                    turns.push(ChatTurn::new("assistant", a.clone()));
                }
                _ => return Err("`history` must be a list of [question, answer] pairs".into()),
            }
        }
    }
    turns.push(ChatTurn::new("user", alpaca_prompt(&instruction, &input)));
    turns.push(ChatTurn::new("assistant", output));
    Ok(turns)
}

/// The user turn of an Alpaca row: the instruction and the input on the next line.
pub(super) fn alpaca_prompt(instruction: &str, input: &str) -> String {
    match (instruction.is_empty(), input.is_empty()) {
        (false, false) => format!("{instruction}\n{input}"),
        (false, true) => instruction.to_string(),
        (true, _) => input.to_string(),
    }
}

/// A conversation needs an assistant turn, and every assistant turn some text.
fn check_turns(turns: &[Turn]) -> Result<(), String> {
    let mut assistant_turns = 0;
    for (i, turn) in turns.iter().enumerate() {
        if turn.role == Role::Assistant {
            if turn.content.trim().is_empty() {
                return Err(format!("turn {} is an empty assistant turn", i + 1));
            }
            assistant_turns += 1;
        }
    }
    if assistant_turns == 0 {
        return Err(NO_ASSISTANT_TURN.into());
    }
    Ok(())
}

fn optional_text(value: Option<&Value>, key: &str) -> Result<Option<String>, String> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(text)) => Ok(Some(text.clone())),
        Some(other) => Err(format!("`{key}` must be a string, not {}", kind(other))),
    }
}

/// What kind of JSON value `value` is, for messages.
pub(super) fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}
