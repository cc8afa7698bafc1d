//! The redirect fast path (`src/edge/fast_path.rs`) answers exactly what the
//! Pingora path answers: the same requests are sent to an edge with
//! `edge.fast_path` on and to one with it off, over the same data dir, and
//! every response must match byte for byte (but for `date`). Requests the
//! fast path must leave to Pingora are checked to go there.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::{Cluster, api, free_port, get, metric, uload_command, wait_until};

/// Sends raw bytes, reads until the edge closes or the read times out.
fn raw(addr: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(1500)))
        .unwrap();
    s.write_all(bytes).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
    out
}

/// The response without its `date` line (which differs by the second).
fn without_date(resp: &[u8]) -> String {
    String::from_utf8_lossy(resp)
        .split("\r\n")
        .filter(|l| !l.to_ascii_lowercase().starts_with("date:"))
        .collect::<Vec<_>>()
        .join("\r\n")
}

struct Edge(Child);
impl Drop for Edge {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A second edge on the cluster's config and data dir, with the fast path
/// off, answering `/health`; its rate-limit and click state is the
/// cluster's (the same files, shared with the cluster's edge).
fn slow_edge(cluster: &Cluster) -> (Edge, SocketAddr) {
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let edge = Edge(
        uload_command(cluster.path())
            .args(["edge", "--config"])
            .arg(&cluster.config)
            .env("ULOAD_EDGE_LISTEN", addr.to_string())
            .env("ULOAD_METRICS_LISTEN", "")
            .env("ULOAD_ACCESS_LOG", "")
            .env("ULOAD_EDGE_FAST_PATH", "false")
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_until(Duration::from_secs(30), "the second edge", || {
        common::request(addr, "GET", "/health", &[], b"").is_ok_and(|r| r.status == 200)
    });
    (edge, addr)
}

/// An edge with the fast path and one without (see [`slow_edge`]), a
/// client limit of one request a second after a burst of `burst`, the
/// loopback a trusted proxy (so `X-Forwarded-For` names the client), and
/// the link `/tmp` served by both.
fn limited_edges(burst: u32) -> (Cluster, Edge, SocketAddr) {
    let cluster = Cluster::start_custom(
        "",
        "",
        &format!(
            "rate_limit:\n  client_requests_per_second: 1\n  client_burst: {burst}\n  trusted_proxies: [\"127.0.0.1\"]\n"
        ),
    );
    let body = r#"{"url":"https://example.com/t","code":"tmp"}"#;
    assert_eq!(
        api(cluster.admin_addr, "POST", "/api/links", body).status,
        201
    );
    let (slow, slow_addr) = slow_edge(&cluster);
    // Each poll as its own client, so that waiting charges no one twice.
    let mut poll = 0;
    for addr in [cluster.edge_addr, slow_addr] {
        wait_until(Duration::from_secs(10), "the link at both edges", || {
            poll += 1;
            let ip = format!("198.51.100.{}", poll % 250 + 1);
            let r = common::request(addr, "GET", "/tmp", &[("X-Forwarded-For", &ip)], b"");
            r.is_ok_and(|r| r.status == 302)
        });
    }
    (cluster, slow, slow_addr)
}

#[test]
fn the_fast_path_answers_exactly_what_pingora_answers() {
    let cluster = Cluster::start();
    let edge = cluster.edge_addr;
    for body in [
        r#"{"url":"https://example.com/a?x=1#frag","code":"fwd","status":307,"forward_query":true}"#,
        r#"{"url":"https://example.com/p","code":"perm","status":301}"#,
        r#"{"url":"https://example.com/t","code":"tmp"}"#,
        r#"{"url":"https://example.com/e","code":"exp8","status":308,"expires_at":"2099-01-01T00:00:00Z"}"#,
        r#"{"url":"https://example.com/d","code":"off","disabled":true}"#,
        r#"{"url":"https://example.com/o","code":"old","expires_at":"2001-01-01T00:00:00Z"}"#,
    ] {
        assert_eq!(api(edge, "POST", "/api/links", body).status, 201, "{body}");
    }
    wait_until(Duration::from_secs(10), "links at the edge", || {
        get(edge, "/old").status == 404 && get(edge, "/fwd").status == 307
    });

    // A second edge on the same data dir with the fast path off.
    let (_slow, slow_addr) = slow_edge(&cluster);
    wait_until(Duration::from_secs(30), "the second edge", || {
        get(slow_addr, "/old").status == 404
    });

    let fast_before = metric(
        &cluster.metrics(cluster.edge_metrics_addr),
        "edge_fast_path_answers_total",
    );
    let fast_cases: &[&str] = &[
        "GET /tmp HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        "HEAD /tmp HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        "GET /perm HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        "GET /exp8 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        "GET /fwd?utm=a%20b&y=2 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        "GET /fwd? HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        "GET /tmp?ignored=1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        "GET /nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        "HEAD /nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        "GET /off HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        "GET /old HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        "GET /tmp HTTP/1.1\r\nHost: x\r\nUser-Agent: t\r\nconnection: Close\r\n\r\n",
        // Keep-alive: the answer says so and the connection stays open
        // (the read ends on its timeout).
        "GET /tmp HTTP/1.1\r\nHost: x\r\n\r\n",
    ];
    let pingora_cases: &[&str] = &[
        "GET /tmp HTTP/1.0\r\n\r\n",
        "GET /tmp HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        "GET /tmp HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n0\r\n\r\n",
        "POST /tmp HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        "GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        "GET /a/b HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        "GET /tmp HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
        // Heads outside the fast path's plain shape (src/edge/request_head.rs):
        // a non-ASCII header value, bare LF line ends, an obs-fold line.
        "GET /tmp HTTP/1.1\r\nHost: x\r\nX-Name: café\r\nConnection: close\r\n\r\n",
        "GET /tmp HTTP/1.1\nHost: x\nConnection: close\n\n",
        "GET /tmp HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\nConnection: close\r\n\r\n",
    ];
    // Plain-looking heads that Pingora reads otherwise than the fast path
    // would (it answers 400, drops a fragment, reads only the first
    // `Connection` line): left to Pingora, so the same whole answer.
    let long_target = format!(
        "GET /tmp?{} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        "a".repeat(70_000)
    );
    let outside_cases: Vec<&str> = vec![
        "GET /fwd?a=1#x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        "GET /fwd?#x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        "GET /tmp?a=<b> HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        "GET /fwd?q=\"x\" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        "GET /tmp HTTP/1.1\r\nHost: a\r\nHost: b\r\nConnection: close\r\n\r\n",
        "GET /tmp HTTP/1.1\r\nHost: user@x\r\nConnection: close\r\n\r\n",
        // No Host: a 400 (RFC 9112, 3.2) from the Pingora path.
        "GET /tmp HTTP/1.1\r\nConnection: close\r\n\r\n",
        "GET /tmp HTTP/1.1\r\nX-Host: x\r\n\r\n",
        "GET /tmp HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\nConnection: close\r\n\r\n",
        &long_target,
    ];
    let mut compared = 0;
    for case in &outside_cases {
        let a = without_date(&raw(edge, case.as_bytes()));
        let b = without_date(&raw(slow_addr, case.as_bytes()));
        let shown: String = case.chars().take(80).collect();
        assert_eq!(a, b, "different answers to {shown:?}");
        assert!(a.starts_with("HTTP/1.1 "), "{shown:?}: {a}");
        if !case.contains("Host:") {
            assert!(a.starts_with("HTTP/1.1 400 "), "{shown:?}: {a}");
            assert!(a.contains(r#""code":"bad_request""#), "{shown:?}: {a}");
        }
        compared += 1;
    }
    for case in fast_cases {
        let a = without_date(&raw(edge, case.as_bytes()));
        let b = without_date(&raw(slow_addr, case.as_bytes()));
        assert_eq!(a, b, "different answers to {case:?}");
        assert!(a.starts_with("HTTP/1.1 "), "{case:?}: {a}");
        compared += 1;
    }
    // Left to Pingora on both edges: the same status (bodies such as
    // /health's differ between two processes).
    for case in pingora_cases {
        let status = |addr| {
            let r = without_date(&raw(addr, case.as_bytes()));
            r.lines().next().unwrap_or_default().to_owned()
        };
        assert_eq!(status(edge), status(slow_addr), "{case:?}");
        compared += 1;
    }
    let fast = metric(
        &cluster.metrics(cluster.edge_metrics_addr),
        "edge_fast_path_answers_total",
    ) - fast_before;
    assert_eq!(
        fast,
        fast_cases.len() as f64,
        "the fast path answered exactly the plain redirect requests"
    );
    println!("{compared} requests compared, {fast} answered by the fast path, all identical");
}

/// A client over its rate limit gets the same 429 from both paths, charged
/// to the same (shared, memory-mapped) limiter state: the two edges let
/// the client through no more often together than one limiter would.
#[test]
fn a_client_over_its_limit_gets_the_same_429_from_both_paths() {
    const BURST: u32 = 5;
    let (cluster, _slow, slow_addr) = limited_edges(BURST);
    let edge = cluster.edge_addr;

    let fast_before = metric(
        &cluster.metrics(cluster.edge_metrics_addr),
        "edge_fast_path_answers_total",
    );
    let send = |addr, method: &str| {
        let req = format!(
            "{method} /tmp HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 203.0.113.7\r\nConnection: close\r\n\r\n"
        );
        without_date(&raw(addr, req.as_bytes()))
    };
    // The burst of 5, shared by both edges; then 429s. A token may come back
    // between two requests (one a second), so the pair is retried.
    let mut fast_answers = 0.0;
    let mut sent = 0;
    let mut redirects = 0;
    let started = Instant::now();
    let (fast, slow) = loop {
        let (fast, slow) = (send(edge, "GET"), send(slow_addr, "GET"));
        fast_answers += 1.0;
        sent += 1;
        redirects += [&fast, &slow]
            .iter()
            .filter(|r| r.starts_with("HTTP/1.1 302 "))
            .count();
        assert!(
            sent < 40,
            "no pair of 429s after {sent} tries: {fast}\n{slow}"
        );
        if fast.starts_with("HTTP/1.1 429 ") && slow.starts_with("HTTP/1.1 429 ") {
            break (fast, slow);
        }
    };
    // One limiter lets the client through BURST times, and once more per
    // whole second since its first request (refilled at one a second), plus
    // one as a margin between the edges' clock and the test's: 6 when the
    // pairs take under a second (4 pairs). Two limiters, one per edge, let
    // it through twice the burst: 10 redirects in 6 pairs.
    let elapsed = started.elapsed().as_secs_f64();
    assert!(
        redirects as f64 <= f64::from(BURST) + elapsed + 1.0,
        "{redirects} redirects in {sent} pairs within {elapsed:.2} s: the two edges do not \
         share the client's limit (burst {BURST}, one a second)"
    );
    // `ratelimit-reset` counts seconds until the bucket is full again, from
    // each answer's own millisecond: it may differ by one.
    let reset = |r: &str| {
        r.split("\r\n")
            .filter(|l| !l.starts_with("ratelimit-reset: "))
            .collect::<Vec<_>>()
            .join("\r\n")
    };
    assert!(fast.contains("\r\nratelimit-reset: "), "{fast}");
    assert_eq!(reset(&fast), reset(&slow));
    assert!(fast.contains("\r\nretry-after: 1\r\n"), "{fast}");
    assert!(fast.contains("\"rate_limited\""), "{fast}");
    let (fast, slow) = (send(edge, "HEAD"), send(slow_addr, "HEAD"));
    fast_answers += 1.0;
    if fast.starts_with("HTTP/1.1 429 ") && slow.starts_with("HTTP/1.1 429 ") {
        assert_eq!(reset(&fast), reset(&slow));
        assert!(fast.ends_with("\r\n\r\n"), "no body for HEAD: {fast}");
    }
    let fast_after = metric(
        &cluster.metrics(cluster.edge_metrics_addr),
        "edge_fast_path_answers_total",
    );
    assert_eq!(
        fast_after - fast_before,
        fast_answers,
        "the fast path answered the fast edge's redirects and 429s"
    );
}

/// Two client-address lines from a trusted proxy are one list (the proxy's
/// own line last): both paths charge the client the last line names, not
/// the one the first line (which a client can forge) names.
#[test]
fn several_client_address_lines_are_one_list() {
    let (cluster, _slow, slow_addr) = limited_edges(1);
    let edge = cluster.edge_addr;
    let status = |addr, lines: &[String]| {
        let mut req = "GET /tmp HTTP/1.1\r\nHost: x\r\n".to_string();
        for l in lines {
            req.push_str(&format!("X-Forwarded-For: {l}\r\n"));
        }
        req.push_str("Connection: close\r\n\r\n");
        let r = without_date(&raw(addr, req.as_bytes()));
        r.get(9..12).unwrap_or_default().to_owned()
    };
    // Per edge and attempt, two fresh clients: the forged line's and the
    // proxy's. A second-long stall between the requests refills a bucket
    // (both then get 302), so an attempt can be inconclusive, never wrong.
    for (n, addr) in [edge, slow_addr].into_iter().enumerate() {
        let mut seen = Vec::new();
        let found = (0..20).any(|attempt| {
            let forged = format!("203.0.113.{}", n * 100 + attempt * 2 + 1);
            let real = format!("203.0.113.{}", n * 100 + attempt * 2 + 2);
            let both = status(addr, &[forged.clone(), real.clone()]);
            let (real_alone, forged_alone) = (
                status(addr, std::slice::from_ref(&real)),
                status(addr, std::slice::from_ref(&forged)),
            );
            seen.push(format!("{both} {real_alone} {forged_alone}"));
            both == "302" && real_alone == "429" && forged_alone == "302"
        });
        assert!(
            found,
            "edge {n}: the last line's client was never the one charged: {seen:?}"
        );
    }
}

/// Behind a trusted proxy, a client that puts a byte that is not
/// UTF-8 into its own `X-Forwarded-For` (the proxy appends the client's real
/// address after it) was never charged: the edge read the whole list as
/// garbage and charged the proxy instead. The client escaped both limits
/// (request rate and scanning), and every other request that fell back to
/// the proxy's address paid for it.
#[test]
fn a_forwarded_entry_that_is_not_utf8_does_not_shift_the_charge_to_the_proxy() {
    let (cluster, _slow, _slow_addr) = limited_edges(1);
    let edge = cluster.edge_addr;
    let status = |xff: &[u8]| {
        let mut req = b"GET /tmp HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: ".to_vec();
        req.extend_from_slice(xff);
        req.extend_from_slice(b"\r\nConnection: close\r\n\r\n");
        let r = without_date(&raw(edge, &req));
        r.get(9..12).unwrap_or_default().to_owned()
    };
    let mut seen = Vec::new();
    let found = (0..20).any(|attempt| {
        let real = format!("203.0.113.{}", 150 + attempt);
        // Three requests as the proxy forwards them: the client's forged
        // byte, then its real address. Burst 1: at most one gets a 302.
        let forged: Vec<String> = (0..3)
            .map(|_| {
                let mut xff = b"\xff, ".to_vec();
                xff.extend_from_slice(real.as_bytes());
                status(&xff)
            })
            .collect();
        // The same client, with a clean header: over its limit by now.
        let clean = status(real.as_bytes());
        seen.push(format!("{forged:?} then {clean}"));
        forged.iter().filter(|s| *s == "429").count() >= 1 && clean == "429"
    });
    assert!(
        found,
        "the client behind the proxy was never charged for its requests: {seen:?}"
    );
}
