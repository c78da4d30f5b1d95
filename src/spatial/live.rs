//! [`LiveIndex`]: campaign changes visible to matching at once, without ever pausing it.
//!
//! Matching reads a [`Snapshot`]: a large immutable base [`FenceIndex`], a small overlay index of
//! the campaigns created or replaced since the base was built, and the base campaign slots that
//! are dead (replaced or deleted). A write rebuilds only the overlay and the dead set and swaps a
//! new snapshot in (`arc_swap`), so it is visible to the very next [`LiveIndex::snapshot`], and a
//! matcher holding the old snapshot keeps a consistent view. When the overlay grows past a
//! threshold a background thread rebuilds the base from all live campaigns; writes made while it
//! runs are carried over into the new overlay, so nothing is lost.

use std::collections::BTreeMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use rustc_hash::{FxHashMap, FxHashSet};

use super::{FenceIndex, Hit};
use crate::domain::geo::LatLon;
use crate::domain::{Campaign, CampaignId};

/// Overlay size (fences) that triggers a base rebuild, at least; grows with the base (1/32).
const MIN_REBUILD_FENCES: usize = 16_384;

/// What matching reads: a consistent view (base index + overlay + dead base campaigns).
///
/// Hit slots below the base's campaign count are base campaigns, the rest overlay campaigns;
/// [`Snapshot::campaign`] resolves either.
#[derive(Debug)]
pub struct Snapshot {
    base: Arc<FenceIndex>,
    /// Base campaign slots replaced or removed since the base was built.
    dead: Arc<FxHashSet<u32>>,
    overlay: Arc<FenceIndex>,
    /// Live fences and campaigns in this view (base minus dead, plus overlay).
    fences: usize,
    campaigns: usize,
}

impl Snapshot {
    /// Appends every fence of a live campaign containing `p` (API.md rule 1), each once.
    pub fn matches(&self, p: LatLon, out: &mut Vec<Hit>) {
        let start = out.len();
        self.base.matches(p, out);
        if !self.dead.is_empty() {
            let mut w = start;
            for r in start..out.len() {
                if !self.dead.contains(&out[r].campaign) {
                    out[w] = out[r];
                    w += 1;
                }
            }
            out.truncate(w);
        }
        let mid = out.len();
        self.overlay.matches(p, out);
        let shift = self.base.campaigns().len() as u32;
        for h in &mut out[mid..] {
            h.campaign += shift;
        }
    }

    /// Matches many pings; afterwards the hits of `pings[i]` are `out[ends[i - 1]..ends[i]]`, as
    /// [`FenceIndex::matches_many`] (faster per ping than [`Snapshot::matches`]).
    pub fn matches_many(&self, pings: &[LatLon], out: &mut Vec<Hit>, ends: &mut Vec<usize>) {
        if self.dead.is_empty() && self.overlay.fence_count() == 0 {
            self.base.matches_many(pings, out, ends);
            return;
        }
        let (mut base_hits, mut base_ends) = (Vec::new(), Vec::with_capacity(pings.len()));
        self.base.matches_many(pings, &mut base_hits, &mut base_ends);
        let shift = self.base.campaigns().len() as u32;
        let mut from = 0;
        for (&p, &end) in pings.iter().zip(&base_ends) {
            out.extend(base_hits[from..end].iter().filter(|h| !self.dead.contains(&h.campaign)));
            from = end;
            let mid = out.len();
            self.overlay.matches(p, out);
            for h in &mut out[mid..] {
                h.campaign += shift;
            }
            ends.push(out.len());
        }
    }

    /// The campaign behind a hit's `campaign` slot.
    pub fn campaign(&self, slot: u32) -> &Arc<Campaign> {
        let nb = self.base.campaigns().len() as u32;
        if slot < nb {
            self.base.campaign(slot)
        } else {
            self.overlay.campaign(slot - nb)
        }
    }

    /// Fences of live campaigns in this view.
    pub fn fence_count(&self) -> usize {
        self.fences
    }

    /// Live campaigns in this view.
    pub fn campaign_count(&self) -> usize {
        self.campaigns
    }

    /// Every live campaign of this view, in no particular order.
    pub fn live_campaigns(&self) -> impl Iterator<Item = &Arc<Campaign>> {
        let base = self.base.campaigns().iter().enumerate();
        base.filter(|(i, _)| !self.dead.contains(&(*i as u32))).map(|(_, c)| c).chain(self.overlay.campaigns())
    }
}

/// Writer-side state, behind the mutex (matching never takes it).
#[derive(Debug)]
struct Writer {
    base: Arc<FenceIndex>,
    base_slot: FxHashMap<CampaignId, u32>,
    dead: FxHashSet<u32>,
    /// Current version of every campaign created or replaced since the base was built.
    overlay: BTreeMap<CampaignId, Arc<Campaign>>,
    /// Fences in `overlay`.
    overlay_fences: usize,
    /// Ids written since the running background rebuild took its copy (`None`: none running).
    touched: Option<FxHashSet<CampaignId>>,
    /// Bumped by every rebuild; a background rebuild whose generation is stale is discarded.
    generation: u64,
    /// Overlay fences that trigger a rebuild (at least).
    rebuild_after: usize,
}

#[derive(Debug)]
struct Inner {
    current: ArcSwap<Snapshot>,
    writer: Mutex<Writer>,
}

/// Live index: matching never waits; a create/replace/delete is visible to the next snapshot.
#[derive(Debug, Clone)]
pub struct LiveIndex {
    inner: Arc<Inner>,
}

impl LiveIndex {
    /// Indexes `campaigns` (ids unique) as the first base.
    pub fn new(campaigns: Vec<Arc<Campaign>>) -> Self {
        Self::with_rebuild_after(campaigns, MIN_REBUILD_FENCES)
    }

    /// As [`LiveIndex::new`], rebuilding the base once the overlay holds `fences` fences (or 1/32
    /// of the base, whichever is more). Small values exercise the rebuild path in tests.
    pub fn with_rebuild_after(campaigns: Vec<Arc<Campaign>>, fences: usize) -> Self {
        let base = build_base(campaigns);
        let writer = Writer {
            base_slot: slots_of(&base),
            base,
            dead: FxHashSet::default(),
            overlay: BTreeMap::new(),
            overlay_fences: 0,
            touched: None,
            generation: 0,
            rebuild_after: fences,
        };
        let snapshot = writer.snapshot();
        record_size(&snapshot);
        Self { inner: Arc::new(Inner { current: ArcSwap::from_pointee(snapshot), writer: Mutex::new(writer) }) }
    }

    /// The current view; cheap, never waits on writers.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.inner.current.load_full()
    }

    /// Adds a campaign or replaces the one with the same id; visible to the next snapshot.
    pub fn upsert(&self, campaign: Arc<Campaign>) {
        let mut w = self.inner.writer.lock();
        if let Some(&slot) = w.base_slot.get(&campaign.id) {
            w.dead.insert(slot);
        }
        if let Some(t) = w.touched.as_mut() {
            t.insert(campaign.id.clone());
        }
        w.overlay_fences += campaign.fences.len();
        if let Some(old) = w.overlay.insert(campaign.id.clone(), campaign) {
            w.overlay_fences -= old.fences.len();
        }
        self.publish(&mut w);
    }

    /// Removes a campaign; `false` if no live campaign has this id.
    pub fn remove(&self, id: &CampaignId) -> bool {
        let mut w = self.inner.writer.lock();
        let mut found = false;
        if let Some(&slot) = w.base_slot.get(id) {
            found |= w.dead.insert(slot);
        }
        if let Some(old) = w.overlay.remove(id) {
            w.overlay_fences -= old.fences.len();
            found = true;
        }
        if found {
            if let Some(t) = w.touched.as_mut() {
                t.insert(id.clone());
            }
            self.publish(&mut w);
        }
        found
    }

    /// Rebuilds the base from all live campaigns now, on this thread (a background rebuild in
    /// flight is superseded). Writers wait meanwhile; matching does not.
    pub fn rebuild_now(&self) {
        let mut w = self.inner.writer.lock();
        w.generation += 1;
        w.touched = None;
        let live = w.live();
        let base = build_base(live);
        w.install(base, FxHashSet::default());
        self.inner.publish_snapshot(w.snapshot());
    }

    /// Swaps in a snapshot of the writer state; starts a background rebuild if the overlay is big.
    fn publish(&self, w: &mut Writer) {
        self.inner.publish_snapshot(w.snapshot());
        let threshold = w.rebuild_after.max(w.base.fence_count() / 32);
        let big = w.overlay_fences > threshold || w.dead.len() > 1024.max(w.base.campaigns().len() / 4);
        if big && w.touched.is_none() {
            w.generation += 1;
            w.touched = Some(FxHashSet::default());
            let (generation, live, inner) = (w.generation, w.live(), Arc::clone(&self.inner));
            let spawned = std::thread::Builder::new().name("kabao-index-rebuild".into()).spawn(move || {
                let base = build_base(live);
                let mut w = inner.writer.lock();
                if w.generation != generation {
                    return;
                }
                let touched = w.touched.take().unwrap_or_default();
                w.install(base, touched);
                inner.publish_snapshot(w.snapshot());
            });
            if spawned.is_err() {
                // No thread to be had: stay on the overlay and try again on the next write.
                w.touched = None;
            }
        }
    }
}

impl Inner {
    /// Makes `snapshot` the one matching reads, and shows its size in `/metrics`.
    fn publish_snapshot(&self, snapshot: Snapshot) {
        record_size(&snapshot);
        self.current.store(Arc::new(snapshot));
    }
}

impl Writer {
    /// Every live campaign, base survivors first.
    fn live(&self) -> Vec<Arc<Campaign>> {
        let base = self.base.campaigns().iter().enumerate();
        base.filter(|(i, _)| !self.dead.contains(&(*i as u32)))
            .map(|(_, c)| Arc::clone(c))
            .chain(self.overlay.values().cloned())
            .collect()
    }

    /// Makes `base` the base; `touched` are the ids written since its campaigns were copied,
    /// whose base versions are stale and whose current versions (if live) stay in the overlay.
    fn install(&mut self, base: Arc<FenceIndex>, touched: FxHashSet<CampaignId>) {
        self.base_slot = slots_of(&base);
        self.dead = touched.iter().filter_map(|id| self.base_slot.get(id).copied()).collect();
        self.overlay.retain(|id, _| touched.contains(id));
        self.overlay_fences = self.overlay.values().map(|c| c.fences.len()).sum();
        self.base = base;
    }

    fn snapshot(&self) -> Snapshot {
        let overlay = Arc::new(FenceIndex::build(self.overlay.values().cloned().collect()));
        let campaigns = self.base.campaigns();
        let dead_fences: usize = self.dead.iter().map(|&s| campaigns[s as usize].fences.len()).sum();
        Snapshot {
            fences: self.base.fence_count() - dead_fences + overlay.fence_count(),
            campaigns: campaigns.len() - self.dead.len() + overlay.campaigns().len(),
            base: Arc::clone(&self.base),
            dead: Arc::new(self.dead.clone()),
            overlay,
        }
    }
}

/// Builds a base index, recording how long it took (`kabao_index_build_duration_seconds`) and
/// when it was done (`kabao_index_built_timestamp_seconds`: the index's age is `time()` minus it).
fn build_base(campaigns: Vec<Arc<Campaign>>) -> Arc<FenceIndex> {
    let started = std::time::Instant::now();
    let base = Arc::new(FenceIndex::build(campaigns));
    metrics::histogram!("kabao_index_build_duration_seconds").record(started.elapsed().as_secs_f64());
    let now_s = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
    metrics::gauge!("kabao_index_built_timestamp_seconds").set(now_s);
    base
}

/// The live index's size, as `/metrics` shows it (`kabao_index_fences`, `kabao_index_campaigns`).
fn record_size(snapshot: &Snapshot) {
    metrics::gauge!("kabao_index_fences").set(snapshot.fence_count() as f64);
    metrics::gauge!("kabao_index_campaigns").set(snapshot.campaigns as f64);
}

fn slots_of(index: &FenceIndex) -> FxHashMap<CampaignId, u32> {
    index.campaigns().iter().enumerate().map(|(i, c)| (c.id.clone(), i as u32)).collect()
}
