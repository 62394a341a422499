//! Cross-entropy over a large vocabulary (a language model's next-token loss), with its own backward pass.
//!
//! Composed from candle ops, the loss gathers the scored rows, then keeps the log-softmax's maximum,
//! shifted values, exponentials and their sums alive (each as large as the logits: 311 MB for 512 tokens
//! of Qwen's 151,936-word vocabulary) and differentiates through each. Here, for f32 logits on the CPU,
//! one pass per row finds its log-sum-exp and the loss, and the backward pass writes the gradient
//! `g·(softmax − one-hot)` of each scored row directly (zero for the others); f16 and bf16 logits are
//! widened to f32 first. f64 logits and the GPUs take the composed path (in f32, f64 for f64 logits).
//! Must not know any model.

use candle_core::{D, DType, Result, Tensor};
use rayon::prelude::*;

use super::fast_math::{Simd, exp_f32, vectorised};
use super::fused_norm::with_values;
use super::tied::{Ready, TiedBackward, tie};

/// `Σ −log softmax(logits[row])[target]` over the rows of `logits` (`[rows, vocab]`) that have a target,
/// as a scalar (f32, or f64 for f64 logits), differentiable in `logits`.
pub fn cross_entropy_sum(logits: &Tensor, targets: &[Option<u32>]) -> Result<Tensor> {
    let (rows, vocab) = logits.dims2()?;
    if targets.len() != rows {
        candle_core::bail!("cross-entropy: {} targets for {rows} rows", targets.len());
    }
    if let Some(target) = targets.iter().flatten().find(|&&t| t as usize >= vocab) {
        candle_core::bail!("label {target} is outside the vocabulary of {vocab} tokens");
    }
    let on_cpu = super::cpu_kernels(logits.device());
    if on_cpu && logits.dtype() == DType::F32 {
        kernel_cross_entropy(logits, targets, vocab)
    } else if on_cpu && matches!(logits.dtype(), DType::F16 | DType::BF16) {
        kernel_cross_entropy(&logits.to_dtype(DType::F32)?, targets, vocab)
    } else {
        composed_cross_entropy(logits, targets)
    }
}

/// [`cross_entropy_sum`] from candle ops: the scored rows gathered, log-softmax, the targets picked.
fn composed_cross_entropy(logits: &Tensor, targets: &[Option<u32>]) -> Result<Tensor> {
    let dtype = if logits.dtype() == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    let (scored_rows, scored_targets): (Vec<u32>, Vec<u32>) = targets
        .iter()
        .enumerate()
        .filter_map(|(row, target)| Some((row as u32, (*target)?)))
        .unzip();
    let device = logits.device();
    let count = scored_rows.len();
    if count == 0 {
        return Tensor::zeros((), dtype, device);
    }
    let scored = logits
        .index_select(&Tensor::from_vec(scored_rows, count, device)?, 0)?
        .to_dtype(dtype)?;
    let log_probs = candle_nn::ops::log_softmax(&scored, D::Minus1)?;
    let picked = Tensor::from_vec(scored_targets, (count, 1), device)?;
    log_probs.gather(&picked, 1)?.sum_all()?.neg()
}

/// [`cross_entropy_sum`] for f32 logits on the CPU: one parallel pass per row.
fn kernel_cross_entropy(logits: &Tensor, targets: &[Option<u32>], vocab: usize) -> Result<Tensor> {
    let simd = Simd::detect();
    let (loss, log_sum_exp) = with_values(&logits.detach(), |values| {
        let per_row: Vec<(f64, f32)> = values
            .par_chunks(vocab)
            .zip(targets.par_iter())
            .map(|(row, target)| match target {
                Some(target) => {
                    let lse = vectorised(simd, || log_sum_exp(row));
                    (f64::from(lse - row[*target as usize]), lse)
                }
                None => (0.0, 0.0),
            })
            .collect();
        let loss: f64 = per_row.iter().map(|(loss, _)| loss).sum();
        (
            loss as f32,
            per_row.into_iter().map(|(_, lse)| lse).collect(),
        )
    })?;
    tie(
        Ready::Tensor(Tensor::new(loss, logits.device())?),
        &[logits],
        CrossEntropyBackward {
            targets: targets.to_vec(),
            log_sum_exp,
            simd,
        },
    )
}

/// `log Σ e^x` of one row, from its maximum.
#[inline(always)]
fn log_sum_exp(row: &[f32]) -> f32 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = row.iter().map(|&x| exp_f32(x - max)).sum();
    max + sum.ln()
}

/// Writes the loss's gradient into each scored row of the logits.
struct CrossEntropyBackward {
    targets: Vec<Option<u32>>,
    /// Each row's log-sum-exp (0 for rows without a target).
    log_sum_exp: Vec<f32>,
    simd: Simd,
}

impl TiedBackward for CrossEntropyBackward {
    fn name(&self) -> &'static str {
        "cross-entropy-kernel"
    }

    fn bwd(&self, logits: &[&Tensor], _: &Tensor, grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let logits = logits[0];
        let vocab = logits.dim(1)?;
        let scale = grad.to_dtype(DType::F32)?.to_scalar::<f32>()?;
        let values = with_values(&logits.detach(), |values| {
            let mut out = vec![0f32; values.len()];
            out.par_chunks_mut(vocab)
                .zip(values.par_chunks(vocab))
                .zip(self.targets.par_iter().zip(&self.log_sum_exp))
                .for_each(|((out, row), (target, &lse))| {
                    if let Some(target) = target {
                        vectorised(self.simd, || {
                            for (o, &x) in out.iter_mut().zip(row) {
                                *o = scale * exp_f32(x - lse);
                            }
                        });
                        out[*target as usize] -= scale;
                    }
                });
            out
        })?;
        let grad_logits = Tensor::from_vec(values, logits.shape(), logits.device())?;
        Ok(vec![Some(grad_logits)])
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor, Var};

    use crate::test_support::max_abs_diff;

    use super::{composed_cross_entropy, cross_entropy_sum};

    /// Loss and gradient of the fused kernel (f32) against the composed form in f64, on rows whose values
    /// spread over ±30 (as logits do), some without a target.
    #[test]
    fn matches_the_composed_loss_and_its_gradient() {
        let (rows, vocab) = (5, 1037);
        let values = Tensor::arange(0f64, (rows * vocab) as f64, &Device::Cpu)
            .unwrap()
            .affine(0.731, 0.2)
            .unwrap()
            .sin()
            .unwrap()
            .affine(30.0, 0.0)
            .unwrap()
            .reshape((rows, vocab))
            .unwrap();
        let targets = [Some(3), None, Some(1036), Some(0), None];
        let reference_logits = Var::from_tensor(&values).unwrap();
        let reference = composed_cross_entropy(reference_logits.as_tensor(), &targets).unwrap();
        let reference_grad = (&reference * 0.5).unwrap().backward().unwrap();
        let logits = Var::from_tensor(&values.to_dtype(DType::F32).unwrap()).unwrap();
        let ours = cross_entropy_sum(logits.as_tensor(), &targets).unwrap();
        let grads = (&ours * 0.5).unwrap().backward().unwrap();
        let loss_diff =
            (ours.to_scalar::<f32>().unwrap() as f64 - reference.to_scalar::<f64>().unwrap()).abs();
        let grad_diff = max_abs_diff(
            &grads.get(&logits).unwrap().to_dtype(DType::F64).unwrap(),
            reference_grad.get(&reference_logits).unwrap(),
        );
        assert!(
            reference.to_scalar::<f64>().unwrap() > 10.0,
            "a trivial reference"
        );
        assert!(loss_diff < 1e-4, "loss differs by {loss_diff}");
        assert!(grad_diff < 1e-6, "gradient differs by {grad_diff}");
    }

    #[test]
    fn a_target_outside_the_vocabulary_is_an_error() {
        let logits = Tensor::zeros((2, 4), DType::F32, &Device::Cpu).unwrap();
        let error = cross_entropy_sum(&logits, &[Some(4), None]).unwrap_err();
        assert!(
            error
                .to_string()
                .contains("label 4 is outside the vocabulary of 4 tokens")
        );
    }
}
