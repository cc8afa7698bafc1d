//! `LogFollower`: keeps a [`HotTable`] up to date with a data dir, off the
//! request path. Each poll picks up a new snapshot named by the manifest (if
//! any), then the log records written since the last poll, and publishes one
//! new view if anything changed. A file that fails validation is refused
//! (counted, logged) and the current view stays in service.
//!
//! Where records come from is behind [`RecordSource`]: the log files of a
//! shared data dir today, a replicated log (NATS JetStream) past one machine.
//!
//! ```
//! use std::time::{Duration, Instant};
//! use uload::store::{LogFollower, LogOp, Store, record::Link};
//! let dir = tempfile::tempdir().unwrap();
//! let store = Store::open(dir.path(), Default::default()).unwrap();
//! let follower = LogFollower::open(dir.path()).unwrap();
//! let table = follower.table();
//! let _running = follower.spawn(Duration::from_millis(2)); // stops when dropped
//! store.append(&[LogOp::Put(Link::new("new", "https://example.com/").unwrap())]).unwrap();
//! while table.load().get(b"new").is_none() { std::thread::yield_now(); }
//! ```

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::datadir::{DataDir, Manifest, StoreError};
use super::frame::LogOpRef;
use super::log::{LogError, LogTail, TailStatus};
use super::record::now_ms;
use super::view::{HotTable, TableView};

/// A source of log records in sequence order.
pub trait RecordSource: Send {
    /// Calls `visit` for each record newer than the last one returned.
    fn poll(&mut self, visit: &mut dyn FnMut(u64, LogOpRef<'_>)) -> Result<TailStatus, LogError>;
    /// Continues after `after_seq` (used when a newer snapshot is loaded).
    fn reset(&mut self, after_seq: u64);
}

/// The shared data dir's log files as a record source.
pub struct FileLogSource {
    tail: LogTail,
    dir: std::path::PathBuf,
}

impl FileLogSource {
    pub fn new(log_dir: &Path, after_seq: u64) -> Self {
        Self {
            tail: LogTail::new(log_dir, after_seq),
            dir: log_dir.to_owned(),
        }
    }
}

impl RecordSource for FileLogSource {
    fn poll(&mut self, visit: &mut dyn FnMut(u64, LogOpRef<'_>)) -> Result<TailStatus, LogError> {
        self.tail.poll(visit)
    }

    fn reset(&mut self, after_seq: u64) {
        self.tail = LogTail::new(&self.dir, after_seq);
    }
}

/// Counters a follower keeps; read them from any thread (metrics, /health).
#[derive(Debug, Default)]
pub struct FollowerStats {
    pub polls: AtomicU64,
    pub records_applied: AtomicU64,
    pub views_published: AtomicU64,
    pub snapshots_loaded: AtomicU64,
    /// Snapshots, manifests or log files refused because they failed validation.
    pub files_refused: AtomicU64,
    /// When (ms since the epoch) a file was last refused; 0: never since
    /// start-up. Set before `files_refused` moves.
    pub last_refused_ms: AtomicU64,
    pub last_error: Mutex<Option<String>>,
    /// Since when (ms since the epoch) the follower has been unable to read
    /// on in the log; 0 while it is not stuck.
    pub stuck_since_ms: AtomicU64,
    /// When (ms since the epoch) the read of the data dir under way (a
    /// poll, or a look at its disk space) began; 0 between them. One that
    /// never returns (blocked on a hung disk or mount) sets nothing else:
    /// this is how readiness sees it.
    pub poll_started_ms: AtomicU64,
}

impl FollowerStats {
    /// Runs `f`, a read of the data dir (a poll, a look at its disk space),
    /// with `poll_started_ms` set: one that does not return is seen by
    /// readiness. Cleared however `f` ends, a panic included.
    pub fn reading<R>(&self, f: impl FnOnce() -> R) -> R {
        struct Reading<'a>(&'a AtomicU64);
        impl Drop for Reading<'_> {
            fn drop(&mut self) {
                self.0.store(0, Ordering::Relaxed);
            }
        }
        self.poll_started_ms
            .store(now_ms().max(1), Ordering::Relaxed);
        let _reading = Reading(&self.poll_started_ms);
        f()
    }

    /// The follower has stopped for good (`why`): from now on it counts as
    /// stuck, which readiness reports once `edge.follower_stall_secs` have
    /// passed, while the edge serves the last view it published.
    pub fn stopped(&self, why: &str) {
        let _ = self.stuck_since_ms.compare_exchange(
            0,
            now_ms().max(1),
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(why.to_owned());
    }

    /// `refuse`, unless `slot` (where one step of the poll keeps the
    /// problem it last met) already holds `error`: a problem that stays, or
    /// comes back at every retry, is logged and counted once, even while
    /// another step's problem comes and goes in between.
    fn refuse_new(&self, slot: &mut Option<String>, error: String) {
        if slot.as_deref() != Some(&error) {
            self.refuse(error.clone());
        }
        *slot = Some(error);
    }

    fn refuse(&self, error: String) {
        // Logged before counted: whoever sees the count can find the line.
        tracing::error!(%error, "link store: refused a file; still serving the current view");
        self.last_refused_ms
            .store(now_ms().max(1), Ordering::Relaxed);
        self.files_refused.fetch_add(1, Ordering::Relaxed);
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(error);
    }
}

/// What one poll did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PollOutcome {
    /// Records applied.
    pub applied: u64,
    /// Sequence of a snapshot swapped in.
    pub new_snapshot: Option<u64>,
    /// A new view was published.
    pub published: bool,
}

/// Tails a data dir and publishes views into a [`HotTable`].
pub struct LogFollower {
    dir: DataDir,
    table: Arc<HotTable>,
    /// The working copy; published (cheaply cloned) after each change.
    view: TableView,
    source: Box<dyn RecordSource>,
    /// The manifest last acted on (loaded or refused), to act once per change.
    manifest_seen: Option<Manifest>,
    /// (inode, length, mtime) of the manifest file when last read.
    manifest_stat: Option<(u64, u64, Option<std::time::SystemTime>)>,
    /// The log problem the last poll hit, so that a bad file is refused (and
    /// logged and counted) once, not on every poll while it stays.
    log_problem: Option<String>,
    /// Why the view must be loaded from disk again (the log was cut back
    /// under it) while a reload has not yet succeeded: the tail reports a
    /// cut-back once, so a reload that failed (EMFILE, say) is retried at
    /// every poll, and no record is applied to the stale view meanwhile.
    /// With the time of the next try when the last one failed on what a
    /// file holds (a checksum pass of every file at every poll would be the
    /// cost); `None` retries at every poll (an I/O error: EMFILE, EIO).
    reload_owed: Option<(String, Option<Instant>)>,
    /// The manifest or snapshot problem the last check met.
    manifest_problem: Option<String>,
    /// The "no segment holds the records" problem the last poll met.
    gap_problem: Option<String>,
    stats: Arc<FollowerStats>,
}

/// How long a reload that failed on a file's contents waits to be tried again.
const RELOAD_RETRY: Duration = Duration::from_secs(10);

impl LogFollower {
    /// Loads the data dir at `root` (snapshot with checksums verified, then
    /// the log) and returns a follower whose table serves it.
    pub fn open(root: &Path) -> Result<Self, StoreError> {
        let dir = DataDir::new(root);
        let manifest = dir.read_manifest()?;
        let view = dir.load_view(true)?;
        let source = Box::new(FileLogSource::new(&dir.log_dir(), view.seq()));
        Ok(Self::with_source(dir, view, manifest, source))
    }

    /// A follower over `view` reading new records from `source`.
    pub fn with_source(
        dir: DataDir,
        view: TableView,
        manifest: Option<Manifest>,
        source: Box<dyn RecordSource>,
    ) -> Self {
        Self {
            table: Arc::new(HotTable::new(view.clone())),
            dir,
            view,
            source,
            manifest_seen: manifest,
            manifest_stat: None,
            log_problem: None,
            reload_owed: None,
            manifest_problem: None,
            gap_problem: None,
            stats: Arc::default(),
        }
    }

    /// The table this follower publishes into.
    pub fn table(&self) -> Arc<HotTable> {
        self.table.clone()
    }

    /// The follower's counters.
    pub fn stats(&self) -> Arc<FollowerStats> {
        self.stats.clone()
    }

    /// Picks up a new snapshot and new log records; publishes if anything changed.
    pub fn poll_once(&mut self) -> PollOutcome {
        let stats = self.stats.clone();
        stats.reading(|| self.poll_inner())
    }

    fn poll_inner(&mut self) -> PollOutcome {
        self.stats.polls.fetch_add(1, Ordering::Relaxed);
        let mut outcome = PollOutcome {
            new_snapshot: self.check_manifest(),
            ..Default::default()
        };
        // Views a reader still held when they were replaced are dropped
        // here, on the follower's thread, once the reader is done.
        self.table.reap();
        if let Some((why, retry_at)) = self.reload_owed.clone() {
            let failed = if retry_at.is_none_or(|at| Instant::now() >= at) {
                self.reload_from_disk(&why, &mut outcome).err()
            } else {
                Some(self.log_problem.clone().unwrap_or(why))
            };
            if let Some(problem) = failed {
                // Not even a snapshot loaded meanwhile is published: the
                // view still holds the records cut off the log.
                outcome.new_snapshot = None;
                return self.finish(outcome, Some(problem), false);
            }
        }
        let view = &mut self.view;
        let mut bad_record = None;
        let status = self.source.poll(&mut |seq, op| match view.apply(seq, op) {
            Ok(()) => outcome.applied += 1,
            Err(e) => {
                bad_record.get_or_insert(format!("record {seq}: {e}"));
            }
        });
        let mut problem = bad_record;
        let mut stuck = false;
        match status {
            Ok(TailStatus::CaughtUp) => self.gap_problem = None,
            Ok(TailStatus::NeedSnapshot) if outcome.new_snapshot.is_none() => {
                stuck = true;
                // Records we need were compacted away: the manifest names a
                // snapshot holding them (it is written before segments are
                // removed), which the next poll's manifest check picks up. If
                // that snapshot was refused, say so once; do not re-verify it
                // every poll.
                let text = format!(
                    "no log segment holds the records after {} (compacted away, or a later segment that does not belong) and no usable newer snapshot is available",
                    self.view.seq()
                );
                self.stats.refuse_new(&mut self.gap_problem, text);
            }
            // The snapshot loaded in this poll holds them; the tail was reset.
            Ok(TailStatus::NeedSnapshot) => {}
            Err(e @ LogError::Rewound { .. }) => {
                // Records this view holds were cut off the log (a batch whose
                // fsync failed) and may be replaced by others under the same
                // sequences: only a reload from disk is right.
                let text = e.to_string();
                self.stats.refuse(text.clone());
                if let Err(reload) = self.reload_from_disk(&text, &mut outcome) {
                    problem = Some(reload);
                }
            }
            Err(e) => problem = problem.or(Some(e.to_string())),
        }
        self.finish(outcome, problem, stuck)
    }

    /// Loads the view from disk again after the log was cut back under it
    /// (`why`); on failure the reload stays owed, and the problem is returned.
    fn reload_from_disk(&mut self, why: &str, outcome: &mut PollOutcome) -> Result<(), String> {
        match self.dir.load_view(true) {
            Ok(view) => {
                tracing::warn!(
                    seq = view.seq(),
                    "link store: view reloaded from disk after the log was cut back"
                );
                self.source.reset(view.seq());
                self.view = view;
                outcome.new_snapshot = Some(self.view.snapshot_seq());
                self.reload_owed = None;
                Ok(())
            }
            Err(reload) => {
                let retry_at = reload
                    .io_error()
                    .is_none()
                    .then(|| Instant::now() + RELOAD_RETRY);
                self.reload_owed = Some((why.to_owned(), retry_at));
                Err(format!("{why}; reloading: {reload}"))
            }
        }
    }

    /// Counts and logs a poll's problem (once while it stays), keeps the
    /// stuck time for `/health`, and publishes the view if it changed.
    fn finish(
        &mut self,
        mut outcome: PollOutcome,
        problem: Option<String>,
        mut stuck: bool,
    ) -> PollOutcome {
        if let Some(text) = &problem
            && problem != self.log_problem
        {
            self.stats.refuse(text.clone());
        }
        stuck |= problem.is_some();
        if !stuck {
            self.stats.stuck_since_ms.store(0, Ordering::Relaxed);
        } else if self.stats.stuck_since_ms.load(Ordering::Relaxed) == 0 {
            self.stats.stuck_since_ms.store(now_ms(), Ordering::Relaxed);
        }
        self.log_problem = problem;
        if outcome.applied > 0 || outcome.new_snapshot.is_some() {
            self.stats
                .records_applied
                .fetch_add(outcome.applied, Ordering::Relaxed);
            self.stats.views_published.fetch_add(1, Ordering::Relaxed);
            self.table.publish(Arc::new(self.view.clone()));
            outcome.published = true;
        }
        outcome
    }

    /// Loads the snapshot a changed manifest names. Returns its sequence when
    /// it was swapped into the working view.
    fn check_manifest(&mut self) -> Option<u64> {
        // The manifest is replaced by rename, so (inode, length, mtime)
        // changes whenever it does: one `stat` per idle poll, no read.
        let stat = std::fs::metadata(self.dir.manifest_path()).ok().map(|m| {
            use std::os::unix::fs::MetadataExt;
            (m.ino(), m.len(), m.modified().ok())
        });
        if stat.is_some() && stat == self.manifest_stat {
            return None;
        }
        self.manifest_stat = stat;
        let manifest = match self.dir.read_manifest() {
            Ok(Some(m)) => m,
            Ok(None) => return None,
            Err(e) => {
                if e.io_error().is_some() {
                    // Reading failed (EMFILE, EIO...): nothing is known of the
                    // file, so the next poll reads it again.
                    self.manifest_stat = None;
                }
                self.stats
                    .refuse_new(&mut self.manifest_problem, e.to_string());
                return None;
            }
        };
        if self.manifest_seen.as_ref() == Some(&manifest)
            || manifest.seq <= self.view.snapshot_seq()
        {
            self.manifest_seen = Some(manifest);
            return None;
        }
        self.manifest_seen = Some(manifest.clone());
        let opened = self.dir.open_manifest_snapshot(&manifest, true);
        if opened.as_ref().is_err_and(|e| e.io_error().is_some()) {
            // Opening failed for a reason outside the file (EMFILE, ENOMEM
            // for the mapping, EIO): try it again at the next poll. A file
            // refused for what it holds is not verified again until the
            // manifest changes (a checksum pass over a large snapshot at
            // every poll would be the cost).
            self.manifest_seen = None;
            self.manifest_stat = None;
        }
        let result = opened
            .map_err(|e| e.to_string())
            .and_then(|snap| self.view.rebase(snap));
        match result {
            Ok(()) => {
                self.manifest_problem = None;
                self.stats.snapshots_loaded.fetch_add(1, Ordering::Relaxed);
                if manifest.seq >= self.view.seq() {
                    self.source.reset(manifest.seq);
                }
                Some(manifest.seq)
            }
            // Once per manifest, or per failed retry of an open that failed
            // for a reason outside the file.
            Err(e) => {
                self.stats.refuse_new(&mut self.manifest_problem, e);
                None
            }
        }
    }

    /// Runs the follower on its own thread, polling every `interval`, until
    /// the returned handle is dropped.
    pub fn spawn(mut self, interval: Duration) -> FollowerHandle {
        let stop = Arc::new(AtomicBool::new(false));
        let stop_flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("uload-log-follower".into())
            .spawn(move || {
                while !stop_flag.load(Ordering::Acquire) {
                    self.poll_once();
                    std::thread::park_timeout(interval);
                }
            })
            .ok();
        FollowerHandle { stop, thread }
    }
}

/// Keeps a spawned follower running; dropping it stops and joins the thread.
pub struct FollowerHandle {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl FollowerHandle {
    /// Whether the thread started.
    pub fn is_running(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }
}

impl Drop for FollowerHandle {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}
