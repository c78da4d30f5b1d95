//! One user's trigger state (newest applied ping, stays by campaign and fence) and the rules that
//! move it: rule 0 and the ignore reasons, `state_ttl_s`, enters, exits, dwell, rule 5.
//!
//! The state is a plain value: the engine keeps it in its cache and the store keeps it encoded
//! ([`UserState::encode`]), so any node can continue any user's stays (API.md rule 7).

use std::sync::Arc;

use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};

use crate::domain::{haversine_m, Campaign, CampaignId, FenceId, LatLon, Ping, Trigger};

use super::{Candidate, FenceHit, IgnoreReason, Outcome, TriggerConfig};

/// Everything the rules remember about one user.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct UserState {
    /// The newest applied ping: its time decides staleness and TTL gaps, its place rule 0.
    /// `None` only before the first applied ping (such a state is never stored).
    last: Option<LastPing>,
    /// Open stays, grouped by campaign id.
    campaigns: FxHashMap<CampaignId, CampaignStays>,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
struct LastPing {
    ts_ms: i64,
    /// `at` as (lat, lon): [`LatLon`] is built only from validated input.
    lat: f64,
    lon: f64,
}

impl LastPing {
    fn at(&self) -> LatLon {
        // Written from a validated `LatLon`, so always in range; a damaged record reads as the
        // origin rather than panicking.
        LatLon::new(self.lat, self.lon).unwrap_or(LatLon { lat: 0.0, lon: 0.0 })
    }
}

/// The open stays of one user in the fences of one campaign.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct CampaignStays {
    /// The campaign revision the stays were recorded under; a hit of a newer revision forgets
    /// them all (that is how `PUT` forgets stays).
    revision: u64,
    /// The campaign's `max_accuracy_m` at that revision. A ping containing none of the
    /// campaign's fences must still know whether it is applied for the campaign (an exit) or
    /// too inaccurate for it (stays untouched), and the ping's hits cannot tell.
    max_accuracy_m: Option<f64>,
    /// Open stays by fence id.
    fences: FxHashMap<FenceId, Stay>,
}

impl CampaignStays {
    fn new(campaign: &Campaign) -> Self {
        Self { revision: campaign.revision, max_accuracy_m: campaign.max_accuracy_m, fences: FxHashMap::default() }
    }
}

/// One stay: consecutive inside pings of a fence, from an enter to the next exit or TTL gap.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
struct Stay {
    /// `ts_ms` of the enter.
    start_ts_ms: i64,
    /// The stay's candidate was emitted (once per stay, whether or not it was issued).
    used: bool,
}

/// Is a ping of this `accuracy_m` applied under this limit? Equal is applied; an absent accuracy
/// or an absent limit always is.
fn within_accuracy(accuracy_m: Option<f64>, limit_m: Option<f64>) -> bool {
    match (accuracy_m, limit_m) {
        (Some(accuracy), Some(limit)) => accuracy.partial_cmp(&limit) != Some(std::cmp::Ordering::Greater),
        _ => true,
    }
}

/// Rule 0's speed test between two applied pings `gap_ms` apart: speed = haversine / seconds,
/// "exceeds" is `>`, and a zero gap with a non-zero distance is infinitely fast.
fn too_fast(from: LatLon, to: LatLon, gap_ms: i64, max_speed_mps: f64) -> bool {
    let distance_m = haversine_m(from, to);
    if gap_ms <= 0 {
        distance_m > 0.0
    } else {
        distance_m / (gap_ms as f64 / 1000.0) > max_speed_mps
    }
}

/// `state_ttl_s` in milliseconds, saturating.
fn ttl_ms(config: &TriggerConfig) -> i64 {
    i64::try_from(config.state_ttl_s.saturating_mul(1000)).unwrap_or(i64::MAX)
}

/// How long after the enter a stay's candidate is due: an enter trigger is a dwell of zero.
fn due_after_ms(trigger: Trigger) -> i64 {
    match trigger {
        Trigger::Enter => 0,
        Trigger::Dwell { dwell_s } => dwell_s.saturating_mul(1000),
    }
}

/// The first byte of an encoded state: bumped when the encoding changes, so a store holding
/// states of another format is noticed instead of misread.
const ENCODING: u8 = 1;

/// An encoded state could not be read back.
#[derive(Debug, thiserror::Error)]
#[error("trigger state record is damaged or of an unknown format: {0}")]
pub struct DecodeError(String);

impl UserState {
    /// `ts_ms` of the newest applied ping (`i64::MIN` before the first).
    pub fn newest_ts_ms(&self) -> i64 {
        self.last.map_or(i64::MIN, |last| last.ts_ms)
    }

    /// True before the first applied ping: nothing worth storing.
    pub fn is_empty(&self) -> bool {
        self.last.is_none()
    }

    /// Open stays, over every campaign (for metrics and tests).
    pub fn stay_count(&self) -> usize {
        self.campaigns.values().map(|c| c.fences.len()).sum()
    }

    /// The compact binary form the store keeps (a format byte, then postcard).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![ENCODING];
        // Serialising plain structs, strings and numbers into a Vec cannot fail.
        out.extend(postcard::to_stdvec(self).unwrap_or_default());
        out
    }

    /// Reads back what [`UserState::encode`] wrote.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        match bytes.split_first() {
            Some((&ENCODING, rest)) => postcard::from_bytes(rest).map_err(|e| DecodeError(e.to_string())),
            Some((other, _)) => Err(DecodeError(format!("format {other}"))),
            None => Err(DecodeError("empty record".into())),
        }
    }

    /// Applies one ping: decides whether it is ignored, and if not moves every stay it touches.
    /// An ignored ping changes nothing.
    pub fn apply(&mut self, config: &TriggerConfig, ping: &Ping, hits: &[FenceHit<'_>]) -> Outcome {
        if let Some(reason) = self.ignore_reason(config, ping) {
            return Outcome::Ignored(reason);
        }
        if let Some(last) = self.last {
            if ping.ts_ms.saturating_sub(last.ts_ms) > ttl_ms(config) {
                self.campaigns.clear();
            }
        }
        self.last = Some(LastPing { ts_ms: ping.ts_ms, lat: ping.at.lat, lon: ping.at.lon });
        Outcome::Applied { candidates: self.track(ping, hits) }
    }

    /// The first of stale, mocked, inaccurate, implausible speed that holds, if any.
    fn ignore_reason(&self, config: &TriggerConfig, ping: &Ping) -> Option<IgnoreReason> {
        if self.last.is_some_and(|last| ping.ts_ms < last.ts_ms) {
            return Some(IgnoreReason::Stale);
        }
        if ping.mocked {
            return Some(IgnoreReason::Mocked);
        }
        if !within_accuracy(ping.accuracy_m, Some(config.max_accuracy_m)) {
            return Some(IgnoreReason::Inaccurate);
        }
        if config.max_speed_mps > 0.0 {
            if let Some(last) = self.last {
                let gap_ms = ping.ts_ms.saturating_sub(last.ts_ms);
                if gap_ms <= ttl_ms(config) && too_fast(last.at(), ping.at, gap_ms, config.max_speed_mps) {
                    return Some(IgnoreReason::ImplausibleSpeed);
                }
            }
        }
        None
    }

    /// Enters, exits and dwell for an applied ping; returns the candidates (rule 5 applied).
    fn track(&mut self, ping: &Ping, hits: &[FenceHit<'_>]) -> Vec<Candidate> {
        let mut hits: Vec<&FenceHit<'_>> = hits.iter().collect();
        // Grouped by campaign for the per-campaign rules, ascending so candidates come out in
        // campaign id order, and by fence id within a campaign so distance ties go to the
        // smallest fence id.
        hits.sort_unstable_by(|a, b| a.campaign.id.cmp(&b.campaign.id).then_with(|| a.fence.id.cmp(&b.fence.id)));
        hits.dedup_by(|a, b| a.campaign.id == b.campaign.id && a.fence.id == b.fence.id);

        // A ping containing no fence of a campaign is outside all of them: every stay of the
        // campaign ends, unless the ping is too inaccurate for that campaign. This is also how
        // stays of deleted campaigns are dropped.
        self.campaigns.retain(|id, stays| {
            hits.binary_search_by(|hit| hit.campaign.id.cmp(id)).is_ok()
                || !within_accuracy(ping.accuracy_m, stays.max_accuracy_m)
        });

        let mut candidates = Vec::new();
        for group in hits.chunk_by(|a, b| a.campaign.id == b.campaign.id) {
            let campaign = group[0].campaign;
            if !within_accuracy(ping.accuracy_m, campaign.max_accuracy_m) {
                // Not applied for this campaign: neither enter nor exit.
                continue;
            }
            let stays = self.campaigns.entry(campaign.id.clone()).or_insert_with(|| CampaignStays::new(campaign));
            // A stay of an older revision counts as no stay. One of a newer revision is kept:
            // this ping was matched against an index snapshot taken before a `PUT`.
            if stays.revision < campaign.revision {
                *stays = CampaignStays::new(campaign);
            }
            // Exits from the campaign's fences that no longer contain the ping.
            stays.fences.retain(|fence_id, _| group.binary_search_by(|hit| hit.fence.id.cmp(fence_id)).is_ok());

            let due_after_ms = due_after_ms(campaign.trigger);
            let mut nearest: Option<(f64, &FenceId)> = None;
            for hit in group {
                let stay =
                    stays.fences.entry(hit.fence.id.clone()).or_insert(Stay { start_ts_ms: ping.ts_ms, used: false });
                if stay.used || ping.ts_ms.saturating_sub(stay.start_ts_ms) < due_after_ms {
                    continue;
                }
                // Used up whether or not it is the one reported, and whether or not rule 4 lets
                // it issue.
                stay.used = true;
                let distance_m = haversine_m(ping.at, hit.fence.shape.anchor());
                // Strictly nearer only: the group is in fence id order, so ties keep the first.
                if nearest.is_none_or(|(best_m, _)| distance_m < best_m) {
                    nearest = Some((distance_m, &hit.fence.id));
                }
            }
            if let Some((distance_m, fence_id)) = nearest {
                candidates.push(Candidate { campaign: Arc::clone(campaign), fence_id: fence_id.clone(), distance_m });
            }
        }
        candidates
    }
}
