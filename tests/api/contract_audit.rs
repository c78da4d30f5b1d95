//! Contract audit: each test pins one line of API.md that the server once answered differently.

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::helpers::*;

/// `body` as JSON text with each `(needle, with)` replaced once, so a number can be spelled
/// `120.0` or `1e3` (which `serde_json` would normalise).
fn respell(body: &Value, edits: &[(&str, &str)]) -> Vec<u8> {
    let mut text = body.to_string();
    for (needle, with) in edits {
        assert!(text.contains(needle), "{needle} not in {text}");
        text = text.replacen(needle, with, 1);
    }
    text.into_bytes()
}

/// API.md "Numbers": only a *fraction* where an integer belongs is `422`. JSON has one number
/// type, so `120.0` or `1e3` is the integer 120 or 1000 — a timestamp computed in floating point
/// by a client must not be refused.
#[tokio::test]
async fn integral_floats_are_integers_and_fractions_are_not() {
    let app = spawn().await;
    let mut c = campaign("floats");
    c["trigger"] = json!({"on": "dwell", "dwell_s": 120});
    c["caps"] = json!({"total_max": 7});
    let raw = respell(&c, &[("\"dwell_s\":120", "\"dwell_s\":120.0"), ("\"total_max\":7", "\"total_max\":1e3")]);
    let reply = app.call_raw(Method::POST, "/v1/campaigns", Some(ADMIN), "application/json", raw).await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text);
    assert_eq!(reply.body["trigger"]["dwell_s"], json!(120));
    assert_eq!(reply.body["caps"]["total_max"], json!(1000));

    let t = t0();
    let ts = format!("\"ts_ms\":{t}");
    let raw = respell(&inside("u1", t), &[(&ts, &format!("\"ts_ms\":{t}.0"))]);
    let reply = app.call_raw(Method::POST, "/v1/pings", Some(ADMIN), "application/json", raw).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    assert_eq!(reply.body["accepted"], json!(1));

    // A fraction is still refused, naming the field.
    let raw = respell(&inside("u2", t), &[(&ts, &format!("\"ts_ms\":{t}.5"))]);
    let reply = app.call_raw(Method::POST, "/v1/pings", Some(ADMIN), "application/json", raw).await;
    reply.assert_error(422, "invalid_field");
    assert_eq!(reply.field(), Some("ts_ms"));
}

/// API.md "Errors": a body that is not JSON is `400 malformed_json` — the table has no 415. A
/// JSON body is read as JSON whatever its `Content-Type` says (`fetch` labels a string body
/// `text/plain`, `curl -d` labels it form-urlencoded).
#[tokio::test]
async fn the_content_type_label_does_not_decide_what_a_body_is() {
    let app = spawn().await;
    app.create(&campaign("c1")).await;
    for content_type in ["text/plain;charset=UTF-8", "application/x-www-form-urlencoded"] {
        let user = format!("u-{content_type}");
        let body = inside(&user, t0()).to_string().into_bytes();
        let reply = app.call_raw(Method::POST, "/v1/pings", Some(ADMIN), content_type, body).await;
        assert_eq!(reply.status, StatusCode::OK, "{content_type}: {}", reply.text);
        assert!(event_campaigns(&reply).contains(&"c1".to_owned()), "{}", reply.text);

        let body = campaign(&format!("c-{}", content_type.len())).to_string().into_bytes();
        let reply = app.call_raw(Method::POST, "/v1/campaigns", Some(ADMIN), content_type, body).await;
        assert_eq!(reply.status, StatusCode::CREATED, "{content_type}: {}", reply.text);

        for path in ["/v1/pings", "/v1/campaigns"] {
            let reply = app.call_raw(Method::POST, path, Some(ADMIN), content_type, b"a=1&b=2".to_vec()).await;
            reply.assert_error(400, "malformed_json");
        }
    }
}

/// API.md "Auth": a client token used for another user's ping is `403`, and only the admin token
/// may mix users in a batch — an item naming another user is that, valid or not. Before, an
/// invalid item of another user was merely listed in `rejected` and the batch went through.
#[tokio::test]
async fn a_client_naming_another_user_anywhere_is_403() {
    let app = spawn().await;
    app.create(&campaign("c1")).await;
    let token = jwt("alice");
    let t = t0();
    let mut bad = inside("bob", t);
    bad["lat"] = json!(91);
    let batch = json!({"pings": [inside("alice", t), bad.clone()]});
    let reply = app.call(Method::POST, "/v1/pings", Some(&token), Some(&batch)).await;
    reply.assert_error(403, "forbidden");
    // Refused whole: alice's valid ping changed nothing.
    assert!(app.wallet("alice").await.is_empty());

    let reply = app.call(Method::POST, "/v1/pings", Some(&token), Some(&bad)).await;
    reply.assert_error(403, "forbidden");

    // Its own invalid ping is still a 422, and its own batch goes through.
    let mut own_bad = bad.clone();
    own_bad["user_id"] = json!("alice");
    let reply = app.call(Method::POST, "/v1/pings", Some(&token), Some(&own_bad)).await;
    reply.assert_error(422, "invalid_field");
    let batch = json!({"pings": [inside("alice", t), own_bad]});
    let reply = app.call(Method::POST, "/v1/pings", Some(&token), Some(&batch)).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    assert_eq!(event_campaigns(&reply), ["c1"]);
}

/// A missing required member is a `422` naming it, wherever it sits: `merchant` without its `id`
/// was a `400` from the parser ("missing field `id`") while every other missing member (a
/// fence's `id`, `radius_m`, a dwell's `dwell_s`) was a `422` on its path.
#[tokio::test]
async fn a_missing_required_member_is_422_on_its_path() {
    let app = spawn().await;
    let without = |path: &[&str], member: &str| {
        let mut c = campaign("m");
        let mut at = &mut c;
        for step in path {
            at = match step.parse::<usize>() {
                Ok(i) => &mut at[i],
                Err(_) => &mut at[*step],
            };
        }
        at.as_object_mut().expect("an object").remove(member);
        c
    };
    let mut dwell = campaign("m");
    dwell["trigger"] = json!({"on": "dwell"});
    let mut merchant = campaign("m");
    merchant["merchant"] = json!({"name": "No id"});
    let cases = [
        ("merchant.id", merchant),
        ("fences", without(&[], "fences")),
        ("fences[0].id", without(&["fences", "0"], "id")),
        ("fences[0].radius_m", without(&["fences", "0"], "radius_m")),
        ("trigger.dwell_s", dwell),
    ];
    for (field, c) in cases {
        let reply = app.post("/v1/campaigns", &c).await;
        reply.assert_error(422, "invalid_field");
        assert_eq!(reply.field(), Some(field), "{}", reply.text);
    }
    assert!(app.campaign_ids().await.is_empty());
}

/// API.md "Errors": a body "not the expected shape" is `400 malformed_json`. `{"pings": null}` is
/// a batch whose `pings` is not a list; it was taken for a single ping and answered `422` on
/// `user_id`.
#[tokio::test]
async fn a_null_pings_member_is_a_malformed_batch() {
    let app = spawn().await;
    let reply = app.post("/v1/pings", &json!({"pings": null})).await;
    reply.assert_error(400, "malformed_json");
    assert_eq!(reply.field(), Some("pings"));
}
