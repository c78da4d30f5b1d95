//! [`LiveIndex`]: campaign changes visible to matching at once, without ever pausing it.
//!
//! Matching reads a [`Snapshot`]: a large immutable base [`FenceIndex`], a few small *runs* (one
//! index each over campaigns created or replaced since the base was built), and per index the
//! campaign slots that are dead (replaced or deleted since it was built). A write swaps a new
//! snapshot in (`arc_swap`), so it is visible to the very next [`LiveIndex::snapshot`], and a
//! matcher holding the old snapshot keeps a consistent view.
//!
//! A write costs in proportion to the campaign written, not to the number of campaigns: the
//! written campaign becomes a run of its own, and runs are merged the way a log-structured merge
//! tree merges them — the newest into the one before it while that one is at most twice its
//! size — so runs shrink geometrically from oldest to newest (a few dozen at most), and a
//! campaign is rebuilt into a merged run only O(log n) times. (Rebuilding one overlay of every
//! recent campaign at each write made a write at 9 000 campaigns cost 15× one at 1 000.) When
//! the runs grow past a share of the base, a background thread rebuilds the base from all live
//! campaigns; writes made while it runs are carried over, so nothing is lost.

use std::sync::Arc;

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use rustc_hash::{FxHashMap, FxHashSet};

use super::{FenceIndex, Hit};
use crate::domain::geo::LatLon;
use crate::domain::{Campaign, CampaignId};

/// Fences in runs that trigger a base rebuild, at least; grows with the base (1/32).
const MIN_REBUILD_FENCES: usize = 16_384;

/// Campaign slots of one index, as bits; shared copy-on-write between the writer and snapshots.
#[derive(Debug, Clone, Default)]
struct SlotSet {
    words: Vec<u64>,
    len: usize,
}

impl SlotSet {
    /// Adds `slot`; `false` when it was in already.
    fn insert(&mut self, slot: u32) -> bool {
        let (word, bit) = (slot as usize / 64, 1u64 << (slot % 64));
        if word >= self.words.len() {
            self.words.resize(word + 1, 0);
        }
        let new = self.words[word] & bit == 0;
        self.words[word] |= bit;
        self.len += new as usize;
        new
    }

    fn contains(&self, slot: u32) -> bool {
        self.words.get(slot as usize / 64).is_some_and(|w| w & (1u64 << (slot % 64)) != 0)
    }

    fn len(&self) -> usize {
        self.len
    }
}

/// One index of a snapshot and its dead campaign slots.
#[derive(Debug, Clone)]
struct Segment {
    index: Arc<FenceIndex>,
    dead: Arc<SlotSet>,
}

impl Segment {
    fn new(index: Arc<FenceIndex>) -> Self {
        Segment { index, dead: Arc::default() }
    }

    /// Marks the campaign in `slot` dead; returns its fence count if it was live.
    fn kill(&mut self, slot: u32) -> Option<usize> {
        Arc::make_mut(&mut self.dead).insert(slot).then(|| self.index.campaign(slot).fences.len())
    }

    fn live(&self) -> impl Iterator<Item = &Arc<Campaign>> {
        let campaigns = self.index.campaigns().iter().enumerate();
        campaigns.filter(|(slot, _)| !self.dead.contains(*slot as u32)).map(|(_, c)| c)
    }

    /// Keeps the hits `out[from..]` of live campaigns, their slots shifted by `start`.
    fn keep_live(&self, out: &mut Vec<Hit>, from: usize, start: u32) {
        if self.dead.len() == 0 {
            out[from..].iter_mut().for_each(|h| h.campaign += start);
            return;
        }
        let mut w = from;
        for r in from..out.len() {
            let hit = out[r];
            if !self.dead.contains(hit.campaign) {
                out[w] = Hit { campaign: hit.campaign + start, ..hit };
                w += 1;
            }
        }
        out.truncate(w);
    }
}

/// What matching reads: a consistent view (the base, then the runs, each minus its dead campaigns).
///
/// Hit slots number the segments' campaigns one after the other, the base's first;
/// [`Snapshot::campaign`] resolves any of them.
#[derive(Debug)]
pub struct Snapshot {
    /// The base first, then the runs, oldest first.
    segments: Vec<Segment>,
    /// The first hit slot of each segment.
    starts: Vec<u32>,
    /// Live fences and campaigns in this view.
    fences: usize,
    campaigns: usize,
}

impl Snapshot {
    /// Appends every fence of a live campaign containing `p` (API.md rule 1), each once.
    pub fn matches(&self, p: LatLon, out: &mut Vec<Hit>) {
        for (segment, &start) in self.segments.iter().zip(&self.starts) {
            let from = out.len();
            segment.index.matches(p, out);
            segment.keep_live(out, from, start);
        }
    }

    /// Matches many pings; afterwards the hits of `pings[i]` are `out[ends[i - 1]..ends[i]]`, as
    /// [`FenceIndex::matches_many`] (faster per ping than [`Snapshot::matches`]).
    pub fn matches_many(&self, pings: &[LatLon], out: &mut Vec<Hit>, ends: &mut Vec<usize>) {
        let (base, runs) = self.segments.split_first().expect("a snapshot has a base");
        if base.dead.len() == 0 && runs.is_empty() {
            base.index.matches_many(pings, out, ends);
            return;
        }
        let (mut base_hits, mut base_ends) = (Vec::new(), Vec::with_capacity(pings.len()));
        base.index.matches_many(pings, &mut base_hits, &mut base_ends);
        let mut from = 0;
        for (&p, &end) in pings.iter().zip(&base_ends) {
            out.extend(base_hits[from..end].iter().filter(|h| !base.dead.contains(h.campaign)));
            from = end;
            for (run, &start) in runs.iter().zip(&self.starts[1..]) {
                let mid = out.len();
                run.index.matches(p, out);
                run.keep_live(out, mid, start);
            }
            ends.push(out.len());
        }
    }

    /// The campaign behind a hit's `campaign` slot.
    pub fn campaign(&self, slot: u32) -> &Arc<Campaign> {
        let segment = self.starts.partition_point(|&start| start <= slot) - 1;
        self.segments[segment].index.campaign(slot - self.starts[segment])
    }

    /// Fences of live campaigns in this view.
    pub fn fence_count(&self) -> usize {
        self.fences
    }

    /// Live campaigns in this view.
    pub fn campaign_count(&self) -> usize {
        self.campaigns
    }

    /// How many indexes matching looks into (the base and the runs).
    #[cfg(test)]
    pub(crate) fn segment_count(&self) -> usize {
        self.segments.len()
    }

    /// Every live campaign of this view, in no particular order.
    pub fn live_campaigns(&self) -> impl Iterator<Item = &Arc<Campaign>> {
        self.segments.iter().flat_map(Segment::live)
    }
}

/// A run: an index over campaigns written since the base was built, and where each one is.
#[derive(Debug)]
struct Run {
    segment: Segment,
    slots: FxHashMap<CampaignId, u32>,
    /// Live campaigns plus their fences: what merging this run costs, roughly.
    weight: usize,
}

impl Run {
    fn build(campaigns: Vec<Arc<Campaign>>) -> Run {
        let weight = campaigns.iter().map(|c| 1 + c.fences.len()).sum();
        let index = Arc::new(FenceIndex::build(campaigns));
        Run { slots: slots_of(&index), segment: Segment::new(index), weight }
    }
}

/// Writer-side state, behind the mutex (matching never takes it).
#[derive(Debug)]
struct Writer {
    base: Segment,
    base_slots: FxHashMap<CampaignId, u32>,
    /// Oldest first; each more than twice the weight of the next (see the module doc).
    runs: Vec<Run>,
    /// Live fences in runs.
    run_fences: usize,
    /// Live fences and campaigns in all.
    fences: usize,
    campaigns: usize,
    /// Ids written since the running background rebuild took its copy (`None`: none running).
    touched: Option<FxHashSet<CampaignId>>,
    /// Bumped by every rebuild; a background rebuild whose generation is stale is discarded.
    generation: u64,
    /// Fences in runs that trigger a rebuild (at least).
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

    /// As [`LiveIndex::new`], rebuilding the base once the runs hold `fences` fences (or 1/32 of
    /// the base, whichever is more). Small values exercise the rebuild path in tests.
    pub fn with_rebuild_after(campaigns: Vec<Arc<Campaign>>, fences: usize) -> Self {
        let mut writer = Writer {
            base: Segment::new(Arc::new(FenceIndex::build(Vec::new()))),
            base_slots: FxHashMap::default(),
            runs: Vec::new(),
            run_fences: 0,
            fences: 0,
            campaigns: 0,
            touched: None,
            generation: 0,
            rebuild_after: fences,
        };
        writer.install(build_base(campaigns), FxHashSet::default());
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
        w.kill(&campaign.id);
        if let Some(t) = w.touched.as_mut() {
            t.insert(campaign.id.clone());
        }
        w.fences += campaign.fences.len();
        w.run_fences += campaign.fences.len();
        w.campaigns += 1;
        w.runs.push(Run::build(vec![campaign]));
        w.merge_runs();
        self.publish(&mut w);
    }

    /// Removes a campaign; `false` if no live campaign has this id.
    pub fn remove(&self, id: &CampaignId) -> bool {
        let mut w = self.inner.writer.lock();
        let found = w.kill(id);
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
        w.install(build_base(live), FxHashSet::default());
        self.inner.publish_snapshot(w.snapshot());
    }

    /// Swaps in a snapshot of the writer state; starts a background rebuild if the runs are big.
    fn publish(&self, w: &mut Writer) {
        self.inner.publish_snapshot(w.snapshot());
        let threshold = w.rebuild_after.max(w.base.index.fence_count() / 32);
        let base_dead = w.base.dead.len();
        let big = w.run_fences > threshold || base_dead > 1024.max(w.base.index.campaigns().len() / 4);
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
                // No thread to be had: stay on the runs and try again on the next write.
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
    /// Marks the live version of `id` dead, wherever it is; `false` when there is none.
    fn kill(&mut self, id: &CampaignId) -> bool {
        let mut fences = None;
        if let Some(&slot) = self.base_slots.get(id) {
            fences = self.base.kill(slot);
        }
        if fences.is_none() {
            for run in self.runs.iter_mut().rev() {
                if let Some(&slot) = run.slots.get(id) {
                    fences = run.segment.kill(slot);
                    if let Some(n) = fences {
                        run.weight -= 1 + n;
                        self.run_fences -= n;
                        break;
                    }
                }
            }
        }
        let Some(n) = fences else { return false };
        self.fences -= n;
        self.campaigns -= 1;
        true
    }

    /// Merges the newest run into the one before it while that one is at most twice its weight.
    fn merge_runs(&mut self) {
        while let [.., older, newer] = self.runs.as_slice() {
            if older.weight > 2 * newer.weight {
                break;
            }
            let (newer, older) = (self.runs.pop().expect("two runs"), self.runs.pop().expect("two runs"));
            let live: Vec<_> = older.segment.live().chain(newer.segment.live()).cloned().collect();
            if !live.is_empty() {
                self.runs.push(Run::build(live));
            }
        }
    }

    /// Every live campaign, base survivors first.
    fn live(&self) -> Vec<Arc<Campaign>> {
        let runs = self.runs.iter().flat_map(|run| run.segment.live());
        self.base.live().chain(runs).cloned().collect()
    }

    /// Makes `base` the base; `touched` are the ids written since its campaigns were copied,
    /// whose base versions are stale and whose current versions (if live) stay in a run.
    fn install(&mut self, base: Arc<FenceIndex>, touched: FxHashSet<CampaignId>) {
        let carried: Vec<Arc<Campaign>> = (self.runs.iter().flat_map(|run| run.segment.live()))
            .filter(|c| touched.contains(&c.id))
            .cloned()
            .collect();
        self.base_slots = slots_of(&base);
        self.base = Segment::new(base);
        for slot in touched.iter().filter_map(|id| self.base_slots.get(id)) {
            self.base.kill(*slot);
        }
        self.runs.clear();
        if !carried.is_empty() {
            self.runs.push(Run::build(carried));
        }
        self.run_fences = self.runs.iter().flat_map(|run| run.segment.live()).map(|c| c.fences.len()).sum();
        let (base_fences, base_campaigns) =
            self.base.live().fold((0, 0), |(f, c), campaign| (f + campaign.fences.len(), c + 1));
        self.fences = base_fences + self.run_fences;
        self.campaigns = base_campaigns + self.runs.iter().map(|run| run.slots.len()).sum::<usize>();
    }

    fn snapshot(&self) -> Snapshot {
        let segments: Vec<Segment> =
            std::iter::once(self.base.clone()).chain(self.runs.iter().map(|run| run.segment.clone())).collect();
        let mut starts = Vec::with_capacity(segments.len());
        let mut next = 0u32;
        for segment in &segments {
            starts.push(next);
            next += segment.index.campaigns().len() as u32;
        }
        Snapshot { segments, starts, fences: self.fences, campaigns: self.campaigns }
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
