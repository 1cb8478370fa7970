//! Applying ops to a feature partition: upserts and deletes by last-writer-wins versions,
//! engagements into counters and profiles, the unknown-user cap, and building from a whole op set.
use std::sync::Arc;

use super::profile::{new_user, rank, AUTHOR_AFFINITY_CAP, EMB_SCALE};
use super::state::*;
use crate::counters;
use crate::domain::{Action, ItemRecord, LoggedOp, Op, UserEvent, UserRecord, Version};
use crate::ids::{key_of, Key, KeyMap};

impl FeatureShardState {
    /// The state of a whole op set (replay, rebuild): the unknown users kept are decided from the
    /// set first (the `unknown_cap` smallest ranks among users with events and no upsert), then
    /// the ops are applied in the order given. Equal to applying the set one op at a time in any
    /// order whenever that needs no rebuild.
    pub fn from_ops<'a>(settings: ShardSettings, ops: impl IntoIterator<Item = &'a LoggedOp> + Clone) -> Self {
        let mut upserted = KeySet::default();
        let mut eventful = KeySet::default();
        for o in ops.clone() {
            match &o.op {
                Op::UpsertUser { user, .. } => {
                    upserted.insert(key_of(&user.id));
                }
                Op::UpsertUserV1 { user, .. } => {
                    upserted.insert(key_of(&user.id));
                }
                Op::UserEvent(e) => {
                    eventful.insert(e.user);
                }
                _ => {}
            }
        }
        let mut unknown: Vec<(u64, Key)> =
            eventful.iter().filter(|k| !upserted.contains(*k)).map(|k| rank(*k)).collect();
        unknown.sort_unstable();
        let cap = settings.unknown_cap;
        let dropped = unknown.len() > cap;
        let mut st = Self::new(settings);
        st.admit = Some(Admit { unknown: unknown.iter().take(cap).map(|(_, k)| *k).collect(), upserted });
        for o in ops {
            st.apply(o);
        }
        st.admit = None;
        st.unknown_dropped = dropped;
        st.needs_rebuild = false;
        st
    }

    /// Whether a user seen only in events gets (or keeps) a light profile: the `unknown_cap`
    /// smallest ranks are kept; a smaller rank evicts the largest kept.
    fn admit_unknown(&mut self, key: Key) -> bool {
        let r = rank(key);
        if let Some(admit) = &self.admit {
            if !admit.unknown.contains(&key) {
                self.unknown_evicted += 1;
                return false;
            }
        } else if self.unknown.len() >= self.settings.unknown_cap {
            self.unknown_dropped = true;
            match self.unknown.last().copied() {
                Some(largest) if r < largest => {
                    self.unknown.remove(&largest);
                    self.users.remove(&largest.1);
                    self.unknown_live -= 1;
                }
                _ => {
                    self.unknown_evicted += 1;
                    return false;
                }
            }
            self.unknown_evicted += 1;
        }
        self.unknown.insert(r);
        self.unknown_live += 1;
        true
    }

    /// Applies one logged op of this partition (live writes, catch-up and replay alike).
    pub fn apply(&mut self, o: &LoggedOp) {
        let newer = |m: &mut KeyMap<Version>, k: Key, v: Version| match m.get(&k) {
            Some(old) if *old >= v => false,
            _ => {
                m.insert(k, v);
                true
            }
        };
        let version = Op::version(o).unwrap_or((o.at, 0, o.id));
        match &o.op {
            Op::UpsertItem { item: it, .. } => self.apply_item_upsert(it, version),
            Op::UpsertItemV1 { item: it, .. } => self.apply_item_upsert(&ItemRecord::from(it), version),
            Op::DeleteItem { item: k, .. } => {
                // Versioned like an upsert: an older upsert arriving later does not bring it back.
                if newer(&mut self.item_deletes, *k, version) && self.item_versions.get(k).is_none_or(|u| *u < version)
                {
                    self.delete_items(&[*k]);
                }
            }
            Op::UpsertUser { user: u, .. } => {
                if newer(&mut self.user_versions, key_of(&u.id), version) {
                    self.upsert_user(u);
                }
            }
            Op::UpsertUserV1 { user: u, .. } => {
                if newer(&mut self.user_versions, key_of(&u.id), version) {
                    self.upsert_user(&UserRecord::from(u));
                }
            }
            Op::ItemEvent { item, action, ts } => {
                self.events += 1;
                self.apply_item_event(*item, *action, *ts)
            }
            Op::UserEvent(e) => self.apply_user_event(e),
            Op::AuthorItem { .. } | Op::Engagement { .. } | Op::Pair { .. } | Op::TopicItem { .. } => {
                debug_assert!(false, "generator op sent to a feature partition");
            }
        }
    }

    /// An item upsert with its version: last writer wins, a newer delete still holds.
    fn apply_item_upsert(&mut self, it: &ItemRecord, version: Version) {
        let k = key_of(&it.id);
        let newer = match self.item_versions.get(&k) {
            Some(old) if *old >= version => false,
            _ => {
                self.item_versions.insert(k, version);
                true
            }
        };
        if newer {
            self.upsert_item(it);
            if self.item_deletes.get(&k).is_some_and(|d| *d > version) {
                self.delete_items(&[k]);
            }
        }
    }

    pub fn upsert_item(&mut self, it: &ItemRecord) {
        let key = key_of(&it.id);
        if let Some(&r) = self.index.get(&key) {
            if collides(&self.heads[r as usize].id, &it.id) {
                return;
            }
        }
        let w = self.attr_width();
        let row = self.row_for(key);
        if self.heads[row].flags & FLAG_PLACEHOLDER != 0 {
            self.placeholders -= 1;
        }
        let h = &mut self.heads[row];
        h.id = Arc::from(it.id.as_str());
        h.author = Arc::from(it.author.as_str());
        h.author_key = key_of(&it.author);
        h.geo_key = key_of(&it.geo);
        h.created_at = it.created_at;
        h.regions = ItemRegions::of(&it.allowed_regions, &it.blocked_regions);
        h.flags = (if it.deleted { FLAG_DELETED } else { 0 }) | (if it.in_stock { FLAG_IN_STOCK } else { 0 });
        let a = &mut self.attrs[row * w..(row + 1) * w];
        a[A_PRICE] = it.price;
        a[A_QUALITY] = it.quality;
        a[A_DURATION] = it.duration_secs;
        a[A_VIDEO] = if it.is_video { 1.0 } else { 0.0 };
        a[A_TOPIC] = it.topic as f32;
        // Missing or short embeddings are zero-padded to the declared width.
        let emb = &mut a[A_FIXED..];
        emb.fill(0.0);
        emb.iter_mut().zip(&it.embedding).for_each(|(d, v)| *d = *v);
    }

    /// Marks items deleted (rows stay so that late events and filters still resolve them).
    pub fn delete_items(&mut self, keys: &[Key]) -> u32 {
        let mut found = 0;
        for k in keys {
            if let Some(r) = self.known_row(k) {
                self.heads[r].flags |= FLAG_DELETED;
                found += 1;
            }
        }
        found
    }

    pub fn upsert_user(&mut self, u: &UserRecord) {
        let key = key_of(&u.id);
        if self.users.get(&key).is_some_and(|st| collides(&st.id, &u.id)) {
            return;
        }
        let s = self.settings.clone();
        let light = self.users.get(&key).is_some_and(|st| !st.upserted);
        if self.admit.is_none() && self.unknown_dropped && (light || !self.users.contains_key(&key)) {
            // A user upserted now may have had events refused by the cap (its rank is above the
            // kept ones), and a light profile promoted frees a place a refused user should have
            // had: the state of this op set is the rebuilt one.
            let r = rank(key);
            if light || self.unknown.last().is_none_or(|largest| r > *largest) {
                self.needs_rebuild = true;
            }
        }
        if light {
            // A full profile, as if the upsert had come first: the light one's seen filter is
            // smaller, and the order of upsert and events must not decide the filter's size.
            // Its events are replayed into the new profile by the rebuild when there is one;
            // without one (nothing was dropped) they are moved over here.
            let old = self.users.remove(&key).map(|b| *b);
            self.unknown.remove(&rank(key));
            self.unknown_live -= 1;
            if let Some(old) = old {
                let mut full = new_user(&u.id, &s, true);
                full.recent_likes = old.recent_likes;
                full.topic_affinity = old.topic_affinity;
                full.emb_sum = old.emb_sum;
                full.emb_weight = old.emb_weight;
                full.author_affinity = old.author_affinity;
                full.counters = old.counters;
                full.topic_hides = old.topic_hides;
                full.author_hides = old.author_hides;
                full.seen = old.seen;
                if self.admit.is_none() {
                    // The light filter cannot be widened: rebuild so it is the full one.
                    self.needs_rebuild = true;
                }
                self.users.insert(key, full);
            }
        }
        let state = self.users.entry(key).or_insert_with(|| new_user(&u.id, &s, true));
        state.upserted = true;
        state.geo = u.geo.clone();
        state.signup_at = (u.signup_at != 0).then_some(u.signup_at);
        state.follows = u.follows.iter().map(|a| key_of(a)).collect();
        state.follows.sort_unstable();
        state.follows.dedup();
        state.blocked = u.blocked_authors.iter().map(|a| key_of(a)).collect();
        state.blocked.sort_unstable();
        state.blocked.dedup();
        state.hidden_topics = u.hidden_topics.clone();
        state.hidden_topics.sort_unstable();
        state.hidden_topics.dedup();
    }

    /// Counts an engagement. An item not upserted yet gets a placeholder row, so the order in
    /// which a replica receives an item and its events (live, replay, catch-up) does not matter.
    pub fn apply_item_event(&mut self, item: Key, action: Action, ts: i64) {
        let r = self.row_for(item);
        let base = r * ITEM_COUNTER_WIDTH + action.counter() * counters::WIDTH;
        counters::add(&mut self.counters[base..base + counters::WIDTH], ts, 1);
        let h = &mut self.heads[r];
        h.sums_at = SUMS_STALE;
        match action {
            Action::Impression => h.impressions = h.impressions.saturating_add(1),
            Action::Report => h.reports = h.reports.saturating_add(1),
            _ => {}
        }
    }

    pub fn apply_user_event(&mut self, e: &UserEvent) {
        if self.users.get(&e.user).is_some_and(|st| collides(&st.id, &e.user_id)) {
            return;
        }
        if !self.users.contains_key(&e.user) {
            if self.admit.as_ref().is_some_and(|a| a.upserted.contains(&e.user)) {
                // Upserted later in this set: a full profile from the start, as if the upsert
                // had come first.
                self.users.insert(e.user, new_user(&e.user_id, &self.settings, true));
            } else if self.admit_unknown(e.user) {
                self.users.insert(e.user, new_user(&e.user_id, &self.settings, false));
            } else {
                return; // beyond the cap (a cap of 0: unknown users keep no profile at all)
            }
        }
        let s = &self.settings;
        let Some(u) = self.users.get_mut(&e.user) else { return };
        let base = e.action.counter() * counters::WIDTH;
        counters::add(&mut u.counters[base..base + counters::WIDTH], e.ts, 1);
        let weight = match e.action {
            Action::Impression => {
                u.seen.insert(e.item, e.ts);
                return;
            }
            Action::Click => 1,
            Action::Like => {
                // Keep the newest like per item, ordered by (event time, item) descending, so
                // the list is a function of the events, whatever order they are applied in.
                let newer = match u.recent_likes.iter().position(|(_, k)| *k == e.item) {
                    Some(i) if u.recent_likes[i].0 >= e.ts => false,
                    Some(i) => {
                        u.recent_likes.remove(i);
                        true
                    }
                    None => true,
                };
                if newer {
                    let pos = u.recent_likes.iter().position(|&(t, k)| (t, k) < (e.ts, e.item));
                    u.recent_likes.insert(pos.unwrap_or(u.recent_likes.len()), (e.ts, e.item));
                    u.recent_likes.truncate(s.recent_likes);
                }
                2
            }
            Action::Share => 3,
            Action::Hide | Action::Report => -3,
        };
        if e.action == Action::Hide {
            if u.topic_hides.is_empty() {
                u.topic_hides = vec![0; s.topics];
            }
            if let Some(t) = u.topic_hides.get_mut(e.topic as usize) {
                *t = t.saturating_add(1);
            }
            // Bounded like the affinities: the authors of smallest rank are kept.
            let admitted = u.author_hides.contains_key(&e.author_key)
                || u.author_hides.len() < AUTHOR_AFFINITY_CAP
                || match u.author_hides.keys().map(|a| rank(*a)).max() {
                    Some(l) if rank(e.author_key) < l => {
                        u.author_hides.remove(&l.1);
                        true
                    }
                    _ => false,
                };
            if admitted {
                let n = u.author_hides.entry(e.author_key).or_insert(0);
                *n = n.saturating_add(1);
            }
        }
        if let Some(t) = u.topic_affinity.get_mut(e.topic as usize) {
            *t += i64::from(weight);
        }
        if weight > 0 {
            for (d, v) in u.emb_sum.iter_mut().zip(e.embedding.iter()) {
                *d = d.saturating_add((f64::from(weight) * f64::from(*v) * EMB_SCALE).round() as i64);
            }
            u.emb_weight += i64::from(weight);
        }
        // Bounded per user: the authors of smallest rank are kept (a set, not an arrival order).
        if u.author_affinity.len() >= AUTHOR_AFFINITY_CAP && !u.author_affinity.contains_key(&e.author_key) {
            let largest = u.author_affinity.keys().map(|a| rank(*a)).max();
            match largest {
                Some(l) if rank(e.author_key) < l => {
                    u.author_affinity.remove(&l.1);
                }
                _ => return,
            }
        }
        let a = u.author_affinity.entry(e.author_key).or_insert(0);
        *a = a.saturating_add(weight);
    }
}

/// Two ids with one 64-bit key (see README, "Entity ids"): the record keeps the first id and the
/// other's write is dropped and counted, rather than merged into a stranger's record. Applied in
/// log order, every replica and every replay drops the same one.
fn collides(held: &str, incoming: &str) -> bool {
    if held.is_empty() || held == incoming {
        return false;
    }
    metrics::counter!("recsys_key_collisions_total").increment(1);
    tracing::error!(held, incoming, "two ids share one 64-bit key; the later one's write is dropped");
    true
}
