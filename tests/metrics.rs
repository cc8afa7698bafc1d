//! The edge's `/metrics` after real traffic: every counter moves by exactly
//! the number of requests of its kind, labels stay a fixed set (no short
//! code ever becomes a label), and the table gauges match `/health`.

mod common;

use std::time::Duration;

use common::{Cluster, api, free_port, get, metric, metric_exposed, request, wait_until};

fn series(method: &str, route: &str, status: u16) -> String {
    format!(r#"http_requests_total{{method="{method}",route="{route}",status_code="{status}"}}"#)
}

fn result(r: &str) -> String {
    format!(r#"link_redirects_total{{result="{r}"}}"#)
}

/// Three links with status 308: `live`, `off` (disabled) and `old`
/// (expired).
fn create_live_disabled_expired(edge: std::net::SocketAddr) {
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
}

#[test]
fn counters_move_by_exactly_the_traffic_sent() {
    let cluster = Cluster::start();
    let edge = cluster.edge_addr;
    create_live_disabled_expired(edge);
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
    assert_eq!(metric_exposed(&after, "link_files_refused_total"), 0.0);
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
        || metric_exposed(&cluster.metrics(cluster.edge_metrics_addr), &up) == 0.0,
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
    assert_eq!(metric_exposed(&after, "link_log_append_errors_total"), 0.0);
    assert!(delta("link_log_fsync_duration_seconds_count") >= 1.0);
    assert!(metric(&after, "data_dir_available_bytes") > 0.0);
    assert!(metric(&after, "data_dir_size_bytes") >= metric(&after, "data_dir_available_bytes"));
    // The admin's health is a real write: a healthy disk says so.
    let health = get(cluster.admin_addr, "/api/health").json();
    assert_eq!(health["status"], "ok");
    assert_eq!(health["writable"], true);
}

/// A metric selector in a PromQL expression: its name and its label
/// matchers `(label, op, value)`.
#[derive(Debug)]
struct Selector {
    name: String,
    matchers: Vec<(String, String, String)>,
}

/// The selectors and the grouping labels (`by`, `on`, ...) of a PromQL
/// expression, read by a small tokenizer: enough for the expressions this
/// repository ships, and it panics on what it does not understand rather
/// than skip it.
fn promql(expr: &str) -> (Vec<Selector>, Vec<String>) {
    let b = expr.as_bytes();
    let ident = |i: usize| {
        let mut j = i;
        while j < b.len() && (b[j].is_ascii_alphanumeric() || b[j] == b'_' || b[j] == b':') {
            j += 1;
        }
        (expr[i..j].to_string(), j)
    };
    let skip_ws = |mut i: usize| {
        while i < b.len() && b[i].is_ascii_whitespace() {
            i += 1;
        }
        i
    };
    let string = |i: usize| -> (String, usize) {
        assert_eq!(b[i], b'"', "a string expected at {i} in {expr}");
        let end = i + 1 + expr[i + 1..].find('"').expect("an unterminated string");
        (expr[i + 1..end].to_string(), end + 1)
    };
    let (mut selectors, mut grouping) = (Vec::new(), Vec::new());
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c.is_ascii_digit() || c == b'.' {
            // A number or a duration (`5m`, `0.99`).
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'.') {
                i += 1;
            }
        } else if c == b'[' {
            i += expr[i..].find(']').expect("an unterminated range") + 1;
        } else if c == b'{' {
            panic!("a selector without a metric name in {expr}");
        } else if c == b'"' {
            i += 1 + expr[i + 1..].find('"').expect("an unterminated string") + 1;
        } else if c.is_ascii_alphabetic() || c == b'_' {
            let (word, end) = ident(i);
            let next = skip_ws(end);
            let paren = b.get(next) == Some(&b'(');
            match word.as_str() {
                "by" | "without" | "on" | "ignoring" | "group_left" | "group_right" => {
                    i = end;
                    if paren {
                        let close = next + expr[next..].find(')').unwrap();
                        grouping.extend(
                            expr[next + 1..close]
                                .split(',')
                                .map(|l| l.trim().to_string())
                                .filter(|l| !l.is_empty()),
                        );
                        i = close + 1;
                    }
                }
                "and" | "or" | "unless" | "offset" | "bool" => i = end,
                // Aggregations (`sum by (x) (...)` puts the grouping first).
                "sum" | "min" | "max" | "avg" | "count" | "group" | "stddev" | "stdvar"
                | "topk" | "bottomk" | "quantile" | "count_values" => i = end,
                _ if paren => i = end, // a function
                _ => {
                    let mut sel = Selector {
                        name: word,
                        matchers: Vec::new(),
                    };
                    i = end;
                    if b.get(next) == Some(&b'{') {
                        i = skip_ws(next + 1);
                        while b[i] != b'}' {
                            let (label, end) = ident(i);
                            let op_start = skip_ws(end);
                            let op_end = op_start
                                + b[op_start..]
                                    .iter()
                                    .take_while(|c| matches!(c, b'=' | b'!' | b'~'))
                                    .count();
                            let op = expr[op_start..op_end].to_string();
                            let (value, end) = string(skip_ws(op_end));
                            sel.matchers.push((label, op, value));
                            i = skip_ws(end);
                            if b[i] == b',' {
                                i = skip_ws(i + 1);
                            }
                        }
                        i += 1;
                    }
                    selectors.push(sel);
                }
            }
        } else {
            i += 1;
        }
    }
    (selectors, grouping)
}

/// Series name -> label -> values seen, from a Prometheus text exposition.
type Exposed = std::collections::BTreeMap<
    String,
    std::collections::BTreeMap<String, std::collections::BTreeSet<String>>,
>;

fn exposed(text: &str) -> Exposed {
    let mut out = Exposed::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (series, _) = line.rsplit_once(' ').unwrap();
        let (name, labels) = series.split_once('{').unwrap_or((series, "}"));
        let entry = out.entry(name.to_string()).or_default();
        for pair in labels
            .trim_end_matches('}')
            .split("\",")
            .filter(|p| !p.is_empty())
        {
            let (label, value) = pair.split_once("=\"").unwrap();
            entry
                .entry(label.to_string())
                .or_default()
                .insert(value.trim_end_matches('"').to_string());
        }
    }
    out
}

/// Every metric, label and label value that `conf/prometheus/alerts.yml`
/// and `conf/grafana/uload-edge.json` query is one the real edge or admin
/// (the process the query's `job` names) exports, and the scrape config's
/// jobs are the ones they name: a misspelt name or label is an alert that
/// can never fire or a panel that never shows data, which nothing else
/// would notice.
#[test]
fn alerts_and_dashboard_query_only_what_is_exported() {
    use std::collections::BTreeSet;
    let backups = tempfile::tempdir().unwrap();
    // An HTTPS listener too, for the certificate's series.
    let certs = tempfile::tempdir().unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let (cert_path, key_path) = (certs.path().join("cert.pem"), certs.path().join("key.pem"));
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    let cluster = Cluster::start_custom(
        "",
        "",
        &format!(
            "backup:\n  dir: {}\ntls:\n  listen: 127.0.0.1:{}\n  cert_path: {}\n  key_path: {}\n",
            backups.path().display(),
            free_port(),
            cert_path.display(),
            key_path.display(),
        ),
    );
    let edge = cluster.edge_addr;
    // Traffic that brings the lazily made series (a redirect's latency, a
    // write's fsync, a scheduled backup) into the expositions.
    let body = r#"{"url":"https://example.com/","code":"names","status":308}"#;
    assert_eq!(api(edge, "POST", "/api/links", body).status, 201);
    wait_until(Duration::from_secs(10), "the link at the edge", || {
        get(edge, "/names").status == 308
    });
    assert_eq!(get(edge, "/absent").status, 404);
    wait_until(
        Duration::from_secs(30),
        "the first scheduled backup",
        || {
            metric(
                &cluster.metrics(cluster.admin_metrics_addr),
                "backup_last_success_timestamp_seconds",
            ) > 0.0
        },
    );
    let jobs = [
        (
            "uload-edge",
            exposed(&cluster.metrics(cluster.edge_metrics_addr)),
        ),
        (
            "uload-admin",
            exposed(&cluster.metrics(cluster.admin_metrics_addr)),
        ),
    ];
    let routes: BTreeSet<&str> = uload::metrics::RouteLabel::ALL
        .iter()
        .map(|r| r.as_str())
        .collect();

    // The scrape config names exactly these jobs.
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let read = |p: &str| std::fs::read_to_string(root.join(p)).unwrap();
    let scrape: serde_yaml::Value =
        serde_yaml::from_str(&read("conf/prometheus/prometheus.yml")).unwrap();
    let scraped: BTreeSet<&str> = scrape["scrape_configs"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|j| j["job_name"].as_str().unwrap())
        .collect();
    assert_eq!(scraped, jobs.iter().map(|j| j.0).collect());

    // (where, expression, labels used in its legend or annotations)
    let mut queries: Vec<(String, String, Vec<String>)> = Vec::new();
    let braces = |text: &str, open: &str, close: &str| -> Vec<String> {
        text.split(open)
            .skip(1)
            .filter_map(|t| t.split(close).next())
            .map(|t| t.trim().to_string())
            .collect()
    };
    let alerts: serde_yaml::Value =
        serde_yaml::from_str(&read("conf/prometheus/alerts.yml")).unwrap();
    for group in alerts["groups"].as_sequence().unwrap() {
        for rule in group["rules"].as_sequence().unwrap() {
            let name = rule["alert"].as_str().unwrap();
            let annotations = serde_yaml::to_string(&rule["annotations"]).unwrap();
            let labels = braces(&annotations, "$labels.", " ");
            queries.push((
                format!("alert {name}"),
                rule["expr"].as_str().unwrap().to_string(),
                labels,
            ));
        }
    }
    let dash: serde_json::Value =
        serde_json::from_str(&read("conf/grafana/uload-edge.json")).unwrap();
    for panel in dash["panels"].as_array().unwrap() {
        for t in panel["targets"].as_array().unwrap() {
            let legend = t["legendFormat"].as_str().unwrap_or("");
            queries.push((
                format!("panel {:?}", panel["title"].as_str().unwrap()),
                t["expr"].as_str().unwrap().to_string(),
                braces(legend, "{{", "}}"),
            ));
        }
    }
    for var in dash["templating"]["list"].as_array().unwrap() {
        if let Some(q) = var["query"]["query"].as_str() {
            // label_values(<selector>, <label>)
            let inner = q
                .strip_prefix("label_values(")
                .and_then(|q| q.strip_suffix(')'))
                .unwrap();
            let (selector, label) = inner.rsplit_once(',').unwrap();
            queries.push((
                format!("variable {}", var["name"]),
                selector.to_string(),
                vec![label.trim().to_string()],
            ));
        }
    }

    let mut bad = Vec::new();
    for (place, expr, used) in &queries {
        let (selectors, grouping) = promql(expr);
        assert!(!selectors.is_empty(), "{place}: no metric in {expr}");
        // Labels every series has once scraped.
        let mut known: BTreeSet<String> = ["instance", "job"].map(String::from).into();
        for sel in &selectors {
            let job = sel.matchers.iter().find(|m| m.0 == "job");
            let in_jobs: Vec<&Exposed> = match job.map(|m| (m.1.as_str(), m.2.as_str())) {
                Some(("=", j)) => jobs.iter().filter(|x| x.0 == j).map(|x| &x.1).collect(),
                Some(("=~", "uload-.*")) => jobs.iter().map(|x| &x.1).collect(),
                other => {
                    bad.push(format!(
                        "{place}: {} has no usable job matcher: {other:?}",
                        sel.name
                    ));
                    continue;
                }
            };
            if in_jobs.is_empty() {
                bad.push(format!(
                    "{place}: {} asks for an unscraped job {job:?}",
                    sel.name
                ));
            }
            if sel.name == "up" {
                continue; // made by Prometheus for each target
            }
            for e in in_jobs {
                let Some(labels) = e.get(&sel.name) else {
                    bad.push(format!("{place}: {} is not exported by {job:?}", sel.name));
                    continue;
                };
                known.extend(labels.keys().cloned());
                for (label, op, value) in &sel.matchers {
                    if label == "job" || label == "instance" {
                        continue;
                    }
                    let Some(values) = labels.get(label) else {
                        bad.push(format!("{place}: {} has no label {label}", sel.name));
                        continue;
                    };
                    // Plain names (alternatives of a regex too) must be
                    // values the code gives the label.
                    if !value
                        .bytes()
                        .all(|c| c.is_ascii_lowercase() || c == b'_' || c == b'|')
                    {
                        continue;
                    }
                    for v in value.split('|') {
                        let given = if label == "route" {
                            routes.contains(v)
                        } else {
                            values.contains(v)
                        };
                        if !given {
                            bad.push(format!("{place}: {}{{{label}{op}{value:?}}}: {v} is never a value of {label}", sel.name));
                        }
                    }
                }
            }
        }
        for label in grouping.iter().chain(used) {
            if !known.contains(label) {
                bad.push(format!("{place}: label {label} is on none of its series"));
            }
        }
    }
    assert!(bad.is_empty(), "{}", bad.join("\n"));
    println!(
        "{} queries checked against the real expositions",
        queries.len()
    );
}

/// Sends `requests` (method, path) on one kept-alive connection as client
/// `ip` (the test is the trusted proxy in front); returns the statuses.
fn keepalive(edge: std::net::SocketAddr, ip: &str, requests: &[(&str, &str)]) -> Vec<u16> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(edge).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let mut statuses = Vec::new();
    let mut buf: Vec<u8> = Vec::new();
    for (method, path) in requests {
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: {edge}\r\nX-Forwarded-For: {ip}\r\n\r\n"
        )
        .unwrap();
        let end = loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break end + 4;
            }
            let mut chunk = [0u8; 4096];
            let n = s.read(&mut chunk).unwrap();
            assert!(n > 0, "closed before an answer to {method} {path}");
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .map_or(0, |v| v.trim().parse().unwrap());
        let length = if *method == "HEAD" { 0 } else { length };
        while buf.len() < end + length {
            let mut chunk = [0u8; 4096];
            let n = s.read(&mut chunk).unwrap();
            assert!(n > 0, "closed in the body of {method} {path}");
            buf.extend_from_slice(&chunk[..n]);
        }
        statuses.push(head[9..12].parse().unwrap());
        buf.drain(..end + length);
    }
    statuses
}

/// The same traffic counts the same whether the redirect fast path and
/// loops answer it or Pingora does (`edge.fast_path: false`): every
/// request, short-code answer and rate-limit decision series moves by the
/// same amount on both. (The miss limit refills one a minute: nothing
/// refills while the few requests are sent.)
#[test]
fn fast_path_and_pingora_count_alike() {
    let limits = "rate_limit:\n  client_requests_per_second: 1\n  client_burst: 100\n  client_misses_per_minute: 1\n  client_miss_burst: 3\n  trusted_proxies: [\"127.0.0.1\"]\n";
    let counted = |edge_extra: &str| -> std::collections::BTreeMap<String, f64> {
        let cluster = Cluster::start_custom(edge_extra, "", limits);
        let edge = cluster.edge_addr;
        create_live_disabled_expired(edge);
        wait_until(Duration::from_secs(10), "links at the edge", || {
            keepalive(edge, "198.51.100.200", &[("GET", "/old")]) == [404]
        });
        // Pingora records a request once its response is written, a moment
        // after the client has it (the short-code answer is counted
        // before): wait until the polls above are all recorded.
        let settled = |text: &str| {
            let sum = |prefix: &str| -> f64 {
                exposed_values(text)
                    .iter()
                    .filter(|(s, _)| {
                        s.starts_with(prefix)
                            && !s.contains("route=\"api\"")
                            && !s.contains("route=\"health\"")
                    })
                    .map(|(_, v)| v)
                    .sum()
            };
            sum("http_requests_total{") == sum("link_redirects_total{")
        };
        wait_until(Duration::from_secs(10), "the polls recorded", || {
            settled(&cluster.metrics(cluster.edge_metrics_addr))
        });
        let before = exposed_values(&cluster.metrics(cluster.edge_metrics_addr));
        let mut sent = 0;
        // A client within its limits, on one connection.
        let a = [
            ("GET", "/live"),
            ("GET", "/live"),
            ("HEAD", "/live"),
            ("GET", "/off"),
            ("GET", "/old"),
            ("GET", "/live?q=1"),
            ("HEAD", "/nope"),
        ];
        assert_eq!(
            keepalive(edge, "198.51.100.1", &a),
            [308, 308, 308, 404, 404, 308, 404]
        );
        sent += a.len();
        // A scanner: three misses, then every code is refused.
        let b = [
            ("GET", "/s0"),
            ("GET", "/s1"),
            ("GET", "/s2"),
            ("GET", "/s3"),
            ("GET", "/live"),
            ("HEAD", "/live"),
        ];
        assert_eq!(
            keepalive(edge, "198.51.100.2", &b),
            [404, 404, 404, 429, 429, 429]
        );
        sent += b.len();
        let total = |text: &str| -> f64 {
            exposed_values(text)
                .iter()
                .filter(|(s, _)| s.starts_with("http_requests_total{"))
                .map(|(s, v)| v - before.get(s).copied().unwrap_or(0.0))
                .sum()
        };
        wait_until(Duration::from_secs(10), "every request recorded", || {
            total(&cluster.metrics(cluster.edge_metrics_addr)) >= sent as f64
        });
        let after = exposed_values(&cluster.metrics(cluster.edge_metrics_addr));
        // The comparison means something only if the fast path and a
        // redirect loop did answer in the one and never in the other.
        let moved = |s: &str| after[s] - before[s];
        let fast_on = edge_extra.is_empty();
        assert_eq!(
            moved("edge_fast_path_answers_total") >= sent as f64,
            fast_on,
            "fast path answers"
        );
        assert_eq!(
            moved("edge_redirect_loop_accepts_total") >= 2.0,
            fast_on,
            "connections the loops accepted"
        );
        after
            .iter()
            .filter(|(s, _)| {
                [
                    "http_requests_total{",
                    "http_request_duration_seconds_count{",
                    "link_redirects_total{",
                    "rate_limit_decisions_total{",
                ]
                .iter()
                .any(|p| s.starts_with(p))
            })
            .map(|(s, v)| (s.clone(), v - before.get(s).copied().unwrap_or(0.0)))
            .filter(|(_, d)| *d != 0.0)
            .collect()
    };
    let fast = counted("");
    let pingora = counted("  fast_path: false\n");
    assert_eq!(fast, pingora, "fast path (left) and Pingora (right)");
    println!("{} series moved alike: {pingora:?}", pingora.len());
}

/// Series (name and labels, as exposed) -> value.
fn exposed_values(text: &str) -> std::collections::BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (s, v) = l.rsplit_once(' ')?;
            Some((s.to_string(), v.parse().ok()?))
        })
        .collect()
}
