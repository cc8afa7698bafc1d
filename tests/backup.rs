//! Backups and restore (issue 6), end to end: `uload backup` while the real
//! admin takes concurrent creates and compacts, `uload verify-backup`,
//! `uload restore` into a new data dir, and a new edge serving it; damaged
//! backups refused; the admin's scheduled backups and their retention.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Cluster, KEY, free_port, get, request, wait_until};
use uload::store::backup::{BackupManifest, backup_dir_name, list_backups};
use uload::store::record::Link;
use uload::store::{DataDir, LogOp, LogOptions, Store};

/// Runs `uload ARGS...` to completion.
fn uload(args: &[&dyn AsRef<std::ffi::OsStr>]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_uload"));
    for a in args {
        cmd.arg(a);
    }
    cmd.env_remove("ULOAD_DATA_DIR")
        .env_remove("ULOAD_CONFIG")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .expect("run uload")
}

fn text(out: &Output) -> String {
    format!(
        "status {:?}\n--- stdout\n{}--- stderr\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The links of a data dir (or of a backup, which is laid out as one).
fn links_of(dir: &Path) -> HashMap<String, String> {
    let view = DataDir::new(dir).load_view(true).unwrap();
    view.iter()
        .map(|l| {
            let l = l.unwrap();
            (
                String::from_utf8(l.code.to_vec()).unwrap(),
                String::from_utf8(l.target.to_vec()).unwrap(),
            )
        })
        .collect()
}

/// An edge alone on `data_dir` (its admin upstream answers nothing: the
/// edge serves redirects without one). Killed when dropped.
struct LoneEdge {
    child: Child,
    addr: SocketAddr,
}

impl LoneEdge {
    fn start(dir: &Path, data_dir: &Path) -> Self {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let nobody: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        std::fs::write(
            dir.join("pingora.yaml"),
            format!(
                "---\nversion: 1\nthreads: 2\npid_file: {0}/edge.pid\nupgrade_sock: {0}/upgrade.sock\ngrace_period_seconds: 1\ngraceful_shutdown_timeout_seconds: 1\n",
                dir.display()
            ),
        )
        .unwrap();
        let config = dir.join("uload.yaml");
        std::fs::write(
            &config,
            format!(
                "data_dir: {}\npublic_base_url: http://{addr}\nedge:\n  listen: {addr}\n  admin_upstreams: [\"{nobody}\"]\n  health_check_interval_ms: 100\n  pingora_conf: pingora.yaml\n",
                data_dir.display()
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.join("edge.stderr")).unwrap();
        let child = common::uload_command(dir)
            .args(["edge", "--config"])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap();
        wait_until(Duration::from_secs(30), "restored edge /health", || {
            request(addr, "GET", "/health", &[], b"").is_ok_and(|r| r.status == 200)
        });
        Self { child, addr }
    }

    fn seq(&self) -> u64 {
        get(self.addr, "/health").json()["table"]["seq"]
            .as_u64()
            .unwrap()
    }
}

impl Drop for LoneEdge {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Creates a link through the admin; `Some` on 201.
fn create(admin: SocketAddr, code: &str, url: &str) -> Result<(), String> {
    let auth = format!("Bearer {KEY}");
    let body = format!(r#"{{"url":"{url}","code":"{code}"}}"#);
    match request(
        admin,
        "POST",
        "/api/links",
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/json"),
        ],
        body.as_bytes(),
    ) {
        Ok(r) if r.status == 201 => Ok(()),
        Ok(r) => Err(format!(
            "{code}: {} {}",
            r.status,
            String::from_utf8_lossy(&r.body)
        )),
        Err(e) => Err(format!("{code}: {e}")),
    }
}

#[test]
fn online_backups_during_writes_verify_restore_and_serve() {
    // Compactions every 150 records, so that backups race with them.
    let cluster = Cluster::start_with("  compact_every_records: 150\n");
    let admin = cluster.admin_addr;
    let out = tempfile::tempdir().unwrap();

    // Writers: every 201 is recorded (after the answer: the link is durable).
    let acked: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    let failures: Arc<Mutex<Vec<String>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let (acked, failures, stop) = (acked.clone(), failures.clone(), stop.clone());
            std::thread::spawn(move || {
                for i in 0..20_000 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let code = format!("w{w}x{i}");
                    let url = format!("https://example.com/{w}/{i}?q={i}");
                    match create(admin, &code, &url) {
                        Ok(()) => acked.lock().unwrap().push((code, url)),
                        Err(e) => failures.lock().unwrap().push(e),
                    }
                }
            })
        })
        .collect();
    let acked_count = || acked.lock().unwrap().len();

    // Several backups while the writers run, each starting after more writes.
    struct Taken {
        dest: PathBuf,
        /// Links acknowledged before the backup started.
        before: usize,
        took: Duration,
        stdout: String,
    }
    let mut taken = Vec::new();
    for b in 0..4 {
        let want = (b + 1) * 300;
        wait_until(Duration::from_secs(60), "writes before a backup", || {
            acked_count() >= want
        });
        let dest = out.path().join(format!("backup-{b}"));
        let before = acked_count();
        let started = Instant::now();
        let o = uload(&[&"backup", &dest, &"--data-dir", &cluster.data_dir()]);
        let took = started.elapsed();
        assert!(o.status.success(), "{}", text(&o));
        taken.push(Taken {
            dest,
            before,
            took,
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        });
    }
    let during = acked_count();
    stop.store(true, Ordering::Relaxed);
    // A link created once the last backup has returned: in no backup.
    let after = "made-after-the-backups";
    create(admin, after, "https://example.com/after").unwrap();
    for w in writers {
        w.join().unwrap();
    }
    let failures = failures.lock().unwrap().clone();
    assert!(failures.is_empty(), "creates failed: {failures:?}");
    let acked = acked.lock().unwrap().clone();
    let all: HashMap<&str, &str> = acked
        .iter()
        .map(|(c, u)| (c.as_str(), u.as_str()))
        .collect();
    assert!(
        during > taken[0].before,
        "the writers wrote during the backups"
    );

    let mut previous_seq = 0;
    for t in &taken {
        eprintln!("{}", t.stdout.trim_end());
        let o = uload(&[&"verify-backup", &t.dest]);
        assert!(o.status.success(), "{}", text(&o));
        assert!(String::from_utf8_lossy(&o.stdout).contains("status        OK"));
        let m = BackupManifest::read(&t.dest).unwrap();
        assert!(m.seq >= previous_seq, "backups move forward");
        previous_seq = m.seq;
        let links = links_of(&t.dest);
        assert_eq!(links.len() as u64, m.links);
        // Every link acknowledged before the backup started is in it...
        for (code, url) in &acked[..t.before] {
            assert_eq!(links.get(code), Some(url), "{code} in {}", t.dest.display());
        }
        // ...and every link in it was acknowledged: none invented.
        for (code, url) in &links {
            assert_eq!(all.get(code.as_str()), Some(&url.as_str()), "{code}");
        }
        eprintln!(
            "backup {}: {} links (seq {}), {} acknowledged before it started, `uload backup` took {:?}",
            t.dest.display(),
            m.links,
            m.seq,
            t.before,
            t.took
        );
    }

    // Restore the last backup and serve it from a new edge.
    let last = taken.last().unwrap();
    let m = BackupManifest::read(&last.dest).unwrap();
    let restored = out.path().join("restored-data");
    let started = Instant::now();
    let o = uload(&[&"restore", &last.dest, &restored]);
    let restore_took = started.elapsed();
    assert!(o.status.success(), "{}", text(&o));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        stdout.contains("status        OK") && stdout.contains("took"),
        "{stdout}"
    );
    eprintln!("{}", stdout.trim_end());
    assert_eq!(links_of(&restored), links_of(&last.dest));
    // Restoring into a data dir that is not empty is refused.
    let o = uload(&[&"restore", &last.dest, &restored]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("not empty"),
        "{}",
        text(&o)
    );

    let edge_dir = tempfile::tempdir().unwrap();
    let edge = LoneEdge::start(edge_dir.path(), &restored);
    assert_eq!(edge.seq(), m.seq);
    for (code, url) in &acked[..last.before] {
        let r = get(edge.addr, &format!("/{code}"));
        assert_eq!(
            (r.status, r.header("location")),
            (302, Some(url.as_str())),
            "{code}"
        );
    }
    // The link created after the backup is not in the restored data dir,
    // nor served from it.
    assert!(!links_of(&restored).contains_key(after));
    assert_eq!(get(edge.addr, &format!("/{after}")).status, 404);
    wait_until(
        Duration::from_secs(30),
        "the link at the cluster's edge",
        || get(cluster.edge_addr, &format!("/{after}")).status == 302,
    );
    eprintln!(
        "figures: {} links acknowledged in all, backup of {} links at seq {}; restore {:?}; {} redirects checked on the restored edge",
        acked.len(),
        m.links,
        m.seq,
        restore_took,
        last.before
    );
}

/// A data dir with a snapshot and log segments after it.
fn small_data_dir(root: &Path) {
    let store = Store::open(
        root,
        LogOptions {
            segment_bytes: 2048,
        },
    )
    .unwrap();
    let put = |code: String| {
        LogOp::Put(Link::new(&code, &format!("https://example.com/{code}")).unwrap())
    };
    for i in 0..100 {
        store.append(&[put(format!("s{i}"))]).unwrap();
    }
    store.compact().unwrap();
    for i in 0..200 {
        store.append(&[put(format!("l{i}"))]).unwrap();
    }
}

/// Backs `data` up into `out/<name>` (copying the snapshot: these backups
/// are damaged on purpose, and a hard link would damage the data dir too).
fn backup_copy(data: &Path, out: &Path, name: &str) -> PathBuf {
    let dest = out.join(name);
    let o = uload(&[&"backup", &dest, &"--data-dir", &data, &"--no-link"]);
    assert!(o.status.success(), "{}", text(&o));
    let v = uload(&[&"verify-backup", &dest]);
    assert!(v.status.success(), "{}", text(&v));
    dest
}

/// verify-backup fails naming `wants`, and restore refuses, touching nothing.
fn assert_refused(backup: &Path, out: &Path, wants: &[&str]) {
    let o = uload(&[&"verify-backup", &backup]);
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    for want in wants {
        assert!(t.contains(want), "{want:?} not in\n{t}");
    }
    eprintln!("{}", String::from_utf8_lossy(&o.stdout).trim_end());
    let dest = out.join(format!(
        "restore-of-{}",
        backup.file_name().unwrap().to_string_lossy()
    ));
    let o = uload(&[&"restore", &backup, &dest]);
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    assert!(
        t.contains("refusing to restore") || t.contains("BACKUP"),
        "{t}"
    );
    assert!(
        !dest.exists() || std::fs::read_dir(&dest).unwrap().next().is_none(),
        "{}",
        dest.display()
    );
}

#[test]
fn damaged_backups_are_reported_and_not_restored() {
    let data = tempfile::tempdir().unwrap();
    small_data_dir(data.path());
    let out = tempfile::tempdir().unwrap();

    // A byte flipped in the middle of a log segment.
    let b = backup_copy(data.path(), out.path(), "flipped");
    let m = BackupManifest::read(&b).unwrap();
    let seg = m
        .files
        .iter()
        .find(|f| f.name.starts_with("log/") && f.len > 200)
        .unwrap();
    let path = b.join(&seg.name);
    let mut bytes = std::fs::read(&path).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x40;
    std::fs::write(&path, &bytes).unwrap();
    let file = seg.name.trim_start_matches("log/");
    assert_refused(&b, out.path(), &[file, "CRC32C", "corrupt at offset"]);

    // The snapshot cut short.
    let b = backup_copy(data.path(), out.path(), "truncated");
    let m = BackupManifest::read(&b).unwrap();
    let snap = m.snapshot.as_ref().unwrap();
    let path = b.join(&snap.file);
    let len = std::fs::metadata(&path).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(len - 100)
        .unwrap();
    let file = snap.file.trim_start_matches("snapshots/");
    assert_refused(
        &b,
        out.path(),
        &[file, "bytes, BACKUP says", "invalid snapshot"],
    );

    // BACKUP deleted: an incomplete backup.
    let b = backup_copy(data.path(), out.path(), "unsealed");
    std::fs::remove_file(b.join("BACKUP")).unwrap();
    assert_refused(&b, out.path(), &["BACKUP: missing", "incomplete"]);

    // An extra segment slipped in.
    let b = backup_copy(data.path(), out.path(), "extra");
    std::fs::write(b.join("log").join("99999999999999999999.log"), b"x").unwrap();
    assert_refused(&b, out.path(), &["not listed in BACKUP"]);

    // The source data dir was never touched by any of this.
    let o = uload(&[&"inspect", &"--data-dir", &data.path()]);
    assert!(o.status.success(), "{}", text(&o));

    // A backup into a directory that is not empty is refused.
    let o = uload(&[
        &"backup",
        &out.path().join("flipped"),
        &"--data-dir",
        &data.path(),
    ]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("not empty"),
        "{}",
        text(&o)
    );
}

#[test]
fn scheduled_backups_are_taken_and_old_ones_pruned() {
    let backups = tempfile::tempdir().unwrap();
    let dir = backups.path();
    // Leftovers: a complete backup and an incomplete one, both old, an
    // interrupted one, and a directory that is not a backup at all.
    let old_complete = dir.join(backup_dir_name(1_577_836_800_000, 0)); // 2020-01-01
    std::fs::create_dir(&old_complete).unwrap();
    let sealed = BackupManifest {
        created_ms: 1_577_836_800_000,
        snapshot: None,
        seq: 0,
        links: 0,
        files: Vec::new(),
    };
    std::fs::write(old_complete.join("BACKUP"), sealed.encode()).unwrap();
    let old_incomplete = dir.join(backup_dir_name(1_577_923_200_000, 5));
    std::fs::create_dir(&old_incomplete).unwrap();
    let partial = dir.join(".partial-20200103T000000Z");
    std::fs::create_dir(&partial).unwrap();
    let unrelated = dir.join("keep-me");
    std::fs::create_dir(&unrelated).unwrap();

    let cluster = Cluster::start_custom(
        "",
        "",
        &format!(
            "backup:\n  dir: {}\n  interval_secs: 1\n  keep_days: 7\n",
            dir.display()
        ),
    );
    let mut codes = Vec::new();
    for i in 0..50 {
        let code = format!("sched{i}");
        create(
            cluster.admin_addr,
            &code,
            &format!("https://example.com/s/{i}"),
        )
        .unwrap();
        codes.push(code);
    }
    // A backup taken after the 50 creates holds them all (sequence ≥ 50).
    let mut newest = None;
    wait_until(
        Duration::from_secs(60),
        "a scheduled backup at seq 50",
        || {
            newest = list_backups(dir)
                .unwrap()
                .into_iter()
                .rev()
                .find(|b| b.complete && b.seq >= 50);
            newest.is_some()
        },
    );
    let newest = newest.unwrap();
    wait_until(Duration::from_secs(30), "old backups pruned", || {
        !old_complete.exists() && !old_incomplete.exists() && !partial.exists()
    });
    assert!(unrelated.exists());
    let o = uload(&[&"verify-backup", &newest.path]);
    assert!(o.status.success(), "{}", text(&o));
    let links = links_of(&newest.path);
    for code in &codes {
        assert!(links.contains_key(code), "{code}");
    }
    let names: Vec<String> = list_backups(dir)
        .unwrap()
        .iter()
        .map(|b| b.path.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    eprintln!("scheduled backups: {names:?}");
    assert!(
        cluster
            .log("admin")
            .lines()
            .all(|l| !l.contains("backup failed")),
        "{}",
        cluster.log("admin")
    );
}

/// `uload restore` killed mid-copy (SIGXFSZ: a soft `RLIMIT_FSIZE` smaller
/// than the snapshot makes the kernel kill it while it writes that file, a
/// real crash at a known point) must not leave DEST as a data dir that loads
/// without the backup's links: either DEST loads as the whole backup, or it
/// is absent or empty (the restore visibly did nothing). Then a new restore
/// says what the crash left behind, and once that is deleted it succeeds.
#[test]
fn a_restore_killed_mid_copy_leaves_no_partial_data_dir() {
    let data = tempfile::tempdir().unwrap();
    small_data_dir(data.path());
    let out = tempfile::tempdir().unwrap();
    let b = backup_copy(data.path(), out.path(), "for-crash");
    let m = BackupManifest::read(&b).unwrap();
    let snap = m.snapshot.as_ref().unwrap();
    let snap_len = m.files.iter().find(|f| f.name == snap.file).unwrap().len;
    let limit = 4096;
    assert!(
        snap_len > limit,
        "the snapshot ({snap_len} bytes) must exceed the limit"
    );
    let dest = out.path().join("restored");
    let mut cmd = common::uload_command(out.path());
    cmd.arg("restore").arg(&b).arg(&dest).stdin(Stdio::null());
    // Killed by SIGXFSZ at the limit.
    common::limit_file_size(&mut cmd, limit, libc::SIG_DFL);
    let o = cmd.output().unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(o.status.signal(), Some(libc::SIGXFSZ), "{}", text(&o));
    let left: Vec<String> = std::fs::read_dir(&dest)
        .map(|d| {
            d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    if !left.is_empty() {
        match DataDir::new(&dest).load_view(true) {
            Err(e) => eprintln!("the interrupted restore is refused: {e}"),
            Ok(v) => assert_eq!(
                (v.seq(), v.len()),
                (m.seq, m.links),
                "an interrupted restore left {} ({left:?}) loading as a data dir without the backup's links",
                dest.display()
            ),
        }
    }
    // A new restore names what the crash left, then succeeds once it is gone.
    let o = uload(&[&"restore", &b, &dest]);
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    let staging = out.path().join(".restored.restore-partial");
    assert!(
        t.contains(&staging.display().to_string()) && t.contains("interrupted restore"),
        "{t}"
    );
    std::fs::remove_dir_all(&staging).unwrap();
    let o = uload(&[&"restore", &b, &dest]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(!staging.exists());
    let v = DataDir::new(&dest).load_view(true).unwrap();
    assert_eq!((v.seq(), v.len()), (m.seq, m.links));
}
