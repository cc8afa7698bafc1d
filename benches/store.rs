//! Criterion benchmarks of the link store (`uload::store`).
//!
//! Run with `cargo bench --bench store` (about 5.5 minutes on the 2-core
//! machine below once built; the first run also builds the fixtures, see
//! "Fixtures"). Full write-up, targets and discussion: `docs/benchmarks.md`.
//!
//! # Results
//!
//! - Machine: `nproc` = 2, "Intel(R) Xeon(R) Processor" (Firecracker microVM,
//!   2.1 GHz), 23 GiB RAM, kernel 6.18.44, ext4 on virtio for `/var/tmp`.
//!   Shared and noisy: other builds, a fuzzer and tests ran meanwhile (load
//!   average 2 to 7.6). Hardware perf counters are not available
//!   (`perf stat -e instructions true`: `<not supported>`).
//! - Date: 2026-11-26. rustc 1.95.0 (59807616e 2026-04-14), criterion 0.8.2.
//! - Command: `CARGO_TARGET_DIR=/var/tmp/uload-target cargo bench --bench store`
//!   (after `source scripts/tools.sh`).
//! - Figures: criterion's median, then the median over the runs (4 runs; 3 for
//!   the `_cputime` column, 1 or 2 for benches added later). "CPU" is the same
//!   lookup measured in thread CPU time (groups `*_cputime`), which leaves out
//!   time preempted by other processes. Targets: lookup < 100 ns median, open
//!   < 50 ms besides checksum.
//!
//! | benchmark | median (wall) | median (CPU) | note |
//! |---|---|---|---|
//! | `snapshot_get/calibration/code_hash` | 4.9 ns | 3.9 ns | |
//! | `snapshot_get/calibration/1k/hit_warm` | 43.9 ns | 35.6 ns | all in L1/L2 |
//! | `snapshot_get/calibration/dram_chase_1GiB` | 359 ns | 304 ns | one dependent DRAM + TLB miss |
//! | `snapshot_get/calibration/dram_chase_1GiB_2MiB_pages` | 197 ns | 242 ns | one dependent DRAM miss, page walks mostly gone (2026-11-27, 3 runs) |
//! | `snapshot_get/calibration/dram_random_1GiB_2MiB_pages` | 15.1 ns | 17.5 ns | independent random reads overlapping (same runs) |
//! | `snapshot_get/1M/hit_cold` | 344 ns | 260 ns | target missed |
//! | `snapshot_get/1M/hit_cold_serial` | 387 ns | 378 ns | latency, no overlap |
//! | `snapshot_get/1M/miss_cold` | 85.4 ns | 62.6 ns | |
//! | `snapshot_get/1M/hot1000` | 97.1 ns | 75.0 ns | |
//! | `snapshot_get/1M/zipf_s1` | 230 ns | 179 ns | target missed |
//! | `snapshot_get/10M/hit_cold` | 454 ns | 443 ns | target missed: 2 DRAM misses |
//! | `snapshot_get/10M/hit_cold_serial` | 674 ns | 674 ns | latency, no overlap |
//! | `snapshot_get/10M/miss_cold` | 205 ns | 156 ns | target missed: 1 DRAM miss |
//! | `snapshot_get/10M/hot1000` | 92.2 ns | 84.9 ns | |
//! | `snapshot_get/10M/zipf_s1` | 354 ns | 351 ns | target missed |
//! | `overlay/1M+10k/view_overlay_hit` | 80.1 ns | 58.6 ns | |
//! | `overlay/1M+10k/view_snapshot_hit` | 461 ns | 486 ns | falls through 2 hash maps (3 layers since issue 4's writes: 447 ns / 424 ns) |
//! | `overlay/1M+10k/view_miss` | 258 ns | 209 ns | |
//! | `overlay/1M+10k/hot_table_overlay_hit` | 92.2 ns | 76.1 ns | `HotTable::load` + get |
//! | `overlay/1M+10k/hot_table_snapshot_hit` | 510 ns | 455 ns | |
//! | `overlay/1M+10k/apply_publish` | 5.2 to 8.5 µs (205 µs before) | 3.5 to 3.7 µs (55 µs before) | 3-layer overlay; see `docs/benchmarks.md`, "Write burst: 5,000 creations/s" |
//! | `log_append/put_1op_per_call/threads/1` | 85 µs to 3.7 ms | | bimodal disk; 1.0 calls/fsync |
//! | `log_append/put_1op_per_call/threads/4` | 110 µs (42 to 312) | | 2.3 calls/fsync |
//! | `log_append/put_1op_per_call/threads/16` | 18.8 µs = 53k appends/s | | 8.2 calls/fsync |
//! | `log_append/put_1op_per_call/threads/64` | 11.2 µs = 89k appends/s | | 25 to 30 calls/fsync |
//! | `log_append/put_1000ops_per_call/threads/1` | 627 µs = 1.6M puts/s | | per call of 1000 |
//! | `log_replay/1M/read_log` | 196 ms = 5.1M rec/s, 632 MB/s | | |
//! | `log_replay/1M/log_replay` | 337 ms = 3.0M rec/s, 368 MB/s | | decodes every frame twice |
//! | `log_replay/1M/load_view` | 2.33 s = 0.43M rec/s, 53 MB/s | | `TableView::apply` dominates |
//! | `snapshot_build/write_1M` | 341 ms = 2.9M rec/s | | includes fsync of 127 MB |
//! | `snapshot_open/10M/open_no_checksum` | 16.6 µs | | target (< 50 ms) met |
//! | `snapshot_open/10M/open_with_checksum` | 194 ms | | 1.25 GB file |
//! | `snapshot_open/10M/verify_checksums_mapped` | 164 ms = 7.6 GB/s | | the checksum's cost |
//!
//! Since 2026-11-27 snapshots are written and mapped on 2 MiB pages
//! (`docs/benchmarks.md`, "Snapshots on 2 MiB pages"); the lookups then
//! measured (thread CPU time, median of six runs alternated with the build
//! before): 1M `hit_cold` 345 ns, `hit_cold_serial` 369 ns, `miss_cold`
//! 60 ns, `hot1000` 87 ns, `zipf_s1` 187 ns; 10M `hit_cold` 438 ns,
//! `hit_cold_serial` 490 ns, `miss_cold` 157 ns, `hot1000` 90 ns, `zipf_s1`
//! 272 ns. One dependent DRAM read alone costs 197 ns (wall) to 242 ns (CPU)
//! on this machine, so no layout brings a cache-cold hit under 100 ns here
//! (`docs/benchmarks.md`, "The floor of a cold lookup").
//!
//! # What is measured
//!
//! - `snapshot_get/{1M,10M}/*`: `Snapshot::get` on a 1M- and a 10M-link
//!   snapshot. `hit_cold` and `miss_cold` walk a pre-shuffled array of every
//!   code (or of 2M absent codes), one key per iteration, so consecutive
//!   lookups touch unrelated index slots and records, like real traffic over a
//!   large table; independent lookups may overlap their cache misses, so this
//!   is per-core throughput. `hit_cold_serial` makes each key depend on the
//!   previous result: the latency of one lookup. `hot1000` draws uniformly
//!   from 1000 popular codes (a working set that fits in L2). `zipf_s1` draws
//!   ranks from a continuous Zipf(s = 1) approximation over all codes
//!   (rank = floor((N + 1)^u)), so the head is hot and the tail cold.
//! - `snapshot_get/calibration/*`: floors to read those against: the code
//!   hash alone, `get` on a 1000-link snapshot that stays in cache, one
//!   dependent random read in 1 GiB of 4 KiB-page memory (DRAM + TLB miss),
//!   the same on 2 MiB pages (DRAM alone: the latency floor of any cold
//!   lookup, whatever the layout), and independent random reads on 2 MiB
//!   pages (how many misses the memory system overlaps: the throughput
//!   floor).
//! - `*_cputime` groups: the lookup benches again, timed by the thread's CPU
//!   clock instead of the wall clock (see `ThreadCpuTime`).
//! - `overlay/*`: a `TableView` of the 1M snapshot plus 10k newer puts applied
//!   with `TableView::apply`; lookups that hit the overlay, that fall through to
//!   the snapshot, and that miss both; then the same through `HotTable::load()`
//!   (the edge's request path). `apply_publish`: one put applied to that view
//!   and the view published (cloned into an `Arc` that stays alive until the
//!   next one), the admin's pattern per write; codes cycle through 100k new
//!   ones so that the overlay stays bounded, as compaction keeps it.
//! - `log_append/*`: `Store::append` on a data dir under `/var/tmp` (ext4 on
//!   the real disk, not tmpfs), 1/4/16/64 threads each appending one put per
//!   call, and one thread appending 1000 puts per call. Every call returns
//!   only after `fdatasync`; concurrent calls share syncs (group commit). The
//!   bench also prints (to stderr) calls per fsync, from
//!   `LinkLog::sync_count` (one `write` + one `fdatasync` per group-commit
//!   batch).
//! - `log_replay/*`: `log::read_log` of a 1M-record log (read the segments,
//!   decode and CRC-check every frame), `log::replay` of it (`read_log`, then
//!   every record decoded again for the visitor), and `DataDir::load_view(false)`
//!   (replay + `TableView::apply` of each record into the overlay).
//! - `snapshot_build/write_1M`: `write_snapshot` of 1M sorted links (including
//!   its final fsync of the 127 MB file).
//! - `snapshot_open/10M/*`: `Snapshot::open` of the 10M-link snapshot without
//!   and with checksums, and `verify_checksums` alone on a mapping whose pages
//!   are already mapped (the pure CRC32C cost).
//!
//! # Fixtures
//!
//! Codes are 7-character base62 strings drawn from a seeded splitmix64, so
//! every run uses the same data; targets are 50 to 70 byte URLs like
//! `https://example.com/some/path/<n>?utm_source=x`. The 1M and 10M snapshots
//! (127 MB and 1.25 GB) are built once into `/var/tmp/uload-bench/` and reused
//! by later runs when their header (sequence, link count) and a few sample
//! records match; delete that directory to rebuild. The 1M-record log for the
//! replay benches is kept there too. `ULOAD_BENCH_ROOT=<dir>` puts them
//! elsewhere. A cached fixture keeps the page-cache folios it was written
//! with (2 MiB since snapshots are written in 2 MiB pieces; smaller if an
//! older build wrote it) until it is evicted, and that decides whether its
//! mapping gets 2 MiB pages: compare builds each with its own directory
//! (`docs/benchmarks.md`, "Snapshots on 2 MiB pages").

use std::convert::Infallible;
use std::fmt::Write as _;
use std::fs;
use std::hint::black_box;
use std::path::PathBuf;
use std::sync::{Arc, Barrier, OnceLock};
use std::time::{Duration, Instant};

use criterion::measurement::{Measurement, ValueFormatter, WallTime};
use criterion::{
    BenchmarkGroup, BenchmarkId, Criterion, SamplingMode, Throughput, criterion_group,
    criterion_main,
};
use uload::store::frame::LogOpRef;
use uload::store::hash::code_hash;
use uload::store::record::{Link, LinkRef, RedirectStatus};
use uload::store::snapshot::{SNAPSHOT_VERSION, Snapshot, write_snapshot};
use uload::store::{DataDir, HotTable, LogOp, LogOptions, Store, TableView, log};

/// Where fixtures and the append benches' data dirs live (must be a real disk).
const BENCH_ROOT: &str = "/var/tmp/uload-bench";
/// Bump when the generated data changes, so that cached fixtures are rebuilt.
const FIXTURE_VERSION: u64 = 1;
/// Sequence number written into fixture snapshots (also identifies them).
const FIXTURE_SEQ: u64 = 1_000_000_000 + FIXTURE_VERSION;
const SEED_CODES: u64 = 0x5eed_0001;
const SEED_MISS: u64 = 0x5eed_0002;
const SEED_SHUFFLE: u64 = 0x5eed_0003;
const SEED_ACCESS: u64 = 0x5eed_0004;
const SEED_OVERLAY: u64 = 0x5eed_0005;
const SEED_APPEND: u64 = 0x5eed_0006;

const M: usize = 1_000_000;
/// Length of the pre-generated access sequences (misses, hot set, Zipf).
const ACCESS_LEN: usize = 2_000_000;
/// Puts applied on top of the 1M snapshot in the overlay benches.
const OVERLAY_LEN: usize = 10_000;
/// Records in the replay benches' log.
const REPLAY_LEN: usize = 1_000_000;

type Code = [u8; 7];

// ---------------------------------------------------------------------------
// Deterministic data
// ---------------------------------------------------------------------------

/// splitmix64 (Steele, Lea, Flood 2014): tiny, fast, good enough for test data.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (multiply-shift; bias is negligible here).
    fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }

    /// Uniform in `[0, 1)`.
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            v.swap(i, j);
        }
    }
}

/// Base62 digits in ASCII order, so byte order of codes is numeric order.
const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
const CODE_SPACE: u64 = 62u64.pow(7);

fn random_code(rng: &mut SplitMix64) -> Code {
    let mut v = rng.below(CODE_SPACE);
    let mut code = [0u8; 7];
    for c in code.iter_mut().rev() {
        *c = BASE62[(v % 62) as usize];
        v /= 62;
    }
    code
}

fn code_str(code: &Code) -> &str {
    std::str::from_utf8(code).expect("base62 is ASCII")
}

/// `n` distinct random codes, sorted (the order a snapshot stores them in).
fn unique_codes(n: usize, seed: u64) -> Vec<Code> {
    let mut rng = SplitMix64(seed);
    let mut codes: Vec<Code> = Vec::with_capacity(n);
    while codes.len() < n {
        let missing = n - codes.len();
        codes.extend((0..missing).map(|_| random_code(&mut rng)));
        codes.sort_unstable();
        codes.dedup();
    }
    codes
}

/// `n` random codes that are not in `present` (which is sorted).
fn absent_codes(n: usize, seed: u64, present: &[Code]) -> Vec<Code> {
    let mut rng = SplitMix64(seed);
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let c = random_code(&mut rng);
        if present.binary_search(&c).is_err() {
            out.push(c);
        }
    }
    out
}

/// The target URL of link number `i` (50 to 70 bytes).
fn write_target(i: u64, out: &mut String) {
    const PREFIXES: [&str; 4] = [
        "https://example.com/some/path/",
        "https://www.example.org/blog/2025/06/article-",
        "https://shop.example.net/catalog/items/",
        "https://example.com/campaigns/spring-sale/landing/",
    ];
    let _ = write!(out, "{}{i}?utm_source=x", PREFIXES[(i % 4) as usize]);
}

fn target(i: u64) -> String {
    let mut s = String::new();
    write_target(i, &mut s);
    s
}

/// Every target of a fixture in one allocation.
struct Targets {
    bytes: String,
    ends: Vec<usize>,
}

impl Targets {
    fn new(n: usize) -> Self {
        let mut bytes = String::with_capacity(n * 64);
        let mut ends = Vec::with_capacity(n);
        for i in 0..n {
            write_target(i as u64, &mut bytes);
            ends.push(bytes.len());
        }
        Self { bytes, ends }
    }

    fn get(&self, i: usize) -> &str {
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        &self.bytes[start..self.ends[i]]
    }
}

fn fixture_link<'a>(code: &'a Code, target: &'a str, i: usize) -> LinkRef<'a> {
    LinkRef {
        code,
        target: target.as_bytes(),
        status: RedirectStatus::Found,
        flags: 0,
        created_at_ms: 1_750_000_000_000 + i as u64,
        expires_at_ms: None,
        max_clicks: None,
        owner_key_id: 1 + (i % 16) as u64,
    }
}

/// `BENCH_ROOT`, or `$ULOAD_BENCH_ROOT` when set (A/B runs of two builds
/// keep their fixtures apart: a file's page-cache state depends on how it
/// was written).
fn bench_root() -> PathBuf {
    let root = std::env::var_os("ULOAD_BENCH_ROOT")
        .map_or_else(|| PathBuf::from(BENCH_ROOT), PathBuf::from);
    fs::create_dir_all(&root).expect("create the bench root");
    root
}

// ---------------------------------------------------------------------------
// Snapshot fixtures
// ---------------------------------------------------------------------------

/// A snapshot of `n` links plus the access sequences its benches walk.
struct SnapFixture {
    label: &'static str,
    snap: Arc<Snapshot>,
    /// Every code, shuffled.
    hits: Vec<Code>,
    /// Absent codes, in random order.
    misses: Vec<Code>,
    /// Uniform draws from 1000 popular codes.
    hot1000: Vec<Code>,
    /// Zipf(s = 1)-like draws over all codes.
    zipf: Vec<Code>,
    /// Every code, sorted.
    sorted: Vec<Code>,
    path: PathBuf,
}

/// Whether `snap` is the fixture this build would write for `codes`.
fn fixture_matches(snap: &Snapshot, codes: &[Code]) -> bool {
    let n = codes.len();
    snap.seq() == FIXTURE_SEQ
        && snap.header().version == SNAPSHOT_VERSION
        && snap.len() == n as u64
        && [0, n / 3, n / 2, n - 1].into_iter().all(|i| {
            snap.get(&codes[i])
                .is_some_and(|l| l.target == target(i as u64).as_bytes())
        })
}

/// Opens the cached snapshot of `codes` or builds it. Returns it with every
/// page of its mapping faulted in (by checking its checksums).
fn fixture_snapshot(codes: &[Code]) -> (PathBuf, Arc<Snapshot>) {
    let n = codes.len();
    // Named by the snapshot format too, so that builds of different formats
    // sharing /var/tmp/uload-bench never take each other's fixtures.
    let path = bench_root().join(format!(
        "links-{n}-v{FIXTURE_VERSION}-f{SNAPSHOT_VERSION}.snap"
    ));
    let cached = Snapshot::open(&path, false)
        .ok()
        .filter(|s| fixture_matches(s, codes));
    let snap = match cached {
        Some(s) => {
            eprintln!("fixture: reusing {}", path.display());
            s
        }
        None => {
            eprintln!("fixture: building {} ({n} links)...", path.display());
            let started = Instant::now();
            let targets = Targets::new(n);
            write_snapshot(
                &path,
                FIXTURE_SEQ,
                (0..n).map(|i| Ok::<_, Infallible>(fixture_link(&codes[i], targets.get(i), i))),
            )
            .expect("write fixture snapshot");
            eprintln!("fixture: built in {:.1?}", started.elapsed());
            let s = Snapshot::open(&path, false).expect("open fixture snapshot");
            assert!(
                fixture_matches(&s, codes),
                "fixture snapshot does not read back"
            );
            s
        }
    };
    snap.verify_checksums().expect("fixture checksums");
    (path, Arc::new(snap))
}

fn snap_fixture(label: &'static str, n: usize) -> SnapFixture {
    let started = Instant::now();
    let mut codes = unique_codes(n, SEED_CODES ^ n as u64);
    let (path, snap) = fixture_snapshot(&codes);
    let misses = absent_codes(ACCESS_LEN, SEED_MISS, &codes);
    let sorted = codes.clone();
    SplitMix64(SEED_SHUFFLE).shuffle(&mut codes);
    let mut rng = SplitMix64(SEED_ACCESS);
    // The first 1000 shuffled codes are the popular ones (random in the table).
    let hot1000 = (0..ACCESS_LEN)
        .map(|_| codes[rng.below(1000) as usize])
        .collect();
    // Continuous Zipf(s = 1) on [1, n + 1): P(rank < x) = ln x / ln(n + 1).
    let zipf = (0..ACCESS_LEN)
        .map(|_| {
            let rank = ((n as f64 + 1.0).powf(rng.unit()) as usize).clamp(1, n);
            codes[rank - 1]
        })
        .collect();
    for k in codes.iter().take(10_000) {
        assert!(snap.get(k).is_some(), "hit key misses");
    }
    for k in misses.iter().take(10_000) {
        assert!(snap.get(k).is_none(), "miss key hits");
    }
    eprintln!("fixture: {label} ready in {:.1?}", started.elapsed());
    SnapFixture {
        label,
        snap,
        hits: codes,
        misses,
        hot1000,
        zipf,
        sorted,
        path,
    }
}

/// The 1M and 10M fixtures, built on first use and shared by every group
/// (the lookup benches run once per clock).
fn fixture_1m() -> &'static SnapFixture {
    static FX: OnceLock<SnapFixture> = OnceLock::new();
    FX.get_or_init(|| snap_fixture("1M", M))
}

fn fixture_10m() -> &'static SnapFixture {
    static FX: OnceLock<SnapFixture> = OnceLock::new();
    FX.get_or_init(|| snap_fixture("10M", 10 * M))
}

/// The 1M snapshot plus `OVERLAY_LEN` newer puts, and the new codes, shuffled.
fn overlay_fixture() -> &'static (TableView, Vec<Code>, Vec<Code>) {
    static FX: OnceLock<(TableView, Vec<Code>, Vec<Code>)> = OnceLock::new();
    FX.get_or_init(|| {
        let fx = fixture_1m();
        // New links (codes absent from the snapshot) applied as log records.
        let mut new_codes = absent_codes(OVERLAY_LEN * 2, SEED_OVERLAY, &fx.sorted);
        new_codes.sort_unstable();
        new_codes.dedup();
        new_codes.truncate(OVERLAY_LEN);
        SplitMix64(SEED_OVERLAY).shuffle(&mut new_codes);
        let mut view = TableView::new(Some(fx.snap.clone()));
        for (i, code) in new_codes.iter().enumerate() {
            let link = Link::new(code_str(code), &target(i as u64)).expect("valid link");
            view.apply(FIXTURE_SEQ + 1 + i as u64, LogOpRef::Put(link.as_ref()))
                .expect("apply");
        }
        assert_eq!(view.overlay_len(), OVERLAY_LEN);
        assert_eq!(view.len(), M as u64 + OVERLAY_LEN as u64);
        // Misses must miss the overlay too.
        let misses: Vec<Code> = fx
            .misses
            .iter()
            .filter(|k| view.get(&k[..]).is_none())
            .copied()
            .collect();
        (view, new_codes, misses)
    })
}

/// Benchmarks `lookup` over `keys`, one key per iteration, cycling; the
/// cursor lives outside the sample closure so that every sample moves on to
/// keys not touched recently.
///
/// Consecutive lookups are independent, so an out-of-order core may overlap
/// the cache misses of one lookup with the next: this measures throughput on
/// one core. `bench_keys_serial` measures latency instead.
fn bench_keys<'k, Ms: Measurement>(
    g: &mut BenchmarkGroup<'_, Ms>,
    id: impl Into<String>,
    keys: &'k [Code],
    lookup: impl FnMut(&'k Code) -> usize,
) {
    bench_keys_impl(g, id.into(), keys, lookup, false)
}

/// Like `bench_keys`, but each lookup's key depends on the previous lookup's
/// result (a data dependency the compiler cannot see through), so no two
/// lookups overlap: the latency of one lookup, as one request would see it.
fn bench_keys_serial<'k, Ms: Measurement>(
    g: &mut BenchmarkGroup<'_, Ms>,
    id: impl Into<String>,
    keys: &'k [Code],
    lookup: impl FnMut(&'k Code) -> usize,
) {
    bench_keys_impl(g, id.into(), keys, lookup, true)
}

fn bench_keys_impl<'k, Ms: Measurement>(
    g: &mut BenchmarkGroup<'_, Ms>,
    id: String,
    keys: &'k [Code],
    mut lookup: impl FnMut(&'k Code) -> usize,
    serial: bool,
) {
    let mut i = 0usize;
    g.bench_function(id, |b| {
        b.iter(|| {
            let k = &keys[i];
            let r = lookup(black_box(k));
            // A target is never 2^63 bytes long, so this adds 0, but only
            // once `r` is known.
            i += 1 + if serial { black_box(r) >> 63 } else { 0 };
            if i >= keys.len() {
                i = 0;
            }
            r
        })
    });
}

fn snapshot_get_benches<Ms: Measurement>(g: &mut BenchmarkGroup<'_, Ms>, fx: &SnapFixture) {
    let snap = &*fx.snap;
    let get = |k: &Code| snap.get(k).map_or(0, |l| l.target.len());
    let l = fx.label;
    bench_keys(g, format!("{l}/hit_cold"), &fx.hits, get);
    bench_keys(g, format!("{l}/miss_cold"), &fx.misses, get);
    bench_keys(g, format!("{l}/hot1000"), &fx.hot1000, get);
    bench_keys(g, format!("{l}/zipf_s1"), &fx.zipf, get);
    bench_keys_serial(g, format!("{l}/hit_cold_serial"), &fx.hits, get);
}

/// Floors to read the other lookups against: the hash alone, and `get` on a
/// 1000-link snapshot that stays in L1/L2 and the TLB.
fn calibration_benches<Ms: Measurement>(g: &mut BenchmarkGroup<'_, Ms>) {
    let codes = unique_codes(1000, SEED_CODES ^ 1000);
    let targets = Targets::new(codes.len());
    let path = bench_root().join(format!("links-1000-f{SNAPSHOT_VERSION}.snap"));
    write_snapshot(
        &path,
        1,
        (0..codes.len()).map(|i| Ok::<_, Infallible>(fixture_link(&codes[i], targets.get(i), i))),
    )
    .expect("write 1k snapshot");
    let snap = Snapshot::open(&path, true).expect("open 1k snapshot");
    let mut keys = codes.clone();
    SplitMix64(SEED_SHUFFLE).shuffle(&mut keys);
    bench_keys(g, "calibration/code_hash", &keys, |k| code_hash(k) as usize);
    bench_keys(g, "calibration/1k/hit_warm", &keys, |k| {
        snap.get(k).map_or(0, |l| l.target.len())
    });
    // One dependent random read per iteration in 1 GiB of ordinary (4 KiB
    // page) memory: the DRAM + TLB-miss latency a cold lookup pays per miss.
    // The chain is a full-period LCG modulo 2^27, so no prefetcher follows it.
    const SLOTS: u64 = 1 << 27;
    let chase: Vec<u64> = (0..SLOTS)
        .map(|i| {
            i.wrapping_mul(0x5851_f42d_4c95_7f2d)
                .wrapping_add(0x1405_7b7e_f767_814f)
                & (SLOTS - 1)
        })
        .collect();
    let mut at = 0u64;
    g.bench_function("calibration/dram_chase_1GiB", |b| {
        b.iter(|| {
            at = chase[at as usize];
            at
        })
    });
    drop(chase);
    // The same chain in 1 GiB of anonymous memory advised onto 2 MiB pages
    // (as snapshots are mapped): what one dependent DRAM read costs with
    // the TLB misses mostly gone, the floor of any cold lookup that must
    // read one random cache line of a large table. Then independent random
    // reads of it (the next index does not wait for the last read): the
    // floor of cold lookups that overlap, as `hit_cold` lets them.
    let mut huge = memmap2::MmapMut::map_anon(8 << 27).expect("map 1 GiB");
    let _ = huge.advise(memmap2::Advice::HugePage);
    // SAFETY: the mapping is page-aligned, 8-byte multiples long, and
    // zero-filled; any bit pattern is a valid u64.
    let slots: &mut [u64] =
        unsafe { std::slice::from_raw_parts_mut(huge.as_mut_ptr().cast(), huge.len() / 8) };
    for (i, slot) in slots.iter_mut().enumerate() {
        *slot = (i as u64)
            .wrapping_mul(0x5851_f42d_4c95_7f2d)
            .wrapping_add(0x1405_7b7e_f767_814f)
            & (SLOTS - 1);
    }
    let thp_kb = fs::read_to_string("/proc/self/smaps_rollup")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("AnonHugePages:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        });
    eprintln!(
        "calibration: AnonHugePages {} (2 MiB pages under the 1 GiB chase buffer when about 1048576 kB)",
        thp_kb.map_or_else(|| "unknown".to_owned(), |kb| format!("{kb} kB"))
    );
    let slots = &*slots;
    let mut at = 0u64;
    g.bench_function("calibration/dram_chase_1GiB_2MiB_pages", |b| {
        b.iter(|| {
            at = slots[at as usize];
            at
        })
    });
    let mut i = 0u64;
    g.bench_function("calibration/dram_random_1GiB_2MiB_pages", |b| {
        b.iter(|| {
            i = i.wrapping_add(1);
            // A fixed odd multiplier scatters consecutive i over the buffer.
            slots[(i.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 37) as usize]
        })
    });
}

/// `Snapshot::get` and the overlay, measured with clock `Ms` (criterion
/// names the groups `<name><suffix>`).
fn lookup_benches<Ms: Measurement>(c: &mut Criterion<Ms>, suffix: &str) {
    {
        let mut g = c.benchmark_group(format!("snapshot_get{suffix}"));
        g.throughput(Throughput::Elements(1));
        calibration_benches(&mut g);
        snapshot_get_benches(&mut g, fixture_1m());
        snapshot_get_benches(&mut g, fixture_10m());
    }
    let fx = fixture_1m();
    let (view, new_codes, misses) = overlay_fixture();
    let table = HotTable::new(view.clone());
    let mut g = c.benchmark_group(format!("overlay{suffix}"));
    g.throughput(Throughput::Elements(1));
    let get = |k: &Code| view.get(k).map_or(0, |l| l.target.len());
    bench_keys(&mut g, "1M+10k/view_overlay_hit", new_codes, get);
    bench_keys(&mut g, "1M+10k/view_snapshot_hit", &fx.hits, get);
    bench_keys(&mut g, "1M+10k/view_miss", misses, get);
    let load_get = |k: &Code| table.load().get(k).map_or(0, |l| l.target.len());
    bench_keys(&mut g, "1M+10k/hot_table_overlay_hit", new_codes, load_get);
    bench_keys(&mut g, "1M+10k/hot_table_snapshot_hit", &fx.hits, load_get);
    apply_publish_bench(&mut g, view);
}

/// The admin's and the follower's write pattern: apply one put, then publish
/// the view while the previously published one is still held by readers.
/// Codes cycle through `APPLY_CODES` new codes, so the overlay stays bounded
/// (as compaction keeps it) at 10k + `APPLY_CODES` entries.
fn apply_publish_bench<Ms: Measurement>(g: &mut BenchmarkGroup<'_, Ms>, fixture: &TableView) {
    const APPLY_CODES: usize = 100_000;
    let links: Vec<Link> = (0..APPLY_CODES)
        .map(|i| Link::new(&format!("ap-{i:07}"), &target(i as u64)).expect("valid link"))
        .collect();
    let mut view = fixture.clone();
    let mut published = Arc::new(view.clone());
    let mut i = 0usize;
    g.bench_function("1M+10k/apply_publish", |b| {
        b.iter(|| {
            let seq = view.seq() + 1;
            view.apply(seq, LogOpRef::Put(links[i % APPLY_CODES].as_ref()))
                .expect("apply");
            i += 1;
            published = Arc::new(view.clone());
            published.seq()
        })
    });
}

fn lookups_wall_clock(c: &mut Criterion) {
    lookup_benches(c, "");
}

fn lookups_thread_cpu(c: &mut Criterion<ThreadCpuTime>) {
    lookup_benches(c, "_cputime");
}

/// A criterion clock that counts only the CPU time of the measuring thread
/// (`CLOCK_THREAD_CPUTIME_ID`), so that time the thread spends preempted by
/// other processes on this shared machine is not charged to the benchmark.
/// Cache and TLB pollution by those processes still is. Single-threaded
/// benches only.
struct ThreadCpuTime;

impl ThreadCpuTime {
    fn now_ns() -> u64 {
        #[repr(C)]
        struct Timespec {
            tv_sec: i64,
            tv_nsec: i64,
        }
        const CLOCK_THREAD_CPUTIME_ID: i32 = 3;
        unsafe extern "C" {
            fn clock_gettime(clock: i32, ts: *mut Timespec) -> i32;
        }
        let mut ts = Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid, writable `struct timespec` (two 64-bit
        // fields on x86_64/aarch64 Linux) and the clock id is a constant the
        // kernel knows.
        let rc = unsafe { clock_gettime(CLOCK_THREAD_CPUTIME_ID, &mut ts) };
        assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID)");
        ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
    }
}

impl Measurement for ThreadCpuTime {
    type Intermediate = u64;
    type Value = u64;

    fn start(&self) -> u64 {
        Self::now_ns()
    }

    fn end(&self, started: u64) -> u64 {
        Self::now_ns() - started
    }

    fn add(&self, a: &u64, b: &u64) -> u64 {
        a + b
    }

    fn zero(&self) -> u64 {
        0
    }

    fn to_f64(&self, v: &u64) -> f64 {
        *v as f64
    }

    fn formatter(&self) -> &dyn ValueFormatter {
        // Values are nanoseconds, as for the wall clock.
        static WALL: WallTime = WallTime;
        WALL.formatter()
    }
}

/// Totals over every timed run of one append benchmark.
#[derive(Default)]
struct AppendTally {
    appends: u64,
    ops: u64,
    syncs: u64,
    elapsed: Duration,
}

impl AppendTally {
    fn report(&self, what: &str) {
        let secs = self.elapsed.as_secs_f64();
        eprintln!(
            "log_append/{what}: {} calls ({} ops) in {secs:.2} s = {:.0} calls/s, {:.0} ops/s; \
             {} fsyncs = {:.1} calls per fsync, {:.0} fsyncs/s",
            self.appends,
            self.ops,
            self.appends as f64 / secs,
            self.ops as f64 / secs,
            self.syncs,
            self.appends as f64 / self.syncs.max(1) as f64,
            self.syncs as f64 / secs,
        );
    }
}

/// `iters` appends spread over one thread per entry of `pools`, each thread
/// cycling through its own prepared calls. Returns the wall time from a
/// common start to the last thread's finish.
fn run_appends(
    store: &Store,
    pools: &[Vec<Vec<LogOp>>],
    iters: u64,
    tally: &mut AppendTally,
) -> Duration {
    let threads = pools.len() as u64;
    let start = Barrier::new(pools.len() + 1);
    let syncs_before = store.log().sync_count();
    let elapsed = std::thread::scope(|s| {
        let handles: Vec<_> = pools
            .iter()
            .enumerate()
            .map(|(t, pool)| {
                let n = iters / threads + u64::from((t as u64) < iters % threads);
                let start = &start;
                s.spawn(move || {
                    start.wait();
                    let mut ops = 0u64;
                    for j in 0..n as usize {
                        let call = &pool[j % pool.len()];
                        black_box(store.append(call).expect("append"));
                        ops += call.len() as u64;
                    }
                    ops
                })
            })
            .collect();
        start.wait();
        let t0 = Instant::now();
        let ops: u64 = handles
            .into_iter()
            .map(|h| h.join().expect("append thread"))
            .sum();
        tally.ops += ops;
        t0.elapsed()
    });
    tally.syncs += store.log().sync_count() - syncs_before;
    tally.appends += iters;
    tally.elapsed += elapsed;
    elapsed
}

/// `calls` append calls of `ops_per_call` fresh puts each, for thread `t`.
fn append_pool(t: u64, calls: usize, ops_per_call: usize) -> Vec<Vec<LogOp>> {
    let mut rng = SplitMix64(SEED_APPEND ^ t);
    (0..calls)
        .map(|_| {
            (0..ops_per_call)
                .map(|_| {
                    let code = random_code(&mut rng);
                    let i = rng.below(10_000_000);
                    LogOp::Put(Link::new(code_str(&code), &target(i)).expect("valid link"))
                })
                .collect()
        })
        .collect()
}

fn appends(c: &mut Criterion) {
    let dir = tempfile::Builder::new()
        .prefix("append-")
        .tempdir_in(bench_root())
        .expect("temp dir under /var/tmp/uload-bench");
    let store = Store::open(dir.path(), LogOptions::default()).expect("open store");
    let pools: Vec<Vec<Vec<LogOp>>> = (0..64).map(|t| append_pool(t, 256, 1)).collect();

    let mut g = c.benchmark_group("log_append");
    g.sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5));
    g.throughput(Throughput::Elements(1));
    for threads in [1usize, 4, 16, 64] {
        let mut tally = AppendTally::default();
        g.bench_with_input(
            BenchmarkId::new("put_1op_per_call/threads", threads),
            &threads,
            |b, &t| b.iter_custom(|iters| run_appends(&store, &pools[..t], iters, &mut tally)),
        );
        tally.report(&format!("put_1op_per_call/threads/{threads}"));
    }
    let batches = vec![append_pool(1000, 8, 1000)];
    let mut tally = AppendTally::default();
    g.throughput(Throughput::Elements(1000));
    g.bench_function("put_1000ops_per_call/threads/1", |b| {
        b.iter_custom(|iters| run_appends(&store, &batches, iters, &mut tally))
    });
    tally.report("put_1000ops_per_call/threads/1");
    g.finish();
    drop(store);
    // The data dir (a few hundred MB of log) is removed when `dir` drops.
}

/// A data dir whose log holds `REPLAY_LEN` puts (no snapshot), cached.
fn replay_fixture() -> (PathBuf, u64) {
    let root = bench_root().join(format!("replay-{REPLAY_LEN}-v{FIXTURE_VERSION}"));
    let done = root.join("BENCH-FIXTURE-COMPLETE");
    if !done.exists() {
        eprintln!(
            "fixture: writing a {REPLAY_LEN}-record log in {}...",
            root.display()
        );
        let _ = fs::remove_dir_all(&root);
        let store = Store::open(&root, LogOptions::default()).expect("open store");
        let codes = unique_codes(REPLAY_LEN, SEED_CODES ^ 0xabcd);
        let mut order: Vec<usize> = (0..REPLAY_LEN).collect();
        SplitMix64(SEED_SHUFFLE ^ 0xabcd).shuffle(&mut order);
        for chunk in order.chunks(10_000) {
            let ops: Vec<LogOp> = chunk
                .iter()
                .map(|&i| {
                    LogOp::Put(Link::new(code_str(&codes[i]), &target(i as u64)).expect("link"))
                })
                .collect();
            store.append(&ops).expect("append");
        }
        drop(store);
        fs::write(&done, b"").expect("mark fixture complete");
    }
    let log_bytes = fs::read_dir(root.join("log"))
        .expect("log dir")
        .map(|e| e.expect("entry").metadata().expect("metadata").len())
        .sum();
    (root, log_bytes)
}

fn replay(c: &mut Criterion) {
    let (root, log_bytes) = replay_fixture();
    let log_dir = DataDir::new(&root).log_dir();
    eprintln!(
        "log_replay: {REPLAY_LEN} records, {log_bytes} bytes of segments ({:.1} bytes/record)",
        log_bytes as f64 / REPLAY_LEN as f64
    );
    let mut g = c.benchmark_group("log_replay");
    g.sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(8));
    g.throughput(Throughput::Elements(REPLAY_LEN as u64));
    g.bench_function("1M/read_log", |b| {
        b.iter_with_large_drop(|| {
            let read = log::read_log(&log_dir, 0).expect("read log");
            assert_eq!(read.summary.applied, REPLAY_LEN as u64);
            read
        })
    });
    g.bench_function("1M/log_replay", |b| {
        b.iter(|| {
            let mut code_bytes = 0usize;
            let summary =
                log::replay(&log_dir, 0, |_, op| code_bytes += op.code().len()).expect("replay");
            assert_eq!(summary.applied, REPLAY_LEN as u64);
            code_bytes
        })
    });
    g.bench_function("1M/load_view", |b| {
        b.iter_with_large_drop(|| {
            let view = DataDir::new(&root).load_view(false).expect("load view");
            assert_eq!(view.len(), REPLAY_LEN as u64);
            view
        })
    });
}

fn snapshot_build(c: &mut Criterion) {
    let codes = unique_codes(M, SEED_CODES ^ M as u64);
    let targets = Targets::new(M);
    let path = bench_root().join("build-bench.snap");
    let mut g = c.benchmark_group("snapshot_build");
    g.sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(10));
    g.throughput(Throughput::Elements(M as u64));
    g.bench_function("write_1M", |b| {
        b.iter(|| {
            let links =
                (0..M).map(|i| Ok::<_, Infallible>(fixture_link(&codes[i], targets.get(i), i)));
            write_snapshot(&path, 1, links)
                .expect("write snapshot")
                .header
                .records_len
        })
    });
    g.finish();
    let _ = fs::remove_file(&path);
}

fn snapshot_open(c: &mut Criterion) {
    let fx = fixture_10m();
    let path = &fx.path;
    let file_len = fs::metadata(path).expect("snapshot metadata").len();
    let mut g = c.benchmark_group("snapshot_open");
    g.sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(6));
    g.bench_function("10M/open_no_checksum", |b| {
        b.iter(|| Snapshot::open(path, false).expect("open").len())
    });
    g.throughput(Throughput::Bytes(file_len));
    g.bench_function("10M/open_with_checksum", |b| {
        b.iter_with_large_drop(|| Snapshot::open(path, true).expect("open"))
    });
    // `fx.snap` had every page mapped when the fixture was loaded.
    g.bench_function("10M/verify_checksums_mapped", |b| {
        b.iter(|| fx.snap.verify_checksums().expect("checksums"))
    });
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .without_plots()
}

criterion_group! {
    name = lookups_wall;
    config = config();
    targets = lookups_wall_clock
}
criterion_group! {
    name = lookups_cpu;
    config = config().with_measurement(ThreadCpuTime);
    targets = lookups_thread_cpu
}
criterion_group! {
    name = io;
    config = config();
    targets = appends, replay, snapshot_build, snapshot_open
}
criterion_main!(lookups_wall, lookups_cpu, io);
