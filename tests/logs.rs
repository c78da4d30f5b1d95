//! What `kabao serve --log-format json` writes: one JSON object per line, a `request` span with
//! the route template, status and latency, and nothing private — no user id in clear, no
//! coordinates at full precision, no token or secret — even at `debug` level.

mod support;

use std::process::Stdio;
use std::time::Duration;

use serde_json::{json, Value};
use support::{serve_command, Server};
use tokio::io::AsyncReadExt;

const ADMIN: &str = "logs-admin-token-4f1d";
const SECRET: &str = "logs-client-secret-9a7c";
const USER: &str = "phone-13800138000";
/// Coordinates with more digits than any log line may show.
const LAT: &str = "22.5431234";
const LON: &str = "114.0579876";

#[tokio::test]
async fn json_logs_carry_request_spans_and_nothing_private() {
    let Server { mut child, base } = Server::spawn(
        serve_command(ADMIN)
            .args(["--ephemeral", "--log-format", "json"])
            .env("KABAO_CLIENT_SECRET", SECRET)
            .env("RUST_LOG", "debug")
            .stderr(Stdio::piped()),
    )
    .await;
    let mut stderr = child.stderr.take().expect("stderr");

    let http = reqwest::Client::new();
    let campaign = json!({
        "id": "logs-coffee",
        "coupon": {"title": "Coffee"},
        "fences": [{"id": "shop", "type": "circle", "center": [114.0579, 22.5431], "radius_m": 200}],
        "trigger": {"on": "enter"}
    });
    let created = http.post(format!("{base}/v1/campaigns")).bearer_auth(ADMIN).json(&campaign).send().await.unwrap();
    assert_eq!(created.status(), 201, "{}", created.text().await.unwrap());
    const DEVICE_TOKEN: &str = "fcm-device-token-0b3e";
    let device = http
        .put(format!("{base}/v1/users/{USER}/devices/phone-1"))
        .bearer_auth(ADMIN)
        .json(&json!({"platform": "fcm", "token": DEVICE_TOKEN}))
        .send()
        .await
        .unwrap();
    assert!(device.status().is_success(), "{}", device.text().await.unwrap());
    let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
    let ping = format!(r#"{{"user_id": "{USER}", "ts_ms": {now_ms}, "lat": {LAT}, "lon": {LON}}}"#);
    let pinged = http
        .post(format!("{base}/v1/pings"))
        .bearer_auth(ADMIN)
        .header("content-type", "application/json")
        .body(ping)
        .send()
        .await
        .unwrap();
    assert_eq!(pinged.status(), 200);
    let reply: Value = pinged.json().await.unwrap();
    assert_eq!(reply["events"].as_array().map(Vec::len), Some(1), "{reply}");
    let wallet = http.get(format!("{base}/v1/users/{USER}/coupons")).bearer_auth(ADMIN).send().await.unwrap();
    assert_eq!(wallet.status(), 200);
    // The push of the coupon (the log provider) is written by the dispatcher shortly after.
    tokio::time::sleep(Duration::from_millis(500)).await;

    child.start_kill().unwrap();
    child.wait().await.unwrap();
    let mut logs = String::new();
    stderr.read_to_string(&mut logs).await.unwrap();

    let lines: Vec<Value> = logs
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}")))
        .collect();
    let wallet_read =
        lines.iter().find(|l| l["span"]["name"] == "request" && l["span"]["route"] == "/v1/users/{user_id}/coupons");
    let wallet_read = wallet_read.unwrap_or_else(|| panic!("no request line for the wallet read in:\n{logs}"));
    assert_eq!(wallet_read["span"]["method"], "GET");
    assert_eq!(wallet_read["span"]["status"], 200);
    assert!(wallet_read["span"]["latency_ms"].is_number(), "{wallet_read}");
    assert!(lines.iter().any(|l| l["fields"]["message"] == "push"), "the coupon's push is logged:\n{logs}");

    for private in [USER, "13800138000", LAT, LON, ADMIN, SECRET, DEVICE_TOKEN] {
        assert!(!logs.contains(private), "the logs show {private}:\n{logs}");
    }
}
