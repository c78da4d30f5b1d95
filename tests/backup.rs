//! A backup of the running embedded store: `kill -USR1` makes the real `kabao serve` write a
//! consistent copy of its data into `<data dir>/backups/<time>/`, and a server started on that
//! copy holds what was written before the signal and nothing written after it.

mod support;

use std::process::Stdio;

use reqwest::StatusCode;
use serde_json::{json, Value};
use support::{eventually, scratch_dir, serve_command, Server};
use tokio::io::{AsyncBufReadExt, BufReader};

const ADMIN: &str = "backup-admin";

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64
}

/// Coupons issued by a ping of `user` inside the shop at `ts_ms` (the enter trigger: one on
/// entering, none while the user stays).
async fn coupons_inside(http: &reqwest::Client, base: &str, user: &str, ts_ms: i64) -> usize {
    let ping = json!({"user_id": user, "lat": 22.5431, "lon": 114.0579, "ts_ms": ts_ms});
    let reply = http.post(format!("{base}/v1/pings")).bearer_auth(ADMIN).json(&ping).send().await.unwrap();
    let reply: Value = reply.json().await.unwrap();
    reply["events"].as_array().map(Vec::len).unwrap_or_else(|| panic!("no events in {reply}"))
}

/// `user` enters the shop and gets its coupon.
async fn enter(http: &reqwest::Client, base: &str, user: &str) {
    assert_eq!(coupons_inside(http, base, user, now_ms() - 1_000).await, 1, "{user} enters");
}

async fn wallet_len(http: &reqwest::Client, base: &str, user: &str) -> usize {
    let reply = http.get(format!("{base}/v1/users/{user}/coupons")).bearer_auth(ADMIN).send().await.unwrap();
    assert_eq!(reply.status(), StatusCode::OK);
    reply.json::<Value>().await.unwrap()["coupons"].as_array().unwrap().len()
}

#[tokio::test]
async fn sigusr1_writes_a_backup_that_serves_what_was_there_at_the_signal() {
    let data_dir = scratch_dir("backup");
    let mut command = serve_command(ADMIN);
    command.arg("--data-dir").arg(&data_dir).stderr(Stdio::piped());
    let mut server = Server::spawn(&mut command).await;
    let mut log = BufReader::new(server.child.stderr.take().unwrap()).lines();
    let http = reqwest::Client::new();

    let campaign = json!({
        "id": "shop", "coupon": {"title": "10% off", "valid_for_s": 86400},
        "fences": [{"id": "door", "type": "circle", "center": [114.0579, 22.5431], "radius_m": 100}],
    });
    let reply = http.post(format!("{}/v1/campaigns", server.base)).bearer_auth(ADMIN).json(&campaign).send().await;
    assert_eq!(reply.unwrap().status(), StatusCode::CREATED);
    enter(&http, &server.base, "before").await;

    let pid = server.child.id().unwrap().to_string();
    assert!(std::process::Command::new("kill").args(["-USR1", &pid]).status().unwrap().success());
    let backup = loop {
        let line = log.next_line().await.unwrap().expect("kabao logs the backup before it exits");
        assert!(!line.contains("backup failed"), "{line}");
        if line.contains("backup written") {
            let path = line.split_whitespace().find_map(|w| w.strip_prefix("path=")).expect("the backup's path");
            break std::path::PathBuf::from(path);
        }
    };
    assert!(backup.starts_with(data_dir.join("backups")), "{}", backup.display());
    // Written after the backup: the live store has it, the backup must not.
    enter(&http, &server.base, "after").await;
    assert_eq!(wallet_len(&http, &server.base, "after").await, 1);
    server.child.kill().await.unwrap();

    let restored = Server::spawn(serve_command(ADMIN).arg("--data-dir").arg(&backup)).await;
    let ready = eventually("the restored server to be ready", || async {
        let r = http.get(format!("{}/readyz", restored.base)).send().await.ok()?;
        (r.status() == StatusCode::OK).then_some(())
    });
    ready.await;
    let reply = http.get(format!("{}/v1/campaigns/shop", restored.base)).bearer_auth(ADMIN).send().await.unwrap();
    assert_eq!(reply.status(), StatusCode::OK);
    assert_eq!(wallet_len(&http, &restored.base, "before").await, 1);
    assert_eq!(wallet_len(&http, &restored.base, "after").await, 0);
    // And the restored store goes on: the user who entered before does not get a second coupon.
    assert_eq!(coupons_inside(&http, &restored.base, "before", now_ms()).await, 0, "the stay was restored");
    let _ = std::fs::remove_dir_all(&data_dir);
}
