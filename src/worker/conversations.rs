//! The conversation dataset the app edits, owned by the files thread: `OpenConversations` reads it and
//! sends its view, `EditConversations` changes and saves it and sends what changed; after both, the samples
//! go to their own checks thread, which counts tokens with the base model's tokenizer and chat template (as
//! training renders them) and sends the badges. Token counts are kept per sample content, so an edit
//! recounts only the samples it changed, and a newer request stops an older count between chunks.
//!
//! Must not hold up the files thread with tokenizing, nor write files itself (the document does).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender};
use rayon::prelude::*;

use super::{Outbox, contain};
use crate::chat::ChatFiles;
use crate::data::text::{
    ConversationDocument, EditError, Role, Sample, TextSample, Turn, conversation_badges,
};
use crate::messages::{ConversationEdit, ConversationsView, Event, RowFormat, TextBadge};
use crate::train::{is_language_model_folder, sample_token_count};

/// Samples tokenized between two looks for a newer request.
const COUNT_CHUNK: usize = 1024;

/// What the token counts depend on besides the samples.
#[derive(Debug, Clone, PartialEq, Eq)]
struct CountSettings {
    base_model: PathBuf,
    max_seq_length: usize,
    system_prompt: Option<String>,
}

struct CheckRequest {
    root: PathBuf,
    samples: Vec<Arc<Sample>>,
    settings: CountSettings,
}

/// The open dataset, and the way to its checks thread.
pub(super) struct Conversations {
    document: Option<ConversationDocument>,
    settings: Option<CountSettings>,
    checks: Sender<CheckRequest>,
}

impl Conversations {
    /// Starts the checks thread.
    pub fn start(outbox: &Outbox) -> Self {
        let (checks, requests) = crossbeam_channel::unbounded();
        let checks_outbox = outbox.clone();
        let started = std::thread::Builder::new()
            .name("lora-studio-text-checks".into())
            .spawn(move || run_checks(requests, checks_outbox));
        if let Err(e) = started {
            outbox.error(format!("the conversation checks could not start: {e}"));
        }
        Self {
            document: None,
            settings: None,
            checks,
        }
    }

    /// Reads the dataset at `path`, sends its view, then has it checked.
    pub fn open(
        &mut self,
        path: &Path,
        base_model: PathBuf,
        max_seq_length: u32,
        system_prompt: Option<String>,
        outbox: &Outbox,
    ) {
        let document = match ConversationDocument::open(path) {
            Ok(document) => document,
            Err(e) => return outbox.error(e.to_string()),
        };
        outbox.send(Event::Conversations(view(&document)));
        self.settings = Some(CountSettings {
            base_model,
            max_seq_length: max_seq_length as usize,
            system_prompt: system_prompt.filter(|s| !s.trim().is_empty()),
        });
        self.document = Some(document);
        self.check();
    }

    /// Applies `edit` to the dataset open at `root` (saving its files), sends what changed, then has it
    /// checked again.
    pub fn edit(&mut self, root: &Path, edit: ConversationEdit, outbox: &Outbox) {
        let Some(document) = self.document.as_mut().filter(|d| d.root() == root) else {
            return outbox.error(format!(
                "{} is not open for editing; open it again",
                root.display()
            ));
        };
        match apply(document, edit, outbox) {
            Ok(Changed::Nothing) => {}
            Ok(Changed::One(index)) => match document.entry(index) {
                Ok(entry) => outbox.send(Event::ConversationChanged {
                    root: root.to_path_buf(),
                    index,
                    entry,
                    can_undo: document.can_undo(),
                }),
                Err(e) => outbox.error(e.to_string()),
            },
            Ok(Changed::All) => outbox.send(Event::Conversations(view(document))),
            Err(e) => return outbox.error(e.to_string()),
        }
        self.check();
    }

    fn check(&self) {
        if let (Some(document), Some(settings)) = (&self.document, &self.settings) {
            let _ = self.checks.send(CheckRequest {
                root: document.root().to_path_buf(),
                samples: document.samples(),
                settings: settings.clone(),
            });
        }
    }
}

/// What an edit changed, for the event that tells it.
enum Changed {
    Nothing,
    One(usize),
    All,
}

fn apply(
    document: &mut ConversationDocument,
    edit: ConversationEdit,
    outbox: &Outbox,
) -> Result<Changed, EditError> {
    Ok(match edit {
        ConversationEdit::SetTurns { index, turns } => {
            document.set_turns(index, &turns)?;
            Changed::One(index)
        }
        ConversationEdit::Add { after } => {
            document.add(after)?;
            Changed::All
        }
        ConversationEdit::Delete { index } => {
            document.delete(index)?;
            Changed::All
        }
        ConversationEdit::Duplicate { index } => {
            document.duplicate(index)?;
            Changed::All
        }
        ConversationEdit::Replace {
            find,
            replace,
            match_case,
        } => match document.replace(&find, &replace, match_case)? {
            0 => {
                outbox.send(Event::Info(format!("No sample contains “{find}”.")));
                Changed::Nothing
            }
            _ => Changed::All,
        },
        ConversationEdit::Undo => match document.undo()? {
            true => Changed::All,
            false => Changed::Nothing,
        },
    })
}

fn view(document: &ConversationDocument) -> ConversationsView {
    let (entries, unparsed) = document.entries();
    ConversationsView {
        root: document.root().to_path_buf(),
        entries,
        unparsed,
        can_undo: document.can_undo(),
    }
}

/// The base model's tokenizer and template (or why there is none), and the counts made with them.
struct TokenCounter {
    base_model: PathBuf,
    system_prompt: Option<String>,
    files: Result<ChatFiles, String>,
    /// By sample fingerprint; `None` for a sample training cannot render.
    counts: HashMap<u64, Option<usize>>,
}

impl TokenCounter {
    fn new(settings: &CountSettings) -> Self {
        let base = &settings.base_model;
        let files = if is_language_model_folder(base) {
            ChatFiles::open(base).map_err(|e| e.to_string())
        } else {
            Err(format!(
                "{} is not a language model folder (one with a config.json)",
                base.display()
            ))
        };
        Self {
            base_model: base.clone(),
            system_prompt: settings.system_prompt.clone(),
            files,
            counts: HashMap::new(),
        }
    }

    fn fits(&self, settings: &CountSettings) -> bool {
        self.base_model == settings.base_model && self.system_prompt == settings.system_prompt
    }
}

/// The checks thread: badges and token counts of the newest request (older ones still waiting are
/// skipped; a newer one stops the count in progress).
fn run_checks(requests: Receiver<CheckRequest>, outbox: Outbox) {
    let mut counter: Option<TokenCounter> = None;
    while let Ok(mut request) = requests.recv() {
        while let Ok(newer) = requests.try_recv() {
            request = newer;
        }
        contain(&outbox, "checking the conversations", || {
            check(&request, &mut counter, &requests, &outbox)
        });
    }
}

fn check(
    request: &CheckRequest,
    counter: &mut Option<TokenCounter>,
    requests: &Receiver<CheckRequest>,
    outbox: &Outbox,
) {
    let settings = &request.settings;
    let counter = match counter {
        Some(c) if c.fits(settings) => c,
        _ => {
            let fresh = counter.insert(TokenCounter::new(settings));
            if let Err(reason) = &fresh.files {
                outbox.send(Event::Info(format!(
                    "The samples' token counts need a language model as the base model: {reason}."
                )));
            }
            fresh
        }
    };
    let mut badges = conversation_badges(&request.samples);
    let tokens: Vec<Option<usize>> = match &counter.files {
        Err(_) => vec![None; request.samples.len()],
        Ok(files) => {
            let mut missing: Vec<&Arc<Sample>> = request
                .samples
                .iter()
                .filter(|s| !counter.counts.contains_key(&s.fingerprint))
                .collect();
            missing.dedup_by_key(|s| s.fingerprint);
            for chunk in missing.chunks(COUNT_CHUNK) {
                if !requests.is_empty() {
                    return;
                }
                let counted: Vec<(u64, Option<usize>)> = chunk
                    .par_iter()
                    .map(|s| (s.fingerprint, count(files, s, settings)))
                    .collect();
                counter.counts.extend(counted);
            }
            request
                .samples
                .iter()
                .map(|s| counter.counts.get(&s.fingerprint).copied().flatten())
                .collect()
        }
    };
    for ((sample, count), badges) in request.samples.iter().zip(&tokens).zip(&mut badges) {
        if let Some(tokens) = *count
            && sample.format != RowFormat::Text
            && tokens > settings.max_seq_length
        {
            badges.push(TextBadge::OverLength {
                tokens,
                max: settings.max_seq_length,
            });
        }
    }
    outbox.send(Event::ConversationChecks {
        root: request.root.clone(),
        tokens,
        badges,
    });
}

/// The sample's tokens as training renders it; `None` when training cannot (an unknown role, a template
/// that refuses it).
fn count(files: &ChatFiles, sample: &Sample, settings: &CountSettings) -> Option<usize> {
    let text_sample = if sample.format == RowFormat::Text {
        TextSample::Text(sample.turns.first()?.content.clone())
    } else {
        let turns = sample
            .turns
            .iter()
            .map(|t| Some(Turn::new(Role::parse(&t.role)?, t.content.clone())))
            .collect::<Option<Vec<_>>>()?;
        TextSample::Conversation(turns)
    };
    sample_token_count(files, &text_sample, settings.system_prompt.as_deref()).ok()
}
