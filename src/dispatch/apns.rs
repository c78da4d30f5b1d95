//! The APNs client: HTTP/2 over TLS to `{base}/3/device/{token}`, authenticated with an ES256
//! provider token signed with the team's `.p8` key, and the reply classified into a
//! [`PushOutcome`].
//!
//! Apple wants the provider token reused: a token is good for an hour, and a key's token replaced
//! more often than every 20 minutes is refused (`429 TooManyProviderTokenUpdates`) — whoever
//! replaced it. So the token lives in the store ([`ProviderTokenStore`]), one per key, and every
//! node, and every start of a node, sends the one kept there: a token is replaced once it is
//! [`RESIGN_AFTER`] (40 min) old, or after APNs called it expired or invalid — but never before
//! [`MIN_TOKEN_AGE`] (20 min). The node that finds it due first signs a new one and the store
//! keeps it; one racing it gets the kept one back in place of its own. Each node caches the token,
//! so a push costs no store round trip; a refresh is single-flight within the node. If the store
//! cannot be asked, the token in hand is used up to [`MAX_TOKEN_AGE`] (50 min) rather than one
//! signed alone, which APNs would refuse.
//!
//! Built on reqwest (`http2_prior_knowledge` over https, so ALPN offers `h2` alone) rather
//! than the `a2` crate, which always talks to Apple's own hosts and trusts only the system
//! roots: it could reach neither `kabao fake-push` nor a sandbox behind a proxy with its own CA.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use async_trait::async_trait;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::{Deserialize, Serialize};

use super::clock::{unix_ms, unix_s, SharedClock};
use super::http_client;
use super::{payload, PushOutcome, PushProvider};
use crate::store::{Device, IssuedCoupon, ProviderToken, ProviderTokenStore};

/// A provider token is re-signed once it is this old (Apple: between 20 and 60 minutes).
pub const RESIGN_AFTER: Duration = Duration::from_secs(40 * 60);
/// A provider token is never replaced younger than this (Apple refuses faster updates).
pub const MIN_TOKEN_AGE: Duration = Duration::from_secs(20 * 60);
/// A provider token is never sent older than this (API.md; Apple's limit is an hour), even while
/// the store cannot be asked for a newer one.
pub const MAX_TOKEN_AGE: Duration = Duration::from_secs(50 * 60);
/// After asking the store failed, the token in hand is used this long before asking again, so a
/// store that is down does not cost every push a store timeout.
const STORE_RETRY: Duration = Duration::from_secs(5);
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
    /// HTTP/2 connections to send over (`KABAO_PUSH_CONNECTIONS`, at least 1); one provider
    /// token serves them all (Apple counts tokens per key, not per connection).
    pub connections: usize,
    /// Wall clock for the token's `iat` and age.
    pub clock: SharedClock,
    /// Where the provider token every node uses is kept.
    pub tokens: Arc<dyn ProviderTokenStore>,
}

impl ApnsSettings {
    /// Reads the `.p8` key from `path`; the error names the file.
    pub fn read_key(path: &Path) -> anyhow::Result<String> {
        std::fs::read_to_string(path).with_context(|| format!("reading APNs key file {}", path.display()))
    }
}

/// The provider token in hand: the one the store kept, as this node last read it.
#[derive(Debug, Clone)]
struct CachedToken {
    /// `bearer` value.
    jwt: String,
    /// When it was signed (its `iat`), by whichever node signed it.
    issued_at: SystemTime,
    /// APNs called it expired or invalid: replace it as soon as [`MIN_TOKEN_AGE`] allows.
    rejected: bool,
    /// APNs answered `TooManyProviderTokenUpdates`: another token of the key is in use (another
    /// node replaced it), so read the store again before the next push.
    superseded: bool,
}

impl CachedToken {
    fn kept(token: ProviderToken) -> Self {
        let issued_at = UNIX_EPOCH + Duration::from_millis(token.issued_at_ms.max(0) as u64);
        Self { jwt: token.token, issued_at, rejected: false, superseded: false }
    }

    /// How old it is at `now`; a clock behind the signer's reads as age 0.
    fn age(&self, now: SystemTime) -> Duration {
        now.duration_since(self.issued_at).unwrap_or(Duration::ZERO)
    }

    /// Whether the store is to be asked for another before the next push.
    fn due(&self, now: SystemTime) -> bool {
        let age = self.age(now);
        self.superseded || age >= RESIGN_AFTER || (self.rejected && age >= MIN_TOKEN_AGE)
    }
}

/// The token in hand and how asking the store for one last went.
#[derive(Debug, Default)]
struct TokenState {
    current: Option<CachedToken>,
    /// When asking the store last failed (cleared when it answers).
    store_failed_at: Option<SystemTime>,
}

impl TokenState {
    /// The token to send at `now` without asking the store: the one in hand unless it is due —
    /// or, while the store failed within [`STORE_RETRY`], even if due, up to [`MAX_TOKEN_AGE`].
    fn usable(&self, now: SystemTime) -> Option<String> {
        let token = self.current.as_ref()?;
        let usable = !token.due(now) || (self.store_failed_recently(now) && token.age(now) < MAX_TOKEN_AGE);
        usable.then(|| token.jwt.clone())
    }

    /// Asking the store failed within [`STORE_RETRY`] of `now`.
    fn store_failed_recently(&self, now: SystemTime) -> bool {
        self.store_failed_at.is_some_and(|at| now.duration_since(at).unwrap_or(Duration::ZERO) < STORE_RETRY)
    }
}

/// The provider token's claims.
#[derive(Debug, Serialize)]
struct Claims<'a> {
    iss: &'a str,
    iat: i64,
}

/// The APNs provider.
pub struct ApnsProvider {
    /// HTTP/2 only; several connections.
    connections: http_client::Connections,
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
    /// The token in hand. A plain mutex, never held across an await: a push only reads it.
    token: parking_lot::Mutex<TokenState>,
    /// Held while asking the store, so concurrent pushes that find the token due ask once.
    refresh: tokio::sync::Mutex<()>,
    /// Where the token every node uses is kept.
    tokens: Arc<dyn ProviderTokenStore>,
    /// This key's name in [`Self::tokens`]: team, key id and a digest of the key itself, so a
    /// new key under an old id (a `kabao fake-push` started afresh) never inherits the old
    /// key's token.
    slot: String,
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
        let digest = ring::digest::digest(&ring::digest::SHA256, settings.key_pem.trim().as_bytes());
        let fingerprint: String = digest.as_ref()[..8].iter().map(|b| format!("{b:02x}")).collect();
        Ok(Self {
            connections: http_client::Connections::build(
                settings.connections,
                &settings.extra_roots,
                true,
                settings.timeout,
            )?,
            base_url,
            topic: settings.topic,
            slot: format!("apns:{}:{}:{fingerprint}", settings.team_id, settings.key_id),
            key_id: settings.key_id,
            team_id: settings.team_id,
            signing_key,
            token: parking_lot::Mutex::new(TokenState::default()),
            refresh: tokio::sync::Mutex::new(()),
            tokens: settings.tokens,
            clock: settings.clock,
        })
    }

    /// The token to send now: the one in hand, or — when there is none, it is [`RESIGN_AFTER`]
    /// old, or APNs rejected it and it is [`MIN_TOKEN_AGE`] old — the one the store keeps after
    /// offering it a newly signed one.
    async fn provider_token(&self) -> Result<String, String> {
        if let Some(jwt) = self.token.lock().usable(self.clock.now()) {
            return Ok(jwt);
        }
        let _single_flight = self.refresh.lock().await;
        let now = self.clock.now();
        let in_hand = {
            let state = self.token.lock();
            // Another push may have refreshed it while this one waited for the lock.
            if let Some(jwt) = state.usable(now) {
                return Ok(jwt);
            }
            if state.current.is_none() && state.store_failed_recently(now) {
                // No token in hand: the pushes queued behind a failed ask fail fast, not each
                // after a store timeout of its own.
                return Err("the store could not be asked for the APNs provider token a moment ago".into());
            }
            state.current.clone()
        };
        match self.shared_token(now, in_hand.as_ref()).await {
            Ok(token) => {
                let jwt = token.jwt.clone();
                *self.token.lock() = TokenState { current: Some(token), store_failed_at: None };
                Ok(jwt)
            }
            Err(reason) => {
                let mut state = self.token.lock();
                state.store_failed_at = Some(now);
                match state.current.as_ref().filter(|t| t.age(now) < MAX_TOKEN_AGE) {
                    Some(token) => {
                        tracing::warn!(%reason, "cannot refresh the APNs provider token; using the one in hand");
                        Ok(token.jwt.clone())
                    }
                    None => Err(reason),
                }
            }
        }
    }

    /// Offers the store a token signed now and answers the one it keeps (maybe another node's).
    async fn shared_token(&self, now: SystemTime, in_hand: Option<&CachedToken>) -> Result<CachedToken, String> {
        let candidate = ProviderToken { token: self.sign(now)?, issued_at_ms: unix_ms(now) };
        let ask = |candidate: ProviderToken, replace_after: Duration| {
            let replace_after_ms = replace_after.as_millis() as i64;
            async move {
                self.tokens
                    .provider_token(&self.slot, candidate, replace_after_ms)
                    .await
                    .map_err(|e| format!("reading the APNs provider token from the store: {e}"))
            }
        };
        let signed = candidate.token.clone();
        let mut kept = ask(candidate.clone(), RESIGN_AFTER).await?;
        let rejected_still_kept = in_hand.is_some_and(|t| t.rejected && t.jwt == kept.token);
        if rejected_still_kept {
            // APNs refused the token the store still keeps, and it is old enough to replace.
            kept = ask(candidate, MIN_TOKEN_AGE).await?;
        }
        if kept.token == signed {
            tracing::info!(slot = %self.slot, "signed a new APNs provider token; the store keeps it for every node");
        } else {
            tracing::debug!(slot = %self.slot, "using the APNs provider token the store keeps");
        }
        let mut token = CachedToken::kept(kept);
        if token.jwt == signed {
            // The store keeps whole milliseconds; the instant it was signed is known exactly here.
            token.issued_at = now;
        }
        // Still the token APNs refused (too young to replace): it stays marked.
        token.rejected = in_hand.is_some_and(|t| t.rejected && t.jwt == token.jwt);
        Ok(token)
    }

    /// A provider token with `iat` = `now`.
    fn sign(&self, now: SystemTime) -> Result<String, String> {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(self.key_id.clone());
        let claims = Claims { iss: &self.team_id, iat: unix_s(now) };
        jsonwebtoken::encode(&header, &claims, &self.signing_key)
            .map_err(|e| format!("signing the APNs provider token: {e}"))
    }

    /// APNs refused `jwt` as expired or invalid: mark it for replacement. Returns how long until
    /// it may be replaced (the earliest worth retrying).
    fn reject_token(&self, jwt: &str) -> Option<Duration> {
        let mut state = self.token.lock();
        let token = state.current.as_mut().filter(|t| t.jwt == jwt)?;
        token.rejected = true;
        let age = token.age(self.clock.now());
        MIN_TOKEN_AGE.checked_sub(age).filter(|d| !d.is_zero())
    }

    /// APNs answered `TooManyProviderTokenUpdates` to `jwt`: another token of the key is in use,
    /// so the next push reads the store again.
    fn supersede_token(&self, jwt: &str) {
        if let Some(token) = self.token.lock().current.as_mut().filter(|t| t.jwt == jwt) {
            token.superseded = true;
        }
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
        let jwt = match self.provider_token().await {
            Ok(jwt) => jwt,
            Err(reason) => return PushOutcome::retry(reason),
        };
        let connection = self.connections.pick().await;
        let mut builder = connection
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
        if matches!(status.as_u16(), 403 | 429) {
            let reason = serde_json::from_slice::<ErrorReply>(&body).unwrap_or_default().reason;
            match reason.as_str() {
                "ExpiredProviderToken" | "InvalidProviderToken" => {
                    let wait = self.reject_token(&jwt);
                    return PushOutcome::Retry {
                        reason: format!("APNs 403 {reason}"),
                        retry_after: retry_after.max(wait),
                    };
                }
                // A retry, as any 429; the retry sends the token the store keeps now.
                "TooManyProviderTokenUpdates" => self.supersede_token(&jwt),
                _ => {}
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
