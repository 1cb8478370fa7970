//! The per-user seen filter: two bloom filters by event-time generation.
use fastbloom::BloomFilter;
use serde::{Deserialize, Serialize};

use crate::ids::Key;

/// Event-time span of one seen-filter generation: a week (the widest counter window), so what a
/// user saw in the last 7 to 14 days is filtered.
pub const SEEN_GENERATION_SECS: i64 = 7 * 86_400;

/// Two bloom filters by event-time generation (`ts / SEEN_GENERATION_SECS`): the newest
/// generation seen and the one before it; older impressions are forgotten. Which generation an
/// impression lands in is a function of its time and the newest time seen, and bloom inserts
/// commute, so the filter is the same whatever order the impressions arrive in (rotating when
/// an insert count reached the capacity, as before, depended on that order). Memory per user is
/// bounded by the two filters; past `capacity` impressions in a week the false-positive rate rises.
#[derive(Clone, Serialize, Deserialize)]
pub struct SeenFilter {
    current: BloomFilter,
    previous: Option<BloomFilter>,
    /// Generation of `current`; None before the first impression.
    generation: Option<i64>,
    capacity: usize,
    fp: f64,
}

impl SeenFilter {
    pub fn new(capacity: usize, fp: f64) -> Self {
        Self { current: Self::fresh(capacity, fp), previous: None, generation: None, capacity, fp }
    }
    fn fresh(capacity: usize, fp: f64) -> BloomFilter {
        BloomFilter::with_false_pos(fp).seed(&0x5eed).expected_items(capacity.max(16))
    }
    /// Records an impression of `item` at event time `ts` (unix seconds).
    pub fn insert(&mut self, item: Key, ts: i64) {
        let g = ts.div_euclid(SEEN_GENERATION_SECS);
        match self.generation {
            Some(cur) if g < cur - 1 => return,
            Some(cur) if g == cur - 1 => {
                let (cap, fp) = (self.capacity, self.fp);
                self.previous.get_or_insert_with(|| Self::fresh(cap, fp)).insert(&item);
                return;
            }
            Some(cur) if g == cur => {}
            cur => {
                let old = std::mem::replace(&mut self.current, Self::fresh(self.capacity, self.fp));
                self.previous = cur.filter(|c| g == c + 1).map(|_| old);
                self.generation = Some(g);
            }
        }
        self.current.insert(&item);
    }
    pub fn contains(&self, item: Key) -> bool {
        self.current.contains(&item) || self.previous.as_ref().is_some_and(|p| p.contains(&item))
    }
}
