//! Table-driven tests: one table per rule and per edge line of API.md ("Trigger rules" and
//! "Edges, precisely"). Each case is a little world of campaigns and a script of pings, each ping
//! with the outcome it must have: an ignore reason, or the `campaign:fence` candidates it gives.

use std::sync::Arc;

use crate::domain::{haversine_m, Campaign, LatLon, Ping, Status, Trigger, UserId};

use super::testkit::{at, campaign, fence, hits_of, ping, square, summary};
use super::{FenceHit, Outcome, TriggerConfig, TriggerEngine};

const MIN: i64 = 60_000;
/// `state_ttl_s` of the defaults, in milliseconds.
const TTL: i64 = DEFAULTS.state_ttl_s as i64 * 1000;

/// API.md's defaults.
const DEFAULTS: TriggerConfig = TriggerConfig::DEFAULTS;
const NO_SPEED: TriggerConfig = TriggerConfig { max_speed_mps: 0.0, ..DEFAULTS };

/// Centre of fence `a`.
fn a() -> LatLon {
    at(0.0, 0.0)
}
/// Outside every fence of these tests.
fn out() -> LatLon {
    at(1_000.0, 0.0)
}

/// One step of a script.
enum Step {
    /// Apply the ping; the outcome's [`summary`] must be the string.
    P(Ping, &'static str),
    /// Create or replace a campaign (give it a newer revision to model a `PUT`).
    Put(Box<Campaign>),
    /// Delete a campaign: no later ping hits its fences.
    Delete(&'static str),
}
use Step::{Delete, Put, P};

struct Case {
    name: &'static str,
    config: TriggerConfig,
    campaigns: Vec<Campaign>,
    steps: Vec<Step>,
}

fn run(cases: Vec<Case>) {
    for case in cases {
        let engine = TriggerEngine::new(case.config);
        let mut world: Vec<Arc<Campaign>> = case.campaigns.into_iter().map(Arc::new).collect();
        for (i, step) in case.steps.into_iter().enumerate() {
            match step {
                P(ping, expected) => {
                    let hits = hits_of(&world, ping.at);
                    let got = summary(&engine.apply(&ping, &hits));
                    assert_eq!(got, expected, "case {:?}, step {i}: {ping:?}", case.name);
                }
                Put(campaign) => {
                    world.retain(|c| c.id != campaign.id);
                    world.push(Arc::new(*campaign));
                }
                Delete(id) => world.retain(|c| c.id.as_str() != id),
            }
        }
    }
}

/// Shorthands for pings that differ from the plain one.
trait PingExt {
    fn acc(self, accuracy_m: f64) -> Self;
    fn mocked(self) -> Self;
    fn by(self, user: &str) -> Self;
}

impl PingExt for Ping {
    fn acc(mut self, accuracy_m: f64) -> Self {
        self.accuracy_m = Some(accuracy_m);
        self
    }
    fn mocked(mut self) -> Self {
        self.mocked = true;
        self
    }
    fn by(mut self, user: &str) -> Self {
        self.user_id = UserId::parse("user_id", user).unwrap();
        self
    }
}

/// A ping of user `u`.
fn p(ts_ms: i64, place: LatLon) -> Ping {
    ping("u", place, ts_ms)
}

/// Campaign `c1` with one fence `a` of 100 m around [`a`].
fn c1(trigger: Trigger) -> Campaign {
    campaign("c1", trigger, vec![fence("a", 0.0, 0.0, 100.0)])
}

fn with_revision(mut campaign: Campaign, revision: u64) -> Campaign {
    campaign.revision = revision;
    campaign
}

fn with_max_accuracy(mut campaign: Campaign, max_accuracy_m: f64) -> Campaign {
    campaign.max_accuracy_m = Some(max_accuracy_m);
    campaign
}

const ENTER: Trigger = Trigger::Enter;

fn dwell(dwell_s: i64) -> Trigger {
    Trigger::Dwell { dwell_s }
}

#[test]
fn rule_2_and_3_enter_exit_reenter() {
    run(vec![
        Case {
            name: "an inside ping after an outside one is an enter; an outside ping ends the stay",
            config: DEFAULTS,
            campaigns: vec![c1(ENTER)],
            steps: vec![
                P(p(0, out()), ""),
                P(p(MIN, a()), "c1:a"),
                P(p(2 * MIN, a()), ""),
                P(p(3 * MIN, out()), ""),
                P(p(4 * MIN, a()), "c1:a"),
            ],
        },
        Case {
            name: "a user's first ping inside is an enter (no state)",
            config: DEFAULTS,
            campaigns: vec![c1(ENTER)],
            steps: vec![P(p(0, a()), "c1:a"), P(p(MIN, a()), "")],
        },
        Case {
            name: "users are independent",
            config: DEFAULTS,
            campaigns: vec![c1(ENTER)],
            steps: vec![
                P(p(0, a()), "c1:a"),
                P(p(0, a()).by("v"), "c1:a"),
                P(p(2 * MIN, out()).by("v"), ""),
                P(p(MIN, a()), ""),
                P(p(MIN, a()).by("v"), "stale"),
                P(p(3 * MIN, a()).by("v"), "c1:a"),
            ],
        },
    ]);
}

#[test]
fn edge_stale_is_strictly_older_and_equal_is_applied() {
    run(vec![
        Case {
            name: "an older ping is stale and does not enter; an equal one is applied",
            config: DEFAULTS,
            campaigns: vec![c1(ENTER)],
            steps: vec![
                P(p(5 * MIN, out()), ""),
                P(p(4 * MIN, a()), "stale"),
                P(p(5 * MIN, out()), ""),
                P(p(6 * MIN, a()), "c1:a"),
            ],
        },
        Case {
            name: "an identical retry changes nothing and yields no new candidate",
            config: DEFAULTS,
            campaigns: vec![c1(ENTER)],
            steps: vec![P(p(MIN, a()), "c1:a"), P(p(MIN, a()), ""), P(p(MIN, a()), ""), P(p(2 * MIN, a()), "")],
        },
        Case {
            name: "out-of-order pings are the caller's job: an older outside ping is stale and ends nothing",
            config: DEFAULTS,
            campaigns: vec![c1(ENTER)],
            steps: vec![P(p(2 * MIN, a()), "c1:a"), P(p(MIN, out()), "stale"), P(p(3 * MIN, a()), "")],
        },
        Case {
            name: "an equal ts elsewhere is infinitely fast",
            config: DEFAULTS,
            campaigns: vec![c1(ENTER)],
            steps: vec![P(p(MIN, out()), ""), P(p(MIN, a()), "implausible_speed")],
        },
        Case {
            name: "an equal ts elsewhere is applied with the speed check off",
            config: NO_SPEED,
            campaigns: vec![c1(ENTER)],
            steps: vec![P(p(MIN, out()), ""), P(p(MIN, a()), "c1:a")],
        },
    ]);
}

#[test]
fn edge_ignored_pings_change_no_state() {
    let far = at(5_000.0, 0.0);
    let between = at(1_500.0, 0.0);
    run(vec![
        Case {
            name: "a mocked ping does not advance the newest applied time",
            config: DEFAULTS,
            campaigns: vec![c1(ENTER)],
            steps: vec![P(p(MIN, out()), ""), P(p(5 * MIN, out()).mocked(), "mocked"), P(p(3 * MIN, a()), "c1:a")],
        },
        Case {
            name: "an inaccurate ping does not advance the newest applied time",
            config: DEFAULTS,
            campaigns: vec![c1(ENTER)],
            steps: vec![P(p(MIN, out()), ""), P(p(5 * MIN, a()).acc(500.0), "inaccurate"), P(p(3 * MIN, a()), "c1:a")],
        },
        Case {
            name: "a mocked ping inside does not enter",
            config: DEFAULTS,
            campaigns: vec![c1(ENTER)],
            steps: vec![P(p(0, out()), ""), P(p(MIN, a()).mocked(), "mocked"), P(p(2 * MIN, a()), "c1:a")],
        },
        Case {
            name: "a mocked ping outside does not exit",
            config: DEFAULTS,
            campaigns: vec![c1(ENTER)],
            steps: vec![P(p(0, a()), "c1:a"), P(p(MIN, out()).mocked(), "mocked"), P(p(2 * MIN, a()), "")],
        },
        Case {
            name: "an ignored ping does not count as a ping for state_ttl_s",
            config: DEFAULTS,
            campaigns: vec![c1(ENTER)],
            steps: vec![
                P(p(0, a()), "c1:a"),
                P(p(3_000_000, a()).acc(101.0), "inaccurate"),
                P(p(TTL + 1, a()), "c1:a"),
            ],
        },
        Case {
            name: "(contrast) an applied ping in between keeps the stay",
            config: DEFAULTS,
            campaigns: vec![c1(ENTER)],
            steps: vec![P(p(0, a()), "c1:a"), P(p(3_000_000, a()), ""), P(p(TTL + 1, a()), "")],
        },
        Case {
            name: "a mocked ping is not the previous applied ping of rule 0",
            config: DEFAULTS,
            campaigns: vec![c1(ENTER)],
            steps: vec![P(p(0, a()), "c1:a"), P(p(10_000, far).mocked(), "mocked"), P(p(20_000, between), "")],
        },
        Case {
            name: "an implausible ping is not the previous applied ping of rule 0",
            config: DEFAULTS,
            campaigns: vec![c1(ENTER)],
            steps: vec![P(p(0, a()), "c1:a"), P(p(10_000, far), "implausible_speed"), P(p(20_000, between), "")],
        },
        Case {
            name: "(contrast) from the far place, the same ping is too fast",
            config: DEFAULTS,
            campaigns: vec![c1(ENTER)],
            steps: vec![
                P(p(0, a()), "c1:a"),
                P(p(10_000, far).mocked(), "mocked"),
                P(p(10_000, far), "implausible_speed"),
            ],
        },
    ]);
}

#[test]
fn edge_reason_precedence_is_stale_mocked_inaccurate_speed() {
    run(vec![
        Case {
            name: "stale before mocked and inaccurate",
            config: DEFAULTS,
            campaigns: vec![c1(ENTER)],
            steps: vec![P(p(2 * MIN, out()), ""), P(p(MIN, a()).mocked().acc(500.0), "stale")],
        },
        Case {
            name: "mocked before inaccurate and speed",
            config: DEFAULTS,
            campaigns: vec![c1(ENTER)],
            steps: vec![P(p(0, out()), ""), P(p(1, a()).mocked().acc(500.0), "mocked")],
        },
        Case {
            name: "inaccurate before speed",
            config: DEFAULTS,
            campaigns: vec![c1(ENTER)],
            steps: vec![P(p(0, out()), ""), P(p(1, a()).acc(500.0), "inaccurate")],
        },
    ]);
}

#[test]
fn edge_state_ttl_more_forgets_exactly_does_not() {
    run(vec![
        Case {
            name: "exactly state_ttl_s keeps the stay; more forgets it",
            config: DEFAULTS,
            campaigns: vec![c1(ENTER)],
            steps: vec![P(p(0, a()), "c1:a"), P(p(TTL, a()), ""), P(p(2 * TTL + 1, a()), "c1:a")],
        },
        Case {
            name: "a forgotten dwell stay starts again at the ping after the gap",
            config: DEFAULTS,
            campaigns: vec![c1(dwell(60))],
            steps: vec![
                P(p(0, a()), ""),
                P(p(TTL + 1, a()), ""),
                P(p(TTL + 1 + 59_999, a()), ""),
                P(p(TTL + 1 + 60_000, a()), "c1:a"),
            ],
        },
        Case {
            name: "a TTL gap forgets stays of every campaign",
            config: DEFAULTS,
            campaigns: vec![c1(ENTER), campaign("c2", dwell(0), vec![fence("z", 0.0, 0.0, 50.0)])],
            steps: vec![P(p(0, a()), "c1:a c2:z"), P(p(TTL + 1, a()), "c1:a c2:z")],
        },
    ]);
}

#[test]
fn rule_0_speed() {
    let km = at(1_000.0, 0.0);
    let exact_mps = haversine_m(a(), km) / 10.0;
    let far = at(1_000_000.0, 0.0);
    run(vec![
        Case {
            name: "a speed equal to max_speed_mps is applied",
            config: TriggerConfig { max_speed_mps: exact_mps, ..DEFAULTS },
            campaigns: vec![c1(ENTER)],
            steps: vec![P(p(0, a()), "c1:a"), P(p(10_000, km), "")],
        },
        Case {
            name: "a speed over max_speed_mps is ignored",
            config: TriggerConfig { max_speed_mps: exact_mps * (1.0 - 1e-9), ..DEFAULTS },
            campaigns: vec![c1(ENTER)],
            steps: vec![P(p(0, a()), "c1:a"), P(p(10_000, km), "implausible_speed"), P(p(20_000, a()), "")],
        },
        Case {
            name: "a user's first ping has nothing to compare with",
            config: DEFAULTS,
            campaigns: vec![c1(ENTER)],
            steps: vec![P(p(0, far), ""), P(p(1, far), "")],
        },
        Case {
            name: "a gap of more than state_ttl_s skips the check",
            config: DEFAULTS,
            campaigns: vec![c1(ENTER)],
            steps: vec![P(p(0, a()), "c1:a"), P(p(TTL + 1, far), "")],
        },
        Case {
            name: "a gap of exactly state_ttl_s checks",
            config: DEFAULTS,
            campaigns: vec![c1(ENTER)],
            steps: vec![P(p(0, a()), "c1:a"), P(p(TTL, far), "implausible_speed")],
        },
        Case {
            name: "zero time with zero distance is not fast",
            config: DEFAULTS,
            campaigns: vec![c1(ENTER)],
            steps: vec![P(p(0, a()), "c1:a"), P(p(0, a()), "")],
        },
        Case {
            name: "max_speed_mps 0 turns the check off",
            config: NO_SPEED,
            campaigns: vec![c1(ENTER)],
            steps: vec![P(p(0, far), ""), P(p(1, a()), "c1:a")],
        },
    ]);
}

#[test]
fn edge_accuracy() {
    let strict = || with_max_accuracy(c1(ENTER), 50.0);
    let lenient = || campaign("c2", ENTER, vec![fence("a2", 0.0, 0.0, 100.0)]);
    run(vec![
        Case {
            name: "equal to the global limit is applied; over it is inaccurate; none is accurate",
            config: DEFAULTS,
            campaigns: vec![c1(ENTER)],
            steps: vec![
                P(p(0, a()).acc(100.01), "inaccurate"),
                P(p(MIN, a()).acc(100.0), "c1:a"),
                P(p(2 * MIN, out()), ""),
                P(p(3 * MIN, a()), "c1:a"),
            ],
        },
        Case {
            name: "over a campaign's limit only: applied for others, no enter for it",
            config: DEFAULTS,
            campaigns: vec![strict(), lenient()],
            steps: vec![P(p(0, a()).acc(80.0), "c2:a2"), P(p(MIN, a()).acc(10.0), "c1:a")],
        },
        Case {
            name: "over a campaign's limit only: no exit for it",
            config: DEFAULTS,
            campaigns: vec![strict(), lenient()],
            steps: vec![
                P(p(0, a()).acc(10.0), "c1:a c2:a2"),
                P(p(MIN, out()).acc(80.0), ""),
                P(p(2 * MIN, a()).acc(10.0), "c2:a2"),
            ],
        },
        Case {
            name: "over a campaign's limit only: an inside ping neither exits nor dwells",
            config: DEFAULTS,
            campaigns: vec![with_max_accuracy(c1(dwell(60)), 50.0)],
            steps: vec![P(p(0, a()).acc(10.0), ""), P(p(MIN, a()).acc(80.0), ""), P(p(MIN + 1, a()).acc(10.0), "c1:a")],
        },
        Case {
            name: "equal to a campaign's limit is applied for it",
            config: DEFAULTS,
            campaigns: vec![strict(), lenient()],
            steps: vec![P(p(0, a()).acc(50.0), "c1:a c2:a2")],
        },
    ]);
}

#[test]
fn rule_3_dwell_once_per_stay() {
    run(vec![
        Case {
            name: "the first ping with ts - start >= dwell_s is the candidate, once per stay",
            config: DEFAULTS,
            campaigns: vec![c1(dwell(60))],
            steps: vec![
                P(p(0, a()), ""),
                P(p(30_000, a()), ""),
                P(p(59_999, a()), ""),
                P(p(60_000, a()), "c1:a"),
                P(p(90_000, a()), ""),
                P(p(2 * MIN, out()), ""),
                P(p(3 * MIN, a()), ""),
                P(p(4 * MIN - 1, a()), ""),
                P(p(4 * MIN, a()), "c1:a"),
                P(p(9 * MIN, a()), ""),
            ],
        },
        Case {
            name: "no ping is needed at the dwell instant: the first one after it counts",
            config: DEFAULTS,
            campaigns: vec![c1(dwell(60))],
            steps: vec![P(p(0, a()), ""), P(p(10 * MIN, a()), "c1:a")],
        },
        Case {
            name: "dwell_s = 0 makes the enter ping the candidate",
            config: DEFAULTS,
            campaigns: vec![c1(dwell(0))],
            steps: vec![P(p(0, out()), ""), P(p(MIN, a()), "c1:a"), P(p(2 * MIN, a()), "")],
        },
        Case {
            name: "leaving before the dwell time gives nothing",
            config: DEFAULTS,
            campaigns: vec![c1(dwell(60))],
            steps: vec![P(p(0, a()), ""), P(p(30_000, out()), ""), P(p(70_000, a()), ""), P(p(129_999, a()), "")],
        },
    ]);
}

#[test]
fn edge_a_candidate_is_used_up_whether_or_not_it_issues() {
    // The engine cannot know what rule 4 decides: it marks every emitted candidate used, so a
    // candidate refused downstream (here: simply dropped by the test) is not offered again.
    run(vec![
        Case {
            name: "enter",
            config: DEFAULTS,
            campaigns: vec![c1(ENTER)],
            steps: vec![P(p(0, a()), "c1:a"), P(p(MIN, a()), ""), P(p(2 * MIN, a()), "")],
        },
        Case {
            name: "dwell",
            config: DEFAULTS,
            campaigns: vec![c1(dwell(60))],
            steps: vec![P(p(0, a()), ""), P(p(MIN, a()), "c1:a"), P(p(2 * MIN, a()), "")],
        },
        Case {
            name: "paused campaigns track stays and give candidates; the caller filters on status",
            config: DEFAULTS,
            campaigns: vec![Campaign { status: Status::Paused, ..c1(ENTER) }],
            steps: vec![P(p(0, a()), "c1:a"), P(p(MIN, a()), "")],
        },
    ]);
}

#[test]
fn edge_put_forgets_stays_of_the_replaced_campaign() {
    run(vec![
        Case {
            name: "a newer revision re-enters",
            config: DEFAULTS,
            campaigns: vec![c1(ENTER)],
            steps: vec![
                P(p(0, a()), "c1:a"),
                Put(Box::new(with_revision(c1(ENTER), 2))),
                P(p(MIN, a()), "c1:a"),
                P(p(2 * MIN, a()), ""),
            ],
        },
        Case {
            name: "a newer revision restarts the dwell clock",
            config: DEFAULTS,
            campaigns: vec![c1(ENTER)],
            steps: vec![
                P(p(0, a()), "c1:a"),
                Put(Box::new(with_revision(c1(dwell(60)), 2))),
                P(p(MIN, a()), ""),
                P(p(2 * MIN - 1, a()), ""),
                P(p(2 * MIN, a()), "c1:a"),
            ],
        },
        Case {
            name: "a deleted campaign's stays end; its id reused is a new campaign",
            config: DEFAULTS,
            campaigns: vec![c1(ENTER)],
            steps: vec![
                P(p(0, a()), "c1:a"),
                Delete("c1"),
                P(p(MIN, a()), ""),
                Put(Box::new(with_revision(c1(ENTER), 2))),
                P(p(2 * MIN, a()), "c1:a"),
            ],
        },
        Case {
            name: "other campaigns keep their stays",
            config: DEFAULTS,
            campaigns: vec![c1(ENTER), campaign("c2", ENTER, vec![fence("z", 0.0, 0.0, 50.0)])],
            steps: vec![P(p(0, a()), "c1:a c2:z"), Put(Box::new(with_revision(c1(ENTER), 2))), P(p(MIN, a()), "c1:a")],
        },
    ]);
}

#[test]
fn rule_5_nearest_fence_ties_by_id() {
    let two = || campaign("c1", ENTER, vec![fence("a", 0.0, 0.0, 100.0), fence("b", 0.0, 150.0, 100.0)]);
    run(vec![
        Case {
            name: "inside two fences of a campaign: one candidate, the nearest anchor; both used up",
            config: DEFAULTS,
            campaigns: vec![two()],
            steps: vec![
                P(p(0, out()), ""),
                P(p(MIN, at(0.0, 90.0)), "c1:b"),
                P(p(2 * MIN, at(0.0, 60.0)), ""),
                P(p(3 * MIN, a()), ""),
                P(p(4 * MIN, at(0.0, 90.0)), "c1:b"),
            ],
        },
        Case {
            name: "nearest among the fences that give a candidate, not among all hit",
            config: DEFAULTS,
            campaigns: vec![two()],
            steps: vec![P(p(0, a()), "c1:a"), P(p(MIN, at(0.0, 60.0)), "c1:b")],
        },
        Case {
            name: "equal distances: the smaller fence id, whatever the fence order",
            config: DEFAULTS,
            campaigns: vec![campaign("c1", ENTER, vec![fence("b", 0.0, 0.0, 100.0), fence("a", 0.0, 0.0, 50.0)])],
            steps: vec![P(p(0, a()), "c1:a")],
        },
        Case {
            name: "one candidate per campaign, in ascending campaign id order",
            config: DEFAULTS,
            campaigns: vec![
                campaign("c2", ENTER, vec![fence("x", 0.0, 0.0, 100.0)]),
                campaign("c10", ENTER, vec![fence("y", 0.0, 0.0, 100.0), fence("z", 0.0, 10.0, 100.0)]),
                c1(ENTER),
            ],
            steps: vec![P(p(0, a()), "c1:a c10:y c2:x")],
        },
    ]);
}

#[test]
fn rule_5_measures_polygons_from_their_mean_vertex() {
    let mixed = || campaign("c1", ENTER, vec![square("p", 0.0, 0.0, 200.0), fence("b", 0.0, 150.0, 100.0)]);
    run(vec![
        Case {
            name: "nearer the square's centre than the circle's",
            config: DEFAULTS,
            campaigns: vec![mixed()],
            steps: vec![P(p(0, at(0.0, 60.0)), "c1:p")],
        },
        Case {
            name: "nearer the circle's centre, though well inside the square",
            config: DEFAULTS,
            campaigns: vec![mixed()],
            steps: vec![P(p(0, at(0.0, 90.0)), "c1:b")],
        },
    ]);
}

#[test]
fn the_engine_is_shared_between_threads() {
    fn shareable<T: Send + Sync>() {}
    shareable::<TriggerEngine>();
    let engine = engine();
    let world = [Arc::new(c1(ENTER))];
    std::thread::scope(|scope| {
        for t in 0..4 {
            let (engine, world) = (&engine, &world);
            scope.spawn(move || {
                for u in 0..100 {
                    let ping = p(0, a()).by(&format!("t{t}-u{u}"));
                    assert_eq!(summary(&engine.apply(&ping, &hits_of(world, ping.at))), "c1:a");
                }
            });
        }
    });
    assert_eq!(engine.user_count(), 400);
}

fn engine() -> TriggerEngine {
    TriggerEngine::new(DEFAULTS)
}

#[test]
fn candidates_carry_the_distance_to_the_anchor() {
    let world = [Arc::new(c1(ENTER))];
    let place = at(30.0, 40.0);
    let Outcome::Applied { candidates } = engine().apply(&p(0, place), &hits_of(&world, place)) else {
        panic!("applied")
    };
    assert_eq!(candidates.len(), 1);
    assert_eq!(candidates[0].distance_m, haversine_m(place, a()));
    assert!((candidates[0].distance_m - 50.0).abs() < 0.01);
}

#[test]
fn repeated_hits_are_harmless() {
    let world = [Arc::new(c1(ENTER))];
    let hit = FenceHit { campaign: &world[0], fence: &world[0].fences[0] };
    let engine = engine();
    assert_eq!(summary(&engine.apply(&p(0, a()), &[hit, hit, hit])), "c1:a");
    assert_eq!(summary(&engine.apply(&p(MIN, a()), &[hit, hit])), "");
}

#[test]
fn a_hit_from_an_index_snapshot_older_than_a_put_keeps_the_newer_stay() {
    let old = Arc::new(c1(ENTER));
    let new = Arc::new(with_revision(c1(ENTER), 2));
    let engine = engine();
    let apply = |ts_ms: i64, c: &Arc<Campaign>| {
        summary(&engine.apply(&p(ts_ms, a()), &[FenceHit { campaign: c, fence: &c.fences[0] }]))
    };
    assert_eq!(apply(MIN, &new), "c1:a");
    assert_eq!(apply(2 * MIN, &old), "");
    assert_eq!(apply(3 * MIN, &new), "");
}

#[test]
fn ignored_first_pings_leave_no_state_and_users_can_be_freed() {
    let engine = engine();
    let world = [Arc::new(c1(ENTER))];
    let apply = |ping: Ping| summary(&engine.apply(&ping, &hits_of(&world, ping.at)));
    assert_eq!(apply(p(0, a()).mocked()), "mocked");
    assert_eq!(apply(p(0, a()).acc(1e9)), "inaccurate");
    assert_eq!(engine.user_count(), 0);

    assert_eq!(apply(p(1_000, a())), "c1:a");
    assert_eq!(apply(p(5_000, a()).by("v")), "c1:a");
    assert_eq!(engine.user_count(), 2);
    assert_eq!(engine.stay_count(), 2, "each user is inside c1's fence");

    // Idle is measured from the newest applied ping's ts: `u` (1 000) is idle for more than
    // 3 000 ms at 4 001, `v` (5 000) is not.
    assert_eq!(engine.evict_idle(4_000, 3_000), 0);
    assert_eq!(engine.evict_idle(4_001, 3_000), 1);
    assert_eq!(engine.user_count(), 1);
    assert_eq!(engine.stay_count(), 1);
    // A freed user starts afresh: an older ping is no longer stale, and enters again.
    assert_eq!(apply(p(500, a())), "c1:a");

    let v = UserId::parse("user_id", "v").unwrap();
    assert!(engine.forget(&v));
    assert!(!engine.forget(&v));
    assert_eq!(apply(p(5_000, a()).by("v")), "c1:a");
    assert_eq!(engine.user_count(), 2);
}

#[test]
fn extreme_times_do_not_overflow() {
    let engine = TriggerEngine::new(TriggerConfig { state_ttl_s: u64::MAX, ..DEFAULTS });
    let world = [Arc::new(c1(dwell(i64::MAX)))];
    let apply = |ping: Ping| summary(&engine.apply(&ping, &hits_of(&world, ping.at)));
    assert_eq!(apply(p(i64::MIN, a())), "");
    assert_eq!(apply(p(i64::MAX, a())), "c1:a");
    assert_eq!(engine.evict_idle(i64::MIN, 0), 0);
    assert_eq!(engine.evict_idle(i64::MAX, 0), 0);
    assert_eq!(engine.evict_idle(i64::MAX, -1), 1);
}

#[test]
fn over_the_ceiling_the_longest_idle_users_go_first() {
    let engine = engine();
    let world = [Arc::new(c1(ENTER))];
    let apply = |ping: Ping| summary(&engine.apply(&ping, &hits_of(&world, ping.at)));
    // Users u0…u19, u0 the longest idle (oldest newest-applied ping).
    for k in 0..20 {
        assert_eq!(apply(p(1_000 * k, a()).by(&format!("u{k}"))), "c1:a");
    }
    assert_eq!(engine.drop_longest_idle(20), 0, "at the ceiling nothing goes");
    assert_eq!(engine.drop_longest_idle(0), 0, "0 is no ceiling");
    // Over a ceiling of 10: down to 9, the 11 longest idle gone.
    assert_eq!(engine.drop_longest_idle(10), 11);
    assert_eq!(engine.user_count(), 9);
    // A dropped user starts afresh (enters again); a kept one is still inside.
    assert_eq!(apply(p(30_000, a()).by("u10")), "c1:a");
    assert_eq!(apply(p(30_000, a()).by("u11")), "");
}
