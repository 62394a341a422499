//! `config_from_text` on arbitrary text read as TOML, YAML and JSON: errors are fine, a panic, stack overflow
//! or runaway allocation is a bug.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use lora_studio::config::config_from_text;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    for name in ["x.toml", "x.yaml", "x.json"] {
        let _ = config_from_text(text, Path::new(name));
    }
});
