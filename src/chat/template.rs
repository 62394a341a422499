//! A model's own chat template rendered as transformers' `apply_chat_template` renders it: Jinja with
//! `trim_blocks` and `lstrip_blocks`, loop controls, Python's string and dict methods (`.strip()`,
//! `.startswith()`, `.items()`, ... from minijinja-contrib's pycompat), transformers' `raise_exception`,
//! `strftime_now` and `tojson`, and the context it passes: `messages`, `tools`, `documents`,
//! `add_generation_prompt`, the special tokens (`bos_token`, `eos_token`, ...) and any extra keyword
//! (`enable_thinking`, `date_string`, ...).

use std::collections::BTreeMap;

use minijinja::Environment;
use minijinja::syntax::SyntaxConfig;
use minijinja::value::Serde;
use serde::{Deserialize, Serialize};

use super::ChatError;
use super::template_functions::{raise_exception, strftime_now, tojson};
use super::tokenizer_config::SpecialTokens;

/// A JSON-like value handed to a template. Parsed from JSON, objects keep the order of their keys (a
/// template's `tojson` writes them in that order, as Python does).
pub type TemplateValue = minijinja::Value;

/// One message of a conversation: a role, its text, and whatever else the template may read
/// (`tool_calls`, `reasoning_content`, ...), as in OpenAI-style `messages` data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
    #[serde(flatten)]
    pub extra: BTreeMap<String, TemplateValue>,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
            extra: BTreeMap::new(),
        }
    }
}

/// What a rendering adds besides the messages.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RenderOptions {
    /// Ends with the header of the assistant's turn, so a model continues as the assistant.
    pub add_generation_prompt: bool,
    /// Function schemas for tool use (`tools`), when given.
    pub tools: Option<Vec<TemplateValue>>,
    /// Further keywords the template reads (`enable_thinking`, `date_string`, ...).
    pub extra: BTreeMap<String, TemplateValue>,
}

/// A compiled chat template with the special tokens it sees.
#[derive(Debug)]
pub struct ChatTemplate {
    environment: Environment<'static>,
    special_tokens: SpecialTokens,
}

/// The name the template is registered under (no extension, so nothing is HTML-escaped).
const TEMPLATE: &str = "chat_template";

impl ChatTemplate {
    /// Compiles `source`; a syntax error is reported here, not at the first rendering.
    pub fn new(source: String, special_tokens: SpecialTokens) -> Result<Self, ChatError> {
        let mut environment = Environment::new();
        let syntax = SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(template_error)?;
        environment.set_syntax(syntax);
        environment
            .set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        environment.add_function("raise_exception", raise_exception);
        environment.add_function("strftime_now", strftime_now);
        environment.add_filter("tojson", tojson);
        environment
            .add_template_owned(TEMPLATE, source)
            .map_err(template_error)?;
        Ok(Self {
            environment,
            special_tokens,
        })
    }

    /// The text of `messages` under this template.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        options: &RenderOptions,
    ) -> Result<String, ChatError> {
        let mut context: BTreeMap<String, TemplateValue> = BTreeMap::new();
        for (attribute, token) in &self.special_tokens.named {
            context.insert(attribute.clone(), TemplateValue::from(token.as_str()));
        }
        if !self.special_tokens.additional.is_empty() {
            context.insert(
                "additional_special_tokens".to_string(),
                TemplateValue::from(self.special_tokens.additional.clone()),
            );
        }
        context.insert("messages".to_string(), TemplateValue::from(Serde(messages)));
        context.insert(
            "tools".to_string(),
            options
                .tools
                .clone()
                .map_or(TemplateValue::from(()), TemplateValue::from),
        );
        context.insert("documents".to_string(), TemplateValue::from(()));
        context.insert(
            "add_generation_prompt".to_string(),
            TemplateValue::from(options.add_generation_prompt),
        );
        for (key, value) in &options.extra {
            context.insert(key.clone(), value.clone());
        }
        self.environment
            .get_template(TEMPLATE)
            .and_then(|template| template.render(TemplateValue::from(context)))
            .map_err(template_error)
    }
}

/// minijinja's error with its cause, as one line.
fn template_error(error: minijinja::Error) -> ChatError {
    let mut message = error.to_string();
    let mut source = std::error::Error::source(&error);
    while let Some(cause) = source {
        message.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    ChatError::Template(message)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn template(source: &str) -> ChatTemplate {
        let special = SpecialTokens {
            named: BTreeMap::from([("eos_token".to_string(), "</s>".to_string())]),
            additional: Vec::new(),
        };
        ChatTemplate::new(source.to_string(), special).unwrap()
    }

    #[test]
    fn renders_with_pythons_methods_and_transformers_functions() {
        let t = template(
            "{% for m in messages[::-1] %}{{ m.content.strip().upper() }}|{% endfor %}\
             {{ tools | tojson }}|{{ eos_token }}|{{ documents is none }}\n",
        );
        let messages = [
            ChatMessage::new("user", "  hi  "),
            ChatMessage::new("assistant", "yo"),
        ];
        let text = t.render(&messages, &RenderOptions::default()).unwrap();
        // Booleans print as Python prints them; Jinja drops the template's last newline, as transformers'
        // environment does.
        assert_eq!(text, "YO|HI|null|</s>|True");
    }

    #[test]
    fn raise_exception_and_syntax_errors_are_reported() {
        let t = template("{{ raise_exception('only user turns') }}");
        let error = t
            .render(&[], &RenderOptions::default())
            .unwrap_err()
            .to_string();
        assert!(error.contains("only user turns"), "{error}");
        let broken = ChatTemplate::new("{% if %}".to_string(), SpecialTokens::default());
        assert!(matches!(broken, Err(ChatError::Template(_))));
    }

    #[test]
    fn strftime_now_formats_the_current_date() {
        let t = template("{{ strftime_now('%Y') }}");
        let year = t.render(&[], &RenderOptions::default()).unwrap();
        assert_eq!(year, jiff::Zoned::now().year().to_string());
    }
}
