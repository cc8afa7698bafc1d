//! The edge's Pingora proxy: redirects and `/health` are answered in
//! `request_filter` from memory; `/api/...` goes on to an admin upstream
//! (health-checked, timeouts from config, retries with exponential backoff
//! and jitter for idempotent requests), and a JSON 503 with `Retry-After`
//! answers when no admin does.

use std::net::SocketAddr;
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::lb::LoadBalancer;
use pingora::lb::selection::RoundRobin;
use pingora::prelude::*;
use pingora::proxy::FailToProxy;
use pingora::{Error, ErrorSource, ErrorType};

use super::health::EdgeHealth;
use super::metrics::{EdgeMetrics, LimitKind, ProxyErrorKind, RedirectResult};
use super::rate_limit::{EdgeRateLimits, client_ip};
use super::redirect::{Miss, Route, cache_control, location_into, resolve, route};
use super::request_head::valid_host;
use crate::config::EdgeConfig;
use crate::config::IpNet;
use crate::metrics::{MethodLabel, RouteLabel};
use crate::ratelimit::Decision;
use crate::store::record::now_ms;
use crate::store::view::HotTable;

/// The proxy. Cloning is not needed: Pingora holds it in an `Arc`.
pub struct EdgeProxy {
    pub table: Arc<HotTable>,
    pub admins: Arc<LoadBalancer<RoundRobin>>,
    pub config: Arc<EdgeConfig>,
    /// What `/health` and `/health/ready` report.
    pub health: EdgeHealth,
    pub metrics: Arc<EdgeMetrics>,
    /// Per-client limits; `None` when none is configured.
    pub limits: Option<Arc<EdgeRateLimits>>,
    /// Click counts of links with a budget.
    pub clicks: Arc<super::clicks::ClickTable>,
    /// Peers whose client-address header is believed.
    pub trusted_proxies: Vec<IpNet>,
    /// That header (lower case).
    pub client_ip_header: String,
    /// The HTTPS listener's settings (redirects, HSTS), when there is one.
    pub tls: Option<Arc<crate::config::TlsConfig>>,
    /// The JSON-lines access log, when configured.
    pub access_log: Option<Arc<super::access_log::AccessLog>>,
}

/// Per-request state.
pub struct EdgeCtx {
    /// Attempts at an admin upstream that failed and are being retried.
    retries: u32,
    /// When the request's header had been read.
    start: Instant,
    /// The `route` label of the request's metrics.
    route: RouteLabel,
}

#[async_trait]
impl ProxyHttp for EdgeProxy {
    type CTX = EdgeCtx;

    fn new_ctx(&self) -> EdgeCtx {
        EdgeCtx {
            retries: 0,
            start: Instant::now(),
            route: RouteLabel::Other,
        }
    }

    /// Pingora's default modules, plus `Strict-Transport-Security` on TLS
    /// responses when configured.
    fn init_downstream_modules(&self, modules: &mut pingora::modules::http::HttpModules) {
        super::tls::init_downstream_modules(modules, self.tls.as_deref());
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut EdgeCtx) -> Result<bool> {
        let tls = super::tls::mark_downstream(session);
        let req = session.req_header();
        // RFC 9112, 3.2: an HTTP/1.1 request without `Host`, and any request
        // with more than one or with an invalid one, gets a 400, as nginx and
        // HAProxy give it (Pingora itself lets them through). HTTP/2 names
        // the host in `:authority`; HTTP/1.0 need not name one.
        let mut hosts = req.headers.get_all(::http::header::HOST).iter();
        let refused = match (hosts.next(), hosts.next()) {
            (Some(_), Some(_)) => Some("a request may have one Host header, not more"),
            (Some(host), None) if !valid_host(host.as_bytes()) => {
                Some("the Host header is not a host name or address (and port)")
            }
            (None, _) if req.version == ::http::Version::HTTP_11 => {
                Some("an HTTP/1.1 request needs a Host header")
            }
            _ => None,
        };
        if let Some(why) = refused {
            let head = req.method == ::http::Method::HEAD;
            session.set_keepalive(None);
            let body = error_body("bad_request", why);
            respond(
                session,
                400,
                &[("content-type", b"application/json")],
                body,
                head,
            )
            .await?;
            return Ok(true);
        }
        let path = req.uri.path().as_bytes();
        let head = req.method == ::http::Method::HEAD;
        let read_only = head || req.method == ::http::Method::GET;
        let route = route(path);
        if let Some(limits) = &self.limits
            && !matches!(route, Route::Health | Route::Ready)
        {
            let client = self.client_ip(session);
            let now = crate::ratelimit::now_us();
            let refused = limits.request(client, now);
            self.metrics
                .limit_decision(LimitKind::ClientRequests, refused.is_none());
            let refused = refused.or_else(|| match route {
                Route::Redirect(_) | Route::NotFound => {
                    let barred = limits.scanning(client, now);
                    self.metrics
                        .limit_decision(LimitKind::ClientMisses, barred.is_none());
                    barred
                }
                _ => None,
            });
            if let Some(decision) = refused {
                ctx.route = RouteLabel::RateLimited;
                if !matches!(route, Route::Api) {
                    self.metrics.redirect_result(RedirectResult::RateLimited);
                }
                too_many_requests(session, &decision, head).await?;
                return Ok(true);
            }
        }
        // Plain HTTP goes to https, except the health checks (load
        // balancers and probes keep them on plain HTTP).
        if !tls
            && let Some(t) = self.tls.as_deref()
            && t.redirect_http
            && !matches!(route, Route::Health | Route::Ready)
        {
            ctx.route = RouteLabel::HttpsRedirect;
            self.redirect_to_https(session, t.redirect_port, head)
                .await?;
            return Ok(true);
        }
        match route {
            Route::Api => {
                ctx.route = RouteLabel::Api;
                Ok(false)
            }
            _ if !read_only => {
                ctx.route = RouteLabel::MethodNotAllowed;
                let body = error_body("method_not_allowed", "only GET and HEAD are served here");
                respond(session, 405, &[("allow", b"GET, HEAD")], body, head).await?;
                Ok(true)
            }
            Route::Health | Route::Ready => {
                ctx.route = RouteLabel::Health;
                let (ok, body) = self.health.report();
                let status = if ok || matches!(route, Route::Health) {
                    200
                } else {
                    503
                };
                respond(
                    session,
                    status,
                    &[
                        ("content-type", b"application/json"),
                        ("cache-control", b"no-store"),
                    ],
                    body.into(),
                    head,
                )
                .await?;
                Ok(true)
            }
            Route::Redirect(code) => {
                let now = now_ms();
                let view = self.table.load();
                let resp = match resolve(&view, code, now, Some((&self.clicks, !head))) {
                    Ok(link) => {
                        let query = if link.forwards_query() {
                            session.req_header().uri.query().filter(|q| !q.is_empty())
                        } else {
                            None
                        };
                        // Only a merged query needs a buffer; otherwise the
                        // target is copied once, into the header value.
                        let mut merged = Vec::new();
                        let location: &[u8] = match query {
                            Some(q) => {
                                location_into(&mut merged, link.target, Some(q.as_bytes()));
                                &merged
                            }
                            None => link.target,
                        };
                        let budgeted = link.max_clicks.is_some();
                        let cache =
                            cache_control(link.status, link.expires_at_ms, budgeted, now).value();
                        // Built while the view is held; the view is released
                        // before any await.
                        Ok(response_header(
                            link.status.code(),
                            &[("location", location), ("cache-control", cache.as_bytes())],
                            0,
                        )?)
                    }
                    Err(miss) => Err(miss),
                };
                drop(view);
                match resp {
                    Ok(resp) => {
                        ctx.route = RouteLabel::Redirect;
                        self.metrics.redirect_result(RedirectResult::Served);
                        send(session, resp, Bytes::new(), head).await?
                    }
                    Err(miss) => {
                        ctx.route = RouteLabel::NotFound;
                        self.metrics.redirect_result(miss.into());
                        self.charge_miss(session);
                        self.not_found(session, miss, head).await?
                    }
                }
                Ok(true)
            }
            Route::NotFound => {
                ctx.route = RouteLabel::NotFound;
                self.metrics.redirect_result(RedirectResult::NotFound);
                self.charge_miss(session);
                self.not_found(session, Miss::Unknown, head).await?;
                Ok(true)
            }
        }
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut EdgeCtx,
    ) -> Result<Box<HttpPeer>> {
        if ctx.retries > 0 {
            self.metrics.proxy_retry();
            tokio::time::sleep(backoff(self.config.admin_retry_backoff, ctx.retries)).await;
        }
        let backend = self.admins.select(b"", 256).ok_or_else(|| {
            self.metrics.proxy_error(ProxyErrorKind::NoUpstream);
            Error::explain(ErrorType::HTTPStatus(503), "no healthy admin upstream")
        })?;
        let addr: SocketAddr = *backend.addr.as_inet().ok_or_else(|| {
            Error::explain(
                ErrorType::InternalError,
                "admin upstream is not an inet address",
            )
        })?;
        let mut peer = HttpPeer::new(addr, false, String::new());
        peer.options.connection_timeout = Some(self.config.admin_connect_timeout);
        peer.options.total_connection_timeout = Some(self.config.admin_connect_timeout);
        peer.options.read_timeout = Some(self.config.admin_read_timeout);
        peer.options.write_timeout = Some(self.config.admin_read_timeout);
        Ok(Box::new(peer))
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream_request: &mut RequestHeader,
        _ctx: &mut EdgeCtx,
    ) -> Result<()> {
        // The edge is the first hop: what the client claims is replaced by
        // what the edge saw.
        let client = self.client_ip(session).to_string();
        upstream_request.insert_header("x-forwarded-for", client)?;
        let proto = if super::tls::is_tls(session) {
            "https"
        } else {
            "http"
        };
        upstream_request.insert_header("x-forwarded-proto", proto)?;
        Ok(())
    }

    /// A failed connect sent nothing to the admin, so it is retried for
    /// every method (up to `admin_retries`, with backoff); failures after the
    /// request went out are retried only for idempotent ones (below).
    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut EdgeCtx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        self.metrics.proxy_error(ProxyErrorKind::Connect);
        ctx.retries += 1;
        e.set_retry(ctx.retries <= self.config.admin_retries);
        e
    }

    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut EdgeCtx,
        client_reused: bool,
    ) -> Box<Error> {
        self.metrics.proxy_error(error_kind(&e));
        let mut e = e.more_context(format!("admin upstream {peer}"));
        ctx.retries += 1;
        let idempotent = session.req_header().method.is_idempotent()
            && !session.as_ref().retry_buffer_truncated();
        if idempotent && ctx.retries <= self.config.admin_retries {
            e.retry.decide_reuse(client_reused);
        } else {
            e.set_retry(false);
        }
        e
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        _ctx: &mut EdgeCtx,
    ) -> FailToProxy {
        let code = match e.etype() {
            ErrorType::HTTPStatus(code) => *code,
            _ => match e.esource() {
                ErrorSource::Upstream => 503,
                ErrorSource::Downstream => match e.etype() {
                    ErrorType::ReadError | ErrorType::WriteError | ErrorType::ConnectionClosed => 0,
                    _ => 400,
                },
                ErrorSource::Internal | ErrorSource::Unset => 500,
            },
        };
        // Once the admin's response has started, a second one cannot be
        // sent: the connection is closed instead, so that a truncated
        // response never looks complete.
        if code > 0 && session.as_downstream().response_written().is_none() {
            session.set_keepalive(None);
            let (status, body) = match code {
                503 => (
                    503,
                    error_body(
                        "admin_unavailable",
                        "the management API is unavailable; redirects are not affected",
                    ),
                ),
                400..=499 => (
                    code,
                    error_body("bad_request", "the request could not be handled"),
                ),
                _ => (
                    code,
                    error_body("internal", "the edge failed to handle the request"),
                ),
            };
            let retry_after = self.config.retry_after_secs.to_string();
            let mut headers: Vec<(&str, &[u8])> = vec![("content-type", b"application/json")];
            if status == 503 {
                headers.push(("retry-after", retry_after.as_bytes()));
            }
            let _ = respond(session, status, &headers, body, false).await;
        }
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, session: &mut Session, _e: Option<&Error>, ctx: &mut EdgeCtx) {
        self.record(session, ctx);
    }
}

impl EdgeProxy {
    /// The client's address: the peer's, or what a trusted proxy in front
    /// says it is (see [`client_ip`]).
    fn client_ip(&self, session: &Session) -> std::net::IpAddr {
        let peer = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map_or(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), |a| {
                a.ip()
            });
        if self.trusted_proxies.is_empty() {
            return peer;
        }
        // Several lines of the header are one list, in order (RFC 9110,
        // 5.3): a proxy that adds a line of its own leaves the client's
        // (which the client may have forged) before it.
        let mut lines = session
            .req_header()
            .headers
            .get_all(self.client_ip_header.as_str())
            .iter()
            .map(|v| v.as_bytes());
        let first = lines.next();
        match lines.next() {
            None => client_ip(peer, first, &self.trusted_proxies),
            Some(second) => {
                let mut list = first.unwrap_or_default().to_vec();
                for line in std::iter::once(second).chain(lines) {
                    list.extend_from_slice(b", ");
                    list.extend_from_slice(line);
                }
                client_ip(peer, Some(&list), &self.trusted_proxies)
            }
        }
    }

    /// `tls.redirect_http`: a 308 to the same path and query on `https://`
    /// (308 keeps the method and body), or a 400 without a usable host.
    async fn redirect_to_https(&self, session: &mut Session, port: u16, head: bool) -> Result<()> {
        let req = session.req_header();
        let host = req.headers.get(::http::header::HOST).map(|v| v.as_bytes());
        match super::tls::https_location(&req.uri, host, port) {
            Some(location) => {
                let headers: [(&str, &[u8]); 1] = [("location", location.as_bytes())];
                respond(session, 308, &headers, Bytes::new(), head).await
            }
            None => {
                let body = error_body(
                    "bad_request",
                    "a valid Host header is needed to redirect to https",
                );
                respond(
                    session,
                    400,
                    &[
                        ("content-type", b"application/json"),
                        ("cache-control", b"no-store"),
                    ],
                    body,
                    head,
                )
                .await
            }
        }
    }

    fn charge_miss(&self, session: &Session) {
        if let Some(limits) = &self.limits {
            limits.miss(self.client_ip(session), crate::ratelimit::now_us());
        }
    }
    /// Counts the request once its response is written (or it failed).
    fn record(&self, session: &Session, ctx: &EdgeCtx) {
        let status = session
            .as_downstream()
            .response_written()
            .map_or(0, |r| r.status.as_u16());
        let method = MethodLabel::of(&session.req_header().method);
        let elapsed = ctx.start.elapsed();
        self.metrics.http.record(method, ctx.route, status, elapsed);
        if let Some(log) = &self.access_log {
            let req = session.req_header();
            let ts = super::access_log::timestamp(now_ms());
            let client = self.client_ip(session).to_string();
            log.log(&super::access_log::AccessRecord {
                ts: &ts,
                client: &client,
                method: req.method.as_str(),
                path: req.uri.path(),
                status,
                route: ctx.route.as_str(),
                duration_us: elapsed.as_micros() as u64,
                user_agent: req
                    .headers
                    .get(http::header::USER_AGENT)
                    .and_then(|v| v.to_str().ok()),
            });
        }
    }

    async fn not_found(&self, session: &mut Session, miss: Miss, head: bool) -> Result<()> {
        if let Some(url) = &self.config.not_found_url {
            return respond(
                session,
                302,
                &[("location", url.as_bytes()), ("cache-control", b"no-store")],
                Bytes::new(),
                head,
            )
            .await;
        }
        respond(
            session,
            404,
            &[
                ("content-type", b"application/json"),
                ("cache-control", b"no-store"),
            ],
            not_found_body(miss),
            head,
        )
        .await
    }
}

/// The `kind` label of a failure while talking to an admin upstream.
fn error_kind(e: &Error) -> ProxyErrorKind {
    match (e.esource(), e.etype()) {
        (_, ErrorType::ConnectTimedout | ErrorType::ConnectRefused | ErrorType::ConnectError) => {
            ProxyErrorKind::Connect
        }
        (_, ErrorType::ReadTimedout | ErrorType::WriteTimedout) => ProxyErrorKind::Timeout,
        (ErrorSource::Downstream, _) => ProxyErrorKind::Downstream,
        (ErrorSource::Upstream, _) => ProxyErrorKind::Upstream,
        _ => ProxyErrorKind::Other,
    }
}

/// 429 with `Retry-After` and the `RateLimit-*` fields of the decision.
async fn too_many_requests(session: &mut Session, d: &Decision, head: bool) -> Result<()> {
    let (limit, remaining, reset, retry) = (
        d.limit.to_string(),
        d.remaining.to_string(),
        d.reset_secs.to_string(),
        d.retry_after_secs.to_string(),
    );
    respond(
        session,
        429,
        &[
            ("content-type", b"application/json"),
            ("cache-control", b"no-store"),
            ("retry-after", retry.as_bytes()),
            ("ratelimit-limit", limit.as_bytes()),
            ("ratelimit-remaining", remaining.as_bytes()),
            ("ratelimit-reset", reset.as_bytes()),
        ],
        too_many_body(),
        head,
    )
    .await
}

/// The 429's body, built once (the fast path sends the same).
pub(super) fn too_many_body() -> Bytes {
    static BODY: LazyLock<Bytes> = LazyLock::new(|| {
        error_body(
            "rate_limited",
            "too many requests from this address; retry later",
        )
    });
    BODY.clone()
}

/// A miss's 404 body, built once per kind of miss (JSON serialisation costs
/// thousands of instructions, and one request in twenty may be for an
/// unknown code); the fast path sends the same.
pub(super) fn not_found_body(miss: Miss) -> Bytes {
    static BODIES: LazyLock<[Bytes; 4]> = LazyLock::new(|| {
        [
            "no such short link",
            "this short link is disabled",
            "this short link has expired",
            "this short link has been followed as many times as it may be",
        ]
        .map(|message| error_body("not_found", message))
    });
    let i = match miss {
        Miss::Unknown => 0,
        Miss::Disabled => 1,
        Miss::Expired => 2,
        Miss::Exhausted => 3,
    };
    BODIES[i].clone()
}

/// The stable JSON error body, the admin API's shape (`docs/api.md`,
/// "Errors"): `{"error":{"code":...,"field":null,"message":...}}` (serde_json
/// writes the keys sorted); no field
/// of a request body is ever at fault in what the edge refuses itself.
pub fn error_body(code: &str, message: &str) -> Bytes {
    let body = serde_json::json!({ "error": { "code": code, "message": message, "field": null } });
    Bytes::from(body.to_string())
}

/// Writes a whole response. For HEAD, the headers (with the body's length)
/// and no body.
async fn respond(
    session: &mut Session,
    status: u16,
    headers: &[(&'static str, &[u8])],
    body: Bytes,
    head: bool,
) -> Result<()> {
    let resp = response_header(status, headers, body.len())?;
    send(session, resp, body, head).await
}

/// A response header. Names are static and the map keeps no case table
/// (`build_no_case`), so the only allocations are the values' copies.
fn response_header(
    status: u16,
    headers: &[(&'static str, &[u8])],
    body_len: usize,
) -> Result<Box<ResponseHeader>> {
    let mut resp = ResponseHeader::build_no_case(status, Some(headers.len() + 1))?;
    for (name, value) in headers {
        resp.insert_header(*name, *value)?;
    }
    resp.insert_header("content-length", ::http::HeaderValue::from(body_len))?;
    Ok(Box::new(resp))
}

async fn send(
    session: &mut Session,
    resp: Box<ResponseHeader>,
    body: Bytes,
    head: bool,
) -> Result<()> {
    let no_body = head || body.is_empty();
    session.write_response_header(resp, no_body).await?;
    if !no_body {
        session.write_response_body(Some(body), true).await?;
    }
    Ok(())
}

/// Exponential backoff with full jitter: a random delay in
/// `[base·2^(n-1) / 2, base·2^(n-1)]`, capped at 2 s.
fn backoff(base: Duration, attempt: u32) -> Duration {
    use std::hash::{BuildHasher, Hasher};
    let ceiling = base
        .saturating_mul(1 << attempt.saturating_sub(1).min(10))
        .min(Duration::from_secs(2));
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(attempt);
    let frac = (h.finish() % 1000) as u32;
    ceiling / 2 + ceiling / 2 * frac / 1000
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bytes of the unknown-code 404, which `loadtest/compare.py` has
    /// nginx and HAProxy send too (the same body for every server).
    #[test]
    fn the_unknown_code_body_is_what_the_comparison_serves() {
        assert_eq!(
            &not_found_body(Miss::Unknown)[..],
            br#"{"error":{"code":"not_found","field":null,"message":"no such short link"}}"#
        );
        let compare = include_str!("../../loadtest/compare.py");
        let expected = "NOT_FOUND = '{\"error\":{\"code\":\"not_found\",\"field\":null,\"message\":\"no such short link\"}}'";
        assert!(compare.contains(expected), "compare.py's NOT_FOUND");
    }

    #[test]
    fn backoff_grows_with_jitter_and_is_capped() {
        let base = Duration::from_millis(100);
        for attempt in 1..20 {
            let d = backoff(base, attempt);
            let ceiling = (base * (1 << (attempt - 1).min(10))).min(Duration::from_secs(2));
            assert!(d >= ceiling / 2 && d <= ceiling, "{attempt}: {d:?}");
        }
    }
}
