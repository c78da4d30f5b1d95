//! The push clients against `kabao fake-push` over real TLS on port 0: the exact requests, token
//! reuse and single-flight refresh, the APNs re-signing rules (on a manual clock, no sleeping),
//! and every fault ending in its documented `PushOutcome`. Plus `Backoff`'s bounds.

mod support;

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use kabao::config::{PushConfig, PushProviderKind};
use kabao::dispatch::apns::{ApnsProvider, ApnsSettings};
use kabao::dispatch::clock::{ManualClock, SharedClock};
use kabao::dispatch::fcm::{FcmProvider, FcmSettings, ServiceAccountKey};
use kabao::dispatch::{providers_from_config, Backoff, PushOutcome, PushProvider};
use kabao::domain::{CampaignId, CouponId, FenceId, UserId};
use kabao::fakepush::{self, FakePush, FakePushConfig, Fault};
use kabao::store::hooked::Hooked;
use kabao::store::memory::MemoryStore;
use kabao::store::{Device, IssuedCoupon, Platform, StoreError};
use rand::SeedableRng;
use serde_json::json;
use support::scratch_dir;

const APNS_TOKEN: &str = "a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90";
const FCM_TOKEN: &str = "fcm-token:APA91b-example_token";
/// Connections per provider: API.md's default, what a node runs with.
const CONNECTIONS: usize = 4;

/// A fake on port 0 whose clock is `clock`.
async fn fake(clock: SharedClock) -> FakePush {
    fakepush::start(FakePushConfig { clock, ..FakePushConfig::for_tests(scratch_dir("push-test")) }).await.unwrap()
}

fn roots(fake: &FakePush) -> Vec<reqwest::Certificate> {
    vec![reqwest::Certificate::from_pem(fake.ca_pem.as_bytes()).unwrap()]
}

fn fcm(fake: &FakePush, clock: SharedClock, timeout: Duration) -> FcmProvider {
    FcmProvider::new(fcm_settings(fake, clock, timeout)).unwrap()
}

fn fcm_settings(fake: &FakePush, clock: SharedClock, timeout: Duration) -> FcmSettings {
    FcmSettings {
        key: ServiceAccountKey::from_file(&fake.service_account_path).unwrap(),
        project_id: fake.project_id.clone(),
        base_url: fake.base_url.clone(),
        extra_roots: roots(fake),
        timeout,
        connections: CONNECTIONS,
        clock,
    }
}

fn apns(fake: &FakePush, clock: SharedClock, timeout: Duration) -> ApnsProvider {
    ApnsProvider::new(ApnsSettings { timeout, ..apns_settings(fake, clock) }).unwrap()
}

/// Settings of an APNs provider pointed at `fake`, keeping its token in a store of its own (so
/// each provider made here is a node of its own).
fn apns_settings(fake: &FakePush, clock: SharedClock) -> ApnsSettings {
    ApnsSettings {
        key_pem: ApnsSettings::read_key(&fake.apns_key_path).unwrap(),
        key_id: fake.apns_key_id.clone(),
        team_id: fake.apns_team_id.clone(),
        topic: fake.apns_topic.clone(),
        base_url: fake.base_url.clone(),
        extra_roots: roots(fake),
        timeout: TIMEOUT,
        connections: CONNECTIONS,
        clock,
        tokens: Arc::new(MemoryStore::new()),
    }
}

fn device(platform: Platform) -> Device {
    let token = match platform {
        Platform::Fcm => FCM_TOKEN,
        Platform::Apns => APNS_TOKEN,
    };
    Device { platform, token: token.into(), tags: vec![], locale: None }
}

fn coupon(expires_at_ms: Option<i64>) -> IssuedCoupon {
    let campaign_id = CampaignId::parse("id", "coffee-2013-01").unwrap();
    let user_id = UserId::parse("u", "alice").unwrap();
    IssuedCoupon {
        coupon_id: CouponId::derive(&campaign_id, &user_id, 1),
        user_id,
        campaign_id,
        fence_id: FenceId::parse("f", "store-0042").unwrap(),
        merchant_id: None,
        title: "20% off coffee".into(),
        body: Some("Show this at the counter".into()),
        deep_link: Some("alipay://coupon".into()),
        image_url: None,
        issued_at_ms: 1,
        expires_at_ms,
    }
}

const TIMEOUT: Duration = Duration::from_secs(10);

/// Where a provider built by `providers_from_config` keeps its APNs token: a store of its own.
fn tokens() -> Arc<dyn kabao::store::ProviderTokenStore> {
    Arc::new(MemoryStore::new())
}

#[tokio::test]
async fn fcm_sends_the_exact_request_with_a_token_from_the_service_account() {
    let clock = ManualClock::new();
    let fake = fake(clock.clone()).await;
    let provider = fcm(&fake, clock.clone(), TIMEOUT);
    let now_ms = kabao::dispatch::clock::unix_ms(kabao::dispatch::clock::Clock::now(&*clock));
    let c = coupon(Some(now_ms + 3_600_000));
    assert_eq!(provider.send(&device(Platform::Fcm), &c).await, PushOutcome::Delivered);

    let oauth = fake.received_by("oauth");
    assert_eq!(oauth.len(), 1);
    assert_eq!(oauth[0].path, "/token");
    assert_eq!(oauth[0].status, 200);
    assert_eq!(oauth[0].body["grant_type"], "urn:ietf:params:oauth:grant-type:jwt-bearer");

    let sent = fake.received_by("fcm");
    assert_eq!(sent.len(), 1);
    let sent = &sent[0];
    assert_eq!(sent.status, 200);
    assert_eq!(sent.method, "POST");
    assert_eq!(sent.path, "/v1/projects/kabao-fake/messages:send");
    assert!(sent.headers["authorization"].starts_with("Bearer ya29.fake-"), "{:?}", sent.headers);
    assert_eq!(sent.headers["content-type"], "application/json");
    assert_eq!(
        sent.body,
        json!({"message": {
            "token": FCM_TOKEN,
            "notification": {"title": "20% off coffee", "body": "Show this at the counter"},
            "data": {"coupon_id": c.coupon_id.as_str(), "campaign_id": "coffee-2013-01",
                     "deep_link": "alipay://coupon", "expires_at_ms": (now_ms + 3_600_000).to_string()},
            "android": {"collapse_key": c.coupon_id.as_str(), "ttl": "3600s"}
        }})
    );
}

#[tokio::test]
async fn fcm_reuses_its_token_and_refreshes_it_shortly_before_expiry() {
    let clock = ManualClock::new();
    let fake = fake(clock.clone()).await;
    let provider = fcm(&fake, clock.clone(), TIMEOUT);
    for _ in 0..10 {
        assert_eq!(provider.send(&device(Platform::Fcm), &coupon(None)).await, PushOutcome::Delivered);
    }
    assert_eq!(fake.received_by("oauth").len(), 1, "one token for many sends");
    // The fake's tokens live 3599 s; at 50 min the token is still used, at 56 min it is replaced.
    clock.advance(Duration::from_secs(50 * 60));
    provider.send(&device(Platform::Fcm), &coupon(None)).await;
    assert_eq!(fake.received_by("oauth").len(), 1);
    clock.advance(Duration::from_secs(6 * 60));
    assert_eq!(provider.send(&device(Platform::Fcm), &coupon(None)).await, PushOutcome::Delivered);
    assert_eq!(fake.received_by("oauth").len(), 2);
    let auths: std::collections::HashSet<String> =
        fake.received_by("fcm").iter().map(|r| r.headers["authorization"].clone()).collect();
    assert_eq!(auths.len(), 2);
}

#[tokio::test]
async fn concurrent_fcm_sends_share_one_token_request() {
    let clock = ManualClock::new();
    let fake = fake(clock.clone()).await;
    let provider = Arc::new(fcm(&fake, clock.clone(), TIMEOUT));
    // The token endpoint is slow, so every send finds no token while the first fetch is in flight.
    fake.inject(Fault::delayed("oauth", 300).times(1));
    let sends = (0..16).map(|_| {
        let provider = provider.clone();
        tokio::spawn(async move { provider.send(&device(Platform::Fcm), &coupon(None)).await })
    });
    for outcome in futures::future::join_all(sends).await {
        assert_eq!(outcome.unwrap(), PushOutcome::Delivered);
    }
    assert_eq!(fake.received_by("oauth").len(), 1);
    assert_eq!(fake.received_by("fcm").len(), 16);
}

/// Both providers, each over three connections to `fake`.
fn providers_over_three_connections(fake: &FakePush, clock: SharedClock) -> (FcmProvider, ApnsProvider) {
    let fcm = FcmProvider::new(FcmSettings { connections: 3, ..fcm_settings(fake, clock.clone(), TIMEOUT) }).unwrap();
    let apns = ApnsProvider::new(ApnsSettings { connections: 3, ..apns_settings(fake, clock.clone()) }).unwrap();
    (fcm, apns)
}

#[tokio::test]
async fn each_provider_sends_over_as_many_connections_as_configured_with_one_token() {
    let clock = ManualClock::new();
    let fake = fake(clock.clone()).await;
    let (fcm, apns) = providers_over_three_connections(&fake, clock.clone());
    // One at a time: the least busy connection is then always idle, and idle ones take turns.
    for _ in 0..9 {
        assert_eq!(fcm.send(&device(Platform::Fcm), &coupon(None)).await, PushOutcome::Delivered);
        assert_eq!(apns.send(&device(Platform::Apns), &coupon(None)).await, PushOutcome::Delivered);
    }
    for provider in ["fcm", "apns"] {
        let sent = fake.received_by(provider);
        assert_eq!(sent.len(), 9);
        let connections: HashSet<u64> = sent.iter().map(|r| r.connection).collect();
        assert_eq!(connections.len(), 3, "{provider} used three connections: {connections:?}");
        for connection in &connections {
            let on_it = sent.iter().filter(|r| r.connection == *connection).count();
            assert_eq!(on_it, 3, "{provider}: each connection carried a third of the pushes");
        }
        let tokens: HashSet<&String> = sent.iter().map(|r| &r.headers["authorization"]).collect();
        assert_eq!(tokens.len(), 1, "{provider}: one token on every connection");
    }
    assert_eq!(fake.received_by("oauth").len(), 1, "one access token for every FCM connection");
    let fcm_connections: HashSet<u64> = fake.received_by("fcm").iter().map(|r| r.connection).collect();
    let apns_connections: HashSet<u64> = fake.received_by("apns").iter().map(|r| r.connection).collect();
    assert!(fcm_connections.is_disjoint(&apns_connections), "each provider has connections of its own");
    let stats = fake.stats();
    assert_eq!((stats.fcm.accepted, stats.apns.accepted, stats.oauth.requests), (9, 9, 1));
    assert_eq!(stats.connections, 6, "three per provider, the token endpoint's request on one of FCM's");
}

#[tokio::test]
async fn a_burst_on_cold_connections_opens_only_the_configured_ones() {
    let clock = ManualClock::new();
    let fake = fake(clock.clone()).await;
    let (fcm, apns) = providers_over_three_connections(&fake, clock.clone());
    let (fcm, apns) = (Arc::new(fcm), Arc::new(apns));
    // Every send at once, before any connection has answered: FCM's client learns HTTP/2 only
    // from a connection's ALPN, so without the first request going alone each would dial its own.
    let sends = (0..64).map(|i| {
        let (fcm, apns) = (fcm.clone(), apns.clone());
        tokio::spawn(async move {
            if i % 2 == 0 {
                fcm.send(&device(Platform::Fcm), &coupon(None)).await
            } else {
                apns.send(&device(Platform::Apns), &coupon(None)).await
            }
        })
    });
    for outcome in futures::future::join_all(sends).await {
        assert_eq!(outcome.unwrap(), PushOutcome::Delivered);
    }
    let stats = fake.stats();
    assert_eq!((stats.fcm.accepted, stats.apns.accepted, stats.oauth.requests), (32, 32, 1));
    assert_eq!(stats.connections, 6, "three per provider");
}

#[tokio::test]
async fn an_fcm_401_drops_the_token_and_the_next_attempt_gets_a_new_one() {
    let clock = ManualClock::new();
    let fake = fake(clock.clone()).await;
    let provider = fcm(&fake, clock.clone(), TIMEOUT);
    assert_eq!(provider.send(&device(Platform::Fcm), &coupon(None)).await, PushOutcome::Delivered);
    fake.inject(Fault::status("fcm", 401).times(1));
    assert!(matches!(provider.send(&device(Platform::Fcm), &coupon(None)).await, PushOutcome::Retry { .. }));
    assert_eq!(provider.send(&device(Platform::Fcm), &coupon(None)).await, PushOutcome::Delivered);
    assert_eq!(fake.received_by("oauth").len(), 2);
}

/// One fake for a table of faults: each case gets a fresh provider (so a token-endpoint fault
/// meets a provider without a token) and only its own fault.
struct FaultBench {
    clock: Arc<ManualClock>,
    fake: FakePush,
}

impl FaultBench {
    async fn new() -> Self {
        let clock = ManualClock::new();
        let fake = fake(clock.clone()).await;
        Self { clock, fake }
    }

    async fn fcm(&self, fault: Fault, timeout: Duration) -> PushOutcome {
        self.fake.clear_faults();
        self.fake.inject(fault);
        fcm(&self.fake, self.clock.clone(), timeout).send(&device(Platform::Fcm), &coupon(None)).await
    }

    async fn apns(&self, fault: Fault, timeout: Duration) -> PushOutcome {
        self.fake.clear_faults();
        self.fake.inject(fault);
        // Each fresh provider signs a new token; Apple takes one only every 20 minutes.
        self.clock.advance(Duration::from_secs(21 * 60));
        apns(&self.fake, self.clock.clone(), timeout).send(&device(Platform::Apns), &coupon(None)).await
    }
}

fn assert_retry(outcome: PushOutcome, retry_after: Option<Duration>, what: &str) {
    match outcome {
        PushOutcome::Retry { retry_after: got, .. } => assert_eq!(got, retry_after, "{what}"),
        other => panic!("{what}: expected a retry, got {other:?}"),
    }
}

#[tokio::test]
async fn each_fcm_fault_ends_in_its_outcome() {
    let bench = FaultBench::new().await;
    let fcm_outcome = |fault, timeout| bench.fcm(fault, timeout);
    let s = Duration::from_secs;
    assert_retry(fcm_outcome(Fault::status("fcm", 429).retry_after(7), TIMEOUT).await, Some(s(7)), "429");
    assert_retry(fcm_outcome(Fault::status("fcm", 500), TIMEOUT).await, None, "500");
    assert_retry(fcm_outcome(Fault::status("fcm", 503).retry_after(2), TIMEOUT).await, Some(s(2)), "503");
    assert_retry(fcm_outcome(Fault::dropped("fcm"), TIMEOUT).await, None, "dropped connection");
    assert_retry(fcm_outcome(Fault::delayed("fcm", 5_000), Duration::from_millis(300)).await, None, "timeout");
    assert_retry(fcm_outcome(Fault::status("oauth", 503).retry_after(4), TIMEOUT).await, Some(s(4)), "token 503");
    assert_retry(fcm_outcome(Fault::dropped("oauth"), TIMEOUT).await, None, "token endpoint dropped");
    match fcm_outcome(Fault::status("fcm", 404).reason("UNREGISTERED").for_token(FCM_TOKEN), TIMEOUT).await {
        PushOutcome::DeadToken { reason } => assert!(reason.contains("UNREGISTERED"), "{reason}"),
        other => panic!("UNREGISTERED: {other:?}"),
    }
    match fcm_outcome(Fault::status("fcm", 400).reason("INVALID_ARGUMENT"), TIMEOUT).await {
        PushOutcome::Failed { reason } => assert!(reason.contains("400 INVALID_ARGUMENT"), "{reason}"),
        other => panic!("400: {other:?}"),
    }
    assert!(matches!(
        fcm_outcome(Fault::status("fcm", 403).reason("SENDER_ID_MISMATCH"), TIMEOUT).await,
        PushOutcome::Failed { .. }
    ));
    // A fault for another device leaves this one alone.
    assert_eq!(fcm_outcome(Fault::status("fcm", 500).for_token("other"), TIMEOUT).await, PushOutcome::Delivered);
}

#[tokio::test]
async fn apns_sends_the_exact_request_over_http2() {
    let clock = ManualClock::new();
    let fake = fake(clock.clone()).await;
    let provider = apns(&fake, clock.clone(), TIMEOUT);
    let mut c = coupon(Some(1_893_456_000_123));
    c.image_url = Some("https://img.example/c.png".into());
    assert_eq!(provider.send(&device(Platform::Apns), &c).await, PushOutcome::Delivered);
    let sent = fake.received_by("apns");
    assert_eq!(sent.len(), 1);
    let sent = &sent[0];
    assert_eq!((sent.status, sent.method.as_str(), sent.version.as_str()), (200, "POST", "HTTP/2.0"));
    assert_eq!(sent.path, format!("/3/device/{APNS_TOKEN}"));
    let h = &sent.headers;
    assert!(h["authorization"].starts_with("bearer ey"), "{h:?}");
    assert_eq!(h["apns-topic"], "com.example.kabao");
    assert_eq!(h["apns-push-type"], "alert");
    assert_eq!(h["apns-priority"], "10");
    assert_eq!(h["apns-expiration"], "1893456000");
    assert_eq!(h["apns-collapse-id"], c.coupon_id.as_str());
    assert_eq!(
        sent.body,
        json!({"aps": {"alert": {"title": "20% off coffee", "body": "Show this at the counter"}, "mutable-content": 1},
               "coupon_id": c.coupon_id.as_str(), "campaign_id": "coffee-2013-01", "deep_link": "alipay://coupon",
               "image_url": "https://img.example/c.png", "expires_at_ms": 1_893_456_000_123i64})
    );
    // The provider token: ES256 with the key id, iss = team id.
    let jwt = h["authorization"].strip_prefix("bearer ").unwrap();
    let header = jsonwebtoken::decode_header(jwt).unwrap();
    assert_eq!(header.alg, jsonwebtoken::Algorithm::ES256);
    assert_eq!(header.kid.as_deref(), Some(fake.apns_key_id.as_str()));
}

#[tokio::test]
async fn the_apns_token_is_reused_for_20_to_50_minutes_and_resigned_at_40() {
    let clock = ManualClock::new();
    let fake = fake(clock.clone()).await;
    let provider = Arc::new(apns(&fake, clock.clone(), TIMEOUT));
    let send = || {
        let provider = provider.clone();
        async move { provider.send(&device(Platform::Apns), &coupon(None)).await }
    };
    let tokens = |fake: &FakePush| -> Vec<String> {
        let mut seen: Vec<String> = Vec::new();
        for r in fake.received_by("apns") {
            if seen.last() != Some(&r.headers["authorization"]) {
                seen.push(r.headers["authorization"].clone());
            }
        }
        seen
    };
    // Concurrent first sends sign one token between them.
    let first = futures::future::join_all((0..8).map(|_| send())).await;
    assert!(first.iter().all(|o| *o == PushOutcome::Delivered), "{first:?}");
    assert_eq!(tokens(&fake).len(), 1);

    clock.advance(Duration::from_secs(39 * 60));
    assert_eq!(send().await, PushOutcome::Delivered);
    assert_eq!(tokens(&fake).len(), 1, "still the same token at 39 min");

    clock.advance(Duration::from_secs(60));
    assert_eq!(send().await, PushOutcome::Delivered, "the fake accepts a token re-signed after 40 min");
    assert_eq!(tokens(&fake).len(), 2);

    // APNs calls the new token expired 5 min in: a retry, but no re-signing before 20 min…
    clock.advance(Duration::from_secs(5 * 60));
    fake.inject(Fault::status("apns", 403).reason("ExpiredProviderToken").times(1));
    match send().await {
        PushOutcome::Retry { retry_after, .. } => assert_eq!(retry_after, Some(Duration::from_secs(15 * 60))),
        other => panic!("{other:?}"),
    }
    clock.advance(Duration::from_secs(10 * 60));
    assert_eq!(send().await, PushOutcome::Delivered);
    assert_eq!(tokens(&fake).len(), 2, "not re-signed 15 min after the last one");
    // …and once 20 min have passed, the rejected token is replaced before the 40-min mark.
    clock.advance(Duration::from_secs(5 * 60));
    assert_eq!(send().await, PushOutcome::Delivered);
    assert_eq!(tokens(&fake).len(), 3);
    assert!(fake.received_by("apns").iter().all(|r| r.status == 200 || r.status == 403));
}

#[tokio::test]
async fn while_the_store_is_down_apns_sends_the_token_in_hand_up_to_50_minutes_never_one_of_its_own() {
    let clock = ManualClock::new();
    let fake = fake(clock.clone()).await;
    let down = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let gate = down.clone();
    let store = Hooked::new(Arc::new(MemoryStore::new()), move |method| match gate.load(Ordering::SeqCst) {
        true if method == "provider_token" => Err(StoreError::Unavailable("the test holds the store down".into())),
        _ => Ok(()),
    });
    let provider =
        ApnsProvider::new(ApnsSettings { tokens: Arc::new(store), ..apns_settings(&fake, clock.clone()) }).unwrap();
    let (phone, c) = (device(Platform::Apns), coupon(None));
    let send = || provider.send(&phone, &c);
    assert_eq!(send().await, PushOutcome::Delivered);
    down.store(true, Ordering::SeqCst);
    clock.advance(Duration::from_secs(41 * 60));
    assert_eq!(send().await, PushOutcome::Delivered, "due at 40 min, but the store cannot be asked: kept");
    clock.advance(Duration::from_secs(9 * 60));
    assert!(matches!(send().await, PushOutcome::Retry { .. }), "never sent 50 min old");
    down.store(false, Ordering::SeqCst);
    assert_eq!(send().await, PushOutcome::Delivered, "a new one once the store answers");
    let tokens: HashSet<String> = fake.received_by("apns").iter().map(|r| r.headers["authorization"].clone()).collect();
    assert_eq!(tokens.len(), 2);
    assert!(fake.received_by("apns").iter().all(|r| r.status == 200));
}

#[tokio::test]
async fn the_fake_refuses_what_apple_refuses() {
    let clock = ManualClock::new();
    let fake = fake(clock.clone()).await;
    let client = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(fake.ca_pem.as_bytes()).unwrap())
        .build()
        .unwrap();
    // HTTP/1.1 to APNs.
    let http1 = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(fake.ca_pem.as_bytes()).unwrap())
        .http1_only()
        .build()
        .unwrap();
    let reply = http1.post(format!("{}/3/device/{APNS_TOKEN}", fake.base_url)).body("{}").send().await.unwrap();
    assert_eq!(reply.status(), 505);
    // A second key of the same team re-signing within 20 min: TooManyProviderTokenUpdates.
    let a = apns(&fake, clock.clone(), TIMEOUT);
    let b = apns(&fake, clock.clone(), TIMEOUT);
    assert_eq!(a.send(&device(Platform::Apns), &coupon(None)).await, PushOutcome::Delivered);
    clock.advance(Duration::from_secs(1));
    assert_retry(b.send(&device(Platform::Apns), &coupon(None)).await, None, "TooManyProviderTokenUpdates");
    assert_eq!(fake.received_by("apns").last().unwrap().status, 429);
    // An FCM send with a token the fake never issued.
    let reply = client
        .post(format!("{}/v1/projects/kabao-fake/messages:send", fake.base_url))
        .bearer_auth("ya29.forged")
        .json(&json!({"message": {"token": "t"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), 401);
    // The admin endpoints over the same TLS port.
    let reply = client
        .post(format!("{}/_fake/faults", fake.base_url))
        .json(&json!({"provider": "fcm", "token": "*", "status": 503, "retry_after_s": 1, "times": 1}))
        .send()
        .await
        .unwrap();
    assert!(reply.status().is_success());
    let f = fcm(&fake, clock.clone(), TIMEOUT);
    assert_retry(f.send(&device(Platform::Fcm), &coupon(None)).await, Some(Duration::from_secs(1)), "503");
    let received: serde_json::Value =
        client.get(format!("{}/_fake/received", fake.base_url)).send().await.unwrap().json().await.unwrap();
    assert!(received.as_array().unwrap().iter().any(|r| r["provider"] == "fcm" && r["status"] == 503));
}

#[tokio::test]
async fn each_apns_fault_ends_in_its_outcome() {
    let bench = FaultBench::new().await;
    let apns_outcome = |fault, timeout| bench.apns(fault, timeout);
    let s = Duration::from_secs;
    assert!(matches!(apns_outcome(Fault::status("apns", 410), TIMEOUT).await, PushOutcome::DeadToken { .. }));
    assert!(matches!(
        apns_outcome(Fault::status("apns", 400).reason("BadDeviceToken"), TIMEOUT).await,
        PushOutcome::DeadToken { .. }
    ));
    match apns_outcome(Fault::status("apns", 400).reason("DeviceTokenNotForTopic"), TIMEOUT).await {
        PushOutcome::Failed { reason } => assert_eq!(reason, "APNs 400 DeviceTokenNotForTopic"),
        other => panic!("{other:?}"),
    }
    assert!(matches!(apns_outcome(Fault::status("apns", 413), TIMEOUT).await, PushOutcome::Failed { .. }));
    assert_retry(
        apns_outcome(Fault::status("apns", 429).reason("TooManyRequests").retry_after(3), TIMEOUT).await,
        Some(s(3)),
        "429",
    );
    assert_retry(apns_outcome(Fault::status("apns", 500), TIMEOUT).await, None, "500");
    assert_retry(apns_outcome(Fault::status("apns", 503).retry_after(9), TIMEOUT).await, Some(s(9)), "503");
    assert_retry(apns_outcome(Fault::dropped("apns"), TIMEOUT).await, None, "dropped");
    assert_retry(apns_outcome(Fault::delayed("apns", 5_000), Duration::from_millis(300)).await, None, "timeout");
}

#[tokio::test]
async fn providers_from_config_reads_the_fakes_files_and_routes_by_platform() {
    let fake = fake(kabao::dispatch::clock::system()).await;
    let config = fake.push_config();
    let providers = providers_from_config(&config, tokens()).unwrap();
    assert_eq!((providers.fcm.name(), providers.apns.name()), ("fcm", "apns"));
    for platform in [Platform::Fcm, Platform::Apns] {
        assert_eq!(providers.send(&device(platform), &coupon(None)).await, PushOutcome::Delivered);
    }
    assert_eq!(fake.received_by("fcm").len(), 1);
    assert_eq!(fake.received_by("apns").len(), 1);

    // Only FCM configured: APNs devices go to the log. `log` logs both.
    let only_fcm = PushConfig { apns_key_file: None, ..config.clone() };
    assert_eq!(providers_from_config(&only_fcm, tokens()).unwrap().apns.name(), "log");
    let log = PushConfig { provider: PushProviderKind::Log, ..config.clone() };
    let log = providers_from_config(&log, tokens()).unwrap();
    assert_eq!((log.fcm.name(), log.apns.name()), ("log", "log"));

    // Without the CA, the fake's certificate is not trusted: a retry, not a panic or a delivery.
    let untrusted = providers_from_config(&PushConfig { ca_file: None, ..config.clone() }, tokens()).unwrap();
    assert!(matches!(untrusted.send(&device(Platform::Fcm), &coupon(None)).await, PushOutcome::Retry { .. }));
}

#[tokio::test]
async fn bad_key_files_fail_start_up_naming_the_file() {
    let dir = scratch_dir("push-test");
    let garbage = dir.join("garbage.json");
    std::fs::write(&garbage, "{\"not\": \"a key\"}").unwrap();
    let missing = dir.join("missing.p8");
    let cases = [
        PushConfig { fcm_credentials: Some(garbage.clone()), ..PushConfig::default() },
        PushConfig {
            apns_key_file: Some(missing.clone()),
            apns_key_id: Some("K".into()),
            apns_team_id: Some("T".into()),
            apns_topic: Some("t".into()),
            ..PushConfig::default()
        },
        PushConfig {
            apns_key_file: Some(garbage.clone()),
            apns_key_id: Some("K".into()),
            apns_team_id: Some("T".into()),
            apns_topic: Some("t".into()),
            ..PushConfig::default()
        },
        PushConfig { ca_file: Some(garbage.clone()), ..PushConfig::default() },
    ];
    for config in cases {
        let error = format!("{:#}", providers_from_config(&config, tokens()).unwrap_err());
        assert!(error.contains("garbage.json") || error.contains("missing.p8"), "{error}");
    }
    let no_key_id = PushConfig { apns_key_file: Some(missing), ..PushConfig::default() };
    let error = format!("{:#}", providers_from_config(&no_key_id, tokens()).unwrap_err());
    assert!(error.contains("missing.p8"), "{error}");
}

#[test]
fn backoff_stays_within_its_bounds_and_honours_retry_after() {
    let backoff = Backoff { base: Duration::from_millis(100), max: Duration::from_secs(10) };
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    for attempt in 0..70u32 {
        let ceiling = Duration::from_millis(100)
            .checked_mul(1u32.checked_shl(attempt.saturating_sub(1)).unwrap_or(u32::MAX))
            .unwrap_or(Duration::MAX)
            .min(Duration::from_secs(10));
        let mut longest = Duration::ZERO;
        for _ in 0..200 {
            let d = backoff.delay(attempt, None, &mut rng);
            assert!(d <= ceiling, "attempt {attempt}: {d:?} over {ceiling:?}");
            longest = longest.max(d);
            let later = Duration::from_secs(30);
            assert!(backoff.delay(attempt, Some(later), &mut rng) >= later, "Retry-After honoured above max");
            let soon = Duration::from_millis(1);
            assert!(backoff.delay(attempt, Some(soon), &mut rng) >= soon);
        }
        // Full jitter spreads over the whole range: 200 draws reach past half the ceiling.
        assert!(longest > ceiling / 2, "attempt {attempt}: longest {longest:?} of {ceiling:?}");
    }
}
