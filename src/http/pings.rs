//! `POST /v1/pings`: one ping, or `{"pings": [...]}` with up to 10 000.
//!
//! Each item is parsed and validated on its own, so a batch processes its good items whatever
//! the bad ones (listed in `rejected` by index, with the error object). Only valid pings reach
//! the engine; its report's positions are mapped back to the request's array indexes here.

use axum::extract::{Request, State};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use utoipa::ToSchema;

use super::admission::TicketHandle;
use super::auth::Caller;
use super::error::{ApiError, ErrorBody, ErrorObject};
use super::schemas::PingsRequest;
use super::{body_bytes, AppState};
use crate::domain::error::{classify, objects_only};
use crate::domain::{InputError, Ping, PingClock, PingInput};
use crate::engine::{now_ms, Pacer, WORK_SLICE};
use crate::store::IssuedCoupon;

/// Most pings one request may carry.
pub const MAX_BATCH: usize = 10_000;

/// The reply to `POST /v1/pings`.
#[derive(Debug, Serialize, ToSchema)]
pub struct PingsReply {
    /// Valid pings of the request, ignored ones included.
    pub accepted: usize,
    /// Invalid items; they count as nothing.
    pub rejected: Vec<Rejected>,
    /// Valid pings the rules did not apply.
    pub ignored: Vec<Ignored>,
    /// Coupons this request issued, in any order.
    pub events: Vec<Event>,
}

/// An invalid item of a batch.
#[derive(Debug, Serialize, ToSchema)]
pub struct Rejected {
    /// Its index in `pings`.
    pub index: usize,
    /// Why, as a failed request would say it.
    pub error: ErrorObject,
}

/// A valid ping the rules did not apply.
#[derive(Debug, Serialize, ToSchema)]
pub struct Ignored {
    /// Its index in `pings` (0 for a single ping).
    pub index: usize,
    /// `stale`, `mocked`, `inaccurate` or `implausible_speed`.
    #[schema(value_type = String)]
    pub reason: &'static str,
}

/// A coupon issued by this request.
#[derive(Debug, Serialize, ToSchema)]
pub struct Event {
    /// Always `coupon_issued`.
    #[serde(rename = "type")]
    #[schema(value_type = String)]
    pub kind: &'static str,
    /// Deterministic coupon id (a retry yields the same one).
    pub coupon_id: String,
    /// The holder.
    pub user_id: String,
    /// The issuing campaign.
    pub campaign_id: String,
    /// The nearest fence that gave the candidate.
    pub fence_id: String,
    /// The triggering ping's `ts_ms`.
    pub ts_ms: i64,
    /// `ts_ms + valid_for_s × 1000`; `null` when the coupon never expires.
    pub expires_at_ms: Option<i64>,
    /// What the phone shows.
    pub coupon: CouponTexts,
}

/// The campaign coupon's texts, as an event carries them (in `coupon`) and a wallet item
/// shows them (inline).
#[derive(Debug, Serialize, ToSchema)]
pub struct CouponTexts {
    /// Headline.
    pub title: String,
    /// Body text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
    /// Link the notification opens.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deep_link: Option<String>,
    /// Picture.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image_url: Option<String>,
}

impl From<IssuedCoupon> for Event {
    fn from(c: IssuedCoupon) -> Self {
        Event {
            kind: "coupon_issued",
            coupon_id: c.coupon_id.to_string(),
            user_id: c.user_id.to_string(),
            campaign_id: c.campaign_id.to_string(),
            fence_id: c.fence_id.to_string(),
            ts_ms: c.issued_at_ms,
            expires_at_ms: c.expires_at_ms,
            coupon: CouponTexts { title: c.title, body: c.body, deep_link: c.deep_link, image_url: c.image_url },
        }
    }
}

/// The top level of a pings body, read only far enough to tell a batch from a single ping.
/// A `pings` member that is present, `null` included, makes the body a batch (so `"pings": null`
/// is a batch that is not a list, `400`, rather than a single ping missing its `user_id`).
#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(borrow, default, deserialize_with = "present")]
    pings: Option<&'a RawValue>,
}

/// Deserializes a member that is there, whatever its value, as `Some`.
fn present<'de, D: serde::Deserializer<'de>>(de: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&'de RawValue>::deserialize(de).map(Some)
}

/// An invalid item, and the user it names if it names one as a string (who may send it is
/// decided before what is wrong with it).
struct InvalidItem {
    error: InputError,
    named_user: Option<String>,
}

fn parse_item(json: &str, clock: PingClock) -> Result<Ping, InvalidItem> {
    // `PingInput` is an object only (`objects_only!`): an array item is a wrong type, 400.
    let parsed = (|| {
        let mut de = serde_json::Deserializer::from_str(json);
        let input: PingInput = serde_path_to_error::deserialize(&mut de).map_err(classify)?;
        de.end().map_err(|e| InputError::Malformed { message: e.to_string(), field: None })?;
        Ok(input.validate(clock)?)
    })();
    parsed.map_err(|error| {
        /// Only `user_id`, whatever else the item holds (other members are ignored).
        #[derive(Deserialize)]
        #[serde(remote = "Self")]
        struct NamedUser {
            user_id: Option<serde_json::Value>,
        }
        // An array item names no user (it is no ping at all).
        objects_only!(NamedUser);
        let named_user = serde_json::from_str::<NamedUser>(json)
            .ok()
            .and_then(|item| item.user_id)
            .and_then(|user| user.as_str().map(str::to_owned));
        InvalidItem { error, named_user }
    })
}

/// What the body held, parsed and validated item by item.
#[derive(Default)]
struct Parsed {
    /// Valid pings and their request index.
    valid: Vec<(usize, Ping)>,
    /// Invalid items of a batch.
    rejected: Vec<Rejected>,
    /// The error of a single ping (not a batch) that is invalid: it fails the request, once
    /// the caller is known to be allowed to send it.
    single_error: Option<InputError>,
    /// Users named by invalid items.
    invalid_items_users: Vec<String>,
}

impl Parsed {
    /// Every user the body names as a string, in valid and invalid items alike.
    fn named_users(&self) -> impl Iterator<Item = &str> {
        self.valid.iter().map(|(_, p)| p.user_id.as_str()).chain(self.invalid_items_users.iter().map(String::as_str))
    }
}

/// A body read far enough to know how many pings it holds (what its work weighs), each still
/// to be parsed.
enum Items<'a> {
    /// A single ping (not a batch).
    Single(&'a str),
    /// A batch's items, at most [`MAX_BATCH`].
    Batch(Vec<&'a RawValue>),
}

impl Items<'_> {
    /// Items to parse (1 for a single ping).
    fn len(&self) -> usize {
        match self {
            Items::Single(_) => 1,
            Items::Batch(items) => items.len(),
        }
    }
}

/// Tells a single ping from a batch and splits a batch into its items (a scan of the JSON,
/// far cheaper than parsing each item); a body that is neither is an error.
fn scan_body(bytes: &[u8]) -> Result<Items<'_>, ApiError> {
    let text = std::str::from_utf8(bytes)
        .map_err(|_| ApiError::Malformed { message: "the body is not UTF-8".into(), field: None })?;
    if !text.trim_start().starts_with('{') {
        return Err(ApiError::Malformed {
            message: "the body must be a ping object or {\"pings\": [...]}".into(),
            field: None,
        });
    }
    let mut de = serde_json::Deserializer::from_str(text);
    let envelope: Envelope<'_> = serde_path_to_error::deserialize(&mut de).map_err(classify)?;
    de.end().map_err(|e| ApiError::Malformed { message: e.to_string(), field: None })?;
    let Some(batch) = envelope.pings else { return Ok(Items::Single(text)) };
    let items: Vec<&RawValue> = serde_json::from_str(batch.get()).map_err(|e| ApiError::Malformed {
        message: format!("pings must be a list: {e}"),
        field: Some("pings".into()),
    })?;
    if items.len() > MAX_BATCH {
        return Err(ApiError::invalid(
            "pings",
            format!("holds {} pings; at most {MAX_BATCH} per request", items.len()),
        ));
    }
    Ok(Items::Batch(items))
}

fn parsed_single(text: &str, clock: PingClock) -> Parsed {
    let mut parsed = Parsed::default();
    match parse_item(text, clock) {
        Ok(ping) => parsed.valid.push((0, ping)),
        Err(invalid) => {
            parsed.invalid_items_users.extend(invalid.named_user);
            parsed.single_error = Some(invalid.error);
        }
    }
    parsed
}

/// Parses a batch's items `from..from + slice.len()` into `parsed`.
fn parse_slice(slice: &[&RawValue], from: usize, clock: PingClock, parsed: &mut Parsed) {
    for (index, item) in (from..).zip(slice) {
        match parse_item(item.get(), clock) {
            Ok(ping) => parsed.valid.push((index, ping)),
            Err(invalid) => {
                parsed.invalid_items_users.extend(invalid.named_user);
                let error = ApiError::from(invalid.error.within(&format!("pings[{index}]"))).body();
                parsed.rejected.push(Rejected { index, error });
            }
        }
    }
}

/// [`parse_items`] in one go (the fuzz target's path; the handler's yields between slices).
fn parse_body(bytes: &[u8], clock: PingClock) -> Result<Parsed, ApiError> {
    Ok(match scan_body(bytes)? {
        Items::Single(text) => parsed_single(text, clock),
        Items::Batch(items) => {
            let mut parsed = Parsed::default();
            parsed.valid.reserve(items.len());
            parse_slice(&items, 0, clock, &mut parsed);
            parsed
        }
    })
}

/// Parses and validates each item. A batch is parsed [`WORK_SLICE`] items at a time, yielding
/// to the scheduler between slices: parsing is most of a batch's CPU time, and a short request
/// waiting for this worker then runs after one slice instead of after the whole batch. The
/// result is the same as [`parse_body`]'s (items are parsed in order, each on its own).
async fn parse_items(items: Items<'_>, clock: PingClock) -> Parsed {
    let items = match items {
        Items::Single(text) => return parsed_single(text, clock),
        Items::Batch(items) => items,
    };
    let mut parsed = Parsed::default();
    parsed.valid.reserve(items.len());
    let mut pacer = Pacer::default();
    for (k, slice) in items.chunks(WORK_SLICE).enumerate() {
        parse_slice(slice, k * WORK_SLICE, clock, &mut parsed);
        pacer.done(slice.len()).await;
    }
    parsed
}

/// [`crate::fuzzing::ping_body`]: what must hold for any body `parse_body` is given.
pub(crate) fn check_parse(bytes: &[u8]) {
    const CLOCK: PingClock = PingClock { now_ms: 1_700_000_000_000, max_age_s: 86_400 };
    let parsed = match parse_body(bytes, CLOCK) {
        Ok(parsed) => parsed,
        Err(e) => {
            let (status, code) = e.status_and_code();
            assert!(status.is_client_error() && !code.is_empty(), "{status} {code}");
            return;
        }
    };
    let oldest = CLOCK.now_ms - CLOCK.max_age_s as i64 * 1000;
    for (_, ping) in &parsed.valid {
        assert!((-90.0..=90.0).contains(&ping.at.lat) && (-180.0..=180.0).contains(&ping.at.lon), "{ping:?}");
        assert!((oldest..=CLOCK.now_ms + crate::domain::ping::MAX_FUTURE_MS).contains(&ping.ts_ms), "{ping:?}");
        assert!(ping.accuracy_m.is_none_or(|a| a.is_finite() && a >= 0.0), "{ping:?}");
        assert_eq!(crate::domain::UserId::parse("user_id", ping.user_id.as_str()).as_ref(), Ok(&ping.user_id));
    }
    let mut indexes: Vec<usize> =
        parsed.valid.iter().map(|(i, _)| *i).chain(parsed.rejected.iter().map(|r| r.index)).collect();
    indexes.sort_unstable();
    assert!(indexes.iter().enumerate().all(|(k, &i)| k == i), "each item once: {indexes:?}");
    for rejected in &parsed.rejected {
        assert!(rejected.error.field.as_deref().is_some_and(|f| f.starts_with(&format!("pings[{}]", rejected.index))));
    }
    if parsed.single_error.is_some() {
        assert!(parsed.valid.is_empty() && parsed.rejected.is_empty());
    }
    // A single ping reads the same through the domain type alone.
    let single = std::str::from_utf8(bytes).ok().and_then(|text| serde_json::from_str::<Envelope<'_>>(text).ok());
    if single.is_some_and(|e| e.pings.is_none()) && parsed.single_error.is_none() {
        let input: PingInput = crate::domain::parse_json(bytes).expect("parse_body accepted it");
        assert_eq!(input.validate(CLOCK).as_ref(), Ok(&parsed.valid[0].1));
    }
}

/// Ingest location pings.
#[utoipa::path(post, path = "/v1/pings", tag = "pings",
    request_body(content = PingsRequest, description = "One ping, or `{\"pings\": [...]}` with up to 10 000"),
    responses((status = 200, body = PingsReply), (status = 422, body = ErrorBody),
        (status = 400, body = ErrorBody), (status = 408, description = "Body too slow", body = ErrorBody), (status = 413, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 429, description = "Rate limited or overloaded", body = ErrorBody), (status = 503, body = ErrorBody)),
    security(("bearer" = [])))]
#[tracing::instrument(skip_all, fields(pings))]
pub async fn ingest(
    caller: Caller,
    State(state): State<AppState>,
    request: Request,
) -> Result<Json<PingsReply>, ApiError> {
    let request_ticket = request.extensions().get::<TicketHandle>().cloned();
    let bytes = body_bytes(request, &state).await?;
    let engine = &state.engine;
    let items = scan_body(&bytes)?;
    let weight = items.len() as u64;
    if let Some(ticket) = &request_ticket {
        // The caller's work share, before the CPU-heavy part (parsing, matching, applying): one
        // caller's flood of batches keeps about one worker busy at a time and waits for the
        // rest (see `admission`). Held by the ticket, until the reply is built.
        ticket.0.work(weight).await?;
        // A batch weighs its pings in the in-flight budget, not one request.
        ticket.0.take_pings(weight.max(1))?;
    }
    // The clock is read once the work may start (a request that waited is judged by then).
    let parsed = parse_items(items, engine.ping_clock(now_ms())).await;
    // Who may send these pings is decided before what is wrong with them: a client naming
    // another user anywhere in its body, in an invalid item too, is refused whole (API.md: a
    // client token used for another user is 403; batches may mix users only as admin).
    if parsed.named_users().any(|user| caller.may_act_for(user).is_err()) {
        return Err(ApiError::Forbidden("this token may only send pings of its own user"));
    }
    let Parsed { valid, rejected, single_error, .. } = parsed;
    if let Some(error) = single_error {
        return Err(error.into());
    }
    tracing::Span::current().record("pings", valid.len() + rejected.len());
    metrics::counter!("kabao_pings_rejected_total").increment(rejected.len() as u64);
    metrics::counter!("kabao_pings_accepted_total").increment(valid.len() as u64);

    let accepted = valid.len();
    let (indexes, pings): (Vec<usize>, Vec<Ping>) = valid.into_iter().unzip();
    let report = engine.ingest(pings).await?;
    let mut ignored: Vec<Ignored> = report
        .ignored
        .into_iter()
        .map(|(position, reason)| Ignored { index: indexes[position], reason: reason.as_str() })
        .collect();
    ignored.sort_by_key(|i| i.index);
    let events = report.events.into_iter().map(Event::from).collect();
    Ok(Json(PingsReply { accepted, rejected, ignored, events }))
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLOCK: PingClock = PingClock { now_ms: 1_700_000_000_000, max_age_s: 86_400 };

    #[test]
    fn a_single_ping_and_a_batch() {
        let one = parse_body(br#"{"user_id":"u","lat":1,"lon":2}"#, CLOCK).ok().unwrap();
        assert_eq!(one.valid.len(), 1);
        let batch =
            parse_body(br#"{"pings":[{"user_id":"u","lat":1,"lon":2},{"user_id":"u","lat":"x","lon":2},{"user_id":"u","lat":91,"lon":2}]}"#, CLOCK)
                .ok()
                .unwrap();
        assert_eq!(batch.valid.iter().map(|v| v.0).collect::<Vec<_>>(), [0]);
        let fields: Vec<_> = batch.rejected.iter().map(|r| (r.index, r.error.code, r.error.field.clone())).collect();
        assert_eq!(fields[0].0, 1);
        assert_eq!(fields[0].1, "malformed_json");
        assert_eq!(fields[1], (2, "invalid_field", Some("pings[2].lat".into())));
    }

    #[tokio::test]
    async fn a_batch_parsed_in_slices_is_parsed_as_in_one_go() {
        // Over three slices, with bad items in each and on the slices' edges.
        let n = 2 * WORK_SLICE + 7;
        let bad = [0, WORK_SLICE - 1, WORK_SLICE, 2 * WORK_SLICE + 6];
        let items: Vec<String> = (0..n)
            .map(|i| match bad.contains(&i) {
                true => format!(r#"{{"user_id":"u{i}","lat":95,"lon":2}}"#),
                false => format!(r#"{{"user_id":"u{i}","lat":1,"lon":{}}}"#, i as f64 / 1000.0),
            })
            .collect();
        let body = format!(r#"{{"pings":[{}]}}"#, items.join(","));
        let whole = parse_body(body.as_bytes(), CLOCK).ok().unwrap();
        let Ok(scanned) = scan_body(body.as_bytes()) else { panic!("a batch") };
        assert_eq!(scanned.len(), n);
        let sliced = parse_items(scanned, CLOCK).await;
        assert_eq!(sliced.valid, whole.valid);
        assert_eq!(sliced.valid.len(), n - bad.len());
        let rejected = |p: &Parsed| p.rejected.iter().map(|r| (r.index, r.error.field.clone())).collect::<Vec<_>>();
        assert_eq!(rejected(&sliced), rejected(&whole));
        assert_eq!(rejected(&sliced).iter().map(|r| r.0).collect::<Vec<_>>(), bad);
        assert_eq!(sliced.invalid_items_users, whole.invalid_items_users);
    }

    #[test]
    fn pings_are_objects_only() {
        let array = br#"{"pings":[["u",22.5,114.0,null,null,null,null],{"user_id":"u","lat":1,"lon":2}]}"#;
        let parsed = parse_body(array, CLOCK).ok().unwrap();
        assert_eq!(parsed.valid.len(), 1);
        assert_eq!(parsed.rejected[0].index, 0);
        assert_eq!(parsed.rejected[0].error.code, "malformed_json");
        assert!(matches!(parse_body(br#"["u",1,2]"#, CLOCK), Err(ApiError::Malformed { .. })));
    }

    #[test]
    fn bad_shapes() {
        for body in [&b"[]"[..], b"", b"nope", br#"{"pings":{}}"#, br#"{"pings":[1]"#, br#"{"pings":null}"#] {
            assert!(matches!(parse_body(body, CLOCK), Err(ApiError::Malformed { .. })), "{body:?}");
        }
        let many = format!("{{\"pings\":[{}]}}", vec!["{}"; MAX_BATCH + 1].join(","));
        match parse_body(many.as_bytes(), CLOCK) {
            Err(ApiError::Invalid(e)) => assert_eq!(e.field, "pings"),
            _ => panic!("expected a 422 on pings"),
        }
    }
}
