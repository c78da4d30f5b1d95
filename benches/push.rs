//! Push delivery throughput and latency (issue 8: "pushes/s to `kabao fake-push` over HTTP/2 +
//! TLS on this machine, target ≥ 20 k/s, and the latency from issuance to the provider's
//! receipt (p50/p99) under that load").
//!
//! Everything real but the phones: a `MemoryStore` with one device per user (half FCM, half
//! APNs), coupons issued through `IssueStore::commit` (which writes the outbox entries in the
//! same step), kabao's `Dispatcher` with the FCM and APNs clients built by
//! `providers_from_config`, and `kabao fake-push` in the same process on a loopback port,
//! checking every OAuth2 token, APNs JWT and header as in the tests. Both share this machine's
//! cores.
//!
//! 1. **Throughput**: `PUSHES` coupons are issued first, then the dispatcher starts; the clock
//!    runs until the fake has accepted every push.
//! 2. **Latency under load**: the dispatcher running, coupons are issued at a steady `RATE` per
//!    second (in 1 ms ticks) for `SECONDS`; each push's latency is the fake's receipt time
//!    minus the moment its coupon's commit returned.
//!
//! The fake keeps a receipt per push (`--record receipts`) rather than every request whole,
//! unless `KABAO_BENCH_RECORD=full`.
//!
//! `cargo bench --bench push` (env `KABAO_BENCH_PUSHES`, `KABAO_BENCH_RATE`,
//! `KABAO_BENCH_SECONDS`, `KABAO_BENCH_CONCURRENCY`, `KABAO_BENCH_CONNECTIONS` (default: API.md's
//! `push_connections`), `KABAO_BENCH_RECORD`; results: BENCHMARKS.md "Push").

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;
use kabao::config::PushConfig;
use kabao::dispatch::providers_from_config;
use kabao::dispatch::worker::{DispatchConfig, Dispatcher};
use kabao::domain::{CampaignDoc, CampaignId, Caps, CouponId, DeviceId, FenceId, UserId};
use kabao::fakepush::{self, FakePush, FakePushConfig, Record};
use kabao::store::memory::MemoryStore;
use kabao::store::{
    CampaignStore, Device, DeviceStore, IssueCandidate, IssueRequest, IssueStore, IssuedCoupon, OutboxStore, Platform,
    Store, UserCommit, UserCommitResult,
};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn unix_us() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("clock after 1970").as_micros() as i64
}

fn user(i: usize) -> UserId {
    UserId::parse("user_id", &format!("u{i}")).expect("valid user id")
}

/// The coupon of campaign `bench` for user `i` at `ts_ms`.
fn candidate(campaign: &CampaignId, i: usize, ts_ms: i64) -> IssueCandidate {
    let user_id = user(i);
    IssueCandidate {
        coupon: IssuedCoupon {
            coupon_id: CouponId::derive(campaign, &user_id, ts_ms),
            user_id,
            campaign_id: campaign.clone(),
            fence_id: FenceId::parse("fence_id", "store-1").expect("valid fence id"),
            merchant_id: None,
            title: "20% off coffee".into(),
            body: Some("Show this at the counter".into()),
            deep_link: Some("kabao://coupon".into()),
            image_url: None,
            issued_at_ms: ts_ms,
            expires_at_ms: Some(ts_ms + 86_400_000),
        },
        caps: Caps::default(),
        audience_tags: Arc::from(Vec::new()),
    }
}

/// Issues one coupon to each of `users` at `ts_ms` in one commit; returns when it is durable
/// (here: in memory), as a ping's reply would.
async fn issue(store: &MemoryStore, campaign: &CampaignId, users: std::ops::Range<usize>, ts_ms: i64) {
    let commits = users
        .map(|i| UserCommit {
            user_id: user(i),
            expected_version: 0,
            new_state: None,
            new_version: 0,
            keep_for_ms: 3_600_000,
            issues: vec![IssueRequest {
                user_id: user(i),
                ts_ms,
                seq: 0,
                daily_cap: 0,
                candidates: vec![candidate(campaign, i, ts_ms)],
            }],
        })
        .collect();
    for result in store.commit(commits).await.expect("commit") {
        assert!(matches!(result, UserCommitResult::Committed { .. }), "a fresh user commits: {result:?}");
    }
}

/// CPU time (user + system, in seconds) this process's threads have used so far: the fake's
/// (its own runtime's threads, named `fake-push`) and the rest (kabao's dispatcher and clients,
/// the bench's issuing). Read from `/proc/self/task/*/stat` at Linux's 100 ticks per second.
fn cpu_seconds() -> (f64, f64) {
    let (mut fake, mut rest) = (0u64, 0u64);
    for task in std::fs::read_dir("/proc/self/task").into_iter().flatten().flatten() {
        let path = task.path();
        let Ok(stat) = std::fs::read_to_string(path.join("stat")) else { continue };
        // After the `(name)`, which may hold spaces, come state (field 3) … utime (14), stime (15).
        let Some((_, after)) = stat.rsplit_once(')') else { continue };
        let fields: Vec<&str> = after.split_whitespace().collect();
        let tick = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
        let ticks = tick(11) + tick(12);
        if std::fs::read_to_string(path.join("comm")).is_ok_and(|c| c.trim() == "fake-push") {
            fake += ticks;
        } else {
            rest += ticks;
        }
    }
    (fake as f64 / 100.0, rest as f64 / 100.0)
}

/// The CPU spent since `since` (a [`cpu_seconds`] reading) on `pushes` pushes.
fn report_cpu(phase: &str, since: (f64, f64), wall: Duration, pushes: usize) {
    let now = cpu_seconds();
    let (fake, rest) = (now.0 - since.0, now.1 - since.1);
    let per_push = |s: f64| s * 1e6 / pushes as f64;
    println!(
        "  {phase} CPU: {:.2} s in {:.2} s wall ({:.0} % of one core); kabao + bench {:.2} s ({:.1} µs/push), \
         the fake {:.2} s ({:.1} µs/push, {:.0} % of the CPU used)",
        fake + rest,
        wall.as_secs_f64(),
        (fake + rest) * 100.0 / wall.as_secs_f64(),
        rest,
        per_push(rest),
        fake,
        per_push(fake),
        fake * 100.0 / (fake + rest).max(f64::MIN_POSITIVE),
    );
}

/// Waits until the fake has accepted `expected` pushes since it started.
async fn until_accepted(fake: &FakePush, expected: usize) {
    loop {
        if fake.accepted() >= expected as u64 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let pushes: usize = env_or("KABAO_BENCH_PUSHES", 100_000);
    let rate: usize = env_or("KABAO_BENCH_RATE", 20_000);
    let seconds: usize = env_or("KABAO_BENCH_SECONDS", 5);
    let concurrency: usize = env_or("KABAO_BENCH_CONCURRENCY", 256);
    let connections: usize = env_or("KABAO_BENCH_CONNECTIONS", PushConfig::default().connections_per_provider);
    let record = match std::env::var("KABAO_BENCH_RECORD").as_deref() {
        Ok("full") => Record::Full,
        _ => Record::Receipts,
    };
    let users = pushes.max(rate);

    let dir = std::env::temp_dir().join(format!("kabao-bench-push-{}", std::process::id()));
    // The fake on a runtime of its own, so that its CPU time can be told from kabao's.
    let fake_runtime =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).thread_name("fake-push").enable_all().build()?;
    let fake =
        fake_runtime.spawn(fakepush::start(FakePushConfig { record, ..FakePushConfig::for_tests(&dir) })).await??;
    let push = PushConfig {
        concurrency_per_provider: concurrency,
        connections_per_provider: connections,
        ..fake.push_config()
    };
    let store = Arc::new(MemoryStore::new());
    let providers = providers_from_config(&push, store.clone())?;
    let doc: CampaignDoc = serde_json::from_value(serde_json::json!({
        "id": "bench", "name": "bench", "coupon": {"title": "20% off coffee"},
        "fences": [{"id": "store-1", "type": "circle", "center": [114.0579, 22.5431], "radius_m": 150}],
    }))?;
    let campaign_id = CampaignId::parse("id", "bench").expect("valid id");
    let campaign = doc.validate(|| campaign_id.clone()).map_err(|e| anyhow::anyhow!("{e:?}"))?;
    store.insert_campaign(campaign).await?;
    for i in 0..users {
        let device = if i % 2 == 0 {
            Device { platform: Platform::Fcm, token: format!("fcm-token-{i:08}"), tags: vec![], locale: None }
        } else {
            Device { platform: Platform::Apns, token: format!("{i:064x}"), tags: vec![], locale: None }
        };
        store.put_device(&user(i), &DeviceId::parse("device_id", "phone").expect("valid id"), device).await?;
    }

    // 1. Throughput: a full outbox, drained.
    let t0_ms = SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis() as i64 - 3_600_000;
    for start in (0..pushes).step_by(1000) {
        issue(&store, &campaign_id, start..(start + 1000).min(pushes), t0_ms).await;
    }
    assert_eq!(store.outbox_len().await?, pushes as u64);
    let issued = Arc::new(Notify::new());
    let shutdown = CancellationToken::new();
    let dispatch = DispatchConfig::from_push(&push);
    let dispatcher = Dispatcher::new(store.clone() as Arc<dyn Store>, providers, dispatch, "bench".into());
    let started = Instant::now();
    let cpu = cpu_seconds();
    let running = tokio::spawn(dispatcher.run(issued.clone(), shutdown.clone()));
    until_accepted(&fake, pushes).await;
    let elapsed = started.elapsed();
    println!(
        "throughput: {pushes} pushes (half FCM, half APNs) in {:.2} s = {:.0} pushes/s \
         (concurrency {concurrency}, {connections} connections per provider; the fake records {record:?})",
        elapsed.as_secs_f64(),
        pushes as f64 / elapsed.as_secs_f64()
    );
    report_cpu("throughput", cpu, elapsed, pushes);
    while store.outbox_len().await? > 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    let stats = fake.stats();
    println!(
        "token endpoint requests: {} (access tokens are reused); TLS connections the fake accepted: {}",
        stats.oauth.requests, stats.connections
    );

    // 2. Latency under a steady load.
    fake.clear_received();
    let total = rate * seconds;
    let per_tick = rate / 1000;
    let mut issued_at_us: HashMap<String, i64> = HashMap::with_capacity(total);
    let mut ticks = tokio::time::interval(Duration::from_millis(1));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let load_started = Instant::now();
    let cpu = cpu_seconds();
    let mut sent = 0;
    let mut tick = 0i64;
    while sent < total {
        ticks.tick().await;
        tick += 1;
        let ts_ms = t0_ms + 1 + tick;
        let batch = per_tick.min(total - sent);
        // Users cycle; each tick's ts makes a new coupon for them.
        let first = sent % users;
        let range = first..(first + batch).min(users);
        issue(&store, &campaign_id, range.clone(), ts_ms).await;
        let now = unix_us();
        for i in range.clone() {
            issued_at_us.insert(CouponId::derive(&campaign_id, &user(i), ts_ms).as_str().to_owned(), now);
        }
        issued.notify_one();
        sent += range.len();
    }
    let issuing = load_started.elapsed();
    until_accepted(&fake, pushes + sent).await;
    let drained = load_started.elapsed();
    let mut latency = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?;
    for r in fake.receipts() {
        if let Some(at) = issued_at_us.get(&r.coupon_id) {
            latency.record((r.received_at_us - at).max(1) as u64)?;
        }
    }
    println!(
        "latency at {:.0} pushes/s offered ({sent} in {:.2} s; all received {:.2} s after the first): p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({} measured)",
        sent as f64 / issuing.as_secs_f64(),
        issuing.as_secs_f64(),
        drained.as_secs_f64(),
        latency.value_at_quantile(0.5) as f64 / 1000.0,
        latency.value_at_quantile(0.99) as f64 / 1000.0,
        latency.max() as f64 / 1000.0,
        latency.len(),
    );
    report_cpu("latency", cpu, drained, sent);
    shutdown.cancel();
    running.await?;
    fake_runtime.shutdown_background();
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
