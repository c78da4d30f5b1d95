//! `POST /v1/coupons/{coupon_id}/redeem`: exactly once, by the coupon's merchant, before expiry.
//!
//! The store decides atomically (a second redemption is 409 however close the two requests
//! are); this handler only adds who may ask: the admin, or the client holding the coupon.

use axum::extract::State;
use axum::Json;
use serde::Deserialize;
use utoipa::ToSchema;

use super::auth::Caller;
use super::error::{ApiError, ErrorBody};
use super::users::WalletItem;
use super::{AppState, JsonBody, PathParams};
use crate::domain::error::objects_only;
use crate::domain::ids::{check_id, MAX_ID_CHARS};
use crate::domain::CouponId;
use crate::engine::now_ms;

/// The body of a redemption.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(remote = "Self")]
pub struct RedeemInput {
    /// The merchant redeeming; must be the campaign's merchant.
    merchant_id: Option<String>,
}

objects_only!(RedeemInput);

/// Redeem a coupon.
#[utoipa::path(post, path = "/v1/coupons/{coupon_id}/redeem", tag = "wallet",
    params(("coupon_id" = String, Path, description = "Coupon id")),
    request_body = RedeemInput,
    responses((status = 200, description = "Redeemed", body = WalletItem),
        (status = 404, body = ErrorBody), (status = 409, description = "Already redeemed", body = ErrorBody),
        (status = 410, description = "Past expiry", body = ErrorBody),
        (status = 422, description = "Another merchant, or an id breaking the id rule", body = ErrorBody),
        (status = 400, body = ErrorBody), (status = 408, description = "Body too slow", body = ErrorBody), (status = 413, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 429, description = "Rate limited or overloaded", body = ErrorBody), (status = 503, body = ErrorBody)),
    security(("bearer" = [])))]
#[tracing::instrument(skip_all, fields(coupon_id = %coupon_id))]
pub async fn redeem(
    caller: Caller,
    State(state): State<AppState>,
    PathParams(coupon_id): PathParams<String>,
    JsonBody(input): JsonBody<RedeemInput>,
) -> Result<Json<WalletItem>, ApiError> {
    let merchant_id = match input.merchant_id {
        Some(m) => {
            check_id("merchant_id", &m, MAX_ID_CHARS)?;
            m
        }
        None => return Err(ApiError::invalid("merchant_id", "is required")),
    };
    let id = CouponId::parse("coupon_id", &coupon_id)?;
    let store = state.engine.store();
    if let Caller::Client(user) = &caller {
        // A client may redeem only a coupon it holds; look first so another user's coupon is a 403.
        let record = store.coupon(&id).await?.ok_or_else(|| ApiError::NotFound("unknown coupon".into()))?;
        if &record.coupon.user_id != user {
            return Err(ApiError::Forbidden("this coupon belongs to another user"));
        }
    }
    let now = now_ms();
    let record = store.redeem(&id, &merchant_id, now).await?;
    tracing::info!(campaign_id = %record.coupon.campaign_id, "coupon redeemed");
    metrics::counter!("kabao_coupons_redeemed_total").increment(1);
    Ok(Json(WalletItem::new(record, now)))
}
