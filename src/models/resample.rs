//! Bicubic resizing exactly as Pillow does it (`Image.resize(size, BICUBIC)`), which is what transformers'
//! image processors feed CLIP and BLIP: a separable Keys kernel (a = -0.5) widened by the scale when
//! shrinking, weights normalised per output pixel and rounded to 22-bit fixed point, the horizontal pass
//! first, each pass rounded to 8 bits. Matching it bit for bit keeps captions identical to the reference.

use image::RgbImage;

/// Fixed-point precision of Pillow's 8-bit resampling.
const PRECISION_BITS: u32 = 32 - 8 - 2;

fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// For each output position: the first input index and the fixed-point weights of the inputs from there.
fn coefficients(in_size: usize, out_size: usize) -> Vec<(usize, Vec<i32>)> {
    let scale = in_size as f64 / out_size as f64;
    let filter_scale = scale.max(1.0);
    let support = 2.0 * filter_scale;
    (0..out_size)
        .map(|out| {
            let centre = (out as f64 + 0.5) * scale;
            // Pillow truncates towards zero after adding 0.5 (C's int cast).
            let min = ((centre - support + 0.5) as i64).max(0) as usize;
            let max = ((centre + support + 0.5) as i64).min(in_size as i64) as usize;
            let weights: Vec<f64> = (min..max)
                .map(|i| bicubic((i as f64 - centre + 0.5) / filter_scale))
                .collect();
            let total: f64 = weights.iter().sum();
            let fixed = weights
                .iter()
                .map(|w| {
                    let w = if total != 0.0 { w / total } else { *w };
                    let scaled = w * (1u64 << PRECISION_BITS) as f64;
                    (if w < 0.0 { scaled - 0.5 } else { scaled + 0.5 }) as i32
                })
                .collect();
            (min, fixed)
        })
        .collect()
}

fn clip8(sum: i64) -> u8 {
    if sum >= (1i64 << PRECISION_BITS << 8) {
        255
    } else if sum <= 0 {
        0
    } else {
        (sum >> PRECISION_BITS) as u8
    }
}

/// One pass along an axis: `along_x` resamples rows, otherwise columns.
fn pass(image: &RgbImage, out_w: u32, out_h: u32, along_x: bool) -> RgbImage {
    let (in_len, out_len) = if along_x {
        (image.width(), out_w)
    } else {
        (image.height(), out_h)
    };
    let coefficients = coefficients(in_len as usize, out_len as usize);
    RgbImage::from_fn(out_w, out_h, |x, y| {
        let (start, weights) = &coefficients[if along_x { x } else { y } as usize];
        let mut sums = [1i64 << (PRECISION_BITS - 1); 3];
        for (offset, &w) in weights.iter().enumerate() {
            let i = (start + offset) as u32;
            let pixel = if along_x {
                image.get_pixel(i, y)
            } else {
                image.get_pixel(x, i)
            };
            for c in 0..3 {
                sums[c] += pixel[c] as i64 * w as i64;
            }
        }
        image::Rgb(sums.map(clip8))
    })
}

/// `image` resized to `width`×`height` with Pillow's bicubic filter.
pub fn resize_bicubic(image: &RgbImage, width: u32, height: u32) -> RgbImage {
    let horizontal = if image.width() != width {
        pass(image, width, image.height(), true)
    } else {
        image.clone()
    };
    if horizontal.height() != height {
        pass(&horizontal, width, height, false)
    } else {
        horizontal
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_sum_to_one_in_fixed_point() {
        for (from, to) in [(40, 32), (28, 32), (1000, 384), (7, 3), (3, 7)] {
            for (_, weights) in coefficients(from, to) {
                let sum: i64 = weights.iter().map(|&w| w as i64).sum();
                assert!(
                    (sum - (1 << PRECISION_BITS)).abs() <= weights.len() as i64,
                    "{from}->{to}: {sum}"
                );
            }
        }
    }

    #[test]
    fn a_flat_image_stays_flat_and_same_size_is_a_copy() {
        let flat = RgbImage::from_pixel(37, 23, image::Rgb([200, 10, 99]));
        let resized = resize_bicubic(&flat, 16, 50);
        assert!(resized.pixels().all(|p| p.0 == [200, 10, 99]));
        let noise = RgbImage::from_fn(9, 9, |x, y| image::Rgb([(x * 31 + y * 7) as u8, 0, 255]));
        assert_eq!(resize_bicubic(&noise, 9, 9), noise);
    }
}
