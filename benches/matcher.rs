//! Matching throughput of `kabao::spatial::FenceIndex` against the rstar baseline of
//! PERFORMANCE.md (rstar `bulk_load` of fence bounding boxes + envelope query + exact test, in
//! `benches/support`, shared with `benches/compare.rs`),
//! measured in the same run over the same seeded fences and pings.
//!
//! Every case first checks that kabao and the baseline find the same fences at every ping (so a
//! wrong index cannot look fast), then times both. Build time, resident bytes per fence and a
//! per-ping latency p99 are printed as `info:` lines. The 10 M-fence case runs only with
//! `KABAO_BENCH_10M=1`.
//!
//! `cargo bench --bench matcher` (results: BENCHMARKS.md).

// criterion_group! generates an undocumented `pub fn`.
#![allow(missing_docs)]

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use kabao::domain::geo::{LatLon, Shape};
use kabao::spatial::testdata::{self, Area};
use kabao::spatial::FenceIndex;
use rand::Rng;
use support::Baseline;

mod support;

/// Pings timed per iteration of each case.
const PINGS: usize = 200_000;

/// Checks both answer the same at every ping; returns the total hit count.
fn check(index: &FenceIndex, base: &Baseline, pings: &[LatLon]) -> usize {
    let (mut a, mut b) = (Vec::new(), Vec::new());
    let mut total = 0;
    for &p in pings {
        a.clear();
        b.clear();
        index.matches(p, &mut a);
        base.matches(p, &mut b);
        a.sort_unstable();
        b.sort_unstable();
        assert_eq!(a, b, "kabao and the baseline disagree at {p:?}");
        total += a.len();
    }
    total
}

fn p99_ns(index: &FenceIndex, pings: &[LatLon]) -> u64 {
    let mut h = hdrhistogram::Histogram::<u64>::new(3).expect("histogram");
    let mut out = Vec::new();
    for &p in pings.iter().take(100_000) {
        out.clear();
        let t = Instant::now();
        index.matches(p, &mut out);
        let _ = h.record(t.elapsed().as_nanos() as u64);
    }
    h.value_at_quantile(0.99)
}

/// Builds both indexes, checks them, prints build/memory figures, and times matching.
fn case(c: &mut Criterion, name: &str, shapes: Vec<Shape>, area: Area, with_baseline: bool) {
    let n = shapes.len();
    let campaigns = testdata::campaigns(shapes, 100);
    let pings = testdata::pings(0x5eed, PINGS, area);

    let t = Instant::now();
    let index = FenceIndex::build(campaigns.clone());
    let build = t.elapsed();
    let bytes = index.heap_bytes();
    let t = Instant::now();
    let base = Baseline::build(&campaigns);
    let base_build = t.elapsed();
    let hits = check(&index, &base, &pings[..if with_baseline { PINGS } else { 20_000 }]);
    println!(
        "info: {name}: {n} fences, build {:.3} s ({:.1} bytes/fence, {:.1} MB), baseline build {:.3} s, \
         {hits} hits checked equal, p99 {} ns",
        build.as_secs_f64(),
        bytes as f64 / n as f64,
        bytes as f64 / 1e6,
        base_build.as_secs_f64(),
        p99_ns(&index, &pings)
    );

    let mut g = c.benchmark_group(name);
    g.throughput(Throughput::Elements(PINGS as u64));
    let mut out = Vec::with_capacity(64);
    g.bench_function("kabao", |b| {
        b.iter(|| {
            let mut total = 0;
            for &p in &pings {
                out.clear();
                index.matches(p, &mut out);
                total += out.len();
            }
            assert_eq!(total, hits);
            black_box(total)
        })
    });
    let (mut many, mut ends) = (Vec::with_capacity(hits + 1024), Vec::with_capacity(PINGS));
    g.bench_function("kabao_batch", |b| {
        b.iter(|| {
            many.clear();
            ends.clear();
            index.matches_many(&pings, &mut many, &mut ends);
            assert_eq!((many.len(), ends.len()), (hits, PINGS));
            black_box(many.len())
        })
    });
    if with_baseline {
        g.bench_function("rstar_baseline", |b| {
            b.iter(|| {
                let mut total = 0;
                for &p in &pings {
                    out.clear();
                    base.matches(p, &mut out);
                    total += out.len();
                }
                assert_eq!(total, hits);
                black_box(total)
            })
        });
    }
    g.finish();
}

fn country_1m(c: &mut Criterion) {
    let shapes = testdata::circles(1, 1_000_000, testdata::COUNTRY, (50.0, 2_000.0));
    case(c, "country_1m_circles", shapes, testdata::COUNTRY, true);
}

fn city_100k(c: &mut Criterion) {
    let shapes = testdata::circles(2, 100_000, testdata::CITY, (50.0, 2_000.0));
    case(c, "city_100k_circles", shapes, testdata::CITY, true);
}

fn country_10m(c: &mut Criterion) {
    if std::env::var("KABAO_BENCH_10M").as_deref() != Ok("1") {
        return;
    }
    let shapes = testdata::circles(3, 10_000_000, testdata::COUNTRY, (50.0, 2_000.0));
    case(c, "country_10m_circles", shapes, testdata::COUNTRY, true);
}

fn polygons(c: &mut Criterion) {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/data/polygons/beijing_municipality_boundary_osm.geojson"
    ))
    .expect("data/polygons/beijing_municipality_boundary_osm.geojson");
    let beijing: Vec<Shape> = testdata::geojson_polygons(&text).into_iter().map(Shape::Polygon).collect();
    assert_eq!(beijing.len(), 3);
    // Pings over the boundary's bounding box: ~half inside, many near the 4 037-vertex boundary.
    case(c, "beijing_boundary", beijing, (39.17, 41.06, 115.42, 117.74), true);
    let small = testdata::small_polygons(4, 10_000, testdata::CITY);
    case(c, "city_10k_small_polygons", small, testdata::CITY, true);
    // Medium polygons (40–60 vertices, 20 % with a hole of 23–33): the crossing test's range.
    let mut r = testdata::rng(5);
    let mut medium = Vec::with_capacity(10_000);
    while medium.len() < 10_000 {
        let centre = testdata::point(&mut r, testdata::CITY);
        let (k, hole) = (r.gen_range(40..=60), r.gen_bool(0.2));
        if let Some(p) = testdata::star_polygon(&mut r, centre, k, (0.0015, 0.006), hole) {
            medium.push(Shape::Polygon(p));
        }
    }
    case(c, "city_10k_medium_polygons", medium, testdata::CITY, true);
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));
    targets = country_1m, city_100k, polygons, country_10m
}
criterion_main!(benches);
