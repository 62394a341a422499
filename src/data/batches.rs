//! The order images are trained in: every epoch, each image (times its repeats) is placed in its bucket,
//! buckets are shuffled and cut into batches of one size, and the batches are shuffled. The order depends
//! only on the seed and the epoch number, so a resumed run continues exactly where it stopped.

use std::collections::BTreeMap;

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

/// One batch: images of the same bucket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub bucket: (u32, u32),
    /// Indices into the dataset's items.
    pub items: Vec<usize>,
}

/// The batches of epoch `epoch` (0-based) for items with the given buckets and repeats.
pub fn epoch_batches(
    buckets: &[(u32, u32)],
    repeats: &[u32],
    batch_size: usize,
    seed: u64,
    epoch: u64,
) -> Vec<Batch> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let mut by_bucket: BTreeMap<(u32, u32), Vec<usize>> = BTreeMap::new();
    for (index, (&bucket, &repeat)) in buckets.iter().zip(repeats).enumerate() {
        by_bucket
            .entry(bucket)
            .or_default()
            .extend(std::iter::repeat_n(index, repeat as usize));
    }
    let mut batches = Vec::new();
    for (bucket, mut items) in by_bucket {
        items.shuffle(&mut rng);
        batches.extend(items.chunks(batch_size.max(1)).map(|chunk| Batch {
            bucket,
            items: chunk.to_vec(),
        }));
    }
    batches.shuffle(&mut rng);
    batches
}

#[cfg(test)]
mod tests {
    use super::epoch_batches;

    #[test]
    fn batches_are_deterministic_and_cover_every_repeat() {
        let buckets = [(512, 512), (640, 384), (512, 512), (512, 512)];
        let repeats = [2, 1, 1, 3];
        let a = epoch_batches(&buckets, &repeats, 2, 7, 0);
        assert_eq!(a, epoch_batches(&buckets, &repeats, 2, 7, 0));
        assert_ne!(a, epoch_batches(&buckets, &repeats, 2, 7, 1));
        let mut seen: Vec<usize> = a.iter().flat_map(|b| b.items.clone()).collect();
        seen.sort();
        assert_eq!(seen, vec![0, 0, 1, 2, 3, 3, 3]);
        for batch in &a {
            assert!(batch.items.iter().all(|&i| buckets[i] == batch.bucket));
        }
    }
}
