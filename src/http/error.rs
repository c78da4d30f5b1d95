//! The one error type of the HTTP edge, and the one `match` that turns it into a status and the
//! body `{"error": {"code", "message", "field"?}}` of API.md.
//!
//! Every 4xx says what was wrong in words a client can act on. Every 5xx body is opaque (it says
//! only that something failed); its cause is logged here, once.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use crate::domain::{FieldError, InputError};
use crate::store::{RedeemError, StoreError};

/// Seconds a client is told to wait (`Retry-After`) after a 429 or 503.
pub const RETRY_AFTER_S: u32 = 1;

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The body is not JSON or not the expected shape (`400 malformed_json`).
    #[error("{message}")]
    Malformed {
        /// What the parser said.
        message: String,
        /// Where, when known.
        field: Option<String>,
    },
    /// A value is out of range or inconsistent (`422 invalid_field`).
    #[error("{0}")]
    Invalid(FieldError),
    /// No token, or one that does not verify (`401 unauthorized`).
    #[error("{0}")]
    Unauthorized(&'static str),
    /// A valid token that may not do this (`403 forbidden`).
    #[error("{0}")]
    Forbidden(&'static str),
    /// Unknown campaign, coupon, device or route (`404 not_found`).
    #[error("{0}")]
    NotFound(String),
    /// Wrong method for a known route (`405 method_not_allowed`).
    #[error("this method is not allowed on this path")]
    MethodNotAllowed,
    /// Campaign id taken, coupon already redeemed (`409 conflict`).
    #[error("{0}")]
    Conflict(String),
    /// Coupon past its expiry (`410 expired`).
    #[error("the coupon expired")]
    Expired,
    /// Body over the configured limit (`413 payload_too_large`).
    #[error("the request body is larger than this endpoint accepts")]
    PayloadTooLarge,
    /// Too many requests in flight (`429 overloaded`).
    #[error("the server is at capacity; retry shortly")]
    Overloaded,
    /// A per-caller rate limit is exhausted (`429 rate_limited`); `Retry-After` says when a
    /// request is allowed again.
    #[error("too many requests; retry after {retry_after_s} s")]
    RateLimited {
        /// Whole seconds until the bucket has a token again (≥ 1).
        retry_after_s: u64,
    },
    /// The request head (line and headers) is over the limit (`431 headers_too_large`).
    #[error("the request headers are larger than this server accepts")]
    HeadersTooLarge,
    /// The request target is over the limit (`414 uri_too_long`).
    #[error("the request URI is longer than this server accepts")]
    UriTooLong,
    /// The body arrived slower than the minimum rate (`408 request_timeout`).
    #[error("the request body arrived too slowly")]
    RequestTimeout,
    /// Not an HTTP request hyper could parse (`400 malformed_request`).
    #[error("the request is not well-formed HTTP")]
    MalformedRequest,
    /// The store is down, or the request took too long (`503 unavailable`); nothing was applied.
    #[error("{0}")]
    Unavailable(String),
    /// The store answers without its data (a Redis restarted empty): `503 unavailable` with a
    /// message saying so, on `/readyz` (store-backed requests say only "unavailable").
    #[error("the store lost its data (its identity is missing or different): restore it, or accept it as it is with `kabao store adopt`; see the log")]
    StoreLost,
    /// A bug or an unexpected failure (`500 internal`); the cause is logged, not shown.
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    /// The status and the `error.code` of this error.
    pub fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::Malformed { .. } => (StatusCode::BAD_REQUEST, "malformed_json"),
            ApiError::Invalid(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_field"),
            ApiError::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthorized"),
            ApiError::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            ApiError::MethodNotAllowed => (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
            ApiError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            ApiError::Expired => (StatusCode::GONE, "expired"),
            ApiError::PayloadTooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
            ApiError::Overloaded => (StatusCode::TOO_MANY_REQUESTS, "overloaded"),
            ApiError::RateLimited { .. } => (StatusCode::TOO_MANY_REQUESTS, "rate_limited"),
            ApiError::HeadersTooLarge => (StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, "headers_too_large"),
            ApiError::UriTooLong => (StatusCode::URI_TOO_LONG, "uri_too_long"),
            ApiError::RequestTimeout => (StatusCode::REQUEST_TIMEOUT, "request_timeout"),
            ApiError::MalformedRequest => (StatusCode::BAD_REQUEST, "malformed_request"),
            ApiError::Unavailable(_) | ApiError::StoreLost => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            ApiError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }

    /// A 422 on `field`.
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError::Invalid(FieldError::new(field, message))
    }

    /// The error object (`{"code", "message", "field"?}`) as replies and batch rejections carry it.
    pub fn body(&self) -> ErrorObject {
        let (_, code) = self.status_and_code();
        let (message, field) = match self {
            ApiError::Malformed { message, field } => (message.clone(), field.clone()),
            ApiError::Invalid(e) => (e.message.clone(), Some(e.field.clone())),
            // Opaque: the cause is in the log, not in the reply.
            ApiError::Internal(_) => ("an internal error occurred".to_owned(), None),
            ApiError::Unavailable(_) => ("a dependency is unavailable; retry shortly".to_owned(), None),
            other => (other.to_string(), None),
        };
        ErrorObject { code, message, field }
    }
}

/// `{"error": {...}}`: the body of every 4xx and 5xx.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// What went wrong.
    pub error: ErrorObject,
}

/// What went wrong, for a program (`code`, `field`) and for a person (`message`).
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorObject {
    /// Stable snake_case code, e.g. `invalid_field`.
    #[schema(value_type = String)]
    pub code: &'static str,
    /// A human sentence.
    pub message: String,
    /// JSON path of the offending value, e.g. `fences[3].radius_m`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, _) = self.status_and_code();
        let retry_after = match &self {
            ApiError::RateLimited { retry_after_s } => u64::from(RETRY_AFTER_S).max(*retry_after_s),
            _ => u64::from(RETRY_AFTER_S),
        };
        match &self {
            ApiError::Internal(cause) => tracing::error!(%cause, "request failed"),
            ApiError::Unavailable(cause) => tracing::warn!(%cause, "request failed: unavailable"),
            _ => {}
        }
        let mut response = (status, axum::Json(ErrorBody { error: self.body() })).into_response();
        if matches!(status, StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE) {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(retry_after));
        }
        response
    }
}

impl From<InputError> for ApiError {
    fn from(e: InputError) -> Self {
        match e {
            InputError::Malformed { message, field } => ApiError::Malformed { message, field },
            InputError::Invalid(e) => ApiError::Invalid(e),
        }
    }
}

impl From<FieldError> for ApiError {
    fn from(e: FieldError) -> Self {
        ApiError::Invalid(e)
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            // Handlers that expect these map them with a better message first; reaching here
            // they still mean what they say.
            StoreError::Conflict => ApiError::Conflict("already exists".into()),
            StoreError::NotFound => ApiError::NotFound("not found".into()),
            StoreError::Unavailable(cause) => ApiError::Unavailable(cause),
            StoreError::Lost(cause) => ApiError::Unavailable(format!("the store lost its data: {cause}")),
        }
    }
}

impl From<RedeemError> for ApiError {
    fn from(e: RedeemError) -> Self {
        match e {
            RedeemError::NotFound => ApiError::NotFound("unknown coupon".into()),
            RedeemError::AlreadyRedeemed => ApiError::Conflict("the coupon was already redeemed".into()),
            RedeemError::Expired => ApiError::Expired,
            RedeemError::WrongMerchant => ApiError::invalid("merchant_id", "the coupon belongs to another merchant"),
            RedeemError::Store(e) => e.into(),
        }
    }
}

/// Maps any of axum's own rejections (a body over the limit, a bad path or query) into the
/// error format, keeping its status.
pub fn from_rejection(status: StatusCode, text: String) -> ApiError {
    match status {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::PayloadTooLarge,
        StatusCode::NOT_FOUND => ApiError::NotFound(text),
        s if s.is_server_error() => ApiError::Internal(text),
        StatusCode::UNPROCESSABLE_ENTITY => ApiError::Invalid(FieldError::new("", text)),
        _ => ApiError::Malformed { message: text, field: None },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn five_hundreds_are_opaque() {
        let body = ApiError::Internal("db password is hunter2".into()).body();
        assert!(!body.message.contains("hunter2"));
        let body = ApiError::Unavailable("redis at 10.0.0.1 refused".into()).body();
        assert!(!body.message.contains("10.0.0.1"));
    }

    #[test]
    fn rate_limited_carries_the_buckets_retry_after() {
        let r = ApiError::RateLimited { retry_after_s: 6 }.into_response();
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(r.headers()[header::RETRY_AFTER], "6");
    }

    #[test]
    fn retry_after_on_429_and_503() {
        for e in [ApiError::Overloaded, ApiError::Unavailable("x".into())] {
            let r = e.into_response();
            assert_eq!(r.headers()[header::RETRY_AFTER], "1");
        }
    }
}
