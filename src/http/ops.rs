//! Operations endpoints: `/healthz` (the process is up), `/readyz` (the store answers and the
//! index is loaded), `/metrics` (Prometheus text). None needs a token: probes and scrapers
//! carry none, and none of them reveals data.

use std::sync::OnceLock;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use serde_json::json;

use super::error::{ApiError, ErrorBody};
use super::AppState;
use crate::store::StoreError;

/// Histogram buckets (seconds) for every histogram: fine at the bottom for the ~100 ns match
/// time, coarse at the top for whole requests.
const BUCKETS: &[f64] = &[
    2.5e-8, 5e-8, 1e-7, 1.5e-7, 2e-7, 3e-7, 5e-7, 1e-6, 2e-6, 5e-6, 1e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3,
    1e-2, 2.5e-2, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// The process-wide Prometheus recorder's handle. `metrics` has one global recorder per process,
/// so it is installed once, however many servers the process runs (tests start dozens).
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new();
            let builder = match builder.set_buckets(BUCKETS) {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics buckets refused; using summaries");
                    PrometheusBuilder::new()
                }
            };
            let handle = match builder.install_recorder() {
                Ok(handle) => handle,
                Err(e) => {
                    // Another recorder owns the process (an embedding program): serve an empty
                    // page rather than fail to start.
                    tracing::warn!(error = %e, "a metrics recorder is already installed; /metrics will be empty");
                    PrometheusBuilder::new().build_recorder().handle()
                }
            };
            // The exporter leaves upkeep (draining histogram samples) to its owner.
            let upkeep = handle.clone();
            let spawned = std::thread::Builder::new().name("kabao-metrics-upkeep".into()).spawn(move || loop {
                std::thread::sleep(Duration::from_secs(5));
                upkeep.run_upkeep();
            });
            if let Err(e) = spawned {
                tracing::warn!(error = %e, "could not start metrics upkeep; /metrics runs it instead");
            }
            handle
        })
        .clone()
}

/// The process is up.
#[utoipa::path(get, path = "/healthz", tag = "operations", responses((status = 200, description = "Up")))]
pub async fn healthz() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

/// The store answers and the fence index is loaded.
#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses((status = 200, description = "Ready"), (status = 503, description = "Not ready", body = ErrorBody)))]
pub async fn readyz(State(state): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    if !state.engine.is_ready() {
        return Err(ApiError::Unavailable("the fence index is not loaded yet".into()));
    }
    match state.engine.store().health().await {
        Ok(()) => Ok(Json(json!({"status": "ready"}))),
        // API.md: a store that came back without its data is named as such in `/readyz` (the
        // reason carries no address or secret; the details are in the log).
        Err(StoreError::Lost(_)) => Err(ApiError::StoreLost),
        Err(e) => Err(e.into()),
    }
}

/// Prometheus text format.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus text exposition format", content_type = "text/plain")))]
pub async fn metrics(State(state): State<AppState>) -> Response {
    state.metrics.run_upkeep();
    (StatusCode::OK, [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], state.metrics.render())
        .into_response()
}
