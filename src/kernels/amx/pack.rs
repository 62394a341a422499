//! Operands in tile order, rounded to bf16. The left operand of a product goes in 16-row tiles of 32
//! columns (row `i` of a tile is 32 consecutive bf16 values of row `i`); the right one in tiles of 16
//! column pairs: row `r` of a tile holds `(b[2r][j], b[2r+1][j])` for its 16 columns `j`, the layout the
//! `tdpbf16ps` instruction reads. Every element of a tile is written (zero past the matrix's edges), so the
//! buffers can be reused without clearing. Where AMX runs, AVX-512 BF16 converts 32 f32 values per
//! instruction (bf16 values, a frozen weight stored in bf16, are moved as they are) and a 16×16 transpose
//! serves the layouts whose rows run the other way; elsewhere plain code packs.

use std::ops::Range;

use rayon::prelude::*;

use super::{BLOCK, BLOCK_ELEMENTS, Joined, Operand, Source, TILE_ELEMENTS};

/// The bf16 bits of `x`, rounded to nearest even; NaN stays NaN.
#[inline(always)]
pub(super) fn bf16_bits(x: f32) -> u16 {
    let bits = x.to_bits();
    if x.is_nan() {
        return ((bits >> 16) as u16) | 0x40;
    }
    (bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) >> 16) as u16
}

/// The 32-row blocks of `a` (`m × k`) from block `first` on, as many as `packed` holds, over the blocks
/// `depth` of the shared dimension: each a run of `depth.len()` pairs of tiles (rows 0–15, 16–31).
pub(super) fn pack_left(
    a: Joined,
    (m, k): (usize, usize),
    (first, depth): (usize, Range<usize>),
    packed: &mut [u16],
    parallel: bool,
) {
    let block = |(index, run): (usize, &mut [u16])| {
        let row0 = (first + index) * BLOCK;
        for (index, tile) in run.chunks_exact_mut(TILE_ELEMENTS).enumerate() {
            let (kb, half) = (depth.start + index / 2, index % 2);
            left_tile(a, (m, k), (row0 + half * 16, kb * BLOCK), tile);
        }
    };
    spread(packed, depth.len() * BLOCK_ELEMENTS, parallel, block);
}

/// The 32-column blocks of `b` (`k × n`) from block `first` on, as many as `packed` holds, over the blocks
/// `depth` of the shared dimension: each a run of `depth.len()` pairs of tiles (columns 0–15, 16–31).
pub(super) fn pack_right(
    b: Joined,
    (k, n): (usize, usize),
    (first, depth): (usize, Range<usize>),
    packed: &mut [u16],
    parallel: bool,
) {
    let run = depth.len() * BLOCK_ELEMENTS;
    // Row-major `b` is packed a band of 256 columns at a time, row pair by row pair across the band, so that
    // each row is read in 1 KiB runs; column by column it would be read 128 bytes per row, a cache miss
    // each (its rows are far apart), at about half the speed.
    let band = if matches!(b.head, Source::View(head) if runs_across_rows(head)) {
        COLUMN_BLOCKS_PER_BAND
    } else {
        1
    };
    let pack_band = |(index, blocks): (usize, &mut [u16])| {
        let count = blocks.len() / run;
        let tile = |blocks: &mut [u16], (j, kb, half): (usize, usize, usize)| {
            let col0 = (first + index * band + j) * BLOCK + half * 16;
            let at = j * run + kb * BLOCK_ELEMENTS + half * TILE_ELEMENTS;
            right_tile(
                b,
                (k, n),
                ((depth.start + kb) * BLOCK, col0),
                &mut blocks[at..at + TILE_ELEMENTS],
            );
        };
        for kb in 0..depth.len() {
            for j in 0..count {
                tile(blocks, (j, kb, 0));
                tile(blocks, (j, kb, 1));
            }
        }
    };
    spread(packed, band * run, parallel, pack_band);
}

/// Sixteen bf16 pairs `(data[even + i], data[odd + i])` into `out`: a right tile's row, or a run of one in a
/// layout that holds the pairs in place.
pub(super) fn sixteen_pairs(data: &[f32], (even, odd): (usize, usize), out: &mut [u16; BLOCK]) {
    assert!(even + 16 <= data.len() && odd + 16 <= data.len());
    if super::available() {
        // SAFETY: an engine implies AVX-512 BF16, and both runs lie inside `data` (asserted).
        return unsafe { simd::sixteen_pairs(data, (even, Some(odd)), out) };
    }
    for (i, pair) in out.chunks_exact_mut(2).enumerate() {
        pair[0] = bf16_bits(data[even + i]);
        pair[1] = bf16_bits(data[odd + i]);
    }
}

/// Two rows of a right operand, `even` and `odd` (zeros where not given), as the pair rows of its tiles
/// (`(even[j], odd[j])` for each column `j`, zeros past the last column in its tile): the 16-column
/// chunk `c` goes to `tiles[(c / 2)·run + (c % 2)·TILE_ELEMENTS..]`, `run` apart from block to block.
pub(super) fn pair_rows(even: &[f32], odd: Option<&[f32]>, tiles: &mut [u16], run: usize) {
    let cols = even.len();
    assert!(odd.is_none_or(|odd| odd.len() == cols));
    let chunks = cols.div_ceil(16);
    assert!(
        chunks == 0
            || ((chunks - 1) / 2) * run + ((chunks - 1) % 2) * TILE_ELEMENTS + BLOCK <= tiles.len()
    );
    if super::available() {
        // SAFETY: an engine implies AVX-512 BF16; the rows are as long and every chunk's
        // place lies inside `tiles` (asserted).
        return unsafe { simd::pair_rows(even, odd, tiles, run) };
    }
    for (c, start) in (0..cols).step_by(16).enumerate() {
        let at = (c / 2) * run + (c % 2) * TILE_ELEMENTS;
        let count = (cols - start).min(16);
        let row = &mut tiles[at..at + BLOCK];
        row.fill(0);
        for (i, pair) in row.chunks_exact_mut(2).take(count).enumerate() {
            pair[0] = bf16_bits(even[start + i]);
            pair[1] = odd.map_or(0, |odd| bf16_bits(odd[start + i]));
        }
    }
}

/// A row of a left operand as its tile rows: the 32-value chunk `c` (zeros past the row's end) goes to
/// `tiles[c·BLOCK_ELEMENTS..]`.
pub(super) fn left_row(values: &[f32], tiles: &mut [u16]) {
    let chunks = values.len().div_ceil(BLOCK);
    assert!(chunks == 0 || (chunks - 1) * BLOCK_ELEMENTS + BLOCK <= tiles.len());
    if super::available() {
        // SAFETY: an engine implies AVX-512 BF16; every chunk's place lies inside `tiles`
        // (asserted).
        return unsafe { simd::left_row(values, tiles) };
    }
    for (c, chunk) in values.chunks(BLOCK).enumerate() {
        let row = &mut tiles[c * BLOCK_ELEMENTS..][..BLOCK];
        row.fill(0);
        for (out, &value) in row.iter_mut().zip(chunk) {
            *out = bf16_bits(value);
        }
    }
}

/// `values` (plus `bias`, value by value, where given) rounded to bf16 into `out`.
pub(super) fn round_run(values: &[f32], bias: Option<&[f32]>, out: &mut [u16]) {
    assert!(out.len() == values.len() && bias.is_none_or(|bias| bias.len() == values.len()));
    if super::available() {
        // SAFETY: an engine implies AVX-512 BF16; the lengths match (asserted).
        return unsafe { simd::round_run(values, bias, out) };
    }
    for (index, (out, &value)) in out.iter_mut().zip(values).enumerate() {
        *out = bf16_bits(value + bias.map_or(0.0, |bias| bias[index]));
    }
}

/// 32-column blocks a band of row-major right operand packs together (256 columns).
const COLUMN_BLOCKS_PER_BAND: usize = 8;

/// Whether a right operand's blocks run across its rows (row-major): each row gives a block only a short
/// run, so neighbouring blocks are best packed together.
pub(super) fn runs_across_rows(b: Operand) -> bool {
    b.col_stride == 1 && b.row_stride != 1
}

/// Runs `pack` on each `run`-sized chunk of `packed` with its index, over threads when `parallel`.
fn spread(
    packed: &mut [u16],
    run: usize,
    parallel: bool,
    pack: impl Fn((usize, &mut [u16])) + Sync + Send,
) {
    if run == 0 {
        return;
    }
    if parallel {
        packed.par_chunks_mut(run).enumerate().for_each(pack);
    } else {
        packed.chunks_mut(run).enumerate().for_each(pack);
    }
}

/// The left tile of rows `row0..row0+16` and columns `k0..k0+32` of `a` (`m × k`).
fn left_tile(a: Joined, (m, k): (usize, usize), (row0, k0): (usize, usize), tile: &mut [u16]) {
    let (a, k, k0) = a.at(k, k0);
    if let Source::View(a) = a
        && super::available()
        && (a.col_stride == 1 || a.row_stride == 1)
    {
        // SAFETY: an engine implies AVX-512 BF16, and the operand covers its `m × k` matrix.
        return unsafe { simd::left_tile(a, (m, k), (row0, k0), tile) };
    }
    for (i, row) in tile.chunks_exact_mut(BLOCK).enumerate() {
        for (c, value) in row.iter_mut().enumerate() {
            let (r, col) = (row0 + i, k0 + c);
            *value = if r < m && col < k {
                a.element(r, col)
            } else {
                0
            };
        }
    }
}

/// The right tile of rows `k0..k0+32` and columns `col0..col0+16` of `b` (`k × n`).
fn right_tile(b: Joined, (k, n): (usize, usize), (k0, col0): (usize, usize), tile: &mut [u16]) {
    let (b, k, k0) = b.at(k, k0);
    match b {
        Source::Tiles(tiles) => return tiles.right_tile((k0, col0), tile),
        Source::View(b) if super::available() && (b.col_stride == 1 || b.row_stride == 1) => {
            // SAFETY: as in `left_tile`.
            return unsafe { simd::right_tile(b, (k, n), (k0, col0), tile) };
        }
        Source::View(_) => {}
    }
    for (r, row) in tile.chunks_exact_mut(BLOCK).enumerate() {
        for (index, value) in row.iter_mut().enumerate() {
            let (kk, col) = (k0 + 2 * r + index % 2, col0 + index / 2);
            *value = if kk < k && col < n {
                b.element(kk, col)
            } else {
                0
            };
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod simd {
    use std::arch::x86_64::*;

    use super::super::{BLOCK, BLOCK_ELEMENTS, Operand, TILE_ELEMENTS, Values};

    /// Lanes selected for a run of `count` consecutive values.
    fn lanes(count: usize) -> __mmask16 {
        if count >= 16 {
            0xffff
        } else {
            ((1u32 << count) - 1) as __mmask16
        }
    }

    /// Up to 16 consecutive f32 values (`count`, zero beyond) from `data` at `start`.
    ///
    /// # Safety
    /// `data[start..start + count]` exists.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load_f32(data: &[f32], start: usize, count: usize) -> __m512 {
        if count == 0 {
            return _mm512_setzero_ps();
        }
        debug_assert!(start + count <= data.len());
        // SAFETY: the selected lanes are inside `data` (the caller's count); the others are not read.
        unsafe { _mm512_maskz_loadu_ps(lanes(count), data.as_ptr().wrapping_add(start)) }
    }

    /// Up to 16 consecutive bf16 values (`count`, zero beyond) from `data` at `start`.
    ///
    /// # Safety
    /// `data[start..start + count]` exists.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn load_bf16(data: &[u16], start: usize, count: usize) -> __m256i {
        if count == 0 {
            return _mm256_setzero_si256();
        }
        debug_assert!(start + count <= data.len());
        // SAFETY: as in `load_f32`.
        unsafe { _mm256_maskz_loadu_epi16(lanes(count), data.as_ptr().wrapping_add(start).cast()) }
    }

    /// Up to 32 consecutive values (`count`, zero beyond) from `data` at `start`, as bf16 in order.
    ///
    /// # Safety
    /// `data[start..start + count]` exists.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    unsafe fn consecutive(data: Values, start: usize, count: usize) -> __m512i {
        let (low, high) = (count.min(16), count.saturating_sub(16));
        // SAFETY (loads): both runs lie inside the caller's `count` values.
        match data {
            Values::F32(values) => unsafe {
                let (low, high) = (
                    load_f32(values, start, low),
                    load_f32(values, start + 16, high),
                );
                std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(high, low))
            },
            Values::Bf16(values) => unsafe {
                let low = load_bf16(values, start, low);
                let high = load_bf16(values, start + 16, high);
                _mm512_inserti64x4::<1>(_mm512_castsi256_si512(low), high)
            },
        }
    }

    /// `count` (up to 16) consecutive values from `data` at `even` and, when given, at `odd` (else zeros),
    /// as bf16 pairs `(even[i], odd[i])`.
    ///
    /// # Safety
    /// `data[even..even + count]` and `data[odd..odd + count]` exist.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    unsafe fn interleaved_pairs(
        data: Values,
        (even, odd): (usize, Option<usize>),
        count: usize,
    ) -> __m512i {
        // SAFETY (loads): the runs lie inside `data` (caller).
        let halves = match data {
            Values::F32(values) => unsafe {
                let low = load_f32(values, even, count);
                let high = odd.map_or(_mm512_setzero_ps(), |odd| load_f32(values, odd, count));
                std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(high, low))
            },
            Values::Bf16(values) => unsafe {
                let low = load_bf16(values, even, count);
                let high = odd.map_or(_mm256_setzero_si256(), |odd| load_bf16(values, odd, count));
                _mm512_inserti64x4::<1>(_mm512_castsi256_si512(low), high)
            },
        };
        interleaved(halves)
    }

    /// The 16-bit values of `halves` (a run in the low half, another in the high half) as pairs: element
    /// `i` of the low run, then element `i` of the high one.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    fn interleaved(halves: __m512i) -> __m512i {
        const ORDER: [u16; 32] = {
            let mut order = [0u16; 32];
            let mut i = 0;
            while i < 16 {
                order[2 * i] = i as u16;
                order[2 * i + 1] = 16 + i as u16;
                i += 1;
            }
            order
        };
        // SAFETY: `ORDER` holds 64 bytes.
        let order = unsafe { _mm512_loadu_si512(ORDER.as_ptr().cast()) };
        _mm512_permutexvar_epi16(order, halves)
    }

    /// Rows of a 16×16 matrix of 32-bit values, transposed.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn transpose(rows: [__m512i; 16]) -> [__m512i; 16] {
        let mut pairs = [_mm512_setzero_si512(); 16];
        for g in 0..8 {
            pairs[2 * g] = _mm512_unpacklo_epi32(rows[2 * g], rows[2 * g + 1]);
            pairs[2 * g + 1] = _mm512_unpackhi_epi32(rows[2 * g], rows[2 * g + 1]);
        }
        // quads[4g + c]: in 128-bit lane L, column 4L + c of rows 4g..4g+3.
        let mut quads = [_mm512_setzero_si512(); 16];
        for g in 0..4 {
            let (t0, t1, t2, t3) = (
                pairs[4 * g],
                pairs[4 * g + 1],
                pairs[4 * g + 2],
                pairs[4 * g + 3],
            );
            quads[4 * g] = _mm512_unpacklo_epi64(t0, t2);
            quads[4 * g + 1] = _mm512_unpackhi_epi64(t0, t2);
            quads[4 * g + 2] = _mm512_unpacklo_epi64(t1, t3);
            quads[4 * g + 3] = _mm512_unpackhi_epi64(t1, t3);
        }
        let mut columns = [_mm512_setzero_si512(); 16];
        for c in 0..4 {
            let even_low = _mm512_shuffle_i32x4::<0x88>(quads[c], quads[4 + c]);
            let odd_low = _mm512_shuffle_i32x4::<0xdd>(quads[c], quads[4 + c]);
            let even_high = _mm512_shuffle_i32x4::<0x88>(quads[8 + c], quads[12 + c]);
            let odd_high = _mm512_shuffle_i32x4::<0xdd>(quads[8 + c], quads[12 + c]);
            columns[c] = _mm512_shuffle_i32x4::<0x88>(even_low, even_high);
            columns[8 + c] = _mm512_shuffle_i32x4::<0xdd>(even_low, even_high);
            columns[4 + c] = _mm512_shuffle_i32x4::<0x88>(odd_low, odd_high);
            columns[12 + c] = _mm512_shuffle_i32x4::<0xdd>(odd_low, odd_high);
        }
        columns
    }

    /// Stores 16 tile rows of 64 bytes.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn store_rows(rows: &[__m512i; 16], tile: &mut [u16]) {
        assert!(tile.len() >= 16 * BLOCK);
        for (r, row) in rows.iter().enumerate() {
            // SAFETY: row `r` spans `tile[32r..32r+32]`, inside the tile (asserted).
            unsafe { _mm512_storeu_si512(tile.as_mut_ptr().add(r * BLOCK).cast(), *row) };
        }
    }

    /// [`super::round_run`].
    ///
    /// # Safety
    /// The processor has AVX-512 BF16; `out` and `bias` are as long as `values`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    pub unsafe fn round_run(values: &[f32], bias: Option<&[f32]>, out: &mut [u16]) {
        for start in (0..values.len()).step_by(16) {
            let count = (values.len() - start).min(16);
            // SAFETY: the loads and the store stay inside the first `count` values from `start` of slices
            // as long as `values` (caller).
            unsafe {
                let mut sum = load_f32(values, start, count);
                if let Some(bias) = bias {
                    sum = _mm512_add_ps(sum, load_f32(bias, start, count));
                }
                let rounded = std::mem::transmute::<__m256bh, __m256i>(_mm512_cvtneps_pbh(sum));
                _mm256_mask_storeu_epi16(out.as_mut_ptr().add(start).cast(), lanes(count), rounded);
            }
        }
    }

    /// [`super::sixteen_pairs`].
    ///
    /// # Safety
    /// The processor has AVX-512 BF16, and both runs of 16 lie inside `data`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    pub unsafe fn sixteen_pairs(
        data: &[f32],
        starts: (usize, Option<usize>),
        out: &mut [u16; BLOCK],
    ) {
        // SAFETY: the runs lie inside `data` (caller); `out` holds 64 bytes.
        unsafe {
            let pairs = interleaved_pairs(Values::F32(data), starts, 16);
            _mm512_storeu_si512(out.as_mut_ptr().cast(), pairs);
        }
    }

    /// [`super::pair_rows`].
    ///
    /// # Safety
    /// The processor has AVX-512 BF16; `odd` is as long as `even`, and every chunk's place lies inside
    /// `tiles`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    pub unsafe fn pair_rows(even: &[f32], odd: Option<&[f32]>, tiles: &mut [u16], run: usize) {
        for (c, start) in (0..even.len()).step_by(16).enumerate() {
            let count = (even.len() - start).min(16);
            // SAFETY: the loads stay inside the rows' `count` values from `start`, the store inside
            // `tiles` (caller).
            unsafe {
                let low = load_f32(even, start, count);
                let high = odd.map_or(_mm512_setzero_ps(), |odd| load_f32(odd, start, count));
                let halves =
                    std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(high, low));
                let at = (c / 2) * run + (c % 2) * TILE_ELEMENTS;
                _mm512_storeu_si512(tiles.as_mut_ptr().add(at).cast(), interleaved(halves));
            }
        }
    }

    /// [`super::left_row`].
    ///
    /// # Safety
    /// The processor has AVX-512 BF16, and every chunk's place lies inside `tiles`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    pub unsafe fn left_row(values: &[f32], tiles: &mut [u16]) {
        for (c, start) in (0..values.len()).step_by(BLOCK).enumerate() {
            // SAFETY: the loads stay inside `values`, the store inside `tiles` (caller).
            unsafe {
                let run = consecutive(
                    Values::F32(values),
                    start,
                    (values.len() - start).min(BLOCK),
                );
                _mm512_storeu_si512(tiles.as_mut_ptr().add(c * BLOCK_ELEMENTS).cast(), run);
            }
        }
    }

    /// [`super::left_tile`] for an operand with consecutive columns or consecutive rows.
    ///
    /// # Safety
    /// The processor has AVX-512 BF16, and `a` covers its `m × k` matrix.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    pub unsafe fn left_tile(
        a: Operand,
        (m, k): (usize, usize),
        (row0, k0): (usize, usize),
        tile: &mut [u16],
    ) {
        let rows = m.saturating_sub(row0).min(16);
        let cols = k.saturating_sub(k0).min(BLOCK);
        let mut out = [_mm512_setzero_si512(); 16];
        // SAFETY (loads): the operand covers its matrix (caller), and every load stays inside it.
        if a.col_stride == 1 {
            for (i, row) in out.iter_mut().enumerate().take(rows) {
                *row = unsafe { consecutive(a.data, (row0 + i) * a.row_stride + k0, cols) };
            }
        } else {
            // Consecutive rows: column pairs of 16 rows each, then transposed into rows.
            let mut pairs = [_mm512_setzero_si512(); 16];
            let start = |c: usize| row0 + (k0 + c) * a.col_stride;
            for (q, pair) in pairs.iter_mut().enumerate().take(cols.div_ceil(2)) {
                let odd = (2 * q + 1 < cols).then(|| start(2 * q + 1));
                *pair = unsafe { interleaved_pairs(a.data, (start(2 * q), odd), rows) };
            }
            out = transpose(pairs);
        }
        store_rows(&out, tile);
    }

    /// [`super::right_tile`] for an operand with consecutive columns or consecutive rows.
    ///
    /// # Safety
    /// The processor has AVX-512 BF16, and `b` covers its `k × n` matrix.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    pub unsafe fn right_tile(
        b: Operand,
        (k, n): (usize, usize),
        (k0, col0): (usize, usize),
        tile: &mut [u16],
    ) {
        let rows = k.saturating_sub(k0).min(BLOCK);
        let cols = n.saturating_sub(col0).min(16);
        let mut out = [_mm512_setzero_si512(); 16];
        // SAFETY (loads): the operand covers its matrix (caller), and every load stays inside it.
        if b.col_stride == 1 {
            let start = |kk: usize| (k0 + kk) * b.row_stride + col0;
            for (r, pair) in out.iter_mut().enumerate().take(rows.div_ceil(2)) {
                let odd = (2 * r + 1 < rows).then(|| start(2 * r + 1));
                *pair = unsafe { interleaved_pairs(b.data, (start(2 * r), odd), cols) };
            }
        } else {
            // Consecutive rows: each column's 32 values are already its pairs; transposed into rows.
            let mut columns = [_mm512_setzero_si512(); 16];
            for (c, column) in columns.iter_mut().enumerate().take(cols) {
                *column = unsafe { consecutive(b.data, (col0 + c) * b.col_stride + k0, rows) };
            }
            out = transpose(columns);
        }
        store_rows(&out, tile);
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod simd {
    use super::super::Operand;

    pub unsafe fn left_tile(_: Operand, _: (usize, usize), _: (usize, usize), _: &mut [u16]) {
        unreachable!("AMX exists on x86-64 only")
    }

    pub unsafe fn right_tile(_: Operand, _: (usize, usize), _: (usize, usize), _: &mut [u16]) {
        unreachable!("AMX exists on x86-64 only")
    }

    pub unsafe fn sixteen_pairs(_: &[f32], _: (usize, Option<usize>), _: &mut [u16; 32]) {
        unreachable!("AMX exists on x86-64 only")
    }

    pub unsafe fn pair_rows(_: &[f32], _: Option<&[f32]>, _: &mut [u16], _: usize) {
        unreachable!("AMX exists on x86-64 only")
    }

    pub unsafe fn left_row(_: &[f32], _: &mut [u16]) {
        unreachable!("AMX exists on x86-64 only")
    }

    pub unsafe fn round_run(_: &[f32], _: Option<&[f32]>, _: &mut [u16]) {
        unreachable!("AMX exists on x86-64 only")
    }
}
