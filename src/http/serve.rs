//! The connection edge: kabao's own accept loop over hyper's HTTP/1 and HTTP/2 (h2c) server, so
//! that no client holding connections open can starve the others (issue 10).
//!
//! What it bounds, and why each bound is here rather than in a layer:
//!
//! - **Open connections**: at most [`connection_cap`] at once (derived from the process's file
//!   limit, which [`raise_file_limit`] lifts to its hard limit at start). At the cap the loop
//!   stops accepting and the kernel's backlog holds newcomers, instead of `accept` failing with
//!   `EMFILE` in a loop.
//! - **Accept errors** back off (10 ms doubling to 1 s), logged once per back-off, never spun on.
//! - **Header-read timeout**: a connection must send its first byte, and HTTP/1 a whole request
//!   head, within `header_read_timeout` of being able to (for HTTP/1 keep-alive this is also the
//!   idle timeout between requests: hyper starts the timer as soon as it waits for a head).
//! - **Idle timeout**: a connection that moves no byte either way for `idle_timeout` is closed
//!   (HTTP/2 connections with no stream, stalled streams, silent sockets).
//! - **Error bodies**: hyper answers requests it cannot parse itself (`400`, `414` for a request
//!   target over 64 KiB, `431` for heads over its buffer) with an empty body. API.md says every
//!   4xx carries the error object, so [`EdgeIo`] recognises such a reply on its way out — a 4xx
//!   head with `content-length: 0` and no body, which kabao's own handlers never write — and
//!   writes the error object in its place. kabao's own, smaller limits on heads and targets are
//!   enforced by the router (see `check_head` in `mod.rs`) and answered the ordinary way.
//!   Over HTTP/2 (h2c) the h2 layer answers one request itself: a header list over
//!   `SETTINGS_MAX_HEADER_LIST_SIZE` gets a bodiless `431` (up to 4 times that; beyond, h2 closes
//!   the connection); everything else it refuses is a `RST_STREAM`, no HTTP status at all. That
//!   reply is HPACK-coded and flow-controlled inside h2, so it cannot be rewritten here. Instead
//!   h2's limit is set well above kabao's own ([`H2_MAX_HEADER_LIST`], 1 MiB, advertised to the
//!   peer, so a conforming client never sends more): every header list below it reaches
//!   `check_head`, which answers anything over `max_header_bytes` with `431` and the error
//!   object, as over HTTP/1 (tests/api/edge.rs checks each 4xx over h2c, a 300 KiB header list
//!   too). Memory stays bounded: h2 decodes one header block at a time per connection, keeps at
//!   most about 1.25 × the limit of it encoded and the limit of it decoded, and `check_head`
//!   drops an oversize request before any handler runs. Above the limit (a client ignoring the
//!   advertised setting) h2's bodiless `431` remains.
//!
//! Body-read rate, rate limits and the in-flight budget are request-level and live in
//! `mod.rs`, `rate_limit.rs` and `admission.rs`.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::http::StatusCode;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use super::error::ApiError;
use crate::config::EdgeConfig;

/// Hyper's own head buffer: well above kabao's `max_header_bytes`, so ordinary excess reaches
/// kabao's check (which answers with the error object directly) and only gross excess is cut
/// by hyper (whose reply [`EdgeIo`] rewrites).
const HYPER_MAX_BUF: usize = 256 * 1024;

/// The largest HTTP/2 header list h2 hands on (`SETTINGS_MAX_HEADER_LIST_SIZE`, decoded size):
/// far above kabao's `max_header_bytes`, so that an oversize head reaches `check_head` and is
/// answered with the error object, not with h2's own bodiless `431` (see the module doc). It
/// bounds what one connection's header block may take while it is decoded.
const H2_MAX_HEADER_LIST: usize = 1024 * 1024;

/// File descriptors kept free of connections: the store's files, the push clients' sockets,
/// logs.
const RESERVED_FDS: u64 = 256;

/// Most connections kabao ever allows by default, whatever the file limit.
const DEFAULT_CONNECTION_CEILING: u64 = 65_536;

/// Raises the soft limit on open files to the hard limit (where the OS allows it) and returns
/// the soft limit now in force, if it can be read.
pub fn raise_file_limit() -> Option<u64> {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => Some(limit),
        Err(e) => {
            tracing::warn!(error = %e, "could not raise the open-file limit");
            rlimit::getrlimit(rlimit::Resource::NOFILE).ok().map(|(soft, _)| soft)
        }
    }
}

/// The connection cap: the configured one, or 80 % of the file limit less [`RESERVED_FDS`]
/// (at most [`DEFAULT_CONNECTION_CEILING`], at least 16).
pub fn connection_cap(edge: &EdgeConfig, file_limit: Option<u64>) -> usize {
    if let Some(n) = edge.max_connections {
        return n;
    }
    let derived = match file_limit {
        Some(limit) => limit.saturating_sub(RESERVED_FDS) / 5 * 4,
        None => 1024,
    };
    derived.clamp(16, DEFAULT_CONNECTION_CEILING) as usize
}

/// Serves `router` on `listener` until `shutdown` is cancelled; then stops accepting and gives
/// open connections `grace` to finish their requests.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    edge: EdgeConfig,
    shutdown: CancellationToken,
    grace: Duration,
) -> io::Result<()> {
    let file_limit = raise_file_limit();
    let cap = connection_cap(&edge, file_limit);
    tracing::info!(max_connections = cap, file_limit, "connection cap");
    let connections = Arc::new(Semaphore::new(cap));
    let builder = Arc::new(hyper_builder(&edge));
    let graceful = GracefulShutdown::new();
    let mut backoff = Duration::ZERO;
    loop {
        let permit = tokio::select! {
            permit = connections.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
            () = shutdown.cancelled() => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // EMFILE, ENFILE, ENOBUFS…: retrying at once would fail the same way.
                    backoff = (backoff * 2).clamp(Duration::from_millis(10), Duration::from_secs(1));
                    tracing::warn!(error = %e, backoff_ms = backoff.as_millis() as u64, "accept failed; backing off");
                    metrics::counter!("kabao_accept_errors_total").increment(1);
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => continue,
                        () = shutdown.cancelled() => break,
                    }
                }
            },
            () = shutdown.cancelled() => break,
        };
        backoff = Duration::ZERO;
        let _ = stream.set_nodelay(true);
        let activity = Arc::new(Activity::new());
        let io = TokioIo::new(EdgeIo::new(stream, activity.clone()));
        let service =
            TowerToHyperService::new(router.clone().map_request(move |mut request: axum::http::Request<Incoming>| {
                request.extensions_mut().insert(ConnectInfo(peer));
                request
            }));
        let connection = graceful.watch(builder.serve_connection(io, service).into_owned());
        let edge = edge.clone();
        metrics::gauge!("kabao_http_connections_open").increment(1.0);
        tokio::spawn(async move {
            tokio::select! {
                result = connection => {
                    if let Err(e) = result {
                        tracing::debug!(error = %e, %peer, "connection ended with an error");
                    }
                }
                reason = activity.expired(edge.header_read_timeout, edge.idle_timeout) => {
                    // Dropping the connection closes the socket.
                    tracing::debug!(%peer, reason, "closing connection");
                    metrics::counter!("kabao_http_connections_timed_out_total", "reason" => reason).increment(1);
                }
            }
            metrics::gauge!("kabao_http_connections_open").decrement(1.0);
            drop(permit);
        });
    }
    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(grace) => {
            tracing::warn!(grace_s = grace.as_secs(), "requests still in flight at the shutdown deadline; dropping them");
        }
    }
    Ok(())
}

/// Hyper's HTTP/1 and HTTP/2 settings for `edge`.
fn hyper_builder(edge: &EdgeConfig) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(edge.header_read_timeout)
        .max_buf_size(HYPER_MAX_BUF.max(edge.max_header_bytes * 2))
        // Above kabao's own count, so that kabao answers an excess with the error object.
        .max_headers(edge.max_headers * 4);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(H2_MAX_HEADER_LIST.max(edge.max_header_bytes * 4)).unwrap_or(u32::MAX))
        .max_concurrent_streams(200)
        // Pings keep an idle-looking but live HTTP/2 connection honest: a peer that stopped
        // answering is dropped; a live one is still closed by the idle timeout.
        .keep_alive_interval(edge.idle_timeout / 2)
        .keep_alive_timeout(Duration::from_secs(20));
    builder
}

/// When a connection last moved a byte, and whether it ever sent one.
struct Activity {
    /// Milliseconds since `origin` of the last read or write.
    last_ms: AtomicU64,
    /// Whether the peer ever sent a byte.
    read_any: AtomicBool,
    /// The connection's start.
    origin: Instant,
}

impl Activity {
    fn new() -> Self {
        Self { last_ms: AtomicU64::new(0), read_any: AtomicBool::new(false), origin: Instant::now() }
    }

    fn touch(&self) {
        self.last_ms.store(self.origin.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// Resolves when the connection should be closed: no byte at all within `first_byte`, or
    /// none either way for `idle`. Says which.
    async fn expired(&self, first_byte: Duration, idle: Duration) -> &'static str {
        tokio::time::sleep(first_byte).await;
        if !self.read_any.load(Ordering::Relaxed) {
            return "no_request";
        }
        loop {
            let last = self.origin + Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
            let deadline = last + idle;
            if Instant::now() >= deadline {
                return "idle";
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

/// The socket of one connection: records activity for the timeouts, and puts the error object
/// into the bodiless 4xx replies hyper writes itself.
struct EdgeIo {
    inner: TcpStream,
    activity: Arc<Activity>,
    /// A rewritten reply still to be written, and how much of it is written.
    pending: Option<(Vec<u8>, usize)>,
}

impl EdgeIo {
    fn new(inner: TcpStream, activity: Arc<Activity>) -> Self {
        Self { inner, activity, pending: None }
    }

    /// Writes what is pending; `Ready(Ok)` once nothing is.
    fn poll_pending(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while let Some((bytes, written)) = &mut self.pending {
            match Pin::new(&mut self.inner).poll_write(cx, &bytes[*written..]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => {
                    self.activity.touch();
                    *written += n;
                    if *written == bytes.len() {
                        self.pending = None;
                    }
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncRead for EdgeIo {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let result = Pin::new(&mut this.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.activity.read_any.store(true, Ordering::Relaxed);
            this.activity.touch();
        }
        result
    }
}

impl AsyncWrite for EdgeIo {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        std::task::ready!(this.poll_pending(cx))?;
        if let Some(reply) = rewrite_bodiless_error(buf) {
            this.pending = Some((reply, 0));
            // Whatever part is not written now is written by the next write, flush or shutdown.
            if let Poll::Ready(Err(e)) = this.poll_pending(cx) {
                return Poll::Ready(Err(e));
            }
            return Poll::Ready(Ok(buf.len()));
        }
        let result = Pin::new(&mut this.inner).poll_write(cx, buf);
        if matches!(result, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.touch();
        }
        result
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        std::task::ready!(this.poll_pending(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        std::task::ready!(this.poll_pending(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }

    // Not vectored: hyper then writes a reply head in one `poll_write`, which is what
    // `rewrite_bodiless_error` needs to see it whole.
    fn is_write_vectored(&self) -> bool {
        false
    }
}

/// When `buf` is exactly a bodiless HTTP/1 4xx reply head (hyper's own answer to a request it
/// could not parse), the same reply with API.md's error object as its body.
fn rewrite_bodiless_error(buf: &[u8]) -> Option<Vec<u8>> {
    if !(buf.starts_with(b"HTTP/1.1 4") || buf.starts_with(b"HTTP/1.0 4")) || !buf.ends_with(b"\r\n\r\n") {
        return None;
    }
    let head = std::str::from_utf8(buf).ok()?;
    // One head, nothing after it.
    if head.find("\r\n\r\n")? + 4 != head.len() {
        return None;
    }
    let mut lines = head.split("\r\n");
    let status_line = lines.next()?;
    let status: u16 = status_line.get(9..12)?.parse().ok()?;
    let mut bodiless = false;
    let mut kept = Vec::new();
    for line in lines.filter(|l| !l.is_empty()) {
        let (name, value) = line.split_once(':')?;
        match name.trim().to_ascii_lowercase().as_str() {
            "content-length" if value.trim() == "0" => bodiless = true,
            "content-length" | "content-type" | "transfer-encoding" => return None,
            "connection" => {}
            _ => kept.push(line),
        }
    }
    if !bodiless {
        return None;
    }
    let error = match StatusCode::from_u16(status).ok()? {
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE => ApiError::HeadersTooLarge,
        StatusCode::URI_TOO_LONG => ApiError::UriTooLong,
        StatusCode::REQUEST_TIMEOUT => ApiError::RequestTimeout,
        _ => ApiError::MalformedRequest,
    };
    let body = serde_json::to_vec(&super::error::ErrorBody { error: error.body() }).ok()?;
    let mut reply = format!(
        "{status_line}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n",
        body.len()
    );
    for line in kept {
        reply.push_str(line);
        reply.push_str("\r\n");
    }
    reply.push_str("\r\n");
    let mut reply = reply.into_bytes();
    reply.extend_from_slice(&body);
    Some(reply)
}

/// The peer of a request, as the accept loop recorded it (absent for requests that did not come
/// through it, e.g. `Router::oneshot` in unit tests).
pub fn peer_addr<B>(request: &axum::http::Request<B>) -> Option<SocketAddr> {
    request.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| c.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hypers_bodiless_errors_get_the_error_object() {
        let head = b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\ndate: Thu, 01 Jan 1970 00:00:00 GMT\r\n\r\n";
        let reply = String::from_utf8(rewrite_bodiless_error(head).unwrap()).unwrap();
        assert!(reply.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"), "{reply}");
        assert!(reply.contains("date: Thu"), "{reply}");
        let body = reply.split("\r\n\r\n").nth(1).unwrap();
        let json: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(json["error"]["code"], "headers_too_large");
        assert!(reply.contains(&format!("content-length: {}\r\n", body.len())));
        let bad = rewrite_bodiless_error(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n").unwrap();
        assert!(String::from_utf8(bad).unwrap().contains("malformed_request"));
    }

    #[test]
    fn kabaos_own_replies_pass_untouched() {
        for reply in [
            &b"HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\ncontent-length: 10\r\n\r\n"[..],
            b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n{}",
            b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
            b"{\"error\": 1}",
        ] {
            assert!(rewrite_bodiless_error(reply).is_none(), "{}", String::from_utf8_lossy(reply));
        }
    }

    #[test]
    fn the_cap_follows_the_file_limit() {
        let edge = EdgeConfig::default();
        assert_eq!(connection_cap(&edge, Some(1024)), (1024 - 256) / 5 * 4);
        assert_eq!(connection_cap(&edge, Some(1 << 30)), 65_536);
        assert_eq!(connection_cap(&edge, Some(100)), 16);
        assert_eq!(connection_cap(&EdgeConfig { max_connections: Some(7), ..edge }, Some(1024)), 7);
    }
}
