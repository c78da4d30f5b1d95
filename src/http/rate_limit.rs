//! Per-caller rate limits (API.md "Operations"): token buckets per user with a client token,
//! per source address, and for redemption attempts per user.
//!
//! [`RateLimiter`] is the seam: [`MemoryRateLimiter`] serves one node; a shared implementation
//! (Redis, for many nodes) takes the same [`RateKey`]s, which are plain strings for that reason.
//! A bucket holds up to `burst` tokens, refills at `rate_per_s`, and each request takes one; an
//! empty bucket answers how long until a token is back, which becomes `Retry-After`.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::Mutex;
use tokio::time::Instant;

use crate::domain::UserId;

/// Names one bucket: what is limited and for whom. String-able so a shared store can use it as
/// its key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RateKey(String);

impl RateKey {
    /// Requests made with `user`'s client token.
    pub fn user(user: &UserId) -> Self {
        Self(format!("rl:user:{user}"))
    }

    /// Requests from source address `ip`.
    pub fn ip(ip: IpAddr) -> Self {
        Self(format!("rl:ip:{ip}"))
    }

    /// Redemption attempts by `user`.
    pub fn redeem(user: &UserId) -> Self {
        Self(format!("rl:redeem:{user}"))
    }

    /// The key as a string (e.g. a Redis key).
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Token buckets, keyed by [`RateKey`].
#[async_trait]
pub trait RateLimiter: Send + Sync {
    /// Takes one token from `key`'s bucket (`burst` tokens at most, refilled at `rate_per_s`),
    /// or says how long until one is available. `now` is the caller's clock; an implementation
    /// shared by several nodes may use its own.
    async fn take(&self, key: &RateKey, rate_per_s: f64, burst: f64, now: Instant) -> Result<(), Duration>;
}

/// One bucket: its tokens as of `updated`, and the rate that refills it (kept so that eviction
/// can tell a full bucket without knowing which limit it belongs to).
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    updated: Instant,
    rate_per_s: f64,
    burst: f64,
}

impl Bucket {
    fn tokens_at(&self, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        (self.tokens + elapsed * self.rate_per_s).min(self.burst)
    }
}

/// Buckets in this process's memory, at most `capacity` of them.
///
/// A full bucket is the same as no bucket, so when the map is at capacity the full ones are
/// dropped first; only if none is full (an attack from more keys than the capacity) is the
/// least recently used one dropped, which forgives that key its debt.
pub struct MemoryRateLimiter {
    buckets: Mutex<HashMap<RateKey, Bucket>>,
    capacity: usize,
}

/// Default number of buckets a [`MemoryRateLimiter`] keeps (≈ 100 bytes each).
pub const DEFAULT_BUCKETS: usize = 200_000;

impl MemoryRateLimiter {
    /// An empty limiter keeping at most `capacity` buckets.
    pub fn new(capacity: usize) -> Self {
        Self { buckets: Mutex::new(HashMap::new()), capacity: capacity.max(1) }
    }

    /// Buckets held now.
    pub fn len(&self) -> usize {
        self.buckets.lock().len()
    }

    /// True when no bucket is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn make_room(buckets: &mut HashMap<RateKey, Bucket>, capacity: usize, now: Instant) {
        if buckets.len() < capacity {
            return;
        }
        buckets.retain(|_, b| b.tokens_at(now) < b.burst);
        if buckets.len() >= capacity {
            // No bucket is full: more keys than the capacity are in debt (a flood of keys). Drop
            // the least recently used sixteenth at once, not one, so the O(n) passes here are
            // paid once per capacity/16 new keys instead of once per key.
            let mut updated: Vec<Instant> = buckets.values().map(|b| b.updated).collect();
            let drop = (capacity / 16).max(1).min(updated.len());
            let (_, &mut cutoff, _) = updated.select_nth_unstable(drop - 1);
            let mut dropped = 0;
            buckets.retain(|_, b| {
                let keep = b.updated > cutoff || dropped >= drop;
                if !keep {
                    dropped += 1;
                }
                keep
            });
        }
    }
}

impl Default for MemoryRateLimiter {
    fn default() -> Self {
        Self::new(DEFAULT_BUCKETS)
    }
}

#[async_trait]
impl RateLimiter for MemoryRateLimiter {
    async fn take(&self, key: &RateKey, rate_per_s: f64, burst: f64, now: Instant) -> Result<(), Duration> {
        let mut buckets = self.buckets.lock();
        if !buckets.contains_key(key) {
            Self::make_room(&mut buckets, self.capacity, now);
        }
        let bucket = buckets.entry(key.clone()).or_insert(Bucket { tokens: burst, updated: now, rate_per_s, burst });
        let mut tokens = bucket.tokens_at(now);
        // A limit changed since the bucket was made: the new one applies from now on.
        bucket.rate_per_s = rate_per_s;
        bucket.burst = burst;
        tokens = tokens.min(burst);
        bucket.updated = now;
        if tokens >= 1.0 {
            bucket.tokens = tokens - 1.0;
            Ok(())
        } else {
            bucket.tokens = tokens;
            Err(Duration::from_secs_f64((1.0 - tokens) / rate_per_s))
        }
    }
}

/// `Retry-After` for a wait: whole seconds, rounded up, at least 1.
pub fn retry_after_s(wait: Duration) -> u64 {
    (wait.as_secs_f64().ceil() as u64).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(s: &str) -> RateKey {
        RateKey(s.into())
    }

    #[tokio::test]
    async fn a_burst_then_refill_at_the_rate() {
        let limiter = MemoryRateLimiter::default();
        let t = Instant::now();
        let k = key("u");
        for _ in 0..50 {
            assert!(limiter.take(&k, 5.0, 50.0, t).await.is_ok());
        }
        let wait = limiter.take(&k, 5.0, 50.0, t).await.unwrap_err();
        assert_eq!(wait, Duration::from_millis(200));
        assert_eq!(retry_after_s(wait), 1);
        // 200 ms later one token is back, and only one.
        let later = t + Duration::from_millis(200);
        assert!(limiter.take(&k, 5.0, 50.0, later).await.is_ok());
        assert!(limiter.take(&k, 5.0, 50.0, later).await.is_err());
        // Other keys have their own buckets.
        assert!(limiter.take(&key("v"), 5.0, 50.0, t).await.is_ok());
    }

    #[tokio::test]
    async fn retry_after_is_the_buckets_wait_in_whole_seconds() {
        let limiter = MemoryRateLimiter::default();
        let t = Instant::now();
        let k = key("redeem");
        // 10 a minute: one token every 6 s.
        for _ in 0..10 {
            limiter.take(&k, 10.0 / 60.0, 10.0, t).await.unwrap();
        }
        let wait = limiter.take(&k, 10.0 / 60.0, 10.0, t).await.unwrap_err();
        assert_eq!(retry_after_s(wait), 6);
        let wait = limiter.take(&k, 10.0 / 60.0, 10.0, t + Duration::from_millis(5_500)).await.unwrap_err();
        assert_eq!(retry_after_s(wait), 1);
        assert_eq!(retry_after_s(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_s(Duration::from_millis(2_001)), 3);
    }

    #[tokio::test]
    async fn memory_is_bounded_and_full_buckets_go_first() {
        let limiter = MemoryRateLimiter::new(100);
        let t = Instant::now();
        let busy = key("busy");
        for _ in 0..10 {
            limiter.take(&busy, 1.0, 10.0, t).await.unwrap();
        }
        for i in 0..1_000 {
            // Each of these buckets is full again a second later.
            limiter.take(&key(&format!("k{i}")), 1.0, 1.0, t + Duration::from_secs(i)).await.unwrap();
            assert!(limiter.len() <= 100);
        }
        // The busy bucket was refilled by then too (1 000 s at 1/s), so dropping it lost nothing:
        // a fresh bucket is a full one.
        for _ in 0..10 {
            assert!(limiter.take(&busy, 1.0, 10.0, t + Duration::from_secs(1_000)).await.is_ok());
        }
    }

    #[tokio::test]
    async fn a_flood_of_keys_in_debt_drops_the_least_recently_used_and_keeps_the_rest() {
        let limiter = MemoryRateLimiter::new(160);
        let t = Instant::now();
        // 1 000 keys, each emptied (burst 1, refilling over 1 000 s): none is ever full again.
        for i in 0..1_000u64 {
            let at = t + Duration::from_millis(i);
            limiter.take(&key(&format!("k{i}")), 0.001, 1.0, at).await.unwrap();
            assert!(limiter.len() <= 160);
        }
        // The newest keys are still held, in debt: a second take is refused.
        let newest = t + Duration::from_millis(999);
        assert!(limiter.take(&key("k999"), 0.001, 1.0, newest).await.is_err());
        // The oldest were forgiven (dropped): a take succeeds again.
        assert!(limiter.take(&key("k0"), 0.001, 1.0, newest).await.is_ok());
    }
}
