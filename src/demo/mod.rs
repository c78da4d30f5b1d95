//! `kabao demo`: a complete kabao in one process, fed by simulated shoppers.
//!
//! It starts the real server (in-memory store, `log` push provider) on a free port, registers
//! campaigns built from the merchant data shipped in `data/`, replays seeded shoppers walking
//! between those merchants through the real HTTP API, and prints what was issued, a summary per
//! campaign and the match latency that `/metrics` reports.

mod data;
mod scenario;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};

use crate::engine::now_ms;
use crate::sim::SimPing;

/// Options of `kabao demo`.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Folder holding `places/` and `polygons/` (the repository's `data/`).
    #[arg(long, default_value = "data")]
    pub data_dir: PathBuf,
    /// Simulated shoppers walking between venues.
    #[arg(long, default_value_t = 3000)]
    pub shoppers: usize,
    /// Seed of the simulation (same seed, same pings).
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// Pings per request.
    #[arg(long, default_value_t = 500)]
    pub batch: usize,
    /// Requests in flight at once (each carries a disjoint set of users).
    #[arg(long, default_value_t = 4)]
    pub concurrency: usize,
}

/// A running kabao the demo talks to.
pub struct DemoServer {
    /// `http://127.0.0.1:PORT`.
    pub base_url: String,
    /// Its admin token.
    pub admin_token: String,
}

/// Runs the demo against `server` (started by the caller) and prints the report.
pub async fn run(args: DemoArgs, server: DemoServer) -> anyhow::Result<()> {
    let started = Instant::now();
    let places = data::load_places(&args.data_dir.join("places/fsq_os_places_global_sample_10k.csv"))?;
    let tsinghua = data::load_polygons(&args.data_dir.join("polygons/tsinghua_campus_wgs84.geojson"))?;
    let beijing = data::load_polygons(&args.data_dir.join("polygons/beijing_municipality_boundary_osm.geojson"))?;
    let plans = scenario::campaigns(&places, &tsinghua, &beijing);

    let http = reqwest::Client::new();
    let api = Api { http: &http, base: &server.base_url, token: &server.admin_token };
    for plan in &plans {
        api.send(reqwest::Method::POST, "/v1/campaigns", &plan.doc).await.context("registering a campaign")?;
    }
    let fences: usize = plans.iter().map(|p| p.fences).sum();

    // Shoppers start walking three hours ago, so every ts_ms is well inside max_ping_age.
    let start_ms = now_ms() - 3 * 3_600_000;
    let mut pings = scenario::shoppers(&places, args.shoppers, args.seed, start_ms, "shopper-");
    let beijing_places: Vec<_> = places.iter().filter(|p| in_bbox(p.at, BEIJING_BBOX)).cloned().collect();
    pings.extend(scenario::shoppers(&beijing_places, args.shoppers / 10, args.seed + 1, start_ms, "bj-"));
    pings.extend(crate::sim::wanderers(TSINGHUA_BBOX, args.shoppers / 10, args.seed + 2, start_ms, "campus-"));
    pings.extend(crate::sim::wanderers(BEIJING_BBOX, args.shoppers / 20, args.seed + 3, start_ms, "city-"));
    let users: BTreeMap<&str, ()> = pings.iter().map(|p| (p.user_id.as_str(), ())).collect();
    for (i, user) in users.keys().enumerate() {
        // Every shopper has a phone; one in five is tagged VIP (for the audience campaign).
        let platform = if i % 2 == 0 { "fcm" } else { "apns" };
        let tags: Vec<&str> = if i % 5 == 0 { vec!["vip"] } else { vec![] };
        let device = json!({"platform": platform, "token": format!("demo-token-{i}"), "tags": tags});
        api.send(reqwest::Method::PUT, &format!("/v1/users/{user}/devices/phone"), &device).await?;
    }

    println!(
        "kabao demo: {} campaigns, {} fences from data/, {} shoppers, {} pings (seed {})",
        plans.len(),
        fences,
        users.len(),
        pings.len(),
        args.seed
    );
    let replay = replay(&api, pings, args.batch.clamp(1, 10_000), args.concurrency.max(1)).await?;
    let venue_names: HashMap<&str, &str> = places.iter().map(|p| (p.id.as_str(), p.name.as_str())).collect();
    report(&api, &plans, &replay, &venue_names, started.elapsed()).await
}

/// Bounding box of the Tsinghua outline, a little wider so wanderers cross its edge.
const TSINGHUA_BBOX: [f64; 4] = [116.300, 39.985, 116.337, 40.020];
/// Central Beijing, where the places sample has its Beijing venues.
const BEIJING_BBOX: [f64; 4] = [116.0, 39.6, 116.8, 40.2];

fn in_bbox(p: crate::domain::LatLon, [min_lon, min_lat, max_lon, max_lat]: [f64; 4]) -> bool {
    (min_lon..=max_lon).contains(&p.lon) && (min_lat..=max_lat).contains(&p.lat)
}

struct Api<'a> {
    http: &'a reqwest::Client,
    base: &'a str,
    token: &'a str,
}

impl Api<'_> {
    async fn send(&self, method: reqwest::Method, path: &str, body: &Value) -> anyhow::Result<Value> {
        let response =
            self.http.request(method, format!("{}{path}", self.base)).bearer_auth(self.token).json(body).send().await?;
        let status = response.status();
        let text = response.text().await?;
        if !status.is_success() {
            bail!("{path} answered {status}: {text}");
        }
        Ok(if text.is_empty() { Value::Null } else { serde_json::from_str(&text)? })
    }

    async fn get(&self, path: &str) -> anyhow::Result<String> {
        let response = self.http.get(format!("{}{path}", self.base)).bearer_auth(self.token).send().await?;
        Ok(response.error_for_status()?.text().await?)
    }
}

struct Replay {
    pings: usize,
    ignored: BTreeMap<String, u64>,
    events: Vec<Value>,
    elapsed: Duration,
    request_latency: hdrhistogram::Histogram<u64>,
}

/// Sends the pings in batches. Each worker owns a disjoint set of users and sends their pings in
/// time order, so no user's pings race each other.
async fn replay(api: &Api<'_>, mut pings: Vec<SimPing>, batch: usize, workers: usize) -> anyhow::Result<Replay> {
    pings.sort_by_key(|p| p.ts_ms);
    let total = pings.len();
    let mut lanes: Vec<Vec<SimPing>> = vec![Vec::new(); workers];
    for p in pings {
        let lane = p.user_id.bytes().fold(0usize, |h, b| h.wrapping_mul(31).wrapping_add(b as usize)) % workers;
        lanes[lane].push(p);
    }
    let bar = ProgressBar::new(total as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:40.cyan/blue} {pos}/{len} pings  {per_sec}  eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let started = Instant::now();
    let results = futures::future::join_all(lanes.into_iter().map(|lane| {
        let bar = bar.clone();
        async move {
            let mut ignored: BTreeMap<String, u64> = BTreeMap::new();
            let mut events = Vec::new();
            let mut latency = hdrhistogram::Histogram::<u64>::new(3).expect("valid histogram bounds");
            for chunk in lane.chunks(batch) {
                let sent = Instant::now();
                let reply = api.send(reqwest::Method::POST, "/v1/pings", &json!({ "pings": chunk })).await?;
                latency.record(sent.elapsed().as_micros() as u64).ok();
                for item in reply["ignored"].as_array().into_iter().flatten() {
                    *ignored.entry(item["reason"].as_str().unwrap_or("?").to_owned()).or_default() += 1;
                }
                events.extend(reply["events"].as_array().into_iter().flatten().cloned());
                bar.inc(chunk.len() as u64);
            }
            anyhow::Ok((ignored, events, latency))
        }
    }))
    .await;
    bar.finish_and_clear();
    let mut replay = Replay {
        pings: total,
        ignored: BTreeMap::new(),
        events: Vec::new(),
        elapsed: started.elapsed(),
        request_latency: hdrhistogram::Histogram::new(3).expect("valid histogram bounds"),
    };
    for result in results {
        let (ignored, events, latency) = result?;
        for (k, v) in ignored {
            *replay.ignored.entry(k).or_default() += v;
        }
        replay.events.extend(events);
        replay.request_latency.add(latency).ok();
    }
    Ok(replay)
}

async fn report(
    api: &Api<'_>,
    plans: &[scenario::CampaignPlan],
    replay: &Replay,
    venue_names: &HashMap<&str, &str>,
    total: Duration,
) -> anyhow::Result<()> {
    println!("\nFirst coupons issued:");
    let mut events = replay.events.clone();
    events.sort_by_key(|e| e["ts_ms"].as_i64().unwrap_or(0));
    for e in events.iter().take(12) {
        let fence = e["fence_id"].as_str().unwrap_or("");
        let place: String = venue_names.get(fence).copied().unwrap_or(fence).chars().take(30).collect();
        println!(
            "  {:<14} {:<20} {:<26} at {}",
            e["user_id"].as_str().unwrap_or(""),
            e["campaign_id"].as_str().unwrap_or(""),
            e["coupon"]["title"].as_str().unwrap_or(""),
            place
        );
    }
    println!("  … {} coupons in all\n", events.len());

    println!("{:<22} {:>8} {:>10} {:>9} {:>9}", "campaign", "fences", "trigger", "issued", "redeemed");
    for plan in plans {
        let id = plan.doc["id"].as_str().unwrap_or("");
        let stats = api.send(reqwest::Method::GET, &format!("/v1/campaigns/{id}/stats"), &Value::Null).await?;
        let trigger = plan.doc["trigger"]["on"].as_str().unwrap_or("enter");
        let count = |name: &str| stats[name].as_u64().unwrap_or(0);
        println!("{:<22} {:>8} {:>10} {:>9} {:>9}", id, plan.fences, trigger, count("issued"), count("redeemed"));
    }

    let ignored: Vec<String> = replay.ignored.iter().map(|(k, v)| format!("{k} {v}")).collect();
    println!(
        "\nReplayed {} pings in {:.2} s ({:.0} pings/s over HTTP); ignored: {}",
        replay.pings,
        replay.elapsed.as_secs_f64(),
        replay.pings as f64 / replay.elapsed.as_secs_f64().max(1e-9),
        if ignored.is_empty() { "none".to_owned() } else { ignored.join(", ") }
    );
    let h = &replay.request_latency;
    println!(
        "Request latency (batches): p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        h.value_at_quantile(0.5) as f64 / 1000.0,
        h.value_at_quantile(0.99) as f64 / 1000.0,
        h.max() as f64 / 1000.0
    );
    let metrics = api.get("/metrics").await?;
    let quantiles = match_quantiles(&metrics);
    if quantiles.is_empty() {
        println!("Match latency: not reported by /metrics");
    } else {
        let parts: Vec<String> = quantiles.iter().map(|(q, ns)| format!("p{q} {ns:.0} ns")).collect();
        println!("Match time per ping (server side, sampled pings timed alone, from /metrics): {}", parts.join(", "));
    }
    println!("Demo finished in {:.1} s.", total.as_secs_f64());
    Ok(())
}

/// Estimates quantiles of `kabao_match_duration_seconds` from its Prometheus histogram buckets
/// (linear within a bucket, as Prometheus' `histogram_quantile` does), in nanoseconds.
fn match_quantiles(metrics: &str) -> Vec<(String, f64)> {
    let mut buckets: Vec<(f64, f64)> = metrics
        .lines()
        .filter_map(|line| {
            let rest = line.strip_prefix("kabao_match_duration_seconds_bucket{le=\"")?;
            let (le, count) = rest.split_once("\"}")?;
            let le = if le == "+Inf" { f64::INFINITY } else { le.parse().ok()? };
            Some((le, count.trim().parse().ok()?))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let Some(&(_, total)) = buckets.last() else { return Vec::new() };
    if total == 0.0 {
        return Vec::new();
    }
    [("50", 0.5), ("90", 0.9), ("99", 0.99), ("99.9", 0.999)]
        .into_iter()
        .filter_map(|(label, q)| {
            let rank = q * total;
            let i = buckets.iter().position(|&(_, c)| c >= rank)?;
            let (lo, below) = if i == 0 { (0.0, 0.0) } else { buckets[i - 1] };
            let (hi, count) = buckets[i];
            let seconds =
                if hi.is_infinite() { lo } else { lo + (hi - lo) * (rank - below) / (count - below).max(1.0) };
            Some((label.to_owned(), seconds * 1e9))
        })
        .collect()
}
