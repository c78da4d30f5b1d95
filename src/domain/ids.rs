//! Identifiers. Cheap to clone (`Arc<str>`), validated once at the edge.
//!
//! One rule for every id a request can carry (user, device, fence, merchant, coupon, campaign),
//! in [`check_id`]: 1 to a maximum of characters, no control character (Unicode `Cc`: NUL, BEL,
//! newlines, which break logs and keys) and no bidirectional control (U+202A–U+202E,
//! U+2066–U+2069, U+200E, U+200F, U+061C: they make an id display as another one). Campaign ids
//! are narrower still, API.md's `[A-Za-z0-9_.:-]{1,64}`, without `.` and `..` alone (they read as
//! path segments in a URL).

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

            /// Whether both are one allocation (a clone of the other), not only equal.
            pub fn shares_allocation(&self, other: &Self) -> bool {
                Arc::ptr_eq(&self.0, &other.0)
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

/// Longest user, device, fence, merchant or coupon id, in characters.
pub const MAX_ID_CHARS: usize = 128;

/// True for the characters that reorder the text around them when displayed.
fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}' | '\u{200E}' | '\u{200F}' | '\u{061C}')
}

/// The rule every id follows: 1 to `max` characters, none of them a control character or a
/// bidirectional control. `field` names the id in the error (`user_id`, `fences[2].id`).
pub fn check_id(field: &str, s: &str, max: usize) -> Result<(), FieldError> {
    let n = s.chars().count();
    if n == 0 || n > max {
        return Err(FieldError::new(field, format!("must be 1 to {max} characters")));
    }
    if s.chars().any(|c| c.is_control() || is_bidi_control(c)) {
        return Err(FieldError::new(field, "must not contain control or bidirectional-control characters"));
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
        if s == "." || s == ".." {
            return Err(FieldError::new(field, "must not be `.` or `..`"));
        }
        Ok(Self(s.into()))
    }
}

impl FenceId {
    /// Validates a fence id.
    pub fn parse(field: &str, s: &str) -> Result<Self, FieldError> {
        check_id(field, s, MAX_ID_CHARS)?;
        Ok(Self(s.into()))
    }
}

impl UserId {
    /// Validates a user id.
    pub fn parse(field: &str, s: &str) -> Result<Self, FieldError> {
        check_id(field, s, MAX_ID_CHARS)?;
        Ok(Self(s.into()))
    }
}

impl DeviceId {
    /// Validates a device id.
    pub fn parse(field: &str, s: &str) -> Result<Self, FieldError> {
        check_id(field, s, MAX_ID_CHARS)?;
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

    /// Wraps an id read from the store (unknown ids are simply not found).
    pub fn from_string(s: &str) -> Self {
        Self(s.into())
    }

    /// Validates a coupon id from a request (the id rule; kabao's own ids are `cp_` and hex).
    pub fn parse(field: &str, s: &str) -> Result<Self, FieldError> {
        check_id(field, s, MAX_ID_CHARS)?;
        Ok(Self(s.into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_rule_for_every_id() {
        for bad in ["", "a\u{0}b", "bell\u{7}", "line\n", "\u{202E}evil", "x\u{2066}", "\u{200F}", "\u{61C}", "\u{9F}"]
        {
            assert!(UserId::parse("user_id", bad).is_err(), "{bad:?}");
            assert!(DeviceId::parse("device_id", bad).is_err(), "{bad:?}");
            assert!(FenceId::parse("id", bad).is_err(), "{bad:?}");
            assert!(CouponId::parse("coupon_id", bad).is_err(), "{bad:?}");
        }
        assert!(UserId::parse("user_id", &"é".repeat(128)).is_ok());
        assert!(UserId::parse("user_id", &"é".repeat(129)).is_err());
        // Ordinary non-ASCII text and format characters other than bidi controls are fine.
        assert!(UserId::parse("user_id", "用户-1\u{200D}").is_ok());
        let e = UserId::parse("user_id", "a\u{0}").unwrap_err();
        assert_eq!(e.field, "user_id");
    }

    #[test]
    fn campaign_ids_follow_the_pattern_without_dot_segments() {
        for good in ["coffee-2013-01", "a", "a.b", "...", "x:y_z", &"a".repeat(64)] {
            assert!(CampaignId::parse("id", good).is_ok(), "{good:?}");
        }
        for bad in [".", "..", "", "a/b", "a b", "é", &"a".repeat(65)] {
            assert!(CampaignId::parse("id", bad).is_err(), "{bad:?}");
        }
    }
}
