//! The store: campaigns, devices, wallets, caps, users' trigger state, the push outbox and the
//! APNs provider token every node uses.
//!
//! One [`Store`] trait made of role traits ([`CampaignStore`], [`DeviceStore`], [`IssueStore`],
//! [`OutboxStore`], [`ProviderTokenStore`]), so a part of kabao depends on the role it uses;
//! three implementations share one contract ([`contract`]): [`memory::MemoryStore`]
//! (`--ephemeral`, tests, the demo), the embedded durable store (the default, one node) and the
//! Redis store (many nodes).
//!
//! The shape follows DESIGN.md ("State, and where it lives"):
//! - **One commit per request.** A request's pings are applied (pure, in the engine) against the
//!   states of its users; the result — each user's new trigger state, the coupons its pings may
//!   issue — goes to [`IssueStore::commit`] in one call. Per user the commit is one atomic step,
//!   guarded by the version the state was read at: when another request (or node) changed the
//!   user in between, that user's step is refused whole with the current state, and the engine
//!   re-applies and commits again. Whatever decides whether a coupon may be issued — audience,
//!   cooldown, per-user and total maxima, the daily cap, "already issued" — is checked and recorded
//!   inside that step, with the wallet entry and one outbox entry per device.
//! - **Trigger state is store data**, opaque here ([`UserStateRecord::bytes`]; the trigger module
//!   encodes it), so any node can serve any user (API.md rule 7).
//! - **Campaign revisions come from the store**, and [`CampaignStore::campaign_changes`] is the
//!   change feed every node's index follows.
//! - **The outbox's unit is one push**: one coupon to one device, written with the coupon.

#[doc(hidden)]
pub mod contract;
pub mod embedded;
#[doc(hidden)]
pub mod hooked;
pub mod memory;
pub mod redis;
pub mod rules;

use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::domain::{Campaign, CampaignId, Caps, CouponId, DeviceId, FenceId, UserId};

/// A failure of the store itself (not a business refusal).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The id is already taken (campaign create).
    #[error("already exists")]
    Conflict,
    /// No such record.
    #[error("not found")]
    NotFound,
    /// The store cannot be reached or failed; nothing was applied (or, when it failed after
    /// committing, everything was: an identical retry is safe either way).
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The store answers but is not the one kabao used before (its identity is gone or
    /// different: a Redis restarted empty, a data directory replaced). Nothing is served from it
    /// until an operator acts; the message says what happened and how to proceed.
    #[error("store lost its data: {0}")]
    Lost(String),
}

/// Which push service a device is reached through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Platform {
    /// Firebase Cloud Messaging (Android, web).
    Fcm,
    /// Apple Push Notification service.
    Apns,
}

/// A registered phone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Device {
    /// Push service.
    pub platform: Platform,
    /// The provider's registration token.
    pub token: String,
    /// Audience tags (API.md "Audience": the union over the user's devices).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// Display locale, e.g. `zh-CN`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locale: Option<String>,
}

/// One coupon as issued: what the wallet, the event and the push all show.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IssuedCoupon {
    /// Deterministic id (see [`CouponId::derive`]).
    pub coupon_id: CouponId,
    /// Holder.
    pub user_id: UserId,
    /// Issuing campaign.
    pub campaign_id: CampaignId,
    /// The fence that triggered it (the nearest one, rule 5).
    pub fence_id: FenceId,
    /// The merchant that may redeem it; `None` = any.
    pub merchant_id: Option<String>,
    /// Coupon headline.
    pub title: String,
    /// Coupon text.
    pub body: Option<String>,
    /// Link the notification opens.
    pub deep_link: Option<String>,
    /// Picture.
    pub image_url: Option<String>,
    /// The triggering ping's `ts_ms`.
    pub issued_at_ms: i64,
    /// `issued_at_ms + valid_for_s × 1000`; `None` = never expires.
    pub expires_at_ms: Option<i64>,
}

/// A coupon and what happened to it since.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CouponRecord {
    /// The coupon as issued.
    pub coupon: IssuedCoupon,
    /// Server time of redemption, once redeemed.
    pub redeemed_at_ms: Option<i64>,
}

/// One campaign's claim to issue a coupon at a ping, with the rules the store must check.
#[derive(Debug, Clone)]
pub struct IssueCandidate {
    /// The coupon to record if every rule allows it.
    pub coupon: IssuedCoupon,
    /// The campaign's caps.
    pub caps: Caps,
    /// The campaign's `audience.tags_any` (empty = everyone).
    pub audience_tags: Arc<[String]>,
}

/// Every candidate of one ping of one user: decided together so the daily cap counts coupons
/// issued earlier by the same ping.
#[derive(Debug, Clone)]
pub struct IssueRequest {
    /// The user (the same as the [`UserCommit`] it travels in).
    pub user_id: UserId,
    /// The ping's `ts_ms` (all rule 4 windows are measured from it).
    pub ts_ms: i64,
    /// The ping's position in its request's event-time order (ties of `ts_ms` in array order):
    /// a commit decides the issue requests of all its users in `(ts_ms, seq)` order.
    pub seq: u32,
    /// `max_coupons_per_user_per_day`; 0 = unlimited.
    pub daily_cap: u32,
    /// In ascending campaign id order (API.md: the daily cap takes campaigns in that order).
    pub candidates: Vec<IssueCandidate>,
}

/// What the store decided for one candidate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IssueOutcome {
    /// Recorded in the wallet and queued for push.
    Issued,
    /// This coupon id was already issued (a retried ping, another node).
    Duplicate,
    /// The user's devices carry none of the audience tags.
    Audience,
    /// A coupon of the campaign went to the user within the cooldown.
    Cooldown,
    /// The user already holds `per_user_max` coupons of the campaign.
    PerUserMax,
    /// The campaign already issued `total_max` coupons.
    TotalMax,
    /// The user received `max_coupons_per_user_per_day` coupons in the 24 h before.
    DailyCap,
}

/// Counters of one campaign (API.md `GET /v1/campaigns/{id}/stats`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CampaignStats {
    /// Coupons issued, ever.
    pub issued: u64,
    /// Of those, redeemed.
    pub redeemed: u64,
    /// What became of the coupons' pushes.
    pub pushes: PushStats,
}

/// Push outcomes of one campaign's coupons, one count per (coupon, device) push.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushStats {
    /// The provider accepted the push.
    pub delivered: u64,
    /// Failed at least once and waiting for another attempt (a gauge: it goes down again).
    pub retrying: u64,
    /// Given up: a permanent error, or `push_max_attempts` used up (then in the dead letters).
    pub failed: u64,
    /// The provider called the token dead; the device was removed.
    pub dead_token: u64,
}

/// Why a redemption was refused.
#[derive(Debug, thiserror::Error)]
pub enum RedeemError {
    /// No such coupon.
    #[error("unknown coupon")]
    NotFound,
    /// Redeemed before.
    #[error("coupon already redeemed")]
    AlreadyRedeemed,
    /// Past `expires_at_ms`.
    #[error("coupon expired")]
    Expired,
    /// The coupon belongs to another merchant.
    #[error("coupon belongs to another merchant")]
    WrongMerchant,
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// One user's trigger state as the store keeps it: opaque bytes (encoded and decoded by the
/// trigger module) and the version they were written at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserStateRecord {
    /// Changes on every commit; a commit names the version it read (see [`UserCommit`]).
    pub version: u64,
    /// The encoded state.
    pub bytes: Vec<u8>,
}

/// Trigger states held in memory by a store that keeps every one there (the in-memory and
/// embedded stores), each with the server time from which it may be forgotten.
///
/// In [`HELD_STATE_SHARDS`] maps by user, so that growing never rehashes every state at once: a
/// flood of new user ids makes many small resizes instead of one that moves millions of entries
/// while the store's lock is held (measured with `scripts/abuse/abuse.py user_churn`: one map
/// held every other request, a phone's ping too, for up to a second).
#[derive(Debug)]
pub(crate) struct HeldStates {
    shards: Box<[rustc_hash::FxHashMap<UserId, (UserStateRecord, i64)>]>,
    /// States held, kept by every change: read at every commit (the ceiling check).
    len: usize,
}

/// The number of maps [`HeldStates`] spreads users over.
pub(crate) const HELD_STATE_SHARDS: usize = 64;

impl Default for HeldStates {
    fn default() -> Self {
        Self { shards: (0..HELD_STATE_SHARDS).map(|_| Default::default()).collect(), len: 0 }
    }
}

impl HeldStates {
    fn map(&mut self, user: &UserId) -> &mut rustc_hash::FxHashMap<UserId, (UserStateRecord, i64)> {
        &mut self.shards[crate::ceiling::user_shard(user, HELD_STATE_SHARDS)]
    }

    pub(crate) fn get(&self, user: &UserId) -> Option<&(UserStateRecord, i64)> {
        self.shards[crate::ceiling::user_shard(user, HELD_STATE_SHARDS)].get(user)
    }

    pub(crate) fn insert(&mut self, user: UserId, held: (UserStateRecord, i64)) -> Option<(UserStateRecord, i64)> {
        let old = self.map(&user).insert(user, held);
        self.len += usize::from(old.is_none());
        old
    }

    pub(crate) fn remove(&mut self, user: &UserId) -> Option<(UserStateRecord, i64)> {
        let old = self.map(user).remove(user);
        self.len -= usize::from(old.is_some());
        old
    }

    /// Keeps the states `keep` says to keep, map by map; the users of those that go are returned.
    fn retain_in(&mut self, shard: usize, mut keep: impl FnMut(&(UserStateRecord, i64)) -> bool) -> Vec<UserId> {
        let mut gone = Vec::new();
        let map = &mut self.shards[shard];
        map.retain(|user, held| {
            let kept = keep(held);
            if !kept {
                gone.push(user.clone());
            }
            kept
        });
        crate::ceiling::shrink_if_mostly_empty(map);
        self.len -= gone.len();
        gone
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Removes the states of one of the maps (`shard` modulo their number) that may be forgotten
    /// at `now_ms`, and returns their users: a sweep a map at a time, so none holds the store's
    /// lock for a pass over every state.
    pub(crate) fn take_expired(&mut self, shard: usize, now_ms: i64) -> Vec<UserId> {
        self.retain_in(shard % HELD_STATE_SHARDS, |(_, forget_at_ms)| *forget_at_ms > now_ms)
    }

    pub(crate) fn values(&self) -> impl Iterator<Item = &(UserStateRecord, i64)> {
        self.shards.iter().flat_map(|shard| shard.values())
    }
}

/// Applies the `max_tracked_users` ceiling to `states` (0: none): once over it, the states that
/// may be forgotten soonest (the users idle longest) are dropped down to 90 % of it (see
/// [`crate::ceiling`]). Returns the users dropped, counted in
/// `kabao_tracked_users_dropped_total{from="store"}`. A dropped user's next ping starts afresh,
/// as after `state_ttl_s`; the caps and "already issued" still hold, they are not state.
pub(crate) fn drop_longest_idle(states: &mut HeldStates, max: usize) -> Vec<UserId> {
    // The length check first: this runs with every commit, almost always under the ceiling.
    if max == 0 || states.len() <= max {
        return Vec::new();
    }
    let times: Vec<i64> = states.values().map(|(_, at)| *at).collect();
    let Some(mut cut) = crate::ceiling::IdleCut::plan(times.into_iter(), max) else {
        return Vec::new();
    };
    let mut dropped = Vec::with_capacity(states.len() - (max - max / 10));
    for shard in 0..HELD_STATE_SHARDS {
        dropped.extend(states.retain_in(shard, |(_, forget_at_ms)| !cut.drops(*forget_at_ms)));
    }
    metrics::counter!("kabao_tracked_users_dropped_total", "from" => "store").increment(dropped.len() as u64);
    tracing::warn!(
        dropped = dropped.len(),
        max,
        "over max_tracked_users: the longest idle users' trigger states dropped"
    );
    dropped
}

/// What one request changes for one user: committed whole or not at all.
#[derive(Debug, Clone)]
pub struct UserCommit {
    /// The user.
    pub user_id: UserId,
    /// The version of the state the request's pings were applied to; `0` when the store had no
    /// state for the user. A store whose current version differs refuses the whole step.
    pub expected_version: u64,
    /// The state after the request, written at `new_version`; `None` when the request left the
    /// state as it was (every ping ignored): then only the version is checked.
    pub new_state: Option<Vec<u8>>,
    /// A fresh version for `new_state` (random, so a state erased and rebuilt never repeats an
    /// old version a node may still have cached). Unused when `new_state` is `None`.
    pub new_version: u64,
    /// The store may forget the state this long (server time) after the commit: by then no
    /// ping the user can still send is affected by it (see `Engine`'s eviction rule).
    pub keep_for_ms: i64,
    /// The user's pings that have candidates, in `ts_ms` order (each decided in turn, so the
    /// daily cap counts coupons issued earlier by the same request).
    pub issues: Vec<IssueRequest>,
}

/// How a store answered one [`UserCommit`].
#[derive(Debug, Clone, PartialEq)]
pub enum UserCommitResult {
    /// Applied whole: outcomes per issue request, per candidate, in the order given.
    Committed {
        /// The user's state version now (`new_version`, or the unchanged expected one).
        version: u64,
        /// `outcomes[i][j]` decides `issues[i].candidates[j]`.
        outcomes: Vec<Vec<IssueOutcome>>,
    },
    /// Refused whole: the user's state was changed meanwhile. Re-apply the pings to `current`
    /// (`None`: the store has no state for the user) and commit again.
    Conflict {
        /// The state as the store has it now.
        current: Option<UserStateRecord>,
    },
}

/// One push waiting to be delivered: one issued coupon to one device of its user, queued in the
/// same atomic step that issued the coupon.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutboxEntry {
    /// The store's handle for this delivery of the entry (a sequence number, a stream id): opaque
    /// to callers. A retried push may come back under a new handle; a finish or retry under a
    /// handle that was finished (or retried) before does nothing.
    pub id: String,
    /// The coupon to push.
    pub coupon: IssuedCoupon,
    /// The device, as registered when the coupon was issued.
    pub device_id: DeviceId,
    /// Its platform and token at that time.
    pub device: Device,
    /// Attempts made so far (0 for a fresh entry).
    pub attempts: u32,
}

/// How a push ended, for [`OutboxStore::outbox_finish`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PushFinal {
    /// The provider accepted it.
    Delivered,
    /// The provider called the token dead: the device is removed (if its token is still the one
    /// pushed to).
    DeadToken,
    /// Given up (a permanent error, or every attempt used): kept in the dead letters with the reason.
    Failed {
        /// Why, for the dead-letter list.
        reason: String,
    },
    /// Not sent: the device was deleted or re-registered with another token meanwhile.
    Dropped,
}

/// A push that was given up, kept for an operator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// The push as it was queued.
    pub entry: OutboxEntry,
    /// Why it was given up.
    pub reason: String,
    /// Server time it was given up.
    pub at_ms: i64,
}

/// A change of one campaign, as the change feed reports it.
#[derive(Debug, Clone)]
pub enum CampaignChange {
    /// Created or replaced: the campaign as it now is (its `revision` is the change's).
    Upsert(Arc<Campaign>),
    /// Deleted at `revision`.
    Delete {
        /// The deleted campaign.
        id: CampaignId,
        /// The store revision of the delete.
        revision: u64,
    },
}

impl CampaignChange {
    /// The campaign changed.
    pub fn campaign_id(&self) -> &CampaignId {
        match self {
            CampaignChange::Upsert(campaign) => &campaign.id,
            CampaignChange::Delete { id, .. } => id,
        }
    }

    /// The store revision the change was made at.
    pub fn revision(&self) -> u64 {
        match self {
            CampaignChange::Upsert(campaign) => campaign.revision,
            CampaignChange::Delete { revision, .. } => *revision,
        }
    }
}

/// The newest campaign changes of a store that keeps its change feed in memory (the in-memory
/// and the embedded store): a follower further behind than the log reloads everything.
#[derive(Debug, Default)]
pub(crate) struct ChangeLog {
    /// Oldest first, at most [`ChangeLog::KEPT`].
    kept: std::collections::VecDeque<CampaignChange>,
}

impl ChangeLog {
    const KEPT: usize = 4096;

    /// Records a change (the oldest is dropped once the log is full).
    pub(crate) fn push(&mut self, change: CampaignChange) {
        if self.kept.len() == Self::KEPT {
            self.kept.pop_front();
        }
        self.kept.push_back(change);
    }

    /// The feed's answer after revision `since`, when the store's revision is `revision`.
    pub(crate) fn since(&self, since: u64, revision: u64) -> CampaignChanges {
        let oldest_kept = self.kept.front().map_or(revision + 1, CampaignChange::revision);
        // Complete only if nothing after `since` was dropped from the log.
        let changes = (since >= revision || oldest_kept <= since + 1)
            .then(|| self.kept.iter().filter(|c| c.revision() > since).cloned().collect());
        CampaignChanges { revision, changes }
    }
}

/// What [`CampaignStore::campaign_changes`] answers.
#[derive(Debug, Clone, Default)]
pub struct CampaignChanges {
    /// The store's campaign revision the answer is complete up to.
    pub revision: u64,
    /// Every change after the asked revision up to `revision`, in revision order; when the
    /// store no longer holds them all, `None`: reload every campaign instead.
    pub changes: Option<Vec<CampaignChange>>,
}

/// Campaigns: the source of truth every node's fence index is built from.
#[async_trait]
pub trait CampaignStore: Send + Sync + 'static {
    /// Stores a new campaign at a new store revision (set in the returned campaign);
    /// [`StoreError::Conflict`] when its id is taken. Its counters start at zero, also when the id
    /// was used by a deleted campaign.
    async fn insert_campaign(&self, campaign: Campaign) -> Result<Arc<Campaign>, StoreError>;
    /// Replaces an existing campaign at a new store revision; [`StoreError::NotFound`] when there
    /// is none. Counters are kept.
    async fn replace_campaign(&self, campaign: Campaign) -> Result<Arc<Campaign>, StoreError>;
    /// Deletes a campaign (its issued coupons stay in wallets); [`StoreError::NotFound`] when
    /// absent. Returns the delete's revision.
    async fn delete_campaign(&self, id: &CampaignId) -> Result<u64, StoreError>;
    /// One campaign.
    async fn campaign(&self, id: &CampaignId) -> Result<Option<Arc<Campaign>>, StoreError>;
    /// Up to `limit` campaigns with ids greater than `after`, ascending by id.
    async fn campaigns_page(&self, after: Option<&str>, limit: usize) -> Result<Vec<Arc<Campaign>>, StoreError>;
    /// Every campaign and the revision they are complete up to (to build the fence index).
    async fn all_campaigns(&self) -> Result<(u64, Vec<Arc<Campaign>>), StoreError>;
    /// The change feed: every campaign change after revision `since`.
    async fn campaign_changes(&self, since: u64) -> Result<CampaignChanges, StoreError>;
    /// Counters of a campaign (zeros for a campaign that issued nothing).
    async fn campaign_stats(&self, id: &CampaignId) -> Result<CampaignStats, StoreError>;
}

/// Devices: where a user's pushes go, and whose tags make the audience.
#[async_trait]
pub trait DeviceStore: Send + Sync + 'static {
    /// Registers or updates a device of a user.
    async fn put_device(&self, user: &UserId, device: &DeviceId, value: Device) -> Result<(), StoreError>;
    /// Removes a device; `false` when it was not there.
    async fn delete_device(&self, user: &UserId, device: &DeviceId) -> Result<bool, StoreError>;
    /// The user's devices, by device id.
    async fn devices(&self, user: &UserId) -> Result<Vec<(DeviceId, Device)>, StoreError>;
    /// Erases everything kept about the user (API.md `DELETE /v1/users/{id}`): devices, wallet
    /// and coupon records, trigger state, per-user counters, pending pushes. Campaign totals
    /// (`issued`, `total_max`) keep counting the erased coupons.
    async fn erase_user(&self, user: &UserId) -> Result<(), StoreError>;
}

/// Issuance and redemption: the atomic steps.
#[async_trait]
pub trait IssueStore: Send + Sync + 'static {
    /// The stored trigger states of `users` (in their order; `None`: none stored), read at once.
    async fn load_user_states(&self, users: &[UserId]) -> Result<Vec<Option<UserStateRecord>>, StoreError>;
    /// Commits one request: each [`UserCommit`] is one atomic, version-checked step (see the module
    /// docs); results are in the order of `commits`. Issue requests of different users are
    /// decided in ascending `ts_ms` order where the store can (so the earliest ping wins a last
    /// `total_max` coupon). Durable before it returns, where the store is durable.
    async fn commit(&self, commits: Vec<UserCommit>) -> Result<Vec<UserCommitResult>, StoreError>;

    /// The user's coupons, newest first (ties by coupon id).
    async fn wallet(&self, user: &UserId) -> Result<Vec<CouponRecord>, StoreError>;
    /// One coupon.
    async fn coupon(&self, id: &CouponId) -> Result<Option<CouponRecord>, StoreError>;
    /// Redeems a coupon exactly once, at server time `now_ms`.
    async fn redeem(&self, id: &CouponId, merchant_id: &str, now_ms: i64) -> Result<CouponRecord, RedeemError>;
}

/// The push outbox and its dead letters.
#[async_trait]
pub trait OutboxStore: Send + Sync + 'static {
    /// Up to `max` pushes due at server time `now_ms`, oldest first, leased to `consumer` for
    /// `lease_ms`: no other consumer is handed them before the lease runs out (a consumer that
    /// died leaves its entries to be taken over then). The lease runs on the store's clock where
    /// the store has one shared by every node (Redis: the consumer group's idle time), on `now_ms`
    /// otherwise; callers pass the wall clock. Retries are due by `now_ms`. A store that outlives
    /// its consumers may hand a consumer's first take in a process what a dead process of the
    /// same name left leased, at once.
    async fn outbox_take(
        &self,
        consumer: &str,
        max: usize,
        now_ms: i64,
        lease_ms: i64,
    ) -> Result<Vec<OutboxEntry>, StoreError>;
    /// A failed attempt: the entry is due again at `not_before_ms` with `attempts` recorded.
    async fn outbox_retry(&self, entry: &OutboxEntry, attempts: u32, not_before_ms: i64) -> Result<(), StoreError>;
    /// A final outcome: the entry leaves the outbox, the campaign's push stats count it, a dead
    /// token removes the device, a failure goes to the dead letters.
    async fn outbox_finish(&self, entry: &OutboxEntry, outcome: PushFinal, now_ms: i64) -> Result<(), StoreError>;
    /// How many pushes are waiting (a gauge for `/metrics`).
    async fn outbox_len(&self) -> Result<u64, StoreError>;
    /// The newest `limit` dead letters, newest first.
    async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, StoreError>;
}

/// A push provider's credential as the store keeps it: signed by one node, used by every node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProviderToken {
    /// The credential itself (the APNs provider token: a signed JWT).
    pub token: String,
    /// When it was signed, ms since the epoch on the signer's clock (the JWT's `iat`).
    pub issued_at_ms: i64,
}

/// Provider credentials shared by every node: the APNs provider token. APNs refuses a key's
/// token being replaced more often than every 20 minutes, so nodes (and a node restarted) must
/// not each sign their own; they keep one in the store, and whoever finds it due replaces it.
#[async_trait]
pub trait ProviderTokenStore: Send + Sync + 'static {
    /// The token kept under `slot`, unless none is kept or the kept one was issued
    /// `replace_after_ms` or more before `candidate`: then `candidate` is kept in its place and
    /// returned. One atomic step, so of callers racing with candidates of their own, every one
    /// gets the token the first of them kept. Durable where the store is; a store may forget a
    /// token an hour after it was issued (APNs refuses it by then).
    async fn provider_token(
        &self,
        slot: &str,
        candidate: ProviderToken,
        replace_after_ms: i64,
    ) -> Result<ProviderToken, StoreError>;
}

/// Whether `kept` is to be replaced by `candidate` ([`ProviderTokenStore::provider_token`]).
pub(crate) fn provider_token_due(kept: &ProviderToken, candidate: &ProviderToken, replace_after_ms: i64) -> bool {
    candidate.issued_at_ms.saturating_sub(kept.issued_at_ms) >= replace_after_ms
}

/// The [`ProviderTokenStore`] role of a whole store, for a client that needs only that role (a
/// `dyn Store` is not upcast to one of its role traits before Rust 1.86; kabao builds on 1.85).
pub fn provider_tokens(store: Arc<dyn Store>) -> Arc<dyn ProviderTokenStore> {
    Arc::new(ProviderTokensOf(store))
}

/// See [`provider_tokens`].
struct ProviderTokensOf(Arc<dyn Store>);

#[async_trait]
impl ProviderTokenStore for ProviderTokensOf {
    async fn provider_token(
        &self,
        slot: &str,
        candidate: ProviderToken,
        replace_after_ms: i64,
    ) -> Result<ProviderToken, StoreError> {
        self.0.provider_token(slot, candidate, replace_after_ms).await
    }
}

/// The shared state of kabao: every role, plus health.
#[async_trait]
pub trait Store: CampaignStore + DeviceStore + IssueStore + OutboxStore + ProviderTokenStore {
    /// A short name for logs (`memory`, `embedded`, `redis`).
    fn kind(&self) -> &'static str;
    /// Answers when the store is reachable and still the one it was ([`StoreError::Lost`]
    /// otherwise): `/readyz`.
    async fn health(&self) -> Result<(), StoreError>;
    /// Writes what is held back for durability later (the embedded store's trigger state
    /// checkpoint); called at graceful shutdown.
    async fn close(&self) -> Result<(), StoreError> {
        Ok(())
    }
    /// The rate limiter every node on this store shares (Redis), or `None` where each node keeps
    /// its own buckets (memory, embedded: one node).
    fn shared_rate_limiter(self: Arc<Self>) -> Option<Arc<dyn crate::http::rate_limit::RateLimiter>> {
        None
    }
}
