//! Configuration: the `kabao` command line, `KABAO_*` environment variables and an optional TOML
//! file, resolved into one [`Config`].
//!
//! Every setting of API.md's Configuration table is a `kabao serve` flag and an environment
//! variable (clap reads both; a flag wins over its variable). `--config kabao.toml` names a file
//! holding the same settings in snake_case; it fills what neither a flag nor a variable gave, and
//! the defaults fill the rest. Secrets are held in [`Secret`], whose `Debug` never shows them.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand, ValueEnum};
use rand::RngCore;
use serde::Deserialize;

use crate::engine::EngineConfig;

/// `kabao`: a geofence-driven coupon engine.
#[derive(Debug, Parser)]
#[command(name = "kabao", version, about)]
pub struct Cli {
    /// What to run.
    #[command(subcommand)]
    pub command: Command,
    /// How log lines are written to stderr: `text`, or `json` (one object per line).
    #[arg(long, global = true, env = "KABAO_LOG_FORMAT", value_enum, default_value_t)]
    pub log_format: crate::telemetry::LogFormat,
    /// OTLP/HTTP collector to export kabao's request spans to (e.g. `http://127.0.0.1:4318`;
    /// `/v1/traces` is appended unless present). Off when absent. A flag and variable only, not a
    /// config-file setting: tracing starts before the file is read.
    #[arg(long, global = true, env = "KABAO_OTLP_ENDPOINT", value_name = "URL")]
    pub otlp_endpoint: Option<String>,
}

/// The subcommands of `kabao`.
#[derive(Debug, Subcommand)]
// Parsed once per process; boxing the big variant would buy nothing.
#[allow(clippy::large_enum_variant)]
pub enum Command {
    /// Serve the HTTP API.
    Serve(ServeArgs),
    /// Run a complete kabao in one process, fed by simulated shoppers (see `kabao::demo`).
    Demo(crate::demo::DemoArgs),
    /// Serve fake FCM, OAuth2 and APNs endpoints over TLS, to try or test push delivery locally.
    FakePush(crate::fakepush::FakePushArgs),
    /// Drive `POST /v1/pings` of a running kabao open-loop and measure it from outside.
    Loadgen(crate::loadgen::LoadgenArgs),
    /// Operate on the shared store (see the README, "Redis restarted empty").
    #[command(subcommand)]
    Store(StoreCommand),
}

/// `kabao store …`: an operator's actions on the shared store.
#[derive(Debug, Subcommand)]
pub enum StoreCommand {
    /// Accept the Redis's data as it now is (after it lost its data and could not be restored):
    /// writes a new store identity marked adopted, which every running node then serves from.
    Adopt {
        /// The Redis store URL (`redis://`, `rediss://`).
        #[arg(long, env = "KABAO_REDIS_URL", value_name = "URL", hide_env_values = true)]
        redis_url: String,
    },
}

/// Where issued coupons are pushed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PushProviderKind {
    /// FCM and APNs where their credentials are configured, the log for the other platforms.
    Auto,
    /// Write each push to the log (needs no credentials).
    Log,
}

/// The flags of `kabao serve`. Every one is optional here so that a setting left out can come
/// from the config file before falling back to its default.
#[derive(Debug, Default, Clone, clap::Args, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServeArgs {
    /// A TOML file with these settings in snake_case (flags and env vars win over it).
    #[arg(long, env = "KABAO_CONFIG", value_name = "FILE")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Address to serve on; port 0 picks a free port and prints it. Default 127.0.0.1:8080.
    #[arg(long, env = "KABAO_LISTEN", value_name = "ADDR")]
    pub listen: Option<String>,
    /// Admin bearer token; generated and printed once when absent.
    #[arg(long, env = "KABAO_ADMIN_TOKEN", value_name = "TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// HS256 secret of client JWTs; generated when absent.
    #[arg(long, env = "KABAO_CLIENT_SECRET", value_name = "SECRET", hide_env_values = true)]
    pub client_secret: Option<String>,
    /// Redis store URL (`redis://`, `rediss://`): many nodes share it. Default: the embedded store.
    #[arg(long, env = "KABAO_REDIS_URL", value_name = "URL", hide_env_values = true)]
    pub redis_url: Option<String>,
    /// Where the embedded store keeps its files (one node, no Redis). Default ./kabao-data.
    #[arg(long, env = "KABAO_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// How often the embedded store writes trigger state that issued nothing (ms). Default 1000.
    #[arg(long, env = "KABAO_CHECKPOINT_INTERVAL_MS", value_name = "MS")]
    pub checkpoint_interval_ms: Option<u64>,
    /// Expired coupons older than this many days are purged from the embedded store. Default 90.
    #[arg(long, env = "KABAO_COUPON_RETENTION_DAYS", value_name = "DAYS")]
    pub coupon_retention_days: Option<u64>,
    /// The embedded store's block cache (MiB): decoded table blocks of hot wallets, coupons and
    /// devices. Default 8.
    #[arg(long, env = "KABAO_STORE_CACHE_MB", value_name = "MB")]
    pub store_cache_mb: Option<u64>,
    /// Keep everything in memory only (tests, demos): lost on exit.
    #[arg(long, env = "KABAO_EPHEMERAL", num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub ephemeral: Option<bool>,
    /// Oldest accepted ping `ts_ms`, seconds before the server clock. Default 86400.
    #[arg(long, env = "KABAO_MAX_PING_AGE_S", value_name = "SECONDS")]
    pub max_ping_age_s: Option<u64>,
    /// Trigger state is forgotten after this long without a ping. Default 3600.
    #[arg(long, env = "KABAO_STATE_TTL_S", value_name = "SECONDS")]
    pub state_ttl_s: Option<u64>,
    /// Most users whose trigger state is kept; beyond it the longest idle are dropped first.
    /// 0 = no ceiling. Default 5000000.
    #[arg(long, env = "KABAO_MAX_TRACKED_USERS", value_name = "N")]
    pub max_tracked_users: Option<usize>,
    /// Pings less accurate than this never trigger. Default 100.
    #[arg(long, env = "KABAO_MAX_ACCURACY_M", value_name = "METRES")]
    pub max_accuracy_m: Option<f64>,
    /// Coupons one user may receive over any 24 h; 0 = unlimited. Default 10.
    #[arg(long, env = "KABAO_MAX_COUPONS_PER_USER_PER_DAY", value_name = "N")]
    pub max_coupons_per_user_per_day: Option<u32>,
    /// Implausible-speed bound between consecutive pings; 0 turns the check off. Default 100.
    #[arg(long, env = "KABAO_MAX_SPEED_MPS", value_name = "MPS")]
    pub max_speed_mps: Option<f64>,
    /// Where issued coupons are pushed: `auto` (FCM and APNs where configured, the log
    /// elsewhere) or `log`. Default auto.
    #[arg(long, env = "KABAO_PUSH_PROVIDER", value_enum)]
    pub push_provider: Option<PushProviderKind>,
    /// Path of a Google service-account JSON key; enables FCM.
    #[arg(long, env = "KABAO_FCM_CREDENTIALS", value_name = "FILE")]
    pub fcm_credentials: Option<PathBuf>,
    /// Firebase project. Default: the key's `project_id`.
    #[arg(long, env = "KABAO_FCM_PROJECT_ID", value_name = "ID")]
    pub fcm_project_id: Option<String>,
    /// FCM endpoint. Default https://fcm.googleapis.com.
    #[arg(long, env = "KABAO_FCM_BASE_URL", value_name = "URL")]
    pub fcm_base_url: Option<String>,
    /// Path of the APNs `.p8` token-signing key; enables APNs.
    #[arg(long, env = "KABAO_APNS_KEY_FILE", value_name = "FILE")]
    pub apns_key_file: Option<PathBuf>,
    /// The APNs key's id (JWT `kid`).
    #[arg(long, env = "KABAO_APNS_KEY_ID", value_name = "ID")]
    pub apns_key_id: Option<String>,
    /// Apple team id (JWT `iss`).
    #[arg(long, env = "KABAO_APNS_TEAM_ID", value_name = "ID")]
    pub apns_team_id: Option<String>,
    /// The app's bundle id (`apns-topic`).
    #[arg(long, env = "KABAO_APNS_TOPIC", value_name = "BUNDLE_ID")]
    pub apns_topic: Option<String>,
    /// APNs endpoint. Default https://api.push.apple.com (https://api.sandbox.push.apple.com for
    /// development builds).
    #[arg(long, env = "KABAO_APNS_BASE_URL", value_name = "URL")]
    pub apns_base_url: Option<String>,
    /// Extra CA certificate (PEM) trusted for the push and token endpoints.
    #[arg(long, env = "KABAO_PUSH_CA_FILE", value_name = "FILE")]
    pub push_ca_file: Option<PathBuf>,
    /// Attempts before a push goes to the dead-letter list. Default 8.
    #[arg(long, env = "KABAO_PUSH_MAX_ATTEMPTS", value_name = "N")]
    pub push_max_attempts: Option<u32>,
    /// Ceiling of the first retry delay, doubling per attempt (full jitter). Default 1000.
    #[arg(long, env = "KABAO_PUSH_BACKOFF_BASE_MS", value_name = "MS")]
    pub push_backoff_base_ms: Option<u64>,
    /// Largest ceiling a retry delay draws under (a provider's `Retry-After` may exceed it).
    /// Default 300000 (5 min).
    #[arg(long, env = "KABAO_PUSH_BACKOFF_MAX_MS", value_name = "MS")]
    pub push_backoff_max_ms: Option<u64>,
    /// Pushes in flight at once per provider (FCM, APNs), per node. Default 256.
    #[arg(long, env = "KABAO_PUSH_CONCURRENCY", value_name = "N")]
    pub push_concurrency: Option<usize>,
    /// HTTPS connections per provider (FCM, APNs), per node; a push goes on the least busy.
    /// Default 4.
    #[arg(long, env = "KABAO_PUSH_CONNECTIONS", value_name = "N")]
    pub push_connections: Option<usize>,
    /// Deadline of one request to a provider or token endpoint. Default 10000.
    #[arg(long, env = "KABAO_PUSH_TIMEOUT_MS", value_name = "MS")]
    pub push_timeout_ms: Option<u64>,
    /// How long a push handed to a node stays that node's: the pushes of a node that died are
    /// taken over this long after it took them. At least 3 × push_timeout_ms. Default 60000.
    #[arg(long, env = "KABAO_PUSH_LEASE_MS", value_name = "MS")]
    pub push_lease_ms: Option<u64>,
    /// Largest campaign request body. Default 134217728 (128 MiB).
    #[arg(long, env = "KABAO_CAMPAIGN_BODY_LIMIT_BYTES", value_name = "BYTES")]
    pub campaign_body_limit_bytes: Option<usize>,
    /// Largest body of any other request (pings, devices, redemptions). Default 4194304 (4 MiB).
    #[arg(long, env = "KABAO_PING_BODY_LIMIT_BYTES", value_name = "BYTES")]
    pub ping_body_limit_bytes: Option<usize>,
    /// Requests served at once; more are refused with 429 `overloaded`. Default 1024.
    #[arg(long, env = "KABAO_MAX_IN_FLIGHT", value_name = "N")]
    pub max_in_flight: Option<usize>,
    /// A request taking longer is abandoned with 503. Default 30.
    #[arg(long, env = "KABAO_REQUEST_TIMEOUT_S", value_name = "SECONDS")]
    pub request_timeout_s: Option<u64>,
    /// On shutdown, requests in flight get this long to finish. Default 10.
    #[arg(long, env = "KABAO_SHUTDOWN_GRACE_S", value_name = "SECONDS")]
    pub shutdown_grace_s: Option<u64>,

    // --- Secrets, JWTs, rate limits and the connection edge (issue 10) ---
    /// File holding the admin token (a trailing newline is trimmed); not with --admin-token.
    #[arg(long, env = "KABAO_ADMIN_TOKEN_FILE", value_name = "FILE")]
    pub admin_token_file: Option<PathBuf>,
    /// File holding the client secret (a trailing newline is trimmed); not with --client-secret.
    #[arg(long, env = "KABAO_CLIENT_SECRET_FILE", value_name = "FILE")]
    pub client_secret_file: Option<PathBuf>,
    /// The previous client secret, still accepted for verifying JWTs during a rotation.
    #[arg(long, env = "KABAO_CLIENT_SECRET_PREVIOUS", value_name = "SECRET", hide_env_values = true)]
    pub client_secret_previous: Option<String>,
    /// File holding the previous client secret; not with --client-secret-previous.
    #[arg(long, env = "KABAO_CLIENT_SECRET_PREVIOUS_FILE", value_name = "FILE")]
    pub client_secret_previous_file: Option<PathBuf>,
    /// Longest accepted client JWT lifetime (`exp − iat`); tokens without `iat` are refused
    /// while it is set; 0 = no maximum (and no `iat` needed). Default 86400.
    #[arg(long, env = "KABAO_JWT_MAX_LIFETIME_S", value_name = "SECONDS")]
    pub jwt_max_lifetime_s: Option<u64>,
    /// When set, a client JWT's `aud` must contain it. Default: any `aud`, or none, is accepted.
    #[arg(long, env = "KABAO_JWT_AUDIENCE", value_name = "AUD")]
    pub jwt_audience: Option<String>,
    /// When set, a client JWT's `iss` must equal it. Default: not checked.
    #[arg(long, env = "KABAO_JWT_ISSUER", value_name = "ISS")]
    pub jwt_issuer: Option<String>,
    /// Client-token requests per user per second (burst 10×); 0 = off. Default 5.
    #[arg(long, env = "KABAO_RATE_LIMIT_REQUESTS_PER_USER_PER_S", value_name = "N")]
    pub rate_limit_requests_per_user_per_s: Option<f64>,
    /// Requests per source address per second (burst 10×); 0 = off. Default 0.
    #[arg(long, env = "KABAO_RATE_LIMIT_REQUESTS_PER_IP_PER_S", value_name = "N")]
    pub rate_limit_requests_per_ip_per_s: Option<f64>,
    /// Redemption attempts per user per minute (burst the same); 0 = off. Default 10.
    #[arg(long, env = "KABAO_RATE_LIMIT_REDEEMS_PER_USER_PER_MIN", value_name = "N")]
    pub rate_limit_redeems_per_user_per_min: Option<f64>,
    /// A connection whose request head is not complete this long after it could start is
    /// closed; for HTTP/1 this also bounds an idle keep-alive connection. Default 10.
    #[arg(long, env = "KABAO_HEADER_READ_TIMEOUT_S", value_name = "SECONDS")]
    pub header_read_timeout_s: Option<u64>,
    /// A connection that moves no byte either way for this long is closed. Default 60.
    #[arg(long, env = "KABAO_IDLE_TIMEOUT_S", value_name = "SECONDS")]
    pub idle_timeout_s: Option<u64>,
    /// Slowest accepted request body, after a grace of `body_read_grace_s`. Default 16384.
    #[arg(long, env = "KABAO_BODY_MIN_BYTES_PER_S", value_name = "BYTES")]
    pub body_min_bytes_per_s: Option<u64>,
    /// Seconds a body may take before its minimum rate applies. Default 5.
    #[arg(long, env = "KABAO_BODY_READ_GRACE_S", value_name = "SECONDS")]
    pub body_read_grace_s: Option<u64>,
    /// Most open connections; the rest wait in the listen backlog. Default: 80 % of the
    /// process's file limit (raised to its hard limit at start), at most 65536.
    #[arg(long, env = "KABAO_MAX_CONNECTIONS", value_name = "N")]
    pub max_connections: Option<usize>,
    /// Request body bytes held in memory at once, over all requests. Default 268435456 (256 MiB).
    #[arg(long, env = "KABAO_MAX_IN_FLIGHT_BODY_BYTES", value_name = "BYTES")]
    pub max_in_flight_body_bytes: Option<u64>,
    /// Pings being applied at once, over all requests. Default 100000.
    #[arg(long, env = "KABAO_MAX_IN_FLIGHT_PINGS", value_name = "N")]
    pub max_in_flight_pings: Option<u64>,
}

/// A secret string (token, key). Its `Debug` prints `[redacted]`, so logging a config that
/// holds one never leaks it; [`Secret::expose`] is the one way to read it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// A random secret of 32 bytes, hex encoded.
    pub fn generate() -> Self {
        let mut bytes = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut bytes);
        Self(bytes.iter().map(|b| format!("{b:02x}")).collect())
    }

    /// The secret itself. Call sites are the places that may see it; keep them few.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[redacted]")
    }
}

/// Settings of the HTTP edge.
#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// Largest `POST`/`PUT /v1/campaigns` body.
    pub campaign_body_limit_bytes: usize,
    /// Largest body of every other request.
    pub ping_body_limit_bytes: usize,
    /// Requests served at once before shedding with 429.
    pub max_in_flight: usize,
    /// Longest a request may take.
    pub request_timeout: Duration,
}

impl HttpConfig {
    /// The body limit of the route at `path`: campaign writes have their own.
    pub fn body_limit_for(&self, path: &str) -> usize {
        if path == "/v1/campaigns" || path.starts_with("/v1/campaigns/") {
            self.campaign_body_limit_bytes
        } else {
            self.ping_body_limit_bytes
        }
    }
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            campaign_body_limit_bytes: 128 * 1024 * 1024,
            ping_body_limit_bytes: 4 * 1024 * 1024,
            max_in_flight: 1024,
            request_timeout: Duration::from_secs(30),
        }
    }
}

/// Which store holds kabao's data (API.md Configuration: `KABAO_EPHEMERAL`, `KABAO_DATA_DIR`,
/// `KABAO_REDIS_URL`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreChoice {
    /// In this process's memory only (`--ephemeral`, tests, `kabao demo`).
    Ephemeral,
    /// The durable embedded store in this directory (the default, one node).
    Embedded {
        /// The data directory.
        data_dir: PathBuf,
        /// How often trigger state that issued nothing is written.
        checkpoint_interval: Duration,
        /// Expired coupons older than this are purged.
        retention: Duration,
        /// The block cache's size in bytes.
        cache_bytes: usize,
    },
    /// A Redis shared by any number of nodes.
    Redis {
        /// `redis://` or `rediss://` URL. Held as a secret: it may carry a password.
        url: Secret,
    },
}

/// Settings of push delivery (API.md's `KABAO_PUSH_*`, `KABAO_FCM_*`, `KABAO_APNS_*`).
/// [`crate::dispatch::providers_from_config`] turns them into providers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushConfig {
    /// `auto` or `log`.
    pub provider: PushProviderKind,
    /// Service-account key file; FCM is off without it.
    pub fcm_credentials: Option<PathBuf>,
    /// Overrides the key's `project_id`.
    pub fcm_project_id: Option<String>,
    /// FCM endpoint.
    pub fcm_base_url: String,
    /// `.p8` key file; APNs is off without it.
    pub apns_key_file: Option<PathBuf>,
    /// JWT `kid`; required with a key file.
    pub apns_key_id: Option<String>,
    /// JWT `iss`; required with a key file.
    pub apns_team_id: Option<String>,
    /// `apns-topic`; required with a key file.
    pub apns_topic: Option<String>,
    /// APNs endpoint.
    pub apns_base_url: String,
    /// Extra trusted CA (PEM).
    pub ca_file: Option<PathBuf>,
    /// Attempts before a push is dead-lettered (at least 1).
    pub max_attempts: u32,
    /// Ceiling of the first retry delay (doubling per attempt, full jitter).
    pub backoff_base: Duration,
    /// Largest ceiling of a retry delay (a provider's `Retry-After` is honoured above it).
    pub backoff_max: Duration,
    /// Pushes in flight at once per provider, per node (at least 1).
    pub concurrency_per_provider: usize,
    /// HTTPS connections per provider, per node (at least 1): one HTTP/2 connection is one
    /// task's worth of work on each side, which caps a provider's pushes per second.
    pub connections_per_provider: usize,
    /// Deadline of one request to a provider or token endpoint; one that takes longer is a retry.
    pub request_timeout: Duration,
    /// How long an entry taken from the outbox stays leased to the node that took it (at least
    /// three request timeouts, so a push in flight is never handed to a second node).
    pub lease: Duration,
}

impl Default for PushConfig {
    /// API.md's defaults: `auto` with nothing configured, which is the log for both platforms.
    fn default() -> Self {
        Self {
            provider: PushProviderKind::Auto,
            fcm_credentials: None,
            fcm_project_id: None,
            fcm_base_url: "https://fcm.googleapis.com".into(),
            apns_key_file: None,
            apns_key_id: None,
            apns_team_id: None,
            apns_topic: None,
            apns_base_url: "https://api.push.apple.com".into(),
            ca_file: None,
            max_attempts: 8,
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(300),
            concurrency_per_provider: 256,
            connections_per_provider: 4,
            request_timeout: Duration::from_secs(10),
            lease: Duration::from_secs(60),
        }
    }
}

/// Client JWT checks beyond the signature and `exp` (issue 10: lifetime, audience, issuer).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtConfig {
    /// Longest `exp − iat` accepted, seconds; `None` = no maximum. While set, a token without
    /// `iat` is refused (its lifetime cannot be known).
    pub max_lifetime_s: Option<u64>,
    /// When set, `aud` must contain it; when not, any `aud` (or none) is accepted.
    pub audience: Option<String>,
    /// When set, `iss` must equal it.
    pub issuer: Option<String>,
}

impl Default for JwtConfig {
    fn default() -> Self {
        Self { max_lifetime_s: Some(86_400), audience: None, issuer: None }
    }
}

/// API.md's per-caller rate limits (token buckets, burst 10× the per-second rates); 0 = off.
#[derive(Debug, Clone, PartialEq)]
pub struct RateLimitConfig {
    /// Client-token requests per user per second.
    pub requests_per_user_per_s: f64,
    /// Requests per source address per second.
    pub requests_per_ip_per_s: f64,
    /// Redemption attempts per user per minute.
    pub redeems_per_user_per_min: f64,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        Self { requests_per_user_per_s: 5.0, requests_per_ip_per_s: 0.0, redeems_per_user_per_min: 10.0 }
    }
}

/// How connections and the work in flight are bounded, so no client starves another.
#[derive(Debug, Clone, PartialEq)]
pub struct EdgeConfig {
    /// Longest request line plus headers kabao answers (more: `431`).
    pub max_header_bytes: usize,
    /// Longest request target (path and query; more: `414`).
    pub max_uri_bytes: usize,
    /// Most header lines (more: `431`).
    pub max_headers: usize,
    /// A request head must be complete this long after the connection could send one.
    pub header_read_timeout: Duration,
    /// A connection moving no byte for this long is closed.
    pub idle_timeout: Duration,
    /// Slowest body accepted once `body_read_grace` is over, bytes per second.
    pub body_min_bytes_per_s: u64,
    /// How long a body may take before its minimum rate applies.
    pub body_read_grace: Duration,
    /// Most open connections; `None` = derived from the file limit at start.
    pub max_connections: Option<usize>,
    /// Body bytes held at once, all requests together.
    pub max_in_flight_body_bytes: u64,
    /// Pings being applied at once, all requests together.
    pub max_in_flight_pings: u64,
    /// One caller (a user, or an address) may hold at most `1 / caller_share` of each in-flight
    /// budget, beyond its first request (which is always admitted when the budget has room).
    pub caller_share: u64,
}

impl Default for EdgeConfig {
    fn default() -> Self {
        Self {
            max_header_bytes: 16 * 1024,
            max_uri_bytes: 8 * 1024,
            max_headers: 100,
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            body_min_bytes_per_s: 16 * 1024,
            body_read_grace: Duration::from_secs(5),
            max_connections: None,
            max_in_flight_body_bytes: 256 * 1024 * 1024,
            max_in_flight_pings: 100_000,
            caller_share: 8,
        }
    }
}

/// A resolved configuration: every setting decided.
#[derive(Debug, Clone)]
pub struct Config {
    /// Address to bind (port 0 = any free port).
    pub listen: String,
    /// Admin bearer token.
    pub admin_token: Secret,
    /// True when the admin token was generated here (so it is printed once at start).
    pub admin_token_generated: bool,
    /// HS256 secret of client JWTs.
    pub client_secret: Secret,
    /// True when the client secret was generated here (no existing client token can verify).
    pub client_secret_generated: bool,
    /// The engine's settings.
    pub engine: EngineConfig,
    /// Where the data lives.
    pub store: StoreChoice,
    /// Where pushes go.
    pub push: PushConfig,
    /// Limits of the HTTP edge.
    pub http: HttpConfig,
    /// On shutdown, how long requests in flight get to finish.
    pub shutdown_grace: Duration,
    /// A second client secret still accepted for verifying JWTs (a rotation in progress).
    pub client_secret_previous: Option<Secret>,
    /// Client JWT lifetime, audience and issuer checks.
    pub jwt: JwtConfig,
    /// Per-caller rate limits.
    pub rate_limits: RateLimitConfig,
    /// Connection and in-flight bounds.
    pub edge: EdgeConfig,
}

impl Config {
    /// A configuration for tests: `127.0.0.1:0`, API.md's defaults, the given secrets.
    ///
    /// Rate limits are raised far above API.md's defaults: tests send many requests per user
    /// quickly, and the tests of the limits themselves set the rates they check.
    pub fn for_tests(admin_token: &str, client_secret: &str) -> Self {
        Self {
            admin_token: Secret::new(admin_token),
            client_secret: Secret::new(client_secret),
            rate_limits: RateLimitConfig {
                requests_per_user_per_s: 10_000.0,
                requests_per_ip_per_s: 0.0,
                redeems_per_user_per_min: 100_000.0,
            },
            ..Self::embedded()
        }
    }

    /// A configuration for a server embedded in another program (`kabao demo`): `127.0.0.1:0`,
    /// API.md's defaults, generated secrets.
    pub fn embedded() -> Self {
        Self {
            listen: "127.0.0.1:0".into(),
            admin_token: Secret::generate(),
            admin_token_generated: false,
            client_secret: Secret::generate(),
            client_secret_generated: false,
            engine: EngineConfig::default(),
            store: StoreChoice::Ephemeral,
            push: PushConfig::default(),
            http: HttpConfig::default(),
            shutdown_grace: Duration::from_secs(10),
            client_secret_previous: None,
            jwt: JwtConfig::default(),
            rate_limits: RateLimitConfig::default(),
            edge: EdgeConfig::default(),
        }
    }

    /// Resolves `kabao serve`'s settings: flags and env vars (already merged by clap), then the
    /// file named by `--config`, then the defaults.
    pub fn load(args: ServeArgs) -> anyhow::Result<Self> {
        let file = match &args.config {
            Some(path) => read_file(path)?,
            None => ServeArgs::default(),
        };
        Self::resolve(args, file)
    }

    /// Merges `args` over `file` over the defaults, and checks the result.
    pub fn resolve(args: ServeArgs, file: ServeArgs) -> anyhow::Result<Self> {
        macro_rules! pick {
            ($name:ident) => {
                args.$name.clone().or_else(|| file.$name.clone())
            };
        }
        let store = match (pick!(redis_url), pick!(ephemeral).unwrap_or(false)) {
            (Some(_), true) => bail!("--redis-url and --ephemeral exclude each other: choose one store"),
            (Some(url), false) => {
                if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
                    bail!("--redis-url must start with redis:// or rediss://");
                }
                StoreChoice::Redis { url: Secret::new(url) }
            }
            (None, true) => StoreChoice::Ephemeral,
            (None, false) => {
                let checkpoint_ms = pick!(checkpoint_interval_ms).unwrap_or(1000);
                if checkpoint_ms == 0 {
                    bail!("checkpoint_interval_ms must be at least 1");
                }
                StoreChoice::Embedded {
                    data_dir: pick!(data_dir).unwrap_or_else(|| "kabao-data".into()),
                    checkpoint_interval: Duration::from_millis(checkpoint_ms),
                    retention: Duration::from_secs(pick!(coupon_retention_days).unwrap_or(90).saturating_mul(86_400)),
                    cache_bytes: usize::try_from(pick!(store_cache_mb).unwrap_or(8))
                        .ok()
                        .and_then(|mb| mb.checked_mul(1 << 20))
                        .ok_or_else(|| anyhow::anyhow!("store_cache_mb is too large"))?,
                }
            }
        };
        let defaults = EngineConfig::default();
        let engine = EngineConfig {
            max_ping_age_s: pick!(max_ping_age_s).unwrap_or(defaults.max_ping_age_s),
            state_ttl_s: pick!(state_ttl_s).unwrap_or(defaults.state_ttl_s),
            max_accuracy_m: pick!(max_accuracy_m).unwrap_or(defaults.max_accuracy_m),
            max_coupons_per_user_per_day: pick!(max_coupons_per_user_per_day)
                .unwrap_or(defaults.max_coupons_per_user_per_day),
            max_speed_mps: pick!(max_speed_mps).unwrap_or(defaults.max_speed_mps),
            campaign_poll: defaults.campaign_poll,
            max_tracked_users: pick!(max_tracked_users).unwrap_or(defaults.max_tracked_users),
        };
        if !(engine.max_accuracy_m.is_finite() && engine.max_accuracy_m >= 0.0) {
            bail!("max_accuracy_m must be a non-negative number");
        }
        if !(engine.max_speed_mps.is_finite() && engine.max_speed_mps >= 0.0) {
            bail!("max_speed_mps must be a non-negative number (0 turns the check off)");
        }
        // Keeps `now - max_ping_age_s * 1000` far from overflow.
        if engine.max_ping_age_s > 100 * 365 * 86_400 {
            bail!("max_ping_age_s must be at most 100 years");
        }

        let http_defaults = HttpConfig::default();
        let http = HttpConfig {
            campaign_body_limit_bytes: pick!(campaign_body_limit_bytes)
                .unwrap_or(http_defaults.campaign_body_limit_bytes),
            ping_body_limit_bytes: pick!(ping_body_limit_bytes).unwrap_or(http_defaults.ping_body_limit_bytes),
            max_in_flight: pick!(max_in_flight).unwrap_or(http_defaults.max_in_flight),
            request_timeout: pick!(request_timeout_s).map(Duration::from_secs).unwrap_or(http_defaults.request_timeout),
        };
        if http.max_in_flight == 0 {
            bail!("max_in_flight must be at least 1");
        }
        if http.request_timeout.is_zero() {
            bail!("request_timeout_s must be at least 1");
        }

        let push_defaults = PushConfig::default();
        let push = PushConfig {
            provider: pick!(push_provider).unwrap_or(push_defaults.provider),
            fcm_credentials: pick!(fcm_credentials),
            fcm_project_id: pick!(fcm_project_id),
            fcm_base_url: pick!(fcm_base_url).unwrap_or(push_defaults.fcm_base_url),
            apns_key_file: pick!(apns_key_file),
            apns_key_id: pick!(apns_key_id),
            apns_team_id: pick!(apns_team_id),
            apns_topic: pick!(apns_topic),
            apns_base_url: pick!(apns_base_url).unwrap_or(push_defaults.apns_base_url),
            ca_file: pick!(push_ca_file),
            max_attempts: pick!(push_max_attempts).unwrap_or(push_defaults.max_attempts),
            backoff_base: pick!(push_backoff_base_ms).map(Duration::from_millis).unwrap_or(push_defaults.backoff_base),
            backoff_max: pick!(push_backoff_max_ms).map(Duration::from_millis).unwrap_or(push_defaults.backoff_max),
            concurrency_per_provider: pick!(push_concurrency).unwrap_or(push_defaults.concurrency_per_provider),
            connections_per_provider: pick!(push_connections).unwrap_or(push_defaults.connections_per_provider),
            request_timeout: pick!(push_timeout_ms).map(Duration::from_millis).unwrap_or(push_defaults.request_timeout),
            lease: pick!(push_lease_ms).map(Duration::from_millis).unwrap_or(push_defaults.lease),
        };
        if push.max_attempts == 0 {
            bail!("push_max_attempts must be at least 1");
        }
        if push.backoff_max < push.backoff_base {
            bail!("push_backoff_max_ms must be at least push_backoff_base_ms");
        }
        if push.concurrency_per_provider == 0 {
            bail!("push_concurrency must be at least 1");
        }
        if push.connections_per_provider == 0 {
            bail!("push_connections must be at least 1");
        }
        if push.request_timeout.is_zero() {
            bail!("push_timeout_ms must be at least 1");
        }
        if push.lease < push.request_timeout * 3 {
            bail!(
                "push_lease_ms must be at least 3 × push_timeout_ms: a push in flight is never handed to another node"
            );
        }

        let listen = normalize_listen(pick!(listen).unwrap_or_else(|| "127.0.0.1:8080".into()));
        check_listen(&listen)?;

        let (admin_token, admin_token_generated) =
            match secret("admin_token", pick!(admin_token), pick!(admin_token_file).as_deref())? {
                Some(t) => (t, false),
                None => (Secret::generate(), true),
            };
        let (client_secret, client_secret_generated) =
            match secret("client_secret", pick!(client_secret), pick!(client_secret_file).as_deref())? {
                Some(s) => (s, false),
                None => (Secret::generate(), true),
            };
        let client_secret_previous = secret(
            "client_secret_previous",
            pick!(client_secret_previous),
            pick!(client_secret_previous_file).as_deref(),
        )?;

        let jwt = JwtConfig {
            max_lifetime_s: match pick!(jwt_max_lifetime_s) {
                Some(0) => None,
                Some(n) => Some(n),
                None => JwtConfig::default().max_lifetime_s,
            },
            audience: pick!(jwt_audience).filter(|a| !a.is_empty()),
            issuer: pick!(jwt_issuer).filter(|i| !i.is_empty()),
        };
        let rate_defaults = RateLimitConfig::default();
        let rate_limits = RateLimitConfig {
            requests_per_user_per_s: pick!(rate_limit_requests_per_user_per_s)
                .unwrap_or(rate_defaults.requests_per_user_per_s),
            requests_per_ip_per_s: pick!(rate_limit_requests_per_ip_per_s)
                .unwrap_or(rate_defaults.requests_per_ip_per_s),
            redeems_per_user_per_min: pick!(rate_limit_redeems_per_user_per_min)
                .unwrap_or(rate_defaults.redeems_per_user_per_min),
        };
        for (name, rate) in [
            ("rate_limit_requests_per_user_per_s", rate_limits.requests_per_user_per_s),
            ("rate_limit_requests_per_ip_per_s", rate_limits.requests_per_ip_per_s),
            ("rate_limit_redeems_per_user_per_min", rate_limits.redeems_per_user_per_min),
        ] {
            if !(rate.is_finite() && rate >= 0.0) {
                bail!("{name} must be a non-negative number (0 turns the limit off)");
            }
        }
        let edge_defaults = EdgeConfig::default();
        let edge = EdgeConfig {
            header_read_timeout: pick!(header_read_timeout_s)
                .map(Duration::from_secs)
                .unwrap_or(edge_defaults.header_read_timeout),
            idle_timeout: pick!(idle_timeout_s).map(Duration::from_secs).unwrap_or(edge_defaults.idle_timeout),
            body_min_bytes_per_s: pick!(body_min_bytes_per_s).unwrap_or(edge_defaults.body_min_bytes_per_s),
            body_read_grace: pick!(body_read_grace_s).map(Duration::from_secs).unwrap_or(edge_defaults.body_read_grace),
            max_connections: pick!(max_connections).or(edge_defaults.max_connections),
            max_in_flight_body_bytes: pick!(max_in_flight_body_bytes).unwrap_or(edge_defaults.max_in_flight_body_bytes),
            max_in_flight_pings: pick!(max_in_flight_pings).unwrap_or(edge_defaults.max_in_flight_pings),
            ..edge_defaults
        };
        if edge.header_read_timeout.is_zero() || edge.idle_timeout.is_zero() {
            bail!("header_read_timeout_s and idle_timeout_s must be at least 1");
        }
        if edge.max_connections == Some(0) {
            bail!("max_connections must be at least 1");
        }
        if (edge.max_in_flight_body_bytes as u128)
            < http.campaign_body_limit_bytes.max(http.ping_body_limit_bytes) as u128
        {
            bail!("max_in_flight_body_bytes must be at least the largest body limit, or no such body is ever admitted");
        }
        if edge.max_in_flight_pings < crate::http::pings::MAX_BATCH as u64 {
            bail!("max_in_flight_pings must be at least 10000 (one full batch)");
        }
        Ok(Self {
            listen,
            admin_token,
            admin_token_generated,
            client_secret,
            client_secret_generated,
            engine,
            store,
            push,
            http,
            shutdown_grace: Duration::from_secs(pick!(shutdown_grace_s).unwrap_or(10)),
            client_secret_previous,
            jwt,
            rate_limits,
            edge,
        })
    }
}

/// A secret given as a value or as a file (not both). A file's trailing newline (`\n` or
/// `\r\n`, as editors and `echo` add) is trimmed. Errors name the setting and the file, never
/// the value.
fn secret(name: &str, value: Option<String>, file: Option<&Path>) -> anyhow::Result<Option<Secret>> {
    let value = match (value, file) {
        (Some(_), Some(_)) => bail!("{name} is given both as a value and as a file ({name}_file); give one"),
        (Some(v), None) => v,
        (None, Some(path)) => {
            let mut text =
                std::fs::read_to_string(path).with_context(|| format!("reading {name}_file {}", path.display()))?;
            if text.ends_with('\n') {
                text.pop();
                if text.ends_with('\r') {
                    text.pop();
                }
            }
            text
        }
        (None, None) => return Ok(None),
    };
    if value.is_empty() {
        bail!("{name} must not be empty");
    }
    Ok(Some(Secret::new(value)))
}

fn read_file(path: &Path) -> anyhow::Result<ServeArgs> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading config file {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("parsing config file {}", path.display()))
}

/// `:PORT` (no host) means every interface, as in Go and most servers.
fn normalize_listen(listen: String) -> String {
    match listen.strip_prefix(':') {
        Some(port) => format!("0.0.0.0:{port}"),
        None => listen,
    }
}

/// Accepts `host:port` (a name or an IP address, `[v6]:port` included).
fn check_listen(listen: &str) -> anyhow::Result<()> {
    if listen.parse::<SocketAddr>().is_ok() {
        return Ok(());
    }
    listen
        .to_socket_addrs()
        .with_context(|| format!("listen address {listen:?} is not host:port"))?
        .next()
        .map(|_| ())
        .with_context(|| format!("listen address {listen:?} resolves to nothing"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> ServeArgs {
        let mut argv = vec!["kabao", "serve"];
        argv.extend_from_slice(list);
        match Cli::try_parse_from(argv).expect("parses").command {
            Command::Serve(a) => a,
            other => panic!("expected serve, got {other:?}"),
        }
    }

    #[test]
    fn defaults_are_api_md_defaults() {
        let c = Config::resolve(ServeArgs::default(), ServeArgs::default()).unwrap();
        assert_eq!(c.listen, "127.0.0.1:8080");
        assert_eq!(c.engine, EngineConfig::default());
        assert!(c.admin_token_generated && c.client_secret_generated);
        assert_eq!(c.http.campaign_body_limit_bytes, 128 << 20);
        assert_eq!(c.http.ping_body_limit_bytes, 4 << 20);
        assert_eq!(c.rate_limits, RateLimitConfig::default());
        assert_eq!(c.rate_limits.requests_per_user_per_s, 5.0);
        assert_eq!(c.jwt.max_lifetime_s, Some(86_400));
        assert!(c.client_secret_previous.is_none());
    }

    #[test]
    fn secrets_from_files_are_trimmed_and_exclusive() {
        let dir = std::env::temp_dir().join(format!("kabao-secrets-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let token = dir.join("admin");
        std::fs::write(&token, "from-file\n").unwrap();
        let previous = dir.join("previous");
        std::fs::write(&previous, "old-secret\r\n").unwrap();
        let c = Config::resolve(
            args(&[
                "--admin-token-file",
                token.to_str().unwrap(),
                "--client-secret",
                "new",
                "--client-secret-previous-file",
                previous.to_str().unwrap(),
            ]),
            ServeArgs::default(),
        )
        .unwrap();
        assert_eq!(c.admin_token.expose(), "from-file");
        assert!(!c.admin_token_generated);
        assert_eq!(c.client_secret_previous.as_ref().unwrap().expose(), "old-secret");

        let both = Config::resolve(
            args(&["--admin-token", "x", "--admin-token-file", token.to_str().unwrap()]),
            ServeArgs::default(),
        )
        .unwrap_err();
        assert!(both.to_string().contains("both"), "{both}");
        assert!(!both.to_string().contains("from-file"));
        let missing =
            Config::resolve(args(&["--client-secret-file", "/nonexistent/kabao"]), ServeArgs::default()).unwrap_err();
        assert!(format!("{missing:#}").contains("client_secret_file"));
        std::fs::write(&token, "\n").unwrap();
        let empty = Config::resolve(args(&["--admin-token-file", token.to_str().unwrap()]), ServeArgs::default());
        assert!(empty.is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn jwt_and_rate_limit_settings() {
        let c = Config::resolve(
            args(&[
                "--jwt-max-lifetime-s",
                "0",
                "--jwt-audience",
                "kabao",
                "--rate-limit-requests-per-ip-per-s",
                "20",
                "--rate-limit-redeems-per-user-per-min",
                "0",
            ]),
            ServeArgs::default(),
        )
        .unwrap();
        assert_eq!(c.jwt.max_lifetime_s, None);
        assert_eq!(c.jwt.audience.as_deref(), Some("kabao"));
        assert_eq!(c.rate_limits.requests_per_ip_per_s, 20.0);
        assert_eq!(c.rate_limits.redeems_per_user_per_min, 0.0);
        assert!(Config::resolve(args(&["--rate-limit-requests-per-user-per-s=-1"]), ServeArgs::default()).is_err());
    }

    #[test]
    fn flags_win_over_the_file_which_wins_over_defaults() {
        let file: ServeArgs =
            toml::from_str("max_speed_mps = 5.0\nstate_ttl_s = 60\nlisten = \"127.0.0.1:9\"").unwrap();
        let c = Config::resolve(args(&["--max-speed-mps", "0", "--admin-token", "t"]), file).unwrap();
        assert_eq!(c.engine.max_speed_mps, 0.0);
        assert_eq!(c.engine.state_ttl_s, 60);
        assert_eq!(c.listen, "127.0.0.1:9");
        assert_eq!(c.admin_token.expose(), "t");
        assert!(!c.admin_token_generated);
    }

    #[test]
    fn a_bare_port_listens_everywhere() {
        let c = Config::resolve(args(&["--listen", ":0"]), ServeArgs::default()).unwrap();
        assert_eq!(c.listen, "0.0.0.0:0");
        assert!(Config::resolve(args(&["--listen", "nonsense"]), ServeArgs::default()).is_err());
    }

    #[test]
    fn unknown_file_keys_are_refused() {
        assert!(toml::from_str::<ServeArgs>("max_speed = 5.0").is_err());
    }

    #[test]
    fn the_store_is_embedded_by_default_ephemeral_or_redis_when_asked() {
        let store = |list: &[&str]| Config::resolve(args(list), ServeArgs::default()).map(|c| c.store);
        let embedded = |dir: &str| StoreChoice::Embedded {
            data_dir: dir.into(),
            checkpoint_interval: Duration::from_secs(1),
            retention: Duration::from_secs(90 * 86_400),
            cache_bytes: 8 << 20,
        };
        assert_eq!(store(&[]).unwrap(), embedded("kabao-data"));
        assert_eq!(store(&["--data-dir", "/d"]).unwrap(), embedded("/d"));
        assert_eq!(store(&["--ephemeral"]).unwrap(), StoreChoice::Ephemeral);
        assert_eq!(store(&["--ephemeral", "false"]).unwrap(), embedded("kabao-data"));
        assert!(matches!(store(&["--redis-url", "redis://h:1"]).unwrap(), StoreChoice::Redis { .. }));
        assert!(store(&["--redis-url", "http://h"]).is_err());
        assert!(store(&["--redis-url", "redis://h", "--ephemeral"]).is_err());
    }

    #[test]
    fn push_settings_come_from_flags_and_the_file() {
        let c = Config::resolve(ServeArgs::default(), ServeArgs::default()).unwrap();
        assert_eq!(c.push, PushConfig::default());
        assert_eq!(c.push.provider, PushProviderKind::Auto);
        assert_eq!(c.push.max_attempts, 8);
        let file: ServeArgs =
            toml::from_str("push_provider = \"log\"\napns_topic = \"com.example\"\npush_max_attempts = 3").unwrap();
        let c = Config::resolve(args(&["--fcm-credentials", "/k.json", "--apns-base-url", "https://x"]), file).unwrap();
        assert_eq!(c.push.provider, PushProviderKind::Log);
        assert_eq!(c.push.fcm_credentials.as_deref(), Some(Path::new("/k.json")));
        assert_eq!(c.push.apns_base_url, "https://x");
        assert_eq!(c.push.apns_topic.as_deref(), Some("com.example"));
        assert_eq!(c.push.max_attempts, 3);
        assert!(Config::resolve(args(&["--push-max-attempts", "0"]), ServeArgs::default()).is_err());
        let c = Config::resolve(
            args(&["--push-backoff-base-ms", "5", "--push-backoff-max-ms", "40", "--push-concurrency", "7"]),
            ServeArgs::default(),
        )
        .unwrap();
        assert_eq!((c.push.backoff_base, c.push.backoff_max), (Duration::from_millis(5), Duration::from_millis(40)));
        assert_eq!(c.push.concurrency_per_provider, 7);
        assert!(Config::resolve(
            args(&["--push-backoff-base-ms", "50", "--push-backoff-max-ms", "40"]),
            ServeArgs::default()
        )
        .is_err());
        assert!(Config::resolve(args(&["--push-concurrency", "0"]), ServeArgs::default()).is_err());
        assert_eq!(c.push.connections_per_provider, 4);
        let c = Config::resolve(args(&["--push-connections", "2"]), ServeArgs::default()).unwrap();
        assert_eq!(c.push.connections_per_provider, 2);
        assert!(Config::resolve(args(&["--push-connections", "0"]), ServeArgs::default()).is_err());
        assert_eq!((c.push.request_timeout, c.push.lease), (Duration::from_secs(10), Duration::from_secs(60)));
        let c = Config::resolve(args(&["--push-timeout-ms", "1000", "--push-lease-ms", "3000"]), ServeArgs::default())
            .unwrap();
        assert_eq!((c.push.request_timeout, c.push.lease), (Duration::from_secs(1), Duration::from_secs(3)));
        // A lease shorter than three attempts' deadlines could hand a push in flight to another node.
        let short =
            Config::resolve(args(&["--push-timeout-ms", "1000", "--push-lease-ms", "2999"]), ServeArgs::default());
        assert!(short.unwrap_err().to_string().contains("push_lease_ms"));
    }

    #[test]
    fn secrets_never_show_in_debug() {
        let mut c = Config::for_tests("admin-sekrit", "client-sekrit");
        c.client_secret_previous = Some(Secret::new("previous-sekrit"));
        let shown = format!("{c:?}");
        assert!(!shown.contains("sekrit"), "{shown}");
        assert!(shown.contains("[redacted]"));
    }
}
