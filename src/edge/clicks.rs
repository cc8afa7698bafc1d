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
//! table of the new size (during a graceful upgrade the old edge then moves
//! to the new table, and what it counted in the old one meanwhile is folded
//! in: see `ClickTable::current` and `Previous`),
//! and removing the file (edge stopped) starts every count afresh. Behind
//! several edges with their own state dirs, each counts its own clicks.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
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
    /// The table in use: replaced (once) when a newer edge puts a table of
    /// another size in its place during a graceful upgrade, so that both
    /// edges then count in the same one.
    slots: ArcSwap<SlotFile>,
    /// Held while moving to a replacing table (not `previous`'s lock: a
    /// fold, which holds that, counts through `current`).
    moving: Mutex<()>,
    /// When this table was opened, and (in ms since then) when a move that
    /// found no table to move to may be tried again.
    opened: Instant,
    move_after_ms: AtomicU64,
    path: PathBuf,
    full: IntCounter,
    /// Set while `previous` holds a table still in use by another process.
    folding: AtomicBool,
    previous: Mutex<Option<Previous>>,
}

/// The table of another size this one replaced (`edge.click_slots`
/// changed), while the process that had it (the old edge of a graceful
/// upgrade, serving its kept-alive connections) may still count clicks in
/// it: each of those is folded into this table before a click of the same
/// link is decided here, and all of them once that process is gone.
#[derive(Debug)]
struct Previous {
    file: SlotFile,
    /// Each link's count in `file` as last folded in.
    folded: HashMap<u64, u64>,
    /// When `file` was last checked for another process holding it.
    checked: Instant,
}

/// How often a fold checks whether the old table is still in use.
const PREVIOUS_CHECK: Duration = Duration::from_millis(100);

impl ClickTable {
    /// Maps `path` (created with room for `slots` links' counts when
    /// missing or unusable).
    ///
    /// A file of another size (`edge.click_slots` changed) has its counts
    /// carried over into the new table: a spent budget must stay spent.
    pub fn open(path: &Path, slots: usize) -> Result<Self, StateError> {
        // Mapped before `SlotFile::open` renames a new file over it.
        let previous = SlotFile::of_another_size(path, &FORMAT, slots);
        let opened = SlotFile::open(path, &FORMAT, slots)?;
        let Some(file) = previous else {
            return Ok(Self::with(opened, path));
        };
        if opened.in_memory() {
            // The new table could not be written (no space, a state dir it
            // cannot create files in): the old one, still at the path and
            // still shared with any other edge, is better than one in
            // memory, which no other edge would see.
            tracing::warn!(path = %path.display(), "click counts: a table of {} slots cannot be written; going on with the one of {} slots", opened.len(), file.len());
            file.lock_shared();
            return Ok(Self::with(file, path));
        }
        let table = Self::with(opened, path);
        let mut previous = Previous {
            file,
            folded: HashMap::new(),
            checked: Instant::now(),
        };
        let (kept, lost) = table.fold_all(&mut previous);
        // Only now, with every count copied: an old edge of this version
        // moves to the new table at its next click, and what it counted in
        // the old one until then is folded in below while it holds that
        // table. (One of an earlier version neither moves nor locks: its
        // later clicks are not seen here.)
        previous.file.mark_replaced();
        if lost > 0 {
            tracing::warn!(kept, lost, path = %path.display(), "click counts carried over to a smaller table; {lost} did not fit (those links count afresh)");
        } else {
            tracing::info!(kept, path = %path.display(), "click counts carried over to a table of {} slots", table.slots.load().len());
        }
        if previous.file.in_use_elsewhere() {
            tracing::info!(path = %path.display(), "the old click table is still in use (an upgrade): its new clicks are folded in until it is not");
            *table.lock_previous() = Some(previous);
            table.folding.store(true, Ordering::Release);
        }
        Ok(table)
    }

    fn with(slots: SlotFile, path: &Path) -> Self {
        Self {
            slots: ArcSwap::from_pointee(slots),
            moving: Mutex::new(()),
            opened: Instant::now(),
            move_after_ms: AtomicU64::new(0),
            path: path.to_owned(),
            full: IntCounter::new(
                "edge_click_slots_full_total",
                "Requests for a link with a click budget answered as spent because the click table had no room for its count (edge.click_slots).",
            )
            .expect("a valid metric name"),
            folding: AtomicBool::new(false),
            previous: Mutex::new(None),
        }
    }

    fn lock_previous(&self) -> std::sync::MutexGuard<'_, Option<Previous>> {
        // A panic while folding leaves nothing half-done that matters: at
        // worst a count folded twice, which errs towards spent.
        self.previous.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Folds into this table what `previous` counted since its last fold,
    /// for every link: (links folded, links with no room here).
    fn fold_all(&self, previous: &mut Previous) -> (u64, u64) {
        let (mut kept, mut lost) = (0u64, 0u64);
        for (key, count) in previous.file.entries() {
            if self.fold(previous, key, count) {
                kept += 1;
            } else {
                lost += 1;
            }
        }
        (kept, lost)
    }

    /// Adds to `key`'s count here what the previous table counted for it
    /// since the last fold (`count` there now); false if it has no room.
    fn fold(&self, previous: &mut Previous, key: u64, count: u64) -> bool {
        let folded = previous.folded.entry(key).or_insert(0);
        let new = count.saturating_sub(*folded);
        *folded = count;
        if new == 0 {
            return true;
        }
        match probe(&self.current(), key, true) {
            Slot::Found(slot) => {
                slot.fetch_add(new, Ordering::AcqRel);
                true
            }
            Slot::Absent | Slot::Full => false,
        }
    }

    /// Before a click of `key` is decided: the clicks the old table got for
    /// it meanwhile; every one, and the old table let go, once no other
    /// process holds it.
    fn fold_previous(&self, key: u64) {
        let mut guard = self.lock_previous();
        let Some(previous) = guard.as_mut() else {
            return;
        };
        if previous.checked.elapsed() >= PREVIOUS_CHECK {
            previous.checked = Instant::now();
            if !previous.file.in_use_elsewhere() {
                self.fold_all(previous);
                *guard = None;
                self.folding.store(false, Ordering::Release);
                tracing::info!(
                    "the old click table is no longer in use; its last clicks folded in"
                );
                return;
            }
        }
        if let Slot::Found(count) = probe(&previous.file, key, false) {
            let count = count.load(Ordering::Acquire);
            self.fold(previous, key, count);
        }
    }

    /// The counter of [`Click::NoRoom`] answers, for the edge's registry.
    pub fn full_counter(&self) -> IntCounter {
        self.full.clone()
    }

    /// A click on the link `key` ([`click_key`]) whose budget is `budget`
    /// clicks: allowed while fewer than `budget` were counted, and counted
    /// when `take` (a GET; a HEAD only looks).
    pub fn click(&self, key: u64, budget: u64, take: bool) -> Click {
        if self.folding.load(Ordering::Acquire) {
            self.fold_previous(key);
        }
        let slots = self.current();
        let count = match probe(&slots, key, take) {
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

    fn since_open_ms(&self) -> u64 {
        self.opened.elapsed().as_millis() as u64
    }

    /// The table to count in: the one now at the path, if a newer edge
    /// replaced the one this process had.
    fn current(&self) -> arc_swap::Guard<Arc<SlotFile>> {
        let slots = self.slots.load();
        if !slots.replaced() || self.since_open_ms() < self.move_after_ms.load(Ordering::Relaxed) {
            return slots;
        }
        drop(slots);
        // Rare: once per upgrade that changes `edge.click_slots`.
        let _one_at_a_time = self.moving.lock().unwrap_or_else(|e| e.into_inner());
        let slots = self.slots.load();
        if slots.replaced() {
            match SlotFile::existing(&self.path, &FORMAT) {
                Some(next) if !next.replaced() => {
                    next.lock_shared();
                    tracing::info!(path = %self.path.display(), slots = next.len(), "click counts: a newer edge replaced the table; counting in its table from now on");
                    self.slots.store(Arc::new(next));
                }
                // Gone or not a table: go on with this one (counted by a
                // newer edge's fold, if there is one), and look again in a
                // second, not at every click.
                _ => self
                    .move_after_ms
                    .store(self.since_open_ms() + 1_000, Ordering::Relaxed),
            }
        }
        self.slots.load()
    }
}

/// The count of `key` in `slots`: its slot, claimed (when `claim`) if it
/// has none.
fn probe(slots: &SlotFile, key: u64, claim: bool) -> Slot<'_> {
    let start = key as usize;
    for i in (0..PROBE.min(slots.len())).map(|n| start.wrapping_add(n)) {
        let (k, count) = slots.slot(i);
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
        assert_eq!(t.slots.load().len(), 128);
        assert_eq!(t.click(spent, 1, true), Click::Spent);
        assert_eq!(t.click(half, 4, true), Click::Allowed);
        assert_eq!(t.click(half, 4, true), Click::Allowed);
        assert_eq!(t.click(half, 4, true), Click::Spent);
        drop(t);
        // Lowered again: what was counted in the larger table came back.
        let t = ClickTable::open(&path, 64).unwrap();
        assert_eq!(t.slots.load().len(), 64);
        assert_eq!(t.click(spent, 1, false), Click::Spent);
        assert_eq!(t.click(half, 4, false), Click::Spent);
    }
    /// A graceful upgrade that changes `edge.click_slots`: the new edge
    /// carries the old table's counts over and marks the old table
    /// replaced; the old edge moves to the new table at its next click, so
    /// both decide on one count. A click the old edge counted in the old
    /// table meanwhile (a request in flight as it moved) is folded in before
    /// the new edge decides on that link, and every such click once the old
    /// table is let go. Found by review, twice: a budget of 2 redirected 3
    /// times, the third from either edge.
    #[test]
    fn both_edges_count_in_one_table_across_a_resize() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("clicks.bin");
        let key = click_key(b"promo", 1_700_000_000_000);
        let other = click_key(b"other", 1_700_000_000_000);
        let third = click_key(b"third", 1_700_000_000_000);
        let old = ClickTable::open(&path, 64).unwrap();
        // The old table as a request in flight in the old edge holds it.
        let in_flight = SlotFile::existing(&path, &FORMAT).unwrap();
        in_flight.lock_shared();
        assert_eq!(old.click(key, 3, true), Click::Allowed); // 1 (old edge)
        // The new edge starts with a larger table; the old one still serves.
        let new = ClickTable::open(&path, 128).unwrap();
        assert_eq!(new.slots.load().len(), 128);
        assert!(new.folding.load(Ordering::Acquire));
        assert_eq!(old.click(key, 3, true), Click::Allowed); // 2 (old edge)
        assert_eq!(old.slots.load().len(), 128, "the old edge moved");
        assert_eq!(new.click(key, 3, true), Click::Allowed); // 3 (new edge)
        assert_eq!(old.click(key, 3, true), Click::Spent);
        assert_eq!(new.click(key, 3, true), Click::Spent);
        // Counted in the old table as the old edge moved: folded in.
        let count_in_old = |code: u64, n: u64| match probe(&in_flight, code, true) {
            Slot::Found(c) => c.fetch_add(n, Ordering::AcqRel),
            _ => panic!("no room in the old table"),
        };
        count_in_old(other, 2);
        assert_eq!(new.click(other, 3, true), Click::Allowed); // 2 + 1
        assert_eq!(new.click(other, 3, true), Click::Spent);
        assert_eq!(old.click(other, 3, true), Click::Spent);
        // The old edge lets the old table go; at the next check everything
        // counted there is folded in (`third`, never clicked here), and the
        // old table is dropped.
        count_in_old(third, 1);
        drop(old);
        drop(in_flight);
        new.lock_previous().as_mut().unwrap().checked -= PREVIOUS_CHECK;
        assert_eq!(new.click(key, 5, false), Click::Allowed);
        assert!(!new.folding.load(Ordering::Acquire));
        assert!(new.lock_previous().is_none());
        let third_count = match probe(&new.current(), third, false) {
            Slot::Found(c) => c.load(Ordering::Acquire),
            _ => panic!("third's count was not folded in"),
        };
        assert_eq!(third_count, 1);
    }

    /// The old edge of a resizing upgrade must not decide on the old table
    /// alone, which never sees the clicks the new edge counts in the new
    /// one: a budget the new edge spent was whole again on a connection the
    /// old edge still served (a budget of 2 redirected 3 times, and up to
    /// 2N; found by review).
    #[test]
    fn the_old_edge_does_not_overspend_a_budget_the_new_edge_spent() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("clicks.bin");
        let key = click_key(b"promo", 1_700_000_000_000);
        let old = ClickTable::open(&path, 64).unwrap();
        // The new edge starts with a larger table; the old one still serves.
        let new = ClickTable::open(&path, 128).unwrap();
        assert_eq!(new.click(key, 2, true), Click::Allowed); // redirect 1 (new edge)
        assert_eq!(new.click(key, 2, true), Click::Allowed); // redirect 2 (new edge)
        assert_eq!(
            old.click(key, 2, true),
            Click::Spent,
            "a third redirect for a budget of 2 (from the old edge)"
        );
    }

    /// With no other process on the old table (a restart with a new size),
    /// the counts are carried over once and nothing is kept to fold from.
    #[test]
    fn a_resize_with_no_one_on_the_old_table_folds_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("clicks.bin");
        let key = click_key(b"promo", 1_700_000_000_000);
        let old = ClickTable::open(&path, 64).unwrap();
        assert_eq!(old.click(key, 2, true), Click::Allowed);
        drop(old);
        let new = ClickTable::open(&path, 256).unwrap();
        assert!(!new.folding.load(Ordering::Acquire));
        assert!(new.lock_previous().is_none());
        assert_eq!(new.click(key, 2, true), Click::Allowed);
        assert_eq!(new.click(key, 2, true), Click::Spent);
    }

    /// The old table is marked replaced only once every count is copied
    /// into the new one: marked before the copy, the old edge, moving at its
    /// next click, could decide on the new table while a link's count was
    /// not in it yet (a budget of 1, already spent, redirected again; found
    /// by review).
    #[test]
    fn the_old_edge_moving_during_the_copy_does_not_overspend() {
        use std::sync::atomic::AtomicBool;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("clicks.bin");
        let old = Arc::new(ClickTable::open(&path, 1 << 16).unwrap());
        // Many links counted (the copy takes a while); the spent one sits in
        // the last slot, so it is copied last.
        for key in 1..60_000u64 {
            assert_eq!(old.click(key, 10, true), Click::Allowed);
        }
        let spent = (1u64 << 16) - 1;
        assert_eq!(old.click(spent, 1, true), Click::Allowed);
        assert_eq!(old.click(spent, 1, true), Click::Spent);
        let done = Arc::new(AtomicBool::new(false));
        // The old edge goes on serving that link.
        let clicker = {
            let (old, done) = (old.clone(), done.clone());
            std::thread::spawn(move || {
                let (mut allowed, mut after) = (0usize, 0);
                while after < 10 {
                    if old.click(spent, 1, true) == Click::Allowed {
                        allowed += 1;
                    }
                    if done.load(Ordering::Acquire) {
                        after += 1;
                    }
                }
                allowed
            })
        };
        // The new edge starts with a larger table.
        let new = ClickTable::open(&path, 1 << 17).unwrap();
        done.store(true, Ordering::Release);
        let by_old = clicker.join().unwrap();
        let by_new = usize::from(new.click(spent, 1, true) == Click::Allowed);
        assert_eq!(
            (by_old, by_new),
            (0, 0),
            "redirects for a budget of 1 already spent (old edge, new edge)"
        );
    }

    /// When the new table cannot be written (no space, a state dir the
    /// edge cannot create files in; here a directory takes the temporary
    /// name), the new edge goes on with the old table at the path, shared
    /// with the old edge, instead of one in memory: it kept one in memory
    /// and marked the old file replaced, so the old edge could not move and
    /// decided on a count the new edge's clicks never reached (found by
    /// review).
    #[test]
    fn a_resize_kept_in_memory_does_not_overspend() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("clicks.bin");
        let key = click_key(b"promo", 1_700_000_000_000);
        let old = ClickTable::open(&path, 64).unwrap();
        let tmp = format!("{}.{}.tmp", path.display(), std::process::id());
        std::fs::create_dir(&tmp).unwrap();
        let new = ClickTable::open(&path, 128).unwrap();
        assert_eq!(new.click(key, 2, true), Click::Allowed); // 1 (new edge)
        assert_eq!(new.click(key, 2, true), Click::Allowed); // 2 (new edge)
        assert_eq!(
            old.click(key, 2, true),
            Click::Spent,
            "a third redirect for a budget of 2 (old edge; its table is marked replaced: {})",
            old.slots.load().replaced()
        );
    }

    /// A table opened for use at its path is never marked replaced: a mark
    /// left on it (here by a failed resize, before the new table kept in
    /// memory stopped marking) sent every budgeted click of a later edge
    /// (a rollback, a restart) through the slow path of `current` for as
    /// long as it ran (found by review).
    #[test]
    fn a_table_opened_for_use_is_not_marked_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("clicks.bin");
        let marked = ClickTable::open(&path, 64).unwrap();
        marked.slots.load().mark_replaced();
        drop(marked);
        let later = ClickTable::open(&path, 64).unwrap();
        assert!(!later.slots.load().replaced());
    }

    /// A table marked replaced whose path then holds no table (removed by
    /// hand): the edge goes on counting in its own table, and tries to move
    /// again only a second later, not at every click.
    #[test]
    fn a_replaced_table_with_nothing_to_move_to_keeps_counting() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("clicks.bin");
        let key = click_key(b"promo", 1_700_000_000_000);
        let t = ClickTable::open(&path, 64).unwrap();
        t.slots.load().mark_replaced();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(t.click(key, 2, true), Click::Allowed);
        assert!(t.move_after_ms.load(Ordering::Relaxed) >= 1_000);
        assert_eq!(t.click(key, 2, true), Click::Allowed);
        assert_eq!(t.click(key, 2, true), Click::Spent);
    }
}
