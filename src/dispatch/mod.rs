//! Delivery of issued coupons to phones: the store's outbox → a push provider, at least once.
//!
//! Issuance queues one outbox entry per (coupon, device) in the same atomic step as the coupon;
//! [`worker::Dispatcher`] takes due entries, sends each through its device's provider, and records
//! the final outcome in the store (or schedules a retry). A provider's answer is classified once,
//! by the provider, into a [`PushOutcome`]. The push carries the coupon id so a phone can drop a
//! repeat (delivery is at least once).

pub mod log;
pub mod worker;

use std::time::Duration;

use async_trait::async_trait;

use crate::store::{Device, IssuedCoupon};

/// What a provider said about one push (one coupon to one device).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PushOutcome {
    /// Accepted by the provider.
    Delivered,
    /// FCM 404 UNREGISTERED, APNs 410 or 400 BadDeviceToken: remove the device, no retry.
    DeadToken {
        /// The provider's words.
        reason: String,
    },
    /// 429, 500, 503, timeouts, dropped connections, token endpoint down: try again later, not
    /// before `retry_after` when the provider said (Retry-After header).
    Retry {
        /// What went wrong.
        reason: String,
        /// The provider's `Retry-After`, if any.
        retry_after: Option<Duration>,
    },
    /// Any other 4xx: give up, no retry.
    Failed {
        /// The provider's words.
        reason: String,
    },
}

/// A push service (FCM, APNs, or the log).
#[async_trait]
pub trait PushProvider: Send + Sync + 'static {
    /// A short name for logs and metrics (`fcm`, `apns`, `log`).
    fn name(&self) -> &'static str;
    /// Sends one coupon to one device.
    async fn send(&self, device: &Device, coupon: &IssuedCoupon) -> PushOutcome;
}
