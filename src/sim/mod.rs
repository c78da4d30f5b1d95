//! Simulated phones, shared by `kabao demo` and `kabao loadgen`: seeded walks between stops
//! (the demo's shoppers, laid out in event time ahead of a replay) and [`Mover`]s (the load
//! generator's users, stepped on the fly so each ping's `ts_ms` is the moment it is sent).
//!
//! Everything here is seeded: the same seed gives the same pings.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::domain::{haversine_m, LatLon, EARTH_RADIUS_M};

/// One ping of a simulated phone, as `POST /v1/pings` takes it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SimPing {
    /// Shopper id.
    pub user_id: String,
    /// Latitude.
    pub lat: f64,
    /// Longitude.
    pub lon: f64,
    /// Event time.
    pub ts_ms: i64,
    /// GPS accuracy the phone reports.
    pub accuracy_m: f64,
    /// Whether the phone reports a mock location provider.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub mocked: bool,
}

/// Seconds between two pings of a moving phone.
pub const PING_EVERY_S: f64 = 15.0;

/// The point `north_m` metres north and `east_m` metres east of `from` (flat-earth step, good
/// for the few hundred metres a phone moves between pings).
pub fn offset(from: LatLon, north_m: f64, east_m: f64) -> LatLon {
    let lat = (from.lat + (north_m / EARTH_RADIUS_M).to_degrees()).clamp(-89.9, 89.9);
    let lon = from.lon + (east_m / (EARTH_RADIUS_M * from.lat.to_radians().cos().max(0.01))).to_degrees();
    LatLon { lat, lon: crate::domain::geo::wrap_lon(lon) }
}

/// The point a fraction `t` of the way from `a` to `b` (in degrees; for short legs).
pub fn lerp(a: LatLon, b: LatLon, t: f64) -> LatLon {
    LatLon { lat: a.lat + (b.lat - a.lat) * t, lon: a.lon + (b.lon - a.lon) * t }
}

/// A shopper's day: start near a venue, visit it and a few venues nearby, lingering at each.
pub struct Walk<'a> {
    rng: &'a mut ChaCha8Rng,
    user_id: String,
    ts_ms: i64,
    at: LatLon,
    out: Vec<SimPing>,
}

impl<'a> Walk<'a> {
    /// The pings of one shopper leaving `start` at `ts_ms` and lingering at each stop in turn.
    pub fn route(
        rng: &'a mut ChaCha8Rng,
        user_id: String,
        ts_ms: i64,
        start: LatLon,
        stops: &[LatLon],
    ) -> Vec<SimPing> {
        let mut walk = Walk { rng, user_id, ts_ms, at: start, out: Vec::new() };
        walk.ping(start);
        for &stop in stops {
            walk.travel_to(stop);
            walk.linger();
        }
        walk.out
    }

    fn ping(&mut self, at: LatLon) {
        // Phones are noisy: a few metres of jitter, now and then a poor fix or a mock provider.
        let noisy = offset(at, self.rng.gen_range(-6.0..6.0), self.rng.gen_range(-6.0..6.0));
        let accuracy_m = if self.rng.gen_bool(0.03) { 250.0 } else { self.rng.gen_range(4.0..30.0) };
        let mocked = self.rng.gen_bool(0.005);
        self.out.push(SimPing {
            user_id: self.user_id.clone(),
            lat: noisy.lat,
            lon: noisy.lon,
            ts_ms: self.ts_ms,
            accuracy_m,
            mocked,
        });
        self.at = at;
        self.ts_ms += (PING_EVERY_S * 1000.0) as i64 + self.rng.gen_range(-2000..2000);
    }

    fn travel_to(&mut self, to: LatLon) {
        let d = haversine_m(self.at, to);
        // Walk short legs; take a ride (at most 60 pings) for long ones, well under 100 m/s.
        let speed = (d / (60.0 * PING_EVERY_S)).max(1.4);
        let steps = (d / (speed * PING_EVERY_S)).ceil().max(1.0) as usize;
        let from = self.at;
        for i in 1..=steps {
            self.ping(lerp(from, to, i as f64 / steps as f64));
        }
    }

    fn linger(&mut self) {
        let stay = self.rng.gen_range(4..25);
        let here = self.at;
        for _ in 0..stay {
            self.ping(here);
        }
    }
}

/// Shoppers wandering between random points of a bounding box (for the polygon campaigns).
pub fn wanderers(bbox: [f64; 4], n: usize, seed: u64, start_ms: i64, id_prefix: &str) -> Vec<SimPing> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let [min_lon, min_lat, max_lon, max_lat] = bbox;
    let mut pings = Vec::new();
    for s in 0..n {
        let point = |rng: &mut ChaCha8Rng| LatLon {
            lat: rng.gen_range(min_lat..=max_lat),
            lon: rng.gen_range(min_lon..=max_lon),
        };
        let start = point(&mut rng);
        let stops: Vec<LatLon> = (0..rng.gen_range(2..5)).map(|_| point(&mut rng)).collect();
        let ts_ms = start_ms + rng.gen_range(0..3_600_000);
        pings.extend(Walk::route(&mut rng, format!("{id_prefix}{s:05}"), ts_ms, start, &stops));
    }
    pings
}

/// A phone moving around a rectangle in real time: it walks (1.4 m/s) or drives (12 m/s) on a
/// heading that drifts and now and then turns, and bounces off the rectangle's edges. Each
/// [`Mover::step`] moves it by its speed times the event time since its previous ping, so its
/// pings are always plausible (rule 0) whatever rate they are sent at.
#[derive(Debug, Clone)]
pub struct Mover {
    /// Where it is.
    pub at: LatLon,
    /// `ts_ms` of its previous ping (0 before the first).
    pub last_ts_ms: i64,
    heading: f64,
    speed_mps: f64,
    /// `(min_lat, max_lat, min_lon, max_lon)`.
    area: (f64, f64, f64, f64),
}

impl Mover {
    /// A phone at a uniform random point of `area` (`(min_lat, max_lat, min_lon, max_lon)`);
    /// three in ten drive.
    pub fn new(rng: &mut impl Rng, area: (f64, f64, f64, f64)) -> Self {
        let at = LatLon { lat: rng.gen_range(area.0..=area.1), lon: rng.gen_range(area.2..=area.3) };
        let speed_mps = if rng.gen_bool(0.3) { 12.0 } else { 1.4 };
        Self { at, last_ts_ms: 0, heading: rng.gen_range(0.0..std::f64::consts::TAU), speed_mps, area }
    }

    /// The phone's next ping at event time `now_ms` (moved on from the previous one; its
    /// `ts_ms` is at least 1 ms after the previous, so pings of one phone never tie).
    pub fn step(&mut self, rng: &mut impl Rng, user_id: &str, now_ms: i64) -> SimPing {
        let ts_ms = if self.last_ts_ms == 0 { now_ms } else { now_ms.max(self.last_ts_ms + 1) };
        if self.last_ts_ms != 0 {
            let dt_s = (ts_ms - self.last_ts_ms) as f64 / 1000.0;
            self.heading += rng.gen_range(-0.3..0.3);
            if rng.gen_bool(0.01) {
                self.heading += std::f64::consts::FRAC_PI_2 * if rng.gen_bool(0.5) { 1.0 } else { -1.0 };
            }
            let d = self.speed_mps * dt_s;
            let mut next = offset(self.at, d * self.heading.cos(), d * self.heading.sin());
            let (min_lat, max_lat, min_lon, max_lon) = self.area;
            // Bounce: mirror the heading's component that would leave the rectangle.
            if !(min_lat..=max_lat).contains(&next.lat) {
                self.heading = std::f64::consts::PI - self.heading;
                next.lat = next.lat.clamp(min_lat, max_lat);
            }
            if !(min_lon..=max_lon).contains(&next.lon) {
                self.heading = -self.heading;
                next.lon = next.lon.clamp(min_lon, max_lon);
            }
            self.at = next;
        }
        self.last_ts_ms = ts_ms;
        SimPing {
            user_id: user_id.to_owned(),
            lat: self.at.lat,
            lon: self.at.lon,
            ts_ms,
            accuracy_m: rng.gen_range(4.0..30.0),
            mocked: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mover_stays_in_its_area_at_a_plausible_speed() {
        let area = (39.7, 40.1, 116.1, 116.7);
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let mut mover = Mover::new(&mut rng, area);
        let mut previous: Option<SimPing> = None;
        for i in 0..5_000 {
            // Uneven gaps, and several pings in the same millisecond.
            let now = 1_700_000_000_000 + i * 700 / 3;
            let ping = mover.step(&mut rng, "u", now);
            assert!((area.0..=area.1).contains(&ping.lat) && (area.2..=area.3).contains(&ping.lon));
            if let Some(p) = &previous {
                assert!(ping.ts_ms > p.ts_ms);
                let d = haversine_m(LatLon { lat: p.lat, lon: p.lon }, LatLon { lat: ping.lat, lon: ping.lon });
                let speed = d / ((ping.ts_ms - p.ts_ms) as f64 / 1000.0);
                assert!(speed < 13.0, "{speed} m/s");
            }
            previous = Some(ping);
        }
    }
}
