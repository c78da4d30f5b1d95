//! What the fake records ([`Received`]) and the faults it can be told to inject ([`Fault`]).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// One request the fake received, and what it answered.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Received {
    /// `"oauth"` (the token endpoint), `"fcm"` or `"apns"`.
    pub provider: String,
    /// HTTP method.
    pub method: String,
    /// Path and query as sent (percent-encoding kept).
    pub path: String,
    /// `"HTTP/1.1"` or `"HTTP/2.0"`.
    pub version: String,
    /// Every header, names lower-case (a repeated header keeps its last value).
    pub headers: BTreeMap<String, String>,
    /// The body: JSON as JSON, a form as an object of its fields, anything else as a string.
    pub body: serde_json::Value,
    /// The status the fake answered (0 when it dropped the connection).
    pub status: u16,
    /// When the request's head arrived: microseconds since the Unix epoch, system clock (before
    /// any injected delay). Tests read the spacing of retries from it, benchmarks latency.
    #[serde(default)]
    pub received_at_us: i64,
    /// Which TLS connection it came on: the fake numbers them from 1 as it accepts them.
    #[serde(default)]
    pub connection: u64,
}

/// What the fake keeps of each push it accepted under [`Record::Receipts`] (and
/// [`Record::Full`]): enough to measure, cheap to keep.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    /// `"fcm"` or `"apns"`.
    pub provider: String,
    /// The body's `coupon_id` (FCM: `message.data.coupon_id`).
    pub coupon_id: String,
    /// When the request's head arrived, as [`Received::received_at_us`].
    pub received_at_us: i64,
    /// As [`Received::connection`].
    pub connection: u64,
}

/// How much the fake keeps of what it receives (`kabao fake-push --record`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Record {
    /// Every request whole ([`Received`]: headers, body parsed) and a [`Receipt`] per accepted
    /// push: what tests read.
    #[default]
    Full,
    /// A [`Receipt`] per accepted push only: a load run's latencies without the cost of keeping
    /// every header and body.
    Receipts,
    /// Counts only ([`Stats`]).
    None,
}

/// Requests to one of the fake's endpoints.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointStats {
    /// Requests received.
    pub requests: u64,
    /// Answered with success.
    pub accepted: u64,
}

/// Counts the fake keeps whatever it records (`GET /_fake/stats`); never cleared.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    /// The record mode.
    pub record: Record,
    /// TLS connections accepted.
    pub connections: u64,
    /// The token endpoint.
    pub oauth: EndpointStats,
    /// FCM `messages:send`.
    pub fcm: EndpointStats,
    /// APNs.
    pub apns: EndpointStats,
}

/// A fault to inject: the next `times` requests to `provider` for device `token` get it instead
/// of (or, for a bare `delay_ms`, before) the normal answer.
///
/// On the wire (`POST /_fake/faults`):
/// `{"provider": "fcm", "token": "<device token or *>", "status": 429, "retry_after_s": 1, "times": 2}`.
/// `reason` is the FCM `errorCode` (`UNREGISTERED`) or the APNs `reason` (`BadDeviceToken`);
/// absent, each status gets the usual one (FCM 404 is `UNREGISTERED`, APNs 410 `Unregistered`).
/// `"drop": true` closes the connection (HTTP/2: resets the stream) without answering.
/// `"provider": "oauth"` with a 503 or a drop is "the token endpoint is down".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fault {
    /// `"fcm"`, `"apns"` or `"oauth"`.
    pub provider: String,
    /// The device token it applies to; `*` (the default) is every one.
    #[serde(default = "any_token")]
    pub token: String,
    /// Answer with this status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// FCM `errorCode` / APNs `reason` of the answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// A `Retry-After` header, seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_s: Option<u64>,
    /// Wait this long before answering (or dropping).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay_ms: Option<u64>,
    /// Close the connection instead of answering.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub drop: bool,
    /// How many requests it applies to; absent = every one until cleared.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub times: Option<u32>,
}

fn any_token() -> String {
    "*".into()
}

impl Fault {
    /// `provider` answers `status`, for every token, until cleared.
    pub fn status(provider: &str, status: u16) -> Self {
        Self {
            provider: provider.into(),
            token: any_token(),
            status: Some(status),
            reason: None,
            retry_after_s: None,
            delay_ms: None,
            drop: false,
            times: None,
        }
    }

    /// `provider` drops the connection.
    pub fn dropped(provider: &str) -> Self {
        Self { status: None, drop: true, ..Self::status(provider, 0) }
    }

    /// `provider` answers normally, but only after `ms` milliseconds.
    pub fn delayed(provider: &str, ms: u64) -> Self {
        Self { status: None, delay_ms: Some(ms), ..Self::status(provider, 0) }
    }

    /// With this FCM `errorCode` / APNs `reason`.
    pub fn reason(mut self, reason: &str) -> Self {
        self.reason = Some(reason.into());
        self
    }

    /// With a `Retry-After` of `seconds`.
    pub fn retry_after(mut self, seconds: u64) -> Self {
        self.retry_after_s = Some(seconds);
        self
    }

    /// Only for `token`.
    pub fn for_token(mut self, token: &str) -> Self {
        self.token = token.into();
        self
    }

    /// Only the next `n` matching requests.
    pub fn times(mut self, n: u32) -> Self {
        self.times = Some(n);
        self
    }

    /// Does this fault apply to a request to `provider` for device `token`?
    pub(super) fn matches(&self, provider: &str, token: Option<&str>) -> bool {
        self.provider == provider
            && self.times != Some(0)
            && (self.token == "*" || token.is_some_and(|t| t == self.token))
    }
}

/// The faults in force, applied first-injected first.
#[derive(Debug, Default)]
pub(super) struct Faults {
    list: Vec<Fault>,
}

impl Faults {
    /// Adds a fault.
    pub(super) fn push(&mut self, fault: Fault) {
        self.list.push(fault);
    }

    /// Removes every fault.
    pub(super) fn clear(&mut self) {
        self.list.clear();
    }

    /// The fault for this request, if any, counted as used.
    pub(super) fn take(&mut self, provider: &str, token: Option<&str>) -> Option<Fault> {
        let index = self.list.iter().position(|f| f.matches(provider, token))?;
        let fault = &mut self.list[index];
        let taken = fault.clone();
        if let Some(n) = fault.times.as_mut() {
            *n -= 1;
            if *n == 0 {
                self.list.remove(index);
            }
        }
        Some(taken)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_apply_first_injected_first_and_run_out() {
        let mut faults = Faults::default();
        faults.push(Fault::status("fcm", 429).for_token("a").times(2));
        faults.push(Fault::status("fcm", 500));
        assert_eq!(faults.take("apns", Some("a")), None);
        assert_eq!(faults.take("fcm", Some("a")).unwrap().status, Some(429));
        assert_eq!(faults.take("fcm", Some("b")).unwrap().status, Some(500));
        assert_eq!(faults.take("fcm", Some("a")).unwrap().status, Some(429));
        assert_eq!(faults.take("fcm", Some("a")).unwrap().status, Some(500), "the 429 ran out");
        faults.clear();
        assert_eq!(faults.take("fcm", Some("a")), None);
    }

    #[test]
    fn the_wire_form_reads_as_documented() {
        let f: Fault =
            serde_json::from_str(r#"{"provider":"fcm","token":"*","status":429,"retry_after_s":1,"times":2}"#).unwrap();
        assert_eq!(f, Fault::status("fcm", 429).retry_after(1).times(2));
        let f: Fault = serde_json::from_str(r#"{"provider":"oauth","drop":true}"#).unwrap();
        assert_eq!(f, Fault::dropped("oauth"));
    }
}
