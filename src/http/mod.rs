//! The HTTP edge: axum routes, auth, limits and errors. Thin by design — each handler parses its
//! input into domain types, calls the engine or the store, and maps the outcome to API.md's
//! replies and status codes.
//!
//! | file | owns |
//! | --- | --- |
//! | `error.rs` | the error enum and its status/body mapping |
//! | `auth.rs` | admin token and client JWT, who may act for whom |
//! | `campaigns.rs`, `pings.rs`, `users.rs`, `coupons.rs`, `ops.rs` | the endpoints |
//! | `openapi.rs` | `/openapi.json`, generated from the handlers' annotations |
//!
//! Layers, outermost first: tracing → metrics → request timeout → (API routes only) in-flight
//! bound that sheds with 429 → per-route body limit. Axum's own rejections and the unknown-route
//! and wrong-method answers all come out in the error format.

pub mod auth;
pub mod campaigns;
pub mod coupons;
pub mod error;
pub mod openapi;
pub mod ops;
pub mod pings;
pub mod users;

use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, MatchedPath, Request, State};
use axum::http::request::Parts;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use serde::de::DeserializeOwned;
use tokio::sync::Semaphore;
use tower_http::trace::TraceLayer;

use crate::config::{Config, HttpConfig};
use crate::engine::Engine;
use auth::Auth;
pub use error::ApiError;

/// What every handler can reach. Cheap to clone (all shared).
#[derive(Clone)]
pub struct AppState {
    /// Index, trigger rules and store.
    pub engine: Arc<Engine>,
    /// Who is calling.
    pub auth: Arc<Auth>,
    /// Body limits, in-flight bound, timeout.
    pub http: Arc<HttpConfig>,
    /// Permits for requests in flight; none left means shed with 429.
    pub in_flight: Arc<Semaphore>,
    /// Permits for campaign writes in flight (see [`CAMPAIGN_WRITES_IN_FLIGHT`]).
    pub campaign_writes: Arc<Semaphore>,
    /// Renders `/metrics`.
    pub metrics: PrometheusHandle,
}

impl AppState {
    /// State for a server running `engine` with `config`'s secrets and limits.
    pub fn new(engine: Arc<Engine>, config: &Config) -> Self {
        Self {
            engine,
            auth: Arc::new(Auth::new(config.admin_token.clone(), &config.client_secret)),
            http: Arc::new(config.http.clone()),
            in_flight: Arc::new(Semaphore::new(config.http.max_in_flight)),
            campaign_writes: Arc::new(Semaphore::new(CAMPAIGN_WRITES_IN_FLIGHT)),
            metrics: ops::metrics_handle(),
        }
    }
}

/// Campaign writes (`POST`, `PUT`) read bodies of up to the campaign limit (16 MiB by default)
/// and the engine applies them one at a time anyway; bounding how many are read at once keeps a
/// burst of large campaigns from exhausting memory (`max_in_flight` × 16 MiB would not).
pub const CAMPAIGN_WRITES_IN_FLIGHT: usize = 4;

/// Every route of API.md, with its layers.
pub fn router(state: AppState) -> Router {
    let campaigns = Router::new()
        .route("/v1/campaigns", post(campaigns::create).get(campaigns::list))
        .route("/v1/campaigns/{id}", get(campaigns::get_one).put(campaigns::replace).delete(campaigns::delete))
        .route("/v1/campaigns/{id}/stats", get(campaigns::stats))
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
    let api = campaigns.merge(clients).route_layer(middleware::from_fn_with_state(state.clone(), shed_when_full));
    let ops = Router::new()
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .route("/metrics", get(ops::metrics))
        .route("/openapi.json", get(openapi::serve));
    api.merge(ops)
        .fallback(unknown_route)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), time_out))
        .layer(middleware::from_fn(record_metrics))
        .layer(TraceLayer::new_for_http())
        .with_state(state)
}

async fn unknown_route() -> ApiError {
    ApiError::NotFound("no such route".into())
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

/// Refuses a request with 429 `overloaded` when `max_in_flight` requests are already being
/// served, instead of queueing it behind them.
async fn shed_when_full(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let Ok(_permit) = state.in_flight.clone().try_acquire_owned() else {
        metrics::counter!("kabao_http_shed_total").increment(1);
        return ApiError::Overloaded.into_response();
    };
    next.run(request).await
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
async fn time_out(State(state): State<AppState>, request: Request, next: Next) -> Response {
    match tokio::time::timeout(state.http.request_timeout, next.run(request)).await {
        Ok(response) => response,
        Err(_) => ApiError::Unavailable("request timed out".into()).into_response(),
    }
}

/// Counts requests and their latency by route and status.
async fn record_metrics(request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let method = request.method().as_str().to_owned();
    let started = Instant::now();
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    metrics::histogram!("kabao_http_request_duration_seconds", "route" => route.clone(), "method" => method.clone())
        .record(started.elapsed().as_secs_f64());
    metrics::counter!("kabao_http_requests_total", "route" => route, "method" => method, "status" => status)
        .increment(1);
    response
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
pub async fn body_bytes(request: Request, state: &AppState) -> Result<Bytes, ApiError> {
    Bytes::from_request(request, state).await.map_err(|r| error::from_rejection(r.status(), r.body_text()))
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
