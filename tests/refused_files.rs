//! Fault 5 of the reliability suite: bad files placed in a live data dir.
//!
//! A truncated, corrupt or wrong-version snapshot (named by a new manifest),
//! a corrupt manifest, and truncated, corrupt or wrong-version log segments
//! are each placed into the data dir of a running edge. Each must be refused
//! with a log line naming the problem and a move of
//! `link_files_refused_total`, while the edge keeps serving every link of its
//! current view; once the bad file is gone, new links flow again.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{Cluster, api, get, metric, wait_until};
use uload::store::datadir::{Manifest, snapshot_file_name};
use uload::store::frame::{LogOp, encode_frame};
use uload::store::log::{SEGMENT_HEADER_LEN, encode_segment_header, segment_file_name};
use uload::store::record::Link;
use uload::store::snapshot::{SNAPSHOT_HEADER_LEN, SnapshotHeader};

const REFUSED: &str = "link_files_refused_total";
const LAST_REFUSED: &str = "link_files_last_refused_timestamp_seconds";

fn unix_secs() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as f64
}

/// Writes `bytes` to `path` the way a careless operator's copy would land:
/// complete, then renamed into place.
fn place(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("placing");
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn create(cluster: &Cluster, code: &str) {
    let body = format!(r#"{{"url":"https://example.com/{code}","code":"{code}","status":301}}"#);
    let r = api(cluster.edge_addr, "POST", "/api/links", &body);
    assert_eq!(r.status, 201, "{:?}", String::from_utf8_lossy(&r.body));
}

/// Every code is redirected to its target; counts the requests.
fn all_served(cluster: &Cluster, codes: &[String]) -> usize {
    for code in codes {
        let r = get(cluster.edge_addr, &format!("/{code}"));
        assert_eq!(r.status, 301, "/{code}");
        assert_eq!(
            r.header("location"),
            Some(format!("https://example.com/{code}").as_str())
        );
    }
    codes.len()
}

/// A copy of the current snapshot whose header claims `seq` (so that a
/// follower takes it for news), with `damage` applied afterwards.
fn forged_snapshot(current: &[u8], seq: u64, version: Option<u32>) -> Vec<u8> {
    let mut bytes = current.to_vec();
    let mut header = SnapshotHeader::decode(&bytes, bytes.len() as u64).unwrap();
    header.seq = seq;
    if let Some(v) = version {
        header.version = v;
    }
    bytes[..SNAPSHOT_HEADER_LEN].copy_from_slice(&header.encode());
    bytes
}

#[test]
fn bad_files_are_refused_and_the_edge_keeps_serving() {
    let mut cluster = Cluster::start_with("  compact_every_records: 20\n");
    let mut codes: Vec<String> = (0..30).map(|i| format!("keep{i}")).collect();
    for code in &codes {
        create(&cluster, code);
    }
    let data = cluster.data_dir();
    let health = || get(cluster.edge_addr, "/health").json();
    wait_until(Duration::from_secs(30), "a snapshot under the edge", || {
        health()["table"]["snapshot_seq"].as_u64().unwrap_or(0) > 0
            && health()["table"]["seq"].as_u64() == Some(30)
    });
    let mut served = all_served(&cluster, &codes);
    let before_faults = unix_secs();
    let text = cluster.metrics(cluster.edge_metrics_addr);
    assert_eq!(
        common::metric_exposed(&text, LAST_REFUSED),
        0.0,
        "nothing refused yet"
    );

    let manifest_path = data.join("MANIFEST");
    let good_manifest = std::fs::read(&manifest_path).unwrap();
    let manifest = Manifest::decode(std::str::from_utf8(&good_manifest).unwrap()).unwrap();
    let current = std::fs::read(data.join("snapshots").join(&manifest.snapshot)).unwrap();

    let mut faults = 0;
    let mut expect_refusal = |what: &str, needle: &str, cluster: &Cluster| {
        faults += 1;
        wait_until(Duration::from_secs(10), what, || {
            metric(&cluster.metrics(cluster.edge_metrics_addr), REFUSED) >= faults as f64
        });
        let log = cluster.log("edge");
        assert!(
            log.lines()
                .any(|l| l.contains("refused a file") && l.contains(needle)),
            "{what}: no log line naming {needle:?} in\n{log}"
        );
        let h = get(cluster.edge_addr, "/health");
        assert_eq!(h.status, 200, "{what}: /health");
        println!("refused: {what}");
    };

    // Snapshots named by a new, well-formed manifest.
    let snapshot_faults: [(&str, &str, Vec<u8>); 4] = [
        (
            "truncated snapshot",
            "do not tile",
            forged_snapshot(&current, 1_000_001, None)[..current.len() / 2].to_vec(),
        ),
        ("corrupt snapshot", "checksum mismatch", {
            let mut b = forged_snapshot(&current, 1_000_002, None);
            let at = SNAPSHOT_HEADER_LEN + 40;
            b[at] ^= 0x55;
            b
        }),
        (
            "wrong-version snapshot",
            "format version 99",
            forged_snapshot(&current, 1_000_003, Some(99)),
        ),
        ("snapshot with a garbage header", "magic", {
            let mut b = forged_snapshot(&current, 1_000_004, None);
            b[..8].copy_from_slice(b"GARBAGE!");
            b
        }),
    ];
    for (i, (what, needle, bytes)) in snapshot_faults.into_iter().enumerate() {
        let seq = 1_000_001 + i as u64;
        let name = snapshot_file_name(seq);
        let path = data.join("snapshots").join(&name);
        place(&path, &bytes);
        let bad = Manifest {
            snapshot: name,
            seq,
            links: manifest.links,
        };
        place(&manifest_path, bad.encode().as_bytes());
        expect_refusal(what, needle, &cluster);
        served += all_served(&cluster, &codes);
        place(&manifest_path, &good_manifest);
        std::fs::remove_file(&path).unwrap();
    }

    // A manifest that fails its own checksum.
    let mut broken = good_manifest.clone();
    let at = broken.iter().position(|&b| b == b'\n').unwrap() + 10;
    broken[at] ^= 0x01;
    place(&manifest_path, &broken);
    expect_refusal("corrupt manifest", "checksum mismatch", &cluster);
    served += all_served(&cluster, &codes);
    place(&manifest_path, &good_manifest);

    // Log segments placed where the edge reads next (as a rolled-over
    // segment would be), then removed.
    for fault in [
        "truncated log segment",
        "corrupt log segment",
        "wrong-version log segment",
    ] {
        let next = cluster.edge_seq() + 1;
        let seg_path = data.join("log").join(segment_file_name(next));
        let header = encode_segment_header(next);
        let (needle, bytes) = match fault {
            "truncated log segment" => ("shorter than", header[..SEGMENT_HEADER_LEN / 2].to_vec()),
            "corrupt log segment" => {
                // A complete frame failing its checksum, then a valid one:
                // damage, not a write in progress.
                let mut b = header.to_vec();
                b.extend_from_slice(&16u32.to_le_bytes());
                b.extend_from_slice(&[0xA5; 20]);
                let link = Link::new("zzz", "https://example.com/zzz").unwrap();
                encode_frame(next, &LogOp::Put(link), &mut b);
                ("checksum", b)
            }
            _ => {
                let mut h = header;
                h[8..12].copy_from_slice(&99u32.to_le_bytes());
                let crc = crc32c::crc32c(&h[..28]);
                h[28..32].copy_from_slice(&crc.to_le_bytes());
                ("format version 99", h.to_vec())
            }
        };
        place(&seg_path, &bytes);
        expect_refusal(fault, needle, &cluster);
        served += all_served(&cluster, &codes);
        std::fs::remove_file(&seg_path).unwrap();
        let code = format!("after{}", codes.len());
        create(&cluster, &code);
        codes.push(code.clone());
        wait_until(
            Duration::from_secs(10),
            "a new link after the bad file went",
            || get(cluster.edge_addr, &format!("/{code}")).status == 301,
        );
        assert!(
            get(cluster.edge_addr, "/zzz").status == 404,
            "nothing from a refused file"
        );
    }

    let text = cluster.metrics(cluster.edge_metrics_addr);
    let refused = metric(&text, REFUSED);
    println!("faults {faults}, refused {refused}, redirects checked {served}, failures 0");
    assert_eq!(refused, faults as f64, "each bad file refused once");
    let last = metric(&text, LAST_REFUSED);
    assert!(
        (before_faults..=unix_secs()).contains(&last),
        "{LAST_REFUSED} {last}: not the time of a refusal in this test"
    );
    assert!(metric(&text, "link_snapshot_swaps_total") >= 1.0);
    cluster.kill_edge();
}

/// `/health/ready` goes 503 with `"status": "degraded"` and the reason while
/// the follower is stuck on a bad file for longer than
/// `edge.follower_stall_secs`, and 200 again once it reads on; `/health`
/// (liveness) stays 200 throughout, and so do redirects.
#[test]
fn readiness_fails_while_the_follower_is_stuck() {
    let cluster = Cluster::start_custom("  follower_stall_secs: 1\n", "", "");
    create(&cluster, "alive");
    wait_until(Duration::from_secs(10), "the link at the edge", || {
        get(cluster.edge_addr, "/alive").status == 301
    });
    let ready = get(cluster.edge_addr, "/health/ready");
    assert_eq!(ready.status, 200);
    assert_eq!(ready.json()["status"], "ok");
    assert!(
        ready.json()["data_dir"]["disk_available_bytes"]
            .as_u64()
            .is_some()
    );

    let next = cluster.edge_seq() + 1;
    let seg = cluster.data_dir().join("log").join(segment_file_name(next));
    place(&seg, &encode_segment_header(next)[..10]);
    wait_until(Duration::from_secs(15), "readiness to fail", || {
        get(cluster.edge_addr, "/health/ready").status == 503
    });
    let doc = get(cluster.edge_addr, "/health/ready").json();
    assert_eq!(doc["status"], "degraded");
    let reason = doc["reasons"][0].as_str().unwrap();
    assert!(reason.starts_with("follower: stuck"), "{reason}");
    let live = get(cluster.edge_addr, "/health");
    assert_eq!(live.status, 200, "liveness does not fail");
    assert_eq!(live.json()["status"], "degraded");
    assert_eq!(
        get(cluster.edge_addr, "/alive").status,
        301,
        "redirects go on"
    );

    std::fs::remove_file(&seg).unwrap();
    wait_until(Duration::from_secs(10), "readiness to return", || {
        get(cluster.edge_addr, "/health/ready").status == 200
    });
    // The admin being down never fails readiness.
    let mut cluster = cluster;
    cluster.kill_admin();
    let up = format!(r#"admin_upstream_up{{upstream="{}"}}"#, cluster.admin_addr);
    wait_until(Duration::from_secs(10), "the admin seen down", || {
        common::metric_exposed(&cluster.metrics(cluster.edge_metrics_addr), &up) == 0.0
    });
    assert_eq!(get(cluster.edge_addr, "/health/ready").status, 200);
}
