//! Many kabao nodes on one Redis (API.md rule 7, issue 6): in-process servers on `127.0.0.1:0`
//! over the tests' own `redis-server` on a free port, and the real binary for `kill -9`.
//!
//! The reference for "the answers of one node" is a single node over the in-memory store fed the
//! very same requests (same `ts_ms`, so the same derived coupon ids).

#[allow(dead_code)]
#[path = "api/helpers.rs"]
mod helpers;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use helpers::{campaign, inside, now_ms, outside, spawn_over, Reply, TestApp, ADMIN, SECRET};
use kabao::store::memory::MemoryStore;
use kabao::store::redis::test_server::RedisServer;
use kabao::store::redis::RedisStore;
use kabao::store::Store;
use rand::{Rng, SeedableRng};
use reqwest::StatusCode;
use serde_json::{json, Value};

async fn redis_store(server: &RedisServer) -> Arc<dyn Store> {
    Arc::new(RedisStore::connect(&server.url()).await.expect("connect to the test redis"))
}

/// The campaigns every scenario runs with: cooldown, total maximum, audience and dwell.
fn campaigns() -> Vec<Value> {
    let mut cool = campaign("nodes-cool");
    cool["caps"] = json!({"per_user_cooldown_s": 600});
    let mut few = campaign("nodes-few");
    few["caps"] = json!({"total_max": 4});
    let mut vip = campaign("nodes-vip");
    vip["audience"] = json!({"tags_any": ["vip"]});
    let mut dwell = campaign("nodes-dwell");
    dwell["trigger"] = json!({"on": "dwell", "dwell_s": 120});
    dwell["caps"] = json!({"per_user_max": 2});
    vec![cool, few, vip, dwell]
}

/// One request of a scenario: the pings body, and whether to send it a second time (a client's
/// retry) to the next node.
#[derive(Clone)]
struct Request {
    body: Value,
    retried: bool,
}

/// A deterministic mix of single pings and batches of several users, each user walking in and out
/// of the fence, with some pings out of order and some requests retried.
fn scenario(t0: i64, requests: usize, seed: u64) -> Vec<Request> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let users: Vec<String> = (0..6).map(|i| format!("rr-u{i}")).collect();
    let mut clock: Vec<i64> = vec![t0; users.len()];
    (0..requests)
        .map(|_| {
            let count = if rng.gen_bool(0.5) { 1 } else { rng.gen_range(2..6) };
            let pings: Vec<Value> = (0..count)
                .map(|_| {
                    let u = rng.gen_range(0..users.len());
                    let late = rng.gen_bool(0.1);
                    clock[u] += rng.gen_range(20_000..400_000);
                    let ts = if late { clock[u] - 900_000 } else { clock[u] };
                    if rng.gen_bool(0.6) {
                        inside(&users[u], ts)
                    } else {
                        outside(&users[u], ts)
                    }
                })
                .collect();
            let body = if pings.len() == 1 { pings[0].clone() } else { json!({ "pings": pings }) };
            Request { body, retried: rng.gen_bool(0.15) }
        })
        .collect()
}

/// What a pings reply says, in a form two runs can be compared by.
fn answer(reply: &Reply) -> Value {
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    let mut events: Vec<String> =
        reply.events().iter().map(|e| format!("{} {} {}", e["user_id"], e["campaign_id"], e["coupon_id"])).collect();
    events.sort();
    json!({"events": events, "ignored": reply.body["ignored"]})
}

async fn setup(node: &TestApp) {
    for c in campaigns() {
        node.create(&c).await;
    }
    node.device("rr-u0", "phone", &["vip"]).await;
    node.device("rr-u1", "phone", &["basic"]).await;
}

/// Every user's wallet as (coupon id, campaign id), from `node`.
async fn wallets(node: &TestApp) -> Vec<Value> {
    let mut all = Vec::new();
    for i in 0..6 {
        let wallet = node.wallet(&format!("rr-u{i}")).await;
        all.push(json!(wallet.iter().map(|c| (c["coupon_id"].clone(), c["campaign_id"].clone())).collect::<Vec<_>>()));
    }
    all
}

/// Runs `requests` against `nodes` round-robin (a retry goes to the next node): the answers.
async fn run(nodes: &[TestApp], requests: &[Request]) -> Vec<Value> {
    let mut answers = Vec::new();
    let mut next = 0;
    for request in requests {
        let sends = if request.retried { 2 } else { 1 };
        for _ in 0..sends {
            let node = &nodes[next % nodes.len()];
            next += 1;
            answers.push(answer(&node.post("/v1/pings", &request.body).await));
        }
    }
    answers
}

async fn spawn_nodes(server: &RedisServer, count: usize) -> Vec<TestApp> {
    let mut nodes = Vec::new();
    for _ in 0..count {
        nodes.push(spawn_over(|_| {}, redis_store(server).await).await);
    }
    nodes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_round_robin_answer_exactly_as_one_node() {
    let t0 = now_ms() - 20 * 3_600_000;
    let requests = scenario(t0, 120, 7);

    let single = spawn_over(|_| {}, Arc::new(MemoryStore::new())).await;
    setup(&single).await;
    let expected = run(std::slice::from_ref(&single), &requests).await;
    let expected_wallets = wallets(&single).await;
    assert!(expected.iter().any(|a| !a["events"].as_array().unwrap().is_empty()), "the scenario issues coupons");

    let server = RedisServer::start();
    let first = spawn_over(|_| {}, redis_store(&server).await).await;
    setup(&first).await;
    // The others load the campaigns at start.
    let mut nodes = vec![first];
    nodes.extend(spawn_nodes(&server, 2).await);
    let got = run(&nodes, &requests).await;
    for (i, (got, expected)) in got.iter().zip(&expected).enumerate() {
        assert_eq!(got, expected, "answer {i}");
    }
    for node in &nodes {
        assert_eq!(wallets(node).await, expected_wallets, "every node reads the same wallets");
    }
}

/// Sends an inside ping of a fresh user to `node` until one matches `campaign` or `deadline`.
async fn first_match(node: &TestApp, campaign: &str, deadline: Instant) -> bool {
    let mut attempt = 0;
    while Instant::now() < deadline {
        attempt += 1;
        let reply = node.ping(inside(&format!("feed-u{attempt}"), now_ms() - 1000)).await;
        if reply.events().iter().any(|e| e["campaign_id"] == campaign) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_campaign_written_through_one_node_matches_on_another_within_a_second() {
    let server = RedisServer::start();
    let nodes = spawn_nodes(&server, 2).await;
    nodes[0].create(&campaign("feed-new")).await;
    assert!(first_match(&nodes[1], "feed-new", Instant::now() + Duration::from_secs(1)).await, "created");

    // A delete through the other node reaches the first as well.
    assert_eq!(nodes[1].delete("/v1/campaigns/feed-new").await.status, StatusCode::NO_CONTENT);
    let deadline = Instant::now() + Duration::from_secs(1);
    let mut gone = false;
    let mut attempt = 0;
    while Instant::now() < deadline && !gone {
        attempt += 1;
        gone = nodes[0].ping(inside(&format!("feed-v{attempt}"), now_ms() - 1000)).await.events().is_empty();
    }
    assert!(gone, "deleted within a second");
}

/// `/readyz` of `node` answers `status` before `deadline`.
async fn ready_becomes(node: &TestApp, status: StatusCode, deadline: Instant) -> bool {
    while Instant::now() < deadline {
        if node.get("/readyz").await.status == status {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_mid_stream_then_back_loses_nothing_a_retrying_client_sent() {
    let t0 = now_ms() - 20 * 3_600_000;
    let requests = scenario(t0, 80, 11);
    let single = spawn_over(|_| {}, Arc::new(MemoryStore::new())).await;
    setup(&single).await;
    run(std::slice::from_ref(&single), &requests).await;
    let expected_wallets = wallets(&single).await;

    let mut server = RedisServer::start_durable();
    let first = spawn_over(|_| {}, redis_store(&server).await).await;
    setup(&first).await;
    let mut nodes = vec![first];
    nodes.extend(spawn_nodes(&server, 1).await);

    let mut failures = 0;
    for (i, request) in requests.iter().enumerate() {
        if i == 30 {
            server.kill();
            assert!(
                ready_becomes(&nodes[0], StatusCode::SERVICE_UNAVAILABLE, Instant::now() + Duration::from_secs(1))
                    .await,
                "/readyz says 503 within a second"
            );
        }
        let mut attempt = 0;
        loop {
            let node = &nodes[(i + attempt) % nodes.len()];
            let reply = node.post("/v1/pings", &request.body).await;
            if reply.status == StatusCode::OK {
                break;
            }
            reply.assert_error(503, "unavailable");
            assert!(reply.retry_after.is_some(), "503 carries Retry-After");
            failures += 1;
            attempt += 1;
            if failures == 3 {
                // The outage has been seen by the client a few times: Redis comes back.
                server.restart();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    assert!(failures >= 3, "the outage was seen");
    assert!(ready_becomes(&nodes[1], StatusCode::OK, Instant::now() + Duration::from_secs(10)).await, "resumed");
    for node in &nodes {
        assert_eq!(wallets(node).await, expected_wallets, "the wallets of a run without the outage");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarted_empty_issues_nothing_until_an_operator_adopts_it() {
    let mut server = RedisServer::start();
    let node = spawn_over(|_| {}, redis_store(&server).await).await;
    node.create(&campaign("empty-a")).await;
    let t = now_ms() - 3_600_000;
    assert_eq!(node.ping(inside("empty-u", t)).await.events().len(), 1);

    server.restart_empty();
    assert!(
        ready_becomes(&node, StatusCode::SERVICE_UNAVAILABLE, Instant::now() + Duration::from_secs(1)).await,
        "/readyz says 503 once the Redis is back empty"
    );
    let readyz = node.get("/readyz").await;
    assert!(readyz.text.contains("lost its data"), "/readyz says why: {}", readyz.text);
    // It stays refused: nothing is issued against the empty counters.
    for i in 0..5 {
        let reply = node.post("/v1/pings", &inside(&format!("empty-v{i}"), t + i)).await;
        reply.assert_error(503, "unavailable");
        assert_eq!(node.get("/v1/users/empty-u/coupons").await.status, StatusCode::SERVICE_UNAVAILABLE);
    }
    let probe = RedisStore::connect(&server.url()).await.expect("connect");
    assert!(kabao::store::IssueStore::wallet(&probe, &kabao::domain::UserId::parse("u", "empty-v0").unwrap())
        .await
        .unwrap()
        .is_empty());
    drop(probe);
    assert_eq!(node.get("/readyz").await.status, StatusCode::SERVICE_UNAVAILABLE, "a new node does not heal it");

    RedisStore::adopt(&server.url()).await.expect("adopt");
    assert!(ready_becomes(&node, StatusCode::OK, Instant::now() + Duration::from_secs(5)).await, "adopted");
    // The data is what the Redis has now: no campaign, so no coupon.
    let reply = node.ping(inside("empty-w", t)).await;
    assert!(reply.events().is_empty());
}

/// A `kabao serve` child process on a free port.
struct Node {
    child: Child,
    base: String,
}

impl Node {
    fn start(redis_url: &str) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_kabao"))
            .args(["serve", "--listen", "127.0.0.1:0", "--redis-url", redis_url])
            .env("KABAO_ADMIN_TOKEN", ADMIN)
            .env("KABAO_CLIENT_SECRET", SECRET)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("kabao binary");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let base = loop {
            let line = lines.next().expect("kabao announces its address").expect("stdout line");
            if let Some(url) = line.strip_prefix("kabao listening on ") {
                break url.trim().to_owned();
            }
        };
        Self { child, base }
    }

    fn app(&self) -> TestApp {
        TestApp::at(&self.base)
    }

    fn kill9(mut self) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("reaped");
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_and_restarted_keeps_campaigns_wallets_caps_and_stays() {
    let server = RedisServer::start();
    let node = Node::start(&server.url());
    let app = node.app();
    app.create(&campaign("k9-a")).await;
    let mut capped = campaign("k9-b");
    capped["caps"] = json!({"total_max": 1});
    app.create(&capped).await;
    let t = now_ms() - 3_600_000;
    assert_eq!(app.ping(inside("k9-u", t)).await.events().len(), 2, "entered: a coupon of each");
    node.kill9();

    let node = Node::start(&server.url());
    let app = node.app();
    assert_eq!(app.campaign_ids().await, ["k9-a", "k9-b"], "campaigns intact");
    assert!(app.ping(inside("k9-u", t + 60_000)).await.events().is_empty(), "still inside: not entering again");
    assert_eq!(app.wallet("k9-u").await.len(), 2, "wallet intact");
    // The total counted the coupon before the kill: another user entering gets only k9-a.
    let other = app.ping(inside("k9-other", t + 60_000)).await;
    assert_eq!(helpers::event_campaigns(&other), ["k9-a"], "total_max intact");
    // Leaving and entering again is a new stay.
    assert!(app.ping(outside("k9-u", t + 120_000)).await.events().is_empty());
    assert_eq!(helpers::event_campaigns(&app.ping(inside("k9-u", t + 180_000)).await), ["k9-a"]);
}

/// API.md: rate limits are shared by all nodes in Redis mode. One user's requests alternating
/// between two nodes draw on one bucket (burst 10 at 1 request/s): per-node buckets would let 20
/// through. The wallet read comes from the other node than the last ping, and a refusal carries
/// `Retry-After`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_share_one_rate_limit_bucket_per_user() {
    let server = RedisServer::start();
    let mut nodes = Vec::new();
    for _ in 0..2 {
        nodes.push(spawn_over(|c| c.rate_limits.requests_per_user_per_s = 1.0, redis_store(&server).await).await);
    }
    let token = helpers::jwt("limited-user");
    let t = now_ms() - 60_000;
    let (mut ok, mut limited) = (0, 0);
    for i in 0..20 {
        let node = &nodes[i % 2];
        let reply = node
            .call(reqwest::Method::POST, "/v1/pings", Some(&token), Some(&outside("limited-user", t + i as i64)))
            .await;
        match reply.status.as_u16() {
            200 => ok += 1,
            429 => {
                reply.assert_error(429, "rate_limited");
                assert!(reply.retry_after.is_some(), "a 429 carries Retry-After");
                limited += 1;
            }
            other => panic!("request {i}: {other} {}", reply.text),
        }
    }
    // Ten of the burst, and at most a token or two refilled while the requests ran.
    assert!((10..=12).contains(&ok), "{ok} requests went through, {limited} were limited");
    // Another user's bucket is their own.
    let other = helpers::jwt("other-user");
    let reply = nodes[1].call(reqwest::Method::POST, "/v1/pings", Some(&other), Some(&outside("other-user", t))).await;
    assert_eq!(reply.status, 200, "{}", reply.text);
}
