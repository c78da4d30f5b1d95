//! The APNs client: HTTP/2 over TLS to `{base}/3/device/{token}`, authenticated with an ES256
//! provider token signed with the team's `.p8` key, and the reply classified into a
//! [`PushOutcome`].
//!
//! Apple wants the provider token reused: a token is good for an hour, and one re-signed more
//! often than every 20 minutes is refused (`429 TooManyProviderTokenUpdates`). So a token is
//! re-signed after [`RESIGN_AFTER`] (40 min), or after APNs called it expired or invalid — but
//! never before [`MIN_TOKEN_AGE`] (20 min), whatever the concurrency: signing happens under a
//! lock that also guards the token.
//!
//! Built on reqwest (`http2_prior_knowledge` over https, so ALPN offers `h2` alone) rather
//! than the `a2` crate, which always talks to Apple's own hosts and trusts only the system
//! roots: it could reach neither `kabao fake-push` nor a sandbox behind a proxy with its own CA.

use std::path::Path;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use async_trait::async_trait;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::{Deserialize, Serialize};

use super::clock::{unix_s, SharedClock};
use super::http_client;
use super::{payload, PushOutcome, PushProvider};
use crate::store::{Device, IssuedCoupon};

/// A provider token is re-signed once it is this old (Apple: between 20 and 60 minutes).
pub const RESIGN_AFTER: Duration = Duration::from_secs(40 * 60);
/// A provider token is never replaced younger than this (Apple refuses faster updates).
pub const MIN_TOKEN_AGE: Duration = Duration::from_secs(20 * 60);
/// APNs limits `apns-collapse-id` to this many bytes.
pub const MAX_COLLAPSE_ID_BYTES: usize = 64;

/// Everything an [`ApnsProvider`] needs.
#[derive(Clone)]
pub struct ApnsSettings {
    /// The `.p8` token-signing key: PKCS#8 EC P-256, PEM.
    pub key_pem: String,
    /// The key's id (JWT header `kid`).
    pub key_id: String,
    /// The Apple team id (JWT `iss`).
    pub team_id: String,
    /// The app's bundle id (`apns-topic`).
    pub topic: String,
    /// `https://api.push.apple.com`, the sandbox, or a fake.
    pub base_url: String,
    /// Extra trusted roots (`KABAO_PUSH_CA_FILE`).
    pub extra_roots: Vec<reqwest::Certificate>,
    /// Deadline of one request.
    pub timeout: Duration,
    /// Wall clock for the token's `iat` and age.
    pub clock: SharedClock,
}

impl ApnsSettings {
    /// Reads the `.p8` key from `path`; the error names the file.
    pub fn read_key(path: &Path) -> anyhow::Result<String> {
        std::fs::read_to_string(path).with_context(|| format!("reading APNs key file {}", path.display()))
    }
}

/// A signed provider token.
#[derive(Debug, Clone)]
struct ProviderToken {
    /// `bearer` value.
    jwt: String,
    /// When it was signed (its `iat`).
    issued_at: SystemTime,
    /// APNs called it expired or invalid: replace it as soon as [`MIN_TOKEN_AGE`] allows.
    rejected: bool,
}

/// The provider token's claims.
#[derive(Debug, Serialize)]
struct Claims<'a> {
    iss: &'a str,
    iat: i64,
}

/// The APNs provider.
pub struct ApnsProvider {
    /// HTTP/2 only.
    client: reqwest::Client,
    /// Base URL; the path `/3/device/{token}` is appended per push.
    base_url: reqwest::Url,
    /// `apns-topic`.
    topic: String,
    /// JWT `kid`.
    key_id: String,
    /// JWT `iss`.
    team_id: String,
    /// The `.p8` key.
    signing_key: EncodingKey,
    /// The current token. A plain mutex: signing is microseconds and never awaits.
    token: parking_lot::Mutex<Option<ProviderToken>>,
    /// Wall clock.
    clock: SharedClock,
}

impl std::fmt::Debug for ApnsProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApnsProvider")
            .field("base_url", &self.base_url.as_str())
            .field("topic", &self.topic)
            .finish_non_exhaustive()
    }
}

/// APNs's error body: `{"reason": "BadDeviceToken"}` (410s add a `timestamp`).
#[derive(Debug, Default, Deserialize)]
struct ErrorReply {
    #[serde(default)]
    reason: String,
}

impl ApnsProvider {
    /// A provider for `settings`; fails on a key that is not an EC P-256 PKCS#8 PEM, or a bad URL.
    pub fn new(settings: ApnsSettings) -> anyhow::Result<Self> {
        let signing_key = EncodingKey::from_ec_pem(settings.key_pem.as_bytes())
            .context("the APNs key is not a PKCS#8 EC P-256 private key in PEM form (an AuthKey_*.p8)")?;
        let base_url = reqwest::Url::parse(&settings.base_url)
            .with_context(|| format!("APNs base URL {:?} is not a URL", settings.base_url))?;
        anyhow::ensure!(!base_url.cannot_be_a_base(), "APNs base URL {:?} cannot take a path", settings.base_url);
        anyhow::ensure!(!settings.key_id.is_empty(), "the APNs key id is empty");
        anyhow::ensure!(!settings.team_id.is_empty(), "the APNs team id is empty");
        anyhow::ensure!(!settings.topic.is_empty(), "the APNs topic is empty");
        Ok(Self {
            client: http_client::build(&settings.extra_roots, true, settings.timeout)?,
            base_url,
            topic: settings.topic,
            key_id: settings.key_id,
            team_id: settings.team_id,
            signing_key,
            token: parking_lot::Mutex::new(None),
            clock: settings.clock,
        })
    }

    /// The token to send now: the current one, or a newly signed one when none exists, it is
    /// [`RESIGN_AFTER`] old, or APNs rejected it and it is at least [`MIN_TOKEN_AGE`] old.
    fn provider_token(&self) -> Result<String, String> {
        let mut current = self.token.lock();
        let now = self.clock.now();
        if let Some(token) = current.as_ref() {
            // A clock that went backwards reads as age 0: keep the token.
            let age = now.duration_since(token.issued_at).unwrap_or(Duration::ZERO);
            let due = age >= RESIGN_AFTER || (token.rejected && age >= MIN_TOKEN_AGE);
            if !due {
                return Ok(token.jwt.clone());
            }
        }
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(self.key_id.clone());
        let claims = Claims { iss: &self.team_id, iat: unix_s(now) };
        let jwt = jsonwebtoken::encode(&header, &claims, &self.signing_key)
            .map_err(|e| format!("signing the APNs provider token: {e}"))?;
        tracing::debug!("signed a new APNs provider token");
        *current = Some(ProviderToken { jwt: jwt.clone(), issued_at: now, rejected: false });
        Ok(jwt)
    }

    /// APNs refused `jwt` as expired or invalid: mark it for replacement. Returns how long until
    /// a new one may be signed (the earliest worth retrying).
    fn reject_token(&self, jwt: &str) -> Option<Duration> {
        let mut current = self.token.lock();
        let token = current.as_mut().filter(|t| t.jwt == jwt)?;
        token.rejected = true;
        let age = self.clock.now().duration_since(token.issued_at).unwrap_or(Duration::ZERO);
        MIN_TOKEN_AGE.checked_sub(age).filter(|d| !d.is_zero())
    }

    fn url(&self, segments: &[String; 3]) -> reqwest::Url {
        let mut url = self.base_url.clone();
        url.path_segments_mut().expect("checked in new").pop_if_empty().extend(segments);
        url
    }
}

/// Classifies APNs's answer (API.md "Pushes": outcomes); 403 token rejections are handled
/// before this.
fn classify(status: reqwest::StatusCode, retry_after: Option<Duration>, body: &[u8]) -> PushOutcome {
    if status.is_success() {
        return PushOutcome::Delivered;
    }
    let reason = serde_json::from_slice::<ErrorReply>(body).unwrap_or_default().reason;
    let described = format!("APNs {} {reason}", status.as_u16());
    match (status.as_u16(), reason.as_str()) {
        (410, _) | (400, "BadDeviceToken") => PushOutcome::DeadToken { reason: described },
        (429, _) | (500..=599, _) => PushOutcome::Retry { reason: described, retry_after },
        _ => PushOutcome::Failed { reason: described },
    }
}

#[async_trait]
impl PushProvider for ApnsProvider {
    fn name(&self) -> &'static str {
        "apns"
    }

    async fn send(&self, device: &Device, coupon: &IssuedCoupon) -> PushOutcome {
        let request = payload::apns_request(&device.token, coupon, &self.topic);
        if coupon.coupon_id.as_str().len() > MAX_COLLAPSE_ID_BYTES {
            // CouponId::derive makes 35-character ids; a longer one is a bug, not the phone's.
            return PushOutcome::Failed {
                reason: format!("coupon id is over APNs's {MAX_COLLAPSE_ID_BYTES}-byte apns-collapse-id limit"),
            };
        }
        let jwt = match self.provider_token() {
            Ok(jwt) => jwt,
            Err(reason) => return PushOutcome::retry(reason),
        };
        let mut builder = self
            .client
            .post(self.url(&request.path))
            .header(reqwest::header::AUTHORIZATION, format!("bearer {jwt}"))
            .header(reqwest::header::CONTENT_TYPE, "application/json");
        for (name, value) in &request.headers {
            builder = builder.header(*name, value);
        }
        let reply = match builder.body(request.body).send().await {
            Ok(reply) => reply,
            Err(e) => return PushOutcome::retry(format!("APNs unreachable: {}", http_client::describe(&e))),
        };
        let status = reply.status();
        let retry_after = http_client::retry_after(reply.headers());
        let body = match reply.bytes().await {
            Ok(body) => body,
            Err(e) => return PushOutcome::retry(format!("APNs reply cut off: {}", http_client::describe(&e))),
        };
        if status == reqwest::StatusCode::FORBIDDEN {
            let reason = serde_json::from_slice::<ErrorReply>(&body).unwrap_or_default().reason;
            if matches!(reason.as_str(), "ExpiredProviderToken" | "InvalidProviderToken") {
                let wait = self.reject_token(&jwt);
                return PushOutcome::Retry { reason: format!("APNs 403 {reason}"), retry_after: retry_after.max(wait) };
            }
        }
        classify(status, retry_after, &body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::StatusCode;

    #[test]
    fn classification_follows_api_md() {
        let dead = |s: u16, body: &[u8]| {
            matches!(classify(StatusCode::from_u16(s).unwrap(), None, body), PushOutcome::DeadToken { .. })
        };
        assert!(dead(410, br#"{"reason":"Unregistered","timestamp":1}"#));
        assert!(dead(410, b""));
        assert!(dead(400, br#"{"reason":"BadDeviceToken"}"#));
        match classify(StatusCode::BAD_REQUEST, None, br#"{"reason":"DeviceTokenNotForTopic"}"#) {
            PushOutcome::Failed { reason } => assert_eq!(reason, "APNs 400 DeviceTokenNotForTopic"),
            other => panic!("{other:?}"),
        }
        let later = Some(Duration::from_secs(2));
        for status in [429, 500, 503] {
            let outcome = classify(StatusCode::from_u16(status).unwrap(), later, br#"{"reason":"TooManyRequests"}"#);
            assert!(matches!(outcome, PushOutcome::Retry { retry_after, .. } if retry_after == later), "{status}");
        }
        assert_eq!(classify(StatusCode::OK, None, b""), PushOutcome::Delivered);
    }
}
