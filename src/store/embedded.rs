//! The embedded durable store: the default of `kabao serve`, one node, no services.
//!
//! Everything that must survive a crash lives in one [fjall] database, the directory `kabao.fjall`
//! in the data directory: campaigns, counters, devices, coupons, wallets, the push outbox and dead
//! letters, and the trigger state of users whose pings issued a coupon. fjall is an embedded,
//! log-structured (LSM) key-value store in pure Rust: a write is appended to one journal and kept
//! in a memtable, flushed later into sorted, checksummed tables in the background. Each table below
//! is one of its keyspaces; one write transaction spans them all. A commit costs one sequential
//! journal append however random its keys, where a B-tree (redb, format 1) copied and checksummed
//! every page on the path to each key (BENCHMARKS.md, "Stores").
//!
//! - **Durable before the reply.** Every write that a reply reports — a coupon, a campaign, a
//!   device, an erasure, a redemption — goes through one writer thread that applies all the writes
//!   queued meanwhile in one write transaction (it reads its own writes, which the rules need),
//!   commits it, and syncs the journal with one `persist(PersistMode::SyncAll)` (one fsync: group
//!   commit), then answers each. A request waits for the sync that holds its write, never for a
//!   flush of its own. Reads outside the writer take a snapshot (`read_tx`), and never one between
//!   a commit and its sync (`durable_gate`): nothing that a crash could still take back is read.
//! - **Crash recovery** is fjall's: opening replays the journal up to its last whole write; what
//!   was synced is there, what was not was never answered.
//! - **Trigger state** is kept in memory, where this node is its only writer (API.md rule 7): a
//!   commit that issues nothing changes it there at once and marks it dirty; dirty states are
//!   checkpointed every `checkpoint_interval` and at shutdown, and the states of users who got a
//!   coupon are written in the coupon's own transaction. A crash costs at most one interval of
//!   stays that issued nothing, never a stay that issued.
//! - **Leases** of outbox entries are in memory only: a restart voids them, and every entry
//!   without a final outcome is handed out again (at least once).
//! - **Identity and format.** The database records its format version and a random identity; a
//!   database of another format (an earlier kabao's `kabao.redb` included), or damaged, is refused
//!   with an error naming it, and never emptied; an `IDENTITY` file beside it lets a running node
//!   notice its data directory was replaced.
//! - **Bounded memory.** fjall's memory is its block cache, its memtables and its open files, each
//!   bounded below (`open_database`), so resident memory does not grow with the history on disk.
//!
//! The rules are those of [`rules`], shared with the in-memory store.

use std::ops::RangeBounds;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use fjall::config::PartitioningPolicy;
use fjall::{KeyspaceCreateOptions, PersistMode, Readable, SingleWriterTxDatabase, SingleWriterTxKeyspace, Slice};
use parking_lot::{Mutex, RwLock};
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

/// The database inside the data directory (a directory: fjall's journal, tables and lock file).
pub const DB_FILE: &str = "kabao.fjall";
/// Where kabao up to format 1 kept its database (redb, one file): refused, never touched.
pub const FORMAT_1_FILE: &str = "kabao.redb";
/// The identity file beside it.
pub const IDENTITY_FILE: &str = "IDENTITY";
/// The format this build writes and reads. Bumped on any change to the tables' layout.
/// 1: redb, `kabao.redb`. 2: fjall, `kabao.fjall`.
pub const FORMAT: u32 = 2;

/// Dead letters kept (the oldest are dropped first).
const DEAD_LETTERS_KEPT: u64 = 10_000;
/// Most writes applied in one transaction.
const MAX_BATCH: usize = 1024;
/// Users per checkpoint job (see [`EmbeddedStore::checkpoint`]).
const CHECKPOINT_SLICE: usize = 1024;

/// The tables, each a fjall keyspace. Keys built of several ids are length-prefixed parts (see
/// `key`), so one id can never run into the next and prefix scans select exactly one user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum T {
    Meta,
    Campaigns,
    Counters,
    /// (user, campaign, incarnation) → issue times of the campaign's coupons to the user.
    IssueTimes,
    /// (user, device) → device.
    Devices,
    UserStates,
    /// Coupon id → its wallet key: what a lookup or a redemption by id, a purge and the check for
    /// a duplicate id go through.
    Coupons,
    /// (user, newest-first time, coupon id) → the coupon's record (`StoredCoupon`): the wallet's
    /// order, the daily cap's index, and the coupons themselves, so a wallet read is one range
    /// scan and not one random point read per coupon (BENCHMARKS.md, "Stores", 2026-12-04).
    Wallets,
    /// (expiry time, coupon id) → user: what the retention purge walks.
    Expiries,
    /// Big-endian sequence → entry.
    Outbox,
    /// Big-endian number → dead letter.
    DeadLetters,
    /// slot → the provider token every start of this node uses (see [`ProviderTokenStore`]).
    ProviderTokens,
}

impl T {
    const ALL: [T; 12] = [
        T::Meta,
        T::Campaigns,
        T::Counters,
        T::IssueTimes,
        T::Devices,
        T::UserStates,
        T::Coupons,
        T::Wallets,
        T::Expiries,
        T::Outbox,
        T::DeadLetters,
        T::ProviderTokens,
    ];

    fn name(self) -> &'static str {
        match self {
            T::Meta => "meta",
            T::Campaigns => "campaigns",
            T::Counters => "counters",
            T::IssueTimes => "issue_times",
            T::Devices => "devices",
            T::UserStates => "user_states",
            T::Coupons => "coupons",
            T::Wallets => "wallets",
            T::Expiries => "expiries",
            T::Outbox => "outbox",
            T::DeadLetters => "dead_letters",
            T::ProviderTokens => "provider_tokens",
        }
    }

    /// Whether every issued coupon writes it: these get the larger memtables.
    fn hot(self) -> bool {
        matches!(self, T::Counters | T::IssueTimes | T::UserStates | T::Coupons | T::Wallets | T::Expiries | T::Outbox)
    }
}

/// Memtable of a keyspace every coupon writes (see `open_database`).
const HOT_MEMTABLE_BYTES: u64 = 4 << 20;
/// Memtable of the others.
const COLD_MEMTABLE_BYTES: u64 = 1 << 20;
/// Most journal kept on disk before the oldest memtables are flushed (fjall's minimum).
const MAX_JOURNAL_BYTES: u64 = 64 << 20;
/// Most table files kept open.
const MAX_OPEN_FILES: usize = 256;

/// The keyspaces, in the order of [`T::ALL`].
struct Keyspaces(Vec<SingleWriterTxKeyspace>);

impl Keyspaces {
    fn of(&self, t: T) -> &SingleWriterTxKeyspace {
        &self.0[t as usize]
    }
}

/// A key and its value.
type Row = (Slice, Slice);

/// Reads of a snapshot, or of the write transaction (which also sees its own writes).
struct View<'k, R> {
    r: R,
    ks: &'k Keyspaces,
}

/// The batch's write transaction.
type Tx<'k, 'db> = View<'k, fjall::SingleWriterWriteTx<'db>>;

impl<R: Readable> View<'_, R> {
    fn get(&self, t: T, key: impl AsRef<[u8]>) -> Result<Option<Slice>, StoreError> {
        self.r.get(self.ks.of(t), key).map_err(io)
    }

    fn range<K: AsRef<[u8]>>(
        &self,
        t: T,
        range: impl RangeBounds<K>,
    ) -> impl DoubleEndedIterator<Item = Result<Row, StoreError>> {
        self.r.range(self.ks.of(t), range).map(|g| g.into_inner().map_err(io))
    }

    fn prefix(&self, t: T, prefix: &[u8]) -> impl DoubleEndedIterator<Item = Result<Row, StoreError>> {
        self.r.prefix(self.ks.of(t), prefix).map(|g| g.into_inner().map_err(io))
    }

    fn iter(&self, t: T) -> impl DoubleEndedIterator<Item = Result<Row, StoreError>> {
        self.r.iter(self.ks.of(t)).map(|g| g.into_inner().map_err(io))
    }

    fn is_empty(&self, t: T) -> Result<bool, StoreError> {
        self.r.is_empty(self.ks.of(t)).map_err(io)
    }
}

impl Tx<'_, '_> {
    fn insert(&mut self, t: T, key: &[u8], value: &[u8]) {
        self.r.insert(self.ks.of(t), key, value);
    }

    /// Removes `key`; returns the value it had.
    fn remove(&mut self, t: T, key: &[u8]) -> Result<Option<Slice>, StoreError> {
        self.r.take(self.ks.of(t), key).map_err(io)
    }
}

/// How the embedded store runs.
#[derive(Debug, Clone)]
pub struct EmbeddedConfig {
    /// The data directory (created if missing).
    pub data_dir: PathBuf,
    /// How often trigger states that issued nothing are written.
    pub checkpoint_interval: Duration,
    /// Expired coupons older than this are purged.
    pub retention: Duration,
    /// fjall's block cache (decoded table blocks: hot wallets, coupons, devices).
    pub cache_bytes: usize,
    /// `max_tracked_users`: most trigger states kept (0: no ceiling), the longest idle dropped
    /// first (also from disk, at the next checkpoint).
    pub max_user_states: usize,
}

impl EmbeddedConfig {
    /// API.md's defaults for `data_dir`: checkpoint every second, 90 days' retention; an 8 MiB
    /// cache (RocksDB's default: the tables' blocks are in the page cache behind it, and a wallet
    /// read costs the same with 4, 8 or 32 MiB, BENCHMARKS.md).
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            checkpoint_interval: Duration::from_secs(1),
            retention: Duration::from_secs(90 * 86_400),
            cache_bytes: 8 << 20,
            max_user_states: 0,
        }
    }
}

/// The embedded [`Store`].
pub struct EmbeddedStore {
    db: SingleWriterTxDatabase,
    keyspaces: Arc<Keyspaces>,
    /// Held shared while a snapshot is taken, and exclusively by the writer from a commit until
    /// its journal is synced: no reader sees a write that is not yet on disk.
    durable_gate: Arc<RwLock<()>>,
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
    /// The map of `user_states` the next checkpoint sweeps.
    next_sweep: usize,
    /// Outbox sequence → server time its lease ends.
    leases: FxHashMap<u64, i64>,
    /// The newest campaign changes, for the change feed (one node: only its own writes).
    changes: ChangeLog,
    meta: MetaCounters,
    /// Entries in the outbox (counted at start, kept by every write that adds or removes one).
    outbox_len: u64,
    /// No outbox entry below this sequence is left: scans start here, not at the tombstones of
    /// every entry already finished (an LSM tree keeps them until compaction drops them).
    outbox_floor: u64,
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

/// What a job hands back to the writer: delivers the job's result once the batch's fate is known
/// (`Some(error)`: the commit failed, and so did every job in it).
type Completion = Box<dyn FnOnce(Option<StoreError>) + Send>;
/// One write, run by the writer thread inside the batch's transaction.
type Job = Box<dyn for<'a, 'k, 'db> FnOnce(&'a mut Tx<'k, 'db>, &mut Memory) -> (Completion, bool) + Send>;

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

/// A big-endian sequence number key back to the number.
fn seq_key(key: &[u8]) -> Result<u64, StoreError> {
    Ok(u64::from_be_bytes(key.try_into().map_err(|_| io("damaged sequence key"))?))
}

fn wallet_key(user: &UserId, issued_at_ms: i64, coupon: &CouponId) -> Vec<u8> {
    key(&[user.as_str().as_bytes(), &newest_first(issued_at_ms), coupon.as_str().as_bytes()])
}

fn expiry_key(expires_at_ms: i64, coupon: &CouponId) -> Vec<u8> {
    key(&[&ordered(expires_at_ms), coupon.as_str().as_bytes()])
}

/// The coupon id that ends an expiry key (time, coupon id) or a wallet key (user, time, coupon
/// id): what follows the fixed-size time part at `time_at`.
fn coupon_id_after_time(key: &[u8], time_at: usize) -> Result<&str, StoreError> {
    // The time part is its 2-byte length and 8 bytes; then the id's 2-byte length.
    let id = key.get(time_at + 12..).ok_or_else(|| io("damaged key"))?;
    std::str::from_utf8(id).map_err(io)
}

fn user_prefix(user: &UserId) -> Vec<u8> {
    key(&[user.as_str().as_bytes()])
}

fn issue_times_key(user: &UserId, campaign: &CampaignId, incarnation: u64) -> Vec<u8> {
    key(&[user.as_str().as_bytes(), campaign.as_str().as_bytes(), &incarnation.to_be_bytes()])
}

fn wall_clock_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// The rules' view of one write transaction.
impl IssueView for Tx<'_, '_> {
    fn coupon_exists(&self, id: &CouponId) -> Result<bool, StoreError> {
        Ok(self.get(T::Coupons, id.as_str())?.is_some())
    }

    fn has_any_tag(&self, user: &UserId, tags_any: &[String]) -> Result<bool, StoreError> {
        for row in self.prefix(T::Devices, &user_prefix(user)) {
            let (_, value) = row?;
            let device: Device = decode("device", &value)?;
            if device.tags.iter().any(|t| tags_any.contains(t)) {
                return Ok(true);
            }
        }
        Ok(false)
    }

    fn issue_times(&self, campaign: &CampaignId, user: &UserId) -> Result<Vec<i64>, StoreError> {
        let incarnation = counters(self, campaign)?.map_or(0, |c| c.incarnation);
        match self.get(T::IssueTimes, issue_times_key(user, campaign, incarnation))? {
            Some(v) => decode("issue times", &v),
            None => Ok(Vec::new()),
        }
    }

    fn campaign_issued(&self, campaign: &CampaignId) -> Result<u64, StoreError> {
        Ok(counters(self, campaign)?.map_or(0, |c| c.stats.issued))
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
        let mut n = 0;
        for row in self.range(T::Wallets, start..end).take(limit) {
            row?;
            n += 1;
        }
        Ok(n)
    }
}

fn counters<R: Readable>(view: &View<'_, R>, campaign: &CampaignId) -> Result<Option<Counters>, StoreError> {
    match view.get(T::Counters, campaign.as_str())? {
        Some(v) => Ok(Some(decode("counters", &v)?)),
        None => Ok(None),
    }
}

fn put_meta(tx: &mut Tx<'_, '_>, meta: &MetaCounters) {
    tx.insert(T::Meta, b"counters", &encode(meta));
}

/// Records an allowed coupon: counters, issue times, the coupon, its wallet and expiry keys, a
/// push per device.
fn record(tx: &mut Tx<'_, '_>, memory: &mut Memory, coupon: &IssuedCoupon) -> Result<(), StoreError> {
    let mut c = match counters(tx, &coupon.campaign_id)? {
        Some(c) => c,
        None => {
            memory.meta.last_incarnation += 1;
            Counters { incarnation: memory.meta.last_incarnation, stats: CampaignStats::default() }
        }
    };
    c.stats.issued += 1;
    tx.insert(T::Counters, coupon.campaign_id.as_str().as_bytes(), &encode(&c));

    let times_key = issue_times_key(&coupon.user_id, &coupon.campaign_id, c.incarnation);
    let mut times: Vec<i64> = match tx.get(T::IssueTimes, &times_key)? {
        Some(v) => decode("issue times", &v)?,
        None => Vec::new(),
    };
    let at = times.partition_point(|&t| t <= coupon.issued_at_ms);
    times.insert(at, coupon.issued_at_ms);
    tx.insert(T::IssueTimes, &times_key, &encode(&times));

    let stored = StoredCoupon {
        record: CouponRecord { coupon: coupon.clone(), redeemed_at_ms: None },
        incarnation: c.incarnation,
    };
    let wallet = wallet_key(&coupon.user_id, coupon.issued_at_ms, &coupon.coupon_id);
    tx.insert(T::Coupons, coupon.coupon_id.as_str().as_bytes(), &wallet);
    tx.insert(T::Wallets, &wallet, &encode(&stored));
    if let Some(expires) = coupon.expires_at_ms {
        tx.insert(T::Expiries, &expiry_key(expires, &coupon.coupon_id), coupon.user_id.as_str().as_bytes());
    }

    let prefix = user_prefix(&coupon.user_id);
    let mut devices = Vec::new();
    for row in tx.prefix(T::Devices, &prefix) {
        let (k, v) = row?;
        devices.push((device_id_of(&k, &prefix)?, decode::<Device>("device", &v)?));
    }
    for (device_id, device) in devices {
        memory.meta.last_seq += 1;
        let entry = OutboxEntry {
            id: memory.meta.last_seq.to_string(),
            coupon: coupon.clone(),
            device_id,
            device,
            attempts: 0,
        };
        let row = OutboxRecord { entry, due_at_ms: i64::MIN, retrying: false };
        tx.insert(T::Outbox, &memory.meta.last_seq.to_be_bytes(), &encode(&row));
        memory.outbox_len += 1;
    }
    Ok(())
}

/// The device id in a `DEVICES` key after the user's prefix.
fn device_id_of(device_key: &[u8], prefix: &[u8]) -> Result<DeviceId, StoreError> {
    let rest = &device_key[prefix.len().min(device_key.len())..];
    let id = rest.get(2..).and_then(|b| std::str::from_utf8(b).ok()).ok_or_else(|| io("damaged device key"))?;
    serde_json::from_value(serde_json::Value::String(id.to_owned())).map_err(io)
}

/// Opens the fjall database at `path` with its memory bounded.
///
/// fjall's memory is (1) the block cache, `cache_bytes`, fixed; (2) the memtables: each keyspace
/// fills one up to its size, then seals it for a background flush to a table (a sealed one is
/// dropped once flushed) — 4 MiB for the seven keyspaces every coupon writes, 1 MiB for the five
/// others, so at most 33 MiB active plus the sealed ones in flight, however long the history;
/// small memtables mean more, smaller tables at level 0, which compaction merges, a fair price
/// against a bound on memory that issue 7 asks (RSS after 5 M coupons at most 1.5× that after
/// none); (3) the journal: up to 64 MiB (fjall's least) on disk before the keyspaces holding its
/// oldest part are flushed, so recovery replays at most that, and memtables never outlive it;
/// (4) open table files, at most 256 cached descriptors; (5) pinned blocks: the keyspaces every
/// coupon writes have partitioned index and filter blocks on every level (below), so only each
/// table's small top-level index stays in memory and the partitions go through the cache; the
/// small keyspaces keep fjall's default (index blocks of levels 0 and 1, filters of level 0).
fn open_database(path: &Path, cache_bytes: usize) -> fjall::Result<(SingleWriterTxDatabase, Keyspaces)> {
    let db = SingleWriterTxDatabase::builder(path)
        .cache_size(cache_bytes as u64)
        .max_journaling_size(MAX_JOURNAL_BYTES)
        .max_cached_files(Some(MAX_OPEN_FILES))
        .open()?;
    let mut keyspaces = Vec::with_capacity(T::ALL.len());
    for t in T::ALL {
        let memtable = if t.hot() { HOT_MEMTABLE_BYTES } else { COLD_MEMTABLE_BYTES };
        // A point read of the wallets is by a key taken from the coupons keyspace, so it finds its
        // row: no filter is built for their last level (most of their bytes), nor held in memory.
        // The coupons keyspace keeps its filters: the check for a duplicate id misses.
        let options = || {
            let options =
                KeyspaceCreateOptions::default().max_memtable_size(memtable).expect_point_read_hits(t == T::Wallets);
            if t.hot() {
                // Partitioned index and filter blocks on every level (fjall partitions from level
                // 3 only): a read loads a 4 KiB partition through the cache, where a table's whole
                // index block (about 1 MiB for 64 MiB of wallets) was read and checksummed at each
                // lookup once the cache could not hold them all; only the small top-level indexes stay
                // in memory, however long the history.
                options
                    .index_block_partitioning_policy(PartitioningPolicy::all(true))
                    .filter_block_partitioning_policy(PartitioningPolicy::all(true))
            } else {
                options
            }
        };
        keyspaces.push(db.keyspace(t.name(), options)?);
    }
    Ok((db, Keyspaces(keyspaces)))
}

/// Refuses what is not a kabao database of this format, before fjall is let near it (fjall would
/// start a new database in a directory without its version file).
fn check_data_dir(dir: &Path, path: &Path) -> anyhow::Result<()> {
    use anyhow::bail;
    let old = dir.join(FORMAT_1_FILE);
    if old.exists() {
        bail!(
            "{} is a kabao database of format 1 (redb); this kabao reads format {FORMAT} ({}): run the kabao \
             that wrote it, or move the file out of the data directory to start with an empty store",
            old.display(),
            path.display()
        );
    }
    let Ok(meta) = std::fs::metadata(path) else { return Ok(()) };
    if !meta.is_dir() {
        bail!("{} is not a kabao database of a known format (damaged?)", path.display());
    }
    let empty = std::fs::read_dir(path).map(|mut d| d.next().is_none()).unwrap_or(false);
    if !empty && !path.join("version").is_file() {
        bail!("{} is not a kabao database of a known format (damaged? no version file)", path.display());
    }
    Ok(())
}

impl EmbeddedStore {
    /// Opens (or creates) the store in `config.data_dir`. Refuses a directory another process has
    /// open, and a database of another format or damaged, naming the file.
    pub fn open(config: EmbeddedConfig) -> anyhow::Result<Arc<Self>> {
        use anyhow::{bail, Context};
        let dir = config.data_dir.clone();
        std::fs::create_dir_all(&dir).with_context(|| format!("creating the data directory {}", dir.display()))?;
        let path = dir.join(DB_FILE);
        check_data_dir(&dir, &path)?;
        let existed = path.exists();
        let (db, keyspaces) = open_database(&path, config.cache_bytes).map_err(|e| match e {
            fjall::Error::Locked => {
                anyhow::anyhow!("{} is in use by another kabao process (one data directory, one node)", path.display())
            }
            other => anyhow::anyhow!("cannot open {}: {other} (damaged? restore it from a backup)", path.display()),
        })?;
        let damaged = |e: StoreError| anyhow::anyhow!("{}: {e}", path.display());

        let (meta, identity) = {
            let mut tx = View { r: db.write_tx(), ks: &keyspaces };
            let format = tx.get(T::Meta, "format").map_err(damaged)?;
            let identity = tx.get(T::Meta, "identity").map_err(damaged)?;
            let found = match (format, identity) {
                (None, None)
                    if tx.is_empty(T::Campaigns).map_err(damaged)? && tx.is_empty(T::Coupons).map_err(damaged)? =>
                {
                    // A new database: written on first use.
                    let identity = format!("{:016x}{:016x}", rand::random::<u64>(), rand::random::<u64>());
                    tx.insert(T::Meta, b"format", FORMAT.to_string().as_bytes());
                    tx.insert(T::Meta, b"identity", identity.as_bytes());
                    put_meta(&mut tx, &MetaCounters::default());
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
                    let meta = match tx.get(T::Meta, "counters").map_err(damaged)? {
                        Some(v) => serde_json::from_slice(&v)
                            .with_context(|| format!("{}: damaged meta counters", path.display()))?,
                        None => bail!("{}: damaged (no meta counters)", path.display()),
                    };
                    (meta, String::from_utf8_lossy(&identity).into_owned())
                }
                _ => bail!("{} is not a kabao database of a known format (damaged?)", path.display()),
            };
            tx.r.commit().with_context(|| format!("writing {}", path.display()))?;
            db.persist(PersistMode::SyncAll).with_context(|| format!("writing {}", path.display()))?;
            found
        };

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
        let mut user_states = super::HeldStates::default();
        let outbox_len;
        {
            let read = View { r: db.read_tx(), ks: &keyspaces };
            for row in read.iter(T::UserStates) {
                let (k, v) = row.map_err(damaged)?;
                let row: StateRow = serde_json::from_slice(&v)
                    .with_context(|| format!("{}: damaged trigger state of a user", path.display()))?;
                if row.forget_at_ms > now {
                    let user: UserId =
                        serde_json::from_value(serde_json::Value::String(String::from_utf8_lossy(&k).into_owned()))?;
                    user_states
                        .insert(user, (UserStateRecord { version: row.version, bytes: row.bytes }, row.forget_at_ms));
                }
            }
            let mut n = 0u64;
            for row in read.iter(T::Outbox) {
                row.map_err(damaged)?;
                n += 1;
            }
            outbox_len = n;
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

        let memory = Arc::new(Mutex::new(Memory { user_states, dirty, meta, outbox_len, ..Memory::default() }));
        let keyspaces = Arc::new(keyspaces);
        let durable_gate = Arc::new(RwLock::new(()));
        let failed = Arc::new(AtomicBool::new(false));
        let (writer, jobs) = std::sync::mpsc::sync_channel::<Job>(8 * MAX_BATCH);
        {
            let (db, keyspaces, gate, memory, failed) =
                (db.clone(), keyspaces.clone(), durable_gate.clone(), memory.clone(), failed.clone());
            std::thread::Builder::new()
                .name("kabao-store-writer".into())
                .spawn(move || write_loop(&db, &keyspaces, &gate, &memory, &failed, jobs))
                .context("starting the store's writer thread")?;
        }
        let store = Arc::new(Self { db, keyspaces, durable_gate, dir, identity, memory, writer, failed, config });
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
                store.report_memory();
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
        f: impl for<'a, 'k, 'db> FnOnce(&'a mut Tx<'k, 'db>, &mut Memory) -> Result<R, StoreError> + Send + 'static,
    ) -> Result<R, StoreError> {
        self.check()?;
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move |txn, memory| {
            let result = f(txn, memory);
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

    /// Writes every dirty trigger state, and sweeps one map of the states in memory: those past
    /// their keep time leave memory and disk (every map is swept once per `HELD_STATE_SHARDS`
    /// checkpoints, a minute at the default interval).
    ///
    /// In slices of [`CHECKPOINT_SLICE`] users, each a job of its own (the writer still commits
    /// them together): a job holds the memory lock only for its slice, so a flood of new users
    /// (a checkpoint of 100 000s of states) never holds up the commits of everyone else for the
    /// time it takes to write them all. Each slice reads the states when it runs, so a state
    /// committed meanwhile (or written with its coupons) is never overwritten by an older one.
    pub async fn checkpoint(&self) -> Result<(), StoreError> {
        let now = wall_clock_ms();
        let mut users: Vec<UserId> = {
            let mut memory = self.memory.lock();
            let shard = memory.next_sweep;
            memory.next_sweep = shard.wrapping_add(1);
            let expired = memory.user_states.take_expired(shard, now);
            let mut users: Vec<UserId> = std::mem::take(&mut memory.dirty).into_iter().collect();
            users.extend(expired);
            users
        };
        let mut slices = Vec::with_capacity(users.len().div_ceil(CHECKPOINT_SLICE));
        while !users.is_empty() {
            let slice = users.split_off(users.len().saturating_sub(CHECKPOINT_SLICE));
            slices.push(self.write(move |tx, memory| {
                for user in slice {
                    match memory.user_states.get(&user) {
                        Some((record, forget_at_ms)) if *forget_at_ms > now => {
                            let row = StateRow {
                                version: record.version,
                                bytes: record.bytes.clone(),
                                forget_at_ms: *forget_at_ms,
                            };
                            tx.insert(T::UserStates, user.as_str().as_bytes(), &encode(&row));
                        }
                        _ => {
                            memory.user_states.remove(&user);
                            tx.remove(T::UserStates, user.as_str().as_bytes())?;
                        }
                    }
                }
                Ok(())
            }));
        }
        futures::future::try_join_all(slices).await.map(drop)
    }

    /// fjall's own memory, in `/metrics`: the memtables (written, not yet flushed to tables) and
    /// the block cache, each bounded (`open_database`).
    fn report_memory(&self) {
        let db = self.db.inner();
        metrics::gauge!("kabao_store_memtable_bytes").set(db.write_buffer_size() as f64);
        metrics::gauge!("kabao_store_cache_bytes").set(db.cache_size() as f64);
    }

    /// Deletes coupons that expired more than the retention period before `now_ms`; returns how many.
    pub async fn purge_expired(&self, now_ms: i64) -> Result<usize, StoreError> {
        let before = now_ms.saturating_sub(self.config.retention.as_millis() as i64);
        self.write(move |tx, _| {
            // The bound is encoded like the keys (length-prefixed), so it sorts among them.
            let end = key(&[&ordered(before)]);
            let mut doomed = Vec::new();
            for row in tx.range(T::Expiries, ..end).take(10_000) {
                let (k, _user) = row?;
                doomed.push(k.to_vec());
            }
            for expiry in &doomed {
                let coupon_id = coupon_id_after_time(expiry, 0)?;
                if let Some(wallet) = tx.remove(T::Coupons, coupon_id.as_bytes())? {
                    tx.remove(T::Wallets, &wallet)?;
                }
                tx.remove(T::Expiries, expiry)?;
            }
            Ok(doomed.len())
        })
        .await
    }

    /// Writes a consistent copy of the store into `dest`, a new data directory (created; refused
    /// if it holds anything), while the store goes on serving: dirty trigger states are
    /// checkpointed first, then every table is copied from one snapshot, synced, and the
    /// identity written beside it. kabao opened on `dest` is this store as of that snapshot.
    /// Returns the rows copied.
    pub async fn snapshot_into(&self, dest: &Path) -> anyhow::Result<u64> {
        self.checkpoint().await?;
        self.check()?;
        let snapshot = {
            let _synced = self.durable_gate.read();
            self.db.read_tx()
        };
        let (keyspaces, identity, dest) = (self.keyspaces.clone(), self.identity.clone(), dest.to_path_buf());
        let cache_bytes = self.config.cache_bytes;
        tokio::task::spawn_blocking(move || copy_snapshot(snapshot, &keyspaces, &identity, &dest, cache_bytes)).await?
    }

    /// Runs `f` on a snapshot of everything that is on disk.
    fn read<R>(&self, f: impl FnOnce(&View<'_, fjall::Snapshot>) -> Result<R, StoreError>) -> Result<R, StoreError> {
        self.check()?;
        let snapshot = {
            let _synced = self.durable_gate.read();
            self.db.read_tx()
        };
        f(&View { r: snapshot, ks: &self.keyspaces })
    }
}

/// Copies every table of `snapshot` into a new database in `dest` (see `snapshot_into`).
fn copy_snapshot(
    snapshot: fjall::Snapshot,
    from: &Keyspaces,
    identity: &str,
    dest: &Path,
    cache_bytes: usize,
) -> anyhow::Result<u64> {
    use anyhow::{bail, Context};
    if std::fs::read_dir(dest).is_ok_and(|mut entries| entries.next().is_some()) {
        bail!("{} is not empty: a snapshot goes into a new data directory", dest.display());
    }
    std::fs::create_dir_all(dest).with_context(|| format!("creating {}", dest.display()))?;
    let path = dest.join(DB_FILE);
    let (db, to) = open_database(&path, cache_bytes).with_context(|| format!("creating {}", path.display()))?;
    let source = View { r: snapshot, ks: from };
    let mut copied = 0u64;
    for t in T::ALL {
        let mut tx = View { r: db.write_tx(), ks: &to };
        let mut in_tx = 0;
        for row in source.iter(t) {
            let (k, v) = row?;
            tx.insert(t, &k, &v);
            copied += 1;
            in_tx += 1;
            if in_tx == 10_000 {
                // Committed before the next transaction begins: fjall has one writer at a time.
                tx.r.commit().with_context(|| format!("writing {}", path.display()))?;
                tx = View { r: db.write_tx(), ks: &to };
                in_tx = 0;
            }
        }
        tx.r.commit().with_context(|| format!("writing {}", path.display()))?;
    }
    db.persist(PersistMode::SyncAll).with_context(|| format!("writing {}", path.display()))?;
    let identity_path = dest.join(IDENTITY_FILE);
    std::fs::write(&identity_path, format!("{identity}\n"))
        .with_context(|| format!("writing {}", identity_path.display()))?;
    Ok(copied)
}

/// The writer thread: takes every job queued, runs them in one transaction, commits once, syncs the
/// journal once, answers.
fn write_loop(
    db: &SingleWriterTxDatabase,
    keyspaces: &Keyspaces,
    durable_gate: &RwLock<()>,
    memory: &Mutex<Memory>,
    failed: &AtomicBool,
    jobs: std::sync::mpsc::Receiver<Job>,
) {
    while let Ok(first) = jobs.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match jobs.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let mut tx = View { r: db.write_tx(), ks: keyspaces };
        let mut completions = Vec::with_capacity(batch.len());
        let mut fatal = false;
        // The memory lock is taken per job, not for the batch: requests that change memory only
        // (pings that issue nothing) wait for one job at most, never for a whole batch.
        for job in batch {
            let (completion, job_fatal) = job(&mut tx, &mut memory.lock());
            completions.push(completion);
            fatal |= job_fatal;
        }
        put_meta(&mut tx, &memory.lock().meta);
        let failure = if fatal {
            // Dropped: nothing of the batch is written.
            tx.r.rollback();
            Some("embedded store: a write in the batch failed".to_owned())
        } else {
            // Readers wait (only to take their snapshot) from the commit until the journal is on
            // disk, so none sees a write a crash could still take back.
            let _syncing = durable_gate.write();
            match tx.r.commit().and_then(|()| db.persist(PersistMode::SyncAll)) {
                Ok(()) => None,
                Err(e) => {
                    // Before the gate opens: no reader goes on to a commit that may not be on disk.
                    failed.store(true, Ordering::Release);
                    Some(format!("embedded store: commit failed: {e}"))
                }
            }
        };
        match failure {
            None => completions.into_iter().for_each(|c| c(None)),
            Some(message) => {
                failed.store(true, Ordering::Release);
                tracing::error!(%message, "the store stops serving until restarted");
                for completion in completions {
                    completion(Some(StoreError::Unavailable(message.clone())));
                }
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
        self.write(move |tx, memory| {
            if tx.get(T::Campaigns, campaign.id.as_str())?.is_some() {
                return Err(StoreError::Conflict);
            }
            memory.meta.revision += 1;
            memory.meta.last_incarnation += 1;
            campaign.revision = memory.meta.revision;
            let record = CampaignRecord { revision: campaign.revision, doc: campaign.to_doc() };
            tx.insert(T::Campaigns, campaign.id.as_str().as_bytes(), &encode(&record));
            let counters = Counters { incarnation: memory.meta.last_incarnation, stats: CampaignStats::default() };
            tx.insert(T::Counters, campaign.id.as_str().as_bytes(), &encode(&counters));
            let campaign = Arc::new(campaign);
            memory.changes.push(CampaignChange::Upsert(campaign.clone()));
            Ok(campaign)
        })
        .await
    }

    async fn replace_campaign(&self, mut campaign: Campaign) -> Result<Arc<Campaign>, StoreError> {
        self.write(move |tx, memory| {
            if tx.get(T::Campaigns, campaign.id.as_str())?.is_none() {
                return Err(StoreError::NotFound);
            }
            memory.meta.revision += 1;
            campaign.revision = memory.meta.revision;
            let record = CampaignRecord { revision: campaign.revision, doc: campaign.to_doc() };
            tx.insert(T::Campaigns, campaign.id.as_str().as_bytes(), &encode(&record));
            let campaign = Arc::new(campaign);
            memory.changes.push(CampaignChange::Upsert(campaign.clone()));
            Ok(campaign)
        })
        .await
    }

    async fn delete_campaign(&self, id: &CampaignId) -> Result<u64, StoreError> {
        let id = id.clone();
        self.write(move |tx, memory| {
            if tx.remove(T::Campaigns, id.as_str().as_bytes())?.is_none() {
                return Err(StoreError::NotFound);
            }
            tx.remove(T::Counters, id.as_str().as_bytes())?;
            memory.meta.revision += 1;
            let revision = memory.meta.revision;
            memory.changes.push(CampaignChange::Delete { id, revision });
            Ok(revision)
        })
        .await
    }

    async fn campaign(&self, id: &CampaignId) -> Result<Option<Arc<Campaign>>, StoreError> {
        self.read(|view| view.get(T::Campaigns, id.as_str())?.map(|v| campaign_of(&v)).transpose())
    }

    async fn campaigns_page(&self, after: Option<&str>, limit: usize) -> Result<Vec<Arc<Campaign>>, StoreError> {
        self.read(|view| {
            let mut page = Vec::new();
            let after = after.map_or(std::ops::Bound::Unbounded, |a| std::ops::Bound::Excluded(a.as_bytes()));
            for row in view.range::<&[u8]>(T::Campaigns, (after, std::ops::Bound::Unbounded)).take(limit) {
                let (_, v) = row?;
                page.push(campaign_of(&v)?);
            }
            Ok(page)
        })
    }

    async fn all_campaigns(&self) -> Result<(u64, Vec<Arc<Campaign>>), StoreError> {
        let revision = self.memory.lock().meta.revision;
        let campaigns = self.read(|view| {
            let mut all = Vec::new();
            for row in view.iter(T::Campaigns) {
                let (_, v) = row?;
                all.push(campaign_of(&v)?);
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
        self.read(|view| Ok(counters(view, id)?.map_or_else(CampaignStats::default, |c| c.stats)))
    }
}

#[async_trait]
impl DeviceStore for EmbeddedStore {
    async fn put_device(&self, user: &UserId, device: &DeviceId, value: Device) -> Result<(), StoreError> {
        let k = key(&[user.as_str().as_bytes(), device.as_str().as_bytes()]);
        self.write(move |tx, _| {
            tx.insert(T::Devices, &k, &encode(&value));
            Ok(())
        })
        .await
    }

    async fn delete_device(&self, user: &UserId, device: &DeviceId) -> Result<bool, StoreError> {
        let k = key(&[user.as_str().as_bytes(), device.as_str().as_bytes()]);
        self.write(move |tx, _| Ok(tx.remove(T::Devices, &k)?.is_some())).await
    }

    async fn devices(&self, user: &UserId) -> Result<Vec<(DeviceId, Device)>, StoreError> {
        self.read(|view| {
            let prefix = user_prefix(user);
            let mut out = Vec::new();
            for row in view.prefix(T::Devices, &prefix) {
                let (k, v) = row?;
                out.push((device_id_of(&k, &prefix)?, decode("device", &v)?));
            }
            Ok(out)
        })
    }

    async fn erase_user(&self, user: &UserId) -> Result<(), StoreError> {
        let user = user.clone();
        self.write(move |tx, memory| {
            let prefix = user_prefix(&user);
            let keys_of = |tx: &Tx<'_, '_>, t: T| -> Result<Vec<Slice>, StoreError> {
                tx.prefix(t, &prefix).map(|row| row.map(|(k, _)| k)).collect()
            };
            let held: Vec<Row> = tx.prefix(T::Wallets, &prefix).collect::<Result<_, _>>()?;
            for k in keys_of(tx, T::Devices)? {
                tx.remove(T::Devices, &k)?;
            }
            for k in keys_of(tx, T::IssueTimes)? {
                tx.remove(T::IssueTimes, &k)?;
            }
            for (wallet, v) in held {
                let stored: StoredCoupon = decode("coupon", &v)?;
                let coupon = &stored.record.coupon;
                tx.remove(T::Coupons, coupon.coupon_id.as_str().as_bytes())?;
                if let Some(expires) = coupon.expires_at_ms {
                    tx.remove(T::Expiries, &expiry_key(expires, &coupon.coupon_id))?;
                }
                tx.remove(T::Wallets, &wallet)?;
            }
            tx.remove(T::UserStates, user.as_str().as_bytes())?;
            memory.user_states.remove(&user);
            memory.dirty.remove(&user);
            let mut pending = Vec::new();
            for row in tx.range(T::Outbox, memory.outbox_floor.to_be_bytes()..) {
                let (seq, v) = row?;
                let record: OutboxRecord = decode("outbox entry", &v)?;
                if record.entry.coupon.user_id == user {
                    pending.push(seq_key(&seq)?);
                }
            }
            for seq in pending {
                if tx.remove(T::Outbox, &seq.to_be_bytes())?.is_some() {
                    memory.outbox_len = memory.outbox_len.saturating_sub(1);
                }
                memory.leases.remove(&seq);
            }
            let mut letters = Vec::new();
            for row in tx.iter(T::DeadLetters) {
                let (seq, v) = row?;
                let letter: DeadLetter = decode("dead letter", &v)?;
                if letter.entry.coupon.user_id == user {
                    letters.push(seq_key(&seq)?);
                }
            }
            for seq in letters {
                tx.remove(T::DeadLetters, &seq.to_be_bytes())?;
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
                .write(move |tx, memory| {
                    let (slots, commits): (Vec<usize>, Vec<UserCommit>) = issuing.into_iter().unzip();
                    let mut conflicts: Vec<Option<UserCommitResult>> =
                        commits.iter().map(|c| version_conflict(memory, c)).collect();
                    let accepted: Vec<bool> = conflicts.iter().map(Option::is_none).collect();
                    let mut outcomes: Vec<Vec<Vec<IssueOutcome>>> =
                        commits.iter().map(|c| c.issues.iter().map(|_| Vec::new()).collect()).collect();
                    for (i, j) in rules::decide_in_order(&commits, &accepted) {
                        let request = &commits[i].issues[j];
                        for candidate in &request.candidates {
                            let refusal = rules::refusal(&*tx, request, candidate)?;
                            let outcome = match refusal {
                                Some(refusal) => refusal,
                                None => {
                                    record(tx, memory, &candidate.coupon)?;
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
                            tx.insert(T::UserStates, user.as_str().as_bytes(), &encode(&row));
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
        self.read(|view| {
            let prefix = user_prefix(user);
            let mut out = Vec::new();
            for row in view.prefix(T::Wallets, &prefix) {
                let (_, v) = row?;
                out.push(decode::<StoredCoupon>("coupon", &v)?.record);
            }
            Ok(out)
        })
    }

    async fn coupon(&self, id: &CouponId) -> Result<Option<CouponRecord>, StoreError> {
        self.read(|view| {
            let Some(wallet) = view.get(T::Coupons, id.as_str())? else { return Ok(None) };
            let value = view.get(T::Wallets, wallet)?;
            value.map(|v| decode::<StoredCoupon>("coupon", &v).map(|c| c.record)).transpose()
        })
    }

    async fn redeem(&self, id: &CouponId, merchant_id: &str, now_ms: i64) -> Result<CouponRecord, RedeemError> {
        let (id, merchant_id) = (id.clone(), merchant_id.to_owned());
        let outcome = self
            .write(move |tx, _| {
                let Some(wallet) = tx.get(T::Coupons, id.as_str())? else {
                    return Ok(Err(RedeemError::NotFound));
                };
                let Some(v) = tx.get(T::Wallets, &wallet)? else {
                    return Ok(Err(RedeemError::NotFound));
                };
                let mut stored: StoredCoupon = decode("coupon", &v)?;
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
                tx.insert(T::Wallets, &wallet, &encode(&stored));
                let campaign = stored.record.coupon.campaign_id.clone();
                if let Some(mut c) = counters(tx, &campaign)? {
                    if c.incarnation == stored.incarnation {
                        c.stats.redeemed += 1;
                        tx.insert(T::Counters, campaign.as_str().as_bytes(), &encode(&c));
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
        let floor = memory.outbox_floor;
        let (lowest, rows) = self.read(|view| {
            let mut due = Vec::new();
            let mut lowest = None;
            for row in view.range(T::Outbox, floor.to_be_bytes()..) {
                if due.len() >= max {
                    break;
                }
                let (seq, v) = row?;
                let seq = seq_key(&seq)?;
                // Sequences are given out in commit order and an entry gone never comes back, so
                // the first one this snapshot shows is the lowest that is left.
                lowest.get_or_insert(seq);
                if memory.leases.get(&seq).is_some_and(|&until| until > now_ms) {
                    continue;
                }
                let record: OutboxRecord = decode("outbox entry", &v)?;
                if record.due_at_ms <= now_ms {
                    due.push((seq, record.entry));
                }
            }
            Ok((lowest, due))
        })?;
        if let Some(lowest) = lowest {
            memory.outbox_floor = memory.outbox_floor.max(lowest);
        }
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
        self.write(move |tx, _| {
            let Some(v) = tx.get(T::Outbox, seq.to_be_bytes())? else { return Ok(()) };
            let mut record: OutboxRecord = decode("outbox entry", &v)?;
            drop(v);
            record.entry.attempts = attempts;
            record.due_at_ms = not_before_ms;
            let first_retry = !std::mem::replace(&mut record.retrying, true);
            tx.insert(T::Outbox, &seq.to_be_bytes(), &encode(&record));
            if first_retry {
                update_push_stats(tx, &campaign, |p| p.retrying += 1)?;
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
        self.write(move |tx, memory| {
            // Withheld from every take until the removal is committed (see outbox_take).
            memory.leases.insert(seq, i64::MAX);
            let Some(v) = tx.remove(T::Outbox, &seq.to_be_bytes())? else { return Ok(()) };
            memory.outbox_len = memory.outbox_len.saturating_sub(1);
            let record: OutboxRecord = decode("outbox entry", &v)?;
            drop(v);
            update_push_stats(tx, &entry.coupon.campaign_id, |p| {
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
                    let current = tx.get(T::Devices, &k)?.map(|v| v.to_vec());
                    if let Some(bytes) = current {
                        let device: Device = decode("device", &bytes)?;
                        if device.token == entry.device.token {
                            tx.remove(T::Devices, &k)?;
                        }
                    }
                }
                PushFinal::Failed { reason } => {
                    memory.meta.last_dead_letter += 1;
                    let n = memory.meta.last_dead_letter;
                    let letter = DeadLetter { entry: record.entry, reason, at_ms: now_ms };
                    tx.insert(T::DeadLetters, &n.to_be_bytes(), &encode(&letter));
                    if n > DEAD_LETTERS_KEPT {
                        tx.remove(T::DeadLetters, &(n - DEAD_LETTERS_KEPT).to_be_bytes())?;
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
        self.check()?;
        Ok(self.memory.lock().outbox_len)
    }

    async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, StoreError> {
        self.read(|view| {
            let mut out = Vec::new();
            for row in view.iter(T::DeadLetters).rev().take(limit) {
                let (_, v) = row?;
                out.push(decode("dead letter", &v)?);
            }
            Ok(out)
        })
    }
}

fn update_push_stats(
    tx: &mut Tx<'_, '_>,
    campaign: &CampaignId,
    change: impl FnOnce(&mut PushStats),
) -> Result<(), StoreError> {
    if let Some(mut c) = counters(tx, campaign)? {
        change(&mut c.stats.pushes);
        tx.insert(T::Counters, campaign.as_str().as_bytes(), &encode(&c));
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
        self.write(move |tx, _| {
            let kept = match tx.get(T::ProviderTokens, slot.as_str())? {
                Some(v) => Some(decode::<ProviderToken>("provider token", &v)?),
                None => None,
            };
            match kept {
                Some(kept) if !super::provider_token_due(&kept, &candidate, replace_after_ms) => Ok(kept),
                _ => {
                    tx.insert(T::ProviderTokens, slot.as_bytes(), &encode(&candidate));
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

    use super::{EmbeddedConfig, EmbeddedStore, DB_FILE, FORMAT_1_FILE};
    use crate::domain::{CampaignDoc, CampaignId, DeviceId, UserId};
    use crate::store::{contract, CampaignStore, Device, DeviceStore, IssueStore, Platform, Store, UserCommitResult};

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

    #[tokio::test]
    async fn states_past_their_keep_time_leave_memory_and_disk_by_the_checkpoints_sweep() {
        use crate::store::UserCommit;
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let rows = |store: &EmbeddedStore| store.read(|view| Ok(view.iter(super::T::UserStates).count())).unwrap();
        let commit = |user: UserId, keep_for_ms: i64| UserCommit {
            user_id: user,
            expected_version: 0,
            new_state: Some(vec![1, 2, 3]),
            new_version: 7,
            keep_for_ms,
            issues: Vec::new(),
        };
        let users: Vec<UserId> = (0..300).map(|k| UserId::parse("user_id", &format!("sweep-{k}")).unwrap()).collect();
        let staying = UserId::parse("user_id", "sweep-stays").unwrap();
        let mut commits: Vec<UserCommit> = users.iter().map(|u| commit(u.clone(), 300)).collect();
        commits.push(commit(staying.clone(), 3_600_000));
        store.commit(commits).await.unwrap();
        store.checkpoint().await.unwrap();
        assert_eq!(rows(&store), 301, "every state written by the checkpoint");
        tokio::time::sleep(std::time::Duration::from_millis(400)).await;
        // Nobody pinged again, so none is dirty: the sweep, a map per checkpoint, finds them.
        for _ in 0..super::super::HELD_STATE_SHARDS {
            store.checkpoint().await.unwrap();
        }
        assert_eq!(rows(&store), 1, "the expired states' rows are gone, the live one stays");
        let held = store.load_user_states(&[users[0].clone(), staying]).await.unwrap();
        assert!(held[0].is_none() && held[1].is_some());
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
            let commit = contract::commit_of(user.as_str(), 0, Some(b"stays"), 7);
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

    /// Why opening `dir` is refused, as the operator reads it (the store's background tasks
    /// need a runtime to start in, had it opened).
    fn refusal(dir: &std::path::Path) -> String {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let _guard = rt.enter();
        EmbeddedStore::open(EmbeddedConfig::new(dir)).unwrap_err().to_string()
    }

    #[test]
    fn an_unknown_or_damaged_file_is_refused_never_emptied() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(DB_FILE), b"not a database at all, but somebody's data").unwrap();
        let err = refusal(dir.path());
        assert!(err.contains(DB_FILE), "{err}");
        assert_eq!(std::fs::read(dir.path().join(DB_FILE)).unwrap(), b"not a database at all, but somebody's data");
    }

    #[test]
    fn a_directory_in_place_of_the_database_that_fjall_did_not_write_is_refused_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join(DB_FILE);
        std::fs::create_dir(&db).unwrap();
        std::fs::write(db.join("notes.txt"), b"somebody's notes").unwrap();
        let err = refusal(dir.path());
        assert!(err.contains(DB_FILE) && err.contains("not a kabao database"), "{err}");
        let left: Vec<_> = std::fs::read_dir(&db).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(left, vec![std::ffi::OsString::from("notes.txt")]);
    }

    #[test]
    fn an_earlier_kabaos_redb_file_is_refused_naming_it_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(FORMAT_1_FILE), b"redb pages of an earlier kabao").unwrap();
        let err = refusal(dir.path());
        assert!(err.contains(FORMAT_1_FILE) && err.contains("format 1"), "{err}");
        assert_eq!(std::fs::read(dir.path().join(FORMAT_1_FILE)).unwrap(), b"redb pages of an earlier kabao");
        // Nothing was created beside it.
        assert!(!dir.path().join(DB_FILE).exists());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_database_of_another_format_is_refused_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = open(dir.path());
            store.insert_campaign(campaign("c")).await.unwrap();
            store
                .write(|tx, _| {
                    tx.insert(super::T::Meta, b"format", b"3");
                    Ok(())
                })
                .await
                .unwrap();
        }
        let err = loop {
            match EmbeddedStore::open(EmbeddedConfig::new(dir.path())) {
                Err(e) if e.to_string().contains("in use") => {
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await
                }
                Err(e) => break e.to_string(),
                Ok(_) => panic!("a database of format 3 opened"),
            }
        };
        assert!(err.contains(DB_FILE) && err.contains("format 3"), "{err}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_snapshot_taken_while_serving_opens_as_the_store_was() {
        let (dir, copy) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let store = open(dir.path());
        let dyn_store: Arc<dyn Store> = store.clone();
        let user = UserId::parse("u", "sn-u").unwrap();
        store.insert_campaign(campaign("c")).await.unwrap();
        let device = Device { platform: Platform::Fcm, token: "tok".into(), tags: Vec::new(), locale: None };
        store.put_device(&user, &DeviceId::parse("d", "phone").unwrap(), device).await.unwrap();
        let issued =
            contract::issue_one(&dyn_store, contract::candidate("sn-a", "sn-u", 1_700_000_000_000, Default::default()));
        assert_eq!(issued.await, crate::store::IssueOutcome::Issued);
        // A stay that issued nothing: in memory only until a checkpoint, which the snapshot takes.
        let quiet = UserId::parse("u", "sn-quiet").unwrap();
        let commit = contract::commit_of(quiet.as_str(), 0, Some(b"stays"), 3);
        assert!(matches!(store.commit(vec![commit]).await.unwrap()[0], UserCommitResult::Committed { .. }));

        let dest = copy.path().join("kabao-data");
        let copied = store.snapshot_into(&dest).await.unwrap();
        assert!(copied > 0);
        let refused = store.snapshot_into(&dest).await.unwrap_err().to_string();
        assert!(refused.contains("not empty"), "{refused}");
        // Written after the snapshot: not in it.
        store.insert_campaign(campaign("later")).await.unwrap();

        let restored = open(&dest);
        let (_, campaigns) = restored.all_campaigns().await.unwrap();
        assert_eq!(campaigns.iter().map(|c| c.id.as_str().to_owned()).collect::<Vec<_>>(), vec!["c".to_owned()]);
        assert_eq!(restored.wallet(&user).await.unwrap().len(), 1);
        assert_eq!(restored.devices(&user).await.unwrap().len(), 1);
        assert_eq!(crate::store::OutboxStore::outbox_len(&*restored).await.unwrap(), 1);
        let states = restored.load_user_states(std::slice::from_ref(&quiet)).await.unwrap();
        assert_eq!(states[0].as_ref().map(|r| (r.version, r.bytes.clone())), Some((3, b"stays".to_vec())));
        restored.health().await.unwrap();
        assert_eq!(std::fs::read_to_string(dest.join(super::IDENTITY_FILE)).unwrap().trim(), store.identity);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_outbox_count_follows_issues_erasures_and_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let dyn_store: Arc<dyn Store> = store.clone();
        let user = UserId::parse("u", "ob-u").unwrap();
        let device = Device { platform: Platform::Apns, token: "tok".into(), tags: Vec::new(), locale: None };
        store.put_device(&user, &DeviceId::parse("d", "phone").unwrap(), device).await.unwrap();
        let t = 1_700_000_000_000;
        let issued = contract::issue_one(&dyn_store, contract::candidate("ob-a", "ob-u", t, Default::default())).await;
        assert_eq!(issued, crate::store::IssueOutcome::Issued);
        assert_eq!(crate::store::OutboxStore::outbox_len(&*store).await.unwrap(), 1);
        drop(store);
        drop(dyn_store);
        // Counted again from disk at the next start.
        let store = reopen(dir.path()).await;
        assert_eq!(crate::store::OutboxStore::outbox_len(&*store).await.unwrap(), 1);
        store.erase_user(&user).await.unwrap();
        assert_eq!(crate::store::OutboxStore::outbox_len(&*store).await.unwrap(), 0);
    }
}
