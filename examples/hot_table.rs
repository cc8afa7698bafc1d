//! The link store in one process: a writer appends links (each `append`
//! returns once the log is fsynced), a `LogFollower` tails the log and
//! publishes views into a `HotTable`, and a reader looks codes up without a
//! lock, before and after a compaction swaps a new snapshot in.
//!
//! The edge is this reader; `uload admin` is this writer, in another process
//! on the same data dir.

use std::time::{Duration, Instant};

use uload::store::{LogFollower, LogOp, Store, record::Link};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let store = Store::open(dir.path(), Default::default())?;
    // The follower loads what is there (nothing yet) and polls every 5 ms.
    let follower = LogFollower::open(dir.path())?;
    let table = follower.table();
    let _running = follower.spawn(Duration::from_millis(5));

    let links: Vec<LogOp> = (0..1000)
        .map(|i| Link::new(&format!("ex{i}"), &format!("https://example.com/{i}")).map(LogOp::Put))
        .collect::<Result<_, _>>()?;
    let seq = store.append(&links)?; // one group commit, one fsync
    let acked = Instant::now();
    while table.load().seq() < seq {
        std::thread::park_timeout(Duration::from_millis(1));
    }
    println!("seq {seq} acknowledged, served {:?} later", acked.elapsed());

    let report = store.compact()?; // a new snapshot, off the reader's path
    println!(
        "compacted {} records into a snapshot; {} files removed",
        report.records,
        report.removed.len()
    );
    while table.load().snapshot_seq() < seq {
        std::thread::park_timeout(Duration::from_millis(1));
    }
    let view = table.load(); // an Arc of an immutable view: no lock
    let link = view.get(b"ex42").ok_or("ex42 missing")?;
    println!(
        "ex42 -> {} ({} links, overlay {})",
        String::from_utf8_lossy(link.target),
        view.len(),
        view.overlay_len()
    );
    Ok(())
}

// cargo run --example hot_table
