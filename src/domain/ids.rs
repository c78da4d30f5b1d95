//! Identifiers. Cheap to clone (`Arc<str>`), validated once at the edge.

use std::sync::Arc;

use super::error::FieldError;

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
        // Deserialize is for records read back from the store; requests go through `parse`.
        #[serde(transparent)]
        pub struct $name(Arc<str>);

        impl $name {
            /// The id as a string.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl std::borrow::Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }
    };
}

id_type!(
    /// A campaign id: `[A-Za-z0-9_.:-]{1,64}`.
    CampaignId
);
id_type!(
    /// A fence id, unique within its campaign: 1..=128 characters.
    FenceId
);
id_type!(
    /// A user id: 1..=128 characters.
    UserId
);
id_type!(
    /// A device id, unique within its user: 1..=128 characters.
    DeviceId
);
id_type!(
    /// A coupon id, derived from (campaign, user, ping time) so a retry yields the same id.
    CouponId
);

fn check_len(field: &str, s: &str, max: usize) -> Result<(), FieldError> {
    let n = s.chars().count();
    if n == 0 || n > max {
        return Err(FieldError::new(field, format!("must be 1 to {max} characters")));
    }
    Ok(())
}

impl CampaignId {
    /// Validates a campaign id.
    pub fn parse(field: &str, s: &str) -> Result<Self, FieldError> {
        let ok = (1..=64).contains(&s.len())
            && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'));
        if !ok {
            return Err(FieldError::new(field, "must match [A-Za-z0-9_.:-]{1,64}"));
        }
        Ok(Self(s.into()))
    }
}

impl FenceId {
    /// Validates a fence id.
    pub fn parse(field: &str, s: &str) -> Result<Self, FieldError> {
        check_len(field, s, 128)?;
        Ok(Self(s.into()))
    }
}

impl UserId {
    /// Validates a user id.
    pub fn parse(field: &str, s: &str) -> Result<Self, FieldError> {
        check_len(field, s, 128)?;
        Ok(Self(s.into()))
    }
}

impl DeviceId {
    /// Validates a device id.
    pub fn parse(field: &str, s: &str) -> Result<Self, FieldError> {
        check_len(field, s, 128)?;
        Ok(Self(s.into()))
    }
}

impl CouponId {
    /// The coupon id for campaign `c` issued to user `u` by the ping at `ts_ms`.
    ///
    /// Deterministic, so a retried ping, a second node or a restart computes the same id and the
    /// store's "already issued" check makes issuance exactly-once (API.md rule 6).
    pub fn derive(c: &CampaignId, u: &UserId, ts_ms: i64) -> Self {
        // FNV-1a 128 over the three parts, separated so ("a","bc") and ("ab","c") differ.
        let mut h: u128 = 0x6c62272e07bb014262b821756295c58d;
        for part in [c.as_str().as_bytes(), &[0xff], u.as_str().as_bytes(), &[0xff], &ts_ms.to_le_bytes()] {
            for &b in part {
                h ^= u128::from(b);
                h = h.wrapping_mul(0x0000000001000000000000000000013B);
            }
        }
        Self(format!("cp_{h:032x}").into())
    }

    /// Wraps an id read from a URL path or the store (unknown ids are simply not found).
    pub fn from_string(s: &str) -> Self {
        Self(s.into())
    }
}
