//! One feature partition's state: the dense item blocks (one `Vec` per column family, indexed
//! by row number), the user profiles, the last-writer-wins versions, and its hash.
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::profile::UserState;
use crate::counters;
use crate::domain::{Action, Version};
use crate::ids::{Key, KeyMap};

/// Fixed item attributes before the embedding, in `attrs` row order.
pub(super) const A_PRICE: usize = 0;

pub(super) const A_QUALITY: usize = 1;

pub(super) const A_DURATION: usize = 2;

pub(super) const A_VIDEO: usize = 3;

pub(super) const A_TOPIC: usize = 4;

pub(super) const A_FIXED: usize = 5;

pub(super) const FLAG_DELETED: u8 = 1;

pub(super) const FLAG_IN_STOCK: u8 = 2;

/// A row that has counters but no attributes yet: events for the item arrived (catch-up, replay)
/// before its upsert. Invisible to lookups until the upsert fills it in.
pub(super) const FLAG_PLACEHOLDER: u8 = 4;

/// Settings a partition needs, shared by all partitions of a node.
#[derive(Debug, Clone)]
pub struct ShardSettings {
    pub emb_dim: usize,
    pub topics: usize,
    pub recent_likes: usize,
    pub seen_capacity: usize,
    pub seen_fp: f64,
    /// Profiles of never-upserted users kept in this partition (oldest forgotten beyond it).
    pub unknown_cap: usize,
}

/// Unknown-user bookkeeping of a partition, reported in ClusterStatus and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardCounts {
    pub items: usize,
    pub users: usize,
    pub events: u64,
    pub unknown_users: usize,
    pub unknown_evicted: u64,
}

/// One feature partition's state. Built from one op set it is the same whatever order the ops
/// arrived in (live writes, pulls and streams differ): LWW by a total version, commutative
/// counters and sums, order-free bounded sets (unknown users and author affinities by key rank,
/// seen filters by event-time generation, recent likes by event time). The one case incremental
/// application cannot decide alone (a user upserted after some of its events were dropped by the
/// unknown-user cap, or freeing a place under it) marks the state for a rebuild from the log
/// (`needs_rebuild`, `from_ops`). `state_hash` hashes all of it; see the property test.
pub struct FeatureShardState {
    pub settings: ShardSettings,
    pub(super) index: KeyMap<u32>,
    /// Per row, everything a request reads besides the dense attributes and counters, kept
    /// together so one candidate costs one or two cache lines here, not one per field.
    pub(super) heads: Vec<ItemHead>,
    pub(super) attrs: Vec<f32>,
    pub(super) counters: Vec<u32>,
    /// Per row: every (counter, window) sum, valid for the 5-minute bucket in `window_sums_at`
    /// (window sums only change at bucket boundaries or when an event lands, which invalidates).
    pub(super) window_sums: Vec<[f32; WINDOW_SUMS]>,
    /// Boxed: the map's spare capacity then costs a pointer per slot, not a whole profile.
    pub(super) users: KeyMap<Box<UserState>>,
    /// Last-writer-wins versions (`at`, `seq`, op id) of item and user upserts, so replicas that
    /// receive two upserts of one record in different orders keep the same one.
    pub(super) item_versions: KeyMap<Version>,
    /// Newest delete per item. Kept apart from the upserts' versions: the attributes are the
    /// newest upsert's and the item is deleted when a delete is newer than it, so an upsert that
    /// arrives after a newer delete still leaves the same row as when it arrived before.
    pub(super) item_deletes: KeyMap<Version>,
    pub(super) user_versions: KeyMap<Version>,
    /// Engagement events applied to this partition's items.
    pub(super) events: u64,
    /// Rows holding counters of items not upserted yet.
    pub(super) placeholders: usize,
    /// Never-upserted profiles kept, by rank: the `unknown_cap` smallest ranks of the users seen
    /// only in events, whatever order they came in.
    pub(super) unknown: std::collections::BTreeSet<(u64, Key)>,
    pub(super) unknown_live: usize,
    /// Profiles forgotten and events refused by the cap (a metric: not part of the state).
    pub(super) unknown_evicted: u64,
    /// Some unknown user's events were not kept (cap reached).
    pub(super) unknown_dropped: bool,
    /// Set while building from a whole op set: who is upserted in it and which unknown users
    /// are kept.
    pub(super) admit: Option<Admit>,
    /// The state can no longer be derived incrementally (see the type's doc): rebuild from the
    /// log.
    pub(super) needs_rebuild: bool,
}

pub(super) type KeySet = std::collections::HashSet<Key, crate::ids::KeyBuild>;

/// What `from_ops` decides from the whole set before applying it.
pub(super) struct Admit {
    pub(super) upserted: KeySet,
    pub(super) unknown: KeySet,
}

/// Geo licensing of an item, as region keys (`key_of(geo)`), sorted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ItemRegions {
    /// Not empty: served only to these regions.
    pub allowed: Vec<Key>,
    pub blocked: Vec<Key>,
}

impl ItemRegions {
    /// The rules of a record; None when it has none (most items).
    pub fn of(allowed: &[String], blocked: &[String]) -> Option<Arc<Self>> {
        let keys = |l: &[String]| {
            let mut v: Vec<Key> = l.iter().map(|g| crate::ids::key_of(g)).collect();
            v.sort_unstable();
            v.dedup();
            v
        };
        let r = Self { allowed: keys(allowed), blocked: keys(blocked) };
        (!r.allowed.is_empty() || !r.blocked.is_empty()).then(|| Arc::new(r))
    }

    /// Whether the item may be served to `geo` (a region key; None: the request's region is
    /// unknown, which an allow-list never admits).
    pub fn admits(&self, geo: Option<Key>) -> bool {
        match geo {
            Some(g) => {
                self.blocked.binary_search(&g).is_err()
                    && (self.allowed.is_empty() || self.allowed.binary_search(&g).is_ok())
            }
            None => self.allowed.is_empty(),
        }
    }
}

pub(super) struct ItemHead {
    pub(super) id: Arc<str>,
    pub(super) author: Arc<str>,
    pub(super) author_key: Key,
    pub(super) geo_key: Key,
    pub(super) created_at: i64,
    /// Geo licensing (None: served everywhere).
    pub(super) regions: Option<Arc<ItemRegions>>,
    /// Lifetime impressions and reports of the item (sums: the same in any order), for the
    /// report-rate filter (the windowed counters fold reports into negative feedback).
    pub(super) impressions: u32,
    pub(super) reports: u32,
    /// The 5-minute bucket `window_sums` of this row is valid for.
    pub(super) sums_at: i64,
    pub(super) flags: u8,
}

pub(super) const WINDOW_SUMS: usize = Action::COUNTERS * 3;

pub(super) const SUMS_STALE: i64 = i64::MIN;

pub(super) const ITEM_COUNTER_WIDTH: usize = Action::COUNTERS * counters::WIDTH;

impl FeatureShardState {
    pub fn new(settings: ShardSettings) -> Self {
        Self {
            settings,
            index: KeyMap::default(),
            heads: vec![],
            attrs: vec![],
            counters: vec![],
            window_sums: vec![],
            users: KeyMap::default(),
            item_versions: KeyMap::default(),
            item_deletes: KeyMap::default(),
            user_versions: KeyMap::default(),
            events: 0,
            placeholders: 0,
            unknown: Default::default(),
            unknown_live: 0,
            unknown_evicted: 0,
            unknown_dropped: false,
            admit: None,
            needs_rebuild: false,
        }
    }

    /// Whether incremental application met a case it cannot decide (see the type's doc).
    pub fn needs_rebuild(&self) -> bool {
        self.needs_rebuild
    }

    /// A hash of the whole partition state, entity by entity in key order (not the op-id digest:
    /// it covers what the ops did). Left out: caches (window sums, row numbers, which differ with
    /// arrival order but not what a read returns) and metric counters (`unknown_evicted`).
    pub fn state_hash(&self) -> [u8; 32] {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        let w = self.attr_width();
        let mut items: Vec<(&Key, &u32)> = self.index.iter().collect();
        items.sort_unstable_by_key(|(k, _)| **k);
        h.update(b"items");
        for (k, r) in items {
            let r = *r as usize;
            let hd = &self.heads[r];
            h.update(k.to_le_bytes());
            for part in [hd.id.as_bytes(), hd.author.as_bytes()] {
                h.update((part.len() as u64).to_le_bytes());
                h.update(part);
            }
            h.update(hd.author_key.to_le_bytes());
            h.update(hd.geo_key.to_le_bytes());
            h.update(hd.created_at.to_le_bytes());
            h.update([hd.flags]);
            match &hd.regions {
                Some(r) => {
                    for list in [&r.allowed, &r.blocked] {
                        h.update((list.len() as u64).to_le_bytes());
                        list.iter().for_each(|k| h.update(k.to_le_bytes()));
                    }
                }
                None => h.update([0u8]),
            }
            h.update(hd.impressions.to_le_bytes());
            h.update(hd.reports.to_le_bytes());
            for v in &self.attrs[r * w..(r + 1) * w] {
                h.update(v.to_bits().to_le_bytes());
            }
            for v in &self.counters[r * ITEM_COUNTER_WIDTH..(r + 1) * ITEM_COUNTER_WIDTH] {
                h.update(v.to_le_bytes());
            }
        }
        let versions = |h: &mut Sha256, name: &[u8], m: &KeyMap<Version>| {
            let mut v: Vec<_> = m.iter().collect();
            v.sort_unstable_by_key(|(k, _)| **k);
            h.update(name);
            for (k, (at, seq, id)) in v {
                h.update(k.to_le_bytes());
                h.update(at.to_le_bytes());
                h.update(seq.to_le_bytes());
                h.update(id.to_le_bytes());
            }
        };
        versions(&mut h, b"item_versions", &self.item_versions);
        versions(&mut h, b"item_deletes", &self.item_deletes);
        versions(&mut h, b"user_versions", &self.user_versions);
        h.update(b"users");
        let mut users: Vec<_> = self.users.iter().collect();
        users.sort_unstable_by_key(|(k, _)| **k);
        for (k, u) in users {
            h.update(k.to_le_bytes());
            for part in [u.id.as_bytes(), u.geo.as_bytes()] {
                h.update((part.len() as u64).to_le_bytes());
                h.update(part);
            }
            h.update(u.signup_at.unwrap_or(i64::MIN).to_le_bytes());
            h.update([u8::from(u.upserted)]);
            for list in [&u.follows, &u.blocked] {
                h.update((list.len() as u64).to_le_bytes());
                list.iter().for_each(|a| h.update(a.to_le_bytes()));
            }
            for list in [&u.hidden_topics, &u.topic_hides] {
                h.update((list.len() as u64).to_le_bytes());
                list.iter().for_each(|t| h.update(t.to_le_bytes()));
            }
            let mut hides: Vec<_> = u.author_hides.iter().collect();
            hides.sort_unstable_by_key(|(k, _)| **k);
            h.update((hides.len() as u64).to_le_bytes());
            for (a, n) in hides {
                h.update(a.to_le_bytes());
                h.update(n.to_le_bytes());
            }
            h.update((u.recent_likes.len() as u64).to_le_bytes());
            for (t, i) in &u.recent_likes {
                h.update(t.to_le_bytes());
                h.update(i.to_le_bytes());
            }
            h.update(postcard::to_allocvec(&u.seen).unwrap_or_default());
            u.topic_affinity.iter().for_each(|v| h.update(v.to_le_bytes()));
            u.emb_sum.iter().for_each(|v| h.update(v.to_le_bytes()));
            h.update(u.emb_weight.to_le_bytes());
            let mut aff: Vec<_> = u.author_affinity.iter().collect();
            aff.sort_unstable_by_key(|(k, _)| **k);
            for (a, v) in aff {
                h.update(a.to_le_bytes());
                h.update(v.to_le_bytes());
            }
            u.counters.iter().for_each(|v| h.update(v.to_le_bytes()));
        }
        h.update(b"counts");
        h.update(self.events.to_le_bytes());
        h.update((self.unknown_live as u64).to_le_bytes());
        h.update([u8::from(self.unknown_dropped)]);
        h.finalize().into()
    }

    pub fn counts(&self) -> ShardCounts {
        ShardCounts {
            items: self.item_count(),
            users: self.users.len(),
            events: self.events,
            unknown_users: self.unknown_live,
            unknown_evicted: self.unknown_evicted,
        }
    }

    pub(super) fn attr_width(&self) -> usize {
        A_FIXED + self.settings.emb_dim
    }

    pub fn item_count(&self) -> usize {
        self.heads.len() - self.placeholders
    }

    pub fn user_count(&self) -> usize {
        self.users.len()
    }

    /// The row of an item, created (as a placeholder) when it has none.
    pub(super) fn row_for(&mut self, key: Key) -> usize {
        if let Some(&r) = self.index.get(&key) {
            return r as usize;
        }
        let w = self.attr_width();
        let r = self.heads.len();
        self.index.insert(key, r as u32);
        self.heads.push(ItemHead {
            id: Arc::from(""),
            author: Arc::from(""),
            author_key: 0,
            geo_key: 0,
            created_at: 0,
            regions: None,
            impressions: 0,
            reports: 0,
            sums_at: SUMS_STALE,
            flags: FLAG_PLACEHOLDER,
        });
        self.attrs.resize(self.attrs.len() + w, 0.0);
        self.counters.resize(self.counters.len() + ITEM_COUNTER_WIDTH, 0);
        self.window_sums.push([0.0; WINDOW_SUMS]);
        self.placeholders += 1;
        r
    }

    /// The row of a known item (placeholders are not known).
    pub(super) fn known_row(&self, key: &Key) -> Option<usize> {
        let r = *self.index.get(key)? as usize;
        (self.heads[r].flags & FLAG_PLACEHOLDER == 0).then_some(r)
    }
}
