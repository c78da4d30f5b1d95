//! The FCM HTTP v1 client: OAuth2 access tokens from a Google service-account key, then
//! `POST {base}/v1/projects/{project}/messages:send`, and the reply classified into a
//! [`PushOutcome`].
//!
//! The token is the service-account JWT-bearer grant (RFC 7523): an RS256 assertion signed with
//! the key's `private_key` (`iss` = `client_email`, `scope` = firebase.messaging, `aud` = the
//! key's `token_uri`, one hour at most), form-posted to `token_uri`, answered with
//! `access_token` and `expires_in`. Written on `jsonwebtoken` rather than `gcp_auth`, whose
//! service-account flow builds its own HTTP client: it cannot be told to trust
//! `KABAO_PUSH_CA_FILE`, so it could never reach a local fake or a TLS-inspecting proxy.
//!
//! One token serves every send until five minutes before it expires; the refresh happens under
//! a lock, so concurrent sends that find it stale wait for one request instead of each making
//! their own. A `401` from FCM drops the cached token (the next attempt fetches a new one).

use std::path::Path;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use async_trait::async_trait;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::header::HeaderValue;
use serde::{Deserialize, Serialize};

use super::clock::{unix_ms, unix_s, SharedClock};
use super::http_client;
use super::{payload, PushOutcome, PushProvider};
use crate::store::{Device, IssuedCoupon};

/// The OAuth2 scope FCM v1 requires.
pub const FCM_SCOPE: &str = "https://www.googleapis.com/auth/firebase.messaging";
/// The grant type of a service-account assertion.
pub const JWT_BEARER_GRANT: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
/// A cached token is replaced this long before it expires (and never used past half its life
/// when it lives shorter than twice this).
const REFRESH_MARGIN: Duration = Duration::from_secs(300);
/// Lifetime asked of Google for an assertion (its maximum).
const ASSERTION_LIFETIME_S: i64 = 3600;

/// The members of a Google service-account JSON key that kabao uses.
#[derive(Clone, Deserialize)]
pub struct ServiceAccountKey {
    /// The account, the assertion's `iss`.
    pub client_email: String,
    /// RSA private key, PEM (PKCS#8 as Google issues it, or PKCS#1).
    pub private_key: String,
    /// Sent as the JWT header `kid` when present, so Google picks the right public key.
    #[serde(default)]
    pub private_key_id: Option<String>,
    /// Where the assertion is exchanged for an access token (and its `aud`).
    pub token_uri: String,
    /// The Firebase project, unless configured otherwise.
    #[serde(default)]
    pub project_id: Option<String>,
}

impl std::fmt::Debug for ServiceAccountKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceAccountKey")
            .field("client_email", &self.client_email)
            .field("token_uri", &self.token_uri)
            .field("project_id", &self.project_id)
            .finish_non_exhaustive()
    }
}

impl ServiceAccountKey {
    /// Reads and parses a key file; every error names the file.
    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading FCM service-account key {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| {
            format!(
                "FCM service-account key {} is not a Google service-account JSON key \
                 (client_email, private_key, token_uri)",
                path.display()
            )
        })
    }
}

/// Everything an [`FcmProvider`] needs.
#[derive(Clone)]
pub struct FcmSettings {
    /// The service account.
    pub key: ServiceAccountKey,
    /// Firebase project id (the URL's `{project}`).
    pub project_id: String,
    /// `https://fcm.googleapis.com` or a fake's.
    pub base_url: String,
    /// Extra trusted roots (`KABAO_PUSH_CA_FILE`).
    pub extra_roots: Vec<reqwest::Certificate>,
    /// Deadline of one request (token or send).
    pub timeout: Duration,
    /// HTTPS connections to send over (`KABAO_PUSH_CONNECTIONS`, at least 1); one access token
    /// serves them all.
    pub connections: usize,
    /// Wall clock for token lifetimes.
    pub clock: SharedClock,
}

/// An access token and when it stops being used.
#[derive(Debug, Clone)]
struct CachedToken {
    /// `Bearer <token>`, made once per token rather than per push.
    value: HeaderValue,
    /// After this, a new one is fetched.
    refresh_at: SystemTime,
}

/// Why no access token could be had; always a retry, since the push itself is fine.
#[derive(Debug)]
struct TokenError {
    reason: String,
    retry_after: Option<Duration>,
}

/// The FCM HTTP v1 provider.
pub struct FcmProvider {
    /// HTTP/2 where the server offers it, else HTTP/1.1; several connections.
    connections: http_client::Connections,
    /// `{base}/v1/projects/{project}/messages:send`.
    send_url: reqwest::Url,
    /// The assertion signing key.
    signing_key: EncodingKey,
    /// The service account's email, key id and token endpoint.
    key: ServiceAccountKey,
    /// The current access token; the lock is also what makes a refresh single-flight.
    token: tokio::sync::Mutex<Option<CachedToken>>,
    /// Wall clock.
    clock: SharedClock,
}

impl std::fmt::Debug for FcmProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FcmProvider").field("send_url", &self.send_url.as_str()).finish_non_exhaustive()
    }
}

/// The assertion's claims.
#[derive(Debug, Serialize)]
struct AssertionClaims<'a> {
    iss: &'a str,
    scope: &'a str,
    aud: &'a str,
    iat: i64,
    exp: i64,
}

/// The token endpoint's answer.
#[derive(Debug, Deserialize)]
struct TokenReply {
    access_token: String,
    /// Seconds; Google answers 3599.
    expires_in: u64,
}

impl FcmProvider {
    /// A provider for `settings`; fails on a key that is not an RSA PEM or a bad base URL.
    pub fn new(settings: FcmSettings) -> anyhow::Result<Self> {
        let signing_key = EncodingKey::from_rsa_pem(settings.key.private_key.as_bytes())
            .context("the service-account private_key is not an RSA private key in PEM form")?;
        let mut send_url = reqwest::Url::parse(&settings.base_url)
            .with_context(|| format!("FCM base URL {:?} is not a URL", settings.base_url))?;
        send_url
            .path_segments_mut()
            .map_err(|()| anyhow::anyhow!("FCM base URL {:?} cannot take a path", settings.base_url))?
            .pop_if_empty()
            .extend(["v1", "projects", &settings.project_id, "messages:send"]);
        reqwest::Url::parse(&settings.key.token_uri)
            .with_context(|| format!("the service account's token_uri {:?} is not a URL", settings.key.token_uri))?;
        Ok(Self {
            connections: http_client::Connections::build(
                settings.connections,
                &settings.extra_roots,
                false,
                settings.timeout,
            )?,
            send_url,
            signing_key,
            key: settings.key,
            token: tokio::sync::Mutex::new(None),
            clock: settings.clock,
        })
    }

    /// The current access token as an `Authorization` value, fetching a new one when there is
    /// none or it is due.
    async fn access_token(&self) -> Result<HeaderValue, TokenError> {
        let mut cached = self.token.lock().await;
        let now = self.clock.now();
        if let Some(token) = cached.as_ref().filter(|t| now < t.refresh_at) {
            return Ok(token.value.clone());
        }
        let fresh = self.fetch_token(now).await?;
        let value = fresh.value.clone();
        *cached = Some(fresh);
        Ok(value)
    }

    /// Forgets `rejected` (FCM said 401), unless a newer token already replaced it.
    async fn invalidate(&self, rejected: &HeaderValue) {
        let mut cached = self.token.lock().await;
        if cached.as_ref().is_some_and(|t| t.value == *rejected) {
            *cached = None;
        }
    }

    /// One JWT-bearer grant at the key's `token_uri`.
    async fn fetch_token(&self, now: SystemTime) -> Result<CachedToken, TokenError> {
        let iat = unix_s(now);
        let claims = AssertionClaims {
            iss: &self.key.client_email,
            scope: FCM_SCOPE,
            aud: &self.key.token_uri,
            iat,
            exp: iat + ASSERTION_LIFETIME_S,
        };
        let mut header = Header::new(Algorithm::RS256);
        header.kid = self.key.private_key_id.clone();
        let assertion = jsonwebtoken::encode(&header, &claims, &self.signing_key)
            .map_err(|e| TokenError { reason: format!("signing the OAuth2 assertion: {e}"), retry_after: None })?;
        let connection = self.connections.pick().await;
        let reply = connection
            .client
            .post(&self.key.token_uri)
            .form(&[("grant_type", JWT_BEARER_GRANT), ("assertion", &assertion)])
            .send()
            .await
            .map_err(|e| TokenError {
                reason: format!("token endpoint unreachable: {}", http_client::describe(&e)),
                retry_after: None,
            })?;
        let status = reply.status();
        let retry_after = http_client::retry_after(reply.headers());
        let body = reply.bytes().await.map_err(|e| TokenError {
            reason: format!("token endpoint reply cut off: {}", http_client::describe(&e)),
            retry_after,
        })?;
        if !status.is_success() {
            // Also a 400 `invalid_grant` (a skewed clock, a revoked key): the push is not at
            // fault, and the attempts left give an operator time to fix the account.
            return Err(TokenError {
                reason: format!("token endpoint answered {status}: {}", snippet(&body)),
                retry_after,
            });
        }
        let token: TokenReply = serde_json::from_slice(&body).map_err(|e| TokenError {
            reason: format!("token endpoint reply is not an access token: {e}"),
            retry_after: None,
        })?;
        let lifetime = Duration::from_secs(token.expires_in);
        let margin = REFRESH_MARGIN.min(lifetime / 2);
        let mut value = HeaderValue::try_from(format!("Bearer {}", token.access_token)).map_err(|_| TokenError {
            reason: "token endpoint answered an access token that cannot be a header".into(),
            retry_after: None,
        })?;
        value.set_sensitive(true);
        tracing::debug!(expires_in = token.expires_in, "fetched an FCM access token");
        Ok(CachedToken { value, refresh_at: now + lifetime - margin })
    }
}

/// FCM's error body: `{"error": {"code", "message", "status", "details": [{"@type", "errorCode"}]}}`.
#[derive(Debug, Default, Deserialize)]
struct ErrorReply {
    #[serde(default)]
    error: ErrorBody,
}

#[derive(Debug, Default, Deserialize)]
struct ErrorBody {
    #[serde(default)]
    message: String,
    #[serde(default)]
    status: String,
    #[serde(default)]
    details: Vec<ErrorDetail>,
}

#[derive(Debug, Deserialize)]
struct ErrorDetail {
    #[serde(rename = "errorCode", default)]
    error_code: Option<String>,
}

impl ErrorBody {
    /// The `FcmError` code among the details (`UNREGISTERED`, `QUOTA_EXCEEDED`, …).
    fn fcm_code(&self) -> Option<&str> {
        self.details.iter().find_map(|d| d.error_code.as_deref())
    }

    fn describe(&self, status: reqwest::StatusCode) -> String {
        let code = self.fcm_code().unwrap_or(&self.status);
        format!("FCM {} {code}: {}", status.as_u16(), self.message)
    }
}

/// Classifies FCM's answer (API.md "Pushes": outcomes).
fn classify(status: reqwest::StatusCode, retry_after: Option<Duration>, body: &[u8]) -> PushOutcome {
    if status.is_success() {
        return PushOutcome::Delivered;
    }
    let error = serde_json::from_slice::<ErrorReply>(body).unwrap_or_default().error;
    let reason = error.describe(status);
    match status.as_u16() {
        404 if error.fcm_code() == Some("UNREGISTERED") => PushOutcome::DeadToken { reason },
        429 | 500..=599 => PushOutcome::Retry { reason, retry_after },
        _ => PushOutcome::Failed { reason },
    }
}

/// The first bytes of a body, for a log line.
fn snippet(body: &[u8]) -> String {
    String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned()
}

#[async_trait]
impl PushProvider for FcmProvider {
    fn name(&self) -> &'static str {
        "fcm"
    }

    async fn send(&self, device: &Device, coupon: &IssuedCoupon) -> PushOutcome {
        let token = match self.access_token().await {
            Ok(token) => token,
            Err(e) => return PushOutcome::Retry { reason: e.reason, retry_after: e.retry_after },
        };
        let body = payload::fcm_body(&device.token, coupon, unix_ms(self.clock.now()));
        let connection = self.connections.pick().await;
        let reply = connection
            .client
            .post(self.send_url.clone())
            .header(reqwest::header::AUTHORIZATION, token.clone())
            .header(reqwest::header::CONTENT_TYPE, HeaderValue::from_static("application/json"))
            .body(body)
            .send()
            .await;
        let reply = match reply {
            Ok(reply) => reply,
            Err(e) => return PushOutcome::retry(format!("FCM unreachable: {}", http_client::describe(&e))),
        };
        let status = reply.status();
        let retry_after = http_client::retry_after(reply.headers());
        let body = match reply.bytes().await {
            Ok(body) => body,
            Err(e) => return PushOutcome::retry(format!("FCM reply cut off: {}", http_client::describe(&e))),
        };
        if status == reqwest::StatusCode::UNAUTHORIZED {
            self.invalidate(&token).await;
            return PushOutcome::Retry {
                reason: format!("FCM refused the access token: {}", snippet(&body)),
                retry_after,
            };
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
        let unregistered = br#"{"error":{"code":404,"message":"Requested entity was not found.","status":"NOT_FOUND",
            "details":[{"@type":"type.googleapis.com/google.firebase.fcm.v1.FcmError","errorCode":"UNREGISTERED"}]}}"#;
        assert!(matches!(classify(StatusCode::NOT_FOUND, None, unregistered), PushOutcome::DeadToken { .. }));
        let not_found = br#"{"error":{"code":404,"message":"no such project","status":"NOT_FOUND"}}"#;
        assert!(matches!(classify(StatusCode::NOT_FOUND, None, not_found), PushOutcome::Failed { .. }));
        let invalid = br#"{"error":{"code":400,"message":"bad token","status":"INVALID_ARGUMENT",
            "details":[{"@type":"type.googleapis.com/google.firebase.fcm.v1.FcmError","errorCode":"INVALID_ARGUMENT"}]}}"#;
        match classify(StatusCode::BAD_REQUEST, None, invalid) {
            PushOutcome::Failed { reason } => assert_eq!(reason, "FCM 400 INVALID_ARGUMENT: bad token"),
            other => panic!("{other:?}"),
        }
        let later = Some(Duration::from_secs(3));
        for status in [429, 500, 503] {
            let outcome = classify(StatusCode::from_u16(status).unwrap(), later, b"not json");
            assert!(matches!(outcome, PushOutcome::Retry { retry_after, .. } if retry_after == later), "{status}");
        }
        assert_eq!(classify(StatusCode::OK, None, b"{}"), PushOutcome::Delivered);
    }
}
