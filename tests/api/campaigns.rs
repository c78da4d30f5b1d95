//! `/v1/campaigns`: create, list and page, read, replace, delete, stats.

use reqwest::StatusCode;
use serde_json::json;

use crate::helpers::*;

#[tokio::test]
async fn create_answers_201_with_the_stored_campaign() {
    let app = spawn().await;
    let sent = campaign("coffee-2013-01");
    let reply = app.post("/v1/campaigns", &sent).await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text);
    let stored = &reply.body;
    assert_eq!(stored["id"], "coffee-2013-01");
    assert_eq!(stored["name"], sent["name"]);
    assert_eq!(stored["merchant"], sent["merchant"]);
    assert_eq!(stored["coupon"], sent["coupon"]);
    assert_eq!(stored["fences"], sent["fences"]);
    assert_eq!(stored["trigger"], sent["trigger"]);
    assert_eq!(stored["status"], "active");
    // Absent optional members are omitted, not null.
    assert!(stored.get("schedule").is_none() && stored.get("audience").is_none(), "{stored}");

    assert_eq!(app.get("/v1/campaigns/coffee-2013-01").await.body, *stored);
}

#[tokio::test]
async fn polygon_fences_round_trip_unchanged() {
    let app = spawn().await;
    let mut c = campaign("poly");
    let ring = json!([[[114.05, 22.54], [114.06, 22.54], [114.06, 22.55], [114.05, 22.54]]]);
    c["fences"] = json!([{"id": "mall-7", "type": "polygon", "coordinates": ring}]);
    let stored = app.create(&c).await;
    assert_eq!(stored["fences"][0]["coordinates"], ring);
}

#[tokio::test]
async fn an_id_is_generated_when_absent() {
    let app = spawn().await;
    let mut c = campaign("x");
    c.as_object_mut().unwrap().remove("id");
    let stored = app.create(&c).await;
    let id = stored["id"].as_str().expect("a generated id");
    assert!(!id.is_empty() && id.len() <= 64);
    assert!(id.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.:-".contains(&b)), "{id}");
    assert_eq!(app.get(&format!("/v1/campaigns/{id}")).await.status, StatusCode::OK);
}

#[tokio::test]
async fn a_taken_id_is_409_and_changes_nothing() {
    let app = spawn().await;
    app.create(&campaign("dup")).await;
    let mut second = campaign("dup");
    second["name"] = json!("the second one");
    app.post("/v1/campaigns", &second).await.assert_error(409, "conflict");
    assert_eq!(app.get("/v1/campaigns/dup").await.body["name"], "campaign dup");
}

#[tokio::test]
async fn list_is_sorted_by_id_and_paged() {
    let app = spawn().await;
    for id in ["c-3", "c-1", "c-5", "c-2", "c-4"] {
        app.create(&campaign(id)).await;
    }
    let page = app.get("/v1/campaigns?limit=2").await;
    assert_eq!(page.status, StatusCode::OK);
    let ids = |r: &Reply| -> Vec<String> {
        r.body["campaigns"].as_array().unwrap().iter().map(|c| c["id"].as_str().unwrap().to_owned()).collect()
    };
    assert_eq!(ids(&page), ["c-1", "c-2"]);
    assert_eq!(page.body["next_after"], "c-2");
    let page = app.get("/v1/campaigns?limit=2&after=c-2").await;
    assert_eq!(ids(&page), ["c-3", "c-4"]);
    assert_eq!(page.body["next_after"], "c-4");
    let page = app.get("/v1/campaigns?limit=2&after=c-4").await;
    assert_eq!(ids(&page), ["c-5"]);
    assert!(page.body["next_after"].is_null());
    // `after` need not exist; the page starts after it in id order.
    assert_eq!(ids(&app.get("/v1/campaigns?after=c-25").await), ["c-3", "c-4", "c-5"]);
    // Default limit 100 holds them all; exactly `limit` left means no next page.
    let all = app.get("/v1/campaigns").await;
    assert_eq!(ids(&all).len(), 5);
    assert!(all.body["next_after"].is_null());
    assert!(app.get("/v1/campaigns?limit=5").await.body["next_after"].is_null());
    assert_eq!(app.get("/v1/campaigns?limit=1000").await.status, StatusCode::OK);
}

#[tokio::test]
async fn bad_limits_are_422_on_limit() {
    let app = spawn().await;
    for q in ["limit=1001", "limit=0", "limit=-1", "limit=abc", "limit=1.5"] {
        let reply = app.get(&format!("/v1/campaigns?{q}")).await;
        reply.assert_error(422, "invalid_field");
        assert_eq!(reply.field(), Some("limit"), "{q}");
    }
}

#[tokio::test]
async fn an_empty_list() {
    let app = spawn().await;
    let reply = app.get("/v1/campaigns").await;
    assert_eq!(reply.body, json!({"campaigns": [], "next_after": null}));
}

#[tokio::test]
async fn put_replaces_the_campaign() {
    let app = spawn().await;
    app.create(&campaign("r")).await;
    let mut new = campaign("r");
    new["fences"] = json!([circle("store-9", 114.0679, LAT, 300.0)]);
    new["status"] = json!("paused");
    let reply = app.put("/v1/campaigns/r", &new).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    assert_eq!(reply.body["fences"][0]["id"], "store-9");
    let stored = app.get("/v1/campaigns/r").await.body;
    assert_eq!(stored["status"], "paused");
    assert_eq!(stored["fences"], new["fences"]);

    // The body may omit the id; the URL names the campaign.
    new.as_object_mut().unwrap().remove("id");
    assert_eq!(app.put("/v1/campaigns/r", &new).await.status, StatusCode::OK);
}

#[tokio::test]
async fn put_with_another_id_in_the_body_is_422_on_id() {
    let app = spawn().await;
    app.create(&campaign("a")).await;
    let reply = app.put("/v1/campaigns/a", &campaign("b")).await;
    reply.assert_error(422, "invalid_field");
    assert_eq!(reply.field(), Some("id"));
    assert_eq!(app.campaign_ids().await, ["a"]);
}

#[tokio::test]
async fn put_of_an_unknown_campaign_is_404() {
    let app = spawn().await;
    app.put("/v1/campaigns/nope", &campaign("nope")).await.assert_error(404, "not_found");
    assert!(app.campaign_ids().await.is_empty());
}

#[tokio::test]
async fn delete_answers_204_then_404_and_the_id_is_free_again() {
    let app = spawn().await;
    app.create(&campaign("d")).await;
    let reply = app.delete("/v1/campaigns/d").await;
    assert_eq!(reply.status, StatusCode::NO_CONTENT);
    assert!(reply.text.is_empty());
    app.get("/v1/campaigns/d").await.assert_error(404, "not_found");
    app.delete("/v1/campaigns/d").await.assert_error(404, "not_found");
    app.create(&campaign("d")).await;
}

#[tokio::test]
async fn unknown_ids_are_404_and_impossible_ones_422() {
    let app = spawn().await;
    app.get("/v1/campaigns/nope").await.assert_error(404, "not_found");
    app.get("/v1/campaigns/has%20space").await.assert_error(422, "invalid_field");
    // `..` as a path segment never reaches the server from an URL library; as a body id it is
    // refused like any id off the pattern.
    for id in [".", ".."] {
        let reply = app.post("/v1/campaigns", &campaign(id)).await;
        reply.assert_error(422, "invalid_field");
        assert_eq!(reply.field(), Some("id"));
    }
    app.get("/v1/campaigns/nope/stats").await.assert_error(404, "not_found");
}

#[tokio::test]
async fn stats_count_issued_and_redeemed() {
    let app = spawn().await;
    app.create(&campaign("s")).await;
    let fresh = app.get("/v1/campaigns/s/stats").await;
    assert_eq!(fresh.status, StatusCode::OK);
    assert_eq!((fresh.body["issued"].as_u64(), fresh.body["redeemed"].as_u64()), (Some(0), Some(0)));

    let t = t0();
    let reply = app.pings(&[inside("u1", t), inside("u2", t)]).await;
    assert_eq!(reply.events().len(), 2);
    let coupon = reply.events()[0]["coupon_id"].as_str().unwrap().to_owned();
    let redeemed = app.post(&format!("/v1/coupons/{coupon}/redeem"), &json!({"merchant_id": "m-1"})).await;
    assert_eq!(redeemed.status, StatusCode::OK, "{}", redeemed.text);

    let stats = app.get("/v1/campaigns/s/stats").await.body;
    assert_eq!((stats["issued"].as_u64(), stats["redeemed"].as_u64()), (Some(2), Some(1)), "{stats}");
}

#[tokio::test]
async fn a_coupon_whose_push_cannot_fit_4096_bytes_is_422_on_its_longest_field() {
    let app = spawn().await;
    let mut big = campaign("big");
    big["coupon"] = json!({"title": "t", "body": "b".repeat(1000), "deep_link": "d".repeat(3200)});
    let reply = app.post("/v1/campaigns", &big).await;
    reply.assert_error(422, "invalid_field");
    assert_eq!(reply.field(), Some("coupon.deep_link"));
    assert!(app.campaign_ids().await.is_empty());

    app.create(&campaign("big")).await;
    let reply = app.put("/v1/campaigns/big", &big).await;
    reply.assert_error(422, "invalid_field");
    assert_eq!(reply.field(), Some("coupon.deep_link"));
    // Each text well under the 4 096-character limit on its own, and together they fit.
    big["coupon"]["deep_link"] = json!("d".repeat(2000));
    assert_eq!(app.put("/v1/campaigns/big", &big).await.status, StatusCode::OK);
}
