//! Points, distances and the two fence shapes, with the exact containment rule of API.md rule 1.
//!
//! Everything here is the *definition* of containment: the spatial index may answer faster, but
//! it must answer exactly what [`Shape::contains`] answers (the property tests hold it to that).

use geo::coordinate_position::{CoordPos, CoordinatePosition};

/// Mean Earth radius of the contract (WGS84 mean sphere), metres.
pub const EARTH_RADIUS_M: f64 = 6_371_008.8;

/// A WGS84 position in degrees. Constructed only from validated input, so it is always finite,
/// `lat` in −90..=90 and `lon` in −180..=180.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct LatLon {
    /// Latitude, degrees north.
    pub lat: f64,
    /// Longitude, degrees east.
    pub lon: f64,
}

impl LatLon {
    /// Builds a position, `None` unless both coordinates are finite and in range.
    pub fn new(lat: f64, lon: f64) -> Option<Self> {
        let ok = lat.is_finite() && lon.is_finite() && (-90.0..=90.0).contains(&lat) && (-180.0..=180.0).contains(&lon);
        ok.then_some(Self { lat, lon })
    }
}

/// The haversine "h" term, `sin²(Δφ/2) + cos φ1 cos φ2 sin²(Δλ/2)`, in 0..=1.
///
/// `d = 2R·asin(√h)` is monotonic in `h`, so comparisons against a radius can be made on `h`
/// alone without the `asin` and `sqrt`.
#[inline]
pub fn haversine_h(a: LatLon, b: LatLon) -> f64 {
    let (phi1, phi2) = (a.lat.to_radians(), b.lat.to_radians());
    let dphi = phi2 - phi1;
    let dlambda = (b.lon - a.lon).to_radians();
    let s1 = (dphi * 0.5).sin();
    let s2 = (dlambda * 0.5).sin();
    (s1 * s1 + phi1.cos() * phi2.cos() * s2 * s2).clamp(0.0, 1.0)
}

/// Haversine distance in metres on the sphere of radius [`EARTH_RADIUS_M`].
#[inline]
pub fn haversine_m(a: LatLon, b: LatLon) -> f64 {
    2.0 * EARTH_RADIUS_M * haversine_h(a, b).sqrt().asin()
}

/// A circle fence: every point whose haversine distance to `center` is ≤ `radius_m`.
#[derive(Debug, Clone, PartialEq)]
pub struct Circle {
    /// Centre of the circle.
    pub center: LatLon,
    /// Radius in metres, 1..=50 000 once validated.
    pub radius_m: f64,
}

impl Circle {
    /// API.md rule 1 for circles: `haversine(center, p) ≤ radius_m`.
    #[inline]
    pub fn contains(&self, p: LatLon) -> bool {
        haversine_m(self.center, p) <= self.radius_m
    }
}

/// A polygon fence with optional holes. Edges are straight lines in lon/lat (RFC 7946); an edge
/// whose longitudes differ by more than 180° runs the short way across ±180.
///
/// To make that true for a planar point-in-polygon test, the rings are stored *unwrapped*: each
/// vertex's longitude is shifted by a multiple of 360° so that consecutive vertices differ by at
/// most 180°. A polygon crossing the antimeridian therefore spans e.g. 170..190 in this frame, and
/// a query tests the point at `lon`, `lon + 360` and `lon − 360`.
#[derive(Debug, Clone, PartialEq)]
pub struct Polygon {
    /// Outer ring then holes, unwrapped, closed (first == last), x = longitude, y = latitude.
    shape: geo::Polygon<f64>,
    /// Bounding box of the outer ring in the unwrapped frame: (min_lon, min_lat, max_lon, max_lat).
    bbox: [f64; 4],
    /// Mean of the outer ring's distinct vertices (API.md, nearest fence), wrapped to −180..=180.
    anchor: LatLon,
}

/// Why a ring cannot make a polygon; the caller turns it into a field error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PolygonError {
    /// A ring with fewer than 4 positions.
    TooFewPositions,
    /// A ring whose last position differs from its first.
    NotClosed,
    /// A ring that winds around a pole (its unwrapped longitudes do not come back).
    ContainsPole,
    /// A ring that crosses itself or another ring, or a hole outside the outer ring.
    Invalid(String),
}

impl std::fmt::Display for PolygonError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::TooFewPositions => write!(f, "a ring needs at least 4 positions (3 distinct, closed)"),
            Self::NotClosed => write!(f, "a ring must end at the position it starts from"),
            Self::ContainsPole => write!(f, "polygons containing a pole are not supported"),
            Self::Invalid(why) => write!(f, "invalid polygon: {why}"),
        }
    }
}

/// Index of the ring (0 = outer) that a [`PolygonError`] is about.
pub type RingIndex = usize;

impl Polygon {
    /// Builds a polygon from GeoJSON-style rings of validated positions (outer ring first).
    pub fn new(rings: &[Vec<LatLon>]) -> Result<Self, (RingIndex, PolygonError)> {
        let Some(outer) = rings.first() else {
            return Err((0, PolygonError::TooFewPositions));
        };
        let outer_unwrapped = unwrap_ring(outer).map_err(|e| (0, e))?;
        let bbox = ring_bbox(&outer_unwrapped);
        let centre_lon = (bbox[0] + bbox[2]) * 0.5;
        let mut holes = Vec::with_capacity(rings.len().saturating_sub(1));
        for (i, ring) in rings.iter().enumerate().skip(1) {
            let mut hole = unwrap_ring(ring).map_err(|e| (i, e))?;
            // Put the hole in the outer ring's frame: shift it by the multiple of 360° that
            // brings its first vertex nearest the outer ring's centre.
            let shift = ((centre_lon - hole[0].0) / 360.0).round() * 360.0;
            for c in &mut hole {
                c.0 += shift;
            }
            holes.push(hole);
        }
        let to_ls = |ring: Vec<(f64, f64)>| geo::LineString::from(ring);
        let shape = geo::Polygon::new(to_ls(outer_unwrapped), holes.into_iter().map(to_ls).collect());
        {
            use geo::algorithm::validation::{RingRole, Validation};
            if let Err(problem) = shape.check_validation() {
                let ring = match &problem {
                    geo::algorithm::validation::InvalidPolygon::TooFewPointsInRing(r)
                    | geo::algorithm::validation::InvalidPolygon::SelfIntersection(r)
                    | geo::algorithm::validation::InvalidPolygon::NonFiniteCoord(r, _)
                    | geo::algorithm::validation::InvalidPolygon::InteriorRingNotContainedInExteriorRing(r)
                    | geo::algorithm::validation::InvalidPolygon::IntersectingRingsOnALine(_, r)
                    | geo::algorithm::validation::InvalidPolygon::IntersectingRingsOnAnArea(_, r) => r,
                };
                let index = match ring {
                    RingRole::Exterior => 0,
                    RingRole::Interior(i) => i + 1,
                };
                return Err((index, PolygonError::Invalid(problem.to_string())));
            }
        }
        // The anchor is the mean of the outer ring's *distinct* vertices (a repeated position
        // counts once), taken in the unwrapped frame so a ring across ±180 averages correctly.
        let mut seen = std::collections::HashSet::with_capacity(outer.len());
        let (mut sum_lon, mut sum_lat, mut n) = (0.0, 0.0, 0.0);
        for (p, c) in outer.iter().zip(shape.exterior().0.iter()) {
            if seen.insert((p.lat.to_bits(), wrap_lon(p.lon).to_bits())) {
                sum_lon += c.x;
                sum_lat += p.lat;
                n += 1.0;
            }
        }
        let anchor = LatLon { lat: sum_lat / n, lon: wrap_lon(sum_lon / n) };
        Ok(Self { shape, bbox, anchor })
    }

    /// API.md rule 1 for polygons: inside or on the boundary (hole boundaries included).
    pub fn contains(&self, p: LatLon) -> bool {
        let [min_lon, min_lat, max_lon, max_lat] = self.bbox;
        if p.lat < min_lat || p.lat > max_lat {
            return false;
        }
        [0.0, 360.0, -360.0].into_iter().any(|shift| {
            let x = p.lon + shift;
            x >= min_lon
                && x <= max_lon
                && self.shape.coordinate_position(&geo::coord! { x: x, y: p.lat }) != CoordPos::Outside
        })
    }

    /// The rings in the unwrapped frame (outer first): x = longitude (may exceed ±180), y = latitude.
    pub fn unwrapped(&self) -> &geo::Polygon<f64> {
        &self.shape
    }

    /// Bounding box of the outer ring in the unwrapped frame: `[min_lon, min_lat, max_lon, max_lat]`.
    pub fn bbox(&self) -> [f64; 4] {
        self.bbox
    }

    /// Mean of the outer ring's distinct vertices.
    pub fn anchor(&self) -> LatLon {
        self.anchor
    }
}

/// Wraps a longitude into −180..=180.
pub fn wrap_lon(lon: f64) -> f64 {
    let mut l = (lon + 180.0).rem_euclid(360.0) - 180.0;
    if l == -180.0 && lon > 0.0 {
        l = 180.0;
    }
    l
}

/// Shifts each vertex's longitude so consecutive vertices differ by at most 180°; refuses rings
/// that are too short, open, or wind around a pole.
fn unwrap_ring(ring: &[LatLon]) -> Result<Vec<(f64, f64)>, PolygonError> {
    if ring.len() < 4 {
        return Err(PolygonError::TooFewPositions);
    }
    let (first, last) = (ring[0], ring[ring.len() - 1]);
    let same_meridian = first.lon == last.lon || (first.lon.abs() == 180.0 && last.lon.abs() == 180.0);
    if first.lat != last.lat || !same_meridian {
        return Err(PolygonError::NotClosed);
    }
    let mut out = Vec::with_capacity(ring.len());
    let mut prev = ring[0].lon;
    out.push((prev, ring[0].lat));
    for p in &ring[1..] {
        let mut lon = p.lon;
        while lon - prev > 180.0 {
            lon -= 360.0;
        }
        while prev - lon > 180.0 {
            lon += 360.0;
        }
        out.push((lon, p.lat));
        prev = lon;
    }
    // A ring that goes once around the globe comes back 360° away from where it started.
    if (out[out.len() - 1].0 - out[0].0).abs() > 1e-9 {
        return Err(PolygonError::ContainsPole);
    }
    let n = out.len();
    out[n - 1].0 = out[0].0;
    Ok(out)
}

fn ring_bbox(ring: &[(f64, f64)]) -> [f64; 4] {
    ring.iter().fold([f64::INFINITY, f64::INFINITY, f64::NEG_INFINITY, f64::NEG_INFINITY], |b, &(x, y)| {
        [b[0].min(x), b[1].min(y), b[2].max(x), b[3].max(y)]
    })
}

/// The geometry of one fence.
#[derive(Debug, Clone, PartialEq)]
pub enum Shape {
    /// A circle around a centre.
    Circle(Circle),
    /// A polygon, holes allowed.
    Polygon(Polygon),
}

impl Shape {
    /// API.md rule 1: is `p` inside this shape (boundary included)?
    #[inline]
    pub fn contains(&self, p: LatLon) -> bool {
        match self {
            Shape::Circle(c) => c.contains(p),
            Shape::Polygon(poly) => poly.contains(p),
        }
    }

    /// The point the nearest-fence rule measures from: a circle's centre, a polygon's mean vertex.
    pub fn anchor(&self) -> LatLon {
        match self {
            Shape::Circle(c) => c.center,
            Shape::Polygon(p) => p.anchor(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ll(lat: f64, lon: f64) -> LatLon {
        LatLon::new(lat, lon).unwrap()
    }

    #[test]
    fn haversine_matches_a_known_distance() {
        // One degree of latitude on the contract's sphere: R·π/180.
        let d = haversine_m(ll(0.0, 0.0), ll(1.0, 0.0));
        assert!((d - EARTH_RADIUS_M.to_radians()).abs() < 1e-6, "{d}");
    }

    #[test]
    fn polygon_across_the_antimeridian_contains_both_sides() {
        let ring = vec![ll(-1.0, 179.0), ll(-1.0, -179.0), ll(1.0, -179.0), ll(1.0, 179.0), ll(-1.0, 179.0)];
        let p = Polygon::new(&[ring]).unwrap();
        assert!(p.contains(ll(0.0, 179.5)));
        assert!(p.contains(ll(0.0, -179.5)));
        assert!(p.contains(ll(0.0, 180.0)));
        assert!(p.contains(ll(0.0, -180.0)));
        assert!(!p.contains(ll(0.0, 178.5)));
        assert!(!p.contains(ll(0.0, 0.0)));
        assert!((p.anchor().lon.abs() - 180.0).abs() < 1e-9);
    }

    #[test]
    fn anchor_is_the_mean_of_distinct_vertices() {
        let ring = vec![ll(0.0, 0.0), ll(0.0, 4.0), ll(0.0, 4.0), ll(3.0, 4.0), ll(0.0, 0.0)];
        let a = Polygon::new(&[ring]).unwrap().anchor();
        assert!((a.lat - 1.0).abs() < 1e-12 && (a.lon - 8.0 / 3.0).abs() < 1e-12, "{a:?}");
    }

    #[test]
    fn polygon_around_a_pole_is_refused() {
        let ring = vec![ll(80.0, 0.0), ll(80.0, 120.0), ll(80.0, -120.0), ll(80.0, 0.0)];
        assert_eq!(Polygon::new(&[ring]).unwrap_err(), (0, PolygonError::ContainsPole));
    }

    #[test]
    fn polygon_boundary_and_hole_boundary_are_inside() {
        let outer = vec![ll(0.0, 0.0), ll(0.0, 10.0), ll(10.0, 10.0), ll(10.0, 0.0), ll(0.0, 0.0)];
        let hole = vec![ll(4.0, 4.0), ll(4.0, 6.0), ll(6.0, 6.0), ll(6.0, 4.0), ll(4.0, 4.0)];
        let p = Polygon::new(&[outer, hole]).unwrap();
        assert!(p.contains(ll(0.0, 5.0)));
        assert!(p.contains(ll(4.0, 5.0)));
        assert!(!p.contains(ll(5.0, 5.0)));
        assert!(p.contains(ll(2.0, 2.0)));
    }

    #[test]
    fn self_intersecting_ring_is_refused() {
        let bow = vec![ll(0.0, 0.0), ll(1.0, 1.0), ll(0.0, 1.0), ll(1.0, 0.0), ll(0.0, 0.0)];
        assert!(matches!(Polygon::new(&[bow]), Err((0, PolygonError::Invalid(_)))));
    }
}
