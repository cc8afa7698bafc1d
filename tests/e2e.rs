//! End to end: the real `uload edge` and `uload admin` processes on free
//! loopback ports, management through the edge, redirects from the edge.

mod common;

use std::time::{Duration, Instant};

use common::{Cluster, api, get, request, wait_until};

fn create(cluster: &Cluster, body: &str) -> serde_json::Value {
    let r = api(cluster.edge_addr, "POST", "/api/links", body);
    assert_eq!(
        r.status,
        201,
        "{body}: {:?}",
        String::from_utf8_lossy(&r.body)
    );
    r.json()
}

/// How long a change may take to reach the edge before a test fails: a
/// bound on waiting (polls end as soon as the edge answers), not a figure.
const PROPAGATION: Duration = Duration::from_secs(30);

/// Polls the edge until `path` answers with `status` (bounded by
/// [`PROPAGATION`]).
fn wait_served(cluster: &Cluster, path: &str, status: u16) {
    wait_until(PROPAGATION, path, || {
        get(cluster.edge_addr, path).status == status
    });
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

#[test]
fn link_lifecycle_through_the_edge() {
    let cluster = Cluster::start();
    let edge = cluster.edge_addr;

    // Create through the edge; the edge serves it within 50 ms of the 201.
    // The suite's one timed assertion, because the product promises it (its
    // issue: "a link the admin acknowledged is served by the edge within 50
    // ms (test)"). The clock starts when the 201 has been read and stops
    // when the first 301 has; the edge is polled back to back, without a
    // sleep, so the figure is the edge's delay plus one request at most.
    let body = r#"{"url":"https://example.com/a?x=1","code":"life","status":301}"#;
    let r = api(edge, "POST", "/api/links", body);
    let acknowledged = Instant::now();
    assert_eq!(r.status, 201, "{:?}", String::from_utf8_lossy(&r.body));
    let took = loop {
        if get(edge, "/life").status == 301 {
            break acknowledged.elapsed();
        }
        assert!(
            acknowledged.elapsed() < PROPAGATION,
            "/life not served {PROPAGATION:?} after its 201"
        );
    };
    eprintln!("created link served by the edge {took:?} after its 201");
    assert!(
        took <= Duration::from_millis(50),
        "the edge served the link {took:?} after its 201 (at most 50 ms)"
    );
    let link = r.json();
    assert_eq!(link["code"], "life");
    assert_eq!(link["short_url"], format!("http://{edge}/life"));
    let r = get(edge, "/life");
    assert_eq!(r.header("location"), Some("https://example.com/a?x=1"));
    assert!(r.header("cache-control").unwrap().contains("max-age"));

    // HEAD: same status and Location, no body.
    let r = request(edge, "HEAD", "/life", &[], b"").unwrap();
    assert_eq!(
        (r.status, r.header("location")),
        (301, Some("https://example.com/a?x=1"))
    );
    assert!(r.body.is_empty());

    // Update: the new target is served.
    let r = api(
        edge,
        "PATCH",
        "/api/links/life",
        r#"{"url":"https://example.org/b","status":307}"#,
    );
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    wait_until(PROPAGATION, "update", || {
        get(edge, "/life").header("location") == Some("https://example.org/b")
    });
    assert_eq!(get(edge, "/life").status, 307);

    // Query forwarding only when the link asks for it.
    create(
        &cluster,
        r#"{"url":"https://example.com/q?src=a#top","code":"fwd","forward_query":true}"#,
    );
    wait_served(&cluster, "/fwd", 302);
    assert_eq!(
        get(edge, "/fwd?utm=x&y=2").header("location"),
        Some("https://example.com/q?src=a&utm=x&y=2#top")
    );
    assert_eq!(
        get(edge, "/life?utm=x").header("location"),
        Some("https://example.org/b")
    );

    // Delete: 404 from the edge.
    let r = api(edge, "DELETE", "/api/links/life", "");
    assert_eq!(r.status, 204);
    wait_served(&cluster, "/life", 404);
    assert_eq!(get(edge, "/life").api_error().0, "not_found");

    // Expiry: a link stops redirecting by itself at its expiry time: seen
    // served (302) before that time, then 404, and not before it. A link
    // not seen served before it expired (a machine slower than its
    // lifetime) tells nothing either way: the case starts again with a new
    // link that lives twice as long. The machine's speed decides how long
    // this takes, never whether it passes.
    let mut lifetime_ms = 2_000;
    let (path, expires_ms) = loop {
        assert!(
            lifetime_ms <= 64_000,
            "no link seen served before its expiry, the last living {} ms",
            lifetime_ms / 2
        );
        let code = format!("soon{lifetime_ms}");
        let expires_ms = now_ms() + lifetime_ms;
        let at = uload::interchange::format_time(expires_ms);
        create(
            &cluster,
            &format!(r#"{{"url":"https://example.com/e","code":"{code}","expires_at":"{at}"}}"#),
        );
        let path = format!("/{code}");
        let mut seen = false;
        while !seen && now_ms() < expires_ms {
            seen = get(edge, &path).status == 302;
            if !seen {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        if seen {
            break (path, expires_ms);
        }
        lifetime_ms *= 2;
    };
    let limit = PROPAGATION + Duration::from_millis(expires_ms.saturating_sub(now_ms()));
    wait_until(limit, "the link's expiry", || {
        get(edge, &path).status == 404
    });
    let gone_ms = now_ms();
    assert!(
        gone_ms >= expires_ms,
        "{path} gone {} ms before its expiry",
        expires_ms - gone_ms
    );

    // Unknown codes and non-code paths.
    assert_eq!(get(edge, "/nope").status, 404);
    assert_eq!(get(edge, "/a/b").status, 404);
    assert_eq!(get(edge, "/%2e%2e").status, 404);
}

#[test]
fn redirects_survive_the_admin_and_both_restart() {
    let mut cluster = Cluster::start();
    let edge = cluster.edge_addr;
    for i in 0..20 {
        create(
            &cluster,
            &format!(r#"{{"url":"https://example.com/{i}","code":"k{i}"}}"#),
        );
    }
    wait_served(&cluster, "/k19", 302);

    // SIGKILL the admin: every redirect is still served, /api answers 503 JSON.
    cluster.kill_admin();
    let mut served = 0;
    for round in 0..25 {
        for i in 0..20 {
            let r = get(edge, &format!("/k{i}"));
            assert_eq!(r.status, 302, "round {round} k{i}");
            assert_eq!(
                r.header("location"),
                Some(format!("https://example.com/{i}").as_str())
            );
            served += 1;
        }
    }
    eprintln!("{served} redirects served with the admin down, 0 failures");
    let r = api(
        edge,
        "POST",
        "/api/links",
        r#"{"url":"https://example.com/x"}"#,
    );
    assert_eq!(r.status, 503);
    assert!(r.header("retry-after").is_some());
    assert_eq!(r.api_error().0, "admin_unavailable");
    let r = api(edge, "GET", "/api/links/k1", "");
    assert_eq!(r.status, 503);

    // The admin comes back: management works again, the edge was never restarted.
    cluster.start_admin();
    cluster.wait_api_ready();
    create(
        &cluster,
        r#"{"url":"https://example.com/back","code":"back"}"#,
    );
    wait_served(&cluster, "/back", 302);

    // Restart both: every link is still served.
    cluster.kill_edge();
    cluster.kill_admin();
    cluster.start_admin();
    cluster.start_edge();
    for i in 0..20 {
        assert_eq!(get(edge, &format!("/k{i}")).status, 302);
    }
    assert_eq!(get(edge, "/back").status, 302);
}

#[test]
fn refusals_get_their_4xx_and_change_nothing() {
    let cluster = Cluster::start();
    let edge = cluster.edge_addr;
    create(&cluster, r#"{"url":"https://example.com/","code":"taken"}"#);
    wait_served(&cluster, "/taken", 302);
    let seq = cluster.edge_seq();

    let too_big = format!(r#"{{"url":"https://example.com/{}"}}"#, "x".repeat(70_000));
    let cases: Vec<(&str, String, u16)> = vec![
        ("bad url", r#"{"url":"not a url"}"#.into(), 400),
        ("javascript", r#"{"url":"javascript:alert(1)"}"#.into(), 400),
        (
            "crlf",
            r#"{"url":"https://example.com/\r\nSet-Cookie: a=b"}"#.into(),
            400,
        ),
        (
            "reserved",
            r#"{"url":"https://example.com/","code":"api"}"#.into(),
            400,
        ),
        (
            "reserved health",
            r#"{"url":"https://example.com/","code":"health"}"#.into(),
            400,
        ),
        (
            "bad code",
            r#"{"url":"https://example.com/","code":"a/b"}"#.into(),
            400,
        ),
        (
            "duplicate",
            r#"{"url":"https://example.com/","code":"taken"}"#.into(),
            409,
        ),
        (
            "bad status",
            r#"{"url":"https://example.com/","status":200}"#.into(),
            400,
        ),
        (
            "unknown field",
            r#"{"url":"https://example.com/","colour":"red"}"#.into(),
            400,
        ),
        ("bad json", r#"{"url":"#.into(), 400),
        ("oversize", too_big, 413),
    ];
    for (what, body, status) in &cases {
        let r = api(edge, "POST", "/api/links", body);
        assert_eq!(
            r.status,
            *status,
            "{what}: {:?}",
            String::from_utf8_lossy(&r.body)
        );
        r.api_error();
    }
    // Missing and wrong keys: 401, whether or not the link exists.
    for (auth, path) in [
        (None, "/api/links/taken"),
        (Some("Bearer wrong-key-000000000"), "/api/links/taken"),
        (Some("Bearer wrong-key-000000000"), "/api/links/absent"),
    ] {
        let mut headers = vec![("Content-Type", "application/json")];
        if let Some(a) = auth {
            headers.push(("Authorization", a));
        }
        let r = request(edge, "GET", path, &headers, b"").unwrap();
        assert_eq!(r.status, 401, "{auth:?} {path}");
        assert_eq!(r.json()["error"]["code"], "unauthorized");
        let r = request(
            edge,
            "POST",
            "/api/links",
            &headers,
            br#"{"url":"https://example.com/"}"#,
        )
        .unwrap();
        assert_eq!(r.status, 401);
    }
    // Nothing was written: the sequence is where it was, the link unchanged.
    let admin_health = get(cluster.admin_addr, "/api/health").json();
    assert_eq!(admin_health["seq"].as_u64(), Some(seq));
    assert_eq!(cluster.edge_seq(), seq);
    assert_eq!(
        get(edge, "/taken").header("location"),
        Some("https://example.com/")
    );
}

/// The admin compacts every 50 records; the edge swaps each new snapshot in
/// while a client requests redirects: no request fails, every link is served.
#[test]
fn snapshot_swaps_under_load_fail_no_request() {
    let cluster = Cluster::start_with("  compact_every_records: 50\n");
    let edge = cluster.edge_addr;
    create(
        &cluster,
        r#"{"url":"https://example.com/hot","code":"hot"}"#,
    );
    wait_served(&cluster, "/hot", 302);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let client = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let (mut ok, mut failed) = (0u64, 0u64);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && ok + failed < 1_000_000 {
                match request(edge, "GET", "/hot", &[], b"") {
                    Ok(r) if r.status == 302 => ok += 1,
                    _ => failed += 1,
                }
            }
            (ok, failed)
        })
    };
    for i in 0..300 {
        create(
            &cluster,
            &format!(r#"{{"url":"https://example.com/{i}","code":"s{i}"}}"#),
        );
    }
    wait_until(
        Duration::from_secs(30),
        "snapshots loaded by the edge",
        || get(edge, "/health").json()["follower"]["snapshots_loaded"].as_u64() >= Some(3),
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, failed) = client.join().unwrap();
    eprintln!("{ok} redirects during snapshot swaps, {failed} failed");
    assert_eq!(failed, 0);
    assert!(ok > 0);
    for i in 0..300 {
        assert_eq!(get(edge, &format!("/s{i}")).status, 302, "s{i}");
    }
    let health = get(edge, "/health").json();
    assert_eq!(health["table"]["links"], 301);
    assert_eq!(health["follower"]["files_refused"], 0);
}

/// A stand-in admin that records what reaches it: the client's address and
/// protocol travel in X-Forwarded-For / X-Forwarded-Proto, and what the
/// client claimed in its own X-Forwarded-For is not trusted.
#[test]
fn the_client_address_reaches_the_admin() {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let fake_admin = listener.local_addr().unwrap();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    {
        let seen = seen.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().take(10_000) {
                let Ok(mut stream) = stream else { continue };
                let mut head = Vec::new();
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    head.push(line.trim_end().to_owned());
                }
                if head.first().is_some_and(|l| l.contains("/api/echo")) {
                    seen.lock().unwrap().extend(head);
                }
                let _ = stream.write_all(
                    b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}",
                );
            }
        });
    }
    let dir = tempfile::tempdir().unwrap();
    let edge_addr: std::net::SocketAddr = format!("127.0.0.1:{}", common::free_port())
        .parse()
        .unwrap();
    let config = dir.path().join("uload.yaml");
    std::fs::write(
        &config,
        format!(
            "data_dir: {}\nedge:\n  listen: {edge_addr}\n  admin_upstreams: [\"{fake_admin}\"]\n  health_check_interval_ms: 100\n",
            dir.path().join("data").display()
        ),
    )
    .unwrap();
    let mut edge = common::uload_command(dir.path())
        .args(["edge", "--config"])
        .arg(&config)
        .spawn()
        .unwrap();
    wait_until(Duration::from_secs(30), "edge and fake admin", || {
        request(edge_addr, "GET", "/api/health", &[], b"").is_ok_and(|r| r.status == 200)
    });
    let r = request(
        edge_addr,
        "GET",
        "/api/echo",
        &[("X-Forwarded-For", "6.6.6.6")],
        b"",
    )
    .unwrap();
    assert_eq!(r.status, 200);
    edge.kill().unwrap();
    edge.wait().unwrap();
    let seen = seen.lock().unwrap().join("\n").to_ascii_lowercase();
    assert!(seen.contains("x-forwarded-for: 127.0.0.1"), "{seen}");
    assert!(seen.contains("x-forwarded-proto: http"), "{seen}");
    assert!(!seen.contains("6.6.6.6"), "{seen}");
}

/// An edge whose listen address is taken exits at once with an error naming
/// the key and address (Pingora alone would panic a thread and stay up,
/// serving nothing, so that a supervisor never restarts it).
#[test]
fn an_edge_that_cannot_listen_exits_non_zero() {
    let cluster = Cluster::start();
    // The running edge holds the address; a second one on the same config
    // must fail without `-u`.
    let out = common::uload_command(cluster.path())
        .args(["edge", "--config"])
        .arg(&cluster.config)
        .env("ULOAD_METRICS_LISTEN", "")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("edge.listen {}", cluster.edge_addr)),
        "{err}"
    );
    assert_eq!(get(cluster.edge_addr, "/health").status, 200);
}

/// `uload edge -d` (Pingora's daemon, which forks when the server starts
/// running and then changes to `/`), started from a directory with relative
/// paths in its config: the daemon still follows the data dir's log (a link
/// created afterwards is served) and writes its access log there. It used
/// to look for `data/` under `/` and serve its start-up table forever, and
/// to lose its access log's writer thread in the fork.
#[test]
fn a_daemonized_edge_follows_the_log_and_writes_its_access_log() {
    use std::process::Stdio;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let edge: std::net::SocketAddr = format!("127.0.0.1:{}", common::free_port())
        .parse()
        .unwrap();
    let admin: std::net::SocketAddr = format!("127.0.0.1:{}", common::free_port())
        .parse()
        .unwrap();
    std::fs::write(
        d.join("pingora.yaml"),
        format!(
            "---\nversion: 1\nthreads: 1\npid_file: {0}/edge.pid\nupgrade_sock: {0}/upgrade.sock\n\
             error_log: {0}/edge.stderr\ngrace_period_seconds: 1\ngraceful_shutdown_timeout_seconds: 1\n",
            d.display()
        ),
    )
    .unwrap();
    std::fs::write(
        d.join("uload.yaml"),
        format!(
            "data_dir: data\npublic_base_url: http://{edge}\nedge:\n  listen: {edge}\n  \
             admin_upstreams: [\"{admin}\"]\n  health_check_interval_ms: 100\n  \
             pingora_conf: pingora.yaml\nadmin:\n  listen: {admin}\n  api_key: {key}\n\
             access_log:\n  path: logs/access.log\n",
            key = common::KEY
        ),
    )
    .unwrap();
    let log = |name: &str| {
        Stdio::from(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(d.join(name))
                .unwrap(),
        )
    };
    struct KillOnDrop(Vec<i32>);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            for &pid in &self.0 {
                // SAFETY: kill(2) on a pid this test started.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
    let mut started = KillOnDrop(Vec::new());
    let mut admin_proc = common::uload_command(d)
        .current_dir(d)
        .args(["admin", "--config", "uload.yaml"])
        .stdout(Stdio::null())
        .stderr(log("admin.stderr"))
        .spawn()
        .unwrap();
    started.0.push(admin_proc.id() as i32);
    wait_until(Duration::from_secs(30), "admin /api/health", || {
        request(admin, "GET", "/api/health", &[], b"").is_ok_and(|r| r.status == 200)
    });
    // The command itself returns once Pingora has forked the daemon off.
    let mut launcher = common::uload_command(d)
        .current_dir(d)
        .args(["edge", "-d", "--config", "uload.yaml"])
        .stdout(Stdio::null())
        .stderr(log("edge.stderr"))
        .spawn()
        .unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(status) = launcher.try_wait().unwrap() {
            break status;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "uload edge -d did not return"
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    let logs = || {
        format!(
            "--- edge\n{}\n--- admin\n{}",
            std::fs::read_to_string(d.join("edge.stderr")).unwrap_or_default(),
            std::fs::read_to_string(d.join("admin.stderr")).unwrap_or_default()
        )
    };
    assert!(status.success(), "uload edge -d: {status}\n{}", logs());
    let mut pid = 0;
    wait_until(Duration::from_secs(60), "the daemon's pid file", || {
        pid = std::fs::read_to_string(d.join("edge.pid"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        pid > 0
    });
    started.0.push(pid);
    wait_until(Duration::from_secs(60), "the daemon's /health", || {
        request(edge, "GET", "/health", &[], b"").is_ok_and(|r| r.status == 200)
    });
    // It runs where Pingora's daemon goes, not where it was started.
    assert_eq!(
        std::fs::read_link(format!("/proc/{pid}/cwd")).unwrap(),
        std::path::Path::new("/")
    );
    let r = api(
        edge,
        "POST",
        "/api/links",
        r#"{"url":"https://example.com/daemon","code":"daemon1"}"#,
    );
    assert_eq!(
        r.status,
        201,
        "{:?}\n{}",
        String::from_utf8_lossy(&r.body),
        logs()
    );
    // Polls `check` for at most PROPAGATION: whether it came true.
    let poll = |mut check: Box<dyn FnMut() -> bool + '_>| {
        let start = Instant::now();
        while start.elapsed() < PROPAGATION {
            if check() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        false
    };
    let mut last = 0;
    let served = poll(Box::new(|| {
        let r = get(edge, "/daemon1");
        last = r.status;
        (301..=308).contains(&r.status)
            && r.header("location") == Some("https://example.com/daemon")
    }));
    assert!(
        served,
        "/daemon1 not served by the daemon (last status {last})\n{}",
        logs()
    );
    let access = d.join("logs/access.log");
    let logged = poll(Box::new(|| {
        std::fs::read_to_string(&access).is_ok_and(|t| t.contains("\"path\":\"/daemon1\""))
    }));
    assert!(
        logged,
        "no line for /daemon1 in {}\n{}",
        access.display(),
        logs()
    );
    // SIGTERM: a graceful stop.
    // SAFETY: kill(2) on the daemon this test started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    wait_until(Duration::from_secs(60), "the daemon to exit", || {
        // SAFETY: signal 0 only checks that the process exists.
        let alive = unsafe { libc::kill(pid, 0) } == 0;
        !alive
    });
    let _ = admin_proc.kill();
    let _ = admin_proc.wait();
}
