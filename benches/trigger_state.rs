//! Memory per tracked user in a node's trigger-state cache (issue 10: "trigger state per user
//! compact, target ≤ 200 bytes for a user in one stay").
//!
//! `USERS` users each send one ping inside one fence of a dwell campaign (so each holds one open,
//! unused stay), through [`TriggerEngine::apply`] as the ingest path does. Two figures per case:
//!
//! - **heap bytes per user**: bytes the process asked the allocator for and still holds, counted by
//!   a wrapping global allocator (exact; excludes the allocator's own per-block overhead);
//! - **resident bytes per user**: growth of the process's resident set (`/proc/self/statm`), which
//!   includes that overhead and the hash tables' spare capacity.
//!
//! The baseline in the same run is the encoded form the store keeps (`UserState::encode`).
//!
//! `cargo bench --bench trigger_state` (a plain program; prints a table for BENCHMARKS.md).

use std::alloc::System;
use std::sync::Arc;

use kabao::domain::{Campaign, CampaignId, Circle, Fence, FenceId, LatLon, Ping, Shape, Trigger, UserId};
use kabao::trigger::{FenceHit, TriggerConfig, TriggerEngine};
use stats_alloc::{Region, StatsAlloc, INSTRUMENTED_SYSTEM};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

const USERS: usize = 200_000;
const FENCES: usize = 1_000;

fn resident_bytes() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: usize = statm.split_whitespace().nth(1).and_then(|p| p.parse().ok()).unwrap_or(0);
    pages * 4096
}

/// A dwell campaign of `FENCES` circles of 100 m, 1 km apart along a parallel.
fn campaign() -> Arc<Campaign> {
    let fences = (0..FENCES)
        .map(|i| Fence {
            id: FenceId::parse("id", &format!("store-{i:05}")).unwrap(),
            shape: Shape::Circle(Circle {
                center: LatLon::new(22.5, 113.0 + i as f64 * 0.01).unwrap(),
                radius_m: 100.0,
            }),
            rings: None,
        })
        .collect();
    let id = CampaignId::parse("id", "coffee-dwell").unwrap();
    Arc::new(Campaign { trigger: Trigger::Dwell { dwell_s: 300 }, revision: 1, ..Campaign::new(id, "t", fences) })
}

struct Figures {
    heap_per_user: f64,
    resident_per_user: f64,
    encoded_per_user: f64,
}

/// Tracks `USERS` users, each in one stay, with ids `prefix` + a number.
fn measure(campaign: &Arc<Campaign>, prefix: &str) -> Figures {
    let engine = TriggerEngine::new(TriggerConfig::DEFAULTS);
    let user_id = |u: usize| UserId::parse("user_id", &format!("{prefix}{u:07}")).unwrap();
    let heap = Region::new(GLOBAL);
    let resident_before = resident_bytes();
    for u in 0..USERS {
        let fence = &campaign.fences[u % FENCES];
        // Parsed here, as a request parses it: the cache keeps this allocation.
        let ping = Ping {
            user_id: user_id(u),
            at: fence.shape.anchor(),
            ts_ms: 1_700_000_000_000,
            accuracy_m: None,
            speed_mps: None,
            mocked: false,
        };
        engine.apply(&ping, &[FenceHit { campaign, fence }]);
    }
    let change = heap.change();
    let heap = (change.bytes_allocated as isize - change.bytes_deallocated as isize + change.bytes_reallocated) as f64;
    let resident = resident_bytes().saturating_sub(resident_before) as f64;
    let encoded: usize = (0..1_000)
        .map(|u| {
            let user = user_id(u);
            let (version, state) = engine.take(&user).expect("tracked");
            let len = state.encode().len();
            engine.remember(&user, version, state);
            len
        })
        .sum();
    assert_eq!(engine.user_count(), USERS);
    Figures {
        heap_per_user: heap / USERS as f64,
        resident_per_user: resident / USERS as f64,
        encoded_per_user: encoded as f64 / 1_000.0,
    }
}

/// The whole node's memory per tracked user: the same users and pings through `Engine::ingest`
/// (batches of 500) over the in-memory store, so the node's cache, the store's copy of each
/// state and everything else a request leaves behind are counted.
fn measure_node(campaign: &Arc<Campaign>, prefix: &str) -> Figures {
    use kabao::engine::{Engine, EngineConfig};
    use kabao::store::memory::MemoryStore;
    use kabao::store::Store;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        store.insert_campaign(Campaign::clone(campaign)).await.unwrap();
        let engine = Engine::start(store.clone(), EngineConfig::default()).await.unwrap();
        let now = kabao::engine::now_ms();
        let ping = |u: usize| Ping {
            user_id: UserId::parse("user_id", &format!("{prefix}{u:07}")).unwrap(),
            at: campaign.fences[u % FENCES].shape.anchor(),
            ts_ms: now - 1_000,
            accuracy_m: None,
            speed_mps: None,
            mocked: false,
        };
        // One batch first, so what the first request allocates once is not charged to users.
        engine.ingest((USERS..USERS + 500).map(ping).collect()).await.unwrap();
        let heap = Region::new(GLOBAL);
        let resident_before = resident_bytes();
        for first in (0..USERS).step_by(500) {
            let report = engine.ingest((first..first + 500).map(ping).collect()).await.unwrap();
            assert!(report.events.is_empty() && report.ignored.is_empty());
        }
        let change = heap.change();
        let heap =
            (change.bytes_allocated as isize - change.bytes_deallocated as isize + change.bytes_reallocated) as f64;
        let resident = resident_bytes().saturating_sub(resident_before) as f64;
        let states =
            store.load_user_states(&[UserId::parse("u", &format!("{prefix}{:07}", 0)).unwrap()]).await.unwrap();
        let encoded = states[0].as_ref().expect("the store holds the state").bytes.len() as f64;
        Figures {
            heap_per_user: heap / USERS as f64,
            resident_per_user: resident / USERS as f64,
            encoded_per_user: encoded,
        }
    })
}

/// The cases: (label, user id prefix, whole node).
const CASES: [(&str, usize, bool); 3] = [
    ("12 characters", 5, false),
    ("128 characters", 121, false),
    ("12 characters, whole node (`Engine::ingest`, in-memory store)", 5, true),
];

fn main() {
    // Each case runs in a process of its own, so one case's freed memory does not hide the
    // next one's growth of the resident set.
    if let Some(case) = std::env::args().skip_while(|a| a != "--case").nth(1) {
        let (label, prefix_len, whole_node) = CASES[case.parse::<usize>().expect("case number")];
        let prefix = "p".repeat(prefix_len);
        let f = if whole_node { measure_node(&campaign(), &prefix) } else { measure(&campaign(), &prefix) };
        println!("| {label} | {:.0} | {:.0} | {:.0} |", f.heap_per_user, f.resident_per_user, f.encoded_per_user);
        return;
    }
    println!("| user id | heap bytes per tracked user | resident bytes per tracked user | encoded state (store) |");
    println!("| --- | ---: | ---: | ---: |");
    for case in 0..CASES.len() {
        let exe = std::env::current_exe().expect("this program's path");
        let out = std::process::Command::new(exe).args(["--case", &case.to_string()]).output().expect("a case runs");
        assert!(out.status.success(), "case {case} failed: {}", String::from_utf8_lossy(&out.stderr));
        print!("{}", String::from_utf8_lossy(&out.stdout));
    }
    println!("\n{USERS} users, each in one open stay of a dwell campaign of {FENCES} fences.");
}
