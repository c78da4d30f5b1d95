//! Push delivery end to end: the real server (in-process on `127.0.0.1:0`, over a
//! `MemoryStore`, or a `RedisStore` on the tests' own `redis-server`) pointed at `kabao fake-push` (in-process on port 0, real TLS, HTTP/2 for
//! APNs). A ping issues a coupon; what the fake receives, the campaign's `pushes` stats, the
//! devices and the dead letters are then read through kabao's API, as an operator would.
//!
//! Every wait is a poll with a deadline ([`eventually`]), never a sleep before an assertion.
//! Backoff is configured in milliseconds (`push_backoff_base_ms`), so retries take no time
//! except where a provider's `Retry-After` says otherwise.

mod support;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kabao::app::Application;
use kabao::config::{Config, PushConfig};
use kabao::fakepush::{self, FakePush, FakePushConfig, Fault, Received};
use kabao::store::embedded::{EmbeddedConfig, EmbeddedStore};
use kabao::store::hooked::Hooked;
use kabao::store::memory::MemoryStore;
use kabao::store::redis::test_server::RedisServer;
use kabao::store::redis::RedisStore;
use kabao::store::{Store, StoreError};
use reqwest::StatusCode;
use serde_json::{json, Value};
use support::{eventually, scratch_dir};
use tokio::sync::oneshot;

const ADMIN: &str = "push-e2e-admin";
const SECRET: &str = "push-e2e-secret";
const LON: f64 = 114.0579;
const LAT: f64 = 22.5431;
/// An APNs token's shape: 64 hex digits.
const APNS_TOKEN: &str = "0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0";

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as i64
}

/// The push settings pointing kabao at `fake`, with millisecond backoff.
fn push_config(fake: &FakePush) -> PushConfig {
    PushConfig {
        max_attempts: 4,
        backoff_base: Duration::from_millis(5),
        backoff_max: Duration::from_millis(50),
        ..fake.push_config()
    }
}

/// A kabao server pointed at a fake, over a store the test can also look into.
struct Harness {
    fake: Arc<FakePush>,
    base: String,
    http: reqwest::Client,
    store: Arc<dyn Store>,
    /// While set, the dispatchers take nothing from the outbox.
    outbox_closed: Arc<AtomicBool>,
    /// Dropping one stops its node.
    stops: Vec<oneshot::Sender<()>>,
    /// The nodes' serving tasks, done once they stopped.
    runs: Vec<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Harness {
    /// One node with `tune` applied to its configuration.
    async fn start(tune: impl Fn(&mut Config)) -> Self {
        Self::nodes(1, tune).await
    }

    /// `n` nodes sharing one memory store (and so one outbox), all pointed at one fake.
    async fn nodes(n: usize, tune: impl Fn(&mut Config)) -> Self {
        let fake = Arc::new(fakepush::start(FakePushConfig::for_tests(scratch_dir("push-e2e"))).await.unwrap());
        let outbox_closed = Arc::new(AtomicBool::new(false));
        let store = gated_store(Arc::new(MemoryStore::new()), outbox_closed.clone());
        Self::over(fake, vec![store; n], outbox_closed, tune).await
    }

    /// `n` nodes sharing `store` (its outbox gated as [`gated_store`] says), all pointed at one fake.
    async fn nodes_over(store: Arc<dyn Store>, n: usize, tune: impl Fn(&mut Config)) -> Self {
        let fake = Arc::new(fakepush::start(FakePushConfig::for_tests(scratch_dir("push-e2e"))).await.unwrap());
        let outbox_closed = Arc::new(AtomicBool::new(false));
        let store = gated_store(store, outbox_closed.clone());
        Self::over(fake, vec![store; n], outbox_closed, tune).await
    }

    /// One node over each of `stores` (one store shared, or each node's own connection to one),
    /// all pointed at `fake`; `outbox_closed` is the flag the stores' gates read.
    async fn over(
        fake: Arc<FakePush>,
        stores: Vec<Arc<dyn Store>>,
        outbox_closed: Arc<AtomicBool>,
        tune: impl Fn(&mut Config),
    ) -> Self {
        let mut stops = Vec::new();
        let mut runs = Vec::new();
        let mut base = String::new();
        for store in &stores {
            let mut config = Config::for_tests(ADMIN, SECRET);
            config.push = push_config(&fake);
            tune(&mut config);
            let app = Application::build_with_store(config, store.clone()).await.expect("server builds");
            base = format!("http://127.0.0.1:{}", app.port());
            let (stop, stopped) = oneshot::channel::<()>();
            runs.push(tokio::spawn(app.run_until_stopped(async move {
                let _ = stopped.await;
            })));
            stops.push(stop);
        }
        let store = stores[0].clone();
        Self { fake, base, http: reqwest::Client::new(), store, outbox_closed, stops, runs }
    }

    /// Stops every node gracefully and waits until they stopped; the fake lives on.
    async fn stop(self) -> Arc<FakePush> {
        let Self { fake, stops, runs, .. } = self;
        drop(stops);
        for run in runs {
            run.await.expect("the node's task").expect("the node stopped cleanly");
        }
        fake
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        let mut request = self.http.request(method, format!("{}{path}", self.base)).bearer_auth(ADMIN);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.expect("request sent");
        let status = response.status();
        let text = response.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    /// Creates campaign `id` (one 150 m circle at the centre, coupon with every text).
    async fn campaign(&self, id: &str) {
        let body = json!({
            "id": id,
            "name": format!("campaign {id}"),
            "merchant": {"id": "m-1", "name": "Merchant One"},
            "coupon": {"title": format!("{id} coupon"), "body": "Show this at the counter",
                       "deep_link": "kabao://c", "image_url": "https://example.com/c.png", "valid_for_s": 86400},
            "fences": [{"id": "store-1", "type": "circle", "center": [LON, LAT], "radius_m": 150.0}],
            "trigger": {"on": "enter"},
            "status": "active"
        });
        let (status, reply) = self.call(reqwest::Method::POST, "/v1/campaigns", Some(body)).await;
        assert_eq!(status, StatusCode::CREATED, "{reply}");
    }

    async fn device(&self, user: &str, device: &str, platform: &str, token: &str) {
        let body = json!({"platform": platform, "token": token});
        let (status, reply) =
            self.call(reqwest::Method::PUT, &format!("/v1/users/{user}/devices/{device}"), Some(body)).await;
        assert_eq!(status, StatusCode::OK, "{reply}");
    }

    /// A ping of `user` inside the fence at `ts_ms`: the coupons it issued, as `(coupon_id, expires_at_ms)`.
    async fn ping_inside(&self, user: &str, ts_ms: i64) -> Vec<(String, i64)> {
        let body = json!({"user_id": user, "lat": LAT, "lon": LON, "ts_ms": ts_ms});
        let (status, reply) = self.call(reqwest::Method::POST, "/v1/pings", Some(body)).await;
        assert_eq!(status, StatusCode::OK, "{reply}");
        reply["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| (e["coupon_id"].as_str().unwrap().to_owned(), e["expires_at_ms"].as_i64().unwrap()))
            .collect()
    }

    /// The campaign's `pushes` stats.
    async fn pushes(&self, campaign: &str) -> Value {
        let (status, reply) = self.call(reqwest::Method::GET, &format!("/v1/campaigns/{campaign}/stats"), None).await;
        assert_eq!(status, StatusCode::OK, "{reply}");
        reply["pushes"].clone()
    }

    /// Waits until the campaign's push stats are `expected`.
    async fn pushes_become(&self, campaign: &str, expected: Value) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let now = self.pushes(campaign).await;
            if now == expected {
                return;
            }
            assert!(tokio::time::Instant::now() < deadline, "{campaign} pushes are {now}, never became {expected}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits until the outbox is empty: every push has had its final outcome.
    async fn outbox_drained(&self) {
        eventually("the outbox to drain", || async { (self.store.outbox_len().await.unwrap() == 0).then_some(()) })
            .await;
    }

    /// What the fake received from `provider` for device `token`.
    fn received(&self, provider: &str, token: &str) -> Vec<Received> {
        self.fake.received_by(provider).into_iter().filter(|r| device_token(r).as_deref() == Some(token)).collect()
    }
}

/// The device token a provider request was for.
fn device_token(r: &Received) -> Option<String> {
    match r.provider.as_str() {
        "fcm" => r.body["message"]["token"].as_str().map(str::to_owned),
        "apns" => r.path.strip_prefix("/3/device/").map(str::to_owned),
        _ => None,
    }
}

/// The coupon id a provider request carried.
fn coupon_of(r: &Received) -> Option<String> {
    match r.provider.as_str() {
        "fcm" => r.body["message"]["data"]["coupon_id"].as_str().map(str::to_owned),
        "apns" => r.body["coupon_id"].as_str().map(str::to_owned),
        _ => None,
    }
}

fn statuses(received: &[Received]) -> Vec<u16> {
    received.iter().map(|r| r.status).collect()
}

fn stats(delivered: u64, retrying: u64, failed: u64, dead_token: u64) -> Value {
    json!({"delivered": delivered, "retrying": retrying, "failed": failed, "dead_token": dead_token})
}

#[tokio::test]
async fn a_coupon_reaches_an_fcm_and_an_apns_device_with_exactly_the_documented_requests() {
    let h = Harness::start(|_| {}).await;
    h.campaign("c1").await;
    h.device("alice", "pixel", "fcm", "fcm-token-alice").await;
    h.device("alice", "iphone", "apns", APNS_TOKEN).await;
    let before_ms = now_ms();
    let coupons = h.ping_inside("alice", before_ms - 60_000).await;
    assert_eq!(coupons.len(), 1, "one coupon issued");
    let (coupon_id, expires_at_ms) = coupons[0].clone();

    let (fcm, apns) = eventually("both pushes", || async {
        let fcm = h.received("fcm", "fcm-token-alice");
        let apns = h.received("apns", APNS_TOKEN);
        (!fcm.is_empty() && !apns.is_empty()).then_some((fcm, apns))
    })
    .await;
    h.pushes_become("c1", stats(2, 0, 0, 0)).await;
    let after_ms = now_ms();

    assert_eq!(fcm.len(), 1);
    let fcm = &fcm[0];
    assert_eq!(
        (fcm.method.as_str(), fcm.path.as_str(), fcm.status),
        ("POST", "/v1/projects/kabao-fake/messages:send", 200)
    );
    assert!(fcm.headers["authorization"].starts_with("Bearer ya29."), "{:?}", fcm.headers);
    assert_eq!(fcm.headers["content-type"], "application/json");
    // `ttl` is the seconds left at sending, rounded up: between the bounds of before and after.
    let ttl = fcm.body["message"]["android"]["ttl"].as_str().unwrap().to_owned();
    let ttl_s: i64 = ttl.strip_suffix('s').unwrap().parse().unwrap();
    assert!(((expires_at_ms - after_ms) / 1000..=(expires_at_ms - before_ms) / 1000 + 1).contains(&ttl_s), "{ttl}");
    assert_eq!(
        fcm.body,
        json!({"message": {
            "token": "fcm-token-alice",
            "notification": {"title": "c1 coupon", "body": "Show this at the counter", "image": "https://example.com/c.png"},
            "data": {"coupon_id": coupon_id, "campaign_id": "c1", "deep_link": "kabao://c",
                     "expires_at_ms": expires_at_ms.to_string()},
            "android": {"collapse_key": coupon_id, "ttl": ttl}
        }})
    );

    assert_eq!(apns.len(), 1);
    let apns = &apns[0];
    assert_eq!(
        (apns.method.as_str(), apns.path.as_str(), apns.version.as_str(), apns.status),
        ("POST", format!("/3/device/{APNS_TOKEN}").as_str(), "HTTP/2.0", 200)
    );
    assert!(apns.headers["authorization"].starts_with("bearer "), "{:?}", apns.headers);
    for (name, value) in [
        ("apns-topic", "com.example.kabao".to_owned()),
        ("apns-push-type", "alert".to_owned()),
        ("apns-priority", "10".to_owned()),
        ("apns-expiration", (expires_at_ms / 1000).to_string()),
        ("apns-collapse-id", coupon_id.clone()),
    ] {
        assert_eq!(apns.headers.get(name), Some(&value), "{name}");
    }
    assert_eq!(
        apns.body,
        json!({"aps": {"alert": {"title": "c1 coupon", "body": "Show this at the counter"}, "mutable-content": 1},
               "coupon_id": coupon_id, "campaign_id": "c1", "deep_link": "kabao://c",
               "image_url": "https://example.com/c.png", "expires_at_ms": expires_at_ms})
    );
}

#[tokio::test]
async fn a_429_is_retried_no_sooner_than_its_retry_after_then_delivered() {
    let h = Harness::start(|_| {}).await;
    h.campaign("c1").await;
    h.device("bob", "pixel", "fcm", "fcm-token-bob").await;
    h.fake.inject(Fault::status("fcm", 429).retry_after(1).for_token("fcm-token-bob").times(1));
    h.ping_inside("bob", now_ms() - 60_000).await;

    // While it waits out the Retry-After, the campaign counts it as retrying.
    h.pushes_become("c1", stats(0, 1, 0, 0)).await;
    h.pushes_become("c1", stats(1, 0, 0, 0)).await;
    let sent = h.received("fcm", "fcm-token-bob");
    assert_eq!(statuses(&sent), [429, 200]);
    let gap_us = sent[1].received_at_us - sent[0].received_at_us;
    // kabao's clock is whole milliseconds: "not before answer + 1 s" can read up to 1 ms early.
    assert!(gap_us >= 999_000, "retried {gap_us} µs after a Retry-After of 1 s");
}

#[tokio::test]
async fn server_errors_and_dropped_connections_are_retried_until_delivered() {
    let h = Harness::start(|_| {}).await;
    h.campaign("c1").await;
    h.device("carol", "pixel", "fcm", "fcm-token-carol").await;
    h.device("carol", "iphone", "apns", APNS_TOKEN).await;
    h.fake.inject(Fault::status("fcm", 500).times(1));
    h.fake.inject(Fault::status("fcm", 503).times(1));
    h.fake.inject(Fault::status("apns", 503).times(1));
    h.fake.inject(Fault::dropped("apns").times(1));
    h.ping_inside("carol", now_ms() - 60_000).await;

    h.pushes_become("c1", stats(2, 0, 0, 0)).await;
    h.outbox_drained().await;
    assert_eq!(statuses(&h.received("fcm", "fcm-token-carol")), [500, 503, 200]);
    assert_eq!(statuses(&h.received("apns", APNS_TOKEN)), [503, 0, 200]);
}

#[tokio::test]
async fn dead_tokens_remove_their_devices_and_the_next_coupon_skips_them() {
    let h = Harness::start(|_| {}).await;
    h.campaign("c1").await;
    let apns_410 = "a".repeat(64);
    let apns_bad = "b".repeat(64);
    h.device("dave", "pixel", "fcm", "fcm-token-dave").await;
    h.device("dave", "iphone", "apns", &apns_410).await;
    h.device("dave", "ipad", "apns", &apns_bad).await;
    h.device("dave", "tablet", "fcm", "fcm-token-dave-ok").await;
    h.fake.inject(Fault::status("fcm", 404).reason("UNREGISTERED").for_token("fcm-token-dave"));
    h.fake.inject(Fault::status("apns", 410).for_token(&apns_410));
    h.fake.inject(Fault::status("apns", 400).reason("BadDeviceToken").for_token(&apns_bad));
    h.ping_inside("dave", now_ms() - 60_000).await;

    h.pushes_become("c1", stats(1, 0, 0, 3)).await;
    for device in ["pixel", "iphone", "ipad"] {
        let (status, reply) = h.call(reqwest::Method::DELETE, &format!("/v1/users/dave/devices/{device}"), None).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{device} was removed: {reply}");
    }

    // A second campaign's coupon goes to the one device left, and only to it.
    h.campaign("c2").await;
    let coupons = h.ping_inside("dave", now_ms() - 30_000).await;
    assert_eq!(coupons.len(), 1, "{coupons:?}");
    h.pushes_become("c2", stats(1, 0, 0, 0)).await;
    h.outbox_drained().await;
    assert_eq!(h.received("fcm", "fcm-token-dave").len(), 1);
    assert_eq!(h.received("apns", &apns_410).len(), 1);
    assert_eq!(h.received("apns", &apns_bad).len(), 1);
    assert_eq!(h.received("fcm", "fcm-token-dave-ok").len(), 2);
    let (_, letters) = h.call(reqwest::Method::GET, "/v1/pushes/dead-letters", None).await;
    assert_eq!(letters["dead_letters"], json!([]), "a dead token is not a dead letter");
}

#[tokio::test]
async fn another_4xx_fails_at_once_into_the_dead_letters() {
    let h = Harness::start(|_| {}).await;
    h.campaign("c1").await;
    h.device("erin", "pixel", "fcm", "fcm-token-erin").await;
    h.fake.inject(Fault::status("fcm", 400).reason("INVALID_ARGUMENT"));
    let coupons = h.ping_inside("erin", now_ms() - 60_000).await;

    h.pushes_become("c1", stats(0, 0, 1, 0)).await;
    h.outbox_drained().await;
    assert_eq!(statuses(&h.received("fcm", "fcm-token-erin")), [400], "never retried");
    let (status, letters) = h.call(reqwest::Method::GET, "/v1/pushes/dead-letters", None).await;
    assert_eq!(status, StatusCode::OK);
    let letters = letters["dead_letters"].as_array().unwrap();
    assert_eq!(letters.len(), 1, "{letters:?}");
    let letter = &letters[0];
    assert_eq!(letter["coupon_id"], coupons[0].0.as_str());
    assert_eq!(letter["campaign_id"], "c1");
    assert_eq!(letter["user_id"], "erin");
    assert_eq!(letter["device_id"], "pixel");
    assert_eq!(letter["platform"], "fcm");
    let reason = letter["reason"].as_str().unwrap();
    assert!(reason.contains("INVALID_ARGUMENT") && reason.ends_with("(attempt 1)"), "{letter}");
    assert!(letter["at_ms"].as_i64().unwrap() > 0);
    assert!(letter.get("token").is_none(), "device tokens are not shown");
}

#[tokio::test]
async fn a_push_that_always_fails_is_dead_lettered_after_push_max_attempts() {
    let h = Harness::start(|c| c.push.max_attempts = 3).await;
    h.campaign("c1").await;
    h.device("frank", "iphone", "apns", APNS_TOKEN).await;
    h.fake.inject(Fault::status("apns", 503));
    h.ping_inside("frank", now_ms() - 60_000).await;

    h.pushes_become("c1", stats(0, 0, 1, 0)).await;
    h.outbox_drained().await;
    assert_eq!(statuses(&h.received("apns", APNS_TOKEN)), [503, 503, 503]);
    let (_, letters) = h.call(reqwest::Method::GET, "/v1/pushes/dead-letters?limit=10", None).await;
    let letter = &letters["dead_letters"][0];
    assert!(letter["reason"].as_str().unwrap().starts_with("gave up after 3 attempts"), "{letter}");
}

#[tokio::test]
async fn the_dead_letter_list_is_admin_only_and_checks_its_limit() {
    let h = Harness::start(|_| {}).await;
    let anonymous = h.http.get(format!("{}/v1/pushes/dead-letters", h.base)).send().await.unwrap();
    assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED);
    for bad in ["0", "1001", "x"] {
        let (status, reply) = h.call(reqwest::Method::GET, &format!("/v1/pushes/dead-letters?limit={bad}"), None).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "limit={bad}: {reply}");
        assert_eq!(reply["error"]["field"], "limit");
    }
    let (status, reply) = h.call(reqwest::Method::GET, "/v1/pushes/dead-letters?limit=1000", None).await;
    assert_eq!((status, reply), (StatusCode::OK, json!({"dead_letters": []})));
}

#[tokio::test]
async fn a_device_deleted_between_issue_and_delivery_gets_nothing() {
    let h = Harness::start(|_| {}).await;
    h.campaign("c1").await;
    h.device("gina", "pixel", "fcm", "fcm-token-gina").await;
    h.device("gina", "iphone", "apns", APNS_TOKEN).await;
    // The dispatcher is held off the outbox while the coupon is issued and a device deleted.
    h.outbox_closed.store(true, Ordering::SeqCst);
    h.ping_inside("gina", now_ms() - 60_000).await;
    assert_eq!(h.store.outbox_len().await.unwrap(), 2, "one push per device queued at issue");
    let (status, _) = h.call(reqwest::Method::DELETE, "/v1/users/gina/devices/pixel", None).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    // The dispatcher finds the entries at its next poll.
    h.outbox_closed.store(false, Ordering::SeqCst);

    h.pushes_become("c1", stats(1, 0, 0, 0)).await;
    h.outbox_drained().await;
    assert_eq!(h.received("apns", APNS_TOKEN).len(), 1);
    assert!(h.received("fcm", "fcm-token-gina").is_empty(), "the deleted device was sent nothing");
}

#[tokio::test]
async fn two_nodes_sharing_an_outbox_never_resend_what_a_provider_accepted() {
    let h = Harness::nodes(2, fault_proof).await;
    every_push_accepted_exactly_once(&h).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_on_one_redis_stream_never_resend_what_a_provider_accepted() {
    let redis = RedisServer::start();
    let store = Arc::new(RedisStore::connect(&redis.url()).await.expect("redis"));
    let h = Harness::nodes_over(store, 2, fault_proof).await;
    every_push_accepted_exactly_once(&h).await;
}

/// The faults [`every_push_accepted_exactly_once`] injects: 503s, slow replies, 429s.
const INJECTED: [u32; 3] = [10, 20, 5];
const INJECTED_FAULTS: u32 = INJECTED[0] + INJECTED[1] + INJECTED[2];

/// Settings for [`every_push_accepted_exactly_once`]: more attempts than faults injected, so no
/// push can be failed by them. Which push meets which fault depends on timing (on a slow
/// machine the first user's two pushes can take four 503s in a row while the others are still
/// being issued); what the test checks is that retries never become second deliveries.
fn fault_proof(c: &mut Config) {
    c.push.concurrency_per_provider = 8;
    c.push.max_attempts = INJECTED_FAULTS + 1;
}

/// 40 users with two FCM devices each, a coupon each, faults along the way: every push is
/// accepted by the provider exactly once, whichever node's dispatcher took it.
async fn every_push_accepted_exactly_once(h: &Harness) {
    h.campaign("c1").await;
    // FCM only, to count accepted pushes per (coupon, device) under FCM's faults; nodes sharing
    // an APNs key are `two_nodes_on_one_redis_with_one_apns_key_send_one_provider_token`.
    let users: Vec<String> = (0..40).map(|i| format!("user-{i}")).collect();
    for user in &users {
        h.device(user, "pixel", "fcm", &format!("fcm-{user}-1")).await;
        h.device(user, "tablet", "fcm", &format!("fcm-{user}-2")).await;
    }
    // Some faults along the way: retries must not turn into second deliveries.
    h.fake.inject(Fault::status("fcm", 503).times(INJECTED[0]));
    h.fake.inject(Fault::delayed("fcm", 30).times(INJECTED[1]));
    h.fake.inject(Fault::status("fcm", 429).retry_after(0).times(INJECTED[2]));
    let ts = now_ms() - 60_000;
    let mut issued = 0;
    for user in &users {
        issued += h.ping_inside(user, ts).await.len();
    }
    assert_eq!(issued, users.len());

    h.pushes_become("c1", stats(2 * users.len() as u64, 0, 0, 0)).await;
    h.outbox_drained().await;
    let mut accepted: HashMap<(String, String), usize> = HashMap::new();
    for r in h.fake.received().into_iter().filter(|r| r.status == 200 && r.provider != "oauth") {
        *accepted.entry((coupon_of(&r).unwrap(), device_token(&r).unwrap())).or_default() += 1;
    }
    assert_eq!(accepted.len(), 2 * users.len(), "every (coupon, device) accepted");
    let twice: Vec<_> = accepted.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "accepted more than once: {twice:?}");
}

/// The distinct APNs provider tokens the fake was sent, and the statuses it answered.
fn apns_tokens_and_statuses(fake: &FakePush) -> (HashSet<String>, Vec<u16>) {
    let apns = fake.received_by("apns");
    (apns.iter().map(|r| r.headers["authorization"].clone()).collect(), statuses(&apns))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_on_one_redis_with_one_apns_key_send_one_provider_token() {
    let redis = RedisServer::start();
    let fake = Arc::new(fakepush::start(FakePushConfig::for_tests(scratch_dir("push-e2e"))).await.unwrap());
    // Held closed while the coupons are issued, then opened for both nodes at once: both start
    // with no token and find their first pushes at the same moment.
    let outbox_closed = Arc::new(AtomicBool::new(true));
    let finished_by: Vec<Arc<AtomicU32>> = (0..2).map(|_| Arc::new(AtomicU32::new(0))).collect();
    let mut stores = Vec::new();
    for finished in &finished_by {
        let connection = Arc::new(RedisStore::connect(&redis.url()).await.expect("connect to the test redis"));
        stores.push(node_store(connection, outbox_closed.clone(), finished.clone()));
    }
    // Two pushes in flight per node and slow replies: neither node can take every push alone.
    let h = Harness::over(fake, stores, outbox_closed, |c| c.push.concurrency_per_provider = 2).await;
    h.fake.inject(Fault::delayed("apns", 100));
    h.campaign("c1").await;
    let users: Vec<String> = (0..16).map(|i| format!("apns-user-{i}")).collect();
    for (i, user) in users.iter().enumerate() {
        h.device(user, "iphone", "apns", &format!("{i:064x}")).await;
    }
    let ts = now_ms() - 60_000;
    for user in &users {
        assert_eq!(h.ping_inside(user, ts).await.len(), 1);
    }
    h.outbox_closed.store(false, Ordering::SeqCst);

    h.pushes_become("c1", stats(users.len() as u64, 0, 0, 0)).await;
    let (tokens, statuses) = apns_tokens_and_statuses(&h.fake);
    assert!(statuses.iter().all(|s| *s == 200), "APNs refused some (429 TooManyProviderTokenUpdates?): {statuses:?}");
    assert_eq!(tokens.len(), 1, "one provider token for the key, whichever node sent");
    let per_node: Vec<u32> = finished_by.iter().map(|n| n.load(Ordering::SeqCst)).collect();
    assert!(per_node.iter().all(|n| *n > 0), "both nodes pushed: {per_node:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_restarted_on_its_data_dir_sends_the_apns_token_it_signed_before() {
    let data = tempfile::tempdir().unwrap();
    let open = || async {
        // The stopped node's writer thread lets go of the database shortly after it stopped.
        eventually("the data directory to be free", || async {
            EmbeddedStore::open(EmbeddedConfig::new(data.path())).ok().map(|s| s as Arc<dyn Store>)
        })
        .await
    };
    let fake = Arc::new(fakepush::start(FakePushConfig::for_tests(scratch_dir("push-e2e"))).await.unwrap());
    let node = Harness::over(fake, vec![open().await], Arc::new(AtomicBool::new(false)), |_| {}).await;
    node.campaign("before").await;
    node.device("ivy", "iphone", "apns", APNS_TOKEN).await;
    node.ping_inside("ivy", now_ms() - 60_000).await;
    node.pushes_become("before", stats(1, 0, 0, 0)).await;
    let fake = node.stop().await;

    // Seconds later — well within the 20 minutes in which APNs refuses another token for the key.
    let node = Harness::over(fake, vec![open().await], Arc::new(AtomicBool::new(false)), |_| {}).await;
    node.campaign("after").await;
    node.ping_inside("ivy", now_ms() - 30_000).await;
    node.pushes_become("after", stats(1, 0, 0, 0)).await;
    let (tokens, statuses) = apns_tokens_and_statuses(&node.fake);
    assert_eq!(statuses, [200, 200], "the restarted node's push was taken");
    assert_eq!(tokens.len(), 1, "the token signed before the restart, read back from the store");
}

#[tokio::test]
async fn metrics_count_pushes_by_provider_and_outcome_with_latency_and_outbox_depth() {
    let h = Harness::start(|_| {}).await;
    h.campaign("c1").await;
    h.device("hana", "pixel", "fcm", "fcm-token-hana").await;
    h.device("hana", "iphone", "apns", APNS_TOKEN).await;
    h.fake.inject(Fault::status("apns", 503).times(1));
    h.ping_inside("hana", now_ms() - 60_000).await;
    h.pushes_become("c1", stats(2, 0, 0, 0)).await;

    let metrics = h.http.get(format!("{}/metrics", h.base)).send().await.unwrap().text().await.unwrap();
    // The recorder is process-wide and other tests push too: check presence, not counts.
    for needle in [
        "# TYPE kabao_pushes_total counter",
        r#"kabao_pushes_total{provider="fcm",outcome="delivered"}"#,
        r#"kabao_pushes_total{provider="apns",outcome="delivered"}"#,
        r#"kabao_pushes_total{provider="apns",outcome="retry"}"#,
        "# TYPE kabao_push_duration_seconds histogram",
        r#"kabao_push_duration_seconds_bucket{provider="apns",outcome="delivered",le="+Inf"}"#,
        "# TYPE kabao_outbox_pending gauge",
    ] {
        assert!(metrics.contains(needle), "{needle} missing from /metrics:\n{metrics}");
    }
}

/// One node's connection to a shared store: its outbox held closed while `closed` is set (as in
/// [`gated_store`]), and the pushes it recorded an outcome of counted in `finished`.
fn node_store(connection: Arc<dyn Store>, closed: Arc<AtomicBool>, finished: Arc<AtomicU32>) -> Arc<dyn Store> {
    Arc::new(Hooked::new(connection, move |method| {
        if method == "outbox_take" && closed.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable("the test holds the outbox closed".into()));
        }
        if method == "outbox_finish" {
            finished.fetch_add(1, Ordering::SeqCst);
        }
        Ok(())
    }))
}

/// `store` with an outbox that can be closed: while `closed` is set, `outbox_take` fails (the
/// dispatcher then finds nothing, as if every entry were leased elsewhere, and polls again), so a
/// test can change the world between issue and delivery. Everything else goes straight through.
fn gated_store(store: Arc<dyn Store>, closed: Arc<AtomicBool>) -> Arc<dyn Store> {
    node_store(store, closed, Arc::new(AtomicU32::new(0)))
}
