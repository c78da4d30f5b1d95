//! The fence workload: PERFORMANCE.md's areas (the same seeded generators as the benches, so
//! `--create-fences 1000000 --area country` is the matcher bench's country case), or fences read
//! from a CSV (`lon,lat,radius_m`) or GeoJSON (Polygon / MultiPolygon) file, registered as
//! campaigns of at most [`FENCES_PER_CAMPAIGN`] fences.

use std::path::Path;

use anyhow::{bail, Context};
use serde_json::{json, Value};

use crate::domain::geo::Shape;
use crate::spatial::testdata;

/// Fences per campaign: ≈ 10 MB bodies, well under the default 128 MiB campaign body limit.
pub const FENCES_PER_CAMPAIGN: usize = 100_000;

/// The areas of PERFORMANCE.md's workloads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AreaKind {
    /// ≈ 1 100 × 1 000 km around 34.5° N, 116° E.
    Country,
    /// ≈ 50 × 46 km around central Beijing.
    City,
}

impl AreaKind {
    /// `(min_lat, max_lat, min_lon, max_lon)`.
    pub fn bounds(self) -> (f64, f64, f64, f64) {
        match self {
            AreaKind::Country => testdata::COUNTRY,
            AreaKind::City => testdata::CITY,
        }
    }

    fn name(self) -> &'static str {
        match self {
            AreaKind::Country => "country",
            AreaKind::City => "city",
        }
    }
}

/// Which fences to generate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ShapeKind {
    /// Circles, radii 50 m–2 km log-uniform.
    Circle,
    /// Small star polygons, 4–12 vertices, ~50–500 m, one in five with a hole.
    Polygon,
}

/// A set of fences as campaign fence documents, and the rectangle they span.
pub struct FenceSet {
    /// Name stem of the campaigns (`loadgen-<stem>-<i>`).
    pub stem: String,
    /// Fence documents (`{"id", "type", …}`).
    pub fences: Vec<Value>,
    /// `(min_lat, max_lat, min_lon, max_lon)` of the fences.
    pub bounds: (f64, f64, f64, f64),
}

/// The shapes of `n` seeded fences of `shape` over `area`: what [`generate`] registers, for
/// benches that must load the very same fences elsewhere (`benches/compare.rs`).
pub fn shapes(n: usize, shape: ShapeKind, area: AreaKind, seed: u64) -> Vec<Shape> {
    match shape {
        ShapeKind::Circle => testdata::circles(seed, n, area.bounds(), (50.0, 2_000.0)),
        ShapeKind::Polygon => testdata::small_polygons(seed, n, area.bounds()),
    }
}

/// `n` seeded fences of `shape` over `area`.
pub fn generate(n: usize, shape: ShapeKind, area: AreaKind, seed: u64) -> FenceSet {
    let shapes = shapes(n, shape, area, seed);
    let fences = shapes.iter().enumerate().map(|(i, s)| shape_doc(i, s)).collect();
    let stem = format!("{}-{}", area.name(), if shape == ShapeKind::Circle { "circles" } else { "polygons" });
    FenceSet { stem, fences, bounds: area.bounds() }
}

fn shape_doc(i: usize, shape: &Shape) -> Value {
    match shape {
        Shape::Circle(c) => {
            json!({"id": format!("f{i}"), "type": "circle", "center": [c.center.lon, c.center.lat], "radius_m": c.radius_m})
        }
        Shape::Polygon(p) => {
            let g = p.unwrapped();
            let ring = |r: &geo::LineString<f64>| r.coords().map(|c| [c.x, c.y]).collect::<Vec<_>>();
            let rings: Vec<Vec<[f64; 2]>> =
                std::iter::once(ring(g.exterior())).chain(g.interiors().iter().map(ring)).collect();
            json!({"id": format!("f{i}"), "type": "polygon", "coordinates": rings})
        }
    }
}

/// Fences from a file: GeoJSON (`.json`, `.geojson`: every Polygon and MultiPolygon member) or
/// CSV rows `lon,lat,radius_m` (a header row is skipped).
pub fn read_file(path: &Path) -> anyhow::Result<FenceSet> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let is_json = path.extension().is_some_and(|e| e.eq_ignore_ascii_case("json") || e.eq_ignore_ascii_case("geojson"));
    let shapes: Vec<Shape> = if is_json {
        testdata::geojson_polygons(&text).into_iter().map(Shape::Polygon).collect()
    } else {
        let mut shapes = Vec::new();
        let mut reader = csv::ReaderBuilder::new().has_headers(false).from_reader(text.as_bytes());
        for (n, record) in reader.records().enumerate() {
            let record = record.with_context(|| format!("{} line {}", path.display(), n + 1))?;
            let cell = |i: usize| record.get(i).unwrap_or("").trim().parse::<f64>();
            match (cell(0), cell(1), cell(2)) {
                (Ok(lon), Ok(lat), Ok(radius_m)) => {
                    let center = crate::domain::LatLon::new(lat, lon)
                        .with_context(|| format!("{} line {}: lat/lon out of range", path.display(), n + 1))?;
                    shapes.push(Shape::Circle(crate::domain::geo::Circle { center, radius_m }));
                }
                // A header row.
                _ if n == 0 => {}
                _ => bail!("{} line {}: expected lon,lat,radius_m", path.display(), n + 1),
            }
        }
        shapes
    };
    if shapes.is_empty() {
        bail!("{} holds no fences", path.display());
    }
    let mut bounds = (f64::INFINITY, f64::NEG_INFINITY, f64::INFINITY, f64::NEG_INFINITY);
    for s in &shapes {
        let a = s.anchor();
        bounds = (bounds.0.min(a.lat), bounds.1.max(a.lat), bounds.2.min(a.lon), bounds.3.max(a.lon));
    }
    let fences = shapes.iter().enumerate().map(|(i, s)| shape_doc(i, s)).collect();
    Ok(FenceSet { stem: "file".into(), fences, bounds })
}

/// The campaign documents holding `set`: `loadgen-<stem>-<i>`, an enter trigger (or, with
/// `dwell_s`, a dwell trigger of that many seconds), no caps beyond API.md's defaults.
pub fn campaign_docs(set: FenceSet, dwell_s: Option<u64>) -> Vec<(String, Value)> {
    let trigger = match dwell_s {
        Some(dwell_s) => json!({"on": "dwell", "dwell_s": dwell_s}),
        None => json!({"on": "enter"}),
    };
    let mut docs = Vec::new();
    let mut fences = set.fences.into_iter().peekable();
    while fences.peek().is_some() {
        let id = format!("loadgen-{}-{}", set.stem, docs.len());
        let chunk: Vec<Value> = fences.by_ref().take(FENCES_PER_CAMPAIGN).collect();
        let doc = json!({
            "id": id,
            "name": format!("kabao loadgen: {} fences", chunk.len()),
            "coupon": {"title": "loadgen"},
            "fences": chunk,
            "trigger": trigger.clone(),
        });
        docs.push((id, doc));
    }
    docs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_fences_are_grouped_into_campaigns() {
        let docs = campaign_docs(generate(FENCES_PER_CAMPAIGN + 5, ShapeKind::Circle, AreaKind::City, 1), None);
        assert_eq!(docs.len(), 2);
        assert_eq!(docs[0].0, "loadgen-city-circles-0");
        assert_eq!(docs[1].1["fences"].as_array().unwrap().len(), 5);
        assert_eq!(docs[0].1["trigger"], json!({"on": "enter"}));
        let dwelling = campaign_docs(generate(1, ShapeKind::Circle, AreaKind::City, 1), Some(600));
        assert_eq!(dwelling[0].1["trigger"], json!({"on": "dwell", "dwell_s": 600}));
        let polygons = generate(3, ShapeKind::Polygon, AreaKind::Country, 1);
        let ring = polygons.fences[0]["coordinates"][0].as_array().unwrap();
        assert!(ring.len() >= 5);
        assert_eq!(ring.first(), ring.last());
    }

    #[test]
    fn fences_files_in_csv_and_geojson() {
        let dir = tempfile::tempdir().unwrap();
        let csv = dir.path().join("f.csv");
        std::fs::write(&csv, "lon,lat,radius_m\n116.3,39.9,150\n116.4,40.0,80\n").unwrap();
        let set = read_file(&csv).unwrap();
        assert_eq!(set.fences.len(), 2);
        assert_eq!(set.fences[1]["radius_m"], 80.0);
        assert_eq!(set.bounds, (39.9, 40.0, 116.3, 116.4));
        std::fs::write(&csv, "116.3,39.9,150\n116.4,x,80\n").unwrap();
        assert!(read_file(&csv).is_err());

        let geojson = dir.path().join("f.geojson");
        let square = json!({"type": "FeatureCollection", "features": [{"type": "Feature", "properties": {},
            "geometry": {"type": "Polygon", "coordinates": [[[116.0, 39.0], [116.1, 39.0], [116.1, 39.1], [116.0, 39.0]]]}}]});
        std::fs::write(&geojson, square.to_string()).unwrap();
        let set = read_file(&geojson).unwrap();
        assert_eq!(set.fences.len(), 1);
        assert_eq!(set.fences[0]["type"], "polygon");
    }
}
