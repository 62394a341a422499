//! The models thread: finds the base models and LoRA folders on this computer and downloads a recommended
//! base on request, with progress, so neither a multi-second search nor a multi-gigabyte download holds up
//! training, previews or caption edits.

use std::path::PathBuf;
use std::time::Instant;

use crossbeam_channel::Receiver;

use super::{Outbox, contain};
use crate::discovery::recommended::{RECOMMENDED, find};
use crate::discovery::{Discovery, DiscoveryOptions, Family, discover};
use crate::hub::{DownloadReporter, HubSettings};
use crate::messages::{BaseFamily, DownloadChoice, Event, Job, ModelChoice, ModelsFound};

/// Where the models thread looks, and where it downloads to.
#[derive(Debug, Clone)]
pub struct ModelPlaces {
    pub discovery: DiscoveryOptions,
    pub hub: HubSettings,
}

impl ModelPlaces {
    /// The usual places (see [`DiscoveryOptions::from_env`] and [`HubSettings::from_env`]).
    pub fn from_env() -> Self {
        Self {
            discovery: DiscoveryOptions::from_env(&crate::discovery::data_dir()),
            hub: HubSettings::from_env(),
        }
    }
}

/// Least time between two progress events of a download.
const PROGRESS_INTERVAL_SECS: f64 = 0.25;

pub fn run(jobs: Receiver<Job>, outbox: Outbox, places: ModelPlaces) {
    while let Ok(job) = jobs.recv() {
        match job {
            Job::FindModels => {
                if let Some(found) =
                    contain(&outbox, "finding models", || discover(&places.discovery))
                {
                    outbox.send(Event::ModelsFound(as_message(&found)));
                }
            }
            Job::DownloadModel { name } => {
                let done = contain(&outbox, "downloading a model", || {
                    download(&name, &places, &outbox)
                });
                if let Some(Ok(path)) = done {
                    outbox.send(Event::Downloaded { name, path });
                    let found = discover(&places.discovery);
                    outbox.send(Event::ModelsFound(as_message(&found)));
                } else if let Some(Err(message)) = done {
                    outbox.error(message);
                }
            }
            other => outbox.error(format!("the models thread cannot do {}", other.name())),
        }
    }
}

/// Downloads the recommended base `name`.
fn download(name: &str, places: &ModelPlaces, outbox: &Outbox) -> Result<PathBuf, String> {
    let recommended =
        find(name).ok_or_else(|| format!("`{name}` is not one of the recommended base models"))?;
    let mut progress = ProgressEvents {
        name,
        outbox,
        total: recommended.approximate_bytes,
        done: 0,
        started: Instant::now(),
        last_sent: None,
    };
    recommended
        .fetch(&places.hub, &mut progress)
        .map_err(|e| e.to_string())
}

/// What the app lists.
fn as_message(found: &Discovery) -> ModelsFound {
    ModelsFound {
        models: found
            .models
            .iter()
            .map(|m| ModelChoice {
                path: m.path.clone(),
                name: m.name.clone(),
                family: m.family.label().to_string(),
                base_family: base_family(m.family),
                group: m.family.group().to_string(),
                size_bytes: m.size_bytes,
                precision: m.precision.clone(),
                source: m.source.label().to_string(),
            })
            .collect(),
        lora_folders: found
            .lora_folders
            .iter()
            .map(|f| (f.source.label().to_string(), f.path.clone()))
            .collect(),
        downloads: RECOMMENDED
            .iter()
            .map(|r| DownloadChoice {
                name: r.name.to_string(),
                label: r.label.to_string(),
                title: r.title.to_string(),
                approximate_bytes: r.approximate_bytes,
            })
            .collect(),
    }
}

/// The family whose training defaults a found model takes.
fn base_family(family: Family) -> BaseFamily {
    match family {
        Family::Sd1 | Family::Sd2Epsilon | Family::Sd2V | Family::Sd2 => BaseFamily::Sd,
        Family::Sdxl | Family::SdxlVPred => BaseFamily::Sdxl,
        Family::ChatModel => BaseFamily::Language,
    }
}

/// Download progress as events, a few per second.
struct ProgressEvents<'a> {
    name: &'a str,
    outbox: &'a Outbox,
    total: u64,
    done: u64,
    started: Instant,
    last_sent: Option<Instant>,
}

impl ProgressEvents<'_> {
    fn send(&mut self, force: bool) {
        let due = self
            .last_sent
            .is_none_or(|t| t.elapsed().as_secs_f64() >= PROGRESS_INTERVAL_SECS);
        if !(force || due) {
            return;
        }
        self.last_sent = Some(Instant::now());
        let seconds = self.started.elapsed().as_secs_f64().max(1e-3);
        self.outbox.send(Event::DownloadProgress {
            name: self.name.to_string(),
            done_bytes: self.done,
            total_bytes: self.total,
            bytes_per_second: self.done as f64 / seconds,
        });
    }
}

impl DownloadReporter for ProgressEvents<'_> {
    fn planned(&mut self, _repo: &str, files: &[(String, u64)]) {
        self.total = files.iter().map(|(_, size)| size).sum();
        self.send(true);
    }

    fn started(&mut self, _file: &str, size: u64) {
        self.total = size;
        self.done = 0;
        self.started = Instant::now();
    }

    fn advanced(&mut self, bytes: u64) {
        self.done += bytes;
        self.send(false);
    }

    fn finished(&mut self, _file: &str) {
        self.done = self.total;
        self.send(true);
    }
}
