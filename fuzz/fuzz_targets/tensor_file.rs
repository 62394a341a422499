//! `TensorFile::open` on arbitrary bytes as a `.safetensors` and as a `.ckpt` (zip + pickle), then `load` of
//! every tensor of a file that opens: errors are fine, a panic, abort or runaway allocation is a bug.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use candle_core::Device;
use libfuzzer_sys::fuzz_target;
use lora_studio::tensor_file::TensorFile;

/// Tensors with more elements than this are not loaded, to keep each run fast and small.
const MAX_LOADED_ELEMENTS: usize = 1 << 20;

/// A private folder for this process; the same files are rewritten every iteration.
fn folder() -> &'static PathBuf {
    static FOLDER: OnceLock<PathBuf> = OnceLock::new();
    FOLDER.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("fuzz-tensor-file-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create the fuzz folder");
        dir
    })
}

fuzz_target!(|data: &[u8]| {
    for name in ["x.safetensors", "x.ckpt"] {
        let path = folder().join(name);
        std::fs::write(&path, data).expect("write the fuzz input");
        let Ok(file) = TensorFile::open(&path) else {
            continue;
        };
        let _ = file.metadata();
        for (tensor, info) in file.infos() {
            let elements = info
                .shape
                .iter()
                .try_fold(1usize, |acc, &d| acc.checked_mul(d));
            if elements.is_none_or(|n| n > MAX_LOADED_ELEMENTS) {
                continue;
            }
            let _ = file.load(tensor, &Device::Cpu);
        }
    }
});
