//! The worker threads behind the app: `engine` owns the model (training, previews, chats (`chat`),
//! exports (`lm_export` for language models)), `files` does the dataset work (scanning, checks,
//! thumbnails, caption saves, the conversation dataset being edited (`conversations`)), `captioner`
//! auto-captions and `models` finds and downloads base models, so a long training step never holds up a
//! caption edit. Jobs arrive over channels; events go back over a bounded channel, each followed by the
//! wake-up closure (the app's repaint request). Must not use egui or eframe.

mod captioner;
mod chat;
mod conversations;
mod engine;
mod files;
mod inbox;
mod lm_export;
mod models;
mod outbox;

use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender};

use crate::kernels::on_compute_threads;
use crate::messages::{Event, Job};
pub use models::ModelPlaces;
pub use outbox::Outbox;

/// The text of a panic's payload.
fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "an unknown panic".to_string())
}

/// Runs `work`. A panic in it, which is a bug, becomes an error event naming `what`, and the worker
/// thread goes on serving jobs instead of dying silently.
fn contain<T>(outbox: &Outbox, what: &str, work: impl FnOnce() -> T) -> Option<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(work)) {
        Ok(value) => Some(value),
        Err(payload) => {
            outbox.error(internal_error(what, &*payload));
            None
        }
    }
}

/// The message for a bug hit while doing `what`.
fn internal_error(what: &str, payload: &(dyn std::any::Any + Send)) -> String {
    format!(
        "internal error while {what} ({}); this is a bug in lora-studio, please report it",
        panic_text(payload)
    )
}

/// How many events may wait for the UI before the workers block.
const EVENT_CAPACITY: usize = 4096;

/// Sends jobs to the right worker thread.
#[derive(Clone)]
pub struct WorkerHandle {
    engine: Sender<Job>,
    files: Sender<Job>,
    captioner: Sender<Job>,
    models: Sender<Job>,
}

impl WorkerHandle {
    /// Starts the engine, files, captioner and models threads. `wake` is called after every event (the app
    /// passes its repaint request). Models are looked for in the usual places.
    pub fn spawn(wake: Arc<dyn Fn() + Send + Sync>) -> std::io::Result<(Self, Receiver<Event>)> {
        Self::spawn_with(wake, ModelPlaces::from_env())
    }

    /// [`WorkerHandle::spawn`], looking for and downloading models where `places` says.
    pub fn spawn_with(
        wake: Arc<dyn Fn() + Send + Sync>,
        places: ModelPlaces,
    ) -> std::io::Result<(Self, Receiver<Event>)> {
        let (event_tx, event_rx) = crossbeam_channel::bounded(EVENT_CAPACITY);
        let outbox = Outbox::new(event_tx, wake);
        let (engine_tx, engine_rx) = crossbeam_channel::unbounded();
        let (files_tx, files_rx) = crossbeam_channel::unbounded();
        let (captioner_tx, captioner_rx) = crossbeam_channel::unbounded();
        let (models_tx, models_rx) = crossbeam_channel::unbounded();
        let engine_outbox = outbox.clone();
        let captioner_outbox = outbox.clone();
        let models_outbox = outbox.clone();
        let engine_models = places.discovery.clone();
        std::thread::Builder::new()
            .name("lora-studio-engine".into())
            .spawn(move || {
                on_compute_threads(move || engine::run(engine_rx, engine_outbox, engine_models))
            })?;
        std::thread::Builder::new()
            .name("lora-studio-files".into())
            .spawn(move || files::run(files_rx, outbox))?;
        std::thread::Builder::new()
            .name("lora-studio-captioner".into())
            .spawn(move || captioner::run(captioner_rx, captioner_outbox))?;
        std::thread::Builder::new()
            .name("lora-studio-models".into())
            .spawn(move || models::run(models_rx, models_outbox, places))?;
        Ok((
            Self {
                engine: engine_tx,
                files: files_tx,
                captioner: captioner_tx,
                models: models_tx,
            },
            event_rx,
        ))
    }

    /// Queues a job for the thread that does that kind of work.
    pub fn send(&self, job: Job) {
        let target = match job {
            Job::ScanDataset { .. }
            | Job::Thumbnail { .. }
            | Job::SaveCaption { .. }
            | Job::FindCheckpoints { .. }
            | Job::DescribeModel { .. }
            | Job::OpenConversations { .. }
            | Job::EditConversations { .. } => &self.files,
            Job::AutoCaption(_) | Job::CancelAutoCaption => &self.captioner,
            Job::FindModels | Job::DownloadModel { .. } => &self.models,
            _ => &self.engine,
        };
        // A closed channel means the thread died; its last event already said why.
        let _ = target.send(job);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_in_a_job_becomes_an_error_event_and_the_thread_goes_on() {
        let (tx, rx) = crossbeam_channel::unbounded();
        let outbox = Outbox::new(tx, Arc::new(|| {}));
        let index = 7;
        let result = contain(&outbox, "rendering a preview", || [1, 2, 3][index]);
        assert_eq!(result, None);
        let Ok(Event::Error { message, .. }) = rx.try_recv() else {
            panic!("no error event");
        };
        assert!(
            message.starts_with("internal error while rendering a preview (index out of bounds")
                && message.ends_with("this is a bug in lora-studio, please report it"),
            "{message}"
        );
        assert_eq!(contain(&outbox, "saving a caption", || 5), Some(5));
        assert!(rx.try_recv().is_err());
    }
}
