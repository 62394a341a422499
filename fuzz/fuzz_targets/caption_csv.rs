//! `read_metadata_csv` on arbitrary bytes as a dataset's `metadata.csv`, and `read_sidecar` on the same bytes
//! as an image's `.txt` caption: errors are fine, a panic is a bug.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use lora_studio::data::captions::{read_metadata_csv, read_sidecar};

/// A private dataset folder for this process (with one image name the CSV can refer to); the caption files
/// are rewritten every iteration.
fn folder() -> &'static PathBuf {
    static FOLDER: OnceLock<PathBuf> = OnceLock::new();
    FOLDER.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("fuzz-caption-csv-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("sub")).expect("create the fuzz folder");
        std::fs::write(dir.join("sub").join("a.png"), b"").expect("create the fuzz image");
        dir
    })
}

fuzz_target!(|data: &[u8]| {
    let root = folder();
    let csv = root.join("metadata.csv");
    std::fs::write(&csv, data).expect("write the fuzz input");
    let _ = read_metadata_csv(&csv, root);
    let image = root.join("img.png");
    std::fs::write(root.join("img.txt"), data).expect("write the fuzz input");
    let _ = read_sidecar(&image, "txt");
});
