//! Location pings as mobile clients send them.

use serde::Deserialize;
use serde_json::Number;

use super::error::{integer, number_in, objects_only, required, FieldError};
use super::geo::LatLon;
use super::ids::UserId;

/// One validated ping.
#[derive(Debug, Clone, PartialEq)]
pub struct Ping {
    /// Whose phone sent it.
    pub user_id: UserId,
    /// Where the phone was.
    pub at: LatLon,
    /// Event time, ms since the Unix epoch (the server's clock when the client gave none).
    pub ts_ms: i64,
    /// Reported horizontal accuracy in metres; `None` counts as accurate.
    pub accuracy_m: Option<f64>,
    /// Reported speed; informational only (rule 0 computes speed from positions).
    pub speed_mps: Option<f64>,
    /// The phone reports a mock location provider.
    pub mocked: bool,
}

/// A ping as it arrives on the wire, before validation.
#[derive(Debug, Deserialize)]
#[serde(remote = "Self")]
pub struct PingInput {
    user_id: Option<String>,
    lat: Option<f64>,
    lon: Option<f64>,
    ts_ms: Option<Number>,
    accuracy_m: Option<f64>,
    speed_mps: Option<f64>,
    mocked: Option<bool>,
}

objects_only!(PingInput);

/// The window of acceptable ping times around the server clock.
#[derive(Debug, Clone, Copy)]
pub struct PingClock {
    /// The server's clock, ms since the epoch.
    pub now_ms: i64,
    /// Oldest accepted age (`max_ping_age_s`), seconds.
    pub max_age_s: u64,
}

/// How far in the future a ping's `ts_ms` may be (API.md: now + 60 s).
pub const MAX_FUTURE_MS: i64 = 60_000;

impl PingInput {
    /// Validates the ping; errors name the member (`lat`, `ts_ms`, …).
    pub fn validate(self, clock: PingClock) -> Result<Ping, FieldError> {
        let user = required("user_id", self.user_id)?;
        let user_id = UserId::parse("user_id", &user)?;
        let lat = number_in("lat", required("lat", self.lat)?, -90.0, 90.0)?;
        let lon = number_in("lon", required("lon", self.lon)?, -180.0, 180.0)?;
        let oldest = clock.now_ms.saturating_sub((clock.max_age_s as i64).saturating_mul(1000));
        let newest = clock.now_ms + MAX_FUTURE_MS;
        let ts_ms = match &self.ts_ms {
            None => clock.now_ms,
            Some(n) => integer("ts_ms", n, i64::MIN, i64::MAX).and_then(|t| {
                if t < oldest || t > newest {
                    Err(FieldError::new(
                        "ts_ms",
                        format!("must be within [now - max_ping_age_s, now + 60 s] = [{oldest}, {newest}]"),
                    ))
                } else {
                    Ok(t)
                }
            })?,
        };
        let accuracy_m = self.accuracy_m.map(|a| number_in("accuracy_m", a, 0.0, f64::MAX)).transpose()?;
        let speed_mps = self.speed_mps.map(|s| number_in("speed_mps", s, 0.0, f64::MAX)).transpose()?;
        let at = LatLon::new(lat, lon).ok_or_else(|| FieldError::new("lat", "out of range"))?;
        Ok(Ping { user_id, at, ts_ms, accuracy_m, speed_mps, mocked: self.mocked.unwrap_or(false) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::error::{parse_json, InputError};

    const CLOCK: PingClock = PingClock { now_ms: 1_700_000_000_000, max_age_s: 86_400 };

    fn parse(json: &str) -> Result<Ping, InputError> {
        let input: PingInput = parse_json(json.as_bytes())?;
        Ok(input.validate(CLOCK)?)
    }

    fn field_of(json: &str) -> String {
        match parse(json) {
            Err(InputError::Invalid(e)) => e.field,
            other => panic!("expected an invalid field, got {other:?}"),
        }
    }

    #[test]
    fn a_full_ping_parses() {
        let p = parse(r#"{"user_id":"u","lat":22.5,"lon":114.0,"ts_ms":1700000000000,"accuracy_m":12.0,"speed_mps":1.2,"mocked":true}"#).unwrap();
        assert_eq!(p.ts_ms, 1_700_000_000_000);
        assert!(p.mocked);
    }

    #[test]
    fn absent_ts_is_the_server_clock() {
        assert_eq!(parse(r#"{"user_id":"u","lat":0,"lon":0}"#).unwrap().ts_ms, CLOCK.now_ms);
    }

    #[test]
    fn each_bad_value_names_its_field() {
        assert_eq!(field_of(r#"{"user_id":"","lat":0,"lon":0}"#), "user_id");
        assert_eq!(field_of(r#"{"user_id":"u","lat":90.5,"lon":0}"#), "lat");
        assert_eq!(field_of(r#"{"user_id":"u","lat":0,"lon":-180.01}"#), "lon");
        assert_eq!(field_of(r#"{"user_id":"u","lat":0}"#), "lon");
        assert_eq!(field_of(r#"{"user_id":"u","lat":0,"lon":0,"ts_ms":1.5}"#), "ts_ms");
        assert_eq!(field_of(r#"{"user_id":"u","lat":0,"lon":0,"ts_ms":1600000000000}"#), "ts_ms");
        assert_eq!(field_of(r#"{"user_id":"u","lat":0,"lon":0,"ts_ms":1700000060001}"#), "ts_ms");
        assert_eq!(field_of(r#"{"user_id":"u","lat":1e999,"lon":0}"#), "lat");
        assert_eq!(field_of(r#"{"user_id":"u","lat":0,"lon":0,"accuracy_m":-1}"#), "accuracy_m");
    }

    #[test]
    fn wrong_types_are_malformed() {
        assert!(matches!(parse(r#"{"user_id":"u","lat":"0","lon":0}"#), Err(InputError::Malformed { .. })));
        assert!(matches!(parse(r#"{"user_id":"u","lat":0"#), Err(InputError::Malformed { .. })));
    }
}
