//! The dataset view of a language model's conversations: a list of the samples (first user line, turn
//! count, token count against `max_seq_length`, problem badges) that stays quick with tens of thousands of
//! rows, a detail pane to read and edit one sample turn by turn, add/duplicate/delete, find-and-replace
//! across samples, undo, and the rows that could not be read with their file and line. The files thread
//! owns the files: every change is a job, saved there atomically in the file's own format.

use std::path::PathBuf;

use eframe::egui;

use super::StudioApp;
use crate::messages::{
    ChatTurn, ConversationEdit, ConversationEntry, ConversationsView, Job, RowFormat, TextBadge,
};

/// The open conversation dataset and the edit in progress.
#[derive(Default)]
pub struct ConversationsState {
    pub view: Option<ConversationsView>,
    /// Token counts in entry order (`None`: not counted, or no tokenizer).
    pub tokens: Vec<Option<usize>>,
    pub badges: Vec<Vec<TextBadge>>,
    pub selected: Option<usize>,
    /// The selected sample's turns as the user edits them; sent when an edit ends, kept on screen until the
    /// files thread answers with the saved sample.
    draft: Option<(usize, Vec<ChatTurn>)>,
    /// The last draft sent, so that it is sent once.
    sent: Option<(usize, Vec<ChatTurn>)>,
    pub find: String,
    pub replace: String,
    pub match_case: bool,
    pub only_problems: bool,
    /// Edits sent and not yet answered by the files thread.
    pub edits_in_flight: usize,
    /// The base model and system prompt the token counts were asked with.
    counted_with: Option<(PathBuf, Option<String>)>,
}

impl ConversationsState {
    /// A dataset was read, or changed as a whole.
    pub fn set_view(&mut self, view: ConversationsView) {
        let same_root = self.view.as_ref().is_some_and(|v| v.root == view.root);
        let count = view.entries.len();
        if !same_root {
            self.selected = None;
        }
        self.selected = self.selected.filter(|&i| i < count);
        if self.tokens.len() != count {
            self.tokens = vec![None; count];
            self.badges = vec![Vec::new(); count];
        }
        self.draft = None;
        self.edits_in_flight = self.edits_in_flight.saturating_sub(1);
        self.view = Some(view);
    }

    /// One sample changed on disk.
    pub fn changed(&mut self, root: &PathBuf, index: usize, entry: ConversationEntry, undo: bool) {
        self.edits_in_flight = self.edits_in_flight.saturating_sub(1);
        let Some(view) = self.view.as_mut().filter(|v| &v.root == root) else {
            return;
        };
        view.can_undo = undo;
        if let Some(slot) = view.entries.get_mut(index) {
            *slot = entry;
        }
        if self
            .draft
            .as_ref()
            .is_some_and(|(i, turns)| *i == index && *turns == view.entries[index].turns)
        {
            self.draft = None;
        }
    }

    pub fn checked(
        &mut self,
        root: &PathBuf,
        tokens: Vec<Option<usize>>,
        badges: Vec<Vec<TextBadge>>,
    ) {
        if self.view.as_ref().is_some_and(|v| &v.root == root) {
            self.tokens = tokens;
            self.badges = badges;
        }
    }

    pub fn len(&self) -> usize {
        self.view.as_ref().map_or(0, |v| v.entries.len())
    }

    /// The problems of sample `index`, its length measured against `max_seq_length` as set now (the
    /// counts do not depend on it, so changing it needs no new count).
    fn badges_of(&self, index: usize, max_seq_length: usize) -> Vec<TextBadge> {
        let mut badges: Vec<TextBadge> = self
            .badges
            .get(index)
            .into_iter()
            .flatten()
            .filter(|b| !matches!(b, TextBadge::OverLength { .. }))
            .cloned()
            .collect();
        if let Some(tokens) = self.over_length(index, max_seq_length) {
            badges.push(TextBadge::OverLength {
                tokens,
                max: max_seq_length,
            });
        }
        badges
    }

    /// The tokens of sample `index` when they are more than `max_seq_length` and it is a conversation
    /// (training cuts it; a long text is split into pieces instead).
    fn over_length(&self, index: usize, max_seq_length: usize) -> Option<usize> {
        let tokens = self.tokens.get(index).copied().flatten()?;
        let entry = self.view.as_ref()?.entries.get(index)?;
        (tokens > max_seq_length && entry.format != RowFormat::Text).then_some(tokens)
    }

    /// Whether sample `index` has a problem ([`Self::badges_of`] is not empty), without building its
    /// badges: the list asks it of every sample every frame.
    fn has_problem(&self, index: usize, max_seq_length: usize) -> bool {
        let flagged = self.badges.get(index).is_some_and(|badges| {
            badges
                .iter()
                .any(|b| !matches!(b, TextBadge::OverLength { .. }))
        });
        flagged || self.over_length(index, max_seq_length).is_some()
    }

    /// The sample indices the list shows.
    fn visible(&self, max_seq_length: usize) -> Vec<usize> {
        (0..self.len())
            .filter(|&i| !self.only_problems || self.has_problem(i, max_seq_length))
            .collect()
    }

    /// Whether the draft holds a change not sent yet.
    fn draft_pending(&self) -> bool {
        let (Some((index, turns)), Some(view)) = (&self.draft, &self.view) else {
            return false;
        };
        view.entries.get(*index).is_some_and(|e| &e.turns != turns)
            && self.sent.as_ref() != self.draft.as_ref()
    }

    /// The job that saves the draft, when it holds a change not sent yet.
    pub fn draft_edit(&mut self) -> Option<Job> {
        if !self.draft_pending() {
            return None;
        }
        let (index, turns) = self.draft.clone()?;
        let root = self.view.as_ref()?.root.clone();
        self.sent = Some((index, turns.clone()));
        self.edits_in_flight += 1;
        Some(Job::EditConversations {
            root,
            edit: ConversationEdit::SetTurns { index, turns },
        })
    }

    /// The job for an edit of the whole dataset (the draft is saved first by the caller).
    fn edit_job(&mut self, edit: ConversationEdit) -> Option<Job> {
        let root = self.view.as_ref()?.root.clone();
        self.edits_in_flight += 1;
        Some(Job::EditConversations { root, edit })
    }
}

/// The first line of the sample's first user turn (or of its first turn), for the list.
fn first_line(entry: &ConversationEntry) -> &str {
    let turn = entry
        .turns
        .iter()
        .find(|t| matches!(t.role.as_str(), "user" | "human" | "text"))
        .or(entry.turns.first());
    turn.and_then(|t| t.content.lines().find(|l| !l.trim().is_empty()))
        .unwrap_or("(empty)")
}

/// A badge's short text and its explanation.
fn badge_text(badge: &TextBadge) -> (String, String) {
    match badge {
        TextBadge::EmptyAssistantTurn => (
            "empty reply".into(),
            "an assistant turn has no text: it teaches the model to say nothing".into(),
        ),
        TextBadge::NoAssistantTurn => (
            "no reply".into(),
            "no assistant turn: nothing to learn from; training skips it".into(),
        ),
        TextBadge::UnknownRole(role) => (
            format!("role “{role}”"),
            format!("“{role}” is not system, user or assistant: training skips this sample"),
        ),
        TextBadge::Duplicate { of } => (
            format!("same as #{}", of + 1),
            format!("the same turns as sample {}", of + 1),
        ),
        TextBadge::OverLength { tokens, max } => (
            format!("cut: {tokens} > {max}"),
            format!(
                "{tokens} tokens, longer than the maximum sequence length {max}: the end is cut"
            ),
        ),
    }
}

/// The roles offered for a row of `format` (the names the file uses).
fn roles_of(format: RowFormat) -> &'static [&'static str] {
    match format {
        RowFormat::ShareGpt => &["system", "human", "gpt"],
        RowFormat::Text => &["text"],
        RowFormat::OpenAi | RowFormat::Alpaca => &["system", "user", "assistant"],
    }
}

const LIST_ROW_HEIGHT: f32 = 22.0;

impl StudioApp {
    /// The number of samples in the open conversation dataset.
    pub fn conversations_len(&self) -> usize {
        self.conversations.len()
    }

    /// How many samples have a token count.
    pub fn conversations_counted(&self) -> usize {
        self.conversations.tokens.iter().flatten().count()
    }

    /// Conversation edits sent and not yet saved.
    pub fn unsaved_conversation_edits(&self) -> usize {
        self.conversations.edits_in_flight + usize::from(self.conversations.draft_pending())
    }

    /// Opens a language model's dataset (a `.jsonl`/`.json`/`.txt` file or a folder of them).
    pub(super) fn open_conversations(&mut self, path: PathBuf) {
        self.flush_conversation_draft();
        self.settings.train.train_data_dir = path.clone();
        self.conversations = ConversationsState::default();
        self.send_open_conversations();
    }

    /// Reads the conversation dataset of the settings again (with the base model's tokenizer).
    pub(super) fn send_open_conversations(&mut self) {
        let t = &self.settings.train;
        if t.train_data_dir.as_os_str().is_empty() {
            return;
        }
        self.conversations.counted_with = Some((t.base_model.clone(), t.system_prompt.clone()));
        self.worker.send(Job::OpenConversations {
            path: t.train_data_dir.clone(),
            base_model: t.base_model.clone(),
            max_seq_length: t.max_seq_length,
            system_prompt: t.system_prompt.clone(),
        });
    }

    /// Sends the edit of the selected sample, if it has one.
    pub fn flush_conversation_draft(&mut self) {
        if let Some(job) = self.conversations.draft_edit() {
            self.worker.send(job);
        }
    }

    fn conversation_edit(&mut self, edit: ConversationEdit) {
        self.flush_conversation_draft();
        if let Some(job) = self.conversations.edit_job(edit) {
            self.worker.send(job);
        }
    }

    pub(super) fn conversations_tab_ui(&mut self, ui: &mut egui::Ui) {
        let t = &self.settings.train;
        let counted_with = Some((t.base_model.clone(), t.system_prompt.clone()));
        let max = t.max_seq_length as usize;
        if self.conversations.view.is_some()
            && self.conversations.counted_with != counted_with
            && self.conversations.edits_in_flight == 0
        {
            // Another tokenizer or system prompt: the samples are counted again.
            self.flush_conversation_draft();
            self.send_open_conversations();
        }
        let Some(view) = &self.conversations.view else {
            ui.vertical_centered(|ui| {
                ui.add_space(60.0);
                ui.heading("Drop your conversations on the window");
                ui.label(
                    "A .jsonl or .json file (OpenAI messages, ShareGPT or Alpaca rows), a .txt file, \
                     or a folder of them.",
                );
            });
            return;
        };
        let problems = (0..view.entries.len())
            .filter(|&i| self.conversations.has_problem(i, max))
            .count();
        let summary = format!(
            "{}: {} samples, {} with problems, {} unreadable",
            view.root.display(),
            view.entries.len(),
            problems,
            rows_text(view.unparsed.len())
        );
        let view_unparsed_empty = view.unparsed.is_empty();
        let can_undo = view.can_undo;
        ui.label(summary);
        self.conversation_tools_ui(ui, can_undo);
        ui.separator();
        egui::Panel::right("conversation-detail")
            .resizable(true)
            .default_size(540.0)
            .min_size(320.0)
            .show(ui, |ui| self.conversation_detail_ui(ui));
        if !view_unparsed_empty {
            egui::Panel::bottom("unparsed-rows")
                .resizable(true)
                .show(ui, |ui| self.unparsed_rows_ui(ui));
        }
        egui::CentralPanel::default().show(ui, |ui| self.conversation_list_ui(ui));
    }

    fn conversation_tools_ui(&mut self, ui: &mut egui::Ui, can_undo: bool) {
        let mut edit = None;
        ui.horizontal(|ui| {
            let c = &mut self.conversations;
            let label = ui.label("Find");
            ui.add(egui::TextEdit::singleline(&mut c.find).desired_width(140.0))
                .labelled_by(label.id);
            let label = ui.label("Replace with");
            ui.add(egui::TextEdit::singleline(&mut c.replace).desired_width(140.0))
                .labelled_by(label.id);
            ui.checkbox(&mut c.match_case, "Match case");
            if ui
                .add_enabled(!c.find.is_empty(), egui::Button::new("Replace all"))
                .on_hover_text("in every turn of every sample")
                .clicked()
            {
                edit = Some(ConversationEdit::Replace {
                    find: c.find.clone(),
                    replace: c.replace.clone(),
                    match_case: c.match_case,
                });
            }
            ui.separator();
            if ui
                .add_enabled(can_undo, egui::Button::new("Undo"))
                .clicked()
            {
                edit = Some(ConversationEdit::Undo);
            }
            if ui
                .button("Add sample")
                .on_hover_text("an empty conversation after the selected one")
                .clicked()
            {
                edit = Some(ConversationEdit::Add { after: c.selected });
            }
            ui.checkbox(&mut c.only_problems, "Only samples with problems");
        });
        if let Some(edit) = edit {
            self.conversation_edit(edit);
        }
    }

    fn conversation_list_ui(&mut self, ui: &mut egui::Ui) {
        let max = self.settings.train.max_seq_length as usize;
        let visible = self.conversations.visible(max);
        let mut clicked = None;
        egui::ScrollArea::vertical()
            .auto_shrink([false, false])
            .show_rows(ui, LIST_ROW_HEIGHT, visible.len(), |ui, rows| {
                let c = &self.conversations;
                let Some(view) = &c.view else { return };
                for &index in &visible[rows] {
                    let entry = &view.entries[index];
                    ui.horizontal(|ui| {
                        ui.set_height(LIST_ROW_HEIGHT);
                        let selected = c.selected == Some(index);
                        let line: String = first_line(entry).chars().take(90).collect();
                        let text = format!("#{}  {line}", index + 1);
                        if ui.selectable_label(selected, text).clicked() {
                            clicked = Some(index);
                        }
                        ui.weak(format!("{} turns", entry.turns.len()));
                        match c.tokens.get(index).copied().flatten() {
                            Some(tokens) if tokens > max => {
                                ui.colored_label(
                                    ui.visuals().warn_fg_color,
                                    format!("{tokens}/{max} tokens"),
                                );
                            }
                            Some(tokens) => {
                                ui.weak(format!("{tokens}/{max} tokens"));
                            }
                            None => {}
                        }
                        for badge in c.badges_of(index, max) {
                            let (short, long) = badge_text(&badge);
                            ui.colored_label(ui.visuals().warn_fg_color, short)
                                .on_hover_text(long);
                        }
                    });
                }
            });
        if let Some(index) = clicked {
            self.flush_conversation_draft();
            self.conversations.selected = Some(index);
            self.conversations.draft = None;
        }
    }

    /// The rows that could not be read, with file and line.
    fn unparsed_rows_ui(&mut self, ui: &mut egui::Ui) {
        let Some(view) = &self.conversations.view else {
            return;
        };
        egui::CollapsingHeader::new(format!(
            "{} could not be read (kept in the file unchanged)",
            rows_text(view.unparsed.len())
        ))
        .show(ui, |ui| {
            egui::ScrollArea::vertical()
                .max_height(160.0)
                .show(ui, |ui| {
                    for (file, line, reason) in view.unparsed.iter().take(500) {
                        ui.label(format!("{} line {line}: {reason}", file.display()));
                    }
                });
        });
    }

    fn conversation_detail_ui(&mut self, ui: &mut egui::Ui) {
        let c = &mut self.conversations;
        let (Some(index), Some(view)) = (c.selected, &c.view) else {
            ui.weak("Select a sample to read and edit it.");
            return;
        };
        let Some(entry) = view.entries.get(index) else {
            return;
        };
        let format = entry.format;
        ui.horizontal(|ui| {
            ui.strong(format!("Sample {}", index + 1));
            ui.weak(format!(
                "{} line {} ({})",
                entry.file.display(),
                entry.line,
                format_name(format)
            ));
        });
        if c.draft.as_ref().is_none_or(|(i, _)| *i != index) {
            c.draft = Some((index, entry.turns.clone()));
        }
        for badge in c.badges_of(index, self.settings.train.max_seq_length as usize) {
            ui.colored_label(ui.visuals().warn_fg_color, badge_text(&badge).1);
        }
        let mut sample_edit = None;
        ui.horizontal(|ui| {
            if ui.button("Duplicate").clicked() {
                sample_edit = Some(ConversationEdit::Duplicate { index });
            }
            if ui.button("Delete sample").clicked() {
                sample_edit = Some(ConversationEdit::Delete { index });
            }
        });
        ui.separator();
        let mut commit = false;
        let Some((_, turns)) = c.draft.as_mut() else {
            return;
        };
        egui::ScrollArea::vertical()
            .auto_shrink([false, false])
            .show(ui, |ui| {
                let mut remove = None;
                for (number, turn) in turns.iter_mut().enumerate() {
                    let label = ui
                        .horizontal(|ui| {
                            let label = ui.label(format!("Turn {}", number + 1));
                            let before = turn.role.clone();
                            egui::ComboBox::from_id_salt(("role", number))
                                .selected_text(turn.role.as_str())
                                .show_ui(ui, |ui| {
                                    for role in roles_of(format) {
                                        ui.selectable_value(
                                            &mut turn.role,
                                            role.to_string(),
                                            *role,
                                        );
                                    }
                                });
                            commit |= turn.role != before;
                            if ui
                                .small_button("Remove turn")
                                .on_hover_text("take this turn out of the conversation")
                                .clicked()
                            {
                                remove = Some(number);
                            }
                            label
                        })
                        .inner;
                    let response = ui
                        .add(
                            egui::TextEdit::multiline(&mut turn.content)
                                .desired_width(f32::INFINITY)
                                .desired_rows(2)
                                .id_salt(("turn", index, number)),
                        )
                        .labelled_by(label.id);
                    commit |= response.lost_focus();
                    ui.add_space(4.0);
                }
                if let Some(number) = remove {
                    turns.remove(number);
                    commit = true;
                }
                if format != RowFormat::Text && ui.button("Add turn").clicked() {
                    let role = match turns.last().map(|t| t.role.as_str()) {
                        Some("user" | "human") => roles_of(format)[2],
                        _ => roles_of(format)[1],
                    };
                    turns.push(ChatTurn::new(role, ""));
                    commit = true;
                }
            });
        if commit {
            let job = c.draft_edit();
            if let Some(job) = job {
                self.worker.send(job);
            }
        }
        if let Some(edit) = sample_edit {
            self.conversation_edit(edit);
        }
    }
}

/// `1 row`, `3 rows`.
fn rows_text(rows: usize) -> String {
    if rows == 1 {
        "1 row".to_string()
    } else {
        format!("{rows} rows")
    }
}

fn format_name(format: RowFormat) -> &'static str {
    match format {
        RowFormat::OpenAi => "OpenAI messages",
        RowFormat::ShareGpt => "ShareGPT",
        RowFormat::Alpaca => "Alpaca",
        RowFormat::Text => "text",
    }
}

#[cfg(test)]
mod tests {
    use super::ConversationsState;
    use crate::messages::{ChatTurn, ConversationEntry, ConversationsView, RowFormat, TextBadge};

    fn entry(format: RowFormat) -> ConversationEntry {
        ConversationEntry {
            file: "chats.jsonl".into(),
            line: 1,
            format,
            turns: vec![ChatTurn::new("user", "Hi"), ChatTurn::new("assistant", "")],
        }
    }

    #[test]
    fn the_length_badge_follows_the_maximum_set_now_and_spares_texts() {
        let mut state = ConversationsState::default();
        state.set_view(ConversationsView {
            root: "chats.jsonl".into(),
            entries: vec![
                entry(RowFormat::OpenAi),
                entry(RowFormat::Text),
                entry(RowFormat::ShareGpt),
            ],
            unparsed: Vec::new(),
            can_undo: false,
        });
        let over = |tokens, max| TextBadge::OverLength { tokens, max };
        state.checked(
            &"chats.jsonl".into(),
            vec![Some(300), Some(300), None],
            vec![
                vec![TextBadge::EmptyAssistantTurn, over(300, 256)],
                vec![],
                vec![],
            ],
        );
        assert_eq!(
            state.badges_of(0, 512),
            vec![TextBadge::EmptyAssistantTurn],
            "counted against 256, within 512"
        );
        assert_eq!(
            state.badges_of(0, 128),
            vec![TextBadge::EmptyAssistantTurn, over(300, 128)]
        );
        assert!(!state.has_problem(1, 128), "a long text is split, not cut");
        assert!(!state.has_problem(2, 1), "not counted");
        state.only_problems = true;
        assert_eq!(state.visible(128), vec![0]);
    }
}
