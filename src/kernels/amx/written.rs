//! Operands packed by the code that computes them: a left operand row by row, a right one row pair by row
//! pair, each row rounded into tile order as soon as it is computed. Attention's probabilities and score
//! gradients go this way: stored in f32 and packed by the product afterwards, each tile of them would be
//! written and read once more.
//!
//! An operand is given its shape first; when the shape changes, its buffer is zeroed, so the padding past
//! the matrix's edges (which the products read) stays zero however many times the buffer is refilled.

use super::{BLOCK, BLOCK_ELEMENTS, Buffer, Factor, Output, PackedLeft, TILE_ELEMENTS, pack, run};

impl PackedLeft {
    /// An operand with no rows, to be shaped by [`Self::reshape`] and written by [`Self::set_row`].
    pub fn empty() -> Self {
        Self {
            values: Buffer::default(),
            rows: 0,
            depth: 0,
        }
    }

    /// Makes this a `rows × depth` operand. A change of shape zeroes it; otherwise each row keeps what
    /// was last written to it until [`Self::set_row`] writes it again.
    pub fn reshape(&mut self, rows: usize, depth: usize) {
        refit(
            &mut self.values,
            (&mut self.rows, &mut self.depth),
            (rows, depth),
        );
    }

    /// Row `row` of the operand: `depth` values, rounded to bf16.
    ///
    /// # Panics
    /// If the row is outside the operand or `values` is not `depth` long.
    pub fn set_row(&mut self, row: usize, values: &[f32]) {
        assert!(
            row < self.rows && values.len() == self.depth,
            "row outside the operand"
        );
        let run_len = self.depth.div_ceil(BLOCK) * BLOCK_ELEMENTS;
        let first = (row / BLOCK) * run_len + (row % BLOCK / 16) * TILE_ELEMENTS + row % 16 * BLOCK;
        pack::left_row(values, &mut self.values[first..]);
    }
}

/// A right operand packed beforehand, row pair by row pair, by the code that computes it.
pub struct PackedRight {
    pub(super) values: Buffer,
    depth: usize,
    cols: usize,
}

impl PackedRight {
    /// An operand with no rows, to be shaped by [`Self::reshape`] and written by [`Self::set_pair`].
    pub fn empty() -> Self {
        Self {
            values: Buffer::default(),
            depth: 0,
            cols: 0,
        }
    }

    /// Makes this a `depth × cols` operand, as [`PackedLeft::reshape`] does.
    pub fn reshape(&mut self, depth: usize, cols: usize) {
        refit(
            &mut self.values,
            (&mut self.depth, &mut self.cols),
            (depth, cols),
        );
    }

    /// Rows `2·pair` (`even`) and `2·pair + 1` (`odd`; `None` past the last row) of the operand, `cols`
    /// values each, rounded to bf16.
    ///
    /// # Panics
    /// If the rows are outside the operand or not `cols` long.
    pub fn set_pair(&mut self, pair: usize, even: &[f32], odd: Option<&[f32]>) {
        let rows_written = if odd.is_some() { 2 } else { 1 };
        assert!(
            2 * pair + rows_written <= self.depth
                && (odd.is_some() || 2 * pair + 1 == self.depth)
                && even.len() == self.cols
                && odd.is_none_or(|odd| odd.len() == self.cols),
            "rows outside the operand"
        );
        let run_len = self.depth.div_ceil(BLOCK) * BLOCK_ELEMENTS;
        let first = (pair / 16) * BLOCK_ELEMENTS + pair % 16 * BLOCK;
        pack::pair_rows(even, odd, &mut self.values[first..], run_len);
    }
}

/// Makes `values` the zeroed blocks of a matrix of `shape`, unless `current` is that shape already.
fn refit(values: &mut Buffer, current: (&mut usize, &mut usize), shape: (usize, usize)) {
    if (*current.0, *current.1) == shape {
        return;
    }
    let len = shape.0.div_ceil(BLOCK) * shape.1.div_ceil(BLOCK) * BLOCK_ELEMENTS;
    values.grow_to(len);
    values[..len].fill(0);
    (*current.0, *current.1) = shape;
}

/// `out (m×n) [+]= scale · left (m×k) · right (k×n)` for two operands packed beforehand; on the calling
/// thread only when `parallel` is false.
///
/// # Panics
/// If the operands' shared dimensions differ.
pub fn product_of_packed(left: &PackedLeft, right: &PackedRight, out: Output, parallel: bool) {
    assert_eq!(left.depth, right.depth, "shared dimensions differ");
    let (m, k, n) = (left.rows, left.depth, right.cols);
    let target = out.target((m, n));
    run(
        (m, k, n),
        (Factor::Packed(&left.values), Factor::Packed(&right.values)),
        target,
        parallel,
    );
}
