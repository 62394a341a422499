//! Frozen weights kept in tile order. A linear layer's weight `W` (`[out, in]`) is read by two products a
//! step: `x·Wᵀ` (the forward pass) and `g·W` (its input gradient), each of which would pack it into tile
//! order again. Stored once as the packed right operand of `x·Wᵀ`, it is read by that product as it is,
//! and by `g·W` block by block: the tile of `W` covering output rows `o..o+32` and input columns `i..i+16`
//! holds the same values as half of the stored block `(o, i)`, in another order — two 8×8 transposes of
//! 64-bit groups (two values of each of two neighbouring rows), the middle values of each group swapped.
//! Each stored block is read whole and contiguous, where packing `W` from its rows reads a short run of
//! each of 32 rows far apart.

use rayon::prelude::*;

use super::{BLOCK, BLOCK_ELEMENTS, Buffer, Operand, TILE_ELEMENTS, Values, pack};

/// A weight `W` (`[rows, cols]`) in bf16 in tile order: the right operand of `x·Wᵀ` packed whole, block
/// column by block column (each a run over the 32-wide blocks of `W`'s columns), zero past the edges.
pub struct TiledWeight {
    values: Buffer,
    rows: usize,
    cols: usize,
}

/// How a product reads a [`TiledWeight`] `W` as its right operand.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Orientation {
    /// `Wᵀ` (`cols × rows`): a linear layer's forward product `x·Wᵀ`.
    Transposed,
    /// `W` (`rows × cols`): the input gradient `g·W`.
    Upright,
}

impl TiledWeight {
    /// The row-major `rows × cols` matrix `weight` (f32 values are rounded to bf16) in tile order.
    ///
    /// # Panics
    /// If `weight` holds fewer than `rows · cols` values.
    pub fn new(weight: Values, (rows, cols): (usize, usize)) -> Self {
        let transposed = Operand {
            data: weight,
            row_stride: 1,
            col_stride: cols,
        };
        assert!(transposed.covers(cols, rows), "weight view out of bounds");
        let len = stored_len(rows, cols);
        let mut values = Buffer::default();
        values.grow_to(len);
        let blocks = (0, 0..cols.div_ceil(BLOCK));
        pack::pack_right(
            transposed.into(),
            (cols, rows),
            blocks,
            &mut values[..len],
            true,
        );
        Self { values, rows, cols }
    }

    /// `(rows, cols)` of `W`.
    pub fn dims(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    /// `W` as a product reads it.
    pub fn read_as(&self, orientation: Orientation) -> TileView<'_> {
        TileView {
            values: &self.values[..stored_len(self.rows, self.cols)],
            rows: self.rows,
            cols: self.cols,
            orientation,
        }
    }
}

impl std::fmt::Debug for TiledWeight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TiledWeight({}×{})", self.rows, self.cols)
    }
}

/// `u16` values of a `rows × cols` weight in tile order.
fn stored_len(rows: usize, cols: usize) -> usize {
    rows.div_ceil(BLOCK) * cols.div_ceil(BLOCK) * BLOCK_ELEMENTS
}

/// A [`TiledWeight`] read as `Wᵀ` or `W`.
#[derive(Clone, Copy)]
pub struct TileView<'a> {
    values: &'a [u16],
    rows: usize,
    cols: usize,
    orientation: Orientation,
}

impl<'a> TileView<'a> {
    /// `(rows, cols)` of the matrix as read.
    pub fn dims(self) -> (usize, usize) {
        match self.orientation {
            Orientation::Transposed => (self.cols, self.rows),
            Orientation::Upright => (self.rows, self.cols),
        }
    }

    /// The whole stored operand when the product reads `Wᵀ`: packed already, block column by block column.
    pub(super) fn packed_transposed(self) -> Option<&'a [u16]> {
        (self.orientation == Orientation::Transposed).then_some(self.values)
    }

    /// The bf16 bits of the matrix as read, row-major.
    pub fn row_major(self) -> Vec<u16> {
        let (rows, cols) = (self.rows, self.cols);
        let mut upright = vec![0u16; rows * cols];
        if cols == 0 {
            return upright;
        }
        let run = cols.div_ceil(BLOCK) * BLOCK_ELEMENTS;
        // A band of 32 rows of `W` is one run of stored blocks, read while it is in cache.
        let bands = upright.par_chunks_mut(BLOCK * cols).enumerate();
        bands.for_each(|(band, out)| {
            let stored = &self.values[band * run..][..run];
            for (r, row) in out.chunks_exact_mut(cols).enumerate() {
                let within = (r / 16) * TILE_ELEMENTS + (r % 16) * 2;
                for (i, value) in row.iter_mut().enumerate() {
                    *value = stored
                        [(i / BLOCK) * BLOCK_ELEMENTS + within + (i % BLOCK / 2) * BLOCK + i % 2];
                }
            }
        });
        match self.orientation {
            Orientation::Upright => upright,
            Orientation::Transposed => (0..rows * cols)
                .map(|index| upright[(index % rows) * cols + index / rows])
                .collect(),
        }
    }

    /// Element `(r, c)` of the matrix as read (zero outside it).
    pub(super) fn element(self, r: usize, c: usize) -> u16 {
        let (row, col) = match self.orientation {
            Orientation::Transposed => (c, r),
            Orientation::Upright => (r, c),
        };
        if row >= self.rows || col >= self.cols {
            return 0;
        }
        self.values[self.block_start(row, col)
            + (row % BLOCK / 16) * TILE_ELEMENTS
            + (col % BLOCK / 2) * BLOCK
            + (row % 16) * 2
            + col % 2]
    }

    /// Where the stored block holding `W`'s element `(row, col)` starts.
    fn block_start(self, row: usize, col: usize) -> usize {
        let run = self.cols.div_ceil(BLOCK) * BLOCK_ELEMENTS;
        (row / BLOCK) * run + (col / BLOCK) * BLOCK_ELEMENTS
    }

    /// The right tile of rows `k0..k0+32` and columns `col0..col0+16` of the matrix as read.
    pub(super) fn right_tile(self, (k0, col0): (usize, usize), tile: &mut [u16]) {
        let tile = &mut tile[..TILE_ELEMENTS];
        let aligned = k0 % BLOCK == 0 && col0 % 16 == 0;
        let (k, n) = self.dims();
        if !aligned || k0 >= k.next_multiple_of(BLOCK) || col0 >= n.next_multiple_of(BLOCK) {
            for (r, row) in tile.chunks_exact_mut(BLOCK).enumerate() {
                for (index, value) in row.iter_mut().enumerate() {
                    *value = self.element(k0 + 2 * r + index % 2, col0 + index / 2);
                }
            }
            return;
        }
        match self.orientation {
            Orientation::Transposed => {
                // Rows of Wᵀ are W's columns: the tile is half of a stored block as it is.
                let start = self.block_start(col0, k0) + (col0 % BLOCK / 16) * TILE_ELEMENTS;
                tile.copy_from_slice(&self.values[start..start + TILE_ELEMENTS]);
            }
            Orientation::Upright => {
                let start = self.block_start(k0, col0);
                let block = &self.values[start..start + BLOCK_ELEMENTS];
                let half = col0 % BLOCK / 16;
                if super::available() {
                    // The blocks of a column of `W`'s blocks lie a run of blocks apart, beyond what the
                    // hardware prefetches: ask for the one read next but one while this one is turned.
                    let ahead = start + PREFETCH_AHEAD * self.cols.div_ceil(BLOCK) * BLOCK_ELEMENTS;
                    if half == 0
                        && let Some(later) = self.values.get(ahead..ahead + BLOCK_ELEMENTS)
                    {
                        simd::prefetch(later);
                    }
                    // SAFETY: an engine implies AVX-512; the block and the tile are whole.
                    unsafe { simd::upright_tile(block, half, tile) };
                    return;
                }
                upright_tile(block, half, tile);
            }
        }
    }
}

/// How many blocks further down a column of stored blocks [`TileView::right_tile`] asks the processor for
/// while it turns one upright. `cargo bench --bench kernels -- "(SDXL)" --bf16` taking the least of 15
/// runs instead of the median of 3, three times each, Zen 4: 1280->10240 over 256 tokens forward+backward
/// 41.2-43.0 ms without, 38.7-44.2 one block ahead, 39.3-40.6 two ahead; 5120->1280 20.3-21.3 without,
/// 19.8-20.2 two ahead.
const PREFETCH_AHEAD: usize = 2;

/// The tile of `W` read upright from a stored block: rows `o..o+32` (row pairs), columns `half·16..+16`.
/// Tile row `8t + c` holds, for each `q < 8`, the 64-bit group `c` of row `8·half + q` of the block's
/// tile `t`, its middle values swapped.
fn upright_tile(block: &[u16], half: usize, tile: &mut [u16]) {
    for (r, row) in tile.chunks_exact_mut(BLOCK).enumerate() {
        let (t, c) = (r / 8, r % 8);
        for (q, group) in row.chunks_exact_mut(4).enumerate() {
            let from = t * TILE_ELEMENTS + (half * 8 + q) * BLOCK + 4 * c;
            let source = &block[from..from + 4];
            group.copy_from_slice(&[source[0], source[2], source[1], source[3]]);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod simd {
    use std::arch::x86_64::*;

    use super::super::{BLOCK, BLOCK_ELEMENTS, TILE_ELEMENTS};

    /// Asks for `block`'s cache lines to be brought to the first-level cache.
    pub fn prefetch(block: &[u16]) {
        for line in block.chunks(32) {
            // SAFETY: a prefetch reads nothing the program sees and never faults; the line is inside
            // `block` anyway.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(line.as_ptr().cast()) };
        }
    }

    /// [`super::upright_tile`]: for each of the block's two tiles, its 8 rows of the half as registers,
    /// their 64-bit groups transposed (128-bit lanes in two rounds, then groups within them), each
    /// group's middle values swapped.
    ///
    /// # Safety
    /// The processor has AVX-512 BW.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub unsafe fn upright_tile(block: &[u16], half: usize, tile: &mut [u16]) {
        assert!(block.len() >= BLOCK_ELEMENTS && tile.len() >= TILE_ELEMENTS && half < 2);
        // Within each 64-bit group, values 0, 2, 1, 3.
        let swap = _mm512_set4_epi32(0x0f0e_0b0a, 0x0d0c_0908, 0x0706_0302, 0x0504_0100);
        for t in 0..2 {
            let first = t * TILE_ELEMENTS + half * 8 * BLOCK;
            // SAFETY: the 8 rows lie inside the block (asserted).
            let rows: [__m512i; 8] = std::array::from_fn(|q| unsafe {
                _mm512_loadu_si512(block.as_ptr().add(first + q * BLOCK).cast())
            });
            // Lanes 0-1 and 2-3 of rows q and q + 2 (q = 0, 1, 4, 5).
            let low = |q: usize| _mm512_shuffle_i64x2::<0x44>(rows[q], rows[q + 2]);
            let high = |q: usize| _mm512_shuffle_i64x2::<0xee>(rows[q], rows[q + 2]);
            // Lane `l` of rows q, q + 2, q + 4, q + 6, for q = 0 (even rows) and 1 (odd rows).
            let lanes = |q: usize| {
                let (low0, low4, high0, high4) = (low(q), low(q + 4), high(q), high(q + 4));
                [
                    _mm512_shuffle_i64x2::<0x88>(low0, low4),
                    _mm512_shuffle_i64x2::<0xdd>(low0, low4),
                    _mm512_shuffle_i64x2::<0x88>(high0, high4),
                    _mm512_shuffle_i64x2::<0xdd>(high0, high4),
                ]
            };
            let (even, odd) = (lanes(0), lanes(1));
            for l in 0..4 {
                let groups = [
                    _mm512_unpacklo_epi64(even[l], odd[l]),
                    _mm512_unpackhi_epi64(even[l], odd[l]),
                ];
                for (g, group) in groups.into_iter().enumerate() {
                    let row = t * 8 + 2 * l + g;
                    // SAFETY: the row lies inside the tile (asserted).
                    unsafe {
                        _mm512_storeu_si512(
                            tile.as_mut_ptr().add(row * BLOCK).cast(),
                            _mm512_shuffle_epi8(group, swap),
                        )
                    };
                }
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod simd {
    /// Never called: AMX exists only on x86-64.
    pub unsafe fn upright_tile(block: &[u16], half: usize, tile: &mut [u16]) {
        super::upright_tile(block, half, tile)
    }

    /// Never called, as above.
    pub fn prefetch(_block: &[u16]) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upright_tiles_transposed_in_registers_match_the_ones_read_value_by_value() {
        if !super::super::available() {
            return;
        }
        let block: Vec<u16> = (0..BLOCK_ELEMENTS as u16)
            .map(|v| v.wrapping_mul(7919))
            .collect();
        for half in 0..2 {
            let (mut transposed, mut read) = ([0u16; TILE_ELEMENTS], [1u16; TILE_ELEMENTS]);
            // SAFETY: an engine (checked) implies AVX-512 BW.
            unsafe { simd::upright_tile(&block, half, &mut transposed) };
            upright_tile(&block, half, &mut read);
            assert_eq!(transposed, read, "half {half}");
        }
    }
}
