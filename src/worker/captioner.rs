//! The auto-captioning thread: finds (or downloads) the captioning models, loads them once and keeps them
//! for the next run with the same models, captions the dataset image by image, and streams every caption
//! to the app as it is saved. A cancel request is noticed between images.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use candle_core::Device;
use crossbeam_channel::Receiver;

use super::{Outbox, contain};
use crate::config::DeviceChoice;
use crate::device::open_device;
use crate::hub::{DownloadReporter, HubSettings};
use crate::label::sources::model_folder;
use crate::label::{
    CaptionOutput, CaptionSettings, Captioner, LabelOptions, LabelReporter, label_folder,
};
use crate::messages::{AutoCaptionRequest, Event, Job};

/// Models kept loaded between runs.
struct Loaded {
    names: Vec<String>,
    device: String,
    device_handle: Device,
    captioners: Vec<Captioner>,
}

/// Runs the thread until the app closes the channel.
pub fn run(jobs: Receiver<Job>, outbox: Outbox) {
    let waiting = RefCell::new(VecDeque::new());
    let mut loaded: Option<Loaded> = None;
    loop {
        let next = waiting.borrow_mut().pop_front();
        let Some(job) = next.or_else(|| jobs.recv().ok()) else {
            return;
        };
        match job {
            Job::AutoCaption(request) => {
                let cancelled = || {
                    let mut cancel = false;
                    while let Ok(job) = jobs.try_recv() {
                        match job {
                            Job::CancelAutoCaption => cancel = true,
                            other => waiting.borrow_mut().push_back(other),
                        }
                    }
                    cancel
                };
                let ended = contain(&outbox, "auto-captioning", || {
                    auto_caption(&request, &mut loaded, &outbox, &cancelled)
                });
                if ended.is_none() {
                    loaded = None;
                    outbox.send(errored());
                }
            }
            Job::CancelAutoCaption => {}
            other => outbox.error(format!("the captioning worker cannot do {other:?}")),
        }
    }
}

/// The end of a run that could not start or broke off with an error.
fn errored() -> Event {
    Event::AutoCaptionEnded {
        captioned: 0,
        kept: 0,
        failed: Vec::new(),
        cancelled: false,
        errored: true,
    }
}

/// One run; every way out ends with an `AutoCaptionEnded` event.
fn auto_caption(
    request: &AutoCaptionRequest,
    loaded: &mut Option<Loaded>,
    outbox: &Outbox,
    cancelled: &dyn Fn() -> bool,
) {
    let result = load_models(request, loaded, outbox).and_then(|models| {
        let options = LabelOptions {
            input: request.root.clone(),
            output: match &request.metadata_csv {
                Some(csv) => CaptionOutput::Csv(csv.clone()),
                None => CaptionOutput::Sidecars {
                    extension: request
                        .caption_extension
                        .trim_start_matches('.')
                        .to_string(),
                },
            },
            prefix: request.prefix.clone(),
            overwrite: request.overwrite,
        };
        let mut reporter = EventReporter {
            outbox,
            done: 0,
            total: 0,
        };
        label_folder(
            &options,
            &models.captioners,
            &models.device_handle,
            &mut reporter,
            cancelled,
        )
        .map_err(|e| e.to_string())
    });
    match result {
        Ok(report) => outbox.send(Event::AutoCaptionEnded {
            captioned: report.captioned,
            kept: report.kept,
            failed: report.failed,
            cancelled: report.cancelled,
            errored: false,
        }),
        Err(message) => {
            outbox.error(message);
            outbox.send(errored());
        }
    }
}

/// The requested models, loaded (or kept from the previous run).
fn load_models<'a>(
    request: &AutoCaptionRequest,
    loaded: &'a mut Option<Loaded>,
    outbox: &Outbox,
) -> Result<&'a Loaded, String> {
    let same = loaded
        .as_ref()
        .is_some_and(|l| l.names == request.models && l.device == request.device);
    if !same {
        *loaded = None;
        let choice: DeviceChoice = request.device.parse()?;
        let device = open_device(choice)?;
        let hub = HubSettings::from_env();
        let settings = CaptionSettings::default();
        let mut captioners = Vec::with_capacity(request.models.len());
        for name in &request.models {
            let progress = |activity: String| Event::AutoCaptionProgress {
                activity,
                done: 0,
                total: 0,
            };
            outbox.send(progress(format!("finding the model {name}")));
            let mut downloads = DownloadEvents::new(outbox);
            let folder = model_folder(name, &hub, &mut downloads).map_err(|e| e.to_string())?;
            outbox.send(progress(format!("loading {}", folder.display())));
            let captioner = Captioner::load(&folder, &device, &settings)
                .map_err(|e| format!("loading the captioning model {name}: {e}"))?;
            captioners.push(captioner);
        }
        *loaded = Some(Loaded {
            names: request.models.clone(),
            device: request.device.clone(),
            device_handle: device,
            captioners,
        });
    }
    loaded
        .as_ref()
        .ok_or_else(|| "the captioning models are not loaded".to_string())
}

/// Download progress as events, at most a few per second.
struct DownloadEvents<'a> {
    outbox: &'a Outbox,
    file: String,
    done: u64,
    total: u64,
    last_sent: Option<Instant>,
}

impl<'a> DownloadEvents<'a> {
    fn new(outbox: &'a Outbox) -> Self {
        Self {
            outbox,
            file: String::new(),
            done: 0,
            total: 0,
            last_sent: None,
        }
    }

    fn send(&mut self) {
        self.last_sent = Some(Instant::now());
        self.outbox.send(Event::AutoCaptionProgress {
            activity: format!("downloading {}", self.file),
            done: self.done,
            total: self.total,
        });
    }
}

impl DownloadReporter for DownloadEvents<'_> {
    fn planned(&mut self, repo: &str, files: &[(String, u64)]) {
        let total: u64 = files.iter().map(|(_, size)| size).sum();
        self.outbox.send(Event::Info(format!(
            "downloading {} files ({:.1} MB) of {repo} into the Hugging Face cache",
            files.len(),
            total as f64 / 1e6
        )));
    }

    fn started(&mut self, file: &str, size: u64) {
        self.file = file.to_string();
        self.done = 0;
        self.total = size;
        self.send();
    }

    fn advanced(&mut self, bytes: u64) {
        self.done += bytes;
        if self
            .last_sent
            .is_none_or(|t| t.elapsed() > Duration::from_millis(250))
        {
            self.send();
        }
    }

    fn finished(&mut self, _file: &str) {
        self.done = self.total;
        self.send();
    }
}

/// Captions as events.
struct EventReporter<'a> {
    outbox: &'a Outbox,
    done: u64,
    total: u64,
}

impl EventReporter<'_> {
    fn progress(&self) {
        self.outbox.send(Event::AutoCaptionProgress {
            activity: "captioning".to_string(),
            done: self.done,
            total: self.total,
        });
    }
}

impl LabelReporter for EventReporter<'_> {
    fn planned(&mut self, to_caption: &[PathBuf], _kept: usize) {
        self.total = to_caption.len() as u64;
        self.progress();
    }

    fn captioned(&mut self, relative: &Path, caption: &str, target: &Path) {
        self.done += 1;
        self.outbox.send(Event::AutoCaptioned {
            relative: relative.to_path_buf(),
            caption: caption.to_string(),
            target: target.to_path_buf(),
        });
        self.progress();
    }

    fn failed(&mut self, _relative: &Path, _reason: &str) {
        self.done += 1;
        self.progress();
    }

    fn unreadable(&mut self, _relative: &Path, _reason: &str) {}
}
