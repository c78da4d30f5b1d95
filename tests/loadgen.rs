//! `kabao loadgen` end to end: the real server on `127.0.0.1:0` (`Config::for_tests`, in-memory
//! store), fences registered by the load generator itself, a second of open-loop load; the
//! result must count every request the schedule holds and no error. No timing is asserted.

use std::sync::Arc;

use clap::Parser;
use kabao::app::Application;
use kabao::config::{Cli, Command, Config};
use kabao::loadgen::{execute, LoadgenArgs};
use kabao::store::memory::MemoryStore;
use tokio::sync::oneshot;

const ADMIN: &str = "loadgen-admin-token";
const SECRET: &str = "loadgen-client-secret";

/// A server; stops when the sender is dropped.
async fn server() -> (String, oneshot::Sender<()>) {
    let config = Config::for_tests(ADMIN, SECRET);
    let app = Application::build_with_store(config, Arc::new(MemoryStore::new())).await.expect("server builds");
    let url = format!("http://127.0.0.1:{}", app.port());
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(app.run_until_stopped(async move {
        let _ = stopped.await;
    }));
    (url, stop)
}

fn args(list: &[&str]) -> LoadgenArgs {
    let mut argv = vec!["kabao", "loadgen", "--quiet"];
    argv.extend_from_slice(list);
    match Cli::try_parse_from(argv).expect("parses").command {
        Command::Loadgen(a) => a,
        other => panic!("expected loadgen, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_pings_with_the_admin_token_over_city_fences() {
    let (url, _stop) = server().await;
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("result.json");
    let html = dir.path().join("report.html");
    let a = args(&[
        "--url",
        &url,
        "--admin-token",
        ADMIN,
        "--rate",
        "40",
        "--connections",
        "2",
        "--duration",
        "1s",
        "--warmup",
        "250ms",
        "--users",
        "20",
        "--create-fences",
        "2000",
        "--area",
        "city",
        "--json",
        json.to_str().unwrap(),
        "--report",
        html.to_str().unwrap(),
    ]);
    let result = execute(&a).await.expect("the run completes");
    // 40 requests are due in the measured second (slots 10..50 at 40/s); each is sent and answered.
    assert_eq!(result.requests, 40, "{result:?}");
    assert_eq!(result.ok, 40);
    assert_eq!(result.pings, 40);
    assert_eq!(result.accepted, 40);
    assert!(result.errors.is_empty(), "{:?}", result.errors);
    assert_eq!(result.timeline.iter().map(|s| s.requests).sum::<u64>(), 40);
    assert!(result.latency_ms.p50 > 0.0 && result.latency_ms.p50 <= result.latency_ms.max);

    kabao::loadgen::run(a).await.expect("the command runs again over the same fences");
    let written: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(written["requests"], 40);
    assert!(std::fs::read_to_string(&html).unwrap().contains("<svg"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_with_client_jwts_and_a_trajectory() {
    let (url, _stop) = server().await;
    let dir = tempfile::tempdir().unwrap();
    // A tiny generated trajectory (never GeoLife data): two users walking north in Beijing.
    let csv = dir.path().join("track.csv");
    let mut text = String::from("uid,latitude,longitude,time\n");
    for i in 0..30 {
        for user in ["a", "b"] {
            text.push_str(&format!("{user},{:.6},116.3,{}\n", 39.9 + i as f64 * 0.0001, 1_000 + i * 10));
        }
    }
    std::fs::write(&csv, text).unwrap();
    let fences = dir.path().join("fences.csv");
    std::fs::write(&fences, "lon,lat,radius_m\n116.3,39.9015,100\n").unwrap();

    let a = args(&[
        "--url",
        &url,
        "--admin-token",
        ADMIN,
        "--client-secret",
        SECRET,
        "--rate",
        "20",
        "--connections",
        "2",
        "--batch",
        "5",
        "--duration",
        "1s",
        "--warmup",
        "0s",
        "--fences-file",
        fences.to_str().unwrap(),
        "--trajectory",
        csv.to_str().unwrap(),
        "--columns",
        "user=uid,lat=latitude,lon=longitude,ts=time",
    ]);
    let result = execute(&a).await.expect("the run completes");
    assert_eq!(result.auth, "client");
    assert_eq!(result.users, 2);
    assert_eq!(result.requests, 20, "{result:?}");
    assert!(result.errors.is_empty(), "{:?}", result.errors);
    assert_eq!(result.pings, 100);
    assert_eq!(result.accepted, 100);
    // Each user walks through the fence once per pass over its 30 points: one coupon at least.
    assert!(result.events >= 1, "{result:?}");
}

/// `kabao_match_duration_seconds` holds sampled pings timed alone (one in 64), not one sample
/// per ping carrying its request's average.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn match_time_is_sampled_per_ping() {
    let (url, _stop) = server().await;
    let samples = || async {
        let text = reqwest::get(format!("{url}/metrics")).await.unwrap().text().await.unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix("kabao_match_duration_seconds_count "))
            .map_or(0, |n| n.trim().parse::<u64>().unwrap())
    };
    let before = samples().await;
    let a = args(&[
        "--url",
        &url,
        "--admin-token",
        ADMIN,
        "--rate",
        "4",
        "--connections",
        "1",
        "--batch",
        "640",
        "--duration",
        "1s",
        "--warmup",
        "0s",
        "--users",
        "640",
        "--create-fences",
        "100",
        "--area",
        "city",
    ]);
    let result = execute(&a).await.expect("the run completes");
    assert_eq!(result.pings, 2_560);
    let delta = samples().await - before;
    // 2 560 pings give 40 samples; the other tests of this binary (same process, same
    // recorder) may add a few of theirs.
    assert!((40..=100).contains(&delta), "{delta} samples for 2 560 pings");
}
