//! The dispatcher: drains the store's outbox into the push providers.
//!
//! One unit of work is one outbox entry (one coupon to one device): [`Dispatcher::deliver`] sends
//! it and records what became of it — delivered, dead token (the device is removed), failed (to
//! the dead letters), or a retry scheduled with exponential backoff and jitter that honours the
//! provider's `Retry-After`. Entries are leased while in flight, so any number of dispatchers
//! (on any number of nodes) share one outbox and an entry whose dispatcher died is taken over
//! when its lease runs out. A provider that answered success is not sent the entry again, except
//! when kabao dies between that answer and recording it (the window of at-least-once delivery).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{Backoff, Providers, PushOutcome};
use crate::config::PushConfig;
use crate::engine::now_ms;
use crate::store::{OutboxEntry, Platform, PushFinal, Store, StoreError};

/// How the dispatcher paces itself.
#[derive(Debug, Clone)]
pub struct DispatchConfig {
    /// Attempts before a push goes to the dead letters (`push_max_attempts`).
    pub max_attempts: u32,
    /// Pushes in flight at once, per provider.
    pub concurrency_per_provider: usize,
    /// Delays between attempts.
    pub backoff: Backoff,
    /// How long an entry handed out stays leased to this dispatcher.
    pub lease: Duration,
    /// Longest wait for new entries when nobody signals (entries due for retry, other nodes).
    pub idle_poll: Duration,
    /// How often the outbox depth is sampled into the `kabao_outbox_pending` gauge.
    pub gauge_interval: Duration,
}

impl Default for DispatchConfig {
    fn default() -> Self {
        Self::from_push(&PushConfig::default())
    }
}

impl DispatchConfig {
    /// The dispatcher settings of `push` (API.md's `push_*` settings); the rest fixed.
    pub fn from_push(push: &PushConfig) -> Self {
        Self {
            max_attempts: push.max_attempts,
            concurrency_per_provider: push.concurrency_per_provider,
            backoff: Backoff { base: push.backoff_base, max: push.backoff_max },
            // Far above the longest attempt (the request timeout, 10 s by default), so an entry
            // in flight is never handed to a second dispatcher (a config of less is refused; a
            // PushConfig built in code is held to it here).
            lease: push.lease.max(push.request_timeout * 3),
            idle_poll: Duration::from_millis(200),
            gauge_interval: Duration::from_secs(5),
        }
    }
}

/// Drains one outbox into the providers.
pub struct Dispatcher {
    store: Arc<dyn Store>,
    providers: Providers,
    config: DispatchConfig,
    /// This dispatcher's name in the outbox (a consumer of the stream, in Redis).
    consumer: String,
    /// Pushes in flight, per provider.
    fcm_slots: Arc<Semaphore>,
    apns_slots: Arc<Semaphore>,
}

impl Dispatcher {
    /// A dispatcher named `consumer` (unique per process).
    pub fn new(store: Arc<dyn Store>, providers: Providers, config: DispatchConfig, consumer: String) -> Arc<Self> {
        let slots = || Arc::new(Semaphore::new(config.concurrency_per_provider.max(1)));
        Arc::new(Self { store, providers, fcm_slots: slots(), apns_slots: slots(), config, consumer })
    }

    /// Takes and delivers due entries until `shutdown` is cancelled; then waits for the pushes in
    /// flight (their leases cover a dispatcher that is killed instead). Samples the outbox depth
    /// into `kabao_outbox_pending` meanwhile.
    pub async fn run(self: Arc<Self>, issued: Arc<Notify>, shutdown: CancellationToken) {
        let sampler =
            tokio::spawn(sample_outbox_depth(self.store.clone(), self.config.gauge_interval, shutdown.clone()));
        let in_flight = TaskTracker::new();
        loop {
            let more = match self.take_round(&in_flight).await {
                Ok(more) => more,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the push outbox; retrying");
                    false
                }
            };
            if shutdown.is_cancelled() {
                break;
            }
            if more {
                continue;
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = issued.notified() => {}
                _ = tokio::time::sleep(self.config.idle_poll) => {}
            }
        }
        in_flight.close();
        in_flight.wait().await;
        sampler.abort();
    }

    /// Takes as many due entries as there are free slots and starts delivering each. `true`
    /// when another round should follow at once (entries were taken, or a slot just came free
    /// after all were busy); `false` when nothing was due.
    async fn take_round(self: &Arc<Self>, in_flight: &TaskTracker) -> Result<bool, StoreError> {
        let fcm_free = self.fcm_slots.available_permits();
        let apns_free = self.apns_slots.available_permits();
        // Under load, take in batches: one store round trip per eighth of the slots rather than
        // one per finished push.
        let batch = (self.config.concurrency_per_provider / 8).max(1);
        if fcm_free.min(apns_free) < batch {
            // A provider's slots are (nearly) all busy: wait until a batch of them is free
            // rather than spin, then take again at once (waiting for the idle poll here would
            // cap throughput at one round of slots per poll interval).
            let fuller = if fcm_free <= apns_free { &self.fcm_slots } else { &self.apns_slots };
            let wanted = u32::try_from(batch).unwrap_or(u32::MAX);
            drop(fuller.acquire_many(wanted).await);
            return Ok(true);
        }
        let free = fcm_free.min(apns_free);
        let lease_ms = self.config.lease.as_millis() as i64;
        let entries = self.store.outbox_take(&self.consumer, free.min(512), now_ms(), lease_ms).await?;
        let taken_at = Instant::now();
        let taken = entries.len();
        for entry in entries {
            let slots = match entry.device.platform {
                Platform::Fcm => self.fcm_slots.clone(),
                Platform::Apns => self.apns_slots.clone(),
            };
            let Ok(permit) = slots.acquire_owned().await else { break };
            let this = Arc::clone(self);
            in_flight.spawn(async move {
                if let Err(e) = this.deliver_taken(entry, taken_at).await {
                    tracing::warn!(error = %e, "cannot record a push outcome; the entry is redelivered later");
                }
                drop(permit);
            });
        }
        Ok(taken > 0)
    }

    /// One unit of work: sends one entry and records its outcome.
    pub async fn deliver(&self, entry: OutboxEntry) -> Result<(), StoreError> {
        self.deliver_taken(entry, Instant::now()).await
    }

    /// [`Self::deliver`] of an entry taken from the outbox at `taken_at`: the push's latency
    /// (`kabao_push_duration_seconds`) runs from then to the provider's answer.
    async fn deliver_taken(&self, mut entry: OutboxEntry, taken_at: Instant) -> Result<(), StoreError> {
        let provider = self.providers.for_platform(entry.device.platform);
        let name = provider.name();
        // A device deleted (or given another token) since the coupon was issued gets nothing.
        let devices = self.store.devices(&entry.coupon.user_id).await?;
        let current = devices.iter().find(|(id, _)| *id == entry.device_id).map(|(_, d)| d);
        if current.is_none_or(|d| d.token != entry.device.token || d.platform != entry.device.platform) {
            record_outcome(name, "dropped");
            return self.store.outbox_finish(&entry, PushFinal::Dropped, now_ms()).await;
        }
        let outcome = provider.send(&entry.device, &entry.coupon).await;
        metrics::histogram!("kabao_push_duration_seconds", "provider" => name, "outcome" => outcome.label())
            .record(taken_at.elapsed().as_secs_f64());
        let now = now_ms();
        match outcome {
            PushOutcome::Delivered => {
                record_outcome(name, "delivered");
                self.store.outbox_finish(&entry, PushFinal::Delivered, now).await
            }
            PushOutcome::DeadToken { reason } => {
                record_outcome(name, "dead_token");
                tracing::info!(provider = name, device_id = %entry.device_id, %reason, "dead push token; removing the device");
                self.store.outbox_finish(&entry, PushFinal::DeadToken, now).await
            }
            PushOutcome::Failed { reason } => {
                record_outcome(name, "failed");
                // The attempt count goes into the reason: what a store keeps of the entry may
                // not count this last attempt.
                let reason = format!("{reason} (attempt {})", entry.attempts + 1);
                tracing::warn!(provider = name, coupon_id = %entry.coupon.coupon_id, %reason, "push refused; to the dead letters");
                self.store.outbox_finish(&entry, PushFinal::Failed { reason }, now).await
            }
            PushOutcome::Retry { reason, retry_after } => {
                entry.attempts += 1;
                if entry.attempts >= self.config.max_attempts {
                    record_outcome(name, "failed");
                    let reason = format!("gave up after {} attempts: {reason}", entry.attempts);
                    tracing::warn!(provider = name, coupon_id = %entry.coupon.coupon_id, %reason, "push to the dead letters");
                    return self.store.outbox_finish(&entry, PushFinal::Failed { reason }, now).await;
                }
                record_outcome(name, "retry");
                let delay = self.config.backoff.delay(entry.attempts, retry_after, &mut rand::thread_rng());
                let attempts = entry.attempts;
                self.store.outbox_retry(&entry, attempts, now.saturating_add(delay.as_millis() as i64)).await
            }
        }
    }
}

/// `kabao_pushes_total{provider, outcome}`: one count per attempt's outcome (`delivered`,
/// `dead_token`, `failed`, `retry`, `dropped`), by the provider of the device's platform
/// (`fcm`, `apns`, `log`).
fn record_outcome(provider: &'static str, outcome: &'static str) {
    metrics::counter!("kabao_pushes_total", "provider" => provider, "outcome" => outcome).increment(1);
}

/// Sets `kabao_outbox_pending` to the outbox's depth now and every `interval` until `shutdown`.
/// In Redis mode every node reports the same shared depth.
async fn sample_outbox_depth(store: Arc<dyn Store>, interval: Duration, shutdown: CancellationToken) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticks.tick() => {}
        }
        match store.outbox_len().await {
            Ok(depth) => metrics::gauge!("kabao_outbox_pending").set(depth as f64),
            Err(e) => tracing::debug!(error = %e, "cannot read the outbox depth"),
        }
    }
}
