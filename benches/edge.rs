//! Criterion benchmarks of the edge's request path without the network
//! (issue 4): a redirect request's header bytes in, the response bytes out,
//! through `RedirectFastPath::answer` (parse, route, hot-table lookup,
//! response header build, metrics), and the lookup alone for comparison.
//!
//! Run with `cargo bench --bench edge` (about a minute; it writes a 1M-link
//! snapshot into a temporary directory first, a few seconds). Figures and
//! the machine: `docs/benchmarks.md`, "The edge's request path without the
//! network".
//!
//! - `edge_request/fast_path_hot`: the same known code every time (in cache);
//! - `edge_request/fast_path_spread`: 4,096 known codes spread over the
//!   table, in turn (about 0.5 MB of index slots and records: out of L1,
//!   in L2/L3 once warm; the snapshot benchmarks in `benches/store.rs`
//!   measure cache-cold lookups);
//! - `edge_request/fast_path_unknown`: an unknown code (a JSON 404);
//! - `edge_request/lookup_spread`: `redirect::resolve` alone on the same
//!   4,096 codes, the table's share of `fast_path_spread`.
//!
//! Results (2026-11-27 05:28 to 05:35 UTC, the 2-vCPU VM of
//! `docs/benchmarks.md`, commit `a34edbb`, the fast path's own head parser;
//! criterion's estimate, alternated with the build before it, `2d826d3`,
//! which parsed with httparse; medians of three runs each, eight for
//! `fast_path_unknown`): `fast_path_hot` 354 ns (before: 536 ns);
//! `fast_path_spread` 459 ns (528 ns); `fast_path_unknown` 471 ns (448 ns:
//! within the noise; callgrind counts 1,860 instructions per call against
//! 2,394); `lookup_spread` (the same code in both) 157 ns (110 ns, noise).
//! Earlier (01:49 to 01:52 UTC, three runs): 462, 664, 412 and 125 ns.

use std::convert::Infallible;
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Instant;

use criterion::{Criterion, criterion_group, criterion_main};
use pingora::lb::LoadBalancer;
use pingora::lb::selection::RoundRobin;
use uload::config::Config;
use uload::edge::clicks::ClickTable;
use uload::edge::fast_path::RedirectFastPath;
use uload::edge::metrics::EdgeMetrics;
use uload::edge::redirect::resolve;
use uload::store::follower::FollowerStats;
use uload::store::record::{Link, now_ms};
use uload::store::snapshot::{Snapshot, write_snapshot};
use uload::store::view::{HotTable, TableView};

const LINKS: usize = 1_000_000;

/// The code of link `i`: fixed width, so that codes sort as numbers do
/// (a snapshot is written in code order).
fn code(i: usize) -> String {
    format!("c{i:07}")
}

fn edge_benches(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("bench.snap");
    let links: Vec<Link> = (0..LINKS)
        .map(|i| {
            let mut link = Link::new(
                &code(i),
                &format!("https://example.com/landing/page/{i}?utm_source=bench"),
            )
            .expect("valid link");
            link.status = uload::store::RedirectStatus::MovedPermanently;
            link
        })
        .collect();
    write_snapshot(
        &path,
        LINKS as u64,
        links.iter().map(|l| Ok::<_, Infallible>(l.as_ref())),
    )
    .expect("write snapshot");
    drop(links);
    let snapshot = Arc::new(Snapshot::open(&path, true).expect("open snapshot"));
    let table = Arc::new(HotTable::new(TableView::new(Some(snapshot))));

    let config = Config::from_yaml_str("data_dir: /nonexistent\n", "bench", &[]).expect("config");
    let admins = LoadBalancer::<RoundRobin>::try_from_iter(["127.0.0.1:9"]).expect("upstreams");
    let metrics = EdgeMetrics::new(
        table.clone(),
        Arc::new(FollowerStats::default()),
        Arc::new(admins),
    )
    .expect("metrics");
    let fast = RedirectFastPath {
        table: table.clone(),
        config: Arc::new(config.edge),
        metrics: Arc::new(metrics),
        limits: None,
        clicks: Arc::new(
            ClickTable::open(&dir.path().join("clicks.bin"), 64).expect("click table"),
        ),
        trusted_proxies: Vec::new(),
        client_ip_header: config.rate_limit.client_ip_header.clone(),
        access_log: None,
    };
    let peer = Some(IpAddr::V4(Ipv4Addr::LOCALHOST));
    let request = |code: &str| {
        format!("GET /{code} HTTP/1.1\r\nHost: ulo.ad\r\nUser-Agent: bench\r\n\r\n").into_bytes()
    };
    // 4,096 codes spread over the table (a fixed LCG: the same every run).
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let spread: Vec<String> = (0..4096)
        .map(|_| {
            x = x
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            code((x >> 33) as usize % LINKS)
        })
        .collect();
    let spread_requests: Vec<Vec<u8>> = spread.iter().map(|c| request(c)).collect();

    // Every answer is checked once before it is timed.
    let mut out = Vec::with_capacity(512);
    for (req, want) in [
        (request(&code(7)), "HTTP/1.1 301 "),
        (request("nope123"), "HTTP/1.1 404 "),
    ] {
        assert_eq!(
            fast.answer(&req, peer, Instant::now(), false, &mut out),
            Some(true)
        );
        assert!(
            out.starts_with(want.as_bytes()),
            "{}",
            String::from_utf8_lossy(&out)
        );
    }

    let mut g = c.benchmark_group("edge_request");
    let hot = request(&code(7));
    g.bench_function("fast_path_hot", |b| {
        b.iter(|| fast.answer(black_box(&hot), peer, Instant::now(), false, &mut out))
    });
    let mut i = 0;
    g.bench_function("fast_path_spread", |b| {
        b.iter(|| {
            i = (i + 1) & 4095;
            fast.answer(
                black_box(&spread_requests[i]),
                peer,
                Instant::now(),
                false,
                &mut out,
            )
        })
    });
    let unknown = request("nope123");
    g.bench_function("fast_path_unknown", |b| {
        b.iter(|| fast.answer(black_box(&unknown), peer, Instant::now(), false, &mut out))
    });
    let view = table.load_full();
    let now = now_ms();
    g.bench_function("lookup_spread", |b| {
        b.iter(|| {
            i = (i + 1) & 4095;
            resolve(&view, black_box(spread[i].as_bytes()), now, None).is_ok()
        })
    });
    g.finish();
}

criterion_group!(benches, edge_benches);
criterion_main!(benches);
