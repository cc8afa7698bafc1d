//! The edge's Prometheus metrics and the listener that serves them.
//!
//! Per-request recording goes through handles resolved at start-up
//! ([`EdgeMetrics::redirect_result`], [`crate::metrics::HttpMetrics`]); the
//! link table, follower and upstream figures are read from their own atomics
//! when Prometheus scrapes ([`TableCollector`]), so they cost the request
//! path nothing.
//!
//! Run it: `uload edge`, then `curl -s 127.0.0.1:9090/metrics`.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use async_trait::async_trait;
use pingora::apps::http_app::ServeHttp;
use pingora::lb::LoadBalancer;
use pingora::lb::selection::RoundRobin;
use pingora::protocols::http::ServerSession;
use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

use super::redirect::Miss;
use crate::metrics::{CONTENT_TYPE, HttpMetrics, encode, new_registry};
use crate::store::follower::FollowerStats;
use crate::store::record::now_ms;
use crate::store::view::HotTable;

/// What happened to a request for a short code (`link_redirects_total{result}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RedirectResult {
    Served,
    NotFound,
    Expired,
    Disabled,
    RateLimited,
    /// A link whose click budget is spent.
    Exhausted,
}

/// The edge's rate limits (`rate_limit_decisions_total{limit,decision}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitKind {
    ClientRequests,
    ClientMisses,
}

impl From<Miss> for RedirectResult {
    fn from(miss: Miss) -> Self {
        match miss {
            Miss::Unknown => Self::NotFound,
            Miss::Disabled => Self::Disabled,
            Miss::Expired => Self::Expired,
            Miss::Exhausted => Self::Exhausted,
        }
    }
}

/// Kinds of failure talking to an admin upstream (`admin_proxy_errors_total{kind}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyErrorKind {
    /// No healthy upstream to send to.
    NoUpstream,
    /// Connecting failed or timed out.
    Connect,
    /// The upstream did not answer within the read timeout.
    Timeout,
    /// The upstream closed or reset the connection, or sent garbage.
    Upstream,
    /// The client went away or sent something unusable.
    Downstream,
    Other,
}

impl ProxyErrorKind {
    const ALL: [ProxyErrorKind; 6] = [
        Self::NoUpstream,
        Self::Connect,
        Self::Timeout,
        Self::Upstream,
        Self::Downstream,
        Self::Other,
    ];

    fn as_str(self) -> &'static str {
        match self {
            Self::NoUpstream => "no_upstream",
            Self::Connect => "connect",
            Self::Timeout => "timeout",
            Self::Upstream => "upstream",
            Self::Downstream => "downstream",
            Self::Other => "other",
        }
    }
}

/// Everything the edge exports. Shared through `Arc`; the registry owns the
/// series, the fields are handles into it.
pub struct EdgeMetrics {
    pub registry: Registry,
    pub http: HttpMetrics,
    redirects: [IntCounter; 6],
    /// `[ClientRequests|ClientMisses][allowed|limited]`.
    limits: [[IntCounter; 2]; 2],
    proxy_errors: [IntCounter; 6],
    proxy_retries: IntCounter,
    /// Access-log lines dropped because the writer fell behind.
    pub access_log_dropped: IntCounter,
    /// Requests answered by the redirect fast path (`fast_path.rs`).
    pub fast_path_answers: IntCounter,
    /// Connections held by the redirect loops (`redirect_loop.rs`), how
    /// many they accepted, and how many they gave to Pingora.
    pub redirect_loop_connections: IntGauge,
    pub redirect_loop_accepts: IntCounter,
    pub redirect_loop_handbacks: IntCounter,
    pub redirect_loop_busy_poll_hits: IntCounter,
    /// Answers a loop could not write whole at once (the client's side was
    /// full), finished when the socket took them.
    pub redirect_loop_write_waits: IntCounter,
}

impl EdgeMetrics {
    /// Registers every edge series, including the scrape-time collector over
    /// the table, the follower's counters and the admin upstreams' health.
    pub fn new(
        table: Arc<HotTable>,
        follower: Arc<FollowerStats>,
        admins: Arc<LoadBalancer<RoundRobin>>,
    ) -> prometheus::Result<Self> {
        let registry = new_registry();
        let http = HttpMetrics::new(&registry)?;
        let redirects_vec = IntCounterVec::new(
            Opts::new(
                "link_redirects_total",
                "Requests for a short code, by what the edge answered.",
            ),
            &["result"],
        )?;
        registry.register(Box::new(redirects_vec.clone()))?;
        let redirects = [
            redirects_vec.get_metric_with_label_values(&["served"])?,
            redirects_vec.get_metric_with_label_values(&["not_found"])?,
            redirects_vec.get_metric_with_label_values(&["expired"])?,
            redirects_vec.get_metric_with_label_values(&["disabled"])?,
            redirects_vec.get_metric_with_label_values(&["rate_limited"])?,
            redirects_vec.get_metric_with_label_values(&["exhausted"])?,
        ];
        let limits_vec = IntCounterVec::new(
            Opts::new(
                "rate_limit_decisions_total",
                "Rate-limit decisions at the edge, by limit and outcome.",
            ),
            &["limit", "decision"],
        )?;
        registry.register(Box::new(limits_vec.clone()))?;
        let pair = |limit: &str| -> prometheus::Result<[IntCounter; 2]> {
            Ok([
                limits_vec.get_metric_with_label_values(&[limit, "allowed"])?,
                limits_vec.get_metric_with_label_values(&[limit, "limited"])?,
            ])
        };
        let limits = [pair("client_requests")?, pair("client_misses")?];
        let errors_vec = IntCounterVec::new(
            Opts::new(
                "admin_proxy_errors_total",
                "Failed attempts to proxy /api requests to an admin upstream, by kind.",
            ),
            &["kind"],
        )?;
        registry.register(Box::new(errors_vec.clone()))?;
        let mut proxy_errors = Vec::with_capacity(ProxyErrorKind::ALL.len());
        for kind in ProxyErrorKind::ALL {
            proxy_errors.push(errors_vec.get_metric_with_label_values(&[kind.as_str()])?);
        }
        let proxy_errors: [IntCounter; 6] = proxy_errors
            .try_into()
            .map_err(|_| prometheus::Error::Msg("proxy error kinds".into()))?;
        let proxy_retries = IntCounter::new(
            "admin_proxy_retries_total",
            "Retries of /api requests to an admin upstream.",
        )?;
        registry.register(Box::new(proxy_retries.clone()))?;
        let access_log_dropped = IntCounter::new(
            "access_log_dropped_total",
            "Access-log lines dropped because the writer fell behind, or lost to a failed write (a full disk).",
        )?;
        registry.register(Box::new(access_log_dropped.clone()))?;
        let fast_path_answers = IntCounter::new(
            "edge_fast_path_answers_total",
            "Short-code requests answered by the fast path, without Pingora's request objects.",
        )?;
        registry.register(Box::new(fast_path_answers.clone()))?;
        let redirect_loop_connections = IntGauge::new(
            "edge_redirect_loop_connections",
            "Cleartext connections served by the redirect loops.",
        )?;
        registry.register(Box::new(redirect_loop_connections.clone()))?;
        let redirect_loop_accepts = IntCounter::new(
            "edge_redirect_loop_accepts_total",
            "Cleartext connections the redirect loops accepted.",
        )?;
        registry.register(Box::new(redirect_loop_accepts.clone()))?;
        let redirect_loop_handbacks = IntCounter::new(
            "edge_redirect_loop_handbacks_total",
            "Connections a redirect loop gave to Pingora (a request the fast path does not answer).",
        )?;
        registry.register(Box::new(redirect_loop_handbacks.clone()))?;
        let redirect_loop_busy_poll_hits = IntCounter::new(
            "edge_redirect_loop_busy_poll_hits_total",
            "Waits of a redirect loop that events ended while it polled (edge.busy_poll_us), without a sleep.",
        )?;
        registry.register(Box::new(redirect_loop_busy_poll_hits.clone()))?;
        let redirect_loop_write_waits = IntCounter::new(
            "edge_redirect_loop_write_waits_total",
            "Answers a redirect loop could not write at once and sent when the socket had room.",
        )?;
        registry.register(Box::new(redirect_loop_write_waits.clone()))?;
        registry.register(Box::new(TableCollector::new(table, follower, admins)?))?;
        Ok(Self {
            registry,
            http,
            redirects,
            limits,
            proxy_errors,
            proxy_retries,
            access_log_dropped,
            fast_path_answers,
            redirect_loop_connections,
            redirect_loop_accepts,
            redirect_loop_handbacks,
            redirect_loop_busy_poll_hits,
            redirect_loop_write_waits,
        })
    }

    /// Counts one request for a short code.
    pub fn redirect_result(&self, result: RedirectResult) {
        self.redirects[result as usize].inc();
    }

    /// Counts one rate-limit decision.
    pub fn limit_decision(&self, kind: LimitKind, allowed: bool) {
        self.limits[kind as usize][usize::from(!allowed)].inc();
    }

    /// Counts one failed attempt at an admin upstream.
    pub fn proxy_error(&self, kind: ProxyErrorKind) {
        self.proxy_errors[kind as usize].inc();
    }

    /// Counts one retry of an /api request.
    pub fn proxy_retry(&self) {
        self.proxy_retries.inc();
    }
}

/// Reads the link table, the follower's counters and the upstreams' health
/// when Prometheus scrapes. Counters mirror the follower's atomics (they only
/// grow, so each scrape adds the difference).
pub struct TableCollector {
    table: Arc<HotTable>,
    follower: Arc<FollowerStats>,
    admins: Arc<LoadBalancer<RoundRobin>>,
    links: IntGauge,
    seq: IntGauge,
    snapshot_seq: IntGauge,
    overlay: IntGauge,
    since_applied_ms: IntGauge,
    snapshot_age_s: IntGauge,
    records_applied: IntCounter,
    swaps: IntCounter,
    refused: IntCounter,
    last_refused_s: IntGauge,
    upstream_up: IntGaugeVec,
    descs: Vec<Desc>,
}

impl TableCollector {
    fn new(
        table: Arc<HotTable>,
        follower: Arc<FollowerStats>,
        admins: Arc<LoadBalancer<RoundRobin>>,
    ) -> prometheus::Result<Self> {
        let gauge = |name: &str, help: &str| IntGauge::new(name, help);
        let counter = |name: &str, help: &str| IntCounter::new(name, help);
        let c = Self {
            links: gauge(
                "link_table_links",
                "Live links in the table the edge serves.",
            )?,
            seq: gauge(
                "link_table_sequence",
                "Sequence number of the last log record the table holds.",
            )?,
            snapshot_seq: gauge(
                "link_table_snapshot_sequence",
                "Sequence number of the snapshot under the table.",
            )?,
            overlay: gauge(
                "link_table_overlay_records",
                "Log records held in memory on top of the snapshot.",
            )?,
            since_applied_ms: gauge(
                "link_table_milliseconds_since_last_applied",
                "Milliseconds since the last log record was applied (-1: none since start-up).",
            )?,
            snapshot_age_s: gauge(
                "link_snapshot_age_seconds",
                "Age of the snapshot under the table (-1: no snapshot).",
            )?,
            records_applied: counter(
                "link_log_records_applied_total",
                "Log records the follower applied to the table.",
            )?,
            swaps: counter(
                "link_snapshot_swaps_total",
                "Snapshots validated and swapped in under the table.",
            )?,
            refused: counter(
                "link_files_refused_total",
                "Snapshots, manifests or log files refused because they failed validation.",
            )?,
            last_refused_s: gauge(
                "link_files_last_refused_timestamp_seconds",
                "When a file was last refused (Unix time; 0: none since start-up).",
            )?,
            upstream_up: IntGaugeVec::new(
                Opts::new(
                    "admin_upstream_up",
                    "1 when the admin upstream passes its health check.",
                ),
                &["upstream"],
            )?,
            descs: Vec::new(),
            table,
            follower,
            admins,
        };
        let mut descs = Vec::new();
        for m in c.members() {
            descs.extend(m.desc().into_iter().cloned());
        }
        Ok(Self { descs, ..c })
    }

    fn members(&self) -> [&dyn Collector; 11] {
        [
            &self.links,
            &self.seq,
            &self.snapshot_seq,
            &self.overlay,
            &self.since_applied_ms,
            &self.snapshot_age_s,
            &self.records_applied,
            &self.swaps,
            &self.refused,
            &self.last_refused_s,
            &self.upstream_up,
        ]
    }
}

fn clamp_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl Collector for TableCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let view = self.table.load_full();
        let now = now_ms();
        self.links.set(clamp_i64(view.len()));
        self.seq.set(clamp_i64(view.seq()));
        self.snapshot_seq.set(clamp_i64(view.snapshot_seq()));
        self.overlay.set(clamp_i64(view.overlay_len() as u64));
        self.since_applied_ms.set(
            view.last_applied_ms()
                .map_or(-1, |t| clamp_i64(now.saturating_sub(t))),
        );
        self.snapshot_age_s.set(view.snapshot().map_or(-1, |s| {
            clamp_i64(now.saturating_sub(s.header().created_at_ms) / 1000)
        }));
        drop(view);
        let f = &self.follower;
        crate::metrics::mirror(
            &self.records_applied,
            f.records_applied.load(Ordering::Relaxed),
        );
        crate::metrics::mirror(&self.swaps, f.snapshots_loaded.load(Ordering::Relaxed));
        crate::metrics::mirror(&self.refused, f.files_refused.load(Ordering::Relaxed));
        self.last_refused_s
            .set(clamp_i64(f.last_refused_ms.load(Ordering::Relaxed) / 1000));
        let backends = self.admins.backends();
        for b in backends.get_backend().iter() {
            self.upstream_up
                .with_label_values(&[&b.addr.to_string()])
                .set(i64::from(backends.ready(b)));
        }
        self.members().iter().flat_map(|m| m.collect()).collect()
    }
}

/// The metrics listener's app: `GET /metrics` gets the exposition.
pub struct MetricsApp {
    pub metrics: Arc<EdgeMetrics>,
}

#[async_trait]
impl ServeHttp for MetricsApp {
    async fn response(&self, session: &mut ServerSession) -> http::Response<Vec<u8>> {
        let path_ok = session.req_header().uri.path() == "/metrics";
        let builder = http::Response::builder().header("cache-control", "no-store");
        let resp = if path_ok {
            let body = encode(&self.metrics.registry);
            builder
                .status(200)
                .header("content-type", CONTENT_TYPE)
                .header("content-length", body.len())
                .body(body)
        } else {
            let body = b"metrics are at /metrics\n".to_vec();
            builder
                .status(404)
                .header("content-type", "text/plain")
                .header("content-length", body.len())
                .body(body)
        };
        resp.unwrap_or_else(|_| http::Response::new(Vec::new()))
    }
}
