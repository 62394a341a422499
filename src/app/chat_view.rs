//! The preview of a language model's adapter: a chat. A system prompt, a multi-turn conversation whose
//! replies stream in as they are generated, a strength slider (0–1.5) that asks for the last reply again, a
//! "Compare" button that answers the last question with the base model and with the adapter side by side,
//! and the seed, temperature and reply length. During a run the replies use the adapters as they are,
//! between steps; afterwards a checkpoint or the exported adapter folder.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use eframe::egui;

use super::StudioApp;
use crate::messages::{ChatLane, ChatRequest, ChatTurn, Job, PreviewSource};

/// The wait after the strength slider stops before the reply is asked for again.
const STRENGTH_DEBOUNCE: Duration = Duration::from_millis(300);

/// A reply being generated.
pub struct PendingReply {
    pub id: u64,
    pub compare: bool,
    pub strength: f64,
    pub adapter: String,
    pub base: String,
    /// Streamed pieces received for the adapter's reply.
    pub pieces: usize,
}

/// A question answered by the base model and by the adapter.
pub struct Comparison {
    pub question: String,
    pub base: String,
    pub adapter: String,
    pub strength: f64,
}

/// The chat on screen.
#[derive(Default)]
pub struct ChatState {
    next_id: u64,
    /// The conversation: user and assistant turns (the system prompt is in the settings).
    pub turns: Vec<ChatTurn>,
    pub input: String,
    pub pending: Option<PendingReply>,
    pub comparison: Option<Comparison>,
    /// The adapters replies use: the run (or the base alone), a checkpoint or an adapter folder.
    pub source: Option<PathBuf>,
    strength_changed_at: Option<Instant>,
    /// The newest request sent.
    pub requested_id: u64,
    /// The last reply's length and time.
    pub last_timing: Option<(usize, f64)>,
    /// How many streamed pieces the last complete reply arrived in.
    pub last_pieces: usize,
}

impl ChatState {
    /// A streamed piece of a reply.
    pub fn token(&mut self, id: u64, lane: ChatLane, text: &str) {
        if let Some(pending) = self.pending.as_mut().filter(|p| p.id == id) {
            match lane {
                ChatLane::Adapter => {
                    pending.adapter.push_str(text);
                    pending.pieces += 1;
                }
                ChatLane::Base => pending.base.push_str(text),
            }
        }
    }

    /// A whole reply.
    pub fn reply(&mut self, id: u64, lane: ChatLane, text: String, tokens: usize, seconds: f64) {
        let Some(pending) = self.pending.as_mut().filter(|p| p.id == id) else {
            return;
        };
        self.last_timing = Some((tokens, seconds));
        if lane == ChatLane::Base {
            pending.base = text;
            return;
        }
        let strength = pending.strength;
        let compare = pending.compare;
        self.last_pieces = pending.pieces;
        let base = std::mem::take(&mut pending.base);
        self.pending = None;
        if compare {
            self.comparison = Some(Comparison {
                question: self.last_question().unwrap_or_default(),
                base,
                adapter: text,
                strength,
            });
        } else {
            self.turns.push(ChatTurn::new("assistant", text));
        }
    }

    fn last_question(&self) -> Option<String> {
        self.turns
            .iter()
            .rev()
            .find(|t| t.role == "user")
            .map(|t| t.content.clone())
    }

    /// The conversation up to its last user turn (a reply after it is asked for again).
    fn up_to_last_question(&self) -> Option<Vec<ChatTurn>> {
        let last = self.turns.iter().rposition(|t| t.role == "user")?;
        Some(self.turns[..=last].to_vec())
    }
}

impl StudioApp {
    /// The chat's turns on screen (user and assistant).
    pub fn chat_turns(&self) -> &[ChatTurn] {
        &self.chat.turns
    }

    /// The id of the newest chat request sent (0: none).
    pub fn chat_requested_id(&self) -> u64 {
        self.chat.requested_id
    }

    /// How many streamed pieces the last complete reply arrived in.
    pub fn chat_pieces_streamed(&self) -> usize {
        self.chat.last_pieces
    }

    /// The last side-by-side comparison: (base model's reply, adapter's reply).
    pub fn chat_comparison(&self) -> Option<(&str, &str)> {
        self.chat
            .comparison
            .as_ref()
            .map(|c| (c.base.as_str(), c.adapter.as_str()))
    }

    /// The reply streaming in so far (the adapter's), if one is being generated.
    pub fn chat_streaming(&self) -> Option<&str> {
        self.chat.pending.as_ref().map(|p| p.adapter.as_str())
    }

    /// Sends a chat request for `messages`; `compare` also asks the base model.
    fn send_chat(&mut self, messages: Vec<ChatTurn>, compare: bool) {
        let chat = &mut self.chat;
        chat.next_id += 1;
        let mut settings = self.settings.chat.clone();
        if settings.system_prompt.trim().is_empty() {
            // The run's default system message, as training gave it.
            settings.system_prompt = self
                .settings
                .train
                .system_prompt
                .clone()
                .unwrap_or_default();
        }
        chat.pending = Some(PendingReply {
            id: chat.next_id,
            compare,
            strength: settings.strength,
            adapter: String::new(),
            base: String::new(),
            pieces: 0,
        });
        chat.requested_id = chat.next_id;
        let source = chat
            .source
            .clone()
            .map_or(PreviewSource::Live, PreviewSource::Checkpoint);
        let t = &self.settings.train;
        self.worker.send(Job::Chat(ChatRequest {
            id: chat.next_id,
            base_model: t.base_model.clone(),
            device: t.device.clone(),
            source,
            messages,
            settings,
            compare,
        }));
    }

    /// Asks for the last reply again (after a strength or source change).
    fn regenerate_last_reply(&mut self) {
        if let Some(messages) = self.chat.up_to_last_question() {
            self.chat.turns.truncate(messages.len());
            self.send_chat(messages, false);
        }
    }

    /// Once a frame: a strength that has been still for a moment asks for the last reply again.
    pub(super) fn send_chat_if_due(&mut self) {
        if self
            .chat
            .strength_changed_at
            .is_some_and(|t| t.elapsed() >= STRENGTH_DEBOUNCE)
        {
            self.chat.strength_changed_at = None;
            self.regenerate_last_reply();
        }
    }

    pub(super) fn chat_waiting(&self) -> bool {
        self.chat.strength_changed_at.is_some()
    }

    pub(super) fn chat_tab_ui(&mut self, ui: &mut egui::Ui) {
        if self.settings.train.base_model.as_os_str().is_empty() {
            ui.label("Choose a chat model on the Train tab first.");
            return;
        }
        egui::Panel::left("chat-settings")
            .resizable(true)
            .default_size(320.0)
            .show(ui, |ui| self.chat_settings_ui(ui));
        egui::CentralPanel::default().show(ui, |ui| self.chat_conversation_ui(ui));
    }

    fn chat_settings_ui(&mut self, ui: &mut egui::Ui) {
        let label = ui.label("System prompt");
        let run_prompt = self
            .settings
            .train
            .system_prompt
            .clone()
            .unwrap_or_default();
        ui.add(
            egui::TextEdit::multiline(&mut self.settings.chat.system_prompt)
                .desired_rows(3)
                .desired_width(f32::INFINITY)
                .hint_text(if run_prompt.is_empty() {
                    "none".to_string()
                } else {
                    format!("the run's: {run_prompt}")
                }),
        )
        .labelled_by(label.id);
        let s = &mut self.settings.chat;
        let strength = ui
            .horizontal(|ui| {
                let label = ui.label("LoRA strength").on_hover_text(
                    "0 is the base model alone, 1 the adapter as trained; the last reply is asked for again",
                );
                ui.add(egui::Slider::new(&mut s.strength, 0.0..=1.5).step_by(0.05))
                    .labelled_by(label.id)
            })
            .inner;
        if strength.changed() {
            self.chat.strength_changed_at = Some(Instant::now());
        }
        let s = &mut self.settings.chat;
        ui.horizontal(|ui| {
            let label = ui
                .label("Temperature")
                .on_hover_text("0 always picks the most likely word");
            ui.add(egui::Slider::new(&mut s.temperature, 0.0..=1.5).step_by(0.05))
                .labelled_by(label.id);
        });
        ui.horizontal(|ui| {
            let label = ui.label("Seed");
            ui.add(egui::DragValue::new(&mut s.seed))
                .labelled_by(label.id);
        });
        ui.horizontal(|ui| {
            let label = ui.label("Longest reply (tokens)");
            ui.add(egui::DragValue::new(&mut s.max_new_tokens).range(1..=4096))
                .labelled_by(label.id);
        });
        ui.separator();
        self.chat_source_ui(ui);
        ui.separator();
        let asked = self.chat.up_to_last_question().is_some();
        if ui
            .add_enabled(asked, egui::Button::new("Compare with the base model"))
            .on_hover_text(
                "the last question answered by the base model and by the adapter, side by side",
            )
            .clicked()
            && let Some(messages) = self.chat.up_to_last_question()
        {
            self.send_chat(messages, true);
        }
        if ui.button("New conversation").clicked() {
            self.chat.turns.clear();
            self.chat.comparison = None;
            self.chat.pending = None;
        }
        if let Some((tokens, seconds)) = self.chat.last_timing {
            ui.weak(format!(
                "last reply: {tokens} tokens in {seconds:.1} s ({:.1} tokens/s)",
                tokens as f64 / seconds.max(1e-6)
            ));
        }
    }

    /// Chooses the adapters the replies use.
    fn chat_source_ui(&mut self, ui: &mut egui::Ui) {
        let name = |path: &std::path::Path| {
            path.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        };
        let mut choices: Vec<(Option<PathBuf>, String)> = vec![(
            None,
            if self.run.active() {
                "the run, as it is now".to_string()
            } else {
                "the base model alone".to_string()
            },
        )];
        if let Some(adapter) = self.run.lora.clone().filter(|p| p.is_dir()) {
            choices.push((Some(adapter.clone()), format!("adapter {}", name(&adapter))));
        }
        for (step, path) in self.run.checkpoints.iter().rev() {
            choices.push((Some(path.clone()), format!("{} (step {step})", name(path))));
        }
        let shown = choices
            .iter()
            .find(|(p, _)| *p == self.chat.source)
            .map_or_else(
                || self.chat.source.as_deref().map(name).unwrap_or_default(),
                |(_, text)| text.clone(),
            );
        let before = self.chat.source.clone();
        ui.horizontal(|ui| {
            let label = ui.label("Adapter");
            egui::ComboBox::from_id_salt("chat source")
                .selected_text(shown)
                .show_ui(ui, |ui| {
                    for (path, text) in choices {
                        ui.selectable_value(&mut self.chat.source, path, text);
                    }
                })
                .response
                .labelled_by(label.id);
        });
        if self.chat.source != before {
            self.regenerate_last_reply();
        }
    }

    fn chat_conversation_ui(&mut self, ui: &mut egui::Ui) {
        let mut send = false;
        egui::Panel::bottom("chat-input").show(ui, |ui| {
            ui.horizontal(|ui| {
                let label = ui.label("Message");
                let response = ui
                    .add(
                        egui::TextEdit::multiline(&mut self.chat.input)
                            .desired_rows(2)
                            .desired_width(ui.available_width() - 80.0)
                            .hint_text("Ask something your adapter should answer in its voice"),
                    )
                    .labelled_by(label.id);
                let enter = response.has_focus()
                    && ui.input(|i| i.key_pressed(egui::Key::Enter) && !i.modifiers.shift);
                send = ui.button("Send").clicked() || enter;
            });
        });
        if send && !self.chat.input.trim().is_empty() {
            let text = std::mem::take(&mut self.chat.input);
            self.chat
                .turns
                .push(ChatTurn::new("user", text.trim_end_matches('\n')));
            self.chat.comparison = None;
            let messages = self.chat.turns.clone();
            self.send_chat(messages, false);
        }
        egui::ScrollArea::vertical()
            .auto_shrink([false, false])
            .stick_to_bottom(true)
            .show(ui, |ui| {
                let system = &self.settings.chat.system_prompt;
                if !system.trim().is_empty() {
                    ui.weak(format!("System: {system}"));
                }
                for turn in &self.chat.turns {
                    turn_ui(ui, &turn.role, &turn.content);
                }
                if let Some(pending) = &self.chat.pending {
                    if pending.compare {
                        ui.horizontal(|ui| {
                            ui.spinner();
                            ui.label("answering with the base model, then with the adapter…");
                        });
                        ui.columns(2, |columns| {
                            columns[0].strong("Base model");
                            columns[0].label(&pending.base);
                            columns[1].strong(format!("Adapter at {:.2}", pending.strength));
                            columns[1].label(&pending.adapter);
                        });
                    } else {
                        ui.horizontal(|ui| {
                            ui.spinner();
                            ui.strong("Assistant");
                        });
                        ui.label(&pending.adapter);
                    }
                }
                if let Some(comparison) = &self.chat.comparison {
                    ui.separator();
                    ui.strong(format!("“{}”", comparison.question));
                    ui.columns(2, |columns| {
                        columns[0].strong("Base model");
                        columns[0].label(&comparison.base);
                        columns[1].strong(format!("Adapter at {:.2}", comparison.strength));
                        columns[1].label(&comparison.adapter);
                    });
                }
            });
    }
}

/// One turn of the conversation.
fn turn_ui(ui: &mut egui::Ui, role: &str, content: &str) {
    let who = if role == "user" { "You" } else { "Assistant" };
    let frame = egui::Frame::group(ui.style()).fill(if role == "user" {
        ui.visuals().faint_bg_color
    } else {
        ui.visuals().extreme_bg_color
    });
    frame.show(ui, |ui| {
        ui.set_width(ui.available_width());
        ui.strong(who);
        ui.label(content);
    });
}

#[cfg(test)]
mod tests {
    use super::{ChatState, PendingReply};
    use crate::messages::{ChatLane, ChatTurn};

    fn pending(id: u64, compare: bool) -> PendingReply {
        PendingReply {
            id,
            compare,
            strength: 0.8,
            adapter: String::new(),
            base: String::new(),
            pieces: 0,
        }
    }

    #[test]
    fn a_streamed_reply_joins_the_conversation_and_a_comparison_stands_beside_it() {
        let mut chat = ChatState {
            turns: vec![ChatTurn::new("user", "Where is my order?")],
            pending: Some(pending(2, false)),
            ..Default::default()
        };
        chat.token(1, ChatLane::Adapter, "late answer to an older question");
        chat.token(2, ChatLane::Adapter, "It ships ");
        chat.token(2, ChatLane::Adapter, "today.");
        assert_eq!(chat.pending.as_ref().unwrap().adapter, "It ships today.");
        chat.reply(2, ChatLane::Adapter, "It ships today.".into(), 5, 0.5);
        assert_eq!(chat.turns.last().unwrap().content, "It ships today.");
        assert_eq!(chat.last_pieces, 2);
        assert_eq!(chat.up_to_last_question().unwrap().len(), 1);

        chat.pending = Some(pending(3, true));
        chat.reply(3, ChatLane::Base, "base words".into(), 2, 0.1);
        chat.reply(3, ChatLane::Adapter, "adapter words".into(), 2, 0.1);
        let comparison = chat.comparison.as_ref().unwrap();
        assert_eq!(
            (comparison.base.as_str(), comparison.adapter.as_str()),
            ("base words", "adapter words")
        );
        assert_eq!(comparison.question, "Where is my order?");
        assert_eq!(
            chat.turns.len(),
            2,
            "a comparison does not extend the conversation"
        );
        assert!(chat.pending.is_none());
    }
}
