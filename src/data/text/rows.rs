//! One row of a text dataset read into a sample: an OpenAI chat (`messages` of `role`/`content`), a
//! ShareGPT chat (`conversations` of `from`/`value`), an Alpaca instruction (`instruction`, `input`,
//! `output`, `system`, `history` of `[question, answer]` pairs) or a text (`text`). A row that is none of
//! them, names an unknown role, or has no (or an empty) assistant turn is refused with the reason.

use serde_json::Value;

use super::TextSample;

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
    fn parse(name: &str) -> Option<Self> {
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

/// The sample of one JSON row, or why it cannot be trained on.
pub(super) fn sample_of(row: &Value) -> Result<TextSample, String> {
    let Value::Object(map) = row else {
        return Err(format!("a row must be a JSON object, not {}", kind(row)));
    };
    let turns = if let Some(messages) = map.get("messages") {
        chat(messages, "messages", "role", "content")?
    } else if let Some(conversations) = map.get("conversations") {
        let mut turns = chat(conversations, "conversations", "from", "value")?;
        if let Some(system) = optional_text(map.get("system"), "system")?
            && !turns.iter().any(|t| t.role == Role::System)
        {
            turns.insert(0, Turn::new(Role::System, system));
        }
        turns
    } else if map.contains_key("instruction") || map.contains_key("output") {
        alpaca(map)?
    } else if let Some(text) = map.get("text") {
        let text = text
            .as_str()
            .ok_or_else(|| format!("`text` must be a string, not {}", kind(text)))?;
        if text.trim().is_empty() {
            return Err("the text is empty".into());
        }
        return Ok(TextSample::Text(text.to_string()));
    } else {
        return Err(
            "the row is none of the formats read: OpenAI (messages), ShareGPT (conversations), Alpaca \
             (instruction, output) or text"
                .into(),
        );
    };
    check_turns(&turns)?;
    Ok(TextSample::Conversation(turns))
}

/// A list of turns with role and content under the keys given.
fn chat(list: &Value, key: &str, role_key: &str, content_key: &str) -> Result<Vec<Turn>, String> {
    let Value::Array(items) = list else {
        return Err(format!("`{key}` must be a list, not {}", kind(list)));
    };
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let role = item.get(role_key).and_then(Value::as_str).ok_or_else(|| {
                format!("turn {} of `{key}` has no `{role_key}` string", i + 1)
            })?;
            let role = Role::parse(role).ok_or_else(|| {
                format!(
                    "turn {} has the unknown role `{role}` (system, user or human, assistant or gpt)",
                    i + 1
                )
            })?;
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
            Ok(Turn::new(role, content))
        })
        .collect()
}

/// An Alpaca row: the system text, the history's pairs, then the instruction (with its input) and output.
fn alpaca(map: &serde_json::Map<String, Value>) -> Result<Vec<Turn>, String> {
    let instruction = optional_text(map.get("instruction"), "instruction")?.unwrap_or_default();
    let input = optional_text(map.get("input"), "input")?.unwrap_or_default();
    let output = optional_text(map.get("output"), "output")?.unwrap_or_default();
    let mut turns = Vec::new();
    if let Some(system) = optional_text(map.get("system"), "system")?
        && !system.is_empty()
    {
        turns.push(Turn::new(Role::System, system));
    }
    if let Some(history) = map.get("history").filter(|h| !h.is_null()) {
        let pairs = history
            .as_array()
            .ok_or_else(|| "`history` must be a list of [question, answer] pairs".to_string())?;
        for pair in pairs {
            match pair.as_array().map(Vec::as_slice) {
                Some([Value::String(q), Value::String(a)]) => {
                    turns.push(Turn::new(Role::User, q.clone()));
                    turns.push(Turn::new(Role::Assistant, a.clone()));
                }
                _ => return Err("`history` must be a list of [question, answer] pairs".into()),
            }
        }
    }
    let prompt = match (instruction.is_empty(), input.is_empty()) {
        (false, false) => format!("{instruction}\n{input}"),
        (false, true) => instruction,
        (true, _) => input,
    };
    if prompt.is_empty() {
        return Err("the instruction and the input are both empty".into());
    }
    turns.push(Turn::new(Role::User, prompt));
    turns.push(Turn::new(Role::Assistant, output));
    Ok(turns)
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
fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}
