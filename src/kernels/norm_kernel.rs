//! f32 CPU kernels of [`super::fused_norm::normalize_affine`] for the layouts of layer norm and group norm:
//! each row's mean and `1/√(var + eps)` (two passes, summed in f64), the affine output, and the input
//! gradient in two more passes, rows in parallel and loops compiled for AVX2 where the CPU has it. Composed
//! from candle ops, the same work is ten passes over memory, the reductions on one thread. The RMS
//! normalisation of [`super::rms_norm`] (no centring, a scale per element) is here too, in one pass each way
//! after the row's sum of squares.

use std::ops::Range;

use rayon::prelude::*;

use super::fast_math::{Simd, vectorised};

/// Which scale and shift each element of a row takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Channels {
    /// Element `e` of every row takes channel `e` (layer norm: rows as long as the weight).
    PerElement,
    /// Runs of `inner` consecutive elements share a channel, the runs of the whole tensor cycling through
    /// the channels (group norm: a channel's `h·w` pixels).
    PerRun { inner: usize },
}

impl Channels {
    /// The layout of a `weight` of `weight_dims` broadcast over `x_dims` (aligned at the last axis) for
    /// rows of `row_len` elements, if one of the two above fits.
    pub(super) fn of(x_dims: &[usize], weight_dims: &[usize], row_len: usize) -> Option<Self> {
        let offset = x_dims.len().checked_sub(weight_dims.len())?;
        let axis = (0..weight_dims.len()).rev().find(|&i| weight_dims[i] > 1)?;
        let (channels, x_axis) = (weight_dims[axis], offset + axis);
        let others_are_one = weight_dims
            .iter()
            .enumerate()
            .all(|(i, &d)| i == axis || d == 1);
        if !others_are_one || x_dims[x_axis] != channels {
            return None;
        }
        let inner: usize = x_dims[x_axis + 1..].iter().product();
        if inner == 1 && row_len == channels {
            Some(Self::PerElement)
        } else if inner > 0 && row_len.is_multiple_of(inner) {
            Some(Self::PerRun { inner })
        } else {
            None
        }
    }
}

/// A frozen scale and shift of one value per channel, laid out over rows as [`Channels`] says.
pub(super) struct Affine<'a> {
    pub weight: &'a [f32],
    pub bias: &'a [f32],
    pub channels: Channels,
}

/// The scale and shift of one run of a row.
enum Scale<'a> {
    /// One channel for the whole run.
    Same(f32, f32),
    /// One channel per element.
    Each(&'a [f32], &'a [f32]),
}

impl Affine<'_> {
    /// Calls `f` with each run of row `row` (`row_len` long) and its scale and shift.
    #[inline(always)]
    fn for_runs(&self, row: usize, row_len: usize, mut f: impl FnMut(Range<usize>, Scale<'_>)) {
        match self.channels {
            Channels::PerElement => f(
                0..row_len,
                Scale::Each(&self.weight[..row_len], &self.bias[..row_len]),
            ),
            Channels::PerRun { inner } => {
                let first_run = row * row_len / inner;
                for run in 0..row_len / inner {
                    let channel = (first_run + run) % self.weight.len();
                    f(
                        run * inner..(run + 1) * inner,
                        Scale::Same(self.weight[channel], self.bias[channel]),
                    );
                }
            }
        }
    }
}

/// Lanes of the partial sums: eight independent f32 accumulators let the loops vectorise; they are
/// combined in f64.
const LANES: usize = 8;

/// `(Σ a, Σ b)` over the elements of `x` (and `y`, `z`, element by element) of `terms(x, y, z) = (a, b)`.
#[inline(always)]
fn lane_sums(
    (x, y, z): (&[f32], &[f32], &[f32]),
    terms: impl Fn(f32, f32, f32) -> (f32, f32),
) -> (f64, f64) {
    let (mut first, mut second) = ([0f32; LANES], [0f32; LANES]);
    let blocks = x.len() / LANES * LANES;
    for start in (0..blocks).step_by(LANES) {
        let (x, y, z) = (
            &x[start..start + LANES],
            &y[start..start + LANES],
            &z[start..start + LANES],
        );
        for lane in 0..LANES {
            let (a, b) = terms(x[lane], y[lane], z[lane]);
            first[lane] += a;
            second[lane] += b;
        }
    }
    let (mut a_sum, mut b_sum) = (0f64, 0f64);
    for i in blocks..x.len() {
        let (a, b) = terms(x[i], y[i], z[i]);
        (a_sum, b_sum) = (a_sum + a as f64, b_sum + b as f64);
    }
    let total = |lanes: [f32; LANES]| lanes.iter().map(|&v| v as f64).sum::<f64>();
    (a_sum + total(first), b_sum + total(second))
}

/// Mean and `1/√(var + eps)` of a row, in two passes.
#[inline(always)]
fn statistics(row: &[f32], eps: f64) -> (f32, f32) {
    let len = row.len().max(1) as f64;
    let (sum, _) = lane_sums((row, row, row), |x, _, _| (x, 0.0));
    let mean = (sum / len) as f32;
    let (squares, _) = lane_sums((row, row, row), |x, _, _| ((x - mean) * (x - mean), 0.0));
    (mean, (1.0 / (squares / len + eps).sqrt()) as f32)
}

/// `(x − mean)·r·weight + bias` over `rows` rows of `x`, with each row's mean and `r = 1/√(var + eps)`.
pub(super) fn forward(
    x: &[f32],
    rows: usize,
    eps: f64,
    affine: &Affine,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let row_len = x.len() / rows.max(1);
    let mut output = vec![0f32; x.len()];
    let mut means = vec![0f32; rows];
    let mut inverse_stds = vec![0f32; rows];
    if row_len == 0 {
        return (output, means, inverse_stds);
    }
    let simd = Simd::detect();
    output
        .par_chunks_mut(row_len)
        .zip(x.par_chunks(row_len))
        .zip(means.par_iter_mut().zip(inverse_stds.par_iter_mut()))
        .enumerate()
        .for_each(|(row, ((output, x), (mean, inverse_std)))| {
            vectorised(
                simd,
                #[inline(always)]
                || {
                    let (m, r) = statistics(x, eps);
                    (*mean, *inverse_std) = (m, r);
                    affine.for_runs(row, row_len, |run, scale| {
                        let (output, x) = (&mut output[run.clone()], &x[run]);
                        match scale {
                            Scale::Same(w, b) => {
                                let (w, b) = (r * w, b - m * r * w);
                                for (y, &x) in output.iter_mut().zip(x) {
                                    *y = x * w + b;
                                }
                            }
                            Scale::Each(w, b) => {
                                for ((y, &x), (&w, &b)) in
                                    output.iter_mut().zip(x).zip(w.iter().zip(b))
                                {
                                    *y = (x - m) * r * w + b;
                                }
                            }
                        }
                    });
                },
            )
        });
    (output, means, inverse_stds)
}

/// The input gradient of [`forward`] for the output gradient `grad`: per row, with `g = grad·weight` and
/// `x̂ = (x − mean)·r`, `dx = r·(g − mean(g) − x̂·mean(g·x̂))`.
pub(super) fn backward(
    x: &[f32],
    grad: &[f32],
    (means, inverse_stds): (&[f32], &[f32]),
    affine: &Affine,
) -> Vec<f32> {
    let rows = means.len();
    let row_len = x.len() / rows.max(1);
    let mut grad_x = vec![0f32; x.len()];
    if row_len == 0 {
        return grad_x;
    }
    let simd = Simd::detect();
    grad_x
        .par_chunks_mut(row_len)
        .zip(x.par_chunks(row_len).zip(grad.par_chunks(row_len)))
        .zip(means.par_iter().zip(inverse_stds))
        .enumerate()
        .for_each(|(row, ((grad_x, (x, grad)), (&m, &r)))| {
            vectorised(
                simd,
                #[inline(always)]
                || {
                    let (mut sum, mut projection) = (0f64, 0f64);
                    affine.for_runs(row, row_len, |run, scale| {
                        let (x, grad) = (&x[run.clone()], &grad[run]);
                        let (s, p) = match scale {
                            Scale::Same(w, _) => {
                                let (s, p) = lane_sums((x, grad, grad), |x, g, _| (g, g * (x - m)));
                                (s * w as f64, p * w as f64)
                            }
                            Scale::Each(w, _) => {
                                lane_sums((x, grad, w), |x, g, w| (g * w, g * w * (x - m)))
                            }
                        };
                        (sum, projection) = (sum + s, projection + p);
                    });
                    let len = row_len as f64;
                    let mean_grad = (sum / len) as f32;
                    // mean(g·x̂) = r·mean(g·(x − mean)); the x̂ factor brings the second r.
                    let slope = (projection / len) as f32 * r * r;
                    affine.for_runs(row, row_len, |run, scale| {
                        let (grad_x, x, grad) =
                            (&mut grad_x[run.clone()], &x[run.clone()], &grad[run]);
                        match scale {
                            Scale::Same(w, _) => {
                                for ((dx, &x), &g) in grad_x.iter_mut().zip(x).zip(grad) {
                                    *dx = r * (g * w - mean_grad - (x - m) * slope);
                                }
                            }
                            Scale::Each(w, _) => {
                                for (((dx, &x), &g), &w) in
                                    grad_x.iter_mut().zip(x).zip(grad).zip(w)
                                {
                                    *dx = r * (g * w - mean_grad - (x - m) * slope);
                                }
                            }
                        }
                    });
                },
            )
        });
    grad_x
}

/// `x·r·weight` over the rows of `x` (each as long as `weight`), with each row's `r = 1/√(mean(x²) + eps)`
/// (the sum of squares in f64); returns the output and every row's `r`.
pub(super) fn rms_forward(x: &[f32], weight: &[f32], eps: f64) -> (Vec<f32>, Vec<f32>) {
    let row_len = weight.len();
    let mut output = vec![0f32; x.len()];
    if row_len == 0 {
        return (output, Vec::new());
    }
    let mut inverse_rms = vec![0f32; x.len() / row_len];
    let simd = Simd::detect();
    output
        .par_chunks_mut(row_len)
        .zip(x.par_chunks(row_len))
        .zip(inverse_rms.par_iter_mut())
        .for_each(|((output, x), inverse)| {
            vectorised(
                simd,
                #[inline(always)]
                || {
                    let (squares, _) = lane_sums((x, x, x), |x, _, _| (x * x, 0.0));
                    let r = (1.0 / (squares / row_len as f64 + eps).sqrt()) as f32;
                    *inverse = r;
                    for ((y, &x), &w) in output.iter_mut().zip(x).zip(weight) {
                        *y = x * r * w;
                    }
                },
            )
        });
    (output, inverse_rms)
}

/// The input gradient of [`rms_forward`] for the output gradient `grad`: per row, with `g = grad·weight`
/// and `x̂ = x·r`, `dx = r·(g − x̂·mean(g·x̂)) = r·g − x·r³·mean(g·x)`.
pub(super) fn rms_backward(
    x: &[f32],
    grad: &[f32],
    inverse_rms: &[f32],
    weight: &[f32],
) -> Vec<f32> {
    let row_len = weight.len();
    let mut grad_x = vec![0f32; x.len()];
    if row_len == 0 {
        return grad_x;
    }
    let simd = Simd::detect();
    grad_x
        .par_chunks_mut(row_len)
        .zip(x.par_chunks(row_len).zip(grad.par_chunks(row_len)))
        .zip(inverse_rms.par_iter())
        .for_each(|((grad_x, (x, grad)), &r)| {
            vectorised(
                simd,
                #[inline(always)]
                || {
                    let (projection, _) = lane_sums((x, grad, weight), |x, g, w| (g * w * x, 0.0));
                    let slope = (projection / row_len as f64) as f32 * r * r * r;
                    for (((dx, &x), &g), &w) in grad_x.iter_mut().zip(x).zip(grad).zip(weight) {
                        *dx = r * g * w - x * slope;
                    }
                },
            )
        });
    grad_x
}
