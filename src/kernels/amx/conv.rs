//! Stride-1 convolutions straight on AMX tiles, with no patch matrix: the result is a sum over kernel taps
//! of products of the kernel's `[out, in]` slice for the tap with the input shifted by the tap, and each
//! shifted input is a tile-ready view of one rearranged copy of the input.
//!
//! The input goes once into bf16 pixel pairs: for each image, block of 32 input channels and padded input
//! row, one run per horizontal kernel offset `kx` (the row shifted by `kx`, zero where it leaves the
//! image) of 16 rows — channel pairs — each holding `(x[2r][p], x[2r+1][p])` for every output column `p`.
//! A run of 16 output pixels then reads, for a tap `(ky, kx)` and a block of input channels, a right tile
//! in place: 16 rows of 64 bytes, one output row's width apart. The kernel's slices are packed per block of
//! 32 output channels by the task that computes them, the sums start from the bias where there is one, and
//! the result tiles (rows: output channels) are stored straight into the `[batch, out, height, width]`
//! result, one plane apart. The input gradient of a
//! stride-1 convolution is the same computation over the output gradient with the kernel flipped and
//! transposed, which the packing reads in place.

use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::{
    BLOCK, BLOCK_ELEMENTS, Buffer, ConvolutionBlock, Engine, HELD, Values, dot, pack, take_buffer,
    tiles,
};

/// The sizes of a convolution (stride 1, no groups, no dilation): its input `[batch, in, height, width]`
/// and its `kh×kw` kernel, padded by `padding` on every side.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvDims {
    pub batch: usize,
    pub in_channels: usize,
    pub out_channels: usize,
    pub height: usize,
    pub width: usize,
    pub kernel: (usize, usize),
    pub padding: usize,
}

impl ConvDims {
    /// The output's height and width, `None` when the kernel does not fit the padded input.
    pub fn output_size(&self) -> Option<(usize, usize)> {
        let (k_h, k_w) = self.kernel;
        let size = |side: usize, k: usize| (side + 2 * self.padding + 1).checked_sub(k);
        Some((size(self.height, k_h)?, size(self.width, k_w)?)).filter(|&(h, w)| h > 0 && w > 0)
    }

    /// Whether [`conv2d`] computes this convolution here: AMX tiles, input and output channels in whole
    /// blocks of 32, output rows in whole runs of 16 pixels, and padding inside the kernel.
    pub fn runs_directly(&self) -> bool {
        let (k_h, k_w) = self.kernel;
        super::available()
            && self.batch > 0
            && self.in_channels.is_multiple_of(BLOCK)
            && self.out_channels.is_multiple_of(BLOCK)
            && self.padding < k_h.min(k_w)
            && self
                .output_size()
                .is_some_and(|(_, width)| width.is_multiple_of(PIXEL_RUN))
    }
}

/// How [`conv2d`] reads its `[o, i, kh, kw]` kernel: as it is (`o` output channels), or flipped on both
/// spatial axes and transposed (`i` output channels: the kernel of a stride-1 convolution's input gradient).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelOrder {
    AsIs,
    FlippedTransposed,
}

/// An activation applied in place to the input values before the convolution reads them.
pub type InputActivation<'a> = &'a (dyn Fn(&mut [f32]) + Sync);

/// Output pixels per right tile.
const PIXEL_RUN: usize = 16;

/// The convolution of `input` (`[batch, in, height, width]` f32, each value passed through `activation`
/// first where given) with `kernel` read in `order`, plus `bias` (one value per output channel, the sums'
/// start) where given, into `out` (`[batch, out, out_h, out_w]`, every value written), in bf16 products
/// summed in f32. Spread over the calling thread's rayon pool.
///
/// # Panics
/// If the convolution does not [`ConvDims::runs_directly`], or a slice does not match the sizes.
pub fn conv2d(
    (input, activation): (&[f32], Option<InputActivation>),
    (kernel, order, bias): (Values, KernelOrder, Option<&[f32]>),
    dims: ConvDims,
    out: &mut [MaybeUninit<f32>],
) {
    assert!(
        dims.runs_directly(),
        "the convolution does not run directly"
    );
    let (out_h, out_w) = dims.output_size().expect("checked by runs_directly");
    let (k_h, k_w) = dims.kernel;
    assert_eq!(
        input.len(),
        dims.batch * dims.in_channels * dims.height * dims.width
    );
    assert_eq!(
        kernel.len(),
        dims.in_channels * dims.out_channels * k_h * k_w
    );
    assert_eq!(out.len(), dims.batch * dims.out_channels * out_h * out_w);
    assert!(bias.is_none_or(|bias| bias.len() == dims.out_channels));
    let pairs = ShiftedPairs::new(input, activation, dims);
    let taps = k_h * k_w;
    let in_blocks = dims.in_channels / BLOCK;
    // Each step's tile offset from a run's first pixel: tap (ky, kx) and input channel block `kb`.
    let offsets: Vec<usize> = (0..taps)
        .flat_map(|tap| (0..in_blocks).map(move |kb| (tap, kb)))
        .map(|(tap, kb)| pairs.offset(kb, tap / k_w, tap % k_w))
        .collect();
    let plane = out_h * out_w;
    let runs_per_image = plane / PIXEL_RUN;
    let blocks_per_image = runs_per_image.div_ceil(2);
    let pixel_blocks = dims.batch * blocks_per_image;
    let out_blocks = dims.out_channels / BLOCK;
    // Bands of pixel blocks, so that every thread has a few tasks when output channel blocks are few.
    let bands = (4 * rayon::current_num_threads())
        .div_ceil(out_blocks)
        .clamp(1, pixel_blocks);
    let band_len = pixel_blocks.div_ceil(bands);
    let result = SharedResult(out.as_mut_ptr().cast());
    let task = |index: usize| {
        let (ob, band) = (index / bands, index % bands);
        let mut left = take_buffer(&HELD, offsets.len() * BLOCK_ELEMENTS);
        pack_kernel(
            kernel,
            order,
            dims,
            ob,
            &mut left[..offsets.len() * BLOCK_ELEMENTS],
        );
        let start = bias.map(|bias| BiasRows::new(&bias[ob * BLOCK..][..BLOCK]));
        let first_block = band * band_len;
        for block in first_block..(first_block + band_len).min(pixel_blocks) {
            let (image, pair) = (block / blocks_per_image, block % blocks_per_image);
            let run_at = |run: usize| {
                let pixel = run * PIXEL_RUN;
                (pixel / out_w, pixel % out_w)
            };
            let first = run_at(2 * pair);
            let second = (2 * pair + 1 < runs_per_image).then(|| run_at(2 * pair + 1));
            let source = |(y, x): (usize, usize)| pairs.run(image, y, x);
            let target = |(y, x): (usize, usize)| {
                let at = (image * dims.out_channels + ob * BLOCK) * plane + y * out_w + x;
                result.at(at)
            };
            // SAFETY: the packed kernel holds a block per step, every pixel tile lies inside the
            // rearranged input (`offset` stays within an image's channel blocks and padded rows), and this
            // task alone writes these 32 channels of these pixels.
            unsafe {
                convolve_block(ConvolutionBlock {
                    left: left.as_ptr(),
                    offsets: &offsets,
                    runs: (source(first), second.map(source)),
                    run_stride: pairs.row_bytes(),
                    out: (target(first), second.map(target)),
                    out_stride: plane * 4,
                    start: start.as_ref().map(|start| start.0.as_ptr()),
                })
            };
        }
        HELD.set(left);
    };
    (0..out_blocks * bands).into_par_iter().for_each(task);
}

/// One block of a convolution's result on this processor's engine.
///
/// # Safety
/// Every tile the block names lies inside its allocation, and no other thread touches its result rows.
unsafe fn convolve_block(block: ConvolutionBlock) {
    match super::engine() {
        Some(Engine::Tiles) => {
            tiles::configure_thread();
            // SAFETY: tiles are configured on this thread; the rest as the caller guarantees.
            unsafe { tiles::convolve(block) }
        }
        // SAFETY: the engine implies AVX-512 BF16; the rest as the caller guarantees.
        Some(Engine::DotProducts) => unsafe { dot::convolve(block) },
        None => unreachable!("direct convolutions run only where bf16 products do"),
    }
}

/// A block of 32 output channels' biases as the sums' starting tiles: row `r` holds 16 copies of the
/// bias of channel `r`.
#[repr(C, align(64))]
struct BiasRows([f32; BLOCK * PIXEL_RUN]);

impl BiasRows {
    fn new(bias: &[f32]) -> Self {
        let mut rows = [0f32; BLOCK * PIXEL_RUN];
        for (row, &value) in rows.chunks_exact_mut(PIXEL_RUN).zip(bias) {
            row.fill(value);
        }
        Self(rows)
    }
}

/// The result, written by tasks that each own their blocks of it.
struct SharedResult(*mut f32);

// SAFETY: the tasks write disjoint blocks (see `conv2d`).
unsafe impl Sync for SharedResult {}

impl SharedResult {
    /// The address of value `index` (the caller keeps it inside the result).
    fn at(&self, index: usize) -> *mut f32 {
        self.0.wrapping_add(index)
    }
}

/// The input rearranged for [`conv2d`]: for each image, block of 32 input channels and padded input row,
/// `kw` runs (one per horizontal kernel offset) of 16 channel-pair rows of `out_w` bf16 pairs.
struct ShiftedPairs {
    values: Buffer,
    dims: ConvDims,
    out_w: usize,
}

impl ShiftedPairs {
    fn new(input: &[f32], activation: Option<InputActivation>, dims: ConvDims) -> Self {
        let (_, out_w) = dims.output_size().expect("checked by conv2d");
        let (k_w, padding) = (dims.kernel.1, dims.padding);
        let padded_w = dims.width + 2 * padding;
        let padded_h = dims.height + 2 * padding;
        let row_len = k_w * 16 * out_w * 2;
        let rows = dims.batch * (dims.in_channels / BLOCK) * padded_h;
        let mut values = Buffer::default();
        values.grow_to(rows * row_len);
        let fill_row = |(index, row): (usize, &mut [u16])| {
            let y = index % padded_h;
            let channels = index / padded_h * BLOCK;
            let Some(y) = (y >= padding && y < dims.height + padding).then(|| y - padding) else {
                row.fill(0);
                return;
            };
            // Two channels' rows with their padding, side by side.
            let mut scratch = vec![0f32; 2 * padded_w];
            for r in 0..16 {
                for (half, channel) in [channels + 2 * r, channels + 2 * r + 1]
                    .into_iter()
                    .enumerate()
                {
                    let source = &input[(channel * dims.height + y) * dims.width..][..dims.width];
                    let inside = &mut scratch[half * padded_w + padding..][..dims.width];
                    inside.copy_from_slice(source);
                    if let Some(activation) = activation {
                        activation(inside);
                    }
                }
                for kx in 0..k_w {
                    let run = &mut row[(kx * 16 + r) * out_w * 2..][..out_w * 2];
                    for (p, pairs) in run.chunks_exact_mut(2 * PIXEL_RUN).enumerate() {
                        let even = kx + p * PIXEL_RUN;
                        let pairs: &mut [u16; BLOCK] = pairs.try_into().expect("32 values");
                        pack::sixteen_pairs(&scratch, (even, padded_w + even), pairs);
                    }
                }
            }
        };
        values[..rows * row_len]
            .par_chunks_mut(row_len)
            .enumerate()
            .for_each(fill_row);
        Self {
            values,
            dims,
            out_w,
        }
    }

    /// `u16` values from one padded input row's runs to the next's.
    fn row_len(&self) -> usize {
        self.dims.kernel.1 * 16 * self.out_w * 2
    }

    /// Bytes from one channel-pair row of a run to the next.
    fn row_bytes(&self) -> usize {
        self.out_w * 2 * 2
    }

    /// The offset of the tile for input channel block `kb` and tap `(ky, kx)` from [`Self::run`]'s pointer.
    fn offset(&self, kb: usize, ky: usize, kx: usize) -> usize {
        let padded_h = self.dims.height + 2 * self.dims.padding;
        (kb * padded_h + ky) * self.row_len() + kx * 16 * self.out_w * 2
    }

    /// The first value of image `image`'s tiles for the 16 output pixels from `(y, x)` on, at tap (0, 0) and
    /// the first input channel block.
    fn run(&self, image: usize, y: usize, x: usize) -> *const u16 {
        let padded_h = self.dims.height + 2 * self.dims.padding;
        let rows_before = image * (self.dims.in_channels / BLOCK) * padded_h + y;
        self.values[rows_before * self.row_len() + x * 2..].as_ptr()
    }
}

/// The kernel's slices for output channel block `ob`, in tile order, one packed block per step (tap-major,
/// then input channel block): tile rows are output channels, their 32 values consecutive input channels.
fn pack_kernel(kernel: Values, order: KernelOrder, dims: ConvDims, ob: usize, packed: &mut [u16]) {
    match kernel {
        Values::F32(values) => gather_kernel(values, pack::bf16_bits, order, dims, ob, packed),
        Values::Bf16(values) => gather_kernel(values, |bits| bits, order, dims, ob, packed),
    }
}

/// [`pack_kernel`] for one element type, read as bf16 bits by `bits`. The stored kernel is read in runs of
/// 32 consecutive channels with their taps: an output channel's inputs (as it is), or an input gradient
/// channel's outputs (flipped and transposed, written down the tiles' columns).
fn gather_kernel<T: Copy>(
    kernel: &[T],
    bits: impl Fn(T) -> u16,
    order: KernelOrder,
    dims: ConvDims,
    ob: usize,
    packed: &mut [u16],
) {
    let taps = dims.kernel.0 * dims.kernel.1;
    let (outs, ins) = (dims.out_channels, dims.in_channels);
    let in_blocks = ins / BLOCK;
    let block_at = |tap: usize, kb: usize| (tap * in_blocks + kb) * BLOCK_ELEMENTS;
    for kb in 0..in_blocks {
        for j in 0..BLOCK {
            match order {
                KernelOrder::AsIs => {
                    // Row `j` of the tiles: output channel `ob·32 + j`, its inputs `kb·32..` per tap.
                    let run =
                        &kernel[((ob * BLOCK + j) * ins + kb * BLOCK) * taps..][..BLOCK * taps];
                    for tap in 0..taps {
                        let row = &mut packed[block_at(tap, kb) + j * BLOCK..][..BLOCK];
                        for (c, value) in row.iter_mut().enumerate() {
                            *value = bits(run[c * taps + tap]);
                        }
                    }
                }
                KernelOrder::FlippedTransposed => {
                    // Column `j` of the tiles: stored output channel `kb·32 + j`, its inputs `ob·32..`.
                    let run =
                        &kernel[((kb * BLOCK + j) * outs + ob * BLOCK) * taps..][..BLOCK * taps];
                    for tap in 0..taps {
                        let block = &mut packed[block_at(tap, kb)..][..BLOCK_ELEMENTS];
                        for (row, taps_of_row) in run.chunks_exact(taps).enumerate() {
                            block[row * BLOCK + j] = bits(taps_of_row[taps - 1 - tap]);
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: f32) -> Vec<f32> {
        (0..n)
            .map(|i| ((i as f32 * 0.618 + seed).sin() * 1.7).fract())
            .collect()
    }

    fn rounded(x: f32) -> f64 {
        f32::from_bits((pack::bf16_bits(x) as u32) << 16) as f64
    }

    /// The convolution of the bf16-rounded values in f64.
    fn reference(input: &[f32], kernel: &[f32], order: KernelOrder, dims: ConvDims) -> Vec<f64> {
        let (out_h, out_w) = dims.output_size().unwrap();
        let (k_h, k_w) = dims.kernel;
        let (outs, ins, p) = (dims.out_channels, dims.in_channels, dims.padding as isize);
        let mut out = vec![0f64; dims.batch * outs * out_h * out_w];
        for n in 0..dims.batch {
            for o in 0..outs {
                for y in 0..out_h {
                    for x in 0..out_w {
                        let mut sum = 0f64;
                        for i in 0..ins {
                            for ky in 0..k_h {
                                for kx in 0..k_w {
                                    let (iy, ix) = (
                                        y as isize + ky as isize - p,
                                        x as isize + kx as isize - p,
                                    );
                                    if iy < 0 || ix < 0 {
                                        continue;
                                    }
                                    let (iy, ix) = (iy as usize, ix as usize);
                                    if iy >= dims.height || ix >= dims.width {
                                        continue;
                                    }
                                    let weight = match order {
                                        KernelOrder::AsIs => {
                                            kernel[((o * ins + i) * k_h + ky) * k_w + kx]
                                        }
                                        KernelOrder::FlippedTransposed => {
                                            kernel[((i * outs + o) * k_h + k_h - 1 - ky) * k_w
                                                + k_w
                                                - 1
                                                - kx]
                                        }
                                    };
                                    let value =
                                        input[((n * ins + i) * dims.height + iy) * dims.width + ix];
                                    sum += rounded(weight) * rounded(value);
                                }
                            }
                        }
                        out[((n * outs + o) * out_h + y) * out_w + x] = sum;
                    }
                }
            }
        }
        out
    }

    #[test]
    fn tiles_sum_the_taps_of_every_layout() {
        if !super::super::available() {
            return;
        }
        let cases = [
            // batch, in, out, height, width, kernel, padding, order
            (1, 32, 32, 16, 16, 3, 1, KernelOrder::AsIs),
            // Two images, an odd number of pixel runs per image (a half block at each image's end).
            (2, 64, 32, 3, 16, 3, 1, KernelOrder::AsIs),
            (1, 32, 64, 5, 32, 3, 1, KernelOrder::FlippedTransposed),
            // No padding: 18 columns give 16 outputs.
            (2, 32, 32, 6, 18, 3, 0, KernelOrder::AsIs),
            (1, 64, 64, 4, 48, 1, 0, KernelOrder::FlippedTransposed),
        ];
        let silu = |values: &mut [f32]| {
            for v in values {
                *v /= 1.0 + (-*v).exp();
            }
        };
        for (batch, ins, outs, height, width, k, padding, order) in cases {
            let dims = ConvDims {
                batch,
                in_channels: ins,
                out_channels: outs,
                height,
                width,
                kernel: (k, k),
                padding,
            };
            assert!(dims.runs_directly(), "{dims:?}");
            let input = values(batch * ins * height * width, 0.3);
            let kernel = values(ins * outs * k * k, 0.9);
            let (out_h, out_w) = dims.output_size().unwrap();
            for activated in [false, true] {
                let mut out = vec![MaybeUninit::new(f32::NAN); batch * outs * out_h * out_w];
                let activation: Option<InputActivation> = activated.then_some(&silu as _);
                let bias = values(outs, 1.3);
                let with_bias = activated.then_some(&bias[..]);
                conv2d(
                    (&input, activation),
                    (Values::F32(&kernel), order, with_bias),
                    dims,
                    &mut out,
                );
                let mut source = input.clone();
                if activated {
                    silu(&mut source);
                }
                let mut expected = reference(&source, &kernel, order, dims);
                if activated {
                    for (index, value) in expected.iter_mut().enumerate() {
                        *value += bias[index / (out_h * out_w) % outs] as f64;
                    }
                }
                for (index, (out, expected)) in out.iter().zip(&expected).enumerate() {
                    // SAFETY: every value was written (NaN would fail below otherwise).
                    let out = unsafe { out.assume_init() } as f64;
                    assert!(
                        (out - expected).abs() < 1e-4 * (1.0 + expected.abs()),
                        "{dims:?} {order:?} {activated}: {index}: {out} vs {expected}"
                    );
                }
            }
        }
    }

    #[test]
    fn shapes_outside_whole_tiles_are_left_to_other_paths() {
        let dims = ConvDims {
            batch: 1,
            in_channels: 32,
            out_channels: 32,
            height: 8,
            width: 16,
            kernel: (3, 3),
            padding: 1,
        };
        let runs = super::super::available();
        assert_eq!(dims.runs_directly(), runs);
        for other in [
            ConvDims {
                in_channels: 4,
                ..dims
            },
            ConvDims {
                out_channels: 16,
                ..dims
            },
            ConvDims { width: 8, ..dims },
            ConvDims { padding: 3, ..dims },
            ConvDims { batch: 0, ..dims },
        ] {
            assert!(!other.runs_directly(), "{other:?}");
        }
    }
}
