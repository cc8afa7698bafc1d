//! [`AdminState`]: the admin's store, its view of the link table and the write
//! path every change goes through.
//!
//! A write is three steps:
//!
//! 1. **Reserve** (a short critical section under one `Mutex`): check the
//!    codes against the current view and the codes other in-flight writes
//!    hold, and claim them. This is what makes two concurrent creates of one
//!    code end in one 201 and one 409.
//! 2. **Append**, on the admin's one writer thread (`uload-admin-writer`):
//!    the handler queues its ops with its reservation and awaits the answer.
//!    The writer takes every write queued meanwhile as one batch (group
//!    commit: one `Store::append`, one fsync), outside the lock.
//! 3. **Apply** under the lock: the batch's records go into the admin's
//!    `TableView` in sequence order, the view is published to a
//!    [`HotTable`] for lock-free reads once per batch, the codes are
//!    released, and only then does each write of the batch get its answer
//!    (201 after fsync, and visible to reads). A failed append fails every
//!    write of the batch and releases their codes at once.
//!
//! Steps 2 and 3 run on the writer thread, so a client that hangs up
//! mid-request cannot leave a code reserved or a durable record unapplied.
//! One thread doing whole batches replaces a blocking task per write that
//! waited for its fsync and then for the writes before it: under a burst
//! that saves most thread wake-ups, and publishes one view per fsync
//! instead of one per write.
//! After `admin.compact_every_records` records, a background thread compacts
//! the data dir and rebases the view onto the new snapshot.

use crate::store::record::RedirectStatus;
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak, mpsc};
use std::time::{Duration, Instant};

use ring::rand::SystemRandom;

use super::codes::{generate_code, is_reserved};
use super::error::{ApiError, ErrorCode};
use crate::config::Config;
use crate::store::frame::LogOpRef;
use crate::store::record::{Link, validate_code};
use crate::store::{
    CompactReport, HotTable, LogError, LogOp, LogOptions, Store, StoreError, TableView,
};

/// Why the admin could not start or stop cleanly.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// Opening the data dir failed; `StoreError::Locked` when another writer
    /// (admin, import, compact) holds it.
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(
        "{path}: the view loaded from the data dir ends at sequence {view} but its log at {log}"
    )]
    Inconsistent {
        path: std::path::PathBuf,
        view: u64,
        log: u64,
    },
    #[error("admin.listen {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("metrics.admin_listen {addr}: {source}")]
    BindMetrics {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("registering metrics: {0}")]
    Metrics(prometheus::Error),
    #[error(transparent)]
    RateLimitState(#[from] crate::state_file::StateError),
    #[error("starting the admin's runtime: {0}")]
    Runtime(std::io::Error),
    #[error("serving the admin API: {0}")]
    Serve(std::io::Error),
    #[error("compaction: {0}")]
    Compaction(String),
}

/// Most attempts at a free generated code before answering 503.
const GENERATE_ATTEMPTS: usize = 16;

/// The writer stops adding queued writes to a batch at this many ops (a
/// batch is one append: one write and one fsync).
const WRITE_BATCH_MAX_OPS: usize = 4096;

/// Wait before retrying a background compaction that failed; doubled after
/// each failure up to [`COMPACTION_RETRY_MAX`], reset by a success (and by a
/// write that succeeds after failed ones: space came back).
const COMPACTION_RETRY_MIN: Duration = Duration::from_secs(1);
const COMPACTION_RETRY_MAX: Duration = Duration::from_secs(300);

/// The admin API's shared state. Cloning copies an `Arc`.
#[derive(Clone)]
pub struct AdminState {
    shared: Arc<Shared>,
}

struct Shared {
    /// The single writer of the data dir (holds its lock while alive).
    store: Store,
    /// The view GETs, lists and health read, lock-free.
    table: HotTable,
    /// The master view and reservations.
    writes: Mutex<WriteState>,
    /// Queue of the writer thread (`writer_loop`): steps 2 and 3 of every
    /// write. The thread ends when this is dropped.
    writer: mpsc::Sender<Job>,
    /// Set while a compaction runs; shared with the compaction thread so
    /// that it can clear it after letting go of everything else.
    compacting: Arc<AtomicBool>,
    /// What the scheduled backups did (`backup_task.rs`), for metrics.
    backup: Arc<super::backup_task::BackupStatus>,
    /// Set while the last append failed (disk full, read-only, I/O error);
    /// cleared by the next append that succeeds. The log retries the disk on
    /// every append, so this recovers without a restart.
    write_failed: AtomicBool,
    /// The error code of the last failed append (for `/api/health`).
    write_error: Mutex<Option<ErrorCode>>,
    /// Set when the log writer panicked: only a restart helps.
    broken: AtomicBool,
    /// When a failed background compaction may be retried.
    compaction_retry: Mutex<CompactionRetry>,
    rng: SystemRandom,
    settings: Settings,
    /// The admin's Prometheus series.
    metrics: Arc<super::metrics::AdminMetrics>,
    /// The per-API-key write limit, if configured.
    write_limit: Option<super::limits::WriteLimit>,
    /// The last write probe of `/api/health`: when, and what it found.
    probe: Mutex<Option<(Instant, Result<(), ProbeFailure>)>>,
    /// Set while a write probe runs.
    probing: AtomicBool,
}

/// The parts of the config the API uses.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub public_base_url: String,
    pub key_hashes: Vec<[u8; 32]>,
    pub max_body_bytes: usize,
    pub code_length: usize,
    pub max_bulk: usize,
    pub compact_every_records: u64,
    pub retry_after_secs: u64,
    /// Status of links created without one (`edge.default_status`).
    pub default_status: RedirectStatus,
}

#[derive(Debug, Clone, Copy)]
struct CompactionRetry {
    /// No background compaction starts before this (after a failure).
    not_before: Option<Instant>,
    /// The wait after the next failure.
    delay: Duration,
    /// Failures since the last success.
    failures: u64,
}

struct WriteState {
    /// Every applied record; published (cloned) into `table` on change.
    view: TableView,
    /// Codes claimed by writes that are not applied yet.
    in_flight: HashSet<String>,
    /// Records appended since the last compaction started.
    since_compaction: u64,
}

fn lock(m: &Mutex<WriteState>) -> MutexGuard<'_, WriteState> {
    // A panic while holding the lock leaves WriteState consistent enough
    // (each step mutates it at the end); keep serving.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn op_ref(op: &LogOp) -> LogOpRef<'_> {
    match op {
        LogOp::Put(link) => LogOpRef::Put(link.as_ref()),
        LogOp::Delete(code) => LogOpRef::Delete(code.as_bytes()),
    }
}

impl AdminState {
    /// Opens `config.data_dir` as its single writer and loads the link table.
    /// Fails with [`StoreError::Locked`] while another writer holds the dir.
    pub fn open(config: &Config) -> Result<Self, AdminError> {
        let store = Store::open(&config.data_dir, LogOptions::default())?;
        let view = store.dir().load_view(true)?;
        let durable = store.log().durable_seq();
        if view.seq() != durable {
            return Err(AdminError::Inconsistent {
                path: config.data_dir.clone(),
                view: view.seq(),
                log: durable,
            });
        }
        if config.admin.api_key_hashes.is_empty() {
            tracing::warn!(
                "admin: no API key configured (admin.api_key_hashes, ULOAD_API_KEY): every /api request but /api/health will get 401"
            );
        }
        let a = &config.admin;
        let settings = Settings {
            public_base_url: config.public_base_url.trim_end_matches('/').to_owned(),
            key_hashes: a.api_key_hashes.clone(),
            max_body_bytes: a.max_body_bytes,
            code_length: a.code_length,
            max_bulk: a.max_bulk,
            default_status: config.edge.default_status,
            compact_every_records: a.compact_every_records,
            retry_after_secs: config.edge.retry_after_secs,
        };
        let since_compaction = view.overlay_len() as u64;
        let metrics =
            Arc::new(super::metrics::AdminMetrics::new(durable).map_err(AdminError::Metrics)?);
        let fsync = metrics.fsync.clone();
        store
            .log()
            .observe_fsync(move |d| fsync.observe(d.as_secs_f64()));
        let write_limit =
            super::limits::WriteLimit::open(&config.rate_limit, config.admin.max_bulk)?;
        let backup = Arc::<super::backup_task::BackupStatus>::default();
        if config.backup.dir.is_some() {
            backup
                .register(&metrics.registry)
                .map_err(AdminError::Metrics)?;
        }
        tracing::info!(
            data_dir = %config.data_dir.display(),
            seq = view.seq(),
            links = view.len(),
            "admin: link table loaded"
        );
        let (writer, jobs) = mpsc::channel();
        let shared = Arc::new(Shared {
            store,
            table: HotTable::new(view.clone()),
            writes: Mutex::new(WriteState {
                view,
                in_flight: HashSet::new(),
                since_compaction,
            }),
            writer,
            compacting: Arc::new(AtomicBool::new(false)),
            backup,
            write_failed: AtomicBool::new(false),
            write_error: Mutex::new(None),
            broken: AtomicBool::new(false),
            compaction_retry: Mutex::new(CompactionRetry {
                not_before: None,
                delay: COMPACTION_RETRY_MIN,
                failures: 0,
            }),
            rng: SystemRandom::new(),
            settings,
            metrics,
            write_limit,
            probe: Mutex::new(None),
            probing: AtomicBool::new(false),
        });
        // The thread holds a weak reference: dropping the last AdminState
        // drops the store (and the data dir's lock) and the queue, which ends
        // the thread.
        let weak = Arc::downgrade(&shared);
        std::thread::Builder::new()
            .name("uload-admin-writer".into())
            .spawn(move || writer_loop(weak, jobs))
            .map_err(AdminError::Runtime)?;
        Ok(Self { shared })
    }

    /// Whether the log's directory took a write and an fsync in the last
    /// probe: a 4 KiB file written, fsynced and removed next to the log (the
    /// same directory and file system as the log), so a full, read-only or
    /// failing disk shows here before a client's write finds it. Probes run
    /// in the background at most once a second; this never waits on one (a
    /// slow fsync must not make a health check time out).
    pub fn probe_write(&self) -> Result<(), ProbeFailure> {
        let last = self
            .shared
            .probe
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let stale = last
            .as_ref()
            .is_none_or(|(at, _)| at.elapsed() >= Duration::from_secs(1));
        if stale && !self.shared.probing.swap(true, Ordering::AcqRel) {
            let state = self.clone();
            let spawned = std::thread::Builder::new()
                .name("admin-write-probe".into())
                .spawn(move || {
                    let result = state.write_probe_file();
                    *state.shared.probe.lock().unwrap_or_else(|p| p.into_inner()) =
                        Some((Instant::now(), result));
                    state.shared.probing.store(false, Ordering::Release);
                });
            if spawned.is_err() {
                self.shared.probing.store(false, Ordering::Release);
            }
        }
        last.map_or(Ok(()), |(_, result)| result)
    }

    fn write_probe_file(&self) -> Result<(), ProbeFailure> {
        let path = self.shared.store.log().dir().join(".health-probe");
        let result = (|| -> std::io::Result<()> {
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(true)
                .open(&path)?;
            f.write_all(&[0u8; 4096])?;
            f.sync_data()?;
            drop(f);
            std::fs::remove_file(&path)
        })()
        // The system's reason only: `/api/health` needs no key and is
        // reached through the edge, so it does not show the server's paths.
        .map_err(|e| ProbeFailure {
            code: if super::error::is_out_of_space(&e) {
                ErrorCode::InsufficientStorage
            } else {
                ErrorCode::StorageError
            },
            reason: e.to_string(),
        });
        if result.is_err() {
            let _ = std::fs::remove_file(&path);
        }
        result
    }

    /// The admin's metrics.
    pub fn metrics(&self) -> &super::metrics::AdminMetrics {
        &self.shared.metrics
    }

    /// The per-API-key write limit, if configured.
    pub fn write_limit(&self) -> Option<&super::limits::WriteLimit> {
        self.shared.write_limit.as_ref()
    }

    /// The current view of the link table (every acknowledged write is in
    /// it). Lock-free.
    pub fn view(&self) -> Arc<TableView> {
        self.shared.table.load_full()
    }

    /// The data dir's writer (for its log's counters, or a manual compaction
    /// outside the API: prefer [`AdminState::compact`], which also rebases).
    pub fn store(&self) -> &Store {
        &self.shared.store
    }

    /// Whether the last write succeeded (false after the log failed one,
    /// until a write succeeds again: every write retries the disk).
    pub fn is_writable(&self) -> bool {
        !self.shared.write_failed.load(Ordering::Acquire) && !self.needs_restart()
    }

    /// The error code the last write failed with, while writes fail
    /// (`insufficient_storage`, `storage_error`).
    pub fn write_error(&self) -> Option<ErrorCode> {
        if self.is_writable() {
            return None;
        }
        *self
            .shared
            .write_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the log writer is broken for good (it panicked): only a
    /// restart makes writes work again.
    pub fn needs_restart(&self) -> bool {
        self.shared.broken.load(Ordering::Acquire)
    }

    /// Background compactions that failed since the last one that worked.
    pub fn compaction_failures(&self) -> u64 {
        self.shared.compaction_retry_state().failures
    }

    /// What the scheduled backups did: read it for the backup metrics
    /// ([`super::backup_task::BackupStatus::register`]).
    pub fn backup_status(&self) -> Arc<super::backup_task::BackupStatus> {
        self.shared.backup.clone()
    }

    /// Whether a compaction is running.
    pub fn is_compacting(&self) -> bool {
        self.shared.compacting.load(Ordering::Acquire)
    }

    /// Compacts the data dir now and rebases the view onto the new snapshot.
    /// `Ok(None)` when a compaction was already running.
    pub async fn compact(&self) -> Result<Option<CompactReport>, AdminError> {
        if self.shared.compacting.swap(true, Ordering::AcqRel) {
            return Ok(None);
        }
        let shared = self.shared.clone();
        let flag = shared.compacting.clone();
        let result = tokio::task::spawn_blocking(move || {
            let r = shared.compact_and_rebase();
            drop(shared);
            r
        })
        .await;
        flag.store(false, Ordering::Release);
        match result {
            Ok(r) => r.map(Some),
            Err(e) => Err(AdminError::Compaction(e.to_string())),
        }
    }

    pub(crate) fn settings(&self) -> &Settings {
        &self.shared.settings
    }

    pub(crate) fn key_hashes(&self) -> &[[u8; 32]] {
        &self.shared.settings.key_hashes
    }

    /// Step 1 of a write: runs `claim` under the write lock; every code it
    /// claims through the [`Claims`] is held by the returned [`Reservation`]
    /// until the write is applied or the reservation dropped.
    pub(crate) fn reserve<R>(&self, claim: impl FnOnce(&mut Claims<'_>) -> R) -> (Reservation, R) {
        let mut codes = Vec::new();
        let result = {
            let mut st = lock(&self.shared.writes);
            let mut claims = Claims {
                st: &mut st,
                codes: &mut codes,
                shared: &self.shared,
            };
            claim(&mut claims)
        };
        (
            Reservation {
                shared: self.shared.clone(),
                codes,
            },
            result,
        )
    }

    /// Steps 2 and 3 of a write: appends `ops` (one fsync for all of them),
    /// applies them and releases `reservation`. Returns the sequence of the
    /// last op once it is durable and visible to reads.
    pub(crate) async fn commit(
        &self,
        reservation: Reservation,
        ops: Vec<LogOp>,
    ) -> Result<u64, ApiError> {
        if ops.is_empty() {
            return Ok(self.view().seq());
        }
        let (reply, answer) = tokio::sync::oneshot::channel();
        let job = WriteJob {
            ops,
            reservation,
            reply,
        };
        // A refused job (the writer is gone) is dropped here with its
        // reservation, which releases the codes.
        if self.shared.writer.send(Job::Write(job)).is_err() {
            tracing::error!("admin: the writer thread is gone");
            return Err(ApiError::new(ErrorCode::Internal, "the write task failed"));
        }
        match answer.await {
            Ok(result) => result,
            Err(_) => {
                tracing::error!("admin: a write batch failed without an answer (panic)");
                Err(ApiError::new(ErrorCode::Internal, "the write task failed"))
            }
        }
    }
}

/// Why the health check's write probe failed: the error code a write
/// failing the same way gets, and the system's reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeFailure {
    pub code: ErrorCode,
    pub reason: String,
}

/// Keeps the writer thread from starting another batch while alive (see
/// [`AdminState::hold_writes`]).
#[doc(hidden)]
pub struct WritesHeld {
    _release: mpsc::Sender<()>,
}

impl AdminState {
    /// Tests only: returns once the writer thread has finished the writes
    /// queued before this call and waits; writes queued from now on (their
    /// codes reserved) stay in flight until the returned guard is dropped.
    /// Blocks the calling thread: do not call it on an async runtime.
    #[doc(hidden)]
    pub fn hold_writes(&self) -> WritesHeld {
        let (release, held) = mpsc::channel();
        let (started, running) = mpsc::channel();
        if self.shared.writer.send(Job::Hold { started, held }).is_ok() {
            let _ = running.recv();
        }
        WritesHeld { _release: release }
    }
}

/// What the writer thread is asked to do.
enum Job {
    Write(WriteJob),
    /// Say so on `started`, then wait until `held`'s sender is dropped.
    Hold {
        started: mpsc::Sender<()>,
        held: mpsc::Receiver<()>,
    },
}

/// One write queued for the writer thread.
struct WriteJob {
    ops: Vec<LogOp>,
    reservation: Reservation,
    reply: tokio::sync::oneshot::Sender<Result<u64, ApiError>>,
}

type Reply = (
    tokio::sync::oneshot::Sender<Result<u64, ApiError>>,
    Result<u64, ApiError>,
);

/// The writer thread: takes the first queued write and every write queued
/// behind it (up to [`WRITE_BATCH_MAX_OPS`] ops) as one batch, until the
/// queue is dropped with the admin's state.
fn writer_loop(shared: Weak<Shared>, jobs: mpsc::Receiver<Job>) {
    let mut next = None;
    loop {
        let first = match next.take() {
            Some(job) => job,
            None => match jobs.recv() {
                Ok(job) => job,
                Err(_) => break,
            },
        };
        let first = match first {
            Job::Write(job) => job,
            Job::Hold { started, held } => {
                let _ = started.send(());
                let _ = held.recv();
                continue;
            }
        };
        let mut ops = first.ops.len();
        let mut batch = vec![first];
        while ops < WRITE_BATCH_MAX_OPS {
            match jobs.try_recv() {
                Ok(Job::Write(job)) => {
                    ops += job.ops.len();
                    batch.push(job);
                }
                Ok(hold) => {
                    next = Some(hold);
                    break;
                }
                Err(_) => break,
            }
        }
        // Every job holds the state through its reservation, so this only
        // fails if the state is being torn down.
        let Some(strong) = shared.upgrade() else {
            break;
        };
        let replies =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| strong.write_batch(batch)));
        if replies.is_err() {
            // Its records may be durable but not in the view, and their
            // codes reserved: only a restart sets that right, which health
            // now says.
            strong.broken.store(true, Ordering::Release);
        }
        // Let go of the state before anyone is answered: a caller that drops
        // its AdminState after its answer must find the data dir unlocked.
        drop(strong);
        match replies {
            Ok(replies) => {
                for (reply, result) in replies {
                    let _ = reply.send(result);
                }
            }
            // The batch's answers were dropped: each of its writes gets 500.
            Err(_) => tracing::error!("admin: a write batch panicked"),
        }
    }
}

/// Codes claimed by one write. Dropping it releases them, unless the write
/// was appended (then they are released when the write is applied).
pub(crate) struct Reservation {
    shared: Arc<Shared>,
    codes: Vec<String>,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.codes.is_empty() {
            return;
        }
        let mut st = lock(&self.shared.writes);
        for code in self.codes.drain(..) {
            st.in_flight.remove(&code);
        }
    }
}

/// What a write may do while it holds the write lock (see
/// [`AdminState::reserve`]). Keep the work done here small.
pub(crate) struct Claims<'a> {
    st: &'a mut WriteState,
    codes: &'a mut Vec<String>,
    shared: &'a Shared,
}

impl Claims<'_> {
    fn busy(&self, code: &str) -> bool {
        self.st.in_flight.contains(code)
    }

    fn take(&mut self, code: &str) {
        self.st.in_flight.insert(code.to_owned());
        self.codes.push(code.to_owned());
    }

    /// Claims `code` for a new link: 409 if a link has it or a write holds it.
    pub fn new_code(&mut self, code: &str) -> Result<(), ApiError> {
        if self.busy(code) || self.st.view.get(code.as_bytes()).is_some() {
            return Err(ApiError::new(
                ErrorCode::DuplicateCode,
                format!("a link with code {code:?} already exists"),
            )
            .on("code"));
        }
        self.take(code);
        Ok(())
    }

    /// Claims a fresh random code (`admin.code_length` base62 characters).
    pub fn generated_code(&mut self) -> Result<String, ApiError> {
        let len = self.shared.settings.code_length;
        for _ in 0..GENERATE_ATTEMPTS {
            let code = generate_code(&self.shared.rng, len).map_err(|_| {
                ApiError::new(ErrorCode::Internal, "the system random generator failed")
            })?;
            debug_assert!(validate_code(code.as_bytes()).is_ok() && !is_reserved(&code));
            if !self.busy(&code) && self.st.view.get(code.as_bytes()).is_none() {
                self.take(&code);
                return Ok(code);
            }
        }
        tracing::warn!(
            code_length = len,
            "admin: no free generated code after {GENERATE_ATTEMPTS} attempts; raise admin.code_length"
        );
        Err(ApiError {
            retry_after: Some(self.shared.settings.retry_after_secs),
            ..ApiError::new(
                ErrorCode::Unavailable,
                "no free short code could be generated; retry, or choose a code",
            )
        })
    }

    /// Claims the existing link `code` for a change: 404 if there is none,
    /// 409 `conflict` while another write to it is in flight.
    pub fn existing(&mut self, code: &str) -> Result<Link, ApiError> {
        if self.busy(code) {
            return Err(ApiError::new(
                ErrorCode::Conflict,
                "another change to this link is in progress; retry",
            ));
        }
        let link = self
            .st
            .view
            .get(code.as_bytes())
            .ok_or_else(ApiError::not_found)?
            .to_link()
            .map_err(|e| ApiError::new(ErrorCode::Internal, e.to_string()))?;
        self.take(code);
        Ok(link)
    }
}

impl Shared {
    /// Runs on the writer thread: appends the ops of every write of `batch`
    /// with one append (one fsync), applies them, publishes the view once,
    /// and returns each write's answer.
    fn write_batch(self: &Arc<Self>, batch: Vec<WriteJob>) -> Vec<Reply> {
        let mut replies = Vec::with_capacity(batch.len());
        let mut accepted = Vec::with_capacity(batch.len());
        let mut ops: Vec<LogOp> = Vec::with_capacity(batch.iter().map(|j| j.ops.len()).sum());
        for job in batch {
            // The log refuses a whole append for one invalid op: check each
            // write's own ops first, so that one write cannot fail the others.
            // Handlers validate first, so this is a bug, not a bad request.
            if let Err(e) = job.ops.iter().try_for_each(LogOp::validate) {
                tracing::error!(error = %e, "admin: the log refused a record as invalid");
                replies.push((job.reply, Err(ApiError::from_record(&e))));
                continue; // dropping the reservation releases its codes
            }
            accepted.push((job.reply, job.reservation, job.ops.len() as u64));
            ops.extend(job.ops);
        }
        if ops.is_empty() {
            return replies;
        }
        let count = ops.len() as u64;
        let last = match self.store.append(&ops) {
            Ok(last) => last,
            Err(e) => {
                let error = match &e {
                    StoreError::Log(LogError::Invalid(e)) => {
                        tracing::error!(error = %e, "admin: the log refused a record as invalid");
                        ApiError::from_record(e)
                    }
                    // Nothing of `ops` is in the log (the batch was cut off
                    // the file); the next write retries the disk.
                    _ => {
                        if matches!(e, StoreError::Log(LogError::Poisoned(_))) {
                            self.broken.store(true, Ordering::Release);
                        }
                        let error = ApiError::from_store(&e, self.settings.retry_after_secs);
                        *self.write_error.lock().unwrap_or_else(|p| p.into_inner()) =
                            Some(error.code);
                        self.write_failed.store(true, Ordering::Release);
                        error
                    }
                };
                for (reply, reservation, _) in accepted {
                    drop(reservation); // releases the codes
                    replies.push((reply, Err(error.clone())));
                }
                return replies;
            }
        };
        if self.write_failed.swap(false, Ordering::AcqRel) {
            tracing::warn!("admin: writes to the data dir work again");
            // Space came back: a compaction waiting out a failure may run.
            let mut retry = self
                .compaction_retry
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            retry.not_before = None;
            retry.delay = COMPACTION_RETRY_MIN;
        }
        // From here on the codes are released as their ops are applied.
        let mut end = last - count;
        for (reply, mut reservation, n) in accepted {
            reservation.codes.clear();
            drop(reservation);
            end += n;
            replies.push((reply, Ok(end)));
        }
        let mut st = lock(&self.writes);
        for (seq, op) in (last + 1 - count..).zip(&ops) {
            // Ops at or below the view's sequence are already in it (a
            // compaction's snapshot took them); apply ignores those.
            if let Err(e) = st.view.apply(seq, op_ref(op)) {
                tracing::error!(seq, error = %e, "admin: cannot apply a durable record");
            }
            st.in_flight.remove(op.code());
        }
        self.publish(&st);
        st.since_compaction += count;
        let compact = st.since_compaction >= self.settings.compact_every_records
            && self.compaction_allowed()
            && !self.compacting.swap(true, Ordering::AcqRel);
        if compact {
            st.since_compaction = 0;
        }
        drop(st);
        if compact {
            self.spawn_compaction();
        }
        replies
    }

    fn publish(&self, st: &WriteState) {
        self.table.publish(Arc::new(st.view.clone()));
    }

    fn compaction_retry_state(&self) -> CompactionRetry {
        *self
            .compaction_retry
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a background compaction may start now (not while waiting
    /// out an earlier failure).
    fn compaction_allowed(&self) -> bool {
        self.compaction_retry_state()
            .not_before
            .is_none_or(|t| Instant::now() >= t)
    }

    /// Starts a background compaction (the caller has set `compacting`).
    /// A failure (a full or read-only disk) is logged and retried later:
    /// the records stay in the log, which is all a compaction reads, and the
    /// snapshot and manifest are only ever replaced whole.
    fn spawn_compaction(self: &Arc<Self>) {
        let shared = self.clone();
        let flag = self.compacting.clone();
        let spawned = std::thread::Builder::new()
            .name("uload-compact".into())
            .spawn(move || {
                let result = shared.compact_and_rebase();
                let mut retry = shared
                    .compaction_retry
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                match result {
                    Ok(_) => {
                        *retry = CompactionRetry {
                            not_before: None,
                            delay: COMPACTION_RETRY_MIN,
                            failures: 0,
                        };
                        drop(retry);
                    }
                    Err(e) => {
                        retry.failures += 1;
                        retry.not_before = Some(Instant::now() + retry.delay);
                        tracing::error!(
                            error = %e,
                            failures = retry.failures,
                            retry_in_s = retry.delay.as_secs(),
                            "admin: background compaction failed; every record is still in the log, retrying later"
                        );
                        retry.delay = (retry.delay * 2).min(COMPACTION_RETRY_MAX);
                        drop(retry);
                        // Due again as soon as the wait is over.
                        let mut st = lock(&shared.writes);
                        st.since_compaction = st
                            .since_compaction
                            .max(shared.settings.compact_every_records);
                    }
                }
                drop(shared);
                flag.store(false, Ordering::Release);
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "admin: cannot start a compaction thread");
            self.compacting.store(false, Ordering::Release);
        }
    }

    /// Compacts, then rebases the master view onto the new snapshot. The
    /// snapshot is opened and checked outside the write lock.
    fn compact_and_rebase(&self) -> Result<CompactReport, AdminError> {
        let started = Instant::now();
        let report = self.store.compact()?;
        let Some(info) = &report.snapshot else {
            return Ok(report);
        };
        let Some(snapshot) = self.store.dir().open_snapshot(true)? else {
            return Err(AdminError::Compaction(
                "the manifest names no snapshot after compaction".into(),
            ));
        };
        let mut st = lock(&self.writes);
        st.view.rebase(snapshot).map_err(AdminError::Compaction)?;
        self.publish(&st);
        tracing::info!(
            snapshot = %info.path.display(),
            records = report.records,
            removed = report.removed.len(),
            ms = started.elapsed().as_millis() as u64,
            "admin: compacted the data dir"
        );
        Ok(report)
    }
}
