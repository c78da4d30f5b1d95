//! What the test targets that run the real `kabao` binary, or wait on the push fakes, share:
//! reading the announced address, a scratch directory, polling with a deadline.
//! (Each target compiles this module on its own and uses part of it.)
#![allow(dead_code)]

use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// `kabao serve --listen 127.0.0.1:0` with admin token `admin` and the per-address rate limit
/// off, none of the caller's `KABAO_LISTEN`, `KABAO_EPHEMERAL`, `KABAO_REDIS_URL` or
/// `KABAO_DATA_DIR` leaking in, stdout piped for [`Server::spawn`] and stderr dropped (a test
/// that reads the logs pipes it instead). The caller adds the store and its own settings.
pub fn serve_command(admin: &str) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_kabao"));
    command
        .args(["serve", "--listen", "127.0.0.1:0"])
        .env("KABAO_ADMIN_TOKEN", admin)
        .env("KABAO_RATE_LIMIT_REQUESTS_PER_IP_PER_S", "0")
        .env_remove("KABAO_LISTEN")
        .env_remove("KABAO_EPHEMERAL")
        .env_remove("KABAO_REDIS_URL")
        .env_remove("KABAO_DATA_DIR")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true);
    command
}

/// A running `kabao serve` child and the URL it announced.
pub struct Server {
    pub child: Child,
    pub base: String,
}

impl Server {
    /// Starts `command` (see [`serve_command`]) and waits for its address.
    pub async fn spawn(command: &mut Command) -> Server {
        let mut child = command.spawn().expect("kabao starts");
        let base = listening(&mut child).await;
        Server { child, base }
    }
}

/// Reads `child`'s stdout up to its `kabao listening on URL` line and answers the URL; panics if
/// the process exits first. The rest of stdout is dropped.
pub async fn listening(child: &mut Child) -> String {
    try_listening(child).await.expect("kabao exited before listening")
}

/// [`listening`], answering `None` when the process exits (or closes stdout) first.
pub async fn try_listening(child: &mut Child) -> Option<String> {
    let mut lines = BufReader::new(child.stdout.take().expect("kabao's stdout is piped")).lines();
    while let Some(line) = lines.next_line().await.expect("reading kabao's stdout") {
        if let Some(url) = line.strip_prefix("kabao listening on ") {
            return Some(url.trim().to_owned());
        }
    }
    None
}

/// A fresh directory under the system's temp dir, named after `what`, this process and a counter.
pub fn scratch_dir(what: &str) -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let dir =
        std::env::temp_dir().join(format!("kabao-{what}-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed)));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Polls `check` every 10 ms until it gives `Some`, failing the test with `what` after a generous
/// deadline (the machine is shared; the deadline only bounds a test that would otherwise hang).
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
