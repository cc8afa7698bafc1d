//! The edge's `/health`: answered from memory, 200 whenever redirects can be
//! served (the admin's state is reported, never a reason to fail).

use std::sync::atomic::Ordering;

use pingora::lb::LoadBalancer;
use pingora::lb::selection::RoundRobin;
use serde_json::json;

use crate::store::follower::FollowerStats;
use crate::store::record::now_ms;
use crate::store::view::TableView;

/// The health document.
pub fn health_json(
    view: &TableView,
    follower: &FollowerStats,
    admins: &LoadBalancer<RoundRobin>,
) -> String {
    let since_applied_ms = view.last_applied_ms().map(|t| now_ms().saturating_sub(t));
    let backends = admins.backends();
    let upstreams: Vec<_> = backends
        .get_backend()
        .iter()
        .map(|b| json!({ "addr": b.addr.to_string(), "healthy": backends.ready(b) }))
        .collect();
    let last_error = follower.last_error.lock().ok().and_then(|e| e.clone());
    json!({
        "status": "ok",
        "table": {
            "seq": view.seq(),
            "links": view.len(),
            "snapshot_seq": view.snapshot_seq(),
            "overlay_records": view.overlay_len(),
            "ms_since_last_applied": since_applied_ms,
        },
        "follower": {
            "records_applied": follower.records_applied.load(Ordering::Relaxed),
            "snapshots_loaded": follower.snapshots_loaded.load(Ordering::Relaxed),
            "files_refused": follower.files_refused.load(Ordering::Relaxed),
            "last_error": last_error,
        },
        "admin": { "upstreams": upstreams },
    })
    .to_string()
}
