//! How training tells the outside world what it is doing (terminal, app worker, tests), how it is told to
//! stop, and the hook that lets the app pause a run, preview it and chat with it between steps.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// A request to stop, shared between threads; training checks it between steps.
#[derive(Debug, Clone, Default)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// What a run will do, reported once before the first step.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainPlan {
    /// Examples in the dataset (images, or text samples).
    pub images: usize,
    /// What an example is called (`images`, `samples`).
    pub example_noun: &'static str,
    pub samples_per_epoch: usize,
    /// The tokens an epoch reads, for text.
    pub tokens_per_epoch: Option<u64>,
    pub steps_per_epoch: u64,
    pub total_steps: u64,
    pub epochs: u64,
    pub first_step: u64,
    pub trainable_parameters: usize,
    pub adapters: usize,
}

/// One optimizer step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepReport {
    /// Steps completed (1-based).
    pub step: u64,
    pub total_steps: u64,
    /// Epoch (1-based) the step belongs to.
    pub epoch: u64,
    pub loss: f64,
    pub lr: f64,
    /// Seconds the step took.
    pub seconds: f64,
    /// The tokens the step read (padding left out), for text.
    pub tokens: Option<u64>,
    /// The step's loss was not finite and the update was skipped.
    pub skipped: bool,
}

/// The model a run trains (its adapters attached): image previews render with an image model, chats answer
/// with a language model.
#[derive(Clone, Copy)]
pub enum LiveModel<'a> {
    Image(&'a crate::models::pipeline::StableDiffusion),
    Language(&'a crate::models::causal_lm::CausalLm),
}

/// What a run offers between steps: the model with the adapters being trained, for previews and chats.
pub struct LiveRun<'a> {
    pub model: LiveModel<'a>,
    pub network: &'a crate::lora::LoraNetwork,
    /// Steps completed.
    pub step: u64,
}

/// Whether to go on after a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    Stop,
}

/// Receives progress. Every method has an empty default.
pub trait TrainReporter {
    /// Called between optimizer steps (after any checkpoint or samples). A reporter may render previews with
    /// `live`, block while the run is paused, or return [`Flow::Stop`].
    fn between_steps(&mut self, _live: &LiveRun) -> Flow {
        Flow::Continue
    }

    /// A preparation stage (`"encoding latents"`) advanced to `done` of `total`.
    fn stage(&mut self, _stage: &str, _done: usize, _total: usize) {}
    fn plan(&mut self, _plan: &TrainPlan) {}
    fn step(&mut self, _report: &StepReport) {}
    fn sample(&mut self, _path: &Path, _step: u64) {}
    fn checkpoint(&mut self, _path: &Path, _step: u64) {}
    /// A sentence worth showing (dataset problems, resume notes, warnings).
    fn message(&mut self, _text: &str) {}
}

/// A reporter that ignores everything.
pub struct SilentReporter;

impl TrainReporter for SilentReporter {}
