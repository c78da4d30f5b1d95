//! Logs and traces: the subscriber (text or JSON lines on stderr, and optionally the request
//! spans exported over OTLP), the span every HTTP request runs in, and the one form in which a
//! user id may appear in a log line or a span.
//!
//! Metrics are written where they are measured (`metrics::counter!` and friends); this module is
//! about what a person, a log pipeline or a trace backend reads.

use std::fmt::Write;
use std::future::Future;
use std::io::IsTerminal;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::extract::{MatchedPath, Request};
use axum::response::Response;
use clap::ValueEnum;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry::KeyValue;
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use ring::hmac;
use tracing::Instrument;
use tracing_subscriber::filter::{EnvFilter, LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, Registry};

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

/// The OTLP path of traces, appended to an endpoint given without it.
const TRACES_PATH: &str = "/v1/traces";

/// Deadline of one export request to the collector.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the exporter gets at exit to send the spans it still holds.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// What [`init`] started that must be stopped at exit: the OTLP exporter, when there is one.
#[must_use = "call `shutdown` at exit, or the last spans are lost"]
pub struct Telemetry {
    tracer_provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Exports the spans still queued and stops the exporter (a no-op without one). Call it once
    /// the work is done (after a graceful shutdown has drained the requests).
    pub async fn shutdown(self) {
        let Some(provider) = self.tracer_provider else { return };
        // The SDK's shutdown blocks its thread until the batch task (on this runtime) is done.
        let flushed = tokio::task::spawn_blocking(move || provider.shutdown_with_timeout(FLUSH_TIMEOUT)).await;
        match flushed {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "could not flush the last spans to the OTLP endpoint"),
            Err(e) => tracing::warn!(error = %e, "could not flush the last spans to the OTLP endpoint"),
        }
    }
}

/// Installs the process's subscriber: log lines on stderr in `format` (`RUST_LOG` when set, else
/// `default_level`), and, with `otlp_endpoint` (e.g. `http://127.0.0.1:4318`), kabao's own spans
/// at `info` and above exported over OTLP/HTTP (protobuf) whatever the log level: the `request`
/// span of every HTTP request and the handlers' spans under it. Must run on the Tokio runtime
/// (the exporter's batch task runs there).
pub fn init(format: LogFormat, default_level: &str, otlp_endpoint: Option<&str>) -> anyhow::Result<Telemetry> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    // Logs go to stderr; stdout carries only the announcements (port, generated token).
    let logs: Box<dyn Layer<Registry> + Send + Sync> = match format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::stderr().is_terminal())
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .boxed(),
    };
    let tracer_provider = otlp_endpoint.map(tracer_provider).transpose()?;
    let logs = tracing_subscriber::registry().with(logs.with_filter(filter));
    match &tracer_provider {
        // Two arms rather than an `Option` layer: without OTLP the subscriber is exactly the
        // logs' (its level filter decides which callsites are ever built).
        None => logs.try_init()?,
        Some(provider) => logs
            .with(
                tracing_opentelemetry::layer()
                    .with_tracer(provider.tracer("kabao"))
                    // Only kabao's spans: those of the HTTP client and the SDK would include the
                    // exporter's own requests, each exported in turn.
                    .with_filter(Targets::new().with_target("kabao", LevelFilter::INFO)),
            )
            .try_init()?,
    }
    Ok(Telemetry { tracer_provider })
}

/// The tracer provider exporting to `endpoint`: service `kabao` with its version, spans batched
/// on the Tokio runtime.
fn tracer_provider(endpoint: &str) -> anyhow::Result<SdkTracerProvider> {
    let endpoint = traces_url(endpoint);
    let client = reqwest::Client::builder().timeout(EXPORT_TIMEOUT).build().context("building the OTLP client")?;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
        .with_endpoint(endpoint.clone())
        .with_timeout(EXPORT_TIMEOUT)
        .with_http_client(OtlpClient(client))
        .build()
        .with_context(|| format!("configuring the OTLP exporter for {endpoint}"))?;
    let resource = Resource::builder()
        .with_service_name("kabao")
        .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
        .build();
    let processor = BatchSpanProcessor::builder(exporter, opentelemetry_sdk::runtime::Tokio).build();
    Ok(SdkTracerProvider::builder().with_resource(resource).with_span_processor(processor).build())
}

/// `endpoint` with the traces path: `http://collector:4318` → `http://collector:4318/v1/traces`
/// (as `OTEL_EXPORTER_OTLP_ENDPOINT` is read); a URL already ending in it is kept.
fn traces_url(endpoint: &str) -> String {
    let base = endpoint.trim().trim_end_matches('/');
    if base.ends_with(TRACES_PATH) {
        base.to_owned()
    } else {
        format!("{base}{TRACES_PATH}")
    }
}

/// The exporter's HTTP client: the reqwest client kabao already builds (rustls, HTTP/2), so
/// that OTLP adds no second HTTP stack. Failures are logged here, with the collector's answer.
#[derive(Debug)]
struct OtlpClient(reqwest::Client);

#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for OtlpClient {
    async fn send_bytes(
        &self,
        request: opentelemetry_http::Request<bytes::Bytes>,
    ) -> Result<opentelemetry_http::Response<bytes::Bytes>, opentelemetry_http::HttpError> {
        let sent = async {
            let response = self.0.execute(request.try_into()?).await?;
            let status = response.status();
            let headers = response.headers().clone();
            let body = response.bytes().await?;
            let mut answer = opentelemetry_http::Response::builder().status(status).body(body)?;
            *answer.headers_mut() = headers;
            Ok::<_, opentelemetry_http::HttpError>(answer)
        };
        match sent.await {
            Ok(answer) if !answer.status().is_success() => {
                let body = String::from_utf8_lossy(answer.body());
                tracing::warn!(status = answer.status().as_u16(), body = %body.chars().take(200).collect::<String>(), "the OTLP endpoint refused spans");
                Ok(answer)
            }
            Ok(answer) => Ok(answer),
            Err(e) => {
                tracing::warn!(error = %e, "cannot export spans to the OTLP endpoint");
                Err(e)
            }
        }
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
    user_hash_of(user.as_str())
}

/// [`user_hash`] of an id not (yet) checked against the id rule, e.g. a URL path segment.
pub fn user_hash_of(user: &str) -> String {
    let key = USER_HASH_KEY.get_or_init(|| {
        let mut random = [0u8; 32];
        // A failing system RNG leaves the zero key: the hashes are then only unkeyed.
        let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut random);
        hmac::Key::new(hmac::HMAC_SHA256, &random)
    });
    let tag = hmac::sign(key, user.as_bytes());
    let mut hex = String::with_capacity(16);
    for b in &tag.as_ref()[..8] {
        // Writing to a String cannot fail.
        let _ = write!(hex, "{b:02x}");
    }
    hex
}

/// What every route runs under (called by the router's outermost middleware with the rest of
/// the request as `inner`): a `request` span (route template, method, the user's
/// [`user_hash`] where the path names a user; status and latency recorded when the answer is
/// ready) around the handler, a `debug` line per request, a `warn` line per `5xx`, and the
/// request metrics (`kabao_http_requests_total`, `kabao_http_request_duration_seconds`).
///
/// The route is the matched template (`/v1/users/{user_id}/coupons`), never the path: paths carry
/// user ids. A client token's user is recorded by the admission layer ([`record_user`]).
pub async fn observe_request<F, R>(request: Request, inner: F) -> Response
where
    F: FnOnce(Request) -> R,
    R: Future<Output = Response>,
{
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
        user_hash = tracing::field::Empty,
        status = tracing::field::Empty,
        latency_ms = tracing::field::Empty
    );
    if let Some(user) = path_param(&route, request.uri().path(), "user_id") {
        span.record("user_hash", user_hash_of(&user));
    }
    let started = Instant::now();
    let response = inner(request).instrument(span.clone()).await;
    let elapsed = started.elapsed();
    let status = response.status().as_u16();
    // As i64: tracing-opentelemetry exports a u64 as a string.
    span.record("status", i64::from(status));
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

/// Records `user` (as [`user_hash`]) on the current `request` span; called where a request's
/// user becomes known other than by its path (a client token). A no-op outside a request span.
pub fn record_user(user: &UserId) {
    tracing::Span::current().record("user_hash", user_hash(user));
}

/// The segment of `path` standing where `template` (axum's `/a/{name}/b`) has `{name}`,
/// percent-decoded as axum's `Path` decodes it.
fn path_param(template: &str, path: &str, name: &str) -> Option<String> {
    let wanted = format!("{{{name}}}");
    let at = template.split('/').position(|segment| segment == wanted)?;
    let raw = path.split('/').nth(at)?;
    Some(percent_encoding::percent_decode_str(raw).decode_utf8_lossy().into_owned())
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
        assert_eq!(hash, user_hash_of("phone-13800138000"));
    }

    #[test]
    fn the_user_of_a_path_is_found_by_its_template() {
        let route = "/v1/users/{user_id}/devices/{device_id}";
        assert_eq!(path_param(route, "/v1/users/a%20b/devices/d", "user_id").as_deref(), Some("a b"));
        assert_eq!(path_param(route, "/v1/users/u/devices/d", "device_id").as_deref(), Some("d"));
        assert_eq!(path_param("/v1/pings", "/v1/pings", "user_id"), None);
    }

    #[test]
    fn the_traces_path_is_added_once() {
        assert_eq!(traces_url("http://127.0.0.1:4318"), "http://127.0.0.1:4318/v1/traces");
        assert_eq!(traces_url("http://c:4318/"), "http://c:4318/v1/traces");
        assert_eq!(traces_url("https://c/otlp/v1/traces"), "https://c/otlp/v1/traces");
    }
}
