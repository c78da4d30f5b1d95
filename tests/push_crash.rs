//! kabao killed mid-delivery delivers the rest after a restart (issue 8), on the embedded store
//! and on Redis: the real `kabao serve` binary as a child process, pointed at `kabao fake-push`
//! (in this process, port 0, real TLS). Coupons are issued, the fake's replies slowed so pushes
//! are in flight, and the server is killed with `kill -9` once the fake has accepted some of them;
//! it is restarted on the same data directory / the same Redis.
//!
//! Then every push reaches the fake, and none twice outside the window the README names ("At
//! least once": a crash between the provider's success and kabao recording it): a push accepted
//! twice must have been accepted first on a request of the killed node, exactly once more after
//! the restart, and there are no more of them than the killed node had in flight. Pushes whose
//! success was recorded before the kill (the first wave, waited for through the campaign's stats)
//! are accepted exactly once. The APNs pushes after the restart are accepted too: the restarted
//! node sends the provider token it kept in the store (a new one would be refused).

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{SystemTime, UNIX_EPOCH};

use kabao::fakepush::{self, FakePush, FakePushConfig, Fault, Received};
use kabao::store::redis::test_server::RedisServer;
use serde_json::{json, Value};
use support::{eventually, scratch_dir, serve_command, Server};

const ADMIN: &str = "push-crash-admin";
const LON: f64 = 114.0579;
const LAT: f64 = 22.5431;
/// Pushes in flight per provider: the most the killed node can leave unrecorded, per provider.
const CONCURRENCY: usize = 4;
/// Users whose pushes are delivered and recorded before the kill.
const FIRST_WAVE: usize = 6;
/// Users whose pushes are under way when the server is killed.
const SECOND_WAVE: usize = 18;

/// `kabao serve` on a free port over the store `store_args` name, pushing to `fake` with short
/// backoff, timeout and lease (so a test of seconds sees retries and a dead node's leases end).
async fn start(store_args: &[String], fake: &FakePush) -> Server {
    let mut command = serve_command(ADMIN);
    command.args(store_args).envs(fake.env());
    command
        .env("KABAO_PUSH_CONCURRENCY", CONCURRENCY.to_string())
        .env("KABAO_PUSH_BACKOFF_BASE_MS", "10")
        .env("KABAO_PUSH_BACKOFF_MAX_MS", "100")
        .env("KABAO_PUSH_TIMEOUT_MS", "1000")
        .env("KABAO_PUSH_LEASE_MS", "3000");
    Server::spawn(&mut command).await
}

fn now_us() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_micros() as i64
}

async fn call(http: &reqwest::Client, server: &Server, method: reqwest::Method, path: &str, body: Value) -> Value {
    let reply = http.request(method, format!("{}{path}", server.base)).bearer_auth(ADMIN).json(&body).send().await;
    let reply = reply.expect("the server answers");
    let status = reply.status();
    let text = reply.text().await.unwrap();
    assert!(status.is_success(), "{path}: {status} {text}");
    serde_json::from_str(&text).unwrap_or(Value::Null)
}

/// User `u`'s devices: an APNs phone for odd users, an FCM phone for even ones, and every third
/// user both (two devices, one per platform).
fn devices_of(u: usize) -> Vec<(&'static str, &'static str, String)> {
    let fcm = ("pixel", "fcm", format!("fcm-token-{u}"));
    let apns = ("iphone", "apns", format!("{u:064x}"));
    match (u % 3, u % 2) {
        (0, _) => vec![fcm, apns],
        (_, 0) => vec![fcm],
        _ => vec![apns],
    }
}

/// Registers user `u`'s devices and sends a ping inside the fence: the pushes it queued, as
/// (coupon id, device token).
async fn issue(http: &reqwest::Client, server: &Server, u: usize, ts_ms: i64) -> Vec<(String, String)> {
    let user = format!("user-{u}");
    for (device, platform, token) in devices_of(u) {
        let body = json!({"platform": platform, "token": token});
        call(http, server, reqwest::Method::PUT, &format!("/v1/users/{user}/devices/{device}"), body).await;
    }
    let ping = json!({"user_id": user, "lat": LAT, "lon": LON, "ts_ms": ts_ms});
    let reply = call(http, server, reqwest::Method::POST, "/v1/pings", ping).await;
    let events = reply["events"].as_array().expect("events");
    assert_eq!(events.len(), 1, "one coupon for {user}: {reply}");
    let coupon = events[0]["coupon_id"].as_str().unwrap().to_owned();
    devices_of(u).into_iter().map(|(_, _, token)| (coupon.clone(), token)).collect()
}

async fn delivered(http: &reqwest::Client, server: &Server) -> Value {
    let stats = http.get(format!("{}/v1/campaigns/c1/stats", server.base)).bearer_auth(ADMIN).send().await;
    let stats: Value = stats.expect("stats").json().await.expect("stats JSON");
    stats["pushes"].clone()
}

/// The (coupon id, device token) a push the fake received was for.
fn push_of(r: &Received) -> Option<(String, String)> {
    match r.provider.as_str() {
        "fcm" => Some((
            r.body["message"]["data"]["coupon_id"].as_str()?.to_owned(),
            r.body["message"]["token"].as_str()?.to_owned(),
        )),
        "apns" => Some((r.body["coupon_id"].as_str()?.to_owned(), r.path.strip_prefix("/3/device/")?.to_owned())),
        _ => None,
    }
}

/// When each push was accepted: the arrival times of its requests the fake answered with success.
fn acceptances(fake: &FakePush) -> BTreeMap<(String, String), Vec<i64>> {
    let mut accepted: BTreeMap<(String, String), Vec<i64>> = BTreeMap::new();
    for r in fake.received().iter().filter(|r| r.status == 200) {
        if let Some(push) = push_of(r) {
            accepted.entry(push).or_default().push(r.received_at_us);
        }
    }
    accepted.values_mut().for_each(|times| times.sort_unstable());
    accepted
}

/// The scenario, over the store `store_args` names.
async fn killed_mid_delivery_delivers_the_rest(store_args: Vec<String>) {
    let fake = fakepush::start(FakePushConfig::for_tests(scratch_dir("push-crash"))).await.unwrap();
    let http = reqwest::Client::new();
    let mut server = start(&store_args, &fake).await;
    let campaign = json!({
        "id": "c1", "merchant": {"id": "m-1"},
        "coupon": {"title": "c1 coupon", "body": "Show this at the counter", "valid_for_s": 86400},
        "fences": [{"id": "store-1", "type": "circle", "center": [LON, LAT], "radius_m": 150.0}],
        "trigger": {"on": "enter"},
    });
    call(&http, &server, reqwest::Method::POST, "/v1/campaigns", campaign).await;
    let ts_ms = now_us() / 1000 - 60_000;

    // The first wave is delivered and recorded before anything goes wrong.
    let mut first_wave = BTreeSet::new();
    for u in 0..FIRST_WAVE {
        first_wave.extend(issue(&http, &server, u, ts_ms).await);
    }
    let recorded = json!({"delivered": first_wave.len(), "retrying": 0, "failed": 0, "dead_token": 0});
    eventually("the first wave recorded as delivered", || async {
        (delivered(&http, &server).await == recorded).then_some(())
    })
    .await;

    // The second wave meets slow replies; once the fake has accepted a few of its pushes, the
    // rest are in flight or queued, and the server is killed.
    fake.inject(Fault::delayed("fcm", 300));
    fake.inject(Fault::delayed("apns", 300));
    let mut expected = first_wave.clone();
    for u in FIRST_WAVE..FIRST_WAVE + SECOND_WAVE {
        expected.extend(issue(&http, &server, u, ts_ms).await);
    }
    eventually("the fake to accept some of the second wave", || async {
        let accepted = acceptances(&fake);
        (accepted.keys().filter(|push| !first_wave.contains(*push)).count() >= 2).then_some(())
    })
    .await;
    let pid = server.child.id().expect("running").to_string();
    std::process::Command::new("kill").args(["-9", &pid]).status().expect("kill runs");
    server.child.wait().await.expect("the killed server is reaped");
    // Every request that reached the fake before this came from the killed node.
    let killed_at_us = now_us();
    let accepted_before_restart = acceptances(&fake).len();
    assert!(accepted_before_restart < expected.len(), "the kill came before every push was accepted");

    fake.clear_faults();
    let server = start(&store_args, &fake).await;
    let all_recorded = json!({"delivered": expected.len(), "retrying": 0, "failed": 0, "dead_token": 0});
    eventually("every push recorded as delivered after the restart", || async {
        (delivered(&http, &server).await == all_recorded).then_some(())
    })
    .await;

    let accepted = acceptances(&fake);
    let pushes: BTreeSet<(String, String)> = accepted.keys().cloned().collect();
    assert_eq!(pushes, expected, "every push of every coupon accepted by its provider, and no other");
    for push in &first_wave {
        assert_eq!(
            accepted[push].len(),
            1,
            "recorded before the kill, so never sent again: {push:?} at {:?}, killed at {killed_at_us}",
            accepted[push]
        );
    }
    let mut in_the_window = 0;
    for (push, times) in &accepted {
        if times.len() > 1 {
            in_the_window += 1;
            assert_eq!(times.len(), 2, "{push:?} accepted {} times", times.len());
            assert!(
                times[0] < killed_at_us && times[1] > killed_at_us,
                "{push:?} accepted twice outside the window: first on a request of the killed node, \
                 again after the restart ({times:?}, killed at {killed_at_us})"
            );
        }
    }
    assert!(in_the_window <= 2 * CONCURRENCY, "{in_the_window} duplicates: more than the killed node had in flight");
    let after_restart = accepted.values().filter(|times| times[0] > killed_at_us).count();
    assert!(after_restart > 0, "some pushes were left to the restarted node");
    let apns_after_restart = fake.received_by("apns").iter().filter(|r| r.received_at_us > killed_at_us).count();
    let refused: Vec<_> = fake.received().into_iter().filter(|r| r.status != 200 && r.provider != "oauth").collect();
    assert!(refused.is_empty(), "the fake refused {refused:?}");
    eprintln!(
        "accepted before the restart {accepted_before_restart}, first accepted after it {after_restart}, \
         accepted twice (the window) {in_the_window}, APNs requests after the restart {apns_after_restart}"
    );
    let mut server = server;
    server.child.kill().await.expect("the server stops");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_mid_delivery_on_the_embedded_store_delivers_the_rest_after_restart() {
    let data = tempfile::tempdir().unwrap();
    let args =
        vec!["--data-dir".into(), data.path().display().to_string(), "--checkpoint-interval-ms".into(), "200".into()];
    killed_mid_delivery_delivers_the_rest(args).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_mid_delivery_on_redis_delivers_the_rest_after_restart() {
    let redis = RedisServer::start();
    killed_mid_delivery_delivers_the_rest(vec!["--redis-url".into(), redis.url()]).await;
}
