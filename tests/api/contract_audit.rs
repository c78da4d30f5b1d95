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
