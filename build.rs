//! Stamps the build with what `lora-studio --version` and exported files report: the crate version, the git
//! commit the binary was built from (when the source is a git checkout) and the compute backends compiled in.

use std::process::Command;

fn main() {
    let commit = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|out| out.status.success())
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".to_string());

    let mut backends = vec!["cpu"];
    for (feature, name) in [
        ("CARGO_FEATURE_CUDA", "cuda"),
        ("CARGO_FEATURE_CUDNN", "cudnn"),
        ("CARGO_FEATURE_METAL", "metal"),
    ] {
        if std::env::var_os(feature).is_some() {
            backends.push(name);
        }
    }

    println!("cargo:rustc-env=LORA_STUDIO_GIT_COMMIT={commit}");
    println!(
        "cargo:rustc-env=LORA_STUDIO_BACKENDS={}",
        backends.join(",")
    );
    println!("cargo:rerun-if-changed=.git/HEAD");
    println!("cargo:rerun-if-changed=.git/refs/heads");
}
