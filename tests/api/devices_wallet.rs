//! Devices, the wallet and redemption.

use reqwest::StatusCode;
use serde_json::json;

use crate::helpers::*;

#[tokio::test]
async fn put_device_answers_200_with_the_stored_device_and_delete_204_then_404() {
    let app = spawn().await;
    let body = json!({"platform": "apns", "token": "abc123", "tags": ["vip"], "locale": "zh-CN"});
    let reply = app.put("/v1/users/u1/devices/iphone", &body).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    assert_eq!(reply.body, body);
    // A PUT again replaces.
    let reply = app.put("/v1/users/u1/devices/iphone", &json!({"platform": "fcm", "token": "t2"})).await;
    assert_eq!(reply.body, json!({"platform": "fcm", "token": "t2"}));

    assert_eq!(app.delete("/v1/users/u1/devices/iphone").await.status, StatusCode::NO_CONTENT);
    app.delete("/v1/users/u1/devices/iphone").await.assert_error(404, "not_found");
    app.delete("/v1/users/nobody/devices/none").await.assert_error(404, "not_found");
}

#[tokio::test]
async fn bad_devices_are_422_naming_the_field() {
    let app = spawn().await;
    let long = "x".repeat(5000);
    for (body, field) in [
        (json!({"platform": "sms", "token": "t"}), "platform"),
        (json!({"token": "t"}), "platform"),
        (json!({"platform": "fcm"}), "token"),
        (json!({"platform": "fcm", "token": ""}), "token"),
        (json!({"platform": "fcm", "token": long}), "token"),
        (json!({"platform": "fcm", "token": "t", "tags": [""]}), "tags[0]"),
    ] {
        let reply = app.put("/v1/users/u1/devices/d", &body).await;
        reply.assert_error(422, "invalid_field");
        assert_eq!(reply.field(), Some(field), "{body}");
    }
    app.put("/v1/users/u1/devices/d", &json!({"platform": "fcm", "token": 5}))
        .await
        .assert_error(400, "malformed_json");
    let reply =
        app.put(&format!("/v1/users/{}/devices/d", "u".repeat(129)), &json!({"platform": "fcm", "token": "t"})).await;
    reply.assert_error(422, "invalid_field");
    assert_eq!(reply.field(), Some("user_id"));
    // Nothing was stored: the user has no device to delete.
    app.delete("/v1/users/u1/devices/d").await.assert_error(404, "not_found");
}

#[tokio::test]
async fn an_empty_wallet_is_200() {
    let app = spawn().await;
    let reply = app.get("/v1/users/nobody/coupons").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.body, json!({"coupons": []}));
}

#[tokio::test]
async fn the_wallet_is_newest_first_with_statuses() {
    let app = spawn().await;
    let t = t0();
    let mut short = campaign("a-short");
    short["coupon"]["valid_for_s"] = json!(60);
    app.create(&short).await;
    app.create(&campaign("b-long")).await;
    let mut never = campaign("c-never");
    never["coupon"] = json!({"title": "never", "body": "b"});
    app.create(&never).await;
    // One ping issues all three (same issued_at_ms, so they order by coupon id); a re-enter
    // two minutes later issues three newer ones.
    let reply = app.ping(inside("u", t)).await;
    assert_eq!(reply.events().len(), 3);
    app.ping(outside("u", t + 60_000)).await;
    let later = app.ping(inside("u", t + 120_000)).await;
    assert_eq!(later.events().len(), 3);

    let long_coupon =
        later.events().iter().find(|e| e["campaign_id"] == "b-long").unwrap()["coupon_id"].as_str().unwrap().to_owned();
    let ok = app.post(&format!("/v1/coupons/{long_coupon}/redeem"), &json!({"merchant_id": "m-1"})).await;
    assert_eq!(ok.status, StatusCode::OK, "{}", ok.text);

    let wallet = app.wallet("u").await;
    assert_eq!(wallet.len(), 6);
    let issued: Vec<i64> = wallet.iter().map(|c| c["issued_at_ms"].as_i64().unwrap()).collect();
    assert_eq!(issued, [t + 120_000, t + 120_000, t + 120_000, t, t, t]);
    for pair in wallet.chunks(3) {
        let ids: Vec<&str> = pair.iter().map(|c| c["coupon_id"].as_str().unwrap()).collect();
        let mut sorted = ids.clone();
        sorted.sort();
        assert_eq!(ids, sorted, "ties by coupon id");
    }
    let status_of = |campaign: &str, ts: i64| {
        wallet.iter().find(|c| c["campaign_id"] == campaign && c["issued_at_ms"] == ts).unwrap()["status"].clone()
    };
    assert_eq!(status_of("a-short", t), "expired");
    assert_eq!(status_of("b-long", t + 120_000), "redeemed");
    assert_eq!(status_of("b-long", t), "issued");
    assert_eq!(status_of("c-never", t), "issued");
    let never = wallet.iter().find(|c| c["campaign_id"] == "c-never").unwrap();
    assert!(never["expires_at_ms"].is_null());
    assert_eq!(never["title"], "never");
    assert_eq!(never["body"], "b");
}

#[tokio::test]
async fn redemption_once_then_409_and_the_refusals() {
    let app = spawn().await;
    let mut short = campaign("short");
    short["coupon"]["valid_for_s"] = json!(60);
    app.create(&short).await;
    app.create(&campaign("long")).await;
    let reply = app.ping(inside("u", t0())).await;
    let coupon_of = |c: &str| {
        reply.events().iter().find(|e| e["campaign_id"] == c).unwrap()["coupon_id"].as_str().unwrap().to_owned()
    };
    let (long, short) = (coupon_of("long"), coupon_of("short"));
    let redeem = |id: String, merchant: serde_json::Value| {
        let app = &app;
        async move { app.post(&format!("/v1/coupons/{id}/redeem"), &json!({"merchant_id": merchant})).await }
    };

    let wrong = redeem(long.clone(), json!("m-2")).await;
    wrong.assert_error(422, "invalid_field");
    assert_eq!(wrong.field(), Some("merchant_id"));
    let first = redeem(long.clone(), json!("m-1")).await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.text);
    assert_eq!(first.body["coupon_id"], long.as_str());
    assert_eq!(first.body["status"], "redeemed");
    redeem(long.clone(), json!("m-1")).await.assert_error(409, "conflict");
    // Issued three hours ago, valid for a minute.
    redeem(short, json!("m-1")).await.assert_error(410, "expired");
    redeem("cp_unknown".into(), json!("m-1")).await.assert_error(404, "not_found");
    let missing = app.post(&format!("/v1/coupons/{long}/redeem"), &json!({})).await;
    missing.assert_error(422, "invalid_field");
    assert_eq!(missing.field(), Some("merchant_id"));
    redeem(long, json!(7)).await.assert_error(400, "malformed_json");
}

#[tokio::test]
async fn erasing_a_user_forgets_devices_wallet_stays_and_per_user_counts_but_not_totals() {
    let app = spawn().await;
    let mut capped = campaign("capped");
    capped["caps"] = json!({"per_user_max": 1, "total_max": 10});
    app.create(&capped).await;
    let t = t0();
    app.device("gone", "phone", &["vip"]).await;
    assert_eq!(app.ping(inside("gone", t)).await.events().len(), 1);
    assert_eq!(app.ping(inside("kept", t)).await.events().len(), 1);

    assert_eq!(app.delete("/v1/users/gone").await.status, StatusCode::NO_CONTENT);
    assert_eq!(app.delete("/v1/users/never-seen").await.status, StatusCode::NO_CONTENT, "unknown users too");
    assert!(app.wallet("gone").await.is_empty());
    app.delete("/v1/users/gone/devices/phone").await.assert_error(404, "not_found");
    assert_eq!(app.wallet("kept").await.len(), 1, "other users keep theirs");

    // The stay was forgotten (the next inside ping is an enter) and per_user_max no longer
    // counts the erased coupon; `issued` still does.
    assert_eq!(app.ping(inside("gone", t + 1_000)).await.events().len(), 1);
    let stats = app.get("/v1/campaigns/capped/stats").await;
    assert_eq!(stats.body["issued"], 3, "{}", stats.text);
    assert_eq!(stats.body["pushes"]["dead_token"], 0);

    // A client may erase itself only.
    let me = app.call(reqwest::Method::DELETE, "/v1/users/kept", Some(&jwt("kept")), None).await;
    assert_eq!(me.status, StatusCode::NO_CONTENT);
    app.call(reqwest::Method::DELETE, "/v1/users/gone", Some(&jwt("kept")), None).await.assert_error(403, "forbidden");
}
