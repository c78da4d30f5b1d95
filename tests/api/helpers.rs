//! Shared test fixtures: a real kabao server on `127.0.0.1:0` over a fresh in-memory store, a
//! reqwest client, the admin token, client JWTs, and campaign/ping builders.
//!
//! Pings carry `ts_ms` near the server clock (the API refuses anything older than
//! `max_ping_age_s`); the trigger rules run in event time, so tests lay pings out on a timeline
//! starting a few hours ago and never sleep.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use kabao::app::Application;
use kabao::config::Config;
use kabao::store::hooked::Hooked;
use kabao::store::memory::MemoryStore;
use kabao::store::{Store, StoreError};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use tokio::sync::oneshot;

/// The admin token every test server is configured with.
pub const ADMIN: &str = "test-admin-token";
/// The client JWT secret every test server is configured with.
pub const SECRET: &str = "test-client-secret";

/// A point in Shenzhen (`[lon, lat]` in GeoJSON order) used as the default fence centre.
pub const LON: f64 = 114.0579;
/// Latitude of the default fence centre.
pub const LAT: f64 = 22.5431;
/// A latitude about 1.1 km north of [`LAT`]: outside every 150 m fence at the centre.
pub const LAT_OUT: f64 = 22.5531;

/// Server clock now, ms.
pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("clock after 1970").as_millis() as i64
}

/// A start for a test's timeline: three hours ago, so a whole scenario fits inside
/// `max_ping_age_s` (a day) and before now.
pub fn t0() -> i64 {
    now_ms() - 3 * 3_600_000
}

/// One server under test.
pub struct TestApp {
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    /// A client shared by the test.
    pub http: reqwest::Client,
    /// Stops the server when dropped.
    _stop: oneshot::Sender<()>,
}

/// A server with API.md's defaults.
pub async fn spawn() -> TestApp {
    spawn_with(|_| {}).await
}

/// A server whose configuration `tune` adjusts first.
pub async fn spawn_with(tune: impl FnOnce(&mut Config)) -> TestApp {
    spawn_over(tune, Arc::new(MemoryStore::new())).await
}

/// A server over `store`.
pub async fn spawn_over(tune: impl FnOnce(&mut Config), store: Arc<dyn Store>) -> TestApp {
    let mut config = Config::for_tests(ADMIN, SECRET);
    tune(&mut config);
    let app = Application::build_with_store(config, store).await.expect("server builds");
    let port = app.port();
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(app.run_until_stopped(async move {
        let _ = stopped.await;
    }));
    TestApp { base: format!("http://127.0.0.1:{port}"), http: reqwest::Client::new(), _stop: stop }
}

/// A client JWT for `sub`, expiring `exp_in_s` seconds from now, signed with `secret`.
pub fn jwt_with(sub: &str, exp_in_s: i64, secret: &str) -> String {
    let now_s = now_ms() / 1000;
    let claims = json!({"sub": sub, "exp": now_s + exp_in_s, "iat": now_s});
    encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(secret.as_bytes())).expect("signs")
}

/// A valid client JWT for `sub`.
pub fn jwt(sub: &str) -> String {
    jwt_with(sub, 600, SECRET)
}

/// A reply: status, `Retry-After` and the body as JSON (`Null` when empty or not JSON).
#[derive(Debug)]
pub struct Reply {
    /// HTTP status.
    pub status: StatusCode,
    /// The `Retry-After` header, if any.
    pub retry_after: Option<String>,
    /// The `Content-Type` header, if any.
    pub content_type: Option<String>,
    /// The body parsed as JSON.
    pub body: Value,
    /// The body as text.
    pub text: String,
}

impl Reply {
    /// `error.code` of an error body.
    pub fn code(&self) -> &str {
        self.body["error"]["code"].as_str().unwrap_or("<no error.code>")
    }

    /// `error.field` of an error body.
    pub fn field(&self) -> Option<&str> {
        self.body["error"]["field"].as_str()
    }

    /// Asserts an error reply of the documented shape.
    #[track_caller]
    pub fn assert_error(&self, status: u16, code: &str) {
        assert_eq!(self.status.as_u16(), status, "status of {}", self.text);
        assert_eq!(self.code(), code, "code of {}", self.text);
        assert!(self.body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "message of {}", self.text);
    }

    /// The `events` of a pings reply.
    pub fn events(&self) -> &Vec<Value> {
        self.body["events"].as_array().expect("a pings reply has events")
    }

    /// The `ignored` of a pings reply as (index, reason).
    pub fn ignored(&self) -> Vec<(u64, String)> {
        self.body["ignored"]
            .as_array()
            .expect("a pings reply has ignored")
            .iter()
            .map(|i| (i["index"].as_u64().unwrap(), i["reason"].as_str().unwrap().to_owned()))
            .collect()
    }
}

impl TestApp {
    /// A client of a server running elsewhere (another process) at `base`.
    #[allow(dead_code)] // used by tests/redis_nodes.rs, which shares this file
    pub fn at(base: &str) -> Self {
        let (stop, _) = oneshot::channel::<()>();
        Self { base: base.trim_end_matches('/').to_owned(), http: reqwest::Client::new(), _stop: stop }
    }

    /// Sends `body` (JSON, unless `None`) with `token` (none when `None`).
    pub async fn call(&self, method: Method, path: &str, token: Option<&str>, body: Option<&Value>) -> Reply {
        let mut request = self.http.request(method, format!("{}{path}", self.base));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.json(body);
        }
        Self::reply(request.send().await.expect("request sent")).await
    }

    /// Sends a raw body with a content type.
    pub async fn call_raw(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        content_type: &str,
        body: Vec<u8>,
    ) -> Reply {
        let mut request =
            self.http.request(method, format!("{}{path}", self.base)).header("content-type", content_type);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        Self::reply(request.body(body).send().await.expect("request sent")).await
    }

    /// Reads a response.
    pub async fn reply(response: reqwest::Response) -> Reply {
        let status = response.status();
        let header = |name: &str| response.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
        let retry_after = header("retry-after");
        let content_type = header("content-type");
        let text = response.text().await.expect("body read");
        let body = serde_json::from_str(&text).unwrap_or(Value::Null);
        Reply { status, retry_after, content_type, body, text }
    }

    /// `GET` as admin.
    pub async fn get(&self, path: &str) -> Reply {
        self.call(Method::GET, path, Some(ADMIN), None).await
    }

    /// `POST` JSON as admin.
    pub async fn post(&self, path: &str, body: &Value) -> Reply {
        self.call(Method::POST, path, Some(ADMIN), Some(body)).await
    }

    /// `PUT` JSON as admin.
    pub async fn put(&self, path: &str, body: &Value) -> Reply {
        self.call(Method::PUT, path, Some(ADMIN), Some(body)).await
    }

    /// `DELETE` as admin.
    pub async fn delete(&self, path: &str) -> Reply {
        self.call(Method::DELETE, path, Some(ADMIN), None).await
    }

    /// Creates a campaign as admin, asserting 201.
    pub async fn create(&self, campaign: &Value) -> Value {
        let reply = self.post("/v1/campaigns", campaign).await;
        assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text);
        reply.body
    }

    /// Sends pings as admin (a batch), asserting 200.
    pub async fn pings(&self, pings: &[Value]) -> Reply {
        let reply = self.post("/v1/pings", &json!({ "pings": pings })).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
        reply
    }

    /// Sends one ping as admin, asserting 200.
    pub async fn ping(&self, ping: Value) -> Reply {
        let reply = self.post("/v1/pings", &ping).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
        reply
    }

    /// A user's wallet, as admin.
    pub async fn wallet(&self, user: &str) -> Vec<Value> {
        let reply = self.get(&format!("/v1/users/{user}/coupons")).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
        reply.body["coupons"].as_array().expect("coupons").clone()
    }

    /// Registers a device with `tags` for `user`, as admin.
    pub async fn device(&self, user: &str, device: &str, tags: &[&str]) {
        let body = json!({"platform": "fcm", "token": format!("tok-{user}-{device}"), "tags": tags});
        let reply = self.put(&format!("/v1/users/{user}/devices/{device}"), &body).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    }

    /// Ids of `GET /v1/campaigns`.
    pub async fn campaign_ids(&self) -> Vec<String> {
        let reply = self.get("/v1/campaigns?limit=1000").await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
        reply.body["campaigns"].as_array().unwrap().iter().map(|c| c["id"].as_str().unwrap().to_owned()).collect()
    }
}

/// A circle fence.
pub fn circle(id: &str, lon: f64, lat: f64, radius_m: f64) -> Value {
    json!({"id": id, "type": "circle", "center": [lon, lat], "radius_m": radius_m})
}

/// An enter-triggered campaign with one 150 m circle at the default centre and no caps.
pub fn campaign(id: &str) -> Value {
    json!({
        "id": id,
        "name": format!("campaign {id}"),
        "merchant": {"id": "m-1", "name": "Merchant One"},
        "coupon": {"title": format!("{id} coupon"), "body": "Show this at the counter",
                   "deep_link": "kabao://c", "image_url": "https://example.com/c.png", "valid_for_s": 86400},
        "fences": [circle("store-1", LON, LAT, 150.0)],
        "trigger": {"on": "enter"},
        "status": "active"
    })
}

/// A ping of `user` at (`lat`, `lon`) at `ts_ms`.
pub fn ping(user: &str, lat: f64, lon: f64, ts_ms: i64) -> Value {
    json!({"user_id": user, "lat": lat, "lon": lon, "ts_ms": ts_ms})
}

/// A ping of `user` at the default centre.
pub fn inside(user: &str, ts_ms: i64) -> Value {
    ping(user, LAT, LON, ts_ms)
}

/// A ping of `user` about 1.1 km north of the default centre.
pub fn outside(user: &str, ts_ms: i64) -> Value {
    ping(user, LAT_OUT, LON, ts_ms)
}

/// Campaign ids of a reply's events, sorted.
pub fn event_campaigns(reply: &Reply) -> Vec<String> {
    let mut ids: Vec<String> = reply.events().iter().map(|e| e["campaign_id"].as_str().unwrap().to_owned()).collect();
    ids.sort();
    ids
}

/// A memory store that fails every call with `Unavailable` while its switch is on (a lost
/// Redis, say), and the switch.
pub fn flaky_store() -> (Arc<dyn Store>, Arc<AtomicBool>) {
    let down = Arc::new(AtomicBool::new(false));
    let switch = down.clone();
    let store = Hooked::new(Arc::new(MemoryStore::new()), move |_| {
        if switch.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable("test store is down".into()));
        }
        Ok(())
    });
    (Arc::new(store), down)
}

impl TestApp {
    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> String {
        self.base.trim_start_matches("http://").to_owned()
    }

    /// Opens a raw TCP connection to the server.
    pub async fn connect(&self) -> tokio::net::TcpStream {
        tokio::net::TcpStream::connect(self.addr()).await.expect("connect")
    }
}

/// Reads one HTTP/1 reply from `conn` (head, then `content-length` bytes of body): its status
/// and body. `None` when the server closed the connection without a reply.
pub async fn read_reply(conn: &mut tokio::net::TcpStream) -> Option<(u16, Value)> {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_string();
            let status: u16 = head.get(9..12)?.parse().ok()?;
            let length: usize = head
                .lines()
                .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().unwrap()))
                .unwrap_or(0);
            while buf.len() < end + 4 + length {
                let n = conn.read(&mut chunk).await.ok()?;
                if n == 0 {
                    return None;
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            let body = serde_json::from_slice(&buf[end + 4..end + 4 + length]).unwrap_or(Value::Null);
            return Some((status, body));
        }
        match conn.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Sends `request` on a fresh connection and reads the reply.
pub async fn raw_exchange(app: &TestApp, request: &[u8]) -> Option<(u16, Value)> {
    use tokio::io::AsyncWriteExt;
    let mut conn = app.connect().await;
    // A server refusing the request may close before reading all of it; its reply is what counts.
    let _ = conn.write_all(request).await;
    read_reply(&mut conn).await
}
