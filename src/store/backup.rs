//! Online backups of a data dir, their verification, and restores.
//!
//! A backup is a directory laid out like a data dir (so `uload inspect` and
//! `uload export --data-dir` read it as one), plus a `BACKUP` file written
//! last:
//!
//! ```text
//! <backup>/
//!   BACKUP                    what the backup holds, with every file's length and CRC32C
//!   MANIFEST                  a copy of the data dir's manifest (absent without a snapshot)
//!   snapshots/<seq:020>.snap  the snapshot the manifest named (hard link or copy)
//!   log/<first_seq:020>.log   the log segments after it, cut after their last whole frame
//! ```
//!
//! [`backup`] needs no lock: the admin keeps writing meanwhile. Snapshots are
//! immutable, so the current one is hard-linked (copied across file
//! systems); log segments only grow, so each is copied up to the end of its
//! last complete, valid frame at the moment it is read. The backup therefore
//! holds "the snapshot + the log up to sequence S". A compaction that replaces
//! the snapshot and deletes segments while the backup opens its files is
//! detected (the manifest changed, or a file vanished) and the backup starts
//! over, at most [`BackupOptions::attempts`] times. Once every file is open the
//! backup no longer depends on the data dir's names: open files stay
//! readable when a compaction unlinks them.
//!
//! Everything is fsynced, then the copy is checked (the snapshot's checksums,
//! a replay of the log up to S), and only then is `BACKUP` written (to
//! `BACKUP.tmp`, fsynced, renamed, directory fsynced): a directory without
//! `BACKUP` is an incomplete backup. The format is in `docs/operations.md`.
//!
//! [`verify_backup`] checks every file against `BACKUP`, opens the snapshot
//! with its checksums and replays the log to S; [`restore`] verifies, copies
//! the files into a new data dir, and loads it as the admin would.
//!
//! [`backup_into`] and [`prune_backups`] are the scheduled backups of the
//! admin: `<dir>/<UTC time>-seq<S>/`, and retention by age that always keeps
//! the newest complete backup.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::datadir::{DataDir, Manifest, StoreError};
use super::frame::seq_at_most_max;
use super::log::{
    LogError, SegmentEnd, SegmentFile, list_segments, scan_segment, valid_frame_follows,
};
use super::record::now_ms;
use super::snapshot::{HugeChunkWriter, Snapshot, SnapshotError};
use super::sync_dir;
use super::view::TableView;

/// First line of a `BACKUP` file.
pub const BACKUP_MAGIC: &str = "uload-backup v1";
/// Name of the backup manifest, written last.
pub const BACKUP_FILE: &str = "BACKUP";
/// Attempts of a backup that keeps racing with compactions.
pub const DEFAULT_ATTEMPTS: u32 = 10;
/// Time format of scheduled backups' directory names (UTC).
pub const BACKUP_NAME_TIME_FORMAT: &str = "%Y%m%dT%H%M%SZ";
/// Prefix of a scheduled backup still being written.
pub const PARTIAL_PREFIX: &str = ".partial-";

const COPY_CHUNK: usize = 1 << 20;

/// Errors of backups, verification and restores. Each names the file (and,
/// for damage inside a file, the offset).
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error(
        "{path}: the directory is not empty; a backup or a restore needs a new or empty directory"
    )]
    NotEmpty { path: PathBuf },
    #[error("{path}: not a directory")]
    NotADirectory { path: PathBuf },
    #[error(
        "{path}: missing: the backup is incomplete (BACKUP is written last) or this is not a backup"
    )]
    Incomplete { path: PathBuf },
    #[error("{path}: invalid backup manifest: {reason}")]
    Manifest { path: PathBuf, reason: String },
    #[error(
        "{path}: left by an interrupted restore (or one still running); delete it and run the restore again"
    )]
    Interrupted { path: PathBuf },
    #[error("{path}: listed in BACKUP but missing")]
    Missing { path: PathBuf },
    #[error("{path}: not a regular file (a backup holds only regular files)")]
    NotAFile { path: PathBuf },
    #[error("{path}: not listed in BACKUP")]
    Unlisted { path: PathBuf },
    #[error("{path}: {found} bytes, BACKUP says {expected}")]
    Length {
        path: PathBuf,
        expected: u64,
        found: u64,
    },
    #[error("{path}: CRC32C {found:08x}, BACKUP says {expected:08x}")]
    Checksum {
        path: PathBuf,
        expected: u32,
        found: u32,
    },
    #[error("{path}: corrupt at offset {offset}: {reason}")]
    Corrupt {
        path: PathBuf,
        offset: u64,
        reason: String,
    },
    #[error("{path}: {reason}")]
    Inconsistent { path: PathBuf, reason: String },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error(transparent)]
    Log(#[from] LogError),
    #[error(
        "{path}: the data dir changed under the backup {attempts} times in a row (compactions); giving up"
    )]
    Raced { path: PathBuf, attempts: u32 },
    #[error("{path}: the backup failed verification ({} problem(s)); first: {}", .report.problems.len(), .report.problems.first().map_or_else(String::new, |p| p.to_string()))]
    Verification {
        path: PathBuf,
        report: Box<VerifyReport>,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> BackupError + '_ {
    move |source| BackupError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The snapshot a backup holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupSnapshot {
    /// Path inside the backup, `snapshots/<seq:020>.snap`.
    pub file: String,
    pub seq: u64,
    pub links: u64,
}

/// A file of a backup, with what it must be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupFile {
    /// Path inside the backup (`MANIFEST`, `snapshots/…`, `log/…`).
    pub name: String,
    pub len: u64,
    pub crc32c: u32,
}

/// What a `BACKUP` file says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupManifest {
    /// When the backup started, ms since the epoch.
    pub created_ms: u64,
    /// The snapshot, if the data dir had one.
    pub snapshot: Option<BackupSnapshot>,
    /// S: the last sequence the backup holds (snapshot + log).
    pub seq: u64,
    /// Live links at S.
    pub links: u64,
    pub files: Vec<BackupFile>,
}

/// Whether `name` is a path a backup may hold (never `..`, never absolute).
fn valid_file_name(name: &str) -> bool {
    let numbered = |s: &str, ext: &str| {
        s.strip_suffix(ext)
            .is_some_and(|stem| stem.len() == 20 && stem.bytes().all(|b| b.is_ascii_digit()))
    };
    name == "MANIFEST"
        || name
            .strip_prefix("snapshots/")
            .is_some_and(|n| numbered(n, ".snap"))
        || name
            .strip_prefix("log/")
            .is_some_and(|n| numbered(n, ".log"))
}

fn format_time(ms: u64) -> String {
    chrono::DateTime::from_timestamp_millis(ms.min(i64::MAX as u64) as i64)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_else(|| ms.to_string())
}

impl BackupManifest {
    /// The text of a `BACKUP` file; the last line is the CRC32C of every
    /// byte before it.
    pub fn encode(&self) -> String {
        let mut body = format!("{BACKUP_MAGIC}\ncreated {}\n", format_time(self.created_ms));
        match &self.snapshot {
            Some(s) => body.push_str(&format!("snapshot {} {} {}\n", s.file, s.seq, s.links)),
            None => body.push_str("snapshot none\n"),
        }
        body.push_str(&format!(
            "seq {}\nlinks {}\nfiles {}\n",
            self.seq,
            self.links,
            self.files.len()
        ));
        for f in &self.files {
            body.push_str(&format!("file {} {} {:08x}\n", f.name, f.len, f.crc32c));
        }
        super::seal_text(body)
    }

    /// Parses and checks a `BACKUP` file's text.
    pub fn decode(text: &str) -> Result<Self, String> {
        let body = super::unseal_text(text)?;
        let mut lines = body.lines();
        if lines.next() != Some(BACKUP_MAGIC) {
            return Err(format!("the first line is not {BACKUP_MAGIC:?}"));
        }
        let mut field = |key: &str| -> Result<Vec<String>, String> {
            let line = lines.next().ok_or(format!("missing {key}"))?;
            let mut words = line.split(' ');
            if words.next() != Some(key) {
                return Err(format!("expected {key:?}, found {line:?}"));
            }
            Ok(words.map(str::to_owned).collect())
        };
        let number = |v: &str, what: &str| {
            v.parse::<u64>()
                .map_err(|_| format!("{what} {v:?} is not a number"))
        };
        let created = field("created")?;
        let created_ms = match created.as_slice() {
            [t] => chrono::DateTime::parse_from_rfc3339(t)
                .ok()
                .and_then(|t| u64::try_from(t.timestamp_millis()).ok())
                .ok_or(format!("created {t:?} is not an RFC 3339 time"))?,
            _ => return Err("created: expected one time".into()),
        };
        let snapshot = match field("snapshot")?.as_slice() {
            [none] if none == "none" => None,
            [file, seq, links] => {
                if !file.starts_with("snapshots/") || !valid_file_name(file) {
                    return Err(format!("snapshot {file:?} is not snapshots/<seq>.snap"));
                }
                Some(BackupSnapshot {
                    file: file.clone(),
                    seq: seq_at_most_max(number(seq, "snapshot seq")?, "snapshot seq")?,
                    links: number(links, "snapshot links")?,
                })
            }
            other => {
                return Err(format!(
                    "snapshot: expected a file, seq and links, found {other:?}"
                ));
            }
        };
        let one = |v: Vec<String>, key: &str| match v.as_slice() {
            [x] => number(x, key),
            _ => Err(format!("{key}: expected one number")),
        };
        let seq = seq_at_most_max(one(field("seq")?, "seq")?, "seq")?;
        let links = one(field("links")?, "links")?;
        let count = one(field("files")?, "files")?;
        let mut files: Vec<BackupFile> = Vec::new();
        for line in lines.by_ref() {
            let words: Vec<&str> = line.split(' ').collect();
            let [key, name, len, crc] = words.as_slice() else {
                return Err(format!(
                    "expected \"file NAME LENGTH CRC32C\", found {line:?}"
                ));
            };
            if *key != "file" {
                return Err(format!(
                    "expected \"file NAME LENGTH CRC32C\", found {line:?}"
                ));
            }
            if !valid_file_name(name) {
                return Err(format!(
                    "file name {name:?} is not MANIFEST, snapshots/<seq>.snap or log/<seq>.log"
                ));
            }
            if files.iter().any(|f| f.name == *name) {
                return Err(format!("file {name:?} is listed twice"));
            }
            let crc32c = (crc.len() == 8)
                .then(|| u32::from_str_radix(crc, 16).ok())
                .flatten()
                .ok_or(format!("{name}: CRC32C {crc:?} is not 8 hex digits"))?;
            files.push(BackupFile {
                name: (*name).to_owned(),
                len: number(len, "length")?,
                crc32c,
            });
        }
        if files.len() as u64 != count {
            return Err(format!("files says {count}, {} are listed", files.len()));
        }
        if let Some(s) = &snapshot
            && !files.iter().any(|f| f.name == s.file)
        {
            return Err(format!("the snapshot {} is not listed as a file", s.file));
        }
        if snapshot.is_some() != files.iter().any(|f| f.name == "MANIFEST") {
            return Err("a MANIFEST must be listed exactly when there is a snapshot".into());
        }
        Ok(Self {
            created_ms,
            snapshot,
            seq,
            links,
            files,
        })
    }

    /// Reads `<dir>/BACKUP`.
    pub fn read(dir: &Path) -> Result<Self, BackupError> {
        let path = dir.join(BACKUP_FILE);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(BackupError::Incomplete { path });
            }
            Err(e) => return Err(io_err(&path)(e)),
        };
        let text = String::from_utf8(bytes).map_err(|_| BackupError::Manifest {
            path: path.clone(),
            reason: "not UTF-8".into(),
        })?;
        Self::decode(&text).map_err(|reason| BackupError::Manifest { path, reason })
    }
}

/// Called with the attempt number after a backup attempt opened its files
/// and before it checks the manifest again (tests use it to race a
/// compaction with the backup).
#[doc(hidden)]
pub type RaceHook = std::sync::Arc<dyn Fn(u32) + Send + Sync>;

/// Options of [`backup`].
#[derive(Clone)]
pub struct BackupOptions {
    /// Hard-link the snapshot when the backup is on the data dir's file
    /// system (snapshots are immutable); `false` always copies it.
    pub hard_link: bool,
    /// Attempts before giving up on a data dir that keeps changing.
    pub attempts: u32,
    #[doc(hidden)]
    pub race_hook: Option<RaceHook>,
}

impl std::fmt::Debug for BackupOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackupOptions")
            .field("hard_link", &self.hard_link)
            .field("attempts", &self.attempts)
            .finish_non_exhaustive()
    }
}

impl Default for BackupOptions {
    fn default() -> Self {
        Self {
            hard_link: true,
            attempts: DEFAULT_ATTEMPTS,
            race_hook: None,
        }
    }
}

/// What [`backup`] did.
#[derive(Debug, Clone)]
pub struct BackupReport {
    pub dest: PathBuf,
    pub manifest: BackupManifest,
    /// Attempts it took (more than 1: a compaction raced with it).
    pub attempts: u32,
    /// Whether the snapshot was hard-linked rather than copied.
    pub hard_linked: bool,
    /// Bytes written (the log, copied snapshots, the manifests).
    pub bytes_copied: u64,
    pub elapsed: Duration,
}

/// Why one attempt stopped.
enum Attempt {
    /// The data dir changed under us (compaction): start over.
    Raced(String),
    Failed(BackupError),
}

impl From<BackupError> for Attempt {
    fn from(e: BackupError) -> Self {
        Self::Failed(e)
    }
}

/// A NotFound while opening a data dir file means a compaction removed it.
fn open_source(path: &Path) -> Result<File, Attempt> {
    File::open(path).map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            Attempt::Raced(format!("{} disappeared", path.display()))
        } else {
            Attempt::Failed(io_err(path)(e))
        }
    })
}

/// Makes `dest` an empty directory (creating it and its parents), or
/// refuses. Returns whether it was created.
fn prepare_empty_dir(dest: &Path) -> Result<bool, BackupError> {
    match fs::symlink_metadata(dest) {
        Ok(m) if !m.is_dir() => Err(BackupError::NotADirectory {
            path: dest.to_owned(),
        }),
        Ok(_) => {
            let mut entries = fs::read_dir(dest).map_err(io_err(dest))?;
            if entries.next().is_some() {
                return Err(BackupError::NotEmpty {
                    path: dest.to_owned(),
                });
            }
            Ok(false)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            fs::create_dir_all(dest).map_err(io_err(dest))?;
            if let Some(parent) = dest.parent().filter(|p| !p.as_os_str().is_empty()) {
                sync_dir(parent).map_err(io_err(parent))?;
            }
            Ok(true)
        }
        Err(e) => Err(io_err(dest)(e)),
    }
}

/// Removes what an attempt wrote into `dest` (which was empty before).
fn clear_dir(dest: &Path) -> Result<(), BackupError> {
    for entry in fs::read_dir(dest).map_err(io_err(dest))? {
        let path = entry.map_err(io_err(dest))?.path();
        let removed = if fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir()) {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        };
        removed.map_err(io_err(&path))?;
    }
    Ok(())
}

/// Copies everything `src` holds from offset 0 into a new file `dst`,
/// fsyncs it, and returns its length and CRC32C.
fn copy_to_new(src: &File, src_path: &Path, dst: &Path) -> Result<(u64, u32), BackupError> {
    let out = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(dst)
        .map_err(io_err(dst))?;
    // In 2 MiB-aligned 2 MiB writes, so that a restored snapshot is cached in
    // 2 MiB folios the edge can map with 2 MiB pages (see `HugeChunkWriter`).
    let mut out = HugeChunkWriter::new(out);
    let mut buf = vec![0u8; COPY_CHUNK];
    let (mut at, mut crc) = (0u64, 0u32);
    loop {
        let n = match src.read_at(&mut buf, at) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_err(src_path)(e)),
        };
        out.write_all(&buf[..n]).map_err(io_err(dst))?;
        crc = crc32c::crc32c_append(crc, &buf[..n]);
        at += n as u64;
    }
    let out = out.finish().map_err(io_err(dst))?;
    out.sync_all().map_err(io_err(dst))?;
    Ok((at, crc))
}

/// Length and CRC32C of everything in `file`.
fn checksum_file(file: &File, path: &Path) -> Result<(u64, u32), BackupError> {
    let mut buf = vec![0u8; COPY_CHUNK];
    let (mut at, mut crc) = (0u64, 0u32);
    loop {
        let n = match file.read_at(&mut buf, at) {
            Ok(0) => return Ok((at, crc)),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_err(path)(e)),
        };
        crc = crc32c::crc32c_append(crc, &buf[..n]);
        at += n as u64;
    }
}

/// Writes `bytes` to a new file and fsyncs it.
fn write_new(path: &Path, bytes: &[u8]) -> Result<(), BackupError> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(io_err(path))?;
    f.write_all(bytes).map_err(io_err(path))?;
    f.sync_all().map_err(io_err(path))
}

/// Writes `<dir>/BACKUP` atomically: `BACKUP.tmp`, fsync, rename, fsync dir.
fn write_backup_manifest(dir: &Path, manifest: &BackupManifest) -> Result<(), BackupError> {
    let tmp = dir.join("BACKUP.tmp");
    let path = dir.join(BACKUP_FILE);
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
    sync_dir(dir).map_err(io_err(dir))
}

/// Takes an online backup of the data dir `data_dir` into `dest`, a new or
/// empty directory. Needs no lock: the admin may keep writing and
/// compacting. See the module documentation.
pub fn backup(
    data_dir: &Path,
    dest: &Path,
    opts: &BackupOptions,
) -> Result<BackupReport, BackupError> {
    let started = Instant::now();
    let created_ms = now_ms();
    if !data_dir.is_dir() {
        return Err(BackupError::NotADirectory {
            path: data_dir.to_owned(),
        });
    }
    let created = prepare_empty_dir(dest)?;
    let attempts = opts.attempts.max(1);
    let mut result = Err(BackupError::Raced {
        path: data_dir.to_owned(),
        attempts,
    });
    for attempt in 1..=attempts {
        match backup_once(data_dir, dest, opts, created_ms, attempt) {
            Ok((manifest, hard_linked, bytes_copied)) => {
                result = Ok(BackupReport {
                    dest: dest.to_owned(),
                    manifest,
                    attempts: attempt,
                    hard_linked,
                    bytes_copied,
                    elapsed: started.elapsed(),
                });
                break;
            }
            Err(Attempt::Raced(why)) => {
                tracing::info!(
                    attempt,
                    why,
                    "backup: the data dir changed under the backup; starting over"
                );
                clear_dir(dest)?;
            }
            Err(Attempt::Failed(e)) => {
                result = Err(e);
                break;
            }
        }
    }
    if result.is_err() {
        // Leave nothing that could pass for a backup.
        let _ = clear_dir(dest);
        if created {
            let _ = fs::remove_dir(dest);
        }
    }
    result
}

/// One attempt: open every file, check that the manifest did not change,
/// then copy from the open files.
fn backup_once(
    data_dir: &Path,
    dest: &Path,
    opts: &BackupOptions,
    created_ms: u64,
    attempt: u32,
) -> Result<(BackupManifest, bool, u64), Attempt> {
    let dir = DataDir::new(data_dir);
    let manifest = dir.read_manifest().map_err(BackupError::from)?;
    let snap_seq = manifest.as_ref().map_or(0, |m| m.seq);
    let snap_dir = dest.join("snapshots");
    let log_dir = dest.join("log");
    fs::create_dir(&snap_dir).map_err(|e| Attempt::Failed(io_err(&snap_dir)(e)))?;
    fs::create_dir(&log_dir).map_err(|e| Attempt::Failed(io_err(&log_dir)(e)))?;

    // 1. Open the snapshot and hard-link it while its name still exists.
    let mut snapshot = None;
    let mut hard_linked = false;
    if let Some(m) = &manifest {
        let src = dir.snapshot_dir().join(&m.snapshot);
        let mut file = open_source(&src)?;
        let dst = snap_dir.join(&m.snapshot);
        if opts.hard_link {
            match fs::hard_link(&src, &dst) {
                // What is checksummed is the file linked, even if the name
                // came to hold another (a snapshot rewritten under its name)
                // between the open and the link.
                Ok(()) => {
                    hard_linked = true;
                    file = open_source(&dst)?;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "backup: cannot hard-link the snapshot; copying it")
                }
            }
        }
        snapshot = Some((file, src, dst));
    }
    // 2. Open every segment the snapshot does not cover.
    let segments = list_segments(&dir.log_dir()).map_err(BackupError::from)?;
    let mut open = Vec::new();
    for (i, seg) in segments.iter().enumerate() {
        if segments
            .get(i + 1)
            .is_some_and(|next| next.first_seq <= snap_seq + 1)
        {
            continue; // wholly in the snapshot
        }
        open.push((open_source(&seg.path)?, seg.clone()));
    }
    if let Some(hook) = &opts.race_hook {
        hook(attempt);
    }
    // 3. A compaction since step 1 may have deleted segments we needed.
    let now = dir.read_manifest().map_err(BackupError::from)?;
    if now != manifest {
        return Err(Attempt::Raced("the manifest changed".into()));
    }
    // From here on the open files are all we read.
    let mut files = Vec::new();
    let mut bytes_copied = 0;
    let mut backup_snapshot = None;
    if let (Some(m), Some((file, src, dst))) = (&manifest, &snapshot) {
        let (len, crc) = if hard_linked {
            checksum_file(file, src)?
        } else {
            let copied = copy_to_new(file, src, dst)?;
            bytes_copied += copied.0;
            copied
        };
        let name = format!("snapshots/{}", m.snapshot);
        files.push(BackupFile {
            name: name.clone(),
            len,
            crc32c: crc,
        });
        backup_snapshot = Some(BackupSnapshot {
            file: name,
            seq: m.seq,
            links: m.links,
        });
    }
    let last_seq = copy_segments(&open, &log_dir, snap_seq, &mut files, &mut bytes_copied)?;
    if let Some(m) = &manifest {
        let text = m.encode();
        write_new(&dest.join("MANIFEST"), text.as_bytes())?;
        bytes_copied += text.len() as u64;
        files.insert(
            0,
            BackupFile {
                name: "MANIFEST".into(),
                len: text.len() as u64,
                crc32c: crc32c::crc32c(text.as_bytes()),
            },
        );
    }
    for d in [&snap_dir, &log_dir, &dest.to_path_buf()] {
        sync_dir(d).map_err(|e| Attempt::Failed(io_err(d)(e)))?;
    }
    // 4. Check the copy as a restore would read it, then seal it.
    let mut backup_manifest = BackupManifest {
        created_ms,
        snapshot: backup_snapshot,
        seq: last_seq,
        links: 0,
        files,
    };
    let (reached, links) = check_contents(dest, &backup_manifest)
        .map_err(|mut problems| Attempt::Failed(problems.remove(0)))?;
    if reached != last_seq {
        return Err(Attempt::Failed(BackupError::Inconsistent {
            path: dest.join("log"),
            reason: format!("the copied log ends at sequence {reached}, expected {last_seq}"),
        }));
    }
    backup_manifest.links = links;
    write_backup_manifest(dest, &backup_manifest)?;
    Ok((backup_manifest, hard_linked, bytes_copied))
}

/// Copies the open segments, each cut after its last whole frame, checking
/// that they continue each other. Returns the last sequence copied.
fn copy_segments(
    open: &[(File, SegmentFile)],
    log_dir: &Path,
    snap_seq: u64,
    files: &mut Vec<BackupFile>,
    bytes_copied: &mut u64,
) -> Result<u64, Attempt> {
    let mut last_seq = snap_seq;
    let mut expected: Option<u64> = None;
    for (i, (file, seg)) in open.iter().enumerate() {
        let is_last = i + 1 == open.len();
        let mut buf = Vec::new();
        (&*file)
            .read_to_end(&mut buf)
            .map_err(|e| Attempt::Failed(io_err(&seg.path)(e)))?;
        let scan = scan_segment(&buf, |_, _| {}).map_err(|reason| {
            Attempt::Failed(BackupError::Log(LogError::BadHeader {
                path: seg.path.clone(),
                reason,
            }))
        })?;
        if scan.first_seq != seg.first_seq {
            return Err(Attempt::Failed(BackupError::Inconsistent {
                path: seg.path.clone(),
                reason: format!(
                    "header says first sequence {}, file name says {}",
                    scan.first_seq, seg.first_seq
                ),
            }));
        }
        let want = expected.unwrap_or(snap_seq + 1);
        let continues = match expected {
            Some(e) => seg.first_seq == e,
            None => seg.first_seq <= want,
        };
        if !continues {
            // The manifest did not change, so no compaction removed these:
            // records are missing from the data dir.
            return Err(Attempt::Failed(BackupError::Log(LogError::Gap {
                path: seg.path.clone(),
                expected: want,
                found: seg.first_seq,
            })));
        }
        if let SegmentEnd::Stopped { offset, reason } = &scan.end {
            // The newest segment may end in a frame being written: stop
            // before it. Anything else is damage, which a backup must not hide.
            if !is_last || valid_frame_follows(&buf[*offset as usize..], scan.last_seq) {
                return Err(Attempt::Failed(BackupError::Corrupt {
                    path: seg.path.clone(),
                    offset: *offset,
                    reason: reason.clone(),
                }));
            }
        }
        if is_last && scan.last_seq <= snap_seq {
            // Every record of the newest segment is in the snapshot (after a
            // compaction, which never deletes the newest segment): the
            // backup is the snapshot alone, and a restored data dir's
            // writer starts a new segment after it.
            break;
        }
        let valid = &buf[..scan.valid_len as usize];
        let name = seg
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let dst = log_dir.join(&name);
        write_new(&dst, valid)?;
        *bytes_copied += valid.len() as u64;
        files.push(BackupFile {
            name: format!("log/{name}"),
            len: valid.len() as u64,
            crc32c: crc32c::crc32c(valid),
        });
        last_seq = last_seq.max(scan.last_seq);
        expected = Some(scan.last_seq + 1);
    }
    Ok(last_seq)
}

/// Whether `path` is a regular file: a symlink (whose target a restore
/// would copy, or /dev/zero, which never ends), a FIFO (whose open blocks
/// until a writer comes) or a device is neither followed nor read.
fn regular_file(path: &Path) -> Result<(), BackupError> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_file() => Ok(()),
        Ok(_) => Err(BackupError::NotAFile {
            path: path.to_owned(),
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(BackupError::Missing {
            path: path.to_owned(),
        }),
        Err(e) => Err(io_err(path)(e)),
    }
}

/// Opens the snapshot (with checksums) and replays the log of the backup
/// (or restored data dir) at `root` as `manifest` describes it. Returns the
/// sequence reached and the live links, or every problem found (snapshot
/// and log problems both, so a report names each damaged file).
fn check_contents(root: &Path, manifest: &BackupManifest) -> Result<(u64, u64), Vec<BackupError>> {
    let mut problems = Vec::new();
    let snap_seq = manifest.snapshot.as_ref().map_or(0, |s| s.seq);
    let mut view = match &manifest.snapshot {
        None => Some(TableView::new(None)),
        Some(s) => {
            let path = root.join(&s.file);
            let opened =
                regular_file(&path).and_then(|()| Snapshot::open(&path, true).map_err(Into::into));
            match opened {
                Ok(snap) if snap.seq() != s.seq || snap.len() != s.links => {
                    problems.push(BackupError::Inconsistent {
                        path,
                        reason: format!(
                            "holds sequence {} with {} links, BACKUP says {} with {}",
                            snap.seq(),
                            snap.len(),
                            s.seq,
                            s.links
                        ),
                    });
                    None
                }
                Ok(snap) => Some(TableView::new(Some(std::sync::Arc::new(snap)))),
                Err(e) => {
                    problems.push(e);
                    None
                }
            }
        }
    };
    let log_dir = root.join("log");
    let segments = match list_segments(&log_dir) {
        Ok(s) => s,
        Err(e) => {
            problems.push(e.into());
            return Err(problems);
        }
    };
    let mut reached = snap_seq;
    let mut expected: Option<u64> = None;
    for seg in &segments {
        let buf = match regular_file(&seg.path)
            .and_then(|()| fs::read(&seg.path).map_err(io_err(&seg.path)))
        {
            Ok(b) => b,
            Err(e) => {
                problems.push(e);
                return Err(problems);
            }
        };
        let mut bad_record = None;
        let scan = scan_segment(&buf, |seq, op| {
            if let Some(v) = view.as_mut()
                && bad_record.is_none()
                && let Err(e) = v.apply(seq, op)
            {
                bad_record = Some((seq, e));
            }
        });
        let scan = match scan {
            Ok(s) => s,
            Err(reason) => {
                problems.push(
                    LogError::BadHeader {
                        path: seg.path.clone(),
                        reason,
                    }
                    .into(),
                );
                return Err(problems);
            }
        };
        if scan.first_seq != seg.first_seq {
            problems.push(BackupError::Inconsistent {
                path: seg.path.clone(),
                reason: format!(
                    "header says first sequence {}, file name says {}",
                    scan.first_seq, seg.first_seq
                ),
            });
            return Err(problems);
        }
        let want = expected.unwrap_or(snap_seq + 1);
        let continues = match expected {
            Some(e) => seg.first_seq == e,
            None => seg.first_seq <= want,
        };
        if !continues {
            problems.push(
                LogError::Gap {
                    path: seg.path.clone(),
                    expected: want,
                    found: seg.first_seq,
                }
                .into(),
            );
            return Err(problems);
        }
        if let Some((seq, e)) = bad_record {
            problems.push(BackupError::Inconsistent {
                path: seg.path.clone(),
                reason: format!("record {seq} cannot be applied: {e}"),
            });
            return Err(problems);
        }
        // A backup's segments end exactly after their last frame.
        if let SegmentEnd::Stopped { offset, reason } = scan.end {
            problems.push(BackupError::Corrupt {
                path: seg.path.clone(),
                offset,
                reason,
            });
            return Err(problems);
        }
        reached = reached.max(scan.last_seq);
        expected = Some(scan.last_seq + 1);
    }
    if reached != manifest.seq {
        problems.push(BackupError::Inconsistent {
            path: log_dir,
            reason: format!(
                "snapshot and log reach sequence {reached}, BACKUP says {}",
                manifest.seq
            ),
        });
    }
    match view {
        Some(v) if problems.is_empty() => Ok((reached, v.len())),
        _ => Err(problems),
    }
}

/// One file's check in a [`VerifyReport`].
#[derive(Debug, Clone)]
pub struct FileCheck {
    pub name: String,
    pub len: u64,
    pub crc32c: u32,
    /// `None`: length and CRC32C match `BACKUP`.
    pub problem: Option<String>,
}

/// What [`verify_backup`] found.
#[derive(Debug)]
pub struct VerifyReport {
    pub path: PathBuf,
    /// `None` when `BACKUP` is missing or invalid (see `problems`).
    pub manifest: Option<BackupManifest>,
    pub files: Vec<FileCheck>,
    /// Sequence the snapshot and the log reach, when they could be read.
    pub seq_reached: Option<u64>,
    /// Live links after the replay.
    pub links: Option<u64>,
    pub problems: Vec<BackupError>,
    pub elapsed: Duration,
}

impl VerifyReport {
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }

    /// The report as text, one line per file and per problem.
    pub fn to_text(&self) -> String {
        let mut out = format!("backup        {}\n", self.path.display());
        if let Some(m) = &self.manifest {
            out.push_str(&format!("created       {}\n", format_time(m.created_ms)));
            match &m.snapshot {
                Some(s) => out.push_str(&format!(
                    "snapshot      {} (sequence {}, {} links)\n",
                    s.file, s.seq, s.links
                )),
                None => out.push_str("snapshot      none (the log holds everything)\n"),
            }
            out.push_str(&format!("sequence      {} (BACKUP)\n", m.seq));
            out.push_str(&format!("links         {} (BACKUP)\n", m.links));
        }
        out.push_str(&format!("files         {}\n", self.files.len()));
        for f in &self.files {
            out.push_str(&format!(
                "  {:<44} {:>12} bytes  crc32c {:08x}  {}\n",
                f.name,
                f.len,
                f.crc32c,
                f.problem.as_deref().unwrap_or("ok")
            ));
        }
        if let Some(seq) = self.seq_reached {
            out.push_str(&format!("replayed to   sequence {seq}\n"));
        }
        if let Some(links) = self.links {
            out.push_str(&format!("live links    {links}\n"));
        }
        out.push_str(&format!(
            "checked in    {:.3} s\n",
            self.elapsed.as_secs_f64()
        ));
        if self.problems.is_empty() {
            out.push_str("status        OK\n");
        } else {
            for p in &self.problems {
                out.push_str(&format!("PROBLEM       {p}\n"));
            }
            out.push_str(&format!(
                "status        {} PROBLEM(S)\n",
                self.problems.len()
            ));
        }
        out
    }
}

/// Checks a backup: `BACKUP` itself, every file's length and CRC32C, files
/// it does not list, the snapshot's checksums, and a replay of the log that
/// must reach S without a gap. Never fails: problems are in the report.
pub fn verify_backup(src: &Path) -> VerifyReport {
    let started = Instant::now();
    let mut report = VerifyReport {
        path: src.to_owned(),
        manifest: None,
        files: Vec::new(),
        seq_reached: None,
        links: None,
        problems: Vec::new(),
        elapsed: Duration::ZERO,
    };
    if !src.is_dir() {
        report.problems.push(BackupError::NotADirectory {
            path: src.to_owned(),
        });
        return report;
    }
    let manifest = match BackupManifest::read(src) {
        Ok(m) => m,
        Err(e) => {
            report.problems.push(e);
            report.elapsed = started.elapsed();
            return report;
        }
    };
    for f in &manifest.files {
        let path = src.join(&f.name);
        // Not followed or read: a symlink (whose target a restore would
        // copy, or /dev/zero, which never ends) or another special file.
        let measured = regular_file(&path).and_then(|()| {
            File::open(&path)
                .map_err(io_err(&path))
                .and_then(|file| checksum_file(&file, &path))
        });
        let (len, crc, problem) = match measured {
            Ok((len, crc)) if len != f.len => (
                len,
                crc,
                Some(BackupError::Length {
                    path: path.clone(),
                    expected: f.len,
                    found: len,
                }),
            ),
            Ok((len, crc)) if crc != f.crc32c => (
                len,
                crc,
                Some(BackupError::Checksum {
                    path: path.clone(),
                    expected: f.crc32c,
                    found: crc,
                }),
            ),
            Ok((len, crc)) => (len, crc, None),
            Err(e) => (0, 0, Some(e)),
        };
        report.files.push(FileCheck {
            name: f.name.clone(),
            len,
            crc32c: crc,
            problem: problem.as_ref().map(|p| match p {
                BackupError::Missing { .. } => "MISSING".to_owned(),
                BackupError::Length { expected, .. } => format!("LENGTH (BACKUP says {expected})"),
                BackupError::Checksum { expected, .. } => {
                    format!("CRC32C MISMATCH (BACKUP says {expected:08x})")
                }
                other => other.to_string(),
            }),
        });
        report.problems.extend(problem);
    }
    // Files the manifest does not list would change what a restore reads.
    for sub in ["snapshots", "log"] {
        let dir = src.join(sub);
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = format!("{sub}/{}", entry.file_name().to_string_lossy());
            if !manifest.files.iter().any(|f| f.name == name) {
                report
                    .problems
                    .push(BackupError::Unlisted { path: entry.path() });
            }
        }
    }
    if let Some(s) = &manifest.snapshot {
        let path = src.join("MANIFEST");
        // Anything but a file there is reported above, as a listed file.
        let text =
            regular_file(&path).and_then(|()| fs::read_to_string(&path).map_err(io_err(&path)));
        match text {
            Ok(text) => match Manifest::decode(&text) {
                Ok(m)
                    if format!("snapshots/{}", m.snapshot) == s.file
                        && m.seq == s.seq
                        && m.links == s.links => {}
                Ok(m) => report.problems.push(BackupError::Inconsistent {
                    path,
                    reason: format!(
                        "names {} (sequence {}, {} links), BACKUP says {} (sequence {}, {} links)",
                        m.snapshot, m.seq, m.links, s.file, s.seq, s.links
                    ),
                }),
                Err(reason) => report.problems.push(BackupError::Manifest { path, reason }),
            },
            // Already reported (missing, or not a file).
            Err(BackupError::Missing { .. } | BackupError::NotAFile { .. }) => {}
            Err(e) => report.problems.push(e),
        }
    }
    match check_contents(src, &manifest) {
        Ok((seq, links)) => {
            report.seq_reached = Some(seq);
            report.links = Some(links);
            if links != manifest.links {
                report.problems.push(BackupError::Inconsistent {
                    path: src.join(BACKUP_FILE),
                    reason: format!("says {} links, the replay gives {links}", manifest.links),
                });
            }
        }
        Err(problems) => report.problems.extend(problems),
    }
    report.manifest = Some(manifest);
    report.elapsed = started.elapsed();
    report
}

/// What [`restore`] did.
#[derive(Debug)]
pub struct RestoreReport {
    pub verify: VerifyReport,
    pub dest: PathBuf,
    /// Sequence and live links of the restored data dir, as loaded.
    pub seq: u64,
    pub links: u64,
    pub bytes_copied: u64,
    pub verify_time: Duration,
    pub copy_time: Duration,
    /// Loading the restored dir as the admin would (snapshot checksums, log replay).
    pub load_time: Duration,
    pub elapsed: Duration,
}

/// Verifies the backup at `src`, then copies it into `dest` (a new or empty
/// directory) as a data dir, fsyncs it, and loads it as the admin would.
/// A backup that fails verification is refused
/// ([`BackupError::Verification`] holds the report) and `dest` is not touched.
///
/// The files are written into `.<dest name>.restore-partial` beside `dest`
/// (created exclusively: a leftover is [`BackupError::Interrupted`]), which
/// is checked and then renamed to `dest` (replacing it when it is an empty
/// directory). So `dest` never holds part of a restore: a crash or a
/// failure leaves it as it was, where a data dir with part of the files
/// loads without the links of the others (or as an empty table).
pub fn restore(src: &Path, dest: &Path) -> Result<RestoreReport, BackupError> {
    let started = Instant::now();
    // Refuse a used destination before the (long) verification.
    let dest_permissions = match fs::symlink_metadata(dest) {
        Ok(m) if !m.is_dir() => {
            return Err(BackupError::NotADirectory {
                path: dest.to_owned(),
            });
        }
        Ok(m) => {
            if fs::read_dir(dest).map_err(io_err(dest))?.next().is_some() {
                return Err(BackupError::NotEmpty {
                    path: dest.to_owned(),
                });
            }
            Some(m.permissions())
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(io_err(dest)(e)),
    };
    let verify = verify_backup(src);
    let verify_time = started.elapsed();
    let Some(manifest) = verify.manifest.clone().filter(|_| verify.is_ok()) else {
        return Err(BackupError::Verification {
            path: src.to_owned(),
            report: Box::new(verify),
        });
    };
    let (staging, target) = restore_staging(dest)?;
    match fs::create_dir(&staging) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            return Err(BackupError::Interrupted { path: staging });
        }
        Err(e) => return Err(io_err(&staging)(e)),
    }
    let restored = restore_into(src, &staging, &manifest).and_then(|done| {
        if let Some(p) = dest_permissions {
            fs::set_permissions(&staging, p).map_err(io_err(&staging))?;
        }
        // Replaces `target` when it is an empty directory; refused when it is not.
        fs::rename(&staging, &target).map_err(|e| {
            if matches!(e.raw_os_error(), Some(libc::ENOTEMPTY | libc::EEXIST)) {
                BackupError::NotEmpty {
                    path: dest.to_owned(),
                }
            } else {
                io_err(&target)(e)
            }
        })?;
        Ok(done)
    });
    let (copied, view, copy_time, load_time) = match restored {
        Ok(done) => done,
        Err(e) => {
            let _ = fs::remove_dir_all(&staging);
            return Err(e);
        }
    };
    if let Some(parent) = target.parent() {
        sync_dir(parent).map_err(io_err(parent))?;
    }
    Ok(RestoreReport {
        verify,
        dest: dest.to_owned(),
        seq: view.seq(),
        links: view.len(),
        bytes_copied: copied,
        verify_time,
        copy_time,
        load_time,
        elapsed: started.elapsed(),
    })
}

/// Where a restore into `dest` writes before renaming it into place:
/// `.<name>.restore-partial` in `dest`'s parent (created if missing), so on
/// the same file system. Returns it and `dest` as an absolute path.
fn restore_staging(dest: &Path) -> Result<(PathBuf, PathBuf), BackupError> {
    let target = match fs::canonicalize(dest) {
        Ok(p) => p,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let parent = dest
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            fs::create_dir_all(parent).map_err(io_err(parent))?;
            let parent = fs::canonicalize(parent).map_err(io_err(parent))?;
            match dest.file_name() {
                Some(name) => parent.join(name),
                None => {
                    return Err(BackupError::NotADirectory {
                        path: dest.to_owned(),
                    });
                }
            }
        }
        Err(e) => return Err(io_err(dest)(e)),
    };
    let (Some(parent), Some(name)) = (target.parent(), target.file_name()) else {
        return Err(BackupError::NotADirectory {
            path: dest.to_owned(),
        });
    };
    let mut staging = std::ffi::OsString::from(".");
    staging.push(name);
    staging.push(".restore-partial");
    Ok((parent.join(staging), target))
}

/// Copies the backup into the empty directory `dir` and loads it as the
/// admin would, checking that it reaches S with the stated link count.
/// Returns the bytes copied, the view, and the copy and load times.
fn restore_into(
    src: &Path,
    dir: &Path,
    manifest: &BackupManifest,
) -> Result<(u64, TableView, Duration, Duration), BackupError> {
    let copy_started = Instant::now();
    let copied = restore_files(src, dir, manifest)?;
    let copy_time = copy_started.elapsed();
    let load_started = Instant::now();
    let view = DataDir::new(dir).load_view(true)?;
    if view.seq() != manifest.seq || view.len() != manifest.links {
        return Err(BackupError::Inconsistent {
            path: dir.to_owned(),
            reason: format!(
                "the restored data dir loads at sequence {} with {} links, BACKUP says {} with {}",
                view.seq(),
                view.len(),
                manifest.seq,
                manifest.links
            ),
        });
    }
    Ok((copied, view, copy_time, load_started.elapsed()))
}

/// Copies the listed files (checking each against `BACKUP` again as it is
/// read), the `MANIFEST` last, and fsyncs everything.
fn restore_files(src: &Path, dest: &Path, manifest: &BackupManifest) -> Result<u64, BackupError> {
    for sub in ["snapshots", "log"] {
        let d = dest.join(sub);
        fs::create_dir(&d).map_err(io_err(&d))?;
    }
    let mut ordered: Vec<&BackupFile> = manifest
        .files
        .iter()
        .filter(|f| f.name != "MANIFEST")
        .collect();
    ordered.extend(manifest.files.iter().filter(|f| f.name == "MANIFEST"));
    let mut total = 0;
    for f in ordered {
        let from = src.join(&f.name);
        let to = dest.join(&f.name);
        let file = File::open(&from).map_err(io_err(&from))?;
        let (len, crc) = copy_to_new(&file, &from, &to)?;
        if len != f.len {
            return Err(BackupError::Length {
                path: from,
                expected: f.len,
                found: len,
            });
        }
        if crc != f.crc32c {
            return Err(BackupError::Checksum {
                path: from,
                expected: f.crc32c,
                found: crc,
            });
        }
        total += len;
        if f.name == "MANIFEST" {
            sync_dir(dest).map_err(io_err(dest))?;
        }
    }
    for d in [dest.join("snapshots"), dest.join("log"), dest.to_owned()] {
        sync_dir(&d).map_err(io_err(&d))?;
    }
    Ok(total)
}

/// The directory name of a scheduled backup taken at `ms` holding up to `seq`.
pub fn backup_dir_name(ms: u64, seq: u64) -> String {
    format!("{}-seq{seq}", format_name_time(ms))
}

fn format_name_time(ms: u64) -> String {
    chrono::DateTime::from_timestamp_millis(ms.min(i64::MAX as u64) as i64)
        .map(|t| t.format(BACKUP_NAME_TIME_FORMAT).to_string())
        .unwrap_or_else(|| ms.to_string())
}

/// The time (ms since the epoch) and sequence a scheduled backup's name
/// declares; `None` for any other name.
pub fn parse_backup_dir_name(name: &str) -> Option<(u64, u64)> {
    let (time, seq) = name.split_once("-seq")?;
    if seq.is_empty() || !seq.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let t = chrono::NaiveDateTime::parse_from_str(time, BACKUP_NAME_TIME_FORMAT).ok()?;
    let ms = u64::try_from(t.and_utc().timestamp_millis()).ok()?;
    Some((ms, seq.parse().ok()?))
}

/// A scheduled backup found in a backup directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScheduledBackup {
    pub path: PathBuf,
    /// When it was taken (from its name), ms since the epoch.
    pub taken_ms: u64,
    pub seq: u64,
    /// Whether its `BACKUP` file exists and is valid.
    pub complete: bool,
}

/// The scheduled backups in `dir` (names `<UTC time>-seq<S>`), oldest first.
/// Anything else in `dir` is ignored.
pub fn list_backups(dir: &Path) -> Result<Vec<ScheduledBackup>, BackupError> {
    let mut out = Vec::new();
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(io_err(dir)(e)),
    };
    for entry in entries {
        let entry = entry.map_err(io_err(dir))?;
        let name = entry.file_name();
        let Some((taken_ms, seq)) = name.to_str().and_then(parse_backup_dir_name) else {
            continue;
        };
        let path = entry.path();
        if !fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir()) {
            continue;
        }
        let complete = BackupManifest::read(&path).is_ok();
        out.push(ScheduledBackup {
            path,
            taken_ms,
            seq,
            complete,
        });
    }
    out.sort_by(|a, b| (a.taken_ms, a.seq, &a.path).cmp(&(b.taken_ms, b.seq, &b.path)));
    Ok(out)
}

/// Takes a scheduled backup of `data_dir` into `dir`: written as
/// `<dir>/.partial-<time>`, renamed to `<dir>/<UTC time>-seq<S>` once
/// complete (and `dir` fsynced).
pub fn backup_into(
    data_dir: &Path,
    dir: &Path,
    opts: &BackupOptions,
) -> Result<BackupReport, BackupError> {
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    let taken_ms = now_ms();
    let partial = dir.join(format!("{PARTIAL_PREFIX}{}", format_name_time(taken_ms)));
    if partial.exists() {
        // A leftover of a crash at the same second: it was never complete.
        fs::remove_dir_all(&partial).map_err(io_err(&partial))?;
    }
    let mut report = backup(data_dir, &partial, opts)?;
    let last = dir.join(backup_dir_name(taken_ms, report.manifest.seq));
    if let Err(e) = fs::rename(&partial, &last) {
        let _ = fs::remove_dir_all(&partial);
        return Err(io_err(&last)(e));
    }
    sync_dir(dir).map_err(io_err(dir))?;
    report.dest = last;
    Ok(report)
}

/// What [`prune_backups`] removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PruneReport {
    pub removed: Vec<PathBuf>,
    /// The newest complete backup (always kept).
    pub newest: Option<PathBuf>,
}

/// Removes the scheduled backups in `dir` taken more than `keep` before
/// `now_ms`, complete or not, but never the newest complete one (taken at
/// or before `now_ms`: one dated later, taken while the clock was ahead, is
/// not the newest, and is not old either); and leftover `.partial-*`
/// directories (backups a crash interrupted; the caller must not be writing
/// one). Only names this module writes are touched.
pub fn prune_backups(dir: &Path, keep: Duration, now_ms: u64) -> Result<PruneReport, BackupError> {
    let backups = list_backups(dir)?;
    let newest = backups
        .iter()
        .rev()
        .find(|b| b.complete && b.taken_ms <= now_ms)
        .map(|b| b.path.clone());
    let cutoff = now_ms.saturating_sub(keep.as_millis().min(u128::from(u64::MAX)) as u64);
    let mut report = PruneReport {
        removed: Vec::new(),
        newest: newest.clone(),
    };
    for b in backups {
        if b.taken_ms < cutoff && Some(&b.path) != newest.as_ref() {
            fs::remove_dir_all(&b.path).map_err(io_err(&b.path))?;
            report.removed.push(b.path);
        }
    }
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            let is_partial = entry
                .file_name()
                .to_str()
                .is_some_and(|n| n.starts_with(PARTIAL_PREFIX));
            let path = entry.path();
            if is_partial && fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir()) {
                fs::remove_dir_all(&path).map_err(io_err(&path))?;
                report.removed.push(path);
            }
        }
    }
    if !report.removed.is_empty() {
        sync_dir(dir).map_err(io_err(dir))?;
    }
    Ok(report)
}

/// For tests: an empty, complete backup (a `BACKUP` file and nothing else)
/// named for `created_ms` and `seq` in `dir`; its path.
#[cfg(test)]
pub(crate) fn seal_empty_backup(dir: &Path, created_ms: u64, seq: u64) -> PathBuf {
    let p = dir.join(backup_dir_name(created_ms, seq));
    fs::create_dir(&p).unwrap();
    let m = BackupManifest {
        created_ms,
        snapshot: None,
        seq: 0,
        links: 0,
        files: vec![],
    };
    fs::write(p.join(BACKUP_FILE), m.encode()).unwrap();
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::record::Link;
    use crate::store::{LogOp, LogOptions, Store};

    fn sample_manifest() -> BackupManifest {
        BackupManifest {
            created_ms: 1_700_000_000_123,
            snapshot: Some(BackupSnapshot {
                file: "snapshots/00000000000000000012.snap".into(),
                seq: 12,
                links: 9,
            }),
            seq: 20,
            links: 15,
            files: vec![
                BackupFile {
                    name: "MANIFEST".into(),
                    len: 90,
                    crc32c: 0xdead_beef,
                },
                BackupFile {
                    name: "snapshots/00000000000000000012.snap".into(),
                    len: 4096,
                    crc32c: 1,
                },
                BackupFile {
                    name: "log/00000000000000000013.log".into(),
                    len: 100,
                    crc32c: 2,
                },
            ],
        }
    }

    #[test]
    fn backup_manifest_round_trips_and_is_checked() {
        let m = sample_manifest();
        let text = m.encode();
        assert!(text.starts_with("uload-backup v1\ncreated 2023-11-14T22:13:20.123Z\n"));
        assert!(text.contains("\nsnapshot snapshots/00000000000000000012.snap 12 9\n"));
        assert!(text.contains("\nfile log/00000000000000000013.log 100 00000002\n"));
        assert_eq!(BackupManifest::decode(&text), Ok(m.clone()));
        let resign = |body: &str| format!("{body}crc32c {:08x}\n", crc32c::crc32c(body.as_bytes()));
        let body = &text[..text.rfind("crc32c ").unwrap()];
        let cases = [
            (text.replace("seq 20", "seq 21"), "checksum"),
            (resign(&body.replace("v1", "v2")), "first line"),
            (resign(&body.replace("log/0000", "../0000")), "file name"),
            (resign(&body.replace("files 3", "files 4")), "files says"),
            (resign(&body.replace("links 15", "links x")), "not a number"),
            (
                resign(
                    &body
                        .replace("file MANIFEST 90 deadbeef\n", "")
                        .replace("files 3", "files 2"),
                ),
                "MANIFEST",
            ),
        ];
        for (text, want) in cases {
            let err = BackupManifest::decode(&text).unwrap_err();
            assert!(err.contains(want), "{want}: {err}");
        }
    }

    #[test]
    fn names_of_scheduled_backups() {
        let name = backup_dir_name(1_700_000_000_123, 42);
        assert_eq!(name, "20231114T221320Z-seq42");
        assert_eq!(parse_backup_dir_name(&name), Some((1_700_000_000_000, 42)));
        for bad in [
            "x-seq1",
            "20231114T221320Z-seq",
            "20231114T221320Z",
            ".partial-20231114T221320Z",
        ] {
            assert_eq!(parse_backup_dir_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn backup_verify_restore_round_trip() {
        let data = tempfile::tempdir().unwrap();
        let store = Store::open(data.path(), LogOptions { segment_bytes: 512 }).unwrap();
        for i in 0..40 {
            store.append(&[put(&format!("a{i}"))]).unwrap();
        }
        store.compact().unwrap();
        for i in 0..30 {
            store.append(&[put(&format!("b{i}"))]).unwrap();
        }
        store.append(&[LogOp::Delete("a1".into())]).unwrap();
        let out = tempfile::tempdir().unwrap();
        let dest = out.path().join("b1");
        let report = backup(data.path(), &dest, &BackupOptions::default()).unwrap();
        assert_eq!(report.manifest.seq, 71);
        assert_eq!(report.manifest.links, 69);
        assert!(report.hard_linked);
        let v = verify_backup(&dest);
        assert!(v.is_ok(), "{}", v.to_text());
        let restored = out.path().join("restored");
        let r = restore(&dest, &restored).unwrap();
        assert_eq!((r.seq, r.links), (71, 69));
        // Into an empty directory that exists: it is replaced, keeping its mode.
        use std::os::unix::fs::PermissionsExt;
        let empty = out.path().join("empty");
        fs::create_dir(&empty).unwrap();
        fs::set_permissions(&empty, fs::Permissions::from_mode(0o750)).unwrap();
        let r = restore(&dest, &empty).unwrap();
        assert_eq!((r.seq, r.links), (71, 69));
        let mode = fs::metadata(&empty).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o750);
        let view = DataDir::new(&empty).load_view(true).unwrap();
        assert_eq!((view.seq(), view.len()), (71, 69));
        assert!(!out.path().join(".empty.restore-partial").exists());
        // A listed file made a symlink, even to a file of the same bytes,
        // is refused, not followed.
        let seg = fs::read_dir(dest.join("log"))
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        let aside = out.path().join("aside");
        fs::rename(&seg, &aside).unwrap();
        std::os::unix::fs::symlink(&aside, &seg).unwrap();
        let v = verify_backup(&dest);
        assert!(
            v.problems
                .iter()
                .any(|p| matches!(p, BackupError::NotAFile { path } if *path == seg)),
            "{}",
            v.to_text()
        );
        fs::remove_file(&seg).unwrap();
        fs::rename(&aside, &seg).unwrap();
        assert!(verify_backup(&dest).is_ok());
        // Nor is anything read through one: a FIFO (whose open would block
        // until a writer came) or a symlink to /dev/zero (which never ends)
        // in place of a segment, the snapshot or the MANIFEST is reported,
        // and verify and restore return.
        let snap = fs::read_dir(dest.join("snapshots"))
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        for (listed, special) in [
            (&seg, "fifo"),
            (&seg, "zero"),
            (&snap, "fifo"),
            (&snap, "zero"),
            (&dest.join("MANIFEST"), "fifo"),
        ] {
            fs::rename(listed, &aside).unwrap();
            if special == "fifo" {
                let c = std::ffi::CString::new(listed.as_os_str().as_encoded_bytes()).unwrap();
                // SAFETY: a NUL-terminated path.
                assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
            } else {
                std::os::unix::fs::symlink("/dev/zero", listed).unwrap();
            }
            let (tx, rx) = std::sync::mpsc::channel();
            let (d, r) = (dest.clone(), out.path().join("never"));
            std::thread::spawn(move || {
                let _ = tx.send((verify_backup(&d), restore(&d, &r).is_err()));
            });
            let (v, restore_refused) = rx
                .recv_timeout(std::time::Duration::from_secs(60))
                .unwrap_or_else(|_| panic!("verify or restore read {listed:?} ({special})"));
            assert!(
                v.problems
                    .iter()
                    .any(|p| matches!(p, BackupError::NotAFile { path } if path == listed)),
                "{special} {listed:?}: {}",
                v.to_text()
            );
            assert!(restore_refused, "{special} {listed:?}");
            fs::remove_file(listed).unwrap();
            fs::rename(&aside, listed).unwrap();
        }
        assert!(verify_backup(&dest).is_ok());
        // A second backup into the same directory is refused.
        assert!(matches!(
            backup(data.path(), &dest, &BackupOptions::default()),
            Err(BackupError::NotEmpty { .. })
        ));
        // And so is a restore into a used data dir.
        assert!(matches!(
            restore(&dest, data.path()),
            Err(BackupError::NotEmpty { .. })
        ));
    }

    fn put(code: &str) -> LogOp {
        LogOp::Put(Link::new(code, "https://example.com/").unwrap())
    }

    #[test]
    fn a_compaction_racing_with_the_backup_makes_it_start_over() {
        let data = tempfile::tempdir().unwrap();
        let store = std::sync::Arc::new(
            Store::open(data.path(), LogOptions { segment_bytes: 256 }).unwrap(),
        );
        for i in 0..50 {
            store.append(&[put(&format!("a{i}"))]).unwrap();
        }
        store.compact().unwrap();
        for i in 0..50 {
            store.append(&[put(&format!("b{i}"))]).unwrap();
        }
        let out = tempfile::tempdir().unwrap();
        // Attempts 1 and 2 race with a compaction that replaces the snapshot
        // and deletes the segments they opened; attempt 3 does not.
        let racer = store.clone();
        let opts = BackupOptions {
            race_hook: Some(std::sync::Arc::new(move |attempt| {
                if attempt <= 2 {
                    racer.append(&[put(&format!("race{attempt}"))]).unwrap();
                    let r = racer.compact().unwrap();
                    assert!(r.snapshot.is_some() && !r.removed.is_empty());
                }
            })),
            ..Default::default()
        };
        let dest = out.path().join("b");
        let report = backup(data.path(), &dest, &opts).unwrap();
        assert_eq!(report.attempts, 3);
        assert_eq!((report.manifest.seq, report.manifest.links), (102, 102));
        assert!(verify_backup(&dest).is_ok());
        // Without enough attempts it gives up, leaving nothing behind.
        let racer = store.clone();
        let opts = BackupOptions {
            attempts: 2,
            race_hook: Some(std::sync::Arc::new(move |attempt| {
                racer.append(&[put(&format!("again{attempt}"))]).unwrap();
                racer.compact().unwrap();
            })),
            ..Default::default()
        };
        let dest = out.path().join("c");
        let err = backup(data.path(), &dest, &opts).unwrap_err();
        assert!(
            matches!(err, BackupError::Raced { attempts: 2, .. }),
            "{err}"
        );
        assert!(!dest.exists());
    }

    #[test]
    fn backups_during_appends_and_compactions_hold_every_acknowledged_record() {
        let data = tempfile::tempdir().unwrap();
        let store = std::sync::Arc::new(
            Store::open(data.path(), LogOptions { segment_bytes: 512 }).unwrap(),
        );
        let acked = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writer = {
            let (store, acked, stop) = (store.clone(), acked.clone(), stop.clone());
            std::thread::spawn(move || {
                for i in 0..100_000u64 {
                    if stop.load(std::sync::atomic::Ordering::Relaxed) {
                        break;
                    }
                    let seq = store.append(&[put(&format!("c{i}"))]).unwrap();
                    acked.store(seq, std::sync::atomic::Ordering::Release);
                    if i % 37 == 0 {
                        store.compact().unwrap();
                    }
                }
            })
        };
        let out = tempfile::tempdir().unwrap();
        let mut raced = 0;
        for n in 0..30 {
            let before = acked.load(std::sync::atomic::Ordering::Acquire);
            let dest = out.path().join(format!("b{n}"));
            let report = backup(data.path(), &dest, &BackupOptions::default()).unwrap();
            raced += report.attempts - 1;
            assert!(
                report.manifest.seq >= before,
                "{} < {before}",
                report.manifest.seq
            );
            // Every record is a put of a new code: links == seq.
            assert_eq!(report.manifest.links, report.manifest.seq);
            let v = verify_backup(&dest);
            assert!(v.is_ok(), "{}", v.to_text());
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        writer.join().unwrap();
        eprintln!("30 backups during appends and compactions; {raced} attempts started over");
    }

    #[test]
    fn a_compacted_data_dir_backs_up_as_its_snapshot_alone() {
        let data = tempfile::tempdir().unwrap();
        let store = Store::open(data.path(), LogOptions::default()).unwrap();
        for i in 0..20 {
            store.append(&[put(&format!("k{i}"))]).unwrap();
        }
        store.compact().unwrap();
        let out = tempfile::tempdir().unwrap();
        let dest = out.path().join("b");
        let report = backup(data.path(), &dest, &BackupOptions::default()).unwrap();
        let names: Vec<&str> = report
            .manifest
            .files
            .iter()
            .map(|f| f.name.as_str())
            .collect();
        assert_eq!(names, ["MANIFEST", "snapshots/00000000000000000020.snap"]);
        assert_eq!((report.manifest.seq, report.manifest.links), (20, 20));
        let restored = out.path().join("r");
        restore(&dest, &restored).unwrap();
        // The restored dir's writer continues after the snapshot.
        let writer = Store::open(&restored, LogOptions::default()).unwrap();
        assert_eq!(writer.append(&[put("next")]).unwrap(), 21);
        drop(writer);
        let view = DataDir::new(&restored).load_view(true).unwrap();
        assert_eq!((view.seq(), view.len()), (21, 21));
    }

    #[test]
    fn backup_of_a_data_dir_without_snapshot_or_log() {
        let data = tempfile::tempdir().unwrap();
        let out = tempfile::tempdir().unwrap();
        let dest = out.path().join("b");
        let report = backup(data.path(), &dest, &BackupOptions::default()).unwrap();
        assert_eq!((report.manifest.seq, report.manifest.links), (0, 0));
        assert!(report.manifest.snapshot.is_none());
        assert!(verify_backup(&dest).is_ok());
        let r = restore(&dest, &out.path().join("r")).unwrap();
        assert_eq!((r.seq, r.links), (0, 0));
    }

    /// A complete backup dated after `now` (the clock was ahead when it was
    /// taken) is not "the newest": with `keep_days: 0` ("keep only the
    /// newest") the backup just taken must survive its own prune.
    #[test]
    fn prune_never_removes_the_newest_backup_for_one_dated_in_the_future() {
        let dir = tempfile::tempdir().unwrap();
        let now = 1_800_000_000_000u64;
        let seal = |ms: u64, seq: u64| seal_empty_backup(dir.path(), ms, seq);
        let future = seal(now + 30 * 86_400_000, 5);
        let older = seal(now - 7_200_000, 6);
        let just_taken = seal(now - 1_000, 7);
        let r = prune_backups(dir.path(), Duration::ZERO, now).unwrap();
        assert!(
            just_taken.exists(),
            "the backup just taken was pruned: {r:?}"
        );
        assert_eq!(r.newest.as_ref(), Some(&just_taken));
        assert!(!older.exists());
        // Not taken more than keep_days ago: it stays.
        assert!(future.exists());
    }

    #[test]
    fn prune_keeps_the_newest_complete_backup() {
        let dir = tempfile::tempdir().unwrap();
        let day = 86_400_000u64;
        let now = 100 * day;
        let make = |ms: u64, complete: bool| {
            if complete {
                return seal_empty_backup(dir.path(), ms, 1);
            }
            let p = dir.path().join(backup_dir_name(ms, 1));
            fs::create_dir(&p).unwrap();
            p
        };
        let old_complete = make(now - 30 * day, true);
        let old_incomplete = make(now - 20 * day, false);
        let partial = dir.path().join(".partial-x");
        fs::create_dir(&partial).unwrap();
        fs::create_dir(dir.path().join("not-a-backup")).unwrap();
        // Every backup is old: the newest complete one stays.
        let r = prune_backups(dir.path(), Duration::from_millis(7 * day), now).unwrap();
        assert_eq!(r.newest.as_ref(), Some(&old_complete));
        assert!(old_complete.exists() && !old_incomplete.exists() && !partial.exists());
        assert!(dir.path().join("not-a-backup").exists());
        // A newer complete one: the old one goes.
        let recent = make(now - day, true);
        let r = prune_backups(dir.path(), Duration::from_millis(7 * day), now).unwrap();
        assert_eq!(r.removed, vec![old_complete.clone()]);
        assert!(recent.exists() && !old_complete.exists());
    }

    /// A `BACKUP` whose snapshot line states a sequence of u64::MAX (with a
    /// correct CRC32C: hand-edited, or written by another tool) is reported
    /// as a problem; it used to overflow `snap_seq + 1` in `check_contents`
    /// (a panic in a debug build, a wrong answer in a release one).
    #[test]
    fn verify_backup_refuses_a_snapshot_seq_above_max_seq() {
        let dir = tempfile::tempdir().unwrap();
        let b = dir.path();
        fs::create_dir(b.join("snapshots")).unwrap();
        fs::create_dir(b.join("log")).unwrap();
        let seg = super::super::log::encode_segment_header(1);
        fs::write(b.join("log/00000000000000000001.log"), seg).unwrap();
        let m = BackupManifest {
            created_ms: 1_700_000_000_000,
            snapshot: Some(BackupSnapshot {
                file: "snapshots/00000000000000000001.snap".into(),
                seq: u64::MAX,
                links: 0,
            }),
            seq: 1,
            links: 0,
            files: vec![
                BackupFile {
                    name: "MANIFEST".into(),
                    len: 0,
                    crc32c: 0,
                },
                BackupFile {
                    name: "snapshots/00000000000000000001.snap".into(),
                    len: 0,
                    crc32c: 0,
                },
                BackupFile {
                    name: "log/00000000000000000001.log".into(),
                    len: seg.len() as u64,
                    crc32c: crc32c::crc32c(&seg),
                },
            ],
        };
        fs::write(b.join(BACKUP_FILE), m.encode()).unwrap();
        let report = verify_backup(b);
        assert!(!report.is_ok());
        let problems = format!("{:?}", report.problems);
        assert!(problems.contains("is above"), "{problems}");
    }

    /// The same for `backup` of a data dir whose MANIFEST (correct CRC32C)
    /// states seq u64::MAX: it overflowed `snap_seq + 1` in `backup_once`.
    #[test]
    fn backup_refuses_a_manifest_seq_above_max_seq() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        fs::create_dir_all(data.join("log")).unwrap();
        fs::create_dir_all(data.join("snapshots")).unwrap();
        fs::write(data.join("snapshots/00000000000000000001.snap"), b"x").unwrap();
        let m = Manifest {
            snapshot: "00000000000000000001.snap".into(),
            seq: u64::MAX,
            links: 0,
        };
        fs::write(data.join("MANIFEST"), m.encode()).unwrap();
        for first in [1u64, 5] {
            let seg = super::super::log::encode_segment_header(first);
            fs::write(
                data.join("log")
                    .join(super::super::log::segment_file_name(first)),
                seg,
            )
            .unwrap();
        }
        let dest = dir.path().join("b");
        let err = backup(&data, &dest, &BackupOptions::default()).unwrap_err();
        assert!(err.to_string().contains("is above"), "{err}");
    }
}
