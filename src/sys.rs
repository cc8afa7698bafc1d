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

/// Change notifications for a few directories (Linux inotify): the log
/// follower waits on this instead of polling the data dir every few
/// milliseconds. A directory that does not exist yet (or was replaced) is
/// watched from the next [`DirWatch::rewatch`] on.
#[derive(Debug)]
pub struct DirWatch {
    fd: std::os::fd::OwnedFd,
    dirs: Vec<std::path::PathBuf>,
}

/// What changes wake a watcher: files created, written, renamed in or out,
/// deleted; the directory itself replaced.
const WATCH_MASK: u32 = libc::IN_CREATE
    | libc::IN_MODIFY
    | libc::IN_CLOSE_WRITE
    | libc::IN_MOVED_TO
    | libc::IN_MOVED_FROM
    | libc::IN_DELETE
    | libc::IN_DELETE_SELF
    | libc::IN_MOVE_SELF;

impl DirWatch {
    /// A non-blocking inotify descriptor watching `dirs` (those that exist).
    pub fn new(dirs: &[&Path]) -> std::io::Result<Self> {
        use std::os::fd::FromRawFd;
        // SAFETY: inotify_init1 takes flags only and returns a new descriptor
        // (or -1), which the OwnedFd then owns.
        let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` is a descriptor we just opened and nobody else owns.
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
        let watch = Self {
            fd,
            dirs: dirs.iter().map(|d| d.to_path_buf()).collect(),
        };
        watch.rewatch();
        Ok(watch)
    }

    /// (Re)adds a watch on every directory that exists now; watching a
    /// directory already watched changes nothing. Returns how many are watched.
    pub fn rewatch(&self) -> usize {
        use std::os::fd::AsRawFd;
        use std::os::unix::ffi::OsStrExt;
        let mut watched = 0;
        for dir in &self.dirs {
            let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
                continue;
            };
            // SAFETY: a valid inotify descriptor and a NUL-terminated path.
            let wd =
                unsafe { libc::inotify_add_watch(self.fd.as_raw_fd(), c.as_ptr(), WATCH_MASK) };
            if wd >= 0 {
                watched += 1;
            }
        }
        watched
    }

    /// Reads every pending event without blocking.
    pub fn drain(&self) -> std::io::Result<Drained> {
        use std::os::fd::AsRawFd;
        let mut buf = [0u8; 4096];
        let mut out = Drained::default();
        loop {
            // SAFETY: reads at most `buf.len()` bytes into `buf`.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n > 0 {
                out.add(&buf[..n as usize]);
                continue;
            }
            if n == 0 {
                return Ok(out);
            }
            let e = std::io::Error::last_os_error();
            return match e.kind() {
                std::io::ErrorKind::WouldBlock => Ok(out),
                std::io::ErrorKind::Interrupted => continue,
                _ => Err(e),
            };
        }
    }

    /// How many of the directories given to [`DirWatch::new`] there are.
    pub fn dirs(&self) -> usize {
        self.dirs.len()
    }
}

/// What [`DirWatch::drain`] read.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Drained {
    /// Events read (0: nothing changed since the last drain).
    pub events: usize,
    /// A directory was created in a watched one, or a watched one went
    /// away: time to [`DirWatch::rewatch`].
    pub dirs_changed: bool,
}

impl Drained {
    /// Counts the `struct inotify_event`s in `bytes` (16-byte header: wd,
    /// mask, cookie, name length; then the name).
    fn add(&mut self, bytes: &[u8]) {
        const HEADER: usize = 16;
        let mut at = 0;
        while let Some(header) = bytes.get(at..at + HEADER) {
            let word = |i: usize| {
                u32::from_ne_bytes([header[i], header[i + 1], header[i + 2], header[i + 3]])
            };
            let (mask, name_len) = (word(4), word(12) as usize);
            self.events += 1;
            let new_dir = mask & libc::IN_CREATE != 0 && mask & libc::IN_ISDIR != 0;
            let gone = mask & (libc::IN_DELETE_SELF | libc::IN_MOVE_SELF | libc::IN_IGNORED) != 0;
            self.dirs_changed |= new_dir || gone;
            at += HEADER + name_len;
        }
    }
}

impl std::os::fd::AsRawFd for DirWatch {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.fd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dir_watch_sees_changes_and_late_dirs() {
        let tmp = tempfile::tempdir().unwrap();
        let late = tmp.path().join("log");
        let watch = DirWatch::new(&[tmp.path(), &late]).unwrap();
        assert_eq!(watch.rewatch(), 1, "the late dir is not there yet");
        assert_eq!(
            watch.drain().unwrap(),
            Drained::default(),
            "nothing happened yet"
        );
        std::fs::write(tmp.path().join("MANIFEST.tmp"), b"x").unwrap();
        std::fs::rename(tmp.path().join("MANIFEST.tmp"), tmp.path().join("MANIFEST")).unwrap();
        let seen = watch.drain().unwrap();
        assert!(seen.events >= 3 && !seen.dirs_changed, "{seen:?}");
        assert_eq!(watch.drain().unwrap().events, 0, "drained");
        // A directory created after the watch began: seen once rewatched.
        std::fs::create_dir(&late).unwrap();
        let seen = watch.drain().unwrap();
        assert!(seen.events == 1 && seen.dirs_changed, "{seen:?}");
        assert_eq!(watch.rewatch(), 2);
        let mut f = std::fs::File::create(late.join("1.log")).unwrap();
        assert!(!watch.drain().unwrap().dirs_changed, "a file is not a dir");
        std::io::Write::write_all(&mut f, b"frame").unwrap();
        assert_eq!(watch.drain().unwrap().events, 1, "an append is an event");
        // A watched dir replaced: noticed, and watched again by rewatch.
        std::fs::rename(&late, tmp.path().join("old-log")).unwrap();
        std::fs::create_dir(&late).unwrap();
        assert!(watch.drain().unwrap().dirs_changed);
        assert_eq!(watch.rewatch(), 2);
        std::fs::write(late.join("2.log"), b"x").unwrap();
        assert!(watch.drain().unwrap().events > 0, "the new dir is watched");
    }
    #[test]
    fn the_current_dir_has_space() {
        let d = super::disk_space(std::path::Path::new(".")).unwrap();
        assert!(d.total > 0 && d.available <= d.total);
        assert!(super::disk_space(std::path::Path::new("/no/such/dir")).is_none());
    }
}
