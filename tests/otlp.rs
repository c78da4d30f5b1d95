//! `kabao serve --otlp-endpoint URL` exports its request spans over OTLP/HTTP (protobuf): a
//! receiver in the test takes `POST /v1/traces`, decodes what arrives, and checks that the spans
//! carry the route, status, latency and the user's hash, that the last ones are flushed by a
//! graceful shutdown, and that nothing private (user id, coordinates, tokens) is in the bytes.

mod support;

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use axum::Router;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use parking_lot::Mutex;
use prost::Message;
use serde_json::json;
use support::{serve_command, Server};

const ADMIN: &str = "otlp-admin-token-7c21";
const SECRET: &str = "otlp-client-secret-e3a9";
const USER: &str = "phone-13900139000";
/// Coordinates with more digits than any span may show.
const LAT: &str = "22.5431234";
const LON: &str = "114.0579876";

/// Every body posted to the receiver's `/v1/traces`.
type Received = Arc<Mutex<Vec<Bytes>>>;

/// An OTLP/HTTP receiver on a free port: keeps the bodies, answers an empty
/// `ExportTraceServiceResponse`.
async fn receiver() -> (String, Received) {
    let received = Received::default();
    let app = Router::new()
        .route(
            "/v1/traces",
            post(|State(received): State<Received>, body: Bytes| async move {
                received.lock().push(body);
                (StatusCode::OK, [("content-type", "application/x-protobuf")], Vec::<u8>::new())
            }),
        )
        .with_state(received.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, received)
}

fn attribute<'a>(span: &'a Span, key: &str) -> Option<&'a AnyValue> {
    span.attributes.iter().find(|kv: &&KeyValue| kv.key == key).and_then(|kv| kv.value.as_ref()?.value.as_ref())
}

fn text<'a>(span: &'a Span, key: &str) -> Option<&'a str> {
    match attribute(span, key)? {
        AnyValue::StringValue(s) => Some(s),
        _ => None,
    }
}

#[tokio::test]
async fn request_spans_are_exported_over_otlp_and_flushed_at_shutdown() {
    let (collector, received) = receiver().await;
    let Server { mut child, base } = Server::spawn(
        serve_command(ADMIN)
            .args(["--ephemeral", "--otlp-endpoint", &collector])
            .env("KABAO_CLIENT_SECRET", SECRET)
            // The spans go out whatever the log level.
            .env("RUST_LOG", "error"),
    )
    .await;

    let http = reqwest::Client::new();
    let now_s = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    let jwt = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &json!({"sub": USER, "iat": now_s, "exp": now_s + 600}),
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    let ping = format!(r#"{{"user_id": "{USER}", "ts_ms": {}, "lat": {LAT}, "lon": {LON}}}"#, now_s * 1000);
    let pinged = http
        .post(format!("{base}/v1/pings"))
        .bearer_auth(&jwt)
        .header("content-type", "application/json")
        .body(ping)
        .send()
        .await
        .unwrap();
    assert_eq!(pinged.status(), 200, "{}", pinged.text().await.unwrap());
    let wallet = http.get(format!("{base}/v1/users/{USER}/coupons")).bearer_auth(ADMIN).send().await.unwrap();
    assert_eq!(wallet.status(), 200);

    // A graceful stop (SIGTERM), which must flush the spans still batched.
    let pid = child.id().expect("kabao runs").to_string();
    let killed = std::process::Command::new("kill").args(["-TERM", &pid]).status().expect("kill runs");
    assert!(killed.success());
    let status = child.wait().await.unwrap();
    assert!(status.success(), "kabao exited with {status}");

    let bodies = received.lock().clone();
    assert!(!bodies.is_empty(), "no OTLP export arrived");
    let mut spans = Vec::new();
    for body in &bodies {
        let request = ExportTraceServiceRequest::decode(body.as_ref()).expect("an OTLP protobuf body");
        for resource in request.resource_spans {
            let attributes = resource.resource.map(|r| r.attributes).unwrap_or_default();
            let service = attributes.iter().find(|kv| kv.key == "service.name").and_then(|kv| kv.value.clone());
            assert_eq!(
                service.and_then(|v| v.value),
                Some(AnyValue::StringValue("kabao".into())),
                "the resource names the service"
            );
            assert!(attributes.iter().any(|kv| kv.key == "service.version"), "the resource has the version");
            spans.extend(resource.scope_spans.into_iter().flat_map(|s| s.spans));
        }
    }
    let request = |route: &str| {
        spans.iter().find(|s| s.name == "request" && text(s, "route") == Some(route)).unwrap_or_else(|| {
            panic!("no request span for {route} in {:?}", spans.iter().map(|s| &s.name).collect::<Vec<_>>())
        })
    };
    let ping = request("/v1/pings");
    assert_eq!(text(ping, "method"), Some("POST"));
    assert_eq!(attribute(ping, "status"), Some(&AnyValue::IntValue(200)));
    assert!(matches!(attribute(ping, "latency_ms"), Some(AnyValue::DoubleValue(ms)) if *ms >= 0.0), "{ping:?}");
    let hash = text(ping, "user_hash").expect("the ping's span names its user by hash");
    assert_eq!(hash.len(), 16);
    let wallet = request("/v1/users/{user_id}/coupons");
    assert_eq!(text(wallet, "user_hash"), Some(hash), "the path's user hashes alike");
    assert!(ping.end_time_unix_nano >= ping.start_time_unix_nano);

    for private in [USER, "13900139000", LAT, LON, ADMIN, SECRET, jwt.as_str()] {
        for body in &bodies {
            assert!(!body.windows(private.len()).any(|w| w == private.as_bytes()), "the exported spans hold {private}");
        }
    }
}
