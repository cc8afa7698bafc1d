//! The edge's health endpoints, answered from memory:
//!
//! - `GET /health`: liveness. 200 whenever the process answers, with the
//!   detailed document below (its `status` says `degraded` when a readiness
//!   check fails, but the HTTP status stays 200: restarting a live edge
//!   never helps a redirect).
//! - `GET /health/ready`: readiness. The same document; 503 with
//!   `"status": "degraded"` and the failed checks' reasons when the table is
//!   not loaded or the log follower has been stuck (or one of its polls
//!   has not returned) for longer than `edge.follower_stall_secs`. The
//!   admin's state is reported, never a reason: redirects' readiness does
//!   not depend on it.
//!
//! Run it: `curl -s 127.0.0.1:8080/health/ready`.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use pingora::lb::LoadBalancer;
use pingora::lb::selection::RoundRobin;
use serde_json::json;

use crate::store::follower::FollowerStats;
use crate::store::record::now_ms;
use crate::store::view::HotTable;
use crate::sys::{DiskSpace, disk_space, started};

/// The data dir's disk space, measured off the request path: by the log
/// follower's service after its reads (at most once a second), and once at
/// start-up. `statvfs` on a hung disk or mount blocks; on a Pingora worker
/// thread, as each `/health` probe used to call it, a load balancer's
/// probes would have pinned every worker.
#[derive(Debug, Default)]
pub struct DiskGauge {
    total: AtomicU64,
    available: AtomicU64,
    /// When it was last measured (ms since the epoch); 0: never.
    measured_ms: AtomicU64,
}

impl DiskGauge {
    /// How often [`DiskGauge::refresh_if_due`] measures.
    const EVERY_MS: u64 = 1000;

    /// Measures the disk space of `dir` now.
    pub fn refresh(&self, dir: &std::path::Path) {
        if let Some(d) = disk_space(dir) {
            self.total.store(d.total, Ordering::Relaxed);
            self.available.store(d.available, Ordering::Relaxed);
            self.measured_ms.store(now_ms().max(1), Ordering::Relaxed);
        }
    }

    /// [`DiskGauge::refresh`], when the last measure is a second old.
    pub fn refresh_if_due(&self, dir: &std::path::Path) {
        let last = self.measured_ms.load(Ordering::Relaxed);
        if now_ms().saturating_sub(last) >= Self::EVERY_MS {
            self.refresh(dir);
        }
    }

    /// When it was last measured (ms since the epoch), if ever.
    pub fn measured_ms(&self) -> Option<u64> {
        Some(self.measured_ms.load(Ordering::Relaxed)).filter(|&t| t > 0)
    }

    /// The last measure, if any.
    pub fn get(&self) -> Option<DiskSpace> {
        (self.measured_ms.load(Ordering::Relaxed) > 0).then(|| DiskSpace {
            total: self.total.load(Ordering::Relaxed),
            available: self.available.load(Ordering::Relaxed),
        })
    }
}

/// What the health endpoints read. Cloning is not offered; the proxy owns it.
pub struct EdgeHealth {
    pub table: Arc<HotTable>,
    pub follower: Arc<FollowerStats>,
    pub admins: Arc<LoadBalancer<RoundRobin>>,
    pub data_dir: PathBuf,
    /// Its disk space, as last measured off the request path.
    pub disk: Arc<DiskGauge>,
    /// How long the follower may be stuck before readiness fails.
    pub follower_stall: Duration,
}

impl EdgeHealth {
    /// The health document and whether every readiness check passed.
    pub fn report(&self) -> (bool, String) {
        let view = self.table.load_full();
        let now = now_ms();
        let mut failures: Vec<String> = Vec::new();
        let stuck_since = self.follower.stuck_since_ms.load(Ordering::Relaxed);
        let stuck_ms = (stuck_since > 0).then(|| now.saturating_sub(stuck_since));
        let last_error = self.follower.last_error.lock().ok().and_then(|e| e.clone());
        if let Some(ms) = stuck_ms
            && ms >= self.follower_stall.as_millis() as u64
        {
            failures.push(format!(
                "follower: stuck for {} s: {}",
                ms / 1000,
                last_error.as_deref().unwrap_or("unknown error")
            ));
        }
        // A poll that has not returned (a read blocked on a hung disk or
        // mount) sets nothing above, and the table no longer changes.
        let polling_since = self.follower.poll_started_ms.load(Ordering::Relaxed);
        let polling_ms = (polling_since > 0).then(|| now.saturating_sub(polling_since));
        if let Some(ms) = polling_ms
            && ms >= self.follower_stall.as_millis() as u64
        {
            failures.push(format!(
                "follower: a read of the data dir has not returned for {} s",
                ms / 1000
            ));
        }
        let backends = self.admins.backends();
        let upstreams: Vec<_> = backends
            .get_backend()
            .iter()
            .map(|b| json!({ "addr": b.addr.to_string(), "healthy": backends.ready(b) }))
            .collect();
        let disk = self.disk.get();
        let snapshot_age_s = view
            .snapshot()
            .map(|s| now.saturating_sub(s.header().created_at_ms) / 1000);
        let ok = failures.is_empty();
        let doc = json!({
            "status": if ok { "ok" } else { "degraded" },
            "reasons": failures,
            "version": env!("CARGO_PKG_VERSION"),
            "uptime_secs": started().elapsed().as_secs(),
            "table": {
                "loaded": true,
                "seq": view.seq(),
                "links": view.len(),
                "snapshot_seq": view.snapshot_seq(),
                "snapshot_age_secs": snapshot_age_s,
                "overlay_records": view.overlay_len(),
                "ms_since_last_applied": view.last_applied_ms().map(|t| now.saturating_sub(t)),
            },
            "follower": {
                "records_applied": self.follower.records_applied.load(Ordering::Relaxed),
                "snapshots_loaded": self.follower.snapshots_loaded.load(Ordering::Relaxed),
                "files_refused": self.follower.files_refused.load(Ordering::Relaxed),
                "stuck_ms": stuck_ms,
                "poll_running_ms": polling_ms,
                "last_error": last_error,
            },
            "data_dir": {
                "path": self.data_dir.display().to_string(),
                "disk_total_bytes": disk.map(|d| d.total),
                "disk_available_bytes": disk.map(|d| d.available),
                "disk_measured_ms_ago": self.disk.measured_ms().map(|t| now.saturating_sub(t)),
            },
            "admin": { "upstreams": upstreams },
        });
        (ok, doc.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::datadir::DataDir;
    use crate::store::follower::{LogFollower, RecordSource};
    use crate::store::frame::LogOpRef;
    use crate::store::log::{LogError, TailStatus};
    use crate::store::view::TableView;

    /// A record source whose poll blocks until told to go on, as a read of a
    /// hung disk or mount does.
    struct Blocked(std::sync::mpsc::Receiver<()>);

    impl RecordSource for Blocked {
        fn poll(
            &mut self,
            _visit: &mut dyn FnMut(u64, LogOpRef<'_>),
        ) -> Result<TailStatus, LogError> {
            let _ = self.0.recv();
            Ok(TailStatus::CaughtUp)
        }
        fn reset(&mut self, _after_seq: u64) {}
    }

    /// Readiness fails while a follower's poll has not returned for longer
    /// than the stall time (nothing else marks such a follower stuck), and
    /// passes again once it returns.
    #[test]
    fn readiness_fails_while_a_poll_does_not_return() {
        let dir = tempfile::tempdir().unwrap();
        let (go_on, rx) = std::sync::mpsc::channel();
        let mut follower = LogFollower::with_source(
            DataDir::new(dir.path()),
            TableView::new(None),
            None,
            Box::new(Blocked(rx)),
        );
        let health = EdgeHealth {
            table: follower.table(),
            follower: follower.stats(),
            admins: Arc::new(LoadBalancer::try_from_iter(["127.0.0.1:9"]).unwrap()),
            data_dir: dir.path().to_owned(),
            disk: Arc::default(),
            follower_stall: Duration::from_millis(50),
        };
        assert!(health.report().0, "{}", health.report().1);
        let poller = std::thread::spawn(move || {
            follower.poll_once();
        });
        let start = std::time::Instant::now();
        while health.report().0 {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "ready while a poll hangs"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        let (ready, doc) = health.report();
        assert!(!ready);
        assert!(doc.contains("has not returned"), "{doc}");
        go_on.send(()).unwrap();
        poller.join().unwrap();
        let (ready, doc) = health.report();
        assert!(ready, "{doc}");
    }

    /// `/health` reports the disk space last measured off the request path
    /// (it does not measure it itself, where a hung disk would block the
    /// worker answering): here the data dir named is gone, and the figures
    /// are the gauge's.
    #[test]
    fn health_reports_the_disk_space_measured_off_the_request_path() {
        let dir = tempfile::tempdir().unwrap();
        let disk = Arc::new(DiskGauge::default());
        assert!(disk.get().is_none());
        disk.refresh(dir.path());
        let measured = disk.get().expect("measured");
        assert!(measured.total > 0);
        let follower = LogFollower::open(dir.path()).unwrap();
        let health = EdgeHealth {
            table: follower.table(),
            follower: follower.stats(),
            admins: Arc::new(LoadBalancer::try_from_iter(["127.0.0.1:9"]).unwrap()),
            data_dir: dir.path().join("gone"),
            disk,
            follower_stall: Duration::from_secs(30),
        };
        let doc: serde_json::Value = serde_json::from_str(&health.report().1).unwrap();
        assert_eq!(doc["data_dir"]["disk_total_bytes"], measured.total);
        assert!(doc["data_dir"]["disk_available_bytes"].is_u64(), "{doc}");
    }
}
