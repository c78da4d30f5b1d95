//! The Redis store (`--redis-url`): many kabao nodes share one Redis and answer as one (API.md
//! rule 7, DESIGN.md "Many machines").
//!
//! Every atomic step of the [`Store`] contract is one Lua script (`src/store/redis/*.lua`), so it
//! is all or nothing in Redis itself: a request's [`IssueStore::commit`] is **one script call, one
//! round trip** for all its users — each user's version check, rule 4's store half for every
//! candidate in `(ts_ms, seq)` order across users (the same decisions as [`super::rules`]; the
//! contract suite runs against both), the coupon records, wallets, counters, one outbox entry per
//! device and the new trigger states. Reading a request's trigger states is one pipelined round
//! trip too.
//!
//! **Keys** are hash-tagged by user (`kabao:{u:<id>}:…`), campaign (`kabao:{c:<id>}:…`) and
//! outbox (`kabao:{outbox}:…`); the layout is in the README ("Redis key layout"). The outbox's
//! steps each stay in the `{outbox}` slot. The commit, redeem and erase scripts still touch several
//! slots (user, campaign counters, the global coupon-owner index, the outbox stream): that works on
//! one Redis (or a primary with replicas), where it makes a request's commit one round trip and
//! `total_max` exact without a reservation protocol. What Redis Cluster still needs — a `total_max`
//! reservation per campaign before the per-user steps, released when a step refuses, and a relay
//! for the outbox write — is written out in the README, step by step.
//!
//! **Identity.** The key `kabao:identity` holds a random id written on first use. A node remembers
//! it at connect; every commit and redemption script checks it, and the campaign-change poll (every
//! 200 ms) and `/readyz` read it. When it is missing or different (a Redis restarted empty), the
//! store answers [`StoreError::Lost`] to every call, logged loudly, and no coupon is issued against
//! the empty counters — until the Redis comes back with its data (the identity matches again) or an
//! operator runs `kabao store adopt --redis-url …`, which writes a new identity marked adopted that
//! every running node then accepts.
//!
//! **Failures.** Every call has a deadline ([`CALL_TIMEOUT`]); a Redis that is down or does not
//! answer gives [`StoreError::Unavailable`] promptly, and the connection is re-established by
//! itself. A script either ran whole or not at all; a call that timed out may have run (then an
//! identical retry changes nothing more: coupon ids are derived and the trigger state is versioned).
//!
//! **The outbox** is a Redis Stream (`kabao:{outbox}:stream`), one entry per push (one coupon to
//! one device: the unit a provider answers for, retried and acknowledged alone), XADDed by the
//! commit script in the same atomic step as the coupon. Every node's dispatcher reads it in one
//! consumer group (`dispatch`) under its own consumer name: `XREADGROUP` hands an entry to one
//! consumer; `XACK` (with `XDEL`) comes only with a final outcome; entries a consumer held longer
//! than the lease (it died, or hangs) are taken over with `XAUTOCLAIM`. A retry leaves the stream
//! for a sorted set of due times and is moved back as a new entry, by the take script, once due.
//! A consumer's first take in a process also re-reads its own pending entries (`XREADGROUP … 0`):
//! a node restarted on its address has its predecessor's name (`app::consumer_name`), so it
//! delivers what that process left unfinished at once, not after the lease.
//! Every outbox key carries the one global tag `{outbox}`, so each outbox step is one script in
//! one slot (`outbox.lua`); push counters live there too, per campaign incarnation.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::Mutex;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Script, Value};
use serde::Serialize;

use super::{
    CampaignChange, CampaignChanges, CampaignStats, CampaignStore, CouponRecord, DeadLetter, Device, DeviceStore,
    IssueOutcome, IssueStore, IssuedCoupon, OutboxEntry, OutboxStore, PushFinal, RedeemError, Store, StoreError,
    UserCommit, UserCommitResult, UserStateRecord,
};
use crate::domain::{Campaign, CampaignDoc, CampaignId, CouponId, DeviceId, UserId};
use crate::http::rate_limit::{RateKey, RateLimiter};

/// The longest any one store call may take before it answers [`StoreError::Unavailable`].
pub const CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// Campaign changes kept in the change log (a follower further behind reloads everything).
const CHANGES_KEPT: usize = 4096;
/// A campaign document larger than this is not copied into the change log: followers reload.
const LOGGED_DOC_MAX_BYTES: usize = 1 << 20;
/// Dead letters kept (the oldest are dropped first).
const DEAD_LETTERS_KEPT: usize = 10_000;
/// The prefix of the coupons-hash fields that hold a user's issue times per campaign (`commit.lua`):
/// a control character, which no id holds.
const ISSUE_TIMES_FIELD: &[u8] = b"\x01";
/// The identity key.
const IDENTITY_KEY: &str = "kabao:identity";
/// The outbox stream: one entry per push waiting (see `outbox.lua`).
const OUTBOX_STREAM: &str = "kabao:{outbox}:stream";
/// The one consumer group every node's dispatcher reads the outbox stream in.
const OUTBOX_GROUP: &str = "dispatch";
/// Pushes waiting for a retry: handle by due time.
const OUTBOX_DUE: &str = "kabao:{outbox}:due";
/// Pushes waiting for a retry: handle → their stream fields.
const OUTBOX_DELAYED: &str = "kabao:{outbox}:delayed";
/// Given-up pushes, newest first.
const DEAD_LETTERS: &str = "kabao:{outbox}:dead_letters";

/// The Redis [`Store`]. Cheap to clone; clones share the connection and the identity.
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

struct Inner {
    conn: ConnectionManager,
    scripts: Scripts,
    /// The store identity this node works with.
    identity: Mutex<String>,
    /// Why the store is considered lost, while it is.
    lost: Mutex<Option<String>>,
    /// Round trips made (also the `kabao_store_round_trips_total` counter).
    round_trips: AtomicU64,
    /// The highest campaign revision this node has seen: after the store's data was replaced,
    /// revisions continue above it, so the node's index (which ignores revisions it has already
    /// passed) takes every campaign of the new data.
    max_revision: AtomicU64,
    /// Set when the store's data may have been replaced under this node (it was lost and came
    /// back, or was adopted): the next change poll answers "reload everything".
    reload: AtomicBool,
    /// The outbox consumer names that have taken through this process (see `outbox_take`).
    outbox_consumers: Mutex<std::collections::HashSet<String>>,
    /// The change poll answered "reload everything" after a loss: the next `all_campaigns` is
    /// let through and, once it answered, the store serves again.
    recovering: AtomicBool,
}

struct Scripts {
    commit: Script,
    campaign_write: Script,
    campaigns_read: Script,
    redeem: Script,
    outbox: Script,
    erase_user: Script,
    remove_dead_device: Script,
    identity: Script,
    revision_floor: Script,
    rate_limit: Script,
}

impl Scripts {
    fn new() -> Self {
        Self {
            commit: Script::new(include_str!("redis/commit.lua")),
            campaign_write: Script::new(include_str!("redis/campaign_write.lua")),
            campaigns_read: Script::new(include_str!("redis/campaigns_read.lua")),
            redeem: Script::new(include_str!("redis/redeem.lua")),
            outbox: Script::new(include_str!("redis/outbox.lua")),
            erase_user: Script::new(include_str!("redis/erase_user.lua")),
            remove_dead_device: Script::new(REMOVE_DEAD_DEVICE_SCRIPT),
            identity: Script::new(IDENTITY_SCRIPT),
            revision_floor: Script::new(REVISION_FLOOR_SCRIPT),
            rate_limit: Script::new(include_str!("redis/rate_limit.lua")),
        }
    }
}

/// The key layout this kabao reads and writes (README "Redis key layout"), kept in the identity:
/// a Redis holding another layout is refused at connect, never read as if it were this one.
/// Layout 1 (no `layout` field) kept issue times in a key of their own and the trigger state as a
/// hash.
const KEY_LAYOUT: &str = "2";

/// Writes the identity on first use (or, with ARGV[1] = 'adopt', replaces it with a new one
/// marked adopted), refusing data of another key layout (ARGV[4]); answers {id, adopted}.
const IDENTITY_SCRIPT: &str = r#"
local key = KEYS[1]
if redis.call('EXISTS', key) == 1 then
  local layout = redis.call('HGET', key, 'layout') or '1'
  if layout ~= ARGV[4] then
    return redis.error_reply('KABAO_LAYOUT this Redis holds kabao data in key layout ' .. layout ..
      '; this kabao reads layout ' .. ARGV[4] .. ' (README "Redis key layout")')
  end
end
if ARGV[1] == 'adopt' or redis.call('EXISTS', key) == 0 then
  redis.call('DEL', key)
  redis.call('HSET', key, 'id', ARGV[2], 'created_at_ms', ARGV[3], 'layout', ARGV[4])
  if ARGV[1] == 'adopt' then redis.call('HSET', key, 'adopted', '1') end
end
return redis.call('HMGET', key, 'id', 'adopted')
"#;

/// Removes device ARGV[1] from the devices hash KEYS[1] if it still has token ARGV[2] (a device
/// registered again with a new token stays).
const REMOVE_DEAD_DEVICE_SCRIPT: &str = r#"
local current = redis.call('HGET', KEYS[1], ARGV[1])
if current and cjson.decode(current).token == ARGV[2] then return redis.call('HDEL', KEYS[1], ARGV[1]) end
return 0
"#;

/// Raises the campaign revision to at least ARGV[1]; answers the revision.
const REVISION_FLOOR_SCRIPT: &str = r#"
local current = tonumber(redis.call('GET', 'kabao:campaign_rev') or '0')
local floor = tonumber(ARGV[1])
if current < floor then
  redis.call('SET', 'kabao:campaign_rev', ARGV[1])
  current = floor
end
return current
"#;

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore").field("identity", &*self.inner.identity.lock()).finish_non_exhaustive()
    }
}

fn unavailable(e: redis::RedisError) -> StoreError {
    if e.to_string().contains("KABAO_LOST") {
        return StoreError::Lost(format!("{e}"));
    }
    StoreError::Unavailable(format!("redis: {e}"))
}

fn corrupt(what: &str) -> StoreError {
    StoreError::Unavailable(format!("redis: unexpected reply ({what})"))
}

fn wall_clock_ms() -> i64 {
    crate::engine::now_ms()
}

/// Opens a connection manager (reconnects by itself) with deadlines on connecting and answering.
async fn open(url: &str) -> Result<ConnectionManager, StoreError> {
    let client = redis::Client::open(url).map_err(|e| StoreError::Unavailable(format!("redis url: {e}")))?;
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Duration::from_millis(1000))
        .set_response_timeout(CALL_TIMEOUT)
        .set_number_of_retries(1)
        .set_max_delay(200);
    match tokio::time::timeout(CALL_TIMEOUT * 2, ConnectionManager::new_with_config(client, config)).await {
        Ok(result) => result.map_err(unavailable),
        Err(_) => Err(StoreError::Unavailable("redis: connecting timed out".into())),
    }
}

impl RedisStore {
    /// A store over a fresh connection, identity not yet known.
    fn over(conn: ConnectionManager) -> Self {
        Self {
            inner: Arc::new(Inner {
                conn,
                scripts: Scripts::new(),
                identity: Mutex::new(String::new()),
                lost: Mutex::new(None),
                round_trips: AtomicU64::new(0),
                max_revision: AtomicU64::new(0),
                reload: AtomicBool::new(false),
                recovering: AtomicBool::new(false),
                outbox_consumers: Mutex::default(),
            }),
        }
    }

    /// Connects to `url` (`redis://` or `rediss://`), writing the store identity if this Redis has
    /// none (first use) and remembering it.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let store = Self::over(open(url).await?);
        let (id, _) = store.identity_call("first-use").await?;
        *store.inner.identity.lock() = id;
        Ok(store)
    }

    /// Replaces the store identity of the Redis at `url` with a new one marked adopted (the
    /// operator's `kabao store adopt`): every running node accepts the data as it now is.
    /// Returns the new identity.
    pub async fn adopt(url: &str) -> Result<String, StoreError> {
        let store = Self::over(open(url).await?);
        Ok(store.identity_call("adopt").await?.0)
    }

    /// Round trips to Redis made so far by this store (all clones).
    pub fn round_trips(&self) -> u64 {
        self.inner.round_trips.load(Ordering::Relaxed)
    }

    /// The store identity this node works with.
    pub fn identity(&self) -> String {
        self.inner.identity.lock().clone()
    }

    async fn identity_call(&self, mode: &str) -> Result<(String, bool), StoreError> {
        let new_id = format!("{:016x}{:016x}", rand::random::<u64>(), rand::random::<u64>());
        let mut invocation = self.inner.scripts.identity.key(IDENTITY_KEY);
        invocation.arg(mode).arg(new_id).arg(wall_clock_ms()).arg(KEY_LAYOUT);
        let reply: Vec<Option<String>> = self.run(invocation.invoke_async(&mut self.conn())).await?;
        let id = reply.first().cloned().flatten().ok_or_else(|| corrupt("identity"))?;
        Ok((id, reply.get(1).cloned().flatten().is_some()))
    }

    fn conn(&self) -> ConnectionManager {
        self.inner.conn.clone()
    }

    /// One round trip, with the deadline.
    async fn run<T>(&self, call: impl std::future::Future<Output = redis::RedisResult<T>>) -> Result<T, StoreError> {
        self.inner.round_trips.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("kabao_store_round_trips_total").increment(1);
        match tokio::time::timeout(CALL_TIMEOUT, call).await {
            Ok(result) => result.map_err(|e| {
                let e = unavailable(e);
                if let StoreError::Lost(why) = &e {
                    self.mark_lost(why.clone());
                }
                e
            }),
            Err(_) => Err(StoreError::Unavailable("redis did not answer in time".into())),
        }
    }

    /// Refuses every call while the store is lost.
    fn guard(&self) -> Result<(), StoreError> {
        match &*self.inner.lost.lock() {
            Some(why) => Err(StoreError::Lost(why.clone())),
            None => Ok(()),
        }
    }

    fn mark_lost(&self, why: String) {
        let mut lost = self.inner.lost.lock();
        if lost.is_none() {
            tracing::error!(
                cause = %why,
                "STORE LOST: the Redis answers without kabao's identity (restarted empty?); refusing every store-backed \
                 request. Restore its data, or accept it as it is with `kabao store adopt --redis-url …`"
            );
        }
        *lost = Some(why);
    }

    /// Compares the identity Redis holds now with the one this node works with. A store that was
    /// lost stays refused until the change poll has rebuilt the fence index from its data (see
    /// [`CampaignStore::campaign_changes`]), so no request is served against the old index.
    fn observe_identity(&self, current: Option<String>, adopted: bool) -> Result<(), StoreError> {
        let known = self.inner.identity.lock().clone();
        match current {
            Some(id) if id == known => {
                if self.inner.lost.lock().is_some() && !self.inner.reload.swap(true, Ordering::AcqRel) {
                    tracing::warn!(identity = %id, "store: the Redis has kabao's identity again; rebuilding the index");
                }
            }
            Some(id) if adopted => {
                tracing::warn!(old = %known, new = %id, "store: an operator adopted this Redis's data; rebuilding the index from it");
                *self.inner.identity.lock() = id;
                self.inner.lost.lock().get_or_insert_with(|| "rebuilding the index from adopted data".into());
                self.inner.reload.store(true, Ordering::Release);
            }
            Some(id) => self.mark_lost(format!("the Redis carries identity {id}, this node worked with {known}")),
            None => {
                self.mark_lost(format!("the Redis has no identity (this node worked with {known}): it lost its data"))
            }
        }
        self.guard()
    }

    async fn check_identity(&self) -> Result<(), StoreError> {
        let cmd = redis::cmd("HMGET").arg(IDENTITY_KEY).arg("id").arg("adopted").to_owned();
        let reply: Vec<Option<String>> = self.run(cmd.query_async(&mut self.conn())).await?;
        let id = reply.first().cloned().flatten();
        self.observe_identity(id, reply.get(1).cloned().flatten().is_some())
    }

    async fn write_campaign(&self, op: &str, campaign: Option<&Campaign>, id: &CampaignId) -> Result<i64, StoreError> {
        self.guard()?;
        let doc = match campaign {
            Some(c) => serde_json::to_string(&c.to_doc()).map_err(|e| StoreError::Unavailable(e.to_string()))?,
            None => String::new(),
        };
        let logged = if doc.len() <= LOGGED_DOC_MAX_BYTES { doc.as_str() } else { "" };
        let mut invocation = self.inner.scripts.campaign_write.prepare_invoke();
        invocation.arg(op).arg(id.as_str()).arg(doc.as_str()).arg(logged).arg(CHANGES_KEPT);
        let revision: i64 = self.run(invocation.invoke_async(&mut self.conn())).await?;
        self.saw_revision(revision.max(0) as u64);
        Ok(revision)
    }

    fn saw_revision(&self, revision: u64) {
        self.inner.max_revision.fetch_max(revision, Ordering::AcqRel);
    }

    async fn read_campaigns(&self, args: &[String]) -> Result<Vec<Value>, StoreError> {
        self.guard()?;
        self.read_campaigns_unguarded(args).await
    }

    async fn read_campaigns_unguarded(&self, args: &[String]) -> Result<Vec<Value>, StoreError> {
        let mut invocation = self.inner.scripts.campaigns_read.prepare_invoke();
        for a in args {
            invocation.arg(a.as_str());
        }
        self.run(invocation.invoke_async(&mut self.conn())).await
    }

    /// One step of `outbox.lua` over the outbox's keys (all in the `{outbox}` slot).
    fn outbox_step(&self, args: &[&str]) -> redis::ScriptInvocation<'_> {
        let mut invocation = self.inner.scripts.outbox.prepare_invoke();
        invocation.key(OUTBOX_STREAM).key(OUTBOX_DUE).key(OUTBOX_DELAYED).key(DEAD_LETTERS);
        invocation.arg(args[0]).arg(OUTBOX_GROUP);
        for a in &args[1..] {
            invocation.arg(*a);
        }
        invocation
    }
}

/// The push that an outbox stream entry (`handle`, its flat field list) carries.
fn decode_push(handle: String, fields: &Value) -> Result<OutboxEntry, StoreError> {
    let flat = match fields {
        Value::Array(flat) => flat,
        _ => return Err(corrupt("outbox fields")),
    };
    let (mut push, mut attempts) = (None, 0);
    for pair in flat.chunks(2) {
        match (pair.first().and_then(bytes_of), pair.get(1)) {
            (Some(b"e"), Some(value)) => push = bytes_of(value),
            (Some(b"a"), Some(value)) => attempts = int_of(value).unwrap_or(0).max(0) as u32,
            _ => {}
        }
    }
    let push: QueuedPush =
        serde_json::from_slice(push.ok_or_else(|| corrupt("outbox push"))?).map_err(|_| corrupt("outbox push JSON"))?;
    Ok(OutboxEntry { id: handle, coupon: push.coupon, device_id: push.device_id, device: push.device, attempts })
}

/// An outbox entry's `e` field (written by `commit.lua`).
#[derive(serde::Deserialize)]
struct QueuedPush {
    coupon: IssuedCoupon,
    device_id: DeviceId,
    device: Device,
}

fn user_key(user: &UserId, what: &str) -> String {
    format!("kabao:{{u:{}}}:{what}", user.as_str())
}

fn campaign_key(campaign: &CampaignId, what: &str) -> String {
    format!("kabao:{{c:{}}}:{what}", campaign.as_str())
}

fn stored_campaign_id(id: &str) -> Result<CampaignId, StoreError> {
    CampaignId::parse("id", id).map_err(|_| corrupt("campaign id"))
}

/// A campaign as stored: its document, validated again on the way out, at its revision.
fn decode_campaign(doc: &[u8], revision: u64) -> Result<Arc<Campaign>, StoreError> {
    let doc: CampaignDoc =
        serde_json::from_slice(doc).map_err(|e| StoreError::Unavailable(format!("stored campaign: {e}")))?;
    let fallback = stored_campaign_id(doc.id.as_deref().unwrap_or_default())?;
    let mut campaign =
        doc.validate(|| fallback).map_err(|e| StoreError::Unavailable(format!("stored campaign is invalid: {e:?}")))?;
    campaign.revision = revision;
    Ok(Arc::new(campaign))
}

fn bytes_of(value: &Value) -> Option<&[u8]> {
    match value {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

fn int_of(value: &Value) -> Option<i64> {
    match value {
        Value::Int(i) => Some(*i),
        other => bytes_of(other).and_then(|b| std::str::from_utf8(b).ok()).and_then(|s| s.parse().ok()),
    }
}

fn string_of(value: &Value) -> Option<String> {
    bytes_of(value).map(|b| String::from_utf8_lossy(b).into_owned())
}

fn array_of(value: Value) -> Result<Vec<Value>, StoreError> {
    match value {
        Value::Array(items) => Ok(items),
        Value::Nil => Ok(Vec::new()),
        _ => Err(corrupt("array expected")),
    }
}

/// Decodes `(doc, rev)` pairs.
fn decode_pairs(items: &[Value]) -> Result<Vec<Arc<Campaign>>, StoreError> {
    items
        .chunks(2)
        .map(|pair| match pair {
            [doc, rev] => decode_campaign(
                bytes_of(doc).ok_or_else(|| corrupt("campaign doc"))?,
                int_of(rev).ok_or_else(|| corrupt("campaign rev"))? as u64,
            ),
            _ => Err(corrupt("campaign pair")),
        })
        .collect()
}

/// A stored coupon record: `<incarnation>|<redeemed_at_ms or empty>|<coupon JSON>`.
fn decode_record(raw: &[u8]) -> Result<CouponRecord, StoreError> {
    let text = std::str::from_utf8(raw).map_err(|_| corrupt("coupon record"))?;
    let mut parts = text.splitn(3, '|');
    let (_inc, redeemed, json) = match (parts.next(), parts.next(), parts.next()) {
        (Some(a), Some(b), Some(c)) => (a, b, c),
        _ => return Err(corrupt("coupon record")),
    };
    let coupon: IssuedCoupon = serde_json::from_str(json).map_err(|_| corrupt("coupon JSON"))?;
    let redeemed_at_ms =
        if redeemed.is_empty() { None } else { Some(redeemed.parse().map_err(|_| corrupt("redeemed"))?) };
    Ok(CouponRecord { coupon, redeemed_at_ms })
}

/// The commit script's arguments (their order: `commit.lua`'s header), positional so the script
/// decodes nothing: each user's version check and new state, then the issue requests in the order
/// they are decided (`rules::decide_in_order`) with their candidates, coupon JSON as given.
fn commit_arguments(
    invocation: &mut redis::ScriptInvocation<'_>,
    identity: &str,
    commits: &[UserCommit],
) -> Result<(), StoreError> {
    invocation.arg(identity).arg(commits.len());
    for commit in commits {
        // Versions are u64: strings, as Lua numbers are doubles.
        invocation.arg(commit.user_id.as_str()).arg(commit.expected_version.to_string());
        invocation.arg(commit.new_version.to_string());
        match &commit.new_state {
            Some(bytes) => invocation.arg(1).arg(bytes.as_slice()),
            None => invocation.arg(0),
        };
        invocation.arg(commit.keep_for_ms);
    }
    let all = vec![true; commits.len()];
    for (i, j) in super::rules::decide_in_order(commits, &all) {
        let request = &commits[i].issues[j];
        invocation.arg(i + 1).arg(j + 1).arg(request.ts_ms).arg(request.daily_cap).arg(request.candidates.len());
        for candidate in &request.candidates {
            let coupon = &candidate.coupon;
            invocation.arg(coupon.coupon_id.as_str()).arg(coupon.campaign_id.as_str()).arg(json(coupon)?);
            let caps = candidate.caps;
            invocation.arg(caps.per_user_cooldown_s).arg(caps.per_user_max).arg(caps.total_max);
            invocation.arg(candidate.audience_tags.len());
            for tag in candidate.audience_tags.iter() {
                invocation.arg(tag.as_str());
            }
        }
    }
    Ok(())
}

/// A trigger state as the Redis store keeps it: one string, `<version>|<bytes>`.
fn decode_state(raw: &[u8]) -> Result<UserStateRecord, StoreError> {
    let sep = raw.iter().position(|&b| b == b'|').ok_or_else(|| corrupt("state"))?;
    let version = std::str::from_utf8(&raw[..sep]).ok().and_then(|v| v.parse().ok());
    Ok(UserStateRecord { version: version.ok_or_else(|| corrupt("state version"))?, bytes: raw[sep + 1..].to_vec() })
}

fn outcome_of(code: u8) -> Result<IssueOutcome, StoreError> {
    Ok(match code {
        b'I' => IssueOutcome::Issued,
        b'D' => IssueOutcome::Duplicate,
        b'A' => IssueOutcome::Audience,
        b'C' => IssueOutcome::Cooldown,
        b'P' => IssueOutcome::PerUserMax,
        b'T' => IssueOutcome::TotalMax,
        b'Y' => IssueOutcome::DailyCap,
        _ => return Err(corrupt("outcome code")),
    })
}

fn json<T: Serialize>(value: &T) -> Result<String, StoreError> {
    serde_json::to_string(value).map_err(|e| StoreError::Unavailable(format!("encoding: {e}")))
}

#[async_trait]
impl CampaignStore for RedisStore {
    async fn insert_campaign(&self, mut campaign: Campaign) -> Result<Arc<Campaign>, StoreError> {
        let rev = self.write_campaign("insert", Some(&campaign), &campaign.id.clone()).await?;
        if rev < 0 {
            return Err(StoreError::Conflict);
        }
        campaign.revision = rev as u64;
        Ok(Arc::new(campaign))
    }

    async fn replace_campaign(&self, mut campaign: Campaign) -> Result<Arc<Campaign>, StoreError> {
        let rev = self.write_campaign("replace", Some(&campaign), &campaign.id.clone()).await?;
        if rev < 0 {
            return Err(StoreError::NotFound);
        }
        campaign.revision = rev as u64;
        Ok(Arc::new(campaign))
    }

    async fn delete_campaign(&self, id: &CampaignId) -> Result<u64, StoreError> {
        let rev = self.write_campaign("delete", None, id).await?;
        if rev < 0 {
            return Err(StoreError::NotFound);
        }
        Ok(rev as u64)
    }

    async fn campaign(&self, id: &CampaignId) -> Result<Option<Arc<Campaign>>, StoreError> {
        self.guard()?;
        let cmd = redis::cmd("HMGET").arg(campaign_key(id, "def")).arg("doc").arg("rev").to_owned();
        let reply: Vec<Option<Vec<u8>>> = self.run(cmd.query_async(&mut self.conn())).await?;
        match (reply.first().cloned().flatten(), reply.get(1).cloned().flatten()) {
            (Some(doc), Some(rev)) => {
                let rev = std::str::from_utf8(&rev).ok().and_then(|r| r.parse().ok()).ok_or_else(|| corrupt("rev"))?;
                Ok(Some(decode_campaign(&doc, rev)?))
            }
            _ => Ok(None),
        }
    }

    async fn campaigns_page(&self, after: Option<&str>, limit: usize) -> Result<Vec<Arc<Campaign>>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let reply = self.read_campaigns(&["page".into(), after.unwrap_or("").into(), limit.to_string()]).await?;
        decode_pairs(reply.get(1..).unwrap_or_default())
    }

    async fn all_campaigns(&self) -> Result<(u64, Vec<Arc<Campaign>>), StoreError> {
        let recovering = self.inner.recovering.load(Ordering::Acquire);
        if !recovering {
            self.guard()?;
        }
        let reply = self.read_campaigns_unguarded(&["all".into()]).await?;
        let revision = reply.first().and_then(int_of).ok_or_else(|| corrupt("revision"))? as u64;
        self.saw_revision(revision);
        if recovering && self.inner.recovering.swap(false, Ordering::AcqRel) {
            self.inner.lost.lock().take();
            tracing::warn!("store: index rebuilt from the store's data; serving again");
        }
        Ok((revision, decode_pairs(reply.get(1..).unwrap_or_default())?))
    }

    async fn campaign_changes(&self, since: u64) -> Result<CampaignChanges, StoreError> {
        // The engine polls this every 200 ms on every node: the identity is checked with it, so a
        // Redis that came back empty is noticed within that time even without `/readyz` traffic.
        let checked = self.check_identity().await;
        if self.inner.reload.swap(false, Ordering::AcqRel) {
            // The data may have been replaced: revisions continue above every one this node saw,
            // and the node rebuilds its index from what the store holds now.
            let floor = self.inner.max_revision.load(Ordering::Acquire).max(since) + 1;
            let mut invocation = self.inner.scripts.revision_floor.prepare_invoke();
            invocation.arg(floor);
            let revision: u64 = match self.run(invocation.invoke_async(&mut self.conn())).await {
                Ok(revision) => revision,
                Err(e) => {
                    self.inner.reload.store(true, Ordering::Release);
                    return Err(e);
                }
            };
            self.saw_revision(revision);
            // The engine's reload (`all_campaigns`) is let through and ends the loss.
            self.inner.recovering.store(true, Ordering::Release);
            return Ok(CampaignChanges { revision, changes: None });
        }
        checked?;
        let reply = self.read_campaigns(&["changes".into(), since.to_string()]).await?;
        let revision = reply.first().and_then(int_of).ok_or_else(|| corrupt("revision"))? as u64;
        self.saw_revision(revision);
        if since > revision {
            // The store's revisions went back (its data was replaced): reload everything.
            return Ok(CampaignChanges { revision, changes: None });
        }
        let oldest = reply.get(1).and_then(int_of).ok_or_else(|| corrupt("oldest"))?;
        let oldest_kept = if oldest < 0 { revision + 1 } else { oldest as u64 };
        if !(since >= revision || oldest_kept <= since + 1) {
            return Ok(CampaignChanges { revision, changes: None });
        }
        let mut changes = Vec::new();
        for entry in reply.get(2..).unwrap_or_default() {
            let entry: LogEntry = serde_json::from_slice(bytes_of(entry).ok_or_else(|| corrupt("log entry"))?)
                .map_err(|_| corrupt("log entry JSON"))?;
            let id = stored_campaign_id(&entry.id)?;
            match (entry.op.as_str(), entry.doc) {
                ("d", _) => changes.push(CampaignChange::Delete { id, revision: entry.rev }),
                (_, Some(doc)) => {
                    changes.push(CampaignChange::Upsert(decode_campaign(doc.get().as_bytes(), entry.rev)?))
                }
                // Too large to log: the follower reloads everything.
                (_, None) => return Ok(CampaignChanges { revision, changes: None }),
            }
        }
        Ok(CampaignChanges { revision, changes: Some(changes) })
    }

    async fn campaign_stats(&self, id: &CampaignId) -> Result<CampaignStats, StoreError> {
        self.guard()?;
        let cmd = redis::cmd("HGETALL").arg(campaign_key(id, "stats")).to_owned();
        let fields: Vec<(String, String)> = self.run(cmd.query_async(&mut self.conn())).await?;
        let mut stats = CampaignStats::default();
        let mut incarnation = None;
        for (name, value) in fields {
            let count = || value.parse::<i64>().unwrap_or(0).max(0) as u64;
            match name.as_str() {
                "inc" => incarnation = Some(value.clone()),
                "issued" => stats.issued = count(),
                "redeemed" => stats.redeemed = count(),
                _ => {}
            }
        }
        // Push outcomes are counted where the outbox lives (outbox.lua), per incarnation.
        let Some(incarnation) = incarnation else { return Ok(stats) };
        let key = format!("kabao:{{outbox}}:pushes:{}:{incarnation}", id.as_str());
        let cmd = redis::cmd("HGETALL").arg(key).to_owned();
        let fields: Vec<(String, i64)> = self.run(cmd.query_async(&mut self.conn())).await?;
        for (name, value) in fields {
            let value = value.max(0) as u64;
            match name.as_str() {
                "delivered" => stats.pushes.delivered = value,
                "retrying" => stats.pushes.retrying = value,
                "failed" => stats.pushes.failed = value,
                "dead_token" => stats.pushes.dead_token = value,
                _ => {}
            }
        }
        Ok(stats)
    }
}

/// One entry of the campaign change log.
#[derive(serde::Deserialize)]
struct LogEntry {
    rev: u64,
    op: String,
    id: String,
    #[serde(default)]
    doc: Option<Box<serde_json::value::RawValue>>,
}

#[async_trait]
impl DeviceStore for RedisStore {
    async fn put_device(&self, user: &UserId, device: &DeviceId, value: Device) -> Result<(), StoreError> {
        self.guard()?;
        let cmd = redis::cmd("HSET").arg(user_key(user, "devices")).arg(device.as_str()).arg(json(&value)?).to_owned();
        self.run(cmd.query_async::<()>(&mut self.conn())).await
    }

    async fn delete_device(&self, user: &UserId, device: &DeviceId) -> Result<bool, StoreError> {
        self.guard()?;
        let cmd = redis::cmd("HDEL").arg(user_key(user, "devices")).arg(device.as_str()).to_owned();
        let removed: i64 = self.run(cmd.query_async(&mut self.conn())).await?;
        Ok(removed > 0)
    }

    async fn devices(&self, user: &UserId) -> Result<Vec<(DeviceId, Device)>, StoreError> {
        self.guard()?;
        let cmd = redis::cmd("HGETALL").arg(user_key(user, "devices")).to_owned();
        let fields: Vec<(String, String)> = self.run(cmd.query_async(&mut self.conn())).await?;
        let mut devices = fields
            .into_iter()
            .map(|(id, value)| {
                let device: Device = serde_json::from_str(&value).map_err(|_| corrupt("device JSON"))?;
                Ok((DeviceId::parse("device_id", &id).map_err(|_| corrupt("device id"))?, device))
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        devices.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(devices)
    }

    async fn erase_user(&self, user: &UserId) -> Result<(), StoreError> {
        self.guard()?;
        let mut invocation = self.inner.scripts.erase_user.prepare_invoke();
        invocation.arg(user.as_str());
        self.run(invocation.invoke_async::<()>(&mut self.conn())).await?;
        // Then its pending pushes and dead letters, in the outbox's slot. A crash in between
        // leaves pushes whose devices are gone: the dispatcher drops them, and a retried erasure
        // removes them.
        self.run(self.outbox_step(&["erase", user.as_str()]).invoke_async::<()>(&mut self.conn())).await
    }
}

#[async_trait]
impl IssueStore for RedisStore {
    async fn load_user_states(&self, users: &[UserId]) -> Result<Vec<Option<UserStateRecord>>, StoreError> {
        self.guard()?;
        if users.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for user in users {
            pipe.cmd("GET").arg(user_key(user, "state"));
        }
        let replies: Vec<Option<Vec<u8>>> = self.run(pipe.query_async(&mut self.conn())).await?;
        replies.iter().map(|raw| raw.as_deref().map(decode_state).transpose()).collect()
    }

    async fn commit(&self, commits: Vec<UserCommit>) -> Result<Vec<UserCommitResult>, StoreError> {
        self.guard()?;
        if commits.is_empty() {
            return Ok(Vec::new());
        }
        let identity = self.identity();
        let mut invocation = self.inner.scripts.commit.prepare_invoke();
        commit_arguments(&mut invocation, &identity, &commits)?;
        let reply: Value = self.run(invocation.invoke_async(&mut self.conn())).await?;
        let replies = array_of(reply)?;
        if replies.len() != commits.len() {
            return Err(corrupt("one result per commit"));
        }
        replies
            .into_iter()
            .zip(&commits)
            .map(|(reply, commit)| {
                let items = array_of(reply)?;
                match items.first().and_then(int_of) {
                    Some(1) => {
                        let version = items.get(1).and_then(string_of).and_then(|v| v.parse().ok());
                        let codes = items.get(2).and_then(string_of).unwrap_or_default();
                        let outcomes = if commit.issues.is_empty() {
                            Vec::new()
                        } else {
                            codes.split(',').map(|r| r.bytes().map(outcome_of).collect()).collect::<Result<_, _>>()?
                        };
                        Ok(UserCommitResult::Committed {
                            version: version.ok_or_else(|| corrupt("version"))?,
                            outcomes,
                        })
                    }
                    Some(0) => {
                        let current = match (items.get(1).and_then(string_of), items.get(2).and_then(bytes_of)) {
                            (Some(v), Some(bytes)) => Some(UserStateRecord {
                                version: v.parse().map_err(|_| corrupt("state version"))?,
                                bytes: bytes.to_vec(),
                            }),
                            _ => None,
                        };
                        Ok(UserCommitResult::Conflict { current })
                    }
                    _ => Err(corrupt("commit result")),
                }
            })
            .collect()
    }

    async fn wallet(&self, user: &UserId) -> Result<Vec<CouponRecord>, StoreError> {
        self.guard()?;
        let cmd = redis::cmd("HGETALL").arg(user_key(user, "coupons")).to_owned();
        let raw: Vec<(Vec<u8>, Vec<u8>)> = self.run(cmd.query_async(&mut self.conn())).await?;
        let mut records = raw
            .iter()
            .filter(|(field, _)| !field.starts_with(ISSUE_TIMES_FIELD))
            .map(|(_, r)| decode_record(r))
            .collect::<Result<Vec<_>, _>>()?;
        records.sort_by(|a, b| {
            b.coupon.issued_at_ms.cmp(&a.coupon.issued_at_ms).then_with(|| a.coupon.coupon_id.cmp(&b.coupon.coupon_id))
        });
        Ok(records)
    }

    async fn coupon(&self, id: &CouponId) -> Result<Option<CouponRecord>, StoreError> {
        self.guard()?;
        let owner = redis::cmd("HGET").arg("kabao:coupon_owner").arg(id.as_str()).to_owned();
        let Some(user): Option<String> = self.run(owner.query_async(&mut self.conn())).await? else { return Ok(None) };
        let cmd = redis::cmd("HGET").arg(format!("kabao:{{u:{user}}}:coupons")).arg(id.as_str()).to_owned();
        let raw: Option<Vec<u8>> = self.run(cmd.query_async(&mut self.conn())).await?;
        raw.map(|r| decode_record(&r)).transpose()
    }

    async fn redeem(&self, id: &CouponId, merchant_id: &str, now_ms: i64) -> Result<CouponRecord, RedeemError> {
        self.guard()?;
        let mut invocation = self.inner.scripts.redeem.prepare_invoke();
        invocation.arg(self.identity()).arg(id.as_str()).arg(merchant_id).arg(now_ms);
        let reply: Vec<Value> = self.run(invocation.invoke_async(&mut self.conn())).await?;
        match reply.first().and_then(string_of).as_deref() {
            Some("OK") => Ok(decode_record(reply.get(1).and_then(bytes_of).ok_or_else(|| corrupt("record"))?)?),
            Some("N") => Err(RedeemError::NotFound),
            Some("R") => Err(RedeemError::AlreadyRedeemed),
            Some("E") => Err(RedeemError::Expired),
            Some("M") => Err(RedeemError::WrongMerchant),
            _ => Err(corrupt("redeem").into()),
        }
    }
}

#[async_trait]
impl OutboxStore for RedisStore {
    async fn outbox_take(
        &self,
        consumer: &str,
        max: usize,
        now_ms: i64,
        lease_ms: i64,
    ) -> Result<Vec<OutboxEntry>, StoreError> {
        self.guard()?;
        if max == 0 {
            return Ok(Vec::new());
        }
        // A consumer's first take in this process also takes back what a dead process of the
        // same name (a node restarted on its address) left pending.
        let first = !self.inner.outbox_consumers.lock().contains(consumer);
        let (now, lease, max_text) = (now_ms.to_string(), lease_ms.max(0).to_string(), max.to_string());
        let step = ["take", consumer, &now, &lease, &max_text, if first { "1" } else { "0" }];
        let reply = self.run(self.outbox_step(&step).invoke_async(&mut self.conn())).await?;
        if first {
            self.inner.outbox_consumers.lock().insert(consumer.to_owned());
        }
        array_of(reply)?
            .chunks(2)
            .map(|pair| {
                let [handle, fields] = pair else { return Err(corrupt("outbox pair")) };
                decode_push(string_of(handle).ok_or_else(|| corrupt("outbox handle"))?, fields)
            })
            .collect()
    }

    async fn outbox_retry(&self, entry: &OutboxEntry, attempts: u32, not_before_ms: i64) -> Result<(), StoreError> {
        self.guard()?;
        let step = ["retry", &entry.id, &attempts.to_string(), &not_before_ms.to_string()];
        self.run(self.outbox_step(&step).invoke_async::<i64>(&mut self.conn())).await.map(drop)
    }

    async fn outbox_finish(&self, entry: &OutboxEntry, outcome: PushFinal, now_ms: i64) -> Result<(), StoreError> {
        self.guard()?;
        let (label, letter) = match outcome {
            PushFinal::Delivered => ("delivered", String::new()),
            PushFinal::DeadToken => ("dead_token", String::new()),
            PushFinal::Dropped => ("dropped", String::new()),
            PushFinal::Failed { reason } => {
                ("failed", json(&DeadLetter { entry: entry.clone(), reason, at_ms: now_ms })?)
            }
        };
        if label == "dead_token" {
            // The device goes (in its user's slot) before the push is acknowledged (in the
            // outbox's): a crash in between redelivers the push, which then finds the device gone
            // and is dropped. Dead tokens are rare: two round trips here cost nothing that counts.
            let mut remove = self.inner.scripts.remove_dead_device.key(user_key(&entry.coupon.user_id, "devices"));
            remove.arg(entry.device_id.as_str()).arg(entry.device.token.as_str());
            self.run(remove.invoke_async::<i64>(&mut self.conn())).await?;
        }
        let finish = self.outbox_step(&["finish", &entry.id, label, &letter, &DEAD_LETTERS_KEPT.to_string()]);
        self.run(finish.invoke_async::<i64>(&mut self.conn())).await.map(drop)
    }

    async fn outbox_len(&self) -> Result<u64, StoreError> {
        self.guard()?;
        let mut pipe = redis::pipe();
        pipe.cmd("XLEN").arg(OUTBOX_STREAM).cmd("ZCARD").arg(OUTBOX_DUE);
        let (fresh, delayed): (u64, u64) = self.run(pipe.query_async(&mut self.conn())).await?;
        Ok(fresh + delayed)
    }

    async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, StoreError> {
        self.guard()?;
        if limit == 0 {
            return Ok(Vec::new());
        }
        let cmd = redis::cmd("LRANGE").arg(DEAD_LETTERS).arg(0).arg(limit as i64 - 1).to_owned();
        let raw: Vec<Vec<u8>> = self.run(cmd.query_async(&mut self.conn())).await?;
        raw.iter().map(|r| serde_json::from_slice(r).map_err(|_| corrupt("dead letter JSON"))).collect()
    }
}

#[async_trait]
impl Store for RedisStore {
    fn kind(&self) -> &'static str {
        "redis"
    }

    fn shared_rate_limiter(self: Arc<Self>) -> Option<Arc<dyn RateLimiter>> {
        Some(self)
    }

    async fn health(&self) -> Result<(), StoreError> {
        self.check_identity().await
    }
}

/// Keeps ARGV[1] (a provider token signed at ARGV[2] ms) under KEYS[1] unless the token kept
/// there was signed less than ARGV[3] ms before it; forgets the key ARGV[4] ms after a write.
/// Answers {token, issued_at_ms} of the token kept. One script, so racing nodes agree.
const PROVIDER_TOKEN_SCRIPT: &str = r#"
local kept = redis.call('HMGET', KEYS[1], 'token', 'issued_at_ms')
if kept[1] and kept[2] and tonumber(ARGV[2]) - tonumber(kept[2]) < tonumber(ARGV[3]) then
  return kept
end
redis.call('HSET', KEYS[1], 'token', ARGV[1], 'issued_at_ms', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return {ARGV[1], ARGV[2]}
"#;

/// How long Redis keeps a provider token after it was written: APNs refuses one older than an
/// hour, so nobody could use it after that.
const PROVIDER_TOKEN_KEEP_MS: i64 = 3_600_000;

#[async_trait]
impl super::ProviderTokenStore for RedisStore {
    async fn provider_token(
        &self,
        slot: &str,
        candidate: super::ProviderToken,
        replace_after_ms: i64,
    ) -> Result<super::ProviderToken, StoreError> {
        static SCRIPT: std::sync::LazyLock<Script> = std::sync::LazyLock::new(|| Script::new(PROVIDER_TOKEN_SCRIPT));
        self.guard()?;
        let mut invocation = SCRIPT.key(format!("kabao:provider_token:{slot}"));
        invocation.arg(&candidate.token).arg(candidate.issued_at_ms).arg(replace_after_ms).arg(PROVIDER_TOKEN_KEEP_MS);
        let (token, issued_at_ms): (String, i64) = self.run(invocation.invoke_async(&mut self.conn())).await?;
        Ok(super::ProviderToken { token, issued_at_ms })
    }
}

#[doc(hidden)]
/// API.md's rate limits shared by every node on this Redis: one bucket per [`RateKey`] at
/// `kabao:{rl:<key>}` (a hash: `t` the server time in µs, `n` the tokens), one script per take.
#[async_trait]
impl RateLimiter for RedisStore {
    async fn take(
        &self,
        key: &RateKey,
        rate_per_s: f64,
        burst: f64,
        _now: tokio::time::Instant,
    ) -> Result<(), Duration> {
        let mut invocation = self.inner.scripts.rate_limit.key(format!("kabao:{{{}}}", key.as_str()));
        invocation.arg(rate_per_s).arg(burst);
        match self.run(invocation.invoke_async::<i64>(&mut self.conn())).await {
            Ok(0) => Ok(()),
            Ok(wait_us) => Err(Duration::from_micros(wait_us.max(1) as u64)),
            // Open, not shut: a Redis that cannot answer already fails every request that needs
            // it with 503, and the limit must not turn `/v1/…` reads of a recovering node into 429s.
            Err(e) => {
                metrics::counter!("kabao_rate_limit_unavailable_total").increment(1);
                tracing::debug!(error = %e, "rate limit not checked: the store did not answer");
                Ok(())
            }
        }
    }
}

pub mod test_server;

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::test_server::RedisServer;
    use super::{user_key, RedisStore};
    use crate::store::{Store, StoreError};

    async fn store(server: &RedisServer) -> Arc<dyn Store> {
        Arc::new(RedisStore::connect(&server.url()).await.expect("connect"))
    }

    async fn open_for_contract() -> (Arc<dyn Store>, RedisServer) {
        let server = RedisServer::start();
        (store(&server).await, server)
    }

    crate::store_contract_tests!(open_for_contract);

    #[tokio::test]
    async fn a_redis_holding_another_key_layout_is_refused_at_connect_naming_both_layouts() {
        let server = RedisServer::start();
        let client = redis::Client::open(server.url()).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        // What a kabao of layout 1 wrote: an identity without a `layout` field.
        redis::cmd("HSET").arg(super::IDENTITY_KEY).arg("id").arg("old").query_async::<()>(&mut conn).await.unwrap();
        let Err(StoreError::Unavailable(why)) = RedisStore::connect(&server.url()).await else {
            panic!("a layout-1 Redis must be refused")
        };
        assert!(why.contains("key layout 1") && why.contains("reads layout 2"), "{why}");
        assert!(RedisStore::adopt(&server.url()).await.is_err(), "adopting does not paper over it");
        let id: String = redis::cmd("HGET").arg(super::IDENTITY_KEY).arg("id").query_async(&mut conn).await.unwrap();
        assert_eq!(id, "old", "nothing was rewritten");
    }

    #[tokio::test]
    async fn the_issue_times_kept_in_the_coupons_hash_are_not_wallet_entries_and_go_with_erasure() {
        use crate::domain::{Caps, UserId};
        use crate::store::contract::{candidate, issue_one};
        use crate::store::IssueOutcome;
        let server = RedisServer::start();
        let store = store(&server).await;
        let caps = Caps { per_user_cooldown_s: 0, per_user_max: 2, total_max: 0 };
        for ts in [1_000, 2_000] {
            assert_eq!(issue_one(&store, candidate("it-c", "it-u", ts, caps)).await, IssueOutcome::Issued);
        }
        let user = UserId::parse("u", "it-u").unwrap();
        assert_eq!(store.wallet(&user).await.unwrap().len(), 2, "two coupons, not the times field");
        assert_eq!(issue_one(&store, candidate("it-c", "it-u", 3_000, caps)).await, IssueOutcome::PerUserMax);
        store.erase_user(&user).await.unwrap();
        let client = redis::Client::open(server.url()).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let fields: u64 = redis::cmd("HLEN").arg(user_key(&user, "coupons")).query_async(&mut conn).await.unwrap();
        let owners: u64 = redis::cmd("HLEN").arg("kabao:coupon_owner").query_async(&mut conn).await.unwrap();
        assert_eq!((fields, owners), (0, 0), "coupons, times and owner entries erased");
        assert_eq!(
            issue_one(&store, candidate("it-c", "it-u", 4_000, caps)).await,
            IssueOutcome::Issued,
            "a new start"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_outbox_is_a_stream_read_in_one_group_and_a_dead_consumers_pushes_are_taken_over() {
        use crate::domain::{Caps, DeviceId, UserId};
        use crate::store::contract::{candidate, issue_one};
        use crate::store::{Device, IssueOutcome, Platform, PushFinal};
        let server = RedisServer::start();
        let redis = RedisStore::connect(&server.url()).await.expect("connect");
        let store: Arc<dyn Store> = Arc::new(redis.clone());
        let user = UserId::parse("u", "sx-u").unwrap();
        for (device, token) in [("sx-d1", "t1"), ("sx-d2", "t2")] {
            let device_id = DeviceId::parse("d", device).unwrap();
            let value = Device { platform: Platform::Fcm, token: token.into(), tags: Vec::new(), locale: None };
            store.put_device(&user, &device_id, value).await.unwrap();
        }
        assert_eq!(issue_one(&store, candidate("sx-a", "sx-u", 1_000, Caps::default())).await, IssueOutcome::Issued);
        let mut conn = redis.conn();
        let queued: u64 = redis::cmd("XLEN").arg(super::OUTBOX_STREAM).query_async(&mut conn).await.unwrap();
        assert_eq!(queued, 2, "one stream entry per device, written with the coupon");

        let now = crate::engine::now_ms;
        let dead = store.outbox_take("node-dead", 10, now(), 200).await.unwrap();
        assert_eq!(dead.len(), 2);
        let pending = |conn: &mut redis::aio::ConnectionManager| {
            let cmd = redis::cmd("XPENDING").arg(super::OUTBOX_STREAM).arg(super::OUTBOX_GROUP).to_owned();
            let mut conn = conn.clone();
            async move { cmd.query_async::<redis::streams::StreamPendingReply>(&mut conn).await.unwrap() }
        };
        let redis::streams::StreamPendingReply::Data(held) = pending(&mut conn).await else { panic!("none pending") };
        let holders: Vec<(String, usize)> = held.consumers.iter().map(|c| (c.name.clone(), c.pending)).collect();
        assert_eq!((held.count, holders), (2, vec![("node-dead".into(), 2)]), "pending in the group");
        assert!(store.outbox_take("node-live", 10, now(), 200).await.unwrap().is_empty(), "leased");
        // The consumer that took them dies; once the lease has lapsed (nothing to wait for but
        // time), another takes them over.
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
        let taken_over = store.outbox_take("node-live", 10, now(), 200).await.unwrap();
        assert_eq!(taken_over.len(), 2);
        store.outbox_retry(&taken_over[0], 1, now()).await.unwrap();
        store.outbox_finish(&taken_over[1], PushFinal::Delivered, now()).await.unwrap();
        // The dead consumer's late acknowledgement counts nothing more.
        store.outbox_finish(&dead[1], PushFinal::Delivered, now()).await.unwrap();
        let retried = store.outbox_take("node-live", 10, now(), 60_000).await.unwrap();
        assert_eq!((retried.len(), retried[0].attempts), (1, 1), "a due retry comes back with its attempts");
        assert_ne!(retried[0].id, taken_over[0].id, "as a new stream entry");
        store.outbox_finish(&retried[0], PushFinal::Delivered, now()).await.unwrap();
        let stats = store.campaign_stats(&crate::domain::CampaignId::parse("c", "sx-a").unwrap()).await.unwrap();
        assert_eq!((stats.pushes.delivered, stats.pushes.retrying), (2, 0));
        assert_eq!(store.outbox_len().await.unwrap(), 0);
        assert_eq!(pending(&mut conn).await.count(), 0, "everything acknowledged");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_process_restarted_under_its_consumer_name_takes_back_its_pushes_at_once() {
        use crate::domain::{Caps, DeviceId, UserId};
        use crate::store::contract::{candidate, issue_one};
        use crate::store::{Device, IssueOutcome, Platform};
        let server = RedisServer::start();
        let before = store(&server).await;
        let user = UserId::parse("u", "rs-u").unwrap();
        let device = Device { platform: Platform::Fcm, token: "t".into(), tags: Vec::new(), locale: None };
        before.put_device(&user, &DeviceId::parse("d", "rs-d").unwrap(), device).await.unwrap();
        assert_eq!(issue_one(&before, candidate("rs-a", "rs-u", 1_000, Caps::default())).await, IssueOutcome::Issued);
        let now = crate::engine::now_ms;
        let lease = 60_000;
        let taken = before.outbox_take("kabao-h-127.0.0.1:9", 10, now(), lease).await.unwrap();
        assert_eq!(taken.len(), 1);
        assert!(before.outbox_take("kabao-h-127.0.0.1:9", 10, now(), lease).await.unwrap().is_empty(), "in flight");

        // The process dies with the push in flight; the node restarts on its address.
        let after = store(&server).await;
        assert!(after.outbox_take("another-node", 10, now(), lease).await.unwrap().is_empty(), "still leased");
        let back = after.outbox_take("kabao-h-127.0.0.1:9", 10, now(), lease).await.unwrap();
        assert_eq!(
            back.iter().map(|e| &e.coupon).collect::<Vec<_>>(),
            [&taken[0].coupon],
            "at once, not after the lease"
        );
        assert!(after.outbox_take("kabao-h-127.0.0.1:9", 10, now(), lease).await.unwrap().is_empty(), "once");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_redis_that_does_not_answer_is_unavailable_not_a_hang() {
        let server = RedisServer::start();
        let store = store(&server).await;
        store.health().await.expect("healthy");
        server.pause();
        let user = crate::domain::UserId::parse("u", "frozen").unwrap();
        assert!(matches!(store.load_user_states(std::slice::from_ref(&user)).await, Err(StoreError::Unavailable(_))));
        assert!(matches!(store.health().await, Err(StoreError::Unavailable(_))));
        server.resume();
        let mut healthy = false;
        for _ in 0..50 {
            if store.health().await.is_ok() {
                healthy = true;
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        assert!(healthy, "answers again once Redis does");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_store_that_lost_its_identity_refuses_everything_until_adopted() {
        let server = RedisServer::start();
        let redis = RedisStore::connect(&server.url()).await.expect("connect");
        let store: Arc<dyn Store> = Arc::new(redis.clone());
        let user = crate::domain::UserId::parse("u", "lost-u").unwrap();
        let mut flush = redis.conn();
        redis::cmd("FLUSHALL").query_async::<()>(&mut flush).await.expect("flush");

        // The commit script notices by itself, before anything else asked.
        let commit = crate::store::UserCommit {
            user_id: user.clone(),
            expected_version: 0,
            new_state: Some(b"s".to_vec()),
            new_version: 3,
            keep_for_ms: 60_000,
            issues: Vec::new(),
        };
        assert!(matches!(store.commit(vec![commit]).await, Err(StoreError::Lost(_))));
        assert!(matches!(store.devices(&user).await, Err(StoreError::Lost(_))), "every call refuses");
        assert!(matches!(store.health().await, Err(StoreError::Lost(_))));
        let raw: Option<String> =
            redis::cmd("GET").arg(user_key(&user, "state")).query_async(&mut flush).await.unwrap();
        assert_eq!(raw, None, "nothing was written");
        // Another node connecting writes a fresh identity: still not this node's.
        let _other = RedisStore::connect(&server.url()).await.expect("connect");
        assert!(matches!(store.health().await, Err(StoreError::Lost(_))));

        RedisStore::adopt(&server.url()).await.expect("adopt");
        assert!(matches!(store.health().await, Err(StoreError::Lost(_))), "refused until the index is rebuilt");
        let feed = store.campaign_changes(5).await.expect("the change poll answers");
        assert!(feed.changes.is_none() && feed.revision > 5, "reload everything, above every revision seen");
        store.all_campaigns().await.expect("the reload");
        store.health().await.expect("serving again");
        assert!(store.devices(&user).await.unwrap().is_empty());
    }
}
