//! The redirect loops (`src/edge/redirect_loop.rs`): a kept-alive cleartext
//! connection is handed to a loop thread after a fast-path answer. These
//! tests hold such connections open and check, through the edge's own
//! counters (`edge_redirect_loop_*`), that the loop really serves them; that
//! it answers what the tokio path answers; that any other request (health,
//! the API with a body, pipelined requests) goes back to Pingora on the same
//! connection and is answered; and that the loop applies the header and
//! keep-alive time limits.

#[path = "common/chaos.rs"]
mod chaos;
mod common;

use std::net::SocketAddr;
use std::time::Duration;

use chaos::{Conn, IdleEnd, Reply};
use common::{Cluster, KEY, api, get, metric, wait_until};

const HEADER_TIMEOUT_MS: u64 = 1_000;
const KEEPALIVE_TIMEOUT_MS: u64 = 1_500;

fn cluster() -> Cluster {
    Cluster::start_custom(
        &format!(
            "  client_header_timeout_ms: {HEADER_TIMEOUT_MS}\n  keepalive_timeout_ms: {KEEPALIVE_TIMEOUT_MS}\n"
        ),
        "",
        "",
    )
}

/// (connections held by the loops, hand-offs, hand-backs).
fn loop_counts(cluster: &Cluster) -> (f64, f64, f64) {
    let text = cluster.metrics(cluster.edge_metrics_addr);
    (
        metric(&text, "edge_redirect_loop_connections"),
        metric(&text, "edge_redirect_loop_handoffs_total"),
        metric(&text, "edge_redirect_loop_handbacks_total"),
    )
}

fn create(edge: SocketAddr, body: &str) {
    let r = api(edge, "POST", "/api/links", body);
    assert_eq!(
        r.status,
        201,
        "{body}: {:?}",
        String::from_utf8_lossy(&r.body)
    );
}

type Answer = (u16, Vec<(String, String)>, Vec<u8>);

/// One request on `conn`, its whole answer: status, headers but `date`
/// (sorted by name), body.
fn ask(conn: &mut Conn, method: &str, path: &str) -> Answer {
    ask_with(conn, method, path, &[])
}

fn ask_with(conn: &mut Conn, method: &str, path: &str, extra: &[(&str, &str)]) -> Answer {
    conn.send(&Conn::head(method, path, extra, b"")).unwrap();
    match conn.read_answer(method == "HEAD") {
        Reply::Whole(r) => {
            let mut headers: Vec<(String, String)> = r
                .headers
                .into_iter()
                .filter(|(n, _)| !n.eq_ignore_ascii_case("date"))
                .map(|(n, v)| (n.to_ascii_lowercase(), v))
                .collect();
            headers.sort();
            (r.status, headers, r.body)
        }
        other => panic!("{method} {path}: {other:?}"),
    }
}

/// A kept-alive connection whose first request has been answered, and
/// which a loop holds (the hand-off is counted).
fn looped(cluster: &Cluster, path: &str) -> Conn {
    let before = loop_counts(cluster);
    let mut conn = Conn::open(cluster.edge_addr).unwrap();
    assert_eq!(ask(&mut conn, "GET", path).0 / 100, 3, "{path}");
    wait_until(Duration::from_secs(10), "the connection in a loop", || {
        let now = loop_counts(cluster);
        now.1 > before.1 && now.0 > before.0
    });
    conn
}

#[test]
fn kept_alive_redirects_are_served_by_a_loop_and_the_rest_goes_back_to_pingora() {
    let cluster = cluster();
    let edge = cluster.edge_addr;
    create(edge, r#"{"url":"https://example.com/lp","code":"lp"}"#);
    create(
        edge,
        r#"{"url":"https://example.com/f?x=1","code":"fq","status":307,"forward_query":true}"#,
    );
    create(
        edge,
        r#"{"url":"https://example.com/p","code":"pm","status":301}"#,
    );
    wait_until(Duration::from_secs(10), "links at the edge", || {
        get(edge, "/fq").status == 307 && get(edge, "/pm").status == 301
    });

    // Each case answered on a new connection (its first and only request:
    // the tokio path) and on a connection a loop holds: the same answer,
    // but for `connection`.
    let mut conn = looped(&cluster, "/lp");
    let without_connection = |mut a: Answer| {
        a.1.retain(|(n, _)| n != "connection");
        a
    };
    let cases = [
        ("GET", "/lp"),
        ("HEAD", "/lp"),
        ("GET", "/pm"),
        ("GET", "/fq?utm=a%20b&y=2"),
        ("GET", "/nope"),
        ("HEAD", "/nope"),
        ("GET", "/lp?ignored=1"),
    ];
    for (method, path) in cases {
        let mut fresh = Conn::open(edge).unwrap();
        let expected = ask_with(&mut fresh, method, path, &[("Connection", "close")]);
        let got = ask(&mut conn, method, path);
        assert!(got.1.contains(&("connection".into(), "keep-alive".into())));
        assert_eq!(
            without_connection(got),
            without_connection(expected),
            "{method} {path}: loop vs tokio path"
        );
    }
    // Many requests on the one connection, all from the loop: no hand-back.
    let (held, handoffs, handbacks) = loop_counts(&cluster);
    for _ in 0..500 {
        let (status, headers, _) = ask(&mut conn, "GET", "/lp");
        assert_eq!(status, 302);
        assert!(headers.contains(&("location".into(), "https://example.com/lp".into())));
    }
    assert_eq!(loop_counts(&cluster), (held, handoffs, handbacks));

    // A request the fast path does not answer: back to Pingora, answered
    // on the same connection, which Pingora then keeps (its keep-alive
    // settings live with its session) and which still serves redirects.
    let (status, _, body) = ask(&mut conn, "GET", "/health");
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(ask(&mut conn, "GET", "/lp").0, 302);
    assert_eq!(ask(&mut conn, "GET", "/nope").0, 404);
    assert_eq!(
        loop_counts(&cluster),
        (held - 1.0, handoffs, handbacks + 1.0)
    );

    // The API with a body, the head and the body sent apart, on a looped
    // connection: the loop reads the head, Pingora the body.
    let mut conn = looped(&cluster, "/lp");
    let body = r#"{"url":"https://example.com/new","code":"viaLoop"}"#;
    let auth = format!("Bearer {KEY}");
    let head = Conn::head(
        "POST",
        "/api/links",
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/json"),
        ],
        body.as_bytes(),
    );
    let split = head.len() - body.len();
    conn.send(&head[..split]).unwrap();
    conn.send(&head[split..]).unwrap();
    match conn.read_answer(false) {
        Reply::Whole(r) => assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body)),
        other => panic!("POST through a looped connection: {other:?}"),
    }
    wait_until(Duration::from_secs(10), "the new link served", || {
        get(edge, "/viaLoop").status == 302
    });
    assert_eq!(ask(&mut conn, "GET", "/viaLoop").0, 302);

    // Two requests in one write (pipelined): what a new connection gets
    // (Pingora answers the first and closes; the edge does not pipeline).
    let pipelined = |conn: &mut Conn| {
        let mut two = Conn::head("GET", "/pm", &[], b"");
        two.extend_from_slice(&Conn::head("GET", "/nope", &[], b""));
        conn.send(&two).unwrap();
        let first = match conn.read_answer(false) {
            Reply::Whole(r) => r.status,
            other => panic!("pipelined: {other:?}"),
        };
        let second = match conn.read_answer(false) {
            Reply::Whole(r) => format!("{}", r.status),
            other => format!("{other:?}"),
        };
        (first, second)
    };
    let fresh = pipelined(&mut Conn::open(edge).unwrap());
    let looped = pipelined(&mut looped(&cluster, "/lp"));
    assert_eq!(fresh.0, 301);
    assert_eq!(looped, fresh, "pipelined requests: loop vs tokio path");
}

#[test]
fn a_loop_applies_the_header_and_keep_alive_limits() {
    let cluster = cluster();
    let edge = cluster.edge_addr;
    create(edge, r#"{"url":"https://example.com/lp","code":"lp"}"#);
    wait_until(Duration::from_secs(10), "the link at the edge", || {
        get(edge, "/lp").status == 302
    });

    // Idle past the keep-alive limit: closed cleanly, nothing sent.
    let mut idle = looped(&cluster, "/lp");
    let end = idle.idle_end(Duration::from_millis(KEEPALIVE_TIMEOUT_MS * 10));
    assert!(matches!(end, IdleEnd::Closed), "idle connection: {end:?}");

    // Part of a header, then nothing: a 408, then the close.
    let mut slow = looped(&cluster, "/lp");
    slow.send(b"GET /lp HTTP/1.1\r\nHost: x\r\n").unwrap();
    match slow.read_answer(false) {
        Reply::Whole(r) => assert_eq!(r.status, 408),
        other => panic!("partial header: {other:?}"),
    }
    let end = slow.idle_end(Duration::from_millis(HEADER_TIMEOUT_MS * 10));
    assert!(matches!(end, IdleEnd::Closed), "after the 408: {end:?}");

    // A header sent a few bytes at a time within the limit is answered.
    let mut drip = looped(&cluster, "/lp");
    let head = Conn::head("GET", "/lp", &[], b"");
    for piece in head.chunks(7) {
        drip.send(piece).unwrap();
    }
    match drip.read_answer(false) {
        Reply::Whole(r) => assert_eq!(r.status, 302),
        other => panic!("header in pieces: {other:?}"),
    }

    // `Connection: close` on a looped connection: answered, then closed.
    let mut closing = looped(&cluster, "/lp");
    closing
        .send(&Conn::head("GET", "/lp", &[("Connection", "close")], b""))
        .unwrap();
    match closing.read_answer(false) {
        Reply::Whole(r) => {
            assert_eq!(r.status, 302);
            assert_eq!(r.header("connection"), Some("close"));
        }
        other => panic!("Connection: close: {other:?}"),
    }
    let end = closing.idle_end(Duration::from_secs(10));
    assert!(
        matches!(end, IdleEnd::Closed),
        "after Connection: close: {end:?}"
    );

    // A client that closes: its connection leaves the loop.
    drop(drip);
    wait_until(
        Duration::from_secs(10),
        "no connection left in the loops",
        || loop_counts(&cluster).0 == 0.0,
    );
}

/// A client that sends a request and shuts its side (a half-close) gets its
/// answer, then the close, long before the keep-alive limit (60 s here).
#[test]
fn a_half_closed_connection_is_answered_then_closed() {
    let cluster = Cluster::start();
    let edge = cluster.edge_addr;
    create(edge, r#"{"url":"https://example.com/lp","code":"lp"}"#);
    wait_until(Duration::from_secs(10), "the link at the edge", || {
        get(edge, "/lp").status == 302
    });
    let mut half = looped(&cluster, "/lp");
    half.send(&Conn::head("GET", "/lp", &[], b"")).unwrap();
    half.shut_write().unwrap();
    match half.read_answer(false) {
        Reply::Whole(r) => assert_eq!(r.status, 302),
        other => panic!("half-closed: {other:?}"),
    }
    let end = half.idle_end(Duration::from_secs(20));
    assert!(
        matches!(end, IdleEnd::Closed),
        "after a half-close: {end:?}"
    );
}
