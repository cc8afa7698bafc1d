//! Graceful upgrade: a second edge started with `-u` takes over the
//! listening socket of the running one (SIGQUIT hands it over), while a
//! client keeps requesting redirects: no request fails.

mod common;

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::{Cluster, api, get, request, uload_command, wait_until};

/// Admin and edge running, with `/{code}` created through the edge and served.
fn cluster_serving(code: &str) -> Cluster {
    let cluster = Cluster::start();
    let edge = cluster.edge_addr;
    let body = format!(r#"{{"url":"https://example.com/{code}","code":"{code}"}}"#);
    assert_eq!(api(edge, "POST", "/api/links", &body).status, 201);
    wait_until(Duration::from_secs(30), "link served", || {
        get(edge, &format!("/{code}")).status == 302
    });
    cluster
}

#[test]
fn upgrade_hands_over_without_failed_requests() {
    let mut cluster = cluster_serving("up");
    let edge = cluster.edge_addr;

    // A client hammering the edge for the whole hand-over.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let client = {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) && n < 200_000 {
                n += 1;
                match request(edge, "GET", "/up", &[], b"") {
                    Ok(r) if r.status == 302 => ok.fetch_add(1, Ordering::Relaxed),
                    other => {
                        eprintln!("failed request: {other:?}");
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
        })
    };
    wait_until(Duration::from_secs(30), "client running", || {
        ok.load(Ordering::Relaxed) > 50
    });

    let old = cluster.edge.take().unwrap();
    let mut new = uload_command(cluster.path())
        .args(["edge", "-u", "--config"])
        .arg(&cluster.config)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    // The new process waits on the upgrade socket; SIGQUIT makes the old one
    // send its listeners over, then drain and exit.
    let sock = cluster.path().join("upgrade.sock");
    wait_until(
        Duration::from_secs(30),
        "new edge listening on the upgrade socket",
        || sock.exists(),
    );
    let before = ok.load(Ordering::Relaxed);
    let status = Command::new("kill")
        .args(["-QUIT", &old.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let mut old = old;
    let exited = old.wait().unwrap();
    eprintln!("old edge exited: {exited:?}");
    wait_until(
        Duration::from_secs(30),
        "requests after the hand-over",
        || ok.load(Ordering::Relaxed) > before + 200,
    );
    stop.store(true, Ordering::Relaxed);
    client.join().unwrap();
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    eprintln!("{ok} redirects served across the upgrade, {failed} failed");
    assert_eq!(failed, 0);
    // The new edge is the one serving now.
    assert!(new.try_wait().unwrap().is_none(), "new edge still running");
    assert_eq!(get(edge, "/up").status, 302);
    new.kill().unwrap();
    new.wait().unwrap();
}

/// A new edge started with `-u` that cannot open its access log fails
/// before it takes the running edge's sockets: the running edge keeps
/// serving. (It opened the log after taking them: both edges gone.)
#[test]
fn an_upgrade_that_cannot_open_the_access_log_leaves_the_old_edge_serving() {
    let mut cluster = Cluster::start();
    // The old edge keeps its open file; the new one finds a directory.
    let log = cluster.path().join("access.log");
    std::fs::remove_file(&log).unwrap();
    std::fs::create_dir(&log).unwrap();
    let stderr = cluster.failed_upgrade();
    assert!(stderr.contains("access.log"), "{stderr}");
}

/// `systemctl reload uload-edge` and a certificate renewal hook send SIGHUP.
/// An edge without TLS has nothing to reload, and SIGHUP's default action
/// ends a process: every connection dropped, no redirects until systemd
/// started it again. Its disposition must be "ignored", and the edge must
/// serve on, the link it served before included.
#[test]
fn a_hangup_to_an_edge_without_tls_changes_nothing() {
    let mut cluster = cluster_serving("hup");
    let edge = cluster.edge_addr;
    let pid = cluster.edge.as_ref().unwrap().id();
    // SIGHUP is signal 1: bit 0 of the mask of ignored signals.
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let ignored = status
        .lines()
        .find_map(|l| l.strip_prefix("SigIgn:"))
        .map(|m| u64::from_str_radix(m.trim(), 16).unwrap())
        .unwrap();
    assert_eq!(ignored & 1, 1, "SIGHUP is not ignored (SigIgn {ignored:x})");
    for _ in 0..3 {
        let sent = Command::new("kill")
            .args(["-HUP", &pid.to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
        assert_eq!(get(edge, "/hup").status, 302);
    }
    let child = cluster.edge.as_mut().unwrap();
    assert!(
        child.try_wait().unwrap().is_none(),
        "the edge ended on SIGHUP"
    );
}
