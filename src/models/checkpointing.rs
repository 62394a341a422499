//! Gradient checkpointing for candle, which has none: a sub-module runs forward without keeping its
//! activations, and its backward pass recomputes them.
//!
//! [`checkpointed`] runs `f(x, aux)` on detached inputs (so the activations are freed at once) and ties the
//! result back to `x` and `aux` with a custom op. In the backward pass the op reruns `f` on fresh variables,
//! back-propagates the incoming gradient through that local graph, returns the gradients of `x` and `aux`, and
//! leaves the gradients of the trainable variables inside `f` (the adapters) in a [`CheckpointGrads`] store,
//! which the training step adds to the ordinary gradients.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use candle_core::{Result, Tensor, TensorId, Var};

use crate::kernels::{TiedBackward, tie};

/// A sub-module's forward function: `(input, auxiliary input) -> output`.
pub type BlockFn = Arc<dyn Fn(&Tensor, &Tensor) -> Result<Tensor> + Send + Sync>;

/// Gradients of trainable variables produced by recomputed blocks.
#[derive(Debug, Clone, Default)]
pub struct CheckpointGrads {
    grads: Arc<Mutex<HashMap<TensorId, Tensor>>>,
}

impl CheckpointGrads {
    /// Takes (and forgets) the gradient collected for `var`.
    pub fn take(&self, var: &Var) -> Option<Tensor> {
        self.grads
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&var.as_tensor().id())
    }

    fn add(&self, id: TensorId, grad: Tensor) -> Result<()> {
        // A variable's gradient from candle still references the recomputed activations; detached, the
        // recomputation is freed as soon as the block's backward pass ends.
        let grad = grad.detach();
        let mut grads = self.grads.lock().unwrap_or_else(PoisonError::into_inner);
        let sum = match grads.remove(&id) {
            Some(previous) => (previous + grad)?,
            None => grad,
        };
        grads.insert(id, sum);
        Ok(())
    }

    /// Forgets everything (after a skipped step).
    pub fn clear(&self) {
        self.grads
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }
}

/// `f(x, aux)` without keeping its activations; see the module docs.
///
/// `anchor` is a zero-valued scalar computed from the trainable variables (see [`trainable_anchor`]): tied
/// to the result as a third input, it keeps the result in the autograd graph when `x` and `aux` themselves
/// are frozen (the first blocks of a UNet see only frozen inputs, yet hold adapters). Its gradient is zero:
/// the variables' own arrive through the store.
pub fn checkpointed(
    f: BlockFn,
    x: &Tensor,
    aux: &Tensor,
    anchor: &Tensor,
    store: &CheckpointGrads,
) -> Result<Tensor> {
    let output = f(&x.detach(), &aux.detach())?.detach();
    let inputs: &[&Tensor] = if anchor.track_op() {
        &[x, aux, anchor]
    } else {
        &[x, aux]
    };
    tie(
        output,
        inputs,
        Recompute {
            f,
            store: store.clone(),
        },
    )
}

/// A scalar zero that depends on every given trainable tensor (untracked when none is trainable).
pub fn trainable_anchor<'a>(
    tensors: impl Iterator<Item = &'a Tensor>,
    device: &candle_core::Device,
) -> Result<Tensor> {
    let mut anchor = Tensor::zeros((), candle_core::DType::F32, device)?;
    for t in tensors.filter(|t| t.track_op()) {
        anchor = (anchor
            + t.flatten_all()?
                .narrow(0, 0, 1)?
                .sum_all()?
                .to_dtype(candle_core::DType::F32)?)?;
    }
    // Not `anchor * 0.0`: candle prunes a multiplication by zero from the backward graph.
    anchor.sub(&anchor)
}

struct Recompute {
    f: BlockFn,
    store: CheckpointGrads,
}

impl TiedBackward for Recompute {
    fn name(&self) -> &'static str {
        "checkpointed-block"
    }

    fn bwd(&self, inputs: &[&Tensor], _: &Tensor, grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let (x, aux) = (inputs[0], inputs[1]);
        let x_var = Var::from_tensor(&x.detach())?;
        let aux_var = Var::from_tensor(&aux.detach())?;
        let recomputed = (self.f)(x_var.as_tensor(), aux_var.as_tensor())?;
        let mut grads = (recomputed * grad.detach())?.sum_all()?.backward()?;
        let x_grad = grads.remove(x_var.as_tensor());
        let aux_grad = grads.remove(aux_var.as_tensor());
        for id in grads.get_ids().copied().collect::<Vec<_>>() {
            if let Some(g) = grads.get_id(id) {
                self.store.add(id, g.clone())?;
            }
        }
        let mut input_grads = vec![
            x_grad.filter(|_| x.track_op()),
            aux_grad.filter(|_| aux.track_op()),
        ];
        // The anchor's, when it was tied: zero (candle wants a gradient for every tracked input).
        if let Some(anchor) = inputs.get(2) {
            input_grads.push(Some(anchor.zeros_like()?));
        }
        Ok(input_grads)
    }
}
