//! How fast a campaign change reaches matching (issue: "visible within 1 s for an index of 1 M
//! fences, while matching continues on the previous snapshot").
//!
//! A `LiveIndex` holds 1 M circle fences (100 campaigns of 10 000, the country area of
//! `benches/matcher.rs`). Each timed iteration replaces one campaign (new fences, new revision)
//! and then checks that the very next snapshot finds a fence of the new version and none of the
//! old one — so the time measured is the time until the change is visible. A matcher thread runs
//! throughout; the longest single match it saw is printed, to show matching never waits for a
//! write.
//!
//! `cargo bench --bench live_update` (results: BENCHMARKS.md).

// criterion_group! generates an undocumented `pub fn`.
#![allow(missing_docs)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use kabao::domain::geo::Shape;
use kabao::domain::Campaign;
use kabao::spatial::testdata::{self, COUNTRY};
use kabao::spatial::{Hit, LiveIndex};

const FENCES: usize = 1_000_000;
const PER_CAMPAIGN: usize = 10_000;

/// A version of campaign `c7` with `n` fences drawn from `seed`, and a point inside its first fence.
fn version(seed: u64, n: usize, revision: u64) -> (Arc<Campaign>, kabao::domain::LatLon) {
    let shapes = testdata::circles(seed, n, COUNTRY, (50.0, 2_000.0));
    let probe = match &shapes[0] {
        Shape::Circle(c) => c.center,
        Shape::Polygon(p) => p.anchor(),
    };
    let mut campaign = testdata::campaign("c7", shapes);
    campaign.revision = revision;
    (Arc::new(campaign), probe)
}

fn visible(index: &LiveIndex, probe: kabao::domain::LatLon, revision: u64) -> bool {
    let snapshot = index.snapshot();
    let mut hits: Vec<Hit> = Vec::new();
    snapshot.matches(probe, &mut hits);
    hits.iter().any(|h| {
        let c = snapshot.campaign(h.campaign);
        c.id.as_str() == "c7" && c.revision == revision && h.fence == 0
    })
}

fn live_update(c: &mut Criterion) {
    let started = Instant::now();
    let campaigns = testdata::campaigns(testdata::circles(1, FENCES, COUNTRY, (50.0, 2_000.0)), PER_CAMPAIGN);
    let index = Arc::new(LiveIndex::new(campaigns));
    println!("info: live index of {FENCES} fences built in {:.2} s", started.elapsed().as_secs_f64());

    // A matcher that never stops: its slowest match shows whether writes ever block it.
    let stop = Arc::new(AtomicBool::new(false));
    let matcher = {
        let (index, stop) = (index.clone(), stop.clone());
        std::thread::spawn(move || {
            let pings = testdata::pings(9, 100_000, COUNTRY);
            let mut hits = Vec::new();
            let mut latency = hdrhistogram::Histogram::<u64>::new(3).expect("valid bounds");
            while !stop.load(Ordering::Relaxed) {
                for &p in &pings {
                    let t = Instant::now();
                    hits.clear();
                    index.snapshot().matches(p, &mut hits);
                    latency.saturating_record(t.elapsed().as_nanos() as u64);
                }
            }
            latency
        })
    };

    let mut group = c.benchmark_group("live_update_1m");
    group.sample_size(20).measurement_time(Duration::from_secs(10));
    for n in [100usize, 10_000] {
        let mut revision = 10;
        group.bench_function(format!("replace_campaign_of_{n}_fences_until_visible"), |b| {
            b.iter_batched(
                || {
                    revision += 1;
                    version(revision, n, revision)
                },
                |(campaign, probe)| {
                    let revision = campaign.revision;
                    index.upsert(campaign);
                    assert!(visible(&index, probe, revision), "the new version is visible at once");
                },
                BatchSize::PerIteration,
            )
        });
    }
    group.finish();

    stop.store(true, Ordering::Relaxed);
    let latency = matcher.join().expect("matcher thread");
    println!(
        "info: concurrent matcher: {} matches during the writes; per match p50 {} ns, p99 {} ns, p99.9 {} ns, max {} ns",
        latency.len(),
        latency.value_at_quantile(0.5),
        latency.value_at_quantile(0.99),
        latency.value_at_quantile(0.999),
        latency.max()
    );
}

/// The cost of a write against the number of campaigns: N one-fence campaigns, each created by
/// its own write as an admin API would (so they sit in the index's runs, not a prebuilt base),
/// then one more created per timed iteration. The figure: a create cost 1.4 ms at 1 000
/// campaigns and 23 ms at 9 000; it should not grow with N.
fn write_cost_against_campaigns(c: &mut Criterion) {
    let mut group = c.benchmark_group("create_one_fence_campaign");
    group.sample_size(50).measurement_time(Duration::from_secs(5));
    for n in [1_000usize, 10_000, 100_000] {
        let index = LiveIndex::new(Vec::new());
        let shapes = testdata::circles(3, n, COUNTRY, (50.0, 2_000.0));
        for (i, shape) in shapes.into_iter().enumerate() {
            index.upsert(Arc::new(testdata::campaign(&format!("c{i}"), vec![shape])));
        }
        let mut next = n;
        group.bench_function(format!("among_{n}_campaigns"), |b| {
            b.iter_batched(
                || {
                    next += 1;
                    let shape = testdata::circles(next as u64, 1, COUNTRY, (50.0, 2_000.0)).remove(0);
                    Arc::new(testdata::campaign(&format!("c{next}"), vec![shape]))
                },
                |campaign| index.upsert(campaign),
                BatchSize::PerIteration,
            )
        });
        assert_eq!(index.snapshot().campaign_count(), next);
    }
    group.finish();
}

criterion_group!(benches, live_update, write_cost_against_campaigns);
criterion_main!(benches);
