//! The store contract as an executable suite: what every [`Store`] implementation must do, written
//! once and run against each (the in-memory store in its unit tests, the Redis store in its own).
//!
//! Entry point: [`store_contract_suite`], given a fresh, empty store. Each section is also public,
//! so an implementation can run them one by one; sections use disjoint ids, so they may share one
//! store. Failures panic with a message naming the rule, as test assertions do; this module is
//! test support, not part of the service.

use std::sync::Arc;

use crate::domain::{Campaign, CampaignDoc, CampaignId, Caps, CouponId, DeviceId, FenceId, UserId};

use super::{
    CampaignChange, Device, IssueCandidate, IssueOutcome, IssueRequest, IssuedCoupon, OutboxEntry, Platform,
    ProviderToken, PushFinal, RedeemError, Store, StoreError, UserCommit, UserCommitResult, UserStateRecord,
};

/// A ping time well inside any plausible window.
const T: i64 = 1_700_000_000_000;
const HOUR: i64 = 3_600_000;

/// Runs every section against `store`, which must start empty.
pub async fn store_contract_suite(store: Arc<dyn Store>) {
    store.health().await.expect("a fresh store is healthy");
    campaigns_crud(&store).await;
    stats_and_id_reuse(&store).await;
    devices(&store).await;
    issue_dedup(&store).await;
    issue_audience(&store).await;
    issue_cooldown(&store).await;
    issue_per_user_max(&store).await;
    issue_total_max(&store).await;
    issue_daily_cap(&store).await;
    wallet_and_coupon(&store).await;
    redeem(&store).await;
    outbox(&store).await;
    push_outcomes(&store).await;
    user_states(&store).await;
    commit_decides_in_event_time(&store).await;
    campaign_feed(&store).await;
    erase_user(&store).await;
    concurrent_issue_never_breaks_a_cap(&store).await;
    campaigns_read_back_whole(&store).await;
    provider_tokens(&store).await;
}

/// The contract as tests, for a store's own test module: the whole suite on one store, then one
/// test per section on a fresh store each (so a failure names its section). `$open` is an async
/// fn returning `(Arc<dyn Store>, guard)`; the guard (a temporary directory, a `redis-server`)
/// lives as long as the test. The list of sections is kept here once, beside the suite.
#[doc(hidden)]
#[macro_export]
macro_rules! store_contract_tests {
    ($open:path) => {
        $crate::store_contract_tests!(@sections $open; campaigns_crud, stats_and_id_reuse, devices, issue_dedup, issue_audience, issue_cooldown, issue_per_user_max, issue_total_max, issue_daily_cap, wallet_and_coupon, redeem, outbox, push_outcomes, user_states, commit_decides_in_event_time, campaign_feed, erase_user, concurrent_issue_never_breaks_a_cap, campaigns_read_back_whole, provider_tokens);
    };
    (@sections $open:path; $($section:ident),*) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn passes_the_whole_contract_suite_on_one_store() {
            let (store, _guard) = $open().await;
            $crate::store::contract::store_contract_suite(store).await;
        }
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $section() {
                let (store, _guard) = $open().await;
                $crate::store::contract::$section(&store).await;
            }
        )*
    };
}

fn uid(s: &str) -> UserId {
    UserId::parse("user_id", s).expect("valid user id")
}

fn cid(s: &str) -> CampaignId {
    CampaignId::parse("id", s).expect("valid campaign id")
}

/// A minimal valid campaign named `name`.
fn campaign(id: &str, name: &str) -> Campaign {
    let doc: CampaignDoc = serde_json::from_value(serde_json::json!({
        "id": id,
        "name": name,
        "coupon": {"title": "20% off"},
        "fences": [{"id": "f", "type": "circle", "center": [114.0579, 22.5431], "radius_m": 150}],
    }))
    .expect("a campaign document");
    doc.validate(|| cid(id)).expect("a valid campaign")
}

fn coupon(campaign: &str, user: &str, ts_ms: i64) -> IssuedCoupon {
    let (campaign_id, user_id) = (cid(campaign), uid(user));
    IssuedCoupon {
        coupon_id: CouponId::derive(&campaign_id, &user_id, ts_ms),
        user_id,
        campaign_id,
        fence_id: FenceId::parse("fence_id", "f").expect("valid fence id"),
        merchant_id: None,
        title: "20% off".into(),
        body: Some("at the counter".into()),
        deep_link: None,
        image_url: None,
        issued_at_ms: ts_ms,
        expires_at_ms: None,
    }
}

fn caps(per_user_cooldown_s: i64, per_user_max: i64, total_max: i64) -> Caps {
    Caps { per_user_cooldown_s, per_user_max, total_max }
}

/// A candidate of `campaign` for `user` at `ts_ms` with `caps`, everyone in its audience.
pub fn candidate(campaign: &str, user: &str, ts_ms: i64, caps: Caps) -> IssueCandidate {
    IssueCandidate { coupon: coupon(campaign, user, ts_ms), caps, audience_tags: Arc::from(Vec::new()) }
}

/// Issues one candidate (no daily cap) and returns its outcome.
pub async fn issue_one(store: &Arc<dyn Store>, candidate: IssueCandidate) -> IssueOutcome {
    let request = IssueRequest {
        user_id: candidate.coupon.user_id.clone(),
        ts_ms: candidate.coupon.issued_at_ms,
        seq: 0,
        daily_cap: 0,
        candidates: vec![candidate],
    };
    let outcomes = issue(store, request).await;
    assert_eq!(outcomes.len(), 1, "one outcome per candidate");
    outcomes[0]
}

/// Issues one candidate per campaign of `campaigns` at one ping, with a daily cap.
async fn issue_ping(
    store: &Arc<dyn Store>,
    user: &str,
    ts_ms: i64,
    daily_cap: u32,
    campaigns: &[&str],
) -> Vec<IssueOutcome> {
    let request = IssueRequest {
        user_id: uid(user),
        ts_ms,
        seq: 0,
        daily_cap,
        candidates: campaigns.iter().map(|c| candidate(c, user, ts_ms, Caps::default())).collect(),
    };
    issue(store, request).await
}

/// Decides one issue request through a commit that leaves the user's trigger state as it is.
pub async fn issue(store: &Arc<dyn Store>, request: IssueRequest) -> Vec<IssueOutcome> {
    let user = request.user_id.clone();
    loop {
        let stored = store.load_user_states(std::slice::from_ref(&user)).await.expect("load user states");
        let expected_version = stored[0].as_ref().map_or(0, |r| r.version);
        let commit = UserCommit {
            user_id: user.clone(),
            expected_version,
            new_state: None,
            new_version: 0,
            keep_for_ms: HOUR,
            issues: vec![request.clone()],
        };
        match store.commit(vec![commit]).await.expect("commit").remove(0) {
            UserCommitResult::Committed { mut outcomes, .. } => return outcomes.remove(0),
            // Another task changed the user's state in between: read it again.
            UserCommitResult::Conflict { .. } => continue,
        }
    }
}

fn device(tags: &[&str]) -> Device {
    Device {
        platform: Platform::Fcm,
        token: "token".into(),
        tags: tags.iter().map(|t| t.to_string()).collect(),
        locale: None,
    }
}

fn ids(campaigns: &[Arc<Campaign>]) -> Vec<String> {
    campaigns.iter().map(|c| c.id.to_string()).collect()
}

/// Insert, conflict, read, replace, delete, paging by id with an exclusive `after`, id reuse.
pub async fn campaigns_crud(store: &Arc<dyn Store>) {
    for id in ["crud-b", "crud-a", "crud-c"] {
        store.insert_campaign(campaign(id, "first")).await.expect("insert");
    }
    assert!(matches!(store.insert_campaign(campaign("crud-a", "again")).await, Err(StoreError::Conflict)));
    assert_eq!(store.campaign(&cid("crud-a")).await.unwrap().unwrap().name.as_deref(), Some("first"));
    assert!(store.campaign(&cid("crud-zz")).await.unwrap().is_none());

    assert!(matches!(store.replace_campaign(campaign("crud-zz", "x")).await, Err(StoreError::NotFound)));
    store.replace_campaign(campaign("crud-a", "second")).await.expect("replace");
    assert_eq!(store.campaign(&cid("crud-a")).await.unwrap().unwrap().name.as_deref(), Some("second"));

    assert_eq!(ids(&store.campaigns_page(Some("crud-"), 2).await.unwrap()), ["crud-a", "crud-b"]);
    assert_eq!(ids(&store.campaigns_page(Some("crud-a"), 2).await.unwrap()), ["crud-b", "crud-c"]);
    // `after` need not exist: the page starts after it in id order.
    assert_eq!(ids(&store.campaigns_page(Some("crud-b0"), 1).await.unwrap()), ["crud-c"]);
    assert!(store.campaigns_page(Some("crud-"), 0).await.unwrap().is_empty());

    // Walking every page visits every campaign once, ascending.
    let mut walked = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = store.campaigns_page(after.as_deref(), 2).await.unwrap();
        let Some(last) = page.last() else { break };
        after = Some(last.id.to_string());
        walked.extend(ids(&page));
    }
    assert!(walked.windows(2).all(|w| w[0] < w[1]), "pages ascend strictly: {walked:?}");
    let all = ids(&store.all_campaigns().await.unwrap().1);
    assert_eq!(walked.len(), all.len());
    for id in ["crud-a", "crud-b", "crud-c"] {
        assert!(all.iter().any(|a| a == id), "all_campaigns holds {id}");
    }

    store.delete_campaign(&cid("crud-b")).await.expect("delete");
    assert!(matches!(store.delete_campaign(&cid("crud-b")).await, Err(StoreError::NotFound)));
    assert!(store.campaign(&cid("crud-b")).await.unwrap().is_none());
    assert_eq!(ids(&store.campaigns_page(Some("crud-a"), 1).await.unwrap()), ["crud-c"]);
    // A deleted id may be used again.
    store.insert_campaign(campaign("crud-b", "reborn")).await.expect("reinsert a deleted id");
    assert_eq!(store.campaign(&cid("crud-b")).await.unwrap().unwrap().name.as_deref(), Some("reborn"));
}

/// Counters: zeros when nothing was issued; kept by a replace; reset when a deleted id is reused,
/// while coupon ids issued under the old campaign still count as issued.
pub async fn stats_and_id_reuse(store: &Arc<dyn Store>) {
    let id = cid("st-a");
    assert_eq!(store.campaign_stats(&id).await.unwrap(), Default::default());
    store.insert_campaign(campaign("st-a", "v1")).await.unwrap();
    assert_eq!(store.campaign_stats(&id).await.unwrap(), Default::default());

    assert_eq!(issue_one(store, candidate("st-a", "st-u1", T, caps(0, 1, 2))).await, IssueOutcome::Issued);
    assert_eq!(issue_one(store, candidate("st-a", "st-u3", T, caps(0, 1, 2))).await, IssueOutcome::Issued);
    let first = coupon("st-a", "st-u1", T).coupon_id;
    store.redeem(&first, "any", T).await.expect("redeem");
    let stats = store.campaign_stats(&id).await.unwrap();
    assert_eq!((stats.issued, stats.redeemed), (2, 1));

    store.replace_campaign(campaign("st-a", "v2")).await.unwrap();
    let stats = store.campaign_stats(&id).await.unwrap();
    assert_eq!((stats.issued, stats.redeemed), (2, 1), "a replace keeps the counters");
    assert_eq!(issue_one(store, candidate("st-a", "st-u2", T, caps(0, 1, 2))).await, IssueOutcome::TotalMax);

    store.delete_campaign(&id).await.unwrap();
    store.insert_campaign(campaign("st-a", "new")).await.unwrap();
    assert_eq!(store.campaign_stats(&id).await.unwrap(), Default::default(), "a reused id is a new campaign");
    assert_eq!(
        issue_one(store, candidate("st-a", "st-u1", T, caps(0, 1, 2))).await,
        IssueOutcome::Duplicate,
        "a coupon id issued under the old campaign is never issued again"
    );
    assert_eq!(issue_one(store, candidate("st-a", "st-u1", T + 1, caps(0, 1, 2))).await, IssueOutcome::Issued);
    assert_eq!(issue_one(store, candidate("st-a", "st-u2", T, caps(0, 1, 2))).await, IssueOutcome::Issued);
    // Redeeming a coupon of the old campaign does not count for the new one.
    store.redeem(&coupon("st-a", "st-u3", T).coupon_id, "any", T).await.expect("redeem an old coupon");
    let stats = store.campaign_stats(&id).await.unwrap();
    assert_eq!((stats.issued, stats.redeemed), (2, 0));
    // Wallets keep coupons of deleted campaigns.
    assert_eq!(store.wallet(&uid("st-u1")).await.unwrap().len(), 2);
}

/// Devices: put (insert or overwrite), list in id order, delete once.
pub async fn devices(store: &Arc<dyn Store>) {
    let user = uid("dev-u");
    let (d1, d2) = (DeviceId::parse("d", "d1").unwrap(), DeviceId::parse("d", "d2").unwrap());
    assert!(store.devices(&user).await.unwrap().is_empty());
    store.put_device(&user, &d2, device(&["a"])).await.unwrap();
    store.put_device(&user, &d1, device(&["vip"])).await.unwrap();
    let mut updated = device(&[]);
    updated.token = "new-token".into();
    updated.platform = Platform::Apns;
    updated.locale = Some("zh-CN".into());
    store.put_device(&user, &d1, updated.clone()).await.unwrap();
    let mut listed = store.devices(&user).await.unwrap();
    listed.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(listed, vec![(d1.clone(), updated), (d2.clone(), device(&["a"]))]);
    assert!(store.delete_device(&user, &d1).await.unwrap());
    assert!(!store.delete_device(&user, &d1).await.unwrap());
    assert!(!store.delete_device(&uid("dev-nobody"), &d1).await.unwrap());
    assert_eq!(store.devices(&user).await.unwrap(), vec![(d2, device(&["a"]))]);
}

/// The same coupon id is issued once: a retried request is a duplicate and records nothing.
pub async fn issue_dedup(store: &Arc<dyn Store>) {
    let c = candidate("dup-a", "dup-u", T, Caps::default());
    assert_eq!(issue_one(store, c.clone()).await, IssueOutcome::Issued);
    assert_eq!(issue_one(store, c.clone()).await, IssueOutcome::Duplicate);
    // Twice in one request: the second is a duplicate of the first.
    let twice = IssueRequest {
        user_id: uid("dup-u"),
        ts_ms: T + 1,
        seq: 0,
        daily_cap: 0,
        candidates: vec![candidate("dup-a", "dup-u", T + 1, Caps::default()); 2],
    };
    assert_eq!(issue(store, twice).await, [IssueOutcome::Issued, IssueOutcome::Duplicate]);
    assert_eq!(store.wallet(&uid("dup-u")).await.unwrap().len(), 2);
    assert_eq!(store.campaign_stats(&cid("dup-a")).await.unwrap().issued, 2);
}

/// Audience: the union of the user's current devices' tags must meet `tags_any`; no device
/// matches no non-empty audience; an empty audience is everyone.
pub async fn issue_audience(store: &Arc<dyn Store>) {
    let vip = |user: &str, ts: i64| IssueCandidate {
        audience_tags: Arc::from(vec!["vip".to_string(), "gold".to_string()]),
        ..candidate("aud-a", user, ts, Caps::default())
    };
    assert_eq!(issue_one(store, vip("aud-u", T)).await, IssueOutcome::Audience, "no device, no match");
    let user = uid("aud-u");
    store.put_device(&user, &DeviceId::parse("d", "d1").unwrap(), device(&["basic"])).await.unwrap();
    assert_eq!(issue_one(store, vip("aud-u", T)).await, IssueOutcome::Audience);
    store.put_device(&user, &DeviceId::parse("d", "d2").unwrap(), device(&["gold"])).await.unwrap();
    assert_eq!(issue_one(store, vip("aud-u", T)).await, IssueOutcome::Issued, "tags of all devices count");
    store.delete_device(&user, &DeviceId::parse("d", "d2").unwrap()).await.unwrap();
    assert_eq!(issue_one(store, vip("aud-u", T + 1)).await, IssueOutcome::Audience, "only current devices");
    assert_eq!(issue_one(store, candidate("aud-b", "aud-nodevice", T, Caps::default())).await, IssueOutcome::Issued);
    assert_eq!(store.wallet(&uid("aud-nodevice")).await.unwrap().len(), 1);
}

/// Cooldown in event time: blocked while `|ts − t| < cooldown` for a coupon of the campaign to
/// the user at `t` (equal allowed, both sides, for pings arriving out of order); 0 = none.
pub async fn issue_cooldown(store: &Arc<dyn Store>) {
    let cd = |user: &str, ts: i64| candidate("cd-a", user, ts, caps(60, 0, 0));
    assert_eq!(issue_one(store, cd("cd-u", T)).await, IssueOutcome::Issued);
    assert_eq!(issue_one(store, cd("cd-u", T + 59_999)).await, IssueOutcome::Cooldown);
    assert_eq!(issue_one(store, cd("cd-u", T + 60_000)).await, IssueOutcome::Issued, "equal is allowed");
    assert_eq!(issue_one(store, cd("cd-u", T - 59_999)).await, IssueOutcome::Cooldown, "a later coupon blocks too");
    assert_eq!(issue_one(store, cd("cd-u", T - 60_000)).await, IssueOutcome::Issued);
    assert_eq!(issue_one(store, cd("cd-u", T + 30_000)).await, IssueOutcome::Cooldown, "between two coupons");
    assert_eq!(issue_one(store, cd("cd-other", T + 1)).await, IssueOutcome::Issued, "per user");
    assert_eq!(issue_one(store, candidate("cd-b", "cd-u", T + 1, caps(60, 0, 0))).await, IssueOutcome::Issued);
    for i in 1..=3 {
        assert_eq!(issue_one(store, candidate("cd-none", "cd-u", T + i, caps(0, 0, 0))).await, IssueOutcome::Issued);
    }
}

/// `per_user_max` counts every coupon of the campaign ever issued to the user, redeemed and
/// expired included.
pub async fn issue_per_user_max(store: &Arc<dyn Store>) {
    let max2 = |user: &str, ts: i64| {
        let mut c = candidate("pum-a", user, ts, caps(0, 2, 0));
        c.coupon.expires_at_ms = Some(ts + 1);
        c
    };
    assert_eq!(issue_one(store, max2("pum-u", T)).await, IssueOutcome::Issued);
    store.redeem(&coupon("pum-a", "pum-u", T).coupon_id, "m", T).await.expect("redeem");
    assert_eq!(issue_one(store, max2("pum-u", T + HOUR)).await, IssueOutcome::Issued);
    assert_eq!(issue_one(store, max2("pum-u", T + 2 * HOUR)).await, IssueOutcome::PerUserMax);
    assert_eq!(issue_one(store, max2("pum-u", T - HOUR)).await, IssueOutcome::PerUserMax);
    assert_eq!(issue_one(store, max2("pum-v", T)).await, IssueOutcome::Issued, "per user");
}

/// `total_max` counts all coupons of the campaign, across users.
pub async fn issue_total_max(store: &Arc<dyn Store>) {
    for (user, expected) in
        [("tm-u1", IssueOutcome::Issued), ("tm-u2", IssueOutcome::Issued), ("tm-u3", IssueOutcome::TotalMax)]
    {
        assert_eq!(issue_one(store, candidate("tm-a", user, T, caps(0, 0, 2))).await, expected, "{user}");
    }
    assert_eq!(store.campaign_stats(&cid("tm-a")).await.unwrap().issued, 2);
}

/// The daily cap: coupons of any campaign with `issued_at_ms` in `(ts − 24 h, ts]`, counting ones
/// issued earlier by the same ping (campaigns in the given, ascending order) and ones issued by
/// earlier requests for later or earlier pings; 0 = unlimited.
pub async fn issue_daily_cap(store: &Arc<dyn Store>) {
    use IssueOutcome::{DailyCap, Issued};
    let u = "dc-u";
    assert_eq!(issue_ping(store, u, T, 3, &["dc-1"]).await, [Issued]);
    assert_eq!(issue_ping(store, u, T + HOUR, 3, &["dc-2"]).await, [Issued]);
    assert_eq!(issue_ping(store, u, T + 2 * HOUR, 3, &["dc-3"]).await, [Issued]);
    assert_eq!(issue_ping(store, u, T + 3 * HOUR, 3, &["dc-4"]).await, [DailyCap]);
    // Exactly 24 h after T, the coupon at T has left the window.
    assert_eq!(issue_ping(store, u, T + 24 * HOUR, 3, &["dc-5"]).await, [Issued]);
    assert_eq!(issue_ping(store, u, T + 24 * HOUR + 1, 3, &["dc-6"]).await, [DailyCap]);
    assert_eq!(issue_ping(store, u, T + 26 * HOUR, 3, &["dc-7"]).await, [Issued]);

    // One ping's candidates: ascending campaign id order until the cap is reached.
    assert_eq!(
        issue_ping(store, "dc-v", T, 3, &["dc-a", "dc-b", "dc-c", "dc-d"]).await,
        [Issued, Issued, Issued, DailyCap]
    );
    // Refused candidates do not count.
    assert_eq!(issue_ping(store, "dc-v", T, 0, &["dc-a"]).await, [IssueOutcome::Duplicate]);
    assert_eq!(store.wallet(&uid("dc-v")).await.unwrap().len(), 3);

    // Pings arriving out of order across requests: the window is the ping's own.
    let w = "dc-w";
    for h in [10, 11, 12] {
        assert_eq!(issue_ping(store, w, T + h * HOUR, 3, &["dc-1"]).await, [Issued]);
    }
    assert_eq!(issue_ping(store, w, T - 13 * HOUR, 3, &["dc-2"]).await, [Issued], "nothing in its window");
    assert_eq!(issue_ping(store, w, T + 11 * HOUR + HOUR / 2, 3, &["dc-3"]).await, [Issued], "T+10h and T+11h only");
    assert_eq!(issue_ping(store, w, T + 11 * HOUR + 3 * HOUR / 4, 3, &["dc-4"]).await, [DailyCap]);

    // 0 = unlimited.
    for i in 0..15 {
        assert_eq!(issue_ping(store, "dc-x", T + i, 0, &["dc-1"]).await, [Issued]);
    }
}

/// Wallets are newest first, ties by coupon id; `coupon` reads one record back unchanged.
pub async fn wallet_and_coupon(store: &Arc<dyn Store>) {
    let user = uid("wal-u");
    assert!(store.wallet(&user).await.unwrap().is_empty());
    let mut issued = Vec::new();
    for (campaign, ts) in [("wal-a", T + 1), ("wal-b", T + 2), ("wal-c", T + 1), ("wal-d", T + 2), ("wal-e", T)] {
        let mut c = candidate(campaign, "wal-u", ts, Caps::default());
        c.coupon.merchant_id = Some("m".into());
        c.coupon.expires_at_ms = Some(ts + 1000);
        assert_eq!(issue_one(store, c.clone()).await, IssueOutcome::Issued);
        issued.push(c.coupon);
    }
    issued.sort_by(|a, b| b.issued_at_ms.cmp(&a.issued_at_ms).then_with(|| a.coupon_id.cmp(&b.coupon_id)));
    let wallet = store.wallet(&user).await.unwrap();
    let got: Vec<&IssuedCoupon> = wallet.iter().map(|r| &r.coupon).collect();
    assert_eq!(got, issued.iter().collect::<Vec<_>>());
    assert!(wallet.iter().all(|r| r.redeemed_at_ms.is_none()));

    let record = store.coupon(&issued[0].coupon_id).await.unwrap().expect("a stored coupon");
    assert_eq!(record.coupon, issued[0]);
    assert!(store.coupon(&CouponId::from_string("cp_nope")).await.unwrap().is_none());
}

/// Redemption: exactly once; unknown, already redeemed, expired (`now ≥ expires_at_ms`) and
/// another merchant's are refused, in that order of precedence; concurrent attempts win once.
pub async fn redeem(store: &Arc<dyn Store>) {
    let mut c = candidate("red-a", "red-u", T, Caps::default());
    c.coupon.merchant_id = Some("m1".into());
    c.coupon.expires_at_ms = Some(T + 1000);
    let id = c.coupon.coupon_id.clone();
    assert_eq!(issue_one(store, c).await, IssueOutcome::Issued);

    assert!(matches!(store.redeem(&CouponId::from_string("cp_nope"), "m1", T).await, Err(RedeemError::NotFound)));
    assert!(matches!(store.redeem(&id, "m2", T).await, Err(RedeemError::WrongMerchant)));
    assert!(matches!(store.redeem(&id, "m2", T + 1000).await, Err(RedeemError::Expired)));
    assert!(matches!(store.redeem(&id, "m1", T + 1000).await, Err(RedeemError::Expired)), "expired at expires_at_ms");
    let record = store.redeem(&id, "m1", T + 999).await.expect("redeem before expiry");
    assert_eq!(record.redeemed_at_ms, Some(T + 999));
    assert!(matches!(store.redeem(&id, "m1", T + 999).await, Err(RedeemError::AlreadyRedeemed)));
    assert!(matches!(store.redeem(&id, "m2", T + 5000).await, Err(RedeemError::AlreadyRedeemed)));
    assert_eq!(store.coupon(&id).await.unwrap().unwrap().redeemed_at_ms, Some(T + 999));
    assert_eq!(store.wallet(&uid("red-u")).await.unwrap()[0].redeemed_at_ms, Some(T + 999));
    assert_eq!(store.campaign_stats(&cid("red-a")).await.unwrap().redeemed, 1);

    // No merchant: any merchant redeems; no expiry: never expires.
    let c = candidate("red-b", "red-u", T, Caps::default());
    let id = c.coupon.coupon_id.clone();
    assert_eq!(issue_one(store, c).await, IssueOutcome::Issued);
    let tasks: Vec<_> = (0..16)
        .map(|i| {
            let (store, id) = (store.clone(), id.clone());
            tokio::spawn(async move { store.redeem(&id, &format!("m{i}"), i64::MAX).await.is_ok() })
        })
        .collect();
    let mut wins = 0;
    for task in tasks {
        wins += usize::from(task.await.expect("task"));
    }
    assert_eq!(wins, 1, "concurrent redemptions succeed exactly once");
    assert_eq!(store.campaign_stats(&cid("red-b")).await.unwrap().redeemed, 1);
}

/// Finishes every entry in the outbox (what earlier sections queued), so a section starts clean.
async fn drain_outbox(store: &Arc<dyn Store>) {
    loop {
        let entries = store.outbox_take("drain", 1000, i64::MAX / 2, 0).await.unwrap();
        if entries.is_empty() {
            break;
        }
        for entry in &entries {
            store.outbox_finish(entry, PushFinal::Dropped, 0).await.unwrap();
        }
    }
}

fn device_token(token: &str, platform: Platform) -> Device {
    Device { platform, token: token.into(), tags: Vec::new(), locale: None }
}

/// The outbox: one entry per (issued coupon, device of the user at issue time), oldest first, at
/// most `max` per take; a taken entry is leased (not handed out again before the lease runs out,
/// then handed out to anyone: at least once); finished entries never come back; retries are due
/// at their time; no device, no entry; refused candidates queue nothing.
///
/// Leases run on the store's clock (a Redis consumer group's idle time), so this section takes
/// with the wall clock and waits for a short lease to lapse; retries are due by the caller's
/// `now_ms`, so those are checked with times far ahead.
pub async fn outbox(store: &Arc<dyn Store>) {
    const LEASE_MS: i64 = 300;
    drain_outbox(store).await;
    let user = uid("ob-u");
    let (d1, d2) = (DeviceId::parse("d", "ob-d1").unwrap(), DeviceId::parse("d", "ob-d2").unwrap());
    assert_eq!(issue_one(store, candidate("ob-a", "ob-u", T - 1, Caps::default())).await, IssueOutcome::Issued);
    assert_eq!(store.outbox_len().await.unwrap(), 0, "a user without devices gets no push");
    store.put_device(&user, &d1, device_token("tok-1", Platform::Fcm)).await.unwrap();
    store.put_device(&user, &d2, device_token("tok-2", Platform::Apns)).await.unwrap();

    let coupons: Vec<IssuedCoupon> = (0..2).map(|i| coupon("ob-a", "ob-u", T + i)).collect();
    for c in &coupons {
        let outcome = issue_one(store, candidate("ob-a", "ob-u", c.issued_at_ms, Caps::default())).await;
        assert_eq!(outcome, IssueOutcome::Issued);
    }
    assert_eq!(issue_one(store, candidate("ob-a", "ob-u", T, Caps::default())).await, IssueOutcome::Duplicate);
    assert_eq!(store.outbox_len().await.unwrap(), 4, "two coupons × two devices");

    let now = crate::engine::now_ms;
    let first = store.outbox_take("c1", 3, now(), LEASE_MS).await.unwrap();
    assert_eq!(first.len(), 3);
    let pushed: Vec<(&IssuedCoupon, &str)> = first.iter().map(|e| (&e.coupon, e.device.token.as_str())).collect();
    assert_eq!(&pushed[..2], [(&coupons[0], "tok-1"), (&coupons[0], "tok-2")], "oldest first, every device");
    assert!(first.iter().all(|e| e.attempts == 0));
    let rest = store.outbox_take("c2", 10, now(), LEASE_MS).await.unwrap();
    assert_eq!(rest.len(), 1, "leased entries are not handed to another consumer");
    assert!(store.outbox_take("c2", 10, now(), LEASE_MS).await.unwrap().is_empty(), "not before the lease ends");

    store.outbox_finish(&first[0], PushFinal::Delivered, 2_000).await.unwrap();
    // What is tested here is the lease running out: nothing to wait for but time.
    tokio::time::sleep(std::time::Duration::from_millis(LEASE_MS as u64 + 50)).await;
    let again = store.outbox_take("c2", 10, now(), LEASE_MS).await.unwrap();
    assert_eq!(again.len(), 3, "a lapsed lease hands entries out again (at least once)");
    let key = |e: &OutboxEntry| (e.coupon.coupon_id.clone(), e.device_id.clone());
    assert!(!again.iter().any(|e| key(e) == key(&first[0])), "a finished entry never comes back");

    // A retry is due at its time, with its attempts (under a handle of its own, maybe new).
    let retried = &again[0];
    let due_at = now() + HOUR;
    store.outbox_retry(retried, 1, due_at).await.unwrap();
    for e in &again[1..] {
        store.outbox_finish(e, PushFinal::Delivered, 7_000).await.unwrap();
    }
    assert_eq!(store.outbox_len().await.unwrap(), 1, "the retry still waits");
    assert!(store.outbox_take("c3", 10, due_at - 1, LEASE_MS).await.unwrap().is_empty());
    let due = store.outbox_take("c3", 10, due_at, LEASE_MS).await.unwrap();
    assert_eq!(due.len(), 1);
    assert_eq!((key(&due[0]), due[0].attempts), (key(retried), 1));
    let stats = store.campaign_stats(&cid("ob-a")).await.unwrap().pushes;
    assert_eq!((stats.delivered, stats.retrying), (3, 1));

    store.outbox_finish(&due[0], PushFinal::Delivered, 21_000).await.unwrap();
    store.outbox_finish(&due[0], PushFinal::Delivered, 21_000).await.unwrap();
    store.outbox_finish(retried, PushFinal::Delivered, 21_000).await.unwrap();
    let stats = store.campaign_stats(&cid("ob-a")).await.unwrap().pushes;
    assert_eq!((stats.delivered, stats.retrying), (4, 0), "finishing twice counts once");
    assert_eq!(store.outbox_len().await.unwrap(), 0);
    assert!(store.outbox_take("c3", 10, i64::MAX / 2, 0).await.unwrap().is_empty());
}

/// Final outcomes: a dead token removes the device (only while it still has that token), a
/// failure goes to the dead letters with its reason, each counted in the campaign's push stats.
pub async fn push_outcomes(store: &Arc<dyn Store>) {
    drain_outbox(store).await;
    let user = uid("po-u");
    let (d1, d2) = (DeviceId::parse("d", "po-d1").unwrap(), DeviceId::parse("d", "po-d2").unwrap());
    store.put_device(&user, &d1, device_token("dead", Platform::Fcm)).await.unwrap();
    store.put_device(&user, &d2, device_token("bad", Platform::Apns)).await.unwrap();
    assert_eq!(issue_one(store, candidate("po-a", "po-u", T, Caps::default())).await, IssueOutcome::Issued);
    let entries = store.outbox_take("c", 10, 0, 1_000).await.unwrap();
    assert_eq!(entries.len(), 2);
    let dead = entries.iter().find(|e| e.device.token == "dead").unwrap();
    let bad = entries.iter().find(|e| e.device.token == "bad").unwrap();

    store.outbox_finish(dead, PushFinal::DeadToken, 10).await.unwrap();
    let reason = "400 InvalidTopic".to_string();
    store.outbox_finish(bad, PushFinal::Failed { reason: reason.clone() }, 11).await.unwrap();
    assert_eq!(store.devices(&user).await.unwrap().len(), 1, "the dead token's device is gone");
    let letters = store.dead_letters(10).await.unwrap();
    assert_eq!(letters[0].reason, reason);
    assert_eq!(letters[0].entry.coupon.coupon_id, bad.coupon.coupon_id);
    let stats = store.campaign_stats(&cid("po-a")).await.unwrap().pushes;
    assert_eq!((stats.delivered, stats.failed, stats.dead_token, stats.retrying), (0, 1, 1, 0));

    // A device registered again with a new token is not removed by the old token's death.
    store.put_device(&user, &d1, device_token("fresh", Platform::Fcm)).await.unwrap();
    assert_eq!(issue_one(store, candidate("po-a", "po-u", T + 1, Caps::default())).await, IssueOutcome::Issued);
    let stale = OutboxEntry {
        device: device_token("dead", Platform::Fcm),
        ..store.outbox_take("c", 1, 0, 1).await.unwrap().remove(0)
    };
    store.outbox_finish(&stale, PushFinal::DeadToken, 12).await.unwrap();
    assert_eq!(store.devices(&user).await.unwrap().len(), 2, "the new token stays");
    drain_outbox(store).await;
}

/// A commit of `user`'s trigger state alone (no issue requests), kept an hour.
pub fn commit_of(user: &str, expected_version: u64, state: Option<&[u8]>, new_version: u64) -> UserCommit {
    UserCommit {
        user_id: uid(user),
        expected_version,
        new_state: state.map(<[u8]>::to_vec),
        new_version,
        keep_for_ms: HOUR,
        issues: Vec::new(),
    }
}

/// Trigger states: stored at the version a commit gives; a commit naming another version is
/// refused whole (nothing of it applied) with the current state; a check-only commit leaves the
/// state; users of one commit are independent.
pub async fn user_states(store: &Arc<dyn Store>) {
    let (a, b) = (uid("us-a"), uid("us-b"));
    assert_eq!(store.load_user_states(&[a.clone(), b.clone()]).await.unwrap(), [None, None]);

    let results =
        store.commit(vec![commit_of("us-a", 0, Some(b"one"), 11), commit_of("us-b", 0, None, 0)]).await.unwrap();
    assert_eq!(results[0], UserCommitResult::Committed { version: 11, outcomes: vec![] });
    assert_eq!(results[1], UserCommitResult::Committed { version: 0, outcomes: vec![] });
    let record = |version: u64, bytes: &[u8]| Some(UserStateRecord { version, bytes: bytes.to_vec() });
    assert_eq!(store.load_user_states(&[a.clone(), b.clone()]).await.unwrap(), [record(11, b"one"), None]);

    // A stale version is refused with the current state, and issues nothing.
    let mut stale = commit_of("us-a", 0, Some(b"two"), 12);
    stale.issues.push(IssueRequest {
        user_id: a.clone(),
        ts_ms: T,
        seq: 0,
        daily_cap: 0,
        candidates: vec![candidate("us-c", "us-a", T, Caps::default())],
    });
    let fresh = commit_of("us-b", 0, Some(b"b1"), 21);
    let results = store.commit(vec![stale.clone(), fresh]).await.unwrap();
    assert_eq!(results[0], UserCommitResult::Conflict { current: record(11, b"one") });
    assert!(matches!(results[1], UserCommitResult::Committed { version: 21, .. }), "other users are unaffected");
    assert!(store.wallet(&a).await.unwrap().is_empty(), "a refused step issues nothing");

    // Retried at the right version, it applies whole.
    stale.expected_version = 11;
    let results = store.commit(vec![stale]).await.unwrap();
    assert_eq!(results[0], UserCommitResult::Committed { version: 12, outcomes: vec![vec![IssueOutcome::Issued]] });
    assert_eq!(store.load_user_states(std::slice::from_ref(&a)).await.unwrap(), [record(12, b"two")]);
    assert_eq!(store.wallet(&a).await.unwrap().len(), 1);
    let check_only = store.commit(vec![commit_of("us-a", 12, None, 99)]).await.unwrap();
    assert_eq!(check_only[0], UserCommitResult::Committed { version: 12, outcomes: vec![] });
}

/// For a store that holds every trigger state in memory, built with a `max_tracked_users` of
/// 10 (not part of [`store_contract_suite`]: a shared store such as Redis bounds its memory with
/// key expiry instead). Twenty users whose states may be forgotten at ever later times: once over
/// the ceiling, down to 9 are kept, the longest idle gone first; the caps are not state and stay.
pub async fn user_state_ceiling_of_ten(store: &Arc<dyn Store>) {
    let user = |k: usize| format!("ceil-{k:02}");
    for k in 0..20 {
        // Later users are kept longer: they are the less idle.
        let commit = UserCommit { keep_for_ms: HOUR + 1_000 * k as i64, ..commit_of(&user(k), 0, Some(b"s"), 7) };
        let result = store.commit(vec![commit]).await.unwrap();
        assert!(matches!(result[0], UserCommitResult::Committed { version: 7, .. }), "{k}: {result:?}");
    }
    let users: Vec<UserId> = (0..20).map(|k| uid(&user(k))).collect();
    let kept: Vec<bool> = store.load_user_states(&users).await.unwrap().iter().map(Option::is_some).collect();
    // Every second commit from the eleventh on goes over the ceiling and drops the two longest
    // idle (down to 9): 0–1, 2–3, … 8–9 went, 10–19 remain.
    let expected: Vec<bool> = (0..20).map(|k| k >= 10).collect();
    assert_eq!(kept, expected, "the longest idle go first");
    // A dropped user starts afresh: its commit from version 0 applies.
    // (Kept longest of all, it takes the count over again: 10 and 11 go.)
    let again = UserCommit { keep_for_ms: 2 * HOUR, ..commit_of(&user(0), 0, Some(b"t"), 8) };
    let again = store.commit(vec![again]).await.unwrap();
    assert!(matches!(again[0], UserCommitResult::Committed { version: 8, .. }), "{again:?}");
}

/// Within one commit, issue requests of different users are decided in ascending `ts_ms`: the
/// earliest ping wins a campaign's last coupon, whatever the order of the users.
pub async fn commit_decides_in_event_time(store: &Arc<dyn Store>) {
    let request = |user: &str, ts: i64| IssueRequest {
        user_id: uid(user),
        ts_ms: ts,
        seq: 0,
        daily_cap: 0,
        candidates: vec![candidate("et-a", user, ts, caps(0, 0, 1))],
    };
    let mut late = commit_of("et-late", 0, None, 0);
    late.issues.push(request("et-late", T + 5));
    let mut early = commit_of("et-early", 0, None, 0);
    early.issues.push(request("et-early", T + 1));
    let results = store.commit(vec![late, early]).await.unwrap();
    let outcome = |r: &UserCommitResult| match r {
        UserCommitResult::Committed { outcomes, .. } => outcomes[0][0],
        other => panic!("unexpected {other:?}"),
    };
    assert_eq!((outcome(&results[0]), outcome(&results[1])), (IssueOutcome::TotalMax, IssueOutcome::Issued));
}

/// The campaign change feed: every write gets a store revision greater than any before; the
/// feed lists the changes after a revision, in order, deletes included.
pub async fn campaign_feed(store: &Arc<dyn Store>) {
    let start = store.campaign_changes(0).await.unwrap().revision;
    let created = store.insert_campaign(campaign("feed-a", "v1")).await.unwrap();
    assert!(created.revision > start);
    let replaced = store.replace_campaign(campaign("feed-a", "v2")).await.unwrap();
    assert!(replaced.revision > created.revision);
    let deleted = store.delete_campaign(&cid("feed-a")).await.unwrap();
    assert!(deleted > replaced.revision);
    let (revision, _) = store.all_campaigns().await.unwrap();
    assert_eq!(revision, deleted);

    let feed = store.campaign_changes(created.revision - 1).await.unwrap();
    assert_eq!(feed.revision, deleted);
    let changes = feed.changes.expect("a complete feed");
    let seen: Vec<String> = changes
        .iter()
        .map(|c| match c {
            CampaignChange::Upsert(c) => format!("upsert {} {}", c.id, c.name.as_deref().unwrap_or("")),
            CampaignChange::Delete { id, .. } => format!("delete {id}"),
        })
        .collect();
    assert_eq!(seen, ["upsert feed-a v1", "upsert feed-a v2", "delete feed-a"]);
    let none = store.campaign_changes(deleted).await.unwrap();
    assert_eq!((none.revision, none.changes.map(|c| c.len())), (deleted, Some(0)));
}

/// Erasure: devices, wallet, coupon records, trigger state, per-user counters and pending pushes
/// of the user are gone; campaign totals keep counting the coupons; other users are untouched.
pub async fn erase_user(store: &Arc<dyn Store>) {
    drain_outbox(store).await;
    let (gone, kept) = (uid("er-gone"), uid("er-kept"));
    for user in [&gone, &kept] {
        store.put_device(user, &DeviceId::parse("d", "d").unwrap(), device_token("t", Platform::Fcm)).await.unwrap();
        store.commit(vec![commit_of(user.as_str(), 0, Some(b"state"), 5)]).await.unwrap();
        let c = candidate("er-a", user.as_str(), T, caps(0, 1, 3));
        assert_eq!(issue_one(store, c).await, IssueOutcome::Issued);
    }
    let coupon_id = coupon("er-a", "er-gone", T).coupon_id;
    store.erase_user(&gone).await.unwrap();
    store.erase_user(&uid("er-never-seen")).await.unwrap();

    assert!(store.devices(&gone).await.unwrap().is_empty());
    assert!(store.wallet(&gone).await.unwrap().is_empty());
    assert!(store.coupon(&coupon_id).await.unwrap().is_none());
    assert_eq!(store.load_user_states(std::slice::from_ref(&gone)).await.unwrap(), [None]);
    let pending = store.outbox_take("c", 100, 0, 1).await.unwrap();
    assert!(pending.iter().all(|e| e.coupon.user_id != gone), "pending pushes are gone");
    assert_eq!(pending.iter().filter(|e| e.coupon.user_id == kept).count(), 1);
    assert_eq!(store.campaign_stats(&cid("er-a")).await.unwrap().issued, 2, "totals keep counting");
    // The erased coupons no longer count toward per_user_max; they still count toward total_max.
    let again = candidate("er-a", "er-gone", T + HOUR, caps(0, 1, 3));
    assert_eq!(issue_one(store, again).await, IssueOutcome::Issued);
    let third = candidate("er-a", "er-third", T, caps(0, 1, 3));
    assert_eq!(issue_one(store, third).await, IssueOutcome::TotalMax);

    assert_eq!(store.devices(&kept).await.unwrap().len(), 1);
    assert_eq!(store.wallet(&kept).await.unwrap().len(), 1);
    assert!(store.load_user_states(std::slice::from_ref(&kept)).await.unwrap()[0].is_some());
    drain_outbox(store).await;
}

/// Runs the requests as concurrent tasks; returns every outcome.
async fn concurrently(store: &Arc<dyn Store>, requests: Vec<IssueRequest>) -> Vec<IssueOutcome> {
    let tasks: Vec<_> = requests
        .into_iter()
        .map(|request| {
            let store = store.clone();
            tokio::spawn(async move { issue(&store, request).await })
        })
        .collect();
    let mut outcomes = Vec::new();
    for task in tasks {
        outcomes.extend(task.await.expect("task"));
    }
    outcomes
}

fn single(candidate: IssueCandidate, daily_cap: u32) -> IssueRequest {
    IssueRequest {
        user_id: candidate.coupon.user_id.clone(),
        ts_ms: candidate.coupon.issued_at_ms,
        seq: 0,
        daily_cap,
        candidates: vec![candidate],
    }
}

fn count(outcomes: &[IssueOutcome], which: IssueOutcome) -> usize {
    outcomes.iter().filter(|&&o| o == which).count()
}

/// Many tasks issuing at once for one campaign or one user never exceed a cap and never issue
/// one coupon id twice.
pub async fn concurrent_issue_never_breaks_a_cap(store: &Arc<dyn Store>) {
    const N: i64 = 64;
    let total: Vec<_> =
        (0..N).map(|i| single(candidate("cc-total", &format!("cc-u{i}"), T, caps(0, 0, 10)), 0)).collect();
    assert_eq!(count(&concurrently(store, total).await, IssueOutcome::Issued), 10, "total_max");
    assert_eq!(store.campaign_stats(&cid("cc-total")).await.unwrap().issued, 10);

    let per_user: Vec<_> =
        (0..N).map(|i| single(candidate("cc-user", "cc-one", T + i * 1000, caps(0, 5, 0)), 0)).collect();
    assert_eq!(count(&concurrently(store, per_user).await, IssueOutcome::Issued), 5, "per_user_max");

    let cooldown: Vec<_> = (0..N).map(|i| single(candidate("cc-cool", "cc-one", T + i, caps(3600, 0, 0)), 0)).collect();
    assert_eq!(count(&concurrently(store, cooldown).await, IssueOutcome::Issued), 1, "cooldown");

    let same: Vec<_> = (0..N).map(|_| single(candidate("cc-same", "cc-one", T, Caps::default()), 0)).collect();
    let outcomes = concurrently(store, same).await;
    assert_eq!(count(&outcomes, IssueOutcome::Issued), 1, "one coupon id issued once");
    assert_eq!(count(&outcomes, IssueOutcome::Duplicate), N as usize - 1);

    // One ping time for all: the window of each request then holds every coupon of the others.
    let daily: Vec<_> =
        (0..N).map(|i| single(candidate(&format!("cc-day{i}"), "cc-daily", T, Caps::default()), 10)).collect();
    assert_eq!(count(&concurrently(store, daily).await, IssueOutcome::Issued), 10, "daily cap");

    let wallet = store.wallet(&uid("cc-one")).await.unwrap();
    assert_eq!(wallet.len(), 5 + 1 + 1);
    let mut ids: Vec<&CouponId> = wallet.iter().map(|r| &r.coupon.coupon_id).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), wallet.len(), "no coupon id twice in a wallet");
}

/// A campaign with every member set reads back equal to what was stored — from `campaign`,
/// `campaigns_page`, `all_campaigns` and the change feed — at the revision the write returned.
pub async fn campaigns_read_back_whole(store: &Arc<dyn Store>) {
    let doc: CampaignDoc = serde_json::from_value(serde_json::json!({
        "id": "rb-a",
        "name": "Full — 满减",
        "merchant": {"id": "m-1", "name": "Shop \"1\""},
        "coupon": {"title": "20% off", "body": "b", "deep_link": "app://x", "image_url": "https://i/x.png",
                   "valid_for_s": 3600},
        "fences": [
            {"id": "c", "type": "circle", "center": [114.0579, 22.5431], "radius_m": 150.5},
            {"id": "p", "type": "polygon",
             "coordinates": [[[114.0, 22.5], [114.01, 22.5], [114.01, 22.51], [114.0, 22.5]]]}
        ],
        "trigger": {"on": "dwell", "dwell_s": 120},
        "schedule": {"starts_at_ms": 1_700_000_000_000_i64, "ends_at_ms": 1_800_000_000_000_i64,
                     "timezone": "Asia/Shanghai", "hours": [{"days": ["mon", "sat"], "from": "09:00", "to": "21:30"}]},
        "caps": {"per_user_cooldown_s": 60, "per_user_max": 3, "total_max": 1000},
        "audience": {"tags_any": ["vip", "gold"]},
        "max_accuracy_m": 35.5,
        "status": "paused",
    }))
    .expect("a campaign document");
    let full = doc.validate(|| cid("rb-a")).expect("a valid campaign");
    let since = store.campaign_changes(0).await.unwrap().revision;
    let stored = store.insert_campaign(full.clone()).await.expect("insert");
    let expected = Campaign { revision: stored.revision, ..full };
    assert_eq!(*stored, expected);
    assert_eq!(*store.campaign(&cid("rb-a")).await.unwrap().expect("stored"), expected);
    let page = store.campaigns_page(Some("rb-"), 1).await.unwrap();
    assert_eq!(*page[0], expected);
    let all = store.all_campaigns().await.unwrap().1;
    assert_eq!(**all.iter().find(|c| c.id == expected.id).expect("listed"), expected);
    let changes = store.campaign_changes(since).await.unwrap().changes.expect("a complete feed");
    match changes.last() {
        Some(CampaignChange::Upsert(c)) => assert_eq!(**c, expected),
        other => panic!("expected the upsert, got {other:?}"),
    }
    store.delete_campaign(&cid("rb-a")).await.unwrap();
}

/// Provider tokens: one per slot, kept until the next candidate is `replace_after_ms` younger,
/// then replaced; callers racing to replace a due token all end up with the one that was kept.
pub async fn provider_tokens(store: &Arc<dyn Store>) {
    const MINUTE: i64 = 60_000;
    const RESIGN: i64 = 40 * MINUTE;
    let token = |name: &str, issued_at_ms: i64| ProviderToken { token: name.into(), issued_at_ms };
    let keep = |slot: &'static str, candidate: ProviderToken, replace_after_ms: i64| {
        let store = store.clone();
        async move { store.provider_token(slot, candidate, replace_after_ms).await.expect("provider_token") }
    };
    let slot = "contract:apns:one";
    assert_eq!(keep(slot, token("first", T), RESIGN).await, token("first", T), "none kept: the candidate is");
    assert_eq!(keep(slot, token("early", T + 39 * MINUTE), RESIGN).await, token("first", T), "not due yet");
    assert_eq!(keep(slot, token("other", T), RESIGN).await, token("first", T), "other slots do not count");
    let due = token("second", T + RESIGN);
    assert_eq!(keep(slot, due.clone(), RESIGN).await, due, "due at exactly replace_after_ms");
    assert_eq!(keep(slot, token("probe", T + RESIGN + 1), RESIGN).await, due, "the replacement is kept");
    // A caller whose token was refused asks with a shorter age (20 min): that one decides.
    let early = token("third", T + RESIGN + 20 * MINUTE);
    assert_eq!(keep(slot, early.clone(), 20 * MINUTE).await, early);
    // A candidate from a clock behind the signer's is never preferred to the kept token.
    assert_eq!(keep(slot, token("behind", T), RESIGN).await, early);
    assert_eq!(keep("contract:apns:two", token("own", T), RESIGN).await, token("own", T), "slots are independent");

    // Eight nodes find the kept token due at once and each offers its own.
    let race = "contract:apns:race";
    keep(race, token("stale", T - 50 * MINUTE), RESIGN).await;
    let racers = (0..8).map(|i| tokio::spawn(keep(race, token(&format!("racer-{i}"), T + i), RESIGN)));
    let got: Vec<ProviderToken> =
        futures::future::join_all(racers).await.into_iter().map(|r| r.expect("racer ran")).collect();
    assert!(got[0].token.starts_with("racer-"), "the stale token was replaced: {got:?}");
    assert!(got.iter().all(|t| *t == got[0]), "every racer got the token that was kept: {got:?}");
    assert_eq!(keep(race, token("probe", T + 8), RESIGN).await, got[0]);
}
