//! `x · Wᵀ` for a handful of rows of `x` on the CPU in f32: a decoding step, where a few sequences each add
//! one token. A general matrix kernel repacks all of `W` for every call, which at a few rows costs more
//! than the arithmetic (the product is bound by reading `W` once); here each row of `W` is read straight
//! from the weight and dotted with every row of `x`, in parallel over output features.

use candle_core::{CpuStorage, Layout, Shape};
use rayon::prelude::*;

use super::fast_math::{Simd, vectorised};

/// The most rows of `x` this path takes; from about this many on, repacking `W` pays for itself.
pub(crate) const MAX_ROWS: usize = 8;

/// Products summed in separate lanes so that a dot product vectorises (two 8-lane registers).
const LANES: usize = 16;

/// Output features per parallel task: 64 rows of a 768-wide `W` are 192 KiB.
const FEATURES_PER_TASK: usize = 64;

/// `x · Wᵀ` when `x` (any leading dimensions, `[.., inner]`) has at most [`MAX_ROWS`] rows and both are
/// contiguous f32; `None` when the general kernel should run instead.
pub(crate) fn try_matmul(
    x: &CpuStorage,
    x_layout: &Layout,
    w: &CpuStorage,
    w_layout: &Layout,
) -> Option<(CpuStorage, Shape)> {
    let (CpuStorage::F32(x), CpuStorage::F32(w)) = (x, w) else {
        return None;
    };
    let (out_features, inner) = w_layout.shape().dims2().ok()?;
    let (&last, leading) = x_layout.dims().split_last()?;
    let rows = x_layout.shape().elem_count() / inner.max(1);
    if last != inner || inner == 0 || rows == 0 || rows > MAX_ROWS {
        return None;
    }
    let (x_start, x_end) = x_layout.contiguous_offsets()?;
    let (w_start, w_end) = w_layout.contiguous_offsets()?;
    crate::flops::add_layer(rows * inner * out_features);
    let output = matmul_transposed(
        &x[x_start..x_end],
        &w[w_start..w_end],
        rows,
        inner,
        out_features,
    );
    let mut dims = leading.to_vec();
    dims.push(out_features);
    Some((CpuStorage::F32(output), Shape::from(dims)))
}

/// `x` `[rows, inner]` times the transpose of `w` `[out, inner]`, both row-major: `[rows, out]`.
fn matmul_transposed(x: &[f32], w: &[f32], rows: usize, inner: usize, out: usize) -> Vec<f32> {
    let simd = Simd::detect();
    // Computed feature-major (each task writes whole `[rows]` runs), then turned row-major.
    let mut by_feature = vec![0.0f32; out * rows];
    by_feature
        .par_chunks_mut(FEATURES_PER_TASK * rows)
        .zip(w.par_chunks(FEATURES_PER_TASK * inner))
        .for_each(|(results, weights)| {
            vectorised(simd, || {
                for (result, weight) in results.chunks_mut(rows).zip(weights.chunks(inner)) {
                    for (value, x_row) in result.iter_mut().zip(x.chunks(inner)) {
                        *value = dot(x_row, weight);
                    }
                }
            })
        });
    let mut output = vec![0.0f32; rows * out];
    for (feature, values) in by_feature.chunks(rows).enumerate() {
        for (row, &value) in values.iter().enumerate() {
            output[row * out + feature] = value;
        }
    }
    output
}

#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0.0f32; LANES];
    let (a_blocks, a_tail) = a.as_chunks::<LANES>();
    let (b_blocks, b_tail) = b.as_chunks::<LANES>();
    for (a_block, b_block) in a_blocks.iter().zip(b_blocks) {
        for lane in 0..LANES {
            lanes[lane] += a_block[lane] * b_block[lane];
        }
    }
    let tail: f32 = a_tail.iter().zip(b_tail).map(|(a, b)| a * b).sum();
    lanes.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;

    #[test]
    fn few_rows_equal_the_general_product() {
        let device = Device::Cpu;
        // Widths that are and are not lane multiples; more features than one task; a transposed x.
        for (leading, inner, out) in [
            (vec![1, 1], 768, 200),
            (vec![3, 1], 37, 65),
            (vec![8], 16, 3),
        ] {
            let mut x_dims = leading.clone();
            x_dims.push(inner);
            let x = Tensor::randn(0f32, 1.0, x_dims, &device).unwrap();
            let w = Tensor::randn(0f32, 1.0, (out, inner), &device).unwrap();
            let expected = x.broadcast_matmul(&w.t().unwrap()).unwrap();
            let (xs, xl) = x.storage_and_layout();
            let (ws, wl) = w.storage_and_layout();
            let (candle_core::Storage::Cpu(xs), candle_core::Storage::Cpu(ws)) = (&*xs, &*ws)
            else {
                unreachable!()
            };
            let (storage, shape) = try_matmul(xs, xl, ws, wl).expect("taken");
            assert_eq!(shape.dims(), expected.dims());
            let CpuStorage::F32(values) = storage else {
                unreachable!()
            };
            let got = Tensor::from_vec(values, shape, &device).unwrap();
            let diff = (got - &expected).unwrap().abs().unwrap().max_all().unwrap();
            let diff = diff.to_scalar::<f32>().unwrap();
            assert!(diff < 1e-4, "{leading:?} {inner} {out}: {diff}");
        }
    }

    #[test]
    fn many_rows_other_dtypes_and_strided_inputs_are_left_to_the_general_kernel() {
        let device = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (4, 6), &device).unwrap();
        let many = Tensor::randn(0f32, 1.0, (MAX_ROWS + 1, 6), &device).unwrap();
        let strided = Tensor::randn(0f32, 1.0, (6, 2), &device)
            .unwrap()
            .t()
            .unwrap();
        let double = Tensor::zeros((2, 6), candle_core::DType::F64, &device).unwrap();
        let (ws, wl) = w.storage_and_layout();
        let candle_core::Storage::Cpu(ws) = &*ws else {
            unreachable!()
        };
        for x in [many, strided, double] {
            let (xs, xl) = x.storage_and_layout();
            let candle_core::Storage::Cpu(xs) = &*xs else {
                unreachable!()
            };
            assert!(try_matmul(xs, xl, ws, wl).is_none(), "{:?}", x.shape());
        }
    }
}
