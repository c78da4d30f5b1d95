//! Issuance throughput of the stores, in one run so the ratios hold:
//!
//! - the in-memory store (the baseline), the embedded store (redb, durable, group commit), both
//!   through the real `IssueStore::commit` with 64 concurrent requests of one issuing user each;
//! - kabao's write pattern on redb and on SQLite alone (what choosing the embedded database was
//!   measured on): per coupon, one coupon row, one wallet row, a counter update and one outbox row,
//!   64 coupons a transaction, fsync on every commit (redb `Durability::Immediate`, SQLite WAL with
//!   `synchronous = FULL`).
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

const COUPONS: TableDefinition<&str, &[u8]> = TableDefinition::new("coupons");
const WALLETS: TableDefinition<&[u8], ()> = TableDefinition::new("wallets");
const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("counters");
const OUTBOX: TableDefinition<u64, &[u8]> = TableDefinition::new("outbox");

/// kabao's write pattern on redb alone: coupons/s.
fn redb_pattern(dir: &std::path::Path, coupons: usize, per_txn: usize) -> f64 {
    let db = Database::create(dir.join("pattern.redb")).unwrap();
    let record = vec![b'x'; 400];
    let started = Instant::now();
    let mut n = 0;
    while n < coupons {
        let mut txn = db.begin_write().unwrap();
        txn.set_durability(Durability::Immediate);
        {
            let mut c = txn.open_table(COUPONS).unwrap();
            let mut w = txn.open_table(WALLETS).unwrap();
            let mut k = txn.open_table(COUNTERS).unwrap();
            let mut o = txn.open_table(OUTBOX).unwrap();
            for _ in 0..per_txn {
                let id = format!("cp_{n:016x}");
                c.insert(id.as_str(), record.as_slice()).unwrap();
                w.insert(format!("user-{n}/{id}").as_bytes(), ()).unwrap();
                let issued = k.get("coffee").unwrap().map_or(0, |v| v.value());
                k.insert("coffee", issued + 1).unwrap();
                o.insert(n as u64, record.as_slice()).unwrap();
                n += 1;
            }
        }
        txn.commit().unwrap();
    }
    n as f64 / started.elapsed().as_secs_f64()
}

/// The same pattern on SQLite (WAL, synchronous = FULL): coupons/s.
fn sqlite_pattern(dir: &std::path::Path, coupons: usize, per_txn: usize) -> f64 {
    let mut db = rusqlite::Connection::open(dir.join("pattern.sqlite")).unwrap();
    db.execute_batch(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL;
         CREATE TABLE coupons (id TEXT PRIMARY KEY, record BLOB) WITHOUT ROWID;
         CREATE TABLE wallets (key BLOB PRIMARY KEY) WITHOUT ROWID;
         CREATE TABLE counters (campaign TEXT PRIMARY KEY, issued INTEGER) WITHOUT ROWID;
         CREATE TABLE outbox (seq INTEGER PRIMARY KEY, entry BLOB);",
    )
    .unwrap();
    let record = vec![b'x'; 400];
    let started = Instant::now();
    let mut n = 0;
    while n < coupons {
        let txn = db.transaction().unwrap();
        {
            let mut c = txn.prepare_cached("INSERT INTO coupons VALUES (?1, ?2)").unwrap();
            let mut w = txn.prepare_cached("INSERT INTO wallets VALUES (?1)").unwrap();
            let mut k = txn
                .prepare_cached(
                    "INSERT INTO counters VALUES ('coffee', 1) ON CONFLICT(campaign) DO UPDATE SET issued = issued + 1",
                )
                .unwrap();
            let mut o = txn.prepare_cached("INSERT INTO outbox VALUES (?1, ?2)").unwrap();
            for _ in 0..per_txn {
                let id = format!("cp_{n:016x}");
                c.execute(rusqlite::params![id, record]).unwrap();
                w.execute(rusqlite::params![format!("user-{n}/{id}").into_bytes()]).unwrap();
                k.execute([]).unwrap();
                o.execute(rusqlite::params![n as i64, record]).unwrap();
                n += 1;
            }
        }
        txn.commit().unwrap();
    }
    n as f64 / started.elapsed().as_secs_f64()
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
    let redb_1 = redb_pattern(tempfile::tempdir().unwrap().path(), coupons / 20, 1);
    let redb_64 = redb_pattern(tempfile::tempdir().unwrap().path(), coupons, 64);
    let sqlite_1 = sqlite_pattern(tempfile::tempdir().unwrap().path(), coupons / 20, 1);
    let sqlite_64 = sqlite_pattern(tempfile::tempdir().unwrap().path(), coupons, 64);

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
    row(&format!("embedded store (redb), `commit`, {CONCURRENCY} concurrent requests, group commit"), embedded);
    row("redb alone, kabao's write pattern, 1 coupon per fsync", redb_1);
    row("redb alone, kabao's write pattern, 64 coupons per fsync", redb_64);
    row("SQLite (WAL, synchronous=FULL), 1 coupon per fsync", sqlite_1);
    row("SQLite (WAL, synchronous=FULL), 64 coupons per fsync", sqlite_64);
}
