//! The whole decision pipeline — [`Engine::ingest`] (index → trigger rules → store) over a
//! [`MemoryStore`] — against a brute-force reference of API.md's trigger rules 0–5 and rule 4
//! (status, schedule, audience, cooldown, per-user and total maxima, the daily cap).
//!
//! The reference keeps every applied ping of each user (with the campaigns that existed when it
//! was applied) and every coupon ever issued, and decides each ping from that whole history:
//! staleness and rule 0 from the applied pings, each stay by walking back over them, every cap by
//! counting the coupons. It shares no code with the engine beyond the unit-tested domain helpers
//! (`Shape::contains`, `Shape::anchor`, `haversine_m`, `Campaign::is_issuing_at`).
//!
//! Where API.md leaves a choice open, the reference mirrors the engine and store, and says so:
//! - pings of one request are applied in `ts_ms` order across users too, ties in array order
//!   (only `total_max` can tell);
//! - a coupon is identified by (campaign, user, `ts_ms`) (rule 6), so two applied pings of one
//!   user at one time issue a campaign's coupon at most once, even across a delete and re-create;
//! - a deleted and re-created campaign id is a new campaign: its caps count from zero;
//! - the cooldown is two-sided in event time, as the store keeps it; through one engine a later
//!   coupon cannot exist (the ping would be stale), so this is API.md's "within the last
//!   `per_user_cooldown_s`".
//!
//! Scenarios are generated from a fixed seed, so a failure reproduces; a table of hand-written
//! cases follows for edges the generator reaches only rarely.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner};

use kabao::domain::schedule::Hours;
use kabao::domain::{
    haversine_m, Campaign, CampaignId, Caps, Circle, CouponId, DeviceId, Fence, FenceId, LatLon, Ping, Polygon,
    Schedule, Shape, Status, Trigger, UserId,
};
use kabao::engine::{Engine, EngineConfig, IngestReport};
use kabao::store::memory::MemoryStore;
use kabao::store::{Device, Platform, Store};
use kabao::trigger::IgnoreReason;

const SEED: [u8; 32] = *b"kabao engine end-to-end model 01";
/// Generated scenarios per run (each up to 10 requests of up to 8 pings).
const CASES: u32 = 2000;

/// Tuesday 2023-11-14 22:13:20 UTC, 17:13:20 in New York.
const BASE_MS: i64 = 1_700_000_000_000;
const DAY_MS: i64 = 24 * 60 * 60 * 1000;
const TTL_S: u64 = 60;
const MAX_ACCURACY_M: f64 = 50.0;
/// Far beyond every generated time, so the engine's idle-user eviction (which compares event
/// times with the server clock) never forgets a user of these 2023 scenarios.
const MAX_PING_AGE_S: u64 = 20 * 365 * 86_400;

const SPEEDS_MPS: [f64; 3] = [0.0, 30.0, 200.0];
const DAILY_CAPS: [u32; 5] = [0, 1, 2, 3, 10];

// ---------------------------------------------------------------------------------------------
// Geometry: places in metres (north, east) around one origin.

const ORIGIN: (f64, f64) = (22.5, 114.0);
const M_PER_DEG: f64 = 6_371_008.8 * std::f64::consts::PI / 180.0;

fn at(north: f64, east: f64) -> LatLon {
    let lat = ORIGIN.0 + north / M_PER_DEG;
    let lon = ORIGIN.1 + east / (M_PER_DEG * ORIGIN.0.to_radians().cos());
    LatLon::new(lat, lon).expect("test positions are in range")
}

/// Fence centres: a 50 m grid, so fences of different sizes share centres (nearest-fence ties)
/// and overlap.
const GRID: [(f64, f64); 9] = [
    (0.0, 0.0),
    (0.0, 50.0),
    (0.0, 100.0),
    (50.0, 0.0),
    (50.0, 50.0),
    (50.0, 100.0),
    (100.0, 0.0),
    (100.0, 50.0),
    (100.0, 100.0),
];

/// Fixed ping places besides the grid itself: between its points, and outside everything.
const BETWEEN_AND_OUTSIDE: [(f64, f64); 5] = [(0.0, 25.0), (25.0, 25.0), (50.0, 75.0), (-30.0, 0.0), (180.0, 180.0)];

/// How many fixed ping places there are: the grid, then [`BETWEEN_AND_OUTSIDE`].
const PLACES: usize = GRID.len() + BETWEEN_AND_OUTSIDE.len();

/// The `i`-th fixed ping place.
fn fixed_place(i: usize) -> (f64, f64) {
    GRID.get(i).copied().unwrap_or_else(|| BETWEEN_AND_OUTSIDE[i - GRID.len()])
}

/// Far enough from everything that a short gap to it is implausibly fast.
const FAR: (f64, f64) = (2_000.0, 0.0);

const RADII_M: [f64; 4] = [20.0, 40.0, 60.0, 100.0];
const HALF_SIDES_M: [f64; 4] = [25.0, 50.0, 30.0, 60.0];

fn fence_id(s: &str) -> FenceId {
    FenceId::parse("id", s).expect("valid fence id")
}

fn circle(id: &str, (north, east): (f64, f64), radius_m: f64) -> Fence {
    Fence { id: fence_id(id), shape: Shape::Circle(Circle { center: at(north, east), radius_m }), rings: None }
}

fn polygon(id: &str, corners: &[(f64, f64)]) -> Fence {
    let mut ring: Vec<LatLon> = corners.iter().map(|&(n, e)| at(n, e)).collect();
    ring.push(ring[0]);
    Fence { id: fence_id(id), shape: Shape::Polygon(Polygon::new(&[ring]).expect("a valid polygon")), rings: None }
}

fn square(id: &str, (north, east): (f64, f64), half: f64) -> Fence {
    let c = [(-1.0, -1.0), (-1.0, 1.0), (1.0, 1.0), (1.0, -1.0)];
    polygon(id, &c.map(|(dn, de)| (north + dn * half, east + de * half)))
}

fn triangle(id: &str, (north, east): (f64, f64), s: f64) -> Fence {
    polygon(id, &[(north - s, east - s), (north - s, east + s), (north + s, east)])
}

// ---------------------------------------------------------------------------------------------
// Campaign building blocks.

const TRIGGERS: [Trigger; 5] = [
    Trigger::Enter,
    Trigger::Enter,
    Trigger::Dwell { dwell_s: 0 },
    Trigger::Dwell { dwell_s: 5 },
    Trigger::Dwell { dwell_s: 20 },
];
const COOLDOWNS_S: [i64; 5] = [0, 0, 5, 30, 120];
const PER_USER_MAXES: [i64; 5] = [0, 0, 1, 2, 3];
const TOTAL_MAXES: [i64; 5] = [0, 0, 1, 2, 4];
const TAGS: [&str; 3] = ["vip", "new", "x"];

/// Schedule windows, ms relative to `BASE_MS`.
const WINDOWS: [(Option<i64>, Option<i64>); 5] = [
    (None, None),
    (Some(0), None),
    (Some(120_000), Some(1_800_000)),
    (None, Some(300_000)),
    (Some(-60_000), Some(60_000)),
];

const MON: u8 = 1;
const TUE: u8 = 2;
const WED: u8 = 4;

/// Opening hours around the base time: (timezone, [(days, from minute, to minute)]).
type HoursDef = (&'static str, &'static [(Option<u8>, u16, u16)]);
const HOURS: [HoursDef; 6] = [
    ("UTC", &[(None, 22 * 60, 22 * 60 + 20)]),
    ("UTC", &[(Some(TUE), 22 * 60 + 20, 1440)]),
    ("UTC", &[(Some(TUE), 22 * 60 + 30, 60)]),
    ("America/New_York", &[(None, 17 * 60, 17 * 60 + 20)]),
    ("America/New_York", &[(Some(MON | WED), 0, 1440), (Some(TUE), 17 * 60 + 15, 18 * 60)]),
    ("America/New_York", &[]),
];

fn schedule(window: usize, hours: usize) -> Schedule {
    let (starts, ends) = WINDOWS[window];
    let (tz, lines) = HOURS[hours];
    Schedule {
        starts_at_ms: starts.map(|s| BASE_MS + s),
        ends_at_ms: ends.map(|e| BASE_MS + e),
        timezone: tz.parse().expect("known timezone"),
        timezone_given: true,
        hours: lines
            .iter()
            .map(|&(days, from_min, to_min)| Hours {
                days: days.unwrap_or(0b111_1111),
                days_given: days.is_some(),
                from_min,
                to_min,
            })
            .collect(),
    }
}

/// An active, unlimited, always-open campaign with these fences.
fn campaign(id: &str, trigger: Trigger, fences: Vec<Fence>) -> Campaign {
    let id = CampaignId::parse("id", id).expect("valid campaign id");
    Campaign { trigger, revision: 0, ..Campaign::new(id, "t", fences) }
}

fn user(s: &str) -> UserId {
    UserId::parse("user_id", s).expect("valid user id")
}

fn device(tags: &[&str]) -> Device {
    Device {
        platform: Platform::Fcm,
        token: "token".into(),
        tags: tags.iter().map(|t| t.to_string()).collect(),
        locale: None,
    }
}

fn config(max_speed_mps: f64, daily_cap: u32) -> EngineConfig {
    EngineConfig {
        max_ping_age_s: MAX_PING_AGE_S,
        state_ttl_s: TTL_S,
        max_accuracy_m: MAX_ACCURACY_M,
        max_coupons_per_user_per_day: daily_cap,
        max_speed_mps,
        ..EngineConfig::default()
    }
}

// ---------------------------------------------------------------------------------------------
// Generated scenarios.

#[derive(Debug, Clone)]
struct FenceSpec {
    /// 0 circle, 1 square, 2 triangle.
    kind: u8,
    center: usize,
    size: usize,
}

#[derive(Debug, Clone)]
struct CampaignSpec {
    trigger: usize,
    paused: bool,
    schedule: Option<(usize, usize)>,
    caps: (usize, usize, usize),
    audience: Option<Vec<&'static str>>,
    strict_accuracy: bool,
    fences: Vec<FenceSpec>,
    /// Rotates the fence ids, so id order and generation order differ.
    id_rotation: usize,
}

impl CampaignSpec {
    fn build(&self, id: &str) -> Campaign {
        let fences = self
            .fences
            .iter()
            .enumerate()
            .map(|(i, f)| {
                let fid = format!("f{}", (i + self.id_rotation) % self.fences.len());
                let centre = GRID[f.center];
                match f.kind {
                    0 => circle(&fid, centre, RADII_M[f.size]),
                    1 => square(&fid, centre, HALF_SIDES_M[f.size]),
                    _ => triangle(&fid, centre, HALF_SIDES_M[f.size]),
                }
            })
            .collect();
        let mut c = campaign(id, TRIGGERS[self.trigger], fences);
        c.status = if self.paused { Status::Paused } else { Status::Active };
        c.schedule = self.schedule.map(|(w, h)| schedule(w, h));
        let (cooldown, per_user, total) = self.caps;
        c.caps = Caps {
            per_user_cooldown_s: COOLDOWNS_S[cooldown],
            per_user_max: PER_USER_MAXES[per_user],
            total_max: TOTAL_MAXES[total],
        };
        c.caps_given = true;
        if let Some(tags) = &self.audience {
            c.audience_tags = tags.iter().map(|t| t.to_string()).collect();
            c.audience_given = true;
        }
        c.max_accuracy_m = self.strict_accuracy.then_some(20.0);
        c.coupon.valid_for_s = (self.id_rotation == 0).then_some(600);
        c
    }
}

#[derive(Debug, Clone, Copy)]
enum Place {
    Fixed(usize),
    Free(f64, f64),
    Far,
}

impl Place {
    fn position(self) -> LatLon {
        match self {
            Place::Fixed(i) => {
                let (north, east) = fixed_place(i);
                at(north, east)
            }
            Place::Free(n, e) => at(n, e),
            Place::Far => at(FAR.0, FAR.1),
        }
    }
}

/// Offsets of a ping's `ts_ms` from its request's clock: equal, slightly and much older (stale
/// across requests), around the dwell times and the TTL.
const JITTERS_MS: [i64; 12] = [-61_000, -5_000, -1, 0, 0, 0, 1, 1_000, 5_000, 20_000, 60_000, 60_001];
/// How far each request's clock moves on: not at all, around dwell, TTL, and the daily window.
const STEPS_MS: [i64; 14] =
    [0, 0, 1, 1_000, 5_000, 5_000, 20_000, 59_999, 60_000, 60_001, 300_000, 3_600_000, 86_399_999, 86_400_000];
const ACCURACIES_M: [Option<f64>; 7] = [None, None, Some(5.0), Some(20.0), Some(20.5), Some(50.0), Some(50.5)];

#[derive(Debug, Clone)]
struct PingSpec {
    user: usize,
    place: Place,
    jitter: usize,
    accuracy: usize,
    mocked: bool,
}

/// A campaign change before a request: `PUT` the slot with its other definition, or delete it
/// (creating it again when absent).
#[derive(Debug, Clone, Copy)]
struct CampaignOp {
    slot: usize,
    delete_or_create: bool,
}

#[derive(Debug, Clone)]
struct RequestSpec {
    step: usize,
    op: Option<CampaignOp>,
    pings: Vec<PingSpec>,
}

#[derive(Debug, Clone)]
struct Scenario {
    max_speed: usize,
    daily_cap: usize,
    /// Two definitions per campaign slot; the first is the one created at the start.
    campaigns: Vec<(CampaignSpec, CampaignSpec)>,
    /// Per user, the tags of each device.
    users: Vec<Vec<Vec<&'static str>>>,
    requests: Vec<RequestSpec>,
}

fn fence_spec() -> impl Strategy<Value = FenceSpec> {
    (0..3u8, 0..GRID.len(), 0..4usize).prop_map(|(kind, center, size)| FenceSpec { kind, center, size })
}

fn campaign_spec() -> impl Strategy<Value = CampaignSpec> {
    (
        0..TRIGGERS.len(),
        prop::bool::weighted(0.15),
        prop::option::weighted(0.4, (0..WINDOWS.len(), 0..HOURS.len())),
        (0..COOLDOWNS_S.len(), 0..PER_USER_MAXES.len(), 0..TOTAL_MAXES.len()),
        prop::option::weighted(0.3, prop::sample::subsequence(vec!["vip", "new"], 0..=2)),
        prop::bool::weighted(0.3),
        prop::collection::vec(fence_spec(), 1..=3),
        0..3usize,
    )
        .prop_map(|(trigger, paused, schedule, caps, audience, strict_accuracy, fences, id_rotation)| {
            CampaignSpec { trigger, paused, schedule, caps, audience, strict_accuracy, fences, id_rotation }
        })
}

fn place() -> impl Strategy<Value = Place> {
    prop_oneof![
        5 => (0..PLACES).prop_map(Place::Fixed),
        4 => (-80.0..180.0f64, -80.0..180.0f64).prop_map(|(n, e)| Place::Free(n, e)),
        1 => Just(Place::Far),
    ]
}

fn ping_spec() -> impl Strategy<Value = PingSpec> {
    (0..3usize, place(), 0..JITTERS_MS.len(), 0..ACCURACIES_M.len(), prop::bool::weighted(0.07))
        .prop_map(|(user, place, jitter, accuracy, mocked)| PingSpec { user, place, jitter, accuracy, mocked })
}

fn request_spec() -> impl Strategy<Value = RequestSpec> {
    (
        0..STEPS_MS.len(),
        prop::option::weighted(0.15, (0..4usize, any::<bool>())),
        prop::collection::vec(ping_spec(), 1..=8),
    )
        .prop_map(|(step, op, pings)| RequestSpec {
            step,
            op: op.map(|(slot, delete_or_create)| CampaignOp { slot, delete_or_create }),
            pings,
        })
}

fn scenario() -> impl Strategy<Value = Scenario> {
    (
        0..SPEEDS_MPS.len(),
        0..DAILY_CAPS.len(),
        prop::collection::vec((campaign_spec(), campaign_spec()), 1..=4),
        prop::collection::vec(prop::collection::vec(prop::sample::subsequence(TAGS.to_vec(), 0..=2), 0..=2), 1..=3),
        prop::collection::vec(request_spec(), 1..=10),
    )
        .prop_map(|(max_speed, daily_cap, campaigns, users, requests)| Scenario {
            max_speed,
            daily_cap,
            campaigns,
            users,
            requests,
        })
}

// ---------------------------------------------------------------------------------------------
// The reference.

/// An issued coupon as the tests compare them: (user, campaign, fence, ts_ms).
type Issued = (String, String, String, i64);

/// What one request should answer: the ignored (position, reason) set and the issued multiset
/// (sorted).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Answer {
    ignored: BTreeSet<(usize, &'static str)>,
    issued: Vec<Issued>,
}

impl Answer {
    fn of_report(report: &IngestReport) -> Answer {
        let mut issued: Vec<Issued> = report
            .events
            .iter()
            .map(|e| (e.user_id.to_string(), e.campaign_id.to_string(), e.fence_id.to_string(), e.issued_at_ms))
            .collect();
        issued.sort();
        Answer { ignored: report.ignored.iter().map(|&(i, r)| (i, r.as_str())).collect(), issued }
    }
}

/// A campaign as the reference knows it.
#[derive(Clone)]
struct Live {
    def: Arc<Campaign>,
    /// New on every create and `PUT`: stays recorded under another epoch do not exist.
    epoch: u64,
    /// New on every create (not on `PUT`): caps count the coupons of one incarnation, as the
    /// store does for a reused id (its counters start from zero).
    incarnation: u64,
}

/// An applied ping and the epoch of every campaign that existed when it was applied.
struct Applied {
    ping: Ping,
    world: BTreeMap<String, u64>,
}

struct RefCoupon {
    user: String,
    campaign: String,
    incarnation: u64,
    fence: String,
    ts_ms: i64,
}

/// Accuracy rule: equal to the limit is applied; no accuracy or no limit always is.
fn applies(accuracy_m: Option<f64>, limit_m: Option<f64>) -> bool {
    match (accuracy_m, limit_m) {
        (Some(a), Some(l)) => a <= l,
        _ => true,
    }
}

struct Reference {
    config: EngineConfig,
    world: BTreeMap<String, Live>,
    /// Every applied ping of each user, in the order applied.
    applied: HashMap<String, Vec<Applied>>,
    /// Every coupon ever issued.
    coupons: Vec<RefCoupon>,
    /// Union of each user's device tags.
    tags: HashMap<String, BTreeSet<String>>,
    counter: u64,
    /// Every rule 4 outcome met, for the coverage check.
    outcomes: BTreeSet<&'static str>,
}

impl Reference {
    fn new(config: EngineConfig) -> Self {
        Self {
            config,
            world: BTreeMap::new(),
            applied: HashMap::new(),
            coupons: Vec::new(),
            tags: HashMap::new(),
            counter: 0,
            outcomes: BTreeSet::new(),
        }
    }

    fn next(&mut self) -> u64 {
        self.counter += 1;
        self.counter
    }

    fn create(&mut self, def: Arc<Campaign>) {
        let (epoch, incarnation) = (self.next(), self.next());
        self.world.insert(def.id.to_string(), Live { def, epoch, incarnation });
    }

    fn replace(&mut self, def: Arc<Campaign>) {
        let epoch = self.next();
        let live = self.world.get_mut(def.id.as_str()).expect("replace an existing campaign");
        live.def = def;
        live.epoch = epoch;
    }

    fn delete(&mut self, id: &str) {
        self.world.remove(id);
    }

    fn ttl_ms(&self) -> i64 {
        self.config.state_ttl_s as i64 * 1000
    }

    /// Rule 0 and the ignore reasons, in their order of precedence, against the user's applied
    /// history.
    fn ignore_reason(&self, history: &[Applied], p: &Ping) -> Option<IgnoreReason> {
        if history.iter().any(|a| p.ts_ms < a.ping.ts_ms) {
            return Some(IgnoreReason::Stale);
        }
        if p.mocked {
            return Some(IgnoreReason::Mocked);
        }
        if !applies(p.accuracy_m, Some(self.config.max_accuracy_m)) {
            return Some(IgnoreReason::Inaccurate);
        }
        if self.config.max_speed_mps > 0.0 {
            if let Some(prev) = history.last() {
                let gap_ms = p.ts_ms - prev.ping.ts_ms;
                let d = haversine_m(prev.ping.at, p.at);
                let too_fast =
                    if gap_ms == 0 { d > 0.0 } else { d / (gap_ms as f64 / 1000.0) > self.config.max_speed_mps };
                if gap_ms <= self.ttl_ms() && too_fast {
                    return Some(IgnoreReason::ImplausibleSpeed);
                }
            }
        }
        None
    }

    /// Rules 2 and 3 for one fence of one campaign: is the ping `p` (applied, inside `fence`,
    /// applied for the campaign) its stay's candidate? Walks back over the applied history:
    /// the stay's members are the pings applied for this campaign (same epoch) inside the fence;
    /// pings too inaccurate for the campaign are skipped; an outside ping, another epoch or a gap
    /// of more than `state_ttl_s` between consecutive applied pings ends the stay.
    fn is_candidate(&self, history: &[Applied], p: &Ping, live: &Live, fence: &Fence) -> bool {
        let campaign = &live.def;
        let mut members = vec![p.ts_ms];
        let mut later_ts = p.ts_ms;
        for a in history.iter().rev() {
            if later_ts - a.ping.ts_ms > self.ttl_ms() {
                break;
            }
            later_ts = a.ping.ts_ms;
            if a.world.get(campaign.id.as_str()) != Some(&live.epoch) {
                break;
            }
            if !applies(a.ping.accuracy_m, campaign.max_accuracy_m) {
                continue;
            }
            if !fence.shape.contains(a.ping.at) {
                break;
            }
            members.push(a.ping.ts_ms);
        }
        members.reverse();
        let due_ms = match campaign.trigger {
            Trigger::Enter => 0,
            Trigger::Dwell { dwell_s } => dwell_s * 1000,
        };
        let start = members[0];
        // Once per stay: the first member that is due is the candidate.
        members.iter().position(|&t| t - start >= due_ms) == Some(members.len() - 1)
    }

    /// Rule 4 for a candidate of `live` for user `u` at `ts_ms`, given every coupon so far: why it
    /// is refused, if it is.
    fn refusal(&self, u: &str, ts_ms: i64, live: &Live) -> Option<&'static str> {
        let c = &live.def;
        let id = c.id.as_str();
        let caps = c.caps;
        if c.status == Status::Paused {
            return Some("paused");
        }
        if !c.is_issuing_at(ts_ms) {
            return Some("schedule");
        }
        if !c.audience_tags.is_empty() {
            let tags = self.tags.get(u);
            if !c.audience_tags.iter().any(|t| tags.is_some_and(|tags| tags.contains(t))) {
                return Some("audience");
            }
        }
        // Rule 6: a coupon is identified by (campaign, user, ts) — two pings of one user at one
        // time issue a campaign's coupon at most once.
        if self.coupons.iter().any(|k| k.campaign == id && k.user == u && k.ts_ms == ts_ms) {
            return Some("duplicate");
        }
        let mine: Vec<&RefCoupon> =
            self.coupons.iter().filter(|k| k.campaign == id && k.incarnation == live.incarnation).collect();
        // The store keeps a campaign's coupons to a user `per_user_cooldown_s` apart on both
        // sides in event time. With one engine in front of the store a later coupon cannot exist
        // (such a ping would be stale), so this is "within the last per_user_cooldown_s".
        if caps.per_user_cooldown_s > 0
            && mine.iter().any(|k| k.user == u && (ts_ms - k.ts_ms).abs() < caps.per_user_cooldown_s * 1000)
        {
            return Some("cooldown");
        }
        if caps.per_user_max > 0 && mine.iter().filter(|k| k.user == u).count() as i64 >= caps.per_user_max {
            return Some("per_user_max");
        }
        if caps.total_max > 0 && mine.len() as i64 >= caps.total_max {
            return Some("total_max");
        }
        let daily = self.config.max_coupons_per_user_per_day as usize;
        if daily > 0
            && self.coupons.iter().filter(|k| k.user == u && k.ts_ms > ts_ms - DAY_MS && k.ts_ms <= ts_ms).count()
                >= daily
        {
            return Some("daily_cap");
        }
        None
    }

    /// One request.
    fn ingest(&mut self, pings: &[Ping]) -> Answer {
        // Each user's pings in (ts, position) order. Users are independent except for
        // `total_max`; API.md leaves the order across users open, and this is the engine's.
        let mut order: Vec<usize> = (0..pings.len()).collect();
        order.sort_by_key(|&i| (pings[i].ts_ms, i));
        let mut answer = Answer { ignored: BTreeSet::new(), issued: Vec::new() };
        for position in order {
            let p = &pings[position];
            let u = p.user_id.to_string();
            let history: &[Applied] = self.applied.get(&u).map_or(&[], Vec::as_slice);
            if let Some(reason) = self.ignore_reason(history, p) {
                answer.ignored.insert((position, reason.as_str()));
                continue;
            }
            // Candidates (rules 2, 3, 5), in ascending campaign id order.
            let mut candidates: Vec<(Live, String)> = Vec::new();
            for live in self.world.values() {
                if !applies(p.accuracy_m, live.def.max_accuracy_m) {
                    continue;
                }
                let nearest = live
                    .def
                    .fences
                    .iter()
                    .filter(|f| f.shape.contains(p.at) && self.is_candidate(history, p, live, f))
                    .map(|f| (haversine_m(p.at, f.shape.anchor()), f.id.to_string()))
                    .min_by(|a, b| a.0.total_cmp(&b.0).then_with(|| a.1.cmp(&b.1)));
                if let Some((_, fence)) = nearest {
                    candidates.push((live.clone(), fence));
                }
            }
            // Rule 4, campaign by campaign, so the daily cap counts what this ping issued.
            for (live, fence) in candidates {
                let refusal = self.refusal(&u, p.ts_ms, &live);
                self.outcomes.insert(refusal.unwrap_or("issued"));
                if refusal.is_none() {
                    let coupon = RefCoupon {
                        user: u.clone(),
                        campaign: live.def.id.to_string(),
                        incarnation: live.incarnation,
                        fence,
                        ts_ms: p.ts_ms,
                    };
                    answer.issued.push((u.clone(), coupon.campaign.clone(), coupon.fence.clone(), p.ts_ms));
                    self.coupons.push(coupon);
                }
            }
            let world = self.world.iter().map(|(id, live)| (id.clone(), live.epoch)).collect();
            self.applied.entry(u).or_default().push(Applied { ping: p.clone(), world });
        }
        answer.issued.sort();
        answer
    }
}

// ---------------------------------------------------------------------------------------------
// Running a scenario against both.

/// Runs one scenario through the engine and the reference, comparing every request; returns the
/// outcomes it reached (for the coverage check).
async fn run_scenario(s: &Scenario) -> Result<BTreeSet<&'static str>, TestCaseError> {
    let mut seen = BTreeSet::new();
    let config = config(SPEEDS_MPS[s.max_speed], DAILY_CAPS[s.daily_cap]);
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let mut reference = Reference::new(config.clone());

    let ids: Vec<String> = (0..s.campaigns.len()).map(|i| format!("c{i}")).collect();
    let defs: Vec<[Arc<Campaign>; 2]> =
        s.campaigns.iter().zip(&ids).map(|((a, b), id)| [Arc::new(a.build(id)), Arc::new(b.build(id))]).collect();
    // Which definition each slot holds; `None` while deleted.
    let mut current: Vec<Option<usize>> = vec![Some(0); defs.len()];
    for pair in &defs {
        // Through the store before the engine starts: the index is built from it.
        let stored = store.insert_campaign((*pair[0]).clone()).await.expect("insert");
        reference.create(stored);
    }
    let users: Vec<String> = (0..s.users.len()).map(|i| format!("u{i}")).collect();
    for (u, devices) in users.iter().zip(&s.users) {
        let tags = reference.tags.entry(u.clone()).or_default();
        for (d, device_tags) in devices.iter().enumerate() {
            let device_id = DeviceId::parse("device_id", &format!("d{d}")).expect("device id");
            store.put_device(&user(u), &device_id, device(device_tags)).await.expect("put_device");
            tags.extend(device_tags.iter().map(|t| t.to_string()));
        }
    }
    let engine = Engine::start(store.clone(), config).await.expect("engine starts");

    let mut clock = BASE_MS;
    for (n, request) in s.requests.iter().enumerate() {
        if let Some(op) = request.op.filter(|op| op.slot < defs.len()) {
            let slot = op.slot;
            match (current[slot], op.delete_or_create) {
                (Some(which), false) => {
                    let def = defs[slot][1 - which].clone();
                    engine.replace_campaign((*def).clone()).await.expect("replace");
                    reference.replace(def);
                    current[slot] = Some(1 - which);
                    seen.insert("put");
                }
                (Some(_), true) => {
                    engine.delete_campaign(&defs[slot][0].id).await.expect("delete");
                    reference.delete(&ids[slot]);
                    current[slot] = None;
                    seen.insert("delete");
                }
                (None, _) => {
                    let def = defs[slot][0].clone();
                    engine.create_campaign((*def).clone()).await.expect("re-create");
                    reference.create(def);
                    current[slot] = Some(0);
                    seen.insert("re-create");
                }
            }
        }
        clock += STEPS_MS[request.step];
        let pings: Vec<Ping> = request
            .pings
            .iter()
            .map(|p| Ping {
                user_id: user(&users[p.user % users.len()]),
                at: p.place.position(),
                ts_ms: clock + JITTERS_MS[p.jitter],
                accuracy_m: ACCURACIES_M[p.accuracy],
                speed_mps: None,
                mocked: p.mocked,
            })
            .collect();
        let expected = reference.ingest(&pings);
        let report = engine.ingest(pings.clone()).await.expect("ingest");
        for event in &report.events {
            prop_assert_eq!(
                &event.coupon_id,
                &CouponId::derive(&event.campaign_id, &event.user_id, event.issued_at_ms)
            );
            // API.md "Time": expires_at_ms = ts_ms + valid_for_s × 1000, or never.
            let valid_for_s = reference.world[event.campaign_id.as_str()].def.coupon.valid_for_s;
            prop_assert_eq!(event.expires_at_ms, valid_for_s.map(|v| event.issued_at_ms + v * 1000));
        }
        let got = Answer::of_report(&report);
        prop_assert_eq!(&got, &expected, "request {} of {}: {:#?}", n, s.requests.len(), pings);
        for (_, reason) in &got.ignored {
            seen.insert(reason);
        }
        match got.issued.len() {
            0 => {}
            1 => {
                seen.insert("issued");
            }
            _ => {
                seen.insert("issued several");
            }
        }
    }

    // The wallets hold exactly what the reference issued, and the counters count it.
    for u in &users {
        let mut wallet: Vec<Issued> = store
            .wallet(&user(u))
            .await
            .expect("wallet")
            .into_iter()
            .map(|r| {
                (
                    r.coupon.user_id.to_string(),
                    r.coupon.campaign_id.to_string(),
                    r.coupon.fence_id.to_string(),
                    r.coupon.issued_at_ms,
                )
            })
            .collect();
        wallet.sort();
        let mut expected: Vec<Issued> = reference
            .coupons
            .iter()
            .filter(|k| &k.user == u)
            .map(|k| (k.user.clone(), k.campaign.clone(), k.fence.clone(), k.ts_ms))
            .collect();
        expected.sort();
        prop_assert_eq!(wallet, expected, "wallet of {}", u);
    }
    for (id, live) in &reference.world {
        let stats = store.campaign_stats(&live.def.id).await.expect("stats");
        let issued =
            reference.coupons.iter().filter(|k| &k.campaign == id && k.incarnation == live.incarnation).count();
        prop_assert_eq!(stats.issued, issued as u64, "issued count of {}", id);
    }
    seen.extend(reference.outcomes.iter().copied());
    Ok(seen)
}

#[test]
fn engine_and_memory_store_match_the_reference() {
    let config = Config { cases: CASES, failure_persistence: None, ..Config::default() };
    let mut runner = TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::ChaCha, &SEED));
    let coverage = RefCell::new(BTreeSet::new());
    let result = runner.run(&scenario(), |s| {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        coverage.borrow_mut().extend(runtime.block_on(run_scenario(&s))?);
        Ok(())
    });
    let coverage = coverage.into_inner();
    if let Err(failure) = result {
        panic!("{failure}");
    }
    // The scenarios must reach every ignore reason, every rule 4 refusal, single and several
    // coupons per request, and every kind of campaign change.
    let reached = [
        "stale",
        "mocked",
        "inaccurate",
        "implausible_speed",
        "paused",
        "schedule",
        "audience",
        "duplicate",
        "cooldown",
        "per_user_max",
        "total_max",
        "daily_cap",
        "issued",
        "issued several",
        "put",
        "delete",
        "re-create",
    ];
    for outcome in reached {
        assert!(coverage.contains(outcome), "no scenario reached {outcome}: {coverage:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// Hand-written end-to-end cases for edges the scenarios reach only rarely.

/// A ping `s` seconds after the base time.
fn ping(u: &str, place: LatLon, s: i64) -> Ping {
    Ping { user_id: user(u), at: place, ts_ms: BASE_MS + s * 1000, accuracy_m: None, speed_mps: None, mocked: false }
}

/// Inside fence `f0` of [`one_fence`] campaigns.
fn inside() -> LatLon {
    at(0.0, 0.0)
}

/// Outside every fence of these tests.
fn outside() -> LatLon {
    at(0.0, 1_000.0)
}

fn one_fence(id: &str, trigger: Trigger) -> Campaign {
    campaign(id, trigger, vec![circle("f0", (0.0, 0.0), 50.0)])
}

/// An engine (speed check off, no daily cap unless given) with these campaigns created through it.
async fn engine_with(campaigns: Vec<Campaign>, daily_cap: u32) -> Arc<Engine> {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let engine = Engine::start(store, config(0.0, daily_cap)).await.expect("engine starts");
    for c in campaigns {
        engine.create_campaign(c).await.expect("create");
    }
    engine
}

/// Sends one request; the coupons it issued as (campaign, fence, seconds after base), sorted.
async fn send(engine: &Engine, pings: Vec<Ping>) -> Vec<(String, String, i64)> {
    let report = engine.ingest(pings).await.expect("ingest");
    let mut issued: Vec<_> = report
        .events
        .iter()
        .map(|e| (e.campaign_id.to_string(), e.fence_id.to_string(), (e.issued_at_ms - BASE_MS) / 1000))
        .collect();
    issued.sort();
    issued
}

fn coupon(campaign: &str, s: i64) -> (String, String, i64) {
    (campaign.to_owned(), "f0".to_owned(), s)
}

#[tokio::test]
async fn a_dwell_candidate_refused_by_the_schedule_is_used_up_for_its_stay() {
    let mut c = one_fence("c", Trigger::Dwell { dwell_s: 10 });
    c.schedule = Some(Schedule { starts_at_ms: Some(BASE_MS + 15_000), ..Schedule::default() });
    let engine = engine_with(vec![c], 0).await;
    // Due at 12 s, before the schedule opens: refused, and not retried at 20 s in the same stay.
    assert_eq!(send(&engine, vec![ping("u", inside(), 0), ping("u", inside(), 12)]).await, vec![]);
    assert_eq!(send(&engine, vec![ping("u", inside(), 20)]).await, vec![]);
    // A new stay is due again.
    let next_stay = vec![ping("u", outside(), 25), ping("u", inside(), 30), ping("u", inside(), 40)];
    assert_eq!(send(&engine, next_stay).await, vec![coupon("c", 40)]);
}

#[tokio::test]
async fn an_enter_refused_by_audience_is_not_retried_when_a_device_gains_the_tag_mid_stay() {
    let mut c = one_fence("c", Trigger::Enter);
    c.audience_tags = vec!["vip".into()];
    c.audience_given = true;
    let engine = engine_with(vec![c], 0).await;
    assert_eq!(send(&engine, vec![ping("u", inside(), 0)]).await, vec![]);
    let phone = DeviceId::parse("device_id", "phone").expect("device id");
    engine.store().put_device(&user("u"), &phone, device(&["vip"])).await.expect("put_device");
    assert_eq!(send(&engine, vec![ping("u", inside(), 5)]).await, vec![]);
    assert_eq!(send(&engine, vec![ping("u", outside(), 10), ping("u", inside(), 15)]).await, vec![coupon("c", 15)]);
}

#[tokio::test]
async fn put_forgets_the_stays_of_the_replaced_campaign_but_not_its_coupons() {
    let dwell = one_fence("d", Trigger::Dwell { dwell_s: 10 });
    let mut enter = one_fence("e", Trigger::Enter);
    enter.caps = Caps { per_user_max: 1, ..Caps::default() };
    let control = one_fence("z", Trigger::Dwell { dwell_s: 10 });
    let engine = engine_with(vec![dwell.clone(), enter.clone(), control], 0).await;
    assert_eq!(send(&engine, vec![ping("u", inside(), 0)]).await, vec![coupon("e", 0)]);
    engine.replace_campaign(dwell).await.expect("replace d");
    engine.replace_campaign(enter).await.expect("replace e");
    // `d`'s stay restarted at 12 s (the control, not replaced, is due); `e` sees an enter again
    // but its per-user maximum still counts the coupon issued before the PUT.
    assert_eq!(send(&engine, vec![ping("u", inside(), 12)]).await, vec![coupon("z", 12)]);
    assert_eq!(send(&engine, vec![ping("u", inside(), 21)]).await, vec![]);
    assert_eq!(send(&engine, vec![ping("u", inside(), 22)]).await, vec![coupon("d", 22)]);
    let stats = engine.store().campaign_stats(&CampaignId::parse("id", "e").expect("id")).await.expect("stats");
    assert_eq!(stats.issued, 1);
}

#[tokio::test]
async fn delete_stops_issuing_and_a_reused_id_is_a_new_campaign() {
    let mut c = one_fence("c", Trigger::Enter);
    c.caps = Caps { per_user_max: 1, ..Caps::default() };
    let engine = engine_with(vec![c.clone()], 0).await;
    assert_eq!(send(&engine, vec![ping("u", inside(), 0)]).await, vec![coupon("c", 0)]);
    engine.delete_campaign(&c.id).await.expect("delete");
    assert_eq!(send(&engine, vec![ping("u", outside(), 5), ping("u", inside(), 10)]).await, vec![]);
    // Issued coupons stay in the wallet.
    assert_eq!(engine.store().wallet(&user("u")).await.expect("wallet").len(), 1);
    // The same id created again starts from zero: its per-user maximum allows a coupon, and the
    // user is in no stay of it.
    engine.create_campaign(c).await.expect("re-create");
    assert_eq!(send(&engine, vec![ping("u", inside(), 15)]).await, vec![coupon("c", 15)]);
    assert_eq!(engine.store().wallet(&user("u")).await.expect("wallet").len(), 2);
}

#[tokio::test]
async fn a_retried_identical_request_issues_nothing_new() {
    let engine = engine_with(vec![one_fence("c", Trigger::Enter)], 0).await;
    // Out of array order on purpose: applied as 0 s, 5 s, 10 s.
    let request = vec![ping("u", inside(), 10), ping("u", inside(), 0), ping("u", outside(), 5)];
    let first = engine.ingest(request.clone()).await.expect("ingest");
    assert!(first.ignored.is_empty());
    let mut issued: Vec<i64> = first.events.iter().map(|e| e.issued_at_ms).collect();
    issued.sort();
    assert_eq!(issued, vec![BASE_MS, BASE_MS + 10_000]);

    let retry = engine.ingest(request).await.expect("ingest");
    assert!(retry.events.is_empty(), "{:?}", retry.events);
    // The older two are stale now; the newest has an equal ts_ms, is applied and changes nothing.
    let mut ignored: Vec<(usize, &str)> = retry.ignored.iter().map(|&(i, r)| (i, r.as_str())).collect();
    ignored.sort();
    assert_eq!(ignored, vec![(1, "stale"), (2, "stale")]);
    assert_eq!(engine.store().wallet(&user("u")).await.expect("wallet").len(), 2);
}

#[tokio::test]
async fn the_daily_cap_takes_campaigns_in_id_order_over_the_window_ts_minus_24h_to_ts() {
    let at_f1 = |id: &str| campaign(id, Trigger::Enter, vec![circle("f0", (0.0, 0.0), 50.0)]);
    let d = campaign("d", Trigger::Enter, vec![circle("f0", (0.0, 300.0), 50.0)]);
    let e = campaign("e", Trigger::Enter, vec![circle("f0", (0.0, 600.0), 50.0)]);
    // Created out of id order.
    let engine = engine_with(vec![at_f1("c"), at_f1("a"), d, e, at_f1("b")], 2).await;
    assert_eq!(send(&engine, vec![ping("u", inside(), 0)]).await, vec![coupon("a", 0), coupon("b", 0)]);
    // 1 ms short of a day later both coupons are still in the window; a day later they are not.
    let mut late = ping("u", at(0.0, 300.0), 0);
    late.ts_ms += DAY_MS - 1;
    assert_eq!(send(&engine, vec![late]).await, vec![]);
    let mut later = ping("u", at(0.0, 600.0), 0);
    later.ts_ms += DAY_MS;
    assert_eq!(send(&engine, vec![later]).await, vec![("e".to_owned(), "f0".to_owned(), DAY_MS / 1000)]);
}

#[tokio::test]
async fn users_competing_for_the_last_coupon_are_served_in_event_time_order() {
    let mut c = one_fence("c", Trigger::Enter);
    c.caps = Caps { total_max: 1, ..Caps::default() };
    let engine = engine_with(vec![c], 0).await;
    // "a" sorts first by id and comes first in the array, but "b" was there a second earlier.
    let report = engine.ingest(vec![ping("a", inside(), 1), ping("b", inside(), 0)]).await.expect("ingest");
    let winners: Vec<&str> = report.events.iter().map(|e| e.user_id.as_str()).collect();
    assert_eq!(winners, vec!["b"]);
}
