//! One user's trigger state (newest applied ping, stays by campaign and fence) and the rules that
//! move it: rule 0 and the ignore reasons, `state_ttl_s`, enters, exits, dwell, rule 5.
//!
//! The state is a plain value: the engine keeps it in its cache and the store keeps it encoded
//! ([`UserState::encode`]), so any node can continue any user's stays (API.md rule 7).

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::de::Deserializer;
use serde::ser::{SerializeMap, SerializeStruct, Serializer};
use serde::{Deserialize, Serialize};

use crate::domain::{haversine_m, CampaignId, FenceId, LatLon, Ping, Trigger};

use super::{Candidate, FenceHit, IgnoreReason, Outcome, TriggerConfig};

/// Everything the rules remember about one user.
///
/// Kept small, because a node holds one per active user: the open stays are one flat slice
/// sorted by (campaign id, fence id), sized exactly (a user is rarely in more than a few stays),
/// and the ids in it are `Arc` clones of the matched campaign's own ids, so a stay costs 64 bytes
/// and one allocation holds all of a user's stays. (Maps of maps cost two hash tables per user:
/// 613 heap bytes for a user in one stay against 189 now, `benches/trigger_state.rs`.)
#[derive(Debug, Clone, PartialEq)]
pub struct UserState {
    /// The newest applied ping: its time decides staleness and TTL gaps, its place rule 0.
    /// [`LastPing::NONE`] before the first applied ping (such a state is never stored); read
    /// through [`UserState::last`]. Not an `Option`, which would cost every user 8 bytes.
    last: LastPing,
    /// Open stays, sorted by (campaign id, fence id), no two for one fence. A boxed slice, not a
    /// `Vec`: stays change only on enters and exits, and the spare capacity field would cost
    /// every tracked user 8 bytes.
    stays: Box<[Stay]>,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
struct LastPing {
    ts_ms: i64,
    /// `at` as (lat, lon): [`LatLon`] is built only from validated input.
    lat: f64,
    lon: f64,
}

impl LastPing {
    /// No ping applied yet: no valid ping is this old.
    const NONE: LastPing = LastPing { ts_ms: i64::MIN, lat: 0.0, lon: 0.0 };

    fn at(&self) -> LatLon {
        // Written from a validated `LatLon`, so always in range; a damaged record reads as the
        // origin rather than panicking.
        LatLon::new(self.lat, self.lon).unwrap_or(LatLon { lat: 0.0, lon: 0.0 })
    }
}

/// One stay: consecutive inside pings of a fence, from an enter to the next exit or TTL gap.
#[derive(Debug, Clone, PartialEq)]
struct Stay {
    campaign: CampaignId,
    fence: FenceId,
    /// The campaign revision the stay was recorded under; a hit of a newer revision forgets the
    /// campaign's stays (that is how `PUT` forgets them). The same for every stay of a campaign.
    revision: u64,
    /// The campaign's `max_accuracy_m` at that revision, `INFINITY` for none. A ping containing
    /// none of the campaign's fences must still know whether it is applied for the campaign (an
    /// exit) or too inaccurate for it (stays untouched), and the ping's hits cannot tell.
    max_accuracy_m: f64,
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

impl Default for UserState {
    fn default() -> Self {
        Self { last: LastPing::NONE, stays: Box::default() }
    }
}

impl UserState {
    /// The newest applied ping, if any.
    fn last(&self) -> Option<LastPing> {
        (self.last.ts_ms != i64::MIN).then_some(self.last)
    }

    /// `ts_ms` of the newest applied ping (`i64::MIN` before the first).
    pub fn newest_ts_ms(&self) -> i64 {
        self.last.ts_ms
    }

    /// True before the first applied ping: nothing worth storing.
    pub fn is_empty(&self) -> bool {
        self.last().is_none()
    }

    /// Open stays, over every campaign (for metrics and tests).
    pub fn stay_count(&self) -> usize {
        self.stays.len()
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
        if let Some(last) = self.last() {
            if ping.ts_ms.saturating_sub(last.ts_ms) > ttl_ms(config) {
                self.stays = Box::default();
            }
        }
        self.last = LastPing { ts_ms: ping.ts_ms, lat: ping.at.lat, lon: ping.at.lon };
        Outcome::Applied { candidates: self.track(ping, hits) }
    }

    /// The first of stale, mocked, inaccurate, implausible speed that holds, if any.
    fn ignore_reason(&self, config: &TriggerConfig, ping: &Ping) -> Option<IgnoreReason> {
        if self.last().is_some_and(|last| ping.ts_ms < last.ts_ms) {
            return Some(IgnoreReason::Stale);
        }
        if ping.mocked {
            return Some(IgnoreReason::Mocked);
        }
        if !within_accuracy(ping.accuracy_m, Some(config.max_accuracy_m)) {
            return Some(IgnoreReason::Inaccurate);
        }
        if config.max_speed_mps > 0.0 {
            if let Some(last) = self.last() {
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
        // smallest fence id (and the stays of a group come out in their own order).
        hits.sort_unstable_by(|a, b| a.campaign.id.cmp(&b.campaign.id).then_with(|| a.fence.id.cmp(&b.fence.id)));
        hits.dedup_by(|a, b| a.campaign.id == b.campaign.id && a.fence.id == b.fence.id);

        // A ping containing no fence of a campaign is outside all of them: every stay of the
        // campaign ends, unless the ping is too inaccurate for that campaign. This is also how
        // stays of deleted campaigns are dropped.
        let stays_on = |stay: &Stay| {
            hits.binary_search_by(|hit| hit.campaign.id.cmp(&stay.campaign)).is_ok()
                || !within_accuracy(ping.accuracy_m, Some(stay.max_accuracy_m))
        };
        if !self.stays.iter().all(stays_on) {
            self.stays = self.stays.iter().filter(|stay| stays_on(stay)).cloned().collect();
        }

        let mut candidates = Vec::new();
        for group in hits.chunk_by(|a, b| a.campaign.id == b.campaign.id) {
            let campaign = group[0].campaign;
            if !within_accuracy(ping.accuracy_m, campaign.max_accuracy_m) {
                // Not applied for this campaign: neither enter nor exit.
                continue;
            }
            let from = self.stays.partition_point(|stay| stay.campaign < campaign.id);
            let to = from + self.stays[from..].partition_point(|stay| stay.campaign == campaign.id);
            // A stay of an older revision counts as no stay. One of a newer revision is kept (and
            // its revision with it): this ping was matched against an index snapshot taken
            // before a `PUT`.
            let kept_as = match self.stays[from..to].first() {
                Some(stay) if stay.revision >= campaign.revision => Some((stay.revision, stay.max_accuracy_m)),
                _ => None,
            };
            let kept = kept_as.is_some();
            let (revision, max_accuracy_m) =
                kept_as.unwrap_or((campaign.revision, campaign.max_accuracy_m.unwrap_or(f64::INFINITY)));
            let same_fences = kept
                && to - from == group.len()
                && self.stays[from..to].iter().zip(group).all(|(stay, hit)| stay.fence == hit.fence.id);
            if !same_fences {
                // Enters and exits: the group's stays become exactly the fences containing the
                // ping, each keeping its stay if it had one. Rebuilt at its exact size.
                let old = if kept { &self.stays[from..to] } else { &[][..] };
                let mut stays = Vec::with_capacity(self.stays.len() - (to - from) + group.len());
                stays.extend_from_slice(&self.stays[..from]);
                for hit in group {
                    let open = old.binary_search_by(|stay| stay.fence.cmp(&hit.fence.id)).ok().map(|i| &old[i]);
                    stays.push(Stay {
                        campaign: campaign.id.clone(),
                        fence: hit.fence.id.clone(),
                        revision,
                        max_accuracy_m,
                        start_ts_ms: open.map_or(ping.ts_ms, |stay| stay.start_ts_ms),
                        used: open.is_some_and(|stay| stay.used),
                    });
                }
                stays.extend_from_slice(&self.stays[to..]);
                self.stays = stays.into_boxed_slice();
            }

            let due_after_ms = due_after_ms(campaign.trigger);
            let mut nearest: Option<(f64, &FenceId)> = None;
            for (stay, hit) in self.stays[from..from + group.len()].iter_mut().zip(group) {
                // A state read back from the store holds its own copies of the ids; taking the
                // matched campaign's keeps a cached user at its compact size.
                if !stay.fence.shares_allocation(&hit.fence.id) {
                    stay.campaign = campaign.id.clone();
                    stay.fence = hit.fence.id.clone();
                }
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

// The stored form (`encode`) is the one every kabao version since the first has written: stays
// grouped by campaign in a map of campaign id to (revision, max accuracy, map of fence id to
// stay), in postcard. Nodes of different versions on one Redis, and a data dir written before
// the flat layout, read each other's states.

/// One campaign's stays as stored.
#[derive(Deserialize)]
struct StoredCampaign {
    revision: u64,
    max_accuracy_m: Option<f64>,
    fences: BTreeMap<FenceId, StoredStay>,
}

/// One stay as stored.
#[derive(Serialize, Deserialize)]
struct StoredStay {
    start_ts_ms: i64,
    used: bool,
}

#[derive(Deserialize)]
struct StoredState {
    last: Option<LastPing>,
    campaigns: BTreeMap<CampaignId, StoredCampaign>,
}

/// The stored accuracy limit of a stay: `None` for no limit.
fn stored_accuracy(max_accuracy_m: f64) -> Option<f64> {
    max_accuracy_m.is_finite().then_some(max_accuracy_m)
}

impl Serialize for UserState {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        /// The stays of one campaign, as a map of fence id to stay.
        struct Fences<'a>(&'a [Stay]);
        impl Serialize for Fences<'_> {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                let mut map = serializer.serialize_map(Some(self.0.len()))?;
                for stay in self.0 {
                    map.serialize_entry(&stay.fence, &StoredStay { start_ts_ms: stay.start_ts_ms, used: stay.used })?;
                }
                map.end()
            }
        }
        /// One campaign's stays (non-empty, all of one campaign).
        struct CampaignStays<'a>(&'a [Stay]);
        impl Serialize for CampaignStays<'_> {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                let mut fields = serializer.serialize_struct("CampaignStays", 3)?;
                fields.serialize_field("revision", &self.0[0].revision)?;
                fields.serialize_field("max_accuracy_m", &stored_accuracy(self.0[0].max_accuracy_m))?;
                fields.serialize_field("fences", &Fences(self.0))?;
                fields.end()
            }
        }
        /// Every stay, grouped by campaign.
        struct Campaigns<'a>(&'a [Stay]);
        impl Serialize for Campaigns<'_> {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                let groups = || self.0.chunk_by(|a, b| a.campaign == b.campaign);
                let mut map = serializer.serialize_map(Some(groups().count()))?;
                for group in groups() {
                    map.serialize_entry(&group[0].campaign, &CampaignStays(group))?;
                }
                map.end()
            }
        }
        let mut fields = serializer.serialize_struct("UserState", 2)?;
        fields.serialize_field("last", &self.last())?;
        fields.serialize_field("campaigns", &Campaigns(&self.stays))?;
        fields.end()
    }
}

impl<'de> Deserialize<'de> for UserState {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let stored = StoredState::deserialize(deserializer)?;
        let count = stored.campaigns.values().map(|c| c.fences.len()).sum();
        let mut stays = Vec::with_capacity(count);
        // Both maps are ordered, so the stays come out sorted by (campaign, fence).
        for (campaign, stored_campaign) in stored.campaigns {
            for (fence, stay) in stored_campaign.fences {
                stays.push(Stay {
                    campaign: campaign.clone(),
                    fence,
                    revision: stored_campaign.revision,
                    max_accuracy_m: stored_campaign.max_accuracy_m.unwrap_or(f64::INFINITY),
                    start_ts_ms: stay.start_ts_ms,
                    used: stay.used,
                });
            }
        }
        Ok(UserState { last: stored.last.unwrap_or(LastPing::NONE), stays: stays.into_boxed_slice() })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use serde::Serialize;

    use super::{LastPing, StoredStay, UserState};
    use crate::domain::{CampaignId, FenceId, Trigger};
    use crate::trigger::testkit::{at, campaign, fence, hits_of, ping};
    use crate::trigger::TriggerConfig;

    /// The stored form as the first kabao versions derived it from their maps of maps.
    #[derive(Serialize)]
    struct FirstState {
        last: Option<LastPing>,
        campaigns: BTreeMap<CampaignId, FirstCampaign>,
    }

    #[derive(Serialize)]
    struct FirstCampaign {
        revision: u64,
        max_accuracy_m: Option<f64>,
        fences: BTreeMap<FenceId, StoredStay>,
    }

    #[test]
    fn the_stored_form_is_the_one_earlier_versions_wrote_and_read() {
        let mut accurate = campaign("b-accurate", Trigger::Dwell { dwell_s: 60 }, vec![fence("z", 0.0, 0.0, 80.0)]);
        accurate.max_accuracy_m = Some(30.0);
        let world = vec![
            Arc::new(campaign(
                "a-enter",
                Trigger::Enter,
                vec![fence("f2", 0.0, 0.0, 50.0), fence("f1", 0.0, 5.0, 50.0)],
            )),
            Arc::new(accurate),
        ];
        let place = at(0.0, 1.0);
        let mut state = UserState::default();
        let p = ping("phone", place, 1_700_000_000_000);
        state.apply(&TriggerConfig::DEFAULTS, &p, &hits_of(&world, place));
        assert_eq!(state.stay_count(), 3);

        let stay = |used| StoredStay { start_ts_ms: 1_700_000_000_000, used };
        let fences = |ids: &[(&str, bool)]| {
            ids.iter().map(|(id, used)| (FenceId::parse("id", id).unwrap(), stay(*used))).collect()
        };
        let first = FirstState {
            last: Some(LastPing { ts_ms: 1_700_000_000_000, lat: place.lat, lon: place.lon }),
            campaigns: BTreeMap::from([
                (
                    CampaignId::parse("id", "a-enter").unwrap(),
                    // Rule 5: one candidate per campaign, both stays used up.
                    FirstCampaign { revision: 1, max_accuracy_m: None, fences: fences(&[("f1", true), ("f2", true)]) },
                ),
                (
                    CampaignId::parse("id", "b-accurate").unwrap(),
                    FirstCampaign { revision: 1, max_accuracy_m: Some(30.0), fences: fences(&[("z", false)]) },
                ),
            ]),
        };
        let mut first_bytes = vec![super::ENCODING];
        first_bytes.extend(postcard::to_stdvec(&first).unwrap());

        assert_eq!(state.encode(), first_bytes);
        assert_eq!(UserState::decode(&first_bytes).unwrap(), state);
    }

    #[test]
    fn a_state_read_back_from_the_store_shares_the_campaigns_ids_after_its_next_ping() {
        let world = vec![Arc::new(campaign("dwell", Trigger::Dwell { dwell_s: 60 }, vec![fence("f", 0.0, 0.0, 50.0)]))];
        let place = at(0.0, 1.0);
        let mut state = UserState::default();
        state.apply(&TriggerConfig::DEFAULTS, &ping("phone", place, 1_700_000_000_000), &hits_of(&world, place));
        let mut read_back = UserState::decode(&state.encode()).unwrap();
        let ids = &world[0].fences[0].id;
        assert!(!read_back.stays[0].fence.shares_allocation(ids));

        read_back.apply(&TriggerConfig::DEFAULTS, &ping("phone", place, 1_700_000_001_000), &hits_of(&world, place));
        assert!(read_back.stays[0].fence.shares_allocation(ids));
        assert!(read_back.stays[0].campaign.shares_allocation(&world[0].id));
        assert_eq!(read_back.stays[0].start_ts_ms, 1_700_000_000_000, "the stay goes on");
    }
}
