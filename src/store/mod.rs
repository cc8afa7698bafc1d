//! The link store: every short link, kept in a data directory as an
//! append-only link log plus immutable memory-mapped snapshots, and served
//! from an in-memory view that readers use without taking a lock.
//!
//! - [`record`]: the link record and its byte encoding.
//! - [`frame`] and [`log`]: the write-ahead link log (frames, segments,
//!   group commit, recovery, tailing).
//! - [`snapshot`] and [`hash`]: the memory-mapped snapshot format.
//! - [`view`]: `TableView` (snapshot + overlay) and `HotTable` (`ArcSwap`).
//! - [`follower`]: `LogFollower`, which tails the log and publishes views.
//! - [`datadir`]: the data directory, its writer lock, `Store` (the single
//!   writer) and compaction.
//! - [`backup`]: online backups, their verification, restores and retention.
//!
//! The byte-by-byte format is in `docs/storage.md`. `examples/hot_table.rs`
//! (`cargo run --example hot_table`) runs a writer, a follower and a reader
//! together. A walk-through:
//!
//! ```
//! use uload::store::{Store, LogOp, record::Link, DataDir};
//! let dir = tempfile::tempdir().unwrap();
//! let store = Store::open(dir.path(), Default::default()).unwrap();
//! let link = Link::new("hello", "https://example.com/").unwrap();
//! store.append(&[LogOp::Put(link)]).unwrap(); // returns once on disk
//! let view = DataDir::new(dir.path()).load_view(true).unwrap();
//! assert_eq!(view.get(b"hello").unwrap().target, b"https://example.com/");
//! ```

pub mod backup;
pub mod datadir;
pub mod follower;
pub mod frame;
pub mod hash;
pub mod log;
pub mod record;
pub mod snapshot;
pub mod view;

pub use datadir::{CompactReport, DataDir, Manifest, Store, StoreError};
pub use follower::{FollowerHandle, LogFollower};
pub use frame::LogOp;
pub use log::{LinkLog, LogError, LogOptions};
pub use record::{Link, LinkRef, RedirectStatus};
pub use snapshot::Snapshot;
pub use view::{HotTable, TableView};

/// Ends `body` (lines, each ending in `\n`) with the line `crc32c XXXXXXXX`:
/// the CRC32C of every byte before it, in 8 lower-case hex digits. The
/// manifest and a backup's `BACKUP` file are sealed this way.
pub(crate) fn seal_text(body: String) -> String {
    let crc = crc32c::crc32c(body.as_bytes());
    format!("{body}crc32c {crc:08x}\n")
}

/// The body of a text sealed by [`seal_text`], once its last `crc32c` line
/// is 8 hex digits and matches.
pub(crate) fn unseal_text(text: &str) -> Result<&str, String> {
    let Some(crc_at) = text.rfind("crc32c ") else {
        return Err("no crc32c line".into());
    };
    let (body, crc_line) = text.split_at(crc_at);
    let stored = crc_line
        .trim_end()
        .strip_prefix("crc32c ")
        .filter(|h| h.len() == 8)
        .and_then(|h| u32::from_str_radix(h, 16).ok())
        .ok_or("the crc32c line is not 8 hex digits")?;
    let computed = crc32c::crc32c(body.as_bytes());
    if stored != computed {
        return Err(format!(
            "checksum mismatch: stored {stored:08x}, computed {computed:08x}"
        ));
    }
    Ok(body)
}

/// fsyncs a directory, so that a rename or a new file in it is durable.
pub(crate) fn sync_dir(dir: &std::path::Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Creates `dir` and any missing parents so that they survive a power cut:
/// each directory this call creates is fsynced into its parent (what
/// `create_dir_all` leaves to the file system's next commit). An existing
/// `dir` is left as it is, and its parent is not opened.
pub(crate) fn create_dir_durable(dir: &std::path::Path) -> std::io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => std::path::Path::new("."),
    };
    create_dir_durable(parent)?;
    match std::fs::create_dir(dir) {
        Ok(()) => sync_dir(parent),
        // Another process made it meanwhile: theirs to make durable.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && dir.is_dir() => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::create_dir_durable;

    /// What `create_dir_durable` creates is there, nested; an
    /// existing directory is fine; a file in the way is an error. (The
    /// fsyncs themselves show only after a power cut.)
    #[test]
    fn create_dir_durable_creates_what_is_missing() {
        let tmp = tempfile::tempdir().unwrap();
        let nested = tmp.path().join("a/b/c");
        create_dir_durable(&nested).unwrap();
        assert!(nested.is_dir());
        create_dir_durable(&nested).unwrap();
        let file = tmp.path().join("f");
        std::fs::write(&file, b"x").unwrap();
        assert!(create_dir_durable(&file.join("d")).is_err());
        assert!(create_dir_durable(&file).is_err());
    }
}
