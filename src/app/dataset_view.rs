//! The dataset view: a grid of thumbnails with editable captions, a larger editor for the selected image,
//! bulk caption tools, the tag frequency list, and badges for problems worth fixing before training.

use eframe::egui;

use super::{Dialog, DialogResult, StudioApp};
use crate::messages::{Badge, CaptionOrigin, Job};

/// Side of a grid cell's thumbnail, in points.
const CELL: f32 = 128.0;
/// Side of the decoded thumbnails (also used by the larger editor).
const THUMBNAIL_SIDE: u32 = 256;

/// What the "small" badge means, on hover.
const SMALL_IMAGE_HELP: &str = "Smaller than the training resolution. With bucket_no_upscale (the \
default) an image gets a bucket of its own size, on the bucket step, and is cropped to it, never enlarged: \
it trains at fewer pixels. Without it, an image is enlarged to cover its bucket, which softens it.";

fn badge_text(badge: &Badge) -> String {
    match badge {
        Badge::MissingCaption => "no caption".to_string(),
        Badge::Small {
            width,
            height,
            bucket: (bucket_width, bucket_height),
        } => {
            if bucket_width > width || bucket_height > height {
                format!("small {width}x{height}: upscaled to fill {bucket_width}x{bucket_height}")
            } else {
                format!(
                    "small {width}x{height}: trained at {bucket_width}x{bucket_height}, not upscaled"
                )
            }
        }
        Badge::Duplicate { of } => format!("duplicate of {}", of.display()),
        Badge::NearDuplicate { of } => format!("looks like {}", of.display()),
        Badge::LongCaption { tokens } => format!("{tokens} tokens (over 75 are cut)"),
        Badge::TriggerMissing => "no trigger word".to_string(),
    }
}

fn badges_ui(ui: &mut egui::Ui, badges: &[Badge]) {
    ui.horizontal_wrapped(|ui| {
        for badge in badges {
            let color = match badge {
                Badge::Duplicate { .. } | Badge::MissingCaption => {
                    egui::Color32::from_rgb(220, 80, 60)
                }
                _ => egui::Color32::from_rgb(220, 170, 40),
            };
            let label = ui.label(egui::RichText::new(badge_text(badge)).small().color(color));
            if matches!(badge, Badge::Small { .. }) {
                label.on_hover_text(SMALL_IMAGE_HELP);
            }
        }
    });
}

/// Adds the trigger word in front of a caption that lacks it.
fn add_trigger(caption: &str, trigger: &str) -> String {
    if trigger.is_empty() || caption.split(',').any(|t| t.trim() == trigger) {
        caption.to_string()
    } else if caption.trim().is_empty() {
        trigger.to_string()
    } else {
        format!("{trigger}, {caption}")
    }
}

/// Removes the trigger word's tag from a caption.
fn remove_trigger(caption: &str, trigger: &str) -> String {
    if trigger.is_empty() {
        return caption.to_string();
    }
    caption
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty() && *t != trigger)
        .collect::<Vec<_>>()
        .join(", ")
}

impl StudioApp {
    pub(super) fn dataset_tab_ui(&mut self, ui: &mut egui::Ui) {
        let ctx = ui.ctx().clone();
        ui.horizontal(|ui| {
            if ui.button("Open folder…").clicked() {
                self.pick(&ctx, Dialog::Folder, DialogResult::DatasetFolder);
            }
            let folder = &self.settings.train.train_data_dir;
            if folder.as_os_str().is_empty() {
                ui.label("or drop a folder of images on the window");
            } else {
                ui.label(folder.display().to_string());
                if ui.button("Rescan").clicked() {
                    self.open_dataset(folder.clone());
                }
            }
            if ui
                .add_enabled(self.dataset.can_undo(), egui::Button::new("Undo"))
                .clicked()
            {
                self.dataset.undo();
            }
        });
        let Some(view) = &self.dataset.view else {
            ui.add_space(60.0);
            ui.vertical_centered(|ui| {
                ui.heading("Drop a folder of 50–200 images here");
                ui.label(
                    "Captions are read from metadata.csv, .txt/.caption files, or added here.",
                );
            });
            return;
        };
        let issues: usize = self.dataset.badges.iter().map(Vec::len).sum();
        let source = match &view.metadata_csv {
            Some(csv) => format!("captions in {}", csv.display()),
            None => "captions in .txt files".to_string(),
        };
        ui.label(format!(
            "{} images, {source}, {issues} issues{}",
            view.entries.len(),
            if view.unreadable.is_empty() {
                String::new()
            } else {
                format!(", {} unreadable files", view.unreadable.len())
            }
        ));
        for (path, reason) in &view.unreadable {
            ui.colored_label(
                ui.visuals().warn_fg_color,
                format!("{}: {reason}", path.display()),
            );
        }
        self.auto_caption_ui(ui);
        self.caption_tools_ui(ui);
        egui::Panel::right("caption-editor")
            .resizable(true)
            .default_size(320.0)
            .show(ui, |ui| self.editor_ui(ui));
        egui::CentralPanel::default().show(ui, |ui| self.grid_ui(ui));
    }

    fn caption_tools_ui(&mut self, ui: &mut egui::Ui) {
        egui::CollapsingHeader::new("Caption tools")
            .default_open(false)
            .show(ui, |ui| {
                ui.horizontal(|ui| {
                    let label = ui.label("Trigger word");
                    ui.add(
                        egui::TextEdit::singleline(&mut self.dataset.trigger_input)
                            .desired_width(140.0),
                    )
                    .labelled_by(label.id);
                    let trigger = self.dataset.trigger_input.trim().to_string();
                    if ui.button("Add to all").clicked() {
                        self.dataset.change_all(|c| add_trigger(c, &trigger));
                    }
                    if ui.button("Remove from all").clicked() {
                        self.dataset.change_all(|c| remove_trigger(c, &trigger));
                    }
                    if ui
                        .button("Use for training")
                        .on_hover_text("prefix it to every caption while training")
                        .clicked()
                    {
                        self.settings.train.trigger_word = (!trigger.is_empty()).then_some(trigger);
                    }
                });
                ui.horizontal(|ui| {
                    let label = ui.label("Find");
                    ui.add(egui::TextEdit::singleline(&mut self.dataset.find).desired_width(140.0))
                        .labelled_by(label.id);
                    let label = ui.label("Replace with");
                    ui.add(
                        egui::TextEdit::singleline(&mut self.dataset.replace).desired_width(140.0),
                    )
                    .labelled_by(label.id);
                    if ui.button("Replace all").clicked() && !self.dataset.find.is_empty() {
                        let (find, replace) =
                            (self.dataset.find.clone(), self.dataset.replace.clone());
                        self.dataset.change_all(|c| c.replace(&find, &replace));
                    }
                });
                ui.horizontal_wrapped(|ui| {
                    ui.label("Tags:");
                    if self.dataset.tag_filter.is_some() && ui.button("show all").clicked() {
                        self.dataset.tag_filter = None;
                    }
                    for (tag, count) in self.dataset.tag_counts().into_iter().take(60) {
                        let selected = self.dataset.tag_filter.as_deref() == Some(tag.as_str());
                        if ui
                            .selectable_label(selected, format!("{tag} ({count})"))
                            .clicked()
                        {
                            self.dataset.tag_filter = if selected { None } else { Some(tag) };
                        }
                    }
                });
            });
    }

    fn editor_ui(&mut self, ui: &mut egui::Ui) {
        let Some(index) = self.dataset.selected else {
            ui.label("Click an image to edit its caption here.");
            return;
        };
        let Some(entry) = self
            .dataset
            .view
            .as_ref()
            .and_then(|v| v.entries.get(index))
            .cloned()
        else {
            return;
        };
        ui.heading(entry.relative.display().to_string());
        ui.label(format!(
            "{}x{} px, repeated {}x, caption from {}",
            entry.width,
            entry.height,
            entry.repeats,
            match entry.origin {
                CaptionOrigin::MetadataCsv => "metadata.csv",
                CaptionOrigin::Sidecar => "a sidecar file",
                CaptionOrigin::InstancePrompt => "the instance prompt",
                CaptionOrigin::None => "nowhere yet",
            }
        ));
        if let Some(texture) = self.dataset.thumbnail(&entry.path) {
            ui.add(
                egui::Image::new(texture)
                    .max_width(ui.available_width())
                    .max_height(300.0),
            );
        }
        let label = ui.label("Caption");
        let response = ui.add(
            egui::TextEdit::multiline(&mut self.dataset.captions[index])
                .return_key(None)
                .desired_rows(6)
                .desired_width(f32::INFINITY),
        );
        let response = response.labelled_by(label.id);
        self.track_edit(index, &response);
        if let Some(badges) = self.dataset.badges.get(index) {
            badges_ui(ui, badges);
        }
    }

    /// Edits are saved as they happen; an edit session (focus in to focus out) is one undo step. A caption
    /// is one line (a `metadata.csv` row, a sidecar's text; the editors only wrap it): Enter ends the edit,
    /// and line breaks pasted in become spaces.
    fn track_edit(&mut self, index: usize, response: &egui::Response) {
        if response.gained_focus() {
            self.dataset
                .edit_anchor
                .insert(index, self.dataset.captions[index].clone());
        }
        if response.has_focus() && response.ctx.input(|i| i.key_pressed(egui::Key::Enter)) {
            response.surrender_focus();
        }
        if response.changed() {
            let caption = &mut self.dataset.captions[index];
            if caption.contains(['\n', '\r']) {
                *caption = one_line(caption);
            }
            self.dataset.edited(index);
        }
        if response.lost_focus() {
            self.dataset.edit_finished(index);
        }
    }

    fn grid_ui(&mut self, ui: &mut egui::Ui) {
        let visible = self.dataset.visible();
        let card_width = CELL + card_frame(ui).total_margin().sum().x;
        let width = ui.available_width() - ui.spacing().scroll.allocated_width();
        let columns = columns_that_fit(width, card_width, ui.spacing().item_spacing.x);
        let rows = visible.len().div_ceil(columns);
        let row_height = CELL + 90.0;
        egui::ScrollArea::vertical().auto_shrink(false).show_rows(
            ui,
            row_height,
            rows,
            |ui, range| {
                for row in range {
                    ui.horizontal(|ui| {
                        for &index in visible.iter().skip(row * columns).take(columns) {
                            self.cell_ui(ui, index);
                        }
                    });
                }
            },
        );
    }

    fn cell_ui(&mut self, ui: &mut egui::Ui, index: usize) {
        let Some(entry) = self.dataset.view.as_ref().map(|v| v.entries[index].clone()) else {
            return;
        };
        if !self.dataset.requested.contains(&entry.path) {
            self.dataset.requested.insert(entry.path.clone());
            self.worker.send(Job::Thumbnail {
                path: entry.path.clone(),
                max_side: THUMBNAIL_SIDE,
            });
        }
        let selected = self.dataset.selected == Some(index);
        let stroke = if selected {
            ui.visuals().selection.stroke
        } else {
            ui.visuals().widgets.noninteractive.bg_stroke
        };
        card_frame(ui).stroke(stroke).show(ui, |ui| {
            ui.set_width(CELL);
            ui.vertical(|ui| {
                let image = match self.dataset.thumbnail(&entry.path) {
                    Some(texture) => ui.add(
                        egui::Image::new(texture)
                            .fit_to_exact_size(egui::vec2(CELL, CELL))
                            .sense(egui::Sense::click()),
                    ),
                    None => match self.dataset.thumbnail_failures.get(&entry.path) {
                        Some(reason) => ui
                            .add_sized(
                                [CELL, CELL],
                                egui::Label::new("unreadable").sense(egui::Sense::click()),
                            )
                            .on_hover_text(reason),
                        None => ui.add_sized(
                            [CELL, CELL],
                            egui::Label::new("…").sense(egui::Sense::click()),
                        ),
                    },
                };
                if image.clicked() {
                    self.dataset.selected = Some(index);
                }
                let name = entry
                    .relative
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                let label = ui.label(egui::RichText::new(&name).small().weak());
                let response = ui.add(
                    egui::TextEdit::multiline(&mut self.dataset.captions[index])
                        .return_key(None)
                        .desired_rows(2)
                        .desired_width(CELL),
                );
                let response = response.labelled_by(label.id);
                self.track_edit(index, &response);
                if let Some(badges) = self.dataset.badges.get(index) {
                    badges_ui(ui, badges);
                }
            });
        });
    }
}

/// The frame around a grid card (its margins make a card wider than its thumbnail).
fn card_frame(ui: &egui::Ui) -> egui::Frame {
    egui::Frame::group(ui.style())
}

/// How many cards `card_width` wide, `spacing` apart, fit side by side in `width` (at least one).
fn columns_that_fit(width: f32, card_width: f32, spacing: f32) -> usize {
    (((width + spacing) / (card_width + spacing)).floor() as usize).max(1)
}

/// `text` with its line breaks (and the spaces around them) turned into single spaces.
fn one_line(text: &str) -> String {
    text.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::{add_trigger, columns_that_fit, remove_trigger};

    #[test]
    fn columns_fit_the_width_with_their_spacing() {
        // Three 142-point cards with two 8-point gaps need 442 points.
        assert_eq!(columns_that_fit(442.0, 142.0, 8.0), 3);
        assert_eq!(columns_that_fit(441.0, 142.0, 8.0), 2);
        assert_eq!(columns_that_fit(10.0, 142.0, 8.0), 1);
    }

    #[test]
    fn trigger_tools() {
        assert_eq!(add_trigger("neon, rain", "cyb3r"), "cyb3r, neon, rain");
        assert_eq!(add_trigger("cyb3r, neon", "cyb3r"), "cyb3r, neon");
        assert_eq!(add_trigger("", "cyb3r"), "cyb3r");
        assert_eq!(remove_trigger("cyb3r, neon, rain", "cyb3r"), "neon, rain");
        assert_eq!(remove_trigger("neon, cyb3r", "cyb3r"), "neon");
    }

    #[test]
    fn captions_stay_on_one_line() {
        assert_eq!(
            super::one_line("neon city,\n  wet streets\r\n\nnight"),
            "neon city, wet streets night"
        );
        assert_eq!(super::one_line("one line"), "one line");
    }
}
