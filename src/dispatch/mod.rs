//! Delivery of issued coupons to phones: the store's outbox → a push provider, at least once.
//!
//! The dispatcher takes pushes from the outbox, sends each coupon to every device of its user,
//! drops devices whose token the provider calls dead, and acknowledges the entry. An entry whose
//! delivery failed is not acknowledged, so the store hands it out again later; the push carries
//! the coupon id so a phone can drop a repeat.

pub mod log;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::domain::DeviceId;
use crate::engine::now_ms;
use crate::store::{Device, IssuedCoupon, Store};

/// What a provider said about one push.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PushResult {
    /// Accepted by the provider.
    Delivered,
    /// The provider says the token will never work again: remove the device.
    DeadToken,
    /// A temporary failure: try again later.
    Retry,
}

/// A push service (FCM, APNs, or the log).
#[async_trait]
pub trait PushProvider: Send + Sync + 'static {
    /// A short name for logs and metrics.
    fn name(&self) -> &'static str;
    /// Sends one coupon to one device.
    async fn send(&self, device: &Device, coupon: &IssuedCoupon) -> PushResult;
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
            match provider.send(device, coupon).await {
                PushResult::Delivered => {
                    metrics::counter!("kabao_pushes_total", "provider" => provider.name(), "result" => "delivered")
                        .increment(1);
                }
                PushResult::DeadToken => {
                    metrics::counter!("kabao_pushes_total", "provider" => provider.name(), "result" => "dead_token")
                        .increment(1);
                    remove_dead_device(store, coupon, device_id).await?;
                }
                PushResult::Retry => {
                    metrics::counter!("kabao_pushes_total", "provider" => provider.name(), "result" => "retry")
                        .increment(1);
                    retry = true;
                }
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
