//! Campaigns: a coupon, the fences it applies to, and the rules for issuing it.
//!
//! [`CampaignDoc`] is the wire form (what `POST /v1/campaigns` takes and every reply shows);
//! [`Campaign`] is the validated form the engine works with. `CampaignDoc::validate` is the only
//! way from one to the other and checks exactly API.md's list; `Campaign::to_doc` goes back.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};
use serde_json::Number;

use super::error::{integer, number_in, objects_only, required, FieldError};
use super::geo::{Circle, LatLon, Polygon, PolygonError, Shape};
use super::ids::{CampaignId, FenceId};
use super::schedule::{parse_timezone, Hours, Schedule, DAY_NAMES, EVERY_DAY};

/// Most fences one campaign may hold.
pub const MAX_FENCES: usize = 1_000_000;
/// Radius bounds of a circle fence, metres.
pub const RADIUS_RANGE_M: (f64, f64) = (1.0, 50_000.0);
/// Longest free-text member (names, coupon texts, URLs, tags), in characters.
pub const MAX_TEXT_CHARS: usize = 4096;

/// A validated campaign.
#[derive(Debug, Clone, PartialEq)]
pub struct Campaign {
    /// Unique id.
    pub id: CampaignId,
    /// Display name for marketing staff.
    pub name: Option<String>,
    /// The merchant whose counters redeem the coupon.
    pub merchant: Option<Merchant>,
    /// What the user receives.
    pub coupon: CouponTemplate,
    /// Where it applies; ids unique within the campaign.
    pub fences: Vec<Fence>,
    /// Enter or dwell.
    pub trigger: Trigger,
    /// Window and opening hours; `None` when the request gave none (always open).
    pub schedule: Option<Schedule>,
    /// Cooldown and maxima; all zero = unlimited.
    pub caps: Caps,
    /// Whether the request gave `caps` (replies echo only what was given).
    pub caps_given: bool,
    /// Who may receive it; empty = everyone.
    pub audience_tags: Vec<String>,
    /// Whether the request gave `audience`.
    pub audience_given: bool,
    /// Pings less accurate than this never trigger this campaign.
    pub max_accuracy_m: Option<f64>,
    /// Active or paused.
    pub status: Status,
    /// Bumped by every create or replace (not on the wire): trigger stays recorded under an older
    /// revision are forgotten, which is how `PUT` forgets the stays of the replaced campaign.
    pub revision: u64,
}

/// The merchant a campaign belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(remote = "Self")]
pub struct Merchant {
    /// Merchant id, checked at redemption. Absent reads as empty, which validation refuses
    /// with a `422` on `merchant.id` like any other missing required member.
    #[serde(default)]
    pub id: String,
    /// Display name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// The coupon a campaign issues.
#[derive(Debug, Clone, PartialEq)]
pub struct CouponTemplate {
    /// Headline shown on the phone.
    pub title: String,
    /// Body text.
    pub body: Option<String>,
    /// Link the notification opens.
    pub deep_link: Option<String>,
    /// Picture for the wallet.
    pub image_url: Option<String>,
    /// Lifetime from issue, seconds; `None` = never expires.
    pub valid_for_s: Option<i64>,
}

/// A fence of a campaign.
#[derive(Debug, Clone, PartialEq)]
pub struct Fence {
    /// Unique within the campaign.
    pub id: FenceId,
    /// The geometry.
    pub shape: Shape,
    /// A polygon's rings as given (GeoJSON `[lon, lat]`), kept to echo them back unchanged.
    pub rings: Option<Vec<Vec<[f64; 2]>>>,
}

/// What makes a fence hit a candidate (API.md rule 3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// The first inside ping of a stay.
    Enter,
    /// The first ping of a stay at least this many seconds after it started.
    Dwell {
        /// Seconds inside before the coupon is due.
        dwell_s: i64,
    },
}

/// Per-user and per-campaign limits (API.md rule 4); 0 = unlimited / no cooldown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Caps {
    /// Minimum seconds between two coupons of this campaign to one user.
    pub per_user_cooldown_s: i64,
    /// Most coupons of this campaign one user ever holds.
    pub per_user_max: i64,
    /// Most coupons this campaign ever issues.
    pub total_max: i64,
}

/// Whether a campaign issues.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Issues coupons.
    Active,
    /// Tracks stays but issues nothing.
    Paused,
}

impl Status {
    /// The wire spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Active => "active",
            Status::Paused => "paused",
        }
    }
}

impl Campaign {
    /// A campaign with API.md's defaults for all but its id, coupon title and fences: an enter
    /// trigger, always open, no caps, every user, active, revision 0.
    pub fn new(id: CampaignId, title: impl Into<String>, fences: Vec<Fence>) -> Self {
        Campaign {
            id,
            name: None,
            merchant: None,
            coupon: CouponTemplate {
                title: title.into(),
                body: None,
                deep_link: None,
                image_url: None,
                valid_for_s: None,
            },
            fences,
            trigger: Trigger::Enter,
            schedule: None,
            caps: Caps::default(),
            caps_given: false,
            audience_tags: Vec::new(),
            audience_given: false,
            max_accuracy_m: None,
            status: Status::Active,
            revision: 0,
        }
    }

    /// Is the campaign active and inside its schedule at `ts_ms` (the campaign half of rule 4)?
    pub fn is_issuing_at(&self, ts_ms: i64) -> bool {
        self.status == Status::Active && self.schedule.as_ref().is_none_or(|s| s.is_open(ts_ms))
    }

    /// The wire form, as replies show it.
    pub fn to_doc(&self) -> CampaignDoc {
        let number = |v: i64| Some(Number::from(v));
        CampaignDoc {
            id: Some(self.id.to_string()),
            name: self.name.clone(),
            merchant: self.merchant.clone(),
            coupon: Some(CouponDoc {
                title: Some(self.coupon.title.clone()),
                body: self.coupon.body.clone(),
                deep_link: self.coupon.deep_link.clone(),
                image_url: self.coupon.image_url.clone(),
                valid_for_s: self.coupon.valid_for_s.and_then(number),
            }),
            fences: Some(self.fences.iter().map(Fence::to_doc).collect()),
            trigger: Some(match self.trigger {
                Trigger::Enter => TriggerDoc { on: Some("enter".into()), dwell_s: None },
                Trigger::Dwell { dwell_s } => TriggerDoc { on: Some("dwell".into()), dwell_s: number(dwell_s) },
            }),
            schedule: self.schedule.as_ref().map(|s| ScheduleDoc {
                starts_at_ms: s.starts_at_ms.and_then(number),
                ends_at_ms: s.ends_at_ms.and_then(number),
                timezone: s.timezone_given.then(|| s.timezone.name().to_owned()),
                hours: (!s.hours.is_empty()).then(|| {
                    s.hours
                        .iter()
                        .map(|h| HoursDoc {
                            days: h.days_given.then(|| {
                                (0..7).filter(|d| h.days & (1 << d) != 0).map(|d| DAY_NAMES[d].to_owned()).collect()
                            }),
                            from: Some(Hours::format_time(h.from_min)),
                            to: Some(Hours::format_time(h.to_min)),
                        })
                        .collect()
                }),
            }),
            caps: self.caps_given.then(|| CapsDoc {
                per_user_cooldown_s: number(self.caps.per_user_cooldown_s),
                per_user_max: number(self.caps.per_user_max),
                total_max: number(self.caps.total_max),
            }),
            audience: self.audience_given.then(|| AudienceDoc { tags_any: Some(self.audience_tags.clone()) }),
            max_accuracy_m: self.max_accuracy_m,
            status: Some(self.status.as_str().to_owned()),
        }
    }
}

impl Fence {
    fn to_doc(&self) -> FenceDoc {
        match &self.shape {
            Shape::Circle(c) => FenceDoc {
                id: Some(self.id.to_string()),
                kind: Some("circle".into()),
                center: Some(vec![c.center.lon, c.center.lat]),
                radius_m: Some(c.radius_m),
                coordinates: None,
            },
            Shape::Polygon(_) => FenceDoc {
                id: Some(self.id.to_string()),
                kind: Some("polygon".into()),
                center: None,
                radius_m: None,
                coordinates: self
                    .rings
                    .as_ref()
                    .map(|rings| rings.iter().map(|r| r.iter().map(|p| p.to_vec()).collect()).collect()),
            },
        }
    }
}

/// `Option::is_none` for serde's `skip_serializing_if`.
fn absent<T>(v: &Option<T>) -> bool {
    v.is_none()
}

/// A campaign on the wire. Every member is optional here so that a missing one is reported by
/// [`CampaignDoc::validate`] with its path, and a wrong JSON type by the parser (`400`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[allow(missing_docs)]
#[serde(remote = "Self")]
pub struct CampaignDoc {
    #[serde(skip_serializing_if = "absent")]
    pub id: Option<String>,
    #[serde(skip_serializing_if = "absent")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "absent")]
    pub merchant: Option<Merchant>,
    #[serde(skip_serializing_if = "absent")]
    pub coupon: Option<CouponDoc>,
    #[serde(skip_serializing_if = "absent")]
    pub fences: Option<Vec<FenceDoc>>,
    #[serde(skip_serializing_if = "absent")]
    pub trigger: Option<TriggerDoc>,
    #[serde(skip_serializing_if = "absent")]
    pub schedule: Option<ScheduleDoc>,
    #[serde(skip_serializing_if = "absent")]
    pub caps: Option<CapsDoc>,
    #[serde(skip_serializing_if = "absent")]
    pub audience: Option<AudienceDoc>,
    #[serde(skip_serializing_if = "absent")]
    pub max_accuracy_m: Option<f64>,
    #[serde(skip_serializing_if = "absent")]
    pub status: Option<String>,
}

/// The coupon on the wire.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[allow(missing_docs)]
#[serde(remote = "Self")]
pub struct CouponDoc {
    #[serde(skip_serializing_if = "absent")]
    pub title: Option<String>,
    #[serde(skip_serializing_if = "absent")]
    pub body: Option<String>,
    #[serde(skip_serializing_if = "absent")]
    pub deep_link: Option<String>,
    #[serde(skip_serializing_if = "absent")]
    pub image_url: Option<String>,
    #[serde(skip_serializing_if = "absent")]
    pub valid_for_s: Option<Number>,
}

/// A fence on the wire: `{"id", "type": "circle", "center", "radius_m"}` or
/// `{"id", "type": "polygon", "coordinates"}` (GeoJSON polygon rings).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[allow(missing_docs)]
#[serde(remote = "Self")]
pub struct FenceDoc {
    #[serde(skip_serializing_if = "absent")]
    pub id: Option<String>,
    #[serde(rename = "type", skip_serializing_if = "absent")]
    pub kind: Option<String>,
    #[serde(skip_serializing_if = "absent")]
    pub center: Option<Vec<f64>>,
    #[serde(skip_serializing_if = "absent")]
    pub radius_m: Option<f64>,
    #[serde(skip_serializing_if = "absent")]
    pub coordinates: Option<Vec<Vec<Vec<f64>>>>,
}

/// The trigger on the wire.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[allow(missing_docs)]
#[serde(remote = "Self")]
pub struct TriggerDoc {
    #[serde(skip_serializing_if = "absent")]
    pub on: Option<String>,
    #[serde(skip_serializing_if = "absent")]
    pub dwell_s: Option<Number>,
}

/// The schedule on the wire.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[allow(missing_docs)]
#[serde(remote = "Self")]
pub struct ScheduleDoc {
    #[serde(skip_serializing_if = "absent")]
    pub starts_at_ms: Option<Number>,
    #[serde(skip_serializing_if = "absent")]
    pub ends_at_ms: Option<Number>,
    #[serde(skip_serializing_if = "absent")]
    pub timezone: Option<String>,
    #[serde(skip_serializing_if = "absent")]
    pub hours: Option<Vec<HoursDoc>>,
}

/// One line of opening hours on the wire.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[allow(missing_docs)]
#[serde(remote = "Self")]
pub struct HoursDoc {
    #[serde(skip_serializing_if = "absent")]
    pub days: Option<Vec<String>>,
    #[serde(skip_serializing_if = "absent")]
    pub from: Option<String>,
    #[serde(skip_serializing_if = "absent")]
    pub to: Option<String>,
}

/// Caps on the wire.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[allow(missing_docs)]
#[serde(remote = "Self")]
pub struct CapsDoc {
    #[serde(skip_serializing_if = "absent")]
    pub per_user_cooldown_s: Option<Number>,
    #[serde(skip_serializing_if = "absent")]
    pub per_user_max: Option<Number>,
    #[serde(skip_serializing_if = "absent")]
    pub total_max: Option<Number>,
}

/// Audience on the wire.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[allow(missing_docs)]
#[serde(remote = "Self")]
pub struct AudienceDoc {
    #[serde(skip_serializing_if = "absent")]
    pub tags_any: Option<Vec<String>>,
}

objects_only!(
    serialize: Merchant,
    CampaignDoc,
    CouponDoc,
    FenceDoc,
    TriggerDoc,
    ScheduleDoc,
    HoursDoc,
    CapsDoc,
    AudienceDoc
);

fn text(field: &str, s: Option<String>) -> Result<Option<String>, FieldError> {
    match s {
        Some(s) if s.chars().count() > MAX_TEXT_CHARS => {
            Err(FieldError::new(field, format!("must be at most {MAX_TEXT_CHARS} characters")))
        }
        other => Ok(other),
    }
}

/// Largest count or duration a cap or schedule member may hold (keeps arithmetic in i64 safe).
const MAX_COUNT: i64 = 1 << 53;

fn position(field: &str, p: &[f64]) -> Result<LatLon, FieldError> {
    if p.len() < 2 || p.len() > 3 {
        return Err(FieldError::new(field, "must be a position [lon, lat]"));
    }
    let lon = number_in(&format!("{field}[0]"), p[0], -180.0, 180.0)?;
    let lat = number_in(&format!("{field}[1]"), p[1], -90.0, 90.0)?;
    LatLon::new(lat, lon).ok_or_else(|| FieldError::new(field, "must be a position [lon, lat]"))
}

impl FenceDoc {
    /// Validates one fence; `field` is its path (`fences[3]`).
    pub fn validate(self, field: &str) -> Result<Fence, FieldError> {
        let id = FenceId::parse(&format!("{field}.id"), &required(&format!("{field}.id"), self.id)?)?;
        let kind = required(&format!("{field}.type"), self.kind)?;
        match kind.as_str() {
            "circle" => {
                let center_field = format!("{field}.center");
                let center = position(&center_field, &required(&center_field, self.center)?)?;
                let radius_field = format!("{field}.radius_m");
                let radius_m = required(&radius_field, self.radius_m)?;
                let (lo, hi) = RADIUS_RANGE_M;
                if !(radius_m.is_finite() && (lo..=hi).contains(&radius_m)) {
                    return Err(FieldError::new(radius_field, "must be between 1 and 50000 metres"));
                }
                Ok(Fence { id, shape: Shape::Circle(Circle { center, radius_m }), rings: None })
            }
            "polygon" => {
                let coords_field = format!("{field}.coordinates");
                let coords = required(&coords_field, self.coordinates)?;
                if coords.is_empty() {
                    return Err(FieldError::new(coords_field, "must hold at least the outer ring"));
                }
                let mut rings = Vec::with_capacity(coords.len());
                let mut raw = Vec::with_capacity(coords.len());
                for (r, ring) in coords.iter().enumerate() {
                    let ring_field = format!("{coords_field}[{r}]");
                    let mut positions = Vec::with_capacity(ring.len());
                    let mut raw_ring = Vec::with_capacity(ring.len());
                    for (i, p) in ring.iter().enumerate() {
                        let pos = position(&format!("{ring_field}[{i}]"), p)?;
                        positions.push(pos);
                        raw_ring.push([p[0], p[1]]);
                    }
                    rings.push(positions);
                    raw.push(raw_ring);
                }
                let polygon = Polygon::new(&rings).map_err(|(ring, e)| {
                    let message = match e {
                        PolygonError::Invalid(ref why) => format!("is not a valid polygon: {why}"),
                        other => other.to_string(),
                    };
                    FieldError::new(format!("{coords_field}[{ring}]"), message)
                })?;
                Ok(Fence { id, shape: Shape::Polygon(polygon), rings: Some(raw) })
            }
            _ => Err(FieldError::new(format!("{field}.type"), "must be \"circle\" or \"polygon\"")),
        }
    }
}

impl CampaignDoc {
    /// Validates a campaign. `id` is used when the document has none (a generated id, or the
    /// id from the URL of a `PUT`).
    pub fn validate(self, fallback_id: impl FnOnce() -> CampaignId) -> Result<Campaign, FieldError> {
        let id = match &self.id {
            Some(s) => CampaignId::parse("id", s)?,
            None => fallback_id(),
        };
        let name = text("name", self.name)?;
        let merchant = match self.merchant {
            Some(m) => {
                super::ids::check_id("merchant.id", &m.id, super::ids::MAX_ID_CHARS)?;
                text("merchant.name", m.name.clone())?;
                Some(m)
            }
            None => None,
        };
        let coupon = self.coupon.unwrap_or_default();
        let title = match text("coupon.title", coupon.title)? {
            Some(t) if !t.is_empty() => t,
            Some(_) => return Err(FieldError::new("coupon.title", "must not be empty")),
            None => name.clone().unwrap_or_else(|| id.to_string()),
        };
        let coupon = CouponTemplate {
            title,
            body: text("coupon.body", coupon.body)?,
            deep_link: text("coupon.deep_link", coupon.deep_link)?,
            image_url: text("coupon.image_url", coupon.image_url)?,
            valid_for_s: coupon
                .valid_for_s
                .map(|n| integer("coupon.valid_for_s", &n, 0, MAX_COUNT / 1000))
                .transpose()?,
        };
        // API.md: a coupon whose push cannot fit the providers' 4 096 bytes is refused here.
        crate::dispatch::payload::check_coupon_fits(&coupon)
            .map_err(|(field, message)| FieldError::new(field, message))?;

        let docs = required("fences", self.fences)?;
        if docs.is_empty() || docs.len() > MAX_FENCES {
            return Err(FieldError::new("fences", format!("must hold 1 to {MAX_FENCES} fences")));
        }
        let mut fences = Vec::with_capacity(docs.len());
        let mut seen = HashSet::with_capacity(docs.len());
        for (i, doc) in docs.into_iter().enumerate() {
            let fence = doc.validate(&format!("fences[{i}]"))?;
            if !seen.insert(fence.id.clone()) {
                return Err(FieldError::new(
                    format!("fences[{i}].id"),
                    format!("repeats fence id {:?}", fence.id.as_str()),
                ));
            }
            fences.push(fence);
        }

        let trigger = match self.trigger {
            None => Trigger::Enter,
            Some(t) => match t.on.as_deref() {
                None | Some("enter") => Trigger::Enter,
                Some("dwell") => {
                    let n = required("trigger.dwell_s", t.dwell_s)?;
                    Trigger::Dwell { dwell_s: integer("trigger.dwell_s", &n, 0, MAX_COUNT / 1000)? }
                }
                Some(_) => return Err(FieldError::new("trigger.on", "must be \"enter\" or \"dwell\"")),
            },
        };

        let schedule = self.schedule.map(validate_schedule).transpose()?;

        let caps_given = self.caps.is_some();
        let caps = match self.caps {
            None => Caps::default(),
            Some(c) => {
                let cap = |field: &str, n: Option<Number>| {
                    n.map(|n| integer(&format!("caps.{field}"), &n, 0, MAX_COUNT))
                        .transpose()
                        .map(Option::unwrap_or_default)
                };
                Caps {
                    per_user_cooldown_s: cap("per_user_cooldown_s", c.per_user_cooldown_s)?,
                    per_user_max: cap("per_user_max", c.per_user_max)?,
                    total_max: cap("total_max", c.total_max)?,
                }
            }
        };

        let audience_given = self.audience.is_some();
        let audience_tags = self.audience.and_then(|a| a.tags_any).unwrap_or_default();
        for (i, tag) in audience_tags.iter().enumerate() {
            if tag.is_empty() || tag.chars().count() > 128 {
                return Err(FieldError::new(format!("audience.tags_any[{i}]"), "must be 1 to 128 characters"));
            }
        }

        let max_accuracy_m = self.max_accuracy_m.map(|a| number_in("max_accuracy_m", a, 0.0, f64::MAX)).transpose()?;
        let status = match self.status.as_deref() {
            None | Some("active") => Status::Active,
            Some("paused") => Status::Paused,
            Some(_) => return Err(FieldError::new("status", "must be \"active\" or \"paused\"")),
        };

        Ok(Campaign {
            id,
            name,
            merchant,
            coupon,
            fences,
            trigger,
            schedule,
            caps,
            caps_given,
            audience_tags,
            audience_given,
            max_accuracy_m,
            status,
            revision: 0,
        })
    }
}

fn validate_schedule(doc: ScheduleDoc) -> Result<Schedule, FieldError> {
    let ms = |field: &str, n: Option<Number>| {
        n.map(|n| integer(&format!("schedule.{field}"), &n, -MAX_COUNT, MAX_COUNT)).transpose()
    };
    let starts_at_ms = ms("starts_at_ms", doc.starts_at_ms)?;
    let ends_at_ms = ms("ends_at_ms", doc.ends_at_ms)?;
    if let (Some(s), Some(e)) = (starts_at_ms, ends_at_ms) {
        if e <= s {
            return Err(FieldError::new("schedule.ends_at_ms", "must be after schedule.starts_at_ms"));
        }
    }
    let (timezone, timezone_given) = match &doc.timezone {
        Some(tz) => (parse_timezone("schedule.timezone", tz)?, true),
        None => (chrono_tz::Tz::UTC, false),
    };
    let mut hours = Vec::new();
    for (i, h) in doc.hours.unwrap_or_default().into_iter().enumerate() {
        let field = format!("schedule.hours[{i}]");
        let (days, days_given) = match h.days {
            None => (EVERY_DAY, false),
            Some(list) => {
                if list.is_empty() {
                    return Err(FieldError::new(format!("{field}.days"), "must name at least one day (or be omitted)"));
                }
                let mut bits = 0;
                for (d, day) in list.iter().enumerate() {
                    bits |= Hours::parse_day(&format!("{field}.days[{d}]"), day)?;
                }
                (bits, true)
            }
        };
        let from_field = format!("{field}.from");
        let to_field = format!("{field}.to");
        let from_min = Hours::parse_time(&from_field, &required(&from_field, h.from)?, false)?;
        let to_min = Hours::parse_time(&to_field, &required(&to_field, h.to)?, true)?;
        if from_min == to_min {
            return Err(FieldError::new(to_field, "must differ from `from`"));
        }
        hours.push(Hours { days, days_given, from_min, to_min });
    }
    Ok(Schedule { starts_at_ms, ends_at_ms, timezone, timezone_given, hours })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::error::{parse_json, InputError};
    use serde_json::json;

    fn circle(id: &str) -> serde_json::Value {
        json!({"id": id, "type": "circle", "center": [114.0579, 22.5431], "radius_m": 150})
    }

    fn base() -> serde_json::Value {
        json!({
            "id": "coffee-2013-01",
            "name": "20% off any coffee",
            "merchant": {"id": "meiyijia", "name": "Meiyijia"},
            "coupon": {"title": "20% off coffee", "body": "Show this at the counter", "valid_for_s": 86400},
            "fences": [circle("store-0042"),
                {"id": "mall-7", "type": "polygon", "coordinates": [[[114.05,22.54],[114.06,22.54],[114.06,22.55],[114.05,22.54]]]}],
            "trigger": {"on": "enter"},
            "schedule": {"starts_at_ms": 0, "ends_at_ms": 4102444800000i64, "timezone": "Asia/Shanghai",
                         "hours": [{"days": ["mon","tue","wed","thu","fri"], "from": "08:00", "to": "22:00"}]},
            "caps": {"per_user_cooldown_s": 86400, "per_user_max": 1, "total_max": 100000},
            "audience": {"tags_any": ["vip"]},
            "max_accuracy_m": 100,
            "status": "active"
        })
    }

    fn validate(v: &serde_json::Value) -> Result<Campaign, InputError> {
        let doc: CampaignDoc = parse_json(v.to_string().as_bytes())?;
        Ok(doc.validate(|| CampaignId::parse("id", "generated").unwrap())?)
    }

    /// Sets `path` (dotted, with numeric segments for array items) in a copy of the base campaign.
    fn with(path: &str, value: serde_json::Value) -> serde_json::Value {
        let mut v = base();
        let mut cur = &mut v;
        let parts: Vec<&str> = path.split('.').collect();
        for part in &parts[..parts.len() - 1] {
            cur = match part.parse::<usize>() {
                Ok(i) => &mut cur[i],
                Err(_) => &mut cur[*part],
            };
        }
        let last = parts[parts.len() - 1];
        match last.parse::<usize>() {
            Ok(i) => cur[i] = value,
            Err(_) => cur[last] = value,
        }
        v
    }

    #[test]
    fn the_api_example_validates_and_round_trips() {
        let c = validate(&base()).unwrap();
        assert_eq!(c.fences.len(), 2);
        let echoed = serde_json::to_value(c.to_doc()).unwrap();
        let again = validate(&echoed).unwrap();
        assert_eq!(again, c);
        assert_eq!(echoed["caps"]["total_max"], json!(100000));
    }

    #[test]
    fn each_invalid_value_names_its_field() {
        let cases: Vec<(serde_json::Value, &str)> = vec![
            (with("id", json!("has space")), "id"),
            (with("fences.0.radius_m", json!(0.5)), "fences[0].radius_m"),
            (with("fences.0.radius_m", json!(50_001)), "fences[0].radius_m"),
            (with("fences.0.center", json!([181.0, 0.0])), "fences[0].center[0]"),
            (with("fences.0.center", json!([0.0, -90.5])), "fences[0].center[1]"),
            (with("fences.0.type", json!("square")), "fences[0].type"),
            (with("fences.1.id", json!("store-0042")), "fences[1].id"),
            (
                with("fences.1.coordinates", json!([[[114.05, 22.54], [114.06, 22.54], [114.05, 22.54]]])),
                "fences[1].coordinates[0]",
            ),
            (
                with(
                    "fences.1.coordinates",
                    json!([[[114.05, 22.54], [114.06, 22.54], [114.06, 22.55], [114.05, 22.55]]]),
                ),
                "fences[1].coordinates[0]",
            ),
            (
                with("fences.1.coordinates", json!([[[0, 0], [1, 1], [0, 1], [1, 0], [0, 0]]])),
                "fences[1].coordinates[0]",
            ),
            (with("fences.1.coordinates", json!([])), "fences[1].coordinates"),
            (with("fences", json!([])), "fences"),
            (with("trigger", json!({"on": "dwell"})), "trigger.dwell_s"),
            (with("trigger", json!({"on": "dwell", "dwell_s": 1.5})), "trigger.dwell_s"),
            (with("trigger", json!({"on": "exit"})), "trigger.on"),
            (with("schedule.ends_at_ms", json!(0)), "schedule.ends_at_ms"),
            (with("schedule.timezone", json!("Mars/Olympus")), "schedule.timezone"),
            (with("schedule.hours.0.from", json!("25:00")), "schedule.hours[0].from"),
            (with("schedule.hours.0.to", json!("8pm")), "schedule.hours[0].to"),
            (with("schedule.hours.0.days", json!(["funday"])), "schedule.hours[0].days[0]"),
            (with("caps.per_user_max", json!(-1)), "caps.per_user_max"),
            (with("status", json!("archived")), "status"),
            (with("max_accuracy_m", json!(-5)), "max_accuracy_m"),
            (with("name", json!("x".repeat(MAX_TEXT_CHARS + 1))), "name"),
            // Each text alone is allowed, but together the push is over 4 096 bytes.
            (with("coupon.body", json!("b".repeat(3800))), "coupon.body"),
            (
                with("coupon", json!({"title": "t", "body": "b".repeat(1900), "deep_link": "d".repeat(2000)})),
                "coupon.deep_link",
            ),
            (with("coupon", json!({"title": "t", "image_url": "i".repeat(3800)})), "coupon.image_url"),
        ];
        for (doc, field) in cases {
            match validate(&doc) {
                Err(InputError::Invalid(e)) => assert_eq!(e.field, field, "{e:?}"),
                other => panic!("expected an invalid {field}, got {other:?}"),
            }
        }
    }

    #[test]
    fn wrong_types_are_malformed_and_overflow_is_invalid() {
        assert!(matches!(validate(&with("fences", json!("many"))), Err(InputError::Malformed { .. })));
        assert!(matches!(validate(&with("fences.0.radius_m", json!("150"))), Err(InputError::Malformed { .. })));
        let overflow = base().to_string().replace("\"radius_m\":150", "\"radius_m\":1e999");
        let doc = parse_json::<CampaignDoc>(overflow.as_bytes());
        assert!(matches!(doc, Err(InputError::Invalid(ref e)) if e.field == "fences[0].radius_m"), "{doc:?}");
    }

    #[test]
    fn defaults_fill_what_is_absent() {
        let c = validate(&json!({"fences": [circle("a")]})).unwrap();
        assert_eq!(c.id.as_str(), "generated");
        assert_eq!(c.trigger, Trigger::Enter);
        assert_eq!(c.status, Status::Active);
        assert_eq!(c.caps, Caps::default());
        assert!(c.schedule.is_none() && c.audience_tags.is_empty() && c.max_accuracy_m.is_none());
        assert!(c.is_issuing_at(0));
    }

    #[test]
    fn non_finite_and_repeated_ids_never_panic() {
        let nan_like = base().to_string().replace("[114.0579,22.5431]", "[NaN,22.5431]");
        assert!(parse_json::<CampaignDoc>(nan_like.as_bytes()).is_err());
        let doc = json!({"fences": [circle("a"), circle("b"), circle("a")]});
        match validate(&doc) {
            Err(InputError::Invalid(e)) => assert_eq!(e.field, "fences[2].id"),
            other => panic!("{other:?}"),
        }
    }
}
