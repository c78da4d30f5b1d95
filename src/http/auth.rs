//! Who is calling: the admin (a shared bearer token) or a mobile client (an HS256 JWT whose `sub`
//! is its user id), and what each may do (API.md "Auth").
//!
//! Handlers take [`Caller`] (anyone authenticated) or [`Admin`] (admin only) as their first
//! extractor, so a request without a valid token is refused with 401 before its body is read.
//!
//! A client JWT is accepted when: HS256 over the client secret (or, during a rotation, the
//! previous one); `exp` in the future and `nbf`, when present, not — both without leeway, so
//! issuers should not stamp `nbf` ahead of their own clock; `iat`, when present, not more than
//! [`IAT_FUTURE_SKEW_S`] ahead; with a maximum lifetime configured (the default, a day), `iat`
//! present and `exp − iat` within it; `aud` containing the configured audience when one is
//! configured (any `aud`, or none, otherwise); `iss` equal to the configured issuer likewise.

use axum::extract::FromRequestParts;
use axum::http::{header, request::Parts, HeaderMap};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use subtle::ConstantTimeEq;

use super::error::ApiError;
use super::AppState;
use crate::config::{JwtConfig, Secret};
use crate::domain::UserId;

/// How far ahead of the server clock a token's `iat` may be (clocks of issuers drift a little;
/// a token "issued" a year from now would make the lifetime cap meaningless).
pub const IAT_FUTURE_SKEW_S: i64 = 60;

/// The keys that decide who a caller is.
pub struct Auth {
    /// Compared in constant time with the presented token.
    admin_token: Secret,
    /// HS256 key of client JWTs.
    client_key: DecodingKey,
    /// The previous client secret's key, accepted during a rotation.
    previous_key: Option<DecodingKey>,
    /// HS256 only, `exp` required, `exp` and `nbf` checked without leeway, `aud`/`iss` as set.
    validation: Validation,
    /// Longest accepted `exp − iat`; when set, `iat` is required.
    max_lifetime_s: Option<u64>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth").field("admin_token", &self.admin_token).finish_non_exhaustive()
    }
}

/// The claims kabao reads from a client JWT (`exp`, `nbf`, `aud`, `iss` are checked by the
/// validation itself).
#[derive(Deserialize)]
struct Claims {
    sub: String,
    exp: i64,
    iat: Option<i64>,
}

impl Auth {
    /// Keys from the configured admin token and client secrets, with `jwt`'s checks.
    pub fn new(admin_token: Secret, client_secret: &Secret, previous: Option<&Secret>, jwt: &JwtConfig) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        // API.md: `exp` checked. No grace period: an expired token is expired, and a token
        // not yet valid is not valid.
        validation.leeway = 0;
        validation.validate_nbf = true;
        let mut required = vec!["exp", "sub"];
        match &jwt.audience {
            Some(audience) => {
                validation.set_audience(&[audience]);
                required.push("aud");
            }
            // No audience configured: a token naming one is still kabao's to accept.
            None => validation.validate_aud = false,
        }
        if let Some(issuer) = &jwt.issuer {
            validation.set_issuer(&[issuer]);
            required.push("iss");
        }
        validation.set_required_spec_claims(&required);
        Self {
            admin_token,
            client_key: DecodingKey::from_secret(client_secret.expose().as_bytes()),
            previous_key: previous.map(|p| DecodingKey::from_secret(p.expose().as_bytes())),
            validation,
            max_lifetime_s: jwt.max_lifetime_s,
        }
    }

    /// Decides who presented `token`.
    pub fn identify(&self, token: &str) -> Result<Caller, ApiError> {
        if bool::from(token.as_bytes().ct_eq(self.admin_token.expose().as_bytes())) {
            return Ok(Caller::Admin);
        }
        let mut decoded = jsonwebtoken::decode::<Claims>(token, &self.client_key, &self.validation);
        if let (Err(e), Some(previous)) = (&decoded, &self.previous_key) {
            // Only a signature made with another key may be the previous secret's.
            if matches!(e.kind(), jsonwebtoken::errors::ErrorKind::InvalidSignature) {
                decoded = jsonwebtoken::decode::<Claims>(token, previous, &self.validation);
            }
        }
        let data = decoded.map_err(|e| {
            tracing::debug!(error = %e, "client token refused");
            match e.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => ApiError::Unauthorized("the token has expired"),
                jsonwebtoken::errors::ErrorKind::ImmatureSignature => {
                    ApiError::Unauthorized("the token is not valid yet (nbf)")
                }
                _ => ApiError::Unauthorized("the bearer token is not valid"),
            }
        })?;
        let claims = data.claims;
        if let Some(iat) = claims.iat {
            if iat > crate::engine::now_ms() / 1000 + IAT_FUTURE_SKEW_S {
                return Err(ApiError::Unauthorized("the token's iat is in the future"));
            }
        }
        if let Some(max) = self.max_lifetime_s {
            let iat = claims.iat.ok_or(ApiError::Unauthorized("the token has no iat, so its lifetime is unknown"))?;
            if claims.exp.saturating_sub(iat) > i64::try_from(max).unwrap_or(i64::MAX) {
                return Err(ApiError::Unauthorized("the token's lifetime (exp − iat) is longer than allowed"));
            }
        }
        let user = UserId::parse("sub", &claims.sub)
            .map_err(|_| ApiError::Unauthorized("the token's sub is not a valid user id"))?;
        Ok(Caller::Client(user))
    }
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// Marketing staff, ops, a gateway: may call everything.
    Admin,
    /// A mobile client, acting for this user only.
    Client(UserId),
}

impl Caller {
    /// Allows the admin and the client whose `sub` is `user`; 403 for any other client.
    pub fn may_act_for(&self, user: &str) -> Result<(), ApiError> {
        match self {
            Caller::Admin => Ok(()),
            Caller::Client(sub) if sub.as_str() == user => Ok(()),
            Caller::Client(_) => Err(ApiError::Forbidden("this token may only act for its own user")),
        }
    }
}

/// The bearer token of a request's `Authorization` header; 401 when there is none.
pub fn bearer(headers: &HeaderMap) -> Result<&str, ApiError> {
    let value =
        headers.get(header::AUTHORIZATION).ok_or(ApiError::Unauthorized("missing Authorization: Bearer token"))?;
    let value = value.to_str().map_err(|_| ApiError::Unauthorized("the Authorization header is not text"))?;
    let (scheme, token) =
        value.split_once(' ').ok_or(ApiError::Unauthorized("the Authorization header must be `Bearer <token>`"))?;
    if !scheme.eq_ignore_ascii_case("bearer") || token.trim().is_empty() {
        return Err(ApiError::Unauthorized("the Authorization header must be `Bearer <token>`"));
    }
    Ok(token.trim())
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        // The admission layer identified API callers already.
        if let Some(caller) = parts.extensions.get::<Caller>() {
            return Ok(caller.clone());
        }
        state.auth.identify(bearer(&parts.headers)?)
    }
}

/// An admin caller; a client token is refused with 403.
#[derive(Debug, Clone, Copy)]
pub struct Admin;

impl FromRequestParts<AppState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        match Caller::from_request_parts(parts, state).await? {
            Caller::Admin => Ok(Admin),
            Caller::Client(_) => Err(ApiError::Forbidden("this endpoint needs the admin token")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};

    fn auth() -> Auth {
        Auth::new(Secret::new("admin"), &Secret::new("client-secret"), None, &JwtConfig::default())
    }

    fn now_s() -> i64 {
        crate::engine::now_ms() / 1000
    }

    fn jwt(secret: &str, claims: serde_json::Value) -> String {
        encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(secret.as_bytes())).unwrap()
    }

    fn exp(offset_s: i64) -> i64 {
        crate::engine::now_ms() / 1000 + offset_s
    }

    #[test]
    fn admin_token_and_client_jwt() {
        let a = auth();
        assert_eq!(a.identify("admin").unwrap(), Caller::Admin);
        let t = jwt("client-secret", serde_json::json!({"sub": "u-1", "exp": exp(600), "iat": now_s()}));
        assert_eq!(a.identify(&t).unwrap(), Caller::Client(UserId::parse("sub", "u-1").unwrap()));
        // No audience configured: a token naming one is accepted.
        let t = jwt("client-secret", serde_json::json!({"sub": "u-1", "exp": exp(600), "iat": now_s(), "aud": "x"}));
        assert!(a.identify(&t).is_ok());
    }

    #[test]
    fn nbf_lifetime_audience_issuer_and_rotation() {
        let jwt_config =
            JwtConfig { max_lifetime_s: Some(3600), audience: Some("kabao".into()), issuer: Some("idp".into()) };
        let a = Auth::new(Secret::new("admin"), &Secret::new("new"), Some(&Secret::new("old")), &jwt_config);
        let good = serde_json::json!({"sub": "u", "exp": exp(600), "iat": now_s(), "aud": "kabao", "iss": "idp"});
        let with = |key: &str, value: serde_json::Value| {
            let mut claims = good.clone();
            claims[key] = value;
            claims
        };
        let without = |key: &str| {
            let mut claims = good.clone();
            claims.as_object_mut().unwrap().remove(key);
            claims
        };
        assert!(a.identify(&jwt("new", good.clone())).is_ok());
        assert!(a.identify(&jwt("old", good.clone())).is_ok(), "the previous secret verifies during a rotation");
        assert!(a.identify(&jwt("other", good.clone())).is_err());
        assert!(a.identify(&jwt("new", with("aud", serde_json::json!(["other", "kabao"])))).is_ok());
        for refused in [
            with("nbf", serde_json::json!(now_s() + 30)),
            with("aud", serde_json::json!("other")),
            without("aud"),
            with("iss", serde_json::json!("evil")),
            without("iss"),
            without("iat"),
            // Lifetime 3601 s > 3600.
            with("iat", serde_json::json!(exp(600) - 3601)),
            with("iat", serde_json::json!(now_s() + 3600)),
        ] {
            assert!(matches!(a.identify(&jwt("new", refused.clone())), Err(ApiError::Unauthorized(_))), "{refused}");
        }
        // Exactly the maximum lifetime is allowed; nbf now or past too.
        assert!(a.identify(&jwt("new", with("iat", serde_json::json!(exp(600) - 3600)))).is_ok());
        assert!(a.identify(&jwt("new", with("nbf", serde_json::json!(now_s() - 1)))).is_ok());
    }

    #[test]
    fn no_maximum_lifetime_needs_no_iat() {
        let jwt_config = JwtConfig { max_lifetime_s: None, ..JwtConfig::default() };
        let a = Auth::new(Secret::new("admin"), &Secret::new("s"), None, &jwt_config);
        assert!(a.identify(&jwt("s", serde_json::json!({"sub": "u", "exp": exp(10 * 86_400)}))).is_ok());
    }

    #[test]
    fn bad_tokens_are_refused() {
        let a = auth();
        for t in [
            "admin2".to_owned(),
            jwt("other-secret", serde_json::json!({"sub": "u", "exp": exp(600)})),
            jwt("client-secret", serde_json::json!({"sub": "u", "exp": exp(-1)})),
            jwt("client-secret", serde_json::json!({"sub": "u"})),
            jwt("client-secret", serde_json::json!({"exp": exp(600)})),
            jwt("client-secret", serde_json::json!({"sub": "", "exp": exp(600)})),
        ] {
            assert!(matches!(a.identify(&t), Err(ApiError::Unauthorized(_))), "{t}");
        }
    }
}
