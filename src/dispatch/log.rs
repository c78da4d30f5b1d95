//! The `log` push provider: the embedded default. It "delivers" by writing a log line, so a
//! kabao without push credentials still shows what it would have sent.

use async_trait::async_trait;

use super::{PushOutcome, PushProvider};
use crate::store::{Device, IssuedCoupon};

/// Logs each push at info level (the device token is not logged: it is a credential).
#[derive(Debug, Default, Clone, Copy)]
pub struct LogProvider;

#[async_trait]
impl PushProvider for LogProvider {
    fn name(&self) -> &'static str {
        "log"
    }

    async fn send(&self, device: &Device, coupon: &IssuedCoupon) -> PushOutcome {
        tracing::info!(
            platform = ?device.platform,
            user_hash = %crate::telemetry::user_hash(&coupon.user_id),
            coupon_id = %coupon.coupon_id,
            campaign_id = %coupon.campaign_id,
            title = %coupon.title,
            "push"
        );
        PushOutcome::Delivered
    }
}
