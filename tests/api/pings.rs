//! `POST /v1/pings` and the trigger rules of API.md, end to end through HTTP. Each test lays its
//! pings on an event-time line starting at `t0()` (three hours ago).

use reqwest::StatusCode;
use serde_json::json;

use crate::helpers::*;

const S: i64 = 1000;
const MIN: i64 = 60 * S;

#[tokio::test]
async fn an_enter_issues_one_coupon_with_the_documented_event() {
    let app = spawn().await;
    app.create(&campaign("coffee")).await;
    let t = t0();
    let reply = app.pings(&[outside("u1", t), inside("u1", t + MIN)]).await;
    assert_eq!(reply.body["accepted"], 2);
    assert_eq!(reply.body["rejected"], json!([]));
    assert_eq!(reply.body["ignored"], json!([]));
    let events = reply.events();
    assert_eq!(events.len(), 1, "{}", reply.text);
    let e = &events[0];
    assert_eq!(e["type"], "coupon_issued");
    assert_eq!(e["user_id"], "u1");
    assert_eq!(e["campaign_id"], "coffee");
    assert_eq!(e["fence_id"], "store-1");
    assert_eq!(e["ts_ms"], t + MIN);
    assert_eq!(e["expires_at_ms"], t + MIN + 86_400 * S);
    assert_eq!(
        e["coupon"],
        json!({"title": "coffee coupon", "body": "Show this at the counter", "deep_link": "kabao://c",
               "image_url": "https://example.com/c.png"})
    );
    assert!(e["coupon_id"].as_str().is_some_and(|s| !s.is_empty()));

    // Staying inside is not another enter.
    let again = app.ping(inside("u1", t + 2 * MIN)).await;
    assert!(again.events().is_empty(), "{}", again.text);

    let wallet = app.wallet("u1").await;
    assert_eq!(wallet.len(), 1);
    assert_eq!(wallet[0]["coupon_id"], e["coupon_id"]);
    assert_eq!(wallet[0]["issued_at_ms"], t + MIN);
    assert_eq!(wallet[0]["status"], "issued");
}

#[tokio::test]
async fn a_first_ping_inside_is_an_enter_and_never_expiring_coupons_say_null() {
    let app = spawn().await;
    let mut c = campaign("forever");
    c["coupon"] = json!({"title": "forever"});
    app.create(&c).await;
    let reply = app.ping(inside("u1", t0())).await;
    assert_eq!(reply.body["accepted"], 1);
    let e = &reply.events()[0];
    assert!(e["expires_at_ms"].is_null() && e.get("expires_at_ms").is_some(), "{e}");
    assert_eq!(e["coupon"], json!({"title": "forever"}));
    assert!(app.wallet("u1").await[0]["expires_at_ms"].is_null());
}

#[tokio::test]
async fn a_polygon_fence_triggers_on_its_boundary_too() {
    let app = spawn().await;
    let mut c = campaign("poly");
    c["fences"] = json!([{"id": "mall", "type": "polygon",
        "coordinates": [[[114.05, 22.54], [114.06, 22.54], [114.06, 22.55], [114.05, 22.55], [114.05, 22.54]]]}]);
    app.create(&c).await;
    let t = t0();
    let reply = app
        .pings(&[ping("in", 22.545, 114.055, t), ping("edge", 22.54, 114.055, t), ping("out", 22.56, 114.055, t)])
        .await;
    let mut users: Vec<&str> = reply.events().iter().map(|e| e["user_id"].as_str().unwrap()).collect();
    users.sort();
    assert_eq!(users, ["edge", "in"]);
    assert!(reply.events().iter().all(|e| e["fence_id"] == "mall"));
}

#[tokio::test]
async fn dwell_issues_once_per_stay_after_dwell_s() {
    let app = spawn().await;
    let mut c = campaign("dwell");
    c["trigger"] = json!({"on": "dwell", "dwell_s": 120});
    app.create(&c).await;
    let t = t0();
    assert!(app.ping(inside("u", t)).await.events().is_empty());
    assert!(app.ping(inside("u", t + 119 * S)).await.events().is_empty());
    let due = app.ping(inside("u", t + 120 * S)).await;
    assert_eq!(due.events().len(), 1, "{}", due.text);
    assert!(app.ping(inside("u", t + 300 * S)).await.events().is_empty(), "once per stay");
    // Exit, re-enter: a new stay dwells again.
    app.ping(outside("u", t + 400 * S)).await;
    assert!(app.ping(inside("u", t + 500 * S)).await.events().is_empty());
    assert_eq!(app.ping(inside("u", t + 620 * S)).await.events().len(), 1);
}

#[tokio::test]
async fn dwell_zero_makes_the_enter_the_candidate() {
    let app = spawn().await;
    let mut c = campaign("dwell0");
    c["trigger"] = json!({"on": "dwell", "dwell_s": 0});
    app.create(&c).await;
    assert_eq!(app.ping(inside("u", t0())).await.events().len(), 1);
}

#[tokio::test]
async fn exit_and_re_enter_issue_again_without_caps() {
    let app = spawn().await;
    app.create(&campaign("again")).await;
    let t = t0();
    let reply = app.pings(&[inside("u", t), outside("u", t + MIN), inside("u", t + 2 * MIN)]).await;
    assert_eq!(reply.events().len(), 2, "{}", reply.text);
    assert_eq!(app.wallet("u").await.len(), 2);
}

#[tokio::test]
async fn a_gap_over_state_ttl_forgets_the_stay() {
    let app = spawn_with(|c| c.engine.state_ttl_s = 600).await;
    app.create(&campaign("ttl")).await;
    let t = t0();
    assert_eq!(app.ping(inside("u", t)).await.events().len(), 1);
    // Exactly state_ttl_s later the stay is still remembered…
    assert!(app.ping(inside("u", t + 600 * S)).await.events().is_empty());
    // …more than state_ttl_s later it is forgotten: a new enter.
    assert_eq!(app.ping(inside("u", t + 1201 * S)).await.events().len(), 1);
}

#[tokio::test]
async fn pings_are_applied_in_ts_order_whatever_the_array_order() {
    let app = spawn().await;
    app.create(&campaign("order")).await;
    let t = t0();
    // In ts order: outside, inside (enter), outside. Sent backwards.
    let reply = app.pings(&[outside("u", t + 2 * MIN), inside("u", t + MIN), outside("u", t)]).await;
    assert_eq!(reply.events().len(), 1, "{}", reply.text);
    assert_eq!(reply.events()[0]["ts_ms"], t + MIN);
    assert!(reply.ignored().is_empty());
}

#[tokio::test]
async fn stale_pings_are_ignored_and_equal_ts_is_applied() {
    let app = spawn().await;
    app.create(&campaign("stale")).await;
    let t = t0();
    app.ping(outside("u", t + MIN)).await;
    let stale = app.ping(inside("u", t)).await;
    assert_eq!(stale.ignored(), [(0, "stale".to_owned())]);
    assert_eq!(stale.body["accepted"], 1, "ignored pings are accepted");
    assert!(stale.events().is_empty());
    // Same ts as the newest applied ping: applied, not stale.
    let equal = app.ping(outside("u", t + MIN)).await;
    assert!(equal.ignored().is_empty(), "{}", equal.text);
    // The stale ping left no stay behind: the next inside ping is the enter.
    assert_eq!(app.ping(inside("u", t + 2 * MIN)).await.events().len(), 1);
}

#[tokio::test]
async fn an_identical_retry_issues_nothing_twice() {
    let app = spawn().await;
    app.create(&campaign("retry")).await;
    let t = t0();
    let batch = [outside("u", t), inside("u", t + MIN)];
    let first = app.pings(&batch).await;
    assert_eq!(first.events().len(), 1);
    let second = app.pings(&batch).await;
    assert!(second.events().is_empty(), "{}", second.text);
    assert_eq!(app.wallet("u").await.len(), 1);
}

#[tokio::test]
async fn mocked_pings_are_ignored() {
    let app = spawn().await;
    app.create(&campaign("mock")).await;
    let mut p = inside("u", t0());
    p["mocked"] = json!(true);
    let reply = app.ping(p).await;
    assert_eq!(reply.ignored(), [(0, "mocked".to_owned())]);
    assert!(reply.events().is_empty());
    assert!(app.wallet("u").await.is_empty());
}

#[tokio::test]
async fn inaccurate_pings_are_ignored_and_the_limit_itself_is_accurate() {
    let app = spawn().await;
    app.create(&campaign("acc")).await;
    let t = t0();
    let mut bad = inside("u", t);
    bad["accuracy_m"] = json!(100.5);
    let mut ok = inside("v", t);
    ok["accuracy_m"] = json!(100.0);
    let reply = app.pings(&[bad, ok]).await;
    assert_eq!(reply.ignored(), [(0, "inaccurate".to_owned())]);
    assert_eq!(event_campaigns(&reply), ["acc"]);
    assert_eq!(reply.events()[0]["user_id"], "v");
}

#[tokio::test]
async fn the_global_accuracy_limit_is_configurable() {
    let app = spawn_with(|c| c.engine.max_accuracy_m = 10.0).await;
    app.create(&campaign("acc")).await;
    let mut p = inside("u", t0());
    p["accuracy_m"] = json!(12.0);
    assert_eq!(app.ping(p).await.ignored(), [(0, "inaccurate".to_owned())]);
}

#[tokio::test]
async fn a_campaign_accuracy_limit_skips_only_that_campaign() {
    let app = spawn().await;
    let mut strict = campaign("strict");
    strict["max_accuracy_m"] = json!(20);
    app.create(&strict).await;
    app.create(&campaign("lenient")).await;
    let t = t0();
    let mut p = inside("u", t);
    p["accuracy_m"] = json!(50.0);
    let reply = app.ping(p).await;
    assert!(reply.ignored().is_empty(), "applied: only over the campaign's limit");
    assert_eq!(event_campaigns(&reply), ["lenient"]);
    // An accurate ping later is the enter of the strict campaign (its stays were untouched).
    let mut good = inside("u", t + MIN);
    good["accuracy_m"] = json!(5.0);
    assert_eq!(event_campaigns(&app.ping(good).await), ["strict"]);
}

#[tokio::test]
async fn implausible_speed_is_ignored_and_changes_no_state() {
    let app = spawn().await;
    app.create(&campaign("speed")).await;
    let t = t0();
    app.ping(outside("u", t)).await;
    // 1.1 km in one second: 1 100 m/s.
    let jump = app.ping(inside("u", t + S)).await;
    assert_eq!(jump.ignored(), [(0, "implausible_speed".to_owned())]);
    assert!(jump.events().is_empty());
    // Measured from the last applied ping (the outside one), 60 s later is plausible.
    let walk = app.ping(inside("u", t + MIN)).await;
    assert!(walk.ignored().is_empty(), "{}", walk.text);
    assert_eq!(walk.events().len(), 1);
}

#[tokio::test]
async fn the_speed_check_is_skipped_after_state_ttl_and_off_at_zero() {
    let app = spawn_with(|c| c.engine.state_ttl_s = 60).await;
    app.create(&campaign("speed")).await;
    let t = t0();
    app.ping(ping("u", -33.0, 151.0, t)).await;
    // Sydney to Shenzhen in 61 s: a gap over state_ttl_s skips rule 0.
    assert_eq!(app.ping(inside("u", t + 61 * S)).await.events().len(), 1);

    let off = spawn_with(|c| c.engine.max_speed_mps = 0.0).await;
    off.create(&campaign("speed")).await;
    off.ping(outside("u", t)).await;
    assert_eq!(off.ping(inside("u", t + S)).await.events().len(), 1);
}

#[tokio::test]
async fn several_reasons_report_the_first_of_stale_mocked_inaccurate_speed() {
    let app = spawn().await;
    let t = t0();
    app.ping(outside("u", t + MIN)).await;
    let mut p = inside("u", t);
    p["mocked"] = json!(true);
    p["accuracy_m"] = json!(1000.0);
    let mut q = inside("u", t + MIN + S);
    q["mocked"] = json!(true);
    q["accuracy_m"] = json!(1000.0);
    let mut r = inside("u", t + MIN + S);
    r["accuracy_m"] = json!(1000.0);
    let reply = app.pings(&[p, q, r]).await;
    assert_eq!(reply.ignored(), [(0, "stale".to_owned()), (1, "mocked".to_owned()), (2, "inaccurate".to_owned())]);
}

#[tokio::test]
async fn cooldown_blocks_until_it_has_passed() {
    let app = spawn().await;
    let mut c = campaign("cool");
    c["caps"] = json!({"per_user_cooldown_s": 600});
    app.create(&c).await;
    let t = t0();
    assert_eq!(app.ping(inside("u", t)).await.events().len(), 1);
    app.ping(outside("u", t + MIN)).await;
    assert!(app.ping(inside("u", t + 2 * MIN)).await.events().is_empty(), "inside the cooldown");
    app.ping(outside("u", t + 5 * MIN)).await;
    // Exactly per_user_cooldown_s after the last coupon: allowed.
    assert_eq!(app.ping(inside("u", t + 10 * MIN)).await.events().len(), 1);
}

#[tokio::test]
async fn per_user_max_counts_every_coupon_ever() {
    let app = spawn().await;
    let mut c = campaign("once");
    c["caps"] = json!({"per_user_max": 1});
    app.create(&c).await;
    let t = t0();
    let reply = app.pings(&[inside("u", t), outside("u", t + MIN), inside("u", t + 2 * MIN)]).await;
    assert_eq!(reply.events().len(), 1);
    // Another user still gets theirs.
    assert_eq!(app.ping(inside("v", t)).await.events().len(), 1);
}

#[tokio::test]
async fn total_max_caps_the_campaign() {
    let app = spawn().await;
    let mut c = campaign("few");
    c["caps"] = json!({"total_max": 2});
    app.create(&c).await;
    let t = t0();
    let reply = app.pings(&[inside("a", t), inside("b", t), inside("c", t)]).await;
    assert_eq!(reply.events().len(), 2);
    let stats = app.get("/v1/campaigns/few/stats").await.body;
    assert_eq!(stats["issued"], 2);
}

#[tokio::test]
async fn the_daily_cap_takes_campaigns_in_ascending_id_order() {
    let app = spawn_with(|c| c.engine.max_coupons_per_user_per_day = 2).await;
    for id in ["c-c", "c-a", "c-b"] {
        app.create(&campaign(id)).await;
    }
    let t = t0();
    let reply = app.ping(inside("u", t)).await;
    assert_eq!(event_campaigns(&reply), ["c-a", "c-b"]);
    // The cap holds over the next 24 h.
    app.create(&campaign("c-0")).await;
    app.ping(outside("u", t + MIN)).await;
    assert!(app.ping(inside("u", t + 2 * MIN)).await.events().is_empty());
}

#[tokio::test]
async fn a_daily_cap_of_zero_is_unlimited() {
    let app = spawn_with(|c| c.engine.max_coupons_per_user_per_day = 0).await;
    for i in 0..12 {
        app.create(&campaign(&format!("c-{i:02}"))).await;
    }
    assert_eq!(app.ping(inside("u", t0())).await.events().len(), 12);
}

#[tokio::test]
async fn the_default_daily_cap_is_ten() {
    let app = spawn().await;
    for i in 0..12 {
        app.create(&campaign(&format!("c-{i:02}"))).await;
    }
    let reply = app.ping(inside("u", t0())).await;
    let expected: Vec<String> = (0..10).map(|i| format!("c-{i:02}")).collect();
    assert_eq!(event_campaigns(&reply), expected);
}

fn hhmm(minutes: i64) -> String {
    format!("{:02}:{:02}", minutes / 60, minutes % 60)
}

#[tokio::test]
async fn schedule_window_and_hours_are_checked_at_the_ping_time() {
    let app = spawn().await;
    let t = t0();
    let hour = (t / 3_600_000) % 24;
    let open_to = if hour == 23 { "24:00".to_owned() } else { hhmm((hour + 1) * 60) };
    let mut open = campaign("open");
    open["schedule"] = json!({"timezone": "UTC", "hours": [{"from": hhmm(hour * 60), "to": open_to}]});
    let mut closed = campaign("closed");
    closed["schedule"] = json!({"timezone": "UTC", "hours": [{"from": hhmm(((hour + 2) % 24) * 60), "to": hhmm(((hour + 3) % 24) * 60)}]});
    let mut ended = campaign("ended");
    ended["schedule"] = json!({"starts_at_ms": 0, "ends_at_ms": t});
    let mut later = campaign("later");
    later["schedule"] = json!({"starts_at_ms": t + 1});
    let mut window = campaign("window");
    window["schedule"] = json!({"starts_at_ms": t, "ends_at_ms": t + 1});
    for c in [&open, &closed, &ended, &later, &window] {
        app.create(c).await;
    }
    assert_eq!(event_campaigns(&app.ping(inside("u", t)).await), ["open", "window"]);
}

#[tokio::test]
async fn paused_campaigns_issue_nothing() {
    let app = spawn().await;
    let mut c = campaign("paused");
    c["status"] = json!("paused");
    app.create(&c).await;
    assert!(app.ping(inside("u", t0())).await.events().is_empty());
}

#[tokio::test]
async fn audience_matches_the_tags_of_the_users_devices() {
    let app = spawn().await;
    let mut c = campaign("vip");
    c["audience"] = json!({"tags_any": ["vip", "gold"]});
    app.create(&c).await;
    app.device("tagged", "phone", &["gold"]).await;
    app.device("plain", "phone", &["basic"]).await;
    let t = t0();
    let reply = app.pings(&[inside("tagged", t), inside("plain", t), inside("nodevice", t)]).await;
    let users: Vec<&str> = reply.events().iter().map(|e| e["user_id"].as_str().unwrap()).collect();
    assert_eq!(users, ["tagged"]);
}

#[tokio::test]
async fn one_coupon_per_campaign_per_ping_naming_the_nearest_fence() {
    let app = spawn().await;
    let mut c = campaign("multi");
    // Three overlapping fences contain the ping; "b-near" is centred on it.
    c["fences"] = json!([
        circle("a-far", LON + 0.001, LAT, 500.0),
        circle("b-near", LON, LAT, 150.0),
        circle("c-mid", LON, LAT + 0.0005, 500.0),
    ]);
    app.create(&c).await;
    let reply = app.ping(inside("u", t0())).await;
    assert_eq!(reply.events().len(), 1, "{}", reply.text);
    assert_eq!(reply.events()[0]["fence_id"], "b-near");
}

#[tokio::test]
async fn put_forgets_stays_and_delete_stops_issuing() {
    let app = spawn().await;
    app.create(&campaign("p")).await;
    let t = t0();
    assert_eq!(app.ping(inside("u", t)).await.events().len(), 1);
    assert_eq!(app.put("/v1/campaigns/p", &campaign("p")).await.status, StatusCode::OK);
    // The stay was forgotten with the replaced campaign: still inside counts as a new enter.
    assert_eq!(app.ping(inside("u", t + MIN)).await.events().len(), 1);
    assert_eq!(app.delete("/v1/campaigns/p").await.status, StatusCode::NO_CONTENT);
    app.ping(outside("u", t + 2 * MIN)).await;
    assert!(app.ping(inside("u", t + 3 * MIN)).await.events().is_empty());
    // Coupons stay in the wallet after the campaign is gone.
    assert_eq!(app.wallet("u").await.len(), 2);
}

#[tokio::test]
async fn a_batch_processes_its_good_items_and_reports_the_bad_by_index() {
    let app = spawn().await;
    app.create(&campaign("b")).await;
    let t = t0();
    let batch = json!({"pings": [
        inside("u1", t),
        {"user_id": "u2", "lat": "north", "lon": LON},
        {"user_id": "u3", "lat": 95.0, "lon": LON},
        {"user_id": "u4", "lat": LAT, "lon": LON, "ts_ms": t - 2 * 86_400_000},
        inside("u5", t),
    ]});
    let reply = app.post("/v1/pings", &batch).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    assert_eq!(reply.body["accepted"], 2);
    let rejected = reply.body["rejected"].as_array().unwrap();
    let summary: Vec<(u64, &str, Option<&str>)> = rejected
        .iter()
        .map(|r| (r["index"].as_u64().unwrap(), r["error"]["code"].as_str().unwrap(), r["error"]["field"].as_str()))
        .collect();
    assert_eq!(summary[0].0, 1);
    assert_eq!(summary[0].1, "malformed_json");
    assert_eq!(summary[1], (2, "invalid_field", Some("pings[2].lat")));
    assert_eq!(summary[2], (3, "invalid_field", Some("pings[3].ts_ms")));
    assert!(rejected.iter().all(|r| r["error"]["message"].as_str().is_some()));
    let mut users: Vec<&str> = reply.events().iter().map(|e| e["user_id"].as_str().unwrap()).collect();
    users.sort();
    assert_eq!(users, ["u1", "u5"]);
    // Ignored indexes refer to the request's array, past the rejected items.
    let mut mocked = inside("u6", t);
    mocked["mocked"] = json!(true);
    let reply = app.post("/v1/pings", &json!({"pings": [{"lat": 1}, mocked]})).await;
    assert_eq!(reply.ignored(), [(1, "mocked".to_owned())]);
}

#[tokio::test]
async fn a_single_invalid_ping_is_an_error_reply() {
    let app = spawn().await;
    let reply = app.post("/v1/pings", &json!({"user_id": "u", "lat": 91, "lon": 0})).await;
    reply.assert_error(422, "invalid_field");
    assert_eq!(reply.field(), Some("lat"));
    app.post("/v1/pings", &json!({"user_id": "u", "lat": "x", "lon": 0})).await.assert_error(400, "malformed_json");
    let future = app.post("/v1/pings", &json!({"user_id": "u", "lat": 0, "lon": 0, "ts_ms": now_ms() + 120_000})).await;
    future.assert_error(422, "invalid_field");
    assert_eq!(future.field(), Some("ts_ms"));
}

#[tokio::test]
async fn an_absent_ts_is_the_server_clock() {
    let app = spawn().await;
    app.create(&campaign("now")).await;
    let before = now_ms();
    let reply = app.ping(json!({"user_id": "u", "lat": LAT, "lon": LON})).await;
    let ts = reply.events()[0]["ts_ms"].as_i64().unwrap();
    assert!(ts >= before && ts <= now_ms(), "{ts}");
}

#[tokio::test]
async fn batches_hold_at_most_ten_thousand_pings() {
    let app = spawn().await;
    let t = t0();
    let pings: Vec<_> = (0..10_000).map(|i| outside(&format!("u{}", i % 100), t + i)).collect();
    let reply = app.post("/v1/pings", &json!({"pings": pings})).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    assert_eq!(reply.body["accepted"], 10_000);

    let too_many: Vec<_> = (0..10_001).map(|_| json!({})).collect();
    let reply = app.post("/v1/pings", &json!({"pings": too_many})).await;
    reply.assert_error(422, "invalid_field");
    assert_eq!(reply.field(), Some("pings"));
}

#[tokio::test]
async fn an_empty_batch_is_fine() {
    let app = spawn().await;
    let reply = app.pings(&[]).await;
    assert_eq!(reply.body, json!({"accepted": 0, "rejected": [], "ignored": [], "events": []}));
}
