//! The dataset as a user lays it out: caption sources and their precedence, kohya's folder repeats, paths
//! that try to leave the folder, EXIF orientation, transparency, and the latent cache across runs.

mod common;

use std::path::Path;

use candle_core::Device;
use common::{make_dataset, tiny_config};
use lora_studio::config::{AlphaMode, TrainConfig};
use lora_studio::data::captions::CaptionSource;
use lora_studio::data::images::{CropPlan, load_oriented, oriented_dimensions, prepare};
use lora_studio::data::scan_dataset;
use lora_studio::train::{CancelToken, TrainReporter, train};

fn config(data: &Path) -> TrainConfig {
    TrainConfig {
        train_data_dir: data.to_path_buf(),
        base_model: "unused".into(),
        ..Default::default()
    }
}

fn png(path: &Path, w: u32, h: u32) {
    image::RgbImage::from_pixel(w, h, image::Rgb([10, 200, 30]))
        .save(path)
        .unwrap();
}

#[test]
fn captions_come_from_csv_then_sidecars_then_the_instance_prompt() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    for name in ["a.png", "b.png", "c.png", "d.png"] {
        png(&root.join(name), 64, 64);
    }
    std::fs::create_dir(root.join("10_extra")).unwrap();
    png(&root.join("10_extra/e.png"), 64, 64);
    // No header, a quoted caption with commas, and a CSV entry for an image that also has a sidecar.
    std::fs::write(
        root.join("metadata.csv"),
        "a.png,\"neon, rain\"\nb.png,from csv\n",
    )
    .unwrap();
    std::fs::write(root.join("b.txt"), "from sidecar").unwrap();
    std::fs::write(
        root.join("c.caption"),
        "\u{feff}from caption file\nsecond line ignored",
    )
    .unwrap();
    let cfg = TrainConfig {
        instance_prompt: None,
        trigger_word: Some("cyb3r".into()),
        repeats: 2,
        ..config(root)
    };
    let dataset = scan_dataset(&cfg).unwrap();
    let by_name = |n: &str| {
        dataset
            .items
            .iter()
            .find(|i| i.relative.to_string_lossy() == n)
            .unwrap()
            .clone()
    };
    assert_eq!(by_name("a.png").caption, "cyb3r, neon, rain");
    assert_eq!(by_name("b.png").caption, "cyb3r, from csv");
    assert_eq!(
        by_name("b.png").caption_source,
        Some(CaptionSource::MetadataCsv)
    );
    assert_eq!(by_name("c.png").caption, "cyb3r, from caption file");
    assert_eq!(
        by_name("c.png").caption_source,
        Some(CaptionSource::Sidecar)
    );
    assert_eq!(by_name("d.png").caption, "cyb3r");
    assert_eq!(
        dataset.missing_captions.len(),
        2,
        "d.png and e.png have no caption"
    );
    assert_eq!(
        by_name("10_extra/e.png").repeats,
        20,
        "folder repeats times the config's"
    );
    assert_eq!(by_name("a.png").repeats, 2);
    assert_eq!(dataset.samples_per_epoch(), 4 * 2 + 20);

    let with_prompt = TrainConfig {
        instance_prompt: Some("a photo".into()),
        ..cfg
    };
    let dataset = scan_dataset(&with_prompt).unwrap();
    assert!(dataset.missing_captions.is_empty());
    let d = dataset
        .items
        .iter()
        .find(|i| i.relative.to_string_lossy() == "d.png")
        .unwrap();
    assert_eq!(
        (d.caption.as_str(), d.caption_source),
        ("cyb3r, a photo", Some(CaptionSource::InstancePrompt))
    );
}

#[test]
fn csv_paths_outside_the_folder_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("data");
    std::fs::create_dir(&root).unwrap();
    png(&root.join("ok.png"), 64, 64);
    png(&dir.path().join("secret.png"), 64, 64);
    for (line, what) in [
        ("../secret.png,x", "leaves the dataset folder"),
        ("/etc/passwd,x", "is an absolute path"),
        ("link.png,x", "points outside the dataset folder"),
    ] {
        let _ = std::fs::remove_file(root.join("link.png"));
        #[cfg(unix)]
        std::os::unix::fs::symlink(dir.path().join("secret.png"), root.join("link.png")).unwrap();
        std::fs::write(
            root.join("metadata.csv"),
            format!("file_name,text\n{line}\n"),
        )
        .unwrap();
        let message = scan_dataset(&config(&root)).unwrap_err().to_string();
        assert!(
            message.contains("metadata.csv")
                && message.contains("line 2")
                && message.contains(what),
            "{message}"
        );
    }
}

#[test]
fn broken_files_are_listed_not_fatal_and_an_empty_folder_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    png(&root.join("good.png"), 64, 64);
    std::fs::write(root.join("broken.png"), b"not a png at all").unwrap();
    std::fs::write(root.join("empty.jpg"), b"").unwrap();
    let dataset = scan_dataset(&config(root)).unwrap();
    assert_eq!(dataset.items.len(), 1);
    assert_eq!(dataset.unreadable.len(), 2);
    let empty = tempfile::tempdir().unwrap();
    let message = scan_dataset(&config(empty.path())).unwrap_err().to_string();
    assert!(message.contains("contains no readable images"), "{message}");
    let message = scan_dataset(&config(&root.join("missing")))
        .unwrap_err()
        .to_string();
    assert!(message.contains("does not exist"), "{message}");
}

/// A PNG whose header claims `w`x`h` pixels, followed by a little compressed data and the end chunk.
fn png_claiming(w: u32, h: u32) -> Vec<u8> {
    fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
        out.extend((data.len() as u32).to_be_bytes());
        let mut crc = flate2::Crc::new();
        crc.update(kind);
        crc.update(data);
        out.extend(kind);
        out.extend(data);
        out.extend(crc.sum().to_be_bytes());
    }
    let mut header = Vec::new();
    header.extend(w.to_be_bytes());
    header.extend(h.to_be_bytes());
    header.extend([8, 2, 0, 0, 0]);
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    chunk(&mut out, b"IHDR", &header);
    chunk(&mut out, b"IDAT", &[0x78, 0x9c, 0x63, 0, 0, 0, 1, 0, 1]);
    chunk(&mut out, b"IEND", &[]);
    out
}

/// A real JPEG whose frame header is changed to claim `w`x`h` pixels.
fn jpeg_claiming(w: u16, h: u16) -> Vec<u8> {
    let mut jpeg = Vec::new();
    image::RgbImage::from_pixel(16, 16, image::Rgb([1, 2, 3]))
        .write_to(
            &mut std::io::Cursor::new(&mut jpeg),
            image::ImageFormat::Jpeg,
        )
        .unwrap();
    let frame = jpeg.windows(2).position(|m| m == [0xFF, 0xC0]).unwrap();
    jpeg[frame + 5..frame + 7].copy_from_slice(&h.to_be_bytes());
    jpeg[frame + 7..frame + 9].copy_from_slice(&w.to_be_bytes());
    jpeg
}

#[test]
fn images_claiming_30000x30000_pixels_are_refused_before_decoding() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    png(&root.join("good.png"), 64, 64);
    std::fs::write(root.join("bomb.png"), png_claiming(30000, 30000)).unwrap();
    std::fs::write(root.join("bomb.jpg"), jpeg_claiming(30000, 30000)).unwrap();
    let dataset = scan_dataset(&config(root)).unwrap();
    assert_eq!(dataset.items.len(), 1);
    assert_eq!(dataset.unreadable.len(), 2, "{:?}", dataset.unreadable);
    for (path, reason) in &dataset.unreadable {
        assert!(
            reason.contains("claims 30000x30000 pixels (900 megapixels)"),
            "{}: {reason}",
            path.display()
        );
        let message = load_oriented(path).unwrap_err().to_string();
        assert!(
            message.contains(&*path.to_string_lossy()) && message.contains("30000x30000"),
            "{message}"
        );
    }
}

#[test]
fn empty_and_non_utf8_captions_and_csv_rows_without_images_do_not_stop_the_scan() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    for name in ["empty.png", "latin1.png", "fine.png", "blank_row.png"] {
        png(&root.join(name), 64, 64);
    }
    std::fs::write(root.join("empty.txt"), "  \n").unwrap();
    std::fs::write(root.join("latin1.txt"), b"caf\xe9 neon").unwrap();
    std::fs::write(root.join("fine.txt"), "neon street").unwrap();
    std::fs::write(root.join("notes.gif"), "x").unwrap();
    std::fs::write(
        root.join("metadata.csv"),
        "file_name,text\nblank_row.png,\ngone.png,a deleted image\nnotes.gif,not an image\n",
    )
    .unwrap();
    let dataset = scan_dataset(&config(root)).unwrap();
    let names: Vec<_> = dataset
        .items
        .iter()
        .map(|i| i.relative.to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["blank_row.png", "empty.png", "fine.png"]);
    assert_eq!(dataset.items[2].caption, "neon street");
    let missing: Vec<_> = dataset
        .missing_captions
        .iter()
        .map(|p| p.to_string_lossy())
        .collect();
    assert_eq!(missing, ["blank_row.png", "empty.png"]);
    let unreadable: Vec<_> = dataset
        .unreadable
        .iter()
        .map(|(path, reason)| (path.file_name().unwrap().to_string_lossy(), reason.as_str()))
        .collect();
    assert_eq!(unreadable.len(), 3, "{unreadable:?}");
    assert_eq!(unreadable[0].0, "latin1.png");
    assert!(
        unreadable[0].1.contains("latin1.txt") && unreadable[0].1.contains("not UTF-8"),
        "{unreadable:?}"
    );
    assert_eq!(unreadable[1].0, "gone.png");
    assert!(unreadable[1].1.contains("no such file"), "{unreadable:?}");
    assert_eq!(unreadable[2].0, "notes.gif");
    assert!(unreadable[2].1.contains("not an image"), "{unreadable:?}");
}

#[test]
fn a_csv_with_an_open_quote_names_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    for name in ["a.png", "b.png", "c.png"] {
        png(&root.join(name), 64, 64);
    }
    std::fs::write(
        root.join("metadata.csv"),
        "file_name,text\na.png,\"neon, rain\"\nb.png,\"an open quote\nc.png,street\n",
    )
    .unwrap();
    let message = scan_dataset(&config(root)).unwrap_err().to_string();
    assert!(
        message.contains("metadata.csv")
            && message.contains("line 3")
            && message.contains("`b.png` runs over several lines"),
        "{message}"
    );
}

/// Inserts an EXIF block with the given orientation after a JPEG's start marker.
fn with_exif_orientation(jpeg: &[u8], orientation: u16) -> Vec<u8> {
    let mut tiff = b"II*\0\x08\0\0\0".to_vec();
    tiff.extend_from_slice(&1u16.to_le_bytes());
    tiff.extend_from_slice(&0x0112u16.to_le_bytes());
    tiff.extend_from_slice(&3u16.to_le_bytes());
    tiff.extend_from_slice(&1u32.to_le_bytes());
    tiff.extend_from_slice(&(orientation as u32).to_le_bytes());
    tiff.extend_from_slice(&0u32.to_le_bytes());
    let mut app1 = b"Exif\0\0".to_vec();
    app1.extend_from_slice(&tiff);
    let mut out = jpeg[..2].to_vec();
    out.extend_from_slice(&[0xFF, 0xE1]);
    out.extend_from_slice(&((app1.len() + 2) as u16).to_be_bytes());
    out.extend_from_slice(&app1);
    out.extend_from_slice(&jpeg[2..]);
    out
}

#[test]
fn exif_orientation_and_transparency_are_applied() {
    let dir = tempfile::tempdir().unwrap();
    let mut jpeg = Vec::new();
    image::RgbImage::from_pixel(80, 40, image::Rgb([200, 10, 10]))
        .write_to(
            &mut std::io::Cursor::new(&mut jpeg),
            image::ImageFormat::Jpeg,
        )
        .unwrap();
    let rotated = dir.path().join("rotated.jpg");
    std::fs::write(&rotated, with_exif_orientation(&jpeg, 6)).unwrap();
    assert_eq!(
        oriented_dimensions(&rotated).unwrap(),
        (40, 80),
        "orientation 6 is a quarter turn"
    );
    let decoded = load_oriented(&rotated).unwrap();
    assert_eq!((decoded.width(), decoded.height()), (40, 80));

    let transparent = dir.path().join("alpha.png");
    image::RgbaImage::from_fn(64, 64, |x, _| {
        if x < 32 {
            image::Rgba([0, 0, 0, 0])
        } else {
            image::Rgba([0, 0, 0, 255])
        }
    })
    .save(&transparent)
    .unwrap();
    let image = load_oriented(&transparent).unwrap();
    let plan = CropPlan::centred((64, 64), (64, 64), false);
    let white = prepare(&image, &plan, AlphaMode::White, &Device::Cpu).unwrap();
    let pixels = white
        .pixels
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_eq!(pixels[0], 1.0, "transparent pixels become white");
    assert_eq!(pixels[63], -1.0, "opaque black stays black");
    assert!(white.mask.is_none());
    let masked = prepare(&image, &plan, AlphaMode::Mask, &Device::Cpu).unwrap();
    let mask = masked
        .mask
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_eq!((mask[0], mask[63]), (0.0, 1.0));
}

#[derive(Default)]
struct Messages(Vec<String>);

impl TrainReporter for Messages {
    fn message(&mut self, text: &str) {
        self.0.push(text.to_string());
    }
}

#[test]
fn cached_latents_are_reused_and_an_edited_image_is_encoded_again() {
    let dir = tempfile::tempdir().unwrap();
    let data = make_dataset(&dir.path().join("data"), 4);
    let config = TrainConfig {
        max_train_steps: Some(1),
        ..tiny_config(&data, &dir.path().join("out"))
    };
    let run = |expect: &str| {
        let mut messages = Messages::default();
        train(&config, None, &mut messages, &CancelToken::default()).unwrap();
        let line = messages
            .0
            .iter()
            .find(|m| m.contains("read from the cache"))
            .cloned()
            .unwrap_or_default();
        assert_eq!(line, expect);
    };
    run("");
    run("4 latents read from the cache, 0 encoded");
    image::RgbImage::from_pixel(64, 64, image::Rgb([1, 2, 3]))
        .save(data.join("img0.png"))
        .unwrap();
    run("3 latents read from the cache, 1 encoded");
}
