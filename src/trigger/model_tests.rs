//! The engine against a brute-force model: a direct transcription of API.md's rules that keeps
//! every applied ping of each user and, for every ping, recomputes from that whole history
//! whether it is ignored, where each stay began and whether this ping is its candidate. Random
//! scripts (seeded, so a failure reproduces) of pings with jittered, equal and decreasing times,
//! random accuracies and mocked flags, interleaved with campaign `PUT`s and deletes.

use std::sync::Arc;

use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};

use crate::domain::{haversine_m, Campaign, LatLon, Ping, Trigger};

use super::testkit::{at, campaign, fence, hits_of, ping};
use super::{IgnoreReason, Outcome, TriggerConfig, TriggerEngine};

const SEED: [u8; 32] = *b"kabao trigger model, seed no. 1.";
const TTL_S: u64 = 60;

/// Places pings are sent from, metres (north, east) from the origin: inside one, several or no
/// fences, plus one far enough away that short gaps to it are implausibly fast.
const PLACES: [(f64, f64); 9] = [
    (0.0, 0.0),
    (0.0, 40.0),
    (0.0, 75.0),
    (0.0, 90.0),
    (0.0, 150.0),
    (0.0, 200.0),
    (300.0, 0.0),
    (0.0, -120.0),
    (2_000.0, 0.0),
];

/// Time steps between consecutive script pings: equal, decreasing, around the TTL and dwell.
const STEPS_MS: [i64; 14] = [-5_000, -1, 0, 0, 1, 1_000, 4_999, 5_000, 20_000, 59_999, 60_000, 60_001, 61_000, 200_000];

const ACCURACIES: [Option<f64>; 6] = [None, Some(5.0), Some(30.0), Some(30.5), Some(100.0), Some(101.0)];

const TRIGGERS: [Trigger; 4] =
    [Trigger::Enter, Trigger::Dwell { dwell_s: 0 }, Trigger::Dwell { dwell_s: 5 }, Trigger::Dwell { dwell_s: 20 }];

/// The fences of campaign `i`: overlapping circles, and in `c2` two with the same centre, so
/// nearest-fence ties happen.
fn campaign_def(i: usize, trigger: Trigger, strict: bool, revision: u64) -> Campaign {
    let fences = match i {
        0 => vec![fence("f0", 0.0, 0.0, 100.0), fence("f1", 0.0, 150.0, 100.0)],
        1 => vec![fence("g1", 0.0, 75.0, 60.0), fence("g0", 0.0, 0.0, 60.0)],
        _ => vec![fence("x", 0.0, 150.0, 50.0), fence("w", 0.0, 150.0, 120.0), fence("v", 0.0, 0.0, 10.0)],
    };
    let mut c = campaign(&format!("c{i}"), trigger, fences);
    c.max_accuracy_m = strict.then_some(30.0);
    c.revision = revision;
    c
}

#[derive(Debug, Clone)]
enum Op {
    Ping { user: usize, place: usize, step: usize, accuracy: usize, mocked: bool },
    Put { campaign: usize, trigger: usize, strict: bool },
    Delete { campaign: usize },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        12 => (0..2usize, 0..PLACES.len(), 0..STEPS_MS.len(), 0..ACCURACIES.len(), prop::bool::weighted(0.1))
            .prop_map(|(user, place, step, accuracy, mocked)| Op::Ping { user, place, step, accuracy, mocked }),
        1 => (0..3usize, 0..TRIGGERS.len(), any::<bool>())
            .prop_map(|(campaign, trigger, strict)| Op::Put { campaign, trigger, strict }),
        1 => (0..3usize).prop_map(|campaign| Op::Delete { campaign }),
    ]
}

/// One applied ping and the campaigns that existed when it was applied.
struct Applied {
    ping: Ping,
    world: Vec<Arc<Campaign>>,
}

/// The candidates the model expects: (campaign id, fence id, distance), ascending campaign id.
type Expected = Result<Vec<(String, String, f64)>, IgnoreReason>;

fn applies(accuracy_m: Option<f64>, limit_m: Option<f64>) -> bool {
    match (accuracy_m, limit_m) {
        (Some(a), Some(l)) => a <= l,
        _ => true,
    }
}

fn is_hit(campaign: &Campaign, fence_id: &str, place: LatLon) -> bool {
    campaign.fences.iter().any(|f| f.id.as_str() == fence_id && f.shape.contains(place))
}

/// API.md's rules over the user's whole applied history, for `ping` against `world`.
fn model(config: &TriggerConfig, history: &[Applied], ping: &Ping, world: &[Arc<Campaign>]) -> Expected {
    let ttl_ms = config.state_ttl_s as i64 * 1000;
    if history.iter().any(|h| ping.ts_ms < h.ping.ts_ms) {
        return Err(IgnoreReason::Stale);
    }
    if ping.mocked {
        return Err(IgnoreReason::Mocked);
    }
    if !applies(ping.accuracy_m, Some(config.max_accuracy_m)) {
        return Err(IgnoreReason::Inaccurate);
    }
    if let Some(prev) = history.last().filter(|_| config.max_speed_mps > 0.0) {
        let gap_ms = ping.ts_ms - prev.ping.ts_ms;
        let d = haversine_m(prev.ping.at, ping.at);
        let implausible = if gap_ms == 0 { d > 0.0 } else { d / (gap_ms as f64 / 1000.0) > config.max_speed_mps };
        if gap_ms <= ttl_ms && implausible {
            return Err(IgnoreReason::ImplausibleSpeed);
        }
    }

    // The full applied history including this ping.
    let mut pings: Vec<(&Ping, &[Arc<Campaign>])> = history.iter().map(|h| (&h.ping, h.world.as_slice())).collect();
    pings.push((ping, world));
    let k = pings.len() - 1;

    let mut expected = Vec::new();
    let mut campaigns: Vec<&Arc<Campaign>> = world.iter().collect();
    campaigns.sort_by(|a, b| a.id.cmp(&b.id));
    for c in campaigns {
        if !applies(ping.accuracy_m, c.max_accuracy_m) {
            continue;
        }
        let due_ms = match c.trigger {
            Trigger::Enter => 0,
            Trigger::Dwell { dwell_s } => dwell_s * 1000,
        };
        let mut due: Vec<(f64, &str)> = Vec::new();
        for f in c.fences.iter().filter(|f| f.shape.contains(ping.at)) {
            // Walk back over the applied pings while the stay lasts: members are the pings
            // applied for this campaign (same revision) inside this fence; pings not applied for
            // it are skipped; an outside one, another revision, or a TTL gap ends the walk.
            let mut members = vec![k];
            for j in (0..k).rev() {
                if pings[j + 1].0.ts_ms - pings[j].0.ts_ms > ttl_ms {
                    break;
                }
                let (pj, world_j) = pings[j];
                let Some(cj) = world_j.iter().find(|w| w.id == c.id) else { continue };
                if !applies(pj.accuracy_m, cj.max_accuracy_m) {
                    continue;
                }
                if cj.revision != c.revision || !is_hit(cj, f.id.as_str(), pj.at) {
                    break;
                }
                members.push(j);
            }
            members.reverse();
            let start_ts = pings[members[0]].0.ts_ms;
            let first_due = members.iter().copied().find(|&i| pings[i].0.ts_ms - start_ts >= due_ms);
            if first_due == Some(k) {
                due.push((haversine_m(ping.at, f.shape.anchor()), f.id.as_str()));
            }
        }
        let nearest = due.into_iter().min_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(b.1)));
        if let Some((d, fid)) = nearest {
            expected.push((c.id.to_string(), fid.to_owned(), d));
        }
    }
    Ok(expected)
}

fn run_script(config: TriggerConfig, initial: &[(usize, bool)], ops: &[Op]) -> Result<(), TestCaseError> {
    let engine = TriggerEngine::new(config);
    let mut revision = 0;
    let mut world: Vec<Arc<Campaign>> = initial
        .iter()
        .enumerate()
        .map(|(i, &(trigger, strict))| {
            revision += 1;
            Arc::new(campaign_def(i, TRIGGERS[trigger], strict, revision))
        })
        .collect();
    let mut histories: [Vec<Applied>; 2] = [Vec::new(), Vec::new()];
    let mut clock = 1_700_000_000_000i64;
    for (n, op) in ops.iter().enumerate() {
        match *op {
            Op::Put { campaign: i, trigger, strict } => {
                revision += 1;
                world.retain(|c| c.id.as_str() != format!("c{i}"));
                world.push(Arc::new(campaign_def(i, TRIGGERS[trigger], strict, revision)));
            }
            Op::Delete { campaign: i } => world.retain(|c| c.id.as_str() != format!("c{i}")),
            Op::Ping { user, place, step, accuracy, mocked } => {
                clock += STEPS_MS[step];
                let p = script_ping(user, place, clock, accuracy, mocked);
                let expected = model(&config, &histories[user], &p, &world);
                let got = match engine.apply(&p, &hits_of(&world, p.at)) {
                    Outcome::Ignored(reason) => Err(reason),
                    Outcome::Applied { candidates } => Ok(candidates
                        .iter()
                        .map(|c| (c.campaign.id.to_string(), c.fence_id.to_string(), c.distance_m))
                        .collect()),
                };
                prop_assert_eq!(&got, &expected, "op {}: {:?}", n, p);
                if got.is_ok() {
                    histories[user].push(Applied { ping: p, world: world.clone() });
                }
            }
        }
    }
    Ok(())
}

/// The ping a script's `Op::Ping` describes, at `clock`.
fn script_ping(user: usize, place: usize, clock: i64, accuracy: usize, mocked: bool) -> Ping {
    let (north, east) = PLACES[place];
    let mut p = ping(["u", "v"][user], at(north, east), clock);
    p.accuracy_m = ACCURACIES[accuracy];
    p.mocked = mocked;
    p
}

#[test]
fn engine_matches_the_brute_force_model() {
    let config = Config { cases: 600, failure_persistence: None, ..Config::default() };
    let mut runner = TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::ChaCha, &SEED));
    let strategy = (
        prop::sample::select(vec![0.0, 50.0]),
        prop::collection::vec((0..TRIGGERS.len(), any::<bool>()), 3),
        prop::collection::vec(op(), 1..80),
    );
    let result = runner.run(&strategy, |(max_speed_mps, initial, ops)| {
        let config = TriggerConfig { state_ttl_s: TTL_S, max_accuracy_m: 100.0, max_speed_mps };
        run_script(config, &initial, &ops)
    });
    if let Err(failure) = result {
        panic!("{failure}");
    }
}

/// The model is only worth something if the scripts reach every outcome; this checks that a
/// modest number of them does.
#[test]
fn the_scripts_reach_every_outcome() {
    let mut runner = TestRunner::new_with_rng(Config::default(), TestRng::from_seed(RngAlgorithm::ChaCha, &SEED));
    let strategy = (prop::collection::vec((0..TRIGGERS.len(), any::<bool>()), 3), prop::collection::vec(op(), 1..80));
    let config = TriggerConfig { state_ttl_s: TTL_S, max_accuracy_m: 100.0, max_speed_mps: 50.0 };
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..100 {
        let (initial, ops) = strategy.new_tree(&mut runner).expect("strategy").current();
        let mut world: Vec<Arc<Campaign>> =
            initial.iter().enumerate().map(|(i, &(t, s))| Arc::new(campaign_def(i, TRIGGERS[t], s, 1))).collect();
        let engine = TriggerEngine::new(config);
        let mut clock = 0;
        for op in ops {
            match op {
                Op::Ping { user, place, step, accuracy, mocked } => {
                    clock += STEPS_MS[step];
                    let p = script_ping(user, place, clock, accuracy, mocked);
                    match engine.apply(&p, &hits_of(&world, p.at)) {
                        Outcome::Ignored(reason) => seen.insert(reason.as_str().to_owned()),
                        Outcome::Applied { candidates } if candidates.len() > 1 => seen.insert("several".into()),
                        Outcome::Applied { candidates } => seen.insert(format!("{}", candidates.len())),
                    };
                }
                Op::Delete { campaign } => world.retain(|c| c.id.as_str() != format!("c{campaign}")),
                Op::Put { .. } => {}
            }
        }
    }
    let expected = ["0", "1", "several", "stale", "mocked", "inaccurate", "implausible_speed"];
    for outcome in expected {
        assert!(seen.contains(outcome), "no script produced {outcome}: {seen:?}");
    }
}
