//! The demo's campaigns (built from the shipped data) and its shoppers (generated, seeded).

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};

use super::data::Place;
use crate::domain::{haversine_m, LatLon};
use crate::sim::{offset, SimPing, Walk};

/// One campaign the demo registers, built from a slice of the places.
pub struct CampaignPlan {
    /// The campaign document to POST.
    pub doc: Value,
    /// How many fences it has (for the summary).
    pub fences: usize,
}

fn circle_fences(places: &[&Place], radius_m: f64) -> Vec<Value> {
    places
        .iter()
        .map(|p| json!({"id": p.id, "type": "circle", "center": [p.at.lon, p.at.lat], "radius_m": radius_m}))
        .collect()
}

/// Campaigns over the places by category, plus polygon campaigns over the shipped outlines.
pub fn campaigns(
    places: &[Place],
    tsinghua: &[Vec<Vec<[f64; 2]>>],
    beijing: &[Vec<Vec<[f64; 2]>>],
) -> Vec<CampaignPlan> {
    let in_category = |c: &str| places.iter().filter(|p| p.category == c).collect::<Vec<_>>();
    let mut plans = Vec::new();
    let mut push = |doc: Value| {
        let fences = doc["fences"].as_array().map_or(0, Vec::len);
        plans.push(CampaignPlan { doc, fences });
    };
    push(json!({
        "id": "coffee-20-off", "name": "20% off any coffee",
        "merchant": {"id": "dining-group", "name": "Dining & Drinking venues"},
        "coupon": {"title": "20% off coffee", "body": "Show this at the counter", "valid_for_s": 86400},
        "fences": circle_fences(&in_category("Dining and Drinking"), 120.0),
        "trigger": {"on": "enter"},
        "caps": {"per_user_cooldown_s": 86400, "per_user_max": 1, "total_max": 0}
    }));
    push(json!({
        "id": "retail-browse", "name": "Browse two minutes, get 10 off",
        "merchant": {"id": "retail-group"},
        "coupon": {"title": "10 off your next purchase", "body": "Thanks for stopping by", "valid_for_s": 3600},
        "fences": circle_fences(&in_category("Retail"), 80.0),
        "trigger": {"on": "dwell", "dwell_s": 120},
        "caps": {"per_user_cooldown_s": 3600, "per_user_max": 3}
    }));
    push(json!({
        "id": "pharmacy-vip", "name": "VIP health check",
        "merchant": {"id": "health-group"},
        "coupon": {"title": "Free health check for VIPs"},
        "fences": circle_fences(&in_category("Health and Medicine"), 100.0),
        "audience": {"tags_any": ["vip"]}
    }));
    push(json!({
        "id": "commuter-breakfast", "name": "Commuter breakfast deal",
        "merchant": {"id": "transit-kiosks"},
        "coupon": {"title": "Breakfast combo 5 off", "valid_for_s": 7200},
        "fences": circle_fences(&in_category("Travel and Transportation"), 150.0),
        "schedule": {"timezone": "UTC", "hours": [{"from": "06:00", "to": "23:00"}]}
    }));
    push(json!({
        "id": "landmark-first-200", "name": "First 200 visitors",
        "merchant": {"id": "city-tourism"},
        "coupon": {"title": "Free audio guide"},
        "fences": circle_fences(&in_category("Landmarks and Outdoors"), 200.0),
        "caps": {"total_max": 200, "per_user_max": 1}
    }));
    let polygon_fences = |name: &str, rings: &[Vec<Vec<[f64; 2]>>]| {
        rings
            .iter()
            .enumerate()
            .map(|(i, r)| json!({"id": format!("{name}-{i}"), "type": "polygon", "coordinates": r}))
            .collect::<Vec<_>>()
    };
    push(json!({
        "id": "tsinghua-canteen", "name": "Campus canteen welcome",
        "merchant": {"id": "tsinghua-canteens"},
        "coupon": {"title": "Free drink at any canteen", "valid_for_s": 43200},
        "fences": polygon_fences("tsinghua", tsinghua),
        "trigger": {"on": "enter"}
    }));
    push(json!({
        "id": "beijing-visitor", "name": "Welcome to Beijing",
        "merchant": {"id": "beijing-tourism"},
        "coupon": {"title": "Museum pass discount", "valid_for_s": 604800},
        "fences": polygon_fences("beijing", beijing),
        "trigger": {"on": "dwell", "dwell_s": 600},
        "caps": {"per_user_max": 1}
    }));
    plans
}

/// `n` shoppers around the given venues, seeded; pings start in `[start_ms, start_ms + 1 h)`.
pub fn shoppers(places: &[Place], n: usize, seed: u64, start_ms: i64, id_prefix: &str) -> Vec<SimPing> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut pings = Vec::new();
    if places.is_empty() {
        return pings;
    }
    for s in 0..n {
        let home = &places[rng.gen_range(0..places.len())];
        let mut nearby: Vec<(f64, &Place)> = places
            .iter()
            .filter(|p| p.id != home.id)
            .map(|p| (haversine_m(home.at, p.at), p))
            .filter(|(d, _)| *d < 30_000.0)
            .collect();
        nearby.sort_by(|a, b| a.0.total_cmp(&b.0));
        let stops: Vec<LatLon> =
            std::iter::once(home.at).chain(nearby.iter().take(rng.gen_range(1..5)).map(|(_, p)| p.at)).collect();
        let bearing: f64 = rng.gen_range(0.0..std::f64::consts::TAU);
        let start = offset(home.at, 400.0 * bearing.cos(), 400.0 * bearing.sin());
        let ts_ms = start_ms + rng.gen_range(0..3_600_000);
        pings.extend(Walk::route(&mut rng, format!("{id_prefix}{s:05}"), ts_ms, start, &stops));
    }
    pings
}
