//! The files thread: dataset scans and checks, thumbnails, caption saves.

use crossbeam_channel::Receiver;

use super::Outbox;
use crate::config::TrainConfig;
use crate::data::caption_store::{CaptionTarget, caption_target, save_caption};
use crate::data::captions::CaptionSource;
use crate::data::checks::{DatasetIssue, check_dataset};
use crate::data::images::load_oriented;
use crate::data::scan_dataset;
use crate::messages::{Badge, CaptionOrigin, DatasetEntry, DatasetView, Event, Job};
use crate::models::tokenizer::ClipTokenizer;

pub fn run(jobs: Receiver<Job>, outbox: Outbox) {
    while let Ok(job) = jobs.recv() {
        match job {
            Job::ScanDataset { config } => scan(&config, &outbox),
            Job::Thumbnail { path, max_side } => match load_oriented(&path) {
                Ok(image) => {
                    let thumb = image.thumbnail(max_side, max_side).to_rgba8();
                    outbox.send(Event::Thumbnail {
                        width: thumb.width(),
                        height: thumb.height(),
                        rgba: thumb.into_raw(),
                        path,
                    });
                }
                Err(e) => outbox.send(Event::Info(e.to_string())),
            },
            Job::SaveCaption {
                root,
                relative,
                caption,
                origin,
                metadata_csv,
                caption_extension,
            } => {
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
                match save_caption(&target, &relative, &caption) {
                    Ok(()) => {
                        let (CaptionTarget::Csv(target) | CaptionTarget::Sidecar(target)) = target;
                        outbox.send(Event::CaptionSaved { relative, target });
                    }
                    Err(e) => outbox.error(e.to_string()),
                }
            }
            other => outbox.error(format!("the files worker cannot do {other:?}")),
        }
    }
}

fn scan(config: &TrainConfig, outbox: &Outbox) {
    let dataset = match scan_dataset(config) {
        Ok(d) => d,
        Err(e) => return outbox.error(e.to_string()),
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
    let tokenizer = ClipTokenizer::shared().ok();
    let count = |text: &str| tokenizer.map_or(0, |t| t.count(text));
    let issues = check_dataset(
        &dataset,
        config.resolution,
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
                    DatasetIssue::Small { width, height } => Badge::Small { width, height },
                    DatasetIssue::Duplicate { of } => Badge::Duplicate { of },
                    DatasetIssue::NearDuplicate { of } => Badge::NearDuplicate { of },
                    DatasetIssue::LongCaption { tokens } => Badge::LongCaption { tokens },
                    DatasetIssue::TriggerMissing => Badge::TriggerMissing,
                })
                .collect()
        })
        .collect();
    outbox.send(Event::Checks {
        root: dataset.root,
        badges,
    });
}
