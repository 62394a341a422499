//! What `tokenizer_config.json` says besides the vocabulary: the special tokens a chat template sees
//! (`bos_token`, `eos_token`, ... as transformers' `special_tokens_map`), the chat template when it is stored
//! there (a string, or a list of named templates of which `default` is used, or `tool_use` when tools are
//! given), and whether decoding cleans up spaces before punctuation.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

use super::ChatError;

/// The special-token attributes transformers exposes to templates, in its order.
const SPECIAL_TOKEN_KEYS: [&str; 7] = [
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
];

/// The special tokens of a tokenizer by attribute (`eos_token` → `<|im_end|>`), and its additional special
/// tokens; unset or empty ones are left out, as transformers leaves them out of `special_tokens_map`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpecialTokens {
    pub named: BTreeMap<String, String>,
    pub additional: Vec<String>,
}

impl SpecialTokens {
    pub fn get(&self, attribute: &str) -> Option<&str> {
        self.named.get(attribute).map(String::as_str)
    }
}

/// The parts of `tokenizer_config.json` this room reads.
#[derive(Debug, Clone, Default)]
pub(super) struct TokenizerConfig {
    pub special_tokens: SpecialTokens,
    /// Named templates; a single template is named `default`.
    pub templates: BTreeMap<String, String>,
    pub clean_up_tokenization_spaces: bool,
}

/// A token as stored: its text, or an `AddedToken` object with a `content`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum StoredToken {
    Text(String),
    Object { content: String },
}

impl StoredToken {
    fn into_text(self) -> String {
        match self {
            Self::Text(text) | Self::Object { content: text } => text,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum StoredTemplates {
    One(String),
    Named(Vec<NamedTemplate>),
}

#[derive(Debug, Deserialize)]
struct NamedTemplate {
    name: String,
    template: String,
}

impl TokenizerConfig {
    pub(super) fn read(path: &Path) -> Result<Self, ChatError> {
        let text = std::fs::read_to_string(path).map_err(|source| ChatError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text).map_err(|reason| ChatError::Invalid {
            path: path.to_path_buf(),
            reason,
        })
    }

    fn parse(text: &str) -> Result<Self, String> {
        let json: serde_json::Value =
            serde_json::from_str(text).map_err(|e| format!("it is not valid JSON ({e})"))?;
        let token = |key: &str| -> Result<Option<String>, String> {
            match json.get(key) {
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(value) => serde_json::from_value::<StoredToken>(value.clone())
                    .map(|t| Some(t.into_text()).filter(|t| !t.is_empty()))
                    .map_err(|_| format!("`{key}` is neither a token nor an added-token object")),
            }
        };
        let mut named = BTreeMap::new();
        for key in SPECIAL_TOKEN_KEYS {
            if let Some(text) = token(key)? {
                named.insert(key.to_string(), text);
            }
        }
        let additional = match json.get("additional_special_tokens") {
            None | Some(serde_json::Value::Null) => Vec::new(),
            Some(list) => serde_json::from_value::<Vec<StoredToken>>(list.clone())
                .map_err(|_| "`additional_special_tokens` is not a list of tokens".to_string())?
                .into_iter()
                .map(StoredToken::into_text)
                .collect(),
        };
        let templates = match json.get("chat_template") {
            None | Some(serde_json::Value::Null) => BTreeMap::new(),
            Some(value) => match serde_json::from_value::<StoredTemplates>(value.clone()) {
                Ok(StoredTemplates::One(template)) => {
                    BTreeMap::from([("default".to_string(), template)])
                }
                Ok(StoredTemplates::Named(list)) => {
                    list.into_iter().map(|t| (t.name, t.template)).collect()
                }
                Err(_) => {
                    return Err(
                        "`chat_template` is neither a template nor a list of named templates"
                            .to_string(),
                    );
                }
            },
        };
        let clean_up_tokenization_spaces = json
            .get("clean_up_tokenization_spaces")
            .and_then(serde_json::Value::as_bool)
            .unwrap_or(false);
        Ok(Self {
            special_tokens: SpecialTokens { named, additional },
            templates,
            clean_up_tokenization_spaces,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_tokens_in_either_form_and_named_templates() {
        let config = TokenizerConfig::parse(
            r#"{"bos_token": null, "eos_token": {"__type": "AddedToken", "content": "</s>"},
                "pad_token": "<pad>", "unk_token": "", "additional_special_tokens": ["<a>", {"content": "<b>"}],
                "chat_template": [{"name": "default", "template": "D"}, {"name": "tool_use", "template": "T"}],
                "clean_up_tokenization_spaces": true}"#,
        )
        .unwrap();
        assert_eq!(config.special_tokens.get("eos_token"), Some("</s>"));
        assert_eq!(config.special_tokens.get("pad_token"), Some("<pad>"));
        assert_eq!(config.special_tokens.get("bos_token"), None);
        assert_eq!(config.special_tokens.get("unk_token"), None);
        assert_eq!(config.special_tokens.additional, ["<a>", "<b>"]);
        assert_eq!(config.templates["tool_use"], "T");
        assert!(config.clean_up_tokenization_spaces);
        let bad = TokenizerConfig::parse(r#"{"chat_template": 3}"#).unwrap_err();
        assert!(bad.contains("chat_template"), "{bad}");
    }
}
