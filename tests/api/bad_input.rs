//! A table of bad inputs, each answered with its documented status, code and field — and
//! nothing created by any of them.

use reqwest::Method;
use serde_json::{json, Value};

use crate::helpers::*;

/// `campaign("bad")` with `edit` applied.
fn with(edit: impl FnOnce(&mut Value)) -> Value {
    let mut c = campaign("bad");
    edit(&mut c);
    c
}

fn polygon(ring: Value) -> Value {
    json!([{"id": "p", "type": "polygon", "coordinates": [ring]}])
}

#[tokio::test]
async fn bad_campaigns_are_refused_with_their_field_and_create_nothing() {
    let app = spawn().await;
    let cases: Vec<(&str, Value, u16, &str, Option<&str>)> = vec![
        ("wrong type: fences not a list", with(|c| c["fences"] = json!({"id": "x"})), 400, "malformed_json", None),
        (
            "wrong type: radius a string",
            with(|c| c["fences"][0]["radius_m"] = json!("150")),
            400,
            "malformed_json",
            None,
        ),
        ("wrong type: name a number", with(|c| c["name"] = json!(5)), 400, "malformed_json", None),
        ("radius 0", with(|c| c["fences"][0]["radius_m"] = json!(0)), 422, "invalid_field", Some("fences[0].radius_m")),
        (
            "radius over 50 km",
            with(|c| c["fences"][0]["radius_m"] = json!(50_001)),
            422,
            "invalid_field",
            Some("fences[0].radius_m"),
        ),
        (
            "latitude 91",
            with(|c| c["fences"][0]["center"] = json!([114.0, 91.0])),
            422,
            "invalid_field",
            Some("fences[0].center[1]"),
        ),
        (
            "longitude 181",
            with(|c| c["fences"][0]["center"] = json!([181.0, 22.0])),
            422,
            "invalid_field",
            Some("fences[0].center[0]"),
        ),
        ("overflowing number", json!(null), 422, "invalid_field", Some("fences[0].radius_m")),
        ("no fences", with(|c| c["fences"] = json!([])), 422, "invalid_field", Some("fences")),
        (
            "fences absent",
            with(|c| {
                c.as_object_mut().unwrap().remove("fences");
            }),
            422,
            "invalid_field",
            Some("fences"),
        ),
        (
            "duplicate fence id",
            with(|c| c["fences"] = json!([circle("same", LON, LAT, 100.0), circle("same", LON, LAT, 200.0)])),
            422,
            "invalid_field",
            Some("fences[1].id"),
        ),
        (
            "unknown fence type",
            with(|c| c["fences"][0]["type"] = json!("square")),
            422,
            "invalid_field",
            Some("fences[0].type"),
        ),
        (
            "unclosed polygon",
            with(|c| {
                c["fences"] = polygon(json!([[114.05, 22.54], [114.06, 22.54], [114.06, 22.55], [114.05, 22.55]]))
            }),
            422,
            "invalid_field",
            Some("fences[0].coordinates[0]"),
        ),
        (
            "three-point polygon",
            with(|c| c["fences"] = polygon(json!([[114.05, 22.54], [114.06, 22.54], [114.05, 22.54]]))),
            422,
            "invalid_field",
            Some("fences[0].coordinates[0]"),
        ),
        (
            "self-intersecting polygon (bow tie)",
            with(|c| {
                c["fences"] = polygon(json!([
                    [114.05, 22.54],
                    [114.06, 22.55],
                    [114.06, 22.54],
                    [114.05, 22.55],
                    [114.05, 22.54]
                ]))
            }),
            422,
            "invalid_field",
            Some("fences[0].coordinates[0]"),
        ),
        ("unknown trigger", with(|c| c["trigger"] = json!({"on": "exit"})), 422, "invalid_field", Some("trigger.on")),
        (
            "dwell without dwell_s",
            with(|c| c["trigger"] = json!({"on": "dwell"})),
            422,
            "invalid_field",
            Some("trigger.dwell_s"),
        ),
        (
            "fractional dwell_s",
            with(|c| c["trigger"] = json!({"on": "dwell", "dwell_s": 1.5})),
            422,
            "invalid_field",
            Some("trigger.dwell_s"),
        ),
        (
            "ends before starts",
            with(|c| c["schedule"] = json!({"starts_at_ms": 2000, "ends_at_ms": 1000})),
            422,
            "invalid_field",
            Some("schedule.ends_at_ms"),
        ),
        (
            "ends at starts",
            with(|c| c["schedule"] = json!({"starts_at_ms": 2000, "ends_at_ms": 2000})),
            422,
            "invalid_field",
            Some("schedule.ends_at_ms"),
        ),
        (
            "unknown timezone",
            with(|c| c["schedule"] = json!({"timezone": "Mars/Olympus"})),
            422,
            "invalid_field",
            Some("schedule.timezone"),
        ),
        (
            "bad hour",
            with(|c| c["schedule"] = json!({"hours": [{"from": "25:00", "to": "26:00"}]})),
            422,
            "invalid_field",
            Some("schedule.hours[0].from"),
        ),
        (
            "bad day",
            with(|c| c["schedule"] = json!({"hours": [{"days": ["funday"], "from": "08:00", "to": "09:00"}]})),
            422,
            "invalid_field",
            Some("schedule.hours[0].days[0]"),
        ),
        (
            "negative cap",
            with(|c| c["caps"] = json!({"per_user_max": -1})),
            422,
            "invalid_field",
            Some("caps.per_user_max"),
        ),
        ("unknown status", with(|c| c["status"] = json!("running")), 422, "invalid_field", Some("status")),
        ("bad id", with(|c| c["id"] = json!("has space")), 422, "invalid_field", Some("id")),
        ("id too long", with(|c| c["id"] = json!("x".repeat(65))), 422, "invalid_field", Some("id")),
        ("huge name", with(|c| c["name"] = json!("n".repeat(100_000))), 422, "invalid_field", Some("name")),
    ];
    for (what, body, status, code, field) in cases {
        let reply = if what == "overflowing number" {
            let text =
                serde_json::to_string(&campaign("bad")).unwrap().replace("\"radius_m\":150.0", "\"radius_m\":1e999");
            assert!(text.contains("1e999"), "fixture: {text}");
            app.call_raw(Method::POST, "/v1/campaigns", Some(ADMIN), "application/json", text.into_bytes()).await
        } else {
            app.post("/v1/campaigns", &body).await
        };
        assert_eq!(reply.status.as_u16(), status, "{what}: {}", reply.text);
        assert_eq!(reply.code(), code, "{what}: {}", reply.text);
        if let Some(field) = field {
            assert_eq!(reply.field(), Some(field), "{what}: {}", reply.text);
        }
    }
    assert!(app.campaign_ids().await.is_empty(), "a refused campaign is never stored");
}

#[tokio::test]
async fn a_refused_put_leaves_the_campaign_as_it_was() {
    let app = spawn().await;
    let stored = app.create(&campaign("keep")).await;
    let mut bad = campaign("keep");
    bad["fences"] = json!([circle("a", LON, LAT, 100.0), circle("b", LON, LAT, 0.5)]);
    let reply = app.put("/v1/campaigns/keep", &bad).await;
    reply.assert_error(422, "invalid_field");
    assert_eq!(reply.field(), Some("fences[1].radius_m"));
    assert_eq!(app.get("/v1/campaigns/keep").await.body, stored);
}

#[tokio::test]
async fn bodies_that_are_not_json() {
    let app = spawn().await;
    for body in [&b"{"[..], b"not json", b"", b"{\"id\": \"x\"} trailing", b"\xff\xfe"] {
        for path in ["/v1/campaigns", "/v1/pings"] {
            let reply = app.call_raw(Method::POST, path, Some(ADMIN), "application/json", body.to_vec()).await;
            reply.assert_error(400, "malformed_json");
        }
    }
    let reply = app.call_raw(Method::POST, "/v1/pings", Some(ADMIN), "application/json", b"[1,2]".to_vec()).await;
    reply.assert_error(400, "malformed_json");
    // Whatever the body is labelled, one that is not JSON is `400 malformed_json` (API.md's
    // error table has no 415).
    let reply = app.call_raw(Method::POST, "/v1/campaigns", Some(ADMIN), "text/plain", b"not json".to_vec()).await;
    reply.assert_error(400, "malformed_json");
    assert!(app.campaign_ids().await.is_empty());
}

#[tokio::test]
async fn deeply_nested_json_is_refused_not_a_crash() {
    let app = spawn().await;
    let depth = 100_000;
    let nested = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
    for (path, body) in [
        ("/v1/campaigns", format!("{{\"fences\": {nested}}}")),
        ("/v1/campaigns", format!("{{\"extra\": {nested}}}")),
        ("/v1/pings", format!("{{\"pings\": [{{\"user_id\": {nested}}}]}}")),
        ("/v1/pings", format!("{{\"user_id\": \"u\", \"extra\": {nested}}}")),
        ("/v1/pings", nested.clone()),
    ] {
        let reply = app.call_raw(Method::POST, path, Some(ADMIN), "application/json", body.into_bytes()).await;
        assert!(
            reply.status == 400 || reply.status == 422 || reply.status == 200,
            "{path}: {} {}",
            reply.status,
            reply.text
        );
        assert!(reply.status == 200 || reply.code() != "<no error.code>", "{}", reply.text);
    }
    assert_eq!(app.get("/healthz").await.status, 200, "still up");
    assert!(app.campaign_ids().await.is_empty());
}

#[tokio::test]
async fn huge_strings_are_refused() {
    let app = spawn().await;
    let reply = app.post("/v1/pings", &json!({"user_id": "u".repeat(129), "lat": 0, "lon": 0})).await;
    reply.assert_error(422, "invalid_field");
    assert_eq!(reply.field(), Some("user_id"));
    let mut c = campaign("big");
    c["coupon"]["body"] = json!("b".repeat(1_000_000));
    let reply = app.post("/v1/campaigns", &c).await;
    reply.assert_error(422, "invalid_field");
    assert_eq!(reply.field(), Some("coupon.body"));
    assert!(app.campaign_ids().await.is_empty());
}

#[tokio::test]
async fn oversized_bodies_are_413() {
    let app = spawn_with(|c| {
        c.http.campaign_body_limit_bytes = 64 * 1024;
        c.http.ping_body_limit_bytes = 1024 * 1024;
    })
    .await;
    let mut c = campaign("big");
    c["name"] = json!("n".repeat(100 * 1024));
    app.post("/v1/campaigns", &c).await.assert_error(413, "payload_too_large");
    assert!(app.campaign_ids().await.is_empty());

    // Pings: 1 MiB here (4 MiB by default).
    let pings: Vec<_> = (0..9_000).map(|i| json!({"user_id": format!("user-{i:0>100}"), "lat": 0, "lon": 0})).collect();
    let body = json!({ "pings": pings });
    assert!(serde_json::to_vec(&body).unwrap().len() > 1024 * 1024);
    app.post("/v1/pings", &body).await.assert_error(413, "payload_too_large");
}

#[tokio::test]
async fn unknown_ids_are_404() {
    let app = spawn().await;
    app.get("/v1/campaigns/none").await.assert_error(404, "not_found");
    app.put("/v1/campaigns/none", &campaign("none")).await.assert_error(404, "not_found");
    app.delete("/v1/campaigns/none").await.assert_error(404, "not_found");
    app.post("/v1/coupons/none/redeem", &json!({"merchant_id": "m"})).await.assert_error(404, "not_found");
    app.delete("/v1/users/none/devices/none").await.assert_error(404, "not_found");
}

#[tokio::test]
async fn unknown_routes_and_methods_answer_in_the_error_format() {
    let app = spawn().await;
    app.get("/v2/nothing").await.assert_error(404, "not_found");
    app.get("/").await.assert_error(404, "not_found");
    let reply = app.call(Method::PATCH, "/v1/campaigns", Some(ADMIN), None).await;
    reply.assert_error(405, "method_not_allowed");
    app.call(Method::DELETE, "/v1/pings", Some(ADMIN), None).await.assert_error(405, "method_not_allowed");
}
