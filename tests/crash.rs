//! Crash test: a child process appends links from several threads (and
//! compacts now and then) and prints `ack <code>` after each append returns;
//! the parent SIGKILLs it at a random point, many times. After every kill,
//! reopening the store must give exactly a prefix of what each writer thread
//! wrote, every acknowledged link, contiguous sequences and no damaged record.
//!
//! The child is this same test binary, re-run with `ULOAD_CRASH_CHILD` set.

use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::mpsc::RecvTimeoutError;
use std::time::Duration;

use uload::store::{DataDir, LogOp, LogOptions, Store, record::Link};

const THREADS: usize = 4;
const ROUNDS: u64 = 40;
/// How long the parent waits for the child's next line before it calls the
/// child hung: a bound on a failure, never reached by a child that works.
const LINE_TIMEOUT: Duration = Duration::from_secs(60);

fn target(code: &str) -> String {
    format!("https://example.com/{code}/{}", code.len() * 7919)
}

/// The child: append until killed.
#[test]
fn crash_child_writer() {
    let Ok(dir) = std::env::var("ULOAD_CRASH_CHILD") else {
        return; // only meaningful when run by `appends_survive_sigkill`
    };
    let round: u64 = std::env::var("ULOAD_CRASH_ROUND").unwrap().parse().unwrap();
    let store = std::sync::Arc::new(
        Store::open(
            dir.as_ref(),
            LogOptions {
                segment_bytes: 16 * 1024,
            },
        )
        .unwrap(),
    );
    let stdout = std::sync::Arc::new(std::sync::Mutex::new(std::io::stdout()));
    let threads: Vec<_> = (0..THREADS)
        .map(|t| {
            let (store, stdout) = (store.clone(), stdout.clone());
            std::thread::spawn(move || {
                for i in 0u64.. {
                    let code = format!("r{round}t{t}n{i}");
                    let link = Link::new(&code, &target(&code)).unwrap();
                    store.append(&[LogOp::Put(link)]).unwrap();
                    let mut out = stdout.lock().unwrap();
                    writeln!(out, "ack {code}").unwrap();
                    out.flush().unwrap();
                    drop(out);
                    if t == 0 && i % 300 == 299 {
                        store.compact().unwrap();
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

/// Deterministic pseudo-random numbers (splitmix64), so a failure can be rerun.
fn next(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[test]
fn appends_survive_sigkill() {
    if std::env::var("ULOAD_CRASH_CHILD").is_ok() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut rng = 0x5eed_u64;
    let mut acked: HashSet<String> = HashSet::new();
    let mut total_kills = 0;
    for round in 0..ROUNDS {
        // Kill after a random number of acknowledgements; 0 kills during start-up/recovery.
        let kill_after = match next(&mut rng) % 4 {
            0 => 0,
            1 => next(&mut rng) % 20,
            _ => next(&mut rng) % 1500,
        };
        let mut child = Command::new(&exe)
            .args([
                "crash_child_writer",
                "--exact",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("ULOAD_CRASH_CHILD", dir.path())
            .env("ULOAD_CRASH_ROUND", round.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // The child's lines, read on a thread: a child that stops printing
        // (deadlocked) fails the test after LINE_TIMEOUT instead of hanging it.
        let (tx, lines) = std::sync::mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let next_line =
            |child: &mut std::process::Child, what: &str| match lines.recv_timeout(LINE_TIMEOUT) {
                Ok(line) => Some(line),
                Err(RecvTimeoutError::Disconnected) => None,
                Err(RecvTimeoutError::Timeout) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("round {round}: no line from the child for {LINE_TIMEOUT:?} {what}");
                }
            };
        let mut seen = 0;
        while seen < kill_after {
            // None: the child ended on its own, a failure caught below.
            let Some(line) = next_line(&mut child, "(it hangs)") else {
                break;
            };
            if let Some(code) = line.strip_prefix("ack ") {
                acked.insert(code.to_owned());
                seen += 1;
            }
        }
        child.kill().unwrap(); // SIGKILL
        total_kills += 1;
        // Acks printed before the kill are acknowledgements too.
        while let Some(line) = next_line(&mut child, "after SIGKILL (its stdout still open)") {
            if let Some(code) = line.strip_prefix("ack ") {
                acked.insert(code.to_owned());
            }
        }
        reader.join().unwrap();
        let status = child.wait().unwrap();
        assert!(
            status.code().is_none(),
            "round {round}: the child exited by itself: {status:?}"
        );
        check(dir.path(), &acked, round);
    }
    assert_eq!(total_kills, ROUNDS);
    eprintln!(
        "{ROUNDS} SIGKILLs, {} acknowledged links, all present",
        acked.len()
    );
}

fn check(dir: &std::path::Path, acked: &HashSet<String>, round: u64) {
    // Recovery (as the next writer would do it), then read back as a reader.
    let store = Store::open(
        dir,
        LogOptions {
            segment_bytes: 16 * 1024,
        },
    )
    .unwrap();
    drop(store);
    let view = DataDir::new(dir).load_view(true).unwrap();
    let mut per_writer: BTreeMap<(u64, u64), Vec<u64>> = BTreeMap::new();
    for link in view.iter() {
        let link = link.unwrap_or_else(|e| panic!("round {round}: damaged record: {e}"));
        let code = link.code_str();
        assert_eq!(
            link.target,
            target(code).as_bytes(),
            "round {round}: {code} has the wrong target"
        );
        let parse = || -> Option<(u64, u64, u64)> {
            let rest = code.strip_prefix('r')?;
            let (r, rest) = rest.split_once('t')?;
            let (t, n) = rest.split_once('n')?;
            Some((r.parse().ok()?, t.parse().ok()?, n.parse().ok()?))
        };
        let (r, t, n) = parse().unwrap_or_else(|| panic!("round {round}: unexpected code {code}"));
        per_writer.entry((r, t)).or_default().push(n);
    }
    for ((r, t), mut ns) in per_writer {
        ns.sort_unstable();
        let prefix: Vec<u64> = (0..ns.len() as u64).collect();
        assert_eq!(ns, prefix, "round {round}: writer r{r}t{t} is not a prefix");
    }
    for code in acked {
        assert!(
            view.get(code.as_bytes()).is_some(),
            "round {round}: acknowledged {code} is lost"
        );
    }
    // Sequences are contiguous: the view's sequence equals the number of
    // records ever written (every record here is a put of a new code).
    assert_eq!(
        view.seq(),
        view.len(),
        "round {round}: sequence gap or duplicate"
    );
}
