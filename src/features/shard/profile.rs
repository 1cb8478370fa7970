//! A user's profile in its feature partition, and the snapshot of it a request reads.
use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use super::super::UserFeat;
use super::seen::SeenFilter;
use super::state::ShardSettings;
use crate::counters::{self, Window};
use crate::domain::Action;
use crate::ids::mix;
use crate::ids::{Key, KeyMap};

pub struct UserState {
    pub id: String,
    pub geo: String,
    /// None until an upsert gives a signup time: `user_age_days` then takes its feature default
    /// (0 would make every such user ~20,000 days old, far outside what the model saw).
    pub signup_at: Option<i64>,
    /// False for a profile created by events alone (the user was never upserted): such profiles
    /// are light, capped per partition and forgotten oldest first.
    pub upserted: bool,
    pub follows: Vec<Key>,
    pub blocked: Vec<Key>,
    /// Topics the user asked not to see (`User.hidden_topics`), sorted.
    pub hidden_topics: Vec<u32>,
    /// Hide events per topic (empty until the first hide) and per author (at most
    /// `AUTHOR_AFFINITY_CAP` authors, by rank like `author_affinity`): counts, so the same in any
    /// order; the filters compare them with `filters.hide_topic_after` / `hide_author_after`.
    pub topic_hides: Vec<u32>,
    pub author_hides: KeyMap<u32>,
    /// Liked items with their event time, newest first: the order follows event time, not the
    /// order ops arrive in, so replay, catch-up and live writes give the same list.
    pub recent_likes: VecDeque<(i64, Key)>,
    pub seen: SeenFilter,
    /// Sums of integer action weights: integers, so the same in any order.
    pub topic_affinity: Vec<i64>,
    /// Weighted embedding sum in fixed point (`EMB_SCALE` units per 1.0): a float sum would
    /// differ in its last bits between replicas that added the same events in other orders.
    pub emb_sum: Vec<i64>,
    pub emb_weight: i64,
    /// At most `AUTHOR_AFFINITY_CAP` authors: those with the smallest rank (a hash of the
    /// author), which is the same set in any apply order (evicting the weakest was not).
    pub author_affinity: KeyMap<i32>,
    pub counters: Vec<u32>,
}

/// Fixed-point scale of `UserState::emb_sum` (embedding values are validated to |v| <= 1e3).
pub const EMB_SCALE: f64 = 65_536.0;

/// Authors with an affinity kept per user.
pub const AUTHOR_AFFINITY_CAP: usize = 128;

/// Order-free rank of a key for bounded sets (smallest kept).
pub(super) fn rank(key: Key) -> (u64, Key) {
    (mix(key ^ 0x0005_eed0_fa11), key)
}

/// A copy of what a request needs from the user's profile.
#[derive(Clone, Serialize, Deserialize)]
pub struct UserSnapshot {
    pub known: bool,
    pub geo: String,
    pub signup_at: Option<i64>,
    pub follows: Vec<Key>,
    pub blocked: Vec<Key>,
    pub hidden_topics: Vec<u32>,
    pub topic_hides: Vec<u32>,
    pub author_hides: KeyMap<u32>,
    pub recent_likes: Vec<Key>,
    pub seen: Option<SeenFilter>,
    pub topic_affinity: Vec<f32>,
    pub embedding: Vec<f32>,
    pub author_affinity: KeyMap<f32>,
    pub counters: Vec<u32>,
}

impl UserSnapshot {
    pub fn unknown() -> Self {
        Self {
            known: false,
            geo: String::new(),
            signup_at: None,
            follows: vec![],
            blocked: vec![],
            hidden_topics: vec![],
            topic_hides: vec![],
            author_hides: KeyMap::default(),
            recent_likes: vec![],
            seen: None,
            topic_affinity: vec![],
            embedding: vec![],
            author_affinity: KeyMap::default(),
            counters: vec![],
        }
    }

    pub fn feature(&self, f: UserFeat, now: i64) -> Option<f32> {
        if !self.known {
            return None;
        }
        let count = |c: usize, w: Window| {
            counters::sum(&self.counters[c * counters::WIDTH..(c + 1) * counters::WIDTH], now, w) as f32
        };
        Some(match f {
            UserFeat::AgeDays => ((now - self.signup_at?).max(0) as f32) / 86_400.0,
            UserFeat::NumFollows => self.follows.len() as f32,
            UserFeat::RecentLikes => self.recent_likes.len() as f32,
            UserFeat::Count { counter, window } => count(counter, window),
            UserFeat::Ctr7d => count(1, Window::Week) / (count(0, Window::Week) + 1.0),
        })
    }
}

/// Seen-filter capacity of a light (never-upserted) profile: a full one pre-allocates ~2.4 KB.
pub(super) const LIGHT_SEEN_CAPACITY: usize = 256;

/// A profile: full for an upserted user, light (small seen filter, nothing pre-allocated) for one
/// known only from events.
pub(super) fn new_user(id: &str, s: &ShardSettings, upserted: bool) -> Box<UserState> {
    let seen = if upserted { s.seen_capacity } else { s.seen_capacity.min(LIGHT_SEEN_CAPACITY) };
    Box::new(UserState {
        id: id.to_string(),
        geo: String::new(),
        signup_at: None,
        upserted,
        follows: vec![],
        blocked: vec![],
        hidden_topics: vec![],
        topic_hides: vec![],
        author_hides: KeyMap::default(),
        recent_likes: VecDeque::new(),
        seen: SeenFilter::new(seen, s.seen_fp),
        topic_affinity: vec![0; s.topics],
        emb_sum: vec![0; s.emb_dim],
        emb_weight: 0,
        author_affinity: KeyMap::default(),
        counters: vec![0; Action::COUNTERS * counters::WIDTH],
    })
}
