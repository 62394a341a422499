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
//! vectorisable `exp`; the scale is applied there, so the score products leave the tiles unscaled.
//!
//! In bf16 products the probabilities and score gradients feed only tile products: each key's row is
//! rounded into tile order as soon as it is computed ([`PackedLeft`], [`PackedRight`]), so in the forward
//! pass the probabilities are never stored in f32, and in the backward pass the score gradients are not
//! (the products read them as they are, instead of packing an f32 tile first).

use rayon::prelude::*;

use super::amx::{Operand, Output, PackedLeft, PackedRight};
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
    /// `row[j] = exp(scale·row[j] − shift[j])` and `sums[j] += row[j]` for every column `j`.
    fn exp_shifted(row: &mut [Self], shift: (Self, &[Self]), sums: &mut [Self]);

    /// `view` (`rows × cols`) packed as the left operand of bf16 products; `None` for types without them.
    fn bf16_pack(_view: View<'_, Self>, _dims: (usize, usize)) -> Option<PackedLeft> {
        None
    }

    /// `exp(scale·score − shift[j])` for every key's row of a key-major tile (`keys × rows`), summed
    /// into `sums`, and written only as the right operand of bf16 products into `packed`; `false`
    /// (nothing done) for types without them.
    fn exp_into_packed(
        _tile: &[Self],
        _rows: usize,
        _shift: (Self, &[Self]),
        _sums: &mut [Self],
        _packed: &mut PackedRight,
    ) -> bool {
        false
    }

    /// `exp(scale·score − shift[j])` in place over a key-major tile, written as the left operand of bf16
    /// products into `packed` too; `false` (nothing done) for types without them.
    fn exp_in_place_packed(
        _tile: &mut [Self],
        _rows: usize,
        _shift: (Self, &[Self]),
        _packed: &mut PackedLeft,
    ) -> bool {
        false
    }

    /// The score gradients `dS = P ⊙ (dP − dots[j])` of key-major tiles `probs` and `grad_probs`
    /// (`keys × rows`), written only as the left and the right operand of bf16 products; `false`
    /// (nothing done) for types without them.
    fn score_gradients_packed(
        _tiles: (&[Self], &[Self]),
        _rows: usize,
        _dots: &[Self],
        _packed: (&mut PackedLeft, &mut PackedRight),
    ) -> bool {
        false
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
    fn exp_shifted(row: &mut [f64], (scale, shift): (f64, &[f64]), sums: &mut [f64]) {
        for ((x, &shift), sum) in row.iter_mut().zip(shift).zip(sums) {
            *x = (scale * *x - shift).exp();
            *sum += *x;
        }
    }
}

impl Element for f32 {
    fn exp_shifted(row: &mut [f32], shift: (f32, &[f32]), sums: &mut [f32]) {
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
        match (lhs.packed, rhs.packed_right) {
            (Some(left), Some(right)) => super::amx::product_of_packed(left, right, out, false),
            (Some(left), None) => super::amx::product_packed(left, operand(rhs), n, out, false),
            (None, None) => super::amx::product((m, k, n), operand(lhs), operand(rhs), out, false),
            (None, Some(_)) => unreachable!("a packed right operand comes with a packed left one"),
        }
        true
    }

    fn exp_into_packed(
        tile: &[f32],
        rows: usize,
        shift: (f32, &[f32]),
        sums: &mut [f32],
        packed: &mut PackedRight,
    ) -> bool {
        packed.reshape(tile.len() / rows, rows);
        exp_into_packed_f32(tile, rows, (shift, sums), packed);
        true
    }

    fn exp_in_place_packed(
        tile: &mut [f32],
        rows: usize,
        shift: (f32, &[f32]),
        packed: &mut PackedLeft,
    ) -> bool {
        packed.reshape(tile.len() / rows, rows);
        let simd = Simd::detect();
        for (key, scores) in tile.chunks_mut(rows).enumerate() {
            vectorised(simd, || exp_shifted_in_place_f32(scores, shift));
            packed.set_row(key, scores);
        }
        true
    }

    fn score_gradients_packed(
        tiles: (&[f32], &[f32]),
        rows: usize,
        dots: &[f32],
        (left, right): (&mut PackedLeft, &mut PackedRight),
    ) -> bool {
        let keys = tiles.0.len() / rows;
        left.reshape(keys, rows);
        right.reshape(keys, rows);
        score_gradients_into_packed_f32(tiles, rows, dots, (left, right));
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

/// [`Element::exp_into_packed`] for f32: each pair of keys' rows is computed (vectorised, row by row: a
/// larger kernel would not be inlined into the vectorised code) into a scratch pair and packed from there
/// while it is in cache.
fn exp_into_packed_f32(
    tile: &[f32],
    rows: usize,
    (shift, sums): ((f32, &[f32]), &mut [f32]),
    packed: &mut PackedRight,
) {
    let mut pair = vec![0f32; 2 * rows];
    let simd = Simd::detect();
    for (index, scores) in tile.chunks(2 * rows).enumerate() {
        let (even, odd) = pair.split_at_mut(rows);
        vectorised(simd, || {
            exp_shifted_into_f32(&scores[..rows], shift, sums, even)
        });
        let odd = (scores.len() > rows).then(|| {
            vectorised(simd, || {
                exp_shifted_into_f32(&scores[rows..], shift, sums, odd)
            });
            &*odd
        });
        packed.set_pair(index, even, odd);
    }
}

/// [`Element::score_gradients_packed`] for f32, vectorised row by row as [`exp_into_packed_f32`] is.
fn score_gradients_into_packed_f32(
    (probs, grad_probs): (&[f32], &[f32]),
    rows: usize,
    dots: &[f32],
    (left, right): (&mut PackedLeft, &mut PackedRight),
) {
    let mut pair = vec![0f32; 2 * rows];
    let simd = Simd::detect();
    let two_keys = probs.chunks(2 * rows).zip(grad_probs.chunks(2 * rows));
    for (index, (probs, grad_probs)) in two_keys.enumerate() {
        let (even, odd) = pair.split_at_mut(rows);
        let (p, dp) = (&probs[..rows], &grad_probs[..rows]);
        vectorised(simd, || score_gradients_into(p, dp, dots, even));
        left.set_row(2 * index, even);
        let odd = (probs.len() > rows).then(|| {
            let (p, dp) = (&probs[rows..], &grad_probs[rows..]);
            vectorised(simd, || score_gradients_into(p, dp, dots, odd));
            left.set_row(2 * index + 1, odd);
            &*odd
        });
        right.set_pair(index, even, odd);
    }
}

#[inline(always)]
fn exp_shifted_into_f32(
    row: &[f32],
    (scale, shift): (f32, &[f32]),
    sums: &mut [f32],
    out: &mut [f32],
) {
    for (((x, &shift), sum), out) in row.iter().zip(shift).zip(sums).zip(out) {
        *out = exp_f32(scale * *x - shift);
        *sum += *out;
    }
}

#[inline(always)]
fn exp_shifted_in_place_f32(row: &mut [f32], (scale, shift): (f32, &[f32])) {
    for (x, &shift) in row.iter_mut().zip(shift) {
        *x = exp_f32(scale * *x - shift);
    }
}

/// `out[j] = p[j] · (dp[j] − dots[j])`: one key's score gradients.
#[inline(always)]
fn score_gradients_into(p: &[f32], dp: &[f32], dots: &[f32], out: &mut [f32]) {
    for (((out, &p), &dp), &dot) in out.iter_mut().zip(p).zip(dp).zip(dots) {
        *out = p * (dp - dot);
    }
}

#[inline(always)]
fn exp_shifted_f32(row: &mut [f32], (scale, shift): (f32, &[f32]), sums: &mut [f32]) {
    for ((x, &shift), sum) in row.iter_mut().zip(shift).zip(sums) {
        *x = exp_f32(scale * *x - shift);
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
    packed_right: Option<&'a PackedRight>,
}

impl<'a, T> View<'a, T> {
    fn new(data: &'a [T], row_stride: usize, col_stride: usize) -> Self {
        Self {
            data,
            row_stride,
            col_stride,
            packed: None,
            packed_right: None,
        }
    }

    /// The same view, with its bf16 tile-order form where there is one.
    fn packed(self, packed: Option<&'a PackedLeft>) -> Self {
        Self { packed, ..self }
    }

    /// The same view, with its bf16 tile-order form as a right operand where there is one.
    fn packed_right(self, packed_right: Option<&'a PackedRight>) -> Self {
        Self {
            packed_right,
            ..self
        }
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

/// The transposed products `K·Q_tileᵀ` (`kv_len × rows`) of query rows `start..start + rows` of one head
/// into `scores`, unscaled: the exponentials apply the scale (a scaled product's result would go through a
/// scratch block).
fn transposed_scores<T: Element>(
    dims: &AttentionDims,
    (q, k, packed_k): (&[T], &[T], Option<&PackedLeft>),
    (start, rows): (usize, usize),
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
        T::one(),
        dims.bf16_products,
    );
}

/// Rows `j` of `Tᵀ·X` times `row_scale(j)` into `target` (`rows × d`) for a key-major tile `T`
/// (`kv_len × rows`) and keys' `X` (`kv_len × d`), computed as `(Tᵀ·X)ᵀ = Xᵀ·T` in `scratch` (`d × rows`),
/// the product whose large operand, the tile, is read row by row.
fn tile_product_rows<T: Element>(
    (tile, packed_tile): (&[T], Option<&PackedRight>),
    (keys, packed_keys_t): (&[T], Option<&PackedLeft>),
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
        View::new(tile, rows, 1).packed_right(packed_tile),
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
        .for_each_init(
            // A thread's tile buffers, kept from head to head.
            || {
                let buffer = |len: usize| vec![T::zero(); len];
                let (sums, max) = (buffer(tile), buffer(tile));
                (
                    buffer(m * tile),
                    PackedRight::empty(),
                    buffer(d * tile),
                    max,
                    sums,
                )
            },
            |buffers, (h, (out, log_sum_exp))| {
                let (probs, packed_probs, out_t, max, sums) = buffers;
                let (q, k, v) = (
                    &q[h * l * d..(h + 1) * l * d],
                    &k[h * m * d..(h + 1) * m * d],
                    &v[h * m * d..(h + 1) * m * d],
                );
                // Keys and transposed values, packed once for every tile of this head.
                let bf16 = dims.bf16_products;
                let packed_k = prepacked(bf16, View::new(k, d, 1), (m, d));
                let packed_v_t = prepacked(bf16, View::new(v, 1, d), (d, m));
                let keys = (q, k, packed_k.as_ref());
                for start in (0..l).step_by(tile) {
                    let rows = tile.min(l - start);
                    let (probs, out_t) = (&mut probs[..m * rows], &mut out_t[..d * rows]);
                    let (max, sums) = (&mut max[..rows], &mut sums[..rows]);
                    transposed_scores(&dims, keys, (start, rows), probs);
                    max.fill(T::neg_infinity());
                    for key in probs.chunks(rows) {
                        for (max, &score) in max.iter_mut().zip(key) {
                            *max = max.max(scale * score);
                        }
                    }
                    sums.fill(T::zero());
                    // In bf16 products the probabilities are only ever read packed.
                    let shift = (scale, &*max);
                    let packed = bf16 && T::exp_into_packed(probs, rows, shift, sums, packed_probs);
                    if !packed {
                        probs
                            .chunks_mut(rows)
                            .for_each(|key| T::exp_shifted(key, shift, sums));
                    }
                    // O = P·V, normalised by the sums.
                    let out_rows = &mut out[start * d..][..rows * d];
                    tile_product_rows(
                        (probs, packed.then_some(&*packed_probs)),
                        (v, packed_v_t.as_ref()),
                        (m, rows, d),
                        |j| sums[j].recip(),
                        (out_t, out_rows),
                        dims.bf16_products,
                    );
                    for ((lse, &max), &sum) in
                        log_sum_exp[start..].iter_mut().zip(&*max).zip(&*sums)
                    {
                        *lse = max + sum.ln();
                    }
                }
            },
        );
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
        .for_each_init(
            // A thread's tile buffers, kept from head to head.
            || {
                let buffer = |len: usize| vec![T::zero(); len];
                let scores = (buffer(m * tile), buffer(m * tile), buffer(d * tile));
                let packed = (
                    PackedLeft::empty(),
                    PackedLeft::empty(),
                    PackedRight::empty(),
                );
                (scores, buffer(tile), packed)
            },
            |buffers, (h, ((grad_q, grad_k), grad_v))| {
                let ((probs, grad_scores, grad_q_t), unused_sums, packed_buffers) = buffers;
                let (packed_probs, packed_grads, packed_grads_right) = packed_buffers;
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
                for start in (0..l).step_by(tile) {
                    let rows = tile.min(l - start);
                    let probs = &mut probs[..m * rows];
                    let grad_scores = &mut grad_scores[..m * rows];
                    let grad_q_t = &mut grad_q_t[..d * rows];
                    let shift = &log_sum_exp[start..start + rows];
                    transposed_scores(&dims, keys, (start, rows), probs);
                    let shift = (scale, shift);
                    // In bf16 products the probabilities are packed as they are computed, and the score
                    // gradients only ever exist packed.
                    let packed = bf16 && T::exp_in_place_packed(probs, rows, shift, packed_probs);
                    if !packed {
                        probs
                            .chunks_mut(rows)
                            .for_each(|key| T::exp_shifted(key, shift, &mut unused_sums[..rows]));
                    }
                    let grad_tile = &grad[start * d..];
                    // dV += Pᵀ·dO
                    matmul(
                        (m, d, rows),
                        grad_v,
                        d,
                        true,
                        View::new(probs, rows, 1).packed(packed.then_some(&*packed_probs)),
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
                    let packed_ds = (&mut *packed_grads, &mut *packed_grads_right);
                    let packed = packed
                        && T::score_gradients_packed((probs, grad_scores), rows, dots, packed_ds);
                    if !packed {
                        for (p_key, ds_key) in probs.chunks(rows).zip(grad_scores.chunks_mut(rows))
                        {
                            for ((ds, &p), &dot) in ds_key.iter_mut().zip(p_key).zip(dots) {
                                *ds = p * (*ds - dot);
                            }
                        }
                    }
                    // dK += s·dSᵀ·Q
                    matmul(
                        (m, d, rows),
                        grad_k,
                        d,
                        true,
                        View::new(grad_scores, rows, 1).packed(packed.then_some(&*packed_grads)),
                        View::new(&q[start * d..], d, 1),
                        scale,
                        dims.bf16_products,
                    );
                    // dQ = s·dS·K
                    let grad_q_rows = &mut grad_q[start * d..][..rows * d];
                    tile_product_rows(
                        (grad_scores, packed.then_some(&*packed_grads_right)),
                        (k, packed_k_t.as_ref()),
                        (m, rows, d),
                        |_| scale,
                        (grad_q_t, grad_q_rows),
                        dims.bf16_products,
                    );
                }
            },
        );
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
    /// In bf16 products the probabilities and score gradients go to the tile products packed as they are
    /// computed: 77 keys (a partial block of pairs and an odd last key), head size 40, query tiles of 16
    /// with a shorter last one (a change of shape between tiles), against f64 within bf16's rounding.
    fn bf16_attention_and_gradients_stay_within_rounding_of_f64() {
        let dims = AttentionDims {
            heads: 2,
            q_len: 45,
            kv_len: 77,
            head_dim: 40,
            tile_rows: 16,
            bf16_products: true,
        };
        let values = |n: usize, seed: f64| -> Vec<f64> {
            (0..n)
                .map(|i| ((i as f64) * 0.37 + seed).sin() * 1.5)
                .collect()
        };
        let q = values(dims.heads * dims.q_len * dims.head_dim, 0.2);
        let k = values(dims.heads * dims.kv_len * dims.head_dim, 0.6);
        let v = values(dims.heads * dims.kv_len * dims.head_dim, 1.1);
        let grad = values(q.len(), 1.9);
        let narrow = |x: &[f64]| -> Vec<f32> { x.iter().map(|&x| x as f32).collect() };
        let scale = 0.3;
        let exact = AttentionDims {
            bf16_products: false,
            ..dims
        };
        let (out64, lse64) = forward(&q, &k, &v, exact, scale);
        let grads64 = backward((&q, &k, &v), (&out64, &lse64), &grad, exact, scale);
        let (out, lse) = forward(&narrow(&q), &narrow(&k), &narrow(&v), dims, scale as f32);
        let grads = backward(
            (&narrow(&q), &narrow(&k), &narrow(&v)),
            (&out, &lse),
            &narrow(&grad),
            dims,
            scale as f32,
        );
        // Relative to the largest value: bf16 keeps 8 bits, and each product sums dozens of terms.
        let check = |name: &str, ours: &[f32], exact: &[f64]| {
            let largest = exact.iter().fold(0f64, |m, x| m.max(x.abs()));
            let worst = ours
                .iter()
                .zip(exact)
                .map(|(&a, &b)| (a as f64 - b).abs())
                .fold(0.0, f64::max);
            assert!(worst < 0.02 * largest, "{name}: {worst} of {largest}");
        };
        check("output", &out, &out64);
        check("log-sum-exp", &lse, &lse64);
        check("dq", &grads.0, &grads64.0);
        check("dk", &grads.1, &grads64.1);
        check("dv", &grads.2, &grads64.2);
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
        f32::exp_shifted(&mut row, (1.0, &shift), &mut sums);
        f64::exp_shifted(&mut reference, (1.0, &shift64), &mut sums64);
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
