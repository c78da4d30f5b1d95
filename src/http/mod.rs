//! The HTTP edge: axum routes, auth, limits and errors. Thin by design — each handler parses its
//! input into domain types, calls the engine or the store, and maps the outcome to API.md's
//! replies and status codes.
//!
//! | file | owns |
//! | --- | --- |
//! | `error.rs` | the error enum and its status/body mapping |
//! | `auth.rs` | admin token and client JWT, who may act for whom |
//! | `campaigns.rs`, `pings.rs`, `users.rs`, `coupons.rs`, `pushes.rs`, `ops.rs` | the endpoints |
//! | `openapi.rs` | `/openapi.json`, generated from the handlers' annotations |
//! | `serve.rs` | the accept loop: connection cap, header-read and idle timeouts, hyper's own error replies |
//! | `admission.rs` | rate limits, auth and the fair in-flight budget of the API routes |
//! | `rate_limit.rs` | token buckets behind the [`rate_limit::RateLimiter`] trait |
//!
//! Layers, outermost first: tracing → metrics → request head limits (431/414) → request
//! timeout → (API routes only) admission: rate limits, auth, `Content-Length` over the limit
//! (413), the in-flight budget that sheds with 429 → campaign-write bound. Bodies are read by
//! [`body_bytes`] at a minimum rate. Axum's own rejections and the unknown-route and
//! wrong-method answers all come out in the error format.

pub mod admission;
pub mod auth;
pub mod campaigns;
pub mod coupons;
pub mod error;
pub mod openapi;
pub mod ops;
pub mod pings;
pub mod pushes;
pub mod rate_limit;
pub mod schemas;
pub mod serve;
pub mod users;

use std::future::Future;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::Router;
use http_body_util::BodyExt;
use metrics_exporter_prometheus::PrometheusHandle;
use serde::de::DeserializeOwned;
use tokio::sync::Semaphore;

use crate::config::{Config, EdgeConfig, HttpConfig, RateLimitConfig};
use crate::engine::Engine;
use auth::Auth;
pub use error::ApiError;

/// What every handler can reach: one shared [`AppShared`], so a clone (every `State`
/// extractor and middleware of a request takes one) is a single reference count.
#[derive(Clone)]
pub struct AppState(Arc<AppShared>);

impl std::ops::Deref for AppState {
    type Target = AppShared;

    fn deref(&self) -> &AppShared {
        &self.0
    }
}

/// The parts of [`AppState`].
pub struct AppShared {
    /// Index, trigger rules and store.
    pub engine: Arc<Engine>,
    /// Who is calling.
    pub auth: Arc<Auth>,
    /// Body limits, in-flight bound, timeout.
    pub http: Arc<HttpConfig>,
    /// Connection, head and body-rate bounds.
    pub edge: Arc<EdgeConfig>,
    /// The rates of API.md's per-caller limits.
    pub rate_limits: Arc<RateLimitConfig>,
    /// The token buckets behind them (in memory for one node; shared for many).
    pub rate_limiter: Arc<dyn rate_limit::RateLimiter>,
    /// Requests, body bytes and pings in flight, in total and per caller.
    pub in_flight: Arc<admission::InFlight>,
    /// Permits for campaign writes in flight (see [`CAMPAIGN_WRITES_IN_FLIGHT`]).
    pub campaign_writes: Arc<Semaphore>,
    /// Renders `/metrics`.
    pub metrics: PrometheusHandle,
}

impl AppState {
    /// State for a server running `engine` with `config`'s secrets and limits.
    pub fn new(engine: Arc<Engine>, config: &Config) -> Self {
        Self::with_rate_limiter(engine, config, Arc::new(rate_limit::MemoryRateLimiter::default()))
    }

    /// State whose rate limits are kept by `rate_limiter` (e.g. one shared by several nodes).
    pub fn with_rate_limiter(
        engine: Arc<Engine>,
        config: &Config,
        rate_limiter: Arc<dyn rate_limit::RateLimiter>,
    ) -> Self {
        Self(Arc::new(AppShared {
            engine,
            auth: Arc::new(Auth::new(
                config.admin_token.clone(),
                &config.client_secret,
                config.client_secret_previous.as_ref(),
                &config.jwt,
            )),
            http: Arc::new(config.http.clone()),
            edge: Arc::new(config.edge.clone()),
            rate_limits: Arc::new(config.rate_limits.clone()),
            rate_limiter,
            in_flight: Arc::new(admission::InFlight::new(&config.http, &config.edge)),
            campaign_writes: Arc::new(Semaphore::new(CAMPAIGN_WRITES_IN_FLIGHT)),
            metrics: ops::metrics_handle(),
        }))
    }
}

/// Campaign writes (`POST`, `PUT`) read bodies of up to the campaign limit (128 MiB by default)
/// and the engine applies them one at a time anyway; bounding how many are read at once keeps a
/// burst of large campaigns from exhausting memory.
pub const CAMPAIGN_WRITES_IN_FLIGHT: usize = 4;

/// Every route of API.md, with its layers.
pub fn router(state: AppState) -> Router {
    let campaigns = Router::new()
        .route("/v1/campaigns", post(campaigns::create).get(campaigns::list))
        .route("/v1/campaigns/{id}", get(campaigns::get_one).put(campaigns::replace).delete(campaigns::delete))
        .route("/v1/campaigns/{id}/stats", get(campaigns::stats))
        .route("/v1/pushes/dead-letters", get(pushes::dead_letters))
        .route_layer(middleware::from_fn_with_state(state.clone(), shed_campaign_writes))
        .layer(DefaultBodyLimit::max(state.http.campaign_body_limit_bytes));
    let clients = Router::new()
        .route("/v1/pings", post(pings::ingest))
        .route("/v1/users/{user_id}/devices/{device_id}", put(users::put_device).delete(users::delete_device))
        .route("/v1/users/{user_id}", axum::routing::delete(users::erase_user))
        .route("/v1/users/{user_id}/coupons", get(users::wallet))
        .route("/v1/coupons/{coupon_id}/redeem", post(coupons::redeem))
        .layer(DefaultBodyLimit::max(state.http.ping_body_limit_bytes));
    // Probes and scrapes are not shed: an overloaded node must still say how it is.
    let api = campaigns.merge(clients).route_layer(middleware::from_fn_with_state(state.clone(), admission::admit));
    let ops = Router::new()
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .route("/metrics", get(ops::metrics))
        .route("/openapi.json", get(openapi::serve));
    api.merge(ops)
        .fallback(unknown_route)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), edge))
        .with_state(state)
}

/// The layers every route runs under, outermost first: tracing and metrics
/// ([`crate::telemetry::observe_request`]), the request head limits ([`check_head`]), the
/// request timeout. One middleware rather than three: each layer costs a boxed future and a
/// clone of the route's service on every request.
async fn edge(State(state): State<AppState>, request: Request, next: Next) -> Response {
    crate::telemetry::observe_request(request, |request| async move {
        if let Some(refusal) = check_head(&state.edge, &request) {
            return refusal;
        }
        time_out(state.http.request_timeout, next.run(request)).await
    })
    .await
}

async fn unknown_route() -> ApiError {
    ApiError::NotFound("no such route".into())
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

/// The refusal of a request whose head is over kabao's limits: a request target over
/// `max_uri_bytes` (414), more than `max_headers` headers or a head over `max_header_bytes`
/// (431).
fn check_head(edge: &EdgeConfig, request: &Request) -> Option<Response> {
    let target = request.uri().path_and_query().map_or(0, |p| p.as_str().len());
    if target > edge.max_uri_bytes {
        return Some(ApiError::UriTooLong.into_response());
    }
    let headers = request.headers();
    // Name, value, ": " and CRLF per line, as on the wire.
    let head_bytes = target + headers.iter().map(|(n, v)| n.as_str().len() + v.len() + 4).sum::<usize>();
    if headers.len() > edge.max_headers || head_bytes > edge.max_header_bytes {
        return Some(ApiError::HeadersTooLarge.into_response());
    }
    None
}

/// Refuses a campaign write with 429 `overloaded` when [`CAMPAIGN_WRITES_IN_FLIGHT`] are being
/// read or applied already.
async fn shed_campaign_writes(State(state): State<AppState>, request: Request, next: Next) -> Response {
    if request.method() != axum::http::Method::POST && request.method() != axum::http::Method::PUT {
        return next.run(request).await;
    }
    let Ok(_permit) = state.campaign_writes.clone().try_acquire_owned() else {
        metrics::counter!("kabao_http_shed_total").increment(1);
        return ApiError::Overloaded.into_response();
    };
    next.run(request).await
}

/// Abandons a request that takes longer than `request_timeout` with 503.
async fn time_out(request_timeout: std::time::Duration, response: impl Future<Output = Response>) -> Response {
    match tokio::time::timeout(request_timeout, response).await {
        Ok(response) => response,
        Err(_) => ApiError::Unavailable("request timed out".into()).into_response(),
    }
}

/// A JSON request body, parsed with API.md's error classification (not JSON or wrong types →
/// 400, overflowing numbers → 422), over the route's size limit → 413.
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned> FromRequest<AppState> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        let bytes = body_bytes(request, state).await?;
        Ok(JsonBody(parse_body(&bytes)?))
    }
}

/// Parses a whole body: [`crate::domain::error::classify`]'s mapping, and nothing but
/// whitespace after the value.
pub fn parse_body<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut de).map_err(crate::domain::error::classify)?;
    de.end().map_err(|e| ApiError::Malformed { message: e.to_string(), field: None })?;
    Ok(value)
}

/// Reads the body. Its `Content-Type` is not consulted: API.md says every body is JSON and
/// answers a body that is not with `400 malformed_json`, so a JSON body is read as JSON whatever
/// it is labelled (`fetch` labels a string body `text/plain`, `curl -d` form-urlencoded) and
/// anything else fails to parse as JSON, with a 400.
///
/// A declared `Content-Length` over the route's limit is refused before a byte is read (413),
/// and so is a body growing past it. The body must arrive at `body_min_bytes_per_s` once
/// `body_read_grace` is over (408 otherwise), so a client trickling bytes cannot hold its
/// share of the server for the whole request timeout. Bytes beyond the declared length (a
/// chunked body) are taken from the in-flight budget as they arrive.
pub async fn body_bytes(request: Request, state: &AppState) -> Result<Bytes, ApiError> {
    let limit = state.http.body_limit_for(request.uri().path());
    let declared = admission::content_length(&request);
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ApiError::PayloadTooLarge);
    }
    let ticket = request.extensions().get::<admission::TicketHandle>().cloned();
    let mut body = request.into_body();
    let started = tokio::time::Instant::now();
    let grace = state.edge.body_read_grace;
    let min_rate = state.edge.body_min_bytes_per_s.max(1) as f64;
    let mut bytes = Vec::with_capacity(declared.unwrap_or(0).min(64 * 1024) as usize);
    loop {
        // The deadline moves with every byte received: by `grace + n / min_rate` after the
        // start, `n` bytes must be in.
        let deadline = started + grace + std::time::Duration::from_secs_f64(bytes.len() as f64 / min_rate);
        let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
            Err(_) => {
                metrics::counter!("kabao_http_slow_bodies_total").increment(1);
                return Err(ApiError::RequestTimeout);
            }
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                return Err(ApiError::Malformed { message: format!("the body could not be read: {e}"), field: None })
            }
            Ok(Some(Ok(frame))) => frame,
        };
        let Ok(data) = frame.into_data() else { continue };
        if bytes.len() + data.len() > limit {
            return Err(ApiError::PayloadTooLarge);
        }
        if let Some(ticket) = &ticket {
            let beyond = (bytes.len() + data.len()) as u64;
            if beyond > ticket.0.bytes() {
                ticket.0.take_bytes(beyond - ticket.0.bytes())?;
            }
        }
        bytes.extend_from_slice(&data);
    }
    Ok(Bytes::from(bytes))
}

/// One path segment, taken verbatim (percent-decoded); its meaning is checked by the handler.
pub struct PathParams<T>(pub T);

impl<T: DeserializeOwned + Send> FromRequestParts<AppState> for PathParams<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|p| PathParams(p.0))
            // A path that does not decode names nothing that exists.
            .map_err(|r| ApiError::NotFound(r.body_text()))
    }
}
