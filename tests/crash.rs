//! Crash tests of the embedded store: the real `kabao` binary as a child process, killed with
//! SIGKILL at seeded random moments of a replay that issues coupons, restarted on the same data
//! directory, the client retrying every request that failed. The final wallets, campaign stats
//! and push counts must be exactly those of the same replay on a server that never crashed.
//!
//! API.md rule 7 lets a crashed single node lose up to the last checkpoint interval of stays that
//! issued nothing (never a stay that issued). So the replay pauses for more than one checkpoint
//! interval before each request it kills the server under, and kills it while that request is
//! in flight; whatever the request had done is then either on disk or redone by its retry.

mod support;

use std::path::Path;
use std::time::Duration;

use rand::{Rng, SeedableRng};
use reqwest::StatusCode;
use serde_json::{json, Value};
use support::{serve_command, Server};
use tokio::process::Command;

const ADMIN: &str = "crash-admin";
/// The shop: users walk between here and 400 m north.
const LAT: f64 = 22.5431;
const LON: f64 = 114.0579;
const USERS: usize = 12;
const STEPS: usize = 36;
const CHECKPOINT_MS: u64 = 200;

async fn start(data_dir: &Path) -> Server {
    Server::spawn(
        serve_command(ADMIN)
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--checkpoint-interval-ms", &CHECKPOINT_MS.to_string()]),
    )
    .await
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64
}

/// Step `step` of the replay: every user, inside the shop or 400 m away on a pattern of its own
/// (so users enter, stay, leave and come back at different steps), one request per step.
fn step_pings(base_ts: i64, step: usize) -> Value {
    let pings: Vec<Value> = (0..USERS)
        .map(|u| {
            // Stays of six steps, two steps away, each user phase-shifted.
            let inside = (step + 3 * u) % 8 < 6;
            let lat = if inside { LAT } else { LAT + 0.0036 };
            json!({"user_id": format!("u{u}"), "lat": lat, "lon": LON, "ts_ms": base_ts + step as i64 * 20_000})
        })
        .collect();
    json!({ "pings": pings })
}

async fn setup(http: &reqwest::Client, base: &str) {
    let campaign = json!({
        "id": "shop", "merchant": {"id": "m"}, "coupon": {"title": "10% off", "valid_for_s": 86400},
        "fences": [{"id": "door", "type": "circle", "center": [LON, LAT], "radius_m": 100}],
        "caps": {"total_max": 58},
    });
    let reply = http.post(format!("{base}/v1/campaigns")).bearer_auth(ADMIN).json(&campaign).send().await.unwrap();
    assert_eq!(reply.status(), StatusCode::CREATED);
    for u in 0..USERS {
        let device = json!({"platform": if u % 2 == 0 { "fcm" } else { "apns" }, "token": format!("tok-{u}")});
        let url = format!("{base}/v1/users/u{u}/devices/phone");
        let reply = http.put(url).bearer_auth(ADMIN).json(&device).send().await.unwrap();
        assert_eq!(reply.status(), StatusCode::OK);
    }
}

/// Sends one request until it succeeds, restarting the server whenever it is down.
async fn send_until_ok(http: &reqwest::Client, server: &mut Server, data_dir: &Path, body: &Value) {
    for _ in 0..50 {
        let reply = http.post(format!("{}/v1/pings", server.base)).bearer_auth(ADMIN).json(body).send().await;
        match reply {
            Ok(r) if r.status() == StatusCode::OK => return,
            Ok(r) if r.status().is_server_error() || r.status() == StatusCode::TOO_MANY_REQUESTS => {}
            Ok(r) => panic!("unexpected {}: {}", r.status(), r.text().await.unwrap_or_default()),
            Err(_) => {
                // The server is gone (killed): start it again on the same data.
                let _ = server.child.wait().await;
                *server = start(data_dir).await;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the request never succeeded");
}

/// Wallets of every user, campaign stats once every push has an outcome.
async fn final_state(http: &reqwest::Client, base: &str) -> (Vec<Value>, Value) {
    let mut wallets = Vec::new();
    for u in 0..USERS {
        let reply = http.get(format!("{base}/v1/users/u{u}/coupons")).bearer_auth(ADMIN).send().await.unwrap();
        let body: Value = reply.json().await.unwrap();
        wallets.push(body["coupons"].clone());
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let stats: Value = http
            .get(format!("{base}/v1/campaigns/shop/stats"))
            .bearer_auth(ADMIN)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let pushed = stats["pushes"]["delivered"].as_u64().unwrap_or(0);
        if pushed == stats["issued"].as_u64().unwrap() || tokio::time::Instant::now() > deadline {
            return (wallets, stats);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn replay(data_dir: &Path, base_ts: i64, kills: &[usize], seed: u64) -> (Vec<Value>, Value) {
    let http = reqwest::Client::new();
    let mut server = start(data_dir).await;
    setup(&http, &server.base).await;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    for step in 0..STEPS {
        let body = step_pings(base_ts, step);
        if kills.contains(&step) {
            // Let the checkpoint take what issued nothing, then kill mid-request.
            tokio::time::sleep(Duration::from_millis(CHECKPOINT_MS * 3)).await;
            let pid = server.child.id().expect("running") as i32;
            let delay = Duration::from_micros(rng.gen_range(0..3_000));
            let killer = tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                std::process::Command::new("kill").args(["-9", &pid.to_string()]).status().expect("kill runs");
            });
            let reply = http.post(format!("{}/v1/pings", server.base)).bearer_auth(ADMIN).json(&body).send().await;
            killer.await.unwrap();
            let _ = server.child.wait().await;
            server = start(data_dir).await;
            // Whether or not it answered before the kill, the client sends it again: an answered
            // request is on disk and its retry must change nothing.
            eprintln!("killed at step {step}; the request had answered: {}", reply.is_ok());
            send_until_ok(&http, &mut server, data_dir, &body).await;
        } else {
            send_until_ok(&http, &mut server, data_dir, &body).await;
        }
    }
    let state = final_state(&http, &server.base).await;
    server.child.kill().await.unwrap();
    state
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_random_moments_loses_nothing_and_issues_nothing_twice() {
    let base_ts = now_ms() - STEPS as i64 * 20_000 - 60_000;
    let calm = tempfile::tempdir().unwrap();
    let (expected_wallets, expected_stats) = replay(calm.path(), base_ts, &[], 1).await;
    let issued = expected_stats["issued"].as_u64().unwrap();
    assert!(issued > 20, "the replay issues coupons: {expected_stats}");
    eprintln!("calm replay: {expected_stats}");

    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0x006b_6162_616f);
    // One kill in each quarter of the replay, at a seeded step.
    let quarter = STEPS / 4;
    let kills: Vec<usize> = (0..4).map(|q| q * quarter + rng.gen_range(1..quarter)).collect();
    let crashed = tempfile::tempdir().unwrap();
    let (wallets, stats) = replay(crashed.path(), base_ts, &kills, 2).await;
    assert_eq!(stats, expected_stats, "campaign stats after kills at steps {kills:?}");
    assert_eq!(wallets, expected_wallets, "wallets after kills at steps {kills:?}");
}

#[tokio::test]
async fn a_second_server_on_the_same_data_dir_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut first = start(dir.path()).await;
    let out = Command::new(env!("CARGO_BIN_EXE_kabao"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .env("KABAO_ADMIN_TOKEN", ADMIN)
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("kabao.fjall") && stderr.contains("in use"), "{stderr}");
    first.child.kill().await.unwrap();
}
