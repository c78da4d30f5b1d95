//! The HTTPS client the push providers share the shape of: rustls with the webpki roots, plus the
//! CA of `KABAO_PUSH_CA_FILE` when given (a local fake, a corporate proxy), and a deadline on
//! every request so a provider that stops answering costs one retry, not a stuck dispatcher.

use std::path::Path;
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
