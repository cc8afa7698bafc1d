//! The in-memory link table: an immutable [`TableView`] (snapshot + overlay of
//! newer log records) published through [`HotTable`], an `ArcSwap`, so that
//! readers never take a lock and never wait for the follower.
//!
//! The overlay has three layers so that publishing stays cheap while records
//! stream in. A published view shares its layers with the writer's working
//! view; the writer copies a layer only when it changes one that a published
//! view still holds, and copying a layer copies pointers (each entry is an
//! `Arc`), never links or codes:
//!
//! - `recent` (at most [`RECENT_MAX`] entries) takes every applied record; it
//!   is copied on the first apply after each publish;
//! - `mid` (at most [`MID_MAX`]) takes `recent` when that is full: one copy
//!   of `mid` per `RECENT_MAX` records;
//! - `base` (unbounded until a snapshot includes its records) takes `mid`
//!   when that is full: one copy of `base` per `MID_MAX` records.
//!
//! With the defaults that is about 32 + 32 + |base| / 4096 pointer copies per
//! record when every record is published on its own (the admin), instead of
//! a copy of a whole map. A lookup probes at most the three layers (skipping
//! empty ones), newest first, then the snapshot. Deletes are tombstones until
//! a snapshot includes them.

use std::borrow::Borrow;
use std::collections::HashSet;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;

use super::frame::LogOpRef;
use super::record::{Link, LinkRef, RecordError};
use super::snapshot::{Snapshot, SnapshotError};

/// An overlay entry: the newest operation on a code. `link: None` is a
/// tombstone. Shared by every layer and view that holds it.
#[derive(Debug)]
struct OverlayEntry {
    seq: u64,
    code: Box<[u8]>,
    link: Option<Link>,
}

/// A layer's element: a shared entry, hashed and compared by its code (as
/// `[u8]` is, so that a layer is probed with `&[u8]`). Cloning it is one
/// reference-count increment.
#[derive(Debug, Clone)]
struct Slot(Arc<OverlayEntry>);

impl Borrow<[u8]> for Slot {
    #[inline]
    fn borrow(&self) -> &[u8] {
        &self.0.code
    }
}

impl Hash for Slot {
    #[inline]
    fn hash<H: Hasher>(&self, state: &mut H) {
        // Must hash exactly as the borrowed form, `[u8]`, does.
        <[u8] as Hash>::hash(&self.0.code, state)
    }
}

impl PartialEq for Slot {
    fn eq(&self, other: &Self) -> bool {
        self.0.code == other.0.code
    }
}

impl Eq for Slot {}

/// One overlay layer. foldhash (randomly seeded per process, several times
/// faster than SipHash on short keys): every snapshot lookup probes the
/// layers first while the overlay is non-empty.
type Layer = HashSet<Slot, foldhash::fast::RandomState>;

/// When `recent` holds this many entries it is merged into `mid`.
pub const RECENT_MAX: usize = 64;
/// When `mid` holds this many entries it is merged into `base`.
pub const MID_MAX: usize = 4096;

/// The layer sizes at which a view merges its layers (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct LayerLimits {
    recent: usize,
    mid: usize,
}

impl Default for LayerLimits {
    fn default() -> Self {
        Self {
            recent: RECENT_MAX,
            mid: MID_MAX,
        }
    }
}

/// An immutable view of the whole link table at one sequence number.
/// Cloning copies four `Arc`s and a few integers.
#[derive(Debug, Clone, Default)]
pub struct TableView {
    snapshot: Option<Arc<Snapshot>>,
    /// Oldest overlay layer; entries here may be shadowed by newer layers.
    base: Arc<Layer>,
    mid: Arc<Layer>,
    /// Newest overlay layer.
    recent: Arc<Layer>,
    seq: u64,
    links: u64,
    last_applied_ms: Option<u64>,
    limits: LayerLimits,
}

/// Copies `src`'s entries (pointers) into `dst`; `src`'s win.
fn merge_into(dst: &mut Layer, src: &Layer) {
    dst.reserve(src.len());
    for slot in src {
        dst.replace(slot.clone());
    }
}

impl TableView {
    /// A view of `snapshot` alone (or of an empty table).
    pub fn new(snapshot: Option<Arc<Snapshot>>) -> Self {
        Self {
            seq: snapshot.as_ref().map_or(0, |s| s.seq()),
            links: snapshot.as_ref().map_or(0, |s| s.len()),
            snapshot,
            ..Default::default()
        }
    }

    /// This view with other layer limits (tests: small limits make every
    /// merge path run with few records). Limits below 1 count as 1.
    #[doc(hidden)]
    pub fn with_layer_limits(mut self, recent: usize, mid: usize) -> Self {
        self.limits = LayerLimits {
            recent: recent.max(1),
            mid: mid.max(1),
        };
        self
    }

    /// The newest overlay entry for `code`, if any layer has one.
    #[inline]
    fn overlay_entry(&self, code: &[u8]) -> Option<&OverlayEntry> {
        for layer in [&self.recent, &self.mid, &self.base] {
            if !layer.is_empty()
                && let Some(slot) = layer.get(code)
            {
                return Some(&slot.0);
            }
        }
        None
    }

    /// Looks a code up: overlay first (newest wins), then the snapshot.
    /// Allocation-free and lock-free.
    #[inline]
    pub fn get(&self, code: &[u8]) -> Option<LinkRef<'_>> {
        if let Some(e) = self.overlay_entry(code) {
            return e.link.as_ref().map(Link::as_ref);
        }
        self.snapshot.as_ref()?.get(code)
    }

    /// [`Snapshot::prefetch`] for the snapshot under the overlay: a lookup
    /// of `code` that comes soon after finds its index slot in cache.
    #[inline]
    pub fn prefetch(&self, code: &[u8]) {
        if let Some(snapshot) = &self.snapshot {
            snapshot.prefetch(code);
        }
    }

    /// Sequence of the last record this view includes.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Number of live links (tombstones and replaced links not counted).
    pub fn len(&self) -> u64 {
        self.links
    }

    /// Whether the table has no links.
    pub fn is_empty(&self) -> bool {
        self.links == 0
    }

    /// The snapshot under the overlay.
    pub fn snapshot(&self) -> Option<&Arc<Snapshot>> {
        self.snapshot.as_ref()
    }

    /// Sequence of the snapshot under the overlay (0 without one).
    pub fn snapshot_seq(&self) -> u64 {
        self.snapshot.as_ref().map_or(0, |s| s.seq())
    }

    /// Entries in the overlay (puts and tombstones newer than the snapshot).
    pub fn overlay_len(&self) -> usize {
        let in_older = |code: &[u8], older: &[&Arc<Layer>]| older.iter().any(|l| l.contains(code));
        let mid = self
            .mid
            .iter()
            .filter(|s| !in_older(&s.0.code, &[&self.base]))
            .count();
        let recent = self
            .recent
            .iter()
            .filter(|s| !in_older(&s.0.code, &[&self.base, &self.mid]))
            .count();
        self.base.len() + mid + recent
    }

    /// Wall-clock time (ms since the epoch) the last record was applied.
    pub fn last_applied_ms(&self) -> Option<u64> {
        self.last_applied_ms
    }

    /// Applies one log record. Records at or below the view's sequence are
    /// ignored, so replaying an overlapping range is harmless.
    pub fn apply(&mut self, seq: u64, op: LogOpRef<'_>) -> Result<(), RecordError> {
        if seq <= self.seq {
            return Ok(());
        }
        let existed = self.get(op.code()).is_some();
        let link = match op {
            LogOpRef::Put(link) => Some(link.to_link()?),
            LogOpRef::Delete(_) => None,
        };
        match (existed, link.is_some()) {
            (false, true) => self.links += 1,
            (true, false) => self.links = self.links.saturating_sub(1),
            _ => {}
        }
        let slot = Slot(Arc::new(OverlayEntry {
            seq,
            code: op.code().into(),
            link,
        }));
        // Copies `recent` (pointers) if a published view still holds it.
        Arc::make_mut(&mut self.recent).replace(slot);
        if self.recent.len() >= self.limits.recent {
            self.spill();
        }
        self.seq = seq;
        self.last_applied_ms = Some(super::record::now_ms());
        Ok(())
    }

    /// Merges the full `recent` into `mid`, and `mid` into `base` when that
    /// is full too. Layers published views hold are copied, never changed.
    fn spill(&mut self) {
        let recent = std::mem::take(&mut self.recent);
        merge_into(Arc::make_mut(&mut self.mid), &recent);
        if self.mid.len() >= self.limits.mid {
            let mid = std::mem::take(&mut self.mid);
            merge_into(Arc::make_mut(&mut self.base), &mid);
        }
    }

    /// Puts a newer snapshot under the overlay, dropping overlay entries it
    /// already holds. A snapshot older than the current one is refused (the
    /// caller keeps the current view).
    pub fn rebase(&mut self, snapshot: Arc<Snapshot>) -> Result<(), String> {
        if snapshot.seq() < self.snapshot_seq() {
            return Err(format!(
                "snapshot at sequence {} is older than the current one at {}",
                snapshot.seq(),
                self.snapshot_seq()
            ));
        }
        // Oldest layer first, so that newer entries replace older ones.
        let mut merged = Layer::default();
        for layer in [&self.base, &self.mid, &self.recent] {
            for slot in layer.iter() {
                if slot.0.seq > snapshot.seq() {
                    merged.replace(slot.clone());
                }
            }
        }
        let mut links = snapshot.len();
        for slot in &merged {
            match (snapshot.get(&slot.0.code).is_some(), slot.0.link.is_some()) {
                (false, true) => links += 1,
                (true, false) => links = links.saturating_sub(1),
                _ => {}
            }
        }
        self.seq = self.seq.max(snapshot.seq());
        self.links = links;
        self.base = Arc::new(merged);
        self.mid = Arc::default();
        self.recent = Arc::default();
        self.snapshot = Some(snapshot);
        Ok(())
    }

    /// Every live link in code order: the snapshot merged with the overlay.
    /// Yields an error (and stops) at a damaged snapshot record.
    pub fn iter(&self) -> impl Iterator<Item = Result<LinkRef<'_>, SnapshotError>> + '_ {
        // The newest entry of each code: a layer's entries count unless a
        // newer layer has the code.
        let mut overlay: Vec<&OverlayEntry> = Vec::with_capacity(self.overlay_len());
        let layers = [&self.recent, &self.mid, &self.base];
        for (i, layer) in layers.iter().enumerate() {
            overlay.extend(
                layer
                    .iter()
                    .filter(|s| !layers[..i].iter().any(|newer| newer.contains(&*s.0.code)))
                    .map(|s| &*s.0),
            );
        }
        overlay.sort_unstable_by(|a, b| a.code.cmp(&b.code));
        let snap = self.snapshot.as_ref().map(|s| s.iter());
        merge_links(
            snap.into_iter().flatten(),
            overlay
                .into_iter()
                .map(|e| (&*e.code, e.link.as_ref().map(Link::as_ref))),
        )
    }
}

/// Merges sorted links with sorted changes to them (`None`: deleted), both
/// in code order; a change replaces the link with the same code.
pub(crate) fn merge_links<'a>(
    base: impl Iterator<Item = Result<LinkRef<'a>, SnapshotError>>,
    changes: impl Iterator<Item = (&'a [u8], Option<LinkRef<'a>>)>,
) -> impl Iterator<Item = Result<LinkRef<'a>, SnapshotError>> {
    let mut base = base.peekable();
    let mut changes = changes.peekable();
    std::iter::from_fn(move || {
        loop {
            let order = match (base.peek(), changes.peek()) {
                (None, None) => return None,
                (Some(Err(_)), _) | (Some(Ok(_)), None) => return base.next(),
                (None, Some(_)) => std::cmp::Ordering::Greater,
                (Some(Ok(b)), Some((code, _))) => b.code.cmp(code),
            };
            match order {
                std::cmp::Ordering::Less => return base.next(),
                std::cmp::Ordering::Equal => {
                    base.next(); // replaced or deleted by the change
                }
                std::cmp::Ordering::Greater => {}
            }
            if let Some((_, Some(link))) = changes.next() {
                return Some(Ok(link));
            }
        }
    })
}

/// The table readers use: an atomically swappable pointer to the current
/// view. `load` is wait-free for readers; `publish` replaces the view.
/// Share it as `Arc<HotTable>`.
#[derive(Debug)]
pub struct HotTable {
    current: ArcSwap<TableView>,
    /// Replaced views a reader still held when `publish` swapped them out.
    /// The last reference to a view must not be a reader's: dropping a
    /// view on a new snapshot unmaps the old one, and when compaction has
    /// deleted its file that frees its page cache too, tens of ms for a
    /// large table, which would fall on a request. Only publishers touch
    /// this lock; `reap` drops what readers have let go of.
    retired: Mutex<Vec<Arc<TableView>>>,
}

impl HotTable {
    /// A table serving `view`.
    pub fn new(view: TableView) -> Self {
        Self {
            current: ArcSwap::from_pointee(view),
            retired: Mutex::new(Vec::new()),
        }
    }

    /// The current view. Hold the guard only for the duration of a request.
    #[inline]
    pub fn load(&self) -> arc_swap::Guard<Arc<TableView>> {
        self.current.load()
    }

    /// The current view as an owned `Arc`, for long-lived use.
    pub fn load_full(&self) -> Arc<TableView> {
        self.current.load_full()
    }

    /// Makes `view` the one readers see. The view it replaces is dropped
    /// here, on the publisher's thread, unless a reader still holds it; then
    /// it is kept until a later `publish` or `reap` finds it let go of.
    pub fn publish(&self, view: Arc<TableView>) {
        // `swap` turns every reader's guard of the old view into a counted
        // reference (arc-swap pays its debts), so the count is the truth.
        let old = self.current.swap(view);
        let mut retired = self.retired.lock().unwrap_or_else(|p| p.into_inner());
        if Arc::strong_count(&old) > 1 {
            retired.push(old);
        }
        retired.retain(|v| Arc::strong_count(v) > 1);
    }

    /// Drops the replaced views no reader holds any more. The follower calls
    /// it at every poll, so that a view held across a `publish` lives on
    /// after its reader until the follower's next poll (at most its idle
    /// poll interval, 500 ms at the edge).
    pub fn reap(&self) {
        let mut retired = self.retired.lock().unwrap_or_else(|p| p.into_inner());
        if !retired.is_empty() {
            retired.retain(|v| Arc::strong_count(v) > 1);
        }
    }
}

#[cfg(test)]
mod tests {
    //! Model test of the layered overlay: random applies, publishes and
    //! rebases with small layer limits (so that every merge path runs),
    //! against a `BTreeMap`; every view published along the way must still
    //! show exactly what it showed when it was published.

    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;
    use crate::store::snapshot::write_snapshot;

    #[derive(Debug, Clone)]
    enum Op {
        Put(u8, u16),
        Delete(u8),
        /// Publish: keep a clone of the view (what a reader holds).
        Publish,
        /// Rebase onto a snapshot of the table as it was `back` records ago
        /// (clamped to the current snapshot's sequence).
        Rebase(u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            8 => (0u8..40, any::<u16>()).prop_map(|(c, t)| Op::Put(c, t)),
            3 => (0u8..40).prop_map(Op::Delete),
            4 => Just(Op::Publish),
            1 => (0u8..12).prop_map(Op::Rebase),
        ]
    }

    fn code(i: u8) -> String {
        format!("c{i}")
    }

    type Model = BTreeMap<String, String>;

    fn check(view: &TableView, model: &Model, what: &str) {
        for i in 0..40 {
            let c = code(i);
            let got = view.get(c.as_bytes()).map(|l| l.target.to_vec());
            let want = model.get(&c).map(|t| t.as_bytes().to_vec());
            assert_eq!(got, want, "{what}: get({c})");
        }
        assert_eq!(view.len(), model.len() as u64, "{what}: len");
        let listed: Vec<(String, String)> = view
            .iter()
            .map(|l| {
                let l = l.expect("snapshot record");
                (
                    String::from_utf8(l.code.to_vec()).expect("utf-8"),
                    String::from_utf8(l.target.to_vec()).expect("utf-8"),
                )
            })
            .collect();
        let want: Vec<(String, String)> =
            model.iter().map(|(c, t)| (c.clone(), t.clone())).collect();
        assert_eq!(listed, want, "{what}: iter");
        // Every overlay entry is newer than the snapshot, and no code is
        // counted twice.
        let mut codes = std::collections::HashSet::new();
        for layer in [&view.recent, &view.mid, &view.base] {
            for slot in layer.iter() {
                assert!(slot.0.seq > view.snapshot_seq(), "{what}: stale entry");
                codes.insert(slot.0.code.clone());
            }
        }
        assert_eq!(view.overlay_len(), codes.len(), "{what}: overlay_len");
        assert!(
            view.recent.len() < view.limits.recent,
            "{what}: recent full"
        );
        assert!(view.mid.len() < view.limits.mid, "{what}: mid full");
    }

    fn run(ops: Vec<Op>, recent_max: usize, mid_max: usize) {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut view = TableView::new(None).with_layer_limits(recent_max, mid_max);
        let mut model = Model::new();
        // The model after each sequence number (index = seq).
        let mut history: Vec<Model> = vec![Model::new()];
        let mut published: Vec<(Arc<TableView>, Model)> = Vec::new();
        for (step, op) in ops.into_iter().enumerate() {
            let seq = view.seq() + 1;
            match op {
                Op::Put(c, t) => {
                    let link = Link::new(&code(c), &format!("https://example.com/{t}/{seq}"))
                        .expect("valid link");
                    view.apply(seq, LogOpRef::Put(link.as_ref()))
                        .expect("apply");
                    model.insert(link.code.clone(), link.target.clone());
                    history.push(model.clone());
                }
                Op::Delete(c) => {
                    let c = code(c);
                    view.apply(seq, LogOpRef::Delete(c.as_bytes()))
                        .expect("apply");
                    model.remove(&c);
                    history.push(model.clone());
                }
                Op::Publish => published.push((Arc::new(view.clone()), model.clone())),
                Op::Rebase(back) => {
                    let at = (view.seq().saturating_sub(u64::from(back))).max(view.snapshot_seq());
                    let state = &history[at as usize];
                    let path = dir.path().join(format!("s{step}.snap"));
                    write_snapshot(
                        &path,
                        at,
                        state
                            .iter()
                            .map(|(c, t)| Link::new(c, t).expect("valid link"))
                            .collect::<Vec<_>>()
                            .iter()
                            .map(|l| Ok::<_, SnapshotError>(l.as_ref())),
                    )
                    .expect("write snapshot");
                    let snap = Snapshot::open(&path, true).expect("open snapshot");
                    view.rebase(Arc::new(snap)).expect("rebase");
                    assert_eq!(view.snapshot_seq(), at);
                }
            }
            // Applying an old record again changes nothing.
            if view.seq() > 0 {
                view.apply(view.seq(), LogOpRef::Delete(b"c0"))
                    .expect("apply");
            }
            check(&view, &model, &format!("step {step}"));
        }
        for (i, (old, state)) in published.iter().enumerate() {
            check(old, state, &format!("published view {i}"));
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]
        #[test]
        fn layered_overlay_agrees_with_btreemap(
            ops in proptest::collection::vec(op(), 1..120),
            recent_max in 1usize..6,
            mid_max in 1usize..12,
        ) {
            run(ops, recent_max, mid_max);
        }
    }

    #[test]
    fn published_view_survives_every_merge_with_default_limits() {
        let mut view = TableView::new(None);
        let mut model = Model::new();
        let mut published = Vec::new();
        for seq in 1..=(2 * MID_MAX as u64 + 7) {
            let c = format!("k{}", seq % 5000);
            let link = Link::new(&c, &format!("https://example.com/{seq}")).expect("link");
            view.apply(seq, LogOpRef::Put(link.as_ref()))
                .expect("apply");
            model.insert(c, link.target.clone());
            if seq % 997 == 0 {
                published.push((Arc::new(view.clone()), model.clone()));
            }
        }
        assert!(!view.base.is_empty());
        for (old, state) in &published {
            assert_eq!(old.len(), state.len() as u64);
            for (c, t) in state {
                let got = old.get(c.as_bytes()).map(|l| l.target.to_vec());
                assert_eq!(got, Some(t.as_bytes().to_vec()));
            }
        }
        check_len(&view, &model);
    }

    fn check_len(view: &TableView, model: &Model) {
        assert_eq!(view.len(), model.len() as u64);
        assert_eq!(view.overlay_len(), model.len());
    }
}
