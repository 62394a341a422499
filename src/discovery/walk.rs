//! Bounded folder listing for the scans: a shared budget of time and directory entries, hidden and
//! well-known bulky folders (version control, Python environments, node modules) left out, and each folder
//! listed once even when symlinks lead back to it, so a loop ends.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Directory entries a whole scan may read.
const MAX_ENTRIES: usize = 300_000;

/// Folders never descended into: they hold code, environments or caches, never a user's models.
const SKIPPED: [&str; 7] = [
    "node_modules",
    "site-packages",
    "__pycache__",
    "venv",
    "snap",
    "Library",
    "AppData",
];

/// What a scan may still spend.
pub struct Budget {
    deadline: Instant,
    entries_left: usize,
    exhausted: bool,
    listed: HashSet<PathBuf>,
}

impl Budget {
    pub fn new(deadline: Instant) -> Self {
        Self {
            deadline,
            entries_left: MAX_ENTRIES,
            exhausted: false,
            listed: HashSet::new(),
        }
    }

    /// Whether the time or the entries ran out at some point.
    pub fn exhausted(&self) -> bool {
        self.exhausted
    }

    /// Whether anything may still be read.
    fn has_left(&mut self) -> bool {
        if self.entries_left == 0 || Instant::now() >= self.deadline {
            self.exhausted = true;
        }
        !self.exhausted
    }

    /// The subfolders and files of `dir` (sorted, hidden and skipped names left out), or nothing when the
    /// budget is spent, `dir` cannot be read, or it was listed before under any path.
    pub fn list(&mut self, dir: &Path) -> Listing {
        let mut listing = Listing::default();
        if !self.has_left() {
            return listing;
        }
        let Ok(canonical) = dir.canonicalize() else {
            return listing;
        };
        if !self.listed.insert(canonical) {
            return listing;
        }
        let Ok(entries) = std::fs::read_dir(dir) else {
            return listing;
        };
        for entry in entries.flatten() {
            if self.entries_left == 0 {
                self.exhausted = true;
                break;
            }
            self.entries_left -= 1;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with('.') || SKIPPED.contains(&name.as_ref()) {
                continue;
            }
            let path = entry.path();
            // Follows symlinks: a models folder is often a link to a bigger disk.
            match std::fs::metadata(&path) {
                Ok(meta) if meta.is_dir() => listing.folders.push(path),
                Ok(meta) if meta.is_file() => listing.files.push(path),
                _ => {}
            }
        }
        listing.folders.sort();
        listing.files.sort();
        listing
    }
}

/// One folder's contents.
#[derive(Debug, Default)]
pub struct Listing {
    pub folders: Vec<PathBuf>,
    pub files: Vec<PathBuf>,
}
