//! Facts about the machine that health checks and metrics report.

use std::path::Path;

/// Space on the file system holding a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskSpace {
    /// Bytes in the file system.
    pub total: u64,
    /// Bytes an unprivileged writer can still use.
    pub available: u64,
}

/// `statvfs(path)`; `None` when the path does not exist or cannot be examined.
pub fn disk_space(path: &Path) -> Option<DiskSpace> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
    // SAFETY: `c` is a NUL-terminated path and `st` points to writable memory
    // of the right type; statvfs writes only into it.
    let rc = unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return None;
    }
    // SAFETY: statvfs succeeded, so it initialised the struct.
    let st = unsafe { st.assume_init() };
    let frsize = st.f_frsize;
    Some(DiskSpace {
        total: st.f_blocks.saturating_mul(frsize),
        available: st.f_bavail.saturating_mul(frsize),
    })
}

/// When this process started (first call wins; call it early in `main`).
pub fn started() -> std::time::Instant {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    *START.get_or_init(std::time::Instant::now)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_current_dir_has_space() {
        let d = super::disk_space(std::path::Path::new(".")).unwrap();
        assert!(d.total > 0 && d.available <= d.total);
        assert!(super::disk_space(std::path::Path::new("/no/such/dir")).is_none());
    }
}
