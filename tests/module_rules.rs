//! The architecture's module rules (ARCHITECTURE.md): each module uses only what its row allows, and the
//! headless build pulls in no windowing crates.
//!
//! Sources are read as Rust tokens, not as text: `use` trees are expanded (`use crate::{train, data::x}`
//! names both), `super::`/`self::` are resolved against the file's own module, and comments and string
//! literals are ignored, so neither a grouped import nor a relative path slips past the check.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Module, and the crates (`egui`, `candle` for every `candle_*` crate) or crate modules (`crate::train`)
/// its sources must not name.
const RULES: &[(&str, &[&str])] = &[
    ("messages", &["candle", "egui", "eframe", "crate::app"]),
    ("config", &["candle", "egui", "eframe", "crate::app"]),
    (
        "kernels",
        &[
            "egui",
            "eframe",
            "crate::lora",
            "crate::chat",
            "crate::models",
            "crate::train",
            "crate::data",
            "crate::label",
            "crate::config",
            "crate::messages",
            "crate::worker",
            "crate::cli",
            "crate::app",
        ],
    ),
    (
        "data",
        &[
            "egui",
            "eframe",
            "crate::train",
            "crate::worker",
            "crate::app",
        ],
    ),
    (
        "models",
        &[
            "egui",
            "eframe",
            "crate::messages",
            "crate::chat",
            "crate::train",
            "crate::worker",
            "crate::cli",
            "crate::app",
        ],
    ),
    (
        "lora",
        &[
            "egui",
            "eframe",
            "crate::train",
            "crate::chat",
            "crate::worker",
            "crate::models",
            "crate::messages",
            "crate::cli",
            "crate::app",
        ],
    ),
    (
        "train",
        &[
            "egui",
            "eframe",
            "crate::messages",
            "crate::worker",
            "crate::cli",
            "crate::app",
        ],
    ),
    (
        "label",
        &[
            "egui",
            "eframe",
            "crate::messages",
            "crate::train",
            "crate::worker",
            "crate::cli",
            "crate::app",
        ],
    ),
    (
        "chat",
        &[
            "candle",
            "egui",
            "eframe",
            "crate::kernels",
            "crate::lora",
            "crate::models",
            "crate::train",
            "crate::data",
            "crate::label",
            "crate::config",
            "crate::messages",
            "crate::worker",
            "crate::cli",
            "crate::app",
        ],
    ),
    ("worker", &["egui", "eframe", "crate::cli", "crate::app"]),
    ("cli", &["egui", "eframe"]),
    (
        "device",
        &[
            "egui",
            "eframe",
            "crate::models",
            "crate::lora",
            "crate::train",
            "crate::worker",
            "crate::app",
        ],
    ),
    (
        "hub",
        &[
            "egui",
            "eframe",
            "candle",
            "crate::models",
            "crate::lora",
            "crate::kernels",
            "crate::data",
            "crate::label",
            "crate::train",
            "crate::worker",
            "crate::app",
        ],
    ),
    (
        "discovery",
        &[
            "egui",
            "eframe",
            "crate::train",
            "crate::worker",
            "crate::messages",
            "crate::cli",
            "crate::app",
        ],
    ),
    (
        "tensor_file",
        &[
            "egui",
            "eframe",
            "crate::models",
            "crate::lora",
            "crate::chat",
            "crate::kernels",
            "crate::app",
        ],
    ),
    (
        "app",
        &[
            "candle",
            "crate::kernels",
            "crate::chat",
            "crate::models",
            "crate::train",
            "crate::lora",
            "crate::data",
            "crate::label",
            "crate::tensor_file",
            "crate::hub",
            "crate::discovery",
        ],
    ),
];

/// The `.rs` files of a module (`src/NAME.rs` and everything under `src/NAME/`).
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

/// The module path of a source file: `src/lora/layer.rs` is `lora::layer`, `src/lora/mod.rs` is `lora`.
fn module_path(file: &Path) -> Vec<String> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let relative = file.strip_prefix(&src).unwrap_or(file).with_extension("");
    let mut parts: Vec<String> = relative
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if parts.last().is_some_and(|p| p == "mod" || p == "lib") {
        parts.pop();
    }
    parts
}

/// A token of Rust source that matters for paths, with its line.
#[derive(Debug, Clone, PartialEq)]
enum Token {
    Ident(String),
    PathSep,
    Punct(char),
}

/// The identifiers, `::` and punctuation of `code`, with comments and string and char literals left out.
fn tokens(code: &str) -> Vec<(Token, usize)> {
    let chars: Vec<char> = code.chars().collect();
    let mut out = Vec::new();
    let (mut i, mut line) = (0, 1);
    let skip_to = |i: &mut usize, line: &mut usize, end: usize| {
        *line += chars[*i..end.min(chars.len())]
            .iter()
            .filter(|&&c| c == '\n')
            .count();
        *i = end;
    };
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        if c == '/' && next == Some('/') {
            let end = (i..chars.len())
                .find(|&j| chars[j] == '\n')
                .unwrap_or(chars.len());
            skip_to(&mut i, &mut line, end);
        } else if c == '/' && next == Some('*') {
            let (mut depth, mut j) = (1, i + 2);
            while j < chars.len() && depth > 0 {
                if chars[j] == '/' && chars.get(j + 1) == Some(&'*') {
                    depth += 1;
                    j += 2;
                } else if chars[j] == '*' && chars.get(j + 1) == Some(&'/') {
                    depth -= 1;
                    j += 2;
                } else {
                    j += 1;
                }
            }
            skip_to(&mut i, &mut line, j);
        } else if c == '"' {
            let mut j = i + 1;
            while j < chars.len() && chars[j] != '"' {
                j += if chars[j] == '\\' { 2 } else { 1 };
            }
            skip_to(&mut i, &mut line, j + 1);
        } else if (c == 'r' || (c == 'b' && next == Some('r')))
            && raw_string_hashes(&chars, i).is_some()
        {
            let start = if c == 'b' { i + 2 } else { i + 1 };
            let hashes = raw_string_hashes(&chars, i).unwrap_or(0);
            let closing: Vec<char> = std::iter::once('"')
                .chain(std::iter::repeat_n('#', hashes))
                .collect();
            let mut j = start + hashes + 1;
            while j < chars.len() && !chars[j..].starts_with(&closing) {
                j += 1;
            }
            skip_to(&mut i, &mut line, j + closing.len());
        } else if c == '\'' {
            // A char literal ('x', '\n', '\u{..}') or a lifetime ('a).
            if next == Some('\\') {
                let end = (i + 2..chars.len())
                    .find(|&j| chars[j] == '\'')
                    .unwrap_or(chars.len());
                skip_to(&mut i, &mut line, end + 1);
            } else if chars.get(i + 2) == Some(&'\'') {
                i += 3;
            } else {
                i += 1;
                while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                    i += 1;
                }
            }
        } else if c.is_alphabetic() || c == '_' {
            let start = i;
            while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
            out.push((Token::Ident(chars[start..i].iter().collect()), line));
        } else if c == ':' && next == Some(':') {
            out.push((Token::PathSep, line));
            i += 2;
        } else {
            if c == '\n' {
                line += 1;
            } else if !c.is_whitespace() {
                out.push((Token::Punct(c), line));
            }
            i += 1;
        }
    }
    out
}

/// The number of `#`s of a raw string literal starting at `i` (`r"`, `r#"`, `br"`), if one starts there.
fn raw_string_hashes(chars: &[char], i: usize) -> Option<usize> {
    let start = if chars[i] == 'b' { i + 2 } else { i + 1 };
    if i > 0 && (chars[i - 1].is_alphanumeric() || chars[i - 1] == '_') {
        return None;
    }
    let hashes = chars[start..].iter().take_while(|&&c| c == '#').count();
    (chars.get(start + hashes) == Some(&'"')).then_some(hashes)
}

/// Every path a source names, with its line: each leaf of each `use` tree, and each `a::b` path in code.
fn named_paths(code: &str) -> Vec<(Vec<String>, usize)> {
    let tokens = tokens(code);
    let mut paths = Vec::new();
    let mut i = 0;
    while i < tokens.len() {
        match &tokens[i].0 {
            Token::Ident(word) if word == "use" => {
                let line = tokens[i].1;
                i += 1;
                for path in use_tree(&tokens, &mut i, Vec::new()) {
                    paths.push((path, line));
                }
                while i < tokens.len() && tokens[i].0 != Token::Punct(';') {
                    i += 1;
                }
            }
            Token::Ident(first) if tokens.get(i + 1).map(|t| &t.0) == Some(&Token::PathSep) => {
                let line = tokens[i].1;
                let mut path = vec![first.clone()];
                i += 1;
                while tokens.get(i).map(|t| &t.0) == Some(&Token::PathSep) {
                    match tokens.get(i + 1).map(|t| &t.0) {
                        Some(Token::Ident(segment)) => {
                            path.push(segment.clone());
                            i += 2;
                        }
                        _ => break,
                    }
                }
                paths.push((path, line));
            }
            _ => i += 1,
        }
    }
    paths
}

/// The leaves of the `use` tree starting at `tokens[*i]`, each prefixed with `prefix`.
fn use_tree(tokens: &[(Token, usize)], i: &mut usize, prefix: Vec<String>) -> Vec<Vec<String>> {
    let mut path = prefix;
    if tokens.get(*i).map(|t| &t.0) == Some(&Token::PathSep) {
        *i += 1;
    }
    loop {
        match tokens.get(*i).map(|t| &t.0) {
            Some(Token::Ident(word)) if word != "as" => {
                path.push(word.clone());
                *i += 1;
            }
            Some(Token::Punct('{')) => {
                *i += 1;
                let mut leaves = Vec::new();
                while let Some(token) = tokens.get(*i).map(|t| &t.0) {
                    match token {
                        Token::Punct('}') => {
                            *i += 1;
                            break;
                        }
                        Token::Punct(',') => *i += 1,
                        _ => leaves.extend(use_tree(tokens, i, path.clone())),
                    }
                }
                return leaves;
            }
            Some(Token::Punct('*')) => {
                *i += 1;
                break;
            }
            _ => break,
        }
        if tokens.get(*i).map(|t| &t.0) == Some(&Token::PathSep) {
            *i += 1;
        } else {
            break;
        }
    }
    if tokens.get(*i).map(|t| &t.0) == Some(&Token::Ident("as".to_string())) {
        *i += 2;
    }
    vec![path]
}

/// `path` as seen from module `module`: `crate::…`, `super::…` and `self::…` become absolute
/// (`crate::a::b`); anything else (an external crate, a local item) is returned as it is.
fn resolve(path: &[String], module: &[String]) -> Vec<String> {
    let mut base: Vec<String> = match path.first().map(String::as_str) {
        Some("crate") => return path.to_vec(),
        Some("self" | "super") => module.to_vec(),
        _ => return path.to_vec(),
    };
    let mut rest = path;
    while let Some((first, tail)) = rest.split_first() {
        match first.as_str() {
            "super" => {
                base.pop();
            }
            "self" => {}
            _ => break,
        }
        rest = tail;
    }
    std::iter::once("crate".to_string())
        .chain(base)
        .chain(rest.iter().cloned())
        .collect()
}

/// Whether an absolute path names `forbidden`: a crate (`egui`; `candle` is every `candle_*` crate) or a
/// crate module (`crate::train`) or anything inside it.
fn is_forbidden(path: &[String], forbidden: &str) -> bool {
    let Some(first) = path.first() else {
        return false;
    };
    match forbidden.split_once("::") {
        Some((_, module)) => first == "crate" && path.get(1).is_some_and(|m| m == module),
        None if forbidden == "candle" => first.starts_with("candle_"),
        None => first == forbidden,
    }
}

/// Every use of a forbidden name in `code` (the source of module `module`), as `line: rule`.
fn violations(code: &str, module: &[String], forbidden: &[&str]) -> Vec<String> {
    let mut found = Vec::new();
    for (path, line) in named_paths(code) {
        let absolute = resolve(&path, module);
        for rule in forbidden {
            if is_forbidden(&absolute, rule) {
                found.push(format!("{line}: uses {rule} ({})", path.join("::")));
            }
        }
    }
    found
}

#[test]
fn modules_use_only_what_their_row_allows() {
    let mut broken = Vec::new();
    for (module, forbidden) in RULES {
        let files = sources(module);
        assert!(!files.is_empty(), "module {module} has no sources");
        for file in files {
            let text = std::fs::read_to_string(&file).unwrap();
            for violation in violations(&text, &module_path(&file), forbidden) {
                broken.push(format!("{}:{violation}", file.display()));
            }
        }
    }
    assert!(
        broken.is_empty(),
        "module rules broken:\n{}",
        broken.join("\n")
    );
}

#[test]
fn every_module_of_the_library_has_a_row() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let lib = std::fs::read_to_string(src.join("lib.rs")).unwrap();
    let ruled: Vec<&str> = RULES.iter().map(|(m, _)| *m).collect();
    // Leaf utilities that use nothing else of the crate need no row.
    let leaves = [
        "atomic_file",
        "build_info",
        "flops",
        "hashing",
        "test_support",
    ];
    for line in lib.lines() {
        let line = line.trim();
        let Some(name) = line
            .strip_prefix("pub mod ")
            .or_else(|| line.strip_prefix("mod "))
            .and_then(|rest| rest.strip_suffix(';'))
        else {
            continue;
        };
        if leaves.contains(&name) {
            let code = std::fs::read_to_string(src.join(format!("{name}.rs"))).unwrap();
            let uses_crate = named_paths(&code)
                .iter()
                .any(|(p, _)| p.first().is_some_and(|f| f == "crate"));
            assert!(!uses_crate, "{name} is listed as a leaf but uses the crate");
        } else {
            assert!(ruled.contains(&name), "module {name} has no row in RULES");
        }
    }
}

fn strings(parts: &[&str]) -> Vec<String> {
    parts.iter().map(|s| s.to_string()).collect()
}

#[test]
fn grouped_nested_and_relative_imports_are_seen() {
    let lora_layer = strings(&["lora", "layer"]);
    let rules = ["crate::train", "crate::models", "egui", "candle"];
    let cases = [
        ("use crate::{config, train};", "crate::train"),
        (
            "use crate::{config::{self, TrainConfig}, models::unet::UNet};",
            "crate::models",
        ),
        ("use super::super::train::run;", "crate::train"),
        (
            "pub(crate) use super::{super::models as m, adapter};",
            "crate::models",
        ),
        ("fn f() { crate::train::train(); }", "crate::train"),
        ("fn f(ui: &mut egui::Ui) {}", "egui"),
        ("use candle_nn::VarBuilder;", "candle"),
        ("use ::egui::Ui;", "egui"),
    ];
    for (code, expected) in cases {
        let found = violations(code, &lora_layer, &rules);
        assert_eq!(found.len(), 1, "{code}: {found:?}");
        assert!(found[0].contains(expected), "{code}: {found:?}");
    }
}

#[test]
fn comments_strings_and_allowed_paths_are_not_violations() {
    let lora_layer = strings(&["lora", "layer"]);
    let rules = ["crate::train", "egui"];
    let code = r##"
        // use crate::train;
        /* crate::train::x() /* nested egui::Ui */ */
        /// Docs may mention [`crate::train`].
        const A: &str = "crate::train::run";
        const B: &str = r#"egui::Ui "quoted""#;
        const C: char = '"';
        fn f<'a>(x: &'a str) -> &'a str { x }
        use super::adapter::{LoraAdapter, self};
        use crate::kernels::{frozen_linear, tie};
        use trainer::Thing;
    "##;
    assert_eq!(violations(code, &lora_layer, &rules), Vec::<String>::new());
}

#[test]
fn lines_are_reported_where_the_use_is() {
    let code = "\n\n/* a\nb */\nuse crate::{\n    train,\n};\n";
    let found = violations(code, &strings(&["data"]), &["crate::train"]);
    assert_eq!(
        found,
        vec!["5: uses crate::train (crate::train)".to_string()]
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
