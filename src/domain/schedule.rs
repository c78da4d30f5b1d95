//! When a campaign may issue: an absolute window plus weekly opening hours in an IANA timezone.

use chrono::{Datelike, TimeZone, Timelike};
use chrono_tz::Tz;

use super::error::FieldError;

/// A validated schedule (API.md "Hours" and "Defaults").
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    /// First millisecond of the window, inclusive; `None` = unbounded.
    pub starts_at_ms: Option<i64>,
    /// End of the window, exclusive; `None` = unbounded.
    pub ends_at_ms: Option<i64>,
    /// Timezone that `hours` are read in (UTC when absent).
    pub timezone: Tz,
    /// Whether the request named a timezone (so replies echo only what was given).
    pub timezone_given: bool,
    /// Opening hours; empty = always open.
    pub hours: Vec<Hours>,
}

impl Default for Schedule {
    fn default() -> Self {
        Self { starts_at_ms: None, ends_at_ms: None, timezone: Tz::UTC, timezone_given: false, hours: Vec::new() }
    }
}

/// One line of opening hours: on `days`, from `from` (inclusive) to `to` (exclusive), minutes of
/// the day. `from > to` wraps past midnight and belongs to the day of `from`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hours {
    /// Days the line applies to, bit 0 = Monday … bit 6 = Sunday.
    pub days: u8,
    /// Whether the request listed days (absent = every day).
    pub days_given: bool,
    /// Opening minute of the day, 0..1440.
    pub from_min: u16,
    /// Closing minute of the day, 0..=1440 (1440 is "24:00").
    pub to_min: u16,
}

/// All seven days.
pub const EVERY_DAY: u8 = 0b111_1111;

/// Day names as API.md spells them, Monday first.
pub const DAY_NAMES: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

impl Schedule {
    /// Is the campaign open at `ts_ms` (window and hours)?
    pub fn is_open(&self, ts_ms: i64) -> bool {
        if self.starts_at_ms.is_some_and(|s| ts_ms < s) || self.ends_at_ms.is_some_and(|e| ts_ms >= e) {
            return false;
        }
        if self.hours.is_empty() {
            return true;
        }
        let Some(local) = self.timezone.timestamp_millis_opt(ts_ms).single() else {
            return false;
        };
        let minute = (local.hour() * 60 + local.minute()) as u16;
        let today = local.weekday().num_days_from_monday() as u8;
        let yesterday = local.weekday().pred().num_days_from_monday() as u8;
        self.hours.iter().any(|h| h.covers(today, yesterday, minute))
    }
}

impl Hours {
    fn on(&self, day: u8) -> bool {
        self.days & (1 << day) != 0
    }

    fn covers(&self, today: u8, yesterday: u8, minute: u16) -> bool {
        if self.from_min <= self.to_min {
            self.on(today) && minute >= self.from_min && minute < self.to_min
        } else {
            // Wraps past midnight: the evening part belongs to today, the early part to yesterday.
            (self.on(today) && minute >= self.from_min) || (self.on(yesterday) && minute < self.to_min)
        }
    }

    /// Parses `"HH:MM"`; `allow_24` admits `"24:00"` (only as `to`).
    pub fn parse_time(field: &str, s: &str, allow_24: bool) -> Result<u16, FieldError> {
        let bad = || FieldError::new(field, "must be a time \"HH:MM\" (00:00 to 23:59, or 24:00 as `to`)");
        let b = s.as_bytes();
        if b.len() != 5 || b[2] != b':' || !b.iter().enumerate().all(|(i, c)| i == 2 || c.is_ascii_digit()) {
            return Err(bad());
        }
        let h = u16::from(b[0] - b'0') * 10 + u16::from(b[1] - b'0');
        let m = u16::from(b[3] - b'0') * 10 + u16::from(b[4] - b'0');
        match (h, m) {
            (24, 0) if allow_24 => Ok(1440),
            (0..=23, 0..=59) => Ok(h * 60 + m),
            _ => Err(bad()),
        }
    }

    /// Formats minutes of the day as `"HH:MM"`.
    pub fn format_time(min: u16) -> String {
        format!("{:02}:{:02}", min / 60, min % 60)
    }

    /// Parses a day name (`"mon"`..`"sun"`) into its bit.
    pub fn parse_day(field: &str, s: &str) -> Result<u8, FieldError> {
        DAY_NAMES
            .iter()
            .position(|d| *d == s)
            .map(|i| 1 << i)
            .ok_or_else(|| FieldError::new(field, "must be one of mon, tue, wed, thu, fri, sat, sun"))
    }
}

/// Resolves an IANA timezone name.
pub fn parse_timezone(field: &str, s: &str) -> Result<Tz, FieldError> {
    s.parse::<Tz>().map_err(|_| FieldError::new(field, format!("unknown IANA timezone {s:?}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule(tz: &str, days: u8, from: &str, to: &str) -> Schedule {
        Schedule {
            timezone: tz.parse().unwrap(),
            timezone_given: true,
            hours: vec![Hours {
                days,
                days_given: days != EVERY_DAY,
                from_min: Hours::parse_time("f", from, false).unwrap(),
                to_min: Hours::parse_time("t", to, true).unwrap(),
            }],
            ..Schedule::default()
        }
    }

    fn ms(rfc3339: &str) -> i64 {
        chrono::DateTime::parse_from_rfc3339(rfc3339).unwrap().timestamp_millis()
    }

    #[test]
    fn from_is_inclusive_and_to_exclusive() {
        let s = schedule("Asia/Shanghai", EVERY_DAY, "08:00", "22:00");
        assert!(!s.is_open(ms("2026-01-05T07:59:59+08:00")));
        assert!(s.is_open(ms("2026-01-05T08:00:00+08:00")));
        assert!(s.is_open(ms("2026-01-05T21:59:59+08:00")));
        assert!(!s.is_open(ms("2026-01-05T22:00:00+08:00")));
    }

    #[test]
    fn wrapping_hours_belong_to_the_day_of_from() {
        // Friday 22:00 to 02:00: open Friday night and the small hours of Saturday only.
        let s = schedule("UTC", 1 << 4, "22:00", "02:00");
        assert!(s.is_open(ms("2026-01-09T23:00:00Z"))); // Friday
        assert!(s.is_open(ms("2026-01-10T01:59:00Z"))); // Saturday early
        assert!(!s.is_open(ms("2026-01-10T23:00:00Z"))); // Saturday night
        assert!(!s.is_open(ms("2026-01-09T01:00:00Z"))); // Friday early belongs to Thursday
    }

    #[test]
    fn hours_follow_daylight_saving_time() {
        // New York 09:00–10:00 local: 14:00Z in winter, 13:00Z in summer.
        let s = schedule("America/New_York", EVERY_DAY, "09:00", "10:00");
        assert!(s.is_open(ms("2026-03-06T14:30:00Z")));
        assert!(!s.is_open(ms("2026-03-06T13:30:00Z")));
        assert!(s.is_open(ms("2026-03-09T13:30:00Z")));
        assert!(!s.is_open(ms("2026-03-09T14:30:00Z")));
    }

    #[test]
    fn to_24_00_runs_to_midnight() {
        let s = schedule("UTC", EVERY_DAY, "20:00", "24:00");
        assert!(s.is_open(ms("2026-01-05T23:59:59Z")));
        assert!(!s.is_open(ms("2026-01-06T00:00:00Z")));
    }

    #[test]
    fn window_is_half_open() {
        let s = Schedule { starts_at_ms: Some(100), ends_at_ms: Some(200), ..Schedule::default() };
        assert!(!s.is_open(99));
        assert!(s.is_open(100));
        assert!(s.is_open(199));
        assert!(!s.is_open(200));
    }
}
