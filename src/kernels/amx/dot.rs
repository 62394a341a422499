//! The packed blocks multiplied with AVX-512 BF16 dot products (`vdpbf16ps`) on processors that have them
//! but no AMX tiles (AMD Zen 4 and later, Intel Cooper Lake). The tile layouts suit the instruction as they
//! are: a left tile's row holds 16 pairs of the shared dimension, a right tile's row one pair for each of
//! 16 columns, so one left pair broadcast against one right row adds two products to 16 sums. A pass keeps
//! 8 rows × 32 columns of the result in 16 registers (16 rows × 16 columns where only one run of columns
//! exists) and walks the shared dimension; a product's block takes its shared dimension a few blocks at a
//! time through all four passes, so that the right tiles stay in the first-level cache.

#[cfg(target_arch = "x86_64")]
pub use platform::*;
#[cfg(not(target_arch = "x86_64"))]
pub use portable::*;

#[cfg(target_arch = "x86_64")]
mod platform {
    use std::arch::x86_64::*;

    use super::super::{BLOCK, BLOCK_ELEMENTS, Block, ConvolutionBlock};

    /// Whether the processor has AVX-512 BF16 dot products (and the AVX-512 the packing uses).
    pub fn supported() -> bool {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("avx512bf16")
    }

    /// Pair rows in a right tile (its 32 rows of the shared dimension).
    const PAIR_ROWS: usize = BLOCK / 2;

    /// `sums[r][c] += Σ_p left[r][p] · right[c][p]` over one tile's 16 pairs of the shared dimension:
    /// the left rows `BLOCK` values apart from `left`, right run `c`'s pair rows `right_stride` bytes
    /// apart from `right[c]`.
    ///
    /// # Safety
    /// AVX-512 BF16 is available; every row named lies inside its allocation.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn add_products<const R: usize, const C: usize>(
        sums: &mut [[__m512; C]; R],
        left: *const u16,
        (right, right_stride): ([*const u16; C], usize),
    ) {
        for p in 0..PAIR_ROWS {
            // SAFETY: the rows lie inside their allocations (caller); unaligned reads of 64 and 4 bytes.
            unsafe {
                let columns: [__m512bh; C] = std::array::from_fn(|c| {
                    std::mem::transmute(_mm512_loadu_si512(
                        right[c].byte_add(p * right_stride).cast(),
                    ))
                });
                for (r, row) in sums.iter_mut().enumerate() {
                    let pair = left.add(r * BLOCK + 2 * p).cast::<i32>().read_unaligned();
                    let pair: __m512bh = std::mem::transmute(_mm512_set1_epi32(pair));
                    for (sum, column) in row.iter_mut().zip(columns) {
                        *sum = _mm512_dpbf16_ps(*sum, pair, column);
                    }
                }
            }
        }
    }

    /// Sums starting from the rows `first` (16 values each, `stride` bytes apart, run `c` at `16·c`
    /// values further), or from zero.
    ///
    /// # Safety
    /// AVX-512 is available; the rows lie inside their allocation.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn start<const R: usize, const C: usize>(
        first: Option<(*const f32, usize)>,
    ) -> [[__m512; C]; R] {
        std::array::from_fn(|r| {
            std::array::from_fn(|c| match first {
                // SAFETY: inside the rows the caller names.
                Some((first, stride)) => unsafe {
                    _mm512_loadu_ps(first.byte_add(r * stride).add(16 * c))
                },
                None => _mm512_setzero_ps(),
            })
        })
    }

    /// Stores the sums into the rows `out[c]`, `stride` bytes apart.
    ///
    /// # Safety
    /// AVX-512 is available; the rows lie inside their allocation, which no other thread touches.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn store<const R: usize, const C: usize>(
        sums: &[[__m512; C]; R],
        (out, stride): ([*mut f32; C], usize),
    ) {
        for (r, row) in sums.iter().enumerate() {
            for (c, sum) in row.iter().enumerate() {
                // SAFETY: inside the rows the caller names.
                unsafe { _mm512_storeu_ps(out[c].byte_add(r * stride), *sum) };
            }
        }
    }

    /// Rows of the result one pass of [`multiply`] keeps in registers, with both runs of 16 columns.
    const PASS_ROWS: usize = 8;

    /// Blocks of the shared dimension [`multiply`] takes through all its passes before the next ones, so
    /// that the passes after the first read the right blocks from the core's first-level cache.
    const CHUNK_BLOCKS: usize = 4;

    /// `block [+]=` the product of `k_blocks` packed block pairs.
    ///
    /// # Safety
    /// AVX-512 BF16 is available ([`supported`]), the block lies inside its allocation, no other thread
    /// touches it, and `left`/`right` hold `k_blocks` packed blocks.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn multiply((left, right): (&[u16], &[u16]), k_blocks: usize, block: Block) {
        debug_assert!(left.len() >= k_blocks * BLOCK_ELEMENTS);
        debug_assert!(right.len() >= k_blocks * BLOCK_ELEMENTS);
        let Block {
            first,
            stride,
            accumulate,
        } = block;
        let bytes = stride * 4;
        for k0 in (0..k_blocks).step_by(CHUNK_BLOCKS) {
            let chunk = k0..(k0 + CHUNK_BLOCKS).min(k_blocks);
            let from_result = accumulate || k0 > 0;
            for row0 in (0..BLOCK).step_by(PASS_ROWS) {
                // SAFETY: as the caller guarantees; the pass reads rows `row0..row0 + 8` of the chunk's
                // left blocks, the whole of its right blocks, and writes its 8 rows of the result block.
                unsafe {
                    let out = first.add(row0 * stride);
                    let mut sums =
                        start::<PASS_ROWS, 2>(from_result.then_some((out.cast_const(), bytes)));
                    for kb in chunk.clone() {
                        let right = right.as_ptr().add(kb * BLOCK_ELEMENTS);
                        add_products(
                            &mut sums,
                            left.as_ptr().add(kb * BLOCK_ELEMENTS + row0 * BLOCK),
                            ([right, right.add(BLOCK_ELEMENTS / 2)], 2 * BLOCK),
                        );
                    }
                    store(&sums, ([out, out.add(16)], bytes));
                }
            }
        }
    }

    /// A convolution's 32×32 result block.
    ///
    /// # Safety
    /// AVX-512 BF16 is available ([`supported`]); every tile named lies inside its allocation, and no
    /// other thread touches the result rows.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn convolve(block: ConvolutionBlock) {
        // SAFETY: as the caller guarantees.
        unsafe {
            match (block.runs.1, block.out.1) {
                (Some(second), Some(second_out)) => convolve_runs::<PASS_ROWS, 2>(
                    &block,
                    [block.runs.0, second],
                    [block.out.0, second_out],
                ),
                _ => convolve_runs::<{ 2 * PASS_ROWS }, 1>(&block, [block.runs.0], [block.out.0]),
            }
        }
    }

    /// [`convolve`] over `C` runs of 16 pixels (`runs`, their results at `out`), `R` output channels a
    /// pass.
    ///
    /// # Safety
    /// As for [`convolve`].
    #[inline]
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn convolve_runs<const R: usize, const C: usize>(
        block: &ConvolutionBlock,
        runs: [*const u16; C],
        out: [*mut f32; C],
    ) {
        for row0 in (0..BLOCK).step_by(R) {
            // SAFETY: as the caller guarantees; the bias rows are 16 values (64 bytes) apart, and every
            // run starts from the same ones.
            unsafe {
                let mut sums: [[__m512; C]; R] = start(None);
                if let Some(rows) = block.start {
                    let first: [[__m512; 1]; R] = start(Some((rows.add(row0 * 16), 64)));
                    for (row, first) in sums.iter_mut().zip(first) {
                        row.fill(first[0]);
                    }
                }
                for (s, &offset) in block.offsets.iter().enumerate() {
                    add_products(
                        &mut sums,
                        block.left.add(s * BLOCK_ELEMENTS + row0 * BLOCK),
                        (runs.map(|run| run.add(offset)), block.run_stride),
                    );
                }
                let stride = block.out_stride;
                store(
                    &sums,
                    (out.map(|rows| rows.byte_add(row0 * stride)), stride),
                );
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod portable {
    /// AVX-512 BF16 exists on x86-64 only.
    pub fn supported() -> bool {
        false
    }

    /// Never called ([`supported`] is false): the tiles' stand-ins, which are not called either.
    pub use super::super::tiles::{convolve, multiply};
}

#[cfg(test)]
mod tests {
    use super::super::{BLOCK, BLOCK_ELEMENTS, Block, ConvolutionBlock, TILE_ELEMENTS};

    /// bf16 values in [-1, 1) (exact in bf16: products and their sums in f64 are the reference).
    fn bf16_values(len: usize, seed: usize) -> Vec<u16> {
        (0..len)
            .map(|i| {
                let x = ((i * 7919 + seed * 104_729) % 255) as f32 / 128.0 - 1.0;
                (x.to_bits() >> 16) as u16
            })
            .collect()
    }

    fn value(bits: u16) -> f64 {
        f32::from_bits((bits as u32) << 16) as f64
    }

    /// Element `(k, col)` of a right tile whose pair rows lie `stride` values apart.
    fn right_element(tile: &[u16], stride: usize, (k, col): (usize, usize)) -> f64 {
        value(tile[(k / 2) * stride + 2 * col + k % 2])
    }

    #[test]
    fn dot_products_sum_the_blocks_as_the_tile_layouts_define() {
        if !super::supported() {
            return;
        }
        // More than one chunk of the shared dimension (4 blocks), the last a short one.
        let k_blocks = 6;
        let left = bf16_values(k_blocks * BLOCK_ELEMENTS, 1);
        let right = bf16_values(k_blocks * BLOCK_ELEMENTS, 2);
        // A 32×32 block inside a result 40 wide, starting at column 5 of row 2.
        let (stride, offset) = (40, 2 * 40 + 5);
        let initial: Vec<f32> = (0..40 * 40).map(|i| (i % 17) as f32 - 8.0).collect();
        for accumulate in [false, true] {
            let mut out = initial.clone();
            let block = Block {
                first: out[offset..].as_mut_ptr(),
                stride,
                accumulate,
            };
            // SAFETY: supported (checked); the block lies inside `out`, and the operands hold `k_blocks`.
            unsafe { super::multiply((&left, &right), k_blocks, block) };
            for (index, &got) in out.iter().enumerate() {
                let (row, col) = (index / stride, index % stride);
                let inside = (2..2 + BLOCK).contains(&row) && (5..5 + BLOCK).contains(&col);
                if !inside {
                    assert_eq!(got, initial[index], "outside the block at {index}");
                    continue;
                }
                let (r, c) = (row - 2, col - 5);
                let mut want = if accumulate {
                    initial[index] as f64
                } else {
                    0.0
                };
                for kb in 0..k_blocks {
                    let l = &left[kb * BLOCK_ELEMENTS + r * BLOCK..][..BLOCK];
                    let tile = &right[kb * BLOCK_ELEMENTS + (c / 16) * TILE_ELEMENTS..];
                    want += (0..BLOCK)
                        .map(|k| value(l[k]) * right_element(tile, BLOCK, (k, c % 16)))
                        .sum::<f64>();
                }
                assert!(
                    (got as f64 - want).abs() < 1e-4,
                    "{r},{c}: {got} against {want}"
                );
            }
        }
    }

    #[test]
    fn dot_convolutions_sum_every_step_of_both_runs_from_their_bias() {
        if !super::supported() {
            return;
        }
        let offsets = [0, 40, 72];
        let left = bf16_values(offsets.len() * BLOCK_ELEMENTS, 3);
        // Pixel runs: pair rows 72 values apart, the second run's 16 pixels after the first's.
        let run_stride = 72;
        let pixels = bf16_values(200 + 16 * run_stride, 4);
        let bias: Vec<f32> = (0..BLOCK * 16).map(|i| (i / 16) as f32 * 0.25).collect();
        let out_stride = 48;
        for (second, with_bias) in [(false, false), (true, false), (false, true), (true, true)] {
            let mut out = vec![f32::NAN; BLOCK * out_stride];
            let (first_out, rest) = out.split_at_mut(16);
            // SAFETY: supported (checked); every step's pixel tile lies inside `pixels` (at most
            // 72 + 32 + 15 rows of 72 + 32 values), the result rows inside `out`.
            unsafe {
                super::convolve(ConvolutionBlock {
                    left: left.as_ptr(),
                    offsets: &offsets,
                    runs: (pixels.as_ptr(), second.then(|| pixels.as_ptr().add(32))),
                    run_stride: run_stride * 2,
                    out: (first_out.as_mut_ptr(), second.then_some(rest.as_mut_ptr())),
                    out_stride: out_stride * 4,
                    start: with_bias.then_some(bias.as_ptr()),
                })
            };
            let runs = if second { 2 } else { 1 };
            for channel in 0..BLOCK {
                for pixel in 0..16 * runs {
                    let (run, p) = (pixel / 16, pixel % 16);
                    let mut want = if with_bias {
                        bias[channel * 16] as f64
                    } else {
                        0.0
                    };
                    for (s, &offset) in offsets.iter().enumerate() {
                        let l = &left[s * BLOCK_ELEMENTS + channel * BLOCK..][..BLOCK];
                        let tile = &pixels[offset + 32 * run..];
                        want += (0..BLOCK)
                            .map(|k| value(l[k]) * right_element(tile, run_stride, (k, p)))
                            .sum::<f64>();
                    }
                    let got = out[channel * out_stride + pixel] as f64;
                    assert!(
                        (got - want).abs() < 1e-4,
                        "{channel},{pixel}: {got} against {want}"
                    );
                }
                if !second {
                    assert!(
                        out[channel * out_stride + 16].is_nan(),
                        "no second run written"
                    );
                }
            }
        }
    }
}
