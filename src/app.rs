//! Startup and shutdown: [`Application::build`] wires store, engine, push dispatcher and router
//! and binds the listener (so `127.0.0.1:0` gives a known port before serving);
//! [`Application::run_until_stopped`] serves until a shutdown future resolves, then stops
//! accepting and gives requests in flight a deadline to finish.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, EdgeConfig, StoreChoice, StoreCommand};
use crate::dispatch::worker::{DispatchConfig, Dispatcher};
use crate::engine::Engine;
use crate::http::{router, AppState};
use crate::store::embedded::{EmbeddedConfig, EmbeddedStore};
use crate::store::memory::MemoryStore;
use crate::store::redis::RedisStore;
use crate::store::Store;

/// A kabao server, bound and ready to serve.
pub struct Application {
    /// The bound socket; taken by `run_until_stopped`.
    listener: TcpListener,
    /// The address actually bound (the port chosen when 0 was asked).
    local_addr: SocketAddr,
    /// The routes with their state.
    router: axum::Router,
    /// The engine, for embedding programs and tests that look inside.
    engine: Arc<Engine>,
    /// Cancelled on shutdown; background tasks watch it.
    shutdown: CancellationToken,
    /// Background tasks (the dispatcher), awaited on shutdown.
    tasks: TaskTracker,
    /// Requests in flight get this long after shutdown starts.
    grace: Duration,
    /// Connection bounds of the serving loop.
    edge: EdgeConfig,
}

impl Application {
    /// Opens the configured store and builds a server over it, bound to `config.listen`.
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        let store = open_store(&config.store, config.engine.max_tracked_users).await?;
        Self::build_with_store(config, store).await
    }

    /// Builds a server over `store` and binds `config.listen`.
    pub async fn build_with_store(config: Config, store: Arc<dyn Store>) -> anyhow::Result<Self> {
        // The recorder first, so what start-up measures (the index build) reaches `/metrics`.
        crate::http::ops::metrics_handle();
        let engine = Engine::start(store.clone(), config.engine.clone()).await.context("loading campaigns")?;
        let tokens = crate::store::provider_tokens(store.clone());
        let store_for_limits = store.clone();
        let providers = crate::dispatch::providers_from_config(&config.push, tokens).context("push providers")?;
        tracing::info!(fcm = providers.fcm.name(), apns = providers.apns.name(), "push providers");

        let shutdown = CancellationToken::new();
        let tasks = TaskTracker::new();
        let listener = TcpListener::bind(&config.listen).await.with_context(|| format!("binding {}", config.listen))?;
        let local_addr = listener.local_addr().context("reading the bound address")?;

        let consumer = consumer_name(local_addr);
        let dispatch = DispatchConfig::from_push(&config.push);
        let dispatcher = Dispatcher::new(store, providers, dispatch, consumer);
        tasks.spawn(dispatcher.run(engine.issued_notify(), shutdown.clone()));
        // Shared by every node where the store is (Redis), else this node's own.
        let rate_limiter = store_for_limits
            .shared_rate_limiter()
            .unwrap_or_else(|| Arc::new(crate::http::rate_limit::MemoryRateLimiter::default()));
        let router = router(AppState::with_rate_limiter(engine.clone(), &config, rate_limiter));
        Ok(Self {
            listener,
            local_addr,
            router,
            engine,
            shutdown,
            tasks,
            grace: config.shutdown_grace,
            edge: config.edge,
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The bound port.
    pub fn port(&self) -> u16 {
        self.local_addr.port()
    }

    /// The engine behind the server.
    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// Serves until `signal` resolves; then stops accepting, lets requests in flight finish for
    /// up to the grace period, and stops the background tasks.
    ///
    /// Serving is kabao's own accept loop ([`crate::http::serve`]): connection cap, header-read
    /// and idle timeouts, accept errors backed off.
    pub async fn run_until_stopped(self, signal: impl Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
        let Self { listener, router, shutdown, tasks, grace, edge, engine, .. } = self;
        let stop = shutdown.clone();
        tokio::spawn(async move {
            signal.await;
            tracing::info!("shutting down: no new connections; draining requests in flight");
            stop.cancel();
        });
        crate::http::serve::serve(listener, router, edge, shutdown.clone(), grace).await.context("serving")?;
        shutdown.cancel();
        tasks.close();
        if tokio::time::timeout(grace, tasks.wait()).await.is_err() {
            tracing::warn!("background tasks did not stop in time");
        }
        if let Err(e) = engine.store().close().await {
            tracing::warn!(error = %e, "the store did not close cleanly");
        }
        tracing::info!("stopped");
        Ok(())
    }
}

/// Opens the store `choice` names, saying at start-up which one is in use and where; a store that
/// keeps every trigger state in memory keeps at most `max_tracked_users` of them.
pub async fn open_store(choice: &StoreChoice, max_tracked_users: usize) -> anyhow::Result<Arc<dyn Store>> {
    match choice {
        StoreChoice::Ephemeral => {
            tracing::info!(store = "memory", "store: in memory only (--ephemeral): everything is lost on exit");
            Ok(Arc::new(MemoryStore::with_max_user_states(max_tracked_users)))
        }
        StoreChoice::Embedded { data_dir, checkpoint_interval, retention, cache_bytes } => {
            let config = EmbeddedConfig {
                checkpoint_interval: *checkpoint_interval,
                retention: *retention,
                max_user_states: max_tracked_users,
                cache_bytes: *cache_bytes,
                ..EmbeddedConfig::new(data_dir)
            };
            let store = EmbeddedStore::open(config)?;
            #[cfg(unix)]
            backup_on_sigusr1(&store, data_dir);
            Ok(store)
        }
        StoreChoice::Redis { url } => {
            let store = RedisStore::connect(url.expose()).await.context("connecting to the Redis store")?;
            tracing::info!(store = "redis", identity = %store.identity(), "store: redis, shared by every node on it");
            Ok(Arc::new(store))
        }
    }
}

/// `kill -USR1 <pid>` writes a consistent copy of the running embedded store into
/// `<data dir>/backups/<UTC time>/` (a data directory of its own: `kabao serve --data-dir` on it
/// is the store as of that moment) and logs where, or why not. As Redis's `BGSAVE`, it runs
/// beside serving; a signal rather than an HTTP route, so the API stays API.md's.
#[cfg(unix)]
fn backup_on_sigusr1(store: &Arc<EmbeddedStore>, data_dir: &std::path::Path) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut signals = match signal(SignalKind::user_defined1()) {
        Ok(signals) => signals,
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGUSR1: no backups on signal");
            return;
        }
    };
    let store = Arc::downgrade(store);
    let backups = data_dir.join("backups");
    tokio::spawn(async move {
        while signals.recv().await.is_some() {
            let Some(store) = store.upgrade() else { return };
            let dest = backups.join(chrono::Utc::now().format("%Y%m%dT%H%M%S%.3fZ").to_string());
            match store.snapshot_into(&dest).await {
                Ok(rows) => tracing::info!(path = %dest.display(), rows, "backup written"),
                Err(e) => tracing::error!(path = %dest.display(), error = %e, "backup failed"),
            }
        }
    });
}

/// Runs `kabao store …`.
pub async fn store_command(command: StoreCommand) -> anyhow::Result<()> {
    match command {
        StoreCommand::Adopt { redis_url } => {
            let identity = RedisStore::adopt(&redis_url).await.context("adopting the Redis store")?;
            println!("store adopted: new identity {identity}; running nodes serve from it within a second");
            Ok(())
        }
    }
}

/// Resolves on Ctrl-C or SIGTERM (what `docker stop` and Kubernetes send).
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::warn!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = terminate => {}
    }
}

/// Runs `kabao serve` with a resolved config: announces the port and a generated admin token,
/// then serves until Ctrl-C or SIGTERM.
pub async fn serve(config: Config) -> anyhow::Result<()> {
    let generated_token = config.admin_token_generated.then(|| config.admin_token.clone());
    if config.client_secret_generated {
        tracing::warn!("no client secret configured; generated a random one, so no client JWT verifies until KABAO_CLIENT_SECRET is set");
    }
    crate::telemetry::set_user_hash_key(config.client_secret.expose().as_bytes());
    let app = Application::build(config).await?;
    if let Some(token) = generated_token {
        // API.md: generated and printed once. Printed to stdout, never logged.
        println!("kabao admin token (generated; set KABAO_ADMIN_TOKEN to choose one): {}", token.expose());
    }
    println!("kabao listening on http://{}", app.local_addr());
    tracing::info!(addr = %app.local_addr(), "listening");
    app.run_until_stopped(shutdown_signal()).await
}

/// Runs `kabao demo`: an embedded server on a free loopback port, driven by the demo's simulated
/// shoppers through the real HTTP API, stopped when the demo is done.
pub async fn demo(args: crate::demo::DemoArgs) -> anyhow::Result<()> {
    let config = Config::embedded();
    let admin_token = config.admin_token.expose().to_owned();
    let app = Application::build(config).await?;
    let server = crate::demo::DemoServer { base_url: format!("http://{}", app.local_addr()), admin_token };
    let stop = CancellationToken::new();
    let stopped = stop.clone();
    let running = tokio::spawn(app.run_until_stopped(async move { stopped.cancelled().await }));
    let result = crate::demo::run(args, server).await;
    stop.cancel();
    running.await.context("server task")??;
    result
}

/// The dispatcher's name in the outbox: `kabao-<host>-<listen address>`. No two live processes
/// share it (one listener per address and host), and a node restarted on its address takes the
/// same name, so it takes back at once what its previous process left unfinished instead of
/// waiting for the lease to run out (the Redis store, see its outbox docs).
fn consumer_name(listen: std::net::SocketAddr) -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into());
    format!("kabao-{host}-{listen}")
}
