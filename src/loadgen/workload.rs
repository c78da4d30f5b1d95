//! What the load generator sends: simulated users ([`crate::sim::Mover`]) or the points of a
//! trajectory file, split between the connections so each user's pings go out in order on one
//! connection, and the request bodies and tokens built from them.
//!
//! Trajectories keep each user's own timing: a user's points are shifted in time so that its
//! last point lands just before the run starts (so every `ts_ms` is inside the server's window
//! and the speeds between points are the recorded ones). A user whose points are all sent starts
//! again as a new user (`id~1`, `id~2`, …), because its old timestamps would now be stale.
//!
//! With churn ([`ConnectionWork::set_churn`]) users keep leaving and new ones arriving: each
//! second a set number of users, the longest-present first, is replaced by a new user under a
//! new id (`id~n`), a simulated one starting from a fresh random place, a track from its start.
//! The server then keeps meeting ids it never saw while those it knew go quiet, as in
//! production, which is what freeing idle trigger state is for.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::sim::{Mover, SimPing};

/// One recorded point of a trajectory.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrackPoint {
    /// Latitude.
    pub lat: f64,
    /// Longitude.
    pub lon: f64,
    /// When it was recorded, ms since the epoch.
    pub ts_ms: i64,
}

/// Which CSV columns hold the user, latitude, longitude and time (`--columns
/// user=…,lat=…,lon=…,ts=…`). Time is ms since the epoch, or seconds when it has a fraction or is
/// below 10¹¹, or an RFC 3339 / `YYYY-MM-DD HH:MM:SS` (UTC) string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Columns {
    /// Column of the user id.
    pub user: String,
    /// Column of the latitude.
    pub lat: String,
    /// Column of the longitude.
    pub lon: String,
    /// Column of the time.
    pub ts: String,
}

impl Default for Columns {
    fn default() -> Self {
        Self { user: "user".into(), lat: "lat".into(), lon: "lon".into(), ts: "ts".into() }
    }
}

impl std::str::FromStr for Columns {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let mut columns = Columns::default();
        for part in s.split(',').filter(|p| !p.trim().is_empty()) {
            let (key, name) = part.split_once('=').ok_or_else(|| format!("{part:?} is not key=column"))?;
            let name = name.trim().to_owned();
            match key.trim() {
                "user" => columns.user = name,
                "lat" => columns.lat = name,
                "lon" => columns.lon = name,
                "ts" => columns.ts = name,
                other => return Err(format!("unknown key {other:?} (user, lat, lon, ts)")),
            }
        }
        Ok(columns)
    }
}

/// Every user's points, in time order, from a CSV with the named columns.
pub fn read_csv(path: &Path, columns: &Columns) -> anyhow::Result<BTreeMap<String, Vec<TrackPoint>>> {
    let mut reader = csv::Reader::from_path(path).with_context(|| format!("reading {}", path.display()))?;
    let headers = reader.headers()?.clone();
    let find = |name: &str| {
        headers.iter().position(|h| h.trim() == name).with_context(|| {
            format!(
                "{} has no column {name:?} (columns: {})",
                path.display(),
                headers.iter().collect::<Vec<_>>().join(", ")
            )
        })
    };
    let (user, lat, lon, ts) = (find(&columns.user)?, find(&columns.lat)?, find(&columns.lon)?, find(&columns.ts)?);
    let mut tracks: BTreeMap<String, Vec<TrackPoint>> = BTreeMap::new();
    for (line, record) in reader.records().enumerate() {
        let record = record.with_context(|| format!("{} record {}", path.display(), line + 1))?;
        let field = |i: usize| record.get(i).unwrap_or("").trim();
        let parse = |i: usize| {
            field(i).parse::<f64>().with_context(|| format!("{} record {}: {:?}", path.display(), line + 1, field(i)))
        };
        let point = TrackPoint { lat: parse(lat)?, lon: parse(lon)?, ts_ms: parse_time(field(ts))? };
        tracks.entry(field(user).to_owned()).or_default().push(point);
    }
    tracks.values_mut().for_each(|points| points.sort_by_key(|p| p.ts_ms));
    Ok(tracks)
}

/// Every `.plt` file under a GeoLife directory (`Data/<user>/Trajectory/*.plt`, or any folder
/// holding `.plt` files): one user per folder above `Trajectory` (or per file's folder).
pub fn read_plt_dir(dir: &Path) -> anyhow::Result<BTreeMap<String, Vec<TrackPoint>>> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).with_context(|| format!("reading {}", d.display()))? {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e.eq_ignore_ascii_case("plt")) {
                files.push(path);
            }
        }
    }
    if files.is_empty() {
        bail!("no .plt files under {}", dir.display());
    }
    files.sort();
    let mut tracks: BTreeMap<String, Vec<TrackPoint>> = BTreeMap::new();
    for file in files {
        let folder = file.parent().map(|p| if p.ends_with("Trajectory") { p.parent().unwrap_or(p) } else { p });
        let user = folder.and_then(|p| p.file_name()).map(|n| n.to_string_lossy().into_owned());
        let user = format!("geolife-{}", user.unwrap_or_else(|| "0".into()));
        let text = std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
        tracks
            .entry(user)
            .or_default()
            .extend(parse_plt(&text).with_context(|| format!("parsing {}", file.display()))?);
    }
    tracks.values_mut().for_each(|points| points.sort_by_key(|p| p.ts_ms));
    Ok(tracks)
}

/// The points of one GeoLife `.plt` file: six header lines, then
/// `lat,lon,0,altitude_ft,days_since_1899-12-30,date,time` per line.
pub fn parse_plt(text: &str) -> anyhow::Result<Vec<TrackPoint>> {
    /// Days from 1899-12-30 (the format's day zero) to the Unix epoch.
    const EPOCH_DAYS: f64 = 25_569.0;
    let mut points = Vec::new();
    for (n, line) in text.lines().enumerate().skip(6) {
        let fields: Vec<&str> = line.trim().split(',').collect();
        if fields.len() < 5 {
            continue;
        }
        let number = |i: usize| fields[i].trim().parse::<f64>().with_context(|| format!("line {}: {line:?}", n + 1));
        let days = number(4)?;
        let ts_ms = ((days - EPOCH_DAYS) * 86_400_000.0).round() as i64;
        points.push(TrackPoint { lat: number(0)?, lon: number(1)?, ts_ms });
    }
    Ok(points)
}

/// A time cell: epoch ms, epoch seconds (a fraction, or below 10¹¹), or an RFC 3339 /
/// `YYYY-MM-DD HH:MM:SS` UTC string.
fn parse_time(cell: &str) -> anyhow::Result<i64> {
    if let Ok(n) = cell.parse::<i64>() {
        return Ok(if n.abs() < 100_000_000_000 { n * 1000 } else { n });
    }
    if let Ok(x) = cell.parse::<f64>() {
        return Ok((x * 1000.0).round() as i64);
    }
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(cell) {
        return Ok(t.timestamp_millis());
    }
    chrono::NaiveDateTime::parse_from_str(cell, "%Y-%m-%d %H:%M:%S%.f")
        .map(|t| t.and_utc().timestamp_millis())
        .with_context(|| format!("{cell:?} is not a time (epoch ms or s, RFC 3339, or YYYY-MM-DD HH:MM:SS)"))
}

/// How requests are authenticated.
#[derive(Clone)]
pub enum Credentials {
    /// The admin token: batches may mix users.
    Admin(String),
    /// Client JWTs signed with this secret, one per user (`sub` = user id); a batch then carries
    /// one user's pings.
    Client(Arc<jsonwebtoken::EncodingKey>),
}

/// A client JWT for `user`: HS256, `sub`, `iat` now, `exp` in an hour (within the server's
/// default maximum lifetime of a day).
pub fn client_jwt(key: &jsonwebtoken::EncodingKey, user: &str, now_s: i64) -> String {
    let claims = serde_json::json!({"sub": user, "iat": now_s, "exp": now_s + 3600});
    jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims, key).expect("HS256 signing cannot fail")
}

/// Where one user's pings come from.
enum Motion {
    Simulated(Mover),
    Track {
        points: Arc<Vec<TrackPoint>>,
        next: usize,
        /// Added to every recorded time.
        shift_ms: i64,
    },
}

/// One user of a connection.
struct User {
    /// The id the user was created with.
    base_id: String,
    /// The id it sends as now (`base_id`, or `base_id~pass` once it started over).
    id: String,
    /// How often the user has started over (a track sent whole, or replaced by churn).
    pass: u32,
    /// `Bearer …` for its client JWT (client mode only).
    bearer: Option<String>,
    motion: Motion,
}

/// The users of one connection and the bodies it sends.
pub struct ConnectionWork {
    users: Vec<User>,
    next_user: usize,
    rng: ChaCha8Rng,
    credentials: Credentials,
    /// `Bearer <admin token>`, built once.
    admin_bearer: Option<String>,
    batch: usize,
    /// Where simulated users move (new users of churn start in it).
    area: Option<(f64, f64, f64, f64)>,
    /// Users this connection replaces per second (see the module doc).
    churn_per_s: f64,
    /// The time of the first request (churn counts from it), ms.
    churn_origin_ms: Option<i64>,
    /// Users replaced so far; the next to go is `churned % users.len()`.
    churned: u64,
}

/// One request ready to send.
pub struct Request {
    /// The JSON body.
    pub body: Vec<u8>,
    /// Its `Authorization` header value.
    pub bearer: String,
    /// Pings in it.
    pub pings: usize,
}

/// Who the users are: simulated movers or recorded tracks.
pub enum Population {
    /// `users` movers over `area` (`(min_lat, max_lat, min_lon, max_lon)`), seeded.
    Simulated {
        /// How many.
        users: usize,
        /// Where they move.
        area: (f64, f64, f64, f64),
        /// Seed of their starts and moves.
        seed: u64,
    },
    /// Recorded tracks by user.
    Tracks(BTreeMap<String, Vec<TrackPoint>>),
}

/// Splits `population` over `connections` (each user on one connection, so its pings stay in
/// order). `start_ms` is the run's start (tracks are shifted to end just before it).
pub fn split(
    population: Population,
    connections: usize,
    credentials: &Credentials,
    batch: usize,
    start_ms: i64,
) -> anyhow::Result<Vec<ConnectionWork>> {
    let connections = connections.max(1);
    let mut users: Vec<Vec<User>> = (0..connections).map(|_| Vec::new()).collect();
    let (seed, area) = match &population {
        Population::Simulated { seed, area, .. } => (*seed, Some(*area)),
        Population::Tracks(_) => (0, None),
    };
    match population {
        Population::Simulated { users: n, area, seed } => {
            if n == 0 {
                bail!("--users must be at least 1");
            }
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            for u in 0..n {
                let id = format!("lg-{u:07}");
                let motion = Motion::Simulated(Mover::new(&mut rng, area));
                users[u % connections].push(User { base_id: id.clone(), id, pass: 0, bearer: None, motion });
            }
        }
        Population::Tracks(tracks) => {
            let mut k = 0;
            for (id, points) in tracks {
                let Some(last) = points.last() else { continue };
                let shift_ms = start_ms - 1_000 - last.ts_ms;
                let motion = Motion::Track { points: Arc::new(points), next: 0, shift_ms };
                users[k % connections].push(User { base_id: id.clone(), id, pass: 0, bearer: None, motion });
                k += 1;
            }
            if k == 0 {
                bail!("the trajectory has no points");
            }
        }
    }
    let admin_bearer = match credentials {
        Credentials::Admin(token) => Some(format!("Bearer {token}")),
        Credentials::Client(key) => {
            for user in users.iter_mut().flatten() {
                user.bearer = Some(format!("Bearer {}", client_jwt(key, &user.id, start_ms / 1000)));
            }
            None
        }
    };
    Ok(users
        .into_iter()
        .enumerate()
        .filter(|(_, u)| !u.is_empty())
        .map(|(c, users)| ConnectionWork {
            users,
            next_user: 0,
            rng: ChaCha8Rng::seed_from_u64(seed ^ (0x9e37_79b9 * (c as u64 + 1))),
            credentials: credentials.clone(),
            admin_bearer: admin_bearer.clone(),
            batch: batch.max(1),
            area,
            churn_per_s: 0.0,
            churn_origin_ms: None,
            churned: 0,
        })
        .collect())
}

impl ConnectionWork {
    /// Users this connection sends for.
    pub fn user_count(&self) -> usize {
        self.users.len()
    }

    /// Replaces `per_s` of this connection's users per second (fractions add up over time),
    /// counted from its first request.
    pub fn set_churn(&mut self, per_s: f64) {
        self.churn_per_s = if per_s.is_finite() { per_s.max(0.0) } else { 0.0 };
    }

    /// Users replaced by churn so far.
    pub fn churned(&self) -> u64 {
        self.churned
    }

    /// Replaces the users due to leave by `now_ms` with new ones.
    fn churn(&mut self, now_ms: i64) {
        if self.churn_per_s <= 0.0 {
            return;
        }
        let origin = *self.churn_origin_ms.get_or_insert(now_ms);
        let due = ((now_ms - origin).max(0) as f64 / 1000.0 * self.churn_per_s) as u64;
        while self.churned < due {
            let u = (self.churned % self.users.len() as u64) as usize;
            self.churned += 1;
            self.restart(u, now_ms);
        }
    }

    /// Makes user `u` a new user: a new id (and JWT), from a fresh start.
    fn restart(&mut self, u: usize, now_ms: i64) {
        let user = &mut self.users[u];
        user.pass += 1;
        user.id = format!("{}~{}", user.base_id, user.pass);
        match &mut user.motion {
            Motion::Simulated(mover) => {
                if let Some(area) = self.area {
                    *mover = Mover::new(&mut self.rng, area);
                }
            }
            Motion::Track { points, next, shift_ms } => {
                // Shifted to end where the run is now, so its timestamps are fresh.
                *next = 0;
                *shift_ms = now_ms - 1_000 - points.last().map_or(0, |p| p.ts_ms);
            }
        }
        if let Credentials::Client(key) = &self.credentials {
            user.bearer = Some(format!("Bearer {}", client_jwt(key, &user.id, now_ms / 1000)));
        }
    }

    /// The next request, its pings stamped at `now_ms` (simulated users) or their shifted
    /// recorded times (tracks). With the admin token a batch takes the next users in turn; with
    /// client JWTs it is the next user's next pings.
    pub fn next_request(&mut self, now_ms: i64) -> Request {
        self.churn(now_ms);
        let mut body = Vec::with_capacity(if self.batch == 1 { 128 } else { 16 + self.batch * 110 });
        if self.batch > 1 {
            body.extend_from_slice(b"{\"pings\":[");
        }
        let bearer = match &self.credentials {
            Credentials::Admin(_) => {
                for k in 0..self.batch {
                    if k > 0 {
                        body.push(b',');
                    }
                    let u = self.take_user();
                    let ping = self.ping_of(u, now_ms);
                    write_ping(&mut body, &ping);
                }
                self.admin_bearer.clone().unwrap_or_default()
            }
            Credentials::Client(_) => {
                let u = self.take_user();
                for k in 0..self.batch {
                    if k > 0 {
                        body.push(b',');
                    }
                    let ping = self.ping_of(u, now_ms);
                    write_ping(&mut body, &ping);
                }
                self.users[u].bearer.clone().unwrap_or_default()
            }
        };
        if self.batch > 1 {
            body.extend_from_slice(b"]}");
        }
        Request { body, bearer, pings: self.batch }
    }

    fn take_user(&mut self) -> usize {
        let u = self.next_user;
        self.next_user = (self.next_user + 1) % self.users.len();
        u
    }

    fn ping_of(&mut self, u: usize, now_ms: i64) -> SimPing {
        if matches!(&self.users[u].motion, Motion::Track { points, next, .. } if *next == points.len()) {
            // Its timestamps would be stale now: start over as a new user.
            self.restart(u, now_ms);
        }
        let user = &mut self.users[u];
        match &mut user.motion {
            Motion::Simulated(mover) => mover.step(&mut self.rng, &user.id, now_ms),
            Motion::Track { points, next, shift_ms } => {
                let p = points[*next];
                *next += 1;
                SimPing {
                    user_id: user.id.clone(),
                    lat: p.lat,
                    lon: p.lon,
                    ts_ms: p.ts_ms + *shift_ms,
                    accuracy_m: 10.0,
                    mocked: false,
                }
            }
        }
    }
}

/// Appends one ping object. Hand-written (not serde) because the generator shares the cores
/// with the server it measures: every microsecond it spends is one the server does not get.
fn write_ping(out: &mut Vec<u8>, p: &SimPing) {
    let mut s = String::with_capacity(112);
    let _ = write!(
        s,
        "{{\"user_id\":\"{}\",\"lat\":{:.6},\"lon\":{:.6},\"ts_ms\":{},\"accuracy_m\":{:.1}}}",
        p.user_id, p.lat, p.lon, p.ts_ms, p.accuracy_m
    );
    out.extend_from_slice(s.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_parse_and_refuse_unknown_keys() {
        let c: Columns = "user=uid,lat=latitude,lon=longitude,ts=time".parse().unwrap();
        assert_eq!(
            c,
            Columns { user: "uid".into(), lat: "latitude".into(), lon: "longitude".into(), ts: "time".into() }
        );
        let partial: Columns = "lat=y".parse().unwrap();
        assert_eq!(partial.lat, "y");
        assert_eq!(partial.user, "user");
        assert!("height=z".parse::<Columns>().is_err());
        assert!("lat".parse::<Columns>().is_err());
    }

    #[test]
    fn times_in_every_accepted_form() {
        assert_eq!(parse_time("1700000000000").unwrap(), 1_700_000_000_000);
        assert_eq!(parse_time("1700000000").unwrap(), 1_700_000_000_000);
        assert_eq!(parse_time("1700000000.5").unwrap(), 1_700_000_000_500);
        assert_eq!(parse_time("2023-11-14T22:13:20Z").unwrap(), 1_700_000_000_000);
        assert_eq!(parse_time("2023-11-14 22:13:20").unwrap(), 1_700_000_000_000);
        assert!(parse_time("yesterday").is_err());
    }

    #[test]
    fn a_geolife_plt_file_parses() {
        // GeoLife's layout (a generated file, not GeoLife data): 6 header lines, then points.
        let text = "Geolife trajectory\nWGS 84\nAltitude is in Feet\nReserved 3\n0,2,255,My Track,0,0,2,8421376\n0\n\
                    39.984702,116.318417,0,492,39744.1201851852,2008-10-23,02:53:04\n\
                    39.984683,116.31845,0,492,39744.1202546296,2008-10-23,02:53:10\n";
        let points = parse_plt(text).unwrap();
        assert_eq!(points.len(), 2);
        assert_eq!(points[0].lat, 39.984702);
        // 2008-10-23 02:53:04 UTC
        assert_eq!(points[0].ts_ms, 1_224_730_384_000);
        assert_eq!(points[1].ts_ms - points[0].ts_ms, 6_000);
    }

    #[test]
    fn client_batches_carry_one_user_and_admin_batches_many() {
        let population = || Population::Simulated { users: 6, area: (39.7, 40.1, 116.1, 116.7), seed: 1 };
        let key = Arc::new(jsonwebtoken::EncodingKey::from_secret(b"s"));
        let mut work = split(population(), 2, &Credentials::Client(key), 3, 1_700_000_000_000).unwrap();
        assert_eq!(work.len(), 2);
        assert_eq!(work[0].user_count(), 3);
        let request = work[0].next_request(1_700_000_000_000);
        let doc: serde_json::Value = serde_json::from_slice(&request.body).unwrap();
        let pings = doc["pings"].as_array().unwrap();
        assert_eq!(pings.len(), 3);
        assert!(pings.iter().all(|p| p["user_id"] == "lg-0000000"));
        let ts: Vec<i64> = pings.iter().map(|p| p["ts_ms"].as_i64().unwrap()).collect();
        assert!(ts.windows(2).all(|w| w[0] < w[1]), "{ts:?}");
        assert!(request.bearer.starts_with("Bearer ey"));

        let mut work = split(population(), 2, &Credentials::Admin("t".into()), 3, 1_700_000_000_000).unwrap();
        let request = work[1].next_request(1_700_000_000_000);
        let doc: serde_json::Value = serde_json::from_slice(&request.body).unwrap();
        let users: Vec<&str> =
            doc["pings"].as_array().unwrap().iter().map(|p| p["user_id"].as_str().unwrap()).collect();
        assert_eq!(users, ["lg-0000001", "lg-0000003", "lg-0000005"]);
        assert_eq!(request.bearer, "Bearer t");
    }

    #[test]
    fn single_pings_are_bare_objects_and_tracks_start_over_as_new_users() {
        let mut tracks = BTreeMap::new();
        tracks.insert(
            "a".to_owned(),
            vec![
                TrackPoint { lat: 40.0, lon: 116.3, ts_ms: 1_000 },
                TrackPoint { lat: 40.001, lon: 116.3, ts_ms: 61_000 },
            ],
        );
        let start = 1_700_000_000_000;
        let mut work = split(Population::Tracks(tracks), 1, &Credentials::Admin("t".into()), 1, start).unwrap();
        let ids_and_ts: Vec<(String, i64)> = (0..3)
            .map(|_| {
                let doc: serde_json::Value = serde_json::from_slice(&work[0].next_request(start + 5_000).body).unwrap();
                (doc["user_id"].as_str().unwrap().to_owned(), doc["ts_ms"].as_i64().unwrap())
            })
            .collect();
        assert_eq!(ids_and_ts[0], ("a".into(), start - 61_000));
        assert_eq!(ids_and_ts[1], ("a".into(), start - 1_000));
        // Started over at the time of the request, as a user with no stale state.
        assert_eq!(ids_and_ts[2], ("a~1".into(), start + 5_000 - 61_000));
    }

    #[test]
    fn churn_replaces_the_longest_present_users_at_its_rate() {
        let population = Population::Simulated { users: 4, area: (39.7, 40.1, 116.1, 116.7), seed: 1 };
        let key = Arc::new(jsonwebtoken::EncodingKey::from_secret(b"s"));
        let mut work = split(population, 1, &Credentials::Client(key), 1, 1_700_000_000_000).unwrap();
        let work = &mut work[0];
        work.set_churn(2.0);
        let start = 1_700_000_000_000;
        let sent = |work: &mut ConnectionWork, at_ms: i64| {
            let request = work.next_request(at_ms);
            let doc: serde_json::Value = serde_json::from_slice(&request.body).unwrap();
            (doc["user_id"].as_str().unwrap().to_owned(), request.bearer)
        };
        let first: Vec<(String, String)> = (0..4).map(|_| sent(work, start)).collect();
        assert_eq!(
            first.iter().map(|(u, _)| u.as_str()).collect::<Vec<_>>(),
            ["lg-0000000", "lg-0000001", "lg-0000002", "lg-0000003"]
        );
        // 1.5 s at 2 per second: 3 users left, the first three, and new ones took their places.
        let later: Vec<(String, String)> = (0..4).map(|_| sent(work, start + 1_500)).collect();
        assert_eq!(
            later.iter().map(|(u, _)| u.as_str()).collect::<Vec<_>>(),
            ["lg-0000000~1", "lg-0000001~1", "lg-0000002~1", "lg-0000003"]
        );
        // A new user has its own JWT.
        assert_ne!(later[0].1, first[0].1);
        assert_eq!(later[3].1, first[3].1);
        assert_eq!(work.churned(), 3);
        // Two seconds later: five more; the cursor wraps round to the users replaced first.
        let again: Vec<String> = (0..4).map(|_| sent(work, start + 4_000).0).collect();
        assert_eq!(again, ["lg-0000000~2", "lg-0000001~2", "lg-0000002~2", "lg-0000003~2"]);
        assert_eq!(work.churned(), 8);
    }
}
