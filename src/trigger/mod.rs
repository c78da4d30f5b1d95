//! The trigger rules of API.md (rules 0, 2, 3 and 5 and their "Edges, precisely"): per-user,
//! per-(campaign, fence) stay state, turning the fences a ping falls in into candidates.
//!
//! Pure: no I/O, no clock. Every rule runs in event time (`ts_ms`); the only server-clock input is
//! the `now_ms` handed to [`TriggerEngine::evict_idle`]. What rule 4 decides (schedule, status,
//! caps, audience) is not looked at here: the caller filters candidates with
//! [`Campaign::is_issuing_at`] and the store.
//!
//! A user's state is a plain value, [`UserState`], moved by [`UserState::apply`] and encoded for
//! the store; [`TriggerEngine`] is a node's cache of those values, in [`SHARDS`] independently
//! locked hash maps keyed by user so that pings of different users rarely contend, each entry
//! tagged with the store version it was read or written at. Callers apply each user's pings in
//! `ts_ms` order; a ping older than the user's newest applied one is [`IgnoreReason::Stale`]
//! whatever order it arrives in.

mod state;

#[cfg(test)]
mod model_tests;
#[cfg(test)]
mod testkit;
#[cfg(test)]
mod tests;

use std::sync::Arc;

use parking_lot::Mutex;
use rustc_hash::FxHashMap;

use crate::ceiling::{shrink_if_mostly_empty, user_shard, IdleCut};
use crate::domain::{Campaign, Fence, FenceId, Ping, UserId};

pub use state::{DecodeError, UserState};

/// How many independently locked maps user state is spread over (a power of two).
pub const SHARDS: usize = 64;

/// The settings of API.md's configuration table that the trigger rules read.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TriggerConfig {
    /// A gap of more than this many seconds between two applied pings of a user forgets every
    /// stay of the user and skips the speed check (exactly this many does not).
    pub state_ttl_s: u64,
    /// Pings whose `accuracy_m` is over this are ignored as [`IgnoreReason::Inaccurate`].
    pub max_accuracy_m: f64,
    /// Rule 0's bound in metres per second; `0` (or less) turns the check off.
    pub max_speed_mps: f64,
}

impl TriggerConfig {
    /// API.md's defaults (`state_ttl_s`, `max_accuracy_m`, `max_speed_mps`).
    pub const DEFAULTS: TriggerConfig =
        TriggerConfig { state_ttl_s: 3_600, max_accuracy_m: 100.0, max_speed_mps: 100.0 };
}

/// Why a valid ping was not applied. When several hold, the first in declaration order is given.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum IgnoreReason {
    /// Strictly older than the user's newest applied ping.
    Stale,
    /// The phone reported a mock location provider.
    Mocked,
    /// `accuracy_m` over the global `max_accuracy_m`.
    Inaccurate,
    /// Faster than `max_speed_mps` from the user's previous applied ping.
    ImplausibleSpeed,
}

impl IgnoreReason {
    /// The wire spelling (the reply's `ignored[].reason`, the metrics label).
    pub fn as_str(&self) -> &'static str {
        match self {
            IgnoreReason::Stale => "stale",
            IgnoreReason::Mocked => "mocked",
            IgnoreReason::Inaccurate => "inaccurate",
            IgnoreReason::ImplausibleSpeed => "implausible_speed",
        }
    }
}

/// One fence containing the ping, resolved to its campaign (what the spatial index found).
#[derive(Debug, Clone, Copy)]
pub struct FenceHit<'a> {
    /// The campaign the fence belongs to, as of the index snapshot that matched the ping.
    pub campaign: &'a Arc<Campaign>,
    /// The fence, one of `campaign.fences`.
    pub fence: &'a Fence,
}

/// A campaign that may issue a coupon at this ping (rule 3), before rule 4 is checked.
#[derive(Debug, Clone)]
pub struct Candidate {
    /// The campaign, as matched.
    pub campaign: Arc<Campaign>,
    /// The nearest of the campaign's fences that gave a candidate at this ping (rule 5).
    pub fence_id: FenceId,
    /// Haversine distance from the ping to that fence's anchor, metres.
    pub distance_m: f64,
}

/// What [`TriggerEngine::apply`] did with a ping.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// Not applied; no state changed.
    Ignored(IgnoreReason),
    /// Applied. At most one candidate per campaign, in ascending campaign id order.
    Applied {
        /// Campaigns due a coupon at this ping, each already used up for its stay.
        candidates: Vec<Candidate>,
    },
}

/// A node's cache of user trigger states, sharded by user id, with the rules' settings.
pub struct TriggerEngine {
    config: TriggerConfig,
    /// `SHARDS` maps; a user always lives in the same one.
    shards: Box<[Mutex<FxHashMap<UserId, Cached>>]>,
}

/// One cached state and the store version it belongs to.
#[derive(Debug)]
struct Cached {
    /// The store's version of `state` (0 for a state never stored, as in the rules' own tests).
    version: u64,
    state: UserState,
}

impl std::fmt::Debug for TriggerEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TriggerEngine").field("config", &self.config).finish_non_exhaustive()
    }
}

impl TriggerEngine {
    /// An engine that knows no user yet.
    pub fn new(config: TriggerConfig) -> Self {
        let shards = (0..SHARDS).map(|_| Mutex::new(FxHashMap::default())).collect();
        Self { config, shards }
    }

    /// The settings the engine runs with.
    pub fn config(&self) -> &TriggerConfig {
        &self.config
    }

    fn shard(&self, user: &UserId) -> &Mutex<FxHashMap<UserId, Cached>> {
        &self.shards[user_shard(user, SHARDS)]
    }

    /// Applies one ping of one user given every fence containing it (`hits`; duplicates are
    /// harmless). Callers apply each user's pings in `ts_ms` order.
    ///
    /// Marks each returned candidate used up for its stay, whether or not the store later issues
    /// it (API.md: a refused candidate is not retried until the next stay).
    pub fn apply(&self, ping: &Ping, hits: &[FenceHit<'_>]) -> Outcome {
        let mut users = self.shard(&ping.user_id).lock();
        match users.get_mut(&ping.user_id) {
            Some(user) => user.state.apply(&self.config, ping, hits),
            None => {
                let mut user = UserState::default();
                let outcome = user.apply(&self.config, ping, hits);
                // An ignored first ping leaves no trace (ignored pings change no state).
                if matches!(outcome, Outcome::Applied { .. }) {
                    users.insert(ping.user_id.clone(), Cached { version: 0, state: user });
                }
                outcome
            }
        }
    }

    /// Takes the cached state of `user` and its store version out of the cache, if cached.
    ///
    /// Taken, not copied: a request moves the state through the rules and puts the new one back
    /// with [`TriggerEngine::remember`] once the store committed it. Copying and dropping the
    /// maps of every user of every request was a tenth of the ingest path's time. A concurrent
    /// request of the same user meanwhile reads the store's copy instead, which the store's
    /// version check keeps exact; a request that fails leaves the user uncached, which is what
    /// a failure with an unknown outcome needs anyway.
    pub fn take(&self, user: &UserId) -> Option<(u64, UserState)> {
        self.shard(user).lock().remove(user).map(|c| (c.version, c.state))
    }

    /// Caches `state` as the store's version `version` of `user` (an empty state is forgotten).
    pub fn remember(&self, user: &UserId, version: u64, state: UserState) {
        let mut users = self.shard(user).lock();
        if state.is_empty() {
            users.remove(user);
        } else {
            users.insert(user.clone(), Cached { version, state });
        }
    }

    /// Frees users whose newest applied ping is more than `idle_ms` older than the server clock
    /// `now_ms`; returns how many. With `idle_ms` ≥ `max_ping_age_s + state_ttl_s` (plus the
    /// 60 s of allowed clock skew) this forgets nothing that could still matter: any ping the
    /// user can still send is more than `state_ttl_s` after the forgotten one, which forgets the
    /// stays and skips the speed check anyway, and cannot be stale against it.
    pub fn evict_idle(&self, now_ms: i64, idle_ms: i64) -> usize {
        let mut freed = 0;
        for shard in self.shards.iter() {
            let mut users = shard.lock();
            let before = users.len();
            users.retain(|_, user| now_ms.saturating_sub(user.state.newest_ts_ms()) <= idle_ms);
            freed += before - users.len();
            shrink_if_mostly_empty(&mut users);
        }
        freed
    }

    /// Once more than `max` users are cached (0: no ceiling), drops the longest idle — the
    /// oldest newest-applied ping — down to 90 % of `max` (see [`crate::ceiling`]); returns how
    /// many went. A dropped user's next request reads the store's copy, so this costs exactness
    /// only where the store holds no copy of its own.
    pub fn drop_longest_idle(&self, max: usize) -> usize {
        if max == 0 || self.user_count() <= max {
            return 0;
        }
        let mut times = Vec::new();
        for shard in self.shards.iter() {
            times.extend(shard.lock().values().map(|user| user.state.newest_ts_ms()));
        }
        let Some(mut cut) = IdleCut::plan(times.into_iter(), max) else { return 0 };
        for shard in self.shards.iter() {
            let mut users = shard.lock();
            users.retain(|_, user| !cut.drops(user.state.newest_ts_ms()));
            shrink_if_mostly_empty(&mut users);
        }
        cut.dropped()
    }

    /// Forgets the cached state of one user (erasure; a store failure whose outcome is unknown);
    /// `true` when the user was cached.
    pub fn forget(&self, user: &UserId) -> bool {
        self.shard(user).lock().remove(user).is_some()
    }

    /// How many users have state.
    pub fn user_count(&self) -> usize {
        self.shards.iter().map(|shard| shard.lock().len()).sum()
    }

    /// Open stays over every cached user. A user's memory grows with its stays (one per fence it
    /// is inside, for each campaign with that fence), so where fences overlap densely this, not
    /// the user count, is what resident memory follows.
    pub fn stay_count(&self) -> usize {
        self.shards.iter().map(|shard| shard.lock().values().map(|user| user.state.stay_count()).sum::<usize>()).sum()
    }
}
