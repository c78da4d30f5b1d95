//! `kabao fake-push`: protocol-faithful fakes of Google's OAuth2 token endpoint, FCM HTTP v1 and
//! APNs, over TLS with a CA of their own, to try kabao's push delivery end to end and to test it.
//!
//! On start it makes a CA and a server certificate (rcgen), a Google service account (an RSA key,
//! `rsa` crate: rcgen cannot make RSA keys) and an APNs `.p8` key, writes them into `--dir`
//! with a `push.env` of the `KABAO_*` settings that point kabao at it, and serves on one port:
//!
//! | path | what |
//! | --- | --- |
//! | `POST /token` | JWT-bearer grant: verifies the RS256 assertion, `grant_type`, `aud`, `scope`, `exp` |
//! | `POST /v1/projects/{p}/messages:send` | FCM v1: a bearer token it issued and not expired, the project, the body's shape |
//! | `POST /3/device/{token}` | APNs, HTTP/2 only: the ES256 token (key, `kid`, `iss`, age ≤ 1 h, not re-signed within 20 min), headers, topic, body ≤ 4 096 bytes |
//! | `GET`/`DELETE /_fake/received` | what it received (JSON), or forget it (and the receipts) |
//! | `GET /_fake/receipts` | a [`Receipt`] per push accepted: provider, coupon id, arrival, connection |
//! | `GET /_fake/stats` | [`Stats`]: connections, requests and successes per endpoint, never cleared |
//! | `POST`/`DELETE /_fake/faults` | inject a [`Fault`], or clear them |
//!
//! [`start`] runs it in-process on any port (tests use port 0) and returns a [`FakePush`]
//! handle with the URLs, the credential files and direct [`FakePush::received`] /
//! [`FakePush::inject`].
//!
//! `--record` says how much it keeps ([`Record`]): `full` (every request, for tests),
//! `receipts` (a [`Receipt`] per accepted push, for load runs: keeping every header and body
//! was a measurable share of a load run's CPU) or `none` (counts only).

mod faults;
mod handlers;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use faults::{EndpointStats, Fault, Receipt, Received, Record, Stats};

use crate::dispatch::clock::{self, SharedClock};

/// `kabao fake-push` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct FakePushArgs {
    /// Address to serve on (loopback; port 0 picks a free one).
    #[arg(long, default_value = "127.0.0.1:8443", value_name = "ADDR")]
    pub listen: String,
    /// Where to write the CA, the credentials and `push.env`.
    #[arg(long, default_value = "./fake-push", value_name = "DIR")]
    pub dir: PathBuf,
    /// The Firebase project id of the service account.
    #[arg(long, default_value = "kabao-fake", value_name = "ID")]
    pub project_id: String,
    /// The app's bundle id APNs accepts as `apns-topic`.
    #[arg(long, default_value = "com.example.kabao", value_name = "BUNDLE_ID")]
    pub apns_topic: String,
    /// How much to keep of what it receives: every request (`full`), a receipt per accepted
    /// push (`receipts`), or counts only (`none`).
    #[arg(long, value_enum, default_value_t = Record::Full)]
    pub record: Record,
}

/// Settings of an in-process fake.
#[derive(Clone)]
pub struct FakePushConfig {
    /// Address to bind; `127.0.0.1:0` for tests.
    pub listen: String,
    /// Where the credential files go (created if missing).
    pub dir: PathBuf,
    /// Firebase project id.
    pub project_id: String,
    /// Accepted `apns-topic`.
    pub apns_topic: String,
    /// The fake's clock: token lifetimes, `iat` age and the 20-minute rule are read from it, so a
    /// test moves it together with the client's.
    pub clock: SharedClock,
    /// How much of what it receives it keeps.
    pub record: Record,
}

impl FakePushConfig {
    /// Port 0 on loopback, files in `dir`, the system clock.
    pub fn for_tests(dir: impl Into<PathBuf>) -> Self {
        Self {
            listen: "127.0.0.1:0".into(),
            dir: dir.into(),
            project_id: "kabao-fake".into(),
            apns_topic: "com.example.kabao".into(),
            clock: clock::system(),
            record: Record::Full,
        }
    }
}

/// A running fake; dropping it stops accepting connections.
pub struct FakePush {
    /// `https://127.0.0.1:PORT`: the FCM and APNs base URL alike.
    pub base_url: String,
    /// The service account's `token_uri`.
    pub token_uri: String,
    /// The CA certificate (PEM) to trust (`KABAO_PUSH_CA_FILE`).
    pub ca_pem_path: PathBuf,
    /// The CA certificate, PEM.
    pub ca_pem: String,
    /// The service-account JSON key (`KABAO_FCM_CREDENTIALS`).
    pub service_account_path: PathBuf,
    /// The Firebase project id.
    pub project_id: String,
    /// The `.p8` key (`KABAO_APNS_KEY_FILE`).
    pub apns_key_path: PathBuf,
    /// JWT `kid` it expects.
    pub apns_key_id: String,
    /// JWT `iss` it expects.
    pub apns_team_id: String,
    /// `apns-topic` it expects.
    pub apns_topic: String,
    /// Shared with the connection tasks.
    state: Arc<handlers::State>,
    /// Stops the accept loop.
    shutdown: CancellationToken,
}

impl std::fmt::Debug for FakePush {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakePush").field("base_url", &self.base_url).finish_non_exhaustive()
    }
}

impl FakePush {
    /// Everything received so far, in order.
    pub fn received(&self) -> Vec<Received> {
        self.state.received.lock().clone()
    }

    /// What was received from one provider's clients (`"oauth"`, `"fcm"`, `"apns"`).
    pub fn received_by(&self, provider: &str) -> Vec<Received> {
        self.received().into_iter().filter(|r| r.provider == provider).collect()
    }

    /// How many pushes (FCM and APNs) it has accepted with success since it started — kept
    /// also across [`Self::clear_received`], and cheap: load generators poll it.
    pub fn accepted(&self) -> u64 {
        self.state.accepted.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// A receipt per push accepted so far, in order (none under [`Record::None`]).
    pub fn receipts(&self) -> Vec<Receipt> {
        self.state.receipts.lock().clone()
    }

    /// The counts so far.
    pub fn stats(&self) -> Stats {
        self.state.stats()
    }

    /// Forgets what was received, receipts too.
    pub fn clear_received(&self) {
        self.state.received.lock().clear();
        self.state.receipts.lock().clear();
    }

    /// Adds a fault.
    pub fn inject(&self, fault: Fault) {
        self.state.faults.lock().push(fault);
    }

    /// Removes every fault.
    pub fn clear_faults(&self) {
        self.state.faults.lock().clear();
    }

    /// The `KABAO_*` settings that point `kabao serve` at this fake.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("KABAO_PUSH_PROVIDER", "auto".into()),
            ("KABAO_PUSH_CA_FILE", self.ca_pem_path.display().to_string()),
            ("KABAO_FCM_CREDENTIALS", self.service_account_path.display().to_string()),
            ("KABAO_FCM_BASE_URL", self.base_url.clone()),
            ("KABAO_APNS_KEY_FILE", self.apns_key_path.display().to_string()),
            ("KABAO_APNS_KEY_ID", self.apns_key_id.clone()),
            ("KABAO_APNS_TEAM_ID", self.apns_team_id.clone()),
            ("KABAO_APNS_TOPIC", self.apns_topic.clone()),
            ("KABAO_APNS_BASE_URL", self.base_url.clone()),
        ]
    }

    /// The same settings as a [`PushConfig`](crate::config::PushConfig) (`provider` auto, API.md's
    /// defaults for the rest), for a kabao built in process.
    pub fn push_config(&self) -> crate::config::PushConfig {
        crate::config::PushConfig {
            provider: crate::config::PushProviderKind::Auto,
            fcm_credentials: Some(self.service_account_path.clone()),
            fcm_base_url: self.base_url.clone(),
            apns_key_file: Some(self.apns_key_path.clone()),
            apns_key_id: Some(self.apns_key_id.clone()),
            apns_team_id: Some(self.apns_team_id.clone()),
            apns_topic: Some(self.apns_topic.clone()),
            apns_base_url: self.base_url.clone(),
            ca_file: Some(self.ca_pem_path.clone()),
            ..crate::config::PushConfig::default()
        }
    }

    /// Stops accepting connections (also on drop).
    pub fn shutdown(&self) {
        self.shutdown.cancel();
    }
}

impl Drop for FakePush {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// `kabao fake-push`: starts the fake, prints where it is, serves until Ctrl-C.
pub async fn run(args: FakePushArgs) -> anyhow::Result<()> {
    let fake = start(FakePushConfig {
        listen: args.listen,
        dir: args.dir,
        project_id: args.project_id,
        apns_topic: args.apns_topic,
        clock: clock::system(),
        record: args.record,
    })
    .await?;
    println!("fake-push listening on {} (FCM, APNs and the token endpoint)", fake.base_url);
    println!(
        "what it received: GET {0}/_fake/received, {0}/_fake/receipts, {0}/_fake/stats; faults: POST {0}/_fake/faults",
        fake.base_url
    );
    println!(
        "point kabao at it with these settings (also in {}):",
        fake.ca_pem_path.with_file_name("push.env").display()
    );
    for (name, value) in fake.env() {
        println!("{name}={value}");
    }
    tokio::signal::ctrl_c().await.context("waiting for Ctrl-C")?;
    Ok(())
}

/// Generates the keys, writes the files, binds and starts serving.
pub async fn start(config: FakePushConfig) -> anyhow::Result<FakePush> {
    let listener = TcpListener::bind(&config.listen).await.with_context(|| format!("binding {}", config.listen))?;
    let addr = listener.local_addr().context("reading the bound address")?;
    let base_url = format!("https://{addr}");
    let token_uri = format!("{base_url}/token");

    let tls = Tls::generate(&addr.ip().to_string())?;
    // RSA generation is CPU work of a second or so: keep it off the async workers.
    let rsa = tokio::task::spawn_blocking(generate_rsa).await.context("generating the RSA key")??;
    let apns_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).context("generating the APNs key")?;
    let apns_key_id = "FAKEKEY001".to_string();
    let apns_team_id = "FAKETEAM01".to_string();
    let client_email = format!("kabao-push@{}.iam.gserviceaccount.com", config.project_id);
    let private_key_id = format!("{:016x}", rand::random::<u64>());

    std::fs::create_dir_all(&config.dir).with_context(|| format!("creating {}", config.dir.display()))?;
    let ca_pem_path = config.dir.join("ca.pem");
    write(&ca_pem_path, &tls.ca_pem)?;
    let service_account_path = config.dir.join("service-account.json");
    let service_account = serde_json::json!({
        "type": "service_account",
        "project_id": config.project_id,
        "private_key_id": private_key_id,
        "private_key": rsa.private_pem,
        "client_email": client_email,
        "client_id": "000000000000000000000",
        "auth_uri": format!("{base_url}/auth"),
        "token_uri": token_uri,
    });
    write(&service_account_path, &serde_json::to_string_pretty(&service_account)?)?;
    let apns_key_path = config.dir.join(format!("AuthKey_{apns_key_id}.p8"));
    write(&apns_key_path, &apns_key.serialize_pem())?;

    let state = Arc::new(handlers::State {
        project_id: config.project_id.clone(),
        token_uri: token_uri.clone(),
        client_email,
        private_key_id,
        rsa_public: jsonwebtoken::DecodingKey::from_rsa_pem(rsa.public_pem.as_bytes())
            .context("reading back the RSA public key")?,
        apns_public: jsonwebtoken::DecodingKey::from_ec_pem(apns_key.public_key_pem().as_bytes())
            .context("reading back the APNs public key")?,
        apns_key_id: apns_key_id.clone(),
        apns_team_id: apns_team_id.clone(),
        apns_topic: config.apns_topic.clone(),
        clock: config.clock.clone(),
        record: config.record,
        received: Default::default(),
        receipts: Default::default(),
        faults: Default::default(),
        access_tokens: Default::default(),
        apns_token: Default::default(),
        apns_verified: Default::default(),
        counter: Default::default(),
        accepted: Default::default(),
        connections: Default::default(),
        counts: Default::default(),
    });
    let fake = FakePush {
        base_url,
        token_uri,
        ca_pem_path,
        ca_pem: tls.ca_pem.clone(),
        service_account_path,
        project_id: config.project_id,
        apns_key_path,
        apns_key_id,
        apns_team_id,
        apns_topic: config.apns_topic,
        state: state.clone(),
        shutdown: CancellationToken::new(),
    };
    write(&config.dir.join("push.env"), &fake.env().iter().map(|(k, v)| format!("{k}={v}\n")).collect::<String>())?;
    tokio::spawn(handlers::serve(listener, tls.acceptor, state, fake.shutdown.clone()));
    Ok(fake)
}

fn write(path: &Path, contents: &str) -> anyhow::Result<()> {
    std::fs::write(path, contents).with_context(|| format!("writing {}", path.display()))
}

/// The service account's key pair.
struct RsaKeys {
    /// PKCS#8 PEM, as Google issues it.
    private_pem: String,
    /// SPKI PEM, to verify assertions.
    public_pem: String,
}

fn generate_rsa() -> anyhow::Result<RsaKeys> {
    use rsa::pkcs8::{EncodePrivateKey, EncodePublicKey, LineEnding};
    let key = rsa::RsaPrivateKey::new(&mut rand::thread_rng(), 2048).context("generating an RSA key")?;
    Ok(RsaKeys {
        private_pem: key.to_pkcs8_pem(LineEnding::LF).context("encoding the RSA key")?.to_string(),
        public_pem: key.to_public_key().to_public_key_pem(LineEnding::LF).context("encoding the RSA public key")?,
    })
}

/// The fake's CA and the TLS acceptor of its server certificate.
struct Tls {
    /// The CA certificate, PEM.
    ca_pem: String,
    /// Serves the server certificate, offering `h2` and `http/1.1`.
    acceptor: tokio_rustls::TlsAcceptor,
}

impl Tls {
    /// A new CA, and a certificate it signs for `localhost` and `ip`.
    fn generate(ip: &str) -> anyhow::Result<Self> {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
        let ca_key = KeyPair::generate().context("generating the CA key")?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(DnType::CommonName, "kabao fake-push CA");
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = ca_params.self_signed(&ca_key).context("signing the CA")?;

        let server_key = KeyPair::generate().context("generating the server key")?;
        let mut names = vec!["localhost".to_string()];
        if ip != "localhost" {
            names.push(ip.to_string());
        }
        let mut params = CertificateParams::new(names)?;
        params.distinguished_name.push(DnType::CommonName, "kabao fake-push");
        let server = params.signed_by(&server_key, &ca, &ca_key).context("signing the server certificate")?;

        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut server_config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .context("TLS versions")?
            .with_no_client_auth()
            .with_single_cert(
                vec![CertificateDer::from(server.der().to_vec())],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(server_key.serialize_der())),
            )
            .context("the server certificate")?;
        server_config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Self { ca_pem: ca.pem(), acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(server_config)) })
    }
}
