//! The files thread (dataset scans, thumbnails, caption saves, checkpoint listings, telling a picked base
//! model's family from its headers, the open conversation dataset) and the checks threads it feeds.

use std::path::PathBuf;

use crossbeam_channel::Receiver;

use super::conversations::Conversations;
use super::{Outbox, contain};
use crate::config::TrainConfig;
use crate::data::buckets::BucketSettings;
use crate::data::caption_store::{CaptionTarget, IfCaptioned, caption_target, save_caption};
use crate::data::captions::CaptionSource;
use crate::data::checks::{DatasetIssue, check_dataset};
use crate::data::images::load_oriented;
use crate::data::{Dataset, scan_dataset};
use crate::messages::{Badge, BaseFamily, CaptionOrigin, DatasetEntry, DatasetView, Event, Job};
use crate::models::checkpoint::ModelFamily;
use crate::models::inspect::{FileReport, inspect};
use crate::models::tokenizer::ClipTokenizer;
use crate::train::list_checkpoints;

/// Runs the files thread until the app closes the channel. Caption saves and scans are done in the order
/// they arrive and before any thumbnail; thumbnails are decoded newest request first, so the cells the
/// user just scrolled to fill in before those scrolled past. Checks decode every image, so they run on
/// their own thread and never hold up the grid.
pub fn run(jobs: Receiver<Job>, outbox: Outbox) {
    let (checks_tx, checks_rx) = crossbeam_channel::unbounded();
    let checks_outbox = outbox.clone();
    let checks = std::thread::Builder::new()
        .name("lora-studio-checks".into())
        .spawn(move || run_checks(checks_rx, checks_outbox));
    if let Err(e) = checks {
        outbox.error(format!("the dataset checks could not start: {e}"));
    }
    let mut conversations = Conversations::start(&outbox);
    let mut thumbnails: Vec<(PathBuf, u32)> = Vec::new();
    loop {
        let next = if thumbnails.is_empty() {
            jobs.recv().ok()
        } else {
            jobs.try_recv().ok()
        };
        match next {
            Some(Job::Thumbnail { path, max_side }) => thumbnails.push((path, max_side)),
            Some(Job::ScanDataset { config }) => {
                thumbnails.clear();
                let scanned = contain(&outbox, "scanning the dataset", || scan(&config, &outbox));
                if let Some(dataset) = scanned.flatten() {
                    let _ = checks_tx.send((dataset, config));
                }
            }
            Some(Job::SaveCaption {
                root,
                relative,
                caption,
                origin,
                metadata_csv,
                caption_extension,
            }) => {
                let source = match origin {
                    CaptionOrigin::MetadataCsv => Some(CaptionSource::MetadataCsv),
                    CaptionOrigin::Sidecar => Some(CaptionSource::Sidecar),
                    CaptionOrigin::InstancePrompt | CaptionOrigin::None => None,
                };
                let target = caption_target(
                    &root,
                    &relative,
                    metadata_csv.as_deref(),
                    source,
                    &caption_extension,
                );
                match save_caption(&target, &relative, &caption, IfCaptioned::Replace) {
                    Ok(_) => {
                        let (CaptionTarget::Csv(target) | CaptionTarget::Sidecar(target)) = target;
                        outbox.send(Event::CaptionSaved { relative, target });
                    }
                    Err(e) => outbox.error(e.to_string()),
                }
            }
            Some(Job::DescribeModel { path }) => {
                let family = contain(&outbox, "describing a model", || describe(&path)).flatten();
                outbox.send(Event::ModelDescribed { path, family });
            }
            Some(Job::FindCheckpoints { output_dir }) => {
                let checkpoints = list_checkpoints(&output_dir);
                outbox.send(Event::CheckpointsFound {
                    output_dir,
                    checkpoints,
                });
            }
            Some(Job::OpenConversations {
                path,
                base_model,
                max_seq_length,
                system_prompt,
            }) => {
                contain(&outbox, "reading the conversations", || {
                    conversations.open(&path, base_model, max_seq_length, system_prompt, &outbox)
                });
            }
            Some(Job::EditConversations { root, edit }) => {
                contain(&outbox, "editing the conversations", || {
                    conversations.edit(&root, edit, &outbox)
                });
            }
            Some(other) => outbox.error(format!("the files worker cannot do {other:?}")),
            None if jobs.is_empty() && thumbnails.is_empty() => return,
            None => {
                // Only thumbnails are waiting: decode the newest request.
                if let Some((path, max_side)) = thumbnails.pop() {
                    let what = format!("decoding a thumbnail of {}", path.display());
                    if let Some(event) = contain(&outbox, &what, || thumbnail(path, max_side)) {
                        outbox.send(event);
                    }
                }
            }
        }
    }
}

/// The family of the base model at `path`, from its headers and configs only (`models::inspect`); `None`
/// when it is no base model lora-studio reads (the run says why when it starts).
fn describe(path: &std::path::Path) -> Option<BaseFamily> {
    if crate::models::lm_inspect::is_language_model_folder(path) {
        return Some(BaseFamily::Language);
    }
    match inspect(path).ok()? {
        FileReport::Checkpoint(report) => Some(match report.config.family {
            ModelFamily::Sd1 | ModelFamily::Sd2 => BaseFamily::Sd,
            ModelFamily::Sdxl => BaseFamily::Sdxl,
        }),
        _ => None,
    }
}

fn thumbnail(path: PathBuf, max_side: u32) -> Event {
    match load_oriented(&path) {
        Ok(image) => {
            let thumb = image.thumbnail(max_side, max_side).to_rgba8();
            Event::Thumbnail {
                width: thumb.width(),
                height: thumb.height(),
                rgba: thumb.into_raw(),
                path,
            }
        }
        Err(e) => Event::ThumbnailFailed {
            path,
            reason: e.to_string(),
        },
    }
}

/// The checks thread: badges for the newest scanned dataset (older ones still waiting are skipped).
fn run_checks(scans: Receiver<(Dataset, Box<TrainConfig>)>, outbox: Outbox) {
    while let Ok(mut newest) = scans.recv() {
        while let Ok(newer) = scans.try_recv() {
            newest = newer;
        }
        let (dataset, config) = newest;
        contain(&outbox, "checking the dataset", || {
            check(&dataset, &config, &outbox)
        });
    }
}

/// Scans the dataset and sends its view; the dataset is returned for the checks.
fn scan(config: &TrainConfig, outbox: &Outbox) -> Option<Dataset> {
    let dataset = match scan_dataset(config) {
        Ok(d) => d,
        Err(e) => {
            outbox.error(e.to_string());
            return None;
        }
    };
    let entries = dataset
        .items
        .iter()
        .map(|item| DatasetEntry {
            path: item.path.clone(),
            relative: item.relative.clone(),
            caption: item.raw_caption.clone().unwrap_or_default(),
            origin: match item.caption_source {
                Some(CaptionSource::MetadataCsv) => CaptionOrigin::MetadataCsv,
                Some(CaptionSource::Sidecar) => CaptionOrigin::Sidecar,
                Some(CaptionSource::InstancePrompt) => CaptionOrigin::InstancePrompt,
                None => CaptionOrigin::None,
            },
            width: item.width,
            height: item.height,
            repeats: item.repeats,
        })
        .collect();
    outbox.send(Event::Dataset(DatasetView {
        root: dataset.root.clone(),
        entries,
        unreadable: dataset
            .unreadable
            .iter()
            .map(|(p, r)| (p.clone(), r.clone()))
            .collect(),
        metadata_csv: dataset.metadata_csv.clone(),
    }));
    Some(dataset)
}

/// Sends the badges of every entry of `dataset`.
fn check(dataset: &Dataset, config: &TrainConfig, outbox: &Outbox) {
    let tokenizer = ClipTokenizer::shared().ok();
    let count = |text: &str| tokenizer.map_or(0, |t| t.count(text));
    let issues = check_dataset(
        dataset,
        &BucketSettings::from_config(config),
        config.trigger_word.as_deref(),
        &count,
    );
    let badges = issues
        .into_iter()
        .map(|found| {
            found
                .into_iter()
                .map(|issue| match issue {
                    DatasetIssue::MissingCaption => Badge::MissingCaption,
                    DatasetIssue::Small {
                        width,
                        height,
                        bucket,
                    } => Badge::Small {
                        width,
                        height,
                        bucket,
                    },
                    DatasetIssue::Duplicate { of } => Badge::Duplicate { of },
                    DatasetIssue::NearDuplicate { of } => Badge::NearDuplicate { of },
                    DatasetIssue::LongCaption { tokens } => Badge::LongCaption { tokens },
                    DatasetIssue::TriggerMissing => Badge::TriggerMissing,
                })
                .collect()
        })
        .collect();
    outbox.send(Event::Checks {
        root: dataset.root.clone(),
        badges,
    });
}
