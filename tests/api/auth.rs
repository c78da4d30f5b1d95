//! Who may call what (API.md "Auth"): the admin token everything, a client JWT only its own
//! user's pings, devices, wallet and redemptions.

use reqwest::Method;
use serde_json::json;

use crate::helpers::*;

/// Every endpoint that needs a token, with a body where it takes one.
fn protected() -> Vec<(Method, &'static str, Option<serde_json::Value>)> {
    vec![
        (Method::POST, "/v1/campaigns", Some(campaign("auth"))),
        (Method::GET, "/v1/campaigns", None),
        (Method::GET, "/v1/campaigns/auth", None),
        (Method::PUT, "/v1/campaigns/auth", Some(campaign("auth"))),
        (Method::DELETE, "/v1/campaigns/auth", None),
        (Method::GET, "/v1/campaigns/auth/stats", None),
        (Method::POST, "/v1/pings", Some(inside("u1", t0()))),
        (Method::PUT, "/v1/users/u1/devices/d1", Some(json!({"platform": "fcm", "token": "t"}))),
        (Method::DELETE, "/v1/users/u1/devices/d1", None),
        (Method::GET, "/v1/users/u1/coupons", None),
        (Method::POST, "/v1/coupons/cp_x/redeem", Some(json!({"merchant_id": "m-1"}))),
    ]
}

#[tokio::test]
async fn no_token_or_a_bad_one_is_401_everywhere() {
    let app = spawn().await;
    let bad_tokens = [
        None,
        Some("wrong-admin-token".to_owned()),
        Some(jwt_with("u1", 600, "another-secret")),
        Some(jwt_with("u1", -10, SECRET)),
        Some("not.a.jwt".to_owned()),
    ];
    for (method, path, body) in protected() {
        for token in &bad_tokens {
            let reply = app.call(method.clone(), path, token.as_deref(), body.as_ref()).await;
            reply.assert_error(401, "unauthorized");
        }
    }
    // Not a bearer scheme at all.
    let reply = app
        .http
        .get(format!("{}/v1/campaigns", app.base))
        .header("authorization", format!("Basic {ADMIN}"))
        .send()
        .await
        .unwrap();
    TestApp::reply(reply).await.assert_error(401, "unauthorized");
    // Nothing was created by any of it.
    assert!(app.campaign_ids().await.is_empty());
}

#[tokio::test]
async fn a_client_token_on_admin_endpoints_is_403() {
    let app = spawn().await;
    let token = jwt("u1");
    for (method, path, body) in protected().into_iter().filter(|(_, p, _)| p.starts_with("/v1/campaigns")) {
        app.call(method, path, Some(&token), body.as_ref()).await.assert_error(403, "forbidden");
    }
    assert!(app.campaign_ids().await.is_empty());
}

#[tokio::test]
async fn a_client_token_for_another_user_is_403() {
    let app = spawn().await;
    let token = jwt("u2");
    for (method, path, body) in protected().into_iter().filter(|(_, p, _)| !p.starts_with("/v1/campaigns")) {
        if path.starts_with("/v1/coupons") {
            continue; // Redemption is covered with a real coupon below.
        }
        app.call(method, path, Some(&token), body.as_ref()).await.assert_error(403, "forbidden");
    }
    // Refused before the body is even read.
    let garbage = app.call_raw(Method::PUT, "/v1/users/u1/devices/d1", Some(&token), "application/json", b"{".to_vec());
    garbage.await.assert_error(403, "forbidden");
    assert!(app.wallet("u1").await.is_empty());
}

#[tokio::test]
async fn a_client_acts_for_its_own_user() {
    let app = spawn().await;
    app.create(&campaign("own")).await;
    let token = jwt("u1");
    let device = app
        .call(Method::PUT, "/v1/users/u1/devices/d1", Some(&token), Some(&json!({"platform": "apns", "token": "t"})))
        .await;
    assert_eq!(device.status, 200, "{}", device.text);
    let reply = app.call(Method::POST, "/v1/pings", Some(&token), Some(&inside("u1", t0()))).await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    let coupon = reply.events()[0]["coupon_id"].as_str().unwrap().to_owned();
    let wallet = app.call(Method::GET, "/v1/users/u1/coupons", Some(&token), None).await;
    assert_eq!(wallet.body["coupons"].as_array().unwrap().len(), 1);

    // Another user's client may not redeem it.
    let other = app
        .call(
            Method::POST,
            &format!("/v1/coupons/{coupon}/redeem"),
            Some(&jwt("u2")),
            Some(&json!({"merchant_id": "m-1"})),
        )
        .await;
    other.assert_error(403, "forbidden");
    let mine = app
        .call(Method::POST, &format!("/v1/coupons/{coupon}/redeem"), Some(&token), Some(&json!({"merchant_id": "m-1"})))
        .await;
    assert_eq!(mine.status, 200, "{}", mine.text);
    assert_eq!(mine.body["status"], "redeemed");
    let deleted = app.call(Method::DELETE, "/v1/users/u1/devices/d1", Some(&token), None).await;
    assert_eq!(deleted.status, 204);
}

#[tokio::test]
async fn batches_mixing_users_need_the_admin_token() {
    let app = spawn().await;
    app.create(&campaign("mix")).await;
    let t = t0();
    let batch = json!({"pings": [inside("u1", t), inside("u2", t)]});
    let reply = app.call(Method::POST, "/v1/pings", Some(&jwt("u1")), Some(&batch)).await;
    reply.assert_error(403, "forbidden");
    // Refused whole: nothing was applied.
    assert!(app.wallet("u1").await.is_empty());

    let own = json!({"pings": [inside("u1", t), outside("u1", t + 60_000)]});
    let reply = app.call(Method::POST, "/v1/pings", Some(&jwt("u1")), Some(&own)).await;
    assert_eq!(reply.status, 200, "{}", reply.text);

    let reply = app.post("/v1/pings", &batch).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.events().len(), 1, "u2's enter; u1 was already seen at t");
}

#[tokio::test]
async fn a_scheme_in_any_case_is_accepted() {
    let app = spawn().await;
    let reply = app
        .http
        .get(format!("{}/v1/campaigns", app.base))
        .header("authorization", format!("bearer {ADMIN}"))
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), 200);
}
