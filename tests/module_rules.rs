//! The architecture's module rules (DESIGN.md): each module uses only what its row allows, and the
//! headless build pulls in no windowing crates.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Module, and the crates or crate modules its sources must not name.
const RULES: &[(&str, &[&str])] = &[
    ("messages", &["candle", "egui", "eframe"]),
    ("config", &["candle", "egui", "eframe"]),
    ("data", &["egui", "eframe", "crate::train", "crate::worker"]),
    (
        "models",
        &[
            "egui",
            "eframe",
            "crate::messages",
            "crate::train",
            "crate::worker",
        ],
    ),
    (
        "lora",
        &[
            "egui",
            "eframe",
            "crate::train",
            "crate::worker",
            "crate::models",
        ],
    ),
    (
        "train",
        &["egui", "eframe", "crate::messages", "crate::worker"],
    ),
    (
        "label",
        &[
            "egui",
            "eframe",
            "crate::messages",
            "crate::train",
            "crate::worker",
        ],
    ),
    ("worker", &["egui", "eframe"]),
    ("cli", &["egui", "eframe"]),
    (
        "tensor_file",
        &["egui", "eframe", "crate::models", "crate::lora"],
    ),
    (
        "app",
        &[
            "candle",
            "crate::models",
            "crate::train",
            "crate::lora",
            "crate::data",
            "crate::label",
            "crate::tensor_file",
        ],
    ),
];

fn sources(module: &str) -> Vec<PathBuf> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    let single = src.join(format!("{module}.rs"));
    if single.is_file() {
        files.push(single);
    }
    let mut dirs = vec![src.join(module)];
    while let Some(dir) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                files.push(path);
            }
        }
    }
    files
}

/// Whether a line of code names a crate or crate module: by a path (`egui::`, `crate::train::`), a `use`, or
/// for candle any of its crates (`candle_core`, `candle_nn`).
fn names(code: &str, forbidden: &str) -> bool {
    if forbidden == "candle" {
        return code.contains("candle_");
    }
    code.contains(&format!("{forbidden}::")) || code.contains(&format!("use {forbidden}"))
}

#[test]
fn modules_use_only_what_their_row_allows() {
    let mut violations = Vec::new();
    for (module, forbidden) in RULES {
        for file in sources(module) {
            let text = std::fs::read_to_string(&file).unwrap();
            for (number, line) in text.lines().enumerate() {
                let code = line.split("//").next().unwrap_or("");
                for name in *forbidden {
                    if names(code, name) {
                        violations.push(format!(
                            "{}:{}: {module} uses {name}",
                            file.display(),
                            number + 1
                        ));
                    }
                }
            }
        }
    }
    assert!(
        violations.is_empty(),
        "module rules broken:\n{}",
        violations.join("\n")
    );
}

#[test]
fn headless_build_has_no_windowing_crates() {
    let output = Command::new(env!("CARGO"))
        .args([
            "tree",
            "--no-default-features",
            "-e",
            "normal",
            "--prefix",
            "none",
            "--offline",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let tree = String::from_utf8_lossy(&output.stdout);
    for banned in ["egui", "eframe", "winit", "wgpu", "rfd "] {
        assert!(
            !tree.lines().any(|l| l.starts_with(banned)),
            "the headless build depends on {banned}"
        );
    }
    assert!(tree.lines().any(|l| l.starts_with("candle-core")));
}
