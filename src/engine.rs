//! The engine: one way through for pings, and the path by which campaign changes reach the index.
//!
//! A request goes through named stages, each over one type (DESIGN.md "One way through"):
//! [`Engine::ingest`] matches every ping (pure), reads the states of the request's users (the
//! node's cache, the store for the rest: one call), applies the trigger rules to each user's pings
//! (pure: new states and issue requests), and hands the whole request to the store in one
//! [`IssueStore::commit`](crate::store::IssueStore::commit); users whose state another request changed meanwhile are re-applied
//! to the state the store answered with and committed again. Nothing of a request is visible
//! before its commit, so a failed request can be retried whole.
//!
//! Campaign changes flow the other way: a write goes to the store, which assigns its revision; the
//! change is applied to this node's index at once, and every node follows the store's change feed
//! ([`CampaignStore::campaign_changes`](crate::store::CampaignStore::campaign_changes)) so writes made through other nodes arrive too.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use rustc_hash::FxHashMap;
use tokio::sync::Notify;

use crate::domain::{Campaign, CampaignId, CouponId, LatLon, Ping, PingClock, UserId};
use crate::spatial::{Hit, LiveIndex, Snapshot};
use crate::store::{
    CampaignChange, IssueCandidate, IssueOutcome, IssueRequest, IssuedCoupon, Store, StoreError, UserCommit,
    UserCommitResult, UserStateRecord,
};
use crate::trigger::{FenceHit, IgnoreReason, Outcome, TriggerConfig, TriggerEngine, UserState};

/// The settings of API.md's Configuration table that the engine itself reads.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineConfig {
    /// Oldest accepted `ts_ms`, seconds before the server clock.
    pub max_ping_age_s: u64,
    /// Trigger state is forgotten after this long without an applied ping (event time).
    pub state_ttl_s: u64,
    /// Pings less accurate than this never trigger.
    pub max_accuracy_m: f64,
    /// Cap over any 24 h; 0 = unlimited.
    pub max_coupons_per_user_per_day: u32,
    /// Implausible-speed bound of rule 0; 0 = off.
    pub max_speed_mps: f64,
    /// How often the node asks the store for campaign changes made through other nodes.
    pub campaign_poll: Duration,
    /// Most users whose trigger state is kept (0: no ceiling); beyond it the longest idle go
    /// first (see [`crate::ceiling`]): from this node's cache, and from the store where the
    /// store holds every state in memory (in-memory, embedded).
    pub max_tracked_users: usize,
}

/// `max_tracked_users`' default: at the ≈ 400 bytes a tracked user costs a node with the
/// embedded store (cached state, the store's copy, the maps), ≈ 2 GB at most.
pub const DEFAULT_MAX_TRACKED_USERS: usize = 5_000_000;

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_ping_age_s: 86_400,
            state_ttl_s: TriggerConfig::DEFAULTS.state_ttl_s,
            max_accuracy_m: TriggerConfig::DEFAULTS.max_accuracy_m,
            max_coupons_per_user_per_day: 10,
            max_speed_mps: TriggerConfig::DEFAULTS.max_speed_mps,
            campaign_poll: Duration::from_millis(200),
            max_tracked_users: DEFAULT_MAX_TRACKED_USERS,
        }
    }
}

/// What one call of [`Engine::ingest`] did.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct IngestReport {
    /// Valid pings the rules did not apply: (position in the given `Vec`, why).
    pub ignored: Vec<(usize, IgnoreReason)>,
    /// Coupons this call issued.
    pub events: Vec<IssuedCoupon>,
}

/// Pings (or users) of one request worked through between two yields to the scheduler.
///
/// A 10 000-ping batch is milliseconds of CPU at each stage (parsing, matching, applying);
/// run in one go, it holds its worker that long, and a phone's single ping scheduled on that
/// worker waits for all of it. In slices of this many, with `tokio::task::yield_now()` in
/// between, the ping waits for one slice (a fraction of a millisecond in a release build); a
/// yield is one trip through the scheduler, little next to a slice's work. The slices change
/// nothing in the result: each stage goes through the same items in the same order (BENCHMARKS.md,
/// "Abuse", has the admin flood before and after).
pub const WORK_SLICE: usize = 256;

/// Counts a request's work and yields to the scheduler each time another [`WORK_SLICE`] of it is
/// done: the one place the stages of a big request (parsing, matching, applying) share the rule.
#[derive(Default)]
pub struct Pacer {
    since_yield: usize,
}

impl Pacer {
    /// Notes `work` more items done (pings or users); yields once a slice's worth has gathered.
    pub async fn done(&mut self, work: usize) {
        self.since_yield += work;
        if self.since_yield >= WORK_SLICE {
            self.since_yield = 0;
            tokio::task::yield_now().await;
        }
    }
}

/// How often one request re-applies a user whose state other requests keep changing before it
/// gives up with `503` (the client's retry then starts afresh).
const MAX_COMMIT_ATTEMPTS: usize = 16;

/// Index, trigger state and store, wired together.
pub struct Engine {
    /// Source of truth for campaigns, user states and coupons; the atomic issuer.
    store: Arc<dyn Store>,
    /// What matching reads; swapped, never locked, on campaign changes.
    index: LiveIndex,
    /// This node's cache of user trigger states.
    triggers: TriggerEngine,
    config: EngineConfig,
    /// Set once the index is built from the store.
    ready: AtomicBool,
    /// The newest revision of each campaign applied to the index (deletes included, so a late
    /// copy of an older revision never resurrects a campaign).
    applied: Mutex<FxHashMap<CampaignId, u64>>,
    /// The store campaign revision the index is complete up to.
    feed_revision: AtomicU64,
    /// Woken whenever coupons were issued, so a local dispatcher need not wait for its poll.
    issued: Arc<Notify>,
}

/// Server clock, ms since the epoch.
pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// One user's share of a request: its pings (positions in the request's event-time order) and,
/// once applied, what they did.
struct UserWork {
    user_id: UserId,
    /// Indices into the request's event-time order, ascending.
    pings: Vec<usize>,
    /// The state the pings are applied to, and its store version (0 = none stored).
    base: (u64, UserState),
}

/// What applying one user's pings to its base state gave (pure; nothing is committed yet).
struct UserApplied {
    state: UserState,
    changed: bool,
    ignored: Vec<(usize, IgnoreReason)>,
    issues: Vec<IssueRequest>,
}

impl Engine {
    /// Loads every campaign from the store, builds the index, and starts the background tasks
    /// that follow the store's campaign changes and free trigger state of idle users.
    pub async fn start(store: Arc<dyn Store>, config: EngineConfig) -> Result<Arc<Engine>, StoreError> {
        let (revision, campaigns) = store.all_campaigns().await?;
        let started = Instant::now();
        let applied = campaigns.iter().map(|c| (c.id.clone(), c.revision)).collect();
        let index = LiveIndex::new(campaigns);
        tracing::info!(
            fences = index.snapshot().fence_count(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "fence index built"
        );
        let triggers = TriggerEngine::new(TriggerConfig {
            state_ttl_s: config.state_ttl_s,
            max_accuracy_m: config.max_accuracy_m,
            max_speed_mps: config.max_speed_mps,
        });
        let engine = Arc::new(Engine {
            store,
            index,
            triggers,
            config,
            ready: AtomicBool::new(true),
            applied: Mutex::new(applied),
            feed_revision: AtomicU64::new(revision),
            issued: Arc::new(Notify::new()),
        });
        tokio::spawn(evict_idle_users(Arc::downgrade(&engine)));
        tokio::spawn(bound_tracked_users(Arc::downgrade(&engine)));
        tokio::spawn(follow_campaign_changes(Arc::downgrade(&engine)));
        Ok(engine)
    }

    /// The store behind the engine.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// The engine's settings.
    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// The window of acceptable ping times at server time `now_ms`.
    pub fn ping_clock(&self, now_ms: i64) -> PingClock {
        PingClock { now_ms, max_age_s: self.config.max_ping_age_s }
    }

    /// True once the index is loaded.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// The current index snapshot (for ops and the demo).
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.index.snapshot()
    }

    /// Notified after every call that issued coupons; a dispatcher may wait on it.
    pub fn issued_notify(&self) -> Arc<Notify> {
        self.issued.clone()
    }

    /// How long the store must keep a user's trigger state after a commit: a user silent for
    /// `max_ping_age_s + state_ttl_s + 60 s` of server time can only send a ping whose `ts_ms` is
    /// more than `state_ttl_s` after their last one, which forgets every stay anyway.
    fn keep_state_ms(&self) -> i64 {
        let idle_s = self.config.max_ping_age_s.saturating_add(self.config.state_ttl_s).saturating_add(60);
        i64::try_from(idle_s.saturating_mul(1000)).unwrap_or(i64::MAX)
    }

    /// Stores a new campaign and makes it visible to matching; `Conflict` when the id is taken.
    pub async fn create_campaign(&self, campaign: Campaign) -> Result<Arc<Campaign>, StoreError> {
        let campaign = self.store.insert_campaign(campaign).await?;
        self.apply_change(CampaignChange::Upsert(campaign.clone()));
        Ok(campaign)
    }

    /// Replaces a campaign (its stays are forgotten); `NotFound` when absent.
    pub async fn replace_campaign(&self, campaign: Campaign) -> Result<Arc<Campaign>, StoreError> {
        let campaign = self.store.replace_campaign(campaign).await?;
        self.apply_change(CampaignChange::Upsert(campaign.clone()));
        Ok(campaign)
    }

    /// Deletes a campaign; `NotFound` when absent. Issued coupons stay in wallets.
    pub async fn delete_campaign(&self, id: &CampaignId) -> Result<(), StoreError> {
        let revision = self.store.delete_campaign(id).await?;
        self.apply_change(CampaignChange::Delete { id: id.clone(), revision });
        Ok(())
    }

    /// Erases a user (API.md `DELETE /v1/users/{id}`): the store's records and this node's cache.
    /// Other nodes' caches are refused at their next commit (the version is gone).
    pub async fn erase_user(&self, user: &UserId) -> Result<(), StoreError> {
        self.store.erase_user(user).await?;
        self.triggers.forget(user);
        Ok(())
    }

    /// Applies one campaign change to the index unless a newer revision of it is applied already
    /// (the change feed repeats this node's own writes, and may deliver changes late).
    fn apply_change(&self, change: CampaignChange) {
        let mut applied = self.applied.lock();
        let (id, revision) = (change.campaign_id(), change.revision());
        if applied.get(id).is_some_and(|&known| known >= revision) {
            return;
        }
        applied.insert(id.clone(), revision);
        match change {
            CampaignChange::Upsert(campaign) => self.index.upsert(campaign),
            CampaignChange::Delete { id, .. } => {
                self.index.remove(&id);
            }
        }
    }

    /// Brings the index up to the store's campaigns: the changes since the last poll, or all
    /// campaigns when the store no longer has every change.
    pub async fn sync_campaigns(&self) -> Result<(), StoreError> {
        let since = self.feed_revision.load(Ordering::Acquire);
        let feed = self.store.campaign_changes(since).await?;
        if feed.revision <= since {
            return Ok(());
        }
        match feed.changes {
            Some(changes) => changes.into_iter().for_each(|change| self.apply_change(change)),
            None => {
                let (revision, campaigns) = self.store.all_campaigns().await?;
                let live: FxHashMap<CampaignId, Arc<Campaign>> =
                    campaigns.into_iter().map(|c| (c.id.clone(), c)).collect();
                let gone: Vec<CampaignId> = self
                    .index
                    .snapshot()
                    .live_campaigns()
                    .map(|c| c.id.clone())
                    .filter(|id| !live.contains_key(id))
                    .collect();
                for id in gone {
                    self.apply_change(CampaignChange::Delete { id, revision });
                }
                live.into_values().for_each(|campaign| self.apply_change(CampaignChange::Upsert(campaign)));
            }
        }
        self.feed_revision.fetch_max(feed.revision, Ordering::AcqRel);
        Ok(())
    }

    /// Applies valid pings. Each user's pings are applied in `ts_ms` order (ties in the given
    /// order), whatever their order in `pings`; positions in the report refer to `pings`.
    pub async fn ingest(&self, pings: Vec<Ping>) -> Result<IngestReport, StoreError> {
        // Event-time order across the whole request (stable: equal `ts_ms` keep their array
        // order). That applies each user's pings in ts order, as API.md requires, and lets the
        // earliest ping win where users compete for a campaign's last coupon (`total_max`).
        let mut order: Vec<usize> = (0..pings.len()).collect();
        order.sort_by_key(|&i| pings[i].ts_ms);

        let snapshot = self.index.snapshot();
        let matched = self.match_all(&snapshot, &pings, &order).await;
        let mut users = self.read_states(&pings, &order).await?;

        let mut report = IngestReport::default();
        for _attempt in 0..MAX_COMMIT_ATTEMPTS {
            let mut applied: Vec<UserApplied> = Vec::with_capacity(users.len());
            let mut commits: Vec<UserCommit> = Vec::with_capacity(users.len());
            let mut pacer = Pacer::default();
            for user in users.iter_mut() {
                let user_applied = self.apply_user(&snapshot, &pings, &order, &matched, user);
                commits.push(self.user_commit(user, &user_applied));
                applied.push(user_applied);
                // Counted in pings (users in any order: each is on its own).
                pacer.done(user.pings.len()).await;
            }
            let started = Instant::now();
            let results = self.store.commit(commits).await;
            record_store_call("commit", started);
            let results = results.inspect_err(|_| {
                // The outcome is unknown: the cached states may be ahead of or behind the store.
                users.iter().for_each(|u| {
                    self.triggers.forget(&u.user_id);
                });
            })?;

            let mut conflicts = Vec::new();
            let mut pacer = Pacer::default();
            for ((user, applied), result) in users.into_iter().zip(applied).zip(results) {
                pacer.done(1).await;
                match result {
                    UserCommitResult::Committed { version, outcomes } => {
                        self.triggers.remember(&user.user_id, version, applied.state);
                        report.ignored.extend(applied.ignored.into_iter().map(|(k, reason)| (order[k], reason)));
                        report.events.extend(issued_coupons(applied.issues, outcomes));
                    }
                    UserCommitResult::Conflict { current } => {
                        metrics::counter!("kabao_state_conflicts_total").increment(1);
                        conflicts.push(UserWork { base: decode_state(&user.user_id, current), ..user });
                    }
                }
            }
            if conflicts.is_empty() {
                self.count(&report, pings.len());
                if !report.events.is_empty() {
                    self.issued.notify_waiters();
                }
                return Ok(report);
            }
            users = conflicts;
        }
        users.iter().for_each(|u| {
            self.triggers.forget(&u.user_id);
        });
        Err(StoreError::Unavailable("too many concurrent changes to the same users; retry the request".into()))
    }

    /// Stage 1: every ping against the index at once (the batch path overlaps the index's cache
    /// misses). Returns, per position in `order`, the end of its hits in the flat hit list.
    ///
    /// `kabao_match_duration_seconds` is a true per-ping figure: one ping in
    /// `MATCH_SAMPLE_EVERY`, counted across all requests (so single-ping requests are sampled at
    /// the same rate as batches), is matched alone with `Snapshot::matches` and timed, before the
    /// batch runs (so the sample sees the caches as a ping of the batch would, not warmed by it).
    /// A request's average would hide the slow pings a p99 is about.
    ///
    /// The batch is matched `WORK_SLICE` pings at a time, yielding between slices; hits and ends
    /// are appended slice after slice, the same as one call over all of them.
    async fn match_all(&self, snapshot: &Snapshot, pings: &[Ping], order: &[usize]) -> (Vec<Hit>, Vec<usize>) {
        /// One ping in this many is timed alone (≈ 1.5 % extra matching work).
        const MATCH_SAMPLE_EVERY: u64 = 64;
        /// Pings seen by every engine of the process; decides which ones are sampled.
        static PINGS_SEEN: AtomicU64 = AtomicU64::new(0);

        let positions: Vec<LatLon> = order.iter().map(|&i| pings[i].at).collect();
        let (mut hits, mut ends) = (Vec::new(), Vec::with_capacity(order.len()));
        let first = PINGS_SEEN.fetch_add(positions.len() as u64, Ordering::Relaxed);
        // The first position k with (first + k) a multiple of MATCH_SAMPLE_EVERY.
        let mut k = ((MATCH_SAMPLE_EVERY - first % MATCH_SAMPLE_EVERY) % MATCH_SAMPLE_EVERY) as usize;
        if k < positions.len() {
            let histogram = metrics::histogram!("kabao_match_duration_seconds");
            while k < positions.len() {
                let started = Instant::now();
                snapshot.matches(positions[k], &mut hits);
                histogram.record(started.elapsed().as_secs_f64());
                std::hint::black_box(&hits);
                hits.clear();
                k += MATCH_SAMPLE_EVERY as usize;
            }
        }
        let mut pacer = Pacer::default();
        for slice in positions.chunks(WORK_SLICE) {
            snapshot.matches_many(slice, &mut hits, &mut ends);
            pacer.done(slice.len()).await;
        }
        (hits, ends)
    }

    /// Stage 2: the request's users, each with the state its pings apply to: the node's cache
    /// where it has the user, the store (one call for all the others) where not.
    async fn read_states(&self, pings: &[Ping], order: &[usize]) -> Result<Vec<UserWork>, StoreError> {
        let mut by_user: FxHashMap<&UserId, usize> = FxHashMap::default();
        let mut users: Vec<UserWork> = Vec::new();
        for (k, &i) in order.iter().enumerate() {
            let user_id = &pings[i].user_id;
            let slot = *by_user.entry(user_id).or_insert_with(|| {
                users.push(UserWork { user_id: user_id.clone(), pings: Vec::new(), base: (0, UserState::default()) });
                users.len() - 1
            });
            users[slot].pings.push(k);
        }
        let mut missing = Vec::new();
        let mut pacer = Pacer::default();
        for (slot, user) in users.iter_mut().enumerate() {
            pacer.done(1).await;
            match self.triggers.take(&user.user_id) {
                Some(cached) => user.base = cached,
                None => missing.push(slot),
            }
        }
        if !missing.is_empty() {
            let ids: Vec<UserId> = missing.iter().map(|&slot| users[slot].user_id.clone()).collect();
            let started = Instant::now();
            let records = self.store.load_user_states(&ids).await;
            record_store_call("load_user_states", started);
            let records = records?;
            for (slot, record) in missing.into_iter().zip(records) {
                users[slot].base = decode_state(&users[slot].user_id, record);
            }
        }
        Ok(users)
    }

    /// Stage 3 (pure): one user's pings, in event time, through the trigger rules and rule 4's
    /// schedule half; the coupons they may issue, for the store to decide.
    fn apply_user(
        &self,
        snapshot: &Snapshot,
        pings: &[Ping],
        order: &[usize],
        (hits, ends): &(Vec<Hit>, Vec<usize>),
        user: &mut UserWork,
    ) -> UserApplied {
        // The base is used once: a commit that succeeds caches the new state, a conflict
        // replaces the base with the store's.
        let mut state = std::mem::take(&mut user.base.1);
        let mut applied =
            UserApplied { state: UserState::default(), changed: false, ignored: Vec::new(), issues: Vec::new() };
        let mut fence_hits: Vec<FenceHit<'_>> = Vec::new();
        for &k in &user.pings {
            let ping = &pings[order[k]];
            let from = if k == 0 { 0 } else { ends[k - 1] };
            fence_hits.clear();
            fence_hits.extend(hits[from..ends[k]].iter().map(|hit| {
                let campaign = snapshot.campaign(hit.campaign);
                FenceHit { campaign, fence: &campaign.fences[hit.fence as usize] }
            }));
            match state.apply(self.triggers.config(), ping, &fence_hits) {
                Outcome::Ignored(reason) => applied.ignored.push((k, reason)),
                Outcome::Applied { candidates } => {
                    applied.changed = true;
                    // Candidates come in ascending campaign id order (API.md: the daily cap takes
                    // campaigns in that order).
                    let candidates: Vec<IssueCandidate> = candidates
                        .into_iter()
                        .filter(|c| c.campaign.is_issuing_at(ping.ts_ms))
                        .map(|c| issue_candidate(ping, &c.campaign, c.fence_id))
                        .collect();
                    if !candidates.is_empty() {
                        applied.issues.push(IssueRequest {
                            user_id: ping.user_id.clone(),
                            ts_ms: ping.ts_ms,
                            seq: k as u32,
                            daily_cap: self.config.max_coupons_per_user_per_day,
                            candidates,
                        });
                    }
                }
            }
        }
        applied.state = state;
        applied
    }

    /// Stage 4's input for one user: the state to write (if it changed), guarded by the version
    /// it was read at.
    fn user_commit(&self, user: &UserWork, applied: &UserApplied) -> UserCommit {
        UserCommit {
            user_id: user.user_id.clone(),
            expected_version: user.base.0,
            new_state: applied.changed.then(|| applied.state.encode()),
            // Never 0, which means "no state".
            new_version: rand::random::<u64>() | 1,
            keep_for_ms: self.keep_state_ms(),
            // Kept in `applied` too, to report the issued coupons; empty (free to copy) for
            // nearly every user.
            issues: applied.issues.clone(),
        }
    }

    /// Counts a committed request's pings and candidates.
    fn count(&self, report: &IngestReport, pings: usize) {
        for (_, reason) in &report.ignored {
            metrics::counter!("kabao_pings_ignored_total", "reason" => reason.as_str()).increment(1);
        }
        metrics::counter!("kabao_pings_applied_total").increment((pings - report.ignored.len()) as u64);
    }
}

/// `kabao_store_call_duration_seconds{call}`: how long the request path waited for the store
/// (one `commit` per request, one `load_user_states` for users the node had not cached).
fn record_store_call(call: &'static str, started: Instant) {
    metrics::histogram!("kabao_store_call_duration_seconds", "call" => call).record(started.elapsed().as_secs_f64());
}

/// The coupon a candidate would issue at this ping, with the rules the store must check.
fn issue_candidate(ping: &Ping, campaign: &Campaign, fence_id: crate::domain::FenceId) -> IssueCandidate {
    let template = &campaign.coupon;
    IssueCandidate {
        coupon: IssuedCoupon {
            coupon_id: CouponId::derive(&campaign.id, &ping.user_id, ping.ts_ms),
            user_id: ping.user_id.clone(),
            campaign_id: campaign.id.clone(),
            fence_id,
            merchant_id: campaign.merchant.as_ref().map(|m| m.id.clone()),
            title: template.title.clone(),
            body: template.body.clone(),
            deep_link: template.deep_link.clone(),
            image_url: template.image_url.clone(),
            issued_at_ms: ping.ts_ms,
            expires_at_ms: template.valid_for_s.map(|s| ping.ts_ms.saturating_add(s.saturating_mul(1000))),
        },
        caps: campaign.caps,
        audience_tags: campaign.audience_tags.clone().into(),
    }
}

/// The coupons the store issued out of a user's issue requests.
fn issued_coupons(issues: Vec<IssueRequest>, outcomes: Vec<Vec<IssueOutcome>>) -> Vec<IssuedCoupon> {
    let mut issued = Vec::new();
    for (request, outcomes) in issues.into_iter().zip(outcomes) {
        for (candidate, outcome) in request.candidates.into_iter().zip(outcomes) {
            metrics::counter!("kabao_candidates_total", "outcome" => outcome_label(outcome)).increment(1);
            if outcome == IssueOutcome::Issued {
                issued.push(candidate.coupon);
            }
        }
    }
    issued
}

/// A stored state, decoded; a record that cannot be read starts the user afresh (logged: it
/// costs the user's open stays, never a coupon, which the store's caps still guard).
fn decode_state(user: &UserId, record: Option<UserStateRecord>) -> (u64, UserState) {
    match record {
        None => (0, UserState::default()),
        Some(record) => match UserState::decode(&record.bytes) {
            Ok(state) => (record.version, state),
            Err(e) => {
                tracing::error!(error = %e, user_hash = crate::telemetry::user_hash(user), "unreadable trigger state; starting the user afresh");
                (record.version, UserState::default())
            }
        },
    }
}

fn outcome_label(outcome: IssueOutcome) -> &'static str {
    match outcome {
        IssueOutcome::Issued => "issued",
        IssueOutcome::Duplicate => "duplicate",
        IssueOutcome::Audience => "audience",
        IssueOutcome::Cooldown => "cooldown",
        IssueOutcome::PerUserMax => "per_user_max",
        IssueOutcome::TotalMax => "total_max",
        IssueOutcome::DailyCap => "daily_cap",
    }
}

/// Follows the store's campaign change feed, so writes made through other nodes reach this
/// node's index (within `campaign_poll`; a node that was cut off catches up on its next poll).
async fn follow_campaign_changes(engine: Weak<Engine>) {
    let Some(poll) = engine.upgrade().map(|e| e.config.campaign_poll) else { return };
    let mut tick = tokio::time::interval(poll);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(engine) = engine.upgrade() else { return };
        if let Err(e) = engine.sync_campaigns().await {
            tracing::warn!(error = %e, "cannot read campaign changes from the store; retrying");
        }
    }
}

/// Keeps this node's cache of trigger states under `max_tracked_users`, checked every second (so
/// a flood of new user ids overshoots it by at most a second of pings), the selection run off
/// the request threads.
async fn bound_tracked_users(engine: Weak<Engine>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let Some(strong) = engine.upgrade() else { return };
        let max = strong.config.max_tracked_users;
        if max == 0 || strong.triggers.user_count() <= max {
            continue;
        }
        let dropped = tokio::task::spawn_blocking(move || strong.triggers.drop_longest_idle(max)).await.unwrap_or(0);
        metrics::counter!("kabao_tracked_users_dropped_total", "from" => "node_cache").increment(dropped as u64);
    }
}

/// Frees the cached trigger state of users idle long enough that it could not matter any more
/// (see [`Engine::keep_state_ms`]).
async fn evict_idle_users(engine: Weak<Engine>) {
    let mut tick = tokio::time::interval(Duration::from_secs(60));
    loop {
        tick.tick().await;
        let Some(engine) = engine.upgrade() else { return };
        let freed = engine.triggers.evict_idle(now_ms(), engine.keep_state_ms());
        if freed > 0 {
            tracing::debug!(freed, "freed idle trigger state");
        }
        metrics::gauge!("kabao_tracked_users").set(engine.triggers.user_count() as f64);
        metrics::gauge!("kabao_tracked_stays").set(engine.triggers.stay_count() as f64);
    }
}
