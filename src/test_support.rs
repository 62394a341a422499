//! Helpers for the unit tests.

use candle_core::Tensor;

/// The largest absolute element-wise difference of two f64 tensors of one shape.
pub(crate) fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b)
        .and_then(|d| d.abs())
        .and_then(|d| d.flatten_all())
        .and_then(|d| d.max(0))
        .and_then(|d| d.to_scalar::<f64>())
        .unwrap_or_else(|e| panic!("cannot compare the tensors: {e}"))
}
