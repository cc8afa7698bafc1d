//! The redirect fast path: a plain `GET`/`HEAD /{code}` over cleartext
//! HTTP/1.1 is answered straight from the header bytes that
//! [`super::client_limits`] has already read, without building Pingora's
//! session, request and response objects. Everything else — and anything
//! unusual about such a request — goes on to Pingora exactly as before, so
//! this only ever changes how fast a redirect is, never what it is.
//!
//! It answers only when all of these hold (otherwise [`RedirectFastPath::answer`]
//! returns `None` and Pingora serves the request):
//! - the header parses strictly (httparse), is HTTP/1.1, and nothing follows
//!   it in the buffer (no body, no pipelined request);
//! - the method is GET or HEAD, with no `Content-Length`,
//!   `Transfer-Encoding`, `Expect` or `Upgrade` header;
//! - the path is a short code (`route()` says `Redirect`);
//! - no rate limit would refuse it (a refusal is Pingora's to answer).
//!
//! The answer is byte for byte what the Pingora path sends (status,
//! `location`, `cache-control`, `content-length`, `date`, `connection`), and
//! it is counted in the same metrics and access log. `edge.fast_path: false`
//! turns it off.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use super::access_log::{AccessLog, AccessRecord, timestamp};
use super::metrics::{EdgeMetrics, LimitKind, RedirectResult};
use super::rate_limit::{EdgeRateLimits, client_ip};
use super::redirect::{Miss, Route, cache_control, location_into, resolve, route, split_target};
use crate::config::{EdgeConfig, IpNet};
use crate::metrics::{MethodLabel, RouteLabel};
use crate::store::record::now_ms;
use crate::store::view::HotTable;

/// What the fast path needs; every field is shared with the proxy.
pub struct RedirectFastPath {
    pub table: Arc<HotTable>,
    pub config: Arc<EdgeConfig>,
    pub metrics: Arc<EdgeMetrics>,
    pub limits: Option<Arc<EdgeRateLimits>>,
    pub trusted_proxies: Vec<IpNet>,
    pub client_ip_header: String,
    pub access_log: Option<Arc<AccessLog>>,
}

/// Most header lines looked at; a request with more goes to Pingora.
const MAX_HEADERS: usize = 32;

impl RedirectFastPath {
    /// Answers the request in `head` into `out` (cleared first) when it is a
    /// plain redirect request; returns whether the connection stays open.
    /// `None`: not for the fast path; nothing was charged or counted.
    pub fn answer(
        &self,
        head: &[u8],
        peer: Option<IpAddr>,
        started: Instant,
        out: &mut Vec<u8>,
    ) -> Option<bool> {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(head) {
            Ok(httparse::Status::Complete(n)) if n == head.len() => {}
            _ => return None,
        }
        if req.version != Some(1) {
            return None;
        }
        let (method, head_only) = match req.method? {
            "GET" => (MethodLabel::Get, false),
            "HEAD" => (MethodLabel::Head, true),
            _ => return None,
        };
        let mut keepalive = true;
        let mut forwarded = None;
        let mut user_agent = None;
        for h in req.headers.iter() {
            let name = h.name;
            if name.eq_ignore_ascii_case("content-length")
                || name.eq_ignore_ascii_case("transfer-encoding")
                || name.eq_ignore_ascii_case("expect")
                || name.eq_ignore_ascii_case("upgrade")
            {
                return None;
            }
            if name.eq_ignore_ascii_case("connection") {
                for token in h.value.split(|&b| b == b',') {
                    let token = token.trim_ascii();
                    if token.eq_ignore_ascii_case(b"close") {
                        keepalive = false;
                    } else if token.eq_ignore_ascii_case(b"upgrade") {
                        return None;
                    }
                }
            } else if name.eq_ignore_ascii_case(&self.client_ip_header) {
                forwarded = Some(h.value);
            } else if name.eq_ignore_ascii_case("user-agent") {
                user_agent = std::str::from_utf8(h.value).ok();
            }
        }
        let target = req.path?.as_bytes();
        let (path, query) = split_target(target);
        let Route::Redirect(code) = route(path) else {
            return None;
        };

        let peer = peer.unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED));
        let client = if self.trusted_proxies.is_empty() {
            peer
        } else {
            client_ip(peer, forwarded, &self.trusted_proxies)
        };
        let now = now_ms();
        if let Some(limits) = &self.limits {
            // Only a request that will be allowed is charged here; a refusal
            // (and its charge) is Pingora's.
            if limits.would_refuse(client, now) {
                return None;
            }
            let refused = limits.request(client, now);
            self.metrics
                .limit_decision(LimitKind::ClientRequests, refused.is_none());
            if refused.is_some() {
                return None;
            }
            let barred = limits.scanning(client, now);
            self.metrics
                .limit_decision(LimitKind::ClientMisses, barred.is_none());
            if barred.is_some() {
                return None;
            }
        }

        out.clear();
        let view = self.table.load();
        let mut missed = None;
        let (status, route_label) = match resolve(&view, code, now) {
            Ok(link) => {
                let status = link.status.code();
                status_line(out, status);
                out.extend_from_slice(b"location: ");
                let query = query.filter(|q| !q.is_empty() && link.forwards_query());
                match query {
                    Some(q) => {
                        let mut merged = Vec::new();
                        location_into(&mut merged, link.target, Some(q));
                        out.extend_from_slice(&merged);
                    }
                    None => out.extend_from_slice(link.target),
                }
                out.extend_from_slice(b"\r\nCache-Control: ");
                out.extend_from_slice(
                    cache_control(link.status, link.expires_at_ms, now)
                        .value()
                        .as_bytes(),
                );
                out.extend_from_slice(b"\r\nContent-Length: 0\r\n");
                drop(view);
                self.metrics.redirect_result(RedirectResult::Served);
                (status, RouteLabel::Redirect)
            }
            Err(miss) => {
                drop(view);
                self.metrics.redirect_result(miss.into());
                if let Some(limits) = &self.limits {
                    limits.miss(client, now);
                }
                missed = Some(miss);
                (self.not_found(out, miss), RouteLabel::NotFound)
            }
        };
        out.extend_from_slice(b"Date: ");
        out.extend_from_slice(pingora::protocols::http::date::get_cached_date().as_bytes());
        out.extend_from_slice(if keepalive {
            b"\r\nConnection: keep-alive\r\n\r\n".as_slice()
        } else {
            b"\r\nConnection: close\r\n\r\n".as_slice()
        });
        if let Some(miss) = missed
            && status == 404
            && !head_only
        {
            out.extend_from_slice(&not_found_body(miss));
        }
        let elapsed = started.elapsed();
        self.metrics
            .http
            .record(method, route_label, status, elapsed);
        self.metrics.fast_path_answers.inc();
        if let Some(log) = &self.access_log {
            let ts = timestamp(now);
            let client = client.to_string();
            log.log(&AccessRecord {
                ts: &ts,
                client: &client,
                method: method.as_str(),
                path: std::str::from_utf8(path).unwrap_or(""),
                status,
                route: route_label.as_str(),
                duration_us: elapsed.as_micros() as u64,
                user_agent,
            });
        }
        Some(keepalive)
    }

    /// The miss answer's status line and headers (not `date`/`connection`):
    /// a 302 to `edge.not_found_url`, or a JSON 404.
    fn not_found(&self, out: &mut Vec<u8>, miss: Miss) -> u16 {
        if let Some(url) = &self.config.not_found_url {
            status_line(out, 302);
            out.extend_from_slice(b"location: ");
            out.extend_from_slice(url.as_bytes());
            out.extend_from_slice(b"\r\nCache-Control: no-store\r\nContent-Length: 0\r\n");
            return 302;
        }
        let body = not_found_body(miss);
        status_line(out, 404);
        out.extend_from_slice(
            b"Content-Type: application/json\r\nCache-Control: no-store\r\nContent-Length: ",
        );
        out.extend_from_slice(body.len().to_string().as_bytes());
        out.extend_from_slice(b"\r\n");
        404
    }
}

/// The body the Pingora path sends for a miss (`proxy::not_found`).
fn not_found_body(miss: Miss) -> bytes::Bytes {
    let message = match miss {
        Miss::Unknown => "no such short link",
        Miss::Disabled => "this short link is disabled",
        Miss::Expired => "this short link has expired",
    };
    super::proxy::error_body("not_found", message)
}

fn status_line(out: &mut Vec<u8>, status: u16) {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(crate::metrics::status_str(status).as_bytes());
    out.push(b' ');
    let reason = http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("");
    out.extend_from_slice(reason.as_bytes());
    out.extend_from_slice(b"\r\n");
}
