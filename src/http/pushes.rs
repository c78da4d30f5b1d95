//! `GET /v1/pushes/dead-letters` (admin): the pushes kabao gave up on, newest first, with why —
//! an operator's view of what the providers refused for good or what used up
//! `push_max_attempts`.
//!
//! Device tokens are left out: the device id names the device, and a token is a credential of
//! the phone an operator's screen has no need to show.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::auth::Admin;
use super::error::{ApiError, ErrorBody};
use super::AppState;
use crate::store::{DeadLetter, Platform};

/// Dead letters listed when `limit` is absent.
pub const DEFAULT_DEAD_LETTERS: usize = 100;
/// Largest `limit`.
pub const MAX_DEAD_LETTERS: usize = 1000;

/// `?limit=`, read as text so a bad value is a 422 naming it.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DeadLetterQuery {
    /// How many, 1..=1000 (default 100).
    #[param(value_type = Option<u32>)]
    limit: Option<String>,
}

/// One push given up.
#[derive(Debug, Serialize, ToSchema)]
pub struct DeadLetterItem {
    /// The coupon that was not delivered.
    pub coupon_id: String,
    /// Its campaign.
    pub campaign_id: String,
    /// Its holder.
    pub user_id: String,
    /// The device it was for.
    pub device_id: String,
    /// `fcm` or `apns`.
    #[schema(value_type = String)]
    pub platform: Platform,
    /// What the provider said and at which attempt, or why kabao stopped trying (`gave up
    /// after N attempts: …`).
    pub reason: String,
    /// Server time it was given up, ms since the epoch.
    pub at_ms: i64,
}

impl From<DeadLetter> for DeadLetterItem {
    fn from(letter: DeadLetter) -> Self {
        let entry = letter.entry;
        Self {
            coupon_id: entry.coupon.coupon_id.to_string(),
            campaign_id: entry.coupon.campaign_id.to_string(),
            user_id: entry.coupon.user_id.to_string(),
            device_id: entry.device_id.to_string(),
            platform: entry.device.platform,
            reason: letter.reason,
            at_ms: letter.at_ms,
        }
    }
}

/// The reply of `GET /v1/pushes/dead-letters`.
#[derive(Debug, Serialize, ToSchema)]
pub struct DeadLetters {
    /// Newest first.
    pub dead_letters: Vec<DeadLetterItem>,
}

/// List the pushes given up, newest first.
#[utoipa::path(get, path = "/v1/pushes/dead-letters", tag = "pushes", params(DeadLetterQuery),
    responses((status = 200, body = DeadLetters), (status = 422, description = "A bad limit", body = ErrorBody),
        (status = 400, description = "A query parameter repeated or not text", body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 429, description = "Rate limited or overloaded", body = ErrorBody), (status = 503, body = ErrorBody)),
    security(("bearer" = [])))]
#[tracing::instrument(skip_all)]
pub async fn dead_letters(
    _: Admin,
    State(state): State<AppState>,
    query: Result<Query<DeadLetterQuery>, QueryRejection>,
) -> Result<Json<DeadLetters>, ApiError> {
    let Query(query) = query.map_err(|r| ApiError::Malformed { message: r.body_text(), field: None })?;
    let limit = match query.limit.as_deref() {
        None => DEFAULT_DEAD_LETTERS,
        Some(s) => match s.trim().parse::<usize>() {
            Ok(n) if (1..=MAX_DEAD_LETTERS).contains(&n) => n,
            _ => {
                return Err(ApiError::invalid("limit", format!("must be a whole number from 1 to {MAX_DEAD_LETTERS}")))
            }
        },
    };
    let letters = state.engine.store().dead_letters(limit).await?;
    Ok(Json(DeadLetters { dead_letters: letters.into_iter().map(DeadLetterItem::from).collect() }))
}
