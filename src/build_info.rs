//! What this binary is: version, source commit and compiled-in compute backends, stamped by `build.rs`.

/// The crate version.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The git commit the binary was built from, or `unknown`.
pub const GIT_COMMIT: &str = env!("LORA_STUDIO_GIT_COMMIT");
/// Comma-separated compute backends compiled in (`cpu`, `cuda`, `cudnn`, `metal`).
pub const BACKENDS: &str = env!("LORA_STUDIO_BACKENDS");

/// `0.1.0 (commit 0123456789ab, backends: cpu,cuda)`, for `--version` and exported files' metadata.
pub const LONG_VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("LORA_STUDIO_GIT_COMMIT"),
    ", backends: ",
    env!("LORA_STUDIO_BACKENDS"),
    ")"
);
