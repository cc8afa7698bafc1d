//! The edge's health endpoints, answered from memory:
//!
//! - `GET /health`: liveness. 200 whenever the process answers, with the
//!   detailed document below (its `status` says `degraded` when a readiness
//!   check fails, but the HTTP status stays 200: restarting a live edge
//!   never helps a redirect).
//! - `GET /health/ready`: readiness. The same document; 503 with
//!   `"status": "degraded"` and the failed checks' reasons when the table is
//!   not loaded or the log follower has been stuck for longer than
//!   `edge.follower_stall_secs`. The admin's state is reported, never a
//!   reason: redirects' readiness does not depend on it.
//!
//! Run it: `curl -s 127.0.0.1:8080/health/ready`.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use pingora::lb::LoadBalancer;
use pingora::lb::selection::RoundRobin;
use serde_json::json;

use crate::store::follower::FollowerStats;
use crate::store::record::now_ms;
use crate::store::view::HotTable;
use crate::sys::{disk_space, started};

/// What the health endpoints read. Cloning is not offered; the proxy owns it.
pub struct EdgeHealth {
    pub table: Arc<HotTable>,
    pub follower: Arc<FollowerStats>,
    pub admins: Arc<LoadBalancer<RoundRobin>>,
    pub data_dir: PathBuf,
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
        let backends = self.admins.backends();
        let upstreams: Vec<_> = backends
            .get_backend()
            .iter()
            .map(|b| json!({ "addr": b.addr.to_string(), "healthy": backends.ready(b) }))
            .collect();
        let disk = disk_space(&self.data_dir);
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
                "last_error": last_error,
            },
            "data_dir": {
                "path": self.data_dir.display().to_string(),
                "disk_total_bytes": disk.map(|d| d.total),
                "disk_available_bytes": disk.map(|d| d.available),
            },
            "admin": { "upstreams": upstreams },
        });
        (ok, doc.to_string())
    }
}
