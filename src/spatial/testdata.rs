//! Seeded generators of fences, campaigns and pings, shared by the property tests and the
//! benchmarks (`benches/matcher.rs`), plus the brute force every index is checked against.
//! Support code, not part of the engine's API.

use std::sync::Arc;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::Hit;
use crate::domain::geo::{Circle, LatLon, Polygon, Shape};
use crate::domain::{Campaign, CampaignId, Fence, FenceId};

/// A lat/lon rectangle, degrees: `(min_lat, max_lat, min_lon, max_lon)`.
pub type Area = (f64, f64, f64, f64);

/// ≈ 1 100 km (east–west) × 1 000 km (north–south), centred on 34.5° N, 116° E.
pub const COUNTRY: Area = (30.0, 39.0, 110.0, 122.07);
/// ≈ 50 km × 46 km around central Beijing.
pub const CITY: Area = (39.7, 40.114, 116.1, 116.686);

/// A seeded generator.
pub fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// A uniform random point of `area`.
pub fn point(rng: &mut impl Rng, area: Area) -> LatLon {
    LatLon { lat: rng.gen_range(area.0..=area.1), lon: rng.gen_range(area.2..=area.3) }
}

/// `n` uniform random pings over `area`.
pub fn pings(seed: u64, n: usize, area: Area) -> Vec<LatLon> {
    let mut r = rng(seed);
    (0..n).map(|_| point(&mut r, area)).collect()
}

/// `n` circles centred uniformly in `area`, radii log-uniform in `radii` metres.
pub fn circles(seed: u64, n: usize, area: Area, radii: (f64, f64)) -> Vec<Shape> {
    let mut r = rng(seed);
    let (lo, hi) = (radii.0.ln(), radii.1.ln());
    (0..n)
        .map(|_| {
            let center = point(&mut r, area);
            Shape::Circle(Circle { center, radius_m: r.gen_range(lo..=hi).exp() })
        })
        .collect()
}

/// A star-shaped (hence simple) polygon of `n` vertices around `c`, radii in `radii` degrees,
/// optionally with a star-shaped hole inside its smallest radius. Longitudes may leave ±180 (they
/// are wrapped), so polygons near the antimeridian cross it.
pub fn star_polygon(rng: &mut impl Rng, c: LatLon, n: usize, radii: (f64, f64), hole: bool) -> Option<Polygon> {
    let ring = |rng: &mut dyn rand::RngCore, n: usize, lo: f64, hi: f64| -> Vec<LatLon> {
        let mut pts: Vec<LatLon> = (0..n)
            .map(|k| {
                let a = (k as f64 + rng.gen_range(0.0..0.8)) / n as f64 * std::f64::consts::TAU;
                let r = rng.gen_range(lo..=hi);
                let lat = (c.lat + r * a.sin()).clamp(-89.9, 89.9);
                LatLon { lat, lon: crate::domain::geo::wrap_lon(c.lon + r * a.cos()) }
            })
            .collect();
        pts.push(pts[0]);
        pts
    };
    let n = n.max(3);
    let mut rings = vec![ring(rng, n, radii.0, radii.1)];
    if hole {
        rings.push(ring(rng, 3 + n / 2, radii.0 * 0.2, radii.0 * 0.6));
    }
    Polygon::new(&rings).ok()
}

/// `n` small star polygons (4–12 vertices, ~50–500 m) centred uniformly in `area`.
pub fn small_polygons(seed: u64, n: usize, area: Area) -> Vec<Shape> {
    let mut r = rng(seed);
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let c = point(&mut r, area);
        let k = r.gen_range(4..=12);
        let hole = r.gen_bool(0.2);
        if let Some(p) = star_polygon(&mut r, c, k, (0.0008, 0.005), hole) {
            out.push(Shape::Polygon(p));
        }
    }
    out
}

/// The polygons of a GeoJSON text (every `Polygon`, and every member of a `MultiPolygon`).
pub fn geojson_polygons(text: &str) -> Vec<Polygon> {
    fn walk(v: &serde_json::Value, out: &mut Vec<Polygon>) {
        let rings = |v: &serde_json::Value| -> Option<Vec<Vec<LatLon>>> {
            v.as_array()?
                .iter()
                .map(|ring| {
                    ring.as_array()?
                        .iter()
                        .map(|p| LatLon::new(p.get(1)?.as_f64()?, p.get(0)?.as_f64()?))
                        .collect::<Option<Vec<_>>>()
                })
                .collect()
        };
        match v.get("type").and_then(|t| t.as_str()) {
            Some("Polygon") => {
                if let Some(p) = v.get("coordinates").and_then(rings).and_then(|r| Polygon::new(&r).ok()) {
                    out.push(p);
                }
            }
            Some("MultiPolygon") => {
                for member in v.get("coordinates").and_then(|c| c.as_array()).into_iter().flatten() {
                    if let Some(p) = rings(member).and_then(|r| Polygon::new(&r).ok()) {
                        out.push(p);
                    }
                }
            }
            _ => {
                for key in ["features", "geometries"] {
                    for f in v.get(key).and_then(|f| f.as_array()).into_iter().flatten() {
                        walk(f, out);
                    }
                }
                if let Some(g) = v.get("geometry") {
                    walk(g, out);
                }
            }
        }
    }
    let mut out = Vec::new();
    if let Ok(v) = serde_json::from_str::<serde_json::Value>(text) {
        walk(&v, &mut out);
    }
    out
}

/// A minimal valid campaign holding `shapes` as fences `f0`, `f1`, …
pub fn campaign(id: &str, shapes: Vec<Shape>) -> Campaign {
    let fences = shapes
        .into_iter()
        .enumerate()
        .map(|(i, shape)| Fence { id: FenceId::parse("id", &format!("f{i}")).expect("valid"), shape, rings: None })
        .collect();
    let id = CampaignId::parse("id", id).expect("test campaign ids are valid");
    Campaign { revision: 1, ..Campaign::new(id, "t", fences) }
}

/// Groups `shapes` into campaigns of `per` fences each (ids `c0`, `c1`, …).
pub fn campaigns(shapes: Vec<Shape>, per: usize) -> Vec<Arc<Campaign>> {
    let per = per.max(1);
    let mut out = Vec::with_capacity(shapes.len() / per + 1);
    let mut it = shapes.into_iter().peekable();
    while it.peek().is_some() {
        let chunk: Vec<Shape> = it.by_ref().take(per).collect();
        out.push(Arc::new(campaign(&format!("c{}", out.len()), chunk)));
    }
    out
}

/// The definition: every fence of `campaigns` whose shape contains `p`, sorted.
pub fn brute_force(campaigns: &[Arc<Campaign>], p: LatLon) -> Vec<Hit> {
    let mut out = Vec::new();
    for (ci, c) in campaigns.iter().enumerate() {
        for (fi, f) in c.fences.iter().enumerate() {
            if f.shape.contains(p) {
                out.push(Hit { campaign: ci as u32, fence: fi as u32 });
            }
        }
    }
    out
}
