//! Issuance and ingest through the Redis store on loopback, against the embedded store (one
//! durable node, issue 6 item 6's baseline) and the in-memory store in the same run. A plain program, not criterion: each case runs for a fixed amount
//! of work and prints throughput and the Redis round trips it made.
//!
//! `cargo bench --bench redis_store` (needs `redis-server`; results: BENCHMARKS.md); `-- --store-only`
//! runs the store issuance cases alone.
//!
//! - **store issuance**: `IssueStore::commit` of requests of 500 users with one candidate each
//!   (every candidate issues: fresh users), 4 requests in flight.
//! - **HTTP batches**: `POST /v1/pings` with 500 pings of 500 users entering a fence, against two
//!   nodes on one Redis (round-robin) and one node on each of the embedded and memory stores,
//!   8 clients.
//! - **HTTP batches, nothing issued**: the same, 500 of 5 000 users moving outside the fence
//!   (every ping applied, its state committed).
//! - **HTTP single pings**: one ping per request, 64 clients; sticky (a user always on the same
//!   node) and round-robin, with round trips per request.

#![allow(missing_docs)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kabao::app::Application;
use kabao::config::Config;
use kabao::domain::{CampaignId, Caps, CouponId, FenceId, UserId};
use kabao::store::embedded::{EmbeddedConfig, EmbeddedStore};
use kabao::store::memory::MemoryStore;
use kabao::store::redis::test_server::RedisServer;
use kabao::store::redis::RedisStore;
use kabao::store::{IssueCandidate, IssueRequest, IssuedCoupon, Store, UserCommit};
use serde_json::json;

const ADMIN: &str = "bench-admin";
const USERS_PER_REQUEST: usize = 500;

fn now_ms() -> i64 {
    kabao::engine::now_ms()
}

fn commit_of(request: usize, user: usize, ts: i64) -> UserCommit {
    let user_id = UserId::parse("u", &format!("b{request}-{user}")).unwrap();
    let campaign_id = CampaignId::parse("c", "bench").unwrap();
    let coupon = IssuedCoupon {
        coupon_id: CouponId::derive(&campaign_id, &user_id, ts),
        user_id: user_id.clone(),
        campaign_id,
        fence_id: FenceId::parse("f", "f").unwrap(),
        merchant_id: Some("m".into()),
        title: "20% off".into(),
        body: Some("at the counter".into()),
        deep_link: None,
        image_url: None,
        issued_at_ms: ts,
        expires_at_ms: Some(ts + 86_400_000),
    };
    UserCommit {
        user_id: user_id.clone(),
        expected_version: 0,
        new_state: Some(vec![7; 48]),
        new_version: rand::random::<u64>() | 1,
        keep_for_ms: 3_600_000,
        issues: vec![IssueRequest {
            user_id,
            ts_ms: ts,
            seq: 0,
            daily_cap: 10,
            candidates: vec![IssueCandidate {
                coupon,
                caps: Caps { per_user_cooldown_s: 600, per_user_max: 5, total_max: 0 },
                audience_tags: Arc::from(Vec::new()),
            }],
        }],
    }
}

async fn store_issuance(name: &str, store: Arc<dyn Store>, requests: usize) -> f64 {
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let workers: Vec<_> = (0..4)
        .map(|_| {
            let (store, next) = (store.clone(), next.clone());
            tokio::spawn(async move {
                loop {
                    let r = next.fetch_add(1, Ordering::Relaxed);
                    if r >= requests {
                        break;
                    }
                    let ts = now_ms() - 60_000;
                    let commits = (0..USERS_PER_REQUEST).map(|u| commit_of(r, u, ts)).collect();
                    store.commit(commits).await.expect("commit");
                }
            })
        })
        .collect();
    for w in workers {
        w.await.unwrap();
    }
    let coupons = (requests * USERS_PER_REQUEST) as f64;
    let rate = coupons / start.elapsed().as_secs_f64();
    println!("store issuance, {name}: {coupons} coupons in {:.2?} = {rate:.0} coupons/s", start.elapsed());
    rate
}

async fn node(store: Arc<dyn Store>) -> String {
    let mut config = Config::for_tests(ADMIN, "bench-secret");
    config.http.max_in_flight = 4096;
    let app = Application::build_with_store(config, store).await.expect("server");
    let base = format!("http://127.0.0.1:{}", app.port());
    tokio::spawn(app.run_until_stopped(std::future::pending()));
    base
}

async fn create_campaign(http: &reqwest::Client, base: &str) {
    let campaign = json!({
        "id": "bench", "coupon": {"title": "20% off", "valid_for_s": 86400},
        "fences": [{"id": "f", "type": "circle", "center": [114.0579, 22.5431], "radius_m": 150}],
    });
    let r = http.post(format!("{base}/v1/campaigns")).bearer_auth(ADMIN).json(&campaign).send().await.unwrap();
    assert!(r.status().is_success(), "{}", r.text().await.unwrap());
}

/// Posts `requests` bodies made by `body(i)` to `bases` (request i to `route(i)`), `clients` at once.
async fn drive(
    bases: Arc<Vec<String>>,
    requests: usize,
    clients: usize,
    body: Arc<dyn Fn(usize) -> serde_json::Value + Send + Sync>,
    route: Arc<dyn Fn(usize) -> usize + Send + Sync>,
) -> Duration {
    let http = reqwest::Client::builder().pool_max_idle_per_host(clients).build().unwrap();
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let workers: Vec<_> = (0..clients)
        .map(|_| {
            let (http, next, bases, body, route) =
                (http.clone(), next.clone(), bases.clone(), body.clone(), route.clone());
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= requests {
                        break;
                    }
                    let base = &bases[route(i) % bases.len()];
                    let r =
                        http.post(format!("{base}/v1/pings")).bearer_auth(ADMIN).json(&body(i)).send().await.unwrap();
                    assert!(r.status().is_success(), "{}", r.status());
                }
            })
        })
        .collect();
    for w in workers {
        w.await.unwrap();
    }
    start.elapsed()
}

fn batch_body(tag: &'static str) -> Arc<dyn Fn(usize) -> serde_json::Value + Send + Sync> {
    let ts = now_ms() - 60_000;
    Arc::new(move |i| {
        let pings: Vec<_> = (0..USERS_PER_REQUEST)
            .map(|u| json!({"user_id": format!("{tag}{i}-{u}"), "lat": 22.5431, "lon": 114.0579, "ts_ms": ts}))
            .collect();
        json!({ "pings": pings })
    })
}

/// Batches of 500 pings of 5 000 users (ten groups of 500, request i is group i % 10's
/// (i / 10)-th step) moving between two places outside the fence: every ping applied and its
/// state committed, nothing issued — the ingest path without issuance.
fn moving_batch_body(tag: &'static str) -> Arc<dyn Fn(usize) -> serde_json::Value + Send + Sync> {
    let t0 = now_ms() - 3_600_000;
    Arc::new(move |i| {
        let (group, step) = (i % 10, i / 10);
        let lat = if step % 2 == 0 { 22.5531 } else { 22.5631 };
        let pings: Vec<_> = (0..USERS_PER_REQUEST)
            .map(|u| {
                json!({"user_id": format!("{tag}{group}-{u}"), "lat": lat, "lon": 114.0579,
                       "ts_ms": t0 + step as i64 * 1000})
            })
            .collect();
        json!({ "pings": pings })
    })
}

/// Single pings of 1 000 users walking in and out; request i is user i % 1000's (i / 1000)-th ping.
fn single_body(tag: &'static str) -> Arc<dyn Fn(usize) -> serde_json::Value + Send + Sync> {
    let t0 = now_ms() - 3_600_000;
    Arc::new(move |i| {
        let (user, step) = (i % 1000, i / 1000);
        let lat = if step % 2 == 0 { 22.5431 } else { 22.5531 };
        json!({"user_id": format!("{tag}{user}"), "lat": lat, "lon": 114.0579, "ts_ms": t0 + step as i64 * 1000})
    })
}

type Body = Arc<dyn Fn(usize) -> serde_json::Value + Send + Sync>;

/// Pings/s of `BATCHES` batch requests, `body(tag)` with each node set's own tag (so each starts
/// with fresh users), on each of `nodes` in turn; one line, with the Redis round trips per request
/// of the last (Redis) set.
async fn batches_on_each(
    what: &str,
    nodes: &[(&str, &Arc<Vec<String>>); 3],
    stores: &[RedisStore],
    body: fn(&'static str) -> Body,
    tags: [&'static str; 3],
) {
    const BATCHES: usize = 200;
    let (mut rates, mut per_request) = (Vec::new(), 0.0);
    for ((name, bases), tag) in nodes.iter().zip(tags) {
        let before = round_trips(stores);
        let t = drive(Arc::clone(bases), BATCHES, 8, body(tag), Arc::new(|i| i)).await;
        rates.push(format!("{name} {:.0} pings/s", (BATCHES * USERS_PER_REQUEST) as f64 / t.as_secs_f64()));
        // Kept for the last set, the Redis nodes (the others make no Redis round trips).
        per_request = (round_trips(stores) - before) as f64 / BATCHES as f64;
    }
    println!("{what}: {}; {per_request:.2} round trips/request", rates.join("; "));
}

/// `evalsha`'s calls and server-side µs per call since the server started (`INFO commandstats`):
/// what of a commit's time Redis itself spends, the rest being the client and the network.
async fn script_time(url: &str) -> String {
    let client = redis::Client::open(url).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let info: String = redis::cmd("INFO").arg("commandstats").query_async(&mut conn).await.unwrap();
    info.lines().find(|l| l.starts_with("cmdstat_evalsha:")).unwrap_or("no evalsha calls").to_string()
}

fn round_trips(stores: &[RedisStore]) -> u64 {
    stores.iter().map(RedisStore::round_trips).sum()
}

#[tokio::main]
async fn main() {
    let server = RedisServer::start();
    println!("redis-server on port {}; {} cores", server.port(), std::thread::available_parallelism().unwrap());

    // Store level. The embedded store (durable, one node) is issue 6's baseline; the in-memory
    // store shows what the rules cost with no storage at all.
    let scratch = tempfile::tempdir().unwrap();
    let embedded = |name: &str| -> Arc<dyn Store> {
        EmbeddedStore::open(EmbeddedConfig::new(scratch.path().join(name))).expect("the embedded store opens")
    };
    let memory_rate = store_issuance("memory", Arc::new(MemoryStore::new()), 200).await;
    let embedded_rate = store_issuance("embedded", embedded("issuance"), 200).await;
    let redis = RedisStore::connect(&server.url()).await.unwrap();
    let before = redis.round_trips();
    let redis_rate = store_issuance("redis", Arc::new(redis.clone()), 200).await;
    println!(
        "  redis round trips per 500-user commit: {:.2}; redis/embedded = {:.2}; redis/memory = {:.2}",
        (redis.round_trips() - before) as f64 / 200.0,
        redis_rate / embedded_rate,
        redis_rate / memory_rate
    );
    println!("  redis-server time per script call: {}", script_time(&server.url()).await);
    if std::env::args().any(|a| a == "--store-only") {
        return;
    }

    // HTTP: one memory node vs two Redis nodes.
    let http = reqwest::Client::new();
    let memory_node = node(Arc::new(MemoryStore::new())).await;
    create_campaign(&http, &memory_node).await;
    let embedded_node = node(embedded("http")).await;
    create_campaign(&http, &embedded_node).await;
    let stores: Vec<RedisStore> = {
        let mut v = Vec::new();
        for _ in 0..2 {
            v.push(RedisStore::connect(&server.url()).await.unwrap());
        }
        v
    };
    let mut redis_nodes = Vec::new();
    for s in &stores {
        redis_nodes.push(node(Arc::new(s.clone())).await);
    }
    create_campaign(&http, &redis_nodes[0]).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let one = Arc::new(vec![memory_node]);
    let one_embedded = Arc::new(vec![embedded_node]);
    let two = Arc::new(redis_nodes);
    let rr: Arc<dyn Fn(usize) -> usize + Send + Sync> = Arc::new(|i| i);
    let sticky: Arc<dyn Fn(usize) -> usize + Send + Sync> = Arc::new(|i| i % 1000);

    let nodes = [("memory 1 node", &one), ("embedded 1 node", &one_embedded), ("redis 2 nodes", &two)];
    batches_on_each("HTTP batches of 500", &nodes, &stores, batch_body, ["mb", "eb", "rb"]).await;
    let moving = "HTTP batches of 500, moving users, nothing issued";
    batches_on_each(moving, &nodes, &stores, moving_batch_body, ["mm", "em", "rm"]).await;

    const SINGLES: usize = 20_000;
    let t = drive(one.clone(), SINGLES, 64, single_body("ms"), rr.clone()).await;
    println!("HTTP single pings: memory 1 node {:.0} requests/s", SINGLES as f64 / t.as_secs_f64());
    let t = drive(one_embedded.clone(), SINGLES, 64, single_body("es"), rr.clone()).await;
    println!("HTTP single pings: embedded 1 node {:.0} requests/s", SINGLES as f64 / t.as_secs_f64());
    // A user's consecutive pings (requests i, i + 1000, …) alternate between the two nodes.
    let alternating: Arc<dyn Fn(usize) -> usize + Send + Sync> = Arc::new(|i| i / 1000 + i);
    for (name, route, tag) in [("sticky", sticky, "rs"), ("round-robin", alternating, "rr")] {
        let before = round_trips(&stores);
        let t = drive(two.clone(), SINGLES, 64, single_body(tag), route).await;
        println!(
            "HTTP single pings: redis 2 nodes, {name}: {:.0} requests/s; {:.2} round trips/request",
            SINGLES as f64 / t.as_secs_f64(),
            (round_trips(&stores) - before) as f64 / SINGLES as f64
        );
    }
}
