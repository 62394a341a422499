//! Turning an image into the normalised pixels CLIP and BLIP were trained on, as transformers'
//! `CLIPImageProcessor` and `BlipImageProcessor` do: RGB, bicubic resize (CLIP: shorter side to the size,
//! then a centred square crop; BLIP: straight to the square, aspect not kept; Pillow's bicubic filter,
//! [`super::resample`]), scaled to [0, 1], then
//! normalised with OpenAI CLIP's per-channel mean and deviation.

use candle_core::{Device, Result, Tensor};
use image::DynamicImage;

use super::resample::resize_bicubic;

/// OpenAI CLIP's channel means.
pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
/// OpenAI CLIP's channel standard deviations.
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_6, 0.275_777_1];

/// How the image is brought to a square.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SquareFit {
    /// Shorter side to the size, then the centre cut out (CLIP).
    ResizeThenCrop,
    /// Resized to the square, stretched if need be (BLIP).
    Stretch,
}

/// `[1, 3, size, size]` normalised pixels.
pub fn pixel_values(
    image: &DynamicImage,
    size: u32,
    fit: SquareFit,
    device: &Device,
) -> Result<Tensor> {
    let rgb = image.to_rgb8();
    let square = match fit {
        SquareFit::Stretch => resize_bicubic(&rgb, size, size),
        SquareFit::ResizeThenCrop => {
            let (w, h) = rgb.dimensions();
            let short = w.min(h).max(1) as u64;
            // transformers truncates the longer side: int(size * long / short).
            let scale = |side: u32| ((size as u64 * side as u64) / short).max(size as u64) as u32;
            let (rw, rh) = (scale(w), scale(h));
            let resized = resize_bicubic(&rgb, rw, rh);
            let (left, top) = ((rw - size) / 2, (rh - size) / 2);
            image::imageops::crop_imm(&resized, left, top, size, size).to_image()
        }
    };
    let plane = (size * size) as usize;
    let mut values = vec![0f32; 3 * plane];
    for (i, pixel) in square.pixels().enumerate() {
        for c in 0..3 {
            values[c * plane + i] = (pixel[c] as f32 / 255.0 - CLIP_MEAN[c]) / CLIP_STD[c];
        }
    }
    Tensor::from_vec(values, (1, 3, size as usize, size as usize), device)
}
