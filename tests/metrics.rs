//! The edge's `/metrics` after real traffic: every counter moves by exactly
//! the number of requests of its kind, labels stay a fixed set (no short
//! code ever becomes a label), and the table gauges match `/health`.

mod common;

use std::time::Duration;

use common::{Cluster, api, get, metric, request, wait_until};

fn series(method: &str, route: &str, status: u16) -> String {
    format!(r#"http_requests_total{{method="{method}",route="{route}",status_code="{status}"}}"#)
}

fn result(r: &str) -> String {
    format!(r#"link_redirects_total{{result="{r}"}}"#)
}

#[test]
fn counters_move_by_exactly_the_traffic_sent() {
    let cluster = Cluster::start();
    let edge = cluster.edge_addr;
    for (code, extra) in [
        ("live", ""),
        ("off", r#","disabled":true"#),
        ("old", r#","expires_at":"2001-01-01T00:00:00Z""#),
    ] {
        let body = format!(
            r#"{{"url":"https://example.com/{code}","code":"{code}","status":308{extra}}}"#
        );
        assert_eq!(api(edge, "POST", "/api/links", &body).status, 201, "{code}");
    }
    wait_until(Duration::from_secs(10), "links at the edge", || {
        get(edge, "/live").status == 308
    });
    let m = || cluster.metrics(cluster.edge_metrics_addr);
    let before = m();

    // The traffic: (method, path, expected status, route), with counts.
    let plan: [(&str, &str, u16, &str, usize); 8] = [
        ("GET", "/live", 308, "redirect", 25),
        ("HEAD", "/live", 308, "redirect", 10),
        ("GET", "/nope", 404, "not_found", 7),
        ("GET", "/off", 404, "not_found", 3),
        ("GET", "/old", 404, "not_found", 2),
        ("GET", "/health", 200, "health", 4),
        ("POST", "/live", 405, "method_not_allowed", 2),
        ("GET", "/api/health", 200, "api", 5),
    ];
    for (method, path, status, _, n) in plan {
        for _ in 0..n {
            let r = request(edge, method, path, &[], b"").unwrap();
            assert_eq!(r.status, status, "{method} {path}");
        }
    }
    // Metrics are recorded once the response is written, a moment after the
    // client has it: wait for the last kind, then compare everything.
    let delta = |text: &str, s: &str| metric(text, s) - metric(&before, s);
    wait_until(Duration::from_secs(10), "the last request recorded", || {
        delta(&m(), &series("GET", "api", 200)) >= 5.0
    });
    let after = m();

    let mut expected = std::collections::BTreeMap::new();
    for (method, _, status, route, n) in plan {
        *expected.entry(series(method, route, status)).or_insert(0.0) += n as f64;
    }
    for (s, n) in &expected {
        assert_eq!(delta(&after, s), *n, "{s}");
    }
    for (r, n) in [
        ("served", 35.0),
        ("not_found", 7.0),
        ("disabled", 3.0),
        ("expired", 2.0),
    ] {
        assert_eq!(delta(&after, &result(r)), n, "link_redirects_total {r}");
    }
    let count = |method: &str, route: &str| {
        format!(r#"http_request_duration_seconds_count{{method="{method}",route="{route}"}}"#)
    };
    assert_eq!(delta(&after, &count("GET", "redirect")), 25.0);
    assert_eq!(delta(&after, &count("HEAD", "redirect")), 10.0);
    assert_eq!(delta(&after, &count("GET", "not_found")), 12.0);

    // Bounded labels: codes never appear, routes come from a fixed set.
    for line in after.lines().filter(|l| l.starts_with("http_request")) {
        assert!(!line.contains("live") && !line.contains("nope"), "{line}");
        let route = line
            .split("route=\"")
            .nth(1)
            .and_then(|r| r.split('"').next());
        if let Some(route) = route {
            assert!(
                [
                    "redirect",
                    "not_found",
                    "api",
                    "health",
                    "method_not_allowed",
                    "rate_limited",
                    "https_redirect",
                    "other"
                ]
                .contains(&route),
                "{line}"
            );
        }
    }

    // Gauges agree with /health; the admin upstream is up.
    let health = get(edge, "/health").json();
    let after = m();
    assert_eq!(
        metric(&after, "link_table_sequence"),
        health["table"]["seq"].as_u64().unwrap() as f64
    );
    assert_eq!(metric(&after, "link_table_links"), 3.0);
    let up = format!(r#"admin_upstream_up{{upstream="{}"}}"#, cluster.admin_addr);
    assert_eq!(metric(&after, &up), 1.0, "{after}");
    assert!(metric(&after, "link_log_records_applied_total") >= 3.0);
    assert!(metric(&after, "process_resident_memory_bytes") > 0.0);
    assert_eq!(metric(&after, "link_files_refused_total"), 0.0);
    // The access log has one JSON line per request, query strings left out.
    let expected_lines: usize = plan.iter().map(|p| p.4).sum();
    let lines = || -> Vec<serde_json::Value> {
        std::fs::read_to_string(cluster.path().join("access.log"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    wait_until(Duration::from_secs(10), "access log lines", || {
        lines()
            .iter()
            .filter(|l| l["route"] == "redirect" && l["path"] == "/live")
            .count()
            >= 35
    });
    let log = lines();
    let count = |method: &str, path: &str, status: u16| {
        log.iter()
            .filter(|l| l["method"] == method && l["path"] == path && l["status"] == status)
            .count()
    };
    // (GET /live was also polled before the traffic started.)
    assert_eq!(count("HEAD", "/live", 308), 10);
    assert_eq!(count("GET", "/nope", 404), 7);
    assert_eq!(count("POST", "/live", 405), 2);
    assert!(
        log.iter()
            .all(|l| l["client"] == "127.0.0.1" && l["ts"].is_string())
    );
    assert!(log.len() >= expected_lines);
    println!(
        "requests sent {}, all counted",
        plan.iter().map(|p| p.4).sum::<usize>()
    );
}

#[test]
fn proxy_errors_are_counted_when_the_admin_is_gone() {
    let mut cluster = Cluster::start();
    let edge = cluster.edge_addr;
    let before = cluster.metrics(cluster.edge_metrics_addr);
    cluster.kill_admin();
    let r = get(edge, "/api/links");
    assert_eq!(r.status, 503);
    let up = format!(r#"admin_upstream_up{{upstream="{}"}}"#, cluster.admin_addr);
    wait_until(
        Duration::from_secs(10),
        "the upstream reported down",
        || metric(&cluster.metrics(cluster.edge_metrics_addr), &up) == 0.0,
    );
    let after = cluster.metrics(cluster.edge_metrics_addr);
    let errors: f64 = ["connect", "no_upstream"]
        .iter()
        .map(|k| {
            let s = format!(r#"admin_proxy_errors_total{{kind="{k}"}}"#);
            metric(&after, &s) - metric(&before, &s)
        })
        .sum();
    assert!(errors >= 1.0, "{after}");
    assert!(
        metric(&after, &series("GET", "api", 503)) >= 1.0,
        "the 503 is counted: {after}"
    );
}

/// The admin's own listener: request counts, log appends, the last
/// sequence, fsync latencies and disk space after real writes.
#[test]
fn admin_metrics_follow_the_writes() {
    let cluster = Cluster::start();
    let m = || cluster.metrics(cluster.admin_metrics_addr);
    let before = m();
    for i in 0..12 {
        let body = format!(r#"{{"url":"https://example.com/{i}","code":"adm{i}"}}"#);
        assert_eq!(
            api(cluster.admin_addr, "POST", "/api/links", &body).status,
            201
        );
    }
    assert_eq!(
        api(cluster.admin_addr, "GET", "/api/links/adm3", "").status,
        200
    );
    let after = m();
    let delta = |s: &str| metric(&after, s) - metric(&before, s);
    assert_eq!(delta(&series("POST", "api", 201)), 12.0, "{after}");
    assert_eq!(delta(&series("GET", "api", 200)), 1.0);
    assert_eq!(delta("link_log_appends_total"), 12.0);
    assert_eq!(metric(&after, "link_log_last_sequence"), 12.0);
    assert_eq!(metric(&after, "link_log_append_errors_total"), 0.0);
    assert!(delta("link_log_fsync_duration_seconds_count") >= 1.0);
    assert!(metric(&after, "data_dir_available_bytes") > 0.0);
    assert!(metric(&after, "data_dir_size_bytes") >= metric(&after, "data_dir_available_bytes"));
    // The admin's health is a real write: a healthy disk says so.
    let health = get(cluster.admin_addr, "/api/health").json();
    assert_eq!(health["status"], "ok");
    assert_eq!(health["writable"], true);
}
