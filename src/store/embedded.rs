//! The embedded durable store: the default of `kabao serve`, one node, no services.
//!
//! Everything that must survive a crash lives in one [redb] database, `kabao.redb` in the data
//! directory: campaigns, counters, devices, coupons, wallets, the push outbox and dead letters, and
//! the trigger state of users whose pings issued a coupon. redb is an embedded, transactional,
//! crash-safe B-tree store in pure Rust (copy-on-write pages, checksums, fsync on commit); its
//! own page cache keeps hot wallets in memory while history stays on disk.
//!
//! - **Durable before the reply.** Every write that a reply reports — a coupon, a campaign, a
//!   device, an erasure, a redemption — goes through one writer thread that applies all the writes
//!   queued meanwhile in one transaction and commits it with one fsync (group commit), then answers
//!   each. A request waits for the commit that holds its write, never for a flush of its own.
//! - **Trigger state** is kept in memory, where this node is its only writer (API.md rule 7): a
//!   commit that issues nothing changes it there at once and marks it dirty; dirty states are
//!   checkpointed every `checkpoint_interval` and at shutdown, and the states of users who got a
//!   coupon are written in the coupon's own transaction. A crash costs at most one interval of
//!   stays that issued nothing, never a stay that issued.
//! - **Leases** of outbox entries are in memory only: a restart voids them, and every entry
//!   without a final outcome is handed out again (at least once).
//! - **Identity and format.** The database records its format version and a random identity; a
//!   file of a newer or unknown format, or damaged, is refused with an error naming it; an
//!   `IDENTITY` file beside it lets a running node notice its data directory was replaced.
//!
//! The rules are those of [`rules`], shared with the in-memory store.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::Mutex;
use redb::{Database, Durability, ReadableTable, ReadableTableMetadata, Table, TableDefinition, WriteTransaction};
use rustc_hash::{FxHashMap, FxHashSet};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use tokio::sync::oneshot;

use super::rules::{self, IssueView};
use super::{
    CampaignChange, CampaignChanges, CampaignStats, CampaignStore, ChangeLog, CouponRecord, DeadLetter, Device,
    DeviceStore, IssueOutcome, IssueStore, IssuedCoupon, OutboxEntry, OutboxStore, ProviderToken, ProviderTokenStore,
    PushFinal, PushStats, RedeemError, Store, StoreError, UserCommit, UserCommitResult, UserStateRecord,
};
use crate::domain::{Campaign, CampaignDoc, CampaignId, CouponId, DeviceId, UserId};

/// The database file inside the data directory.
pub const DB_FILE: &str = "kabao.redb";
/// The identity file beside it.
pub const IDENTITY_FILE: &str = "IDENTITY";
/// The format this build writes and reads. Bumped on any change to the tables' layout.
pub const FORMAT: u32 = 1;

/// Dead letters kept (the oldest are dropped first).
const DEAD_LETTERS_KEPT: u64 = 10_000;
/// Most writes applied in one transaction.
const MAX_BATCH: usize = 1024;

// Keys built of several ids are length-prefixed parts (see `key`), so one id can never run into
// the next and prefix scans select exactly one user.
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const CAMPAIGNS: TableDefinition<&str, &[u8]> = TableDefinition::new("campaigns");
const COUNTERS: TableDefinition<&str, &[u8]> = TableDefinition::new("counters");
/// (user, campaign, incarnation) → issue times of the campaign's coupons to the user.
const ISSUE_TIMES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("issue_times");
/// (user, device) → device.
const DEVICES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("devices");
const USER_STATES: TableDefinition<&str, &[u8]> = TableDefinition::new("user_states");
const COUPONS: TableDefinition<&str, &[u8]> = TableDefinition::new("coupons");
/// (user, newest-first time, coupon id) → (): the wallet's order and the daily cap's index.
const WALLETS: TableDefinition<&[u8], ()> = TableDefinition::new("wallets");
/// (expiry time, coupon id) → user: what the retention purge walks.
const EXPIRIES: TableDefinition<&[u8], &str> = TableDefinition::new("expiries");
const OUTBOX: TableDefinition<u64, &[u8]> = TableDefinition::new("outbox");
const DEAD_LETTERS: TableDefinition<u64, &[u8]> = TableDefinition::new("dead_letters");
/// slot → the provider token every start of this node uses (see [`ProviderTokenStore`]).
const PROVIDER_TOKENS: TableDefinition<&str, &[u8]> = TableDefinition::new("provider_tokens");

/// How the embedded store runs.
#[derive(Debug, Clone)]
pub struct EmbeddedConfig {
    /// The data directory (created if missing).
    pub data_dir: PathBuf,
    /// How often trigger states that issued nothing are written.
    pub checkpoint_interval: Duration,
    /// Expired coupons older than this are purged.
    pub retention: Duration,
    /// redb's page cache.
    pub cache_bytes: usize,
    /// `max_tracked_users`: most trigger states kept (0: no ceiling), the longest idle dropped
    /// first (also from disk, at the next checkpoint).
    pub max_user_states: usize,
}

impl EmbeddedConfig {
    /// API.md's defaults for `data_dir`: checkpoint every second, 90 days' retention, 64 MiB cache.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            checkpoint_interval: Duration::from_secs(1),
            retention: Duration::from_secs(90 * 86_400),
            cache_bytes: 64 << 20,
            max_user_states: 0,
        }
    }
}

/// The embedded [`Store`].
pub struct EmbeddedStore {
    db: Arc<Database>,
    dir: PathBuf,
    identity: String,
    memory: Arc<Mutex<Memory>>,
    writer: std::sync::mpsc::SyncSender<Job>,
    /// Set when a commit failed: memory may be ahead of the disk, so nothing more is served.
    failed: Arc<AtomicBool>,
    config: EmbeddedConfig,
}

impl std::fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedStore").field("dir", &self.dir).finish_non_exhaustive()
    }
}

/// What lives in memory: the node's trigger states, leases, counters of the write path.
#[derive(Debug, Default)]
struct Memory {
    user_states: super::HeldStates,
    /// Users whose state changed since it was last written.
    dirty: FxHashSet<UserId>,
    /// Outbox sequence → server time its lease ends.
    leases: FxHashMap<u64, i64>,
    /// The newest campaign changes, for the change feed (one node: only its own writes).
    changes: ChangeLog,
    meta: MetaCounters,
}

/// Counters persisted in `META` with every transaction that moves them.
#[derive(Debug, Default, Clone, Copy, Serialize, Deserialize, PartialEq)]
struct MetaCounters {
    revision: u64,
    last_incarnation: u64,
    last_seq: u64,
    last_dead_letter: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct CampaignRecord {
    revision: u64,
    doc: CampaignDoc,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Counters {
    incarnation: u64,
    stats: CampaignStats,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredCoupon {
    record: CouponRecord,
    incarnation: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct OutboxRecord {
    entry: OutboxEntry,
    due_at_ms: i64,
    retrying: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct StateRow {
    version: u64,
    bytes: Vec<u8>,
    forget_at_ms: i64,
}

/// The tables one write transaction works on, opened once per batch.
struct Tables<'txn> {
    meta: Table<'txn, &'static str, &'static [u8]>,
    campaigns: Table<'txn, &'static str, &'static [u8]>,
    counters: Table<'txn, &'static str, &'static [u8]>,
    issue_times: Table<'txn, &'static [u8], &'static [u8]>,
    devices: Table<'txn, &'static [u8], &'static [u8]>,
    user_states: Table<'txn, &'static str, &'static [u8]>,
    coupons: Table<'txn, &'static str, &'static [u8]>,
    wallets: Table<'txn, &'static [u8], ()>,
    expiries: Table<'txn, &'static [u8], &'static str>,
    outbox: Table<'txn, u64, &'static [u8]>,
    dead_letters: Table<'txn, u64, &'static [u8]>,
    provider_tokens: Table<'txn, &'static str, &'static [u8]>,
}

impl<'txn> Tables<'txn> {
    fn open(txn: &'txn WriteTransaction) -> Result<Self, StoreError> {
        Ok(Self {
            meta: txn.open_table(META).map_err(io)?,
            campaigns: txn.open_table(CAMPAIGNS).map_err(io)?,
            counters: txn.open_table(COUNTERS).map_err(io)?,
            issue_times: txn.open_table(ISSUE_TIMES).map_err(io)?,
            devices: txn.open_table(DEVICES).map_err(io)?,
            user_states: txn.open_table(USER_STATES).map_err(io)?,
            coupons: txn.open_table(COUPONS).map_err(io)?,
            wallets: txn.open_table(WALLETS).map_err(io)?,
            expiries: txn.open_table(EXPIRIES).map_err(io)?,
            outbox: txn.open_table(OUTBOX).map_err(io)?,
            dead_letters: txn.open_table(DEAD_LETTERS).map_err(io)?,
            // New in a database of format 1 is fine: opening it in a write transaction creates it.
            provider_tokens: txn.open_table(PROVIDER_TOKENS).map_err(io)?,
        })
    }
}

/// What a job hands back to the writer: delivers the job's result once the batch's fate is known
/// (`Some(error)`: the commit failed, and so did every job in it).
type Completion = Box<dyn FnOnce(Option<StoreError>) + Send>;
/// One write, run by the writer thread inside the batch's transaction.
type Job = Box<dyn for<'a, 'txn> FnOnce(&'a mut Tables<'txn>, &mut Memory) -> (Completion, bool) + Send>;

/// A storage failure: the store is unavailable (nothing of the batch was applied).
fn io(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("embedded store: {e}"))
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).unwrap_or_default()
}

fn decode<T: DeserializeOwned>(what: &str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Unavailable(format!("embedded store: damaged {what}: {e}")))
}

/// A key of length-prefixed parts.
fn key(parts: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::with_capacity(parts.iter().map(|p| p.len() + 2).sum());
    for part in parts {
        out.extend_from_slice(&(part.len() as u16).to_be_bytes());
        out.extend_from_slice(part);
    }
    out
}

/// An i64 as bytes that sort like the number.
fn ordered(n: i64) -> [u8; 8] {
    ((n as u64) ^ (1 << 63)).to_be_bytes()
}

/// An i64 as bytes that sort newest (largest) first.
fn newest_first(n: i64) -> [u8; 8] {
    (!((n as u64) ^ (1 << 63))).to_be_bytes()
}

fn wallet_key(user: &UserId, issued_at_ms: i64, coupon: &CouponId) -> Vec<u8> {
    key(&[user.as_str().as_bytes(), &newest_first(issued_at_ms), coupon.as_str().as_bytes()])
}

/// The coupon id that ends a wallet key (user, time, coupon id) or an expiry key (time, coupon
/// id): what follows the fixed-size time part at `time_at`.
fn coupon_id_after_time(key: &[u8], time_at: usize) -> Result<&str, StoreError> {
    // The time part is its 2-byte length and 8 bytes; then the id's 2-byte length.
    let id = key.get(time_at + 12..).ok_or_else(|| io("damaged key"))?;
    std::str::from_utf8(id).map_err(io)
}

fn user_prefix(user: &UserId) -> Vec<u8> {
    key(&[user.as_str().as_bytes()])
}

/// Every key starting with `prefix`: the range `[prefix, prefix + 0xFF…)`.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    end.extend_from_slice(&[0xFF; 4]);
    end
}

fn issue_times_key(user: &UserId, campaign: &CampaignId, incarnation: u64) -> Vec<u8> {
    key(&[user.as_str().as_bytes(), campaign.as_str().as_bytes(), &incarnation.to_be_bytes()])
}

fn wall_clock_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// The rules' view of one write transaction.
struct TxnView<'v, 't> {
    tables: &'v Tables<'t>,
}

impl IssueView for TxnView<'_, '_> {
    fn coupon_exists(&self, id: &CouponId) -> Result<bool, StoreError> {
        Ok(self.tables.coupons.get(id.as_str()).map_err(io)?.is_some())
    }

    fn has_any_tag(&self, user: &UserId, tags_any: &[String]) -> Result<bool, StoreError> {
        let prefix = user_prefix(user);
        for row in self.tables.devices.range(prefix.as_slice()..prefix_end(&prefix).as_slice()).map_err(io)? {
            let (_, value) = row.map_err(io)?;
            let device: Device = decode("device", value.value())?;
            if device.tags.iter().any(|t| tags_any.contains(t)) {
                return Ok(true);
            }
        }
        Ok(false)
    }

    fn issue_times(&self, campaign: &CampaignId, user: &UserId) -> Result<Vec<i64>, StoreError> {
        let incarnation = counters(&self.tables.counters, campaign)?.map_or(0, |c| c.incarnation);
        match self.tables.issue_times.get(issue_times_key(user, campaign, incarnation).as_slice()).map_err(io)? {
            Some(v) => decode("issue times", v.value()),
            None => Ok(Vec::new()),
        }
    }

    fn campaign_issued(&self, campaign: &CampaignId) -> Result<u64, StoreError> {
        Ok(counters(&self.tables.counters, campaign)?.map_or(0, |c| c.stats.issued))
    }

    fn coupons_between(&self, user: &UserId, from_ms: i64, to_ms: i64, limit: usize) -> Result<usize, StoreError> {
        let prefix = user_prefix(user);
        let mut start = prefix.clone();
        start.extend_from_slice(&8u16.to_be_bytes());
        start.extend_from_slice(&newest_first(to_ms));
        let mut end = prefix;
        end.extend_from_slice(&8u16.to_be_bytes());
        end.extend_from_slice(&newest_first(from_ms));
        // Newest first from `to` (inclusive) to `from` (exclusive: its key sorts at `end`).
        let rows = self.tables.wallets.range(start.as_slice()..end.as_slice()).map_err(io)?;
        let mut n = 0;
        for row in rows.take(limit) {
            row.map_err(io)?;
            n += 1;
        }
        Ok(n)
    }
}

fn counters(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    campaign: &CampaignId,
) -> Result<Option<Counters>, StoreError> {
    match table.get(campaign.as_str()).map_err(io)? {
        Some(v) => Ok(Some(decode("counters", v.value())?)),
        None => Ok(None),
    }
}

fn put_meta(tables: &mut Tables<'_>, meta: &MetaCounters) -> Result<(), StoreError> {
    tables.meta.insert("counters", encode(meta).as_slice()).map_err(io)?;
    Ok(())
}

/// Records an allowed coupon: counters, issue times, the coupon, its wallet and expiry keys, a
/// push per device.
fn record(tables: &mut Tables<'_>, memory: &mut Memory, coupon: &IssuedCoupon) -> Result<(), StoreError> {
    let mut c = match counters(&tables.counters, &coupon.campaign_id)? {
        Some(c) => c,
        None => {
            memory.meta.last_incarnation += 1;
            Counters { incarnation: memory.meta.last_incarnation, stats: CampaignStats::default() }
        }
    };
    c.stats.issued += 1;
    tables.counters.insert(coupon.campaign_id.as_str(), encode(&c).as_slice()).map_err(io)?;

    let times_key = issue_times_key(&coupon.user_id, &coupon.campaign_id, c.incarnation);
    let mut times: Vec<i64> = match tables.issue_times.get(times_key.as_slice()).map_err(io)? {
        Some(v) => decode("issue times", v.value())?,
        None => Vec::new(),
    };
    let at = times.partition_point(|&t| t <= coupon.issued_at_ms);
    times.insert(at, coupon.issued_at_ms);
    tables.issue_times.insert(times_key.as_slice(), encode(&times).as_slice()).map_err(io)?;

    let stored = StoredCoupon {
        record: CouponRecord { coupon: coupon.clone(), redeemed_at_ms: None },
        incarnation: c.incarnation,
    };
    tables.coupons.insert(coupon.coupon_id.as_str(), encode(&stored).as_slice()).map_err(io)?;
    tables
        .wallets
        .insert(wallet_key(&coupon.user_id, coupon.issued_at_ms, &coupon.coupon_id).as_slice(), ())
        .map_err(io)?;
    if let Some(expires) = coupon.expires_at_ms {
        let expiry_key = key(&[&ordered(expires), coupon.coupon_id.as_str().as_bytes()]);
        tables.expiries.insert(expiry_key.as_slice(), coupon.user_id.as_str()).map_err(io)?;
    }

    let prefix = user_prefix(&coupon.user_id);
    let mut devices = Vec::new();
    for row in tables.devices.range(prefix.as_slice()..prefix_end(&prefix).as_slice()).map_err(io)? {
        let (k, v) = row.map_err(io)?;
        devices.push((k.value().to_vec(), decode::<Device>("device", v.value())?));
    }
    for (device_key, device) in devices {
        let device_id = device_id_of(&device_key, &prefix)?;
        memory.meta.last_seq += 1;
        let entry = OutboxEntry {
            id: memory.meta.last_seq.to_string(),
            coupon: coupon.clone(),
            device_id,
            device,
            attempts: 0,
        };
        let row = OutboxRecord { entry, due_at_ms: i64::MIN, retrying: false };
        tables.outbox.insert(memory.meta.last_seq, encode(&row).as_slice()).map_err(io)?;
    }
    Ok(())
}

/// The device id in a `DEVICES` key after the user's prefix.
fn device_id_of(device_key: &[u8], prefix: &[u8]) -> Result<DeviceId, StoreError> {
    let rest = &device_key[prefix.len().min(device_key.len())..];
    let id = rest.get(2..).and_then(|b| std::str::from_utf8(b).ok()).ok_or_else(|| io("damaged device key"))?;
    serde_json::from_value(serde_json::Value::String(id.to_owned())).map_err(io)
}

impl EmbeddedStore {
    /// Opens (or creates) the store in `config.data_dir`. Refuses a directory another process has
    /// open, and a database of another format or damaged, naming the file.
    pub fn open(config: EmbeddedConfig) -> anyhow::Result<Arc<Self>> {
        use anyhow::{bail, Context};
        let dir = config.data_dir.clone();
        std::fs::create_dir_all(&dir).with_context(|| format!("creating the data directory {}", dir.display()))?;
        let path = dir.join(DB_FILE);
        let existed = path.exists();
        let db = Database::builder().set_cache_size(config.cache_bytes).create(&path).map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => {
                anyhow::anyhow!("{} is in use by another kabao process (one data directory, one node)", path.display())
            }
            other => anyhow::anyhow!("cannot open {}: {other} (damaged? restore it from a backup)", path.display()),
        })?;

        let txn = db.begin_write().with_context(|| format!("opening {}", path.display()))?;
        let (meta, identity) = {
            let mut tables = Tables::open(&txn).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            let format = tables.meta.get("format")?.map(|v| v.value().to_vec());
            let identity = tables.meta.get("identity")?.map(|v| String::from_utf8_lossy(v.value()).into_owned());
            match (format, identity) {
                (None, None) if tables.campaigns.len()? == 0 && tables.coupons.len()? == 0 => {
                    // A new database: written on first use.
                    let identity = format!("{:016x}{:016x}", rand::random::<u64>(), rand::random::<u64>());
                    tables.meta.insert("format", FORMAT.to_string().as_bytes())?;
                    tables.meta.insert("identity", identity.as_bytes())?;
                    put_meta(&mut tables, &MetaCounters::default()).map_err(|e| anyhow::anyhow!("{e}"))?;
                    (MetaCounters::default(), identity)
                }
                (Some(format), Some(identity)) => {
                    let format = String::from_utf8_lossy(&format).parse::<u32>().unwrap_or(u32::MAX);
                    if format != FORMAT {
                        bail!(
                            "{} has format {format}, this kabao reads format {FORMAT}: use the kabao that wrote it",
                            path.display()
                        );
                    }
                    let meta = match tables.meta.get("counters")? {
                        Some(v) => serde_json::from_slice(v.value())
                            .with_context(|| format!("{}: damaged meta counters", path.display()))?,
                        None => bail!("{}: damaged (no meta counters)", path.display()),
                    };
                    (meta, identity)
                }
                _ => bail!("{} is not a kabao database of a known format (damaged?)", path.display()),
            }
        };
        txn.commit().with_context(|| format!("writing {}", path.display()))?;

        let identity_path = dir.join(IDENTITY_FILE);
        match std::fs::read_to_string(&identity_path) {
            Ok(on_disk) if on_disk.trim() == identity => {}
            Ok(on_disk) => bail!(
                "{} holds identity {} but {} is {identity}: the data directory was assembled from two stores",
                identity_path.display(),
                on_disk.trim(),
                path.display()
            ),
            Err(_) => std::fs::write(&identity_path, format!("{identity}\n"))
                .with_context(|| format!("writing {}", identity_path.display()))?,
        }

        // Trigger states come back into memory, minus those past their keep time.
        let now = wall_clock_ms();
        let mut user_states = FxHashMap::default();
        {
            let read = db.begin_read()?;
            let table = read.open_table(USER_STATES)?;
            for row in table.iter()? {
                let (k, v) = row?;
                let row: StateRow = serde_json::from_slice(v.value())
                    .with_context(|| format!("{}: damaged trigger state of a user", path.display()))?;
                if row.forget_at_ms > now {
                    let user: UserId = serde_json::from_value(serde_json::Value::String(k.value().to_owned()))?;
                    user_states
                        .insert(user, (UserStateRecord { version: row.version, bytes: row.bytes }, row.forget_at_ms));
                }
            }
        }
        // A ceiling lowered since the last run applies at once (the rows go at the first checkpoint).
        let dirty = super::drop_longest_idle(&mut user_states, config.max_user_states).into_iter().collect();
        tracing::info!(
            store = "embedded",
            path = %path.display(),
            created = !existed,
            users = user_states.len(),
            "store: embedded, durable (one node)"
        );

        let memory = Arc::new(Mutex::new(Memory { user_states, dirty, meta, ..Memory::default() }));
        let db = Arc::new(db);
        let failed = Arc::new(AtomicBool::new(false));
        let (writer, jobs) = std::sync::mpsc::sync_channel::<Job>(8 * MAX_BATCH);
        {
            let (db, memory, failed) = (db.clone(), memory.clone(), failed.clone());
            std::thread::Builder::new()
                .name("kabao-store-writer".into())
                .spawn(move || write_loop(&db, &memory, &failed, jobs))
                .context("starting the store's writer thread")?;
        }
        let store = Arc::new(Self { db, dir, identity, memory, writer, failed, config });
        store.start_background();
        Ok(store)
    }

    /// The checkpoint and the retention purge, as long as the store lives.
    fn start_background(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        let interval = self.config.checkpoint_interval;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            let mut purged_at = tokio::time::Instant::now();
            loop {
                tick.tick().await;
                let Some(store) = weak.upgrade() else { return };
                if let Err(e) = store.checkpoint().await {
                    tracing::warn!(error = %e, "trigger state checkpoint failed");
                }
                if purged_at.elapsed() >= Duration::from_secs(3600) {
                    purged_at = tokio::time::Instant::now();
                    match store.purge_expired(wall_clock_ms()).await {
                        Ok(n) if n > 0 => tracing::info!(purged = n, "purged expired coupons past retention"),
                        Ok(_) => {}
                        Err(e) => tracing::warn!(error = %e, "retention purge failed"),
                    }
                }
            }
        });
    }

    fn check(&self) -> Result<(), StoreError> {
        if self.failed.load(Ordering::Acquire) {
            return Err(StoreError::Unavailable(
                "embedded store: a write to disk failed; restart kabao to recover from the last commit".into(),
            ));
        }
        Ok(())
    }

    /// Runs `f` in the next batch's transaction and answers once that batch is on disk. `f` reads
    /// and checks before it writes; an `Unavailable` from it fails the whole batch.
    async fn write<R: Send + 'static>(
        &self,
        f: impl for<'a, 'txn> FnOnce(&'a mut Tables<'txn>, &mut Memory) -> Result<R, StoreError> + Send + 'static,
    ) -> Result<R, StoreError> {
        self.check()?;
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move |tables, memory| {
            let result = f(tables, memory);
            let fatal = matches!(result, Err(StoreError::Unavailable(_)));
            let completion: Completion = Box::new(move |commit_error| {
                let _ = tx.send(match commit_error {
                    Some(e) => Err(e),
                    None => result,
                });
            });
            (completion, fatal)
        });
        // The queue is bounded: when it is full, wait for room off the async threads (the writer
        // drains it at disk speed); otherwise hand the job over without a thread hop.
        match self.writer.try_send(job) {
            Ok(()) => {}
            Err(std::sync::mpsc::TrySendError::Full(job)) => {
                let writer = self.writer.clone();
                tokio::task::spawn_blocking(move || writer.send(job))
                    .await
                    .map_err(io)?
                    .map_err(|_| io("the writer thread stopped"))?;
            }
            Err(std::sync::mpsc::TrySendError::Disconnected(_)) => return Err(io("the writer thread stopped")),
        }
        rx.await.map_err(|_| io("the writer thread stopped"))?
    }

    /// Writes every dirty trigger state (and drops those past their keep time).
    pub async fn checkpoint(&self) -> Result<(), StoreError> {
        if self.memory.lock().dirty.is_empty() {
            return Ok(());
        }
        self.write(|tables, memory| {
            let now = wall_clock_ms();
            let dirty: Vec<UserId> = memory.dirty.drain().collect();
            for user in dirty {
                match memory.user_states.get(&user) {
                    Some((record, forget_at_ms)) if *forget_at_ms > now => {
                        let row = StateRow {
                            version: record.version,
                            bytes: record.bytes.clone(),
                            forget_at_ms: *forget_at_ms,
                        };
                        tables.user_states.insert(user.as_str(), encode(&row).as_slice()).map_err(io)?;
                    }
                    _ => {
                        memory.user_states.remove(&user);
                        tables.user_states.remove(user.as_str()).map_err(io)?;
                    }
                }
            }
            memory.user_states.retain(|_, (_, forget_at_ms)| *forget_at_ms > now);
            Ok(())
        })
        .await
    }

    /// Deletes coupons that expired more than the retention period before `now_ms`; returns how many.
    pub async fn purge_expired(&self, now_ms: i64) -> Result<usize, StoreError> {
        let before = now_ms.saturating_sub(self.config.retention.as_millis() as i64);
        self.write(move |tables, _| {
            // The bound is encoded like the keys (length-prefixed), so it sorts among them.
            let end = key(&[&ordered(before)]);
            let mut doomed = Vec::new();
            for row in tables.expiries.range(..end.as_slice()).map_err(io)?.take(10_000) {
                let (k, user) = row.map_err(io)?;
                doomed.push((k.value().to_vec(), user.value().to_owned()));
            }
            for (expiry_key, _user) in &doomed {
                let coupon_id = coupon_id_after_time(expiry_key, 0)?;
                if let Some(v) = tables.coupons.remove(coupon_id).map_err(io)? {
                    let stored: StoredCoupon = decode("coupon", v.value())?;
                    let c = &stored.record.coupon;
                    tables
                        .wallets
                        .remove(wallet_key(&c.user_id, c.issued_at_ms, &c.coupon_id).as_slice())
                        .map_err(io)?;
                }
                tables.expiries.remove(expiry_key.as_slice()).map_err(io)?;
            }
            Ok(doomed.len())
        })
        .await
    }

    fn read<R>(&self, f: impl FnOnce(&redb::ReadTransaction) -> Result<R, StoreError>) -> Result<R, StoreError> {
        self.check()?;
        let txn = self.db.begin_read().map_err(io)?;
        f(&txn)
    }
}

/// The writer thread: takes every job queued, runs them in one transaction, commits once, answers.
fn write_loop(db: &Database, memory: &Mutex<Memory>, failed: &AtomicBool, jobs: std::sync::mpsc::Receiver<Job>) {
    while let Ok(first) = jobs.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match jobs.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let outcome = (|| -> Result<Vec<Completion>, StoreError> {
            let mut txn = db.begin_write().map_err(io)?;
            txn.set_durability(Durability::Immediate);
            let mut completions = Vec::with_capacity(batch.len());
            let mut fatal = None;
            {
                let mut tables = Tables::open(&txn)?;
                let mut memory = memory.lock();
                for job in batch {
                    let (completion, job_fatal) = job(&mut tables, &mut memory);
                    completions.push(completion);
                    if job_fatal && fatal.is_none() {
                        fatal = Some(io("a write in the batch failed"));
                    }
                }
                put_meta(&mut tables, &memory.meta)?;
            }
            if let Some(e) = fatal {
                drop(txn);
                failed.store(true, Ordering::Release);
                for completion in completions {
                    completion(Some(StoreError::Unavailable(e.to_string())));
                }
                return Ok(Vec::new());
            }
            match txn.commit() {
                Ok(()) => Ok(completions),
                Err(e) => {
                    failed.store(true, Ordering::Release);
                    let message = format!("embedded store: commit failed: {e}");
                    tracing::error!(%message, "the store stops serving until restarted");
                    for completion in completions {
                        completion(Some(StoreError::Unavailable(message.clone())));
                    }
                    Ok(Vec::new())
                }
            }
        })();
        match outcome {
            Ok(completions) => completions.into_iter().for_each(|c| c(None)),
            Err(e) => {
                failed.store(true, Ordering::Release);
                tracing::error!(error = %e, "the store's writer failed; the store stops serving until restarted");
            }
        }
    }
}

/// A campaign record back to the validated campaign it was written from.
fn campaign_of(bytes: &[u8]) -> Result<Arc<Campaign>, StoreError> {
    let record: CampaignRecord = decode("campaign", bytes)?;
    let id = record.doc.id.clone().unwrap_or_default();
    let fallback = CampaignId::parse("id", &id).map_err(|e| io(format!("damaged campaign id: {e}")))?;
    let mut campaign = record.doc.validate(|| fallback).map_err(|e| io(format!("damaged campaign {id}: {e}")))?;
    campaign.revision = record.revision;
    Ok(Arc::new(campaign))
}

#[async_trait]
impl CampaignStore for EmbeddedStore {
    async fn insert_campaign(&self, mut campaign: Campaign) -> Result<Arc<Campaign>, StoreError> {
        self.write(move |tables, memory| {
            if tables.campaigns.get(campaign.id.as_str()).map_err(io)?.is_some() {
                return Err(StoreError::Conflict);
            }
            memory.meta.revision += 1;
            memory.meta.last_incarnation += 1;
            campaign.revision = memory.meta.revision;
            let record = CampaignRecord { revision: campaign.revision, doc: campaign.to_doc() };
            tables.campaigns.insert(campaign.id.as_str(), encode(&record).as_slice()).map_err(io)?;
            let counters = Counters { incarnation: memory.meta.last_incarnation, stats: CampaignStats::default() };
            tables.counters.insert(campaign.id.as_str(), encode(&counters).as_slice()).map_err(io)?;
            let campaign = Arc::new(campaign);
            memory.changes.push(CampaignChange::Upsert(campaign.clone()));
            Ok(campaign)
        })
        .await
    }

    async fn replace_campaign(&self, mut campaign: Campaign) -> Result<Arc<Campaign>, StoreError> {
        self.write(move |tables, memory| {
            if tables.campaigns.get(campaign.id.as_str()).map_err(io)?.is_none() {
                return Err(StoreError::NotFound);
            }
            memory.meta.revision += 1;
            campaign.revision = memory.meta.revision;
            let record = CampaignRecord { revision: campaign.revision, doc: campaign.to_doc() };
            tables.campaigns.insert(campaign.id.as_str(), encode(&record).as_slice()).map_err(io)?;
            let campaign = Arc::new(campaign);
            memory.changes.push(CampaignChange::Upsert(campaign.clone()));
            Ok(campaign)
        })
        .await
    }

    async fn delete_campaign(&self, id: &CampaignId) -> Result<u64, StoreError> {
        let id = id.clone();
        self.write(move |tables, memory| {
            if tables.campaigns.remove(id.as_str()).map_err(io)?.is_none() {
                return Err(StoreError::NotFound);
            }
            tables.counters.remove(id.as_str()).map_err(io)?;
            memory.meta.revision += 1;
            let revision = memory.meta.revision;
            memory.changes.push(CampaignChange::Delete { id, revision });
            Ok(revision)
        })
        .await
    }

    async fn campaign(&self, id: &CampaignId) -> Result<Option<Arc<Campaign>>, StoreError> {
        self.read(|txn| {
            let table = txn.open_table(CAMPAIGNS).map_err(io)?;
            let value = table.get(id.as_str()).map_err(io)?;
            value.map(|v| campaign_of(v.value())).transpose()
        })
    }

    async fn campaigns_page(&self, after: Option<&str>, limit: usize) -> Result<Vec<Arc<Campaign>>, StoreError> {
        self.read(|txn| {
            let table = txn.open_table(CAMPAIGNS).map_err(io)?;
            let mut page = Vec::new();
            let rows = match after {
                Some(after) => table.range::<&str>((std::ops::Bound::Excluded(after), std::ops::Bound::Unbounded)),
                None => table.range::<&str>(..),
            }
            .map_err(io)?;
            for row in rows.take(limit) {
                let (_, v) = row.map_err(io)?;
                page.push(campaign_of(v.value())?);
            }
            Ok(page)
        })
    }

    async fn all_campaigns(&self) -> Result<(u64, Vec<Arc<Campaign>>), StoreError> {
        let revision = self.memory.lock().meta.revision;
        let campaigns = self.read(|txn| {
            let table = txn.open_table(CAMPAIGNS).map_err(io)?;
            let mut all = Vec::new();
            for row in table.iter().map_err(io)? {
                let (_, v) = row.map_err(io)?;
                all.push(campaign_of(v.value())?);
            }
            Ok(all)
        })?;
        Ok((revision, campaigns))
    }

    async fn campaign_changes(&self, since: u64) -> Result<CampaignChanges, StoreError> {
        self.check()?;
        let memory = self.memory.lock();
        Ok(memory.changes.since(since, memory.meta.revision))
    }

    async fn campaign_stats(&self, id: &CampaignId) -> Result<CampaignStats, StoreError> {
        self.read(|txn| {
            let table = txn.open_table(COUNTERS).map_err(io)?;
            Ok(counters(&table, id)?.map_or_else(CampaignStats::default, |c| c.stats))
        })
    }
}

#[async_trait]
impl DeviceStore for EmbeddedStore {
    async fn put_device(&self, user: &UserId, device: &DeviceId, value: Device) -> Result<(), StoreError> {
        let k = key(&[user.as_str().as_bytes(), device.as_str().as_bytes()]);
        self.write(move |tables, _| {
            tables.devices.insert(k.as_slice(), encode(&value).as_slice()).map_err(io)?;
            Ok(())
        })
        .await
    }

    async fn delete_device(&self, user: &UserId, device: &DeviceId) -> Result<bool, StoreError> {
        let k = key(&[user.as_str().as_bytes(), device.as_str().as_bytes()]);
        self.write(move |tables, _| Ok(tables.devices.remove(k.as_slice()).map_err(io)?.is_some())).await
    }

    async fn devices(&self, user: &UserId) -> Result<Vec<(DeviceId, Device)>, StoreError> {
        self.read(|txn| {
            let table = txn.open_table(DEVICES).map_err(io)?;
            let prefix = user_prefix(user);
            let mut out = Vec::new();
            for row in table.range(prefix.as_slice()..prefix_end(&prefix).as_slice()).map_err(io)? {
                let (k, v) = row.map_err(io)?;
                out.push((device_id_of(k.value(), &prefix)?, decode("device", v.value())?));
            }
            Ok(out)
        })
    }

    async fn erase_user(&self, user: &UserId) -> Result<(), StoreError> {
        let user = user.clone();
        self.write(move |tables, memory| {
            let prefix = user_prefix(&user);
            let end = prefix_end(&prefix);
            let range = prefix.as_slice()..end.as_slice();
            tables.devices.retain_in(range.clone(), |_, _| false).map_err(io)?;
            tables.issue_times.retain_in(range.clone(), |_, _| false).map_err(io)?;
            let mut coupons = Vec::new();
            for row in tables.wallets.range(range.clone()).map_err(io)? {
                let (k, _) = row.map_err(io)?;
                coupons.push(k.value().to_vec());
            }
            for wallet_key in coupons {
                let coupon_id = coupon_id_after_time(&wallet_key, prefix.len())?;
                if let Some(v) = tables.coupons.remove(coupon_id).map_err(io)? {
                    let stored: StoredCoupon = decode("coupon", v.value())?;
                    if let Some(expires) = stored.record.coupon.expires_at_ms {
                        tables
                            .expiries
                            .remove(key(&[&ordered(expires), coupon_id.as_bytes()]).as_slice())
                            .map_err(io)?;
                    }
                }
            }
            tables.wallets.retain_in(range, |_, _| false).map_err(io)?;
            tables.user_states.remove(user.as_str()).map_err(io)?;
            memory.user_states.remove(&user);
            memory.dirty.remove(&user);
            let mut pending = Vec::new();
            for row in tables.outbox.iter().map_err(io)? {
                let (seq, v) = row.map_err(io)?;
                let record: OutboxRecord = decode("outbox entry", v.value())?;
                if record.entry.coupon.user_id == user {
                    pending.push(seq.value());
                }
            }
            for seq in pending {
                tables.outbox.remove(seq).map_err(io)?;
                memory.leases.remove(&seq);
            }
            let mut letters = Vec::new();
            for row in tables.dead_letters.iter().map_err(io)? {
                let (seq, v) = row.map_err(io)?;
                let letter: DeadLetter = decode("dead letter", v.value())?;
                if letter.entry.coupon.user_id == user {
                    letters.push(seq.value());
                }
            }
            for seq in letters {
                tables.dead_letters.remove(seq).map_err(io)?;
            }
            Ok(())
        })
        .await
    }
}

/// The conflict answer when a commit's expected version is not the user's current one.
fn version_conflict(memory: &Memory, commit: &UserCommit) -> Option<UserCommitResult> {
    let current = memory.user_states.get(&commit.user_id).map(|(r, _)| r);
    (current.map_or(0, |r| r.version) != commit.expected_version)
        .then(|| UserCommitResult::Conflict { current: current.cloned() })
}

#[async_trait]
impl IssueStore for EmbeddedStore {
    async fn load_user_states(&self, users: &[UserId]) -> Result<Vec<Option<UserStateRecord>>, StoreError> {
        self.check()?;
        let memory = self.memory.lock();
        Ok(users.iter().map(|u| memory.user_states.get(u).map(|(r, _)| r.clone())).collect())
    }

    async fn commit(&self, commits: Vec<UserCommit>) -> Result<Vec<UserCommitResult>, StoreError> {
        self.check()?;
        let now = wall_clock_ms();
        let mut results: Vec<Option<UserCommitResult>> = vec![None; commits.len()];
        let mut issuing = Vec::new();
        {
            // Users whose pings issue nothing change in memory only (checkpointed later).
            let mut memory = self.memory.lock();
            for (i, commit) in commits.into_iter().enumerate() {
                if !commit.issues.is_empty() {
                    issuing.push((i, commit));
                    continue;
                }
                if let Some(conflict) = version_conflict(&memory, &commit) {
                    results[i] = Some(conflict);
                    continue;
                }
                results[i] = Some(apply_state(&mut memory, commit, now));
            }
            let dropped = super::drop_longest_idle(&mut memory.user_states, self.config.max_user_states);
            // Marked dirty so that the next checkpoint deletes their rows too.
            memory.dirty.extend(dropped);
        }
        if !issuing.is_empty() {
            let decided = self
                .write(move |tables, memory| {
                    let (slots, commits): (Vec<usize>, Vec<UserCommit>) = issuing.into_iter().unzip();
                    let mut conflicts: Vec<Option<UserCommitResult>> =
                        commits.iter().map(|c| version_conflict(memory, c)).collect();
                    let accepted: Vec<bool> = conflicts.iter().map(Option::is_none).collect();
                    let mut outcomes: Vec<Vec<Vec<IssueOutcome>>> =
                        commits.iter().map(|c| c.issues.iter().map(|_| Vec::new()).collect()).collect();
                    for (i, j) in rules::decide_in_order(&commits, &accepted) {
                        let request = &commits[i].issues[j];
                        for candidate in &request.candidates {
                            let refusal = rules::refusal(&TxnView { tables }, request, candidate)?;
                            let outcome = match refusal {
                                Some(refusal) => refusal,
                                None => {
                                    record(tables, memory, &candidate.coupon)?;
                                    IssueOutcome::Issued
                                }
                            };
                            outcomes[i][j].push(outcome);
                        }
                    }
                    let mut out = Vec::with_capacity(commits.len());
                    for (((slot, commit), conflict), outcomes) in
                        slots.into_iter().zip(commits).zip(conflicts.iter_mut()).zip(outcomes)
                    {
                        if let Some(conflict) = conflict.take() {
                            out.push((slot, conflict));
                            continue;
                        }
                        // The stays that issued are written with the coupons.
                        let user = commit.user_id.clone();
                        let result = match apply_state(memory, commit, now) {
                            UserCommitResult::Committed { version, .. } => {
                                UserCommitResult::Committed { version, outcomes }
                            }
                            other => other,
                        };
                        if let Some((record, forget_at_ms)) = memory.user_states.get(&user) {
                            let row = StateRow {
                                version: record.version,
                                bytes: record.bytes.clone(),
                                forget_at_ms: *forget_at_ms,
                            };
                            tables.user_states.insert(user.as_str(), encode(&row).as_slice()).map_err(io)?;
                            memory.dirty.remove(&user);
                        }
                        out.push((slot, result));
                    }
                    Ok(out)
                })
                .await?;
            for (slot, result) in decided {
                results[slot] = Some(result);
            }
        }
        Ok(results.into_iter().map(|r| r.unwrap_or(UserCommitResult::Conflict { current: None })).collect())
    }

    async fn wallet(&self, user: &UserId) -> Result<Vec<CouponRecord>, StoreError> {
        self.read(|txn| {
            let wallets = txn.open_table(WALLETS).map_err(io)?;
            let coupons = txn.open_table(COUPONS).map_err(io)?;
            let prefix = user_prefix(user);
            let mut out = Vec::new();
            for row in wallets.range(prefix.as_slice()..prefix_end(&prefix).as_slice()).map_err(io)? {
                let (k, _) = row.map_err(io)?;
                let k = k.value();
                let coupon_id = coupon_id_after_time(k, prefix.len())?;
                if let Some(v) = coupons.get(coupon_id).map_err(io)? {
                    out.push(decode::<StoredCoupon>("coupon", v.value())?.record);
                }
            }
            Ok(out)
        })
    }

    async fn coupon(&self, id: &CouponId) -> Result<Option<CouponRecord>, StoreError> {
        self.read(|txn| {
            let coupons = txn.open_table(COUPONS).map_err(io)?;
            let value = coupons.get(id.as_str()).map_err(io)?;
            value.map(|v| decode::<StoredCoupon>("coupon", v.value()).map(|c| c.record)).transpose()
        })
    }

    async fn redeem(&self, id: &CouponId, merchant_id: &str, now_ms: i64) -> Result<CouponRecord, RedeemError> {
        let (id, merchant_id) = (id.clone(), merchant_id.to_owned());
        let outcome = self
            .write(move |tables, _| {
                let Some(v) = tables.coupons.get(id.as_str()).map_err(io)? else {
                    return Ok(Err(RedeemError::NotFound));
                };
                let mut stored: StoredCoupon = decode("coupon", v.value())?;
                drop(v);
                let coupon = &stored.record.coupon;
                if stored.record.redeemed_at_ms.is_some() {
                    return Ok(Err(RedeemError::AlreadyRedeemed));
                }
                if coupon.expires_at_ms.is_some_and(|expires| now_ms >= expires) {
                    return Ok(Err(RedeemError::Expired));
                }
                if coupon.merchant_id.as_deref().is_some_and(|m| m != merchant_id) {
                    return Ok(Err(RedeemError::WrongMerchant));
                }
                stored.record.redeemed_at_ms = Some(now_ms);
                tables.coupons.insert(id.as_str(), encode(&stored).as_slice()).map_err(io)?;
                let campaign = stored.record.coupon.campaign_id.clone();
                if let Some(mut c) = counters(&tables.counters, &campaign)? {
                    if c.incarnation == stored.incarnation {
                        c.stats.redeemed += 1;
                        tables.counters.insert(campaign.as_str(), encode(&c).as_slice()).map_err(io)?;
                    }
                }
                Ok(Ok(stored.record))
            })
            .await?;
        outcome
    }
}

/// Writes a committed user's new state into memory (marked dirty) and answers for it.
fn apply_state(memory: &mut Memory, commit: UserCommit, now_ms: i64) -> UserCommitResult {
    match commit.new_state {
        Some(bytes) => {
            let record = UserStateRecord { version: commit.new_version, bytes };
            let forget_at_ms = now_ms.saturating_add(commit.keep_for_ms);
            memory.dirty.insert(commit.user_id.clone());
            memory.user_states.insert(commit.user_id, (record, forget_at_ms));
            UserCommitResult::Committed { version: commit.new_version, outcomes: Vec::new() }
        }
        None => UserCommitResult::Committed { version: commit.expected_version, outcomes: Vec::new() },
    }
}

fn seq_of(entry: &OutboxEntry) -> Option<u64> {
    entry.id.parse().ok()
}

#[async_trait]
impl OutboxStore for EmbeddedStore {
    async fn outbox_take(
        &self,
        _consumer: &str,
        max: usize,
        now_ms: i64,
        lease_ms: i64,
    ) -> Result<Vec<OutboxEntry>, StoreError> {
        // Locked before the read begins, and a lease dropped only once the write that ends it is
        // committed (outbox_finish, outbox_retry): so a read that still sees an entry being
        // finished also sees its lease, and the entry is not handed out a second time.
        let mut memory = self.memory.lock();
        let rows = self.read(|txn| {
            let outbox = txn.open_table(OUTBOX).map_err(io)?;
            let mut due = Vec::new();
            for row in outbox.iter().map_err(io)? {
                if due.len() >= max {
                    break;
                }
                let (seq, v) = row.map_err(io)?;
                let seq = seq.value();
                if memory.leases.get(&seq).is_some_and(|&until| until > now_ms) {
                    continue;
                }
                let record: OutboxRecord = decode("outbox entry", v.value())?;
                if record.due_at_ms <= now_ms {
                    due.push((seq, record.entry));
                }
            }
            Ok(due)
        })?;
        let mut taken = Vec::with_capacity(rows.len());
        for (seq, entry) in rows {
            memory.leases.insert(seq, now_ms.saturating_add(lease_ms));
            taken.push(entry);
        }
        Ok(taken)
    }

    async fn outbox_retry(&self, entry: &OutboxEntry, attempts: u32, not_before_ms: i64) -> Result<(), StoreError> {
        let Some(seq) = seq_of(entry) else { return Ok(()) };
        let campaign = entry.coupon.campaign_id.clone();
        self.write(move |tables, _| {
            let Some(v) = tables.outbox.get(seq).map_err(io)? else { return Ok(()) };
            let mut record: OutboxRecord = decode("outbox entry", v.value())?;
            drop(v);
            record.entry.attempts = attempts;
            record.due_at_ms = not_before_ms;
            let first_retry = !std::mem::replace(&mut record.retrying, true);
            tables.outbox.insert(seq, encode(&record).as_slice()).map_err(io)?;
            if first_retry {
                update_push_stats(tables, &campaign, |p| p.retrying += 1)?;
            }
            Ok(())
        })
        .await?;
        // Only now: a take reading before the commit would see the entry as still due.
        self.memory.lock().leases.remove(&seq);
        Ok(())
    }

    async fn outbox_finish(&self, entry: &OutboxEntry, outcome: PushFinal, now_ms: i64) -> Result<(), StoreError> {
        let Some(seq) = seq_of(entry) else { return Ok(()) };
        let entry = entry.clone();
        self.write(move |tables, memory| {
            // Withheld from every take until the removal is committed (see outbox_take).
            memory.leases.insert(seq, i64::MAX);
            let Some(v) = tables.outbox.remove(seq).map_err(io)? else { return Ok(()) };
            let record: OutboxRecord = decode("outbox entry", v.value())?;
            drop(v);
            update_push_stats(tables, &entry.coupon.campaign_id, |p| {
                if record.retrying {
                    p.retrying = p.retrying.saturating_sub(1);
                }
                match &outcome {
                    PushFinal::Delivered => p.delivered += 1,
                    PushFinal::DeadToken => p.dead_token += 1,
                    PushFinal::Failed { .. } => p.failed += 1,
                    PushFinal::Dropped => {}
                }
            })?;
            match outcome {
                PushFinal::DeadToken => {
                    let k = key(&[entry.coupon.user_id.as_str().as_bytes(), entry.device_id.as_str().as_bytes()]);
                    let current = tables.devices.get(k.as_slice()).map_err(io)?.map(|v| v.value().to_vec());
                    if let Some(bytes) = current {
                        let device: Device = decode("device", &bytes)?;
                        if device.token == entry.device.token {
                            tables.devices.remove(k.as_slice()).map_err(io)?;
                        }
                    }
                }
                PushFinal::Failed { reason } => {
                    memory.meta.last_dead_letter += 1;
                    let n = memory.meta.last_dead_letter;
                    let letter = DeadLetter { entry: record.entry, reason, at_ms: now_ms };
                    tables.dead_letters.insert(n, encode(&letter).as_slice()).map_err(io)?;
                    if n > DEAD_LETTERS_KEPT {
                        tables.dead_letters.remove(n - DEAD_LETTERS_KEPT).map_err(io)?;
                    }
                }
                PushFinal::Delivered | PushFinal::Dropped => {}
            }
            Ok(())
        })
        .await?;
        self.memory.lock().leases.remove(&seq);
        Ok(())
    }

    async fn outbox_len(&self) -> Result<u64, StoreError> {
        self.read(|txn| txn.open_table(OUTBOX).map_err(io)?.len().map_err(io))
    }

    async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, StoreError> {
        self.read(|txn| {
            let table = txn.open_table(DEAD_LETTERS).map_err(io)?;
            let mut out = Vec::new();
            for row in table.iter().map_err(io)?.rev().take(limit) {
                let (_, v) = row.map_err(io)?;
                out.push(decode("dead letter", v.value())?);
            }
            Ok(out)
        })
    }
}

fn update_push_stats(
    tables: &mut Tables<'_>,
    campaign: &CampaignId,
    change: impl FnOnce(&mut PushStats),
) -> Result<(), StoreError> {
    if let Some(mut c) = counters(&tables.counters, campaign)? {
        change(&mut c.stats.pushes);
        tables.counters.insert(campaign.as_str(), encode(&c).as_slice()).map_err(io)?;
    }
    Ok(())
}

#[async_trait]
impl ProviderTokenStore for EmbeddedStore {
    async fn provider_token(
        &self,
        slot: &str,
        candidate: ProviderToken,
        replace_after_ms: i64,
    ) -> Result<ProviderToken, StoreError> {
        let slot = slot.to_owned();
        // Through the writer, so the token is on disk before any push carries it: a node
        // restarted at once finds it rather than signing another.
        self.write(move |tables, _| {
            let kept = match tables.provider_tokens.get(slot.as_str()).map_err(io)? {
                Some(v) => Some(decode::<ProviderToken>("provider token", v.value())?),
                None => None,
            };
            match kept {
                Some(kept) if !super::provider_token_due(&kept, &candidate, replace_after_ms) => Ok(kept),
                _ => {
                    tables.provider_tokens.insert(slot.as_str(), encode(&candidate).as_slice()).map_err(io)?;
                    Ok(candidate)
                }
            }
        })
        .await
    }
}

#[async_trait]
impl Store for EmbeddedStore {
    fn kind(&self) -> &'static str {
        "embedded"
    }

    async fn health(&self) -> Result<(), StoreError> {
        self.check()?;
        // The directory replaced or emptied under a running node: its identity is gone.
        let identity_path = self.dir.join(IDENTITY_FILE);
        match std::fs::read_to_string(&identity_path) {
            Ok(on_disk) if on_disk.trim() == self.identity => Ok(()),
            _ => Err(StoreError::Lost(format!(
                "{} no longer holds this store's identity: the data directory was replaced or removed \
                 while kabao ran; stop kabao and restore the directory",
                identity_path.display()
            ))),
        }
    }

    async fn close(&self) -> Result<(), StoreError> {
        self.checkpoint().await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::{EmbeddedConfig, EmbeddedStore, DB_FILE};
    use crate::domain::{CampaignDoc, CampaignId, DeviceId, UserId};
    use crate::store::{
        contract, CampaignStore, Device, DeviceStore, IssueStore, Platform, Store, UserCommit, UserCommitResult,
    };

    fn open(dir: &std::path::Path) -> Arc<EmbeddedStore> {
        EmbeddedStore::open(EmbeddedConfig::new(dir)).expect("opens")
    }

    /// Opens `dir` again once the previous store let go of it: its writer thread holds the
    /// database until its channel closes.
    async fn reopen(dir: &std::path::Path) -> Arc<EmbeddedStore> {
        loop {
            match EmbeddedStore::open(EmbeddedConfig::new(dir)) {
                Ok(store) => break store,
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
            }
        }
    }

    async fn open_for_contract() -> (Arc<dyn Store>, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        (open(dir.path()), dir)
    }

    crate::store_contract_tests!(open_for_contract);

    #[tokio::test]
    async fn keeps_at_most_max_tracked_users_states_also_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let config = EmbeddedConfig { max_user_states: 10, ..EmbeddedConfig::new(dir.path()) };
        {
            let store = EmbeddedStore::open(config.clone()).expect("opens");
            let dyn_store: Arc<dyn Store> = store.clone();
            contract::user_state_ceiling_of_ten(&dyn_store).await;
            store.close().await.unwrap();
        }
        // The dropped states' rows went too: after a restart without a ceiling, the nine the
        // section ends with are back (0, re-created, and 12–19), not twenty.
        let store = reopen(dir.path()).await;
        let users: Vec<UserId> = (0..20).map(|k| UserId::parse("user_id", &format!("ceil-{k:02}")).unwrap()).collect();
        let kept: Vec<bool> = store.load_user_states(&users).await.unwrap().iter().map(Option::is_some).collect();
        let expected: Vec<bool> = (0..20).map(|k| k == 0 || k >= 12).collect();
        assert_eq!(kept, expected);
    }

    fn campaign(id: &str) -> crate::domain::Campaign {
        let doc: CampaignDoc = serde_json::from_value(serde_json::json!({
            "id": id, "coupon": {"title": "t"},
            "fences": [{"id": "f", "type": "circle", "center": [114.0, 22.5], "radius_m": 100}],
        }))
        .unwrap();
        doc.validate(|| CampaignId::parse("id", id).unwrap()).unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn everything_written_is_there_after_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let user = UserId::parse("user_id", "u").unwrap();
        {
            let store = open(dir.path());
            let stored = store.insert_campaign(campaign("c")).await.unwrap();
            let device =
                Device { platform: Platform::Apns, token: "tok".into(), tags: vec!["vip".into()], locale: None };
            store.put_device(&user, &DeviceId::parse("d", "phone").unwrap(), device).await.unwrap();
            let commit = UserCommit {
                user_id: user.clone(),
                expected_version: 0,
                new_state: Some(b"stays".to_vec()),
                new_version: 7,
                keep_for_ms: 3_600_000,
                issues: Vec::new(),
            };
            assert!(matches!(store.commit(vec![commit]).await.unwrap()[0], UserCommitResult::Committed { .. }));
            // Only checkpointed (or issuing) states survive: closing checkpoints.
            store.close().await.unwrap();
            assert_eq!(stored.revision, 1);
        }
        let store = reopen(dir.path()).await;
        let (revision, campaigns) = store.all_campaigns().await.unwrap();
        assert_eq!((revision, campaigns.len()), (1, 1));
        assert_eq!(campaigns[0].revision, 1);
        assert_eq!(store.devices(&user).await.unwrap().len(), 1);
        let states = store.load_user_states(std::slice::from_ref(&user)).await.unwrap();
        assert_eq!(states[0].as_ref().map(|r| (r.version, r.bytes.clone())), Some((7, b"stays".to_vec())));
        // Revisions keep growing across restarts.
        assert_eq!(store.replace_campaign(campaign("c")).await.unwrap().revision, 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn coupons_expired_longer_than_the_retention_are_purged_and_no_others() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let dyn_store: Arc<dyn Store> = store.clone();
        let t = 1_700_000_000_000;
        let mut old = contract::candidate("pg-a", "pg-u", t, Default::default());
        old.coupon.expires_at_ms = Some(t + 1_000);
        let mut recent = contract::candidate("pg-a", "pg-u", t + 1, Default::default());
        recent.coupon.expires_at_ms = Some(t + 40 * 86_400_000);
        let never = contract::candidate("pg-a", "pg-u", t + 2, Default::default());
        for c in [old.clone(), recent.clone(), never] {
            assert_eq!(contract::issue_one(&dyn_store, c).await, crate::store::IssueOutcome::Issued);
        }
        // 90 days' retention, 60 days after `old` expired and 21 after `recent` did.
        let now = t + 60 * 86_400_000 + 1_000;
        assert_eq!(store.purge_expired(now).await.unwrap(), 0);
        assert_eq!(store.purge_expired(now + 31 * 86_400_000).await.unwrap(), 1);
        let wallet = store.wallet(&UserId::parse("u", "pg-u").unwrap()).await.unwrap();
        let left: Vec<_> = wallet.iter().map(|r| r.coupon.coupon_id.clone()).collect();
        assert_eq!(left.len(), 2);
        assert!(!left.contains(&old.coupon.coupon_id) && left.contains(&recent.coupon.coupon_id));
        assert!(store.coupon(&old.coupon.coupon_id).await.unwrap().is_none());
    }

    #[test]
    fn a_second_process_on_the_same_directory_is_refused_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Runtime::new().unwrap();
        let _guard = rt.enter();
        let _first = open(dir.path());
        let err = EmbeddedStore::open(EmbeddedConfig::new(dir.path())).unwrap_err().to_string();
        assert!(err.contains(DB_FILE) && err.contains("in use"), "{err}");
    }

    #[test]
    fn an_unknown_or_damaged_file_is_refused_never_emptied() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let _guard = rt.enter();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(DB_FILE), b"not a database at all, but somebody's data").unwrap();
        let err = EmbeddedStore::open(EmbeddedConfig::new(dir.path())).unwrap_err().to_string();
        assert!(err.contains(DB_FILE), "{err}");
        assert_eq!(std::fs::read(dir.path().join(DB_FILE)).unwrap(), b"not a database at all, but somebody's data");
    }
}
