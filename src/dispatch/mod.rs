//! Delivery of issued coupons to phones: the store's outbox → a push provider, at least once.
//!
//! The dispatcher takes pushes from the outbox, sends each coupon to every device of its user,
//! drops devices whose token the provider calls dead, and acknowledges the entry. An entry whose
//! delivery failed is not acknowledged, so the store hands it out again later; the push carries
//! the coupon id so a phone can drop a repeat.

pub mod apns;
pub mod clock;
pub mod fcm;
mod http_client;
pub mod log;
pub mod payload;
pub mod providers;

pub use providers::{providers_from_config, Providers};

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::domain::DeviceId;
use crate::engine::now_ms;
use crate::store::{Device, IssuedCoupon, Store};

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
    /// The metric label of this outcome (`kabao_pushes_total{result=…}`).
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

/// How many outbox entries one round takes.
const BATCH: usize = 256;
/// An entry taken but not acknowledged is handed out again after this long.
const REDELIVER_AFTER_MS: i64 = 30_000;
/// Longest wait between rounds when nobody signals new coupons (entries to redeliver, other nodes).
const IDLE_POLL: Duration = Duration::from_millis(500);

/// Drains the outbox into a provider until `shutdown` is cancelled.
pub async fn run_dispatcher(
    store: Arc<dyn Store>,
    provider: Arc<dyn PushProvider>,
    issued: Arc<Notify>,
    shutdown: CancellationToken,
) {
    loop {
        let delivered = match dispatch_round(store.as_ref(), provider.as_ref()).await {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(error = %e, "push round failed; retrying");
                0
            }
        };
        if delivered == BATCH {
            continue;
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = issued.notified() => {}
            _ = tokio::time::sleep(IDLE_POLL) => {}
        }
    }
}

/// One round: take a batch, push each entry to all devices of its user, acknowledge what went
/// out. Returns how many entries were taken.
pub async fn dispatch_round(store: &dyn Store, provider: &dyn PushProvider) -> Result<usize, crate::store::StoreError> {
    let entries = store.outbox_take(BATCH, now_ms(), REDELIVER_AFTER_MS).await?;
    let mut done = Vec::with_capacity(entries.len());
    for entry in &entries {
        let coupon = &entry.coupon;
        let devices = store.devices(&coupon.user_id).await?;
        let mut retry = false;
        for (device_id, device) in &devices {
            let outcome = provider.send(device, coupon).await;
            metrics::counter!("kabao_pushes_total", "provider" => provider.name(), "result" => outcome.label())
                .increment(1);
            match outcome {
                PushOutcome::Delivered => {}
                PushOutcome::DeadToken { .. } => remove_dead_device(store, coupon, device_id).await?,
                // Not acknowledged, so the outbox hands the entry out again (the loop that
                // schedules retries with `Backoff` and dead-letters failures replaces this).
                PushOutcome::Retry { .. } | PushOutcome::Failed { .. } => retry = true,
            }
        }
        if !retry {
            done.push(entry.seq);
        }
    }
    store.outbox_ack(&done).await?;
    Ok(entries.len())
}

async fn remove_dead_device(
    store: &dyn Store,
    coupon: &IssuedCoupon,
    device_id: &DeviceId,
) -> Result<(), crate::store::StoreError> {
    tracing::info!(user_id = %coupon.user_id, device_id = %device_id, "removing device with a dead push token");
    store.delete_device(&coupon.user_id, device_id).await?;
    Ok(())
}
