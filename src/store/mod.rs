//! The store: campaigns, devices, wallets, caps and the push outbox, behind one trait.
//!
//! Two implementations share one contract: [`memory::MemoryStore`] (the embedded default, one
//! node) and a Redis one (many nodes). Whatever decides whether a coupon may be issued — audience,
//! cooldown, per-user and total maxima, the daily cap, "already issued" — is checked and recorded
//! in one atomic step ([`Store::issue`]), so concurrent requests can never break a cap or issue
//! twice.

#[doc(hidden)]
pub mod contract;
pub mod memory;

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
    /// The store cannot be reached or failed; nothing was applied.
    #[error("store unavailable: {0}")]
    Unavailable(String),
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
    /// The user.
    pub user_id: UserId,
    /// The ping's `ts_ms` (all rule 4 windows are measured from it).
    pub ts_ms: i64,
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

/// Counters of one campaign.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CampaignStats {
    /// Coupons issued, ever.
    pub issued: u64,
    /// Of those, redeemed.
    pub redeemed: u64,
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

/// A push waiting to be delivered: one issued coupon, to every device of its user.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutboxEntry {
    /// Position in the outbox, used to acknowledge it.
    pub seq: u64,
    /// The coupon to push.
    pub coupon: IssuedCoupon,
}

/// The shared state of kabao. See the module docs for the atomicity it promises.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Answers when the store is reachable (`/readyz`).
    async fn health(&self) -> Result<(), StoreError>;

    /// Stores a new campaign; [`StoreError::Conflict`] when its id is taken.
    async fn insert_campaign(&self, campaign: Arc<Campaign>) -> Result<(), StoreError>;
    /// Replaces an existing campaign; [`StoreError::NotFound`] when there is none.
    async fn replace_campaign(&self, campaign: Arc<Campaign>) -> Result<(), StoreError>;
    /// Deletes a campaign (its issued coupons stay in wallets); [`StoreError::NotFound`] when absent.
    async fn delete_campaign(&self, id: &CampaignId) -> Result<(), StoreError>;
    /// One campaign.
    async fn campaign(&self, id: &CampaignId) -> Result<Option<Arc<Campaign>>, StoreError>;
    /// Up to `limit` campaigns with ids greater than `after`, ascending by id.
    async fn campaigns_page(&self, after: Option<&str>, limit: usize) -> Result<Vec<Arc<Campaign>>, StoreError>;
    /// Every campaign (to build the fence index).
    async fn all_campaigns(&self) -> Result<Vec<Arc<Campaign>>, StoreError>;
    /// Counters of a campaign (zeros for a campaign that issued nothing).
    async fn campaign_stats(&self, id: &CampaignId) -> Result<CampaignStats, StoreError>;

    /// Registers or updates a device of a user.
    async fn put_device(&self, user: &UserId, device: &DeviceId, value: Device) -> Result<(), StoreError>;
    /// Removes a device; `false` when it was not there.
    async fn delete_device(&self, user: &UserId, device: &DeviceId) -> Result<bool, StoreError>;
    /// The user's devices.
    async fn devices(&self, user: &UserId) -> Result<Vec<(DeviceId, Device)>, StoreError>;

    /// Decides every candidate of one ping in one atomic step: checks rule 4's store half
    /// (audience, cooldown, per-user max, total max, daily cap) and "already issued", and for
    /// each allowed one records the coupon in the wallet and the outbox. Outcomes are in the
    /// order of `request.candidates`.
    async fn issue(&self, request: IssueRequest) -> Result<Vec<IssueOutcome>, StoreError>;

    /// The user's coupons, newest first (ties by coupon id).
    async fn wallet(&self, user: &UserId) -> Result<Vec<CouponRecord>, StoreError>;
    /// One coupon.
    async fn coupon(&self, id: &CouponId) -> Result<Option<CouponRecord>, StoreError>;
    /// Redeems a coupon exactly once, at server time `now_ms`.
    async fn redeem(&self, id: &CouponId, merchant_id: &str, now_ms: i64) -> Result<CouponRecord, RedeemError>;

    /// Up to `max` pushes not yet acknowledged, oldest first. An entry taken but not acknowledged
    /// is handed out again after `redeliver_after_ms` (at-least-once delivery).
    async fn outbox_take(
        &self,
        max: usize,
        now_ms: i64,
        redeliver_after_ms: i64,
    ) -> Result<Vec<OutboxEntry>, StoreError>;
    /// Marks pushes as delivered.
    async fn outbox_ack(&self, seqs: &[u64]) -> Result<(), StoreError>;
}
