//! The HTTPS client the push providers share the shape of: rustls with the webpki roots, plus the
//! CA of `KABAO_PUSH_CA_FILE` when given (a local fake, a corporate proxy), and a deadline on
//! every request so a provider that stops answering costs one retry, not a stuck dispatcher.
//!
//! A provider sends over several connections ([`Connections`]): reqwest keeps one HTTP/2
//! connection per host and client, and one connection's frames are read and written by one task
//! on each side, which capped a provider at about one core's worth of pushes (BENCHMARKS.md
//! "Push"). Apple recommends many connections for volume, and FCM takes them too.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::Context;

/// Reads a PEM file of one or more CA certificates, failing with the file's name.
pub fn read_ca_file(path: &Path) -> anyhow::Result<Vec<reqwest::Certificate>> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::CertificateDer;
    let pem = std::fs::read(path).with_context(|| format!("reading push CA file {}", path.display()))?;
    let mut certificates = Vec::new();
    for der in CertificateDer::pem_slice_iter(&pem) {
        let der = der.with_context(|| format!("push CA file {} is not PEM certificates", path.display()))?;
        certificates.push(
            reqwest::Certificate::from_der(&der)
                .with_context(|| format!("push CA file {} holds a certificate that does not parse", path.display()))?,
        );
    }
    anyhow::ensure!(!certificates.is_empty(), "push CA file {} holds no certificate", path.display());
    Ok(certificates)
}

/// An HTTPS client trusting the webpki roots and `extra_roots`. `http2_only` (APNs) speaks
/// HTTP/2 from the first byte: ALPN offers `h2` alone.
pub fn build(
    extra_roots: &[reqwest::Certificate],
    http2_only: bool,
    timeout: Duration,
) -> anyhow::Result<reqwest::Client> {
    let mut builder = reqwest::Client::builder()
        .use_rustls_tls()
        .https_only(true)
        .timeout(timeout)
        .connect_timeout(timeout)
        .pool_idle_timeout(Duration::from_secs(600))
        .user_agent(concat!("kabao/", env!("CARGO_PKG_VERSION")));
    for root in extra_roots {
        builder = builder.add_root_certificate(root.clone());
    }
    if http2_only {
        builder = builder
            .http2_prior_knowledge()
            // APNs closes idle connections; a ping keeps a quiet one alive and notices a dead one.
            .http2_keep_alive_interval(Duration::from_secs(60))
            .http2_keep_alive_while_idle(true);
    }
    builder.build().context("building the push HTTPS client")
}

/// `count` HTTPS clients, each with a connection of its own, and each send on the one with the
/// fewest requests in flight (ties in turn, so even one push at a time uses them all and every
/// connection stays warm). Credentials live in the provider, shared by every connection.
///
/// A client's first request goes alone: until a connection has answered, hyper's pool cannot
/// know it will be HTTP/2 (FCM's client negotiates it by ALPN), so a burst on a cold client
/// opened one TLS connection per request (≈ 120 for a 256-push burst on 3 cold FCM clients,
/// BENCHMARKS.md "Push") instead of sharing one.
#[derive(Debug)]
pub struct Connections {
    clients: Vec<Slot>,
    /// Where the next search for the least busy starts.
    next: AtomicUsize,
}

/// One client of [`Connections`].
#[derive(Debug)]
struct Slot {
    client: reqwest::Client,
    /// Requests on it now, waiting for its first answer included.
    in_flight: AtomicUsize,
    /// Whether a request on it has finished: its connection is pooled, later ones share it.
    warm: AtomicBool,
    /// Held by the first request until it finishes.
    first: tokio::sync::Mutex<()>,
}

impl Connections {
    /// `count` (at least 1) clients as [`build`] makes them.
    pub fn build(
        count: usize,
        extra_roots: &[reqwest::Certificate],
        http2_only: bool,
        timeout: Duration,
    ) -> anyhow::Result<Self> {
        let clients = (0..count.max(1))
            .map(|_| {
                Ok(Slot {
                    client: build(extra_roots, http2_only, timeout)?,
                    in_flight: AtomicUsize::new(0),
                    warm: AtomicBool::new(false),
                    first: tokio::sync::Mutex::new(()),
                })
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(Self { clients, next: AtomicUsize::new(0) })
    }

    /// The least busy connection, counted busy until the returned [`InFlight`] is dropped (hold
    /// it until the reply's body is read). On a client that has not yet finished a request, this
    /// waits for the first one to finish (or goes first).
    pub async fn pick(&self) -> InFlight<'_> {
        let n = self.clients.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
        let mut best = start;
        let mut best_load = usize::MAX;
        for offset in 0..n {
            let i = (start + offset) % n;
            let load = self.clients[i].in_flight.load(Ordering::Relaxed);
            if load < best_load {
                (best, best_load) = (i, load);
                if load == 0 {
                    break;
                }
            }
        }
        let slot = &self.clients[best];
        slot.in_flight.fetch_add(1, Ordering::Relaxed);
        let mut held = InFlight { client: &slot.client, slot, first: None };
        if !slot.warm.load(Ordering::Acquire) {
            let guard = slot.first.lock().await;
            if !slot.warm.load(Ordering::Acquire) {
                held.first = Some(guard);
            }
        }
        held
    }
}

/// One request's hold on a connection of [`Connections`].
#[derive(Debug)]
pub struct InFlight<'a> {
    /// The client to send with.
    pub client: &'a reqwest::Client,
    slot: &'a Slot,
    /// Held when this is the client's first request.
    first: Option<tokio::sync::MutexGuard<'a, ()>>,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if self.first.take().is_some() {
            // Finished, well or not: a failed first connection is no reason to hold the rest.
            self.slot.warm.store(true, Ordering::Release);
        }
        self.slot.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A `Retry-After` header in whole seconds (the form FCM and APNs send; an HTTP-date is ignored).
pub fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let value = headers.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?;
    value.trim().parse::<u64>().ok().map(Duration::from_secs)
}

/// A transport failure in a few words, with its causes (reqwest's own message is often only
/// "error sending request").
pub fn describe(error: &reqwest::Error) -> String {
    let mut text = if error.is_timeout() { "timed out".to_owned() } else { error.to_string() };
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The index of the client a hold is on.
    fn index(connections: &Connections, held: &InFlight<'_>) -> usize {
        connections.clients.iter().position(|s| std::ptr::eq(&s.client, held.client)).unwrap()
    }

    #[tokio::test]
    async fn each_send_goes_on_the_least_busy_connection_idle_ones_in_turn() {
        let connections = Connections::build(3, &[], true, Duration::from_secs(1)).unwrap();
        // One at a time: every connection idle, so they take turns.
        let mut turns = Vec::new();
        for _ in 0..6 {
            turns.push(index(&connections, &connections.pick().await));
        }
        assert_eq!(turns, [0, 1, 2, 0, 1, 2]);
        // Held: each new send goes where fewest are in flight.
        let a = connections.pick().await;
        let b = connections.pick().await;
        let c = connections.pick().await;
        let mut busy: Vec<usize> = [&a, &b, &c].iter().map(|h| index(&connections, h)).collect();
        busy.sort_unstable();
        assert_eq!(busy, [0, 1, 2], "three sends in flight, one on each connection");
        let freed = index(&connections, &b);
        drop(b);
        let d = connections.pick().await;
        assert_eq!(index(&connections, &d), freed, "the one with nothing in flight");
        assert_eq!(Connections::build(0, &[], false, Duration::from_secs(1)).unwrap().clients.len(), 1);
    }

    #[tokio::test]
    async fn a_cold_clients_first_request_goes_alone_then_the_rest_share_its_connection() {
        use futures::FutureExt;
        let connections = Connections::build(1, &[], false, Duration::from_secs(1)).unwrap();
        let first = connections.pick().await;
        assert!(connections.pick().now_or_never().is_none(), "the second waits for the first's answer");
        assert_eq!(connections.clients[0].in_flight.load(Ordering::Relaxed), 1, "a wait given up is not counted");
        drop(first);
        let a = connections.pick().now_or_never().expect("warm: no wait");
        let b = connections.pick().now_or_never().expect("warm: no wait");
        assert!(a.first.is_none() && b.first.is_none());
        assert_eq!(connections.clients[0].in_flight.load(Ordering::Relaxed), 2);
    }
}
