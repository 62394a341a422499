//! Attaching the modules of a LoRA file, whatever its format, to the layers they name: every adapter is
//! built (and its shape checked) before any is attached, so a bad module leaves the model untouched;
//! modules that name no layer are listed; a file where nothing matches is an error. The formats (kohya,
//! PEFT) only say which layer a module names and what its alpha is; this module knows no format.

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Tensor};

use super::adapter::{AdapterKind, LoraAdapter};
use super::error::LoraError;
use super::layer::AdapterSlot;

/// The tensors of one module of a LoRA file as stored.
#[derive(Debug, Clone)]
pub struct StoredModule {
    pub down: Tensor,
    pub up: Tensor,
    /// `None`: alpha = rank (scale 1).
    pub alpha: Option<f64>,
    /// DoRA's per-output-channel magnitude, for a DoRA module.
    pub magnitude: Option<Tensor>,
}

/// The outcome of attaching a LoRA file to a model.
#[derive(Debug, Default)]
pub struct AttachReport {
    /// The adapters created, one per matched module; their multipliers can be changed later.
    pub adapters: Vec<Arc<LoraAdapter>>,
    /// Modules of the file that name no layer of the model.
    pub unmatched: Vec<String>,
}

/// Attaches each of `modules` (named as the file names them) to the layer `slot_of` finds for its name, at
/// `multiplier`, with its tensors converted to `dtype`. `path` names the file in messages.
pub(super) fn attach_modules<'a>(
    path: &Path,
    modules: impl ExactSizeIterator<Item = (&'a String, &'a StoredModule)>,
    slot_of: impl Fn(&str) -> Option<Arc<AdapterSlot>>,
    multiplier: f64,
    dtype: DType,
) -> Result<AttachReport, LoraError> {
    let count = modules.len();
    let mut first = None;
    let mut report = AttachReport::default();
    let mut matched = Vec::new();
    for (name, weights) in modules {
        first.get_or_insert_with(|| name.clone());
        let Some(slot) = slot_of(name) else {
            report.unmatched.push(name.clone());
            continue;
        };
        let convert = |t: &Tensor| {
            t.to_dtype(dtype).map_err(|source| LoraError::Tensor {
                path: path.to_path_buf(),
                source,
            })
        };
        let kind = match &weights.magnitude {
            Some(magnitude) => AdapterKind::Dora {
                magnitude: convert(magnitude)?,
            },
            None => AdapterKind::Lora,
        };
        let adapter = LoraAdapter::with_kind(
            convert(&weights.down)?,
            convert(&weights.up)?,
            weights.alpha,
            kind,
            slot.shape(),
        )
        .map_err(|reason| LoraError::Module {
            path: path.to_path_buf(),
            module: name.clone(),
            reason,
        })?;
        adapter.set_multiplier(multiplier);
        matched.push((slot, Arc::new(adapter)));
    }
    for (slot, adapter) in matched {
        slot.attach(adapter.clone());
        report.adapters.push(adapter);
    }
    if report.adapters.is_empty() {
        return Err(LoraError::NoMatch {
            path: path.to_path_buf(),
            count,
            first: first.unwrap_or_default(),
        });
    }
    Ok(report)
}
