//! The tokens of one forward pass and which tokens each may attend to.
//!
//! Every token carries a position (for the rotary embedding) and a segment id. A token attends to the
//! tokens before it, and itself, in its own segment, so one rule covers a causal batch (one segment per
//! row), padding (padding tokens in a segment of their own, [`PADDING_SEGMENT`], on either side) and packed
//! rows (several texts, each its own segment, block-diagonal attention). Positions count the earlier
//! tokens of the same segment unless given, so they restart with every packed text and start at 0 after
//! left padding, as transformers' `generate` numbers them. With a KV cache the cached tokens come first.

use candle_core::{Device, Result, Tensor};

/// The segment of padding tokens in [`TokenBatch::padded`].
pub const PADDING_SEGMENT: u32 = 0;
/// The segment of the text tokens in [`TokenBatch::padded`].
pub const TEXT_SEGMENT: u32 = 1;

/// Which end of a row padding goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PaddingSide {
    Left,
    Right,
}

/// Rows of equal length of token ids, each token with its position and segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenBatch {
    rows: usize,
    ids: Vec<u32>,
    positions: Vec<u32>,
    segments: Vec<u32>,
}

impl TokenBatch {
    /// `ids` and `segments` (rows of one length); positions count the earlier tokens of each segment.
    pub fn new(ids: Vec<Vec<u32>>, segments: Vec<Vec<u32>>) -> Result<Self> {
        let positions = positions_within_segments(&[], &segments);
        Self::with_positions(ids, segments, positions)
    }

    /// `ids`, `segments` and `positions`, all rows of one length.
    pub fn with_positions(
        ids: Vec<Vec<u32>>,
        segments: Vec<Vec<u32>>,
        positions: Vec<Vec<u32>>,
    ) -> Result<Self> {
        let rows = ids.len();
        let len = ids.first().map_or(0, Vec::len);
        let rectangular =
            |table: &[Vec<u32>]| table.len() == rows && table.iter().all(|r| r.len() == len);
        if rows == 0
            || len == 0
            || !rectangular(&ids)
            || !rectangular(&segments)
            || !rectangular(&positions)
        {
            candle_core::bail!(
                "a token batch needs ids, segments and positions in rows of one non-zero length"
            );
        }
        Ok(Self {
            rows,
            ids: ids.concat(),
            positions: positions.concat(),
            segments: segments.concat(),
        })
    }

    /// Texts of different lengths padded with `pad_id` to the longest: text tokens in [`TEXT_SEGMENT`],
    /// padding in [`PADDING_SEGMENT`].
    pub fn padded(texts: &[Vec<u32>], pad_id: u32, side: PaddingSide) -> Result<Self> {
        let len = texts.iter().map(Vec::len).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(texts.len());
        let mut segments = Vec::with_capacity(texts.len());
        for text in texts {
            let gap = len - text.len();
            let (padding, tokens) = (vec![pad_id; gap], text.clone());
            let (pad_segments, text_segments) =
                (vec![PADDING_SEGMENT; gap], vec![TEXT_SEGMENT; text.len()]);
            match side {
                PaddingSide::Left => {
                    ids.push([padding, tokens].concat());
                    segments.push([pad_segments, text_segments].concat());
                }
                PaddingSide::Right => {
                    ids.push([tokens, padding].concat());
                    segments.push([text_segments, pad_segments].concat());
                }
            }
        }
        Self::new(ids, segments)
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Tokens per row.
    pub fn len(&self) -> usize {
        self.ids.len() / self.rows
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Row-major ids.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    /// Row-major positions.
    pub fn positions(&self) -> &[u32] {
        &self.positions
    }

    /// Row-major segment ids.
    pub fn segments(&self) -> &[u32] {
        &self.segments
    }

    /// The segments of row `row`.
    pub fn row_segments(&self, row: usize) -> &[u32] {
        let len = self.len();
        &self.segments[row * len..(row + 1) * len]
    }

    /// The ids as a `[rows, len]` u32 tensor.
    pub(super) fn ids_tensor(&self, device: &Device) -> Result<Tensor> {
        Tensor::from_vec(self.ids.clone(), (self.rows, self.len()), device)
    }

    /// The additive mask `[rows, 1, len, history + len]` (0 where a query may attend to a key, −∞ where
    /// not) for this batch after `history` (each row's cached segments, all of one length).
    pub(super) fn attention_mask(&self, history: &[Vec<u32>], device: &Device) -> Result<Tensor> {
        let len = self.len();
        let past = history.first().map_or(0, Vec::len);
        let keys = past + len;
        let mut mask = vec![f32::NEG_INFINITY; self.rows * len * keys];
        for row in 0..self.rows {
            let segments = self.row_segments(row);
            let cached = history.get(row).map_or(&[][..], Vec::as_slice);
            for (query, &segment) in segments.iter().enumerate() {
                let line = &mut mask[(row * len + query) * keys..][..keys];
                let visible = cached.iter().chain(&segments[..=query]);
                for (value, &key_segment) in line.iter_mut().zip(visible) {
                    if key_segment == segment {
                        *value = 0.0;
                    }
                }
            }
        }
        Tensor::from_vec(mask, (self.rows, 1, len, keys), device)
    }
}

/// For each token of `segments`, the number of earlier tokens of its segment in its row of `history` and
/// of `segments`.
pub(super) fn positions_within_segments(
    history: &[Vec<u32>],
    segments: &[Vec<u32>],
) -> Vec<Vec<u32>> {
    segments
        .iter()
        .enumerate()
        .map(|(row, segments)| {
            let cached = history.get(row).map_or(&[][..], Vec::as_slice);
            segments
                .iter()
                .enumerate()
                .map(|(i, &s)| {
                    let earlier = cached.iter().chain(&segments[..i]);
                    earlier.filter(|&&e| e == s).count() as u32
                })
                .collect()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether each query of each row may attend to each key.
    fn mask_rows(batch: &TokenBatch, history: &[Vec<u32>]) -> Vec<Vec<Vec<bool>>> {
        let mask = batch.attention_mask(history, &Device::Cpu).unwrap();
        let values = mask.squeeze(1).unwrap().to_vec3::<f32>().unwrap();
        values
            .into_iter()
            .map(|row| {
                row.into_iter()
                    .map(|q| q.into_iter().map(|v| v == 0.0).collect())
                    .collect()
            })
            .collect()
    }

    #[test]
    fn padding_and_packing_restart_positions_and_split_attention() {
        let left = TokenBatch::padded(&[vec![7, 8, 9], vec![5]], 0, PaddingSide::Left).unwrap();
        assert_eq!(left.ids(), [7, 8, 9, 0, 0, 5]);
        assert_eq!(left.positions(), [0, 1, 2, 0, 1, 0]);
        let right = TokenBatch::padded(&[vec![5], vec![7, 8]], 0, PaddingSide::Right).unwrap();
        assert_eq!(right.positions(), [0, 0, 0, 1]);
        let packed = TokenBatch::new(vec![vec![1, 2, 3, 4, 5]], vec![vec![1, 1, 2, 2, 0]]).unwrap();
        assert_eq!(packed.positions(), [0, 1, 0, 1, 0]);
        let allowed = mask_rows(&packed, &[]);
        let expected = [
            [true, false, false, false, false],
            [true, true, false, false, false],
            [false, false, true, false, false],
            [false, false, true, true, false],
            [false, false, false, false, true],
        ];
        assert_eq!(allowed[0], expected.map(|r| r.to_vec()).to_vec());
    }

    #[test]
    fn cached_tokens_are_seen_by_their_segment_and_count_for_positions() {
        let history = vec![vec![0, 1, 1], vec![1, 1, 1]];
        let segments = vec![vec![1], vec![1]];
        assert_eq!(positions_within_segments(&history, &segments), [[2], [3]]);
        let step = TokenBatch::new(vec![vec![4], vec![4]], segments).unwrap();
        let allowed = mask_rows(&step, &history);
        assert_eq!(allowed[0], [[false, true, true, true]]);
        assert_eq!(allowed[1], [[true, true, true, true]]);
    }

    #[test]
    fn ragged_or_empty_rows_are_an_error() {
        assert!(TokenBatch::new(vec![vec![1, 2], vec![3]], vec![vec![1, 1], vec![1]]).is_err());
        assert!(TokenBatch::new(vec![], vec![]).is_err());
    }
}
