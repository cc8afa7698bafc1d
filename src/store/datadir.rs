//! A data directory: where the link log, the snapshots and the manifest live,
//! who may write to it, and the operations that span them (open, load,
//! compact).
//!
//! ```text
//! data/
//!   LOCK                    writer lock (flock), holds the writer's pid
//!   MANIFEST                names the current snapshot (absent: none yet)
//!   snapshots/<seq>.snap    immutable snapshots
//!   log/<first_seq>.log     link log segments
//! ```
//!
//! [`Store`] is the one writer (the admin, or a CLI command): it holds the
//! lock, appends through [`LinkLog`] and compacts. Readers (the edge) call
//! [`DataDir::load_view`] and follow the log; they take no lock.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::frame::{LogOp, LogOpRef, seq_at_most_max};
use super::log::{self, LinkLog, LogError, LogOptions, Recovery};
use super::record::order_by_code;
use super::snapshot::{SNAPSHOT_VERSION, Snapshot, SnapshotError, SnapshotInfo, write_snapshot};
use super::view::{TableView, merge_links};
use super::{create_dir_durable, sync_dir};

/// First line of a manifest file.
pub const MANIFEST_MAGIC: &str = "uload-manifest v1";

/// Errors of data-dir level operations.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Log(#[from] LogError),
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error("{path}: invalid manifest: {reason}")]
    Manifest { path: PathBuf, reason: String },
    #[error(
        "{path}: the data dir is locked by another writer{holder}; only one writer (admin, import, compact) may run at a time"
    )]
    Locked { path: PathBuf, holder: String },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

impl StoreError {
    /// The operating system's error behind this one, if any (see
    /// [`LogError::io_error`]).
    pub fn io_error(&self) -> Option<&io::Error> {
        match self {
            Self::Log(e) => e.io_error(),
            Self::Snapshot(SnapshotError::Io { source, .. }) | Self::Io { source, .. } => {
                Some(source)
            }
            _ => None,
        }
    }
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_owned(),
        source,
    }
}

/// What the manifest says: the current snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    /// File name of the snapshot, inside `snapshots/`.
    pub snapshot: String,
    /// Sequence the snapshot holds (must match its header).
    pub seq: u64,
    /// Links in the snapshot (must match its header).
    pub links: u64,
}

impl Manifest {
    /// The manifest's text: `key value` lines, the last one a CRC32C of the others.
    pub fn encode(&self) -> String {
        let body = format!(
            "{MANIFEST_MAGIC}\nsnapshot {}\nseq {}\nlinks {}\n",
            self.snapshot, self.seq, self.links
        );
        super::seal_text(body)
    }

    /// Parses a manifest's text.
    pub fn decode(text: &str) -> Result<Self, String> {
        let body = super::unseal_text(text)?;
        let mut lines = body.lines();
        if lines.next() != Some(MANIFEST_MAGIC) {
            return Err(format!("first line is not {MANIFEST_MAGIC:?}"));
        }
        let mut field = |key: &str| -> Result<String, String> {
            let line = lines.next().ok_or(format!("missing {key}"))?;
            line.strip_prefix(key)
                .and_then(|v| v.strip_prefix(' '))
                .map(str::to_owned)
                .ok_or(format!("expected {key:?}, found {line:?}"))
        };
        let snapshot = field("snapshot")?;
        if snapshot.contains('/') || !snapshot.ends_with(".snap") {
            return Err(format!(
                "snapshot name {snapshot:?} is not a .snap file name"
            ));
        }
        let number = |v: String, key: &str| {
            v.parse::<u64>()
                .map_err(|_| format!("{key} {v:?} is not a number"))
        };
        let seq = seq_at_most_max(number(field("seq")?, "seq")?, "seq")?;
        let links = number(field("links")?, "links")?;
        Ok(Self {
            snapshot,
            seq,
            links,
        })
    }
}

/// Paths of a data directory. Cloning copies a path.
#[derive(Debug, Clone)]
pub struct DataDir {
    root: PathBuf,
}

impl DataDir {
    /// A data dir rooted at `root` (nothing is touched until used).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn log_dir(&self) -> PathBuf {
        self.root.join("log")
    }

    pub fn snapshot_dir(&self) -> PathBuf {
        self.root.join("snapshots")
    }

    pub fn manifest_path(&self) -> PathBuf {
        self.root.join("MANIFEST")
    }

    pub fn lock_path(&self) -> PathBuf {
        self.root.join("LOCK")
    }

    /// Reads the manifest; `None` when there is none yet (no snapshot).
    pub fn read_manifest(&self) -> Result<Option<Manifest>, StoreError> {
        let path = self.manifest_path();
        let text = match fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(&path)(e)),
        };
        let text = String::from_utf8(text).map_err(|_| StoreError::Manifest {
            path: path.clone(),
            reason: "not UTF-8".into(),
        })?;
        Manifest::decode(&text)
            .map(Some)
            .map_err(|reason| StoreError::Manifest { path, reason })
    }

    /// Opens the snapshot the manifest names, checking that they agree.
    pub fn open_snapshot(
        &self,
        verify_checksums: bool,
    ) -> Result<Option<Arc<Snapshot>>, StoreError> {
        let Some(manifest) = self.read_manifest()? else {
            return Ok(None);
        };
        self.open_manifest_snapshot(&manifest, verify_checksums)
            .map(Some)
    }

    /// Opens the snapshot `manifest` names, checking that they agree.
    pub fn open_manifest_snapshot(
        &self,
        manifest: &Manifest,
        verify_checksums: bool,
    ) -> Result<Arc<Snapshot>, StoreError> {
        let path = self.snapshot_dir().join(&manifest.snapshot);
        let snap = Snapshot::open(&path, verify_checksums)?;
        if snap.seq() != manifest.seq || snap.len() != manifest.links {
            return Err(StoreError::Manifest {
                path: self.manifest_path(),
                reason: format!(
                    "names {} at sequence {} with {} links, but the file holds sequence {} with {} links",
                    manifest.snapshot,
                    manifest.seq,
                    manifest.links,
                    snap.seq(),
                    snap.len()
                ),
            });
        }
        Ok(Arc::new(snap))
    }

    /// Loads the whole table as a reader: the current snapshot plus every log
    /// record after it. Takes no lock and writes nothing. A compaction that
    /// replaces the snapshot and trims the log while we read is detected (the
    /// manifest changed) and the load is retried.
    pub fn load_view(&self, verify_checksums: bool) -> Result<TableView, StoreError> {
        // The segments as listed now: a compaction may delete one (the last
        // too, after it rolled the log) between the listing and the read.
        let segments = || -> Vec<u64> {
            log::list_segments(&self.log_dir())
                .map(|list| list.iter().map(|s| s.first_seq).collect())
                .unwrap_or_default()
        };
        let mut attempts = 0;
        loop {
            let before = (self.read_manifest()?, segments());
            match self.load_view_once(verify_checksums) {
                Ok(view) => return Ok(view),
                Err(e) => {
                    attempts += 1;
                    if attempts >= 5 || (self.read_manifest()?, segments()) == before {
                        return Err(e);
                    }
                }
            }
        }
    }

    fn load_view_once(&self, verify_checksums: bool) -> Result<TableView, StoreError> {
        let snapshot = self.open_snapshot(verify_checksums)?;
        let mut view = TableView::new(snapshot);
        let mut bad = None;
        log::replay(&self.log_dir(), view.seq(), |seq, op| {
            if bad.is_none()
                && let Err(e) = view.apply(seq, op)
            {
                bad = Some(e);
            }
        })?;
        if let Some(e) = bad {
            return Err(LogError::Invalid(e).into());
        }
        Ok(view)
    }

    fn write_manifest(&self, manifest: &Manifest) -> Result<(), StoreError> {
        let path = self.manifest_path();
        let tmp = self.root.join("MANIFEST.tmp");
        let written = (|| {
            let mut f = File::create(&tmp)?;
            f.write_all(manifest.encode().as_bytes())?;
            f.sync_all()?;
            fs::rename(&tmp, &path)
        })();
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(io_err(&tmp)(e));
        }
        sync_dir(&self.root).map_err(io_err(&self.root))
    }
}

/// Name of the snapshot file holding the log up to `seq`.
pub fn snapshot_file_name(seq: u64) -> String {
    format!("{seq:020}.snap")
}

/// The writer lock: an exclusive `flock` on `LOCK`, released when dropped
/// (or when the process dies, so a SIGKILLed writer never leaves it stale).
#[derive(Debug)]
pub struct WriterLock {
    _file: File,
    path: PathBuf,
}

/// Lock files this process holds through a live [`WriterLock`].
static HELD: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());

fn held() -> std::sync::MutexGuard<'static, Vec<PathBuf>> {
    HELD.lock().unwrap_or_else(|p| p.into_inner())
}

impl Drop for WriterLock {
    fn drop(&mut self) {
        held().retain(|p| *p != self.path);
    }
}

impl WriterLock {
    /// Takes the lock or fails at once, naming the holder's pid.
    pub fn acquire(dir: &DataDir) -> Result<Self, StoreError> {
        let path = dir.lock_path();
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io_err(&path))?;
        // A lock that this process took but no live writer here holds is
        // on its way out: the writer was dropped while a child process was
        // being spawned, and the child holds a copy of every fd (this one
        // too, and `flock` belongs to the open file) until its exec closes
        // them. That takes microseconds; it is waited for, two seconds at
        // most. A live writer in this process is refused at once.
        let patience = std::time::Instant::now() + std::time::Duration::from_secs(2);
        loop {
            match file.try_lock() {
                Ok(()) => break,
                Err(fs::TryLockError::WouldBlock) => {
                    let mut pid = String::new();
                    let _ = file.seek(std::io::SeekFrom::Start(0));
                    let _ = file.read_to_string(&mut pid);
                    let ours =
                        pid.trim() == std::process::id().to_string() && !held().contains(&path);
                    if ours && std::time::Instant::now() < patience {
                        std::thread::sleep(std::time::Duration::from_millis(1));
                        continue;
                    }
                    let holder = match pid.trim() {
                        "" => String::new(),
                        p => format!(" (pid {p})"),
                    };
                    return Err(StoreError::Locked { path, holder });
                }
                Err(fs::TryLockError::Error(e)) => return Err(io_err(&path)(e)),
            }
        }
        // At offset 0 whatever the loop above read (`write_all` would write
        // after NUL bytes where a wait had read a pid).
        file.set_len(0).map_err(io_err(&path))?;
        std::os::unix::fs::FileExt::write_all_at(
            &file,
            std::process::id().to_string().as_bytes(),
            0,
        )
        .map_err(io_err(&path))?;
        held().push(path.clone());
        Ok(Self { _file: file, path })
    }
}

/// What a compaction did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompactReport {
    /// The snapshot written (`None` when there was nothing new to compact).
    pub snapshot: Option<SnapshotInfo>,
    /// Log records folded into it.
    pub records: u64,
    /// Old snapshots and log segments removed.
    pub removed: Vec<PathBuf>,
}

/// The single writer of a data dir: holds the lock, appends to the log,
/// compacts. Share it behind an `Arc`; `append` is safe from many threads.
pub struct Store {
    dir: DataDir,
    log: LinkLog,
    recovery: Recovery,
    compacting: Mutex<()>,
    _lock: WriterLock,
}

/// Sets SIGXFSZ to "ignore", once per process: a write past the process's
/// `RLIMIT_FSIZE` then fails with EFBIG, which the writer reports (and the
/// admin answers 507), instead of killing the process (SIGXFSZ's default
/// action). Every writer of a data dir wants that; [`Store::open`] calls it.
pub fn ignore_file_size_signal() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: installs SIG_IGN, which runs no code in the handler.
        unsafe {
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
        }
    });
}

impl Store {
    /// Opens (creating if needed) the data dir at `root` as its writer.
    /// Ignores SIGXFSZ in this process (see [`ignore_file_size_signal`]).
    pub fn open(root: &Path, opts: LogOptions) -> Result<Self, StoreError> {
        ignore_file_size_signal();
        let dir = DataDir::new(root);
        create_dir_durable(root).map_err(io_err(root))?;
        let lock = WriterLock::acquire(&dir)?;
        let snap_dir = dir.snapshot_dir();
        create_dir_durable(&snap_dir).map_err(io_err(&snap_dir))?;
        remove_tmp_snapshots(&snap_dir)?;
        let snapshot = dir.open_snapshot(true)?;
        let base_seq = snapshot.as_ref().map_or(0, |s| s.seq());
        let (log, recovery) = LinkLog::open(&dir.log_dir(), base_seq, opts)?;
        Ok(Self {
            dir,
            log,
            recovery,
            compacting: Mutex::new(()),
            _lock: lock,
        })
    }

    pub fn dir(&self) -> &DataDir {
        &self.dir
    }

    /// What recovery did on open (a truncated torn tail, the last sequence).
    pub fn recovery(&self) -> &Recovery {
        &self.recovery
    }

    /// The log, for appends.
    pub fn log(&self) -> &LinkLog {
        &self.log
    }

    /// Appends `ops`; returns once they are on disk. See [`LinkLog::append`].
    pub fn append(&self, ops: &[LogOp]) -> Result<u64, StoreError> {
        Ok(self.log.append(ops)?)
    }

    /// Merges the current snapshot and the log up to the last durable record
    /// into a new snapshot, points the manifest at it, then removes the old
    /// snapshot and the log segments it covers. Appends may continue meanwhile.
    /// When none came meanwhile, the log is first rolled to a new, empty
    /// segment ([`LinkLog::roll_after_compaction`]), so that the covered one
    /// is removed too and no reader reads it on start.
    pub fn compact(&self) -> Result<CompactReport, StoreError> {
        let _one_at_a_time = self
            .compacting
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let upto = self.log.durable_seq();
        let old = self.dir.read_manifest()?;
        let snapshot = match &old {
            Some(m) => Some(self.dir.open_manifest_snapshot(m, true)?),
            None => None,
        };
        let base_seq = snapshot.as_ref().map_or(0, |s| s.seq());
        let mut report = CompactReport {
            snapshot: None,
            records: 0,
            removed: Vec::new(),
        };
        // A snapshot of an earlier format (link encoding v1 records) is
        // rewritten in the current one even with nothing new to merge, so
        // that `uload compact` after an upgrade brings the smaller records.
        // It keeps its name (the same sequence): the rename replaces it.
        let old_format = snapshot
            .as_ref()
            .is_some_and(|s| s.header().version != SNAPSHOT_VERSION);
        if upto > base_seq || old_format {
            let log = log::read_log(&self.dir.log_dir(), base_seq)?;
            // The newest record per code, in code order, borrowed from the
            // segment buffers: no copy of any link is made.
            let records: Vec<(u64, LogOpRef<'_>)> =
                log.records().take_while(|(seq, _)| *seq <= upto).collect();
            // A snapshot is labelled `upto`: it must hold every record to it.
            let last = records.last().map_or(base_seq, |(seq, _)| *seq);
            if upto > base_seq && last < upto {
                return Err(LogError::Short {
                    path: self.dir.log_dir(),
                    last,
                    durable: upto,
                }
                .into());
            }
            report.records = records.len() as u64;
            // Records come in sequence order and the sort keeps ties in that
            // order, so the last of each run of equal codes is the newest.
            let order = order_by_code(&records, |(_, op)| op.code());
            let mut changes: Vec<LogOpRef<'_>> = Vec::with_capacity(order.len());
            for i in order {
                let op = records[i as usize].1;
                match changes.last_mut() {
                    Some(last) if last.code() == op.code() => *last = op,
                    _ => changes.push(op),
                }
            }
            let seq = upto.max(base_seq);
            let path = self.dir.snapshot_dir().join(snapshot_file_name(seq));
            let base = snapshot.as_ref().map(|s| s.iter());
            let merged = merge_links(
                base.into_iter().flatten(),
                changes.iter().map(|op| match op {
                    LogOpRef::Put(link) => (link.code, Some(*link)),
                    LogOpRef::Delete(code) => (*code, None),
                }),
            );
            let info = write_snapshot(&path, seq, merged)?;
            // A rewrite in the current format at the same sequence replaced
            // the file the manifest names, with the same links: the manifest
            // stays as it is (and a failure here must never remove that file).
            // Unless the manifest names another file (a snapshot restored or
            // renamed by hand): it then names the new one, before the old
            // one is deleted below with the other old files.
            let renamed = snapshot.as_ref().is_some_and(|s| s.path() != path);
            if seq != base_seq || renamed {
                let manifest = Manifest {
                    snapshot: snapshot_file_name(seq),
                    seq,
                    links: info.header.link_count,
                };
                if let Err(e) = self.dir.write_manifest(&manifest) {
                    // Out of space or read-only: give the new snapshot's space
                    // back, unless the manifest already names it (the rename
                    // happened and only the directory fsync failed).
                    // When the manifest cannot be read, the file stays: a
                    // snapshot too many costs space, one the manifest names
                    // and that is gone stops every reader.
                    let named = match self.dir.read_manifest() {
                        Ok(Some(m)) => m == manifest,
                        Ok(None) => false,
                        Err(_) => true,
                    };
                    if !named {
                        let _ = fs::remove_file(&path);
                    }
                    return Err(e);
                }
            }
            report.snapshot = Some(info);
        }
        let covered = upto.max(base_seq);
        // The active segment's records are all in the snapshot now: start a
        // new segment so that the trim below deletes the covered one (the
        // last segment is never deleted), and no reader reads it on start.
        // Only when there is a snapshot: it is what covers them.
        if report.snapshot.is_some() || snapshot.is_some() {
            match self.log.roll_after_compaction(covered) {
                Ok(_) => {}
                // The compaction happened; the covered segment stays until
                // the next one (the next batch starts a new segment first).
                Err(e) => {
                    tracing::warn!(error = %e, "compaction: could not start a new log segment; the covered one stays for now");
                }
            }
        }
        let current = report
            .snapshot
            .as_ref()
            .map(|i| i.path.clone())
            .or_else(|| snapshot.as_ref().map(|s| s.path().to_owned()));
        report.removed = match self.remove_old_files(current.as_deref(), covered) {
            Ok(removed) => removed,
            // The new snapshot and manifest are in place: the compaction
            // happened. Files it could not delete (a read-only snapshots/)
            // are deleted by the next one.
            Err(e) if report.snapshot.is_some() => {
                tracing::warn!(error = %e, "compaction: old files not removed yet; the next compaction removes them");
                Vec::new()
            }
            Err(e) => return Err(e),
        };
        Ok(report)
    }

    fn remove_old_files(
        &self,
        keep: Option<&Path>,
        covered: u64,
    ) -> Result<Vec<PathBuf>, StoreError> {
        let snap_dir = self.dir.snapshot_dir();
        let mut removed = Vec::new();
        for entry in fs::read_dir(&snap_dir).map_err(io_err(&snap_dir))? {
            let path = entry.map_err(io_err(&snap_dir))?.path();
            if path.extension().is_some_and(|e| e == "snap") && Some(path.as_path()) != keep {
                fs::remove_file(&path).map_err(io_err(&path))?;
                removed.push(path);
            }
        }
        removed.extend(log::remove_segments_upto(&self.dir.log_dir(), covered)?);
        Ok(removed)
    }
}

fn remove_tmp_snapshots(dir: &Path) -> Result<(), StoreError> {
    for entry in fs::read_dir(dir).map_err(io_err(dir))? {
        let path = entry.map_err(io_err(dir))?.path();
        if path.extension().is_some_and(|e| e == "tmp") {
            fs::remove_file(&path).map_err(io_err(&path))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::frame::MAX_SEQ;
    use super::*;

    #[test]
    fn manifest_round_trip_and_fields() {
        let m = Manifest {
            snapshot: snapshot_file_name(12),
            seq: 12,
            links: 9,
        };
        let text = m.encode();
        let mut lines = text.lines();
        assert_eq!(lines.next(), Some("uload-manifest v1"));
        assert_eq!(lines.next(), Some("snapshot 00000000000000000012.snap"));
        assert_eq!(lines.next(), Some("seq 12"));
        assert_eq!(lines.next(), Some("links 9"));
        let crc_line = lines.next().unwrap();
        let body = &text[..text.rfind("crc32c ").unwrap()];
        assert_eq!(
            crc_line,
            format!("crc32c {:08x}", crc32c::crc32c(body.as_bytes()))
        );
        assert_eq!(Manifest::decode(&text), Ok(m));
    }

    #[test]
    fn bad_manifests_are_refused() {
        let good = Manifest {
            snapshot: snapshot_file_name(3),
            seq: 3,
            links: 1,
        }
        .encode();
        let resign = |body: &str| format!("{body}crc32c {:08x}\n", crc32c::crc32c(body.as_bytes()));
        let cases = [
            (good.replace("seq 3", "seq 4"), "checksum"),
            (
                resign("uload-manifest v2\nsnapshot a.snap\nseq 1\nlinks 1\n"),
                "first line",
            ),
            (
                resign("uload-manifest v1\nsnapshot ../x.snap\nseq 1\nlinks 1\n"),
                "file name",
            ),
            (
                resign("uload-manifest v1\nsnapshot a.snap\nseq x\nlinks 1\n"),
                "not a number",
            ),
            (
                resign("uload-manifest v1\nsnapshot a.snap\nlinks 1\n"),
                "expected \"seq\"",
            ),
            ("uload-manifest v1\n".to_owned(), "no crc32c"),
            // The right value, but not in 8 digits (as storage.md says it is).
            (
                {
                    let body = "uload-manifest v1\nsnapshot a.snap\nseq 1\nlinks 1\n";
                    format!("{body}crc32c 0{:08x}\n", crc32c::crc32c(body.as_bytes()))
                },
                "8 hex digits",
            ),
            (
                resign(&format!(
                    "uload-manifest v1\nsnapshot a.snap\nseq {}\nlinks 1\n",
                    MAX_SEQ + 1
                )),
                "is above",
            ),
            (
                resign("uload-manifest v1\nsnapshot a.snap\nseq 18446744073709551615\nlinks 1\n"),
                "is above",
            ),
        ];
        for (text, want) in cases {
            let err = Manifest::decode(&text).unwrap_err();
            assert!(err.contains(want), "{want}: {err}");
        }
        let top = resign(&format!(
            "uload-manifest v1\nsnapshot a.snap\nseq {MAX_SEQ}\nlinks 1\n"
        ));
        assert_eq!(Manifest::decode(&top).map(|m| m.seq), Ok(MAX_SEQ));
    }
}
