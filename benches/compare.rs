//! Side by side: the same fences and the same pings matched by kabao in process, the rstar
//! baseline, PostGIS and Redis GEO, after checking that every one of them finds exactly the same
//! (campaign, fence) matches. `scripts/compare.sh` starts its own PostgreSQL (PostGIS) and Redis,
//! runs kabao's HTTP path with `kabao loadgen`, then this bench, and writes the table into
//! BENCHMARKS.md; run alone, without the services' addresses, it says so and does nothing.
//!
//! The workload is `kabao loadgen`'s: fences from `loadgen::fences::shapes` (the generator
//! `--create-fences N --shape … --area country --seed 1` registers), 90 000 circles and 10 000
//! small polygons by default, and pings from its simulated users (10 000 users, seed 1, split
//! between the connections as loadgen splits them, each user pinging every 15 s of event time).
//!
//! How each system answers "which fences contain this ping":
//! - kabao: `FenceIndex::matches` (one ping a call) and `matches_many` (batches), on one thread
//!   and on every core (the others use every core too: their servers and this client).
//! - rstar: bounding boxes in a `bulk_load` R-tree, then the exact test (`benches/support`).
//! - PostGIS: circles as `geography(Point)` with their radius, polygons as `geometry(Polygon)`
//!   (API.md: polygon edges are straight lines in lon/lat, which is the planar geometry test;
//!   geography polygons would have great-circle edges). Circles are tested with
//!   `ST_DWithin(geog, ping, r, false)`: on PostGIS's sphere, whose radius is read from PostGIS
//!   (`ST_Distance` of one degree) and the fence radius scaled by it, so the test is kabao's
//!   `haversine ≤ r` on the sphere of `EARTH_RADIUS_M`. Polygons with `ST_Covers` (boundary
//!   inside, like API.md rule 1). Forms: the textbook GiST query on the geography column, a
//!   geometry bounding-box `&&` prefilter then the exact test (by `ST_DWithin`, or by haversine
//!   written in SQL), and many pings in one statement (`unnest … CROSS JOIN LATERAL`).
//! - Redis: one GEO key of circle centres and polygon anchors; per ping
//!   `GEOSEARCH … BYRADIUS <largest reach>` and then each candidate's own exact test in the
//!   client (Redis stores 52-bit geohashes, ≈ 0.6 m off, and measures on a 6 372 797.56 m
//!   sphere: the search radius has a margin for both, the exact test decides). One command a
//!   round trip, and pipelines of a batch.
//!
//! Tolerance: only a (ping, circle) pair whose haversine distance lies within
//! [`BOUNDARY_TOLERANCE_M`] of the radius may differ (PostGIS computes the same sphere distance
//! with another formula, rounding differently at the last bits); such pairs are counted and
//! reported. Any other difference fails the bench.
//!
//! Env: `KABAO_COMPARE_PG` (a libpq connection string), `KABAO_COMPARE_REDIS` (a redis:// URL),
//! `KABAO_COMPARE_CIRCLES` (90000), `KABAO_COMPARE_POLYGONS` (10000), `KABAO_COMPARE_CHECK`
//! (pings checked, 20000, at least 2000), `KABAO_COMPARE_SECONDS` (measured seconds a form, 10),
//! `KABAO_COMPARE_CONNECTIONS` (8), `KABAO_COMPARE_BATCH` (500), `KABAO_COMPARE_HTTP_BATCH` and
//! `KABAO_COMPARE_HTTP_SINGLE` (`kabao loadgen --json` results to put in the table),
//! `KABAO_COMPARE_TABLE` (where to write the Markdown table).

use std::fmt::Write as _;
use std::hint::black_box;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use hdrhistogram::Histogram;
use kabao::domain::{haversine_m, Campaign, LatLon, Shape, EARTH_RADIUS_M};
use kabao::loadgen::fences::{self, AreaKind, ShapeKind, FENCES_PER_CAMPAIGN};
use kabao::loadgen::workload::{self, Credentials, Population};
use kabao::spatial::{testdata, FenceIndex, Hit};
use support::Baseline;

mod support;

/// `kabao loadgen`'s default seed and users.
const SEED: u64 = 1;
const USERS: usize = 10_000;
/// Pings generated; the timed loops cycle through them.
const PINGS: usize = 200_000;
/// Seconds of event time between two pings of one simulated user.
const PING_EVERY_MS: i64 = 15_000;
/// See the crate docs: the only disagreement accepted, in metres from a circle's edge.
const BOUNDARY_TOLERANCE_M: f64 = 1e-3;
/// The sphere Redis's GEO commands measure on (`EARTH_RADIUS_IN_METERS` in Redis's
/// geohash_helper.c).
const REDIS_EARTH_RADIUS_M: f64 = 6_372_797.560_856;
/// Warm-up before each timed form.
const WARMUP: Duration = Duration::from_secs(2);
const REDIS_KEY: &str = "kabao-compare:fences";

struct Config {
    pg: String,
    redis: String,
    circles: usize,
    polygons: usize,
    check: usize,
    seconds: Duration,
    connections: usize,
    batch: usize,
    http_batch: Option<PathBuf>,
    http_single: Option<PathBuf>,
    table: Option<PathBuf>,
}

fn env_num(name: &str, default: usize) -> anyhow::Result<usize> {
    match std::env::var(name) {
        Ok(v) => v.trim().parse().with_context(|| format!("{name}={v:?} is not a count")),
        Err(_) => Ok(default),
    }
}

impl Config {
    /// `None` when the services' addresses are not given.
    fn from_env() -> anyhow::Result<Option<Self>> {
        let (Ok(pg), Ok(redis)) = (std::env::var("KABAO_COMPARE_PG"), std::env::var("KABAO_COMPARE_REDIS")) else {
            return Ok(None);
        };
        let path = |name: &str| std::env::var_os(name).map(PathBuf::from);
        let config = Config {
            pg,
            redis,
            circles: env_num("KABAO_COMPARE_CIRCLES", 90_000)?,
            polygons: env_num("KABAO_COMPARE_POLYGONS", 10_000)?,
            check: env_num("KABAO_COMPARE_CHECK", 20_000)?,
            seconds: Duration::from_secs(env_num("KABAO_COMPARE_SECONDS", 10)? as u64),
            connections: env_num("KABAO_COMPARE_CONNECTIONS", 8)?.max(1),
            batch: env_num("KABAO_COMPARE_BATCH", 500)?.max(1),
            http_batch: path("KABAO_COMPARE_HTTP_BATCH"),
            http_single: path("KABAO_COMPARE_HTTP_SINGLE"),
            table: path("KABAO_COMPARE_TABLE"),
        };
        ensure!((2_000..=PINGS).contains(&config.check), "KABAO_COMPARE_CHECK must be 2000..={PINGS}");
        Ok(Some(config))
    }
}

/// The fences as kabao holds them (campaigns of loadgen's names and sizes) and as one flat list
/// by global id, which is the id the other systems store.
struct Workload {
    campaigns: Vec<Arc<Campaign>>,
    /// Global id of fence 0 of each campaign slot.
    first: Vec<u32>,
    shapes: Arc<Vec<Shape>>,
    pings: Arc<Vec<LatLon>>,
}

impl Workload {
    fn new(config: &Config) -> anyhow::Result<Self> {
        let (mut campaigns, mut first, mut shapes) = (Vec::new(), Vec::new(), Vec::new());
        for (stem, kind, n) in [
            ("country-circles", ShapeKind::Circle, config.circles),
            ("country-polygons", ShapeKind::Polygon, config.polygons),
        ] {
            let set = fences::shapes(n, kind, AreaKind::Country, SEED);
            for (i, chunk) in set.chunks(FENCES_PER_CAMPAIGN).enumerate() {
                first.push(shapes.len() as u32);
                shapes.extend_from_slice(chunk);
                campaigns.push(Arc::new(testdata::campaign(&format!("loadgen-{stem}-{i}"), chunk.to_vec())));
            }
        }
        let pings = loadgen_pings(PINGS, config.connections)?;
        Ok(Self { campaigns, first, shapes: Arc::new(shapes), pings: Arc::new(pings) })
    }

    fn global(&self, h: Hit) -> u32 {
        self.first[h.campaign as usize] + h.fence
    }

    /// `campaign-id/fence-id` of a global id.
    fn name(&self, g: u32) -> String {
        let slot = self.first.partition_point(|&f| f <= g) - 1;
        let c = &self.campaigns[slot];
        format!("{}/{}", c.id.as_str(), c.fences[(g - self.first[slot]) as usize].id.as_str())
    }
}

/// The pings `kabao loadgen` sends from its simulated users (positions to the 6 decimals it
/// writes), the connections taking turns, each user pinging every [`PING_EVERY_MS`].
fn loadgen_pings(n: usize, connections: usize) -> anyhow::Result<Vec<LatLon>> {
    #[derive(serde::Deserialize)]
    struct Body {
        lat: f64,
        lon: f64,
    }
    let start_ms = 1_800_000_000_000;
    let population = Population::Simulated { users: USERS, area: AreaKind::Country.bounds(), seed: SEED };
    let mut work = workload::split(population, connections, &Credentials::Admin("compare".into()), 1, start_ms)?;
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        for w in work.iter_mut() {
            let now = start_ms + (out.len() / USERS) as i64 * PING_EVERY_MS;
            let body: Body = serde_json::from_slice(&w.next_request(now).body)?;
            out.push(LatLon { lat: body.lat, lon: body.lon });
        }
    }
    out.truncate(n);
    Ok(out)
}

/// Matches of consecutive pings: ping `i` matched `ids[ends[i - 1]..ends[i]]`, sorted.
#[derive(Default)]
struct Answers {
    ids: Vec<u32>,
    ends: Vec<usize>,
}

impl Answers {
    fn clear(&mut self) {
        self.ids.clear();
        self.ends.clear();
    }

    /// Ends the current ping's matches.
    fn close(&mut self) {
        let start = self.ends.last().copied().unwrap_or(0);
        self.ids[start..].sort_unstable();
        self.ends.push(self.ids.len());
    }

    fn of(&self, i: usize) -> &[u32] {
        &self.ids[if i == 0 { 0 } else { self.ends[i - 1] }..self.ends[i]]
    }

    fn append(&mut self, other: &Answers) {
        let base = self.ids.len();
        self.ids.extend_from_slice(&other.ids);
        self.ends.extend(other.ends.iter().map(|e| e + base));
    }
}

/// Every ping's answer must equal kabao's, but for circle edges within the tolerance.
/// Returns the pairs accepted by the tolerance.
fn check(w: &Workload, name: &str, reference: &Answers, got: &Answers) -> anyhow::Result<usize> {
    ensure!(
        got.ends.len() == reference.ends.len(),
        "{name}: answered {} pings of {}",
        got.ends.len(),
        reference.ends.len()
    );
    let mut tolerated = 0;
    for i in 0..reference.ends.len() {
        let (a, b) = (reference.of(i), got.of(i));
        if a == b {
            continue;
        }
        let p = w.pings[i];
        for &g in a.iter().filter(|g| !b.contains(g)).chain(b.iter().filter(|g| !a.contains(g))) {
            let only = if a.contains(&g) { "kabao" } else { name };
            match &w.shapes[g as usize] {
                Shape::Circle(c) if (haversine_m(c.center, p) - c.radius_m).abs() <= BOUNDARY_TOLERANCE_M => tolerated += 1,
                Shape::Circle(c) => bail!(
                    "{name} disagrees with kabao at ping {i} {p:?}: only {only} matches {} (haversine − radius = {:.6} m)",
                    w.name(g),
                    haversine_m(c.center, p) - c.radius_m
                ),
                Shape::Polygon(_) => {
                    bail!("{name} disagrees with kabao at ping {i} {p:?}: only {only} matches polygon {}", w.name(g))
                }
            }
        }
    }
    Ok(tolerated)
}

/// How one remote form asks its question.
enum Backend {
    /// One statement a ping (`$1` lon, `$2` lat) or, batched, a statement over arrays of them.
    Pg { client: tokio_postgres::Client, statement: tokio_postgres::Statement, batched: bool },
    /// `GEOSEARCH` a ping, one command a round trip or pipelined; then the exact test.
    Redis { conn: redis::aio::MultiplexedConnection, pipelined: bool, radius_m: f64, shapes: Arc<Vec<Shape>> },
}

impl Backend {
    async fn answer(&mut self, pings: &[LatLon], out: &mut Answers) -> anyhow::Result<()> {
        match self {
            Backend::Pg { client, statement, batched: false } => {
                for p in pings {
                    for row in client.query(&*statement, &[&p.lon, &p.lat]).await? {
                        out.ids.push(row.get::<_, i32>(0) as u32);
                    }
                    out.close();
                }
            }
            Backend::Pg { client, statement, batched: true } => {
                let lons: Vec<f64> = pings.iter().map(|p| p.lon).collect();
                let lats: Vec<f64> = pings.iter().map(|p| p.lat).collect();
                let mut pairs: Vec<(i32, u32)> = client
                    .query(&*statement, &[&lons, &lats])
                    .await?
                    .iter()
                    .map(|row| (row.get::<_, i32>(0), row.get::<_, i32>(1) as u32))
                    .collect();
                pairs.sort_unstable();
                let mut k = 0;
                for i in 1..=pings.len() as i32 {
                    while k < pairs.len() && pairs[k].0 == i {
                        out.ids.push(pairs[k].1);
                        k += 1;
                    }
                    out.close();
                }
                ensure!(k == pairs.len(), "PostGIS answered for a ping it was not asked");
            }
            Backend::Redis { conn, pipelined, radius_m, shapes } => {
                let search = |p: &LatLon| {
                    let mut c = redis::cmd("GEOSEARCH");
                    c.arg(REDIS_KEY).arg("FROMLONLAT").arg(p.lon).arg(p.lat).arg("BYRADIUS").arg(*radius_m).arg("m");
                    c
                };
                let found: Vec<Vec<u32>> = if *pipelined {
                    let mut pipe = redis::pipe();
                    for p in pings {
                        pipe.add_command(search(p));
                    }
                    pipe.query_async(conn).await?
                } else {
                    let mut found = Vec::with_capacity(pings.len());
                    for p in pings {
                        found.push(search(p).query_async(conn).await?);
                    }
                    found
                };
                for (p, candidates) in pings.iter().zip(found) {
                    out.ids.extend(candidates.into_iter().filter(|&g| shapes[g as usize].contains(*p)));
                    out.close();
                }
            }
        }
        Ok(())
    }
}

/// One line of the table.
struct Row {
    system: &'static str,
    form: String,
    pings_per_s: f64,
    /// What one latency sample covers.
    per: String,
    p50_us: f64,
    p99_us: f64,
}

fn us(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

fn histogram() -> Histogram<u64> {
    // Nanoseconds, 1 ns to 60 s.
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("valid histogram bounds")
}

/// Times `f` over the pings in chunks of `chunk`, `connections` at once, for `seconds` after
/// [`WARMUP`]; latency per call.
async fn drive(
    backends: Vec<Backend>,
    pings: Arc<Vec<LatLon>>,
    chunk: usize,
    seconds: Duration,
) -> anyhow::Result<(f64, Histogram<u64>)> {
    let n = backends.len();
    let start = Instant::now();
    let (from, until) = (start + WARMUP, start + WARMUP + seconds);
    let tasks: Vec<_> = backends
        .into_iter()
        .enumerate()
        .map(|(k, mut backend)| {
            let pings = pings.clone();
            tokio::spawn(async move {
                let (mut hist, mut out, mut done, mut last) = (histogram(), Answers::default(), 0u64, from);
                let mut at = k * pings.len() / n;
                loop {
                    let t = Instant::now();
                    if t >= until {
                        break;
                    }
                    let end = (at + chunk).min(pings.len());
                    out.clear();
                    backend.answer(&pings[at..end], &mut out).await?;
                    let elapsed = t.elapsed();
                    if t >= from {
                        hist.saturating_record(elapsed.as_nanos() as u64);
                        done += (end - at) as u64;
                        last = t + elapsed;
                    }
                    black_box(out.ids.len());
                    at = if end == pings.len() { 0 } else { end };
                }
                anyhow::Ok((done, hist, last))
            })
        })
        .collect();
    let (mut done, mut hist, mut last) = (0, histogram(), from);
    for task in tasks {
        let (d, h, l) = task.await??;
        done += d;
        hist.add(h)?;
        last = last.max(l);
    }
    Ok((done as f64 / (last - from).as_secs_f64().max(1e-9), hist))
}

/// Times an in-process matcher on one thread: throughput over whole passes without a clock
/// read per call, then latency of each call over one pass.
fn time_local(
    pings: &[LatLon],
    chunk: usize,
    seconds: Duration,
    mut f: impl FnMut(&[LatLon]) -> usize,
) -> (f64, Histogram<u64>) {
    let mut expected = None;
    let start = Instant::now();
    while start.elapsed() < WARMUP.min(seconds) {
        let hits: usize = pings.chunks(chunk).map(&mut f).sum();
        assert_eq!(*expected.get_or_insert(hits), hits, "a matcher's answers changed between passes");
    }
    let (start, mut done) = (Instant::now(), 0);
    while start.elapsed() < seconds {
        let hits: usize = pings.chunks(chunk).map(&mut f).sum();
        assert_eq!(Some(hits), expected, "a matcher's answers changed between passes");
        done += pings.len();
    }
    let rate = done as f64 / start.elapsed().as_secs_f64();
    let mut hist = histogram();
    for c in pings.chunks(chunk) {
        let t = Instant::now();
        black_box(f(c));
        hist.saturating_record(t.elapsed().as_nanos() as u64);
    }
    (rate, hist)
}

/// kabao on every core of the box: `threads` threads, each over its own part of the pings,
/// `FenceIndex::matches` (`chunk` = 1) or `matches_many`, for `seconds` after [`WARMUP`];
/// latency per call (one clock read a call, ≈ 20 ns, is charged to the single-ping form).
fn time_threads(
    index: &FenceIndex,
    pings: &[LatLon],
    chunk: usize,
    threads: usize,
    seconds: Duration,
) -> (f64, Histogram<u64>) {
    let start = Instant::now();
    let (from, until) = (start + WARMUP, start + WARMUP + seconds);
    let results: Vec<(u64, Histogram<u64>)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|k| {
                s.spawn(move || {
                    let (mut hits, mut ends, mut hist, mut done) = (Vec::new(), Vec::new(), histogram(), 0u64);
                    let mut at = k * pings.len() / threads;
                    loop {
                        let t = Instant::now();
                        if t >= until {
                            break;
                        }
                        let end = (at + chunk).min(pings.len());
                        hits.clear();
                        if chunk == 1 {
                            index.matches(pings[at], &mut hits);
                        } else {
                            ends.clear();
                            index.matches_many(&pings[at..end], &mut hits, &mut ends);
                        }
                        black_box(hits.len());
                        if t >= from {
                            hist.saturating_record(t.elapsed().as_nanos() as u64);
                            done += (end - at) as u64;
                        }
                        at = if end == pings.len() { 0 } else { end };
                    }
                    (done, hist)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("a matching thread panicked")).collect()
    });
    let elapsed = from.elapsed().as_secs_f64();
    let mut hist = histogram();
    let mut done = 0;
    for (d, h) in results {
        done += d;
        hist.add(h).expect("same histogram bounds");
    }
    (done as f64 / elapsed, hist)
}

fn row(system: &'static str, form: impl Into<String>, per: impl Into<String>, (rate, h): (f64, Histogram<u64>)) -> Row {
    let row = Row {
        system,
        form: form.into(),
        pings_per_s: rate,
        per: per.into(),
        p50_us: us(&h, 0.5),
        p99_us: us(&h, 0.99),
    };
    println!(
        "{:<8} {:<70} {:>12.0} pings/s  p50 {:>9.1} µs  p99 {:>9.1} µs per {}",
        row.system, row.form, row.pings_per_s, row.p50_us, row.p99_us, row.per
    );
    row
}

async fn pg_connect(conninfo: &str) -> anyhow::Result<tokio_postgres::Client> {
    let (client, connection) = tokio_postgres::connect(conninfo, tokio_postgres::NoTls)
        .await
        .with_context(|| format!("connecting to {conninfo}"))?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            eprintln!("PostgreSQL connection: {e}");
        }
    });
    Ok(client)
}

/// WKT of a polygon (shortest round-trip decimals, so PostGIS reads back the same doubles).
fn wkt(shape: &Shape) -> String {
    let Shape::Polygon(p) = shape else { unreachable!("only polygons") };
    let g = p.unwrapped();
    let mut s = String::from("POLYGON(");
    for (k, ring) in std::iter::once(g.exterior()).chain(g.interiors()).enumerate() {
        s.push_str(if k == 0 { "(" } else { ",(" });
        for (j, c) in ring.coords().enumerate() {
            let _ = write!(s, "{}{} {}", if j == 0 { "" } else { "," }, c.x, c.y);
        }
        s.push(')');
    }
    s.push(')');
    s
}

/// Loads the fences into PostGIS; returns the radius of the sphere it measures on.
async fn pg_load(client: &tokio_postgres::Client, w: &Workload) -> anyhow::Result<f64> {
    client
        .batch_execute(
            "CREATE EXTENSION IF NOT EXISTS postgis;
             DROP TABLE IF EXISTS circles, polygons;
             CREATE TABLE circles (id int4 PRIMARY KEY, lon float8 NOT NULL, lat float8 NOT NULL,
                 radius_m float8 NOT NULL, radius_pg float8 NOT NULL,
                 geog geography(Point, 4326) NOT NULL, bbox geometry(Polygon, 4326) NOT NULL);
             CREATE TABLE polygons (id int4 PRIMARY KEY, geom geometry(Polygon, 4326) NOT NULL);",
        )
        .await?;
    // One degree of arc on the sphere `use_spheroid = false` measures on, over one degree in radians.
    let sphere_m: f64 = client
        .query_one(
            "SELECT ST_Distance('SRID=4326;POINT(0 0)'::geography, 'SRID=4326;POINT(0 1)'::geography, false) / radians(1.0)",
            &[],
        )
        .await?
        .get(0);
    let scale = sphere_m / EARTH_RADIUS_M;
    let (mut ids, mut lons, mut lats, mut radii, mut scaled) = (vec![], vec![], vec![], vec![], vec![]);
    let (mut x0, mut y0, mut x1, mut y1) = (vec![], vec![], vec![], vec![]);
    let (mut poly_ids, mut wkts) = (vec![], vec![]);
    for (g, shape) in w.shapes.iter().enumerate() {
        match shape {
            Shape::Circle(c) => {
                let b = support::bbox(shape);
                ids.push(g as i32);
                lons.push(c.center.lon);
                lats.push(c.center.lat);
                radii.push(c.radius_m);
                scaled.push(c.radius_m * scale);
                x0.push(b[0]);
                y0.push(b[1]);
                x1.push(b[2]);
                y1.push(b[3]);
            }
            Shape::Polygon(_) => {
                poly_ids.push(g as i32);
                wkts.push(wkt(shape));
            }
        }
    }
    client
        .execute(
            "INSERT INTO circles
             SELECT id, lon, lat, r, r_pg, ST_SetSRID(ST_MakePoint(lon, lat), 4326)::geography,
                    ST_MakeEnvelope(x0, y0, x1, y1, 4326)
             FROM unnest($1::int4[], $2::float8[], $3::float8[], $4::float8[], $5::float8[],
                         $6::float8[], $7::float8[], $8::float8[], $9::float8[])
                  AS t(id, lon, lat, r, r_pg, x0, y0, x1, y1)",
            &[&ids, &lons, &lats, &radii, &scaled, &x0, &y0, &x1, &y1],
        )
        .await?;
    client
        .execute(
            "INSERT INTO polygons SELECT id, ST_GeomFromText(wkt, 4326) FROM unnest($1::int4[], $2::text[]) AS t(id, wkt)",
            &[&poly_ids, &wkts],
        )
        .await?;
    let invalid: i64 = client.query_one("SELECT count(*) FROM polygons WHERE NOT ST_IsValid(geom)", &[]).await?.get(0);
    ensure!(invalid == 0, "{invalid} polygons are not valid in PostGIS");
    for sql in [
        "CREATE INDEX circles_geog ON circles USING gist (geog)",
        "CREATE INDEX circles_bbox ON circles USING gist (bbox)",
        "CREATE INDEX polygons_geom ON polygons USING gist (geom)",
        "VACUUM ANALYZE circles",
        "VACUUM ANALYZE polygons",
    ] {
        client.batch_execute(sql).await?;
    }
    Ok(sphere_m)
}

/// The circles part of a PostGIS query at (`lon`, `lat`), SQL expressions.
#[derive(Clone, Copy, PartialEq)]
enum CircleTest {
    /// `ST_DWithin` on the geography column with the largest radius (what the GiST index on
    /// `geog` serves), then `ST_DWithin` with the fence's own.
    GeographyIndex,
    /// `&&` with the circle's lon/lat box (GiST on `bbox`), then `ST_DWithin` with its radius.
    BoxThenDWithin,
    /// `&&` with the box, then kabao's haversine written in SQL on `EARTH_RADIUS_M`.
    BoxThenHaversine,
}

fn circles_sql(test: CircleTest, lon: &str, lat: &str, largest_pg: f64) -> String {
    let geog = format!("ST_SetSRID(ST_MakePoint({lon}, {lat}), 4326)::geography");
    let geom = format!("ST_SetSRID(ST_MakePoint({lon}, {lat}), 4326)");
    match test {
        CircleTest::GeographyIndex => format!(
            "SELECT id FROM circles WHERE ST_DWithin(geog, {geog}, {}, false) AND ST_DWithin(geog, {geog}, radius_pg, false)",
            largest_pg + 1.0
        ),
        CircleTest::BoxThenDWithin => {
            format!("SELECT id FROM circles WHERE bbox && {geom} AND ST_DWithin(geog, {geog}, radius_pg, false)")
        }
        CircleTest::BoxThenHaversine => {
            // The same operations in the same order as `haversine_m` (API.md rule 1).
            let s1 = format!("sin((radians({lat}) - radians(lat)) * 0.5::float8)");
            let s2 = format!("sin(radians({lon} - lon) * 0.5::float8)");
            let h = format!("{s1} * {s1} + cos(radians(lat)) * cos(radians({lat})) * {s2} * {s2}");
            format!(
                "SELECT id FROM circles WHERE bbox && {geom} AND \
                 {}::float8 * asin(sqrt(least(greatest({h}, 0::float8), 1::float8))) <= radius_m",
                2.0 * EARTH_RADIUS_M
            )
        }
    }
}

fn per_ping_sql(test: CircleTest, largest_pg: f64) -> String {
    format!(
        "{} UNION ALL SELECT id FROM polygons WHERE ST_Covers(geom, ST_SetSRID(ST_MakePoint($1, $2), 4326))",
        circles_sql(test, "$1::float8", "$2::float8", largest_pg)
    )
}

fn batch_sql(test: CircleTest, largest_pg: f64) -> String {
    format!(
        "SELECT p.i::int4, f.id FROM unnest($1::float8[], $2::float8[]) WITH ORDINALITY AS p(lon, lat, i)
         CROSS JOIN LATERAL ({} UNION ALL
             SELECT id FROM polygons WHERE ST_Covers(geom, ST_SetSRID(ST_MakePoint(p.lon, p.lat), 4326))) AS f",
        circles_sql(test, "p.lon", "p.lat", largest_pg)
    )
}

async fn pg_backends(config: &Config, sql: &str, batched: bool) -> anyhow::Result<Vec<Backend>> {
    let mut out = Vec::new();
    for _ in 0..config.connections {
        let client = pg_connect(&config.pg).await?;
        let statement = client.prepare(sql).await.with_context(|| format!("preparing {sql}"))?;
        out.push(Backend::Pg { client, statement, batched });
    }
    Ok(out)
}

/// Loads the fences into Redis; returns the search radius that finds every fence that may
/// contain a ping.
async fn redis_load(conn: &mut redis::aio::MultiplexedConnection, w: &Workload) -> anyhow::Result<f64> {
    let _: () = redis::cmd("DEL").arg(REDIS_KEY).query_async(conn).await?;
    let mut reach: f64 = 0.0;
    for (k, chunk) in w.shapes.chunks(10_000).enumerate() {
        let mut add = redis::cmd("GEOADD");
        add.arg(REDIS_KEY);
        for (j, shape) in chunk.iter().enumerate() {
            let at = shape.anchor();
            reach = reach.max(match shape {
                Shape::Circle(c) => c.radius_m,
                // Every point of a polygon is within its farthest vertex of the anchor; 1 %
                // and a metre more for the lon/lat plane's distortion over ≤ 1 km.
                Shape::Polygon(p) => {
                    let g = p.unwrapped();
                    let far = std::iter::once(g.exterior())
                        .chain(g.interiors())
                        .flat_map(|r| r.coords())
                        .map(|c| haversine_m(at, LatLon { lat: c.y, lon: c.x }))
                        .fold(0.0, f64::max);
                    far * 1.01 + 1.0
                }
            });
            add.arg(at.lon).arg(at.lat).arg(k * 10_000 + j);
        }
        let _: () = add.query_async(conn).await?;
    }
    // Redis's larger sphere and its ≈ 0.6 m geohash cells: a 5 m margin on top.
    Ok(reach * (REDIS_EARTH_RADIUS_M / EARTH_RADIUS_M) * 1.0001 + 5.0)
}

async fn redis_backends(config: &Config, radius_m: f64, pipelined: bool, w: &Workload) -> anyhow::Result<Vec<Backend>> {
    let client = redis::Client::open(config.redis.as_str())?;
    let mut out = Vec::new();
    for _ in 0..config.connections {
        let conn = client.get_multiplexed_async_connection().await?;
        out.push(Backend::Redis { conn, pipelined, radius_m, shapes: w.shapes.clone() });
    }
    Ok(out)
}

/// kabao's answers for `pings` (batch API), by global id.
fn kabao_answers(w: &Workload, index: &FenceIndex, pings: &[LatLon]) -> Answers {
    let (mut hits, mut ends) = (Vec::new(), Vec::new());
    index.matches_many(pings, &mut hits, &mut ends);
    let mut out = Answers::default();
    let mut start = 0;
    for end in ends {
        out.ids.extend(hits[start..end].iter().map(|&h| w.global(h)));
        out.close();
        start = end;
    }
    out
}

/// One ping at a time through a backend, then in its own chunking: its answers for `pings`.
async fn remote_answers(backend: &mut Backend, pings: &[LatLon], chunk: usize) -> anyhow::Result<Answers> {
    let (mut all, mut part) = (Answers::default(), Answers::default());
    for c in pings.chunks(chunk) {
        part.clear();
        backend.answer(c, &mut part).await?;
        all.append(&part);
    }
    Ok(all)
}

/// A `kabao loadgen --json` result as a row.
fn http_row(path: &PathBuf, form: &str) -> anyhow::Result<Row> {
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path)?)?;
    let num = |p: &str| v.pointer(p).and_then(|x| x.as_f64()).with_context(|| format!("{}: no {p}", path.display()));
    let batch = num("/batch")?;
    let row = Row {
        system: "kabao",
        form: format!(
            "{form}, {} connections (`kabao loadgen`, server and generator on the same cores)",
            num("/connections")?
        ),
        pings_per_s: num("/pings_per_s")?,
        per: if batch > 1.0 { format!("request of {batch} pings") } else { "request".into() },
        p50_us: num("/latency_ms/p50")? * 1000.0,
        p99_us: num("/latency_ms/p99")? * 1000.0,
    };
    println!(
        "kabao    {:<70} {:>12.0} pings/s  p50 {:>9.1} µs  p99 {:>9.1} µs",
        row.form, row.pings_per_s, row.p50_us, row.p99_us
    );
    Ok(row)
}

fn fmt_rate(x: f64) -> String {
    let s = format!("{:.0}", x);
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push('\u{202f}');
        }
        out.push(ch);
    }
    out
}

fn fmt_us(x: f64) -> String {
    if x >= 1000.0 {
        format!("{:.2} ms", x / 1000.0)
    } else if x >= 10.0 {
        format!("{x:.0} µs")
    } else {
        format!("{x:.2} µs")
    }
}

fn fmt_ratio(x: f64) -> String {
    if x >= 10.0 {
        format!("{x:.0}×")
    } else if x >= 1.0 {
        format!("{x:.1}×")
    } else {
        format!("{x:.2}×")
    }
}

async fn run(config: Config) -> anyhow::Result<()> {
    let t = Instant::now();
    let w = Workload::new(&config)?;
    let (circles, polygons) = (config.circles, config.polygons);
    println!(
        "info: {circles} circles + {polygons} polygons (country), {} loadgen pings, in {:.1} s",
        w.pings.len(),
        t.elapsed().as_secs_f64()
    );
    let index = FenceIndex::build(w.campaigns.clone());
    let baseline = Baseline::build(&w.campaigns);

    let pg = pg_connect(&config.pg).await?;
    let t = Instant::now();
    let sphere_m = pg_load(&pg, &w).await?;
    let pg_load_s = t.elapsed().as_secs_f64();
    let version: String = pg.query_one("SELECT postgis_lib_version() || ', ' || version()", &[]).await?.get(0);
    let largest_pg = w
        .shapes
        .iter()
        .filter_map(|s| if let Shape::Circle(c) = s { Some(c.radius_m) } else { None })
        .fold(0.0, f64::max)
        * sphere_m
        / EARTH_RADIUS_M;
    println!("info: PostGIS loaded and indexed in {pg_load_s:.1} s ({version}); its sphere: {sphere_m} m");

    let redis_client = redis::Client::open(config.redis.as_str())?;
    let mut redis_conn = redis_client.get_multiplexed_async_connection().await?;
    let t = Instant::now();
    let radius_m = redis_load(&mut redis_conn, &w).await?;
    let redis_load_s = t.elapsed().as_secs_f64();
    println!("info: Redis loaded in {redis_load_s:.1} s; GEOSEARCH radius {radius_m:.1} m");

    // First: every system answers exactly what kabao answers.
    let sample = &w.pings[..config.check];
    let reference = kabao_answers(&w, &index, sample);
    let mut one_by_one = Answers::default();
    let mut hits = Vec::new();
    for &p in sample {
        hits.clear();
        index.matches(p, &mut hits);
        one_by_one.ids.extend(hits.iter().map(|&h| w.global(h)));
        one_by_one.close();
    }
    let mut rstar = Answers::default();
    for &p in sample {
        hits.clear();
        baseline.matches(p, &mut hits);
        rstar.ids.extend(hits.iter().map(|&h| w.global(h)));
        rstar.close();
    }
    let mut tolerated = vec![("kabao one ping a call", check(&w, "kabao matches", &reference, &one_by_one)?)];
    tolerated.push(("rstar", check(&w, "rstar", &reference, &rstar)?));
    let forms = [
        ("PostGIS: geography GiST", CircleTest::GeographyIndex),
        ("PostGIS: box && then ST_DWithin", CircleTest::BoxThenDWithin),
        ("PostGIS: box && then SQL haversine", CircleTest::BoxThenHaversine),
    ];
    for (name, test) in forms {
        let mut b =
            pg_backends(&Config { connections: 1, ..clone_config(&config) }, &per_ping_sql(test, largest_pg), false)
                .await?;
        tolerated.push((name, check(&w, name, &reference, &remote_answers(&mut b[0], sample, 1).await?)?));
        let mut b =
            pg_backends(&Config { connections: 1, ..clone_config(&config) }, &batch_sql(test, largest_pg), true)
                .await?;
        let batched = remote_answers(&mut b[0], sample, config.batch).await?;
        tolerated.push((name, check(&w, &format!("{name}, batched"), &reference, &batched)?));
    }
    for pipelined in [false, true] {
        let mut b =
            redis_backends(&Config { connections: 1, ..clone_config(&config) }, radius_m, pipelined, &w).await?;
        let got = remote_answers(&mut b[0], sample, if pipelined { config.batch } else { 1 }).await?;
        tolerated.push(("Redis", check(&w, if pipelined { "Redis pipelined" } else { "Redis" }, &reference, &got)?));
    }
    let matches = reference.ids.len();
    let edge: usize = tolerated.iter().map(|t| t.1).sum();
    println!(
        "info: all agree with kabao on {} pings ({matches} matches; {edge} pairs within {} mm of a circle's edge differed)",
        sample.len(),
        BOUNDARY_TOLERANCE_M * 1000.0
    );

    // Then: time each.
    let (seconds, n, batch) = (config.seconds, config.connections, config.batch);
    let mut rows = Vec::new();
    let mut out = Vec::with_capacity(64);
    rows.push(row(
        "kabao",
        "in process, `FenceIndex::matches`, one ping a call, 1 thread",
        "ping",
        time_local(&w.pings, 1, seconds, |c| {
            out.clear();
            index.matches(c[0], &mut out);
            out.len()
        }),
    ));
    let (mut many, mut ends) = (Vec::new(), Vec::new());
    rows.push(row(
        "kabao",
        format!("in process, `FenceIndex::matches_many`, batches of {batch}, 1 thread"),
        format!("batch of {batch}"),
        time_local(&w.pings, batch, seconds, |c| {
            many.clear();
            ends.clear();
            index.matches_many(c, &mut many, &mut ends);
            many.len()
        }),
    ));
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    if threads > 1 {
        rows.push(row(
            "kabao",
            format!("in process, `FenceIndex::matches`, one ping a call, {threads} threads (every core)"),
            "ping",
            time_threads(&index, &w.pings, 1, threads, seconds),
        ));
        rows.push(row(
            "kabao",
            format!("in process, `FenceIndex::matches_many`, batches of {batch}, {threads} threads (every core)"),
            format!("batch of {batch}"),
            time_threads(&index, &w.pings, batch, threads, seconds),
        ));
    }
    let http_at = rows.len();
    if let Some(p) = &config.http_batch {
        rows.push(http_row(p, &format!("HTTP `POST /v1/pings`, batches of {batch}"))?);
    }
    if let Some(p) = &config.http_single {
        rows.push(http_row(p, "HTTP `POST /v1/pings`, one ping a request")?);
    }
    rows.push(row(
        "rstar",
        "in process, bulk-loaded R-tree of boxes + exact test, 1 thread",
        "ping",
        time_local(&w.pings, 1, seconds, |c| {
            out.clear();
            baseline.matches(c[0], &mut out);
            out.len()
        }),
    ));
    let forms = [
        ("`ST_DWithin` on geography (GiST on `geog`) + `ST_Covers`", CircleTest::GeographyIndex),
        ("box `&&` (GiST) then `ST_DWithin` + `ST_Covers`", CircleTest::BoxThenDWithin),
        ("box `&&` (GiST) then haversine in SQL + `ST_Covers`", CircleTest::BoxThenHaversine),
    ];
    for (name, test) in forms {
        let b = pg_backends(&config, &per_ping_sql(test, largest_pg), false).await?;
        let m = drive(b, w.pings.clone(), 1, seconds).await?;
        rows.push(row("PostGIS", format!("{name}, one prepared query a ping, {n} connections"), "query", m));
    }
    for (name, test) in forms {
        let b = pg_backends(&config, &batch_sql(test, largest_pg), true).await?;
        let m = drive(b, w.pings.clone(), batch, seconds).await?;
        rows.push(row(
            "PostGIS",
            format!("{name}, {batch} pings a statement (`unnest` + `LATERAL`), {n} connections"),
            format!("statement of {batch}"),
            m,
        ));
    }
    let b = redis_backends(&config, radius_m, false, &w).await?;
    let m = drive(b, w.pings.clone(), 1, seconds).await?;
    rows.push(row(
        "Redis",
        format!("`GEOSEARCH` + exact filter, one command a round trip, {n} connections"),
        "command",
        m,
    ));
    let b = redis_backends(&config, radius_m, true, &w).await?;
    let m = drive(b, w.pings.clone(), batch, seconds).await?;
    rows.push(row(
        "Redis",
        format!("`GEOSEARCH` + exact filter, pipelines of {batch}, {n} connections"),
        format!("pipeline of {batch}"),
        m,
    ));

    let table = table(&config, &w, &rows, http_at, pg_load_s, redis_load_s, &version, matches, edge);
    print!("\n{table}");
    if let Some(path) = &config.table {
        std::fs::write(path, &table).with_context(|| format!("writing {}", path.display()))?;
        println!("table: {}", path.display());
    }
    Ok(())
}

fn clone_config(c: &Config) -> Config {
    Config {
        pg: c.pg.clone(),
        redis: c.redis.clone(),
        http_batch: c.http_batch.clone(),
        http_single: c.http_single.clone(),
        table: c.table.clone(),
        ..*c
    }
}

#[allow(clippy::too_many_arguments)]
fn table(
    config: &Config,
    w: &Workload,
    rows: &[Row],
    http_at: usize,
    pg_load_s: f64,
    redis_load_s: f64,
    version: &str,
    matches: usize,
    edge: usize,
) -> String {
    let local = rows[0].pings_per_s;
    let http_batch = config.http_batch.as_ref().map(|_| rows[http_at].pings_per_s);
    let mut s = String::new();
    let _ = writeln!(
        s,
        "Workload: `kabao loadgen`'s, {} circles + {} small polygons over the country area (seed {SEED}), \
         {} pings of its {USERS} simulated users. PostGIS {} loaded and indexed in {pg_load_s:.1} s, \
         Redis in {redis_load_s:.1} s. Checked first: on {} pings ({matches} matches) kabao one ping a call, \
         rstar, the three PostGIS forms (per ping and batched) and Redis (plain and pipelined) found exactly \
         kabao's batch answers ({edge} pairs within {} mm of a circle's edge told apart, as allowed).",
        config.circles,
        config.polygons,
        w.pings.len(),
        version.split(',').next().unwrap_or(version),
        config.check,
        BOUNDARY_TOLERANCE_M * 1000.0,
    );
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "| system | form | pings/s | p50 | p99 | latency of one | ÷ kabao in process | kabao in process ÷ this | kabao HTTP batched ÷ this |"
    );
    let _ = writeln!(s, "| --- | --- | ---: | ---: | ---: | --- | ---: | ---: | ---: |");
    for r in rows {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.system,
            r.form,
            fmt_rate(r.pings_per_s),
            fmt_us(r.p50_us),
            fmt_us(r.p99_us),
            r.per,
            fmt_ratio(r.pings_per_s / local),
            fmt_ratio(local / r.pings_per_s),
            http_batch.map_or("—".into(), |h| fmt_ratio(h / r.pings_per_s)),
        );
    }
    let _ = writeln!(s);
    // Issue 9's target: kabao ≥ 20× PostGIS and Redis GEO per-ping throughput.
    let best = |system: &str, per_ping: bool| {
        rows.iter()
            .filter(|r| r.system == system && (r.per == "query" || r.per == "command") == per_ping)
            .max_by(|a, b| a.pings_per_s.total_cmp(&b.pings_per_s))
    };
    let _ = writeln!(
        s,
        "Target ≥ 20×, against each system's fastest per-ping form (its fastest batched form in brackets, for reference):"
    );
    let _ = writeln!(s);
    for system in ["PostGIS", "Redis"] {
        let (Some(single), batched) = (best(system, true), best(system, false)) else { continue };
        for k in rows.iter().filter(|r| r.system == "kabao") {
            let ratio = k.pings_per_s / single.pings_per_s;
            let verdict = if ratio >= 20.0 { "**met**" } else { "**not met**" };
            let reference =
                batched.map_or(String::new(), |b| format!(" ({})", fmt_ratio(k.pings_per_s / b.pings_per_s)));
            let _ = writeln!(s, "- kabao {} vs {system}: {}{reference} {verdict}", k.form, fmt_ratio(ratio));
        }
    }
    s
}

fn main() -> anyhow::Result<()> {
    let Some(config) = Config::from_env()? else {
        println!(
            "compare: no KABAO_COMPARE_PG / KABAO_COMPARE_REDIS given, nothing to compare against.\n\
             Run scripts/compare.sh: it installs and starts its own PostgreSQL (PostGIS) and Redis on\n\
             free ports, runs kabao's HTTP path with kabao loadgen, then this bench, and writes the\n\
             table into BENCHMARKS.md."
        );
        return Ok(());
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(run(config))
}
