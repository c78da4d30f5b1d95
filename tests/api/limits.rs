//! Rate limits (API.md "Operations") and client JWT checks (issue 10) through the real server.

use reqwest::Method;
use serde_json::json;

use crate::helpers::*;

async fn ping_as(app: &TestApp, user: &str) -> Reply {
    app.call(Method::POST, "/v1/pings", Some(&jwt(user)), Some(&inside(user, t0()))).await
}

#[tokio::test]
async fn per_user_burst_then_429_with_retry_after_and_nothing_applied() {
    // 1 a second, burst 10.
    let app = spawn_with(|c| c.rate_limits.requests_per_user_per_s = 1.0).await;
    app.create(&campaign("c")).await;
    let t = t0();
    for i in 0..10 {
        let reply = app.call(Method::POST, "/v1/pings", Some(&jwt("u")), Some(&outside("u", t + i))).await;
        assert_eq!(reply.status, 200, "request {i}: {}", reply.text);
    }
    // Over the burst: refused whole, however good the request.
    let reply = app.call(Method::POST, "/v1/pings", Some(&jwt("u")), Some(&inside("u", t + 100))).await;
    reply.assert_error(429, "rate_limited");
    assert_eq!(reply.retry_after.as_deref(), Some("1"));
    assert!(app.wallet("u").await.is_empty(), "a refused request applies nothing");
    // Other users, the admin token and ops endpoints are not limited by u's bucket.
    assert_eq!(ping_as(&app, "v").await.status, 200);
    for _ in 0..30 {
        assert_eq!(app.post("/v1/pings", &outside("u", t + 200)).await.status, 200);
        assert_eq!(app.call(Method::GET, "/healthz", None, None).await.status, 200);
    }
}

#[tokio::test]
async fn zero_turns_a_limit_off() {
    let app = spawn_with(|c| {
        c.rate_limits.requests_per_user_per_s = 0.0;
        c.rate_limits.redeems_per_user_per_min = 0.0;
    })
    .await;
    for _ in 0..60 {
        assert_eq!(ping_as(&app, "u").await.status, 200);
        let body = json!({"merchant_id": "m"});
        let redeem = app.call(Method::POST, "/v1/coupons/cp_x/redeem", Some(&jwt("u")), Some(&body)).await;
        assert_eq!(redeem.status, 404);
    }
}

#[tokio::test]
async fn per_address_limits_every_caller_admin_included_but_not_ops() {
    let app = spawn_with(|c| c.rate_limits.requests_per_ip_per_s = 1.0).await;
    for i in 0..10 {
        let reply = if i % 2 == 0 { app.get("/v1/campaigns").await } else { ping_as(&app, &format!("u{i}")).await };
        assert_eq!(reply.status, 200, "{}", reply.text);
    }
    let reply = app.get("/v1/campaigns").await;
    reply.assert_error(429, "rate_limited");
    assert_eq!(reply.retry_after.as_deref(), Some("1"));
    ping_as(&app, "fresh-user").await.assert_error(429, "rate_limited");
    // Even a request without a token counts against the address.
    app.call(Method::GET, "/v1/campaigns", None, None).await.assert_error(429, "rate_limited");
    for path in ["/healthz", "/readyz", "/metrics", "/openapi.json"] {
        assert_eq!(app.call(Method::GET, path, None, None).await.status, 200, "{path}");
    }
}

#[tokio::test]
async fn redemption_attempts_per_user_per_minute() {
    // 2 a minute: a token every 30 s.
    let app = spawn_with(|c| c.rate_limits.redeems_per_user_per_min = 2.0).await;
    for _ in 0..2 {
        let reply = app
            .call(Method::POST, "/v1/coupons/cp_guess/redeem", Some(&jwt("u")), Some(&json!({"merchant_id": "m"})))
            .await;
        reply.assert_error(404, "not_found");
    }
    let reply = app
        .call(Method::POST, "/v1/coupons/cp_guess/redeem", Some(&jwt("u")), Some(&json!({"merchant_id": "m"})))
        .await;
    reply.assert_error(429, "rate_limited");
    assert_eq!(reply.retry_after.as_deref(), Some("30"));
    // Other requests of u, and another user's redemptions, go on.
    assert_eq!(ping_as(&app, "u").await.status, 200);
    let other = app
        .call(Method::POST, "/v1/coupons/cp_guess/redeem", Some(&jwt("v")), Some(&json!({"merchant_id": "m"})))
        .await;
    other.assert_error(404, "not_found");
    // The admin (a trusted gateway) is limited per address only.
    for _ in 0..5 {
        app.post("/v1/coupons/cp_guess/redeem", &json!({"merchant_id": "m"})).await.assert_error(404, "not_found");
    }
}

async fn wallet_with(app: &TestApp, token: String) -> Reply {
    app.call(Method::GET, "/v1/users/u/coupons", Some(&token), None).await
}

fn token(claims: serde_json::Value, secret: &str) -> String {
    use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
    encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(secret.as_bytes())).unwrap()
}

#[tokio::test]
async fn jwt_nbf_lifetime_audience_and_rotation() {
    let app = spawn_with(|c| {
        c.client_secret_previous = Some(kabao::config::Secret::new("old-secret"));
        c.jwt.max_lifetime_s = Some(3_600);
    })
    .await;
    let now = now_ms() / 1000;
    let wallet = |t: String| wallet_with(&app, t);
    let good = json!({"sub": "u", "iat": now, "exp": now + 600});
    assert_eq!(wallet(token(good.clone(), SECRET)).await.status, 200);
    assert_eq!(wallet(token(good.clone(), "old-secret")).await.status, 200, "the previous secret still verifies");
    // No audience configured: a token with one is accepted.
    assert_eq!(
        wallet(token(json!({"sub": "u", "iat": now, "exp": now + 600, "aud": "app"}), SECRET)).await.status,
        200
    );
    for refused in [
        json!({"sub": "u", "iat": now, "exp": now + 600, "nbf": now + 120}),
        json!({"sub": "u", "iat": now, "exp": now + 3_601}),
        json!({"sub": "u", "exp": now + 600}),
    ] {
        wallet(token(refused.clone(), SECRET)).await.assert_error(401, "unauthorized");
    }
    wallet(token(good, "a-third-secret")).await.assert_error(401, "unauthorized");
}

#[tokio::test]
async fn a_configured_audience_and_issuer_must_match() {
    let app = spawn_with(|c| {
        c.jwt.audience = Some("kabao-app".into());
        c.jwt.issuer = Some("https://id.example".into());
    })
    .await;
    let now = now_ms() / 1000;
    let wallet = |claims: serde_json::Value| wallet_with(&app, token(claims, SECRET));
    let base =
        |aud: serde_json::Value, iss: &str| json!({"sub": "u", "iat": now, "exp": now + 600, "aud": aud, "iss": iss});
    assert_eq!(wallet(base(json!("kabao-app"), "https://id.example")).await.status, 200);
    wallet(base(json!("other"), "https://id.example")).await.assert_error(401, "unauthorized");
    wallet(base(json!("kabao-app"), "https://evil.example")).await.assert_error(401, "unauthorized");
    wallet(json!({"sub": "u", "iat": now, "exp": now + 600})).await.assert_error(401, "unauthorized");
}
