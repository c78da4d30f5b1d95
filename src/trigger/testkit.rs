//! Builders shared by the trigger tests: campaigns of circle fences placed in metres around one
//! origin, pings at such places, and brute-force hits (every fence whose shape contains the ping).

use std::sync::Arc;

use crate::domain::{Campaign, CampaignId, Circle, Fence, FenceId, LatLon, Ping, Polygon, Shape, Trigger, UserId};

use super::{FenceHit, Outcome};

/// Origin of the test geometry (Shenzhen), degrees.
const ORIGIN: (f64, f64) = (22.5, 114.0);
/// Metres per degree of latitude on the contract's sphere.
const M_PER_DEG: f64 = 6_371_008.8 * std::f64::consts::PI / 180.0;

/// A place `north` and `east` metres from the origin.
pub fn at(north: f64, east: f64) -> LatLon {
    let lat = ORIGIN.0 + north / M_PER_DEG;
    let lon = ORIGIN.1 + east / (M_PER_DEG * ORIGIN.0.to_radians().cos());
    LatLon::new(lat, lon).expect("test positions are in range")
}

/// A circle fence `radius_m` around (`north`, `east`).
pub fn fence(id: &str, north: f64, east: f64, radius_m: f64) -> Fence {
    Fence {
        id: FenceId::parse("id", id).expect("valid fence id"),
        shape: Shape::Circle(Circle { center: at(north, east), radius_m }),
        rings: None,
    }
}

/// An axis-aligned square polygon fence of half-side `half_m` around (`north`, `east`); its anchor
/// (mean of the distinct outer vertices) is that centre.
pub fn square(id: &str, north: f64, east: f64, half_m: f64) -> Fence {
    let corner = |dn: f64, de: f64| at(north + dn * half_m, east + de * half_m);
    let ring = vec![corner(-1.0, -1.0), corner(-1.0, 1.0), corner(1.0, 1.0), corner(1.0, -1.0), corner(-1.0, -1.0)];
    Fence {
        id: FenceId::parse("id", id).expect("valid fence id"),
        shape: Shape::Polygon(Polygon::new(&[ring]).expect("a valid square")),
        rings: None,
    }
}

/// An active campaign of revision 1 with these fences.
pub fn campaign(id: &str, trigger: Trigger, fences: Vec<Fence>) -> Campaign {
    let id = CampaignId::parse("id", id).expect("valid campaign id");
    Campaign { trigger, revision: 1, ..Campaign::new(id, "t", fences) }
}

/// A ping of `user` at `place` and `ts_ms`, accurate, not mocked.
pub fn ping(user: &str, place: LatLon, ts_ms: i64) -> Ping {
    Ping {
        user_id: UserId::parse("user_id", user).expect("valid user id"),
        at: place,
        ts_ms,
        accuracy_m: None,
        speed_mps: None,
        mocked: false,
    }
}

/// Every fence of `campaigns` containing the ping, in campaign then fence order.
pub fn hits_of<'a>(campaigns: &'a [Arc<Campaign>], place: LatLon) -> Vec<FenceHit<'a>> {
    campaigns
        .iter()
        .flat_map(|campaign| {
            campaign.fences.iter().filter(|f| f.shape.contains(place)).map(move |fence| FenceHit { campaign, fence })
        })
        .collect()
}

/// A one-line summary of an outcome: the ignore reason, or `campaign:fence` per candidate
/// separated by spaces (empty when applied without candidates).
pub fn summary(outcome: &Outcome) -> String {
    match outcome {
        Outcome::Ignored(reason) => reason.as_str().to_owned(),
        Outcome::Applied { candidates } => {
            candidates.iter().map(|c| format!("{}:{}", c.campaign.id, c.fence_id)).collect::<Vec<_>>().join(" ")
        }
    }
}
