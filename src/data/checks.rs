//! Problems worth fixing before training, per image: no caption, smaller than the training resolution,
//! exact or near duplicates (a 64-bit difference hash), a caption longer than CLIP's 75-token window, the
//! trigger word missing.

use std::collections::HashMap;
use std::path::PathBuf;

use super::buckets::BucketSettings;
use super::images::load_oriented;
use super::scan::Dataset;

/// One problem of one image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DatasetIssue {
    MissingCaption,
    /// Smaller than the training resolution on its shorter side: it is upscaled to cover `bucket`, or with
    /// `bucket_no_upscale` trained at a bucket of its own size (`bucket`, no larger than the image).
    Small {
        width: u32,
        height: u32,
        bucket: (u32, u32),
    },
    /// Byte-identical to another image.
    Duplicate {
        of: PathBuf,
    },
    /// Looks the same as another image (difference hash within a few bits).
    NearDuplicate {
        of: PathBuf,
    },
    /// The caption has more than 75 tokens; the rest is cut off.
    LongCaption {
        tokens: usize,
    },
    TriggerMissing,
}

/// Bits two difference hashes may differ by and still count as the same picture.
const NEAR_DUPLICATE_BITS: u32 = 4;

/// The issues of every item of `dataset` (same order), for training with `buckets`. `count_tokens`
/// counts a caption's CLIP tokens.
pub fn check_dataset(
    dataset: &Dataset,
    buckets: &BucketSettings,
    trigger: Option<&str>,
    count_tokens: &dyn Fn(&str) -> usize,
) -> Vec<Vec<DatasetIssue>> {
    let mut issues = vec![Vec::new(); dataset.items.len()];
    let mut by_content: HashMap<Vec<u8>, PathBuf> = HashMap::new();
    let mut hashes: Vec<(u64, PathBuf)> = Vec::new();
    for (item, found) in dataset.items.iter().zip(issues.iter_mut()) {
        match &item.raw_caption {
            None => found.push(DatasetIssue::MissingCaption),
            Some(caption) => {
                let tokens = count_tokens(caption);
                if tokens > 75 {
                    found.push(DatasetIssue::LongCaption { tokens });
                }
                if let Some(trigger) = trigger.filter(|t| !t.trim().is_empty())
                    && !caption.contains(trigger.trim())
                {
                    found.push(DatasetIssue::TriggerMissing);
                }
            }
        }
        if item.width.min(item.height) < buckets.resolution {
            found.push(DatasetIssue::Small {
                width: item.width,
                height: item.height,
                bucket: buckets.bucket_for(item.width, item.height),
            });
        }
        if let Ok(bytes) = std::fs::read(&item.path) {
            let digest = crate::hashing::sha256_hex(&bytes).into_bytes();
            match by_content.get(&digest) {
                Some(first) => found.push(DatasetIssue::Duplicate { of: first.clone() }),
                None => {
                    by_content.insert(digest, item.relative.clone());
                    if let Some(hash) = difference_hash(&item.path) {
                        if let Some((_, similar)) = hashes
                            .iter()
                            .find(|(h, _)| (h ^ hash).count_ones() <= NEAR_DUPLICATE_BITS)
                        {
                            found.push(DatasetIssue::NearDuplicate {
                                of: similar.clone(),
                            });
                        }
                        hashes.push((hash, item.relative.clone()));
                    }
                }
            }
        }
    }
    issues
}

/// dHash: the image shrunk to 9x8 grey pixels, one bit per horizontal neighbour comparison.
fn difference_hash(path: &std::path::Path) -> Option<u64> {
    let image = load_oriented(path).ok()?;
    let small = image
        .resize_exact(9, 8, image::imageops::FilterType::Triangle)
        .to_luma8();
    let mut hash = 0u64;
    for y in 0..8 {
        for x in 0..8 {
            let brighter = small.get_pixel(x, y)[0] > small.get_pixel(x + 1, y)[0];
            hash = (hash << 1) | u64::from(brighter);
        }
    }
    Some(hash)
}
