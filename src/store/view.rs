//! The in-memory link table: an immutable [`TableView`] (snapshot + overlay of
//! newer log records) published through [`HotTable`], an `ArcSwap`, so that
//! readers never take a lock and never wait for the follower.
//!
//! The overlay has two layers so that publishing stays cheap while records
//! stream in: `recent` (small, copied when a published view still shares it)
//! and `base` (larger, rebuilt only when `recent` is merged into it). Deletes
//! are tombstones until a snapshot includes them.

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;

use super::frame::LogOpRef;
use super::record::{Link, LinkRef, RecordError};
use super::snapshot::{Snapshot, SnapshotError};

/// An overlay entry: the newest operation on a code. `link: None` is a tombstone.
#[derive(Debug, Clone)]
pub struct OverlayEntry {
    pub seq: u64,
    pub link: Option<Arc<Link>>,
}

/// Overlay maps use foldhash (randomly seeded per process, several times
/// faster than SipHash on short keys): every snapshot lookup probes them
/// first while the overlay is non-empty.
type OverlayMap = HashMap<Box<[u8]>, OverlayEntry, foldhash::fast::RandomState>;

/// When `recent` holds this many entries it is merged into `base`.
const RECENT_MAX: usize = 1024;

/// An immutable view of the whole link table at one sequence number.
/// Cloning copies four `Arc`s and a few integers.
#[derive(Debug, Clone, Default)]
pub struct TableView {
    snapshot: Option<Arc<Snapshot>>,
    base: Arc<OverlayMap>,
    recent: Arc<OverlayMap>,
    seq: u64,
    links: u64,
    last_applied_ms: Option<u64>,
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

    /// Looks a code up: overlay first (newest wins), then the snapshot.
    /// Allocation-free and lock-free.
    #[inline]
    pub fn get(&self, code: &[u8]) -> Option<LinkRef<'_>> {
        if !self.recent.is_empty()
            && let Some(e) = self.recent.get(code)
        {
            return e.link.as_deref().map(Link::as_ref);
        }
        if !self.base.is_empty()
            && let Some(e) = self.base.get(code)
        {
            return e.link.as_deref().map(Link::as_ref);
        }
        self.snapshot.as_ref()?.get(code)
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
        let shadowed = self
            .recent
            .keys()
            .filter(|k| self.base.contains_key(*k))
            .count();
        self.base.len() + self.recent.len() - shadowed
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
            LogOpRef::Put(link) => Some(Arc::new(link.to_link()?)),
            LogOpRef::Delete(_) => None,
        };
        match (existed, link.is_some()) {
            (false, true) => self.links += 1,
            (true, false) => self.links = self.links.saturating_sub(1),
            _ => {}
        }
        Arc::make_mut(&mut self.recent).insert(op.code().into(), OverlayEntry { seq, link });
        if self.recent.len() >= RECENT_MAX {
            let recent = std::mem::take(Arc::make_mut(&mut self.recent));
            Arc::make_mut(&mut self.base).extend(recent);
        }
        self.seq = seq;
        self.last_applied_ms = Some(super::record::now_ms());
        Ok(())
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
        let mut merged = OverlayMap::default();
        for layer in [&self.base, &self.recent] {
            for (k, e) in layer.iter() {
                if e.seq > snapshot.seq() {
                    merged.insert(k.clone(), e.clone());
                }
            }
        }
        let mut links = snapshot.len();
        for (k, e) in &merged {
            match (snapshot.get(k).is_some(), e.link.is_some()) {
                (false, true) => links += 1,
                (true, false) => links = links.saturating_sub(1),
                _ => {}
            }
        }
        self.seq = self.seq.max(snapshot.seq());
        self.links = links;
        self.base = Arc::new(merged);
        self.recent = Arc::default();
        self.snapshot = Some(snapshot);
        Ok(())
    }

    /// Every live link in code order: the snapshot merged with the overlay.
    /// Yields an error (and stops) at a damaged snapshot record.
    pub fn iter(&self) -> impl Iterator<Item = Result<LinkRef<'_>, SnapshotError>> + '_ {
        let mut overlay: Vec<(&[u8], &OverlayEntry)> = self
            .base
            .iter()
            .filter(|(k, _)| !self.recent.contains_key(*k))
            .chain(self.recent.iter())
            .map(|(k, e)| (&**k, e))
            .collect();
        overlay.sort_unstable_by(|a, b| a.0.cmp(b.0));
        let snap = self.snapshot.as_ref().map(|s| s.iter());
        merge_links(
            snap.into_iter().flatten(),
            overlay
                .into_iter()
                .map(|(code, e)| (code, e.link.as_deref().map(Link::as_ref))),
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
}

impl HotTable {
    /// A table serving `view`.
    pub fn new(view: TableView) -> Self {
        Self {
            current: ArcSwap::from_pointee(view),
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

    /// Makes `view` the one readers see.
    pub fn publish(&self, view: Arc<TableView>) {
        self.current.store(view);
    }
}
