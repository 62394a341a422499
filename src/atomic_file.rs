//! Writing files so that a crash never leaves a half-written file under the final name: the content goes
//! to a temporary file in the same folder, is flushed to disk, then renamed over the target.

use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Writes `path` atomically with `write`, which receives a buffered writer.
pub fn write_atomically(
    path: &Path,
    write: impl FnOnce(&mut BufWriter<File>) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let temp = temp_path(path);
    let result = (|| {
        let mut writer = BufWriter::new(File::create(&temp)?);
        write(&mut writer)?;
        let file = writer.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        std::fs::rename(&temp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    result
}

/// `dir/.name.tmp-PID-N` beside the target, so the rename stays on one file system.
fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(temp_name(&name))
}

/// What follows a temporary name's dot, before the writing process's id.
const TEMP_MARK: &str = "tmp-";

/// Temporary names handed out by this process so far; the count makes each name unique, so two threads
/// writing the same file never write into one temporary file.
static TEMP_NAMES: AtomicU64 = AtomicU64::new(0);

/// A hidden name for work in progress on `name` inside its folder, unique in this process:
/// `.name.tmp-PID-N`.
pub fn temp_name(name: &str) -> String {
    let count = TEMP_NAMES.fetch_add(1, Ordering::Relaxed);
    format!(".{name}.{TEMP_MARK}{}-{count}", std::process::id())
}

/// The id of the process that made the temporary name `name` (`.NAME.tmp-PID-N`, or `.NAME.tmp-PID` as
/// older versions wrote), or `None` when `name` is not a temporary name.
fn temp_name_pid(name: &str) -> Option<u32> {
    let (_, suffix) = name
        .strip_prefix('.')?
        .rsplit_once(&format!(".{TEMP_MARK}"))?;
    let (pid, count) = suffix.split_once('-').unwrap_or((suffix, "0"));
    count.parse::<u64>().ok()?;
    pid.parse().ok()
}

/// Removes what a killed process left half-written in `dir`: hidden temporary files and folders (see
/// `temp_name`) whose process no longer runs. Returns the names removed. Where running processes cannot be
/// listed (no `/proc`), nothing is removed.
pub fn remove_abandoned(dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = temp_name_pid(&name) else {
            continue;
        };
        if process_may_run(pid) {
            continue;
        }
        let path = entry.path();
        let gone = if path.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        if gone.is_ok() {
            removed.push(name);
        }
    }
    removed.sort();
    removed
}

/// Whether process `pid` may still be running (and writing its temporary files).
fn process_may_run(pid: u32) -> bool {
    let proc = Path::new("/proc");
    pid == std::process::id() || !proc.join("self").exists() || proc.join(pid.to_string()).exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_write_leaves_the_old_file_and_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("captions.csv");
        std::fs::write(&target, "old").unwrap();
        let failed = write_atomically(&target, |w| {
            std::io::Write::write_all(w, b"half")?;
            Err(std::io::Error::other("disk full"))
        });
        assert!(failed.is_err());
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "old");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn leftovers_of_dead_processes_are_removed_and_the_rest_kept() {
        let dir = tempfile::tempdir().unwrap();
        let dead = u32::MAX - 1;
        std::fs::write(
            dir.path().join(format!(".tiny.safetensors.tmp-{dead}")),
            "x",
        )
        .unwrap();
        std::fs::create_dir(dir.path().join(format!(".checkpoint-5.tmp-{dead}"))).unwrap();
        std::fs::write(dir.path().join(format!(".metadata.csv.tmp-{dead}-17")), "x").unwrap();
        std::fs::write(dir.path().join(temp_name("state.json")), "x").unwrap();
        for kept in [
            "tiny.safetensors",
            ".hidden",
            ".notes.tmp-abc",
            ".notes.tmp-12-abc",
            "checkpoint-4",
        ] {
            std::fs::write(dir.path().join(kept), "x").unwrap();
        }
        let removed = remove_abandoned(dir.path());
        assert_eq!(
            removed,
            [
                format!(".checkpoint-5.tmp-{dead}"),
                format!(".metadata.csv.tmp-{dead}-17"),
                format!(".tiny.safetensors.tmp-{dead}"),
            ]
        );
        // This process's own temporary file may be in use, so it stays too.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 6);
    }

    #[test]
    fn threads_writing_one_file_at_once_each_write_a_whole_file() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("metadata.csv");
        let contents: Vec<Vec<u8>> = (0..8u8).map(|i| vec![b'a' + i; 256 * 1024]).collect();
        let failures: Vec<String> = std::thread::scope(|scope| {
            let writers: Vec<_> = contents
                .iter()
                .map(|content| {
                    let target = &target;
                    scope.spawn(move || {
                        (0..20)
                            .filter_map(|_| {
                                write_atomically(target, |w| std::io::Write::write_all(w, content))
                                    .err()
                                    .map(|e| e.to_string())
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            writers
                .into_iter()
                .flat_map(|w| w.join().unwrap())
                .collect()
        });
        assert!(
            failures.is_empty(),
            "{} writes failed, first {:?}",
            failures.len(),
            failures.first()
        );
        let written = std::fs::read(&target).unwrap();
        assert!(contents.contains(&written), "the file mixes several writes");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
