//! Matrix products on Intel AMX tiles (Sapphire Rapids and later Xeons): both operands rounded to bf16
//! (round to nearest even), products summed in f32 — what PyTorch's CPU autocast to bf16 computes, at four
//! to nine times the f32 rate of the same cores (1.0–2.2 TFLOP/s on two cores, packing included, weights
//! read cold from memory, against 0.24 for f32 AVX-512). Processors with AVX-512 BF16 but no tiles (AMD
//! Zen 4 and later) multiply the same packed blocks with dot-product instructions ([`dot`]: 0.35–0.40
//! TFLOP/s on two Zen 4 cores against 0.18 for f32); [`engine`] says which runs.
//!
//! Operands go into tile order: the left one in blocks of 32 rows × 32 columns (two 16-row tiles), the
//! right one in blocks of 32 rows × 32 columns in the pair-interleaved ("VNNI") layout the `tdpbf16ps`
//! instruction reads, both zero-padded to whole blocks, in 64-byte aligned buffers (a tile row across two
//! cache lines loads several times slower). A micro-kernel keeps a 32×32 block of the result in four
//! accumulator tiles and walks the shared dimension 32 at a time. The smaller operand is packed once per
//! call; the result is spread over threads by blocks of the larger one, each task packing the block it
//! holds into a buffer of its own that stays in the core's cache (several right blocks at once, so that
//! each left block read serves them all, along a row of the result), and for a long shared dimension the
//! product goes in parts, so that the smaller operand's share stays in cache too. Blocks that lie wholly
//! inside the result are written in place, edge blocks through a scratch block. Two products into one
//! result can share the accumulator tiles, their operands joined along the shared dimension, and a result
//! that only feeds further bf16 products can leave the tiles rounded to bf16 with a bias added. An operand
//! computed row by row can be rounded into tile order by the code that computes it ([`written`]); a frozen
//! weight can be stored in tile order and read as `Wᵀ` or `W` without packing ([`tiled`]). Stride-1
//! convolutions run on the same tiles without a patch matrix ([`conv`]). Linux must grant the process the
//! tile data state (`arch_prctl`), asked for once.

use std::cell::Cell;
use std::mem::MaybeUninit;
use std::ops::Range;
use std::sync::OnceLock;
use std::thread::LocalKey;

use rayon::prelude::*;

pub mod conv;
mod dot;
mod pack;
mod tiled;
mod tiles;
mod written;

pub use tiled::{Orientation, TileView, TiledWeight};
pub use written::{PackedRight, product_of_packed};

/// Rows and columns of a result block, and of the shared dimension's step.
const BLOCK: usize = 32;
/// `u16` elements of one packed 32×32 block (two tiles of 16 rows × 64 bytes).
const BLOCK_ELEMENTS: usize = BLOCK * BLOCK;
/// `u16` elements of one 16-row tile.
const TILE_ELEMENTS: usize = BLOCK_ELEMENTS / 2;

/// What multiplies the packed blocks on this processor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    /// AMX tiles (Intel Xeon 4th generation and later).
    Tiles,
    /// AVX-512 BF16 dot products on vector registers (AMD Zen 4 and later, Intel Cooper Lake): twice the
    /// f32 rate of the same cores.
    DotProducts,
}

/// The engine of this processor's bf16 products, `None` without one (checked once per process; the first
/// call asks Linux for the tile state where the processor has AMX).
pub fn engine() -> Option<Engine> {
    static ENGINE: OnceLock<Option<Engine>> = OnceLock::new();
    *ENGINE.get_or_init(|| {
        if tiles::enable() {
            Some(Engine::Tiles)
        } else if dot::supported() {
            Some(Engine::DotProducts)
        } else {
            None
        }
    })
}

/// Whether this processor runs bf16 products (on AMX tiles or with AVX-512 BF16 dot products).
pub fn available() -> bool {
    engine().is_some()
}

/// The elements of an operand: f32 values, rounded to bf16 as they are packed, or bf16 values (their bits),
/// packed as they are — a weight stored in bf16 is read at half the bytes.
#[derive(Clone, Copy)]
pub enum Values<'a> {
    F32(&'a [f32]),
    Bf16(&'a [u16]),
}

impl Values<'_> {
    fn len(&self) -> usize {
        match self {
            Values::F32(values) => values.len(),
            Values::Bf16(values) => values.len(),
        }
    }

    /// The values from `start` on, if it lies inside.
    pub fn starting_at(self, start: usize) -> Option<Self> {
        match self {
            Values::F32(values) => values.get(start..).map(Values::F32),
            Values::Bf16(values) => values.get(start..).map(Values::Bf16),
        }
    }

    /// The bf16 bits of element `index`.
    #[inline(always)]
    fn bits(&self, index: usize) -> u16 {
        match self {
            Values::F32(values) => pack::bf16_bits(values[index]),
            Values::Bf16(values) => values[index],
        }
    }
}

/// A read-only matrix view: element `(r, c)` is `data[r·row_stride + c·col_stride]`.
#[derive(Clone, Copy)]
pub struct Operand<'a> {
    pub data: Values<'a>,
    pub row_stride: usize,
    pub col_stride: usize,
}

impl<'a> Operand<'a> {
    /// A view of f32 values.
    pub fn f32(data: &'a [f32], row_stride: usize, col_stride: usize) -> Self {
        Self {
            data: Values::F32(data),
            row_stride,
            col_stride,
        }
    }

    /// Whether every element of a `rows × cols` matrix lies inside the data.
    fn covers(&self, rows: usize, cols: usize) -> bool {
        rows == 0
            || cols == 0
            || (rows - 1) * self.row_stride + (cols - 1) * self.col_stride < self.data.len()
    }
}

/// Where an operand's values come from: a matrix view, or a frozen weight stored in tile order.
#[derive(Clone, Copy)]
pub enum Source<'a> {
    View(Operand<'a>),
    Tiles(TileView<'a>),
}

impl Source<'_> {
    /// Whether every element of a `rows × cols` matrix lies inside the values.
    fn covers(&self, rows: usize, cols: usize) -> bool {
        match self {
            Source::View(view) => view.covers(rows, cols),
            Source::Tiles(tiles) => tiles.dims() == (rows, cols) || rows == 0 || cols == 0,
        }
    }

    /// The bf16 bits of element `(r, c)`, which lies inside the matrix.
    fn element(&self, r: usize, c: usize) -> u16 {
        match self {
            Source::View(view) => view.data.bits(r * view.row_stride + c * view.col_stride),
            Source::Tiles(tiles) => tiles.element(r, c),
        }
    }
}

impl<'a> From<Operand<'a>> for Source<'a> {
    fn from(view: Operand<'a>) -> Self {
        Source::View(view)
    }
}

impl<'a> From<TileView<'a>> for Source<'a> {
    fn from(tiles: TileView<'a>) -> Self {
        Source::Tiles(tiles)
    }
}

/// An operand whose shared dimension (a left operand's columns, a right one's rows) comes from two views:
/// the first `split` values from `head`, the rest from `tail`. Two products over the same result then add
/// up in the same accumulator tiles (a layer's frozen product and its adapter's low-rank one) instead of
/// the second reading and writing the result again. `split` is a multiple of [`BLOCK`], so no tile spans
/// both views.
#[derive(Clone, Copy)]
struct Joined<'a> {
    head: Source<'a>,
    tail: Option<(usize, Operand<'a>)>,
}

impl<'a> Joined<'a> {
    /// `head`'s first `split` values of the shared dimension followed by `tail`'s.
    fn new(head: Source<'a>, split: usize, tail: Operand<'a>) -> Self {
        Self {
            head,
            tail: Some((split, tail)),
        }
    }

    /// The view that holds shared index `k0` (the start of a block) of a shared dimension `depth` long: the
    /// view, its own share of the dimension, and `k0` within it.
    fn at(self, depth: usize, k0: usize) -> (Source<'a>, usize, usize) {
        match self.tail {
            Some((split, tail)) if k0 >= split => (tail.into(), depth - split, k0 - split),
            Some((split, _)) => (self.head, split, k0),
            None => (self.head, depth, k0),
        }
    }
}

impl<'a> From<Operand<'a>> for Joined<'a> {
    fn from(head: Operand<'a>) -> Self {
        Self {
            head: head.into(),
            tail: None,
        }
    }
}

impl<'a> From<Source<'a>> for Joined<'a> {
    fn from(head: Source<'a>) -> Self {
        Self { head, tail: None }
    }
}

/// The result of a product: a row-major `rows × cols` matrix with rows `row_stride` apart.
pub struct Output<'a> {
    pub data: &'a mut [f32],
    pub row_stride: usize,
    /// Whether the product is added to what `data` holds instead of replacing it.
    pub accumulate: bool,
    /// The factor of the product (`out [+]= scale · a·b`).
    pub scale: f32,
}

impl Output<'_> {
    /// The result as the tasks write it, for an `m × n` product.
    ///
    /// # Panics
    /// If the view does not cover the result.
    fn target(self, (m, n): (usize, usize)) -> SharedOutput {
        assert!(
            m == 0 || n == 0 || (m - 1) * self.row_stride + n <= self.data.len(),
            "result view out of bounds"
        );
        SharedOutput {
            ptr: self.data.as_mut_ptr(),
            row_stride: self.row_stride,
            rows: m,
            cols: n,
            accumulate: self.accumulate,
            scale: self.scale,
            rounded: None,
        }
    }
}

/// `out (m×n) [+]= scale · a (m×k) · b (k×n)`, on the calling thread only when `parallel` is false (for callers
/// that are already spread over threads). Without AMX the same rounded product is computed by plain code,
/// far slower than f32 AVX-512 products: callers take this path only when [`available`].
///
/// # Panics
/// If a view does not cover its matrix.
pub fn product(
    (m, k, n): (usize, usize, usize),
    a: Operand,
    b: Operand,
    out: Output,
    parallel: bool,
) {
    assert!(
        a.covers(m, k) && b.covers(k, n),
        "operand views out of bounds"
    );
    let target = out.target((m, n));
    run(
        (m, k, n),
        (Factor::View(a.into()), Factor::View(b.into())),
        target,
        parallel,
    );
}

/// `a (m×k) · b (k×n)` into `out` (row-major, `m·n` values), which need not be initialised: every value is
/// written. Otherwise as [`product`].
pub fn product_into_uninit(
    (m, k, n): (usize, usize, usize),
    (a, b): (Operand, Source),
    out: &mut [MaybeUninit<f32>],
    parallel: bool,
) {
    assert!(
        a.covers(m, k) && b.covers(k, n),
        "operand views out of bounds"
    );
    run_into_uninit((m, k, n), (a.into(), b.into()), out, parallel);
}

/// `a (m×k) · b (k×n) + c (m×j) · d (j×n)` into `out` as [`product_into_uninit`] writes it, the second
/// product summed in the same tiles as the first (see [`Joined`]); `k` is a multiple of 32.
///
/// # Panics
/// If `k` is not a multiple of 32, or a view does not cover its matrix.
pub fn joined_product_into_uninit(
    (m, k, j, n): (usize, usize, usize, usize),
    ((a, b), (c, d)): ((Operand, Source), (Operand, Operand)),
    out: &mut [MaybeUninit<f32>],
    parallel: bool,
) {
    assert!(
        k % BLOCK == 0,
        "the first shared dimension is not whole blocks"
    );
    assert!(
        a.covers(m, k) && b.covers(k, n) && c.covers(m, j) && d.covers(j, n),
        "operand views out of bounds"
    );
    let joined = (Joined::new(a.into(), k, c), Joined::new(b, k, d));
    run_into_uninit((m, k + j, n), joined, out, parallel);
}

/// The product of two (joined) views into an uninitialised row-major result.
fn run_into_uninit(
    (m, k, n): (usize, usize, usize),
    (a, b): (Joined, Joined),
    out: &mut [MaybeUninit<f32>],
    parallel: bool,
) {
    assert!(out.len() >= m * n, "result view out of bounds");
    let target = SharedOutput {
        ptr: out.as_mut_ptr().cast(),
        row_stride: n,
        rows: m,
        cols: n,
        accumulate: false,
        scale: 1.0,
        rounded: None,
    };
    run(
        (m, k, n),
        (Factor::View(a), Factor::View(b)),
        target,
        parallel,
    );
}

/// `a (m×k) · b (k×n)`, plus `c (m×j) · d (j×n)` summed in the same tiles when given (`k` then a multiple
/// of 32), plus `bias` (`n` values) on every row, rounded to bf16 into `out` (row-major, every value
/// written): a result that only ever feeds further bf16 products, written at half the bytes and never held
/// in f32.
///
/// # Panics
/// If a view does not cover its matrix, `out` or `bias` is too short, or `k` is not whole blocks with a
/// second product.
pub fn rounded_product_into_uninit(
    (m, k, j, n): (usize, usize, usize, usize),
    ((a, b), low_rank): ((Operand, Source), Option<(Operand, Operand)>),
    bias: Option<&[f32]>,
    out: &mut [MaybeUninit<u16>],
) {
    assert!(out.len() >= m * n, "result view out of bounds");
    assert!(bias.is_none_or(|bias| bias.len() >= n), "bias too short");
    assert!(
        a.covers(m, k) && b.covers(k, n),
        "operand views out of bounds"
    );
    let (operands, depth) = match low_rank {
        Some((c, d)) => {
            assert!(
                k % BLOCK == 0,
                "the first shared dimension is not whole blocks"
            );
            assert!(
                c.covers(m, j) && d.covers(j, n),
                "operand views out of bounds"
            );
            ((Joined::new(a.into(), k, c), Joined::new(b, k, d)), k + j)
        }
        None => ((a.into(), b.into()), k),
    };
    let target = SharedOutput {
        ptr: std::ptr::null_mut(),
        row_stride: n,
        rows: m,
        cols: n,
        accumulate: false,
        scale: 1.0,
        rounded: Some(RoundedTarget {
            ptr: out.as_mut_ptr().cast(),
            bias: bias.map(<[f32]>::as_ptr),
        }),
    };
    run(
        (m, depth, n),
        (Factor::View(operands.0), Factor::View(operands.1)),
        target,
        true,
    );
}

/// A left operand packed once for several products (attention's keys and values, used by every tile of
/// query rows).
pub struct PackedLeft {
    values: Buffer,
    rows: usize,
    depth: usize,
}

impl PackedLeft {
    /// `a` (`rows × depth`) in tile order.
    pub fn new(a: Operand, (rows, depth): (usize, usize), parallel: bool) -> Self {
        assert!(a.covers(rows, depth), "operand view out of bounds");
        let len = rows.div_ceil(BLOCK) * depth.div_ceil(BLOCK) * BLOCK_ELEMENTS;
        let mut values = Buffer::default();
        values.grow_to(len);
        let blocks = (0, 0..depth.div_ceil(BLOCK));
        pack::pack_left(
            a.into(),
            (rows, depth),
            blocks,
            &mut values[..len],
            parallel,
        );
        Self {
            values,
            rows,
            depth,
        }
    }
}

/// [`product`] with a left operand packed beforehand; `b` is `depth × n`.
///
/// # Panics
/// If a view does not cover its matrix.
pub fn product_packed(left: &PackedLeft, b: Operand, n: usize, out: Output, parallel: bool) {
    let (m, k) = (left.rows, left.depth);
    assert!(b.covers(k, n), "operand view out of bounds");
    let target = out.target((m, n));
    run(
        (m, k, n),
        (Factor::Packed(&left.values), Factor::View(b.into())),
        target,
        parallel,
    );
}

/// An operand of a product: to be packed, or packed already (whole blocks, in the layout of its side).
#[derive(Clone, Copy)]
enum Factor<'a> {
    View(Joined<'a>),
    Packed(&'a [u16]),
}

/// Which operand's blocks a task holds: the larger one's, each packed by the task that holds it into a
/// buffer that stays in the core's cache (packed into one large buffer instead, every weight would go to
/// memory and back once more per product).
#[derive(Clone, Copy)]
enum Held {
    Left,
    Right,
}

/// Packs the operands and computes the result's blocks into `target` (in bounds: checked by the callers).
///
/// The smaller operand is packed once; the shared dimension is then taken in parts whose share of it fits
/// in a core's cache (each task reads all of it), and in each part the tasks pack and multiply their held
/// blocks.
fn run(
    (m, k, n): (usize, usize, usize),
    (a, b): (Factor, Factor),
    target: SharedOutput,
    parallel: bool,
) {
    run_scheduled((m, k, n), (a, b), target, parallel, None);
}

/// How a product's work is cut: held blocks per task, and blocks of the shared dimension per part.
#[derive(Clone, Copy)]
struct Schedule {
    group: usize,
    part: usize,
}

/// [`run`] with the given schedule instead of the one chosen for the product's shapes.
fn run_scheduled(
    (m, k, n): (usize, usize, usize),
    (a, b): (Factor, Factor),
    target: SharedOutput,
    parallel: bool,
    schedule: Option<Schedule>,
) {
    if m == 0 || n == 0 {
        return;
    }
    // A weight stored in tile order and read as `Wᵀ` is the packed right operand already.
    let b = match b {
        Factor::View(Joined {
            head: Source::Tiles(tiles),
            tail: None,
        }) => tiles.packed_transposed().map_or(b, Factor::Packed),
        b => b,
    };
    let k_blocks = k.div_ceil(BLOCK);
    let run_len = k_blocks * BLOCK_ELEMENTS;
    let (m_blocks, n_blocks) = (m.div_ceil(BLOCK), n.div_ceil(BLOCK));
    let held = if n_blocks > m_blocks {
        Held::Right
    } else {
        Held::Left
    };
    let (outer, inner) = match held {
        Held::Right => (n_blocks, m_blocks),
        Held::Left => (m_blocks, n_blocks),
    };
    // The other operand's blocks, packed whole once (unless packed already).
    let shared_len = match (held, &a, &b) {
        (Held::Left, _, Factor::View(_)) | (Held::Right, Factor::View(_), _) => inner * run_len,
        _ => 0,
    };
    let mut shared = take_buffer(&SHARED, shared_len);
    let everything = (0, 0..k_blocks);
    let inner_runs = match (held, &a, &b) {
        (Held::Left, _, Factor::View(b)) => {
            pack::pack_right(*b, (k, n), everything, &mut shared[..shared_len], parallel);
            &shared[..shared_len]
        }
        (Held::Right, Factor::View(a), _) => {
            pack::pack_left(*a, (m, k), everything, &mut shared[..shared_len], parallel);
            &shared[..shared_len]
        }
        (Held::Left, _, Factor::Packed(packed)) | (Held::Right, Factor::Packed(packed), _) => {
            &packed[..inner * run_len]
        }
    };
    let Schedule { group, part } = schedule.unwrap_or_else(|| {
        let threads = if parallel {
            rayon::current_num_threads()
        } else {
            1
        };
        let longest = (INNER_PART_ELEMENTS / (inner * BLOCK_ELEMENTS)).max(MIN_PART);
        let part = k_blocks.div_ceil(k_blocks.div_ceil(longest));
        // A task holding right blocks holds as many as stay in cache together, so that each left block,
        // once loaded, serves all of them along a row of the result; as long as that leaves every thread
        // a few tasks. (Held left blocks each walk along their own row of the result.)
        let group = match held {
            Held::Right => {
                let by_cache = HELD_GROUP_ELEMENTS / (part * BLOCK_ELEMENTS);
                by_cache.min(outer / (4 * threads)).max(1)
            }
            Held::Left => 1,
        };
        Schedule { group, part }
    });
    // A rounded result is written once, so its shared dimension goes in one part.
    let part = if target.rounded.is_some() {
        k_blocks.max(1)
    } else {
        part
    };
    for start in (0..k_blocks).step_by(part) {
        let depth = start..(start + part).min(k_blocks);
        let part_len = depth.len() * BLOCK_ELEMENTS;
        let task = |index: usize| {
            let first = index * group;
            let count = group.min(outer - first);
            let len = count * part_len;
            let held_factor = match held {
                Held::Left => &a,
                Held::Right => &b,
            };
            let packed_already = matches!(held_factor, Factor::Packed(_));
            let mut own = take_buffer(&HELD, if packed_already { 0 } else { len });
            // The held blocks' parts: in `runs` from `offset` on, `spacing` apart.
            let blocks = (first, depth.clone());
            let (runs, offset, spacing) = match (held, held_factor) {
                (_, Factor::Packed(packed)) => (
                    &packed[..],
                    first * run_len + depth.start * BLOCK_ELEMENTS,
                    run_len,
                ),
                (Held::Left, Factor::View(a)) => {
                    pack::pack_left(*a, (m, k), blocks, &mut own[..len], false);
                    (&own[..len], 0, part_len)
                }
                (Held::Right, Factor::View(b)) => {
                    pack::pack_right(*b, (k, n), blocks, &mut own[..len], false);
                    (&own[..len], 0, part_len)
                }
            };
            let held_parts: Vec<&[u16]> = (0..count)
                .map(|j| &runs[offset + j * spacing..][..part_len])
                .collect();
            let inner = (inner_runs, inner);
            // SAFETY: each task writes the result blocks of its own held blocks only.
            unsafe { target.blocks_along(held, first, &held_parts, inner, &depth, k_blocks) };
            HELD.set(own);
        };
        let tasks = outer.div_ceil(group);
        if parallel {
            (0..tasks).into_par_iter().for_each(task);
        } else {
            (0..tasks).for_each(task);
        }
    }
    SHARED.set(shared);
}

/// `u16` elements of the smaller operand one part of the shared dimension covers at most (1 MiB), unless
/// that would make parts shorter than [`MIN_PART`] blocks: every later part reads and writes the result
/// again, which over a short shared dimension and a large result costs more than the cache misses it saves
/// (SDXL's 640->5120 over 4096 tokens: 38 ms in parts of 7 blocks, 28 ms in one part of 20; 1280->10240
/// over 1024 tokens, with the held blocks grouped: 15.8-16.1 ms in two parts, 14.1-14.5 ms in one).
const INNER_PART_ELEMENTS: usize = 1 << 19;
const MIN_PART: usize = 64;
/// `u16` elements of the held blocks' parts one task takes at most (512 KiB: they stay in a core's cache
/// while the other operand's blocks stream past them).
const HELD_GROUP_ELEMENTS: usize = 1 << 18;

thread_local! {
    /// Packing buffers of a thread, kept between products (fresh pages cost more than packing): the smaller
    /// operand of a product the thread calls, the held blocks of a task it runs.
    static SHARED: Cell<Buffer> = const { Cell::new(Buffer(Vec::new())) };
    static HELD: Cell<Buffer> = const { Cell::new(Buffer(Vec::new())) };
}

/// `values` rounded to bf16 (to nearest even) into `out`, vectorised where AMX runs: for values that only
/// feed further bf16 products.
///
/// # Panics
/// If the lengths differ.
pub fn round_to_bf16(values: &[f32], out: &mut [u16]) {
    pack::round_run(values, None, out);
}

/// Frees this thread's packing buffers (they keep the size of the largest product's operands).
pub fn release_buffers() {
    SHARED.take();
    HELD.take();
}

/// This thread's buffer (taken: a product nested through work stealing gets its own), at least `len` long.
/// It only grows: packing overwrites what it uses, so a shorter use costs no clearing.
fn take_buffer(buffer: &'static LocalKey<Cell<Buffer>>, len: usize) -> Buffer {
    let mut values = buffer.take();
    values.grow_to(len);
    values
}

/// A tile row: 32 bf16 values, one cache line.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u16; BLOCK]);

/// Packed values, each tile row in one cache line: a tile load whose rows straddle two lines takes several
/// times as long.
#[derive(Default)]
struct Buffer(Vec<Line>);

impl Buffer {
    /// At least `len` values (zero where new).
    fn grow_to(&mut self, len: usize) {
        let lines = len.div_ceil(BLOCK);
        if self.0.len() < lines {
            self.0.resize(lines, Line([0; BLOCK]));
        }
    }
}

impl std::ops::Deref for Buffer {
    type Target = [u16];

    fn deref(&self) -> &[u16] {
        // SAFETY: a `Line` is 32 `u16` values with no padding (its size is its alignment, 64 bytes).
        unsafe { std::slice::from_raw_parts(self.0.as_ptr().cast(), self.0.len() * BLOCK) }
    }
}

impl std::ops::DerefMut for Buffer {
    fn deref_mut(&mut self) -> &mut [u16] {
        // SAFETY: as in `deref`.
        unsafe { std::slice::from_raw_parts_mut(self.0.as_mut_ptr().cast(), self.0.len() * BLOCK) }
    }
}

/// The result matrix, shared by the tasks that each write their own blocks of it.
struct SharedOutput {
    ptr: *mut f32,
    row_stride: usize,
    rows: usize,
    cols: usize,
    accumulate: bool,
    scale: f32,
    /// Where the result goes instead when it is written rounded to bf16 (then `ptr` is unused).
    rounded: Option<RoundedTarget>,
}

/// A result written as bf16 bits, with a bias added to each column first.
#[derive(Clone, Copy)]
struct RoundedTarget {
    ptr: *mut u16,
    bias: Option<*const f32>,
}

// SAFETY: tasks write disjoint blocks through the pointer (see `product`).
unsafe impl Sync for SharedOutput {}

impl SharedOutput {
    /// Computes the result blocks of the held blocks from `first` on (rows of blocks for held left blocks,
    /// columns for held right ones) over the blocks `depth` of the shared dimension: `held_parts` are the
    /// held blocks' parts, `inner_runs` the other operand's `inner` blocks packed whole (`k_blocks` each).
    /// The blocks are computed along the result's rows: a held left block with every inner block in turn,
    /// an inner (left) block with every held right block before the next one is read.
    ///
    /// # Safety
    /// No other thread may touch these result blocks meanwhile.
    unsafe fn blocks_along(
        &self,
        held: Held,
        first: usize,
        held_parts: &[&[u16]],
        (inner_runs, inner): (&[u16], usize),
        depth: &Range<usize>,
        k_blocks: usize,
    ) {
        let run_len = k_blocks * BLOCK_ELEMENTS;
        let part = depth.start * BLOCK_ELEMENTS..depth.end * BLOCK_ELEMENTS;
        let inner_parts = || {
            let runs = inner_runs.chunks_exact(run_len).take(inner);
            runs.map(|run| &run[part.clone()]).enumerate()
        };
        let later_part = depth.start > 0;
        // SAFETY (both arms): the blocks are this task's (caller) and inside the result (`mb`, `nb` count
        // its blocks).
        match held {
            Held::Left => {
                for (j, &held_part) in held_parts.iter().enumerate() {
                    for (i, inner_part) in inner_parts() {
                        let (mb, nb) = (first + j, i);
                        let parts = (held_part, inner_part);
                        unsafe {
                            self.block(mb * BLOCK, nb * BLOCK, parts, depth.len(), later_part)
                        };
                    }
                }
            }
            Held::Right => {
                for (i, inner_part) in inner_parts() {
                    for (j, &held_part) in held_parts.iter().enumerate() {
                        let (mb, nb) = (i, first + j);
                        let parts = (inner_part, held_part);
                        unsafe {
                            self.block(mb * BLOCK, nb * BLOCK, parts, depth.len(), later_part)
                        };
                    }
                }
            }
        }
    }

    /// Adds the product of `len` packed block pairs to the 32×32 result block at (`row`, `col`) — replacing
    /// what it holds instead for the first part of a product that does not accumulate (a block at the
    /// result's edges, or scaled, goes through a scratch block).
    ///
    /// # Safety
    /// No other thread may touch this block while it is computed, and (`row`, `col`) must lie inside the
    /// result.
    unsafe fn block(
        &self,
        row: usize,
        col: usize,
        (left, right): (&[u16], &[u16]),
        len: usize,
        later_part: bool,
    ) {
        let accumulate = self.accumulate || later_part;
        if let Some(rounded) = self.rounded {
            // SAFETY: as for the blocks below; the rounded result has the same shape and strides.
            return unsafe { self.rounded_block(rounded, (row, col), (left, right), len) };
        }
        let whole = row + BLOCK <= self.rows && col + BLOCK <= self.cols && self.scale == 1.0;
        // SAFETY (all blocks below): the block lies inside the result (caller), and the packed parts hold
        // `len` blocks each.
        unsafe {
            let at = self.ptr.add(row * self.row_stride + col);
            if whole {
                let block = Block {
                    first: at,
                    stride: self.row_stride,
                    accumulate,
                };
                multiply((left, right), len, block);
                return;
            }
            let mut scratch = Scratch([0f32; BLOCK_ELEMENTS]);
            let scratch = &mut scratch.0;
            let block = Block {
                first: scratch.as_mut_ptr(),
                stride: BLOCK,
                accumulate: false,
            };
            multiply((left, right), len, block);
            let rows = BLOCK.min(self.rows - row);
            let cols = BLOCK.min(self.cols - col);
            for r in 0..rows {
                let target = at.add(r * self.row_stride);
                let source = &scratch[r * BLOCK..][..cols];
                if !accumulate {
                    // Written through the pointer: the result may not be initialised yet.
                    for (c, &value) in source.iter().enumerate() {
                        target.add(c).write(self.scale * value);
                    }
                    continue;
                }
                let target = std::slice::from_raw_parts_mut(target, cols);
                for (t, &value) in target.iter_mut().zip(source) {
                    *t += self.scale * value;
                }
            }
        }
    }
}

impl SharedOutput {
    /// [`Self::block`] for a result rounded to bf16: the block is computed in a scratch block, the bias
    /// added, and its rows rounded into the result.
    ///
    /// # Safety
    /// As for [`Self::block`].
    unsafe fn rounded_block(
        &self,
        target: RoundedTarget,
        (row, col): (usize, usize),
        (left, right): (&[u16], &[u16]),
        len: usize,
    ) {
        let mut scratch = Scratch([0f32; BLOCK_ELEMENTS]);
        let block = Block {
            first: scratch.0.as_mut_ptr(),
            stride: BLOCK,
            accumulate: false,
        };
        // SAFETY: the scratch block is this call's own.
        unsafe { multiply((left, right), len, block) };
        let rows = BLOCK.min(self.rows - row);
        let cols = BLOCK.min(self.cols - col);
        // SAFETY: the bias holds the result's `cols` values (asserted by the caller of `run`).
        let bias = target
            .bias
            .map(|bias| unsafe { std::slice::from_raw_parts(bias.add(col), cols) });
        for (r, values) in scratch.0.chunks_exact(BLOCK).take(rows).enumerate() {
            // SAFETY: row `row + r`, columns `col..col + cols` lie inside the result (caller), which this
            // task alone writes.
            let out = unsafe {
                std::slice::from_raw_parts_mut(
                    target.ptr.add((row + r) * self.row_stride + col),
                    cols,
                )
            };
            pack::round_run(&values[..cols], bias, out);
        }
    }
}

/// A result block computed apart, its rows in whole cache lines as tile stores want them.
#[repr(C, align(64))]
struct Scratch([f32; BLOCK_ELEMENTS]);

/// A 32×32 block of a result: its first element, the distance of its rows in floats, and whether the
/// product is added to it.
#[derive(Clone, Copy)]
struct Block {
    first: *mut f32,
    stride: usize,
    accumulate: bool,
}

/// A 32×32 block of a stride-1 convolution's result — 32 output channels by two runs of 16 pixels —
/// summed over the steps (kernel taps × blocks of 32 input channels). Step `s` multiplies the packed left
/// block at `left + s·BLOCK_ELEMENTS` (output channels by input channels) by the pixel tiles at
/// `runs.0 + offsets[s]` and `runs.1 + offsets[s]` (16 rows of input channel pairs, `run_stride` bytes
/// apart). The results go to `out.0` and `out.1`, their rows (output channels) `out_stride` bytes apart;
/// without a second run or a place for it, only the first is computed. The sums start from `start` where
/// given: 32 rows (output channels) of 16 values, 64 bytes apart (a bias), else zero.
#[derive(Clone, Copy)]
struct ConvolutionBlock<'a> {
    left: *const u16,
    offsets: &'a [usize],
    runs: (*const u16, Option<*const u16>),
    run_stride: usize,
    out: (*mut f32, Option<*mut f32>),
    out_stride: usize,
    start: Option<*const f32>,
}

/// `block [+]=` the product of `k_blocks` packed block pairs: on this processor's [`engine`], else in plain
/// code.
///
/// # Safety
/// The block lies inside its allocation, and no other thread touches it.
unsafe fn multiply((left, right): (&[u16], &[u16]), k_blocks: usize, block: Block) {
    assert!(left.len() >= k_blocks * BLOCK_ELEMENTS && right.len() >= k_blocks * BLOCK_ELEMENTS);
    let Block {
        first: c,
        stride,
        accumulate,
    } = block;
    match engine() {
        Some(Engine::Tiles) => {
            tiles::configure_thread();
            // SAFETY: tiles are configured on this thread, and the block is as the caller guarantees.
            return unsafe { tiles::multiply((left, right), k_blocks, block) };
        }
        // SAFETY: the engine implies AVX-512 BF16, and the block is as the caller guarantees.
        Some(Engine::DotProducts) => {
            return unsafe { dot::multiply((left, right), k_blocks, block) };
        }
        None => {}
    }
    let value = |bits: u16| f32::from_bits((bits as u32) << 16);
    for row in 0..BLOCK {
        for col in 0..BLOCK {
            let mut sum = 0f32;
            for kb in 0..k_blocks {
                let l =
                    &left[kb * BLOCK_ELEMENTS + (row / 16) * TILE_ELEMENTS + (row % 16) * BLOCK..];
                let r = &right[kb * BLOCK_ELEMENTS + (col / 16) * TILE_ELEMENTS + (col % 16) * 2..];
                for kk in 0..BLOCK {
                    sum += value(l[kk]) * value(r[(kk / 2) * BLOCK + kk % 2]);
                }
            }
            // SAFETY: inside the block the caller hands over.
            unsafe {
                let target = c.add(row * stride + col);
                *target = if accumulate { *target + sum } else { sum };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::pack::bf16_bits;
    use super::*;

    /// The product of the bf16-rounded operands in f64, the exact value AMX approximates (f32 sums).
    fn rounded_reference(m: usize, k: usize, n: usize, a: &[f32], b: &[f32]) -> Vec<f64> {
        let round = |x: f32| f32::from_bits((bf16_bits(x) as u32) << 16) as f64;
        let mut c = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k)
                    .map(|p| round(a[i * k + p]) * round(b[p * n + j]))
                    .sum();
            }
        }
        c
    }

    fn values(len: usize, seed: usize) -> Vec<f32> {
        (0..len)
            .map(|i| ((i * 7919 + seed * 104_729) % 2003) as f32 / 1001.0 - 1.0)
            .collect()
    }

    /// `a·b` into a fresh result, one block of the shared dimension per part and held blocks in groups
    /// of two.
    fn in_small_parts((m, k, n): (usize, usize, usize), factors: (Factor, Factor)) -> Vec<f32> {
        let mut out = vec![0f32; m * n];
        let target = Output {
            data: &mut out,
            row_stride: n,
            accumulate: false,
            scale: 1.0,
        }
        .target((m, n));
        let schedule = Schedule { group: 2, part: 1 };
        run_scheduled((m, k, n), factors, target, true, Some(schedule));
        out
    }

    #[test]
    fn rounds_to_nearest_even_and_keeps_specials() {
        assert_eq!(bf16_bits(1.0), 0x3f80);
        // 1 + 2⁻⁸ lies halfway between 1 and the next bf16 (1 + 2⁻⁷): ties go to the even one, 1.
        assert_eq!(bf16_bits(1.0 + 1.0 / 256.0), 0x3f80);
        assert_eq!(bf16_bits(1.0 + 3.0 / 256.0), 0x3f82);
        assert_eq!(bf16_bits(-2.5), 0xc020);
        assert_eq!(bf16_bits(f32::INFINITY), 0x7f80);
        assert!(f32::from_bits((bf16_bits(f32::NAN) as u32) << 16).is_nan());
        assert_eq!(bf16_bits(f32::MAX), 0x7f80, "rounds up to infinity");
    }

    #[test]
    /// On AMX where the processor has it, else through the plain-code block product: either way the packing,
    /// the edges and the layouts are checked.
    fn products_match_the_rounded_operands_at_every_edge_and_layout() {
        for &(m, k, n) in &[
            (1, 1, 1),
            (32, 32, 32),
            (33, 70, 47),
            (77, 64, 300),
            (128, 320, 64),
        ] {
            let (a, b) = (values(m * k, 1), values(k * n, 2));
            let reference = rounded_reference(m, k, n, &a, &b);
            let transposed_b: Vec<f32> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect();
            let transposed_a: Vec<f32> = (0..k * m).map(|i| a[(i % m) * k + i / m]).collect();
            // Every other element of a wider buffer: neither stride is 1 (the plain packing path).
            let spread =
                |x: &[f32]| -> Vec<f32> { x.iter().flat_map(|&v| [v, f32::NAN]).collect() };
            let (spread_a, spread_b) = (spread(&a), spread(&b));
            // The operands stored in bf16: packed as they are, they give the same product.
            let bits = |x: &[f32]| -> Vec<u16> { x.iter().map(|&v| bf16_bits(v)).collect() };
            let (bits_a, bits_b, bits_transposed_b) = (bits(&a), bits(&b), bits(&transposed_b));
            let view = Operand::f32;
            let bf16_view = |data, row_stride, col_stride| Operand {
                data: Values::Bf16(data),
                row_stride,
                col_stride,
            };
            let layouts = [
                (view(&a, k, 1), view(&b, n, 1)),
                (view(&a, k, 1), view(&transposed_b, 1, k)),
                (view(&transposed_a, 1, m), view(&b, n, 1)),
                (view(&spread_a, 2 * k, 2), view(&spread_b, 2 * n, 2)),
                (view(&a, k, 1), bf16_view(&bits_b, n, 1)),
                (view(&a, k, 1), bf16_view(&bits_transposed_b, 1, k)),
                (bf16_view(&bits_a, k, 1), view(&b, n, 1)),
            ];
            for (layout, &(left, right)) in layouts.iter().enumerate() {
                for parallel in [false, true] {
                    // A wider row stride than the result, and a prior value to add to.
                    let stride = n + 3;
                    let mut out = vec![0.5f32; m * stride];
                    product(
                        (m, k, n),
                        left,
                        right,
                        Output {
                            data: &mut out,
                            row_stride: stride,
                            accumulate: true,
                            scale: 1.0,
                        },
                        parallel,
                    );
                    for i in 0..m {
                        for j in 0..n {
                            let expected = reference[i * n + j] + 0.5;
                            let got = out[i * stride + j] as f64;
                            assert!(
                                (got - expected).abs()
                                    <= 1e-5 * (k as f64).sqrt() + 1e-6 * expected.abs(),
                                "{m}x{k}x{n} layout {layout} at ({i}, {j}): {got} vs {expected}"
                            );
                        }
                        assert!(
                            out[i * stride + n..(i + 1) * stride]
                                .iter()
                                .all(|&x| x == 0.5),
                            "padding columns untouched"
                        );
                    }
                }
            }
        }
    }

    #[test]
    /// A second product joined along the shared dimension (a layer's low-rank term) adds up with the first
    /// in the same tiles: the result is the sum of both rounded products, at the edges, with the joined
    /// views in either layout, in one part or in several.
    fn joined_products_sum_both_rounded_products() {
        for &(m, k, j, n) in &[(33, 64, 16, 47), (300, 96, 3, 70), (5, 2048 + 64, 16, 40)] {
            let (a, b) = (values(m * k, 5), values(k * n, 6));
            let (c, d) = (values(m * j, 7), values(j * n, 8));
            let first = rounded_reference(m, k, n, &a, &b);
            let second = rounded_reference(m, j, n, &c, &d);
            let transposed = |x: &[f32], rows: usize, cols: usize| -> Vec<f32> {
                (0..rows * cols)
                    .map(|i| x[(i % rows) * cols + i / rows])
                    .collect()
            };
            let (b_t, d_t) = (transposed(&b, k, n), transposed(&d, j, n));
            let rights = [
                (Operand::f32(&b, n, 1), Operand::f32(&d, n, 1)),
                (Operand::f32(&b_t, 1, k), Operand::f32(&d_t, 1, j)),
            ];
            let (a_view, c_view) = (Operand::f32(&a, k, 1), Operand::f32(&c, j, 1));
            let check = |out: &[f32], case: &str| {
                for (i, &got) in out.iter().enumerate() {
                    let expected = first[i] + second[i];
                    assert!(
                        (got as f64 - expected).abs()
                            <= 1e-5 * ((k + j) as f64).sqrt() + 1e-6 * expected.abs(),
                        "{m}x({k}+{j})x{n} {case} at {i}: {got} vs {expected}"
                    );
                }
            };
            for (layout, &(b_view, d_view)) in rights.iter().enumerate() {
                for parallel in [false, true] {
                    let mut out = vec![MaybeUninit::<f32>::uninit(); m * n];
                    joined_product_into_uninit(
                        (m, k, j, n),
                        ((a_view, b_view.into()), (c_view, d_view)),
                        &mut out,
                        parallel,
                    );
                    // SAFETY: the product writes every value.
                    let out: Vec<f32> = out.iter().map(|v| unsafe { v.assume_init() }).collect();
                    check(&out, &format!("layout {layout}"));
                }
                let views = (
                    Factor::View(Joined::new(a_view.into(), k, c_view)),
                    Factor::View(Joined::new(b_view.into(), k, d_view)),
                );
                let out = in_small_parts((m, k + j, n), views);
                check(&out, &format!("layout {layout} in parts"));
            }
        }
    }

    #[test]
    /// A result rounded to bf16 as it leaves the tiles is the f32 result plus the bias, rounded: with and
    /// without a joined second product, at the edges, over a shared dimension long enough for parts.
    fn rounded_results_are_the_f32_results_rounded() {
        for &(m, k, j, n) in &[(33, 64, 16, 47), (70, 2048 + 96, 3, 64), (5, 32, 0, 300)] {
            let (a, b) = (values(m * k, 11), values(k * n, 12));
            let (c, d) = (values(m * j, 13), values(j * n, 14));
            let bias = values(n, 15);
            let (a_view, b_view) = (Operand::f32(&a, k, 1), Operand::f32(&b, n, 1));
            let (c_view, d_view) = (Operand::f32(&c, j, 1), Operand::f32(&d, n, 1));
            let low_rank = (j > 0).then_some((c_view, d_view));
            let mut rounded = vec![MaybeUninit::<u16>::uninit(); m * n];
            let operands = ((a_view, b_view.into()), low_rank);
            rounded_product_into_uninit((m, k, j, n), operands, Some(&bias), &mut rounded);
            let first = rounded_reference(m, k, n, &a, &b);
            let second = rounded_reference(m, j, n, &c, &d);
            for (i, got) in rounded.iter().enumerate() {
                // SAFETY: the product writes every value.
                let got = f32::from_bits((unsafe { got.assume_init() } as u32) << 16) as f64;
                let expected = first[i] + if j > 0 { second[i] } else { 0.0 } + bias[i % n] as f64;
                // bf16 keeps 8 significant bits: half a unit in the last place is 2⁻⁹ of the value.
                assert!(
                    (got - expected).abs()
                        <= expected.abs() / 256.0 + 1e-5 * ((k + j) as f64).sqrt(),
                    "{m}x({k}+{j})x{n} at {i}: {got} vs {expected}"
                );
            }
        }
    }

    #[test]
    /// Products cut into parts of the shared dimension, with several held blocks per task, and operands
    /// packed beforehand (a left one whole, a left one row by row and a right one row pair by row pair,
    /// each into a buffer that held a larger operand of huge values before): each part adds to the
    /// result (scaled, over a prior value), edges included.
    fn products_in_parts_and_groups_match_the_rounded_operands() {
        let schedules = [
            Schedule { group: 3, part: 2 },
            Schedule { group: 1, part: 1 },
        ];
        for &(m, k, n) in &[(40, 300, 530), (530, 300, 40)] {
            let (a, b) = (values(m * k, 3), values(k * n, 4));
            let reference = rounded_reference(m, k, n, &a, &b);
            let transposed_b: Vec<f32> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect();
            let packed_a = PackedLeft::new(Operand::f32(&a, k, 1), (m, k), true);
            let huge = vec![1e30f32; (k + 7).max(n + 9)];
            let mut written_a = PackedLeft::empty();
            written_a.reshape(m + 5, k + 7);
            (0..m + 5).for_each(|row| written_a.set_row(row, &huge[..k + 7]));
            written_a.reshape(m, k);
            for (row, values) in a.chunks(k).enumerate() {
                written_a.set_row(row, values);
            }
            let mut written_b = PackedRight::empty();
            written_b.reshape(k + 7, n + 9);
            for pair in 0..(k + 7).div_ceil(2) {
                let odd = (2 * pair + 1 < k + 7).then_some(&huge[..n + 9]);
                written_b.set_pair(pair, &huge[..n + 9], odd);
            }
            written_b.reshape(k, n);
            for (pair, rows) in b.chunks(2 * n).enumerate() {
                let (even, odd) = rows.split_at(n);
                written_b.set_pair(pair, even, (!odd.is_empty()).then_some(odd));
            }
            let lefts = [
                Factor::View(Operand::f32(&a, k, 1).into()),
                Factor::Packed(&packed_a.values),
                Factor::Packed(&written_a.values),
            ];
            let rights = [
                Factor::View(Operand::f32(&b, n, 1).into()),
                Factor::View(Operand::f32(&transposed_b, 1, k).into()),
                Factor::Packed(&written_b.values),
            ];
            let cases = schedules.iter().flat_map(|schedule| {
                (0..lefts.len()).flat_map(move |l| (0..rights.len()).map(move |r| (schedule, l, r)))
            });
            for (case, (schedule, l, r)) in cases.enumerate() {
                let (left, right) = (lefts[l], rights[r]);
                let mut out = vec![0.5f32; m * n];
                let target = Output {
                    data: &mut out,
                    row_stride: n,
                    accumulate: true,
                    scale: 0.5,
                }
                .target((m, n));
                run_scheduled((m, k, n), (left, right), target, true, Some(*schedule));
                for (i, (&got, &exact)) in out.iter().zip(&reference).enumerate() {
                    let expected = 0.5 + 0.5 * exact;
                    assert!(
                        (got as f64 - expected).abs()
                            <= 1e-5 * (k as f64).sqrt() + 1e-6 * expected.abs(),
                        "{m}x{k}x{n} case {case} at {i}: {got} vs {expected}"
                    );
                }
            }
        }
    }

    #[test]
    /// A weight stored in tile order multiplies as `Wᵀ` and as `W` exactly as the rounded matrices it
    /// holds, whichever operand is the larger, alone, joined with a second product, in parts and groups,
    /// and rounded to bf16; it reads back as the rounded weight.
    fn tiled_weights_multiply_as_the_rounded_matrices_they_hold() {
        let close = |got: &[f32], expected: &[f64], depth: usize, case: &str| {
            for (i, (&got, &expected)) in got.iter().zip(expected).enumerate() {
                assert!(
                    (got as f64 - expected).abs()
                        <= 1e-5 * (depth as f64).sqrt() + 1e-6 * expected.abs(),
                    "{case} at {i}: {got} vs {expected}"
                );
            }
        };
        let uninit = |len| vec![MaybeUninit::<f32>::uninit(); len];
        // SAFETY: the products write every value.
        let written = |out: Vec<MaybeUninit<f32>>| -> Vec<f32> {
            out.iter().map(|v| unsafe { v.assume_init() }).collect()
        };
        for &(rows, cols) in &[(1, 1), (32, 32), (33, 70), (77, 64), (300, 96), (64, 330)] {
            let weight = values(rows * cols, 21);
            let tiled = TiledWeight::new(Values::F32(&weight), (rows, cols));
            let bits: Vec<u16> = weight.iter().map(|&v| bf16_bits(v)).collect();
            assert_eq!(tiled.read_as(Orientation::Upright).row_major(), bits);
            let transposed: Vec<f32> = (0..rows * cols)
                .map(|i| weight[(i % rows) * cols + i / rows])
                .collect();
            let transposed_bits: Vec<u16> = transposed.iter().map(|&v| bf16_bits(v)).collect();
            assert_eq!(
                tiled.read_as(Orientation::Transposed).row_major(),
                transposed_bits
            );
            for m in [1, 40, 300] {
                let readings = [
                    (Orientation::Transposed, (cols, rows), &transposed),
                    (Orientation::Upright, (rows, cols), &weight),
                ];
                for (orientation, (k, n), matrix) in readings {
                    let case = format!("{m}x{k}x{n} {orientation:?}");
                    let tiles = tiled.read_as(orientation);
                    let left = values(m * k, 22);
                    let left_view = Operand::f32(&left, k, 1);
                    let expected = rounded_reference(m, k, n, &left, matrix);
                    for parallel in [false, true] {
                        let mut out = uninit(m * n);
                        product_into_uninit(
                            (m, k, n),
                            (left_view, tiles.into()),
                            &mut out,
                            parallel,
                        );
                        close(&written(out), &expected, k, &case);
                    }
                    let factors = (
                        Factor::View(left_view.into()),
                        Factor::View(Source::from(tiles).into()),
                    );
                    let out = in_small_parts((m, k, n), factors);
                    close(&out, &expected, k, &format!("{case} in parts"));
                    if k % BLOCK == 0 {
                        let j = 3;
                        let (c, d) = (values(m * j, 23), values(j * n, 24));
                        let second = rounded_reference(m, j, n, &c, &d);
                        let sum: Vec<f64> =
                            expected.iter().zip(&second).map(|(x, y)| x + y).collect();
                        let (c_view, d_view) = (Operand::f32(&c, j, 1), Operand::f32(&d, n, 1));
                        let mut out = uninit(m * n);
                        let operands = ((left_view, tiles.into()), (c_view, d_view));
                        joined_product_into_uninit((m, k, j, n), operands, &mut out, true);
                        close(&written(out), &sum, k + j, &format!("{case} joined"));
                    }
                    let mut rounded = vec![MaybeUninit::<u16>::uninit(); m * n];
                    let operands = ((left_view, tiles.into()), None);
                    rounded_product_into_uninit((m, k, 0, n), operands, None, &mut rounded);
                    for (i, (value, &exact)) in rounded.iter().zip(&expected).enumerate() {
                        // SAFETY: the product writes every value.
                        let value = f32::from_bits((unsafe { value.assume_init() } as u32) << 16);
                        assert!(
                            (value as f64 - exact).abs() <= exact.abs() / 256.0 + 1e-4,
                            "{case} rounded at {i}: {value} vs {exact}"
                        );
                    }
                }
            }
        }
    }
}
