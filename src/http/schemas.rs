//! OpenAPI schemas of the request bodies that the handlers read through hand-written parsers
//! (campaigns and pings), so `/openapi.json` publishes their full shape rather than a bare
//! `object`.
//!
//! The domain's wire types keep every member optional (a missing one is a `422` naming it, not a
//! parse error), which would publish nothing as required; these types say what API.md requires.
//! They only describe — nothing constructs them — and a test checks that API.md's example
//! bodies, which the server accepts, carry no member these schemas do not know.

#![allow(dead_code)]

use serde::Deserialize;
use utoipa::ToSchema;

/// One ping.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PingRequest {
    /// 1..128 characters, no control or bidi-control characters.
    #[schema(min_length = 1, max_length = 128)]
    user_id: String,
    /// Latitude, −90..90.
    #[schema(minimum = -90.0, maximum = 90.0)]
    lat: f64,
    /// Longitude, −180..180.
    #[schema(minimum = -180.0, maximum = 180.0)]
    lon: f64,
    /// Milliseconds since the epoch, within [now − `max_ping_age_s`, now + 60 s]; server time when absent.
    ts_ms: Option<i64>,
    /// Horizontal accuracy, metres (≥ 0).
    #[schema(minimum = 0.0)]
    accuracy_m: Option<f64>,
    /// Speed the phone reports, m/s (informational).
    #[schema(minimum = 0.0)]
    speed_mps: Option<f64>,
    /// True when the phone reports a mock location provider (such pings are never applied).
    mocked: Option<bool>,
}

/// Up to 10 000 pings, possibly of several users (admin token only).
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PingBatch {
    /// The pings; each user's are applied in `ts_ms` order.
    #[schema(max_items = 10000)]
    pings: Vec<PingRequest>,
}

/// `POST /v1/pings`: one ping, or a batch.
#[derive(Deserialize, ToSchema)]
#[serde(untagged)]
pub enum PingsRequest {
    /// One ping.
    One(PingRequest),
    /// A batch.
    Batch(PingBatch),
}

/// A campaign (API.md "Campaigns").
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CampaignRequest {
    /// `[A-Za-z0-9_.:-]{1,64}`, not `.` or `..`; generated when absent (on `PUT`, the URL's).
    #[schema(pattern = "^[A-Za-z0-9_.:-]{1,64}$")]
    id: Option<String>,
    /// Display name.
    name: Option<String>,
    /// Whose counters redeem the coupon.
    merchant: Option<MerchantSchema>,
    /// What the user receives.
    coupon: CouponSchema,
    /// 1..1 000 000 fences, ids unique within the campaign.
    #[schema(min_items = 1, max_items = 1000000)]
    fences: Vec<FenceSchema>,
    /// `enter` (default) or `dwell`.
    trigger: Option<TriggerSchema>,
    /// When the campaign runs (default: always).
    schedule: Option<ScheduleSchema>,
    /// Issuing caps (default: unlimited).
    caps: Option<CapsSchema>,
    /// Who may receive it (default: everyone).
    audience: Option<AudienceSchema>,
    /// Pings less accurate than this never trigger the campaign.
    #[schema(minimum = 0.0)]
    max_accuracy_m: Option<f64>,
    /// `active` (default) or `paused`.
    status: Option<CampaignStatus>,
}

/// A campaign's status.
#[derive(Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum CampaignStatus {
    /// Issues coupons.
    Active,
    /// Tracks stays, issues nothing.
    Paused,
}

/// The merchant.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MerchantSchema {
    /// Checked at redemption; 1..128 characters.
    #[schema(min_length = 1, max_length = 128)]
    id: String,
    /// Display name.
    name: Option<String>,
}

/// The coupon a campaign issues.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CouponSchema {
    /// Headline (not empty).
    #[schema(min_length = 1)]
    title: String,
    /// Body text.
    body: Option<String>,
    /// Link the notification opens.
    deep_link: Option<String>,
    /// Picture.
    image_url: Option<String>,
    /// Seconds the coupon is valid after issue; absent = never expires.
    #[schema(minimum = 0)]
    valid_for_s: Option<i64>,
}

/// A circle (`center`, `radius_m`) or a GeoJSON polygon (`coordinates`).
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FenceSchema {
    /// Unique within the campaign; 1..128 characters.
    #[schema(min_length = 1, max_length = 128)]
    id: String,
    /// `circle` or `polygon`.
    #[serde(rename = "type")]
    kind: FenceType,
    /// Circle centre `[lon, lat]`.
    #[schema(min_items = 2, max_items = 3)]
    center: Option<Vec<f64>>,
    /// Circle radius, 1 m..50 km.
    #[schema(minimum = 1.0, maximum = 50000.0)]
    radius_m: Option<f64>,
    /// Polygon rings (outer first, then holes), each closed with ≥ 4 `[lon, lat]` positions.
    coordinates: Option<Vec<Vec<Vec<f64>>>>,
}

/// A fence's shape.
#[derive(Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum FenceType {
    /// `center` and `radius_m`.
    Circle,
    /// `coordinates`.
    Polygon,
}

/// What makes a candidate.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TriggerSchema {
    /// `enter` or `dwell`.
    on: TriggerOn,
    /// Seconds inside before a dwell triggers (required for `dwell`).
    #[schema(minimum = 0)]
    dwell_s: Option<i64>,
}

/// A trigger kind.
#[derive(Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum TriggerOn {
    /// The first inside ping of a stay.
    Enter,
    /// The first ping `dwell_s` into a stay.
    Dwell,
}

/// When a campaign runs.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ScheduleSchema {
    /// Start, ms since the epoch (inclusive).
    starts_at_ms: Option<i64>,
    /// End, ms since the epoch (exclusive; after the start).
    ends_at_ms: Option<i64>,
    /// IANA time zone of `hours` (default UTC).
    timezone: Option<String>,
    /// Opening hours (absent or empty: always open).
    hours: Option<Vec<HoursSchema>>,
}

/// One line of opening hours.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HoursSchema {
    /// `mon` … `sun` (absent: every day).
    days: Option<Vec<String>>,
    /// `HH:MM`, inclusive.
    #[schema(pattern = "^[0-2][0-9]:[0-5][0-9]$")]
    from: String,
    /// `HH:MM` (or `24:00`), exclusive.
    #[schema(pattern = "^[0-2][0-9]:[0-5][0-9]$")]
    to: String,
}

/// Issuing caps; 0 = unlimited.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CapsSchema {
    /// Seconds between two coupons of the campaign to one user.
    #[schema(minimum = 0)]
    per_user_cooldown_s: Option<i64>,
    /// Coupons of the campaign one user may ever hold.
    #[schema(minimum = 0)]
    per_user_max: Option<i64>,
    /// Coupons the campaign may ever issue.
    #[schema(minimum = 0)]
    total_max: Option<i64>,
}

/// Who may receive the campaign.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AudienceSchema {
    /// Users whose devices carry one of these tags (empty: everyone).
    tags_any: Option<Vec<String>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// API.md's example bodies, which the server accepts, fit these schemas.
    #[test]
    fn api_md_examples_fit_the_schemas() {
        let campaign = serde_json::json!({
          "id": "coffee-2013-01",
          "name": "20% off any coffee",
          "merchant": {"id": "meiyijia", "name": "Meiyijia"},
          "coupon": {"title": "20% off coffee", "body": "Show this at the counter", "deep_link": "alipay://...",
                     "image_url": "https://...", "valid_for_s": 86400},
          "fences": [
            {"id": "store-0042", "type": "circle", "center": [114.0579, 22.5431], "radius_m": 150},
            {"id": "mall-7", "type": "polygon", "coordinates": [[[114.05,22.54],[114.06,22.54],[114.06,22.55],[114.05,22.54]]]}
          ],
          "trigger": {"on": "dwell", "dwell_s": 120},
          "schedule": {"starts_at_ms": 0, "ends_at_ms": 4102444800000_i64, "timezone": "Asia/Shanghai",
                       "hours": [{"days": ["mon","tue","wed","thu","fri"], "from": "08:00", "to": "22:00"}]},
          "caps": {"per_user_cooldown_s": 86400, "per_user_max": 1, "total_max": 100000},
          "audience": {"tags_any": ["vip"]},
          "max_accuracy_m": 100,
          "status": "active"
        });
        serde_json::from_value::<CampaignRequest>(campaign).unwrap();
        let ping = serde_json::json!({"user_id": "u-123", "lat": 22.5431, "lon": 114.0579, "ts_ms": 1700000000000_i64,
            "accuracy_m": 12.0, "speed_mps": 1.2, "mocked": false});
        serde_json::from_value::<PingsRequest>(ping.clone()).unwrap();
        serde_json::from_value::<PingsRequest>(serde_json::json!({"pings": [ping]})).unwrap();
    }
}
