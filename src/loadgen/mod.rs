//! `kabao loadgen`: drives `POST /v1/pings` of a running kabao and measures it from outside.
//!
//! Open loop at a target rate (or flat out over K connections), from seeded simulated users or
//! a trajectory file, single pings or batches, with the admin token or a client JWT per user.
//! Each request's latency runs from its due time in the schedule ([`schedule`]), so a server that
//! stalls is charged for every request it held up, and goes into an HDR histogram. It can first
//! register the fence workload ([`fences`]). At the end it prints throughput, percentiles and
//! errors by status, and writes the result as JSON and as an HTML page with inline SVG
//! ([`report`]).
//!
//! The client ([`client`]) is HTTP/1.1 written over the socket, one keep-alive connection per
//! `--connections`, and request bodies are written by hand: the generator shares the machine
//! with the server it measures, so it should cost as little as it can.

pub mod client;
pub mod fences;
pub mod report;
pub mod schedule;
pub mod workload;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};

use crate::engine::now_ms;
use fences::{AreaKind, ShapeKind};
use report::{LoadResult, Minute, Percentiles, Second};
use schedule::Schedule;
use workload::{Columns, ConnectionWork, Credentials, Population};

/// A target rate: requests per second, or `max` (flat out, closed loop).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Rate {
    /// Requests per second across all connections (open loop).
    PerSecond(f64),
    /// As fast as the server answers (closed loop).
    Max,
}

impl std::str::FromStr for Rate {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s.eq_ignore_ascii_case("max") {
            return Ok(Rate::Max);
        }
        match s.parse::<f64>() {
            Ok(r) if r.is_finite() && r > 0.0 => Ok(Rate::PerSecond(r)),
            _ => Err(format!("{s:?} is neither a positive number of requests per second nor `max`")),
        }
    }
}

/// A duration as `30s`, `500ms`, `2m`, `1h`, or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (number, unit) = s.find(|c: char| c.is_ascii_alphabetic()).map_or((s, "s"), |i| s.split_at(i));
    let n: f64 = number.trim().parse().map_err(|_| format!("{s:?} is not a duration (e.g. 30s, 500ms, 2m)"))?;
    let seconds = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (ms, s, m, h)")),
    };
    if !(seconds.is_finite() && seconds >= 0.0) {
        return Err(format!("{s:?} is not a duration"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

/// Options of `kabao loadgen`.
#[derive(Debug, Clone, clap::Args)]
pub struct LoadgenArgs {
    /// Base URL of the kabao under test (plain HTTP).
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// The server's admin token: sends the pings (unless --client-secret) and creates fences.
    #[arg(long, env = "KABAO_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// The server's client JWT secret: each user's pings then go with its own JWT (`sub` = user),
    /// and a batch carries one user's pings. The server's per-user rate limit applies.
    #[arg(long, env = "KABAO_CLIENT_SECRET", hide_env_values = true)]
    pub client_secret: Option<String>,
    /// Requests per second (open loop: latency from each request's due time), or `max` (closed
    /// loop, each connection flat out).
    #[arg(long, default_value = "1000")]
    pub rate: Rate,
    /// Keep-alive connections; each user's pings always go over the same one.
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
    /// Pings per request (1 = single pings, up to 10 000).
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// How long requests are measured, after the warm-up (e.g. 30s, 2m).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Load sent before measuring starts (caches, connection set-up, the index warm).
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub warmup: Duration,
    /// Simulated users (moving over the fences' area; ignored with a trajectory).
    #[arg(long, default_value_t = 10_000)]
    pub users: usize,
    /// Users leaving per second, each replaced by a new user under a new id (simulated users
    /// from a fresh place, tracks from their start): ids keep changing, as in production. 0 = the
    /// same users throughout.
    #[arg(long, default_value_t = 0.0, value_name = "N")]
    pub user_churn_per_s: f64,
    /// Seed of the simulated users and generated fences (same seed, same workload).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Where simulated users move and generated fences lie: PERFORMANCE.md's country
    /// (≈ 1 100 × 1 000 km) or city (≈ 50 × 46 km).
    #[arg(long, value_enum, default_value = "country")]
    pub area: AreaKind,
    /// Replay a trajectory CSV instead of simulated users (columns named with --columns).
    #[arg(long, value_name = "FILE", conflicts_with = "plt")]
    pub trajectory: Option<PathBuf>,
    /// The trajectory CSV's columns: `user=…,lat=…,lon=…,ts=…` (ts: epoch ms or s, or RFC 3339).
    #[arg(long, default_value = "user=user,lat=lat,lon=lon,ts=ts")]
    pub columns: Columns,
    /// Replay a GeoLife directory (`Data/<user>/Trajectory/*.plt`) instead of simulated users.
    #[arg(long, value_name = "DIR")]
    pub plt: Option<PathBuf>,
    /// First register N generated fences (campaigns `loadgen-…` of 100 000 fences, replaced if
    /// they exist).
    #[arg(long, value_name = "N", conflicts_with = "fences_file")]
    pub create_fences: Option<usize>,
    /// Shape of the generated fences: circles 50 m–2 km, or small polygons.
    #[arg(long, value_enum, default_value = "circle")]
    pub shape: ShapeKind,
    /// The registered fences' campaigns trigger on a dwell of this many seconds instead of on
    /// enter (a dwell longer than the users stay issues nothing, while their stays are tracked).
    #[arg(long, value_name = "SECONDS")]
    pub dwell_s: Option<u64>,
    /// First register the fences of this file: CSV `lon,lat,radius_m` or GeoJSON polygons.
    #[arg(long, value_name = "FILE")]
    pub fences_file: Option<PathBuf>,
    /// Write the result as JSON here.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Write an HTML report (inline SVG: latency over time, percentile distribution) here.
    #[arg(long, value_name = "FILE")]
    pub report: Option<PathBuf>,
    /// No progress bar (it is also hidden when stderr is not a terminal).
    #[arg(long)]
    pub quiet: bool,
}

/// Runs `kabao loadgen`: the run, the printed summary, and the files asked for.
pub async fn run(args: LoadgenArgs) -> anyhow::Result<()> {
    let result = execute(&args).await?;
    print!("{}", result.summary());
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&result)?;
        std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))?;
        println!("result: {}", path.display());
    }
    if let Some(path) = &args.report {
        std::fs::write(path, result.html()).with_context(|| format!("writing {}", path.display()))?;
        println!("report: {}", path.display());
    }
    Ok(())
}

/// Where requests go.
#[derive(Debug, Clone)]
struct Target {
    /// `host:port` to connect to.
    addr: String,
    /// The `Host` header.
    host: String,
    /// `/…/v1/pings`.
    path: String,
}

fn target(url: &str) -> anyhow::Result<Target> {
    let uri: hyper::Uri = url.parse().with_context(|| format!("--url {url:?} is not a URL"))?;
    if uri.scheme_str() != Some("http") {
        bail!("--url must be plain http:// (the load generator speaks no TLS; put it next to the server)");
    }
    let authority = uri.authority().context("--url has no host")?;
    let port = authority.port_u16().unwrap_or(80);
    let base = uri.path().trim_end_matches('/');
    Ok(Target {
        addr: format!("{}:{port}", authority.host()),
        host: authority.as_str().to_owned(),
        path: format!("{base}/v1/pings"),
    })
}

/// Runs the load (after registering fences when asked) and returns what it measured.
pub async fn execute(args: &LoadgenArgs) -> anyhow::Result<LoadResult> {
    if args.batch == 0 || args.batch > crate::http::pings::MAX_BATCH {
        bail!("--batch must be 1..={}", crate::http::pings::MAX_BATCH);
    }
    if args.connections == 0 {
        bail!("--connections must be at least 1");
    }
    let target = target(&args.url)?;
    let credentials = match (&args.client_secret, &args.admin_token) {
        (Some(secret), _) => Credentials::Client(Arc::new(jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()))),
        (None, Some(token)) => Credentials::Admin(token.clone()),
        (None, None) => bail!("give --admin-token (or KABAO_ADMIN_TOKEN), or --client-secret for client JWTs"),
    };

    let mut area = args.area.bounds();
    let fence_set = match (args.create_fences, &args.fences_file) {
        (Some(n), _) => Some(fences::generate(n, args.shape, args.area, args.seed)),
        (None, Some(path)) => Some(fences::read_file(path)?),
        (None, None) => None,
    };
    if let Some(set) = fence_set {
        let token = args.admin_token.as_deref().context("creating fences needs --admin-token")?;
        area = set.bounds;
        register(&args.url, token, set, args.dwell_s, args.quiet).await?;
    }

    let population = match (&args.trajectory, &args.plt) {
        (Some(path), _) => Population::Tracks(workload::read_csv(path, &args.columns)?),
        (None, Some(dir)) => Population::Tracks(workload::read_plt_dir(dir)?),
        (None, None) => Population::Simulated { users: args.users, area, seed: args.seed },
    };
    let users = match &population {
        Population::Simulated { users, .. } => *users,
        Population::Tracks(tracks) => tracks.len(),
    };
    if !(args.user_churn_per_s.is_finite() && args.user_churn_per_s >= 0.0) {
        bail!("--user-churn-per-s must be a number ≥ 0");
    }
    let mut work = workload::split(population, args.connections, &credentials, args.batch, now_ms())?;
    // Users are dealt round-robin, so every connection holds the same share of them.
    let shares = work.len() as f64;
    work.iter_mut().for_each(|w| w.set_churn(args.user_churn_per_s / shares));

    let schedule = Schedule {
        rate: match args.rate {
            Rate::PerSecond(r) => Some(r),
            Rate::Max => None,
        },
        // Fewer users than connections leaves some connections without users.
        connections: work.len(),
        warmup: args.warmup,
        duration: args.duration,
    };
    let answered = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let bar = progress_bar(args.quiet, schedule.end());
    let ticker = {
        let (bar, answered) = (bar.clone(), answered.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            loop {
                tick.tick().await;
                let elapsed = start.elapsed();
                bar.set_position(elapsed.as_millis() as u64);
                let n = answered.load(Ordering::Relaxed);
                bar.set_message(format!("{n} requests, {:.0}/s", n as f64 / elapsed.as_secs_f64().max(1e-3)));
            }
        })
    };
    let tasks: Vec<_> = work
        .into_iter()
        .enumerate()
        .map(|(c, work)| tokio::spawn(connection(c, schedule, start, work, target.clone(), answered.clone())))
        .collect();
    let mut tally = Tally::default();
    for task in tasks {
        tally.merge(task.await.context("a connection task failed")?);
    }
    ticker.abort();
    bar.finish_and_clear();
    Ok(tally.result(args, &schedule, users, credentials))
}

fn progress_bar(quiet: bool, end: Duration) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(end.as_millis() as u64);
    bar.set_style(
        ProgressStyle::with_template("{spinner} {bar:40.cyan/blue} {elapsed}/{duration}  {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar
}

/// Registers `set` as campaigns: `PUT` (replace) first, `POST` when it does not exist yet.
async fn register(
    url: &str,
    token: &str,
    set: fences::FenceSet,
    dwell_s: Option<u64>,
    quiet: bool,
) -> anyhow::Result<()> {
    let total = set.fences.len();
    let http = reqwest::Client::builder().timeout(Duration::from_secs(600)).build()?;
    let base = url.trim_end_matches('/');
    let started = Instant::now();
    for (id, doc) in fences::campaign_docs(set, dwell_s) {
        let body = serde_json::to_vec(&doc)?;
        let put = http
            .put(format!("{base}/v1/campaigns/{id}"))
            .bearer_auth(token)
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await
            .with_context(|| format!("registering campaign {id}"))?;
        let response = if put.status() == reqwest::StatusCode::NOT_FOUND {
            http.post(format!("{base}/v1/campaigns"))
                .bearer_auth(token)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .with_context(|| format!("registering campaign {id}"))?
        } else {
            put
        };
        let status = response.status();
        if !status.is_success() {
            let text = response.text().await.unwrap_or_default();
            bail!("registering campaign {id}: {status}: {}", text.chars().take(400).collect::<String>());
        }
    }
    if !quiet {
        eprintln!("registered {total} fences in {:.1} s", started.elapsed().as_secs_f64());
    }
    Ok(())
}

/// What one connection (or, merged, all) measured.
#[derive(Default)]
struct Tally {
    latency: Option<Histogram<u64>>,
    per_second: Vec<Histogram<u64>>,
    requests: u64,
    ok: u64,
    pings: u64,
    accepted: u64,
    ignored: u64,
    events: u64,
    errors: BTreeMap<String, u64>,
    /// Offset from the run's start of the last measured answer.
    last_done: Duration,
    /// Users replaced by churn (warm-up included).
    churned: u64,
}

/// Latencies in µs, 1 µs to an hour. Fixed bounds (not auto-resizing): `saturating_record`
/// never resizes, so an auto-resizing histogram would clamp every value at its tiny initial top.
fn histogram(significant: u8) -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, significant).expect("valid histogram bounds")
}

impl Tally {
    fn record(&mut self, second: usize, latency: Duration) {
        let us = (latency.as_micros() as u64).max(1);
        self.latency.get_or_insert_with(|| histogram(3)).saturating_record(us);
        while self.per_second.len() <= second {
            self.per_second.push(histogram(2));
        }
        self.per_second[second].saturating_record(us);
    }

    fn merge(&mut self, other: Tally) {
        if let Some(h) = other.latency {
            match &mut self.latency {
                Some(mine) => mine.add(h).expect("histograms of the same kind add"),
                None => self.latency = Some(h),
            }
        }
        for (i, h) in other.per_second.into_iter().enumerate() {
            if i < self.per_second.len() {
                self.per_second[i].add(h).expect("histograms of the same kind add");
            } else {
                self.per_second.push(h);
            }
        }
        self.requests += other.requests;
        self.ok += other.ok;
        self.pings += other.pings;
        self.accepted += other.accepted;
        self.ignored += other.ignored;
        self.events += other.events;
        for (k, v) in other.errors {
            *self.errors.entry(k).or_default() += v;
        }
        self.last_done = self.last_done.max(other.last_done);
        self.churned += other.churned;
    }

    fn result(self, args: &LoadgenArgs, schedule: &Schedule, users: usize, credentials: Credentials) -> LoadResult {
        let latency = self.latency.unwrap_or_else(|| histogram(3));
        let elapsed = self.last_done.saturating_sub(schedule.warmup).max(schedule.duration).as_secs_f64().max(1e-9);
        LoadResult {
            url: args.url.clone(),
            mode: if schedule.rate.is_some() { "open" } else { "closed" },
            target_rate: schedule.rate,
            connections: schedule.connections,
            batch: args.batch,
            auth: match credentials {
                Credentials::Admin(_) => "admin",
                Credentials::Client(_) => "client",
            },
            users,
            user_churn_per_s: args.user_churn_per_s,
            users_churned: self.churned,
            warmup_s: schedule.warmup.as_secs_f64(),
            duration_s: schedule.duration.as_secs_f64(),
            elapsed_s: elapsed,
            requests: self.requests,
            ok: self.ok,
            pings: self.pings,
            accepted: self.accepted,
            ignored: self.ignored,
            events: self.events,
            errors: self.errors,
            requests_per_s: self.requests as f64 / elapsed,
            pings_per_s: self.pings as f64 / elapsed,
            latency_ms: Percentiles::of(&latency),
            distribution: report::distribution(&latency),
            minutes: self
                .per_second
                .chunks(60)
                .enumerate()
                .map(|(i, seconds)| {
                    let mut h = histogram(2);
                    seconds.iter().for_each(|s| h.add(s).expect("histograms of the same kind add"));
                    Minute { minute: i as u64, requests: h.len(), latency_ms: Percentiles::of(&h) }
                })
                .collect(),
            timeline: self
                .per_second
                .iter()
                .enumerate()
                .map(|(i, h)| Second { second: i as u64, requests: h.len(), latency_ms: Percentiles::of(h) })
                .collect(),
        }
    }
}

/// One keep-alive connection working through its share of the schedule.
async fn connection(
    c: usize,
    schedule: Schedule,
    start: Instant,
    mut work: ConnectionWork,
    target: Target,
    answered: Arc<AtomicU64>,
) -> Tally {
    let mut tally = Tally::default();
    let mut client = client::Client::new(&target.addr, &target.host, &target.path);
    for j in 0u64.. {
        let due = schedule.due(c, j);
        let at = due.unwrap_or_else(|| start.elapsed());
        if at >= schedule.end() {
            break;
        }
        if let Some(due) = due {
            tokio::time::sleep_until((start + due).into()).await;
        }
        let sent = start.elapsed();
        let request = work.next_request(now_ms());
        let pings = request.pings as u64;
        let outcome = client.post(&request.bearer, &request.body).await;
        let done = start.elapsed();
        answered.fetch_add(1, Ordering::Relaxed);
        let offset = due.unwrap_or(sent);
        if !schedule.measured(offset) {
            continue;
        }
        tally.requests += 1;
        tally.last_done = tally.last_done.max(done);
        tally.record((offset - schedule.warmup).as_secs() as usize, schedule.latency(due, sent, done));
        match outcome {
            Ok(200) => {
                let body = client.body();
                tally.ok += 1;
                tally.pings += pings;
                tally.accepted += accepted_of(body);
                tally.ignored += occurrences(body, b"\"reason\":");
                tally.events += occurrences(body, b"\"coupon_issued\"");
            }
            Ok(status) => *tally.errors.entry(status.to_string()).or_default() += 1,
            Err(e) => {
                tracing::debug!(error = %e, "request failed");
                *tally.errors.entry("transport".into()).or_default() += 1;
                // Do not spin on a server that refuses connections.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    tally.churned = work.churned();
    tally
}

/// The `accepted` count of a pings reply, read without parsing the whole reply.
fn accepted_of(body: &[u8]) -> u64 {
    const KEY: &[u8] = b"\"accepted\":";
    let Some(at) = body.windows(KEY.len()).position(|w| w == KEY) else { return 0 };
    body[at + KEY.len()..].iter().take_while(|b| b.is_ascii_digit()).fold(0, |n, b| n * 10 + u64::from(b - b'0'))
}

fn occurrences(haystack: &[u8], needle: &[u8]) -> u64 {
    haystack.windows(needle.len()).filter(|w| *w == needle).count() as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Cli, Command};
    use clap::Parser;

    fn args(list: &[&str]) -> Result<LoadgenArgs, clap::Error> {
        let mut argv = vec!["kabao", "loadgen"];
        argv.extend_from_slice(list);
        Cli::try_parse_from(argv).map(|cli| match cli.command {
            Command::Loadgen(a) => a,
            other => panic!("expected loadgen, got {other:?}"),
        })
    }

    #[test]
    fn defaults_and_flags() {
        let a = args(&["--admin-token", "t"]).unwrap();
        assert_eq!(a.url, "http://127.0.0.1:8080");
        assert_eq!(a.rate, Rate::PerSecond(1000.0));
        assert_eq!((a.connections, a.batch, a.users), (4, 1, 10_000));
        assert_eq!((a.duration, a.warmup), (Duration::from_secs(30), Duration::from_secs(5)));
        let a = args(&[
            "--rate",
            "max",
            "--batch",
            "500",
            "--duration",
            "2m",
            "--warmup",
            "500ms",
            "--create-fences",
            "1000000",
            "--shape",
            "polygon",
            "--area",
            "city",
            "--columns",
            "user=uid,ts=t",
        ])
        .unwrap();
        assert_eq!(a.rate, Rate::Max);
        assert_eq!(a.batch, 500);
        assert_eq!(a.duration, Duration::from_secs(120));
        assert_eq!(a.warmup, Duration::from_millis(500));
        assert_eq!(a.create_fences, Some(1_000_000));
        assert_eq!((a.shape, a.area), (ShapeKind::Polygon, AreaKind::City));
        assert_eq!(a.columns.user, "uid");
        assert_eq!(a.columns.lat, "lat");
    }

    #[test]
    fn bad_flags_are_refused() {
        assert!(args(&["--rate", "0"]).is_err());
        assert!(args(&["--rate", "fast"]).is_err());
        assert!(args(&["--duration", "3 weeks"]).is_err());
        assert!(args(&["--trajectory", "a.csv", "--plt", "dir"]).is_err());
        assert!(args(&["--create-fences", "10", "--fences-file", "f.csv"]).is_err());
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
    }

    #[tokio::test]
    async fn runs_without_credentials_or_with_a_bad_batch_are_refused() {
        let no_token = args(&["--duration", "1s"]).unwrap();
        // No KABAO_ADMIN_TOKEN in the test environment is assumed; guard anyway.
        if no_token.admin_token.is_none() && no_token.client_secret.is_none() {
            assert!(execute(&no_token).await.is_err());
        }
        let big = args(&["--admin-token", "t", "--batch", "10001"]).unwrap();
        assert!(execute(&big).await.unwrap_err().to_string().contains("--batch"));
        let tls = args(&["--admin-token", "t", "--url", "https://example.com"]).unwrap();
        assert!(execute(&tls).await.is_err());
    }

    #[test]
    fn recorded_latencies_come_out_as_recorded() {
        let mut a = Tally::default();
        a.record(0, Duration::from_millis(50));
        a.record(2, Duration::from_micros(1_500));
        let mut b = Tally::default();
        b.record(0, Duration::from_secs(7));
        b.requests = 3;
        a.merge(b);
        let h = a.latency.as_ref().unwrap();
        assert_eq!(h.len(), 3);
        let near = |value: u64, expected: u64| value.abs_diff(expected) <= expected / 100;
        assert!(near(h.value_at_quantile(0.0), 1_500));
        assert!(near(h.value_at_quantile(0.5), 50_000));
        assert!(near(h.max(), 7_000_000));
        assert_eq!(a.per_second.iter().map(Histogram::len).collect::<Vec<_>>(), [2, 0, 1]);
        assert_eq!(a.requests, 3);
    }

    #[test]
    fn targets_and_reply_scans() {
        let t = target("http://127.0.0.1:9000/").unwrap();
        assert_eq!(
            (t.addr.as_str(), t.host.as_str(), t.path.as_str()),
            ("127.0.0.1:9000", "127.0.0.1:9000", "/v1/pings")
        );
        let t = target("http://[::1]/kabao").unwrap();
        assert_eq!((t.addr.as_str(), t.path.as_str()), ("[::1]:80", "/kabao/v1/pings"));
        let reply = br#"{"accepted":123,"rejected":[],"ignored":[{"index":1,"reason":"stale"}],"events":[{"type":"coupon_issued"}]}"#;
        assert_eq!(accepted_of(reply), 123);
        assert_eq!(occurrences(reply, b"\"reason\":"), 1);
        assert_eq!(occurrences(reply, b"\"coupon_issued\""), 1);
    }
}
