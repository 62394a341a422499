//! The order a language model's samples are trained in and how they share a forward pass. Every epoch the
//! samples are shuffled (the order depends only on the seed and the epoch, so a resumed run continues
//! exactly); a row holds one sample, or with `packing` as many as fit in `max_seq_length` tokens, each in
//! its own attention segment with positions restarting; `batch_size` rows make a micro-batch, padded to its
//! longest row.

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

use super::lm_samples::TokenizedSample;
use crate::models::causal_lm::{IGNORE_INDEX, PADDING_SEGMENT};

/// One micro-batch: rows of sample indices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TextBatch {
    pub rows: Vec<Vec<usize>>,
}

/// The micro-batches of epoch `epoch` (0-based).
pub fn text_epoch_batches(
    lengths: &[usize],
    batch_size: usize,
    packing_len: Option<usize>,
    seed: u64,
    epoch: u64,
) -> Vec<TextBatch> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.shuffle(&mut rng);
    let rows: Vec<Vec<usize>> = match packing_len {
        None => order.into_iter().map(|i| vec![i]).collect(),
        Some(limit) => {
            let mut rows: Vec<Vec<usize>> = Vec::new();
            let mut used = 0;
            for i in order {
                match rows.last_mut() {
                    Some(row) if used + lengths[i] <= limit => {
                        row.push(i);
                        used += lengths[i];
                    }
                    _ => {
                        rows.push(vec![i]);
                        used = lengths[i];
                    }
                }
            }
            rows
        }
    };
    rows.chunks(batch_size.max(1))
        .map(|chunk| TextBatch {
            rows: chunk.to_vec(),
        })
        .collect()
}

/// A micro-batch laid out for the model: ids, segments (one per sample, [`PADDING_SEGMENT`] for padding)
/// and labels, rows of one length. The first token of each sample is not a label: nothing before it in its
/// segment predicts it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaidOutBatch {
    pub ids: Vec<Vec<u32>>,
    pub segments: Vec<Vec<u32>>,
    /// Row-major, aligned with the ids.
    pub labels: Vec<i64>,
}

/// Lays out `batch` of `samples`, padding with `pad_id`.
pub fn lay_out(batch: &TextBatch, samples: &[TokenizedSample], pad_id: u32) -> LaidOutBatch {
    let width = batch
        .rows
        .iter()
        .map(|row| row.iter().map(|&i| samples[i].ids.len()).sum::<usize>())
        .max()
        .unwrap_or(0);
    let mut laid = LaidOutBatch {
        ids: Vec::new(),
        segments: Vec::new(),
        labels: Vec::new(),
    };
    for row in &batch.rows {
        let (mut ids, mut segments, mut labels) = (Vec::new(), Vec::new(), Vec::new());
        for (n, &i) in row.iter().enumerate() {
            let sample = &samples[i];
            ids.extend(&sample.ids);
            segments.extend(std::iter::repeat_n(n as u32 + 1, sample.ids.len()));
            labels.push(IGNORE_INDEX);
            labels.extend(sample.labels.iter().skip(1));
        }
        let gap = width - ids.len();
        ids.extend(std::iter::repeat_n(pad_id, gap));
        segments.extend(std::iter::repeat_n(PADDING_SEGMENT, gap));
        labels.extend(std::iter::repeat_n(IGNORE_INDEX, gap));
        laid.ids.push(ids);
        laid.segments.push(segments);
        laid.labels.extend(labels);
    }
    laid
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packing_fills_rows_in_order_and_every_sample_is_trained_once() {
        let lengths = [5, 3, 4, 2, 6, 1];
        let a = text_epoch_batches(&lengths, 2, Some(8), 3, 0);
        assert_eq!(a, text_epoch_batches(&lengths, 2, Some(8), 3, 0));
        assert_ne!(a, text_epoch_batches(&lengths, 2, Some(8), 3, 1));
        let mut seen: Vec<usize> = a.iter().flat_map(|b| b.rows.concat()).collect();
        seen.sort();
        assert_eq!(seen, [0, 1, 2, 3, 4, 5]);
        for row in a.iter().flat_map(|b| &b.rows) {
            assert!(
                row.iter().map(|&i| lengths[i]).sum::<usize>() <= 8,
                "{row:?}"
            );
        }
        let unpacked = text_epoch_batches(&lengths, 4, None, 3, 0);
        assert_eq!(unpacked.len(), 2);
        assert!(unpacked.iter().flat_map(|b| &b.rows).all(|r| r.len() == 1));
    }

    #[test]
    fn lay_out_pads_and_hides_each_first_token() {
        let sample = |ids: &[u32], labels: &[i64]| TokenizedSample {
            ids: ids.to_vec(),
            labels: labels.to_vec(),
        };
        let samples = [sample(&[1, 2, 3], &[1, 2, 3]), sample(&[4, 5], &[-100, 5])];
        let packed = lay_out(
            &TextBatch {
                rows: vec![vec![0, 1], vec![1]],
            },
            &samples,
            0,
        );
        assert_eq!(packed.ids, [vec![1, 2, 3, 4, 5], vec![4, 5, 0, 0, 0]]);
        assert_eq!(packed.segments, [vec![1, 1, 1, 2, 2], vec![1, 1, 0, 0, 0]]);
        assert_eq!(
            packed.labels,
            [-100, 2, 3, -100, 5, -100, 5, -100, -100, -100]
        );
    }
}
