//! `/v1/users/{user_id}/...`: a user's devices and wallet. The admin, or a client acting for
//! that user.

use axum::extract::{FromRequest, Request, State};
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::auth::Caller;
use super::error::{ApiError, ErrorBody};
use super::pings::CouponTexts;
use super::{AppState, JsonBody, PathParams};
use crate::domain::error::objects_only;
use crate::domain::{DeviceId, UserId};
use crate::engine::now_ms;
use crate::store::{CouponRecord, Device, Platform};

/// Longest push token accepted (APNs tokens are 64 hex characters, FCM ones about 160).
const MAX_TOKEN_CHARS: usize = 4096;
/// Most tags one device may carry.
const MAX_TAGS: usize = 64;
/// Longest tag (as for a campaign's `audience.tags_any`).
const MAX_TAG_CHARS: usize = 128;
/// Longest locale (BCP 47 tags stay well under this).
const MAX_LOCALE_CHARS: usize = 35;

/// A device as `PUT` takes it, before validation.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(remote = "Self")]
pub struct DeviceInput {
    /// `fcm` or `apns`.
    platform: Option<String>,
    /// The provider's registration token.
    token: Option<String>,
    /// Audience tags.
    tags: Option<Vec<String>>,
    /// Display locale, e.g. `zh-CN`.
    locale: Option<String>,
}

objects_only!(DeviceInput);

impl DeviceInput {
    fn validate(self) -> Result<Device, ApiError> {
        let platform = match self.platform.as_deref() {
            Some("fcm") => Platform::Fcm,
            Some("apns") => Platform::Apns,
            Some(_) => return Err(ApiError::invalid("platform", "must be \"fcm\" or \"apns\"")),
            None => return Err(ApiError::invalid("platform", "is required")),
        };
        let token = self.token.ok_or_else(|| ApiError::invalid("token", "is required"))?;
        if token.is_empty() || token.chars().count() > MAX_TOKEN_CHARS {
            return Err(ApiError::invalid("token", format!("must be 1 to {MAX_TOKEN_CHARS} characters")));
        }
        let tags = self.tags.unwrap_or_default();
        if tags.len() > MAX_TAGS {
            return Err(ApiError::invalid("tags", format!("must hold at most {MAX_TAGS} tags")));
        }
        for (i, tag) in tags.iter().enumerate() {
            if tag.is_empty() || tag.chars().count() > MAX_TAG_CHARS {
                return Err(ApiError::invalid(
                    format!("tags[{i}]"),
                    format!("must be 1 to {MAX_TAG_CHARS} characters"),
                ));
            }
        }
        if let Some(locale) = &self.locale {
            if locale.is_empty() || locale.chars().count() > MAX_LOCALE_CHARS {
                return Err(ApiError::invalid("locale", format!("must be 1 to {MAX_LOCALE_CHARS} characters")));
            }
        }
        Ok(Device { platform, token, tags, locale: self.locale })
    }
}

/// Register or update a device of a user.
#[utoipa::path(put, path = "/v1/users/{user_id}/devices/{device_id}", tag = "devices",
    params(("user_id" = String, Path, description = "User id"), ("device_id" = String, Path, description = "Device id")),
    request_body = DeviceInput,
    responses((status = 200, description = "The stored device", body = Object),
        (status = 422, body = ErrorBody),
        (status = 400, body = ErrorBody), (status = 408, description = "Body too slow", body = ErrorBody), (status = 413, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 429, description = "Rate limited or overloaded", body = ErrorBody), (status = 503, body = ErrorBody)),
    security(("bearer" = [])))]
#[tracing::instrument(skip_all, fields(device_id = %ids.1))]
pub async fn put_device(
    caller: Caller,
    State(state): State<AppState>,
    PathParams(ids): PathParams<(String, String)>,
    request: Request,
) -> Result<Json<Device>, ApiError> {
    let (user, device) = ids;
    // Who may act for this user is decided before the body is read.
    caller.may_act_for(&user)?;
    let user = UserId::parse("user_id", &user)?;
    let device = DeviceId::parse("device_id", &device)?;
    let JsonBody(input) = JsonBody::<DeviceInput>::from_request(request, &state).await?;
    let value = input.validate()?;
    state.engine.store().put_device(&user, &device, value.clone()).await?;
    Ok(Json(value))
}

/// Remove a device.
#[utoipa::path(delete, path = "/v1/users/{user_id}/devices/{device_id}", tag = "devices",
    params(("user_id" = String, Path, description = "User id"), ("device_id" = String, Path, description = "Device id")),
    responses((status = 204, description = "Removed"), (status = 404, body = ErrorBody),
        (status = 422, description = "An id breaking the id rule", body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 429, description = "Rate limited or overloaded", body = ErrorBody), (status = 503, body = ErrorBody)),
    security(("bearer" = [])))]
#[tracing::instrument(skip_all, fields(device_id = %ids.1))]
pub async fn delete_device(
    caller: Caller,
    State(state): State<AppState>,
    PathParams(ids): PathParams<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let (user, device) = ids;
    caller.may_act_for(&user)?;
    // The id rule holds on every route: an id no request could have created is a 422 naming it.
    let user_id = UserId::parse("user_id", &user)?;
    let device_id = DeviceId::parse("device_id", &device)?;
    if !state.engine.store().delete_device(&user_id, &device_id).await? {
        return Err(ApiError::NotFound(format!("user {user:?} has no device {device:?}")));
    }
    Ok(StatusCode::NO_CONTENT)
}

/// Erases everything kabao holds about a user (API.md "Devices": devices, wallet, trigger state,
/// cap counters, pending pushes); campaign totals keep counting the user's coupons. A user kabao
/// never saw is `204` too.
#[utoipa::path(delete, path = "/v1/users/{user_id}", tag = "devices",
    params(("user_id" = String, Path, description = "User id")),
    responses((status = 204, description = "Erased"), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 422, body = ErrorBody), (status = 503, body = ErrorBody)),
    security(("bearer" = [])))]
#[tracing::instrument(skip_all)]
pub async fn erase_user(
    caller: Caller,
    State(state): State<AppState>,
    PathParams(user): PathParams<String>,
) -> Result<StatusCode, ApiError> {
    caller.may_act_for(&user)?;
    let user_id = UserId::parse("user_id", &user)?;
    state.engine.erase_user(&user_id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// A coupon as the wallet (and a redemption) shows it.
#[derive(Debug, Serialize, ToSchema)]
pub struct WalletItem {
    /// Coupon id.
    pub coupon_id: String,
    /// Issuing campaign.
    pub campaign_id: String,
    /// The fence that triggered it.
    pub fence_id: String,
    /// Title, body, link and picture.
    #[serde(flatten)]
    pub texts: CouponTexts,
    /// The triggering ping's `ts_ms`.
    pub issued_at_ms: i64,
    /// `null` when the coupon never expires.
    pub expires_at_ms: Option<i64>,
    /// `issued`, `redeemed` or `expired` (against the server clock).
    #[schema(value_type = String)]
    pub status: &'static str,
    /// Server time of redemption, once redeemed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redeemed_at_ms: Option<i64>,
}

impl WalletItem {
    /// The wallet's view of `record` at server time `now_ms`.
    pub fn new(record: CouponRecord, now_ms: i64) -> Self {
        let c = record.coupon;
        let status = match (record.redeemed_at_ms, c.expires_at_ms) {
            (Some(_), _) => "redeemed",
            (None, Some(expires)) if is_expired(expires, now_ms) => "expired",
            _ => "issued",
        };
        WalletItem {
            coupon_id: c.coupon_id.to_string(),
            campaign_id: c.campaign_id.to_string(),
            fence_id: c.fence_id.to_string(),
            texts: CouponTexts { title: c.title, body: c.body, deep_link: c.deep_link, image_url: c.image_url },
            issued_at_ms: c.issued_at_ms,
            expires_at_ms: c.expires_at_ms,
            status,
            redeemed_at_ms: record.redeemed_at_ms,
        }
    }
}

/// A coupon is expired from its `expires_at_ms` on (the instant itself included), as the store
/// decides for redemption.
pub fn is_expired(expires_at_ms: i64, now_ms: i64) -> bool {
    now_ms >= expires_at_ms
}

/// A user's coupons.
#[derive(Debug, Serialize, ToSchema)]
pub struct Wallet {
    /// Newest first, ties by coupon id.
    pub coupons: Vec<WalletItem>,
}

/// A user's coupons, newest first.
#[utoipa::path(get, path = "/v1/users/{user_id}/coupons", tag = "wallet",
    params(("user_id" = String, Path, description = "User id")),
    responses((status = 200, body = Wallet),
        (status = 422, description = "An id breaking the id rule", body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 429, description = "Rate limited or overloaded", body = ErrorBody), (status = 503, body = ErrorBody)),
    security(("bearer" = [])))]
#[tracing::instrument(skip_all)]
pub async fn wallet(
    caller: Caller,
    State(state): State<AppState>,
    PathParams(user): PathParams<String>,
) -> Result<Json<Wallet>, ApiError> {
    caller.may_act_for(&user)?;
    // The id rule holds on every route: an id the pings would refuse is a 422, not an empty wallet.
    let user_id = UserId::parse("user_id", &user)?;
    let now = now_ms();
    let records = state.engine.store().wallet(&user_id).await?;
    Ok(Json(Wallet { coupons: records.into_iter().map(|r| WalletItem::new(r, now)).collect() }))
}
