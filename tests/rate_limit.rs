//! Per-client rate limits at the edge: 429 with `Retry-After` and
//! `RateLimit-*` after the limit, scanning barred for known codes too, the
//! client address taken from `X-Forwarded-For` only from a trusted proxy,
//! and the limits still in force after the edge is SIGKILLed and restarted
//! (their state is a memory-mapped file, not process memory).

mod common;

use std::time::{Duration, Instant};

use common::{Cluster, api, metric, request, wait_until};

/// Sends requests (`send(i)`, the `i`-th) until one is refused (429),
/// every other one answered `ok`: a bucket holding `tokens` at `since`
/// and refilled at one a second lets no more through than `tokens`, one
/// per whole second since, and one more (a margin between the limiter's
/// clock and the test's), however slow the machine; a limit that forgot
/// its state, or never applied, lets more through. Returns how many were
/// let through, the 429, and when its request was sent.
#[track_caller]
fn until_refused(
    ok: u16,
    tokens: u64,
    since: Instant,
    mut send: impl FnMut(usize) -> common::Response,
) -> (usize, common::Response, Instant) {
    let mut allowed = 0;
    loop {
        let sent = Instant::now();
        let r = send(allowed);
        if r.status == 429 {
            return (allowed, r, sent);
        }
        assert_eq!(r.status, ok, "{:?}", String::from_utf8_lossy(&r.body));
        allowed += 1;
        let elapsed = since.elapsed();
        assert!(
            allowed as f64 <= tokens as f64 + elapsed.as_secs_f64() + 1.0,
            "{allowed} let through in {elapsed:.1?}: more than {tokens} and one a second"
        );
    }
}

/// A write `since` the moment a key had `debt` writes beyond its burst (at
/// one a second): refused (429) with a `Retry-After` covering what is left
/// of the debt. Let in only once the debt may have been paid off.
#[track_caller]
fn assert_waits_for_debt(status: u16, retry_after: Option<&str>, debt: u64, since: Duration) {
    if status != 429 {
        assert!(
            since.as_secs_f64() >= debt as f64,
            "{status} {since:.1?} after a debt of {debt} writes at 1/s"
        );
        return;
    }
    let wait: u64 = retry_after.expect("Retry-After").parse().unwrap();
    assert!(
        wait as f64 + since.as_secs_f64() >= debt as f64,
        "Retry-After {wait} s {since:.1?} after a debt of {debt} writes at 1/s"
    );
}

/// A GET of `path` as client `ip` (the test is the trusted proxy in front).
fn get_as(cluster: &Cluster, ip: &str, path: &str) -> common::Response {
    request(
        cluster.edge_addr,
        "GET",
        path,
        &[("X-Forwarded-For", ip)],
        b"",
    )
    .unwrap()
}

#[test]
fn limits_answer_429_and_survive_a_restart() {
    let mut cluster = Cluster::start_custom(
        "",
        "",
        "rate_limit:\n  client_requests_per_second: 1\n  client_burst: 40\n  client_misses_per_minute: 1\n  client_miss_burst: 5\n  trusted_proxies: [\"127.0.0.1\"]\n",
    );
    let r = api(
        cluster.edge_addr,
        "POST",
        "/api/links",
        r#"{"url":"https://example.com/known","code":"known"}"#,
    );
    assert_eq!(r.status, 201);
    wait_until(Duration::from_secs(10), "the link at the edge", || {
        get_as(&cluster, "198.51.100.99", "/known").status == 302
    });

    // Requests: a burst of 40 at one per second; the first 429 comes once
    // the burst, and what came back meanwhile, is spent, and says when to
    // come back.
    let client = "198.51.100.1";
    let (allowed, refused, refused_at) = until_refused(302, 40, Instant::now(), |_| {
        get_as(&cluster, client, "/known")
    });
    assert!(allowed >= 39, "the burst is honoured: {allowed}");
    assert_eq!(refused.api_error().0, "rate_limited");
    assert_eq!(refused.header("ratelimit-limit"), Some("40"));
    assert_eq!(refused.header("ratelimit-remaining"), Some("0"));
    assert!(
        refused
            .header("retry-after")
            .is_some_and(|v| v.parse::<u64>().unwrap() >= 1)
    );
    assert!(refused.header("ratelimit-reset").is_some());
    // Another client behind the same proxy is not affected; /health never is.
    assert_eq!(get_as(&cluster, "198.51.100.2", "/known").status, 302);
    assert_eq!(get_as(&cluster, client, "/health").status, 200);

    // Scanning: five unknown codes, then every code is refused, known ones too.
    let scanner = "203.0.113.5";
    for i in 0..5 {
        assert_eq!(get_as(&cluster, scanner, &format!("/scan{i}")).status, 404);
    }
    assert_eq!(get_as(&cluster, scanner, "/scan5").status, 429);
    assert_eq!(
        get_as(&cluster, scanner, "/known").status,
        429,
        "a scanner learns nothing"
    );

    let m = cluster.metrics(cluster.edge_metrics_addr);
    for (limit, at_least) in [("client_requests", 1.0), ("client_misses", 2.0)] {
        let s = format!(r#"rate_limit_decisions_total{{decision="limited",limit="{limit}"}}"#);
        assert!(metric(&m, &s) >= at_least, "{s}: {m}");
    }
    assert!(metric(&m, r#"link_redirects_total{result="rate_limited"}"#) >= 3.0);
    assert!(
        metric(
            &m,
            r#"http_requests_total{method="GET",route="rate_limited",status_code="429"}"#
        ) >= 3.0
    );

    // SIGKILL the edge and start it again: the limits are still in force.
    cluster.kill_edge();
    cluster.start_edge();
    assert_eq!(
        get_as(&cluster, scanner, "/known").status,
        429,
        "the scanner is still barred after a restart"
    );
    // The request bucket was empty at the 429 and refills at one per
    // second: since then it can have let through one a second, however
    // long the restart took; a fresh bucket would let 40 through.
    let (allowed_after, _, _) =
        until_refused(302, 0, refused_at, |_| get_as(&cluster, client, "/known"));
    println!(
        "burst allowed {allowed}, allowed after restart {allowed_after} ({:.1?} after the 429), scanner barred before and after restart",
        refused_at.elapsed()
    );
}

/// The per-API-key write limit at the admin: 429 with the `RateLimit-*`
/// fields after the burst, reads never limited, and still in force after the
/// admin is SIGKILLed and restarted.
#[test]
fn api_key_writes_are_limited_across_a_restart() {
    // A burst of 10: a restarted admin that forgot the key's state lets
    // 10 through, more than the bucket can have refilled unless the
    // restart took 9 s or more.
    let mut cluster = Cluster::start_custom(
        "",
        "",
        "rate_limit:\n  api_key_writes_per_second: 1\n  api_key_write_burst: 10\n",
    );
    let create = |cluster: &Cluster, i: usize| {
        let body = format!(r#"{{"url":"https://example.com/{i}","code":"w{i}"}}"#);
        api(cluster.admin_addr, "POST", "/api/links", &body)
    };
    let (created, refused, refused_at) =
        until_refused(201, 10, Instant::now(), |i| create(&cluster, i));
    assert!(created >= 10, "the burst is honoured: {created}");
    // The API's error body, as every other refusal has it.
    assert_eq!(
        refused.json(),
        serde_json::json!({"error": {
            "code": "rate_limited",
            "message": "too many writes with this API key; retry later",
            "field": null,
        }})
    );
    assert_eq!(refused.header("ratelimit-limit"), Some("10"));
    assert!(refused.header("retry-after").is_some());
    // Reads are not limited.
    for _ in 0..10 {
        assert_eq!(
            api(cluster.admin_addr, "GET", "/api/links/w0", "").status,
            200
        );
    }
    let m = cluster.metrics(cluster.admin_metrics_addr);
    let limited = r#"rate_limit_decisions_total{decision="limited",limit="api_key_writes"}"#;
    assert!(metric(&m, limited) >= 1.0, "{m}");

    cluster.kill_admin();
    cluster.start_admin();
    // Empty at the 429, refilled at one a second since, however long the
    // restart took.
    let (allowed_after, _, _) = until_refused(201, 0, refused_at, |i| {
        let body = format!(r#"{{"url":"https://example.com/{i}","code":"after{i}"}}"#);
        api(cluster.admin_addr, "POST", "/api/links", &body)
    });
    println!(
        "writes allowed {created} then 429; after restart {allowed_after} allowed ({:.1?} after the 429)",
        refused_at.elapsed()
    );
}

/// A bulk request counts each link it creates against the key's write
/// limit: the request is let in with one write left, and the writes after
/// it wait for all of its links (it used to cost one write, whatever it
/// created).
#[test]
fn a_bulk_create_counts_each_link() {
    let cluster = Cluster::start_custom(
        "",
        "",
        "rate_limit:\n  api_key_writes_per_second: 1\n  api_key_write_burst: 3\n",
    );
    let links: Vec<String> = (0..30)
        .map(|i| format!(r#"{{"url":"https://example.com/{i}","code":"b{i}"}}"#))
        .collect();
    let body = format!(r#"{{"links":[{}]}}"#, links.join(","));
    let started = Instant::now();
    let r = api(cluster.admin_addr, "POST", "/api/links/bulk", &body);
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    let created = r.json()["results"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|item| item["status"] == 201)
        .count();
    assert_eq!(created, 30);
    // 30 writes at one a second, 3 of them in the burst: the next write
    // waits for the other 27, less the time since the bulk was sent (a bulk
    // counted as one write would leave it 1 s to wait).
    let single = api(
        cluster.admin_addr,
        "POST",
        "/api/links",
        r#"{"url":"https://example.com/s","code":"s1"}"#,
    );
    let since = started.elapsed();
    assert_waits_for_debt(single.status, single.header("retry-after"), 27, since);
    let again = api(cluster.admin_addr, "POST", "/api/links/bulk", &body);
    let since = started.elapsed();
    assert_waits_for_debt(again.status, again.header("retry-after"), 27, since);
}

/// The state file is given its disk space when it is created: its pages are
/// written through a shared mapping, and a page of a sparse file that needs
/// a block on a full file system is a SIGBUS, which ends the edge. Here the
/// state dir is a small tmpfs, filled up once the edge runs; then requests
/// from many client addresses (so many slots, on many pages) all get their
/// answer, and the edge is still running. Needs `mount` (root): without it
/// the test records a skip (`common::skip`).
#[test]
fn a_full_disk_under_the_limiter_state_does_not_kill_the_edge() {
    use std::io::Write;
    let mut cluster = Cluster::start_custom(
        "",
        "",
        "rate_limit:\n  slots: 65536\n  client_requests_per_second: 1000\n  client_burst: 1000\n  trusted_proxies: [\"127.0.0.1\"]\n",
    );
    cluster.kill_edge();
    let state = cluster.path().join("state");
    let Some(_mount) = Tmpfs::mount(&state, 4 << 20) else {
        common::skip(
            "a_full_disk_under_the_limiter_state_does_not_kill_the_edge",
            "mount not permitted",
        );
        return;
    };
    cluster.start_edge();
    let bin = state.join("edge-ratelimit.bin");
    assert_eq!(std::fs::metadata(&bin).unwrap().len(), 64 + 65536 * 16);
    // Fill the file system.
    let mut filler = std::fs::File::create(state.join("filler")).unwrap();
    let fill = |filler: &mut std::fs::File| {
        for chunk in [64 * 1024, 4096, 1] {
            let buf = vec![1u8; chunk];
            while filler.write_all(&buf).is_ok() {}
        }
    };
    fill(&mut filler);
    // 1 MiB of slots: 2,000 clients land on nearly every one of its pages.
    for i in 0..2_000u32 {
        let ip = format!("198.18.{}.{}", i / 250, i % 250 + 1);
        let r = request(
            cluster.edge_addr,
            "GET",
            "/no-such-code",
            &[("X-Forwarded-For", ip.as_str())],
            b"",
        );
        if r.is_err() {
            // How the edge ended, if it did.
            let mut status = None;
            let edge = cluster.edge.as_mut().unwrap();
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                wait_until(Duration::from_secs(5), "the edge's end", || {
                    status = edge.try_wait().unwrap();
                    status.is_some()
                })
            }));
            panic!("client {i} ({ip}): {r:?}; the edge: {status:?}");
        }
    }
    assert!(cluster.edge.as_mut().unwrap().try_wait().unwrap().is_none());
    // With the file gone and the disk still full, the edge starts (its
    // limits kept in memory), and says so.
    cluster.kill_edge();
    std::fs::remove_file(&bin).unwrap();
    fill(&mut filler);
    cluster.start_edge();
    assert_eq!(
        get_as(&cluster, "198.51.100.1", "/no-such-code").status,
        404
    );
    assert!(
        cluster
            .log("edge")
            .contains("rate-limit state cannot be written to disk"),
        "{}",
        cluster.log("edge")
    );
    cluster.kill_edge();
}

/// A tmpfs mounted for a test, unmounted when dropped.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(at: &std::path::Path, size: u64) -> Option<Self> {
        use std::os::unix::ffi::OsStrExt;
        std::fs::create_dir_all(at).unwrap();
        let path = std::ffi::CString::new(at.as_os_str().as_bytes()).unwrap();
        let opts = std::ffi::CString::new(format!("size={size},mode=0755")).unwrap();
        // SAFETY: valid NUL-terminated strings.
        let rc = unsafe {
            libc::mount(
                c"tmpfs".as_ptr(),
                path.as_ptr(),
                c"tmpfs".as_ptr(),
                0,
                opts.as_ptr().cast(),
            )
        };
        (rc == 0).then(|| Self(at.to_owned()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        use std::os::unix::ffi::OsStrExt;
        let path = std::ffi::CString::new(self.0.as_os_str().as_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        unsafe {
            if libc::umount2(path.as_ptr(), 0) != 0 {
                libc::umount2(path.as_ptr(), libc::MNT_DETACH);
            }
        }
    }
}

/// An IPv6 client is one /64: a host picks any address in its /64 at will
/// (privacy addresses change on their own), so counting each address on
/// its own let a scanner send every request from a fresh one and never be
/// barred. Addresses of other /64s are other clients.
#[test]
fn an_ipv6_client_rotating_addresses_in_its_64_is_one_client() {
    let cluster = Cluster::start_custom(
        "",
        "",
        "rate_limit:\n  client_misses_per_minute: 1\n  client_miss_burst: 5\n  trusted_proxies: [\"127.0.0.1\"]\n",
    );
    let statuses: Vec<u16> = (0..8)
        .map(|i| {
            get_as(
                &cluster,
                &format!("2001:db8:1:2::{:x}", i + 1),
                &format!("/scan{i}"),
            )
            .status
        })
        .collect();
    assert_eq!(statuses, [404, 404, 404, 404, 404, 429, 429, 429]);
    // Another /64 (even of the same /48) is someone else.
    assert_eq!(get_as(&cluster, "2001:db8:1:3::1", "/scan9").status, 404);
}

/// A new edge started with `-u` that cannot open its rate-limit state
/// fails before it takes the running edge's sockets: the running edge keeps
/// serving. (It opened the state after taking them: the old edge, told to
/// hand over once the new one waited on the upgrade socket, drained and
/// exited, and the new one exited on the error: no edge at all.)
#[test]
fn an_upgrade_that_cannot_open_the_limiter_state_leaves_the_old_edge_serving() {
    let mut cluster =
        Cluster::start_custom("", "", "rate_limit:\n  client_requests_per_second: 1000\n");
    // The old edge keeps its mapping; the new one finds a directory.
    let bin = cluster.path().join("state/edge-ratelimit.bin");
    std::fs::remove_file(&bin).unwrap();
    std::fs::create_dir(&bin).unwrap();
    let stderr = cluster.failed_upgrade();
    assert!(stderr.contains("edge-ratelimit.bin"), "{stderr}");
}

/// Two bulk requests of one key let in at the same time (its burst is 2)
/// cannot both run up the debt one bulk may: the links beyond the first are
/// charged before anything is written, whole or not at all, so one bulk
/// creates its 20 links and the other gets 429 and creates none. (They were
/// charged after the write, capped at one bulk's debt: both created their
/// links and only one's were counted, so N concurrent bulks wrote N times
/// the key's limit.) In process, with the admin's writer held so that both
/// are let in before either is written.
#[test]
fn overlapping_bulk_requests_cannot_share_one_debt() {
    use axum::body::Body;
    use axum::http::{Request, StatusCode, header};
    use tower::ServiceExt;

    const KEY: &str = "bulk-limit-key-0123456789abcdef";
    const BULK: usize = 20;
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!(
        "data_dir: {d}/data\npublic_base_url: https://ulo.ad/\nadmin:\n  api_key: {KEY}\n  max_bulk: {BULK}\nrate_limit:\n  state_dir: {d}/state\n  api_key_writes_per_second: 1\n  api_key_write_burst: 2\n",
        d = dir.path().display()
    );
    let config = uload::config::Config::from_yaml_str(&yaml, "test", &[]).unwrap();
    let state = uload::admin::AdminState::open(&config).unwrap();
    let app = uload::admin::app(state.clone());
    let post = |path: &str, body: String| {
        Request::builder()
            .method("POST")
            .uri(path)
            .header(header::AUTHORIZATION, format!("Bearer {KEY}"))
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(body))
            .unwrap()
    };
    let bulk_body = |prefix: &str| {
        let items: Vec<String> = (0..BULK)
            .map(|i| format!(r#"{{"url":"https://example.com/{prefix}{i}","code":"{prefix}{i}"}}"#))
            .collect();
        format!(r#"{{"links":[{}]}}"#, items.join(","))
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let held = state.hold_writes();
    let a = rt.spawn(app.clone().oneshot(post("/api/links/bulk", bulk_body("a"))));
    let b = rt.spawn(app.clone().oneshot(post("/api/links/bulk", bulk_body("b"))));
    // While writes are held, only a refused bulk can be answered. Bounded:
    // if neither is (both waiting to be written), the writes are let go
    // and the statuses below tell.
    let started = Instant::now();
    let give_up = started + Duration::from_secs(20);
    while !a.is_finished() && !b.is_finished() && Instant::now() < give_up {
        std::thread::yield_now();
    }
    drop(held);
    let mut statuses = Vec::new();
    let mut created = 0;
    for task in [a, b] {
        let res = rt.block_on(task).unwrap().unwrap();
        statuses.push(res.status());
        let retry_after = res.headers().get("retry-after").cloned();
        let bytes = rt
            .block_on(axum::body::to_bytes(res.into_body(), usize::MAX))
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        if statuses.last() == Some(&StatusCode::TOO_MANY_REQUESTS) {
            assert_eq!(common::api_error(&v).0, "rate_limited", "{v}");
            assert!(retry_after.is_some(), "a 429 says when to come back");
        } else {
            created += v["results"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|r| r["status"] == 201)
                .count();
        }
    }
    statuses.sort();
    assert_eq!(
        statuses,
        [StatusCode::OK, StatusCode::TOO_MANY_REQUESTS],
        "one bulk written, one refused"
    );
    assert_eq!(created, BULK);
    assert_eq!(
        state.view().len(),
        BULK as u64,
        "the refused bulk wrote nothing"
    );
    // The key now waits for the links that were written.
    let single = rt
        .block_on(app.clone().oneshot(post(
            "/api/links",
            r#"{"url":"https://example.com/s"}"#.to_owned(),
        )))
        .unwrap();
    let since = started.elapsed();
    // The key's writes beyond its burst of 2.
    assert_waits_for_debt(
        single.status().as_u16(),
        single
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().unwrap()),
        created as u64 - 2,
        since,
    );
}
