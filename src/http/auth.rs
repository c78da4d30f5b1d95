//! Who is calling: the admin (a shared bearer token) or a mobile client (an HS256 JWT whose `sub`
//! is its user id), and what each may do (API.md "Auth").
//!
//! Handlers take [`Caller`] (anyone authenticated) or [`Admin`] (admin only) as their first
//! extractor, so a request without a valid token is refused with 401 before its body is read.

use axum::extract::FromRequestParts;
use axum::http::{header, request::Parts};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use subtle::ConstantTimeEq;

use super::error::ApiError;
use super::AppState;
use crate::config::Secret;
use crate::domain::UserId;

/// The keys that decide who a caller is.
pub struct Auth {
    /// Compared in constant time with the presented token.
    admin_token: Secret,
    /// HS256 key of client JWTs.
    client_key: DecodingKey,
    /// HS256 only, `exp` required and checked without leeway.
    validation: Validation,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth").field("admin_token", &self.admin_token).finish_non_exhaustive()
    }
}

/// The claims kabao reads from a client JWT (`exp` is checked by the validation itself).
#[derive(Deserialize)]
struct Claims {
    sub: String,
}

impl Auth {
    /// Keys from the configured admin token and client secret.
    pub fn new(admin_token: Secret, client_secret: &Secret) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        // API.md: `exp` checked. No grace period: an expired token is expired.
        validation.leeway = 0;
        validation.set_required_spec_claims(&["exp", "sub"]);
        Self { admin_token, client_key: DecodingKey::from_secret(client_secret.expose().as_bytes()), validation }
    }

    /// Decides who presented `token`.
    pub fn identify(&self, token: &str) -> Result<Caller, ApiError> {
        if bool::from(token.as_bytes().ct_eq(self.admin_token.expose().as_bytes())) {
            return Ok(Caller::Admin);
        }
        let data = jsonwebtoken::decode::<Claims>(token, &self.client_key, &self.validation).map_err(|e| {
            tracing::debug!(error = %e, "client token refused");
            match e.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => ApiError::Unauthorized("the token has expired"),
                _ => ApiError::Unauthorized("the bearer token is not valid"),
            }
        })?;
        let user = UserId::parse("sub", &data.claims.sub)
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

fn bearer(parts: &Parts) -> Result<&str, ApiError> {
    let value = parts
        .headers
        .get(header::AUTHORIZATION)
        .ok_or(ApiError::Unauthorized("missing Authorization: Bearer token"))?;
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
        state.auth.identify(bearer(parts)?)
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
        Auth::new(Secret::new("admin"), &Secret::new("client-secret"))
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
        let t = jwt("client-secret", serde_json::json!({"sub": "u-1", "exp": exp(600)}));
        assert_eq!(a.identify(&t).unwrap(), Caller::Client(UserId::parse("sub", "u-1").unwrap()));
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
