//! A store that asks a check before every call and then delegates to another store: the one
//! place fault injection for tests is written (a store that goes down, an outbox held closed),
//! so a decorator never re-lists the trait by hand. Test support, not part of the service.

use std::sync::Arc;

use async_trait::async_trait;

use super::{
    CampaignChanges, CampaignStats, CampaignStore, CouponRecord, DeadLetter, Device, DeviceStore, IssueStore,
    OutboxEntry, OutboxStore, ProviderToken, ProviderTokenStore, PushFinal, RedeemError, Store, StoreError, UserCommit,
    UserCommitResult, UserStateRecord,
};
use crate::domain::{Campaign, CampaignId, CouponId, DeviceId, UserId};

/// Decides, from a method's name, whether the call goes through (`Ok`) or fails as given.
pub type Check = dyn Fn(&'static str) -> Result<(), StoreError> + Send + Sync;

/// `inner`, with `check` asked before every call.
pub struct Hooked {
    inner: Arc<dyn Store>,
    check: Box<Check>,
}

impl Hooked {
    /// Wraps `inner`.
    pub fn new(
        inner: Arc<dyn Store>,
        check: impl Fn(&'static str) -> Result<(), StoreError> + Send + Sync + 'static,
    ) -> Self {
        Self { inner, check: Box::new(check) }
    }
}

/// Implements a store role for [`Hooked`]: each listed method asks the check, then delegates.
macro_rules! hooked {
    ($role:ident { $($name:ident($($arg:ident: $ty:ty),*) -> $ret:ty;)* } $($extra:item)*) => {
        #[async_trait]
        impl $role for Hooked {
            $($extra)*
            $(
                async fn $name(&self, $($arg: $ty),*) -> $ret {
                    (self.check)(stringify!($name))?;
                    self.inner.$name($($arg),*).await
                }
            )*
        }
    };
}

hooked! {
    CampaignStore {
        insert_campaign(campaign: Campaign) -> Result<Arc<Campaign>, StoreError>;
        replace_campaign(campaign: Campaign) -> Result<Arc<Campaign>, StoreError>;
        delete_campaign(id: &CampaignId) -> Result<u64, StoreError>;
        campaign(id: &CampaignId) -> Result<Option<Arc<Campaign>>, StoreError>;
        campaigns_page(after: Option<&str>, limit: usize) -> Result<Vec<Arc<Campaign>>, StoreError>;
        all_campaigns() -> Result<(u64, Vec<Arc<Campaign>>), StoreError>;
        campaign_changes(since: u64) -> Result<CampaignChanges, StoreError>;
        campaign_stats(id: &CampaignId) -> Result<CampaignStats, StoreError>;
    }
}

hooked! {
    DeviceStore {
        put_device(user: &UserId, device: &DeviceId, value: Device) -> Result<(), StoreError>;
        delete_device(user: &UserId, device: &DeviceId) -> Result<bool, StoreError>;
        devices(user: &UserId) -> Result<Vec<(DeviceId, Device)>, StoreError>;
        erase_user(user: &UserId) -> Result<(), StoreError>;
    }
}

hooked! {
    IssueStore {
        load_user_states(users: &[UserId]) -> Result<Vec<Option<UserStateRecord>>, StoreError>;
        commit(commits: Vec<UserCommit>) -> Result<Vec<UserCommitResult>, StoreError>;
        wallet(user: &UserId) -> Result<Vec<CouponRecord>, StoreError>;
        coupon(id: &CouponId) -> Result<Option<CouponRecord>, StoreError>;
        redeem(id: &CouponId, merchant_id: &str, now_ms: i64) -> Result<CouponRecord, RedeemError>;
    }
}

hooked! {
    OutboxStore {
        outbox_take(consumer: &str, max: usize, now_ms: i64, lease_ms: i64) -> Result<Vec<OutboxEntry>, StoreError>;
        outbox_retry(entry: &OutboxEntry, attempts: u32, not_before_ms: i64) -> Result<(), StoreError>;
        outbox_finish(entry: &OutboxEntry, outcome: PushFinal, now_ms: i64) -> Result<(), StoreError>;
        outbox_len() -> Result<u64, StoreError>;
        dead_letters(limit: usize) -> Result<Vec<DeadLetter>, StoreError>;
    }
}

hooked! {
    ProviderTokenStore {
        provider_token(slot: &str, candidate: ProviderToken, replace_after_ms: i64) -> Result<ProviderToken, StoreError>;
    }
}

hooked! {
    Store {
        health() -> Result<(), StoreError>;
        close() -> Result<(), StoreError>;
    }
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }
    fn shared_rate_limiter(self: Arc<Self>) -> Option<Arc<dyn crate::http::rate_limit::RateLimiter>> {
        self.inner.clone().shared_rate_limiter()
    }
}
