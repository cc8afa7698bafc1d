//! Prometheus metrics shared by the edge and the admin: the HTTP request
//! counters and latency histograms both expose, process metrics, and the text
//! exposition served on each component's own metrics listener.
//!
//! Recording is cheap by construction: every series a redirect touches is
//! resolved once, at start-up, into a handle ([`HttpMetrics::record`] is an
//! array index and two atomic adds); labels are a small fixed set (`route` is
//! never a short code), so cardinality stays bounded whatever the table size.
//!
//! Run it: `uload up`, then `curl -s 127.0.0.1:9090/metrics` (edge) or
//! `curl -s 127.0.0.1:9091/metrics` (admin).

use std::sync::OnceLock;
use std::time::Duration;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts, Registry,
    TextEncoder,
};

/// Buckets of `http_request_duration_seconds`: fine below a millisecond,
/// where redirects are, and coarse up to the admin's timeouts.
pub const DURATION_BUCKETS: &[f64] = &[
    0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1,
    0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Buckets of fsync and other disk latencies.
pub const DISK_BUCKETS: &[f64] = &[
    0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    10.0,
];

/// The `method` label: the methods HTTP defines, and `other`, so that a
/// client inventing methods cannot add series.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MethodLabel {
    Get,
    Head,
    Post,
    Put,
    Patch,
    Delete,
    Options,
    Other,
}

impl MethodLabel {
    pub const ALL: [MethodLabel; 8] = [
        Self::Get,
        Self::Head,
        Self::Post,
        Self::Put,
        Self::Patch,
        Self::Delete,
        Self::Options,
        Self::Other,
    ];

    pub fn of(method: &http::Method) -> Self {
        match *method {
            http::Method::GET => Self::Get,
            http::Method::HEAD => Self::Head,
            http::Method::POST => Self::Post,
            http::Method::PUT => Self::Put,
            http::Method::PATCH => Self::Patch,
            http::Method::DELETE => Self::Delete,
            http::Method::OPTIONS => Self::Options,
            _ => Self::Other,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Get => "GET",
            Self::Head => "HEAD",
            Self::Post => "POST",
            Self::Put => "PUT",
            Self::Patch => "PATCH",
            Self::Delete => "DELETE",
            Self::Options => "OPTIONS",
            Self::Other => "other",
        }
    }
}

/// The `route` label: what kind of request it was, never which link.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RouteLabel {
    /// A known, live code answered with its redirect.
    Redirect,
    /// An unknown, disabled or expired code.
    NotFound,
    /// `/api/...`.
    Api,
    /// `/health...`.
    Health,
    /// A method the route does not serve (405).
    MethodNotAllowed,
    /// Refused by a rate limit (429).
    RateLimited,
    /// Plain HTTP sent on to HTTPS (`tls.redirect_http`).
    HttpsRedirect,
    /// Anything else (a request that failed before it was routed).
    #[default]
    Other,
}

impl RouteLabel {
    pub const ALL: [RouteLabel; 8] = [
        Self::Redirect,
        Self::NotFound,
        Self::Api,
        Self::Health,
        Self::MethodNotAllowed,
        Self::RateLimited,
        Self::HttpsRedirect,
        Self::Other,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Redirect => "redirect",
            Self::NotFound => "not_found",
            Self::Api => "api",
            Self::Health => "health",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::RateLimited => "rate_limited",
            Self::HttpsRedirect => "https_redirect",
            Self::Other => "other",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Statuses whose `http_requests_total` series are resolved up front for
/// GET and HEAD (the redirect path's answers); others are resolved on use.
const HOT_STATUSES: [u16; 7] = [301, 302, 307, 308, 404, 429, 200];

/// `http_requests_total{method,route,status_code}` and
/// `http_request_duration_seconds{method,route}`. Cloning is not offered;
/// share it in an `Arc`.
pub struct HttpMetrics {
    requests: IntCounterVec,
    durations_vec: HistogramVec,
    /// `[method][route]`, resolved on first use (so that scrapes list only
    /// the kinds of request that happened), then one atomic load.
    durations: Vec<OnceLock<Histogram>>,
    /// `[GET|HEAD][route][HOT_STATUSES]`, resolved at start-up.
    hot: Vec<IntCounter>,
}

impl HttpMetrics {
    /// Registers both families in `registry`.
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        let requests = IntCounterVec::new(
            Opts::new("http_requests_total", "HTTP requests answered."),
            &["method", "route", "status_code"],
        )?;
        let durations_vec = HistogramVec::new(
            HistogramOpts::new(
                "http_request_duration_seconds",
                "Time from a request's header being read to its response being written.",
            )
            .buckets(DURATION_BUCKETS.to_vec()),
            &["method", "route"],
        )?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(durations_vec.clone()))?;
        let durations = (0..MethodLabel::ALL.len() * RouteLabel::ALL.len())
            .map(|_| OnceLock::new())
            .collect();
        let mut hot = Vec::new();
        for m in [MethodLabel::Get, MethodLabel::Head] {
            for r in RouteLabel::ALL {
                for s in HOT_STATUSES {
                    let status = status_str(s);
                    // Only the answers a route can give are exposed up front,
                    // so that scrapes do not list impossible zero series.
                    let counter = if is_hot(r, s) {
                        requests.get_metric_with_label_values(&[m.as_str(), r.as_str(), status])?
                    } else {
                        // A detached counter, never exposed: `record` falls
                        // back to the vec for these.
                        IntCounter::new("unused", "unused")?
                    };
                    hot.push(counter);
                }
            }
        }
        Ok(Self {
            requests,
            durations_vec,
            durations,
            hot,
        })
    }

    /// Counts one answered request and its latency.
    pub fn record(&self, method: MethodLabel, route: RouteLabel, status: u16, elapsed: Duration) {
        let mi = method as usize;
        self.durations[mi * RouteLabel::ALL.len() + route.index()]
            .get_or_init(|| {
                self.durations_vec
                    .with_label_values(&[method.as_str(), route.as_str()])
            })
            .observe(elapsed.as_secs_f64());
        if mi <= MethodLabel::Head as usize
            && is_hot(route, status)
            && let Some(si) = HOT_STATUSES.iter().position(|&s| s == status)
        {
            let i = (mi * RouteLabel::ALL.len() + route.index()) * HOT_STATUSES.len() + si;
            self.hot[i].inc();
            return;
        }
        self.requests
            .with_label_values(&[method.as_str(), route.as_str(), status_str(status)])
            .inc();
    }
}

/// Whether `(route, status)` is an answer GET/HEAD requests get on the
/// redirect path, whose series are resolved up front.
fn is_hot(route: RouteLabel, status: u16) -> bool {
    matches!(
        (route, status),
        (RouteLabel::Redirect, 301 | 302 | 307 | 308)
            | (RouteLabel::NotFound, 404 | 302)
            | (RouteLabel::Health, 200)
            | (RouteLabel::RateLimited, 429)
    )
}

/// Decimal text of 100..=599, built once so that recording never formats.
static STATUS_TEXT: std::sync::LazyLock<Vec<String>> =
    std::sync::LazyLock::new(|| (100..600u16).map(|s| s.to_string()).collect());

/// A status code's decimal text without formatting; `other` outside
/// 100..=599, which HTTP does not use.
pub fn status_str(status: u16) -> &'static str {
    match status {
        100..=599 => &STATUS_TEXT[usize::from(status - 100)],
        _ => "other",
    }
}

/// Brings `counter` up to `value`, the atomic it mirrors (counts kept where
/// they happen, exported when Prometheus scrapes): both only grow, so each
/// scrape adds the difference. Under one lock for every mirrored counter:
/// two scrapes at once (two Prometheus servers) each reading the counter
/// before either added would both add the difference, and a counter once
/// ahead stays ahead.
pub fn mirror(counter: &prometheus::IntCounter, value: u64) {
    static MIRRORING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_at_a_time = MIRRORING.lock().unwrap_or_else(|p| p.into_inner());
    let seen = counter.get();
    if value > seen {
        counter.inc_by(value - seen);
    }
}

/// A registry with the process collector (CPU seconds, resident memory, open
/// file descriptors, start time) already registered.
pub fn new_registry() -> Registry {
    let registry = Registry::new();
    #[cfg(target_os = "linux")]
    {
        let process = prometheus::process_collector::ProcessCollector::for_self();
        if let Err(e) = registry.register(Box::new(process)) {
            tracing::warn!(error = %e, "process metrics unavailable");
        }
    }
    registry
}

/// The Prometheus text exposition of everything in `registry`.
pub fn encode(registry: &Registry) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 * 1024);
    if let Err(e) = TextEncoder::new().encode(&registry.gather(), &mut out) {
        tracing::error!(error = %e, "encoding metrics");
    }
    out
}

/// Content type of [`encode`]'s output.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

#[cfg(test)]
mod tests {
    use super::*;

    /// A mirrored counter follows the value it mirrors, exactly, however
    /// many scrapes mirror it at once (two Prometheus servers): it never
    /// passes the value, and a value that does not grow adds nothing.
    #[test]
    fn a_mirrored_counter_never_passes_what_it_mirrors() {
        let counter = prometheus::IntCounter::new("m", "m").unwrap();
        let value = std::sync::atomic::AtomicU64::new(0);
        std::thread::scope(|scope| {
            for _ in 0..4 {
                scope.spawn(|| {
                    for _ in 0..20_000 {
                        let v = value.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                        mirror(&counter, v);
                        assert!(counter.get() <= value.load(std::sync::atomic::Ordering::SeqCst));
                    }
                });
            }
        });
        mirror(&counter, 80_000);
        assert_eq!(counter.get(), 80_000);
        mirror(&counter, 5);
        assert_eq!(counter.get(), 80_000);
    }

    fn text(registry: &Registry) -> String {
        String::from_utf8(encode(registry)).unwrap()
    }

    #[test]
    fn hot_and_cold_series_count_alike() {
        let registry = Registry::new();
        let m = HttpMetrics::new(&registry).unwrap();
        let ms = Duration::from_micros(300);
        m.record(MethodLabel::Get, RouteLabel::Redirect, 301, ms);
        m.record(MethodLabel::Get, RouteLabel::Redirect, 301, ms);
        m.record(MethodLabel::Head, RouteLabel::NotFound, 404, ms);
        m.record(MethodLabel::Post, RouteLabel::Api, 201, ms);
        m.record(MethodLabel::Get, RouteLabel::Api, 200, ms);
        m.record(MethodLabel::Get, RouteLabel::RateLimited, 429, ms);
        let t = text(&registry);
        for line in [
            r#"http_requests_total{method="GET",route="redirect",status_code="301"} 2"#,
            r#"http_requests_total{method="HEAD",route="not_found",status_code="404"} 1"#,
            r#"http_requests_total{method="POST",route="api",status_code="201"} 1"#,
            r#"http_requests_total{method="GET",route="api",status_code="200"} 1"#,
            r#"http_requests_total{method="GET",route="rate_limited",status_code="429"} 1"#,
            r#"http_request_duration_seconds_count{method="GET",route="redirect"} 2"#,
            r#"http_request_duration_seconds_bucket{method="GET",route="redirect",le="0.0005"} 2"#,
            r#"http_request_duration_seconds_bucket{method="GET",route="redirect",le="0.00025"} 0"#,
        ] {
            assert!(t.contains(line), "missing {line} in\n{t}");
        }
        assert!(!t.contains("unused"));
    }

    #[test]
    fn labels_stay_bounded() {
        assert_eq!(status_str(1000), "other");
        assert_eq!(status_str(307), "307");
        assert_eq!(
            MethodLabel::of(&http::Method::from_bytes(b"BREW").unwrap()).as_str(),
            "other"
        );
    }
}
