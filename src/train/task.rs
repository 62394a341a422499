//! What a kind of training brings to the model-agnostic loop ([`super::trainer`]): its adapters, the order
//! of its batches, the loss of one batch, sample previews, and what its export holds. The loop owns
//! everything else (optimizer, schedule, accumulation, precision, checkpoints, resume, logs, reporting), so a
//! new model family adds a task, never a copy of the loop.

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use rand_chacha::ChaCha8Rng;

use super::TrainError;
use super::export::ExportContents;
use super::report::{LiveRun, TrainReporter};
use super::tensorboard::EventWriter;
use crate::lora::LoraNetwork;

/// Where a run stands when its adapters are exported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportPoint {
    /// Optimizer steps completed.
    pub steps: u64,
    /// The (1-based) epoch those steps reach.
    pub epoch: u64,
    /// Unix seconds when the run (not a resume of it) started.
    pub started_at: u64,
}

/// What one micro-batch weighs in its optimizer step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BatchShare {
    /// The units the micro-batch's loss is a mean over: 1 for a batch of images (the mean of equal
    /// micro-batches' means), the trained tokens for text. The loop weighs each micro-batch's loss by its
    /// units over the step's total, so the step's gradient is the gradient of the mean over every unit of
    /// the accumulated batch.
    pub loss_units: f64,
    /// The tokens the micro-batch reads (padding left out), for tokens per second; none for images.
    pub tokens: Option<u64>,
}

impl BatchShare {
    /// An image batch: one unit, no tokens.
    pub const ONE: Self = Self {
        loss_units: 1.0,
        tokens: None,
    };
}

/// One kind of training (diffusion for Stable Diffusion, causal language models) as the loop drives it.
pub trait TrainingTask {
    /// One micro-batch: whatever the task needs to find its examples.
    type Batch;

    /// The adapters being trained, attached to the model.
    fn network(&self) -> &LoraNetwork;

    /// Examples in the dataset, and examples per epoch (with repeats).
    fn examples(&self) -> (usize, usize);

    /// What an example is called in messages (`images`, `samples`).
    fn example_noun(&self) -> &'static str {
        "images"
    }

    /// What `batch` weighs in its step (known before its loss is computed).
    fn share(&self, _batch: &Self::Batch) -> BatchShare {
        BatchShare::ONE
    }

    /// A hash of what the dataset holds, to tell on resume whether it changed.
    fn fingerprint(&self) -> Result<String, TrainError>;

    /// The micro-batches of epoch `epoch` (0-based) in training order; the same for the same epoch, so a
    /// resumed run continues exactly.
    fn epoch_batches(&self, epoch: u64) -> Vec<Self::Batch>;

    /// The loss of one micro-batch (a scalar f32 tensor with its graph): the mean over its
    /// [`BatchShare::loss_units`]. Any randomness is drawn from `rng`.
    fn loss(&mut self, batch: &Self::Batch, rng: &mut ChaCha8Rng) -> Result<Tensor, TrainError>;

    /// The gradient of `var` after a backward pass, in f32 and detached (a task may add what recomputed
    /// blocks collected outside `grads`).
    fn gradient(&self, grads: &GradStore, var: &Var) -> candle_core::Result<Option<Tensor>> {
        grads
            .get(var)
            .map(|g| g.detach().to_dtype(candle_core::DType::F32))
            .transpose()
    }

    /// Renders the configured sample previews after `step` steps.
    fn render_samples(
        &mut self,
        step: u64,
        events: Option<&mut EventWriter>,
        reporter: &mut dyn TrainReporter,
    ) -> Result<(), TrainError>;

    /// What the run offers a reporter between steps (previews with the adapters as they are).
    fn live(&self, step: u64) -> LiveRun<'_>;

    /// The adapters as plain LoRA modules with the file's metadata, as of `point`.
    fn export_contents(&self, point: ExportPoint) -> Result<ExportContents, TrainError>;

    /// Writes the run's final export (the adapters at strength 1, as of `point`; `last_checkpoint` is the
    /// checkpoint just saved) and returns the path of its main file.
    fn write_final_export(
        &self,
        point: ExportPoint,
        last_checkpoint: Option<&std::path::Path>,
    ) -> Result<std::path::PathBuf, TrainError>;
}

/// Sets the adapters' input dropout (`lora_dropout`) for the next micro-batch, its masks seeded from the run's
/// RNG so a resumed run draws the same ones; nothing is drawn without dropout.
pub(super) fn draw_dropout(network: &LoraNetwork, probability: f32, rng: &mut ChaCha8Rng) {
    if probability > 0.0 {
        network.set_dropout(f64::from(probability), rand::Rng::random(rng));
    }
}
