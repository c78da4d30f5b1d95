//! The in-memory store (`--ephemeral`, tests, `kabao demo`): everything in this process's memory,
//! gone when it exits.
//!
//! All state sits behind one mutex, so every trait method — above all [`IssueStore::commit`] — is
//! one atomic step; nothing in it awaits while holding the lock. Memory grows with campaigns,
//! devices and coupons issued (a wallet is forever), plus pushes not yet finished; trigger states
//! are dropped once their `keep_for_ms` has passed.
//!
//! Choices where API.md is silent (every store makes the same ones; the contract suite checks):
//! - A deleted campaign's id may be reused, and the reuse is a new campaign: its counters
//!   (`issued`, `redeemed`, per-user counts and cooldowns) start from zero. Coupons already issued
//!   stay in wallets and in the "already issued" set, so a coupon id can never be issued twice;
//!   redeeming a coupon of the earlier campaign does not count for the new one.
//! - The cooldown is two-sided in event time (see [`rules::refusal`]).
//! - The daily cap counts exactly the window `(ts − 24 h, ts]` of API.md, whatever order the
//!   coupons in it were issued in.
//! - A coupon is expired from `expires_at_ms` on (`now_ms ≥ expires_at_ms`). Redemption checks
//!   unknown, then already redeemed, then expired, then the merchant.
//! - A commit does not require the campaign to be in the store: a candidate matched just before a
//!   delete is still decided by the caps it carries.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::ops::Bound;
use std::sync::Arc;

use async_trait::async_trait;
use parking_lot::Mutex;
use rustc_hash::FxHashMap;

use super::rules::{self, IssueView};
use super::{
    CampaignChange, CampaignChanges, CampaignStats, CampaignStore, ChangeLog, CouponRecord, DeadLetter, Device,
    DeviceStore, IssueOutcome, IssueStore, IssuedCoupon, OutboxEntry, OutboxStore, ProviderToken, ProviderTokenStore,
    PushFinal, RedeemError, Store, StoreError, UserCommit, UserCommitResult, UserStateRecord,
};
use crate::domain::{Campaign, CampaignId, CouponId, DeviceId, UserId};

/// Dead letters kept (the oldest are dropped first).
const DEAD_LETTERS_KEPT: usize = 10_000;

/// The in-memory [`Store`].
#[derive(Debug, Default)]
pub struct MemoryStore {
    state: Mutex<State>,
    /// `max_tracked_users`: most trigger states kept (0: no ceiling).
    max_user_states: usize,
}

impl MemoryStore {
    /// An empty store with no ceiling on trigger states.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty store keeping at most `max` users' trigger states (0: no ceiling), the longest
    /// idle dropped first.
    pub fn with_max_user_states(max: usize) -> Self {
        Self { max_user_states: max, ..Self::default() }
    }
}

#[derive(Debug, Default)]
struct State {
    /// By id, so pages come out in id order.
    campaigns: BTreeMap<CampaignId, Arc<Campaign>>,
    /// The store's campaign revision: bumped by every campaign write.
    revision: u64,
    /// The newest campaign changes, oldest first, for the change feed.
    changes: ChangeLog,
    /// Issue counters of each campaign (incarnation), created on insert or on first issue.
    counters: FxHashMap<CampaignId, Counters>,
    /// Last incarnation number handed out (see [`Counters::incarnation`]).
    last_incarnation: u64,
    /// Devices by user, then by device id (so lists are in id order).
    devices: FxHashMap<UserId, BTreeMap<DeviceId, Device>>,
    /// Users' trigger states and when (server time) they may be forgotten.
    user_states: super::HeldStates,
    /// Server time of the last sweep of forgettable trigger states.
    last_sweep_ms: i64,
    /// The map of `user_states` the last sweep went through.
    next_sweep: usize,
    /// Every coupon ever issued: the wallet records and the "already issued" set in one.
    coupons: FxHashMap<CouponId, StoredCoupon>,
    /// Each user's coupons, newest first, ties by coupon id: the wallet's order, and an index by
    /// time for the daily cap.
    wallets: FxHashMap<UserId, BTreeSet<(Reverse<i64>, CouponId)>>,
    /// Pushes not yet finished, by sequence number.
    outbox: BTreeMap<u64, OutboxSlot>,
    /// Last outbox sequence number handed out.
    last_seq: u64,
    /// Pushes given up, oldest first.
    dead_letters: VecDeque<DeadLetter>,
    /// Provider tokens by slot.
    provider_tokens: FxHashMap<String, ProviderToken>,
}

/// Counters of one campaign incarnation.
#[derive(Debug)]
struct Counters {
    /// Distinguishes a reused campaign id from the deleted campaign that had it, so that
    /// redeeming an old coupon does not count for the new campaign.
    incarnation: u64,
    stats: CampaignStats,
    /// `issued_at_ms` of each coupon to each user, ascending: the per-user maximum is its
    /// length, the cooldown looks at the neighbours of a new time.
    per_user: FxHashMap<UserId, Vec<i64>>,
}

impl Counters {
    fn new(incarnation: u64) -> Self {
        Self { incarnation, stats: CampaignStats::default(), per_user: FxHashMap::default() }
    }
}

#[derive(Debug)]
struct StoredCoupon {
    record: CouponRecord,
    /// [`Counters::incarnation`] of the campaign that issued it.
    incarnation: u64,
}

#[derive(Debug)]
struct OutboxSlot {
    entry: OutboxEntry,
    /// Server time from which the entry may be handed out (again).
    due_at_ms: i64,
    /// The entry failed at least once and is counted in `pushes.retrying`.
    retrying: bool,
}

/// Server clock, ms since the epoch (for forgetting trigger states; never for the rules).
fn wall_clock_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

impl IssueView for State {
    fn coupon_exists(&self, id: &CouponId) -> Result<bool, StoreError> {
        Ok(self.coupons.contains_key(id))
    }

    fn has_any_tag(&self, user: &UserId, tags_any: &[String]) -> Result<bool, StoreError> {
        Ok(self
            .devices
            .get(user)
            .is_some_and(|devices| devices.values().any(|d| d.tags.iter().any(|t| tags_any.contains(t)))))
    }

    fn issue_times(&self, campaign: &CampaignId, user: &UserId) -> Result<Vec<i64>, StoreError> {
        Ok(self.counters.get(campaign).and_then(|c| c.per_user.get(user)).cloned().unwrap_or_default())
    }

    fn campaign_issued(&self, campaign: &CampaignId) -> Result<u64, StoreError> {
        Ok(self.counters.get(campaign).map_or(0, |c| c.stats.issued))
    }

    fn coupons_between(&self, user: &UserId, from_ms: i64, to_ms: i64, limit: usize) -> Result<usize, StoreError> {
        let Some(wallet) = self.wallets.get(user) else { return Ok(0) };
        // Newest first: from `to` (inclusive) down to `from` (exclusive).
        let start = (Reverse(to_ms), CouponId::from_string(""));
        Ok(wallet.range(start..).take_while(|(Reverse(issued_at), _)| *issued_at > from_ms).take(limit).count())
    }
}

impl State {
    fn new_counters(&mut self) -> Counters {
        self.last_incarnation += 1;
        Counters::new(self.last_incarnation)
    }

    fn next_revision(&mut self) -> u64 {
        self.revision += 1;
        self.revision
    }

    /// Records an allowed coupon: wallet, counters, the coupon record and a push per device.
    fn record(&mut self, coupon: &IssuedCoupon) {
        let last_incarnation = &mut self.last_incarnation;
        let counters = self.counters.entry(coupon.campaign_id.clone()).or_insert_with(|| {
            *last_incarnation += 1;
            Counters::new(*last_incarnation)
        });
        counters.stats.issued += 1;
        let times = counters.per_user.entry(coupon.user_id.clone()).or_default();
        let at = times.partition_point(|&t| t <= coupon.issued_at_ms);
        times.insert(at, coupon.issued_at_ms);
        let incarnation = counters.incarnation;

        self.wallets
            .entry(coupon.user_id.clone())
            .or_default()
            .insert((Reverse(coupon.issued_at_ms), coupon.coupon_id.clone()));
        self.coupons.insert(
            coupon.coupon_id.clone(),
            StoredCoupon { record: CouponRecord { coupon: coupon.clone(), redeemed_at_ms: None }, incarnation },
        );
        let devices: Vec<(DeviceId, Device)> = self
            .devices
            .get(&coupon.user_id)
            .map(|d| d.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default();
        for (device_id, device) in devices {
            self.last_seq += 1;
            let entry =
                OutboxEntry { id: self.last_seq.to_string(), coupon: coupon.clone(), device_id, device, attempts: 0 };
            self.outbox.insert(self.last_seq, OutboxSlot { entry, due_at_ms: i64::MIN, retrying: false });
        }
    }

    /// Forgets trigger states past their `keep_for_ms`: one of the maps of `user_states` a
    /// second, in turn (each every minute or so), so no commit waits for a pass over them all.
    fn sweep_user_states(&mut self, now_ms: i64) {
        if now_ms.saturating_sub(self.last_sweep_ms) < 1_000 {
            return;
        }
        self.last_sweep_ms = now_ms;
        self.next_sweep = self.next_sweep.wrapping_add(1);
        self.user_states.take_expired(self.next_sweep, now_ms);
    }

    fn push_stats(&mut self, campaign: &CampaignId) -> Option<&mut super::PushStats> {
        self.counters.get_mut(campaign).map(|c| &mut c.stats.pushes)
    }
}

/// The outbox slot of an entry handed out earlier (its id is the sequence number).
fn seq_of(entry: &OutboxEntry) -> Option<u64> {
    entry.id.parse().ok()
}

#[async_trait]
impl CampaignStore for MemoryStore {
    async fn insert_campaign(&self, mut campaign: Campaign) -> Result<Arc<Campaign>, StoreError> {
        let mut state = self.state.lock();
        if state.campaigns.contains_key(&campaign.id) {
            return Err(StoreError::Conflict);
        }
        campaign.revision = state.next_revision();
        let campaign = Arc::new(campaign);
        // A new campaign, even under a reused id: counters start afresh.
        let counters = state.new_counters();
        state.counters.insert(campaign.id.clone(), counters);
        state.campaigns.insert(campaign.id.clone(), campaign.clone());
        state.changes.push(CampaignChange::Upsert(campaign.clone()));
        Ok(campaign)
    }

    async fn replace_campaign(&self, mut campaign: Campaign) -> Result<Arc<Campaign>, StoreError> {
        let mut state = self.state.lock();
        if !state.campaigns.contains_key(&campaign.id) {
            return Err(StoreError::NotFound);
        }
        campaign.revision = state.next_revision();
        let campaign = Arc::new(campaign);
        state.campaigns.insert(campaign.id.clone(), campaign.clone());
        state.changes.push(CampaignChange::Upsert(campaign.clone()));
        Ok(campaign)
    }

    async fn delete_campaign(&self, id: &CampaignId) -> Result<u64, StoreError> {
        let mut state = self.state.lock();
        state.campaigns.remove(id).ok_or(StoreError::NotFound)?;
        state.counters.remove(id);
        let revision = state.next_revision();
        state.changes.push(CampaignChange::Delete { id: id.clone(), revision });
        Ok(revision)
    }

    async fn campaign(&self, id: &CampaignId) -> Result<Option<Arc<Campaign>>, StoreError> {
        Ok(self.state.lock().campaigns.get(id).cloned())
    }

    async fn campaigns_page(&self, after: Option<&str>, limit: usize) -> Result<Vec<Arc<Campaign>>, StoreError> {
        let state = self.state.lock();
        let from = after.map_or(Bound::Unbounded, Bound::Excluded);
        Ok(state.campaigns.range::<str, _>((from, Bound::Unbounded)).take(limit).map(|(_, c)| c.clone()).collect())
    }

    async fn all_campaigns(&self) -> Result<(u64, Vec<Arc<Campaign>>), StoreError> {
        let state = self.state.lock();
        Ok((state.revision, state.campaigns.values().cloned().collect()))
    }

    async fn campaign_changes(&self, since: u64) -> Result<CampaignChanges, StoreError> {
        let state = self.state.lock();
        Ok(state.changes.since(since, state.revision))
    }

    async fn campaign_stats(&self, id: &CampaignId) -> Result<CampaignStats, StoreError> {
        Ok(self.state.lock().counters.get(id).map_or_else(CampaignStats::default, |c| c.stats))
    }
}

#[async_trait]
impl DeviceStore for MemoryStore {
    async fn put_device(&self, user: &UserId, device: &DeviceId, value: Device) -> Result<(), StoreError> {
        self.state.lock().devices.entry(user.clone()).or_default().insert(device.clone(), value);
        Ok(())
    }

    async fn delete_device(&self, user: &UserId, device: &DeviceId) -> Result<bool, StoreError> {
        let mut state = self.state.lock();
        let Some(devices) = state.devices.get_mut(user) else { return Ok(false) };
        let removed = devices.remove(device).is_some();
        if devices.is_empty() {
            state.devices.remove(user);
        }
        Ok(removed)
    }

    async fn devices(&self, user: &UserId) -> Result<Vec<(DeviceId, Device)>, StoreError> {
        let state = self.state.lock();
        Ok(state.devices.get(user).map_or_else(Vec::new, |d| d.iter().map(|(k, v)| (k.clone(), v.clone())).collect()))
    }

    async fn erase_user(&self, user: &UserId) -> Result<(), StoreError> {
        let mut state = self.state.lock();
        state.devices.remove(user);
        state.user_states.remove(user);
        if let Some(wallet) = state.wallets.remove(user) {
            for (_, coupon_id) in wallet {
                state.coupons.remove(&coupon_id);
            }
        }
        // The user's coupons stop counting toward `per_user_max` (and the cooldown); `issued`
        // keeps counting them (`total_max` is money already spent).
        for counters in state.counters.values_mut() {
            counters.per_user.remove(user);
        }
        state.outbox.retain(|_, slot| &slot.entry.coupon.user_id != user);
        state.dead_letters.retain(|letter| &letter.entry.coupon.user_id != user);
        Ok(())
    }
}

#[async_trait]
impl IssueStore for MemoryStore {
    async fn load_user_states(&self, users: &[UserId]) -> Result<Vec<Option<UserStateRecord>>, StoreError> {
        let state = self.state.lock();
        Ok(users.iter().map(|u| state.user_states.get(u).map(|(record, _)| record.clone())).collect())
    }

    async fn commit(&self, commits: Vec<UserCommit>) -> Result<Vec<UserCommitResult>, StoreError> {
        let now_ms = wall_clock_ms();
        let mut state = self.state.lock();
        state.sweep_user_states(now_ms);
        let current_version =
            |state: &State, user: &UserId| state.user_states.get(user).map_or(0, |(record, _)| record.version);
        let accepted: Vec<bool> =
            commits.iter().map(|c| current_version(&state, &c.user_id) == c.expected_version).collect();

        let mut outcomes: Vec<Vec<Vec<IssueOutcome>>> =
            commits.iter().map(|c| c.issues.iter().map(|r| Vec::with_capacity(r.candidates.len())).collect()).collect();
        for (i, j) in rules::decide_in_order(&commits, &accepted) {
            let request = &commits[i].issues[j];
            for candidate in &request.candidates {
                let outcome = match rules::refusal(&*state, request, candidate)? {
                    Some(refusal) => refusal,
                    None => {
                        state.record(&candidate.coupon);
                        IssueOutcome::Issued
                    }
                };
                outcomes[i][j].push(outcome);
            }
        }

        let mut results = Vec::with_capacity(commits.len());
        for ((commit, accepted), outcomes) in commits.into_iter().zip(accepted).zip(outcomes) {
            if !accepted {
                results.push(UserCommitResult::Conflict {
                    current: state.user_states.get(&commit.user_id).map(|(record, _)| record.clone()),
                });
                continue;
            }
            let version = match commit.new_state {
                Some(bytes) => {
                    let record = UserStateRecord { version: commit.new_version, bytes };
                    let forget_at_ms = now_ms.saturating_add(commit.keep_for_ms);
                    state.user_states.insert(commit.user_id, (record, forget_at_ms));
                    commit.new_version
                }
                None => commit.expected_version,
            };
            results.push(UserCommitResult::Committed { version, outcomes });
        }
        super::drop_longest_idle(&mut state.user_states, self.max_user_states);
        Ok(results)
    }

    async fn wallet(&self, user: &UserId) -> Result<Vec<CouponRecord>, StoreError> {
        let state = self.state.lock();
        let Some(wallet) = state.wallets.get(user) else { return Ok(Vec::new()) };
        Ok(wallet.iter().filter_map(|(_, id)| state.coupons.get(id)).map(|c| c.record.clone()).collect())
    }

    async fn coupon(&self, id: &CouponId) -> Result<Option<CouponRecord>, StoreError> {
        Ok(self.state.lock().coupons.get(id).map(|c| c.record.clone()))
    }

    async fn redeem(&self, id: &CouponId, merchant_id: &str, now_ms: i64) -> Result<CouponRecord, RedeemError> {
        let mut state = self.state.lock();
        let stored = state.coupons.get_mut(id).ok_or(RedeemError::NotFound)?;
        let coupon = &stored.record.coupon;
        if stored.record.redeemed_at_ms.is_some() {
            return Err(RedeemError::AlreadyRedeemed);
        }
        if coupon.expires_at_ms.is_some_and(|expires| now_ms >= expires) {
            return Err(RedeemError::Expired);
        }
        if coupon.merchant_id.as_deref().is_some_and(|m| m != merchant_id) {
            return Err(RedeemError::WrongMerchant);
        }
        stored.record.redeemed_at_ms = Some(now_ms);
        let record = stored.record.clone();
        let incarnation = stored.incarnation;
        if let Some(counters) = state.counters.get_mut(&record.coupon.campaign_id) {
            if counters.incarnation == incarnation {
                counters.stats.redeemed += 1;
            }
        }
        Ok(record)
    }
}

#[async_trait]
impl OutboxStore for MemoryStore {
    async fn outbox_take(
        &self,
        _consumer: &str,
        max: usize,
        now_ms: i64,
        lease_ms: i64,
    ) -> Result<Vec<OutboxEntry>, StoreError> {
        let mut state = self.state.lock();
        let mut taken = Vec::new();
        for slot in state.outbox.values_mut() {
            if taken.len() >= max {
                break;
            }
            if slot.due_at_ms <= now_ms {
                slot.due_at_ms = now_ms.saturating_add(lease_ms);
                taken.push(slot.entry.clone());
            }
        }
        Ok(taken)
    }

    async fn outbox_retry(&self, entry: &OutboxEntry, attempts: u32, not_before_ms: i64) -> Result<(), StoreError> {
        let mut state = self.state.lock();
        let Some(seq) = seq_of(entry) else { return Ok(()) };
        let Some(slot) = state.outbox.get_mut(&seq) else { return Ok(()) };
        slot.entry.attempts = attempts;
        slot.due_at_ms = not_before_ms;
        let first_retry = !std::mem::replace(&mut slot.retrying, true);
        if first_retry {
            if let Some(pushes) = state.push_stats(&entry.coupon.campaign_id) {
                pushes.retrying += 1;
            }
        }
        Ok(())
    }

    async fn outbox_finish(&self, entry: &OutboxEntry, outcome: PushFinal, now_ms: i64) -> Result<(), StoreError> {
        let mut state = self.state.lock();
        let Some(slot) = seq_of(entry).and_then(|seq| state.outbox.remove(&seq)) else {
            // Finished before (a redelivered entry, a second consumer): count it once.
            return Ok(());
        };
        let campaign = &entry.coupon.campaign_id;
        if let Some(pushes) = state.push_stats(campaign) {
            if slot.retrying {
                pushes.retrying = pushes.retrying.saturating_sub(1);
            }
            match &outcome {
                PushFinal::Delivered => pushes.delivered += 1,
                PushFinal::DeadToken => pushes.dead_token += 1,
                PushFinal::Failed { .. } => pushes.failed += 1,
                PushFinal::Dropped => {}
            }
        }
        match outcome {
            PushFinal::DeadToken => {
                let user = &entry.coupon.user_id;
                if let Some(devices) = state.devices.get_mut(user) {
                    // Only if the device still has the token that was found dead.
                    if devices.get(&entry.device_id).is_some_and(|d| d.token == entry.device.token) {
                        devices.remove(&entry.device_id);
                    }
                    if devices.is_empty() {
                        state.devices.remove(user);
                    }
                }
            }
            PushFinal::Failed { reason } => {
                if state.dead_letters.len() == DEAD_LETTERS_KEPT {
                    state.dead_letters.pop_front();
                }
                state.dead_letters.push_back(DeadLetter { entry: slot.entry, reason, at_ms: now_ms });
            }
            PushFinal::Delivered | PushFinal::Dropped => {}
        }
        Ok(())
    }

    async fn outbox_len(&self) -> Result<u64, StoreError> {
        Ok(self.state.lock().outbox.len() as u64)
    }

    async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, StoreError> {
        Ok(self.state.lock().dead_letters.iter().rev().take(limit).cloned().collect())
    }
}

#[async_trait]
impl ProviderTokenStore for MemoryStore {
    async fn provider_token(
        &self,
        slot: &str,
        candidate: ProviderToken,
        replace_after_ms: i64,
    ) -> Result<ProviderToken, StoreError> {
        let mut state = self.state.lock();
        let kept = state.provider_tokens.entry(slot.to_owned()).or_insert_with(|| candidate.clone());
        if super::provider_token_due(kept, &candidate, replace_after_ms) {
            *kept = candidate;
        }
        Ok(kept.clone())
    }
}

#[async_trait]
impl Store for MemoryStore {
    fn kind(&self) -> &'static str {
        "memory"
    }

    async fn health(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::MemoryStore;
    use crate::store::Store;

    async fn open() -> (Arc<dyn Store>, ()) {
        (Arc::new(MemoryStore::new()), ())
    }

    crate::store_contract_tests!(open);

    #[tokio::test]
    async fn keeps_at_most_max_tracked_users_states() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::with_max_user_states(10));
        crate::store::contract::user_state_ceiling_of_ten(&store).await;
    }
}
