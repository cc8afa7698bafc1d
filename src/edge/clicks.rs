//! Click budgets: a link created with `max_clicks: N` redirects N times,
//! then answers as a miss (`exhausted`), as an expired link does.
//!
//! The edge counts, since only it sees the clicks: one `u64` per budgeted
//! link in a [`crate::state_file`] table (`edge-clicks.bin` in
//! `rate_limit.state_dir`), so that the counts survive a restart and are
//! shared, live, by the old and the new process of a graceful upgrade. A
//! slot is a key (the link's code and creation time, hashed: a link deleted
//! and created again under its code starts afresh, a changed budget keeps
//! the count) and the clicks counted. Counting is a probe and a
//! compare-and-swap; links without a budget never reach it.
//!
//! What counts: a `GET` answered with the redirect. A `HEAD` looks (it gets
//! the redirect while clicks are left) and spends nothing; misses and
//! refusals spend nothing. The count never passes the budget, so raising a
//! spent link's budget gives it exactly the clicks added.
//!
//! Slots are never given back (the table cannot tell a deleted link's slot
//! from a live one's). When a budgeted link finds no slot (about 90% of
//! `edge.click_slots` can be used, see `PROBE`), it is answered as spent:
//! a budget is a promise of at most N clicks. `edge_click_slots_full_total` counts
//! those answers; a new `edge.click_slots` carries the counts over to a
//! table of the new size, and removing the file (edge stopped) starts every
//! count afresh. Behind several edges with their own state dirs, each
//! counts its own clicks.

use std::path::Path;
use std::sync::atomic::Ordering;

use prometheus::IntCounter;

use crate::state_file::{Format, SlotFile, StateError};
use crate::store::hash::code_hash;

const FORMAT: Format = Format {
    what: "click counts",
    magic: b"ULOADCK1",
    version: 1,
};
/// Slots probed for a link's count (at most the table's size). Slots are
/// never freed and a count goes in the first free slot from its hash on, so
/// taken slots gather in runs; with 16 a new link found no room once about
/// half the table was taken. With 1,024, about 90% of it can be used
/// (linear probing, simulated: 91% of 262,144 slots before the first link
/// without room), and a lookup still reads at most 16 KiB.
const PROBE: usize = 1024;

/// What a click came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Click {
    /// Within the budget (and counted, if it was to be).
    Allowed,
    /// The budget is spent.
    Spent,
    /// No slot for the link's count: answered as spent.
    NoRoom,
}

/// The edge's click counts.
#[derive(Debug)]
pub struct ClickTable {
    slots: SlotFile,
    full: IntCounter,
}

impl ClickTable {
    /// Maps `path` (created with room for `slots` links' counts when
    /// missing or unusable).
    ///
    /// A file of another size (`edge.click_slots` changed) has its counts
    /// carried over into the new table: a spent budget must stay spent.
    pub fn open(path: &Path, slots: usize) -> Result<Self, StateError> {
        let carried = crate::state_file::entries_of_another_size(path, &FORMAT, slots);
        let table = Self {
            slots: SlotFile::open(path, &FORMAT, slots)?,
            full: IntCounter::new(
                "edge_click_slots_full_total",
                "Requests for a link with a click budget answered as spent because the click table had no room for its count (edge.click_slots).",
            )
            .expect("a valid metric name"),
        };
        if let Some(entries) = carried {
            let (mut kept, mut lost) = (0u64, 0u64);
            for (key, count) in entries {
                match table.find(key, true) {
                    Slot::Found(slot) => {
                        slot.fetch_max(count, Ordering::AcqRel);
                        kept += 1;
                    }
                    Slot::Absent | Slot::Full => lost += 1,
                }
            }
            if lost > 0 {
                tracing::warn!(kept, lost, path = %path.display(), "click counts carried over to a smaller table; {lost} did not fit (those links count afresh)");
            } else {
                tracing::info!(kept, path = %path.display(), "click counts carried over to a table of {} slots", table.slots.len());
            }
        }
        Ok(table)
    }

    /// The counter of [`Click::NoRoom`] answers, for the edge's registry.
    pub fn full_counter(&self) -> IntCounter {
        self.full.clone()
    }

    /// A click on the link `key` ([`click_key`]) whose budget is `budget`
    /// clicks: allowed while fewer than `budget` were counted, and counted
    /// when `take` (a GET; a HEAD only looks).
    pub fn click(&self, key: u64, budget: u64, take: bool) -> Click {
        let count = match self.find(key, take) {
            Slot::Found(count) => count,
            // Never counted (a HEAD only looks): all of its budget is left.
            Slot::Absent => {
                return if budget > 0 {
                    Click::Allowed
                } else {
                    Click::Spent
                };
            }
            // A HEAD answers what a GET would: no room to count it.
            Slot::Full => {
                self.full.inc();
                return Click::NoRoom;
            }
        };
        let mut seen = count.load(Ordering::Acquire);
        loop {
            if seen >= budget {
                return Click::Spent;
            }
            if !take {
                return Click::Allowed;
            }
            match count.compare_exchange_weak(seen, seen + 1, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return Click::Allowed,
                Err(actual) => seen = actual,
            }
        }
    }

    /// The count of `key`: its slot, claimed (when `claim`) if it has none.
    fn find(&self, key: u64, claim: bool) -> Slot<'_> {
        let start = key as usize;
        for i in (0..PROBE.min(self.slots.len())).map(|n| start.wrapping_add(n)) {
            let (k, count) = self.slots.slot(i);
            let mut seen = k.load(Ordering::Acquire);
            if seen == 0 && claim {
                // Two processes (or threads) may claim at once: one wins the
                // slot, the other finds it taken, by this key or another.
                seen = match k.compare_exchange(0, key, Ordering::AcqRel, Ordering::Acquire) {
                    Ok(_) => key,
                    Err(actual) => actual,
                };
            }
            if seen == key {
                return Slot::Found(count);
            }
            if seen == 0 {
                return Slot::Absent; // a probe ends at an empty slot
            }
        }
        Slot::Full
    }
}

/// Where a link's count is, as [`ClickTable::find`] found it.
enum Slot<'a> {
    Found(&'a std::sync::atomic::AtomicU64),
    /// Not counted yet, and not claimed (a look only): room is left for it.
    Absent,
    /// Not counted, and every slot it may take is another link's.
    Full,
}

/// The key of a link's count: its code and creation time (ms since the
/// epoch), hashed with the store's fixed hash (the same on every build), so
/// that a restarted edge finds its counts. Never 0 (an empty slot).
pub fn click_key(code: &[u8], created_at_ms: u64) -> u64 {
    (code_hash(code) ^ created_at_ms.wrapping_mul(0x9E37_79B9_7F4A_7C15)).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(slots: usize) -> (tempfile::TempDir, ClickTable) {
        let dir = tempfile::tempdir().unwrap();
        let t = ClickTable::open(&dir.path().join("s/clicks.bin"), slots).unwrap();
        (dir, t)
    }

    #[test]
    fn a_budget_allows_that_many_gets_and_heads_spend_nothing() {
        let (_d, t) = table(64);
        let key = click_key(b"abc", 1_700_000_000_000);
        assert_eq!(t.click(key, 3, false), Click::Allowed); // a HEAD first
        let gets: Vec<Click> = (0..5).map(|_| t.click(key, 3, true)).collect();
        use Click::*;
        assert_eq!(gets, [Allowed, Allowed, Allowed, Spent, Spent]);
        assert_eq!(t.click(key, 3, false), Spent);
        // A raised budget gives exactly the clicks added.
        let more: Vec<Click> = (0..3).map(|_| t.click(key, 5, true)).collect();
        assert_eq!(more, [Allowed, Allowed, Spent]);
        // Another link, or the same code created again, counts afresh.
        assert_eq!(
            t.click(click_key(b"abc", 1_700_000_000_001), 1, true),
            Allowed
        );
        assert_eq!(
            t.click(click_key(b"abd", 1_700_000_000_000), 1, true),
            Allowed
        );
        assert_eq!(t.full.get(), 0);
    }

    #[test]
    fn counts_survive_reopening_and_are_shared_by_two_mappings() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("clicks.bin");
        let key = click_key(b"x", 1);
        {
            let a = ClickTable::open(&path, 64).unwrap();
            let b = ClickTable::open(&path, 64).unwrap();
            assert_eq!(a.click(key, 2, true), Click::Allowed);
            assert_eq!(b.click(key, 2, true), Click::Allowed);
            assert_eq!(a.click(key, 2, true), Click::Spent);
        }
        let c = ClickTable::open(&path, 64).unwrap();
        assert_eq!(c.click(key, 2, true), Click::Spent);
        assert_eq!(c.click(key, 3, true), Click::Allowed);
    }

    #[test]
    fn concurrent_clicks_never_pass_the_budget() {
        let (_d, t) = table(64);
        let t = std::sync::Arc::new(t);
        let key = click_key(b"hot", 7);
        let allowed: usize = (0..4)
            .map(|_| {
                let t = t.clone();
                std::thread::spawn(move || {
                    (0..1000)
                        .filter(|_| t.click(key, 1500, true) == Click::Allowed)
                        .count()
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|h| h.join().unwrap())
            .sum();
        assert_eq!(allowed, 1500);
    }

    #[test]
    fn a_full_table_answers_spent_and_counts_it() {
        let (_d, t) = table(64);
        // Every slot taken by other links (keys 1..=64 fill slots 1..=64 mod 64).
        for key in 1..=64u64 {
            assert_eq!(t.click(key, 10, true), Click::Allowed);
        }
        let newcomer = 64 * 1000 + 5;
        // A HEAD only looks, and answers what a GET would: no room (it got
        // the redirect, which the GET after it did not).
        assert_eq!(t.click(newcomer, 10, false), Click::NoRoom);
        assert_eq!(t.click(newcomer, 10, true), Click::NoRoom);
        assert_eq!(t.full.get(), 2);
        // With room left, a HEAD of a link never clicked has all its budget.
        let (_d, roomy) = table(64);
        assert_eq!(roomy.click(newcomer, 10, false), Click::Allowed);
        assert_eq!(roomy.click(newcomer, 0, false), Click::Spent);
        // The links already counted go on being counted.
        assert_eq!(t.click(7, 10, true), Click::Allowed);
    }

    /// A table three quarters full still has room for every new link: with
    /// a probe of 16 slots, budgeted links were answered as spent (a 404
    /// before their first click) once about half of it was taken (review:
    /// the first of 140 refusals of 12,288 links at 8,399 of 16,384 slots).
    #[test]
    fn a_table_three_quarters_full_has_room_for_another_link() {
        let (_d, t) = table(1 << 14);
        let links = (1 << 14) * 3 / 4;
        let no_room: Vec<usize> = (0..links)
            .filter(|&i| {
                let key = click_key(format!("c{i:06}").as_bytes(), 1_700_000_000_000 + i as u64);
                t.click(key, 10, true) == Click::NoRoom
            })
            .collect();
        assert!(
            no_room.is_empty(),
            "{} of {links} links found no room: {:?}",
            no_room.len(),
            &no_room[..no_room.len().min(5)]
        );
    }

    /// Raising `edge.click_slots` (what the runbook says to do when the
    /// table is full) carries every count over to the new table: a spent
    /// budget stays spent (it started empty: every budget was whole again),
    /// and so does one partly spent. Lowering it keeps what fits.
    #[test]
    fn a_new_table_size_keeps_the_counts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("clicks.bin");
        let spent = click_key(b"promo", 1_700_000_000_000);
        let half = click_key(b"half", 1_700_000_000_001);
        {
            let t = ClickTable::open(&path, 64).unwrap();
            assert_eq!(t.click(spent, 1, true), Click::Allowed);
            assert_eq!(t.click(spent, 1, true), Click::Spent);
            assert_eq!(t.click(half, 4, true), Click::Allowed);
            assert_eq!(t.click(half, 4, true), Click::Allowed);
        }
        // Raised: both counts came along; `half` has two clicks left.
        let t = ClickTable::open(&path, 128).unwrap();
        assert_eq!(t.slots.len(), 128);
        assert_eq!(t.click(spent, 1, true), Click::Spent);
        assert_eq!(t.click(half, 4, true), Click::Allowed);
        assert_eq!(t.click(half, 4, true), Click::Allowed);
        assert_eq!(t.click(half, 4, true), Click::Spent);
        drop(t);
        // Lowered again: what was counted in the larger table came back.
        let t = ClickTable::open(&path, 64).unwrap();
        assert_eq!(t.slots.len(), 64);
        assert_eq!(t.click(spent, 1, false), Click::Spent);
        assert_eq!(t.click(half, 4, false), Click::Spent);
    }
}
