//! Fuzz entry points (issue 10, item 7): each takes arbitrary bytes and panics only on a bug.
//!
//! The `cargo fuzz` targets in `fuzz/` call these, and so does `tests/fuzz_checks.rs` (the
//! corpus in `fuzz/corpus/` plus random bytes under proptest), so the same checks also run on a
//! stable toolchain without libFuzzer. Each states what must hold for every input:
//!
//! - [`ping_body`]: `POST /v1/pings`'s parser never panics; a refused body is a 4xx with a
//!   code; every accepted ping is in range and inside the time window; every item of a batch
//!   is either valid or rejected, once; a single ping parses the same through the domain type.
//! - [`campaign_body`]: a campaign body either fails with a 4xx naming a field (or none, for
//!   the whole body) or validates; a valid campaign echoed as the server stores and replies
//!   with it (`to_doc`, JSON) reads back as the same campaign.
//! - [`polygon_containment`]: for a polygon built from the bytes (small ones exercise the
//!   compact crossing test, star polygons past 256 edges the per-polygon grid), the fence index
//!   answers exactly the brute force over [`Shape::contains`] at the vertices, edge midpoints,
//!   points just off them and points the bytes choose.

use std::sync::Arc;

use crate::domain::{parse_json, CampaignDoc, CampaignId, LatLon, Polygon, Shape};
use crate::spatial::testdata::{self, brute_force};
use crate::spatial::{FenceIndex, Hit};

/// Checks `POST /v1/pings`'s body parser on `data`.
pub fn ping_body(data: &[u8]) {
    crate::http::pings::check_parse(data);
}

/// Checks campaign parsing and validation on `data`.
pub fn campaign_body(data: &[u8]) {
    let doc: CampaignDoc = match crate::http::parse_body(data) {
        Ok(doc) => doc,
        Err(e) => {
            let (status, code) = e.status_and_code();
            assert!(status.is_client_error(), "{status} for a bad body");
            assert!(!code.is_empty());
            return;
        }
    };
    let generated = || CampaignId::parse("id", "generated").expect("a valid id");
    let campaign = match doc.validate(generated) {
        Ok(campaign) => campaign,
        Err(e) => {
            assert!(!e.message.is_empty(), "an error says what is wrong");
            return;
        }
    };
    let echoed = serde_json::to_vec(&campaign.to_doc()).expect("a campaign serialises");
    let again: CampaignDoc = parse_json(&echoed).expect("the echo parses");
    let again = again.validate(generated).expect("the echo validates");
    assert_eq!(again, campaign, "the echo reads back as the same campaign");
}

/// Reads bytes as little numbers, then zeros when they run out.
struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn u8(&mut self) -> u8 {
        let (first, rest) = self.0.split_first().map_or((0, &[][..]), |(f, r)| (*f, r));
        self.0 = rest;
        first
    }

    fn u16(&mut self) -> u16 {
        u16::from(self.u8()) | (u16::from(self.u8()) << 8)
    }

    /// A fraction in −1..=1.
    fn unit(&mut self) -> f64 {
        f64::from(self.u16() as i16) / f64::from(i16::MAX)
    }
}

/// Checks the fence index against the brute force for a polygon built from `data`.
pub fn polygon_containment(data: &[u8]) {
    let mut b = Bytes(data);
    let mode = b.u8();
    // Centres anywhere, antimeridian and high latitudes included; sizes from 10 m to ~10°.
    let centre = LatLon { lat: b.unit() * 85.0, lon: b.unit() * 180.0 };
    let size = 10f64.powf(-4.0 + 5.0 * f64::from(b.u8()) / 255.0);
    let polygon = if mode & 0x80 != 0 {
        // A star polygon of 3..=700 vertices from a seed: big ones get the per-polygon grid.
        let n = 3 + usize::from(b.u16()) % 698;
        let mut rng = testdata::rng(u64::from(b.u16()));
        testdata::star_polygon(&mut rng, centre, n, (size * 0.3, size), mode & 1 != 0)
    } else {
        // A ring of 3..=34 vertices the bytes place freely (most are self-intersecting and
        // refused, which is checked too: refusal must not panic).
        let n = 3 + usize::from(mode % 32);
        let mut ring: Vec<LatLon> = (0..n)
            .map(|_| {
                let lat = (centre.lat + b.unit() * size).clamp(-90.0, 90.0);
                LatLon { lat, lon: crate::domain::geo::wrap_lon(centre.lon + b.unit() * size) }
            })
            .collect();
        ring.push(ring[0]);
        Polygon::new(&[ring]).ok()
    };
    let Some(polygon) = polygon else { return };
    let mut points = vec![polygon.anchor()];
    let exterior = polygon.unwrapped().exterior().0.clone();
    for ring in std::iter::once(&exterior).chain(polygon.unwrapped().interiors().iter().map(|r| &r.0)) {
        for w in ring.windows(2) {
            let (a, c) = (w[0], w[1]);
            let mid = ((a.x + c.x) / 2.0, (a.y + c.y) / 2.0);
            for (x, y) in [(a.x, a.y), mid, (mid.0 + 1e-9, mid.1), (mid.0, mid.1 - 1e-9)] {
                if let Some(p) = LatLon::new(y.clamp(-90.0, 90.0), crate::domain::geo::wrap_lon(x)) {
                    points.push(p);
                }
            }
        }
    }
    let [min_lon, min_lat, max_lon, max_lat] = polygon.bbox();
    while !b.0.is_empty() && points.len() < 4096 {
        let lon = min_lon + (max_lon - min_lon) * (b.unit() + 1.0) / 2.0;
        let lat = (min_lat + (max_lat - min_lat) * (b.unit() + 1.0) / 2.0).clamp(-90.0, 90.0);
        points.extend(LatLon::new(lat, crate::domain::geo::wrap_lon(lon)));
    }
    let campaigns = vec![Arc::new(testdata::campaign("c", vec![Shape::Polygon(polygon)]))];
    let index = FenceIndex::build(campaigns.clone());
    let mut out: Vec<Hit> = Vec::new();
    for p in points {
        out.clear();
        index.matches(p, &mut out);
        out.sort_unstable();
        assert_eq!(out, brute_force(&campaigns, p), "at {p:?}");
    }
}
