//! `KohyaLora::load` on arbitrary bytes as a `.safetensors` LoRA file: errors are fine, a panic, abort or
//! runaway allocation is a bug.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use candle_core::Device;
use libfuzzer_sys::fuzz_target;
use lora_studio::lora::KohyaLora;

/// A private folder for this process; the same file is rewritten every iteration.
fn folder() -> &'static PathBuf {
    static FOLDER: OnceLock<PathBuf> = OnceLock::new();
    FOLDER.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("fuzz-lora-file-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create the fuzz folder");
        dir
    })
}

fuzz_target!(|data: &[u8]| {
    let path = folder().join("lora.safetensors");
    std::fs::write(&path, data).expect("write the fuzz input");
    if let Ok(lora) = KohyaLora::load(&path, &Device::Cpu) {
        let _ = lora.metadata();
        for module in lora.modules().values() {
            let _ = (module.down.dims(), module.up.dims(), module.alpha);
        }
    }
});
