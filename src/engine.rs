//! The engine: one way through for pings (index → trigger rules → store) and the path by which
//! campaign changes reach the index.
//!
//! Matching and the trigger rules are synchronous and in memory; the store is awaited only for a
//! ping that produced a candidate, so a ping that touches no fence costs no store round trip.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::{Mutex, Notify};

use crate::domain::{Campaign, CampaignId, CouponId, LatLon, Ping, PingClock};
use crate::spatial::{Hit, LiveIndex, Snapshot};
use crate::store::{IssueCandidate, IssueOutcome, IssueRequest, IssuedCoupon, Store, StoreError};
use crate::trigger::{Candidate, FenceHit, IgnoreReason, Outcome, TriggerConfig, TriggerEngine};

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
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_ping_age_s: 86_400,
            state_ttl_s: 3_600,
            max_accuracy_m: 100.0,
            max_coupons_per_user_per_day: 10,
            max_speed_mps: 100.0,
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

/// Index, trigger state and store, wired together.
pub struct Engine {
    /// Source of truth for campaigns, and the atomic issuer.
    store: Arc<dyn Store>,
    /// What matching reads; swapped, never locked, on campaign changes.
    index: LiveIndex,
    /// Per-user stays.
    triggers: TriggerEngine,
    config: EngineConfig,
    /// Set once the index is built from the store.
    ready: AtomicBool,
    /// Last revision handed to a campaign (see [`Campaign::revision`]).
    revision: AtomicU64,
    /// Serialises campaign writes so the store and the index see them in the same order.
    campaign_writes: Mutex<()>,
    /// Woken whenever coupons were issued, so the dispatcher need not poll.
    issued: Arc<Notify>,
}

/// Server clock, ms since the epoch.
pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

impl Engine {
    /// Loads every campaign from the store, builds the index, and starts the background task
    /// that frees trigger state of idle users.
    pub async fn start(store: Arc<dyn Store>, config: EngineConfig) -> Result<Arc<Engine>, StoreError> {
        let campaigns = store.all_campaigns().await?;
        let started = Instant::now();
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
            revision: AtomicU64::new(0),
            campaign_writes: Mutex::new(()),
            issued: Arc::new(Notify::new()),
        });
        tokio::spawn(evict_idle_users(Arc::downgrade(&engine)));
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

    /// Notified after every call that issued coupons; the dispatcher waits on it.
    pub fn issued_notify(&self) -> Arc<Notify> {
        self.issued.clone()
    }

    /// A revision newer than any handed out before, by this process or (via the clock) an
    /// earlier one.
    fn next_revision(&self) -> u64 {
        let clock = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
        let mut prev = self.revision.load(Ordering::Relaxed);
        loop {
            let next = clock.max(prev + 1);
            match self.revision.compare_exchange_weak(prev, next, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => return next,
                Err(actual) => prev = actual,
            }
        }
    }

    /// Stores a new campaign and makes it visible to matching; `Conflict` when the id is taken.
    pub async fn create_campaign(&self, mut campaign: Campaign) -> Result<Arc<Campaign>, StoreError> {
        let _order = self.campaign_writes.lock().await;
        campaign.revision = self.next_revision();
        let campaign = Arc::new(campaign);
        self.store.insert_campaign(campaign.clone()).await?;
        self.index.upsert(campaign.clone());
        Ok(campaign)
    }

    /// Replaces a campaign (its stays are forgotten); `NotFound` when absent.
    pub async fn replace_campaign(&self, mut campaign: Campaign) -> Result<Arc<Campaign>, StoreError> {
        let _order = self.campaign_writes.lock().await;
        campaign.revision = self.next_revision();
        let campaign = Arc::new(campaign);
        self.store.replace_campaign(campaign.clone()).await?;
        self.index.upsert(campaign.clone());
        Ok(campaign)
    }

    /// Deletes a campaign; `NotFound` when absent. Issued coupons stay in wallets.
    pub async fn delete_campaign(&self, id: &CampaignId) -> Result<(), StoreError> {
        let _order = self.campaign_writes.lock().await;
        self.store.delete_campaign(id).await?;
        self.index.remove(id);
        Ok(())
    }

    /// Applies valid pings. Each user's pings are applied in `ts_ms` order (ties in the given
    /// order), whatever their order in `pings`; positions in the report refer to `pings`.
    pub async fn ingest(&self, pings: Vec<Ping>) -> Result<IngestReport, StoreError> {
        let mut order: Vec<usize> = (0..pings.len()).collect();
        // Event-time order across the whole request (stable: equal `ts_ms` keep their array
        // order). That applies each user's pings in ts order, as API.md requires, and lets the
        // earliest ping win where users compete for a campaign's last coupon (`total_max`).
        order.sort_by_key(|&i| pings[i].ts_ms);

        // Match the whole request at once: the batch path overlaps the index's cache misses.
        let snapshot = self.index.snapshot();
        let positions: Vec<LatLon> = order.iter().map(|&i| pings[i].at).collect();
        let (mut hits, mut ends): (Vec<Hit>, Vec<usize>) = (Vec::new(), Vec::with_capacity(order.len()));
        let started = Instant::now();
        snapshot.matches_many(&positions, &mut hits, &mut ends);
        if !order.is_empty() {
            // One sample per ping, each the request's match time shared out evenly.
            let per_ping = started.elapsed().as_secs_f64() / order.len() as f64;
            metrics::histogram!("kabao_match_duration_seconds").record_many(per_ping, order.len());
        }

        let mut report = IngestReport::default();
        let mut fence_hits: Vec<FenceHit<'_>> = Vec::new();
        for (k, &position) in order.iter().enumerate() {
            let ping = &pings[position];
            let from = if k == 0 { 0 } else { ends[k - 1] };
            fence_hits.clear();
            fence_hits.extend(hits[from..ends[k]].iter().map(|hit| {
                let campaign = snapshot.campaign(hit.campaign);
                FenceHit { campaign, fence: &campaign.fences[hit.fence as usize] }
            }));
            let candidates = match self.triggers.apply(ping, &fence_hits) {
                Outcome::Ignored(reason) => {
                    metrics::counter!("kabao_pings_ignored_total", "reason" => reason.as_str()).increment(1);
                    report.ignored.push((position, reason));
                    continue;
                }
                Outcome::Applied { candidates } => candidates,
            };
            metrics::counter!("kabao_pings_applied_total").increment(1);
            let issuing: Vec<Candidate> =
                candidates.into_iter().filter(|c| c.campaign.is_issuing_at(ping.ts_ms)).collect();
            if issuing.is_empty() {
                continue;
            }
            match self.issue(ping, issuing).await {
                Ok(issued) => report.events.extend(issued),
                Err(e) => {
                    // The candidates were used up in the trigger state but nothing was issued:
                    // forget the user so a retry of this request re-detects them.
                    self.triggers.forget(&ping.user_id);
                    return Err(e);
                }
            }
        }
        if !report.events.is_empty() {
            self.issued.notify_one();
        }
        Ok(report)
    }

    /// Asks the store to issue every candidate of one ping, in ascending campaign id order.
    async fn issue(&self, ping: &Ping, mut candidates: Vec<Candidate>) -> Result<Vec<IssuedCoupon>, StoreError> {
        candidates.sort_by(|a, b| a.campaign.id.cmp(&b.campaign.id));
        let candidates: Vec<IssueCandidate> = candidates
            .into_iter()
            .map(|c| {
                let campaign = &c.campaign;
                let template = &campaign.coupon;
                IssueCandidate {
                    coupon: IssuedCoupon {
                        coupon_id: CouponId::derive(&campaign.id, &ping.user_id, ping.ts_ms),
                        user_id: ping.user_id.clone(),
                        campaign_id: campaign.id.clone(),
                        fence_id: c.fence_id.clone(),
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
            })
            .collect();
        let request = IssueRequest {
            user_id: ping.user_id.clone(),
            ts_ms: ping.ts_ms,
            daily_cap: self.config.max_coupons_per_user_per_day,
            candidates,
        };
        let coupons: Vec<IssuedCoupon> = request.candidates.iter().map(|c| c.coupon.clone()).collect();
        let outcomes = self.store.issue(request).await?;
        let mut issued = Vec::new();
        for (coupon, outcome) in coupons.into_iter().zip(outcomes) {
            metrics::counter!("kabao_candidates_total", "outcome" => outcome_label(outcome)).increment(1);
            if outcome == IssueOutcome::Issued {
                issued.push(coupon);
            }
        }
        Ok(issued)
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

/// Frees the trigger state of users idle long enough that it could not matter any more: a user
/// untouched for `max_ping_age_s + state_ttl_s + 60 s` of server time can only send a ping whose
/// `ts_ms` is more than `state_ttl_s` after their last one, which forgets every stay anyway.
async fn evict_idle_users(engine: Weak<Engine>) {
    let mut tick = tokio::time::interval(Duration::from_secs(60));
    loop {
        tick.tick().await;
        let Some(engine) = engine.upgrade() else { return };
        let idle_s = engine.config.max_ping_age_s + engine.config.state_ttl_s + 60;
        let freed = engine.triggers.evict_idle(now_ms(), (idle_s as i64).saturating_mul(1000));
        if freed > 0 {
            tracing::debug!(freed, "freed idle trigger state");
        }
        metrics::gauge!("kabao_tracked_users").set(engine.triggers.user_count() as f64);
    }
}
