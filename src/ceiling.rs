//! A ceiling on how many users' trigger states are kept (`max_tracked_users`): once over it, the
//! longest idle go first.
//!
//! Used by the node's cache of trigger states ([`crate::trigger::TriggerEngine`]) and by the
//! stores that hold every state in memory (the in-memory and embedded stores). Going over the
//! ceiling drops down to 90 % of it, so the O(n) selection runs once per `max / 10` new users
//! rather than at every one, and a flood of made-up user ids costs bounded memory.

use std::hash::{BuildHasher, Hash};

use rustc_hash::{FxBuildHasher, FxHashMap};

use crate::domain::UserId;

/// Which of `shards` maps (a power of two) holds `user`'s entry, for the per-user maps that are
/// split so that none grows (and rehashes) all at once.
pub(crate) fn user_shard(user: &UserId, shards: usize) -> usize {
    debug_assert!(shards.is_power_of_two());
    // The high bits of an Fx hash are the well-mixed ones; the maps place entries by the low ones.
    (FxBuildHasher.hash_one(user) >> 32) as usize & (shards - 1)
}

/// Gives a map's table back once it is less than a quarter full: a map never shrinks by itself,
/// so after a crowd of users has come and gone its table would keep the crowd's size.
pub(crate) fn shrink_if_mostly_empty<K: Hash + Eq, V>(map: &mut FxHashMap<K, V>) {
    if map.len() < map.capacity() / 4 {
        map.shrink_to_fit();
    }
}

/// Which entries to drop: those idle since before `cut`, then `ties` of those idle since exactly
/// `cut` (so exactly the planned number goes even when many share a time).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdleCut {
    cut: i64,
    ties: usize,
    dropped: usize,
}

impl IdleCut {
    /// The cut for entries last active at `times` under a ceiling of `max` (0: no ceiling);
    /// `None` when nothing has to go. Under the ceiling (every commit of a store that checks
    /// it) this costs a length check, not a copy of the times.
    pub fn plan(times: impl ExactSizeIterator<Item = i64>, max: usize) -> Option<IdleCut> {
        if max == 0 || times.len() <= max {
            return None;
        }
        let mut times: Vec<i64> = times.collect();
        let keep = max - max / 10;
        let drop = times.len() - keep;
        let (below, &mut cut, _) = times.select_nth_unstable(drop - 1);
        let strictly_older = below.iter().filter(|&&t| t < cut).count();
        Some(IdleCut { cut, ties: drop - strictly_older, dropped: 0 })
    }

    /// Whether the entry last active at `time` goes (call once per entry, as in `retain`).
    pub fn drops(&mut self, time: i64) -> bool {
        let goes = time < self.cut || (time == self.cut && self.ties > 0);
        if time == self.cut && goes {
            self.ties -= 1;
        }
        self.dropped += goes as usize;
        goes
    }

    /// How many entries [`IdleCut::drops`] said go.
    pub fn dropped(&self) -> usize {
        self.dropped
    }
}

#[cfg(test)]
mod tests {
    use super::IdleCut;
    use proptest::prelude::*;

    #[test]
    fn under_the_ceiling_nothing_goes() {
        assert_eq!(IdleCut::plan([1, 2, 3].into_iter(), 3), None);
        assert_eq!(IdleCut::plan([1, 2, 3].into_iter(), 0), None);
    }

    proptest! {
        /// Against a brute force: exactly `len − 90 % of max` go, and none that goes was active
        /// later than one that stays.
        #[test]
        fn the_longest_idle_go_down_to_ninety_percent(
            times in proptest::collection::vec(0i64..20, 0..200),
            max in 1usize..150,
        ) {
            let Some(mut cut) = IdleCut::plan(times.clone().into_iter(), max) else {
                prop_assert!(times.len() <= max);
                return Ok(());
            };
            let gone: Vec<bool> = times.iter().map(|&t| cut.drops(t)).collect();
            prop_assert_eq!(cut.dropped(), times.len() - (max - max / 10));
            prop_assert_eq!(gone.iter().filter(|&&g| g).count(), cut.dropped());
            let newest_gone = times.iter().zip(&gone).filter(|(_, &g)| g).map(|(t, _)| *t).max();
            let oldest_kept = times.iter().zip(&gone).filter(|(_, &g)| !g).map(|(t, _)| *t).min();
            if let (Some(gone), Some(kept)) = (newest_gone, oldest_kept) {
                prop_assert!(gone <= kept);
            }
        }
    }
}
