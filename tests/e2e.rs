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

/// Polls the edge until `path` answers with `status`; returns how long it took.
fn served_within(cluster: &Cluster, path: &str, status: u16, limit: Duration) -> Duration {
    let start = Instant::now();
    wait_until(limit, path, || {
        get(cluster.edge_addr, path).status == status
    });
    start.elapsed()
}

#[test]
fn link_lifecycle_through_the_edge() {
    let cluster = Cluster::start();
    let edge = cluster.edge_addr;

    // Create through the edge; the edge serves it within 50 ms of the 201.
    let link = create(
        &cluster,
        r#"{"url":"https://example.com/a?x=1","code":"life","status":301}"#,
    );
    assert_eq!(link["code"], "life");
    assert_eq!(link["short_url"], format!("http://{edge}/life"));
    let took = served_within(&cluster, "/life", 301, Duration::from_millis(50));
    eprintln!("created link served by the edge {took:?} after its 201");
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
    wait_until(Duration::from_secs(2), "update", || {
        get(edge, "/life").header("location") == Some("https://example.org/b")
    });
    assert_eq!(get(edge, "/life").status, 307);

    // Query forwarding only when the link asks for it.
    create(
        &cluster,
        r#"{"url":"https://example.com/q?src=a#top","code":"fwd","forward_query":true}"#,
    );
    served_within(&cluster, "/fwd", 302, Duration::from_secs(2));
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
    served_within(&cluster, "/life", 404, Duration::from_secs(2));
    assert_eq!(get(edge, "/life").json()["error"]["code"], "not_found");

    // Expiry: a link that expires in a moment stops redirecting by itself.
    let soon = chrono_like_rfc3339(std::time::SystemTime::now() + Duration::from_millis(1500));
    create(
        &cluster,
        &format!(r#"{{"url":"https://example.com/e","code":"soon","expires_at":"{soon}"}}"#),
    );
    served_within(&cluster, "/soon", 302, Duration::from_secs(2));
    served_within(&cluster, "/soon", 404, Duration::from_secs(10));

    // Unknown codes and non-code paths.
    assert_eq!(get(edge, "/nope").status, 404);
    assert_eq!(get(edge, "/a/b").status, 404);
    assert_eq!(get(edge, "/%2e%2e").status, 404);
}

fn chrono_like_rfc3339(t: std::time::SystemTime) -> String {
    let ms = t.duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    uload::interchange::format_time(ms)
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
    served_within(&cluster, "/k19", 302, Duration::from_secs(2));

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
    assert_eq!(r.json()["error"]["code"], "admin_unavailable");
    let r = api(edge, "GET", "/api/links/k1", "");
    assert_eq!(r.status, 503);

    // The admin comes back: management works again, the edge was never restarted.
    cluster.start_admin();
    cluster.wait_api_ready();
    create(
        &cluster,
        r#"{"url":"https://example.com/back","code":"back"}"#,
    );
    served_within(&cluster, "/back", 302, Duration::from_secs(2));

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
    served_within(&cluster, "/taken", 302, Duration::from_secs(2));
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
        let json = r.json();
        assert!(json["error"]["code"].is_string(), "{what}: {json}");
        assert!(json["error"]["message"].is_string(), "{what}: {json}");
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
