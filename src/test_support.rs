//! Helpers for the unit tests.

use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor};

/// The largest absolute element-wise difference of two f64 tensors of one shape.
pub(crate) fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b)
        .and_then(|d| d.abs())
        .and_then(|d| d.flatten_all())
        .and_then(|d| d.max(0))
        .and_then(|d| d.to_scalar::<f64>())
        .unwrap_or_else(|e| panic!("cannot compare the tensors: {e}"))
}

/// Pseudo-random f32 values in [-1, 1) (structured ones, such as a sine, cancel in sums and inflate relative
/// errors).
pub(crate) fn pseudo_random(dims: &[usize], seed: f64) -> Tensor {
    let n: usize = dims.iter().product();
    let offset = (seed * 1e4) as u64;
    let data: Vec<f32> = (0..n as u64)
        .map(|i| {
            let h = (i + offset)
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (h >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect();
    Tensor::from_vec(data, dims, &Device::Cpu).expect("values of the given dims")
}

/// `max |a − b| / max |b|` of two f32 tensors of one shape.
pub(crate) fn relative_difference(a: &Tensor, b: &Tensor) -> f64 {
    let largest = |t: &Tensor| {
        t.abs()
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.max(0))
            .and_then(|t| t.to_scalar::<f32>())
            .unwrap_or_else(|e| panic!("cannot compare the tensors: {e}")) as f64
    };
    let difference = (a - b).unwrap_or_else(|e| panic!("cannot compare the tensors: {e}"));
    largest(&difference) / largest(b)
}

/// The gradients of `sum(y · probe)`.
pub(crate) fn probed_gradients(y: &Tensor, probe: &Tensor) -> GradStore {
    (y * probe)
        .and_then(|t| t.sum_all())
        .and_then(|t| t.backward())
        .unwrap_or_else(|e| panic!("cannot take the gradients: {e}"))
}
