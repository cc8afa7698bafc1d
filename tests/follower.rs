//! The edge's log follower against the failures a review found it did not
//! survive: a reload owed after the log was cut back, a manifest or
//! snapshot that could not be read for a moment, and a reader left to drop
//! (and unmap) a replaced snapshot. Polls are driven by hand, so nothing
//! here depends on timing.

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use uload::store::log::{InjectedFault, list_segments};
use uload::store::{LogFollower, LogOp, LogOptions, Store, record::Link};

/// One test at a time: `out_of_fds` lowers the whole process's limit.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

fn put(code: &str) -> LogOp {
    LogOp::Put(Link::new(code, &format!("https://example.com/{code}")).unwrap())
}

/// Runs `f` with a soft `RLIMIT_NOFILE` of 3, below every descriptor the
/// follower holds: each open fails with EMFILE, as on a busy edge out of
/// descriptors for a moment.
fn out_of_fds<T>(f: impl FnOnce() -> T) -> T {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit on a live, initialised struct.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, 0);
    let saved = lim;
    lim.rlim_cur = 3;
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) }, 0);
    let out = f();
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &saved) }, 0);
    out
}

/// A data dir with a1..a3, and a follower that polled once from inside the
/// fsync of the batch "xx", whose fsync then failed: the follower serves
/// "xx", which the writer cut off the log.
fn follower_saw_a_failed_batch(
    opts: LogOptions,
) -> (tempfile::TempDir, Store, Arc<Mutex<LogFollower>>) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), opts).unwrap();
    for c in ["a1", "a2", "a3"] {
        store.append(&[put(c)]).unwrap();
    }
    let follower = Arc::new(Mutex::new(LogFollower::open(dir.path()).unwrap()));
    follower.lock().unwrap().poll_once();
    let (inner, armed) = (follower.clone(), AtomicBool::new(true));
    store.log().observe_fsync(move |_| {
        if armed.swap(false, Relaxed) {
            inner.lock().unwrap().poll_once();
        }
    });
    store
        .log()
        .inject_fault(InjectedFault::SyncFails { errno: libc::EIO });
    assert!(store.append(&[put("xx")]).is_err());
    assert!(follower.lock().unwrap().table().load().get(b"xx").is_some());
    (dir, store, follower)
}

/// The tail reports a cut-back once; a reload that failed then (EMFILE)
/// stayed undone: the cut-off "xx" served, the acknowledged "okay" never,
/// later records applied on top and `/health` fine. The reload is now
/// retried at every poll, and nothing is applied to the stale view meanwhile.
#[test]
fn a_reload_after_a_cut_back_that_failed_is_retried() {
    let _s = serial();
    let (_dir, store, follower) = follower_saw_a_failed_batch(LogOptions::default());
    assert_eq!(store.append(&[put("okay")]).unwrap(), 4);
    let mut f = follower.lock().unwrap();
    out_of_fds(|| f.poll_once()); // the cut-back seen; its reload fails
    assert!(
        f.stats().stuck_since_ms.load(Relaxed) > 0,
        "stuck while owed"
    );
    f.poll_once();
    assert_eq!(store.append(&[put("a5")]).unwrap(), 5);
    f.poll_once();
    let view = f.table().load();
    assert!(view.get(b"a5").is_some());
    assert!(
        view.get(b"okay").is_some(),
        "acknowledged link never served"
    );
    assert!(view.get(b"xx").is_none(), "a link cut off the log served");
    assert_eq!(f.stats().stuck_since_ms.load(Relaxed), 0);
}

/// The refused batch is replaced by an acknowledged one of the same length,
/// so the file's length never changes under the follower; the next batch
/// goes to a new segment. Before, the tail moved on to it without checking
/// the last frame it had read again: it kept serving the refused "xx" and
/// never served the acknowledged "ok".
#[test]
fn cut_back_batch_replaced_by_equal_length_one_is_never_noticed() {
    let _s = serial();
    // 3 frames: 191 bytes, 4: 244; so the batch after "ok" rolls over.
    let (dir, store, f) = follower_saw_a_failed_batch(LogOptions { segment_bytes: 200 });
    assert_eq!(store.append(&[put("ok")]).unwrap(), 4); // acknowledged, same length as xx
    assert_eq!(store.append(&[put("o2")]).unwrap(), 5);
    assert_eq!(list_segments(&dir.path().join("log")).unwrap().len(), 2);
    for _ in 0..10 {
        f.lock().unwrap().poll_once();
    }
    let f = f.lock().unwrap();
    let view = f.table().load();
    assert!(view.get(b"o2").is_some());
    assert!(view.get(b"ok").is_some(), "acknowledged link never served");
    assert!(view.get(b"xx").is_none(), "refused link served");
    assert_eq!(
        f.stats().files_refused.load(Relaxed),
        1,
        "the cut-back, once"
    );
}

/// A follower that has seen a1 and a2, then a3 appended and compacted into
/// a snapshot at 3 that it has not yet loaded.
fn compacted_behind_a_follower() -> (tempfile::TempDir, Store, LogFollower) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), LogOptions::default()).unwrap();
    store.append(&[put("a1"), put("a2")]).unwrap();
    let mut f = LogFollower::open(dir.path()).unwrap();
    f.poll_once();
    store.append(&[put("a3")]).unwrap();
    store.compact().unwrap();
    (dir, store, f)
}

/// A manifest the follower could not read for a moment (EMFILE) was never
/// read again (its stat was kept), so the new snapshot was never loaded and
/// the overlay never trimmed, until the next compaction.
#[test]
fn a_manifest_that_could_not_be_read_is_read_again() {
    let _s = serial();
    let (_dir, _store, mut f) = compacted_behind_a_follower();
    out_of_fds(|| f.poll_once());
    f.poll_once();
    let view = f.table().load();
    assert_eq!(view.seq(), 3);
    assert_eq!(
        view.snapshot_seq(),
        3,
        "overlay of {} never trimmed",
        view.overlay_len()
    );
}

/// The same for a snapshot the manifest names that could not be opened for
/// a moment (here: not there while the manifest was read, as when a reader
/// loses a race with the next compaction's rename).
#[test]
fn a_snapshot_that_could_not_be_opened_is_opened_again() {
    let _s = serial();
    let (dir, _store, mut f) = compacted_behind_a_follower();
    let snap = dir.path().join("snapshots").join(format!("{:020}.snap", 3));
    let aside = dir.path().join("aside");
    std::fs::rename(&snap, &aside).unwrap();
    f.poll_once();
    assert_eq!(f.table().load().snapshot_seq(), 0);
    std::fs::rename(&aside, &snap).unwrap();
    f.poll_once();
    assert_eq!(f.table().load().snapshot_seq(), 3);
}

/// A request held the view (`table.load()`) while the follower published
/// one on a new snapshot; arc-swap left the last reference with the
/// request, whose thread then unmapped the replaced snapshot (measured:
/// 40 to 60 ms for 150 MB whose file compaction had deleted). The follower
/// now keeps the replaced view until the reader lets go, and drops it on
/// its own thread at its next poll.
#[test]
fn a_reader_never_drops_the_last_reference_to_a_replaced_snapshot() {
    let _s = serial();
    let mapped = |name: &str| {
        std::fs::read_to_string("/proc/self/maps")
            .unwrap()
            .contains(name)
    };
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), LogOptions::default()).unwrap();
    let ops: Vec<LogOp> = (0..2000).map(|i| put(&format!("c{i}"))).collect();
    store.append(&ops).unwrap();
    store.compact().unwrap();
    let mut f = LogFollower::open(dir.path()).unwrap();
    let table = f.table();
    let old = format!("{:020}.snap", 2000);
    assert!(mapped(&old));
    store.append(&[put("new")]).unwrap();
    store.compact().unwrap();
    let reader = table.load(); // a request in flight
    assert_eq!(f.poll_once().new_snapshot, Some(2001));
    assert!(mapped(&old), "the held view keeps its snapshot");
    drop(reader); // the request ends
    assert!(
        mapped(&old),
        "the request's thread unmapped the replaced snapshot"
    );
    f.poll_once(); // the follower's thread drops it
    assert!(!mapped(&old), "the replaced snapshot is let go of");
}

/// A snapshot that cannot be opened for a moment while the log no longer
/// holds what the follower needs: two problems at every poll, the open's
/// and the missing records'. Each is logged and counted once (they took
/// turns as "the last error" and were counted at every poll).
#[test]
fn two_problems_in_turn_are_each_refused_once() {
    let _s = serial();
    let dir = tempfile::tempdir().unwrap();
    // A segment per append, so that compaction removes the ones it covers.
    let store = Store::open(dir.path(), LogOptions { segment_bytes: 64 }).unwrap();
    store.append(&[put("a1")]).unwrap();
    let mut f = LogFollower::open(dir.path()).unwrap();
    f.poll_once();
    for c in ["a2", "a3", "a4"] {
        store.append(&[put(c)]).unwrap();
    }
    store.compact().unwrap();
    let snap = dir.path().join("snapshots").join(format!("{:020}.snap", 4));
    let aside = dir.path().join("aside");
    std::fs::rename(&snap, &aside).unwrap();
    for _ in 0..5 {
        f.poll_once();
    }
    assert_eq!(f.stats().files_refused.load(Relaxed), 2);
    std::fs::rename(&aside, &snap).unwrap();
    f.poll_once();
    assert_eq!(f.table().load().seq(), 4);
}
