//! Aspect-ratio bucketing as kohya sd-scripts does it: buckets of about `resolution²` pixels whose sides are
//! multiples of `bucket_reso_steps` within `[min_bucket_reso, max_bucket_reso]` (by default half and twice
//! the resolution, see `TrainConfig::bucket_sides`); each image goes to the bucket with the nearest aspect
//! ratio, is scaled to cover it and cropped. With `bucket_no_upscale` an image gets its own bucket (its
//! size, scaled down to the area if larger, floored to the step) and is never enlarged.

use crate::config::TrainConfig;

/// Bucketing settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BucketSettings {
    pub enabled: bool,
    pub resolution: u32,
    pub min_reso: u32,
    pub max_reso: u32,
    pub step: u32,
    pub no_upscale: bool,
}

impl BucketSettings {
    pub fn from_config(config: &TrainConfig) -> Self {
        let (min_reso, max_reso) = config.bucket_sides();
        Self {
            enabled: config.enable_bucket,
            resolution: config.training_resolution(),
            min_reso,
            max_reso,
            step: config.bucket_reso_steps,
            no_upscale: config.bucket_no_upscale,
        }
    }

    /// The predefined bucket sizes (kohya `make_bucket_resolutions`), sorted.
    pub fn predefined(&self) -> Vec<(u32, u32)> {
        let max_area = (self.resolution as u64).pow(2);
        let step = self.step as u64;
        let mut buckets = std::collections::BTreeSet::new();
        let side = ((max_area as f64).sqrt() as u64 / step * step) as u32;
        buckets.insert((side, side));
        let mut width = self.min_reso as u64;
        while width <= self.max_reso as u64 {
            let height = (self.max_reso as u64).min(max_area / width / step * step);
            if height >= self.min_reso as u64 {
                buckets.insert((width as u32, height as u32));
                buckets.insert((height as u32, width as u32));
            }
            width += step;
        }
        buckets.into_iter().collect()
    }

    /// The bucket (width, height) for an image of the given size.
    pub fn bucket_for(&self, width: u32, height: u32) -> (u32, u32) {
        if !self.enabled {
            return (self.resolution, self.resolution);
        }
        let aspect = width as f64 / height.max(1) as f64;
        if self.no_upscale {
            return self.own_bucket(width, height, aspect);
        }
        self.predefined()
            .into_iter()
            .min_by(|a, b| {
                let error = |(w, h): (u32, u32)| (w as f64 / h as f64 - aspect).abs();
                error(*a).total_cmp(&error(*b))
            })
            .unwrap_or((self.resolution, self.resolution))
    }

    /// kohya's `round_to_steps`: round to a whole pixel, then down to the step (never below one step).
    fn round_to_step(&self, value: f64) -> f64 {
        let pixels = (value + 0.5).floor() as u64;
        let step = self.step as u64;
        ((pixels - pixels % step).max(step)) as f64
    }

    /// kohya's no-upscale bucket: the image's own size, reduced to the target area if larger (keeping the
    /// aspect ratio as closely as rounding allows), floored to the step and kept within the side limits.
    fn own_bucket(&self, width: u32, height: u32, aspect: f64) -> (u32, u32) {
        let max_area = (self.resolution as f64).powi(2);
        let (mut w, mut h) = (width as f64, height as f64);
        if w * h > max_area {
            let resized_w = (max_area * aspect).sqrt();
            let resized_h = max_area / resized_w;
            let by_width = self.round_to_step(resized_w);
            let ar_by_width = by_width / self.round_to_step(by_width / aspect);
            let by_height = self.round_to_step(resized_h);
            let ar_by_height = self.round_to_step(by_height * aspect) / by_height;
            (w, h) = if (ar_by_width - aspect).abs() < (ar_by_height - aspect).abs() {
                (by_width, (by_width / aspect + 0.5).floor())
            } else {
                ((by_height * aspect + 0.5).floor(), by_height)
            };
        }
        // Very long images: shrink until the longer side fits.
        let longest = w.max(h);
        if longest > self.max_reso as f64 {
            let shrink = self.max_reso as f64 / longest;
            (w, h) = (w * shrink, h * shrink);
        }
        let step = self.step as f64;
        let floor = |v: f64| ((v / step).floor() * step).max(step) as u32;
        (floor(w), floor(h))
    }
}

/// How an image of `size` is scaled (to cover the bucket) before cropping: kohya rounds to the nearest pixel.
pub fn covering_size(size: (u32, u32), bucket: (u32, u32)) -> (u32, u32) {
    let scale = (bucket.0 as f64 / size.0 as f64).max(bucket.1 as f64 / size.1 as f64);
    let w = ((size.0 as f64 * scale + 0.5).floor() as u32).max(bucket.0);
    let h = ((size.1 as f64 * scale + 0.5).floor() as u32).max(bucket.1);
    (w, h)
}

#[cfg(test)]
mod tests {
    use super::BucketSettings;

    fn settings(no_upscale: bool) -> BucketSettings {
        BucketSettings {
            enabled: true,
            resolution: 512,
            min_reso: 256,
            max_reso: 1024,
            step: 64,
            no_upscale,
        }
    }

    #[test]
    fn predefined_buckets_match_kohya_for_512() {
        let buckets = settings(false).predefined();
        // kohya's list for 512x512, min 256, max 1024, step 64.
        let expected = [
            (256, 832),
            (256, 896),
            (256, 960),
            (256, 1024),
            (320, 704),
            (320, 768),
            (384, 640),
            (448, 576),
            (512, 512),
            (576, 448),
            (640, 384),
            (704, 320),
            (768, 320),
            (832, 256),
            (896, 256),
            (960, 256),
            (1024, 256),
        ];
        assert_eq!(buckets, expected);
        assert!(buckets.iter().all(|&(w, h)| w * h <= 512 * 512));
    }

    #[test]
    fn images_go_to_the_nearest_aspect_ratio() {
        let s = settings(false);
        assert_eq!(s.bucket_for(1000, 1000), (512, 512));
        assert_eq!(s.bucket_for(1920, 1080), (640, 384));
        assert_eq!(s.bucket_for(600, 1200), (320, 704));
    }

    #[test]
    fn no_upscale_keeps_small_images_small_and_large_images_within_the_area() {
        let s = settings(true);
        assert_eq!(s.bucket_for(300, 200), (256, 192));
        let (w, h) = s.bucket_for(3000, 2000);
        assert!(w * h <= 512 * 512 && w % 64 == 0 && h % 64 == 0, "{w}x{h}");
        assert_eq!((w, h), (576, 384));
        // Values from kohya's algorithm.
        assert_eq!(s.bucket_for(1920, 1080), (640, 384));
        assert_eq!(s.bucket_for(1000, 333), (768, 256));
        let (w, h) = s.bucket_for(8000, 200);
        assert!(w <= 1024 && h >= 64, "{w}x{h}");
    }
}
