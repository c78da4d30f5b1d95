//! Issuance throughput of the stores, in one run so the ratios hold:
//!
//! - the in-memory store (the baseline), the embedded store (fjall, durable, group commit), both
//!   through the real `IssueStore::commit` with 64 concurrent requests of one issuing user each;
//! - kabao's write pattern on redb, fjall and SQLite alone (what choosing the embedded database was
//!   measured on), with random user and coupon keys as real traffic has them: per coupon, the
//!   campaign's counters and the user's issue times read and rewritten, a 300-byte coupon, its
//!   wallet and expiry keys, a 400-byte outbox entry, an 80-byte trigger state, and a read of the
//!   user's devices; 1, 16, 64 and 256 coupons a transaction, fsync on every commit (redb
//!   `Durability::Immediate`, fjall `persist(PersistMode::SyncAll)` after the commit, SQLite WAL
//!   with `synchronous = FULL`).
//!
//! `cargo bench --bench store` (add `-- --quick` for a short run). Prints a table.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kabao::domain::{CampaignId, Caps, CouponId, FenceId, UserId};
use kabao::store::embedded::{EmbeddedConfig, EmbeddedStore};
use kabao::store::memory::MemoryStore;
use kabao::store::{IssueCandidate, IssueRequest, IssuedCoupon, Store, UserCommit};
use redb::{Database, Durability, ReadableTable, TableDefinition};

const T: i64 = 1_700_000_000_000;
const CONCURRENCY: usize = 64;

fn coupon(user: &UserId, campaign: &CampaignId, ts_ms: i64) -> IssuedCoupon {
    IssuedCoupon {
        coupon_id: CouponId::derive(campaign, user, ts_ms),
        user_id: user.clone(),
        campaign_id: campaign.clone(),
        fence_id: FenceId::parse("f", "store-0042").unwrap(),
        merchant_id: Some("meiyijia".into()),
        title: "20% off coffee".into(),
        body: Some("Show this at the counter".into()),
        deep_link: None,
        image_url: None,
        issued_at_ms: ts_ms,
        expires_at_ms: Some(ts_ms + 86_400_000),
    }
}

/// One request of one user whose ping issues one coupon (and writes its trigger state).
fn commit_for(n: usize) -> UserCommit {
    let user = UserId::parse("u", &format!("user-{n}")).unwrap();
    let campaign = CampaignId::parse("c", "coffee").unwrap();
    let ts_ms = T + n as i64;
    UserCommit {
        user_id: user.clone(),
        expected_version: 0,
        new_state: Some(vec![1; 60]),
        new_version: n as u64 + 1,
        keep_for_ms: 3_600_000,
        issues: vec![IssueRequest {
            user_id: user.clone(),
            ts_ms,
            seq: 0,
            daily_cap: 10,
            candidates: vec![IssueCandidate {
                coupon: coupon(&user, &campaign, ts_ms),
                caps: Caps::default(),
                audience_tags: Arc::from(Vec::new()),
            }],
        }],
    }
}

/// Coupons per second issued through `store` by `CONCURRENCY` concurrent requests.
async fn issuance(store: Arc<dyn Store>, coupons: usize) -> f64 {
    let started = Instant::now();
    let per_task = coupons / CONCURRENCY;
    let tasks: Vec<_> = (0..CONCURRENCY)
        .map(|t| {
            let store = store.clone();
            tokio::spawn(async move {
                for i in 0..per_task {
                    store.commit(vec![commit_for(t * per_task + i)]).await.expect("commit");
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    (per_task * CONCURRENCY) as f64 / started.elapsed().as_secs_f64()
}

/// One coupon of kabao's write pattern: random user and coupon keys, as real traffic writes them
/// (a sequential key only ever appends to the right edge of a B-tree, which flatters it).
struct PatternCoupon {
    user: Vec<u8>,
    campaign: Vec<u8>,
    coupon: Vec<u8>,
    issued_at: [u8; 8],
}

fn pattern_coupons(coupons: usize) -> Vec<PatternCoupon> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    (0..coupons)
        .map(|n| PatternCoupon {
            user: format!("user-{:016x}", rng.gen::<u64>()).into_bytes(),
            campaign: format!("campaign-{}", rng.gen_range(0..8)).into_bytes(),
            coupon: format!("cp_{:032x}", rng.gen::<u128>()).into_bytes(),
            issued_at: (T + n as i64).to_be_bytes(),
        })
        .collect()
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

/// The end of a prefix scan: `prefix` followed by 0xFF bytes.
fn after(prefix: &[u8]) -> Vec<u8> {
    cat(&[prefix, &[0xFF; 4]])
}

const COUNTERS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("counters");
const ISSUE_TIMES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("issue_times");
const COUPONS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("coupons");
const WALLETS: TableDefinition<&[u8], ()> = TableDefinition::new("wallets");
const EXPIRIES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("expiries");
const OUTBOX: TableDefinition<u64, &[u8]> = TableDefinition::new("outbox");
const USER_STATES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("user_states");
const DEVICES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("devices");

/// kabao's write pattern (per coupon: the campaign's counters and the user's issue times read and
/// written, a 300-byte coupon, its wallet and expiry keys, a 400-byte outbox entry, an 80-byte
/// trigger state, the user's devices read) on redb alone, `Durability::Immediate`: coupons/s.
fn redb_pattern(dir: &std::path::Path, coupons: usize, per_txn: usize) -> f64 {
    let db = Database::create(dir.join("pattern.redb")).unwrap();
    let work = pattern_coupons(coupons);
    let (coupon_row, outbox_row, state_row) = (vec![b'c'; 300], vec![b'o'; 400], vec![b's'; 80]);
    let started = Instant::now();
    let mut seq = 0u64;
    for chunk in work.chunks(per_txn) {
        let mut txn = db.begin_write().unwrap();
        txn.set_durability(Durability::Immediate);
        {
            let mut counters = txn.open_table(COUNTERS).unwrap();
            let mut issue_times = txn.open_table(ISSUE_TIMES).unwrap();
            let mut coupons = txn.open_table(COUPONS).unwrap();
            let mut wallets = txn.open_table(WALLETS).unwrap();
            let mut expiries = txn.open_table(EXPIRIES).unwrap();
            let mut outbox = txn.open_table(OUTBOX).unwrap();
            let mut states = txn.open_table(USER_STATES).unwrap();
            let devices = txn.open_table(DEVICES).unwrap();
            for c in chunk {
                let issued = counters.get(c.campaign.as_slice()).unwrap().map_or(0, |v| v.value().len());
                counters.insert(c.campaign.as_slice(), vec![b'k'; 48 + issued % 2].as_slice()).unwrap();
                let times_key = cat(&[&c.user, &c.campaign]);
                let mut times =
                    issue_times.get(times_key.as_slice()).unwrap().map_or(Vec::new(), |v| v.value().to_vec());
                times.extend_from_slice(&c.issued_at);
                issue_times.insert(times_key.as_slice(), times.as_slice()).unwrap();
                coupons.insert(c.coupon.as_slice(), coupon_row.as_slice()).unwrap();
                wallets.insert(cat(&[&c.user, &c.issued_at, &c.coupon]).as_slice(), ()).unwrap();
                expiries.insert(cat(&[&c.issued_at, &c.coupon]).as_slice(), c.user.as_slice()).unwrap();
                seq += 1;
                outbox.insert(seq, outbox_row.as_slice()).unwrap();
                states.insert(c.user.as_slice(), state_row.as_slice()).unwrap();
                let end = after(&c.user);
                assert_eq!(devices.range(c.user.as_slice()..end.as_slice()).unwrap().count(), 0);
            }
        }
        txn.commit().unwrap();
    }
    work.len() as f64 / started.elapsed().as_secs_f64()
}

/// The same pattern on fjall (`SingleWriterTxDatabase`, one write transaction, then
/// `persist(PersistMode::SyncAll)`: one fsync of the journal per transaction): coupons/s.
fn fjall_pattern(dir: &std::path::Path, coupons: usize, per_txn: usize) -> f64 {
    use fjall::{KeyspaceCreateOptions, PersistMode, Readable, SingleWriterTxDatabase};
    let db = SingleWriterTxDatabase::builder(dir.join("pattern.fjall")).open().unwrap();
    let ks = |name: &str| db.keyspace(name, KeyspaceCreateOptions::default).unwrap();
    let (counters, issue_times, coupons_ks, wallets) =
        (ks("counters"), ks("issue_times"), ks("coupons"), ks("wallets"));
    let (expiries, outbox, states, devices) = (ks("expiries"), ks("outbox"), ks("user_states"), ks("devices"));
    let work = pattern_coupons(coupons);
    let (coupon_row, outbox_row, state_row) = (vec![b'c'; 300], vec![b'o'; 400], vec![b's'; 80]);
    let started = Instant::now();
    let mut seq = 0u64;
    for chunk in work.chunks(per_txn) {
        let mut txn = db.write_tx();
        for c in chunk {
            let issued = txn.get(&counters, &c.campaign).unwrap().map_or(0, |v| v.len());
            txn.insert(&counters, c.campaign.as_slice(), vec![b'k'; 48 + issued % 2]);
            let times_key = cat(&[&c.user, &c.campaign]);
            let mut times = txn.get(&issue_times, &times_key).unwrap().map_or(Vec::new(), |v| v.to_vec());
            times.extend_from_slice(&c.issued_at);
            txn.insert(&issue_times, times_key, times);
            txn.insert(&coupons_ks, c.coupon.as_slice(), coupon_row.as_slice());
            txn.insert(&wallets, cat(&[&c.user, &c.issued_at, &c.coupon]), b"".as_slice());
            txn.insert(&expiries, cat(&[&c.issued_at, &c.coupon]), c.user.as_slice());
            seq += 1;
            txn.insert(&outbox, seq.to_be_bytes(), outbox_row.as_slice());
            txn.insert(&states, c.user.as_slice(), state_row.as_slice());
            assert_eq!(txn.prefix(&devices, &c.user).count(), 0);
        }
        txn.commit().unwrap();
        db.persist(PersistMode::SyncAll).unwrap();
    }
    work.len() as f64 / started.elapsed().as_secs_f64()
}

/// The same pattern on SQLite (WAL, synchronous = FULL): coupons/s.
fn sqlite_pattern(dir: &std::path::Path, coupons: usize, per_txn: usize) -> f64 {
    let mut db = rusqlite::Connection::open(dir.join("pattern.sqlite")).unwrap();
    db.execute_batch(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL;
         CREATE TABLE counters (k BLOB PRIMARY KEY, v BLOB) WITHOUT ROWID;
         CREATE TABLE issue_times (k BLOB PRIMARY KEY, v BLOB) WITHOUT ROWID;
         CREATE TABLE coupons (k BLOB PRIMARY KEY, v BLOB) WITHOUT ROWID;
         CREATE TABLE wallets (k BLOB PRIMARY KEY) WITHOUT ROWID;
         CREATE TABLE expiries (k BLOB PRIMARY KEY, v BLOB) WITHOUT ROWID;
         CREATE TABLE outbox (seq INTEGER PRIMARY KEY, v BLOB);
         CREATE TABLE user_states (k BLOB PRIMARY KEY, v BLOB) WITHOUT ROWID;
         CREATE TABLE devices (k BLOB PRIMARY KEY, v BLOB) WITHOUT ROWID;",
    )
    .unwrap();
    let work = pattern_coupons(coupons);
    let (coupon_row, outbox_row, state_row) = (vec![b'c'; 300], vec![b'o'; 400], vec![b's'; 80]);
    let started = Instant::now();
    let mut seq = 0i64;
    for chunk in work.chunks(per_txn) {
        let txn = db.transaction().unwrap();
        {
            let mut get_counter = txn.prepare_cached("SELECT v FROM counters WHERE k = ?1").unwrap();
            let mut put_counter = txn.prepare_cached("INSERT OR REPLACE INTO counters VALUES (?1, ?2)").unwrap();
            let mut get_times = txn.prepare_cached("SELECT v FROM issue_times WHERE k = ?1").unwrap();
            let mut put_times = txn.prepare_cached("INSERT OR REPLACE INTO issue_times VALUES (?1, ?2)").unwrap();
            let mut put_coupon = txn.prepare_cached("INSERT INTO coupons VALUES (?1, ?2)").unwrap();
            let mut put_wallet = txn.prepare_cached("INSERT INTO wallets VALUES (?1)").unwrap();
            let mut put_expiry = txn.prepare_cached("INSERT INTO expiries VALUES (?1, ?2)").unwrap();
            let mut put_outbox = txn.prepare_cached("INSERT INTO outbox VALUES (?1, ?2)").unwrap();
            let mut put_state = txn.prepare_cached("INSERT OR REPLACE INTO user_states VALUES (?1, ?2)").unwrap();
            let mut devices = txn.prepare_cached("SELECT k FROM devices WHERE k >= ?1 AND k < ?2").unwrap();
            for c in chunk {
                use rusqlite::{params, OptionalExtension};
                let issued: Option<Vec<u8>> =
                    get_counter.query_row(params![c.campaign], |r| r.get(0)).optional().unwrap();
                put_counter.execute(params![c.campaign, vec![b'k'; 48 + issued.map_or(0, |v| v.len()) % 2]]).unwrap();
                let times_key = cat(&[&c.user, &c.campaign]);
                let mut times: Vec<u8> =
                    get_times.query_row(params![times_key], |r| r.get(0)).optional().unwrap().unwrap_or_default();
                times.extend_from_slice(&c.issued_at);
                put_times.execute(params![times_key, times]).unwrap();
                put_coupon.execute(params![c.coupon, coupon_row]).unwrap();
                put_wallet.execute(params![cat(&[&c.user, &c.issued_at, &c.coupon])]).unwrap();
                put_expiry.execute(params![cat(&[&c.issued_at, &c.coupon]), c.user]).unwrap();
                seq += 1;
                put_outbox.execute(params![seq, outbox_row]).unwrap();
                put_state.execute(params![c.user, state_row]).unwrap();
                assert_eq!(devices.query_map(params![c.user, after(&c.user)], |_| Ok(())).unwrap().count(), 0);
            }
        }
        txn.commit().unwrap();
    }
    work.len() as f64 / started.elapsed().as_secs_f64()
}

/// Pings/s through `Engine::ingest` in batches of 500 users, every ping inside a fence of a
/// paused campaign: trigger state changes (stays open and close) but nothing issues.
async fn ingest_without_issuing(store: Arc<dyn Store>, batches: usize) -> f64 {
    use kabao::domain::{Circle, Fence, LatLon, Ping, Shape, Status};
    use kabao::engine::{Engine, EngineConfig};
    let fences: Vec<Fence> = (0..10_000)
        .map(|i| Fence {
            id: FenceId::parse("f", &format!("f{i}")).unwrap(),
            shape: Shape::Circle(Circle {
                center: LatLon::new(22.0 + (i / 100) as f64 * 0.01, 113.0 + (i % 100) as f64 * 0.01).unwrap(),
                radius_m: 300.0,
            }),
            rings: None,
        })
        .collect();
    let campaign = kabao::domain::Campaign {
        status: Status::Paused,
        ..kabao::domain::Campaign::new(CampaignId::parse("c", "paused").unwrap(), "t", fences)
    };
    store.insert_campaign(campaign).await.unwrap();
    let engine = Engine::start(store, EngineConfig { max_speed_mps: 0.0, ..EngineConfig::default() }).await.unwrap();
    let now = kabao::engine::now_ms();
    let started = Instant::now();
    let tasks: Vec<_> = (0..2)
        .map(|t| {
            let engine = engine.clone();
            tokio::spawn(async move {
                for b in 0..batches / 2 {
                    let pings: Vec<Ping> = (0..500)
                        .map(|u| {
                            let i = (u * 7 + b) % 10_000;
                            // Inside a fence on even batches, between fences on odd ones.
                            let shift = if b % 2 == 0 { 0.0 } else { 0.005 };
                            Ping {
                                user_id: UserId::parse("u", &format!("t{t}-u{u}")).unwrap(),
                                at: LatLon::new(
                                    22.0 + (i / 100) as f64 * 0.01 + shift,
                                    113.0 + (i % 100) as f64 * 0.01,
                                )
                                .unwrap(),
                                ts_ms: now - 3_600_000 + b as i64 * 1000,
                                accuracy_m: None,
                                speed_mps: None,
                                mocked: false,
                            }
                        })
                        .collect();
                    let report = engine.ingest(pings).await.unwrap();
                    assert!(report.events.is_empty() && report.ignored.is_empty());
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    (batches / 2 * 2 * 500) as f64 / started.elapsed().as_secs_f64()
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let coupons = if quick { 20_000 } else { 100_000 };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let dir = tempfile::tempdir().unwrap();

    let memory = rt.block_on(issuance(Arc::new(MemoryStore::new()), coupons));
    let embedded = rt.block_on(async {
        let config = EmbeddedConfig {
            checkpoint_interval: Duration::from_secs(1),
            ..EmbeddedConfig::new(dir.path().join("kabao"))
        };
        issuance(EmbeddedStore::open(config).unwrap(), coupons).await
    });
    // Each database on the same random keys: 1 coupon per fsync (a twentieth of the coupons), 16,
    // 64 and 256 (what group commit batches under load).
    type Pattern = fn(&std::path::Path, usize, usize) -> f64;
    let databases: [(&str, Pattern); 3] = [
        ("redb (`Durability::Immediate`)", redb_pattern),
        ("fjall (`SingleWriterTxDatabase`, `persist(SyncAll)`)", fjall_pattern),
        ("SQLite (WAL, synchronous=FULL)", sqlite_pattern),
    ];
    let mut patterns = Vec::new();
    for (name, pattern) in databases {
        for per_txn in [1, 16, 64, 256] {
            let n = if per_txn == 1 { coupons / 20 } else { coupons };
            patterns.push((name, per_txn, pattern(tempfile::tempdir().unwrap().path(), n, per_txn)));
        }
    }

    let batches = if quick { 200 } else { 1000 };
    let ingest_memory = rt.block_on(ingest_without_issuing(Arc::new(MemoryStore::new()), batches));
    let ingest_embedded = rt.block_on(async {
        ingest_without_issuing(EmbeddedStore::open(EmbeddedConfig::new(dir.path().join("ingest"))).unwrap(), batches)
            .await
    });
    println!("| ingest, pings that issue nothing (`Engine::ingest`, batches of 500) | pings/s | vs in-memory |");
    println!("| --- | ---: | ---: |");
    println!("| in-memory store (baseline) | {ingest_memory:.0} | 1.000× |");
    println!("| embedded store | {ingest_embedded:.0} | {:.3}× |", ingest_embedded / ingest_memory);
    println!();
    println!("| what | coupons/s | vs in-memory |");
    println!("| --- | ---: | ---: |");
    let row = |what: &str, rate: f64| println!("| {what} | {rate:.0} | {:.3}× |", rate / memory);
    row("in-memory store, `commit` (baseline)", memory);
    row(&format!("embedded store (fjall), `commit`, {CONCURRENCY} concurrent requests, group commit"), embedded);
    for (name, per_txn, rate) in patterns {
        let per = if per_txn == 1 { "1 coupon".to_owned() } else { format!("{per_txn} coupons") };
        row(&format!("{name} alone, kabao's write pattern, random keys, {per} per fsync"), rate);
    }
}
