//! The next-token cross-entropy of a causal language model, as transformers computes it: the logits at
//! position `t` predict the label at `t + 1`, labels equal to [`IGNORE_INDEX`] (prompts, padding) are
//! skipped, and the log-softmax runs in f32 (f64 for an f64 model; see [`cross_entropy_sum`]). Returns the sum and the count of the
//! tokens it covers, so a caller can normalise over an accumulated batch.

use candle_core::{Result, Tensor};

use crate::kernels::cross_entropy_sum;

/// The label of a token that takes no part in the loss.
pub const IGNORE_INDEX: i64 = -100;

/// `Σ −log p(label[t+1] | logits[t])` over every row and position whose next label is not
/// [`IGNORE_INDEX`], and the number of such positions. `logits`: `[rows, tokens, vocab]`; `labels`:
/// row-major `rows · tokens`, aligned with the input ids.
pub fn next_token_loss(logits: &Tensor, labels: &[i64]) -> Result<(Tensor, usize)> {
    let (rows, tokens, vocab) = logits.dims3()?;
    if labels.len() != rows * tokens {
        candle_core::bail!("{} labels for {rows} rows of {tokens} tokens", labels.len());
    }
    let mut targets = vec![None; rows * tokens];
    for row in 0..rows {
        for t in 0..tokens.saturating_sub(1) {
            let label = labels[row * tokens + t + 1];
            if label == IGNORE_INDEX {
                continue;
            }
            if label < 0 {
                candle_core::bail!("label {label} is not a token id");
            }
            targets[row * tokens + t] = Some(label as u32);
        }
    }
    let count = targets.iter().flatten().count();
    let total = cross_entropy_sum(&logits.reshape((rows * tokens, vocab))?, &targets)?;
    Ok((total, count))
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;

    #[test]
    fn shifts_labels_skips_ignored_ones_and_sums() {
        // One row of three tokens over a vocabulary of two: position 0 predicts label 1, position 1
        // predicts label 2 (ignored), position 2 predicts nothing.
        let logits = Tensor::new(&[[[0f64, 0.0], [2.0, 0.0], [5.0, 5.0]]], &Device::Cpu).unwrap();
        let (sum, count) = next_token_loss(&logits, &[IGNORE_INDEX, 1, IGNORE_INDEX]).unwrap();
        assert_eq!(count, 1);
        assert!((sum.to_scalar::<f64>().unwrap() - std::f64::consts::LN_2).abs() < 1e-12);
        let (sum, count) = next_token_loss(&logits, &[0, 1, 0]).unwrap();
        let expected = std::f64::consts::LN_2 + (1.0 + 2f64.exp()).ln() - 2.0;
        assert_eq!(count, 2);
        assert!((sum.to_scalar::<f64>().unwrap() - expected).abs() < 1e-12);
        assert!(next_token_loss(&logits, &[0, 7, 0]).is_err());
    }
}
