//! The fake's connections and routes: TLS accept, HTTP/1.1 or HTTP/2 (ALPN), and each endpoint's
//! checks, written from the providers' documentation of what they refuse.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode, Version};
use hyper_util::rt::{TokioExecutor, TokioIo};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::faults::{EndpointStats, Fault, Faults, Receipt, Received, Record, Stats};
use crate::dispatch::clock::{unix_s, SharedClock};
use crate::dispatch::fcm::{FCM_SCOPE, JWT_BEARER_GRANT};

/// Apple refuses a provider token re-signed sooner than this after the previous one.
const APNS_TOKEN_UPDATE_MIN: Duration = Duration::from_secs(20 * 60);
/// Apple refuses a provider token older than this.
const APNS_TOKEN_MAX_AGE_S: i64 = 3600;
/// Clock skew tolerated on `iat` in the future.
const SKEW_S: i64 = 60;
/// Lifetime of an issued access token (Google's).
const ACCESS_TOKEN_LIFETIME_S: u64 = 3599;

/// Shared by every connection.
pub(super) struct State {
    pub project_id: String,
    pub token_uri: String,
    pub client_email: String,
    pub private_key_id: String,
    pub rsa_public: DecodingKey,
    pub apns_public: DecodingKey,
    pub apns_key_id: String,
    pub apns_team_id: String,
    pub apns_topic: String,
    pub clock: SharedClock,
    /// What is kept of each request.
    pub record: Record,
    pub received: parking_lot::Mutex<Vec<Received>>,
    /// One per push accepted, unless `record` is `none`.
    pub receipts: parking_lot::Mutex<Vec<Receipt>>,
    pub faults: parking_lot::Mutex<Faults>,
    /// Access tokens issued, with their expiry.
    pub access_tokens: parking_lot::Mutex<HashMap<String, SystemTime>>,
    /// The APNs provider token in use and when it was first seen.
    pub apns_token: parking_lot::Mutex<Option<(String, SystemTime)>>,
    /// The last provider token whose signature was verified, with its `iat`: the same token
    /// again is not verified again (an ES256 verification per push would make the fake, not
    /// kabao, the bottleneck of a load test; its claims are still checked every time).
    pub apns_verified: parking_lot::Mutex<Option<(String, i64)>>,
    /// Numbers message names and access tokens.
    pub counter: AtomicU64,
    /// Pushes (FCM or APNs) answered with success, ever: read without copying `received`.
    pub accepted: AtomicU64,
    /// TLS connections accepted, ever; also the last connection's number.
    pub connections: AtomicU64,
    /// Requests and successes per endpoint: the token endpoint, FCM, APNs.
    pub counts: [(AtomicU64, AtomicU64); 3],
}

/// The index of an endpoint in [`State::counts`].
fn endpoint(provider: &str) -> usize {
    match provider {
        "oauth" => 0,
        "fcm" => 1,
        _ => 2,
    }
}

/// No answer: a fault said to drop the connection, or the request's body broke off. The service
/// fails, and hyper closes the connection (HTTP/1.1) or resets the stream (HTTP/2).
#[derive(Debug)]
struct Dropped;

impl std::fmt::Display for Dropped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("connection dropped: an injected fault, or a body that broke off")
    }
}

impl std::error::Error for Dropped {}

type Reply = Response<Full<Bytes>>;

/// Accepts connections until `shutdown`.
pub(super) async fn serve(
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    state: Arc<State>,
    shutdown: CancellationToken,
) {
    loop {
        let (stream, _) = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "fake-push accept failed");
                    continue;
                }
            },
        };
        let acceptor = acceptor.clone();
        let state = state.clone();
        let connection = state.connections.fetch_add(1, Ordering::Relaxed) + 1;
        tokio::spawn(async move {
            let tls = match acceptor.accept(stream).await {
                Ok(tls) => tls,
                Err(e) => {
                    tracing::debug!(error = %e, "fake-push TLS handshake failed");
                    return;
                }
            };
            let service = hyper::service::service_fn(move |request| {
                let state = state.clone();
                async move { state.handle(request, connection).await }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tls), service)
                .await;
        });
    }
}

/// A request read whole.
struct ReadRequest {
    method: Method,
    path: String,
    version: Version,
    headers: hyper::HeaderMap,
    body: Bytes,
    /// The body parsed as JSON, once, when it is JSON.
    json: Option<Value>,
}

impl ReadRequest {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The device token a push is for: FCM's `message.token`, APNs's path.
    fn device_token(&self, provider: &str) -> Option<&str> {
        match provider {
            "fcm" => self.json.as_ref()?["message"]["token"].as_str(),
            "apns" => self.path.split('?').next()?.strip_prefix("/3/device/"),
            _ => None,
        }
    }

    /// The body's coupon id, for a receipt.
    fn coupon_id(&self, provider: &str) -> Option<&str> {
        let json = self.json.as_ref()?;
        match provider {
            "fcm" => json["message"]["data"]["coupon_id"].as_str(),
            _ => json["coupon_id"].as_str(),
        }
    }

    fn record(self, provider: &str, status: u16, received_at_us: i64, connection: u64) -> Received {
        let headers: BTreeMap<String, String> = self
            .headers
            .iter()
            .map(|(k, v)| (k.as_str().to_owned(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
            .collect();
        let body = if let Some(json) = self.json {
            json
        } else if self.header("content-type").is_some_and(|c| c.starts_with("application/x-www-form-urlencoded")) {
            Value::Object(form(&self.body).into_iter().map(|(k, v)| (k, Value::String(v))).collect())
        } else {
            Value::String(String::from_utf8_lossy(&self.body).into_owned())
        };
        Received {
            provider: provider.to_owned(),
            method: self.method.to_string(),
            path: self.path,
            version: format!("{:?}", self.version),
            headers,
            body,
            status,
            received_at_us,
            connection,
        }
    }
}

fn form(body: &[u8]) -> HashMap<String, String> {
    form_urlencoded::parse(body).into_owned().collect()
}

fn json_reply(status: StatusCode, body: &Value) -> Reply {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("a valid response")
}

fn with_retry_after(mut reply: Reply, seconds: Option<u64>) -> Reply {
    if let Some(s) = seconds {
        reply.headers_mut().insert("retry-after", s.into());
    }
    reply
}

/// The gRPC status FCM names for an HTTP status.
fn grpc_status(status: u16) -> &'static str {
    match status {
        400 => "INVALID_ARGUMENT",
        401 => "UNAUTHENTICATED",
        403 => "PERMISSION_DENIED",
        404 => "NOT_FOUND",
        429 => "RESOURCE_EXHAUSTED",
        500 => "INTERNAL",
        503 => "UNAVAILABLE",
        _ => "UNKNOWN",
    }
}

/// FCM's error body; `error_code` goes into an `FcmError` detail when given.
fn fcm_error(status: u16, error_code: Option<&str>, message: &str) -> Reply {
    let mut error = json!({"code": status, "message": message, "status": grpc_status(status)});
    if let Some(code) = error_code {
        error["details"] = json!([{"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": code}]);
    }
    json_reply(StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST), &json!({ "error": error }))
}

/// The usual FCM `errorCode` of a status.
fn fcm_default_code(status: u16) -> Option<&'static str> {
    Some(match status {
        400 => "INVALID_ARGUMENT",
        401 => "THIRD_PARTY_AUTH_ERROR",
        403 => "SENDER_ID_MISMATCH",
        404 => "UNREGISTERED",
        429 => "QUOTA_EXCEEDED",
        500 => "INTERNAL",
        503 => "UNAVAILABLE",
        _ => return None,
    })
}

/// APNs's error body.
fn apns_error(status: u16, reason: &str) -> Reply {
    let mut body = json!({ "reason": reason });
    if status == 410 {
        body["timestamp"] = json!(1_700_000_000_000i64);
    }
    json_reply(StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST), &body)
}

/// The usual APNs reason of a status.
fn apns_default_reason(status: u16) -> &'static str {
    match status {
        400 => "BadTopic",
        403 => "InvalidProviderToken",
        404 => "BadPath",
        405 => "MethodNotAllowed",
        410 => "Unregistered",
        413 => "PayloadTooLarge",
        429 => "TooManyRequests",
        500 => "InternalServerError",
        503 => "ServiceUnavailable",
        _ => "BadRequest",
    }
}

fn oauth_error(status: u16, error: &str, description: &str) -> Reply {
    json_reply(
        StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST),
        &json!({"error": error, "error_description": description}),
    )
}

/// The claims of an assertion.
#[derive(Debug, Deserialize)]
struct Assertion {
    scope: String,
    iat: i64,
    exp: i64,
}

/// The claims of an APNs provider token.
#[derive(Debug, Deserialize)]
struct ProviderClaims {
    iat: i64,
}

impl State {
    async fn handle(self: Arc<Self>, request: Request<Incoming>, connection: u64) -> Result<Reply, Dropped> {
        // The system clock, not the fake's: this is for measuring, and a test's manual clock
        // does not move with real time.
        let received_at_us =
            SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_micros() as i64);
        let (parts, body) = request.into_parts();
        // A body that breaks off (the sender died mid-request) is no request: nothing to answer or
        // record, as a real provider would never have seen a whole one. Read as empty, it was
        // answered and recorded as a refused push.
        let Ok(body) = body.collect().await.map(|b| b.to_bytes()) else { return Err(Dropped) };
        let json = if body.is_empty() { None } else { serde_json::from_slice::<Value>(&body).ok() };
        let request = ReadRequest {
            method: parts.method,
            path: parts.uri.path_and_query().map_or_else(|| parts.uri.path().to_owned(), |p| p.as_str().to_owned()),
            version: parts.version,
            headers: parts.headers,
            body,
            json,
        };
        let path = request.path.split('?').next().unwrap_or("");
        if let Some(admin) = path.strip_prefix("/_fake/") {
            let admin = admin.to_owned();
            return Ok(self.admin(&admin, &request));
        }
        let provider = if path == "/token" {
            "oauth"
        } else if path.starts_with("/v1/projects/") {
            "fcm"
        } else if path.starts_with("/3/device/") {
            "apns"
        } else {
            let reply = json_reply(StatusCode::NOT_FOUND, &json!({"error": "no such path"}));
            return Ok(reply);
        };
        let device_token = request.device_token(provider);
        let fault = self.faults.lock().take(provider, device_token);
        let reply = match fault {
            Some(fault) => self.apply(fault, provider, &request).await,
            None => Ok(self.answer(provider, &request, device_token)),
        };
        let status = reply.as_ref().map_or(0, |r| r.status().as_u16());
        let (requests, accepted) = &self.counts[endpoint(provider)];
        requests.fetch_add(1, Ordering::Relaxed);
        let push_accepted = status == 200 && provider != "oauth";
        if status == 200 {
            accepted.fetch_add(1, Ordering::Relaxed);
        }
        if push_accepted {
            self.accepted.fetch_add(1, Ordering::Relaxed);
        }
        if push_accepted && self.record != Record::None {
            let coupon_id = request.coupon_id(provider).unwrap_or_default().to_owned();
            let receipt = Receipt { provider: provider.to_owned(), coupon_id, received_at_us, connection };
            self.receipts.lock().push(receipt);
        }
        if self.record == Record::Full {
            let received = request.record(provider, status, received_at_us, connection);
            self.received.lock().push(received);
        }
        reply
    }

    /// The counts so far.
    pub(super) fn stats(&self) -> Stats {
        let endpoint = |i: usize| EndpointStats {
            requests: self.counts[i].0.load(Ordering::Relaxed),
            accepted: self.counts[i].1.load(Ordering::Relaxed),
        };
        Stats {
            record: self.record,
            connections: self.connections.load(Ordering::Relaxed),
            oauth: endpoint(0),
            fcm: endpoint(1),
            apns: endpoint(2),
        }
    }

    /// An injected fault's answer (a bare delay falls through to the normal answer).
    async fn apply(&self, fault: Fault, provider: &str, request: &ReadRequest) -> Result<Reply, Dropped> {
        if let Some(ms) = fault.delay_ms {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        if fault.drop {
            return Err(Dropped);
        }
        let Some(status) = fault.status else {
            return Ok(self.answer(provider, request, request.device_token(provider)));
        };
        let reply = match provider {
            "fcm" => {
                let code = fault.reason.as_deref().or(fcm_default_code(status));
                fcm_error(status, code, "injected fault")
            }
            "apns" => apns_error(status, fault.reason.as_deref().unwrap_or(apns_default_reason(status))),
            _ => oauth_error(status, fault.reason.as_deref().unwrap_or("temporarily_unavailable"), "injected fault"),
        };
        Ok(with_retry_after(reply, fault.retry_after_s))
    }

    fn answer(&self, provider: &str, request: &ReadRequest, device_token: Option<&str>) -> Reply {
        match provider {
            "oauth" => self.token(request),
            "fcm" => self.fcm(request, device_token),
            _ => self.apns(request, device_token.unwrap_or("")),
        }
    }

    fn admin(&self, what: &str, request: &ReadRequest) -> Reply {
        match (&request.method, what) {
            (&Method::GET, "received") => json_reply(StatusCode::OK, &json!(*self.received.lock())),
            (&Method::DELETE, "received") => {
                self.received.lock().clear();
                self.receipts.lock().clear();
                json_reply(StatusCode::OK, &json!({}))
            }
            (&Method::GET, "receipts") => json_reply(StatusCode::OK, &json!(*self.receipts.lock())),
            (&Method::GET, "stats") => json_reply(StatusCode::OK, &json!(self.stats())),
            (&Method::POST, "faults") => match serde_json::from_slice::<Fault>(&request.body) {
                Ok(fault) => {
                    self.faults.lock().push(fault);
                    json_reply(StatusCode::OK, &json!({}))
                }
                Err(e) => json_reply(StatusCode::BAD_REQUEST, &json!({"error": e.to_string()})),
            },
            (&Method::DELETE, "faults") => {
                self.faults.lock().clear();
                json_reply(StatusCode::OK, &json!({}))
            }
            _ => json_reply(StatusCode::NOT_FOUND, &json!({"error": "no such admin path"})),
        }
    }

    fn next(&self) -> u64 {
        self.counter.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// `POST /token`: Google's JWT-bearer grant.
    fn token(&self, request: &ReadRequest) -> Reply {
        if request.method != Method::POST {
            return oauth_error(405, "invalid_request", "POST only");
        }
        if !request.header("content-type").is_some_and(|c| c.starts_with("application/x-www-form-urlencoded")) {
            return oauth_error(400, "invalid_request", "the body must be form-encoded");
        }
        let fields = form(&request.body);
        if fields.get("grant_type").map(String::as_str) != Some(JWT_BEARER_GRANT) {
            return oauth_error(400, "unsupported_grant_type", "grant_type must be the JWT-bearer grant");
        }
        let Some(assertion) = fields.get("assertion") else {
            return oauth_error(400, "invalid_request", "no assertion");
        };
        match jsonwebtoken::decode_header(assertion) {
            Ok(h) if h.alg == Algorithm::RS256 && h.kid.as_ref().is_none_or(|k| *k == self.private_key_id) => {}
            Ok(_) => return oauth_error(400, "invalid_grant", "the assertion must be RS256 with the key's kid"),
            Err(e) => return oauth_error(400, "invalid_grant", &format!("not a JWT: {e}")),
        }
        let mut validation = Validation::new(Algorithm::RS256);
        validation.set_audience(&[&self.token_uri]);
        validation.set_issuer(&[&self.client_email]);
        validation.set_required_spec_claims(&["iss", "aud", "exp", "iat"]);
        // Expiry is checked below against the fake's clock, not the system's.
        validation.validate_exp = false;
        let claims = match jsonwebtoken::decode::<Assertion>(assertion, &self.rsa_public, &validation) {
            Ok(data) => data.claims,
            Err(e) => return oauth_error(400, "invalid_grant", &format!("the assertion does not verify: {e}")),
        };
        if !claims.scope.split(' ').any(|s| s == FCM_SCOPE) {
            return oauth_error(400, "invalid_scope", "the scope must include firebase.messaging");
        }
        let now_at = self.clock.now();
        let now = unix_s(now_at);
        if claims.exp <= now || claims.iat > now + SKEW_S || claims.exp - claims.iat > 3600 || claims.exp <= claims.iat
        {
            return oauth_error(400, "invalid_grant", "Invalid JWT: Token must be a short-lived token (60 minutes)");
        }
        let access_token = format!("ya29.fake-{}-{:016x}", self.next(), rand::random::<u64>());
        self.access_tokens.lock().insert(access_token.clone(), now_at + Duration::from_secs(ACCESS_TOKEN_LIFETIME_S));
        json_reply(
            StatusCode::OK,
            &json!({"access_token": access_token, "expires_in": ACCESS_TOKEN_LIFETIME_S, "token_type": "Bearer"}),
        )
    }

    /// `POST /v1/projects/{p}/messages:send`.
    fn fcm(&self, request: &ReadRequest, device_token: Option<&str>) -> Reply {
        let path = request.path.split('?').next().unwrap_or("");
        let Some(project) = path.strip_prefix("/v1/projects/").and_then(|p| p.strip_suffix("/messages:send")) else {
            return fcm_error(404, None, "unknown method");
        };
        if request.method != Method::POST {
            return fcm_error(405, None, "POST only");
        }
        if project != self.project_id {
            return fcm_error(403, Some("SENDER_ID_MISMATCH"), "the token's project is another");
        }
        let bearer = request.header("authorization").and_then(|a| a.strip_prefix("Bearer "));
        let valid = bearer.is_some_and(|t| self.access_tokens.lock().get(t).is_some_and(|exp| self.clock.now() < *exp));
        if !valid {
            return fcm_error(401, None, "Request had invalid authentication credentials.");
        }
        if !request.header("content-type").is_some_and(|c| c.starts_with("application/json")) {
            return fcm_error(400, None, "the body must be JSON");
        }
        let Some(body) = &request.json else {
            return fcm_error(400, None, "Invalid JSON payload received.");
        };
        if let Err(why) = check_fcm_message(body) {
            return fcm_error(400, Some("INVALID_ARGUMENT"), &why);
        }
        if device_token.is_none_or(str::is_empty) {
            return fcm_error(
                400,
                Some("INVALID_ARGUMENT"),
                "The registration token is not a valid FCM registration token",
            );
        }
        let name = format!("projects/{project}/messages/{}", self.next());
        json_reply(StatusCode::OK, &json!({ "name": name }))
    }

    /// `POST /3/device/{token}`.
    fn apns(&self, request: &ReadRequest, device_token: &str) -> Reply {
        if request.version != Version::HTTP_2 {
            return apns_error(505, "HTTP/2 required");
        }
        if request.method != Method::POST {
            return apns_error(405, "MethodNotAllowed");
        }
        if device_token.is_empty() || !device_token.bytes().all(|b| b.is_ascii_hexdigit()) {
            return apns_error(400, "BadDeviceToken");
        }
        if let Err(reason) = self.check_provider_token(request.header("authorization")) {
            let status = if reason == "TooManyProviderTokenUpdates" { 429 } else { 403 };
            return apns_error(status, reason);
        }
        match request.header("apns-topic") {
            None => return apns_error(400, "MissingTopic"),
            Some(t) if t != self.apns_topic => return apns_error(400, "TopicDisallowed"),
            Some(_) => {}
        }
        if request.header("apns-push-type") != Some("alert") {
            return apns_error(400, "InvalidPushType");
        }
        if !matches!(request.header("apns-priority"), Some("10" | "5")) {
            return apns_error(400, "BadPriority");
        }
        if request.header("apns-expiration").is_none_or(|e| e.parse::<u64>().is_err()) {
            return apns_error(400, "BadExpirationDate");
        }
        if !request.header("apns-collapse-id").is_some_and(|c| !c.is_empty() && c.len() <= 64) {
            return apns_error(400, "BadCollapseId");
        }
        if request.body.len() > 4096 {
            return apns_error(413, "PayloadTooLarge");
        }
        if request.body.is_empty() {
            return apns_error(400, "PayloadEmpty");
        }
        let aps_ok = request.json.as_ref().is_some_and(|v| v["aps"]["alert"]["title"].is_string());
        if !aps_ok {
            // Apple has no reason for this; the fake holds kabao to API.md's body.
            return apns_error(400, "BadPayload");
        }
        let mut reply = Response::new(Full::new(Bytes::new()));
        let id = format!("{:08X}-0000-0000-0000-{:012X}", self.next(), rand::random::<u32>());
        reply.headers_mut().insert("apns-id", id.parse().expect("ascii"));
        reply
    }

    /// Apple's provider-token rules; the reason of a refusal.
    fn check_provider_token(&self, authorization: Option<&str>) -> Result<(), &'static str> {
        let jwt = authorization.and_then(|a| a.strip_prefix("bearer ")).ok_or("MissingProviderToken")?;
        let verified_iat = match &*self.apns_verified.lock() {
            Some((seen, iat)) if seen == jwt => Some(*iat),
            _ => None,
        };
        let iat = match verified_iat {
            Some(iat) => iat,
            None => {
                let iat = self.verify_provider_token(jwt)?;
                *self.apns_verified.lock() = Some((jwt.to_owned(), iat));
                iat
            }
        };
        let now_at = self.clock.now();
        let now = unix_s(now_at);
        if iat > now + SKEW_S {
            return Err("InvalidProviderToken");
        }
        if now - iat > APNS_TOKEN_MAX_AGE_S {
            return Err("ExpiredProviderToken");
        }
        let mut current = self.apns_token.lock();
        match current.as_ref() {
            Some((seen, _)) if seen == jwt => Ok(()),
            Some((_, since)) if now_at.duration_since(*since).unwrap_or(Duration::ZERO) < APNS_TOKEN_UPDATE_MIN => {
                Err("TooManyProviderTokenUpdates")
            }
            _ => {
                *current = Some((jwt.to_owned(), now_at));
                Ok(())
            }
        }
    }

    /// The provider token's header and signature (key, `kid`, `iss`); its `iat`.
    fn verify_provider_token(&self, jwt: &str) -> Result<i64, &'static str> {
        let header = jsonwebtoken::decode_header(jwt).map_err(|_| "InvalidProviderToken")?;
        if header.alg != Algorithm::ES256 || header.kid.as_deref() != Some(&self.apns_key_id) {
            return Err("InvalidProviderToken");
        }
        let mut validation = Validation::new(Algorithm::ES256);
        validation.required_spec_claims.clear();
        validation.set_required_spec_claims(&["iss"]);
        validation.set_issuer(&[&self.apns_team_id]);
        validation.validate_exp = false;
        validation.validate_aud = false;
        let claims = jsonwebtoken::decode::<ProviderClaims>(jwt, &self.apns_public, &validation)
            .map_err(|_| "InvalidProviderToken")?
            .claims;
        Ok(claims.iat)
    }
}

/// The shape of an FCM v1 message as kabao sends it (API.md "Pushes"); the reason it is not.
fn check_fcm_message(body: &Value) -> Result<(), String> {
    let top = body.as_object().ok_or("the body must be an object")?;
    if top.keys().any(|k| k != "message") {
        return Err("Invalid JSON payload received. Unknown name at the top level".into());
    }
    let message = body["message"].as_object().ok_or("message must be an object")?;
    for key in message.keys() {
        if !matches!(key.as_str(), "token" | "notification" | "data" | "android") {
            return Err(format!("Invalid JSON payload received. Unknown name \"{key}\" at 'message'"));
        }
    }
    if !message.get("token").is_some_and(Value::is_string) {
        return Err("message.token must be a string".into());
    }
    let notification =
        message.get("notification").and_then(Value::as_object).ok_or("message.notification is required")?;
    if !notification.get("title").is_some_and(Value::is_string) {
        return Err("message.notification.title must be a string".into());
    }
    if notification.iter().any(|(k, v)| !matches!(k.as_str(), "title" | "body" | "image") || !v.is_string()) {
        return Err("message.notification holds title, body and image strings only".into());
    }
    let data = message.get("data").and_then(Value::as_object).ok_or("message.data is required")?;
    if let Some((key, _)) = data.iter().find(|(_, v)| !v.is_string()) {
        return Err(format!("Invalid value at 'message.data[{key}].value' (TYPE_STRING)"));
    }
    let android = message.get("android").and_then(Value::as_object).ok_or("message.android is required")?;
    if !android.get("collapse_key").is_some_and(Value::is_string) {
        return Err("message.android.collapse_key must be a string".into());
    }
    if let Some(ttl) = android.get("ttl") {
        let ok = ttl
            .as_str()
            .and_then(|t| t.strip_suffix('s'))
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
        if !ok {
            return Err("Invalid value at 'message.android.ttl' (type.googleapis.com/google.protobuf.Duration)".into());
        }
    }
    Ok(())
}
