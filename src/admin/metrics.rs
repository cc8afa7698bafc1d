//! The admin's Prometheus metrics and the listener that serves them
//! (`metrics.admin_listen`).
//!
//! Request counts and latencies are recorded by the request middleware
//! through pre-registered handles; the log's figures (last sequence, appends,
//! failures) and the data dir's disk space are read when Prometheus scrapes;
//! fsync latency is observed by the link log itself.
//!
//! Run it: `uload admin`, then `curl -s 127.0.0.1:9091/metrics`.

use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};

use super::state::AdminState;
use crate::metrics::{CONTENT_TYPE, DISK_BUCKETS, HttpMetrics, encode, new_registry};

/// Everything the admin exports. Shared through `Arc` (in [`AdminState`]).
pub struct AdminMetrics {
    pub registry: Registry,
    pub http: HttpMetrics,
    /// Observed by the link log after each group commit's fsync.
    pub fsync: Histogram,
    appends: IntCounter,
    append_errors: IntCounter,
    last_seq: IntGauge,
    disk_size: IntGauge,
    disk_available: IntGauge,
    /// `[allowed, limited]` of `rate_limit_decisions_total{limit="api_key_writes"}`.
    limits: [IntCounter; 2],
    /// The log's sequence when the admin opened it (appends = growth since).
    seq_at_open: u64,
}

impl AdminMetrics {
    pub fn new(seq_at_open: u64) -> prometheus::Result<Self> {
        let registry = new_registry();
        let http = HttpMetrics::new(&registry)?;
        let fsync = Histogram::with_opts(
            HistogramOpts::new(
                "link_log_fsync_duration_seconds",
                "One group commit's fsync of the link log.",
            )
            .buckets(DISK_BUCKETS.to_vec()),
        )?;
        let appends = IntCounter::new(
            "link_log_appends_total",
            "Records appended to the link log and fsynced, since start-up.",
        )?;
        let append_errors = IntCounter::new(
            "link_log_append_errors_total",
            "Group commits that failed (disk full, read-only, I/O error), since start-up.",
        )?;
        let last_seq = IntGauge::new(
            "link_log_last_sequence",
            "Sequence number of the last record on disk.",
        )?;
        let disk_size = IntGauge::new(
            "data_dir_size_bytes",
            "Size of the file system holding the data dir.",
        )?;
        let disk_available = IntGauge::new(
            "data_dir_available_bytes",
            "Space left for the admin on the data dir's file system.",
        )?;
        let limits_vec = IntCounterVec::new(
            Opts::new(
                "rate_limit_decisions_total",
                "Rate-limit decisions at the admin, by limit and outcome.",
            ),
            &["limit", "decision"],
        )?;
        registry.register(Box::new(fsync.clone()))?;
        registry.register(Box::new(appends.clone()))?;
        registry.register(Box::new(append_errors.clone()))?;
        registry.register(Box::new(last_seq.clone()))?;
        registry.register(Box::new(disk_size.clone()))?;
        registry.register(Box::new(disk_available.clone()))?;
        registry.register(Box::new(limits_vec.clone()))?;
        let limits = [
            limits_vec.get_metric_with_label_values(&["api_key_writes", "allowed"])?,
            limits_vec.get_metric_with_label_values(&["api_key_writes", "limited"])?,
        ];
        Ok(Self {
            registry,
            http,
            fsync,
            appends,
            append_errors,
            last_seq,
            disk_size,
            disk_available,
            limits,
            seq_at_open,
        })
    }

    /// Counts one write-limit decision.
    pub fn limit_decision(&self, allowed: bool) {
        self.limits[usize::from(!allowed)].inc();
    }

    /// Brings the scrape-time figures up to date.
    fn refresh(&self, state: &AdminState) {
        let log = state.store().log();
        let seq = log.durable_seq();
        self.last_seq.set(i64::try_from(seq).unwrap_or(i64::MAX));
        crate::metrics::mirror(&self.appends, seq.saturating_sub(self.seq_at_open));
        crate::metrics::mirror(&self.append_errors, log.failure_count());
        if let Some(d) = crate::sys::disk_space(state.store().dir().root()) {
            self.disk_size
                .set(i64::try_from(d.total).unwrap_or(i64::MAX));
            self.disk_available
                .set(i64::try_from(d.available).unwrap_or(i64::MAX));
        }
    }
}

/// The metrics listener's router: `GET /metrics`.
pub fn metrics_app(state: AdminState) -> Router {
    Router::new()
        .route("/metrics", get(scrape))
        .with_state(state)
}

async fn scrape(State(state): State<AdminState>) -> impl IntoResponse {
    let metrics = state.metrics();
    metrics.refresh(&state);
    (
        [
            (header::CONTENT_TYPE, CONTENT_TYPE),
            (header::CACHE_CONTROL, "no-store"),
        ],
        encode(&metrics.registry),
    )
}
