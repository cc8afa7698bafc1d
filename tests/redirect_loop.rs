//! The redirect loops (`src/edge/redirect_loop.rs`): they accept the
//! cleartext connections and serve them on threads of their own. These
//! tests hold such connections open and check, through the edge's own
//! counters (`edge_redirect_loop_*`), that the loop really serves them; that
//! a later request on a kept connection gets what a new connection's first
//! gets (and `tests/fast_path.rs` that those are what Pingora answers); that
//! any other request (health, the API with a body, pipelined requests) goes
//! to Pingora on the same connection and is answered; and that the loop
//! applies the header and keep-alive time limits.

#[path = "common/chaos.rs"]
mod chaos;
mod common;

use std::net::SocketAddr;
use std::time::Duration;

use chaos::{Conn, IdleEnd, Reply, signal};
use common::{Cluster, KEY, api, get, metric, metric_exposed, wait_until};

const HEADER_TIMEOUT_MS: u64 = 1_000;
const KEEPALIVE_TIMEOUT_MS: u64 = 1_500;

fn cluster() -> Cluster {
    Cluster::with_client_timeouts(HEADER_TIMEOUT_MS, KEEPALIVE_TIMEOUT_MS)
}

/// (connections held by the loops, connections they accepted, hand-backs);
/// each series must be exposed (a zero is asserted of them).
fn loop_counts(cluster: &Cluster) -> (f64, f64, f64) {
    let text = cluster.metrics(cluster.edge_metrics_addr);
    (
        metric_exposed(&text, "edge_redirect_loop_connections"),
        metric_exposed(&text, "edge_redirect_loop_accepts_total"),
        metric_exposed(&text, "edge_redirect_loop_handbacks_total"),
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
    answer(conn, method == "HEAD", &format!("{method} {path}"))
}

/// The next answer on `conn`, whole: status, headers but `date` (names in
/// lower case, sorted), body. `what` names the request if there is none.
fn answer(conn: &mut Conn, head_request: bool, what: &str) -> Answer {
    match conn.read_answer(head_request) {
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
        other => panic!("{}: {other:?}", &what[..what.len().min(40)]),
    }
}

/// An answer without its `connection` header (a loop's answers say
/// keep-alive, those compared with them were asked with `close`).
fn without_connection(mut a: Answer) -> Answer {
    a.1.retain(|(n, _)| n != "connection");
    a
}

/// A kept-alive connection whose first request has been answered, and
/// which a loop holds (its accept is counted).
fn looped(cluster: &Cluster, path: &str) -> Conn {
    looped_on(cluster, || Conn::open(cluster.edge_addr).unwrap(), path)
}

/// [`looped`] on a connection `open` makes.
fn looped_on(cluster: &Cluster, open: impl FnOnce() -> Conn, path: &str) -> Conn {
    let before = loop_counts(cluster);
    let mut conn = open();
    assert_eq!(ask(&mut conn, "GET", path).0 / 100, 3, "{path}");
    // Counted once the loop has accepted it (the gauge of held connections
    // can meanwhile lose another one).
    wait_until(Duration::from_secs(10), "the connection in a loop", || {
        loop_counts(cluster).1 > before.1
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

    // Each case answered on a new connection (its first and only request)
    // and as a later request on a kept connection: the same answer, but for
    // `connection`. (`tests/fast_path.rs` compares the first with what
    // Pingora answers with the fast path off.)
    let mut conn = looped(&cluster, "/lp");
    let counts = loop_counts(&cluster);
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
            "{method} {path}: later request vs first"
        );
    }
    // All of those were the loop's: nothing went back to Pingora. Nor does
    // any of many more requests on the one connection.
    assert_eq!(
        loop_counts(&cluster).2,
        counts.2,
        "hand-backs during the cases"
    );
    let (held, accepts, handbacks) = loop_counts(&cluster);
    for _ in 0..500 {
        let (status, headers, _) = ask(&mut conn, "GET", "/lp");
        assert_eq!(status, 302);
        assert!(headers.contains(&("location".into(), "https://example.com/lp".into())));
    }
    assert_eq!(loop_counts(&cluster), (held, accepts, handbacks));
    // Polling before sleeping is off by default (`edge.busy_poll_us: 0`).
    let text = cluster.metrics(cluster.edge_metrics_addr);
    assert_eq!(
        metric_exposed(&text, "edge_redirect_loop_busy_poll_hits_total"),
        0.0
    );

    // A request the fast path does not answer: back to Pingora, answered
    // on the same connection, which Pingora then keeps (its keep-alive
    // settings live with its session) and which still serves redirects.
    let (status, _, body) = ask(&mut conn, "GET", "/health");
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(ask(&mut conn, "GET", "/lp").0, 302);
    assert_eq!(ask(&mut conn, "GET", "/nope").0, 404);
    assert_eq!(
        loop_counts(&cluster),
        (held - 1.0, accepts, handbacks + 1.0)
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
    assert_eq!(looped, fresh, "pipelined requests: kept connection vs new");
}

/// With `edge.busy_poll_us`, a loop that holds connections polls for
/// their next events for that long before it sleeps: a client that asks
/// again as soon as it has its answer finds the loop awake (the waits that
/// polling ended are counted), and gets the same answers.
#[test]
fn a_loop_polls_before_sleeping_when_told_to() {
    // The longest poll the config takes (10 ms): the test's next request
    // comes well within it.
    let cluster = Cluster::start_custom("  busy_poll_us: 10000\n", "", "");
    let edge = cluster.edge_addr;
    create(edge, r#"{"url":"https://example.com/bp","code":"bp"}"#);
    wait_until(Duration::from_secs(10), "the link at the edge", || {
        get(edge, "/bp").status == 302
    });
    let mut conn = looped(&cluster, "/bp");
    let hits = |c: &Cluster| {
        metric_exposed(
            &c.metrics(c.edge_metrics_addr),
            "edge_redirect_loop_busy_poll_hits_total",
        )
    };
    let before = hits(&cluster);
    for _ in 0..50 {
        let (status, headers, _) = ask(&mut conn, "GET", "/bp");
        assert_eq!(status, 302);
        assert!(headers.contains(&("location".into(), "https://example.com/bp".into())));
    }
    let polled = hits(&cluster) - before;
    assert!(
        polled >= 1.0,
        "no request of 50 was found by polling (busy_poll_us: 10000)"
    );
    println!("busy polling: {polled} of 50 requests found by polling");
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
        Reply::Whole(r) => {
            assert_eq!(r.status, 408);
            assert_eq!(r.api_error().0, "request_timeout");
        }
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

/// A header that fills the 4096-byte buffer Pingora's path read a first
/// request into, with the next request right behind it in one write: when
/// Pingora's stream had a read buffer, the second request could be read
/// ahead into it and lost with it when the connection moved to a loop.
/// Now the loop reads both at once, and they get what any two pipelined
/// requests get (the edge does not pipeline: Pingora answers the first and
/// closes), never a connection left waiting for an answer that will not
/// come.
#[test]
fn a_request_read_ahead_by_pingora_is_not_lost() {
    let cluster = cluster();
    let edge = cluster.edge_addr;
    create(
        edge,
        r#"{"url":"https://example.com/p","code":"pm","status":301}"#,
    );
    wait_until(Duration::from_secs(10), "the link at the edge", || {
        get(edge, "/pm").status == 301
    });
    let two_answers = |first: &[u8]| {
        let mut two = first.to_vec();
        two.extend_from_slice(&Conn::head("GET", "/nope", &[], b""));
        let mut conn = Conn::open(edge).unwrap();
        conn.send(&two).unwrap();
        let mut next = || match conn.read_answer(false) {
            Reply::Whole(r) => format!("{}", r.status),
            other => format!("{other:?}"),
        };
        (next(), next())
    };
    let base = Conn::head("GET", "/pm", &[("X-Pad", "")], b"").len();
    let pad = "p".repeat(4096 - base);
    let long = Conn::head("GET", "/pm", &[("X-Pad", &pad)], b"");
    assert_eq!(long.len(), 4096);
    let short = two_answers(&Conn::head("GET", "/pm", &[], b""));
    assert_eq!(short.0, "301");
    assert_eq!(two_answers(&long), short);
}

/// A TCP connection to `addr` with a 1400-byte MSS and a 16 KiB receive
/// buffer, set before connecting: the edge's side of it gets a small send
/// buffer (the kernel sizes it from the MSS; on loopback it would be some
/// MiB), so a large answer does not go out in one write.
fn small_window(addr: SocketAddr) -> std::net::TcpStream {
    window_of(addr, 16 * 1024, 1400)
}

/// A client socket connected to `addr` with the receive buffer and segment
/// size given (set before connecting, so that the window it advertises
/// from its first segment on is that small).
fn window_of(addr: SocketAddr, rcvbuf: libc::c_int, mss: libc::c_int) -> std::net::TcpStream {
    use std::os::fd::FromRawFd;
    let SocketAddr::V4(v4) = addr else {
        panic!("the test edge listens on IPv4")
    };
    // SAFETY: plain socket calls on a socket this function owns; every
    // pointer is to a live local of the size given.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        for (level, name, value, what) in [
            (libc::SOL_SOCKET, libc::SO_RCVBUF, rcvbuf, "SO_RCVBUF"),
            (libc::IPPROTO_TCP, libc::TCP_MAXSEG, mss, "TCP_MAXSEG"),
        ] {
            let value: libc::c_int = value;
            let set = libc::setsockopt(
                fd,
                level,
                name,
                (&value as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
            assert_eq!(set, 0, "{what}: {}", std::io::Error::last_os_error());
        }
        let sin = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: v4.port().to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from(*v4.ip()).to_be(),
            },
            sin_zero: [0; 8],
        };
        let connected = libc::connect(
            fd,
            (&sin as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        );
        assert_eq!(connected, 0, "connect: {}", std::io::Error::last_os_error());
        std::net::TcpStream::from_raw_fd(fd)
    }
}

/// Answers larger than the socket takes (forwarded queries of 8,000 bytes,
/// near the fast path's 8 KiB target limit, to a client with a small window
/// that reads nothing for a while): the loop keeps the rest of an answer
/// and sends it as the client reads, counted in
/// `edge_redirect_loop_write_waits_total`; every answer arrives whole and
/// in order, and is what a new connection gets. Then a header longer than
/// one read (20 KiB), answered by the loop itself, and HTTP/1.0, which goes
/// back to Pingora.
#[test]
fn a_loop_finishes_answers_the_socket_did_not_take_at_once() {
    // The default limits (60 s keep-alive): reading the answers takes
    // this debug-built client a while.
    let cluster = Cluster::start();
    let edge = cluster.edge_addr;
    create(
        edge,
        r#"{"url":"https://example.com/f","code":"fq","status":307,"forward_query":true}"#,
    );
    create(edge, r#"{"url":"https://example.com/lp","code":"lp"}"#);
    wait_until(Duration::from_secs(10), "links at the edge", || {
        get(edge, "/fq").status == 307 && get(edge, "/lp").status == 302
    });
    let counter = |name: &str| metric(&cluster.metrics(cluster.edge_metrics_addr), name);
    let waits = || counter("edge_redirect_loop_write_waits_total");
    let answers = || counter("edge_fast_path_answers_total");
    let before = waits();
    let mut conn = looped_on(
        &cluster,
        || Conn::from_stream(small_window(edge)).unwrap(),
        "/lp",
    );
    let handbacks = loop_counts(&cluster).2;

    // One request at a time (never two in one read, which would be
    // pipelining), each sent once the previous one was answered, until an
    // answer has had to wait for the socket.
    let mut sent = Vec::new();
    while waits() == before {
        assert!(
            sent.len() < 200,
            "{} answers of 8 KB all went out at once",
            sent.len()
        );
        let path = format!("/fq?n={}&q={}", sent.len(), "x".repeat(8_000));
        let answered = answers();
        conn.send(&Conn::head("GET", &path, &[], b"")).unwrap();
        sent.push(path);
        wait_until(Duration::from_secs(10), "the request answered", || {
            answers() > answered || waits() > before
        });
    }
    for path in &sent {
        let (status, headers, _) = answer(&mut conn, false, path);
        assert_eq!(status, 307);
        let want = format!("https://example.com/f?{}", &path["/fq?".len()..]);
        assert!(
            headers.iter().any(|(n, v)| n == "location" && *v == want),
            "{}: wrong or cut location",
            &path[..12]
        );
    }
    // The same answer on a new connection.
    let path = &sent[0];
    let mut fresh = Conn::open(edge).unwrap();
    let expected = ask_with(&mut fresh, "GET", path, &[("Connection", "close")]);
    let got = ask(&mut conn, "GET", path);
    assert!(
        without_connection(got) == without_connection(expected),
        "kept connection vs new"
    );

    // A 20 KiB header: more than one read of the loop, still its answer.
    let long = "h".repeat(10 * 1024);
    let r = ask_with(&mut conn, "GET", "/lp", &[("X-A", &long), ("X-B", &long)]);
    assert_eq!(r.0, 302);
    assert_eq!(
        loop_counts(&cluster).2,
        handbacks,
        "nothing went back to Pingora"
    );
    // HTTP/1.0 goes back to Pingora, which answers it as on a new connection.
    conn.send(b"GET /lp HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
    let mut fresh = Conn::open(edge).unwrap();
    fresh.send(b"GET /lp HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
    let status = |c: &mut Conn| match c.read_answer(false) {
        Reply::Whole(r) => r.status,
        other => panic!("HTTP/1.0: {other:?}"),
    };
    assert_eq!(status(&mut conn), status(&mut fresh));
    // Both connections' (the loops accept new ones too).
    assert_eq!(
        loop_counts(&cluster).2,
        handbacks + 2.0,
        "HTTP/1.0 went back"
    );
}

/// The paced client's margin: every time it waits is at least this far
/// from each of the two limits.
const PACED_MARGIN_MS: u64 = 1_000;
/// The pause between two requests of a busy connection.
const PACED_GAP_MS: u64 = 200;
const PACED_HEADER_MS: u64 = PACED_GAP_MS + PACED_MARGIN_MS;
/// An idle time past the header limit and within the keep-alive one.
const PACED_IDLE_MS: u64 = PACED_HEADER_MS + PACED_MARGIN_MS;
const PACED_KEEPALIVE_MS: u64 = PACED_IDLE_MS + PACED_MARGIN_MS;

/// The loop's clocks: a connection kept busy stays open well past the
/// keep-alive limit (each answer restarts it); an idle one is not cut
/// before it; a later request's header clock starts at its first byte,
/// not at the end of the previous answer. (The client paces itself with
/// sleeps, each a second or more away from both limits: 200 ms pauses
/// under a 1.2 s header limit, 2.2 s idle times between it and a 3.2 s
/// keep-alive limit, kept busy until 1 s past the keep-alive limit.)
#[test]
fn a_loop_restarts_its_clocks_as_the_tokio_path_does() {
    let cluster = Cluster::with_client_timeouts(PACED_HEADER_MS, PACED_KEEPALIVE_MS);
    let edge = cluster.edge_addr;
    create(edge, r#"{"url":"https://example.com/lp","code":"lp"}"#);
    wait_until(Duration::from_secs(10), "the link at the edge", || {
        get(edge, "/lp").status == 302
    });
    let gap = Duration::from_millis(PACED_GAP_MS);
    let mut busy = looped(&cluster, "/lp");
    let started = std::time::Instant::now();
    while started.elapsed() < Duration::from_millis(PACED_KEEPALIVE_MS + PACED_MARGIN_MS) {
        std::thread::sleep(gap);
        assert_eq!(
            ask(&mut busy, "GET", "/lp").0,
            302,
            "after {:?}",
            started.elapsed()
        );
    }
    // Idle past the header limit, within the keep-alive one: still open.
    let end = busy.idle_end(Duration::from_millis(PACED_IDLE_MS));
    assert!(matches!(end, IdleEnd::Open), "closed early: {end:?}");
    assert_eq!(ask(&mut busy, "GET", "/lp").0, 302);
    // Idle longer than the header limit (but within keep-alive), then a
    // header in two pieces: answered.
    std::thread::sleep(Duration::from_millis(PACED_IDLE_MS));
    let head = Conn::head("GET", "/lp", &[], b"");
    busy.send(&head[..10]).unwrap();
    busy.send(&head[10..]).unwrap();
    match busy.read_answer(false) {
        Reply::Whole(r) => assert_eq!(r.status, 302),
        other => panic!("a header after an idle time: {other:?}"),
    }
}

/// On SIGTERM a loop closes its idle connections at once, while the edge
/// is still in its grace period, and answers a request it has begun to
/// read, with `Connection: close`, before closing its connection. (A
/// grace period of 10 s: the edge exits only after it, so one that has
/// exited by the end of the test closed the connections by exiting.)
#[test]
fn a_loop_closes_idle_connections_on_shutdown() {
    let mut cluster =
        Cluster::with_client_timeouts_and_grace(HEADER_TIMEOUT_MS, KEEPALIVE_TIMEOUT_MS, 10);
    let edge = cluster.edge_addr;
    create(edge, r#"{"url":"https://example.com/lp","code":"lp"}"#);
    wait_until(Duration::from_secs(10), "the link at the edge", || {
        get(edge, "/lp").status == 302
    });
    let mut idle: Vec<Conn> = (0..4).map(|_| looped(&cluster, "/lp")).collect();
    // One in the middle of a request: kept, answered, then closed.
    let mut busy = looped(&cluster, "/lp");
    busy.send(b"GET /lp HTTP/1.1\r\nHost: x\r\n").unwrap();
    let mut process = cluster.edge.take().expect("the edge");
    signal(process.id(), "TERM");
    for c in &mut idle {
        let end = c.idle_end(Duration::from_secs(10));
        assert!(matches!(end, IdleEnd::Closed), "at shutdown: {end:?}");
    }
    busy.send(b"\r\n").unwrap();
    let (status, headers, _) = answer(&mut busy, false, "the request finished after SIGTERM");
    assert_eq!(status, 302);
    // As Pingora's answers during a shutdown: the connection is not kept.
    assert!(
        headers.contains(&("connection".to_owned(), "close".to_owned())),
        "{headers:?}"
    );
    let end = busy.idle_end(Duration::from_secs(10));
    assert!(matches!(end, IdleEnd::Closed), "after its answer: {end:?}");
    assert!(
        process.try_wait().unwrap().is_none(),
        "the edge had already exited: the closes were not the loop's"
    );
    // Not waited for: the rest of its grace period would only slow the test.
    process.kill().unwrap();
    process.wait().unwrap();
}

/// The TCP state (as `/proc/net/tcp` shows it: `01` ESTABLISHED, `04`
/// FIN_WAIT1, ...) of the edge's side of the connection from `client`.
fn server_side_state(server: SocketAddr, client: SocketAddr) -> Option<String> {
    server_side(server, client).map(|(state, _)| state)
}

/// The edge's side of the connection from `client`: its TCP state and the
/// bytes in its send queue (`tx_queue`, sent and not acknowledged or not
/// sent yet).
fn server_side(server: SocketAddr, client: SocketAddr) -> Option<(String, u64)> {
    let text = std::fs::read_to_string("/proc/net/tcp").ok()?;
    let port = |field: &str| u16::from_str_radix(field.rsplit_once(':')?.1, 16).ok();
    text.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        if port(f[1])? != server.port() || port(f[2])? != client.port() {
            return None;
        }
        let tx = u64::from_str_radix(f[4].split_once(':')?.0, 16).ok()?;
        Some((f[3].to_owned(), tx))
    })
}

/// Sends requests for answers with a forwarded query of `query_len` bytes,
/// one at a time (each once the previous one was counted, so never
/// pipelined), from a client with a small window that reads nothing, until an answer is no longer counted within 2 s (the
/// edge is stuck writing to it); then waits up to ten keep-alive times for
/// the edge to let the connection go. Returns the requests sent and the
/// edge's side's TCP state at the end (`01`: still ESTABLISHED).
fn never_reading_client(
    cluster: &Cluster,
    extra_headers: &str,
    query_len: usize,
) -> (usize, String) {
    use std::io::Write;
    use std::time::Instant;
    let answered = || {
        let text = cluster.metrics(cluster.edge_metrics_addr);
        metric(
            &text,
            r#"http_requests_total{method="GET",route="redirect",status_code="307"}"#,
        )
    };
    let edge = cluster.edge_addr;
    let mut stream = small_window(edge);
    let local = stream.local_addr().unwrap();
    let mut sent = 0;
    loop {
        assert!(sent < 400, "{sent} answers of 8 KB all went out");
        let before = answered();
        let req = format!(
            "GET /fq?n={sent}&q={} HTTP/1.1\r\nHost: x\r\n{extra_headers}\r\n",
            "x".repeat(query_len)
        );
        stream.write_all(req.as_bytes()).unwrap();
        sent += 1;
        let until = Instant::now() + Duration::from_secs(2);
        let mut moved = false;
        while Instant::now() < until {
            if answered() > before {
                moved = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        if !moved {
            break;
        }
    }
    (sent, state_after_keepalive_times(edge, local))
}

/// Waits up to ten keep-alive times for the edge to let the connection from
/// `local` go; returns its side's TCP state then (`01`: still ESTABLISHED).
fn state_after_keepalive_times(edge: SocketAddr, local: SocketAddr) -> String {
    let limit = Duration::from_millis(KEEPALIVE_TIMEOUT_MS * 10);
    let started = std::time::Instant::now();
    let mut state = server_side_state(edge, local).unwrap_or_default();
    while started.elapsed() < limit && state == "01" {
        std::thread::sleep(Duration::from_millis(20));
        state = server_side_state(edge, local).unwrap_or_default();
    }
    state
}

fn forwarding_link(edge: SocketAddr) {
    create(
        edge,
        r#"{"url":"https://example.com/f","code":"fq","status":307,"forward_query":true}"#,
    );
    wait_until(Duration::from_secs(10), "the link at the edge", || {
        get(edge, "/fq").status == 307
    });
}

/// A client that never reads its answers is let go after the keep-alive
/// time however its requests are answered: by a loop (which always did),
/// and on tokio, where every request the fast path leaves to Pingora (here a
/// redirect with two client-address lines) is answered. Pingora sets no
/// write timeout, and the edge held such a connection, its task and its
/// buffers for as long as the client liked (found by review).
#[test]
fn a_client_that_never_reads_is_let_go_on_every_path() {
    let cluster = Cluster::with_client_timeouts(HEADER_TIMEOUT_MS, KEEPALIVE_TIMEOUT_MS);
    forwarding_link(cluster.edge_addr);
    let (sent, state) = never_reading_client(&cluster, "", 8_000);
    assert_ne!(state, "01", "loop: still ESTABLISHED after {sent} requests");
    let two_lines = "X-Forwarded-For: 192.0.2.1\r\nX-Forwarded-For: 192.0.2.2\r\n";
    let (sent, state) = never_reading_client(&cluster, two_lines, 8_000);
    assert_ne!(
        state, "01",
        "Pingora's path: still ESTABLISHED ten keep-alive times after {sent} requests"
    );
}

/// The same with `edge.redirect_loop: false`: the fast path's answers are
/// written on tokio, and their writes had no time limit either.
#[test]
fn a_client_that_never_reads_is_let_go_without_loops() {
    let cluster = Cluster::start_custom(
        &format!(
            "  client_header_timeout_ms: {HEADER_TIMEOUT_MS}\n  keepalive_timeout_ms: {KEEPALIVE_TIMEOUT_MS}\n  redirect_loop: false\n"
        ),
        "",
        "",
    );
    forwarding_link(cluster.edge_addr);
    let (sent, state) = never_reading_client(&cluster, "", 8_000);
    assert_ne!(
        state, "01",
        "fast path on tokio: still ESTABLISHED ten keep-alive times after {sent} requests"
    );
    // Answers of about 1.2 KB, each small enough to go out without a write
    // limit on a new connection: the limit is set because the connection
    // is kept, and the answers pile up until a write waits.
    let (sent, state) = never_reading_client(&cluster, "", 1_000);
    assert_ne!(
        state, "01",
        "small answers on tokio: still ESTABLISHED ten keep-alive times after {sent} requests"
    );
}

/// A client that asks for one large answer on a `Connection: close`
/// connection and never reads it is let go after the keep-alive time too.
/// The edge gives a cleartext socket its write limit (`TCP_USER_TIMEOUT`)
/// only when it needs one, not at accept; Pingora's answers need it (here a
/// redirect with a 60,000-byte forwarded query, a request target beyond
/// the fast path's 8 KiB, so Pingora answers it), and its task would wait
/// on this client forever without it. The client's window (a 2 KiB receive
/// buffer, 536-byte segments) keeps most of the answer in the edge's send
/// queue.
#[test]
fn a_one_request_client_that_never_reads_is_let_go() {
    use std::io::Write;
    let cluster = cluster();
    forwarding_link(cluster.edge_addr);
    let edge = cluster.edge_addr;
    let mut stream = window_of(edge, 2048, 536);
    let local = stream.local_addr().unwrap();
    let req = format!(
        "GET /fq?q={} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        "x".repeat(60_000)
    );
    stream.write_all(req.as_bytes()).unwrap();
    // Stuck: the answer waits in the edge's send queue, on a connection
    // the edge has not closed (its side still ESTABLISHED).
    wait_until(
        Duration::from_secs(10),
        "the edge writing its answer",
        || matches!(server_side(edge, local), Some((state, queued)) if state == "01" && queued > 0),
    );
    let state = state_after_keepalive_times(edge, local);
    assert_ne!(
        state, "01",
        "still ESTABLISHED ten keep-alive times after the request"
    );
}
