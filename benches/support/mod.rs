//! Code shared by the benches that compare kabao with other ways of matching.

use std::sync::Arc;

use kabao::domain::geo::{LatLon, Shape, EARTH_RADIUS_M};
use kabao::domain::Campaign;
use kabao::spatial::Hit;
use rstar::primitives::{GeomWithData, Rectangle};
use rstar::{RTree, AABB};

/// PERFORMANCE.md's baseline: fence bounding boxes in an rstar `bulk_load` R-tree, an envelope
/// query at the ping, then the exact test (`Shape::contains`) on each candidate.
pub struct Baseline {
    tree: RTree<GeomWithData<Rectangle<[f64; 2]>, Hit>>,
    campaigns: Vec<Arc<Campaign>>,
}

impl Baseline {
    /// The tree over every fence of `campaigns`; hits name the same slots as `FenceIndex`.
    pub fn build(campaigns: &[Arc<Campaign>]) -> Self {
        let mut items = Vec::new();
        for (ci, c) in campaigns.iter().enumerate() {
            for (fi, f) in c.fences.iter().enumerate() {
                let hit = Hit { campaign: ci as u32, fence: fi as u32 };
                let [x0, y0, x1, y1] = bbox(&f.shape);
                items.push(GeomWithData::new(Rectangle::from_corners([x0, y0], [x1, y1]), hit));
            }
        }
        Self { tree: RTree::bulk_load(items), campaigns: campaigns.to_vec() }
    }

    /// Appends every fence containing `p` to `out` (in no particular order).
    pub fn matches(&self, p: LatLon, out: &mut Vec<Hit>) {
        let env = AABB::from_point([p.lon, p.lat]);
        for item in self.tree.locate_in_envelope_intersecting(&env) {
            let h = item.data;
            // For circles this is exactly the haversine test (`Circle::contains`).
            if self.campaigns[h.campaign as usize].fences[h.fence as usize].shape.contains(p) {
                out.push(h);
            }
        }
    }
}

/// `[min_lon, min_lat, max_lon, max_lat]` holding the shape: a polygon's own box; for a circle a
/// box 0.1 % wider than its extent (the bench areas are far from the poles and ±180, where a
/// lon/lat box of a circle needs more care).
pub fn bbox(shape: &Shape) -> [f64; 4] {
    match shape {
        Shape::Circle(c) => {
            let dlat = (c.radius_m / EARTH_RADIUS_M).to_degrees() * 1.001;
            let dlon = dlat / c.center.lat.to_radians().cos();
            [c.center.lon - dlon, c.center.lat - dlat, c.center.lon + dlon, c.center.lat + dlat]
        }
        Shape::Polygon(p) => p.bbox(),
    }
}
