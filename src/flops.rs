//! A process-wide count of the floating-point operations (two per multiply-add) done by the forward
//! passes of the frozen base layers and of attention, which together are nearly all of a Stable
//! Diffusion model's arithmetic. The benchmark reads it around a forward pass to report GFLOP/s; one
//! relaxed atomic add per layer call costs nothing measurable.

use std::sync::atomic::{AtomicU64, Ordering};

static LAYERS: AtomicU64 = AtomicU64::new(0);
static ATTENTION: AtomicU64 = AtomicU64::new(0);

/// Operations counted so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FlopCount {
    /// Linear layers and convolutions.
    pub layers: u64,
    /// The two products of attention (`q·kᵀ` and `probs·v`).
    pub attention: u64,
}

impl FlopCount {
    /// The count now.
    pub fn now() -> Self {
        Self {
            layers: LAYERS.load(Ordering::Relaxed),
            attention: ATTENTION.load(Ordering::Relaxed),
        }
    }

    /// What was counted since `earlier`.
    pub fn since(self, earlier: Self) -> Self {
        Self {
            layers: self.layers.wrapping_sub(earlier.layers),
            attention: self.attention.wrapping_sub(earlier.attention),
        }
    }

    pub fn total(self) -> u64 {
        self.layers + self.attention
    }
}

/// Counts a linear layer or convolution with `multiply_adds` multiply-adds.
pub fn add_layer(multiply_adds: usize) {
    LAYERS.fetch_add(2 * multiply_adds as u64, Ordering::Relaxed);
}

/// Counts attention products with `multiply_adds` multiply-adds.
pub fn add_attention(multiply_adds: usize) {
    ATTENTION.fetch_add(2 * multiply_adds as u64, Ordering::Relaxed);
}
