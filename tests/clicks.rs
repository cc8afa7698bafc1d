//! Click budgets (`max_clicks`, `src/edge/clicks.rs`): a link created with
//! a budget of N redirects N GETs, then answers 404 `exhausted`; HEADs spend
//! nothing; the counts survive an edge restart; a raised budget gives the
//! clicks added; a link deleted and created again starts afresh. The same
//! on the fast path and on the Pingora path.

mod common;

use std::time::Duration;

use common::{Cluster, api, get, metric, request, wait_until};

fn create(cluster: &Cluster, body: &str) {
    let r = api(cluster.edge_addr, "POST", "/api/links", body);
    assert_eq!(r.status, 201, "{:?}", String::from_utf8_lossy(&r.body));
}

/// Waits until the edge's view has the link `code` with `url`, by asking
/// with HEAD (which spends no click).
fn wait_served(cluster: &Cluster, code: &str, url: &str) {
    let edge = cluster.edge_addr;
    wait_until(Duration::from_secs(10), "the link at the edge", || {
        request(edge, "HEAD", &format!("/{code}"), &[], b"")
            .is_ok_and(|r| r.header("location") == Some(url))
    });
}

fn exhausted(cluster: &Cluster) -> f64 {
    metric(
        &cluster.metrics(cluster.edge_metrics_addr),
        r#"link_redirects_total{result="exhausted"}"#,
    )
}

fn budgets_are_kept(cluster: &mut Cluster) {
    let edge = cluster.edge_addr;
    create(
        cluster,
        r#"{"url":"https://example.com/three","code":"three","max_clicks":3,"status":301}"#,
    );
    create(
        cluster,
        r#"{"url":"https://example.com/free","code":"free"}"#,
    );
    wait_served(cluster, "three", "https://example.com/three");
    let before = exhausted(cluster);

    for _ in 0..5 {
        let r = request(edge, "HEAD", "/three", &[], b"").unwrap();
        assert_eq!(r.status, 301, "HEAD spends no click");
    }
    for i in 0..3 {
        let r = get(edge, "/three");
        assert_eq!(r.status, 301, "click {i}");
        assert_eq!(r.header("location"), Some("https://example.com/three"));
        // Never cached: each click must reach the edge to be counted.
        assert_eq!(r.header("cache-control"), Some("no-store"));
    }
    let r = get(edge, "/three");
    assert_eq!(r.status, 404);
    assert_eq!(r.api_error().0, "not_found");
    assert_eq!(
        request(edge, "HEAD", "/three", &[], b"").unwrap().status,
        404
    );
    assert_eq!(exhausted(cluster) - before, 2.0);
    // A link without a budget is not limited, and is cached as before.
    for _ in 0..10 {
        let r = get(edge, "/free");
        assert_eq!(r.status, 302);
    }

    // The count survives a restart of the edge.
    cluster.kill_edge();
    cluster.start_edge();
    assert_eq!(get(edge, "/three").status, 404, "after a restart");

    // A raised budget gives exactly the clicks added.
    let r = api(edge, "PATCH", "/api/links/three", r#"{"max_clicks":5}"#);
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    wait_until(
        Duration::from_secs(10),
        "the new budget at the edge",
        || request(edge, "HEAD", "/three", &[], b"").is_ok_and(|r| r.status == 301),
    );
    let statuses: Vec<u16> = (0..4).map(|_| get(edge, "/three").status).collect();
    assert_eq!(statuses, [301, 301, 404, 404]);

    // Deleted and created again under its code: a new link, a new count.
    assert_eq!(api(edge, "DELETE", "/api/links/three", "").status, 204);
    wait_until(Duration::from_secs(10), "the delete at the edge", || {
        request(edge, "HEAD", "/three", &[], b"").is_ok_and(|r| r.status == 404)
    });
    create(
        cluster,
        r#"{"url":"https://example.com/again","code":"three","max_clicks":1}"#,
    );
    wait_served(cluster, "three", "https://example.com/again");
    let statuses: Vec<u16> = (0..2).map(|_| get(edge, "/three").status).collect();
    assert_eq!(statuses, [302, 404]);
}

fn fast_path_answers(cluster: &Cluster) -> f64 {
    common::metric_exposed(
        &cluster.metrics(cluster.edge_metrics_addr),
        "edge_fast_path_answers_total",
    )
}

#[test]
fn a_click_budget_is_kept_on_the_fast_path() {
    let mut cluster = Cluster::start();
    budgets_are_kept(&mut cluster);
    // Counted since the last restart: the later part of the run.
    assert!(fast_path_answers(&cluster) >= 6.0);
}

#[test]
fn a_click_budget_is_kept_on_the_pingora_path() {
    let mut cluster = Cluster::start_custom("  fast_path: false\n", "", "");
    budgets_are_kept(&mut cluster);
    assert_eq!(fast_path_answers(&cluster), 0.0);
}
