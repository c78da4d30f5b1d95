//! Delivery of issued coupons to phones: the store's outbox → a push provider, at least once.
//!
//! Issuance queues one outbox entry per (coupon, device) in the same atomic step as the coupon;
//! [`worker::Dispatcher`] takes due entries, sends each through its device's provider ([`fcm`],
//! [`apns`] or [`log`], chosen by [`providers_from_config`]), and records the final outcome in the
//! store or schedules a retry with [`Backoff`]. A provider classifies its own answers into a
//! [`PushOutcome`]. The push carries the coupon id so a phone can drop a repeat (delivery is at
//! least once).

pub mod apns;
pub mod clock;
pub mod fcm;
mod http_client;
pub mod log;
pub mod payload;
pub mod providers;
pub mod worker;

pub use providers::{providers_from_config, Providers};

use std::time::Duration;

use async_trait::async_trait;

use crate::store::{Device, IssuedCoupon};

/// What a provider said about one push (one coupon to one device).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PushOutcome {
    /// Accepted by the provider.
    Delivered,
    /// FCM 404 `UNREGISTERED`, APNs 410 or 400 `BadDeviceToken`: remove the device, no retry.
    DeadToken {
        /// What the provider said, for the log and the dead-letter list.
        reason: String,
    },
    /// 429, 500, 503, timeouts, dropped connections, token endpoint down: try again later, not
    /// before `retry_after` when the provider said (its `Retry-After` header).
    Retry {
        /// What went wrong, for the log and (after the last attempt) the dead-letter list.
        reason: String,
        /// The provider's `Retry-After`, when it gave one.
        retry_after: Option<Duration>,
    },
    /// Any other 4xx: give up, no retry.
    Failed {
        /// What the provider said.
        reason: String,
    },
}

impl PushOutcome {
    /// The metric label of this outcome (`kabao_pushes_total{outcome=…}`, `kabao_push_duration_seconds{outcome=…}`).
    pub fn label(&self) -> &'static str {
        match self {
            PushOutcome::Delivered => "delivered",
            PushOutcome::DeadToken { .. } => "dead_token",
            PushOutcome::Retry { .. } => "retry",
            PushOutcome::Failed { .. } => "failed",
        }
    }

    /// A retry without a `Retry-After`.
    pub fn retry(reason: impl Into<String>) -> Self {
        PushOutcome::Retry { reason: reason.into(), retry_after: None }
    }
}

/// A push service (FCM, APNs, or the log).
#[async_trait]
pub trait PushProvider: Send + Sync + 'static {
    /// A short name for logs and metrics: `"fcm"`, `"apns"`, `"log"`.
    fn name(&self) -> &'static str;
    /// Sends one coupon to one device. Never panics and never fails outright: every way a push
    /// can go wrong is one of the [`PushOutcome`]s.
    async fn send(&self, device: &Device, coupon: &IssuedCoupon) -> PushOutcome;
}

/// Exponential backoff with full jitter, honouring `Retry-After`: the delay before attempt n+1.
///
/// Attempt `n` (1-based: the attempt that just failed) draws uniformly from
/// `0..=min(max, base × 2^(n-1))` ("full jitter": retries of many pushes failed together spread
/// out instead of arriving in waves), and never less than the provider's `Retry-After`, which is
/// honoured even above `max` (the provider said when it will take the push again).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// The ceiling of the first delay.
    pub base: Duration,
    /// The largest ceiling any delay draws under.
    pub max: Duration,
}

impl Default for Backoff {
    /// 1 s doubling to 5 min: eight attempts span about ten minutes at most before Retry-After.
    fn default() -> Self {
        Self { base: Duration::from_secs(1), max: Duration::from_secs(300) }
    }
}

impl Backoff {
    /// The delay before attempt `attempt + 1`, after `attempt` attempts failed (0 reads as 1).
    pub fn delay(&self, attempt: u32, retry_after: Option<Duration>, rng: &mut impl rand::Rng) -> Duration {
        let doublings = attempt.saturating_sub(1);
        let ceiling = match 1u32.checked_shl(doublings).and_then(|factor| self.base.checked_mul(factor)) {
            Some(d) => d.min(self.max),
            None => self.max,
        };
        let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
        let jittered = Duration::from_nanos(rng.gen_range(0..=nanos));
        jittered.max(retry_after.unwrap_or(Duration::ZERO))
    }
}
