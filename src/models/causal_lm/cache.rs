//! The key/value cache of incremental decoding: every layer's keys and values of the tokens seen so far
//! (after the rotary embedding, before grouped heads are repeated) and their segments, so the next tokens
//! attend to them without recomputing them. Grows by concatenation, one step at a time.

use candle_core::{Result, Tensor};

use super::batch::{TokenBatch, positions_within_segments};

/// Keys and values of one layer, `[rows, tokens, kv_heads·head_dim]` each.
pub(super) type LayerCache = Option<(Tensor, Tensor)>;

/// What a model has seen of the rows it is decoding.
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<LayerCache>,
    /// The segment of every cached token, per row.
    segments: Vec<Vec<u32>>,
}

impl KvCache {
    /// An empty cache for a model of `layers` layers.
    pub fn new(layers: usize) -> Self {
        Self {
            layers: vec![None; layers],
            segments: Vec::new(),
        }
    }

    /// The batch of the next tokens: positions continue each segment's count over the cached tokens.
    pub fn next_batch(&self, ids: Vec<Vec<u32>>, segments: Vec<Vec<u32>>) -> Result<TokenBatch> {
        let positions = positions_within_segments(&self.segments, &segments);
        TokenBatch::with_positions(ids, segments, positions)
    }

    /// Each row's cached segments.
    pub(super) fn segments(&self) -> &[Vec<u32>] {
        &self.segments
    }

    pub(super) fn layer_mut(&mut self, layer: usize) -> Option<&mut LayerCache> {
        self.layers.get_mut(layer)
    }

    /// Records the segments of a batch whose keys and values every layer has appended.
    pub(super) fn record(&mut self, batch: &TokenBatch) -> Result<()> {
        if !self.segments.is_empty() && self.segments.len() != batch.rows() {
            candle_core::bail!(
                "the cache holds {} rows, the batch {}",
                self.segments.len(),
                batch.rows()
            );
        }
        self.segments.resize(batch.rows(), Vec::new());
        for (row, cached) in self.segments.iter_mut().enumerate() {
            cached.extend_from_slice(batch.row_segments(row));
        }
        Ok(())
    }
}

/// Appends `keys` and `values` (`[rows, new tokens, width]`) to a layer's cache and returns all of them.
pub(super) fn append(
    cache: &mut LayerCache,
    keys: Tensor,
    values: Tensor,
) -> Result<(Tensor, Tensor)> {
    let all = match cache.take() {
        Some((cached_keys, cached_values)) => (
            Tensor::cat(&[&cached_keys, &keys], 1)?,
            Tensor::cat(&[&cached_values, &values], 1)?,
        ),
        None => (keys, values),
    };
    *cache = Some(all.clone());
    Ok(all)
}
