//! Logs: the subscriber (text or JSON lines), the span every HTTP request runs in, and the one
//! form in which a user id may appear in a log line.
//!
//! Metrics are written where they are measured (`metrics::counter!` and friends); this module is
//! about what a person or a log pipeline reads.

use std::fmt::Write;
use std::io::IsTerminal;
use std::sync::OnceLock;
use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::Response;
use clap::ValueEnum;
use ring::hmac;
use tracing::Instrument;
use tracing_subscriber::EnvFilter;

use crate::domain::UserId;

/// How log lines are written (to stderr).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines (coloured on a terminal).
    #[default]
    Text,
    /// One JSON object per line, with the current span's fields: for log pipelines.
    Json,
}

/// Installs the process's log subscriber: `RUST_LOG` when set, else `default_level`.
pub fn init_logs(format: LogFormat, default_level: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    // Logs go to stderr; stdout carries only the announcements (port, generated token).
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => builder.json().with_current_span(true).with_span_list(false).init(),
    }
}

/// The key of [`user_hash`]; see [`set_user_hash_key`].
static USER_HASH_KEY: OnceLock<hmac::Key> = OnceLock::new();

/// Keys [`user_hash`] with `secret` (kabao passes its client secret, which every node of a
/// deployment shares, so one user hashes alike on every node and a log search can follow them).
/// Only the first call counts; without one, the key is random per process.
pub fn set_user_hash_key(secret: &[u8]) {
    // Derived, not the secret itself: the hashes must not help anyone guess the secret.
    let derived = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, secret), b"kabao user hash v1");
    let _ = USER_HASH_KEY.set(hmac::Key::new(hmac::HMAC_SHA256, derived.as_ref()));
}

/// A user id as logs may show it: 16 hex digits of a keyed hash (HMAC-SHA256), never the id.
/// Keyed, because user ids are often guessable (phone numbers, account numbers): an unkeyed hash
/// of one is found again by hashing the candidates.
pub fn user_hash(user: &UserId) -> String {
    let key = USER_HASH_KEY.get_or_init(|| {
        let mut random = [0u8; 32];
        // A failing system RNG leaves the zero key: the hashes are then only unkeyed.
        let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut random);
        hmac::Key::new(hmac::HMAC_SHA256, &random)
    });
    let tag = hmac::sign(key, user.as_str().as_bytes());
    let mut hex = String::with_capacity(16);
    for b in &tag.as_ref()[..8] {
        // Writing to a String cannot fail.
        let _ = write!(hex, "{b:02x}");
    }
    hex
}

/// The middleware every route runs under: a `request` span (route template, method; status and
/// latency recorded when the answer is ready) around the handler, a `debug` line per request, a
/// `warn` line per `5xx`, and the request metrics (`kabao_http_requests_total`,
/// `kabao_http_request_duration_seconds`).
///
/// The route is the matched template (`/v1/users/{user_id}/coupons`), never the path: paths carry
/// user ids.
pub async fn observe_request(request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let method = request.method().as_str().to_owned();
    let span = tracing::info_span!(
        "request",
        route = %route,
        method = %method,
        status = tracing::field::Empty,
        latency_ms = tracing::field::Empty
    );
    let started = Instant::now();
    let response = next.run(request).instrument(span.clone()).await;
    let elapsed = started.elapsed();
    let status = response.status().as_u16();
    span.record("status", status);
    span.record("latency_ms", elapsed.as_secs_f64() * 1000.0);
    span.in_scope(|| {
        if response.status().is_server_error() {
            tracing::warn!("request failed");
        } else {
            tracing::debug!("request");
        }
    });
    metrics::histogram!("kabao_http_request_duration_seconds", "route" => route.clone(), "method" => method.clone())
        .record(elapsed.as_secs_f64());
    metrics::counter!("kabao_http_requests_total", "route" => route, "method" => method, "status" => status.to_string())
        .increment(1);
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_user_hash_is_short_stable_and_not_the_id() {
        let user = UserId::parse("u", "phone-13800138000").unwrap();
        let hash = user_hash(&user);
        assert_eq!(hash.len(), 16);
        assert!(hash.chars().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(hash, user_hash(&user));
        assert_ne!(hash, user_hash(&UserId::parse("u", "phone-13800138001").unwrap()));
        assert!(!hash.contains("13800138000"));
    }
}
