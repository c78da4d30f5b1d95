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
    /// Write each push to the log (the embedded default; needs no credentials).
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
    /// Keep everything in memory only (tests, demos): lost on exit.
    #[arg(long, env = "KABAO_EPHEMERAL", num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub ephemeral: Option<bool>,
    /// Oldest accepted ping `ts_ms`, seconds before the server clock. Default 86400.
    #[arg(long, env = "KABAO_MAX_PING_AGE_S", value_name = "SECONDS")]
    pub max_ping_age_s: Option<u64>,
    /// Trigger state is forgotten after this long without a ping. Default 3600.
    #[arg(long, env = "KABAO_STATE_TTL_S", value_name = "SECONDS")]
    pub state_ttl_s: Option<u64>,
    /// Pings less accurate than this never trigger. Default 100.
    #[arg(long, env = "KABAO_MAX_ACCURACY_M", value_name = "METRES")]
    pub max_accuracy_m: Option<f64>,
    /// Coupons one user may receive over any 24 h; 0 = unlimited. Default 10.
    #[arg(long, env = "KABAO_MAX_COUPONS_PER_USER_PER_DAY", value_name = "N")]
    pub max_coupons_per_user_per_day: Option<u32>,
    /// Implausible-speed bound between consecutive pings; 0 turns the check off. Default 100.
    #[arg(long, env = "KABAO_MAX_SPEED_MPS", value_name = "MPS")]
    pub max_speed_mps: Option<f64>,
    /// Where issued coupons are pushed. Default log.
    #[arg(long, env = "KABAO_PUSH_PROVIDER", value_enum)]
    pub push_provider: Option<PushProviderKind>,
    /// Largest campaign request body. Default 16777216 (16 MiB).
    #[arg(long, env = "KABAO_CAMPAIGN_BODY_LIMIT_BYTES", value_name = "BYTES")]
    pub campaign_body_limit_bytes: Option<usize>,
    /// Largest body of any other request (pings, devices, redemptions). Default 1048576 (1 MiB).
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

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            campaign_body_limit_bytes: 16 * 1024 * 1024,
            ping_body_limit_bytes: 1024 * 1024,
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
    },
    /// A Redis shared by any number of nodes.
    Redis {
        /// `redis://` or `rediss://` URL. Held as a secret: it may carry a password.
        url: Secret,
    },
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
    pub push_provider: PushProviderKind,
    /// Limits of the HTTP edge.
    pub http: HttpConfig,
    /// On shutdown, how long requests in flight get to finish.
    pub shutdown_grace: Duration,
}

impl Config {
    /// A configuration for tests: `127.0.0.1:0`, API.md's defaults, the given secrets.
    pub fn for_tests(admin_token: &str, client_secret: &str) -> Self {
        Self { admin_token: Secret::new(admin_token), client_secret: Secret::new(client_secret), ..Self::embedded() }
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
            push_provider: PushProviderKind::Log,
            http: HttpConfig::default(),
            shutdown_grace: Duration::from_secs(10),
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
            (None, false) => StoreChoice::Embedded { data_dir: pick!(data_dir).unwrap_or_else(|| "kabao-data".into()) },
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

        let listen = normalize_listen(pick!(listen).unwrap_or_else(|| "127.0.0.1:8080".into()));
        check_listen(&listen)?;

        let (admin_token, admin_token_generated) = match pick!(admin_token) {
            Some(t) if t.is_empty() => bail!("admin_token must not be empty"),
            Some(t) => (Secret::new(t), false),
            None => (Secret::generate(), true),
        };
        let (client_secret, client_secret_generated) = match pick!(client_secret) {
            Some(s) if s.is_empty() => bail!("client_secret must not be empty"),
            Some(s) => (Secret::new(s), false),
            None => (Secret::generate(), true),
        };
        Ok(Self {
            listen,
            admin_token,
            admin_token_generated,
            client_secret,
            client_secret_generated,
            engine,
            store,
            push_provider: pick!(push_provider).unwrap_or(PushProviderKind::Log),
            http,
            shutdown_grace: Duration::from_secs(pick!(shutdown_grace_s).unwrap_or(10)),
        })
    }
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
        assert_eq!(c.http.campaign_body_limit_bytes, 16 << 20);
        assert_eq!(c.http.ping_body_limit_bytes, 1 << 20);
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
        assert_eq!(store(&[]).unwrap(), StoreChoice::Embedded { data_dir: "kabao-data".into() });
        assert_eq!(store(&["--data-dir", "/d"]).unwrap(), StoreChoice::Embedded { data_dir: "/d".into() });
        assert_eq!(store(&["--ephemeral"]).unwrap(), StoreChoice::Ephemeral);
        assert_eq!(store(&["--ephemeral", "false"]).unwrap(), StoreChoice::Embedded { data_dir: "kabao-data".into() });
        assert!(matches!(store(&["--redis-url", "redis://h:1"]).unwrap(), StoreChoice::Redis { .. }));
        assert!(store(&["--redis-url", "http://h"]).is_err());
        assert!(store(&["--redis-url", "redis://h", "--ephemeral"]).is_err());
    }

    #[test]
    fn secrets_never_show_in_debug() {
        let c = Config::for_tests("admin-sekrit", "client-sekrit");
        let shown = format!("{c:?}");
        assert!(!shown.contains("sekrit"), "{shown}");
        assert!(shown.contains("[redacted]"));
    }
}
