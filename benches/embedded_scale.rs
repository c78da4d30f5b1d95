//! Issue 7's scale figures for the embedded store, on the real `kabao serve`:
//!
//! 1. a data dir holding one campaign of `--fences` circles (100 000) and no coupons: the
//!    server's time to ready and its resident memory, after start and after the wallet reads
//!    below (the baseline);
//! 2. the same data dir after `--coupons` (5 000 000) coupons were issued into it through the
//!    store's own `commit` (5 a user, over 1 000 000 users, big group-committed requests so the
//!    fill takes minutes, not hours): time to ready, resident memory, and `GET
//!    /v1/users/{id}/coupons` latency (p50/p99/max over `--reads` sequential requests on one
//!    keep-alive connection, random users);
//! 3. the same again after a second campaign brings the fences to `--big-fences` (1 000 000):
//!    time to ready with 1 M fences and 5 M coupons on disk.
//!
//! `cargo bench --bench embedded_scale` (options after `--`: `--fences N --big-fences N
//! --coupons N --reads N --dir PATH [--serve-only]`; `--serve-only` serves an existing `--dir` as
//! it is and reads `--reads` wallets of its `--coupons` users). Needs a few GB of disk; the
//! directory is removed at the end unless `--dir` was given. Prints one table.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kabao::domain::{Campaign, CampaignId, Caps, Circle, Fence, FenceId, LatLon, Shape, UserId};
use kabao::store::embedded::{EmbeddedConfig, EmbeddedStore};
use kabao::store::{contract, IssueRequest, Store, UserCommit};

#[path = "../tests/support/mod.rs"]
mod support;

/// Users the coupons go to (each gets `coupons / USERS` of them), or fewer for a small run.
const USERS: usize = 1_000_000;
const USERS_PER_COMMIT: usize = 2_000;
const ADMIN: &str = "scale-admin";

struct Options {
    fences: usize,
    big_fences: usize,
    coupons: usize,
    reads: usize,
    dir: Option<PathBuf>,
    /// Only serve `dir` as it is and read wallets of users who hold coupons (`--serve-only`).
    serve_only: bool,
}

fn options() -> Options {
    let mut o = Options {
        fences: 100_000,
        big_fences: 1_000_000,
        coupons: 5_000_000,
        reads: 20_000,
        dir: None,
        serve_only: false,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        let value = || args.get(i + 1).cloned().unwrap_or_default();
        let number = || value().replace('_', "").parse::<usize>().expect("a number after the option");
        match args[i].as_str() {
            "--fences" => o.fences = number(),
            "--big-fences" => o.big_fences = number(),
            "--coupons" => o.coupons = number(),
            "--reads" => o.reads = number(),
            "--dir" => o.dir = Some(PathBuf::from(value())),
            "--serve-only" => {
                o.serve_only = true;
                i += 1;
                continue;
            }
            _ => {
                i += 1;
                continue;
            }
        }
        i += 2;
    }
    o
}

/// `n` circles of 100 m on a grid over a country-sized area, ids `{prefix}{i}`.
fn fences(prefix: &str, n: usize) -> Vec<Fence> {
    let side = (n as f64).sqrt().ceil() as usize;
    (0..n)
        .map(|i| Fence {
            id: FenceId::parse("f", &format!("{prefix}{i}")).unwrap(),
            shape: Shape::Circle(Circle {
                center: LatLon::new(20.0 + (i / side) as f64 * 0.02, 100.0 + (i % side) as f64 * 0.02).unwrap(),
                radius_m: 100.0,
            }),
            rings: None,
        })
        .collect()
}

fn user(n: usize) -> UserId {
    UserId::parse("u", &format!("user-{n}")).unwrap()
}

/// One request of `USERS_PER_COMMIT` users, each issued one coupon of `campaign` at `ts_ms`
/// (valid for 30 days, so each also writes its expiry key).
fn commits(first_user: usize, users: usize, campaign: &CampaignId, ts_ms: i64) -> Vec<UserCommit> {
    (first_user..first_user + USERS_PER_COMMIT)
        .map(|n| {
            let user = user(n % users);
            let mut candidate = contract::candidate(campaign.as_str(), user.as_str(), ts_ms, Caps::default());
            candidate.coupon.expires_at_ms = Some(ts_ms + 30 * 86_400_000);
            let mut commit = contract::commit_of(user.as_str(), 0, None, 0);
            commit.issues =
                vec![IssueRequest { user_id: user, ts_ms, seq: 0, daily_cap: 0, candidates: vec![candidate] }];
            commit
        })
        .collect()
}

/// Issues `coupons` coupons into the store in `dir`; answers coupons/s.
async fn fill(dir: &Path, campaign: &CampaignId, coupons: usize, users: usize) -> f64 {
    let store: Arc<dyn Store> = EmbeddedStore::open(EmbeddedConfig::new(dir)).unwrap();
    let now = kabao::engine::now_ms();
    let requests = coupons / USERS_PER_COMMIT;
    let started = Instant::now();
    // Two requests in flight, as two ingest workers would send them.
    let workers: Vec<_> = (0..2)
        .map(|w| {
            let store = store.clone();
            let campaign = campaign.clone();
            tokio::spawn(async move {
                for r in (w..requests).step_by(2) {
                    let first = r * USERS_PER_COMMIT;
                    // Round `first / users` of users: a distinct time, so a distinct coupon.
                    let ts_ms = now - 7 * 86_400_000 + (first / users) as i64 * 3_600_000;
                    let results = store.commit(commits(first, users, &campaign, ts_ms)).await.expect("commit");
                    assert_eq!(results.len(), USERS_PER_COMMIT);
                }
            })
        })
        .collect();
    for w in workers {
        w.await.unwrap();
    }
    let rate = (requests * USERS_PER_COMMIT) as f64 / started.elapsed().as_secs_f64();
    store.close().await.unwrap();
    rate
}

async fn add_campaign(dir: &Path, id: &str, fences: Vec<Fence>) {
    let store: Arc<dyn Store> = EmbeddedStore::open(EmbeddedConfig::new(dir)).unwrap();
    store.insert_campaign(Campaign::new(CampaignId::parse("c", id).unwrap(), "20% off coffee", fences)).await.unwrap();
    store.close().await.unwrap();
}

fn rss_mb(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    kb / 1024.0
}

struct Served {
    ready_s: f64,
    rss_ready_mb: f64,
    rss_after_reads_mb: f64,
    wallet_ms: Option<(f64, f64, f64)>,
}

/// Starts `kabao serve` on `dir`, waits for `/readyz`, reads `reads` random wallets, stops it.
async fn serve(dir: &Path, reads: usize, users: usize, users_with_coupons: bool) -> Served {
    // The store this program used lets go of the directory when its writer thread ends, a moment
    // after it is dropped: until then kabao refuses the directory, and is started again.
    let mut attempts = 0;
    let (mut child, started, base) = loop {
        let started = Instant::now();
        let mut child = support::serve_command(ADMIN).arg("--data-dir").arg(dir).spawn().expect("kabao starts");
        match support::try_listening(&mut child).await {
            Some(base) => break (child, started, base),
            None => {
                attempts += 1;
                assert!(attempts < 100, "kabao keeps exiting before listening on {}", dir.display());
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    let pid = child.id().unwrap();
    let client = reqwest::Client::new();
    loop {
        if let Ok(r) = client.get(format!("{base}/readyz")).send().await {
            if r.status() == 200 {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let ready_s = started.elapsed().as_secs_f64();
    let rss_ready_mb = rss_mb(pid);
    let mut latencies = hdrhistogram::Histogram::<u64>::new(3).unwrap();
    let mut seed: u64 = 0x9E37_79B9_7F4A_7C15;
    for _ in 0..reads {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let u = user(seed as usize % users);
        let sent = Instant::now();
        let reply = client
            .get(format!("{base}/v1/users/{}/coupons", u.as_str()))
            .bearer_auth(ADMIN)
            .send()
            .await
            .expect("wallet read");
        assert_eq!(reply.status(), 200);
        let body: serde_json::Value = reply.json().await.unwrap();
        latencies.record(sent.elapsed().as_micros() as u64).unwrap();
        let held = body["coupons"].as_array().map_or(0, Vec::len);
        assert_eq!(held > 0, users_with_coupons, "wallet of {}: {body}", u.as_str());
    }
    let rss_after_reads_mb = rss_mb(pid);
    child.kill().await.unwrap();
    let ms = |q: f64| latencies.value_at_quantile(q) as f64 / 1000.0;
    Served {
        ready_s,
        rss_ready_mb,
        rss_after_reads_mb,
        wallet_ms: (reads > 0).then(|| (ms(0.5), ms(0.99), latencies.max() as f64 / 1000.0)),
    }
}

fn row(what: &str, s: &Served) {
    let wallet = s.wallet_ms.map_or("–".to_owned(), |(p50, p99, max)| format!("{p50:.2} / {p99:.2} / {max:.2} ms"));
    println!("| {what} | {:.2} s | {:.0} MB | {:.0} MB | {wallet} |", s.ready_s, s.rss_ready_mb, s.rss_after_reads_mb);
}

fn main() {
    let o = options();
    let scratch = tempfile::tempdir().unwrap();
    let dir = o.dir.clone().unwrap_or_else(|| scratch.path().join("data"));
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let campaign = CampaignId::parse("c", "coffee").unwrap();
        let users = o.coupons.clamp(1, USERS);
        if o.serve_only {
            let served = serve(&dir, o.reads, users, true).await;
            row(&format!("{} as it is", dir.display()), &served);
            return;
        }
        add_campaign(&dir, "coffee", fences("a", o.fences)).await;
        let empty = serve(&dir, o.reads, users, false).await;
        let rate = fill(&dir, &campaign, o.coupons, users).await;
        let full = serve(&dir, o.reads, users, true).await;
        add_campaign(&dir, "tea", fences("b", o.big_fences.saturating_sub(o.fences))).await;
        let big = serve(&dir, o.reads / 4, users, true).await;
        let disk: u64 = walk_size(&dir);

        println!("fill: {} coupons at {rate:.0} coupons/s; data dir {:.0} MB", o.coupons, disk as f64 / 1e6);
        println!();
        println!("| data dir | time to ready | RSS at ready | RSS after wallet reads | wallet GET p50 / p99 / max |");
        println!("| --- | ---: | ---: | ---: | ---: |");
        row(&format!("{} fences, no coupons (baseline)", o.fences), &empty);
        row(&format!("{} fences, {} coupons", o.fences, o.coupons), &full);
        row(&format!("{} fences, {} coupons", o.big_fences, o.coupons), &big);
        println!();
        println!(
            "RSS ratio after reads, {} coupons against none: {:.2}×",
            o.coupons,
            full.rss_after_reads_mb / empty.rss_after_reads_mb
        );
    });
}

fn walk_size(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => walk_size(&e.path()),
                    Ok(m) => m.len(),
                    Err(_) => 0,
                })
                .sum()
        })
        .unwrap_or(0)
}
