//! Everything the chat room reads from a language model folder, opened at once: `tokenizer.json`,
//! `tokenizer_config.json` (special tokens, clean-up, the template if stored there), `chat_template.jinja`
//! (which transformers prefers when both exist), and the stop ids and sampling defaults.

use std::path::{Path, PathBuf};

use super::ChatError;
use super::generation::GenerationDefaults;
use super::template::{ChatMessage, ChatTemplate, RenderOptions};
use super::tokenizer::TextTokenizer;
use super::tokenizer_config::{SpecialTokens, TokenizerConfig};

/// The template name transformers uses when tools are given and the model has one for them.
const TOOL_USE_TEMPLATE: &str = "tool_use";

/// A model folder's tokenizer, chat templates and generation defaults.
#[derive(Debug)]
pub struct ChatFiles {
    folder: PathBuf,
    tokenizer: TextTokenizer,
    /// `default` and any other named templates.
    templates: Vec<(String, ChatTemplate)>,
    special_tokens: SpecialTokens,
    generation: GenerationDefaults,
}

impl ChatFiles {
    pub fn open(folder: &Path) -> Result<Self, ChatError> {
        let required = |file: &'static str| {
            let path = folder.join(file);
            if path.is_file() {
                Ok(path)
            } else {
                Err(ChatError::MissingFile {
                    folder: folder.to_path_buf(),
                    file,
                })
            }
        };
        let tokenizer_path = required("tokenizer.json")?;
        let config = TokenizerConfig::read(&required("tokenizer_config.json")?)?;
        let tokenizer =
            TextTokenizer::from_file(&tokenizer_path, config.clean_up_tokenization_spaces)?;
        let mut sources = config.templates;
        let jinja = folder.join("chat_template.jinja");
        if jinja.is_file() {
            let text = std::fs::read_to_string(&jinja).map_err(|source| ChatError::Read {
                path: jinja.clone(),
                source,
            })?;
            sources.insert("default".to_string(), text);
        }
        let templates = sources
            .into_iter()
            .map(|(name, source)| {
                let template = ChatTemplate::new(source, config.special_tokens.clone())?;
                Ok((name, template))
            })
            .collect::<Result<Vec<_>, ChatError>>()?;
        let eos_id = config
            .special_tokens
            .get("eos_token")
            .and_then(|token| tokenizer.token_id(token));
        Ok(Self {
            folder: folder.to_path_buf(),
            generation: GenerationDefaults::read(folder, eos_id)?,
            tokenizer,
            templates,
            special_tokens: config.special_tokens,
        })
    }

    pub fn tokenizer(&self) -> &TextTokenizer {
        &self.tokenizer
    }

    pub fn special_tokens(&self) -> &SpecialTokens {
        &self.special_tokens
    }

    pub fn generation(&self) -> &GenerationDefaults {
        &self.generation
    }

    /// The template transformers would pick: `tool_use` when tools are given and the model has one,
    /// otherwise `default`.
    pub fn template(&self, with_tools: bool) -> Result<&ChatTemplate, ChatError> {
        let named = |name: &str| self.templates.iter().find(|(n, _)| n == name);
        let chosen = with_tools
            .then(|| named(TOOL_USE_TEMPLATE))
            .flatten()
            .or_else(|| named("default"));
        chosen.map(|(_, t)| t).ok_or_else(|| ChatError::NoTemplate {
            folder: self.folder.clone(),
        })
    }

    /// The conversation's text under the model's template.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        options: &RenderOptions,
    ) -> Result<String, ChatError> {
        self.template(options.tools.is_some())?
            .render(messages, options)
    }

    /// The conversation's token ids, as `apply_chat_template(..., tokenize=True)` gives them: the rendered
    /// text encoded without adding special tokens (the template writes them).
    pub fn encode_chat(
        &self,
        messages: &[ChatMessage],
        options: &RenderOptions,
    ) -> Result<Vec<u32>, ChatError> {
        self.tokenizer
            .encode(&self.render(messages, options)?, false)
    }
}
