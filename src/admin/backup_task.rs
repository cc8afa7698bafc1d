//! Scheduled backups (`backup.dir`, `backup.interval_secs`,
//! `backup.keep_days`): a background thread of the admin, off the request
//! path, that takes an online backup of the data dir every interval into
//! `<backup.dir>/<UTC time>-seq<S>/` and then deletes the backups older than
//! `keep_days` (never the newest complete one). See
//! [`crate::store::backup`] and `docs/operations.md`.
//!
//! The next backup is due `interval` after the newest complete one in
//! `backup.dir`, so restarts of the admin neither skip nor repeat one. A
//! failure is logged, counted, and retried after a backoff (1 minute,
//! doubling, at most the interval).
//!
//! [`BackupStatus`] holds what the metrics expose
//! (`backup_last_success_timestamp_seconds`, `backup_last_duration_seconds`,
//! `backup_failures_total`): [`BackupStatus::register`] adds them to a
//! Prometheus registry; they are read from the atomics at each scrape.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::config::BackupConfig;
use crate::store::backup::{self, BackupManifest, BackupOptions};
use crate::store::record::now_ms;

/// First wait after a failed scheduled backup; doubles up to the interval.
const RETRY_MIN: Duration = Duration::from_secs(60);

/// What the scheduled backups did, for metrics and health. Lock-free reads.
#[derive(Debug, Default)]
pub struct BackupStatus {
    /// ms since the epoch the last successful backup was started; 0: none.
    last_success_ms: AtomicU64,
    /// How long the last successful backup took, in µs.
    last_duration_us: AtomicU64,
    /// S of the last successful backup.
    last_seq: AtomicU64,
    successes: AtomicU64,
    failures: AtomicU64,
    running: AtomicBool,
}

impl BackupStatus {
    /// Unix time of the last successful backup (of the newest complete one
    /// found in `backup.dir` at start-up); 0 when there is none.
    pub fn last_success_timestamp_seconds(&self) -> f64 {
        self.last_success_ms.load(Ordering::Relaxed) as f64 / 1000.0
    }

    /// How long the last successful backup took; 0 before the first one of
    /// this process.
    pub fn last_duration_seconds(&self) -> f64 {
        self.last_duration_us.load(Ordering::Relaxed) as f64 / 1e6
    }

    /// The sequence S the last successful backup holds.
    pub fn last_seq(&self) -> u64 {
        self.last_seq.load(Ordering::Relaxed)
    }

    /// Successful scheduled backups since start-up.
    pub fn successes(&self) -> u64 {
        self.successes.load(Ordering::Relaxed)
    }

    /// Failed scheduled backups since start-up.
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    /// Whether a backup is being taken now.
    pub fn is_running(&self) -> bool {
        self.running.load(Ordering::Relaxed)
    }

    fn record_success(&self, started_ms: u64, took: Duration, seq: u64) {
        self.last_duration_us.store(
            took.as_micros().min(u128::from(u64::MAX)) as u64,
            Ordering::Relaxed,
        );
        self.last_seq.store(seq, Ordering::Relaxed);
        self.last_success_ms.store(started_ms, Ordering::Relaxed);
        self.successes.fetch_add(1, Ordering::Relaxed);
    }

    /// Adds `backup_last_success_timestamp_seconds`,
    /// `backup_last_duration_seconds` and `backup_failures_total` to
    /// `registry`, read from this status at each scrape.
    pub fn register(self: &Arc<Self>, registry: &prometheus::Registry) -> prometheus::Result<()> {
        let collector = BackupCollector {
            status: self.clone(),
            last_success: prometheus::Gauge::new(
                "backup_last_success_timestamp_seconds",
                "Unix time the last successful backup of the data dir was started (0: none)",
            )?,
            last_duration: prometheus::Gauge::new(
                "backup_last_duration_seconds",
                "How long the last successful backup of the data dir took",
            )?,
            failures: prometheus::IntCounter::new(
                "backup_failures_total",
                "Scheduled backups of the data dir that failed",
            )?,
        };
        registry.register(Box::new(collector))
    }
}

/// Exposes a [`BackupStatus`] to Prometheus.
struct BackupCollector {
    status: Arc<BackupStatus>,
    last_success: prometheus::Gauge,
    last_duration: prometheus::Gauge,
    failures: prometheus::IntCounter,
}

impl prometheus::core::Collector for BackupCollector {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        let mut d = self.last_success.desc();
        d.extend(self.last_duration.desc());
        d.extend(self.failures.desc());
        d
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        self.last_success
            .set(self.status.last_success_timestamp_seconds());
        self.last_duration.set(self.status.last_duration_seconds());
        crate::metrics::mirror(&self.failures, self.status.failures());
        let mut m = self.last_success.collect();
        m.extend(self.last_duration.collect());
        m.extend(self.failures.collect());
        m
    }
}

/// The running scheduler. Dropping it (or [`BackupTask::stop`]) stops it
/// once a backup in progress is finished; one cut short by the process
/// exiting is left as a `.partial-*` directory, deleted by the next run.
pub struct BackupTask {
    stop: Arc<(Mutex<bool>, Condvar)>,
    thread: Option<JoinHandle<()>>,
}

impl BackupTask {
    /// Starts the scheduler when `config.dir` is set; `None` when backups
    /// are off (or the thread cannot be started, which is logged).
    pub fn start(
        data_dir: &Path,
        config: &BackupConfig,
        status: Arc<BackupStatus>,
    ) -> Option<Self> {
        let dir = config.dir.clone()?;
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let job = Job {
            data_dir: data_dir.to_owned(),
            dir,
            interval: config.interval,
            keep: config.keep,
            status,
            stop: stop.clone(),
        };
        match std::thread::Builder::new()
            .name("uload-backup".into())
            .spawn(move || job.run())
        {
            Ok(thread) => Some(Self {
                stop,
                thread: Some(thread),
            }),
            Err(e) => {
                tracing::error!(error = %e, "admin: cannot start the backup thread; scheduled backups are off");
                None
            }
        }
    }

    /// Asks the scheduler to stop and waits up to `wait` for it (for a
    /// backup in progress to finish).
    pub fn stop(mut self, wait: Duration) {
        self.signal_stop();
        let deadline = Instant::now() + wait;
        if let Some(thread) = self.thread.take() {
            while !thread.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if thread.is_finished() {
                let _ = thread.join();
            } else {
                tracing::warn!(
                    "admin: a scheduled backup is still running at shutdown; it is abandoned (incomplete, deleted by the next run)"
                );
            }
        }
    }

    fn signal_stop(&self) {
        let (flag, cv) = &*self.stop;
        *flag.lock().unwrap_or_else(|p| p.into_inner()) = true;
        cv.notify_all();
    }
}

impl Drop for BackupTask {
    fn drop(&mut self) {
        self.signal_stop();
    }
}

struct Job {
    data_dir: PathBuf,
    dir: PathBuf,
    interval: Duration,
    keep: Duration,
    status: Arc<BackupStatus>,
    stop: Arc<(Mutex<bool>, Condvar)>,
}

impl Job {
    fn run(self) {
        let mut next = self.first_due();
        let mut retry = RETRY_MIN.min(self.interval);
        while self.wait_until(next) {
            let started = Instant::now();
            let started_ms = now_ms();
            self.status.running.store(true, Ordering::Relaxed);
            let result = backup::backup_into(&self.data_dir, &self.dir, &BackupOptions::default());
            self.status.running.store(false, Ordering::Relaxed);
            match result {
                Ok(report) => {
                    let took = started.elapsed();
                    self.status
                        .record_success(started_ms, took, report.manifest.seq);
                    tracing::info!(
                        backup = %report.dest.display(),
                        seq = report.manifest.seq,
                        links = report.manifest.links,
                        attempts = report.attempts,
                        ms = took.as_millis() as u64,
                        "admin: scheduled backup written"
                    );
                    self.prune();
                    retry = RETRY_MIN.min(self.interval);
                    next = started + self.interval;
                }
                Err(e) => {
                    self.status.failures.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(
                        error = %e,
                        dir = %self.dir.display(),
                        retry_in_s = retry.as_secs(),
                        "admin: scheduled backup failed"
                    );
                    // Retention applies all the same: a backup dir that
                    // filled up gets back the space of the backups past
                    // their time (the newest complete one stays), and the
                    // retry can succeed without an operator.
                    self.prune();
                    next = Instant::now() + retry;
                    retry = (retry * 2).min(self.interval);
                }
            }
        }
    }

    /// Deletes the backups older than `keep` (never the newest complete
    /// one) and leftover partial ones.
    fn prune(&self) {
        match backup::prune_backups(&self.dir, self.keep, now_ms()) {
            Ok(p) if !p.removed.is_empty() => tracing::info!(
                removed = p.removed.len(),
                dir = %self.dir.display(),
                "admin: old backups deleted"
            ),
            Ok(_) => {}
            Err(e) => tracing::error!(error = %e, "admin: deleting old backups failed"),
        }
    }

    /// `interval` after the newest complete backup in `dir` (now when there
    /// is none); also reports that backup's time as the last success.
    /// Backups dated after now (taken while the clock was ahead) are passed
    /// over: counting from them would put the next backup off until then.
    fn first_due(&self) -> Instant {
        let now = now_ms();
        let newest = match backup::list_backups(&self.dir) {
            Ok(list) => list
                .into_iter()
                .rev()
                .filter(|b| b.complete)
                .map(|b| {
                    let taken_ms = BackupManifest::read(&b.path)
                        .map(|m| m.created_ms)
                        .unwrap_or(b.taken_ms);
                    (b, taken_ms)
                })
                .find(|(_, taken_ms)| *taken_ms <= now),
            Err(e) => {
                tracing::warn!(error = %e, "admin: cannot list the backup dir");
                None
            }
        };
        let Some((newest, taken_ms)) = newest else {
            return Instant::now();
        };
        self.status
            .last_success_ms
            .store(taken_ms, Ordering::Relaxed);
        self.status.last_seq.store(newest.seq, Ordering::Relaxed);
        let due_ms =
            taken_ms.saturating_add(self.interval.as_millis().min(u128::from(u64::MAX)) as u64);
        Instant::now() + Duration::from_millis(due_ms.saturating_sub(now_ms()))
    }

    /// Waits until `at`; false when asked to stop.
    fn wait_until(&self, at: Instant) -> bool {
        let (flag, cv) = &*self.stop;
        let mut stopped = flag.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if *stopped {
                return false;
            }
            let left = at.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return true;
            }
            stopped = cv
                .wait_timeout(stopped, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A data dir holding one link (`abc`), and its store (the writer).
    fn data_with_one_link() -> (tempfile::TempDir, crate::store::Store) {
        let data = tempfile::tempdir().unwrap();
        let store = crate::store::Store::open(data.path(), Default::default()).unwrap();
        let link = crate::store::Link::new("abc", "https://example.com/").unwrap();
        store.append(&[crate::store::LogOp::Put(link)]).unwrap();
        (data, store)
    }

    /// Waits (at most 30 s) until the task has made a backup.
    fn wait_for_a_backup(status: &BackupStatus) {
        let start = Instant::now();
        while status.successes() == 0 {
            assert!(start.elapsed() < Duration::from_secs(30), "no backup");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn status_is_exposed_to_prometheus() {
        let status = Arc::new(BackupStatus::default());
        let registry = prometheus::Registry::new();
        status.register(&registry).unwrap();
        status.record_success(1_700_000_000_500, Duration::from_millis(1500), 42);
        status.failures.fetch_add(2, Ordering::Relaxed);
        let text = String::from_utf8(crate::metrics::encode(&registry)).unwrap();
        assert!(
            text.contains("backup_last_success_timestamp_seconds 1700000000.5"),
            "{text}"
        );
        assert!(text.contains("backup_last_duration_seconds 1.5"), "{text}");
        assert!(text.contains("backup_failures_total 2"), "{text}");
        assert_eq!(status.last_seq(), 42);
    }

    /// A complete backup dated in the future (taken while the clock was
    /// ahead, or copied from a machine whose clock was) must not put the
    /// next scheduled backup off until that date plus the interval: the
    /// scheduler takes one as if there were none, and goes on from the
    /// newest backup not after now.
    #[test]
    fn a_backup_dated_in_the_future_does_not_stop_scheduled_backups() {
        let (data, _store) = data_with_one_link();
        let dir = tempfile::tempdir().unwrap();
        let seal = |ms: u64| backup::seal_empty_backup(dir.path(), ms, 0);
        let year_2100 = 4_102_444_800_000;
        seal(year_2100);
        let interval = Duration::from_secs(3600);
        let job = |status: Arc<BackupStatus>| Job {
            data_dir: data.path().to_owned(),
            dir: dir.path().to_owned(),
            interval,
            keep: Duration::from_secs(86_400),
            status,
            stop: Arc::new((Mutex::new(false), Condvar::new())),
        };
        // Only the future one: a backup is due now.
        let due = job(Arc::default()).first_due();
        assert!(due <= Instant::now(), "due in {:?}", due - Instant::now());
        // With one ten minutes old besides: due an interval after that one.
        seal(now_ms() - 600_000);
        let status = Arc::new(BackupStatus::default());
        let due = job(status.clone()).first_due();
        let now = Instant::now();
        assert!(due > now && due < now + interval, "due in {:?}", due - now);
        assert!(status.last_success_timestamp_seconds() < now_ms() as f64 / 1000.0);
        // And the task itself takes a backup at once with only the future
        // one in the dir.
        std::fs::remove_dir_all(backup::list_backups(dir.path()).unwrap()[0].path.clone()).unwrap();
        let config = BackupConfig {
            dir: Some(dir.path().to_owned()),
            interval,
            keep: Duration::from_secs(86_400),
        };
        let status = Arc::new(BackupStatus::default());
        let task = BackupTask::start(data.path(), &config, status.clone()).unwrap();
        wait_for_a_backup(&status);
        task.stop(Duration::from_secs(30));
        assert_eq!(status.last_seq(), 1);
    }

    #[test]
    fn scheduler_backs_up_prunes_and_stops() {
        let (data, _store) = data_with_one_link();
        let dir = tempfile::tempdir().unwrap();
        let old = dir
            .path()
            .join(backup::backup_dir_name(1_000_000_000_000, 0));
        std::fs::create_dir(&old).unwrap();
        let status = Arc::new(BackupStatus::default());
        let config = BackupConfig {
            dir: Some(dir.path().to_owned()),
            interval: Duration::from_secs(3600),
            keep: Duration::from_secs(86_400),
        };
        let task = BackupTask::start(data.path(), &config, status.clone()).unwrap();
        wait_for_a_backup(&status);
        task.stop(Duration::from_secs(30));
        let list = backup::list_backups(dir.path()).unwrap();
        assert_eq!(list.len(), 1, "{list:?}");
        assert!(list[0].complete && list[0].seq == 1);
        assert!(!old.exists());
        assert!(backup::verify_backup(&list[0].path).is_ok());
    }

    /// Retention does not wait for a backup to succeed: when backups fail
    /// (here the data dir is gone; in life, often a full backup dir), the
    /// backups past their time and leftover partial ones are deleted all
    /// the same, and the newest complete backup is kept.
    #[test]
    fn retention_runs_when_a_backup_fails() {
        let dir = tempfile::tempdir().unwrap();
        let day = 86_400_000;
        let old = backup::seal_empty_backup(dir.path(), now_ms() - 10 * day, 1);
        let newest = backup::seal_empty_backup(dir.path(), now_ms() - 3 * day, 2);
        let partial = dir.path().join(format!("{}x", backup::PARTIAL_PREFIX));
        std::fs::create_dir(&partial).unwrap();
        let not_a_dir = dir.path().join("not-a-data-dir");
        std::fs::write(&not_a_dir, b"").unwrap();
        let status = Arc::new(BackupStatus::default());
        let config = BackupConfig {
            dir: Some(dir.path().to_owned()),
            interval: Duration::from_secs(3600),
            keep: Duration::from_secs(86_400),
        };
        let task = BackupTask::start(&not_a_dir, &config, status.clone()).unwrap();
        let start = Instant::now();
        while status.failures() == 0 || old.exists() || partial.exists() {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "failures {}, old there {}, partial there {}",
                status.failures(),
                old.exists(),
                partial.exists()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        task.stop(Duration::from_secs(30));
        assert!(newest.exists(), "the newest complete backup is kept");
    }
}
