//! Operations: health, readiness, metrics, OpenAPI, shedding, a store that goes away, shutdown.

use std::sync::atomic::Ordering;

use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::helpers::*;

#[tokio::test]
async fn healthz_and_readyz_need_no_token() {
    let app = spawn().await;
    assert_eq!(app.call(Method::GET, "/healthz", None, None).await.status, StatusCode::OK);
    assert_eq!(app.call(Method::GET, "/readyz", None, None).await.status, StatusCode::OK);
}

#[tokio::test]
async fn metrics_are_prometheus_text() {
    let app = spawn().await;
    app.create(&campaign("m")).await;
    app.ping(inside("u", t0())).await;
    let reply = app.call(Method::GET, "/metrics", None, None).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(reply.content_type.as_deref().is_some_and(|c| c.starts_with("text/plain")), "{:?}", reply.content_type);
    assert!(reply.text.contains("# TYPE"), "{}", reply.text);
    // Issue 9's list: requests, pings, per-ping match time, candidates, the index, the store.
    for name in [
        "kabao_http_requests_total",
        "kabao_http_request_duration_seconds",
        "kabao_pings_applied_total",
        "kabao_candidates_total",
        "kabao_index_fences",
        "kabao_index_campaigns",
        "kabao_index_build_duration_seconds",
        "kabao_index_built_timestamp_seconds",
        "kabao_store_call_duration_seconds",
    ] {
        assert!(reply.text.contains(&format!("# TYPE {name} ")), "{name} missing:\n{}", reply.text);
    }
}

#[tokio::test]
async fn every_route_is_in_the_openapi_document() {
    let app = spawn().await;
    let reply = app.call(Method::GET, "/openapi.json", None, None).await;
    assert_eq!(reply.status, StatusCode::OK);
    let doc = &reply.body;
    assert!(doc["openapi"].as_str().is_some_and(|v| v.starts_with('3')), "{doc}");
    let routes = [
        ("post", "/v1/campaigns"),
        ("get", "/v1/campaigns"),
        ("get", "/v1/campaigns/{id}"),
        ("put", "/v1/campaigns/{id}"),
        ("delete", "/v1/campaigns/{id}"),
        ("get", "/v1/campaigns/{id}/stats"),
        ("post", "/v1/pings"),
        ("put", "/v1/users/{user_id}/devices/{device_id}"),
        ("delete", "/v1/users/{user_id}/devices/{device_id}"),
        ("delete", "/v1/users/{user_id}"),
        ("get", "/v1/users/{user_id}/coupons"),
        ("post", "/v1/coupons/{coupon_id}/redeem"),
        ("get", "/v1/pushes/dead-letters"),
        ("get", "/healthz"),
        ("get", "/readyz"),
        ("get", "/metrics"),
        ("get", "/openapi.json"),
    ];
    for (method, path) in routes {
        assert!(doc["paths"][path][method].is_object(), "{method} {path} missing from /openapi.json");
    }
    let documented: usize = doc["paths"].as_object().unwrap().values().map(|p| p.as_object().unwrap().len()).sum();
    assert_eq!(documented, routes.len(), "a documented operation is not served, or the list is stale");
    // And each documented route is really served (not a 404 from the fallback).
    for (method, path) in routes {
        let concrete =
            path.replace("{id}", "x").replace("{user_id}", "u").replace("{device_id}", "d").replace("{coupon_id}", "c");
        let method = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
        let reply = app.call(method.clone(), &concrete, Some(ADMIN), Some(&json!({}))).await;
        assert_ne!(reply.status, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
        assert!(
            reply.status != StatusCode::NOT_FOUND || reply.body["error"]["message"] != "no such route",
            "{method} {path}"
        );
    }
}

#[tokio::test]
async fn a_full_server_sheds_with_429_and_retry_after_but_still_answers_probes() {
    // No permits at all: every API request is over the bound.
    let app = spawn_with(|c| c.http.max_in_flight = 0).await;
    let reply = app.post("/v1/pings", &inside("u", t0())).await;
    reply.assert_error(429, "overloaded");
    assert!(reply.retry_after.is_some());
    assert_eq!(app.get("/healthz").await.status, StatusCode::OK);
    assert_eq!(app.get("/readyz").await.status, StatusCode::OK);
}

#[tokio::test]
async fn campaign_writes_beyond_the_bound_are_shed_while_reads_go_on() {
    use tokio::io::AsyncWriteExt;
    let app = spawn().await;
    let addr = app.base.trim_start_matches("http://").to_owned();
    // Writers that announce a large body and send only its start hold their permits while the
    // server waits for the rest.
    let mut stalled = Vec::new();
    for _ in 0..kabao::http::CAMPAIGN_WRITES_IN_FLIGHT {
        let mut conn = tokio::net::TcpStream::connect(&addr).await.expect("connect");
        let head = format!(
            "POST /v1/campaigns HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {ADMIN}\r\n\
             content-type: application/json\r\ncontent-length: 1000000\r\n\r\n{{\"fences\": ["
        );
        conn.write_all(head.as_bytes()).await.expect("write");
        stalled.push(conn);
    }
    // The permits are taken once the server has read the requests' heads; poll for that
    // rather than sleep a fixed time.
    let mut shed = None;
    for _ in 0..200 {
        let reply = app.post("/v1/campaigns", &campaign("late")).await;
        if reply.status == StatusCode::TOO_MANY_REQUESTS {
            shed = Some(reply);
            break;
        }
        assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text);
        app.call(Method::DELETE, "/v1/campaigns/late", Some(ADMIN), None).await;
        tokio::task::yield_now().await;
    }
    let shed = shed.expect("a fifth concurrent campaign write is shed");
    shed.assert_error(429, "overloaded");
    assert!(shed.retry_after.is_some());
    assert_eq!(app.get("/v1/campaigns").await.status, StatusCode::OK);
    drop(stalled);
}

#[tokio::test]
async fn a_store_that_is_down_is_503_with_retry_after_and_nothing_half_applied() {
    let (store, down) = flaky_store();
    let app = spawn_over(|_| {}, store).await;
    app.create(&campaign("kept")).await;

    down.store(true, Ordering::SeqCst);
    let ready = app.get("/readyz").await;
    ready.assert_error(503, "unavailable");
    assert!(ready.retry_after.is_some());
    let create = app.post("/v1/campaigns", &campaign("lost")).await;
    create.assert_error(503, "unavailable");
    assert!(create.retry_after.is_some());
    assert!(!create.text.contains("test store is down"), "5xx bodies are opaque: {}", create.text);
    let t = t0();
    app.post("/v1/pings", &json!({"pings": [inside("u", t)]})).await.assert_error(503, "unavailable");

    down.store(false, Ordering::SeqCst);
    assert_eq!(app.get("/readyz").await.status, StatusCode::OK);
    assert_eq!(app.campaign_ids().await, ["kept"]);
    assert!(app.wallet("u").await.is_empty());
    // The failed ping left no trace: retrying it issues the coupon.
    assert_eq!(app.pings(&[inside("u", t)]).await.events().len(), 1);
}

#[tokio::test]
async fn shutdown_stops_serving() {
    let mut config = kabao::config::Config::for_tests(ADMIN, SECRET);
    config.shutdown_grace = std::time::Duration::from_secs(5);
    let app = kabao::app::Application::build(config).await.unwrap();
    let base = format!("http://127.0.0.1:{}", app.port());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(app.run_until_stopped(async move {
        let _ = stopped.await;
    }));
    let http = reqwest::Client::new();
    assert_eq!(http.get(format!("{base}/healthz")).send().await.unwrap().status(), 200);
    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
    assert!(reqwest::Client::new().get(format!("{base}/healthz")).send().await.is_err(), "no longer listening");
}

#[tokio::test]
async fn the_binary_prints_its_port_and_serves_with_env_config() {
    use tokio::io::{AsyncBufReadExt, BufReader};

    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_kabao"))
        .args(["serve", "--listen", "127.0.0.1:0", "--ephemeral"])
        .env("KABAO_ADMIN_TOKEN", "bin-admin")
        .env("KABAO_MAX_SPEED_MPS", "0")
        .env_remove("KABAO_LISTEN")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("kabao starts");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut base = None;
    while let Some(line) = lines.next_line().await.unwrap() {
        assert!(!line.contains("bin-admin"), "a configured token is never printed: {line}");
        if let Some(url) = line.strip_prefix("kabao listening on ") {
            base = Some(url.to_owned());
            break;
        }
    }
    let base = base.expect("a `kabao listening on URL` line");
    assert!(!base.ends_with(":0"), "{base}");
    let http = reqwest::Client::new();
    let reply = http.get(format!("{base}/v1/campaigns")).bearer_auth("bin-admin").send().await.unwrap();
    assert_eq!(reply.status(), StatusCode::OK);
    child.kill().await.unwrap();
}

#[tokio::test]
async fn the_binary_refuses_an_unreachable_redis_clearly() {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_kabao"))
        .args(["serve", "--listen", "127.0.0.1:0", "--redis-url", "redis://127.0.0.1:1"])
        .output()
        .await
        .expect("kabao runs");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("connecting to the Redis store"), "{stderr}");
}

/// `max_tracked_users`: past it, the longest idle users' trigger states are dropped, from the
/// store and from the node's cache, and counted.
#[tokio::test]
async fn over_max_tracked_users_the_longest_idle_are_dropped_and_counted() {
    let store = std::sync::Arc::new(kabao::store::memory::MemoryStore::with_max_user_states(10));
    let app = spawn_over(|c| c.engine.max_tracked_users = 10, store).await;
    app.create(&campaign("ceiling")).await;
    for k in 0..20 {
        assert_eq!(app.ping(inside(&format!("ceil-{k}"), t0() + k)).await.status, StatusCode::OK);
    }
    let dropped = |text: &str, from: &str| {
        let prefix = format!("kabao_tracked_users_dropped_total{{from=\"{from}\"}} ");
        text.lines().find_map(|l| l.strip_prefix(&prefix)).and_then(|v| v.trim().parse::<f64>().ok())
    };
    // The store drops at once; the node's cache within its next check (every second).
    let mut metrics = String::new();
    for _ in 0..50 {
        metrics = app.call(Method::GET, "/metrics", None, None).await.text;
        if dropped(&metrics, "node_cache").is_some() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(dropped(&metrics, "store").is_some_and(|n| n >= 10.0), "{metrics}");
    assert!(dropped(&metrics, "node_cache").is_some_and(|n| n >= 10.0), "{metrics}");
}
