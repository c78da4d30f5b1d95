//! The index against the brute force: seeded property tests over random fences and pings, and
//! the edge cases of API.md rule 1 (radius ± 1 cm, vertices, edges, holes, ±180, poles).

use std::sync::Arc;

use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed};
use rand::Rng;

use super::testdata::{self, brute_force, campaign, campaigns, Area};
use super::{FenceIndex, Hit, LiveIndex};
use crate::domain::geo::{Circle, LatLon, Polygon, Shape, EARTH_RADIUS_M};
use crate::domain::Campaign;

/// The point `d` metres from `c` along initial bearing `bearing` (radians), on the sphere.
fn destination(c: LatLon, bearing: f64, d: f64) -> LatLon {
    let (phi1, l1, delta) = (c.lat.to_radians(), c.lon.to_radians(), d / EARTH_RADIUS_M);
    let phi2 = (phi1.sin() * delta.cos() + phi1.cos() * delta.sin() * bearing.cos()).asin();
    let l2 = l1 + (bearing.sin() * delta.sin() * phi1.cos()).atan2(delta.cos() - phi1.sin() * phi2.sin());
    LatLon { lat: phi2.to_degrees().clamp(-90.0, 90.0), lon: crate::domain::geo::wrap_lon(l2.to_degrees()) }
}

fn sorted(mut v: Vec<Hit>) -> Vec<Hit> {
    v.sort_unstable();
    v
}

/// Asserts the index answers exactly the brute force (and each hit once) at every ping.
fn check_index(cs: &[Arc<Campaign>], pings: &[LatLon]) {
    let index = FenceIndex::build(cs.to_vec());
    let mut out = Vec::new();
    for &p in pings {
        out.clear();
        index.matches(p, &mut out);
        let got = sorted(out.clone());
        let mut dedup = got.clone();
        dedup.dedup();
        assert_eq!(got, dedup, "duplicate hits at {p:?}");
        assert_eq!(got, brute_force(cs, p), "at {p:?}");
    }
    // The batch path answers the same, ping by ping.
    let (mut many, mut ends) = (vec![Hit { campaign: u32::MAX, fence: 0 }], Vec::new());
    index.matches_many(pings, &mut many, &mut ends);
    assert_eq!(ends.len(), pings.len());
    let mut from = 1;
    for (&p, &end) in pings.iter().zip(&ends) {
        assert_eq!(sorted(many[from..end].to_vec()), brute_force(cs, p), "batch at {p:?}");
        from = end;
    }
}

/// Points that sit on or next to every fence's boundary: radius ± 1 cm and exactly at the radius
/// for circles; vertices, edge midpoints and points just off edges for polygons (holes included).
fn boundary_points(rng: &mut impl Rng, shapes: &[Shape]) -> Vec<LatLon> {
    let mut out = Vec::new();
    for s in shapes {
        match s {
            Shape::Circle(c) => {
                for _ in 0..3 {
                    let b = rng.gen_range(0.0..std::f64::consts::TAU);
                    for d in [c.radius_m - 0.01, c.radius_m, c.radius_m + 0.01, 0.0] {
                        out.push(destination(c.center, b, d.max(0.0)));
                    }
                }
            }
            Shape::Polygon(p) => {
                let g = p.unwrapped();
                for ring in std::iter::once(g.exterior()).chain(g.interiors()) {
                    for l in ring.lines() {
                        let t: f64 = rng.gen_range(0.0..1.0);
                        let mid = (l.start.x + (l.end.x - l.start.x) * t, l.start.y + (l.end.y - l.start.y) * t);
                        for (x, y) in [(l.start.x, l.start.y), mid, (mid.0 + 1e-9, mid.1), (mid.0, mid.1 - 1e-9)] {
                            if let Some(q) = LatLon::new(y, crate::domain::geo::wrap_lon(x)) {
                                out.push(q);
                            }
                        }
                    }
                }
                out.push(p.anchor());
            }
        }
    }
    out
}

/// Random fences of a region kind: 0 city, 1 antimeridian, 2 north pole, 3 south pole, 4 world.
fn region(kind: usize) -> (Area, (f64, f64), f64) {
    // (area, circle radii in metres, polygon radius in degrees)
    match kind {
        0 => ((39.9, 40.0, 116.3, 116.45), (1.0, 3_000.0), 0.01),
        1 => ((-1.0, 1.0, 179.0, 181.0), (1.0, 50_000.0), 0.3),
        2 => ((87.0, 90.0, -180.0, 180.0), (1.0, 50_000.0), 0.5),
        3 => ((-90.0, -87.0, -180.0, 180.0), (1.0, 50_000.0), 0.5),
        _ => ((-80.0, 80.0, -180.0, 180.0), (1_000.0, 50_000.0), 2.0),
    }
}

fn random_case(seed: u64, kind: usize) -> (Vec<Arc<Campaign>>, Vec<LatLon>) {
    let (area, radii, prad) = region(kind);
    let mut rng = testdata::rng(seed);
    let wrap = |p: LatLon| LatLon { lat: p.lat, lon: crate::domain::geo::wrap_lon(p.lon) };
    let mut shapes = Vec::new();
    let (lo, hi) = (radii.0.ln(), radii.1.ln());
    for _ in 0..rng.gen_range(20..120) {
        let c = wrap(testdata::point(&mut rng, area));
        if rng.gen_bool(0.7) {
            shapes.push(Shape::Circle(Circle { center: c, radius_m: rng.gen_range(lo..=hi).exp() }));
        } else {
            // Mostly small polygons (crossing test), some over its edge limit (per-polygon grid).
            let big = super::polygon::SMALL_MAX_EDGES;
            let n = if rng.gen_bool(0.2) { rng.gen_range(big + 1..big + 60) } else { rng.gen_range(3..20) };
            let r = prad * rng.gen_range(0.05..1.0);
            let hole = rng.gen_bool(0.4);
            if let Some(p) = testdata::star_polygon(&mut rng, c, n, (r * 0.5, r), hole) {
                shapes.push(Shape::Polygon(p));
            }
        }
    }
    let mut pings: Vec<LatLon> = (0..400).map(|_| wrap(testdata::point(&mut rng, area))).collect();
    pings.extend(boundary_points(&mut rng, &shapes));
    for lat in [area.0, area.1, 0.0, 89.999, 90.0, -90.0] {
        for lon in [180.0, -180.0, 0.0] {
            pings.push(LatLon { lat, lon });
        }
    }
    let per = rng.gen_range(1..10);
    (campaigns(shapes, per), pings)
}

proptest! {
    #![proptest_config(Config { cases: 48, rng_seed: RngSeed::Fixed(0x006b_6162_616f), failure_persistence: None, ..Config::default() })]

    #[test]
    fn index_equals_brute_force(seed in any::<u64>(), kind in 0usize..5) {
        let (cs, pings) = random_case(seed, kind);
        check_index(&cs, &pings);
    }
}

#[test]
fn dense_city_equals_brute_force() {
    let shapes = testdata::circles(1, 3_000, testdata::CITY, (50.0, 2_000.0));
    let mut shapes2 = testdata::small_polygons(2, 300, testdata::CITY);
    let mut rng = testdata::rng(3);
    let mut pings = testdata::pings(4, 3_000, testdata::CITY);
    pings.extend(boundary_points(&mut rng, &shapes[..300]));
    pings.extend(boundary_points(&mut rng, &shapes2));
    let mut all = shapes;
    all.append(&mut shapes2);
    check_index(&campaigns(all, 50), &pings);
}

#[test]
fn circle_boundary_within_a_centimetre() {
    let mut rng = testdata::rng(5);
    let mut shapes = Vec::new();
    for &r in &[1.0, 1.5, 10.0, 50.0, 777.0, 2_000.0, 20_000.0, 50_000.0] {
        for &lat in &[0.0, 45.0, -60.0, 85.0, 89.9, -89.99] {
            let lon = rng.gen_range(-180.0..180.0);
            shapes.push(Shape::Circle(Circle { center: LatLon { lat, lon }, radius_m: r }));
        }
    }
    let mut pings = Vec::new();
    for _ in 0..20 {
        pings.extend(boundary_points(&mut rng, &shapes));
    }
    check_index(&campaigns(shapes, 7), &pings);
}

#[test]
fn circles_across_the_antimeridian_and_around_poles() {
    let c = |lat: f64, lon: f64, r: f64| Shape::Circle(Circle { center: LatLon { lat, lon }, radius_m: r });
    let shapes = vec![
        c(10.0, 180.0, 5_000.0),
        c(10.0, -179.99, 5_000.0),
        c(89.9, 0.0, 50_000.0),
        c(-89.8, 70.0, 50_000.0),
        c(90.0, 0.0, 1.0),
    ];
    let cs = campaigns(shapes, 1);
    let index = FenceIndex::build(cs.clone());
    let mut out = Vec::new();
    for (p, want) in [
        (LatLon { lat: 10.0, lon: 180.0 }, 2),
        (LatLon { lat: 10.0, lon: -180.0 }, 2),
        (LatLon { lat: 10.0, lon: 179.98 }, 2),
        (LatLon { lat: 90.0, lon: 123.0 }, 2),
        (LatLon { lat: -90.0, lon: -5.0 }, 1),
        (LatLon { lat: 89.6, lon: 0.0 }, 1),
        (LatLon { lat: 89.6, lon: 180.0 }, 0),
    ] {
        out.clear();
        index.matches(p, &mut out);
        assert_eq!(out.len(), want, "{p:?}: {out:?}");
    }
    let mut pings = testdata::pings(6, 2_000, (88.0, 90.0, -180.0, 180.0));
    pings.extend(testdata::pings(7, 2_000, (-90.0, -88.0, -180.0, 180.0)));
    pings.extend(testdata::pings(8, 2_000, (9.9, 10.1, 179.8, 180.0)));
    pings.extend(testdata::pings(9, 2_000, (9.9, 10.1, -180.0, -179.8)));
    check_index(&cs, &pings);
}

#[test]
fn polygon_across_the_antimeridian_with_a_hole() {
    let ll = |lat, lon| LatLon { lat, lon };
    let outer = vec![ll(-1.0, 179.0), ll(-1.0, -179.0), ll(1.0, -179.0), ll(1.0, 179.0), ll(-1.0, 179.0)];
    let hole = vec![ll(-0.5, 179.5), ll(-0.5, -179.5), ll(0.5, -179.5), ll(0.5, 179.5), ll(-0.5, 179.5)];
    let poly = Polygon::new(&[outer, hole]).expect("valid");
    let cs = campaigns(vec![Shape::Polygon(poly)], 1);
    let mut pings = testdata::pings(10, 5_000, (-1.2, 1.2, 178.8, 180.0));
    pings.extend(testdata::pings(11, 5_000, (-1.2, 1.2, -180.0, -178.8)));
    for lat in [-1.0, -0.5, 0.0, 0.5, 1.0] {
        for lon in [179.0, 179.5, 180.0, -180.0, -179.5, -179.0] {
            pings.push(ll(lat, lon));
        }
    }
    check_index(&cs, &pings);
    let index = FenceIndex::build(cs);
    let mut out = Vec::new();
    index.matches(ll(0.75, 180.0), &mut out);
    index.matches(ll(0.75, -180.0), &mut out);
    index.matches(ll(0.0, 180.0), &mut out);
    assert_eq!(out.len(), 2, "{out:?}");
}

/// The shipped Beijing boundary (3 polygons, 4 037 vertices) against the brute force.
#[test]
fn beijing_boundary_equals_brute_force() {
    let text = include_str!("../../data/polygons/beijing_municipality_boundary_osm.geojson");
    let polys = testdata::geojson_polygons(text);
    assert_eq!(polys.len(), 3);
    let shapes: Vec<Shape> = polys.into_iter().map(Shape::Polygon).collect();
    let mut rng = testdata::rng(12);
    let mut pings = testdata::pings(13, 20_000, (39.1, 41.1, 115.4, 117.8));
    pings.extend(boundary_points(&mut rng, &shapes));
    check_index(&campaigns(shapes, 3), &pings);
}

#[test]
fn empty_index_matches_nothing() {
    let index = FenceIndex::build(Vec::new());
    let mut out = Vec::new();
    index.matches(LatLon { lat: 0.0, lon: 0.0 }, &mut out);
    assert!(out.is_empty());
    assert_eq!(index.fence_count(), 0);
}

/// The live index's hits, resolved to (campaign id, fence index), sorted.
fn live_hits(index: &LiveIndex, p: LatLon) -> Vec<(String, u32)> {
    let snap = index.snapshot();
    let mut out = Vec::new();
    snap.matches(p, &mut out);
    let mut v: Vec<(String, u32)> = out.iter().map(|h| (snap.campaign(h.campaign).id.to_string(), h.fence)).collect();
    v.sort();
    let (mut many, mut ends) = (Vec::new(), Vec::new());
    snap.matches_many(&[p, p], &mut many, &mut ends);
    assert_eq!(ends.len(), 2);
    let mut w: Vec<(String, u32)> =
        many[ends[0]..ends[1]].iter().map(|h| (snap.campaign(h.campaign).id.to_string(), h.fence)).collect();
    w.sort();
    assert_eq!(v, w, "matches_many differs from matches");
    v
}

/// The same, by brute force over a set of live campaigns.
fn brute_hits(live: &[Arc<Campaign>], p: LatLon) -> Vec<(String, u32)> {
    let mut v: Vec<(String, u32)> =
        brute_force(live, p).iter().map(|h| (live[h.campaign as usize].id.to_string(), h.fence)).collect();
    v.sort();
    v
}

#[test]
fn live_upsert_replace_remove_are_visible_at_once() {
    let here = LatLon { lat: 40.0, lon: 116.4 };
    let there = LatLon { lat: 41.0, lon: 116.4 };
    let circle = |p: LatLon| Shape::Circle(Circle { center: p, radius_m: 100.0 });
    let index = LiveIndex::new(vec![Arc::new(campaign("a", vec![circle(here)]))]);
    assert_eq!(live_hits(&index, here), vec![("a".into(), 0)]);

    index.upsert(Arc::new(campaign("b", vec![circle(here), circle(there)])));
    assert_eq!(live_hits(&index, here), vec![("a".into(), 0), ("b".into(), 0)]);
    assert_eq!(index.snapshot().fence_count(), 3);

    // Replacing "a" moves its fence: the old one is gone at once.
    index.upsert(Arc::new(campaign("a", vec![circle(there)])));
    assert_eq!(live_hits(&index, here), vec![("b".into(), 0)]);
    assert_eq!(live_hits(&index, there), vec![("a".into(), 0), ("b".into(), 1)]);

    let a = crate::domain::CampaignId::parse("id", "a").expect("valid");
    assert!(index.remove(&a));
    assert!(!index.remove(&a));
    assert_eq!(live_hits(&index, there), vec![("b".into(), 1)]);
    assert_eq!(index.snapshot().campaign_count(), 1);

    index.rebuild_now();
    assert_eq!(live_hits(&index, there), vec![("b".into(), 1)]);
    assert_eq!(live_hits(&index, here), vec![("b".into(), 0)]);
    assert_eq!(index.snapshot().fence_count(), 2);
}

/// Random upserts and removes, with rebuilds (explicit and background), against the brute force
/// over the campaigns that should be live.
#[test]
fn live_random_writes_equal_brute_force() {
    let area = (39.9, 40.0, 116.3, 116.45);
    let mut rng = testdata::rng(14);
    let index = LiveIndex::with_rebuild_after(Vec::new(), 40);
    let mut live: std::collections::BTreeMap<String, Arc<Campaign>> = Default::default();
    let pings = testdata::pings(15, 200, area);
    for step in 0..300 {
        let id = format!("c{}", rng.gen_range(0..30));
        if rng.gen_bool(0.25) {
            let removed = index.remove(&crate::domain::CampaignId::parse("id", &id).expect("valid"));
            assert_eq!(removed, live.remove(&id).is_some());
        } else {
            let n = rng.gen_range(0..6);
            let shapes = testdata::circles(rng.gen(), n, area, (50.0, 3_000.0));
            let c = Arc::new(campaign(&id, shapes));
            live.insert(id, Arc::clone(&c));
            index.upsert(c);
        }
        if step % 97 == 0 {
            index.rebuild_now();
        }
        let now: Vec<Arc<Campaign>> = live.values().cloned().collect();
        assert_eq!(index.snapshot().campaign_count(), now.len());
        for &p in &pings[..20] {
            assert_eq!(live_hits(&index, p), brute_hits(&now, p), "step {step}");
        }
    }
    let now: Vec<Arc<Campaign>> = live.values().cloned().collect();
    for &p in &pings {
        assert_eq!(live_hits(&index, p), brute_hits(&now, p));
    }
}

/// Many campaigns written one by one with no base rebuild: the runs stay few (they shrink
/// geometrically, so a write costs in proportion to the campaign written) and exact.
#[test]
fn many_single_writes_keep_few_runs_and_equal_brute_force() {
    let area = (39.9, 40.0, 116.3, 116.45);
    let mut rng = testdata::rng(21);
    let index = LiveIndex::with_rebuild_after(Vec::new(), usize::MAX);
    let mut live: std::collections::BTreeMap<String, Arc<Campaign>> = Default::default();
    let pings = testdata::pings(22, 100, area);
    for step in 0..1_500 {
        // Mostly new campaigns, some replaced or removed (their old runs keep dead slots).
        let id = if rng.gen_bool(0.8) { format!("n{step}") } else { format!("n{}", rng.gen_range(0..=step)) };
        if rng.gen_bool(0.1) {
            let removed = index.remove(&crate::domain::CampaignId::parse("id", &id).expect("valid"));
            assert_eq!(removed, live.remove(&id).is_some());
        } else {
            let shapes = testdata::circles(rng.gen(), rng.gen_range(0..4), area, (50.0, 3_000.0));
            let c = Arc::new(campaign(&id, shapes));
            live.insert(id, Arc::clone(&c));
            index.upsert(c);
        }
        let snapshot = index.snapshot();
        assert_eq!(snapshot.campaign_count(), live.len());
        // Weights more than halve from run to run: about log2 of everything written, plus the base.
        assert!(snapshot.segment_count() <= 2 + (64 - (6 * (step as u64 + 1)).leading_zeros()) as usize, "step {step}");
        if step % 100 == 0 {
            let now: Vec<Arc<Campaign>> = live.values().cloned().collect();
            for &p in &pings {
                assert_eq!(live_hits(&index, p), brute_hits(&now, p), "step {step}");
            }
        }
    }
    let now: Vec<Arc<Campaign>> = live.values().cloned().collect();
    assert_eq!(index.snapshot().fence_count(), now.iter().map(|c| c.fences.len()).sum::<usize>());
    for &p in &pings {
        assert_eq!(live_hits(&index, p), brute_hits(&now, p));
    }
}

/// A matcher running while campaigns are replaced sees, in every snapshot, either the old or the
/// new version of each campaign, never both or neither.
#[test]
fn concurrent_matcher_never_sees_a_torn_state() {
    let here = LatLon { lat: 40.0, lon: 116.4 };
    let circle = Shape::Circle(Circle { center: here, radius_m: 100.0 });
    let index = LiveIndex::with_rebuild_after(Vec::new(), 8);
    for k in 0..10 {
        index.upsert(Arc::new(campaign(&format!("c{k}"), vec![circle.clone()])));
    }
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (index, stop) = (index.clone(), Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut out = Vec::new();
            let mut seen = 0u64;
            loop {
                let done = stop.load(std::sync::atomic::Ordering::Relaxed);
                let snap = index.snapshot();
                out.clear();
                snap.matches(here, &mut out);
                let mut ids: Vec<String> = out.iter().map(|h| snap.campaign(h.campaign).id.to_string()).collect();
                ids.sort();
                let want: Vec<String> =
                    (0..10).map(|k| format!("c{k}")).collect::<std::collections::BTreeSet<_>>().into_iter().collect();
                assert_eq!(ids, want);
                assert_eq!(snap.campaign_count(), 10);
                seen += 1;
                if done {
                    break seen;
                }
            }
        })
    };
    for round in 0..200 {
        let k = round % 10;
        index.upsert(Arc::new(campaign(&format!("c{k}"), vec![circle.clone()])));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(reader.join().expect("reader thread") > 0);
}

/// Points on and around every vertex and edge of `p`: the vertex itself and its `f64`
/// neighbours, edge points at several fractions, and those points pushed off the edge by
/// multiples of the `f32` rounding step of the polygon's extent (the small-polygon margin's scale).
fn edge_probes(rng: &mut impl Rng, p: &Polygon) -> Vec<LatLon> {
    let [x0, y0, x1, y1] = p.bbox();
    let ulp32 = (x1 - x0).max(y1 - y0) * f64::powi(2.0, -24);
    let mut out = Vec::new();
    let mut push = |x: f64, y: f64| {
        if let Some(q) = LatLon::new(y, crate::domain::geo::wrap_lon(x)) {
            out.push(q);
        }
    };
    let g = p.unwrapped();
    for ring in std::iter::once(g.exterior()).chain(g.interiors()) {
        for l in ring.lines() {
            let (a, b) = (l.start, l.end);
            push(a.x, a.y);
            // The nearest `f64` neighbours (for |v| ≥ 1e-300; a zero coordinate just repeats).
            let step = |v: f64| (v.abs() * f64::EPSILON * 0.5).max(1e-300);
            push(a.x + step(a.x) * 1.5, a.y);
            push(a.x, a.y - step(a.y) * 1.5);
            let (dx, dy) = (b.x - a.x, b.y - a.y);
            let len = (dx * dx + dy * dy).sqrt().max(1e-300);
            let (nx, ny) = (-dy / len, dx / len);
            for t in [0.5, rng.gen_range(0.0..1.0), 1e-9, 1.0 - 1e-9] {
                let (mx, my) = (a.x + dx * t, a.y + dy * t);
                push(mx, my);
                for k in [0.25, 1.0, 3.0, 8.0, 30.0, 1e3, 1e5] {
                    push(mx + nx * k * ulp32, my + ny * k * ulp32);
                    push(mx - nx * k * ulp32, my - ny * k * ulp32);
                }
            }
            // Along the horizontal through the vertex: the ray of the crossing test runs
            // through the vertex.
            for k in [-1e5, -3.0, 3.0, 1e5] {
                push(a.x + k * ulp32, a.y);
            }
        }
    }
    out
}

/// The small-polygon crossing test on its own (not masked by the exact fallback): whenever it
/// answers, it answers what `Polygon::contains` does, and it answers away from the edges.
#[test]
fn small_polygon_test_is_exact_or_defers() {
    use super::polygon::SmallPolys;
    let mut rng = testdata::rng(21);
    let mut store = SmallPolys::default();
    let (mut decided, mut deferred, mut far_deferred) = (0usize, 0usize, 0usize);
    let mut polys = Vec::new();
    for (area, radii) in [
        (testdata::CITY, (0.0008, 0.005)),
        ((-1.0, 1.0, 179.5, 180.5), (0.001, 0.3)),
        ((85.0, 89.0, -180.0, 180.0), (0.01, 0.5)),
        ((-30.0, 30.0, -1.0, 1.0), (0.0001, 3.0)),
    ] {
        for _ in 0..60 {
            let c = testdata::point(&mut rng, area);
            let c = LatLon { lat: c.lat, lon: crate::domain::geo::wrap_lon(c.lon) };
            let n = rng.gen_range(3..=14);
            let r = rng.gen_range(radii.0..=radii.1);
            let hole = rng.gen_bool(0.5);
            if let Some(p) = testdata::star_polygon(&mut rng, c, n, (r * 0.5, r), hole) {
                polys.push(p);
            }
        }
    }
    for p in &polys {
        let at = store.push(p).expect("under the edge limit: small");
        let [x0, y0, x1, y1] = p.bbox();
        let mut pings = edge_probes(&mut rng, p);
        let inner = pings.len();
        for _ in 0..200 {
            let (lat, lon) = (rng.gen_range(y0 - 0.1 * (y1 - y0)..=y1 + 0.1 * (y1 - y0)), rng.gen_range(x0..=x1));
            if let Some(q) = LatLon::new(lat.clamp(-90.0, 90.0), crate::domain::geo::wrap_lon(lon)) {
                pings.push(q);
            }
        }
        for (i, &q) in pings.iter().enumerate() {
            match store.contains(at, q) {
                Some(inside) => {
                    decided += 1;
                    assert_eq!(inside, p.contains(q), "{q:?} in {:?}", p.unwrapped());
                }
                None => {
                    deferred += 1;
                    far_deferred += (i >= inner) as usize;
                }
            }
        }
    }
    // Random points almost never fall within the margin (~1e-7 of the polygon's size).
    assert!(far_deferred <= 2, "{far_deferred} random points deferred");
    // Deferred: the probes within ~11 f32 steps of an edge's line (by construction about half).
    assert!(decided > deferred, "decided {decided}, deferred {deferred}");
}

/// Small polygons through the whole index: vertices, edges, hole boundaries, points at `f32`
/// rounding distance from edges, across ±180, against the brute force.
#[test]
fn small_polygons_on_and_near_edges_equal_brute_force() {
    let mut rng = testdata::rng(22);
    let mut shapes = testdata::small_polygons(23, 200, testdata::CITY);
    for _ in 0..40 {
        let c = testdata::point(&mut rng, (-0.5, 0.5, 179.99, 180.01));
        let c = LatLon { lat: c.lat, lon: crate::domain::geo::wrap_lon(c.lon) };
        let hole = rng.gen_bool(0.5);
        let n = rng.gen_range(3..12);
        if let Some(p) = testdata::star_polygon(&mut rng, c, n, (0.0005, 0.004), hole) {
            shapes.push(Shape::Polygon(p));
        }
    }
    // Axis-aligned squares with a square hole: pings on the horizontal edges run the crossing
    // test's ray along an edge; a square touching ±180 from both sides.
    let ll = |lat, lon| LatLon { lat, lon };
    for (lat, lon) in [(39.9, 116.3), (0.0, 179.998), (0.01, -180.0)] {
        let d = 0.002;
        let outer = vec![ll(lat, lon), ll(lat, lon + d), ll(lat + d, lon + d), ll(lat + d, lon), ll(lat, lon)];
        let h = |a: f64, b: f64| ll(lat + a * d, crate::domain::geo::wrap_lon(lon + b * d));
        let hole = vec![h(0.25, 0.25), h(0.25, 0.75), h(0.75, 0.75), h(0.75, 0.25), h(0.25, 0.25)];
        let outer: Vec<LatLon> = outer.into_iter().map(|p| ll(p.lat, crate::domain::geo::wrap_lon(p.lon))).collect();
        shapes.push(Shape::Polygon(Polygon::new(&[outer, hole]).expect("valid square")));
    }
    let mut pings = Vec::new();
    for s in &shapes {
        if let Shape::Polygon(p) = s {
            pings.extend(edge_probes(&mut rng, p));
        }
    }
    for (lat, lon) in [(39.9, 116.3), (0.0, 179.998), (0.01, -180.0)] {
        for a in [0.0, 0.25, 0.5, 0.75, 1.0] {
            for b in [-0.5, 0.0, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5] {
                pings.push(ll(lat + a * 0.002, crate::domain::geo::wrap_lon(lon + b * 0.002)));
            }
        }
    }
    pings.extend(testdata::pings(24, 5_000, testdata::CITY));
    pings.extend(testdata::pings(25, 3_000, (-0.5, 0.5, 179.98, 180.0)));
    pings.extend(testdata::pings(26, 3_000, (-0.5, 0.5, -180.0, -179.98)));
    for lat in [-0.002, 0.0, 0.001, 0.002, 0.01, 0.011, 0.012] {
        pings.push(ll(lat, 180.0));
        pings.push(ll(lat, -180.0));
    }
    check_index(&campaigns(shapes, 9), &pings);
}
