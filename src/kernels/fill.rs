//! Fresh output buffers written in parallel chunks, each chunk zeroed by the thread that fills it: a
//! buffer zeroed whole first would cost a pass over fresh memory on the calling thread alone, while the
//! other cores wait.

use std::mem::MaybeUninit;

use rayon::prelude::*;

/// `len` values, `fill` called on each chunk of `chunk` values (the last may be shorter) with the chunk's
/// index, over threads; a chunk holds `zero` wherever `fill` does not write.
pub(crate) fn par_filled<T: Copy + Send + Sync>(
    len: usize,
    chunk: usize,
    zero: T,
    fill: impl Fn(usize, &mut [T]) + Sync + Send,
) -> Vec<T> {
    let mut values = Vec::with_capacity(len);
    values.spare_capacity_mut()[..len]
        .par_chunks_mut(chunk.max(1))
        .enumerate()
        .for_each(|(index, part)| fill(index, zeroed(part, zero)));
    // SAFETY: the chunks cover all `len` values, and `zeroed` wrote each of them.
    unsafe { values.set_len(len) };
    values
}

/// `part` with every value set to `zero`.
fn zeroed<T: Copy>(part: &mut [MaybeUninit<T>], zero: T) -> &mut [T] {
    for value in part.iter_mut() {
        value.write(zero);
    }
    // SAFETY: every element was just written, and `MaybeUninit<T>` has `T`'s layout.
    unsafe { &mut *(part as *mut [MaybeUninit<T>] as *mut [T]) }
}

#[cfg(test)]
mod tests {
    use super::par_filled;

    #[test]
    fn every_chunk_is_filled_with_its_index_and_zero_elsewhere() {
        let values = par_filled(10, 4, 0u32, |index, part| part[0] = index as u32 + 1);
        assert_eq!(values, [1, 0, 0, 0, 2, 0, 0, 0, 3, 0]);
        assert!(par_filled(0, 4, 0u32, |_, _| unreachable!()).is_empty());
    }
}
