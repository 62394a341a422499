//! Free space on the disk holding a folder, so a download that cannot fit is refused before it starts.

use std::path::Path;

/// Bytes an unprivileged process may still write on the file system holding `folder`; `None` where the
/// platform does not say.
#[cfg(unix)]
pub fn available_bytes(folder: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(folder.as_os_str().as_bytes()).ok()?;
    let mut stats = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `path` is a valid NUL-terminated string and `stats` points to writable memory of the size
    // `statvfs` fills; it is read only when the call succeeds.
    let stats = unsafe {
        if libc::statvfs(path.as_ptr(), stats.as_mut_ptr()) != 0 {
            return None;
        }
        stats.assume_init()
    };
    #[allow(clippy::unnecessary_cast)]
    Some(stats.f_bavail as u64 * stats.f_frsize as u64)
}

/// Bytes free on the disk holding `folder`: not known on this platform.
#[cfg(not(unix))]
pub fn available_bytes(_folder: &Path) -> Option<u64> {
    None
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_current_folder_has_a_known_amount_of_free_space() {
        let free = super::available_bytes(std::path::Path::new(".")).unwrap();
        assert!(free > 0);
        assert_eq!(
            super::available_bytes(std::path::Path::new("/no/such/folder")),
            None
        );
    }
}
