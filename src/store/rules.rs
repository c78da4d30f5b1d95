//! Rule 4's store half, written once for every store that decides in Rust (the in-memory and the
//! embedded store; the Redis store runs the same rules as a Lua script, and the contract suite
//! keeps them equal).
//!
//! A store exposes what the rules read through [`IssueView`]; [`refusal`] decides one candidate
//! and [`decide_in_order`] orders a request's issue requests across users.

use super::{IssueCandidate, IssueOutcome, IssueRequest, StoreError, UserCommit};
use crate::domain::{CampaignId, CouponId, UserId};

/// The daily cap's window, ms.
pub const DAY_MS: i64 = 24 * 60 * 60 * 1000;

/// What the rules read from a store, inside the store's atomic step.
pub trait IssueView {
    /// Was this coupon id issued before (a retry, another node)?
    fn coupon_exists(&self, id: &CouponId) -> Result<bool, StoreError>;
    /// Do the user's devices carry one of `tags_any`? (Never asked with an empty list.)
    fn has_any_tag(&self, user: &UserId, tags_any: &[String]) -> Result<bool, StoreError>;
    /// `issued_at_ms` of every coupon of the campaign to the user, ascending.
    fn issue_times(&self, campaign: &CampaignId, user: &UserId) -> Result<Vec<i64>, StoreError>;
    /// Coupons the campaign issued, ever.
    fn campaign_issued(&self, campaign: &CampaignId) -> Result<u64, StoreError>;
    /// How many coupons the user holds with `issued_at_ms` in `(from_ms, to_ms]`, counting no
    /// further than `limit`.
    fn coupons_between(&self, user: &UserId, from_ms: i64, to_ms: i64, limit: usize) -> Result<usize, StoreError>;
}

/// Rule 4's store half for one candidate, checked in API.md's order; `None` = may issue.
pub fn refusal(
    view: &impl IssueView,
    request: &IssueRequest,
    candidate: &IssueCandidate,
) -> Result<Option<IssueOutcome>, StoreError> {
    let coupon = &candidate.coupon;
    if view.coupon_exists(&coupon.coupon_id)? {
        return Ok(Some(IssueOutcome::Duplicate));
    }
    if !candidate.audience_tags.is_empty() && !view.has_any_tag(&request.user_id, &candidate.audience_tags)? {
        return Ok(Some(IssueOutcome::Audience));
    }
    let caps = candidate.caps;
    let needs_times = caps.per_user_cooldown_s > 0 || caps.per_user_max > 0;
    let times = if needs_times { view.issue_times(&coupon.campaign_id, &request.user_id)? } else { Vec::new() };
    if caps.per_user_cooldown_s > 0 {
        // Two-sided in event time: with pings arriving out of order across requests, a coupon
        // issued *after* this ping's time blocks it as well (otherwise the later coupon would end
        // up inside the cooldown of the earlier one).
        let cooldown_ms = caps.per_user_cooldown_s.saturating_mul(1000);
        let later = times.partition_point(|&t| t < request.ts_ms);
        let too_close = |t: i64| request.ts_ms.abs_diff(t) < cooldown_ms.unsigned_abs();
        let earlier_close = later.checked_sub(1).is_some_and(|i| too_close(times[i]));
        let later_close = times.get(later).is_some_and(|&t| too_close(t));
        if earlier_close || later_close {
            return Ok(Some(IssueOutcome::Cooldown));
        }
    }
    if caps.per_user_max > 0 && times.len() as u64 >= caps.per_user_max.unsigned_abs() {
        return Ok(Some(IssueOutcome::PerUserMax));
    }
    if caps.total_max > 0 && view.campaign_issued(&coupon.campaign_id)? >= caps.total_max.unsigned_abs() {
        return Ok(Some(IssueOutcome::TotalMax));
    }
    if request.daily_cap > 0 {
        let cap = request.daily_cap as usize;
        let from = request.ts_ms.saturating_sub(DAY_MS);
        if view.coupons_between(&request.user_id, from, request.ts_ms, cap)? >= cap {
            return Ok(Some(IssueOutcome::DailyCap));
        }
    }
    Ok(None)
}

/// The issue requests of the accepted commits, as (commit index, request index), in the order
/// they are decided: ascending `(ts_ms, seq)` across users, so the earliest ping wins a
/// campaign's last coupon.
pub fn decide_in_order(commits: &[UserCommit], accepted: &[bool]) -> Vec<(usize, usize)> {
    let mut order: Vec<(usize, usize)> = commits
        .iter()
        .enumerate()
        .filter(|(i, _)| accepted[*i])
        .flat_map(|(i, commit)| (0..commit.issues.len()).map(move |j| (i, j)))
        .collect();
    order.sort_by_key(|&(i, j)| (commits[i].issues[j].ts_ms, commits[i].issues[j].seq));
    order
}
