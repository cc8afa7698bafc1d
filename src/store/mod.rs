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
//! The byte-by-byte format is in `docs/storage.md`. A walk-through:
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

/// fsyncs a directory, so that a rename or a new file in it is durable.
pub(crate) fn sync_dir(dir: &std::path::Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}
