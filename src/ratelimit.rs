//! Rate limits whose state lives in a memory-mapped file, so that it survives
//! a restart and is shared, live, by the old and the new process during a
//! graceful upgrade (both map the same file).
//!
//! Each limit is GCRA (the "generic cell rate algorithm", a token bucket kept
//! as one number per client: the theoretical arrival time, TAT). A decision
//! is a hash, a short probe and a compare-and-swap on a `u64`; nothing
//! allocates and nothing locks.
//!
//! The file is a [`crate::state_file`] table (magic `ULOADRL1`, format
//! version 2; version 1 kept TATs in milliseconds; `docs/operations.md` has
//! the operator's view) whose slots are a key (u64, 0 = empty) and a TAT in
//! µs since the Unix epoch (u64). A file that does not match is replaced by
//! an empty table with a warning: losing limiter state is harmless, refusing
//! to start over it would not be.
//!
//! Times are microseconds, so a rate is exact to within a microsecond per
//! request (300/s is one per 3,333 µs; 600/s one per 1,666 µs) whatever it
//! is; callers pass the time in microseconds ([`now_us`]).
//!
//! ```no_run
//! use uload::ratelimit::{Limit, LimiterTable};
//! let table = LimiterTable::open(std::path::Path::new("state/edge-ratelimit.bin"), 1 << 16).unwrap();
//! let limit = Limit::per_second(100, 200);
//! let d = table.check(1, b"203.0.113.7", limit, uload::ratelimit::now_us());
//! assert!(d.allowed);
//! ```

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::state_file::{Format, SlotFile, StateError};
use crate::store::hash::code_hash;

const FORMAT: Format = Format {
    what: "rate-limit state",
    magic: b"ULOADRL1",
    version: 2,
};
/// Slots probed for a key before the least-limited one is evicted.
const PROBE: usize = 8;

/// Microseconds since the Unix epoch: the limiter's clock.
pub fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// A limit: `burst` requests at once, refilled at one per `interval_us`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    /// Microseconds per request at the sustained rate (at least 1).
    pub interval_us: u64,
    /// Requests allowed at once (at least 1).
    pub burst: u64,
    /// Requests [`LimiterTable::charge`] may put on a client beyond an
    /// empty bucket (0 unless set by [`Limit::with_max_debt`]).
    pub max_debt: u64,
}

impl Limit {
    /// `rate` requests per second sustained, `burst` at once.
    pub fn per_second(rate: u64, burst: u64) -> Self {
        Self::per_window(rate, 1_000, burst)
    }

    /// `count` requests per `window_ms`, `burst` at once.
    pub fn per_window(count: u64, window_ms: u64, burst: u64) -> Self {
        Self {
            interval_us: (window_ms.saturating_mul(1_000) / count.max(1)).max(1),
            burst: burst.max(1),
            max_debt: 0,
        }
    }

    /// The same limit, with up to `tokens` requests charged beyond an empty
    /// bucket (a bulk request's links) kept as a debt.
    pub fn with_max_debt(self, tokens: u64) -> Self {
        Self {
            max_debt: tokens,
            ..self
        }
    }

    /// How far ahead of now a TAT can be: a full burst plus the debt. One
    /// further ahead was written under a clock since stepped back (or is
    /// garbage), and is read as this far ahead: an empty bucket, not a ban
    /// until the wall clock catches up with it.
    fn horizon_us(&self) -> u64 {
        self.interval_us
            .saturating_mul(self.burst.saturating_add(self.max_debt))
    }

    /// Requests per second at the sustained rate (to the nearest whole).
    pub fn rate_per_second(&self) -> u64 {
        (1_000_000 + self.interval_us / 2) / self.interval_us
    }
}

/// One decision, with what the `RateLimit-*` and `Retry-After` headers say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// The limit's burst (`RateLimit-Limit`).
    pub limit: u64,
    /// Requests left right now (`RateLimit-Remaining`).
    pub remaining: u64,
    /// Seconds until the bucket is full again (`RateLimit-Reset`).
    pub reset_secs: u64,
    /// Seconds until the next request is allowed (`Retry-After`); 0 if allowed.
    pub retry_after_secs: u64,
}

/// The shared, persisted table. Cloning is not offered; share it in an `Arc`.
#[derive(Debug)]
pub struct LimiterTable {
    slots: SlotFile,
}

impl LimiterTable {
    /// Maps `path`, creating it (and its directory) with `slots` slots
    /// (rounded up to a power of two, at least 64) when missing or unusable.
    pub fn open(path: &Path, slots: usize) -> Result<Self, StateError> {
        Ok(Self {
            slots: SlotFile::open(path, &FORMAT, slots)?,
        })
    }

    /// The slot holding `key`, claiming one (empty, expired, or the least
    /// limited of the probe window) if it has none.
    fn find(&self, key: u64, now: u64) -> &AtomicU64 {
        let start = key as usize;
        let mut free = None;
        let mut least: Option<(usize, u64)> = None;
        // Wrapping: `slot` masks the index, and a key near `u64::MAX` must
        // probe round the end of the table like any other.
        for i in (0..PROBE).map(|n| start.wrapping_add(n)) {
            let (k, tat) = self.slots.slot(i);
            let seen = k.load(Ordering::Acquire);
            if seen == key {
                return tat;
            }
            let t = tat.load(Ordering::Relaxed);
            if seen == 0 || t <= now {
                free.get_or_insert(i);
            } else if least.is_none_or(|(_, lt)| t < lt) {
                least = Some((i, t));
            }
        }
        let victim = free.map(|i| (i, 0)).or(least);
        let (i, _) = victim.unwrap_or((start, 0));
        let (k, tat) = self.slots.slot(i);
        // A new client starts with a full bucket. Two processes claiming the
        // same slot at once may share it for a moment: a limiter may be off
        // by a request, never unsafe.
        tat.store(0, Ordering::Relaxed);
        k.store(key, Ordering::Release);
        tat
    }

    /// Charges one request of `client` against `limit` (in the limiter
    /// namespace `kind`) at `now` (µs since the epoch) and says whether it
    /// is allowed.
    pub fn check(&self, kind: u8, client: &[u8], limit: Limit, now: u64) -> Decision {
        self.decide(kind, client, limit, now, true)
    }

    /// Whether a request of `client` would be allowed, without charging it.
    pub fn peek(&self, kind: u8, client: &[u8], limit: Limit, now: u64) -> Decision {
        self.decide(kind, client, limit, now, false)
    }

    fn decide(&self, kind: u8, client: &[u8], limit: Limit, now: u64, charge: bool) -> Decision {
        let key = key_of(kind, client);
        let tat = self.find(key, now);
        let t = limit.interval_us;
        let window = t.saturating_mul(limit.burst);
        let horizon = now.saturating_add(limit.horizon_us());
        let mut seen = tat.load(Ordering::Acquire);
        loop {
            if seen > horizon {
                // Out of reach of this clock (see `Limit::horizon_us`): put
                // back to an empty bucket, so that it refills from now on.
                match tat.compare_exchange_weak(seen, horizon, Ordering::AcqRel, Ordering::Acquire)
                {
                    Ok(_) => seen = horizon,
                    Err(actual) => {
                        seen = actual;
                        continue;
                    }
                }
            }
            let next = seen.max(now).saturating_add(t);
            if next - now > window {
                // Full: the next request fits once `next - window` has passed.
                let wait = next - window - now;
                return Decision {
                    allowed: false,
                    limit: limit.burst,
                    remaining: 0,
                    reset_secs: (seen.max(now) - now).div_ceil(1_000_000),
                    retry_after_secs: wait.div_ceil(1_000_000).max(1),
                };
            }
            let decision = Decision {
                allowed: true,
                limit: limit.burst,
                remaining: (window - (next - now)) / t,
                reset_secs: (next - now).div_ceil(1_000_000),
                retry_after_secs: 0,
            };
            if !charge {
                return Decision {
                    remaining: decision.remaining + 1,
                    ..decision
                };
            }
            match tat.compare_exchange_weak(seen, next, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return decision,
                Err(actual) => seen = actual,
            }
        }
    }

    /// Charges `tokens` more requests to `client` when they fit within the
    /// limit's debt, atomically; otherwise charges nothing and says when they
    /// would fit. Each token moves the client's next allowed time on by one
    /// interval, so that later requests wait for them (a bulk write counts
    /// each link it creates; the request itself was checked, and charged,
    /// by [`Self::check`]). Two such charges that overlap cannot both use
    /// the same debt: the second finds the first's and is refused.
    pub fn try_charge(
        &self,
        kind: u8,
        client: &[u8],
        limit: Limit,
        now: u64,
        tokens: u64,
    ) -> Result<(), Decision> {
        if tokens == 0 {
            return Ok(());
        }
        let tat = self.find(key_of(kind, client), now);
        let add = limit.interval_us.saturating_mul(tokens);
        let horizon = now.saturating_add(limit.horizon_us());
        let mut seen = tat.load(Ordering::Acquire);
        loop {
            // Beyond the horizon: written under a clock since stepped back
            // (see `Limit::horizon_us`), read as an empty bucket.
            let from = seen.min(horizon).max(now);
            let next = from.saturating_add(add);
            if next > horizon {
                return Err(Decision {
                    allowed: false,
                    limit: limit.burst,
                    remaining: 0,
                    reset_secs: (from - now).div_ceil(1_000_000),
                    retry_after_secs: (next - horizon).div_ceil(1_000_000).max(1),
                });
            }
            match tat.compare_exchange_weak(seen, next, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return Ok(()),
                Err(actual) => seen = actual,
            }
        }
    }

    /// Gives back `tokens` charged by [`Self::try_charge`] for work that
    /// was not done after all (a bulk write that failed to save); the next
    /// allowed time never goes back before `now`.
    pub fn refund(&self, kind: u8, client: &[u8], limit: Limit, now: u64, tokens: u64) {
        if tokens == 0 {
            return;
        }
        let tat = self.find(key_of(kind, client), now);
        let sub = limit.interval_us.saturating_mul(tokens);
        let mut seen = tat.load(Ordering::Acquire);
        loop {
            let next = seen.saturating_sub(sub).max(now);
            if next >= seen {
                return;
            }
            match tat.compare_exchange_weak(seen, next, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return,
                Err(actual) => seen = actual,
            }
        }
    }

    /// Writes the table's pages to disk (the kernel does so anyway; this is
    /// for a clean shutdown before a machine is powered off).
    pub fn flush(&self) {
        self.slots.flush();
    }
}

/// The 64-bit key of `client` in limiter `kind`: the store's fixed hash (the
/// same on every build, so a restarted process finds its clients), never 0.
fn key_of(kind: u8, client: &[u8]) -> u64 {
    let mut buf = [0u8; 80];
    let n = client.len().min(buf.len() - 1);
    buf[0] = kind;
    buf[1..=n].copy_from_slice(&client[..n]);
    let h = if client.len() < buf.len() {
        code_hash(&buf[..=n])
    } else {
        code_hash(client) ^ u64::from(kind).rotate_left(56)
    };
    h.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> (tempfile::TempDir, LimiterTable) {
        let dir = tempfile::tempdir().unwrap();
        let t = LimiterTable::open(&dir.path().join("s/rl.bin"), 64).unwrap();
        (dir, t)
    }

    #[test]
    fn burst_then_refill() {
        let (_d, t) = table();
        let limit = Limit::per_second(10, 3); // 100 ms per request
        let now = 1_000_000_000;
        let d: Vec<_> = (0..4).map(|_| t.check(1, b"a", limit, now)).collect();
        assert_eq!(
            d.iter()
                .map(|d| (d.allowed, d.remaining))
                .collect::<Vec<_>>(),
            [(true, 2), (true, 1), (true, 0), (false, 0)]
        );
        assert_eq!(d[3].retry_after_secs, 1);
        // Another client and another kind are untouched.
        assert!(t.check(1, b"b", limit, now).allowed);
        assert!(t.check(2, b"a", limit, now).allowed);
        // 100 ms later one more fits, then none.
        assert!(t.check(1, b"a", limit, now + 100_000).allowed);
        assert!(!t.check(1, b"a", limit, now + 100_000).allowed);
        // Peeking never charges.
        for _ in 0..10 {
            assert!(t.peek(1, b"c", limit, now).allowed);
        }
        assert_eq!(t.peek(1, b"c", limit, now).remaining, 3);
    }

    /// Rates that are not a whole number of milliseconds per request are
    /// kept: 600/s lets 600 through in a second after the burst, not 1000
    /// (with a burst of at least 2: a burst of 1 tolerates no jitter, so a
    /// client polled every millisecond, as here, gets one per 2 ms).
    #[test]
    fn fine_rates_are_exact() {
        let (_d, t) = table();
        for (rate, burst) in [(600u64, 2u64), (300, 5), (2_500, 10), (100_000, 200)] {
            let limit = Limit::per_second(rate, burst);
            let client = rate.to_le_bytes();
            let start = 50_000_000_000;
            let allowed: u64 = (0..1000u64)
                .map(|ms| {
                    let mut n = 0;
                    while t.check(1, &client, limit, start + ms * 1_000).allowed {
                        n += 1;
                    }
                    n
                })
                .sum();
            // The burst at the start, then the rate for the rest of 1 s.
            let want = burst + rate * 999 / 1000;
            assert!(
                allowed.abs_diff(want) <= 1,
                "{rate}/s: {allowed} allowed, {want} expected"
            );
            assert_eq!(limit.rate_per_second(), rate);
        }
    }

    #[test]
    fn state_survives_reopening_and_bad_files_are_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rl.bin");
        let limit = Limit::per_window(1, 60_000, 2);
        let now = 5_000_000_000;
        {
            let t = LimiterTable::open(&path, 64).unwrap();
            assert!(t.check(7, b"k", limit, now).allowed);
            assert!(t.check(7, b"k", limit, now).allowed);
            assert!(!t.check(7, b"k", limit, now).allowed);
            t.flush();
        }
        let t = LimiterTable::open(&path, 64).unwrap();
        let d = t.check(7, b"k", limit, now + 1_000_000);
        assert!(!d.allowed, "still limited after reopening");
        assert_eq!(d.retry_after_secs, 59);
        drop(t);
        // A different size or garbage: replaced, empty.
        let t = LimiterTable::open(&path, 128).unwrap();
        assert!(t.check(7, b"k", limit, now).allowed);
        drop(t);
        std::fs::write(&path, b"garbage").unwrap();
        let t = LimiterTable::open(&path, 64).unwrap();
        assert!(t.check(7, b"k", limit, now).allowed);
    }

    #[test]
    fn a_full_table_evicts_the_least_limited_client() {
        let (_d, t) = table();
        let limit = Limit::per_window(1, 60_000, 1);
        let now = 10_000_000_000;
        for i in 0..1_000u32 {
            t.check(1, &i.to_le_bytes(), limit, now + u64::from(i) * 1_000);
        }
        // The most recent clients are still limited.
        assert!(
            !t.check(1, &999u32.to_le_bytes(), limit, now + 999_000)
                .allowed
        );
    }

    /// A file of another format is replaced by a new file, not rewritten:
    /// a process that still maps the old one (an earlier version during a
    /// graceful upgrade) keeps reading it, unchanged.
    #[test]
    fn replacing_a_file_leaves_its_old_mappings_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rl.bin");
        let limit = Limit::per_window(1, 60_000, 1);
        let old = LimiterTable::open(&path, 64).unwrap();
        assert!(old.check(3, b"x", limit, 1_000_000).allowed);
        // Another size: a new, empty table under the same name.
        let new = LimiterTable::open(&path, 128).unwrap();
        assert!(new.check(3, b"x", limit, 1_000_000).allowed, "empty");
        assert!(
            !old.check(3, b"x", limit, 1_000_000).allowed,
            "the old map is intact"
        );
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            (crate::state_file::LAYOUT.0 + 128 * crate::state_file::LAYOUT.1) as u64
        );
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "no temporary file is left");
    }

    /// A key whose probe window runs past `usize::MAX` wraps round the
    /// table like any other (the range `key..key + PROBE` overflowed: a
    /// panic in a debug build; in a release build an empty probe, so the
    /// client's slot was reset to a full bucket on every request).
    #[test]
    fn keys_at_the_top_of_the_hash_range_are_limited() {
        let (_d, t) = table();
        let now = 1_000_000_000;
        for key in [u64::MAX, u64::MAX - 3, u64::MAX - PROBE as u64 + 1] {
            t.find(key, now).store(now + 42, Ordering::Relaxed);
            assert_eq!(
                t.find(key, now).load(Ordering::Relaxed),
                now + 42,
                "key {key:#x} keeps its slot"
            );
        }
    }

    /// A TAT further ahead than the limit can put one (the wall clock was
    /// stepped back after it was written, or the file holds garbage) counts
    /// as an empty bucket, not as a ban until that time comes round again.
    #[test]
    fn a_clock_stepped_back_does_not_ban_for_the_step() {
        let (_d, t) = table();
        let limit = Limit::per_second(10, 3); // 100 ms per request
        let now = 1_000_000_000_000;
        let hour = 3_600_000_000;
        // One request while the clock is an hour ahead...
        assert!(t.check(1, b"a", limit, now + hour).allowed);
        // ...then the clock is put right.
        let d = t.check(1, b"a", limit, now);
        assert!(d.retry_after_secs <= 1, "{d:?}");
        assert!(d.reset_secs <= 1, "{d:?}");
        assert!(t.check(1, b"a", limit, now + 300_000).allowed);
        // The same for a charged debt: bounded by what `try_charge` may add.
        let limit = Limit::per_second(10, 3).with_max_debt(5);
        t.try_charge(1, b"b", limit, now + hour, 5).unwrap();
        let d = t.check(1, b"b", limit, now);
        assert!(!d.allowed);
        assert!(d.retry_after_secs <= 1, "{d:?}");
        // A legitimate debt is kept: 5 charged beyond a full burst wait 0.5 s.
        for _ in 0..3 {
            assert!(t.check(1, b"c", limit, now).allowed);
        }
        t.try_charge(1, b"c", limit, now, 5).unwrap();
        assert!(!t.check(1, b"c", limit, now + 500_000).allowed);
        assert!(t.check(1, b"c", limit, now + 600_000).allowed);
    }

    /// A debt is taken whole or not at all, so two bulk writes let in at the
    /// same time cannot both run one up: the second is refused, charging
    /// nothing, and told when its links would fit. A refund gives the
    /// tokens back, never before now.
    #[test]
    fn a_debt_is_charged_once_not_once_per_overlapping_request() {
        let (_d, t) = table();
        let limit = Limit::per_second(10, 2).with_max_debt(5); // 100 ms each
        let now = 1_000_000_000_000;
        // Two requests let in at once (the burst), then each asks for 5 more.
        assert!(t.check(1, b"k", limit, now).allowed);
        assert!(t.check(1, b"k", limit, now).allowed);
        assert_eq!(t.try_charge(1, b"k", limit, now, 5), Ok(()));
        let refused = t.try_charge(1, b"k", limit, now, 5).unwrap_err();
        assert!(!refused.allowed);
        assert_eq!(refused.retry_after_secs, 1, "{refused:?}");
        // Only the first debt was taken: 2 + 5 tokens, 700 ms.
        assert!(!t.check(1, b"k", limit, now + 500_000).allowed);
        assert!(t.check(1, b"k", limit, now + 600_000).allowed);
        // A refund takes a charge back, and never below now.
        let (_d, t) = table();
        assert!(t.check(1, b"r", limit, now).allowed);
        t.try_charge(1, b"r", limit, now, 5).unwrap();
        t.refund(1, b"r", limit, now, 5);
        assert!(t.check(1, b"r", limit, now).allowed);
        t.refund(1, b"r", limit, now, 50);
        let d = t.check(1, b"r", limit, now);
        assert_eq!(
            (d.allowed, d.remaining),
            (true, 1),
            "a full bucket, no more"
        );
    }

    /// A state file with a valid header whose slot holds a TAT at the end
    /// of time: the client is limited for a moment, not for ever.
    #[test]
    fn a_garbage_tat_in_the_file_is_not_a_ban_for_ever() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rl.bin");
        let limit = Limit::per_second(10, 3);
        let now = 1_000_000_000_000;
        {
            let t = LimiterTable::open(&path, 64).unwrap();
            assert!(t.check(1, b"a", limit, now).allowed);
        }
        // Damage every TAT in the file.
        let mut bytes = std::fs::read(&path).unwrap();
        let (header_len, slot_len) = crate::state_file::LAYOUT;
        for slot in bytes[header_len..].chunks_mut(slot_len) {
            if slot[..8] != [0; 8] {
                slot[8..].copy_from_slice(&u64::MAX.to_le_bytes());
            }
        }
        std::fs::write(&path, &bytes).unwrap();
        let t = LimiterTable::open(&path, 64).unwrap();
        let d = t.check(1, b"a", limit, now);
        assert!(d.retry_after_secs <= 1, "{d:?}");
        assert!(t.check(1, b"a", limit, now + 300_000).allowed);
    }

    #[test]
    fn two_mappings_of_one_file_share_state() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rl.bin");
        let a = LimiterTable::open(&path, 64).unwrap();
        let b = LimiterTable::open(&path, 64).unwrap();
        let limit = Limit::per_window(1, 60_000, 1);
        assert!(a.check(3, b"x", limit, 1_000_000).allowed);
        assert!(!b.check(3, b"x", limit, 1_000_000).allowed);
    }
}
