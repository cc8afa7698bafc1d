//! `scripts/deploy.sh` (graceful binary upgrade with rollback) under load,
//! and SIGTERM with requests in flight (issue 5).
//!
//! Every edge has its own temp dir with its pid file and upgrade socket, so
//! these tests run in parallel with each other and with the rest; processes
//! the script starts are SIGKILLed by pid when a test ends. Figures are
//! printed (`-- --nocapture`); `CHAOS_RUST_LOG=info` sets the edges' log level
//! (their logs are in the temp dir, shown when a test fails).

#[path = "common/chaos.rs"]
mod chaos;
mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use chaos::{
    Conn, EdgeSetup, FakeAdmin, FakeMode, Grace, IdleEnd, Load, Pids, Reply, alive, free_addr,
    import_links, signal,
};
use common::{get, request, wait_until};

const UPLOAD: &str = env!("CARGO_BIN_EXE_uload");

/// What a run of the script ended with.
struct Deploy {
    code: i32,
    /// The pid the script reports as serving (`pid=N`), if any.
    serving: Option<u32>,
    stderr: String,
    took: Duration,
}

/// Runs `scripts/deploy.sh` (bounded: killed after 120 s); every pid it
/// mentions goes into `pids`, to be SIGKILLed when the test ends.
fn deploy(setup: &EdgeSetup, new: &Path, health_timeout_s: u32, pids: &Pids) -> Deploy {
    deploy_env(setup, new, health_timeout_s, pids, &[])
}

/// [`deploy`] with extra environment variables for the script (the
/// operator's shell).
fn deploy_env(
    setup: &EdgeSetup,
    new: &Path,
    health_timeout_s: u32,
    pids: &Pids,
    envs: &[(&str, &str)],
) -> Deploy {
    let log = setup.path().join("deployed-edges.log");
    deploy_with(setup, new, health_timeout_s, pids, envs, Some(&log))
}

/// [`deploy_env`] with the script's `--log` (none: its default).
fn deploy_with(
    setup: &EdgeSetup,
    new: &Path,
    health_timeout_s: u32,
    pids: &Pids,
    envs: &[(&str, &str)],
    log: Option<&Path>,
) -> Deploy {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/deploy.sh");
    let start = Instant::now();
    let mut cmd = Command::new("bash");
    cmd.arg(&script)
        .arg("--pid-file")
        .arg(setup.path().join("edge.pid"))
        .arg("--new")
        .arg(new)
        .arg("--config")
        .arg(&setup.config)
        .arg("--health-timeout")
        .arg(health_timeout_s.to_string());
    if let Some(log) = log {
        cmd.arg("--log").arg(log);
    }
    let mut child = cmd
        .env("TMPDIR", setup.path())
        .envs(envs.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    // Read both pipes on threads so that the script never blocks on them.
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut out, &mut s).unwrap();
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut err, &mut s).unwrap();
        s
    });
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("deploy.sh (pid {pid}) ran for 120 s\n{}", setup.logs());
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let took = start.elapsed();
    let (stdout, stderr) = (out.join().unwrap(), err.join().unwrap());
    // "pid=N" and "pid N": the processes it started (and the old edge).
    let words: Vec<&str> = stdout
        .split_whitespace()
        .chain(stderr.split_whitespace())
        .collect();
    for (i, word) in words.iter().enumerate() {
        let number: Option<&str> = match word.strip_prefix("pid=") {
            Some(n) => Some(n),
            None if *word == "pid" => words.get(i + 1).copied(),
            None => None,
        };
        if let Some(p) = number.and_then(|n| n.trim_end_matches([',', ':', ')']).parse().ok()) {
            pids.add(p);
        }
    }
    let serving = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("pid="))
        .filter_map(|p| p.trim().parse().ok())
        .next_back();
    println!(
        "deploy.sh: exit {:?} after {took:.2?}\n{stderr}",
        status.code()
    );
    Deploy {
        code: status.code().unwrap_or(-1),
        serving,
        stderr,
        took,
    }
}

/// An edge with 50 imported links; its pid in the pid file the script reads.
fn running_edge(grace: Grace) -> (EdgeSetup, chaos::Proc, Load) {
    let setup = EdgeSetup::new(&[free_addr()], "", grace);
    let links = import_links(&setup, 50);
    let edge = setup.start_edge();
    std::fs::write(setup.path().join("edge.pid"), format!("{}\n", edge.id())).unwrap();
    // Stopped by each test; its count and time cap only bound a failed one.
    let load = Load::start(setup.addr, links, 2, 1_000_000, Duration::from_secs(300));
    load.wait_more(100, Duration::from_secs(30));
    (setup, edge, load)
}

/// A shell script standing in for a binary.
fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

fn pid_file(setup: &EdgeSetup) -> u32 {
    std::fs::read_to_string(setup.path().join("edge.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// Without `--log`, the new edge writes where the running one writes, here
/// a pipe (as under `uload edge 2>&1 | tee edge.log`, or any supervisor
/// that reads its output), and is started with every `ULOAD_*` variable
/// the running one had, digits in the name included. Its output used to go
/// to /dev/null whenever the running edge's stderr was not a regular file
/// (so under systemd, the journal), and `ULOAD_TLS_HTTP2` was dropped.
#[test]
fn deploy_keeps_the_running_edges_output_and_environment() {
    let pids = Pids::default();
    let setup = EdgeSetup::new(&[free_addr()], "", Grace::default());
    import_links(&setup, 5);
    let mut old = common::uload_command(setup.path())
        .arg("edge")
        .arg("--config")
        .arg(&setup.config)
        .env("ULOAD_TLS_HTTP2", "false")
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    pids.add(old.id());
    // Everything written to the pipe, by whichever process writes to it.
    let mut pipe = old.stderr.take().unwrap();
    let output = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let reader = {
        let output = output.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = std::io::Read::read(&mut pipe, &mut buf) {
                if n == 0 {
                    break;
                }
                output
                    .lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        })
    };
    let addr = setup.addr;
    wait_until(Duration::from_secs(60), "edge /health", || {
        request(addr, "GET", "/health", &[], b"").is_ok_and(|r| r.status == 200)
    });
    std::fs::write(setup.path().join("edge.pid"), format!("{}\n", old.id())).unwrap();
    let old_stderr = std::fs::read_link(format!("/proc/{}/fd/2", old.id())).unwrap();
    let loaded = "link table loaded";
    assert_eq!(output.lock().unwrap().matches(loaded).count(), 1);

    let d = deploy_with(&setup, Path::new(UPLOAD), 30, &pids, &[], None);
    assert_eq!(d.code, 0, "{}\n{}", d.stderr, setup.logs());
    let new = d.serving.expect("pid=N on stdout");
    assert_ne!(new, old.id());
    let environ = std::fs::read(format!("/proc/{new}/environ")).unwrap();
    assert!(
        environ
            .split(|&b| b == 0)
            .any(|v| v == b"ULOAD_TLS_HTTP2=false"),
        "{}",
        String::from_utf8_lossy(&environ)
    );
    assert_eq!(
        std::fs::read_link(format!("/proc/{new}/fd/2")).unwrap(),
        old_stderr,
        "the new edge's stderr"
    );
    // And its lines come out there (it logs its start at info, as
    // RUST_LOG, also taken over, says).
    wait_until(
        Duration::from_secs(30),
        "the new edge's lines on the pipe",
        || output.lock().unwrap().matches(loaded).count() >= 2,
    );
    // The reader ends when the last writer does (the new edge is
    // SIGKILLed with the test's other pids, at the end).
    drop(reader);
    wait_until(Duration::from_secs(60), "the old edge to exit", || {
        old.try_wait().unwrap().is_some()
    });
}

/// Without `--log`, when the running edge's stderr is a socket (as the
/// journal's is) and the script's own stderr is not the journal, the new
/// edge's output goes to /dev/null, and the script says so: giving it the
/// script's stderr would have an ssh session or a CI step that ran the
/// script held open for as long as the new edge runs.
#[test]
fn deploy_over_an_edge_logging_to_a_socket_says_where_the_output_goes() {
    let pids = Pids::default();
    let setup = EdgeSetup::new(&[free_addr()], "", Grace::default());
    import_links(&setup, 5);
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
    let mut old = common::uload_command(setup.path())
        .arg("edge")
        .arg("--config")
        .arg(&setup.config)
        .stdout(Stdio::null())
        .stderr(Stdio::from(std::os::fd::OwnedFd::from(theirs)))
        .spawn()
        .unwrap();
    pids.add(old.id());
    // Drained, so that the edge never blocks on it.
    std::thread::spawn(move || {
        let mut ours = ours;
        let mut buf = [0u8; 4096];
        while matches!(std::io::Read::read(&mut ours, &mut buf), Ok(n) if n > 0) {}
    });
    let addr = setup.addr;
    wait_until(Duration::from_secs(60), "edge /health", || {
        request(addr, "GET", "/health", &[], b"").is_ok_and(|r| r.status == 200)
    });
    std::fs::write(setup.path().join("edge.pid"), format!("{}\n", old.id())).unwrap();
    let d = deploy_with(
        &setup,
        Path::new(UPLOAD),
        30,
        &pids,
        &[("JOURNAL_STREAM", "")],
        None,
    );
    assert_eq!(d.code, 0, "{}\n{}", d.stderr, setup.logs());
    assert!(
        d.stderr.contains("cannot be reopened") && d.stderr.contains("--log FILE"),
        "{}",
        d.stderr
    );
    let new = d.serving.expect("pid=N on stdout");
    assert_eq!(
        std::fs::read_link(format!("/proc/{new}/fd/2")).unwrap(),
        Path::new("/dev/null")
    );
    wait_until(Duration::from_secs(60), "the old edge to exit", || {
        old.try_wait().unwrap().is_some()
    });
}

/// (a) The same binary deployed over itself under load: no request fails,
/// another process serves afterwards, the old one exits.
#[test]
fn deploy_of_a_good_binary_under_load() {
    let pids = Pids::default();
    let (setup, mut old, load) = running_edge(Grace::default());
    let old_pid = old.id();
    let d = deploy(&setup, Path::new(UPLOAD), 30, &pids);
    assert_eq!(d.code, 0, "{}\n{}", d.stderr, setup.logs());
    let new_pid = d.serving.expect("pid=N on stdout");
    assert_ne!(new_pid, old_pid);
    assert_eq!(pid_file(&setup), new_pid);
    // The old edge drains and exits by itself (Pingora: 5 s, then the grace periods).
    let exited = old.wait_exit(Duration::from_secs(30));
    assert!(exited.is_some(), "old edge still running\n{}", setup.logs());
    // Only the new one can answer now.
    load.wait_more(300, Duration::from_secs(30));
    let report = load.stop();
    println!(
        "good deploy: pid {old_pid} -> {new_pid} in {:.2?}; old exited with {exited:?}; {}",
        d.took,
        report.summary()
    );
    assert_eq!(report.failed, 0, "{:?}", report.failures);
    assert!(alive(new_pid), "new edge runs");
    assert_eq!(get(setup.addr, "/health").status, 200);
}

/// (b) A "binary" that cannot even check the config: refused before the
/// hand-over (exit 3); the running edge never stopped.
#[test]
fn deploy_of_a_binary_that_exits_at_once_changes_nothing() {
    let pids = Pids::default();
    let (setup, mut old, load) = running_edge(Grace::default());
    let bad = script(setup.path(), "exit1", "echo 'bad build' >&2; exit 1");
    let d = deploy(&setup, &bad, 10, &pids);
    assert_eq!(d.code, 3, "{}", d.stderr);
    load.wait_more(200, Duration::from_secs(30));
    let report = load.stop();
    println!(
        "deploy of exit-1 binary: exit {}; {}",
        d.code,
        report.summary()
    );
    assert_eq!(report.failed, 0, "{:?}", report.failures);
    assert!(
        old.wait_exit(Duration::ZERO).is_none(),
        "old edge untouched"
    );
    assert_eq!(pid_file(&setup), old.id());
}

/// (b) A binary that passes the pre-flight check but exits right after
/// taking the sockets over: rolled back to the old binary (exit 2), no
/// request fails, the edge still serves.
#[test]
fn deploy_of_a_binary_that_dies_at_start_rolls_back() {
    deploy_rolls_back("dies-at-start", 10, "", |_| {
        format!(
            "case \"$1\" in check-config) exec {UPLOAD} \"$@\";; esac\necho 'new build: crashing' >&2\nexit 1"
        )
    });
}

/// A binary that passes the pre-flight but cannot be started once the old
/// edge has handed its sockets over (here it takes its own execute bit away
/// after its `check-config`; in life, a file replaced or made unreadable in
/// between): rolled back, exit 2, no request fails. The script used to end
/// there under `set -e` with exit 1, "nothing changed", while the old edge
/// drained away and nothing served.
#[test]
fn deploy_of_a_binary_that_cannot_be_started_rolls_back() {
    deploy_rolls_back("unstartable", 10, "could not start the new edge", |_| {
        format!(
            "case \"$1\" in check-config) {UPLOAD} \"$@\"; rc=$?; chmod 000 \"$0\"; exit $rc;; esac\nexit 1"
        )
    });
}

/// (b) A binary that starts and takes the sockets but listens elsewhere
/// (its config says so: the inherited socket is closed as unclaimed):
/// rolled back as soon as the script sees the socket gone (exit 2), no
/// request fails.
#[test]
fn deploy_of_a_binary_that_listens_elsewhere_rolls_back() {
    let elsewhere = free_addr();
    deploy_rolls_back(
        "listens-elsewhere",
        30,
        "closed the socket listening",
        |_| {
            format!(
                "case \"$1\" in check-config) exec {UPLOAD} \"$@\";; esac\nULOAD_EDGE_LISTEN={elsewhere} exec {UPLOAD} \"$@\""
            )
        },
    );
}

/// (b) A "binary" that takes the sockets and then hangs, never accepting
/// (a Python stand-in speaking Pingora's hand-over protocol): no /health
/// answer from it, rolled back after the health timeout (exit 2); no request
/// fails (they wait in the accept queue meanwhile).
#[test]
fn deploy_of_a_binary_that_hangs_rolls_back() {
    deploy_rolls_back("hangs", 4, "not healthy: timeout", |setup| {
        takes_the_sockets_then(setup, "time.sleep(60)")
    });
}

/// (b) A "binary" that takes the sockets, closes them at once and listens
/// on another port (what Pingora does with inherited sockets no service
/// claims, here before the health check can have seen them held): known
/// for what it is from the sockets it holds, not waited on until the
/// health timeout.
#[test]
fn deploy_of_a_binary_that_drops_the_sockets_at_once_rolls_back() {
    deploy_rolls_back(
        "drops-sockets",
        30,
        "closed the socket listening",
        |setup| {
            takes_the_sockets_then(
                setup,
                "for fd in fds: os.close(fd)\n\
             other = socket.socket()\n\
             other.bind((\"127.0.0.1\", 0))\n\
             other.listen(8)\n\
             time.sleep(60)",
            )
        },
    );
}

/// A script for a new binary that passes `check-config` and otherwise is a
/// Python stand-in receiving the sockets as Pingora's `-u` does, then runs
/// `then` (Python lines, `fds` holding the sockets' numbers).
fn takes_the_sockets_then(setup: &EdgeSetup, then: &str) -> String {
    format!(
        "case \"$1\" in check-config) exec {UPLOAD} \"$@\";; esac\n\
         exec python3 -c '\n\
import os, socket, sys, time\n\
path = sys.argv[1]\n\
if os.path.exists(path): os.unlink(path)\n\
s = socket.socket(socket.AF_UNIX)\n\
s.bind(path)\n\
s.listen(1)\n\
s.settimeout(30)\n\
c, _ = s.accept()\n\
msg, fds, _, _ = socket.recv_fds(c, 4096, 64)\n\
os.unlink(path)\n\
{then}\n\
' {}",
        setup.upgrade_sock().display()
    )
}

/// A script standing in for a new binary (`body`, written for the setup)
/// deployed over an edge under load: rolled back to the old binary (exit
/// 2, the script's messages saying `says`), no request fails.
fn deploy_rolls_back(
    name: &str,
    health_timeout_s: u32,
    says: &str,
    body: impl FnOnce(&EdgeSetup) -> String,
) {
    let pids = Pids::default();
    let (setup, mut old, load) = running_edge(Grace::default());
    let bad = script(setup.path(), name, &body(&setup));
    let d = deploy(&setup, &bad, health_timeout_s, &pids);
    assert_eq!(d.code, 2, "{}\n{}", d.stderr, setup.logs());
    assert!(d.stderr.contains(says), "{}", d.stderr);
    let back = d.serving.expect("pid=N on stdout");
    assert_rolled_back(&setup, &mut old, back, load, name, &d);
}

fn assert_rolled_back(
    setup: &EdgeSetup,
    old: &mut chaos::Proc,
    back: u32,
    load: Load,
    label: &str,
    d: &Deploy,
) {
    let old_pid = old.id();
    assert_ne!(back, old_pid);
    assert_eq!(pid_file(setup), back);
    assert!(
        old.wait_exit(Duration::from_secs(30)).is_some(),
        "old edge drained"
    );
    load.wait_more(300, Duration::from_secs(30));
    let report = load.stop();
    println!(
        "{label}: rolled back in {:.2?}: pid {old_pid} -> old binary again as pid {back}; {}",
        d.took,
        report.summary()
    );
    assert_eq!(report.failed, 0, "{label}: {:?}", report.failures);
    assert!(alive(back), "{label}: rolled-back edge runs");
    let exe = std::fs::read_link(format!("/proc/{back}/exe")).unwrap();
    println!("{label}: pid {back} runs {}", exe.display());
}

/// (c) SIGTERM with keep-alive connections open and requests in flight
/// (proxied to an admin that answers late, and one whose head is only half
/// sent): every request in flight gets its whole response, idle kept-alive
/// connections are closed cleanly (never mid-response), and the process
/// exits by itself after its grace period and shutdown timeout. How long
/// after the signal it exited is printed; the bound asserted, counted from
/// the signal, is a generous "did not hang" one (no timed assertions).
#[test]
fn sigterm_finishes_requests_in_flight_then_exits() {
    const SLOW: usize = 6;
    const IDLE: usize = 8;
    let grace = Grace {
        grace_period_seconds: 2,
        graceful_shutdown_timeout_seconds: 1,
    };
    let admin_delay = Duration::from_millis(800);
    let fake = FakeAdmin::start(FakeMode::Slow(admin_delay), true);
    let setup = EdgeSetup::new(&[fake.addr], "  admin_read_timeout_ms: 5000\n", grace);
    let links = import_links(&setup, 10);
    let mut edge = setup.start_edge();
    let (path, _, location) = links[0].clone();

    // Kept-alive connections, each after one answered request.
    let mut idle: Vec<Conn> = (0..IDLE)
        .map(|_| {
            let mut c = Conn::open(setup.addr).unwrap();
            c.send(&Conn::head("GET", &path, &[], b"")).unwrap();
            match c.read_answer(false) {
                Reply::Whole(r) => assert_eq!(r.status, 302),
                other => panic!("{other:?}"),
            }
            c
        })
        .collect();
    // Requests the admin answers 800 ms late, each on a kept-alive
    // connection that has already served a redirect; after the answer, how
    // the connection ends.
    let slow: Vec<_> = (0..SLOW)
        .map(|i| {
            let (addr, path) = (setup.addr, path.clone());
            std::thread::spawn(move || {
                let mut c = Conn::open(addr).unwrap();
                c.send(&Conn::head("GET", &path, &[], b"")).unwrap();
                match c.read_answer(false) {
                    Reply::Whole(r) => assert_eq!(r.status, 302),
                    other => panic!("{other:?}"),
                }
                c.send(&Conn::head("GET", &format!("/api/slow{i}"), &[], b""))
                    .unwrap();
                let t = Instant::now();
                let answer = c.read_answer(false);
                let took = t.elapsed();
                (answer, took, c.idle_end(Duration::from_secs(3)))
            })
        })
        .collect();
    // A request whose head is half sent: not in flight yet for Pingora,
    // which drops connections still reading a request head at shutdown.
    let mut half = Conn::open(setup.addr).unwrap();
    let head = Conn::head("GET", &path, &[], b"");
    half.send(&head[..head.len() - 2]).unwrap();
    wait_until(
        Duration::from_secs(20),
        "slow requests at the admin",
        || fake.requests.load(Ordering::Relaxed) >= SLOW as u64,
    );

    let pid = edge.id();
    // Waits for the edge's exit from the signal on, while the requests are
    // read below: the time it exited, not the time the test looked.
    let limit = Duration::from_secs(
        grace.grace_period_seconds + grace.graceful_shutdown_timeout_seconds + 30,
    );
    let t0 = Instant::now();
    signal(pid, "TERM");
    let exit = std::thread::spawn(move || {
        let status = edge.wait_exit(limit.saturating_sub(t0.elapsed()));
        (status, t0.elapsed())
    });
    // New clients are refused while the edge drains (its listening socket
    // closed), not left in its queue until it exits: polled until a connect
    // is refused, which must come while the edge still runs.
    let refused = loop {
        match std::net::TcpStream::connect(setup.addr) {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => break alive(pid),
            Err(e) => panic!("a new connection after SIGTERM: {e}"),
            Ok(_) if !alive(pid) => break false,
            Ok(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    };
    assert!(
        refused,
        "no connection was refused before the edge exited: its listener stayed open"
    );
    // The half-sent request completes after the signal.
    half.send(b"\r\n").unwrap();
    let half_answer = half.read_answer(false);
    let slow_answers: Vec<(Reply, Duration, IdleEnd)> =
        slow.into_iter().map(|t| t.join().unwrap()).collect();
    // Idle kept-alive connections: closed by the edge, or still usable.
    // (A request sent on one just as the edge closes it meets a reset, as
    // with any keep-alive timeout; clients retry those. Not tested here.)
    let idle_answers: Vec<String> = idle
        .iter_mut()
        .map(|c| match c.idle_end(Duration::from_secs(3)) {
            IdleEnd::Closed => "closed".to_owned(),
            IdleEnd::Open => match c.send(&Conn::head("GET", &path, &[], b"")) {
                Ok(()) => match c.read_answer(false) {
                    Reply::Whole(r) if r.status == 302 => "open, then 302".to_owned(),
                    Reply::ClosedBeforeAnswer => "open, then closed".to_owned(),
                    other => panic!("a kept-alive connection after SIGTERM: {other:?}"),
                },
                Err(e) => format!("open, then write failed: {e}"),
            },
            other => panic!("an idle kept-alive connection at SIGTERM: {other:?}"),
        })
        .collect();
    let new_conn = request(setup.addr, "GET", &path, &[], b"").map(|r| r.status);
    let (status, exited_after) = exit.join().unwrap();

    println!(
        "SIGTERM: exited {status:?} {exited_after:.2?} after the signal (grace {} s + shutdown timeout {} s); \
         half-sent request: {}; {SLOW} proxied requests in flight: {:?}; {IDLE} idle kept-alive connections, \
         after the signal: {idle_answers:?}; a new connection after SIGTERM: {new_conn:?}",
        grace.grace_period_seconds,
        grace.graceful_shutdown_timeout_seconds,
        match &half_answer {
            Reply::Whole(r) => format!("{} {:?}", r.status, r.header("location")),
            other => format!("{other:?}"),
        },
        slow_answers
            .iter()
            .map(|(a, t, end)| match a {
                Reply::Whole(r) => format!(
                    "{} {} in {t:.2?}, then {end:?}",
                    r.status,
                    String::from_utf8_lossy(&r.body)
                ),
                other => format!("{other:?}"),
            })
            .collect::<Vec<_>>(),
    );
    for (a, _, end) in &slow_answers {
        match a {
            Reply::Whole(r) => {
                assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
                assert_eq!(r.body, b"{}");
            }
            other => panic!("a proxied request in flight at SIGTERM: {other:?}"),
        }
        assert!(
            matches!(end, IdleEnd::Closed | IdleEnd::Open),
            "after the answer: {end:?}"
        );
    }
    // Answered whole, or closed before any byte of an answer: never cut.
    match &half_answer {
        Reply::Whole(r) => {
            assert_eq!(
                (r.status, r.header("location")),
                (302, Some(location.as_str()))
            )
        }
        Reply::ClosedBeforeAnswer | Reply::ResetBeforeAnswer(_) => {}
        Reply::Broken(e) => panic!("the half-sent request: {e}"),
    }
    assert!(
        status.is_some(),
        "still running {limit:?} after SIGTERM\n{}",
        setup.logs()
    );
}

// ---------------------------------------------------------------------------
// Found by review (each failed before its fix).

/// An edge with `n` links, not under load, its pid in the pid file; and the
/// path of one of its links.
fn quiet_edge(n: usize) -> (EdgeSetup, chaos::Proc, String) {
    let setup = EdgeSetup::new(&[free_addr()], "", Grace::default());
    let links = import_links(&setup, n);
    let edge = setup.start_edge();
    std::fs::write(setup.path().join("edge.pid"), format!("{}\n", edge.id())).unwrap();
    (setup, edge, links[0].0.clone())
}

/// deploy.sh gives the new edge the running edge's ULOAD_* and RUST_LOG
/// environment variables, and only those: it used to spawn it with the
/// caller's environment plus those, so a ULOAD_DATA_DIR exported in the
/// operator's shell (and not set on the running edge) made the new edge
/// serve another data dir, with /health at 200: the deploy "succeeded" and
/// every link answered 404.
#[test]
fn deploy_does_not_leak_the_callers_uload_env_into_the_new_edge() {
    let pids = Pids::default();
    let (setup, mut old, path) = quiet_edge(10);
    assert_eq!(get(setup.addr, &path).status, 302);
    let elsewhere = setup.path().join("some-other-data-dir");
    std::fs::create_dir(&elsewhere).unwrap();
    let d = deploy_env(
        &setup,
        Path::new(UPLOAD),
        30,
        &pids,
        &[("ULOAD_DATA_DIR", elsewhere.to_str().unwrap())],
    );
    assert_eq!(d.code, 0, "{}\n{}", d.stderr, setup.logs());
    old.wait_exit(Duration::from_secs(30));
    let status = get(setup.addr, &path).status;
    assert_eq!(
        status, 302,
        "after deploy.sh exit 0, {path} answers {status}: the new edge read the caller's ULOAD_DATA_DIR"
    );
}

/// A config change the old binary refuses (a key only the new release
/// knows) is refused by the pre-flight, which checks the config with the
/// old binary too (exit 3, nothing changed): before, the new binary's
/// check passed, and when the new binary then failed, the rollback started
/// the old binary on that config, it exited at once, and deploy.sh ended
/// with exit 4 and no edge at all.
#[test]
fn a_config_the_old_binary_refuses_is_refused_before_anything_changes() {
    let pids = Pids::default();
    let (setup, old, path) = quiet_edge(10);
    // The new release's config: one key the running (old) binary rejects.
    let mut conf = std::fs::read_to_string(&setup.config).unwrap();
    conf.push_str("  a_key_of_the_new_release: 1\n");
    std::fs::write(&setup.config, conf).unwrap();
    assert!(
        !common::uload_command(setup.path())
            .args(["check-config"])
            .arg(&setup.config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap()
            .success(),
        "the old binary refuses the new config"
    );
    // The new release accepts its config, and crashes after taking the sockets.
    let bad = script(
        setup.path(),
        "new-release",
        "case \"$1\" in check-config) echo ok; exit 0;; esac\necho 'new build: crashing' >&2\nexit 1",
    );
    let d = deploy(&setup, &bad, 10, &pids);
    let served = request(setup.addr, "GET", &path, &[], b"").map(|r| r.status);
    assert_eq!(
        (d.code, served.as_ref().ok().copied(), d.serving),
        (3, Some(302), None),
        "deploy.sh exit {} (3: refused, nothing changed), then {path}: {served:?}\n{}",
        d.code,
        d.stderr
    );
    assert!(d.stderr.contains("pre-flight failed"), "{}", d.stderr);
    assert!(chaos::alive(old.id()), "the running edge was left alone");
}

/// Run as root: an edge running as user 65534 on 10 imported links (its
/// temp dir, state dir included, chowned to that user), from a copy of the
/// build in that dir when `own_copy` (else from the build itself), its pid
/// in the pid file; and one link's path. `None`, the skip recorded for
/// `test` (see [`common::skip`]), where the test cannot run: not root, or
/// no `setpriv`, or a binary user 65534 cannot run (a clone under /root).
fn nobody_edge(test: &str, own_copy: bool) -> Option<(EdgeSetup, chaos::Proc, String)> {
    let root = std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"));
    if !root {
        common::skip(test, "needs root");
        return None;
    }
    let as_nobody = || {
        let mut cmd = Command::new("setpriv");
        cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups"]);
        cmd
    };
    let nobody_runs_it = as_nobody()
        .args([UPLOAD, "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !nobody_runs_it {
        common::skip(test, "needs setpriv and a uload binary user 65534 can run");
        return None;
    }
    let setup = EdgeSetup::new(&[free_addr()], "", Grace::default());
    let links = import_links(&setup, 10);
    std::fs::create_dir_all(setup.path().join("state")).unwrap();
    let binary = if own_copy {
        let copy = setup.path().join("uload");
        std::fs::copy(UPLOAD, &copy).unwrap();
        copy
    } else {
        PathBuf::from(UPLOAD)
    };
    let chown = Command::new("chown")
        .args(["-R", "65534:65534"])
        .arg(setup.path())
        .status()
        .unwrap();
    assert!(chown.success());
    let log = setup.new_log("edge");
    let mut cmd = as_nobody();
    common::test_env(&mut cmd, setup.path());
    let old = chaos::Proc(Some(
        cmd.arg(&binary)
            .args(["edge", "--config"])
            .arg(&setup.config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    ));
    let path = links[0].0.clone();
    wait_until(Duration::from_secs(60), "edge as nobody answers", || {
        request(setup.addr, "GET", &path, &[], b"").is_ok_and(|r| r.status == 302)
    });
    std::fs::write(setup.path().join("edge.pid"), format!("{}\n", old.id())).unwrap();
    Some((setup, old, path))
}

/// Once the old edge has gone: what `path` gets now (a status, or `None`
/// when nothing answers).
fn served_after(setup: &EdgeSetup, old: &mut chaos::Proc, path: &str) -> Option<u16> {
    old.wait_exit(Duration::from_secs(30));
    request(setup.addr, "GET", path, &[], b"")
        .ok()
        .map(|r| r.status)
}

/// deploy.sh run as root against an edge running as another user (nobody):
/// the new edge runs as that user, and the hand-over works. The keeper's
/// upgrade socket was root's with mode 0600, so the old edge could not
/// connect to hand its sockets over, exited after SIGQUIT anyway, and
/// nothing served (exit 4); and a new edge would have run as root. Needs
/// root (and `setpriv`); otherwise records a skip (see [`common::skip`]).
#[test]
fn deploy_as_root_of_an_edge_running_as_another_user() {
    let Some((setup, mut old, path)) =
        nobody_edge("deploy_as_root_of_an_edge_running_as_another_user", false)
    else {
        return;
    };
    let pids = Pids::default();
    let d = deploy(&setup, Path::new(UPLOAD), 30, &pids);
    let served = served_after(&setup, &mut old, &path);
    let uid = d.serving.and_then(|p| {
        std::fs::read_to_string(format!("/proc/{p}/status"))
            .ok()?
            .lines()
            .find(|l| l.starts_with("Uid:"))
            .map(|l| l.split_whitespace().nth(1).unwrap_or("").to_owned())
    });
    assert_eq!(
        (d.code, served, uid.as_deref()),
        (0, Some(302), Some("65534")),
        "deploy.sh as root: exit {}, then {path}: {served:?}, serving uid {uid:?}\n{}",
        d.code,
        d.stderr
    );
}

/// Run as root, for an edge whose binary file was replaced since it
/// started (an `install` of the new release over it: the rollback then runs
/// a copy of /proc/PID/exe made in the script's state dir), and a new
/// release that dies after the hand-over: the rollback must start the old
/// binary as the edge's user. It used to run it from the script's `mktemp
/// -d` (root's, mode 0700), which that user cannot enter: exit 1, nothing
/// served (found by review).
#[test]
fn deploy_as_root_can_roll_back_to_a_replaced_binary() {
    let Some((setup, mut old, path)) =
        nobody_edge("deploy_as_root_can_roll_back_to_a_replaced_binary", true)
    else {
        return;
    };
    let pids = Pids::default();
    let tmp = setup.path().join("uload.new");
    std::fs::copy(UPLOAD, &tmp).unwrap();
    std::fs::rename(&tmp, setup.path().join("uload")).unwrap();
    let bad = script(
        setup.path(),
        "dies-at-start",
        &format!(
            "case \"$1\" in check-config) exec {UPLOAD} \"$@\";; esac\necho 'new build: crashing' >&2\nexit 1"
        ),
    );
    let d = deploy(&setup, &bad, 10, &pids);
    let served = served_after(&setup, &mut old, &path);
    assert_eq!(
        (d.code, served),
        (2, Some(302)),
        "deploy.sh as root: exit {} (2: rolled back), then {path}: {served:?}\n{}\n{}",
        d.code,
        d.stderr,
        setup.logs()
    );
}

/// Run as root: a config the edge's user cannot read (rewritten by root
/// with mode 0600) must fail the pre-flight, which runs as that user: exit
/// 3, nothing changed. It ran as root and passed; then the new edge and the
/// rolled-back one both failed to start: exit 4, nothing served (found by
/// review).
#[test]
fn deploy_as_root_preflight_checks_what_the_edge_user_can_read() {
    let Some((setup, old, path)) = nobody_edge(
        "deploy_as_root_preflight_checks_what_the_edge_user_can_read",
        false,
    ) else {
        return;
    };
    let pids = Pids::default();
    let text = std::fs::read(&setup.config).unwrap();
    std::fs::remove_file(&setup.config).unwrap();
    std::fs::write(&setup.config, text).unwrap();
    std::fs::set_permissions(&setup.config, std::fs::Permissions::from_mode(0o600)).unwrap();
    let d = deploy(&setup, Path::new(UPLOAD), 10, &pids);
    assert_refused_by_the_preflight(&setup, old, &path, &d);
}

/// Exit 3 and nothing changed: the old edge still runs and serves `path`.
fn assert_refused_by_the_preflight(
    setup: &EdgeSetup,
    mut old: chaos::Proc,
    path: &str,
    d: &Deploy,
) {
    let served = request(setup.addr, "GET", path, &[], b"")
        .ok()
        .map(|r| r.status);
    assert_eq!(
        (d.code, served, alive(old.id())),
        (3, Some(302), true),
        "deploy.sh as root: exit {} (3: pre-flight refused), then {path}: {served:?}\n{}\n{}",
        d.code,
        d.stderr,
        setup.logs()
    );
    old.kill();
}

/// Run as root with `--new` a binary the edge's user cannot run (in a
/// directory only root may enter, such as a build under /root): refused by
/// the pre-flight, which runs as that user (exit 3). It passed as root, the
/// old edge handed its sockets over, then the start as that user failed
/// and ended the script under `set -e` with exit 1 and no rollback: nothing
/// served (found by review).
#[test]
fn deploy_as_root_of_a_new_binary_the_edge_user_cannot_run() {
    let Some((setup, old, path)) = nobody_edge(
        "deploy_as_root_of_a_new_binary_the_edge_user_cannot_run",
        false,
    ) else {
        return;
    };
    let pids = Pids::default();
    let private = setup.path().join("root-only");
    std::fs::create_dir(&private).unwrap();
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).unwrap();
    let new = private.join("uload");
    std::fs::copy(UPLOAD, &new).unwrap();
    let d = deploy(&setup, &new, 10, &pids);
    assert_refused_by_the_preflight(&setup, old, &path, &d);
}

/// An edge whose Pingora conf comes from `ULOAD_EDGE_PINGORA_CONF` (every
/// key can come from the environment): deploy.sh must take the upgrade
/// socket and grace periods from that conf, as it takes the listen address
/// from the edge's environment. It took them from the conf the config file
/// names: the edge sent its sockets to its own `upgrade_sock`, where no
/// keeper listened, exit 4, and the old edge drained away with nothing
/// after it (found by review).
#[test]
fn deploy_of_an_edge_whose_pingora_conf_comes_from_the_environment() {
    let pids = Pids::default();
    let setup = EdgeSetup::new(&[free_addr()], "", Grace::default());
    let links = import_links(&setup, 10);
    let path = links[0].0.clone();
    // The file names pingora.yaml (upgrade.sock); the running edge was
    // started with another conf, its own upgrade socket.
    let env_conf = setup.path().join("pingora-env.yaml");
    std::fs::write(
        &env_conf,
        format!(
            "---\nversion: 1\nthreads: 2\nupgrade_sock: {}/env-upgrade.sock\n\
             grace_period_seconds: 1\ngraceful_shutdown_timeout_seconds: 1\n",
            setup.path().display()
        ),
    )
    .unwrap();
    let mut old = chaos::Proc(Some(
        common::uload_command(setup.path())
            .arg("edge")
            .arg("--config")
            .arg(&setup.config)
            .env("ULOAD_EDGE_PINGORA_CONF", &env_conf)
            .stdout(Stdio::null())
            .stderr(setup.new_log("edge"))
            .spawn()
            .unwrap(),
    ));
    wait_until(Duration::from_secs(60), "the edge's /health", || {
        request(setup.addr, "GET", "/health", &[], b"").is_ok_and(|r| r.status == 200)
    });
    std::fs::write(setup.path().join("edge.pid"), format!("{}\n", old.id())).unwrap();
    assert_eq!(get(setup.addr, &path).status, 302);
    let d = deploy(&setup, Path::new(UPLOAD), 30, &pids);
    let served = served_after(&setup, &mut old, &path);
    assert_eq!(
        (d.code, served),
        (0, Some(302)),
        "deploy.sh exit {}, then {path}: {served:?}\n{}\n{}",
        d.code,
        d.stderr,
        setup.logs()
    );
}
