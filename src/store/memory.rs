//! The in-memory store: the embedded default for a single node.
//!
//! All state sits behind one mutex, so every trait method — above all [`Store::issue`] — is one
//! atomic step; nothing in it awaits while holding the lock. It is the system of record of a
//! one-node deployment, so it keeps what it is given: memory grows with campaigns, devices and
//! coupons issued (a wallet is forever), plus pushes not yet acknowledged. Nothing transient
//! accumulates: acknowledged pushes are dropped, and the counters of a deleted campaign go with
//! it.
//!
//! Choices where API.md is silent:
//! - A deleted campaign's id may be reused, and the reuse is a new campaign: its counters
//!   (`issued`, `redeemed`, per-user counts and cooldowns) start from zero. Coupons already issued
//!   stay in wallets and in the "already issued" set, so a coupon id can never be issued twice;
//!   redeeming a coupon of the earlier campaign does not count for the new one.
//! - The cooldown keeps coupons of a campaign to a user at least `per_user_cooldown_s` apart in
//!   event time on both sides: with pings arriving out of order across requests, a coupon whose
//!   `issued_at_ms` is *after* the ping's `ts_ms` blocks it as well (otherwise the later coupon
//!   would end up inside the cooldown of the earlier one).
//! - The daily cap counts exactly the window `(ts − 24 h, ts]` of API.md, whatever order the
//!   coupons in it were issued in.
//! - A coupon is expired from `expires_at_ms` on (`now_ms ≥ expires_at_ms`). Redemption checks
//!   unknown, then already redeemed, then expired, then the merchant.
//! - `issue` does not require the campaign to be in the store: a candidate matched just before a
//!   delete is still decided by the caps it carries.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet};
use std::ops::Bound;
use std::sync::Arc;

use async_trait::async_trait;
use parking_lot::Mutex;
use rustc_hash::FxHashMap;

use super::{
    CampaignStats, CouponRecord, Device, IssueCandidate, IssueOutcome, IssueRequest, IssuedCoupon, OutboxEntry,
    RedeemError, Store, StoreError,
};
use crate::domain::{Campaign, CampaignId, CouponId, DeviceId, UserId};

/// The daily cap's window, ms.
const DAY_MS: i64 = 24 * 60 * 60 * 1000;

/// The in-memory [`Store`].
#[derive(Debug, Default)]
pub struct MemoryStore {
    state: Mutex<State>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }
}

#[derive(Debug, Default)]
struct State {
    /// By id, so pages come out in id order.
    campaigns: BTreeMap<CampaignId, Arc<Campaign>>,
    /// Issue counters of each campaign (incarnation), created on insert or on first issue.
    counters: FxHashMap<CampaignId, Counters>,
    /// Last incarnation number handed out (see [`Counters::incarnation`]).
    last_incarnation: u64,
    /// Devices by user, then by device id (so lists are in id order).
    devices: FxHashMap<UserId, BTreeMap<DeviceId, Device>>,
    /// Every coupon ever issued: the wallet records and the "already issued" set in one.
    coupons: FxHashMap<CouponId, StoredCoupon>,
    /// Each user's coupons, newest first, ties by coupon id: the wallet's order, and an index by
    /// time for the daily cap.
    wallets: FxHashMap<UserId, BTreeSet<(Reverse<i64>, CouponId)>>,
    /// Pushes not yet acknowledged, by sequence number.
    outbox: BTreeMap<u64, OutboxSlot>,
    /// Last outbox sequence number handed out.
    last_seq: u64,
}

/// Counters of one campaign incarnation.
#[derive(Debug)]
struct Counters {
    /// Distinguishes a reused campaign id from the deleted campaign that had it, so that
    /// redeeming an old coupon does not count for the new campaign.
    incarnation: u64,
    issued: u64,
    redeemed: u64,
    /// `issued_at_ms` of each coupon to each user, ascending: the per-user maximum is its
    /// length, the cooldown looks at the neighbours of a new time.
    per_user: FxHashMap<UserId, Vec<i64>>,
}

impl Counters {
    fn new(incarnation: u64) -> Self {
        Self { incarnation, issued: 0, redeemed: 0, per_user: FxHashMap::default() }
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
    coupon: IssuedCoupon,
    /// Server time it was last handed out; `None` = never.
    handed_out_at_ms: Option<i64>,
}

impl State {
    fn new_counters(&mut self) -> Counters {
        self.last_incarnation += 1;
        Counters::new(self.last_incarnation)
    }

    /// Does the union of the user's device tags meet `tags_any` (empty = everyone)?
    fn audience_matches(&self, user: &UserId, tags_any: &[String]) -> bool {
        if tags_any.is_empty() {
            return true;
        }
        self.devices
            .get(user)
            .is_some_and(|devices| devices.values().any(|d| d.tags.iter().any(|t| tags_any.contains(t))))
    }

    /// How many coupons `user` holds with `issued_at_ms` in `(ts − 24 h, ts]`, counting no
    /// further than `limit`.
    fn coupons_in_day_before(&self, user: &UserId, ts_ms: i64, limit: usize) -> usize {
        let Some(wallet) = self.wallets.get(user) else { return 0 };
        // Newest first: from `ts` (inclusive) down to `ts − 24 h` (exclusive).
        let from = (Reverse(ts_ms), CouponId::from_string(""));
        wallet
            .range(from..)
            .take_while(|(Reverse(issued_at), _)| *issued_at > ts_ms.saturating_sub(DAY_MS))
            .take(limit)
            .count()
    }

    /// Rule 4's store half for one candidate; `None` = may issue.
    fn refusal(&self, request: &IssueRequest, candidate: &IssueCandidate) -> Option<IssueOutcome> {
        let coupon = &candidate.coupon;
        if self.coupons.contains_key(&coupon.coupon_id) {
            return Some(IssueOutcome::Duplicate);
        }
        if !self.audience_matches(&request.user_id, &candidate.audience_tags) {
            return Some(IssueOutcome::Audience);
        }
        let caps = candidate.caps;
        let counters = self.counters.get(&coupon.campaign_id);
        let times: &[i64] = counters.and_then(|c| c.per_user.get(&request.user_id)).map_or(&[], Vec::as_slice);
        if caps.per_user_cooldown_s > 0 {
            let cooldown_ms = caps.per_user_cooldown_s.saturating_mul(1000);
            let later = times.partition_point(|&t| t < request.ts_ms);
            let too_close = |t: i64| request.ts_ms.abs_diff(t) < cooldown_ms.unsigned_abs();
            let earlier_close = later.checked_sub(1).is_some_and(|i| too_close(times[i]));
            let later_close = times.get(later).is_some_and(|&t| too_close(t));
            if earlier_close || later_close {
                return Some(IssueOutcome::Cooldown);
            }
        }
        if caps.per_user_max > 0 && times.len() as u64 >= caps.per_user_max.unsigned_abs() {
            return Some(IssueOutcome::PerUserMax);
        }
        if caps.total_max > 0 && counters.map_or(0, |c| c.issued) >= caps.total_max.unsigned_abs() {
            return Some(IssueOutcome::TotalMax);
        }
        if request.daily_cap > 0 {
            let cap = request.daily_cap as usize;
            if self.coupons_in_day_before(&request.user_id, request.ts_ms, cap) >= cap {
                return Some(IssueOutcome::DailyCap);
            }
        }
        None
    }

    /// Records an allowed coupon: wallet, counters, the coupon record and its push.
    fn record(&mut self, coupon: &IssuedCoupon) {
        let last_incarnation = &mut self.last_incarnation;
        let counters = self.counters.entry(coupon.campaign_id.clone()).or_insert_with(|| {
            *last_incarnation += 1;
            Counters::new(*last_incarnation)
        });
        counters.issued += 1;
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
        self.last_seq += 1;
        self.outbox.insert(self.last_seq, OutboxSlot { coupon: coupon.clone(), handed_out_at_ms: None });
    }
}

#[async_trait]
impl Store for MemoryStore {
    async fn health(&self) -> Result<(), StoreError> {
        Ok(())
    }

    async fn insert_campaign(&self, campaign: Arc<Campaign>) -> Result<(), StoreError> {
        let mut state = self.state.lock();
        if state.campaigns.contains_key(&campaign.id) {
            return Err(StoreError::Conflict);
        }
        // A new campaign, even under a reused id: counters start afresh.
        let counters = state.new_counters();
        state.counters.insert(campaign.id.clone(), counters);
        state.campaigns.insert(campaign.id.clone(), campaign);
        Ok(())
    }

    async fn replace_campaign(&self, campaign: Arc<Campaign>) -> Result<(), StoreError> {
        let mut state = self.state.lock();
        match state.campaigns.get_mut(&campaign.id) {
            Some(slot) => {
                *slot = campaign;
                Ok(())
            }
            None => Err(StoreError::NotFound),
        }
    }

    async fn delete_campaign(&self, id: &CampaignId) -> Result<(), StoreError> {
        let mut state = self.state.lock();
        state.campaigns.remove(id).ok_or(StoreError::NotFound)?;
        state.counters.remove(id);
        Ok(())
    }

    async fn campaign(&self, id: &CampaignId) -> Result<Option<Arc<Campaign>>, StoreError> {
        Ok(self.state.lock().campaigns.get(id).cloned())
    }

    async fn campaigns_page(&self, after: Option<&str>, limit: usize) -> Result<Vec<Arc<Campaign>>, StoreError> {
        let state = self.state.lock();
        let from = after.map_or(Bound::Unbounded, Bound::Excluded);
        Ok(state.campaigns.range::<str, _>((from, Bound::Unbounded)).take(limit).map(|(_, c)| c.clone()).collect())
    }

    async fn all_campaigns(&self) -> Result<Vec<Arc<Campaign>>, StoreError> {
        Ok(self.state.lock().campaigns.values().cloned().collect())
    }

    async fn campaign_stats(&self, id: &CampaignId) -> Result<CampaignStats, StoreError> {
        let state = self.state.lock();
        Ok(state
            .counters
            .get(id)
            .map_or_else(CampaignStats::default, |c| CampaignStats { issued: c.issued, redeemed: c.redeemed }))
    }

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

    async fn issue(&self, request: IssueRequest) -> Result<Vec<IssueOutcome>, StoreError> {
        let mut state = self.state.lock();
        let mut outcomes = Vec::with_capacity(request.candidates.len());
        for candidate in &request.candidates {
            let outcome = match state.refusal(&request, candidate) {
                Some(refusal) => refusal,
                None => {
                    state.record(&candidate.coupon);
                    IssueOutcome::Issued
                }
            };
            outcomes.push(outcome);
        }
        Ok(outcomes)
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
                counters.redeemed += 1;
            }
        }
        Ok(record)
    }

    async fn outbox_take(
        &self,
        max: usize,
        now_ms: i64,
        redeliver_after_ms: i64,
    ) -> Result<Vec<OutboxEntry>, StoreError> {
        let mut state = self.state.lock();
        let mut taken = Vec::new();
        for (&seq, slot) in state.outbox.iter_mut() {
            if taken.len() >= max {
                break;
            }
            let due = slot.handed_out_at_ms.is_none_or(|at| now_ms.saturating_sub(at) >= redeliver_after_ms);
            if due {
                slot.handed_out_at_ms = Some(now_ms);
                taken.push(OutboxEntry { seq, coupon: slot.coupon.clone() });
            }
        }
        Ok(taken)
    }

    async fn outbox_ack(&self, seqs: &[u64]) -> Result<(), StoreError> {
        let mut state = self.state.lock();
        for seq in seqs {
            state.outbox.remove(seq);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::MemoryStore;
    use crate::store::{contract, Store};

    fn store() -> Arc<dyn Store> {
        Arc::new(MemoryStore::new())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn passes_the_whole_contract_suite_on_one_store() {
        contract::store_contract_suite(store()).await;
    }

    macro_rules! sections {
        ($($section:ident),* $(,)?) => {$(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $section() {
                contract::$section(&store()).await;
            }
        )*};
    }

    sections!(
        campaigns_crud,
        stats_and_id_reuse,
        devices,
        issue_dedup,
        issue_audience,
        issue_cooldown,
        issue_per_user_max,
        issue_total_max,
        issue_daily_cap,
        wallet_and_coupon,
        redeem,
        outbox,
        concurrent_issue_never_breaks_a_cap,
    );
}
