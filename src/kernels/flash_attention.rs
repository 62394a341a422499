//! Attention on the CPU in tiles of query rows, forward and backward (the FlashAttention schedule): for
//! each head and each tile of rows, the scores against every key are computed into a tile buffer, turned
//! into probabilities there and multiplied out, so the `[heads, q_len, kv_len]` score matrix never exists
//! in memory. The forward pass also returns each query's log-sum-exp `L`, from which the backward pass
//! recomputes a tile's probabilities in one pass (`P = exp(s·q·kᵀ − L)`) and applies
//! `dV += Pᵀ·dO`, `dS = P ⊙ (dO·Vᵀ − rowsum(dO ⊙ O))`, `dQ = s·dS·K`, `dK += s·dSᵀ·Q`.
//!
//! Tiles are held key-major (`[kv_len, rows]`, the transposed scores): then the large operand of every
//! product but one is read row by row in place, which the `gemm` crate multiplies at 90-105 GFLOP/s per
//! core at head size 40, where the query-major layout's `Pᵀ·dO` and `dSᵀ·Q` reach 55. Normalisation by the
//! softmax sums is applied to the `rows × d` output instead of the tile. Heads run in parallel; each tile
//! product is one single-threaded `gemm` call. The f32 exponentials use [`super::fast_math`]'s
//! vectorisable `exp`.

use rayon::prelude::*;

use super::amx::{Operand, Output, PackedLeft};
use super::fast_math::{Simd, exp_f32, vectorised};

/// Score elements per tile (2 MiB in f32). Measured on a 2-core machine with 1 MiB of L2 per core, 4096
/// tokens: 32 Ki elements per tile 1.05 s forward+backward, 128 Ki 0.78 s, 512 Ki 0.70 s; the taller tiles
/// make each tile product more efficient than the cache misses cost.
const TILE_ELEMENTS: usize = 512 * 1024;

/// Sizes of one attention: `heads` independent (batch × heads) problems, and the query rows per tile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionDims {
    pub heads: usize,
    pub q_len: usize,
    pub kv_len: usize,
    pub head_dim: usize,
    pub tile_rows: usize,
    /// Whether the tile products are bf16 ones (f32 only; read from [`super::products::bf16_products`] on
    /// the thread that starts the attention, as the heads run on others).
    pub bf16_products: bool,
}

/// Query rows per tile for `kv_len` keys.
pub fn tile_rows(kv_len: usize) -> usize {
    (TILE_ELEMENTS / kv_len.max(1)).clamp(8, 256)
}

/// The element types the kernel runs on.
pub trait Element: num_traits::Float + Send + Sync + 'static {
    /// `row[j] = exp(row[j] − shift[j])` and `sums[j] += row[j]` for every column `j`.
    fn exp_shifted(row: &mut [Self], shift: &[Self], sums: &mut [Self]);

    /// `view` (`rows × cols`) packed as the left operand of bf16 products; `None` for types without them.
    fn bf16_pack(_view: View<'_, Self>, _dims: (usize, usize)) -> Option<PackedLeft> {
        None
    }

    /// [`matmul`] in bf16 products; `false` (nothing done) for types without them.
    fn bf16_product(
        _dims: (usize, usize, usize),
        _dst: &mut [Self],
        _dst_rs: usize,
        _accumulate: bool,
        _operands: (View<'_, Self>, View<'_, Self>),
        _beta: Self,
    ) -> bool {
        false
    }
}

impl Element for f64 {
    fn exp_shifted(row: &mut [f64], shift: &[f64], sums: &mut [f64]) {
        for ((x, &shift), sum) in row.iter_mut().zip(shift).zip(sums) {
            *x = (*x - shift).exp();
            *sum += *x;
        }
    }
}

impl Element for f32 {
    fn exp_shifted(row: &mut [f32], shift: &[f32], sums: &mut [f32]) {
        vectorised(Simd::detect(), || exp_shifted_f32(row, shift, sums))
    }

    fn bf16_product(
        (m, n, k): (usize, usize, usize),
        dst: &mut [f32],
        dst_rs: usize,
        accumulate: bool,
        (lhs, rhs): (View<'_, f32>, View<'_, f32>),
        beta: f32,
    ) -> bool {
        let out = Output {
            data: dst,
            row_stride: dst_rs,
            accumulate,
            scale: beta,
        };
        match lhs.packed {
            Some(packed) => super::amx::product_packed(packed, operand(rhs), n, out, false),
            None => super::amx::product((m, k, n), operand(lhs), operand(rhs), out, false),
        }
        true
    }

    fn bf16_pack(view: View<'_, f32>, dims: (usize, usize)) -> Option<PackedLeft> {
        Some(PackedLeft::new(operand(view), dims, false))
    }
}

/// An f32 view as an AMX operand.
fn operand(view: View<'_, f32>) -> Operand<'_> {
    Operand::f32(view.data, view.row_stride, view.col_stride)
}

#[inline(always)]
fn exp_shifted_f32(row: &mut [f32], shift: &[f32], sums: &mut [f32]) {
    for ((x, &shift), sum) in row.iter_mut().zip(shift).zip(sums) {
        *x = exp_f32(*x - shift);
        *sum += *x;
    }
}

/// A read-only matrix view: element `(r, c)` is `data[r·row_stride + c·col_stride]`; as a left operand of
/// bf16 products, possibly packed already.
#[derive(Clone, Copy)]
pub struct View<'a, T> {
    data: &'a [T],
    row_stride: usize,
    col_stride: usize,
    packed: Option<&'a PackedLeft>,
}

impl<'a, T> View<'a, T> {
    fn new(data: &'a [T], row_stride: usize, col_stride: usize) -> Self {
        Self {
            data,
            row_stride,
            col_stride,
            packed: None,
        }
    }

    /// The same view, with its bf16 tile-order form where there is one.
    fn packed(self, packed: Option<&'a PackedLeft>) -> Self {
        Self { packed, ..self }
    }
}

/// A head's operand in bf16 tile order when the products are bf16 ones and the type has them.
fn prepacked<T: Element>(
    bf16: bool,
    view: View<'_, T>,
    dims: (usize, usize),
) -> Option<PackedLeft> {
    if bf16 { T::bf16_pack(view, dims) } else { None }
}

/// `dst (m×n, row stride dst_rs) [+]= beta · lhs (m×k) · rhs (k×n)` on the calling thread; without
/// `accumulate`, `dst` is overwritten. In bf16 products when `bf16` and the type has them.
#[allow(clippy::too_many_arguments)]
fn matmul<T: Element>(
    (m, n, k): (usize, usize, usize),
    dst: &mut [T],
    dst_rs: usize,
    accumulate: bool,
    lhs: View<'_, T>,
    rhs: View<'_, T>,
    beta: T,
    bf16: bool,
) {
    if bf16 && T::bf16_product((m, n, k), dst, dst_rs, accumulate, (lhs, rhs), beta) {
        return;
    }
    let last = |rows: usize, cols: usize, rs: usize, cs: usize| (rows - 1) * rs + (cols - 1) * cs;
    assert!(m > 0 && n > 0 && k > 0);
    assert!(last(m, n, dst_rs, 1) < dst.len());
    assert!(last(m, k, lhs.row_stride, lhs.col_stride) < lhs.data.len());
    assert!(last(k, n, rhs.row_stride, rhs.col_stride) < rhs.data.len());
    // SAFETY: the asserts keep every index the product touches inside the slices, and `dst` does not
    // overlap the operands (it is borrowed mutably).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.col_stride as isize,
            lhs.row_stride as isize,
            rhs.data.as_ptr(),
            rhs.col_stride as isize,
            rhs.row_stride as isize,
            T::one(),
            beta,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// The transposed scores `s·K·Q_tileᵀ` (`kv_len × rows`) of query rows `start..start + rows` of one head
/// into `scores`.
fn transposed_scores<T: Element>(
    dims: &AttentionDims,
    (q, k, packed_k): (&[T], &[T], Option<&PackedLeft>),
    (start, rows): (usize, usize),
    scale: T,
    scores: &mut [T],
) {
    let d = dims.head_dim;
    matmul(
        (dims.kv_len, rows, d),
        scores,
        rows,
        false,
        View::new(k, d, 1).packed(packed_k),
        View::new(&q[start * d..], 1, d),
        scale,
        dims.bf16_products,
    );
}

/// Rows `j` of `Tᵀ·X` times `row_scale(j)` into `target` (`rows × d`) for a key-major tile `T`
/// (`kv_len × rows`) and keys' `X` (`kv_len × d`), computed as `(Tᵀ·X)ᵀ = Xᵀ·T` in `scratch` (`d × rows`),
/// the product whose large operand, the tile, is read row by row.
fn tile_product_rows<T: Element>(
    (tile, keys, packed_keys_t): (&[T], &[T], Option<&PackedLeft>),
    (kv_len, rows, d): (usize, usize, usize),
    row_scale: impl Fn(usize) -> T,
    (scratch, target): (&mut [T], &mut [T]),
    bf16: bool,
) {
    matmul(
        (d, rows, kv_len),
        scratch,
        rows,
        false,
        View::new(keys, 1, d).packed(packed_keys_t),
        View::new(tile, rows, 1),
        T::one(),
        bf16,
    );
    for (j, row) in target.chunks_mut(d).enumerate() {
        let factor = row_scale(j);
        for (c, value) in row.iter_mut().enumerate() {
            *value = scratch[c * rows + j] * factor;
        }
    }
}

/// `softmax(s·q·kᵀ)·v` for `q`: `[heads, q_len, head_dim]`, `k`, `v`: `[heads, kv_len, head_dim]`, all
/// contiguous. Returns the result, shaped like `q`, and the log-sum-exp of each query's scores
/// (`[heads, q_len]`), from which [`backward`] recomputes the probabilities.
pub fn forward<T: Element>(
    q: &[T],
    k: &[T],
    v: &[T],
    dims: AttentionDims,
    scale: T,
) -> (Vec<T>, Vec<T>) {
    let (l, m, d) = (dims.q_len, dims.kv_len, dims.head_dim);
    let mut out = vec![T::zero(); dims.heads * l * d];
    let mut log_sum_exp = vec![T::zero(); dims.heads * l];
    if l == 0 || m == 0 || d == 0 {
        return (out, log_sum_exp);
    }
    let tile = dims.tile_rows.max(1);
    out.par_chunks_mut(l * d)
        .zip(log_sum_exp.par_chunks_mut(l))
        .enumerate()
        .for_each(|(h, (out, log_sum_exp))| {
            let (q, k, v) = (
                &q[h * l * d..(h + 1) * l * d],
                &k[h * m * d..(h + 1) * m * d],
                &v[h * m * d..(h + 1) * m * d],
            );
            let mut probs = vec![T::zero(); m * tile];
            let mut out_t = vec![T::zero(); d * tile];
            let (mut max, mut sums) = (vec![T::zero(); tile], vec![T::zero(); tile]);
            // Keys and transposed values, packed once for every tile of this head.
            let bf16 = dims.bf16_products;
            let packed_k = prepacked(bf16, View::new(k, d, 1), (m, d));
            let packed_v_t = prepacked(bf16, View::new(v, 1, d), (d, m));
            let keys = (q, k, packed_k.as_ref());
            for start in (0..l).step_by(tile) {
                let rows = tile.min(l - start);
                let (probs, out_t) = (&mut probs[..m * rows], &mut out_t[..d * rows]);
                let (max, sums) = (&mut max[..rows], &mut sums[..rows]);
                transposed_scores(&dims, keys, (start, rows), scale, probs);
                max.fill(T::neg_infinity());
                for key in probs.chunks(rows) {
                    for (max, &score) in max.iter_mut().zip(key) {
                        *max = max.max(score);
                    }
                }
                sums.fill(T::zero());
                probs
                    .chunks_mut(rows)
                    .for_each(|key| T::exp_shifted(key, max, sums));
                // O = P·V, normalised by the sums.
                let out_rows = &mut out[start * d..][..rows * d];
                tile_product_rows(
                    (probs, v, packed_v_t.as_ref()),
                    (m, rows, d),
                    |j| sums[j].recip(),
                    (out_t, out_rows),
                    dims.bf16_products,
                );
                for ((lse, &max), &sum) in log_sum_exp[start..].iter_mut().zip(&*max).zip(&*sums) {
                    *lse = max + sum.ln();
                }
            }
        });
    (out, log_sum_exp)
}

/// The gradients of `q`, `k` and `v` for the gradient `grad` of the output `out` of [`forward`], which also
/// gave `log_sum_exp`.
pub fn backward<T: Element>(
    (q, k, v): (&[T], &[T], &[T]),
    (out, log_sum_exp): (&[T], &[T]),
    grad: &[T],
    dims: AttentionDims,
    scale: T,
) -> (Vec<T>, Vec<T>, Vec<T>) {
    let (l, m, d) = (dims.q_len, dims.kv_len, dims.head_dim);
    let mut grad_q = vec![T::zero(); dims.heads * l * d];
    let mut grad_k = vec![T::zero(); dims.heads * m * d];
    let mut grad_v = vec![T::zero(); dims.heads * m * d];
    if l == 0 || m == 0 || d == 0 {
        return (grad_q, grad_k, grad_v);
    }
    let tile = dims.tile_rows.max(1);
    grad_q
        .par_chunks_mut(l * d)
        .zip(grad_k.par_chunks_mut(m * d))
        .zip(grad_v.par_chunks_mut(m * d))
        .enumerate()
        .for_each(|(h, ((grad_q, grad_k), grad_v))| {
            let query_rows = h * l * d..(h + 1) * l * d;
            let key_rows = h * m * d..(h + 1) * m * d;
            let (q, out, grad) = (
                &q[query_rows.clone()],
                &out[query_rows.clone()],
                &grad[query_rows],
            );
            let (k, v) = (&k[key_rows.clone()], &v[key_rows]);
            let log_sum_exp = &log_sum_exp[h * l..(h + 1) * l];
            // Keys, values and transposed keys, packed once for every tile of this head.
            let bf16 = dims.bf16_products;
            let packed_k = prepacked(bf16, View::new(k, d, 1), (m, d));
            let packed_v = prepacked(bf16, View::new(v, d, 1), (m, d));
            let packed_k_t = prepacked(bf16, View::new(k, 1, d), (d, m));
            let keys = (q, k, packed_k.as_ref());
            let row_dot: Vec<T> = grad
                .chunks(d)
                .zip(out.chunks(d))
                .map(|(g, o)| g.iter().zip(o).fold(T::zero(), |acc, (&g, &o)| acc + g * o))
                .collect();
            let mut probs = vec![T::zero(); m * tile];
            let mut grad_scores = vec![T::zero(); m * tile];
            let mut grad_q_t = vec![T::zero(); d * tile];
            let mut unused_sums = vec![T::zero(); tile];
            for start in (0..l).step_by(tile) {
                let rows = tile.min(l - start);
                let probs = &mut probs[..m * rows];
                let grad_scores = &mut grad_scores[..m * rows];
                let grad_q_t = &mut grad_q_t[..d * rows];
                let shift = &log_sum_exp[start..start + rows];
                transposed_scores(&dims, keys, (start, rows), scale, probs);
                probs
                    .chunks_mut(rows)
                    .for_each(|key| T::exp_shifted(key, shift, &mut unused_sums[..rows]));
                let grad_tile = &grad[start * d..];
                // dV += Pᵀ·dO
                matmul(
                    (m, d, rows),
                    grad_v,
                    d,
                    true,
                    View::new(probs, rows, 1),
                    View::new(grad_tile, d, 1),
                    T::one(),
                    dims.bf16_products,
                );
                // dPᵀ = V·dOᵀ
                matmul(
                    (m, rows, d),
                    grad_scores,
                    rows,
                    false,
                    View::new(v, d, 1).packed(packed_v.as_ref()),
                    View::new(grad_tile, 1, d),
                    T::one(),
                    dims.bf16_products,
                );
                // dSᵀ = Pᵀ ⊙ (dPᵀ − rowsum(dO ⊙ O))
                let dots = &row_dot[start..start + rows];
                for (p_key, ds_key) in probs.chunks(rows).zip(grad_scores.chunks_mut(rows)) {
                    for ((ds, &p), &dot) in ds_key.iter_mut().zip(p_key).zip(dots) {
                        *ds = p * (*ds - dot);
                    }
                }
                // dK += s·dSᵀ·Q
                matmul(
                    (m, d, rows),
                    grad_k,
                    d,
                    true,
                    View::new(grad_scores, rows, 1),
                    View::new(&q[start * d..], d, 1),
                    scale,
                    dims.bf16_products,
                );
                // dQ = s·dS·K
                let grad_q_rows = &mut grad_q[start * d..][..rows * d];
                tile_product_rows(
                    (grad_scores, k, packed_k_t.as_ref()),
                    (m, rows, d),
                    |_| scale,
                    (grad_q_t, grad_q_rows),
                    dims.bf16_products,
                );
            }
        });
    (grad_q, grad_k, grad_v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f32_attention_and_gradients_match_f64() {
        let dims = AttentionDims {
            heads: 3,
            q_len: 45,
            kv_len: 29,
            head_dim: 8,
            tile_rows: 16,
            bf16_products: false,
        };
        let values = |n: usize, seed: f64| -> Vec<f64> {
            (0..n)
                .map(|i| ((i as f64) * 0.73 + seed).sin() * 2.0)
                .collect()
        };
        let q = values(dims.heads * dims.q_len * dims.head_dim, 0.1);
        let k = values(dims.heads * dims.kv_len * dims.head_dim, 0.5);
        let v = values(dims.heads * dims.kv_len * dims.head_dim, 0.9);
        let grad = values(q.len(), 1.7);
        let narrow = |x: &[f64]| -> Vec<f32> { x.iter().map(|&x| x as f32).collect() };
        let scale = 0.35;
        let (out64, lse64) = forward(&q, &k, &v, dims, scale);
        let (out32, lse32) = forward(&narrow(&q), &narrow(&k), &narrow(&v), dims, scale as f32);
        let grads64 = backward((&q, &k, &v), (&out64, &lse64), &grad, dims, scale);
        let grads32 = backward(
            (&narrow(&q), &narrow(&k), &narrow(&v)),
            (&out32, &lse32),
            &narrow(&grad),
            dims,
            scale as f32,
        );
        let worst = |a: &[f32], b: &[f64]| {
            a.iter()
                .zip(b)
                .map(|(&a, &b)| (a as f64 - b).abs())
                .fold(0.0, f64::max)
        };
        assert!(worst(&out32, &out64) < 1e-5);
        assert!(worst(&lse32, &lse64) < 1e-5);
        assert!(worst(&grads32.0, &grads64.0) < 1e-4);
        assert!(worst(&grads32.1, &grads64.1) < 1e-4);
        assert!(worst(&grads32.2, &grads64.2) < 1e-4);
    }

    #[test]
    fn f32_shifted_exponentials_match_f64() {
        let mut row: Vec<f32> = (0..1001)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.3)
            .collect();
        let shift: Vec<f32> = (0..1001).map(|i| (i % 7) as f32 - 3.0).collect();
        let mut reference: Vec<f64> = row.iter().map(|&x| x as f64).collect();
        let shift64: Vec<f64> = shift.iter().map(|&x| x as f64).collect();
        let (mut sums, mut sums64) = (vec![1f32; 1001], vec![1f64; 1001]);
        f32::exp_shifted(&mut row, &shift, &mut sums);
        f64::exp_shifted(&mut reference, &shift64, &mut sums64);
        for ((a, b), (sum, sum64)) in row.iter().zip(&reference).zip(sums.iter().zip(&sums64)) {
            // The f32 difference `x − shift` rounds by up to half an ulp of 15 (5e-7), which the
            // exponential carries over as a relative error.
            assert!((*a as f64 - b).abs() < 2e-6 * b, "{a} vs {b}");
            assert!(
                (*sum as f64 - sum64).abs() < 2e-6 * sum64,
                "{sum} vs {sum64}"
            );
        }
    }
}
