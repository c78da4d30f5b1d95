//! What each provider receives for one (device token, coupon): the FCM HTTP v1 request body, and
//! the APNs body and headers, exactly as API.md's "Pushes" section lists them — plus the check
//! that a campaign's coupon can fit the providers' 4 096-byte payload limit at all.
//!
//! Pure functions of their inputs (the clock comes in as `now_ms`), so the exact bytes are
//! tested here and the clients only add transport and credentials.

use serde::Serialize;

use crate::domain::{CampaignId, CouponId, CouponTemplate, UserId};
use crate::store::IssuedCoupon;

/// The providers' payload limit in bytes (FCM: "4096 bytes for most messages"; APNs: 4 KB for
/// alert notifications).
pub const MAX_PAYLOAD_BYTES: usize = 4096;

/// The longest `android.ttl` FCM takes: four weeks.
pub const FCM_MAX_TTL_S: i64 = 28 * 86_400;

/// The FCM v1 `messages:send` body.
#[derive(Debug, Serialize)]
struct FcmRequest<'a> {
    message: FcmMessage<'a>,
}

#[derive(Debug, Serialize)]
struct FcmMessage<'a> {
    token: &'a str,
    notification: FcmNotification<'a>,
    data: FcmData<'a>,
    android: FcmAndroid<'a>,
}

#[derive(Debug, Serialize)]
struct FcmNotification<'a> {
    title: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    body: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    image: Option<&'a str>,
}

/// FCM `data` is a map of strings to strings; absent members are omitted.
#[derive(Debug, Serialize)]
struct FcmData<'a> {
    coupon_id: &'a str,
    campaign_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    deep_link: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    expires_at_ms: Option<String>,
}

#[derive(Debug, Serialize)]
struct FcmAndroid<'a> {
    collapse_key: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    ttl: Option<String>,
}

/// The FCM v1 request body for `coupon` to `token`, at server time `now_ms`.
///
/// `android.ttl` is the whole seconds left until the coupon expires, rounded up, at least 0 and
/// at most [`FCM_MAX_TTL_S`] (FCM's ceiling); omitted for a coupon that never expires, which
/// leaves FCM's default (also four weeks).
pub fn fcm_body(token: &str, coupon: &IssuedCoupon, now_ms: i64) -> Vec<u8> {
    let ttl = coupon.expires_at_ms.map(|expires| {
        let left_ms = expires.saturating_sub(now_ms).max(0);
        let seconds = (left_ms.saturating_add(999) / 1000).min(FCM_MAX_TTL_S);
        format!("{seconds}s")
    });
    let request = FcmRequest {
        message: FcmMessage {
            token,
            notification: FcmNotification {
                title: &coupon.title,
                body: coupon.body.as_deref(),
                image: coupon.image_url.as_deref(),
            },
            data: FcmData {
                coupon_id: coupon.coupon_id.as_str(),
                campaign_id: coupon.campaign_id.as_str(),
                deep_link: coupon.deep_link.as_deref(),
                expires_at_ms: coupon.expires_at_ms.map(|ms| ms.to_string()),
            },
            android: FcmAndroid { collapse_key: coupon.coupon_id.as_str(), ttl },
        },
    };
    serde_json::to_vec(&request).expect("a struct of strings serializes")
}

/// The APNs body.
#[derive(Debug, Serialize)]
struct ApnsBody<'a> {
    aps: Aps<'a>,
    coupon_id: &'a str,
    campaign_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    deep_link: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    image_url: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    expires_at_ms: Option<i64>,
}

#[derive(Debug, Serialize)]
struct Aps<'a> {
    alert: ApsAlert<'a>,
    /// `1` lets the app's notification service extension fetch the image; absent otherwise.
    #[serde(rename = "mutable-content", skip_serializing_if = "Option::is_none")]
    mutable_content: Option<u8>,
}

#[derive(Debug, Serialize)]
struct ApsAlert<'a> {
    title: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    body: Option<&'a str>,
}

/// One APNs request but its `authorization` header (the client adds the provider token) and
/// its host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApnsRequest {
    /// The path segments after the base URL: `["3", "device", <token>]` (the client encodes them).
    pub path: [String; 3],
    /// `apns-topic`, `apns-push-type`, `apns-priority`, `apns-expiration`, `apns-collapse-id`.
    pub headers: Vec<(&'static str, String)>,
    /// The JSON body.
    pub body: Vec<u8>,
}

/// The APNs request for `coupon` to `token`, for the app `topic`.
///
/// Outside `data` (which only FCM has) values keep their JSON type: `expires_at_ms` is a number,
/// like every `*_ms` of API.md. `apns-expiration` is the expiry in whole seconds since the epoch
/// (rounded down, so APNs never delivers a coupon after it expired) and `0` for a coupon that
/// never expires, as API.md says.
pub fn apns_request(token: &str, coupon: &IssuedCoupon, topic: &str) -> ApnsRequest {
    let body = ApnsBody {
        aps: Aps {
            alert: ApsAlert { title: &coupon.title, body: coupon.body.as_deref() },
            mutable_content: coupon.image_url.as_ref().map(|_| 1),
        },
        coupon_id: coupon.coupon_id.as_str(),
        campaign_id: coupon.campaign_id.as_str(),
        deep_link: coupon.deep_link.as_deref(),
        image_url: coupon.image_url.as_deref(),
        expires_at_ms: coupon.expires_at_ms,
    };
    let expiration = coupon.expires_at_ms.map_or(0, |ms| ms.div_euclid(1000).max(0));
    ApnsRequest {
        path: ["3".into(), "device".into(), token.into()],
        headers: vec![
            ("apns-topic", topic.to_owned()),
            ("apns-push-type", "alert".to_owned()),
            ("apns-priority", "10".to_owned()),
            ("apns-expiration", expiration.to_string()),
            ("apns-collapse-id", coupon.coupon_id.as_str().to_owned()),
        ],
        body: serde_json::to_vec(&body).expect("a struct of strings serializes"),
    }
}

/// Longest device token assumed by [`check_coupon_fits`], bytes. APNs tokens are 64 hex
/// characters and FCM ones about 160; the device API accepts more, but no provider issues them.
pub const WORST_CASE_TOKEN_BYTES: usize = 200;

/// Refuses a coupon whose push could exceed [`MAX_PAYLOAD_BYTES`] at either provider, naming the
/// longest coupon text (`coupon.title`, `coupon.body`, `coupon.deep_link`, `coupon.image_url`)
/// as the one to shorten.
///
/// The worst case it builds: a [`WORST_CASE_TOKEN_BYTES`]-byte device token, a 64-character
/// campaign id (the longest allowed; the campaign's own id may later be longer than the one
/// given now, and the check should not depend on it), a coupon id as [`CouponId::derive`] makes
/// them (always 35 characters), and an expiry of 19 digits (the widest `i64`) even when the
/// coupon never expires. It measures the whole FCM request body, which is a little stricter
/// than FCM's own count of the message payload.
pub fn check_coupon_fits(coupon: &CouponTemplate) -> Result<(), (&'static str, String)> {
    let campaign_id = CampaignId::parse("id", &"c".repeat(64)).expect("64 allowed characters");
    let user_id = UserId::parse("user_id", "u").expect("a valid user id");
    let worst = IssuedCoupon {
        coupon_id: CouponId::derive(&campaign_id, &user_id, 0),
        user_id,
        campaign_id,
        fence_id: crate::domain::FenceId::parse("fence", "f").expect("a valid fence id"),
        merchant_id: None,
        title: coupon.title.clone(),
        body: coupon.body.clone(),
        deep_link: coupon.deep_link.clone(),
        image_url: coupon.image_url.clone(),
        issued_at_ms: 0,
        expires_at_ms: Some(i64::MAX),
    };
    let token = "f".repeat(WORST_CASE_TOKEN_BYTES);
    // now_ms = 0 with an expiry at i64::MAX gives the widest ttl ("2419200s").
    let fcm = fcm_body(&token, &worst, 0).len();
    let apns = apns_request(&token, &worst, "topic").body.len();
    let size = fcm.max(apns);
    if size <= MAX_PAYLOAD_BYTES {
        return Ok(());
    }
    let fields = [
        ("coupon.title", Some(&coupon.title)),
        ("coupon.body", coupon.body.as_ref()),
        ("coupon.deep_link", coupon.deep_link.as_ref()),
        ("coupon.image_url", coupon.image_url.as_ref()),
    ];
    let (field, _) = fields
        .iter()
        .map(|(field, text)| (*field, text.map_or(0, |t| t.len())))
        // The first of equally long fields: title before body before links.
        .fold(("coupon.title", 0), |best, this| if this.1 > best.1 { this } else { best });
    Err((
        field,
        format!(
            "makes the push up to {size} bytes, over the providers' {MAX_PAYLOAD_BYTES}-byte limit; \
             shorten the coupon texts"
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::FenceId;
    use serde_json::{json, Value};

    fn coupon() -> IssuedCoupon {
        let campaign_id = CampaignId::parse("id", "coffee").unwrap();
        let user_id = UserId::parse("u", "alice").unwrap();
        IssuedCoupon {
            coupon_id: CouponId::from_string("cp_1"),
            user_id,
            campaign_id,
            fence_id: FenceId::parse("f", "store-1").unwrap(),
            merchant_id: None,
            title: "20% off".into(),
            body: Some("Show this".into()),
            deep_link: Some("app://c".into()),
            image_url: Some("https://img/c.png".into()),
            issued_at_ms: 1_000_000,
            expires_at_ms: Some(1_000_000 + 86_400_000),
        }
    }

    fn json_of(bytes: &[u8]) -> Value {
        serde_json::from_slice(bytes).unwrap()
    }

    #[test]
    fn fcm_body_is_api_md_exactly() {
        let body = json_of(&fcm_body("tok", &coupon(), 1_000_000));
        assert_eq!(
            body,
            json!({"message": {
                "token": "tok",
                "notification": {"title": "20% off", "body": "Show this", "image": "https://img/c.png"},
                "data": {"coupon_id": "cp_1", "campaign_id": "coffee", "deep_link": "app://c",
                         "expires_at_ms": "87400000"},
                "android": {"collapse_key": "cp_1", "ttl": "86400s"}
            }})
        );
    }

    #[test]
    fn fcm_omits_what_is_absent_and_bounds_the_ttl() {
        let mut c = coupon();
        c.body = None;
        c.image_url = None;
        c.deep_link = None;
        c.expires_at_ms = None;
        let body = json_of(&fcm_body("tok", &c, 0));
        assert_eq!(body["message"]["notification"], json!({"title": "20% off"}));
        assert_eq!(body["message"]["data"], json!({"coupon_id": "cp_1", "campaign_id": "coffee"}));
        assert_eq!(body["message"]["android"], json!({"collapse_key": "cp_1"}));

        c.expires_at_ms = Some(10_001);
        assert_eq!(json_of(&fcm_body("t", &c, 0))["message"]["android"]["ttl"], "11s", "rounded up");
        assert_eq!(json_of(&fcm_body("t", &c, 20_000))["message"]["android"]["ttl"], "0s", "already expired");
        c.expires_at_ms = Some(i64::MAX);
        assert_eq!(json_of(&fcm_body("t", &c, i64::MIN))["message"]["android"]["ttl"], "2419200s");
    }

    #[test]
    fn apns_request_is_api_md_exactly() {
        let r = apns_request("abcd", &coupon(), "com.example.app");
        assert_eq!(r.path, ["3".to_string(), "device".into(), "abcd".into()]);
        let headers: Vec<(&str, &str)> = r.headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        assert_eq!(
            headers,
            [
                ("apns-topic", "com.example.app"),
                ("apns-push-type", "alert"),
                ("apns-priority", "10"),
                ("apns-expiration", "87400"),
                ("apns-collapse-id", "cp_1"),
            ]
        );
        assert_eq!(
            json_of(&r.body),
            json!({"aps": {"alert": {"title": "20% off", "body": "Show this"}, "mutable-content": 1},
                   "coupon_id": "cp_1", "campaign_id": "coffee", "deep_link": "app://c",
                   "image_url": "https://img/c.png", "expires_at_ms": 87400000i64})
        );
    }

    #[test]
    fn apns_without_image_or_expiry() {
        let mut c = coupon();
        c.image_url = None;
        c.body = None;
        c.deep_link = None;
        c.expires_at_ms = None;
        let r = apns_request("abcd", &c, "t");
        assert_eq!(r.headers[3], ("apns-expiration", "0".to_string()));
        assert_eq!(
            json_of(&r.body),
            json!({"aps": {"alert": {"title": "20% off"}}, "coupon_id": "cp_1", "campaign_id": "coffee"})
        );
    }

    fn template(title: usize, body: usize, link: usize, image: usize) -> CouponTemplate {
        let text = |n: usize| (n > 0).then(|| "x".repeat(n));
        CouponTemplate {
            title: "t".repeat(title.max(1)),
            body: text(body),
            deep_link: text(link),
            image_url: text(image),
            valid_for_s: None,
        }
    }

    #[test]
    fn a_coupon_that_fits_passes_and_one_over_names_its_longest_field() {
        assert_eq!(check_coupon_fits(&template(100, 1000, 200, 200)), Ok(()));
        assert_eq!(check_coupon_fits(&template(100, 3600, 200, 200)).unwrap_err().0, "coupon.body");
        assert_eq!(check_coupon_fits(&template(2100, 2000, 0, 0)).unwrap_err().0, "coupon.title");
        assert_eq!(check_coupon_fits(&template(10, 10, 10, 4000)).unwrap_err().0, "coupon.image_url");
        assert_eq!(check_coupon_fits(&template(10, 10, 4000, 0)).unwrap_err().0, "coupon.deep_link");
    }

    #[test]
    fn the_limit_is_exact_at_the_worst_case() {
        // Grow the body one byte at a time: the first refused size is the first whose worst-case
        // payload is over the limit, measured independently here.
        let mut n = 0;
        while check_coupon_fits(&template(10, n, 0, 0)).is_ok() {
            n += 1;
        }
        let t = template(10, n, 0, 0);
        let worst_campaign = CampaignId::parse("id", &"c".repeat(64)).unwrap();
        let mut c = coupon();
        c.campaign_id = worst_campaign.clone();
        c.coupon_id = CouponId::derive(&worst_campaign, &c.user_id, 0);
        c.title = t.title.clone();
        c.body = t.body.clone();
        c.deep_link = None;
        c.image_url = None;
        c.expires_at_ms = Some(i64::MAX);
        let token = "f".repeat(WORST_CASE_TOKEN_BYTES);
        let size = |c: &IssuedCoupon| fcm_body(&token, c, 0).len().max(apns_request(&token, c, "x").body.len());
        assert_eq!(size(&c), MAX_PAYLOAD_BYTES + 1);
        // JSON escaping counts: a body of quotes takes twice its length.
        assert!(check_coupon_fits(&CouponTemplate { body: Some("\"".repeat(n / 2 + 1)), ..t }).is_err());
    }
}
