//! Turning an image file into training pixels: decode, apply the EXIF orientation, composite alpha on white
//! (or keep it as a loss mask), scale to cover the bucket, crop, optionally flip, and scale to [-1, 1].
//! The file itself is only read.

use std::path::Path;

use candle_core::{Device, Tensor};
use image::imageops::FilterType;
use image::{DynamicImage, ImageDecoder, RgbaImage};

use super::DataError;
use super::buckets::covering_size;
use crate::config::AlphaMode;

/// Where an image lands in its bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CropPlan {
    pub bucket: (u32, u32),
    /// Size after scaling, before cropping.
    pub resized: (u32, u32),
    /// Top-left corner of the crop in the resized image.
    pub offset: (u32, u32),
    pub flip: bool,
}

impl CropPlan {
    /// A centred crop of an image of `size` into `bucket`.
    pub fn centred(size: (u32, u32), bucket: (u32, u32), flip: bool) -> Self {
        let resized = covering_size(size, bucket);
        let offset = ((resized.0 - bucket.0) / 2, (resized.1 - bucket.1) / 2);
        Self {
            bucket,
            resized,
            offset,
            flip,
        }
    }

    /// A crop at a position chosen by `pick(range_x, range_y)` (each the number of valid offsets).
    pub fn random(
        size: (u32, u32),
        bucket: (u32, u32),
        flip: bool,
        pick: impl FnOnce(u32, u32) -> (u32, u32),
    ) -> Self {
        let resized = covering_size(size, bucket);
        let offset = pick(resized.0 - bucket.0 + 1, resized.1 - bucket.1 + 1);
        Self {
            bucket,
            resized,
            offset,
            flip,
        }
    }

    /// A stable text form for cache keys.
    pub fn key(&self) -> String {
        format!(
            "{}x{}-{}x{}-{}+{}-{}",
            self.bucket.0,
            self.bucket.1,
            self.resized.0,
            self.resized.1,
            self.offset.0,
            self.offset.1,
            self.flip as u8
        )
    }
}

/// Training pixels of one image.
#[derive(Debug, Clone)]
pub struct PreparedImage {
    /// `[3, h, w]` in [-1, 1].
    pub pixels: Tensor,
    /// `[1, h, w]` in [0, 1] when the alpha channel is the loss mask.
    pub mask: Option<Tensor>,
}

/// The most pixels an image may have (a 102-megapixel medium-format photo fits). Larger images, or files
/// whose header claims more, are refused before anything is allocated for them.
pub const MAX_IMAGE_PIXELS: u64 = 120_000_000;

/// The most bytes one decode may allocate (RGBA at `MAX_IMAGE_PIXELS`, plus room for 16-bit channels).
const MAX_DECODE_BYTES: u64 = MAX_IMAGE_PIXELS * 8;

/// Opens `path`'s decoder with the size limits applied; the error is a reason, without the path.
fn limited_decoder(path: &Path) -> Result<impl ImageDecoder, String> {
    let mut reader = image::ImageReader::open(path)
        .map_err(|e| e.to_string())?
        .with_guessed_format()
        .map_err(|e| e.to_string())?;
    let mut limits = image::Limits::default();
    limits.max_alloc = Some(MAX_DECODE_BYTES);
    reader.limits(limits);
    let decoder = reader.into_decoder().map_err(|e| e.to_string())?;
    let (width, height) = decoder.dimensions();
    let pixels = u64::from(width) * u64::from(height);
    if pixels > MAX_IMAGE_PIXELS {
        return Err(format!(
            "it claims {width}x{height} pixels ({} megapixels), more than the {} megapixels lora-studio decodes",
            pixels / 1_000_000,
            MAX_IMAGE_PIXELS / 1_000_000
        ));
    }
    Ok(decoder)
}

/// Width and height as displayed (after EXIF rotation), read from the header only.
pub fn oriented_dimensions(path: &Path) -> Result<(u32, u32), String> {
    let mut decoder = limited_decoder(path)?;
    let (width, height) = decoder.dimensions();
    let rotated = matches!(
        decoder.orientation(),
        Ok(image::metadata::Orientation::Rotate90
            | image::metadata::Orientation::Rotate270
            | image::metadata::Orientation::Rotate90FlipH
            | image::metadata::Orientation::Rotate270FlipH)
    );
    Ok(if rotated {
        (height, width)
    } else {
        (width, height)
    })
}

/// Decodes an image with its EXIF orientation applied.
pub fn load_oriented(path: &Path) -> Result<DynamicImage, DataError> {
    let unreadable = |reason: String| DataError::Image {
        path: path.to_path_buf(),
        reason,
    };
    let mut decoder = limited_decoder(path).map_err(unreadable)?;
    let orientation = decoder
        .orientation()
        .unwrap_or(image::metadata::Orientation::NoTransforms);
    let mut image = DynamicImage::from_decoder(decoder).map_err(|e| unreadable(e.to_string()))?;
    image.apply_orientation(orientation);
    Ok(image)
}

/// Scales, crops and flips `image` by `plan` and converts it to tensors.
pub fn prepare(
    image: &DynamicImage,
    plan: &CropPlan,
    alpha: AlphaMode,
    device: &Device,
) -> Result<PreparedImage, DataError> {
    let rgba: RgbaImage = image.to_rgba8();
    let resized =
        image::imageops::resize(&rgba, plan.resized.0, plan.resized.1, FilterType::Lanczos3);
    let cropped = image::imageops::crop_imm(
        &resized,
        plan.offset.0,
        plan.offset.1,
        plan.bucket.0,
        plan.bucket.1,
    )
    .to_image();
    let cropped = if plan.flip {
        image::imageops::flip_horizontal(&cropped)
    } else {
        cropped
    };
    let (w, h) = (plan.bucket.0 as usize, plan.bucket.1 as usize);
    let mut pixels = vec![0f32; 3 * w * h];
    let mut mask = vec![0f32; w * h];
    for (i, pixel) in cropped.pixels().enumerate() {
        let a = pixel[3] as f32 / 255.0;
        mask[i] = a;
        for c in 0..3 {
            // Composite on white, then map [0, 255] to [-1, 1].
            let value = pixel[c] as f32 * a + 255.0 * (1.0 - a);
            pixels[c * w * h + i] = value / 127.5 - 1.0;
        }
    }
    let tensor = |data: Vec<f32>, channels: usize| {
        Tensor::from_vec(data, (channels, h, w), device)
            .map_err(|e| DataError::Tensor(e.to_string()))
    };
    Ok(PreparedImage {
        pixels: tensor(pixels, 3)?,
        mask: match alpha {
            AlphaMode::Mask => Some(tensor(mask, 1)?),
            AlphaMode::White => None,
        },
    })
}

/// SHA-256 of a file's bytes, hex.
pub fn file_hash(path: &Path) -> Result<String, DataError> {
    crate::hashing::sha256_file(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })
}
