//! From the push settings to one provider per platform: FCM and APNs where configured
//! (`KABAO_PUSH_PROVIDER=auto`), the log elsewhere or everywhere (`log`).
//!
//! Everything that can be wrong with the settings — a key file missing or unparsable, an APNs
//! key without its key id, a CA file that holds no certificate — fails here, at start-up, with
//! the file or setting named, rather than as a retry on every push.

use std::sync::Arc;

use anyhow::Context;
use async_trait::async_trait;

use super::apns::{ApnsProvider, ApnsSettings};
use super::clock;
use super::fcm::{FcmProvider, FcmSettings, ServiceAccountKey};
use super::http_client;
use super::log::LogProvider;
use super::{PushOutcome, PushProvider};
use crate::config::{PushConfig, PushProviderKind};
use crate::store::{Device, IssuedCoupon, Platform, ProviderTokenStore};

/// The provider of each platform.
#[derive(Clone)]
pub struct Providers {
    /// Devices with `"platform": "fcm"`.
    pub fcm: Arc<dyn PushProvider>,
    /// Devices with `"platform": "apns"`.
    pub apns: Arc<dyn PushProvider>,
}

impl std::fmt::Debug for Providers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Providers").field("fcm", &self.fcm.name()).field("apns", &self.apns.name()).finish()
    }
}

impl Providers {
    /// The log provider for both platforms.
    pub fn log() -> Self {
        Self { fcm: Arc::new(LogProvider), apns: Arc::new(LogProvider) }
    }

    /// The provider of `platform`.
    pub fn for_platform(&self, platform: Platform) -> &Arc<dyn PushProvider> {
        match platform {
            Platform::Fcm => &self.fcm,
            Platform::Apns => &self.apns,
        }
    }
}

/// Sends each push through its device's platform, so `Providers` can stand where one provider
/// is expected. Metrics wanting the real provider's name ask [`Providers::for_platform`].
#[async_trait]
impl PushProvider for Providers {
    fn name(&self) -> &'static str {
        "by_platform"
    }

    async fn send(&self, device: &Device, coupon: &IssuedCoupon) -> PushOutcome {
        self.for_platform(device.platform).send(device, coupon).await
    }
}

/// Builds the providers `config` asks for, reading and checking every key file. APNs keeps its
/// provider token in `tokens` (the store every node shares).
pub fn providers_from_config(config: &PushConfig, tokens: Arc<dyn ProviderTokenStore>) -> anyhow::Result<Providers> {
    if config.provider == PushProviderKind::Log {
        return Ok(Providers::log());
    }
    let extra_roots = match &config.ca_file {
        Some(path) => http_client::read_ca_file(path)?,
        None => Vec::new(),
    };
    let mut providers = Providers::log();
    if let Some(path) = &config.fcm_credentials {
        let key = ServiceAccountKey::from_file(path)?;
        let project_id = config.fcm_project_id.clone().or_else(|| key.project_id.clone()).with_context(|| {
            format!(
                "FCM service-account key {} has no project_id; set --fcm-project-id / KABAO_FCM_PROJECT_ID",
                path.display()
            )
        })?;
        let settings = FcmSettings {
            key,
            project_id,
            base_url: config.fcm_base_url.clone(),
            extra_roots: extra_roots.clone(),
            timeout: config.request_timeout,
            connections: config.connections_per_provider,
            clock: clock::system(),
        };
        let provider =
            FcmProvider::new(settings).with_context(|| format!("FCM service-account key {}", path.display()))?;
        providers.fcm = Arc::new(provider);
    }
    if let Some(path) = &config.apns_key_file {
        let missing =
            |what: &str, flag: &str| format!("--apns-key-file {} is set but {what} is not: set {flag}", path.display());
        let settings = ApnsSettings {
            key_pem: ApnsSettings::read_key(path)?,
            key_id: config
                .apns_key_id
                .clone()
                .with_context(|| missing("the key id", "--apns-key-id / KABAO_APNS_KEY_ID"))?,
            team_id: config
                .apns_team_id
                .clone()
                .with_context(|| missing("the team id", "--apns-team-id / KABAO_APNS_TEAM_ID"))?,
            topic: config
                .apns_topic
                .clone()
                .with_context(|| missing("the topic", "--apns-topic / KABAO_APNS_TOPIC"))?,
            base_url: config.apns_base_url.clone(),
            extra_roots,
            timeout: config.request_timeout,
            connections: config.connections_per_provider,
            clock: clock::system(),
            tokens,
        };
        let provider = ApnsProvider::new(settings).with_context(|| format!("APNs key file {}", path.display()))?;
        providers.apns = Arc::new(provider);
    }
    Ok(providers)
}
