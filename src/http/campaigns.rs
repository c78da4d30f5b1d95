//! `/v1/campaigns`: create, list, read, replace, delete, stats (admin only).
//!
//! A campaign is validated whole before anything is stored, so a refused request changes
//! nothing; the engine stores it and makes it visible to matching in one step.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use rand::Rng;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::auth::Admin;
use super::error::{ApiError, ErrorBody};
use super::schemas::CampaignRequest;
use super::{AppState, JsonBody, PathParams};
use crate::domain::{CampaignDoc, CampaignId};
use crate::engine::now_ms;
use crate::store::StoreError;

/// Page size when `limit` is absent.
pub const DEFAULT_PAGE: usize = 100;
/// Largest `limit`.
pub const MAX_PAGE: usize = 1000;

/// A fresh campaign id: time-ordered (so listings of generated ids follow creation order) with
/// random bits so two nodes never pick the same one.
fn generate_id() -> CampaignId {
    let id = format!("cmp_{:011x}{:08x}", now_ms(), rand::thread_rng().gen::<u32>());
    CampaignId::parse("id", &id).expect("`cmp_` and hex digits always make a valid id")
}

/// Create a campaign.
#[utoipa::path(post, path = "/v1/campaigns", tag = "campaigns",
    request_body = CampaignRequest,
    responses(
        (status = 201, description = "The stored campaign", body = CampaignRequest),
        (status = 422, body = ErrorBody),
        (status = 409, description = "Campaign id taken", body = ErrorBody),
        (status = 400, body = ErrorBody), (status = 408, description = "Body too slow", body = ErrorBody), (status = 413, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 429, description = "Rate limited or overloaded", body = ErrorBody), (status = 503, body = ErrorBody)),
    security(("bearer" = [])))]
#[tracing::instrument(skip_all)]
pub async fn create(
    _: Admin,
    State(state): State<AppState>,
    JsonBody(doc): JsonBody<CampaignDoc>,
) -> Result<Response, ApiError> {
    let campaign = doc.validate(generate_id)?;
    let id = campaign.id.clone();
    let stored = state.engine.create_campaign(campaign).await.map_err(|e| match e {
        StoreError::Conflict => ApiError::Conflict(format!("campaign id {:?} is taken", id.as_str())),
        other => other.into(),
    })?;
    tracing::info!(campaign_id = %id, fences = stored.fences.len(), "campaign created");
    let mut response = (StatusCode::CREATED, Json(stored.to_doc())).into_response();
    if let Ok(location) = HeaderValue::from_str(&format!("/v1/campaigns/{id}")) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    Ok(response)
}

/// `?limit=&after=`, read as text so a bad value is a 422 naming it.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Page size, 1..=1000 (default 100).
    #[param(value_type = Option<u32>)]
    limit: Option<String>,
    /// The last id of the previous page; the page starts after it in id order.
    after: Option<String>,
}

/// A page of campaigns.
#[derive(Debug, Serialize, ToSchema)]
pub struct CampaignPage {
    /// Campaigns sorted by id.
    #[schema(value_type = Vec<Object>)]
    pub campaigns: Vec<CampaignDoc>,
    /// The id to pass as `after` for the next page; `null` when no campaign follows.
    pub next_after: Option<String>,
}

/// List campaigns, sorted by id.
#[utoipa::path(get, path = "/v1/campaigns", tag = "campaigns", params(ListQuery),
    responses((status = 200, body = CampaignPage), (status = 422, body = ErrorBody),
        (status = 400, description = "A query parameter repeated or not text", body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 429, description = "Rate limited or overloaded", body = ErrorBody), (status = 503, body = ErrorBody)),
    security(("bearer" = [])))]
#[tracing::instrument(skip_all)]
pub async fn list(
    _: Admin,
    State(state): State<AppState>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<CampaignPage>, ApiError> {
    let Query(query) = query.map_err(|r| ApiError::Malformed { message: r.body_text(), field: None })?;
    let limit = match query.limit.as_deref() {
        None => DEFAULT_PAGE,
        Some(s) => match s.trim().parse::<usize>() {
            Ok(n) if (1..=MAX_PAGE).contains(&n) => n,
            _ => return Err(ApiError::invalid("limit", format!("must be a whole number from 1 to {MAX_PAGE}"))),
        },
    };
    // One more than asked says whether a next page exists.
    let mut page = state.engine.store().campaigns_page(query.after.as_deref(), limit + 1).await?;
    let next_after = if page.len() > limit {
        page.truncate(limit);
        page.last().map(|c| c.id.to_string())
    } else {
        None
    };
    Ok(Json(CampaignPage { campaigns: page.iter().map(|c| c.to_doc()).collect(), next_after }))
}

fn not_found(id: &str) -> ApiError {
    ApiError::NotFound(format!("no campaign {id:?}"))
}

/// A campaign id from the URL. The id rule holds on every route, so an id no campaign could
/// have is a 422 on `id`, like in a body.
fn path_id(id: &str) -> Result<CampaignId, ApiError> {
    Ok(CampaignId::parse("id", id)?)
}

/// Read one campaign.
#[utoipa::path(get, path = "/v1/campaigns/{id}", tag = "campaigns",
    params(("id" = String, Path, description = "Campaign id", pattern = r"^[A-Za-z0-9_.:-]{1,64}$")),
    responses((status = 200, body = CampaignRequest), (status = 404, body = ErrorBody),
        (status = 422, description = "An id no campaign can have", body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 429, description = "Rate limited or overloaded", body = ErrorBody), (status = 503, body = ErrorBody)),
    security(("bearer" = [])))]
#[tracing::instrument(skip_all, fields(campaign_id = %id))]
pub async fn get_one(
    _: Admin,
    State(state): State<AppState>,
    PathParams(id): PathParams<String>,
) -> Result<Json<CampaignDoc>, ApiError> {
    let cid = path_id(&id)?;
    let campaign = state.engine.store().campaign(&cid).await?.ok_or_else(|| not_found(&id))?;
    Ok(Json(campaign.to_doc()))
}

/// Replace a campaign (fences may change; its users' stays are forgotten).
#[utoipa::path(put, path = "/v1/campaigns/{id}", tag = "campaigns",
    params(("id" = String, Path, description = "Campaign id", pattern = r"^[A-Za-z0-9_.:-]{1,64}$")),
    request_body(content = CampaignRequest, description = "The whole new campaign; `id` may be omitted"),
    responses((status = 200, description = "The stored campaign", body = CampaignRequest),
        (status = 422, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 400, body = ErrorBody), (status = 408, description = "Body too slow", body = ErrorBody), (status = 413, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 429, description = "Rate limited or overloaded", body = ErrorBody), (status = 503, body = ErrorBody)),
    security(("bearer" = [])))]
#[tracing::instrument(skip_all, fields(campaign_id = %id))]
pub async fn replace(
    _: Admin,
    State(state): State<AppState>,
    PathParams(id): PathParams<String>,
    JsonBody(doc): JsonBody<CampaignDoc>,
) -> Result<Json<CampaignDoc>, ApiError> {
    let cid = path_id(&id)?;
    if let Some(body_id) = &doc.id {
        if body_id != cid.as_str() {
            return Err(ApiError::invalid("id", "must match the campaign id in the URL (or be omitted)"));
        }
    }
    let campaign = doc.validate(|| cid.clone())?;
    let stored = state.engine.replace_campaign(campaign).await.map_err(|e| match e {
        StoreError::NotFound => not_found(&id),
        other => other.into(),
    })?;
    tracing::info!(fences = stored.fences.len(), "campaign replaced");
    Ok(Json(stored.to_doc()))
}

/// Delete a campaign (coupons already issued stay in wallets; the id may be used again).
#[utoipa::path(delete, path = "/v1/campaigns/{id}", tag = "campaigns",
    params(("id" = String, Path, description = "Campaign id", pattern = r"^[A-Za-z0-9_.:-]{1,64}$")),
    responses((status = 204, description = "Deleted"), (status = 404, body = ErrorBody),
        (status = 422, description = "An id no campaign can have", body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 429, description = "Rate limited or overloaded", body = ErrorBody), (status = 503, body = ErrorBody)),
    security(("bearer" = [])))]
#[tracing::instrument(skip_all, fields(campaign_id = %id))]
pub async fn delete(
    _: Admin,
    State(state): State<AppState>,
    PathParams(id): PathParams<String>,
) -> Result<StatusCode, ApiError> {
    let cid = path_id(&id)?;
    state.engine.delete_campaign(&cid).await.map_err(|e| match e {
        StoreError::NotFound => not_found(&id),
        other => other.into(),
    })?;
    tracing::info!("campaign deleted");
    Ok(StatusCode::NO_CONTENT)
}

/// Counters of a campaign.
#[derive(Debug, Serialize, ToSchema)]
pub struct StatsReply {
    /// The campaign.
    pub campaign_id: String,
    /// Coupons issued, ever.
    pub issued: u64,
    /// Of those, redeemed.
    pub redeemed: u64,
    /// What became of the coupons' pushes (one per coupon and device).
    pub pushes: PushCounts,
}

/// Push outcomes of a campaign's coupons (API.md "Pushes").
#[derive(Debug, Serialize, ToSchema)]
pub struct PushCounts {
    /// Accepted by the provider.
    pub delivered: u64,
    /// Failed at least once, waiting for another attempt.
    pub retrying: u64,
    /// Given up (permanent error, or every attempt used): in the dead letters.
    pub failed: u64,
    /// The provider called the token dead; the device was removed.
    pub dead_token: u64,
}

impl From<crate::store::PushStats> for PushCounts {
    fn from(p: crate::store::PushStats) -> Self {
        Self { delivered: p.delivered, retrying: p.retrying, failed: p.failed, dead_token: p.dead_token }
    }
}

/// Counters of a campaign.
#[utoipa::path(get, path = "/v1/campaigns/{id}/stats", tag = "campaigns",
    params(("id" = String, Path, description = "Campaign id", pattern = r"^[A-Za-z0-9_.:-]{1,64}$")),
    responses((status = 200, body = StatsReply), (status = 404, body = ErrorBody),
        (status = 422, description = "An id no campaign can have", body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 429, description = "Rate limited or overloaded", body = ErrorBody), (status = 503, body = ErrorBody)),
    security(("bearer" = [])))]
#[tracing::instrument(skip_all, fields(campaign_id = %id))]
pub async fn stats(
    _: Admin,
    State(state): State<AppState>,
    PathParams(id): PathParams<String>,
) -> Result<Json<StatsReply>, ApiError> {
    let cid = path_id(&id)?;
    let store = state.engine.store();
    if store.campaign(&cid).await?.is_none() {
        return Err(not_found(&id));
    }
    let stats = store.campaign_stats(&cid).await?;
    Ok(Json(StatsReply {
        campaign_id: id,
        issued: stats.issued,
        redeemed: stats.redeemed,
        pushes: stats.pushes.into(),
    }))
}
