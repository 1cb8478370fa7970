//! A feature partition: item rows and user profiles for the entities hashed to it, held in
//! dense in-memory blocks (one `Vec` per column family, indexed by row number). Runs as a ractor
//! actor; sled is the durable copy and is replayed into it on start.
use std::collections::VecDeque;
use std::sync::Arc;

use fastbloom::BloomFilter;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use serde::{Deserialize, Serialize};

use super::{ItemFeat, UserFeat};
use crate::counters::{self, Window};
use crate::generators::mix;
use crate::ids::{key_of, Key, KeyMap};
use crate::ingest::ops::{Op, Version};
use crate::store::{Action, ItemRecord, LoggedOp, UserRecord};

/// Fixed item attributes before the embedding, in `attrs` row order.
const A_PRICE: usize = 0;
const A_QUALITY: usize = 1;
const A_DURATION: usize = 2;
const A_VIDEO: usize = 3;
const A_TOPIC: usize = 4;
const A_FIXED: usize = 5;

const FLAG_DELETED: u8 = 1;
const FLAG_IN_STOCK: u8 = 2;
/// A row that has counters but no attributes yet: events for the item arrived (catch-up, replay)
/// before its upsert. Invisible to lookups until the upsert fills it in.
const FLAG_PLACEHOLDER: u8 = 4;

/// What filters and the ingest path need to know about an item.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ItemBrief {
    pub author_key: Key,
    pub topic: u32,
    pub deleted: bool,
    pub in_stock: bool,
    /// Only when asked for (the write path needs it; filtering does not, and skipping it saves a
    /// shared reference-count update per candidate).
    pub embedding: Option<Arc<[f32]>>,
    /// Item id and author name, only when asked for (the final re-filter of the ranked list).
    pub names: Option<(Arc<str>, Arc<str>)>,
    /// (`at` ms, `seq`) of the upsert the item's row comes from: a coordinator deleting the
    /// item observes it first (`ingest::ops::Hlc`), so the delete's version is above the upsert
    /// it saw even when its own clock is behind the clock that versioned the upsert.
    pub version: (i64, u32),
}

/// Which optional parts of an `ItemBrief` a caller needs.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct BriefWants {
    pub embedding: bool,
    pub names: bool,
}

/// Cross-feature inputs of a fetched item: plain data, no shared references (ids and author
/// names are fetched only for the ranked list, in the final re-filter).
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct ItemMeta {
    pub author_key: Key,
    pub topic: u32,
    pub geo_key: Key,
    pub created_at: i64,
    /// Cosine of the item's embedding with the requesting user's (0 when either is zero),
    /// computed here so the embedding itself never leaves the partition.
    pub emb_cosine: f32,
}

/// Item-side feature values for a batch: `values` is row-major with one row per requested key.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct ItemFeatureRows {
    pub stride: usize,
    pub values: Vec<f32>,
    pub meta: Vec<Option<ItemMeta>>,
}

/// One engagement as it lands on the user's partition, with the item facts it needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UserEvent {
    pub user: Key,
    pub user_id: String,
    pub item: Key,
    pub author_key: Key,
    pub topic: u32,
    pub embedding: Arc<[f32]>,
    pub action: Action,
    pub ts: i64,
}

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
fn rank(key: Key) -> (u64, Key) {
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

/// Seen-filter capacity of a light (never-upserted) profile: a full one pre-allocates ~2.4 KB.
const LIGHT_SEEN_CAPACITY: usize = 256;

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
    index: KeyMap<u32>,
    /// Per row, everything a request reads besides the dense attributes and counters, kept
    /// together so one candidate costs one or two cache lines here, not one per field.
    heads: Vec<ItemHead>,
    attrs: Vec<f32>,
    counters: Vec<u32>,
    /// Per row: every (counter, window) sum, valid for the 5-minute bucket in `window_sums_at`
    /// (window sums only change at bucket boundaries or when an event lands, which invalidates).
    window_sums: Vec<[f32; WINDOW_SUMS]>,
    /// Boxed: the map's spare capacity then costs a pointer per slot, not a whole profile.
    users: KeyMap<Box<UserState>>,
    /// Last-writer-wins versions (`at`, `seq`, op id) of item and user upserts, so replicas that
    /// receive two upserts of one record in different orders keep the same one.
    item_versions: KeyMap<Version>,
    /// Newest delete per item. Kept apart from the upserts' versions: the attributes are the
    /// newest upsert's and the item is deleted when a delete is newer than it, so an upsert that
    /// arrives after a newer delete still leaves the same row as when it arrived before.
    item_deletes: KeyMap<Version>,
    user_versions: KeyMap<Version>,
    /// Engagement events applied to this partition's items.
    events: u64,
    /// Rows holding counters of items not upserted yet.
    placeholders: usize,
    /// Never-upserted profiles kept, by rank: the `unknown_cap` smallest ranks of the users seen
    /// only in events, whatever order they came in.
    unknown: std::collections::BTreeSet<(u64, Key)>,
    unknown_live: usize,
    /// Profiles forgotten and events refused by the cap (a metric: not part of the state).
    unknown_evicted: u64,
    /// Some unknown user's events were not kept (cap reached).
    unknown_dropped: bool,
    /// Set while building from a whole op set: who is upserted in it and which unknown users
    /// are kept.
    admit: Option<Admit>,
    /// The state can no longer be derived incrementally (see the type's doc): rebuild from the
    /// log.
    needs_rebuild: bool,
}

type KeySet = std::collections::HashSet<Key, crate::ids::KeyBuild>;

/// What `from_ops` decides from the whole set before applying it.
struct Admit {
    upserted: KeySet,
    unknown: KeySet,
}

struct ItemHead {
    id: Arc<str>,
    author: Arc<str>,
    author_key: Key,
    geo_key: Key,
    created_at: i64,
    /// The 5-minute bucket `window_sums` of this row is valid for.
    sums_at: i64,
    flags: u8,
}

const WINDOW_SUMS: usize = Action::COUNTERS * 3;
const SUMS_STALE: i64 = i64::MIN;

const ITEM_COUNTER_WIDTH: usize = Action::COUNTERS * counters::WIDTH;

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
            Op::UpsertItem { item: it, .. } => {
                let k = key_of(&it.id);
                if newer(&mut self.item_versions, k, version) {
                    self.upsert_item(it);
                    if self.item_deletes.get(&k).is_some_and(|d| *d > version) {
                        self.delete_items(&[k]);
                    }
                }
            }
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
            Op::ItemEvent { item, action, ts } => {
                self.events += 1;
                self.apply_item_event(*item, *action, *ts)
            }
            Op::UserEvent(e) => self.apply_user_event(e),
            Op::AuthorItem { .. } | Op::Engagement { .. } | Op::Pair { .. } => {
                debug_assert!(false, "generator op sent to a feature partition");
            }
        }
    }

    fn attr_width(&self) -> usize {
        A_FIXED + self.settings.emb_dim
    }

    pub fn item_count(&self) -> usize {
        self.heads.len() - self.placeholders
    }
    pub fn user_count(&self) -> usize {
        self.users.len()
    }

    /// The row of an item, created (as a placeholder) when it has none.
    fn row_for(&mut self, key: Key) -> usize {
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
    fn known_row(&self, key: &Key) -> Option<usize> {
        let r = *self.index.get(key)? as usize;
        (self.heads[r].flags & FLAG_PLACEHOLDER == 0).then_some(r)
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
    }

    /// Counts an engagement. An item not upserted yet gets a placeholder row, so the order in
    /// which a replica receives an item and its events (live, replay, catch-up) does not matter.
    pub fn apply_item_event(&mut self, item: Key, action: Action, ts: i64) {
        let r = self.row_for(item);
        let base = r * ITEM_COUNTER_WIDTH + action.counter() * counters::WIDTH;
        counters::add(&mut self.counters[base..base + counters::WIDTH], ts, 1);
        self.heads[r].sums_at = SUMS_STALE;
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

    /// The recent likes as `[item, ts as u64, ...]`, newest first (see `FeatureMsg::RecentLikes`).
    pub fn timed_likes(&self, user: Key) -> Vec<Key> {
        self.users
            .get(&user)
            .map(|u| u.recent_likes.iter().flat_map(|(t, k)| [*k, *t as u64]).collect())
            .unwrap_or_default()
    }

    pub fn recent_likes(&self, user: Key) -> Vec<Key> {
        self.users.get(&user).map(|u| u.recent_likes.iter().map(|(_, k)| *k).collect()).unwrap_or_default()
    }

    pub fn brief(&self, key: Key, wants: BriefWants) -> Option<ItemBrief> {
        let r = self.known_row(&key)?;
        Some(ItemBrief {
            author_key: self.heads[r].author_key,
            topic: self.attrs[r * self.attr_width() + A_TOPIC] as u32,
            deleted: self.heads[r].flags & FLAG_DELETED != 0,
            in_stock: self.heads[r].flags & FLAG_IN_STOCK != 0,
            // The embedding lives in the attribute row; the write path gets its own copy.
            embedding: wants
                .embedding
                .then(|| Arc::from(&self.attrs[r * self.attr_width() + A_FIXED..(r + 1) * self.attr_width()])),
            names: wants.names.then(|| (self.heads[r].id.clone(), self.heads[r].author.clone())),
            version: self.item_versions.get(&key).map_or((0, 0), |v| (v.0, v.1)),
        })
    }

    pub fn snapshot(&self, user: Key) -> UserSnapshot {
        let Some(u) = self.users.get(&user) else { return UserSnapshot::unknown() };
        let embedding = if u.emb_weight > 0 {
            let w = u.emb_weight as f64 * EMB_SCALE;
            u.emb_sum.iter().map(|v| (*v as f64 / w) as f32).collect()
        } else {
            vec![0.0; u.emb_sum.len()]
        };
        UserSnapshot {
            known: true,
            geo: u.geo.clone(),
            signup_at: u.signup_at,
            follows: u.follows.clone(),
            blocked: u.blocked.clone(),
            recent_likes: u.recent_likes.iter().map(|(_, k)| *k).collect(),
            seen: Some(u.seen.clone()),
            topic_affinity: u.topic_affinity.iter().map(|v| *v as f32).collect(),
            embedding,
            author_affinity: u.author_affinity.iter().map(|(k, v)| (*k, *v as f32)).collect(),
            counters: u.counters.clone(),
        }
    }

    /// Gathers the requested item features for a batch straight from the dense blocks.
    pub fn item_features(&mut self, keys: &[Key], feats: &[ItemFeat], user_emb: &[f32], now: i64) -> ItemFeatureRows {
        let user_norm = user_emb.iter().map(|v| v * v).sum::<f32>().sqrt();
        let bucket = now.div_euclid(counters::LEVELS[0].0);
        let stride = feats.len();
        let w = self.attr_width();
        let mut values = vec![0.0f32; keys.len() * stride];
        let mut meta = Vec::with_capacity(keys.len());
        for (i, key) in keys.iter().enumerate() {
            let Some(r) = self.known_row(key) else {
                meta.push(None);
                continue;
            };
            let attrs = &self.attrs[r * w..(r + 1) * w];
            let head = &mut self.heads[r];
            if head.sums_at != bucket {
                let ctr = &self.counters[r * ITEM_COUNTER_WIDTH..(r + 1) * ITEM_COUNTER_WIDTH];
                let sums = &mut self.window_sums[r];
                for c in 0..Action::COUNTERS {
                    let cell = &ctr[c * counters::WIDTH..(c + 1) * counters::WIDTH];
                    for win in [Window::Hour, Window::Day, Window::Week] {
                        sums[c * 3 + win as usize] = counters::sum(cell, now, win) as f32;
                    }
                }
                head.sums_at = bucket;
            }
            let sums = &self.window_sums[r];
            let count = |c: usize, win: Window| sums[c * 3 + win as usize];
            let out = &mut values[i * stride..(i + 1) * stride];
            for (o, f) in out.iter_mut().zip(feats) {
                *o = match *f {
                    ItemFeat::AgeHours => ((now - head.created_at).max(0) as f32) / 3600.0,
                    ItemFeat::Price => attrs[A_PRICE],
                    ItemFeat::Quality => attrs[A_QUALITY],
                    ItemFeat::DurationSecs => attrs[A_DURATION],
                    ItemFeat::IsVideo => attrs[A_VIDEO],
                    ItemFeat::Topic => attrs[A_TOPIC],
                    ItemFeat::Emb(d) => attrs[A_FIXED + d],
                    ItemFeat::Count { counter, window } => count(counter, window),
                    ItemFeat::Rate { num, den, window } => {
                        let n = count(num, window);
                        n / (count(den, window) + 1.0)
                    }
                };
            }
            meta.push(Some(ItemMeta {
                author_key: head.author_key,
                topic: attrs[A_TOPIC] as u32,
                geo_key: head.geo_key,
                created_at: head.created_at,
                emb_cosine: cosine(&attrs[A_FIXED..], user_emb, user_norm),
            }));
        }
        ItemFeatureRows { stride, values, meta }
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

fn cosine(item: &[f32], user: &[f32], user_norm: f32) -> f32 {
    let dot: f32 = item.iter().zip(user).map(|(a, b)| a * b).sum();
    let n = item.iter().map(|v| v * v).sum::<f32>().sqrt() * user_norm;
    if n > 0.0 {
        dot / n
    } else {
        0.0
    }
}

/// A profile: full for an upserted user, light (small seen filter, nothing pre-allocated) for one
/// known only from events.
fn new_user(id: &str, s: &ShardSettings, upserted: bool) -> Box<UserState> {
    let seen = if upserted { s.seen_capacity } else { s.seen_capacity.min(LIGHT_SEEN_CAPACITY) };
    Box::new(UserState {
        id: id.to_string(),
        geo: String::new(),
        signup_at: None,
        upserted,
        follows: vec![],
        blocked: vec![],
        recent_likes: VecDeque::new(),
        seen: SeenFilter::new(seen, s.seen_fp),
        topic_affinity: vec![0; s.topics],
        emb_sum: vec![0; s.emb_dim],
        emb_weight: 0,
        author_affinity: KeyMap::default(),
        counters: vec![0; Action::COUNTERS * counters::WIDTH],
    })
}

pub enum FeatureMsg {
    /// Ops to log (those whose ids the partition has not seen) and apply; replies per op
    /// whether it was new. Logging and applying happen in this one handler, so a crash between
    /// them is repaired by the rebuild's replay and nothing else can interleave.
    Apply(Arc<Vec<LoggedOp>>, RpcReplyPort<Result<Vec<bool>, String>>),
    /// Item state per key, with the optional parts asked for.
    Briefs(Vec<Key>, BriefWants, RpcReplyPort<Vec<Option<ItemBrief>>>),
    /// Per user, the recent likes with their event times, flattened as
    /// `[item, ts as u64, item, ts, ...]` newest first (`timed_likes`): the write path derives an
    /// event's partners from the likes *older* than it, which a retry derives again.
    RecentLikes(Vec<Key>, RpcReplyPort<Vec<Vec<Key>>>),
    Profile(Key, RpcReplyPort<UserSnapshot>),
    /// Item state (for the filters) and item feature rows (for the survivors) of the same keys in
    /// one call: the filter and feature stages ask the same partitions for the same candidates.
    Hydrate {
        keys: Vec<Key>,
        feats: Arc<Vec<ItemFeat>>,
        /// The requesting user's embedding, for the cosine cross feature.
        user_emb: Arc<[f32]>,
        now: i64,
        reply: RpcReplyPort<(Vec<Option<ItemBrief>>, ItemFeatureRows)>,
    },
    /// Records held by the partition and its unknown-user bookkeeping.
    Counts(RpcReplyPort<ShardCounts>),
    /// Test hook for supervision: the handler panics, the supervisor restarts the partition.
    Crash,
}

/// Arguments: the partition number and a loader that rebuilds the partition's state from the
/// durable store (used at first start and after a crash restart).
pub struct FeatureShardArgs {
    pub partition: u32,
    /// The node's store: `Apply` logs here before applying (None: apply only, for tests).
    pub log: Option<crate::store::Store>,
    /// State built by the node's startup replay; None rebuilds this partition from the store.
    pub initial: Option<FeatureShardState>,
    pub load: Arc<dyn Fn(u32) -> FeatureShardState + Send + Sync>,
}

pub struct FeatureShard;

/// The actor's state: the partition and where its op log lives.
pub struct FeatureActorState {
    pub state: FeatureShardState,
    log: Option<(crate::store::Store, crate::cluster::Part)>,
    partition: u32,
    load: Arc<dyn Fn(u32) -> FeatureShardState + Send + Sync>,
    /// When the state was last rebuilt for `needs_rebuild` (rebuilds are spaced by
    /// `REBUILD_SPACING`; the flag stays set in between).
    rebuilt_at: Option<std::time::Instant>,
}

/// Least time between two rebuilds of one partition for `needs_rebuild` (each replays the
/// partition's log): a burst of promotions costs one rebuild, not one each.
const REBUILD_SPACING: std::time::Duration = std::time::Duration::from_secs(2);

/// Moves the node's clock past the upsert versions a replica applies (see `ingest::ops::Hlc`).
fn observe_versions(ops: &[LoggedOp]) {
    let wall =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0);
    if let Some((at, seq, _)) = ops.iter().filter_map(Op::version).max() {
        crate::ingest::ops::CLOCK.observe(wall, at, seq);
    }
}

/// Logs the new ops (blocking sled work, moved off the async worker) and returns the new flags.
pub(crate) fn log_ops(
    log: &Option<(crate::store::Store, crate::cluster::Part)>,
    ops: &[LoggedOp],
) -> Result<Vec<bool>, String> {
    match log {
        None => Ok(vec![true; ops.len()]),
        Some((store, part)) => tokio::task::block_in_place(|| store.append(*part, ops)).map_err(|e| e.to_string()),
    }
}

impl Actor for FeatureShard {
    type Msg = FeatureMsg;
    type State = FeatureActorState;
    type Arguments = FeatureShardArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        args: Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        let log = args.log.map(|s| (s, crate::cluster::Part::new(crate::cluster::Role::Feature, args.partition)));
        let (partition, load) = (args.partition, args.load.clone());
        let state = match args.initial {
            Some(state) => state,
            None => {
                let load = args.load.clone();
                let p = args.partition;
                // The reload scans sled: blocking work, off the async workers.
                tokio::task::spawn_blocking(move || load(p)).await?
            }
        };
        metrics::gauge!("recsys_unknown_users").increment(state.unknown_live as f64);
        Ok(FeatureActorState { state, log, partition, load, rebuilt_at: None })
    }

    async fn post_stop(&self, _myself: ActorRef<Self::Msg>, actor: &mut Self::State) -> Result<(), ActorProcessingErr> {
        metrics::gauge!("recsys_unknown_users").decrement(actor.state.unknown_live as f64);
        Ok(())
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        actor: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let st = &mut actor.state;
        match msg {
            FeatureMsg::Apply(ops, reply) => {
                let res = log_ops(&actor.log, &ops);
                let before = (st.unknown_live, st.unknown_evicted);
                if let Ok(flags) = &res {
                    for (o, _) in ops.iter().zip(flags).filter(|(_, new)| **new) {
                        st.apply(o);
                    }
                    observe_versions(&ops);
                }
                let _ = reply.send(res);
                if (st.unknown_live, st.unknown_evicted) != before {
                    metrics::gauge!("recsys_unknown_users").increment(st.unknown_live as f64 - before.0 as f64);
                    metrics::counter!("recsys_unknown_users_evicted_total")
                        .increment(st.unknown_evicted.saturating_sub(before.1));
                }
                if st.needs_rebuild() && actor.rebuilt_at.is_none_or(|t| t.elapsed() >= REBUILD_SPACING) {
                    // The log holds every op applied (logged before applying): the rebuilt state
                    // is this op set's, as any replica holding it has.
                    metrics::counter!("recsys_partition_rebuilds_total").increment(1);
                    let (load, p) = (actor.load.clone(), actor.partition);
                    let fresh = tokio::task::block_in_place(|| load(p));
                    metrics::gauge!("recsys_unknown_users")
                        .increment(fresh.unknown_live as f64 - st.unknown_live as f64);
                    *st = fresh;
                    actor.rebuilt_at = Some(std::time::Instant::now());
                }
            }
            FeatureMsg::Briefs(keys, wants, reply) => {
                let _ = reply.send(keys.iter().map(|k| st.brief(*k, wants)).collect());
            }
            FeatureMsg::RecentLikes(users, reply) => {
                let _ = reply.send(users.iter().map(|u| st.timed_likes(*u)).collect());
            }
            FeatureMsg::Profile(user, reply) => {
                let _ = reply.send(st.snapshot(user));
            }
            FeatureMsg::Hydrate { keys, feats, user_emb, now, reply } => {
                let briefs = keys.iter().map(|k| st.brief(*k, BriefWants::default())).collect();
                let _ = reply.send((briefs, st.item_features(&keys, &feats, &user_emb, now)));
            }
            FeatureMsg::Counts(reply) => {
                let _ = reply.send(st.counts());
            }
            FeatureMsg::Crash => panic!("crash requested for a supervision test"),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> ShardSettings {
        ShardSettings { emb_dim: 4, topics: 3, recent_likes: 2, seen_capacity: 4, seen_fp: 0.01, unknown_cap: 3 }
    }

    fn item(id: &str) -> ItemRecord {
        ItemRecord {
            id: id.into(),
            author: "a1".into(),
            topic: 1,
            geo: "us".into(),
            price: 9.5,
            quality: 0.5,
            duration_secs: 30.0,
            is_video: true,
            in_stock: true,
            created_at: 1000,
            embedding: vec![1.0, 0.0, 0.0, 0.0],
            deleted: false,
        }
    }

    #[test]
    fn cached_window_sums_follow_events_and_time() {
        let mut s = FeatureShardState::new(settings());
        s.upsert_item(&item("i1"));
        let k = key_of("i1");
        let feats =
            [ItemFeat::Count { counter: 1, window: Window::Hour }, ItemFeat::Count { counter: 1, window: Window::Day }];
        let t = 1_700_000_000;
        s.apply_item_event(k, Action::Click, t - 100);
        assert_eq!(s.item_features(&[k], &feats, &[], t).values, vec![1.0, 1.0]);
        s.apply_item_event(k, Action::Click, t - 50); // invalidates the cached sums
        assert_eq!(s.item_features(&[k], &feats, &[], t).values, vec![2.0, 2.0]);
        // Two hours later the clicks left the 1h window but not the 1d one.
        assert_eq!(s.item_features(&[k], &feats, &[], t + 7200).values, vec![0.0, 2.0]);
    }

    #[test]
    fn item_features_come_from_dense_rows() {
        let mut s = FeatureShardState::new(settings());
        s.upsert_item(&item("i1"));
        let k = key_of("i1");
        s.apply_item_event(k, Action::Click, 4500);
        s.apply_item_event(k, Action::Impression, 4500);
        let feats = [
            ItemFeat::Price,
            ItemFeat::Emb(0),
            ItemFeat::Count { counter: 1, window: Window::Hour },
            ItemFeat::AgeHours,
        ];
        let rows = s.item_features(&[k, key_of("missing")], &feats, &[1.0, 0.0, 0.0, 0.0], 4600);
        assert_eq!(&rows.values[..4], &[9.5, 1.0, 1.0, 1.0]);
        assert!(rows.meta[1].is_none());
        // item("i1") has embedding [1, 0, 0, 0]: identical direction to the user's.
        assert!((rows.meta[0].as_ref().unwrap().emb_cosine - 1.0).abs() < 1e-6);
    }

    #[test]
    fn events_before_their_item_are_kept_and_deletes_are_versioned() {
        let mut s = FeatureShardState::new(settings());
        let k = key_of("i1");
        let op = |id: u64, at: i64, op: Op| LoggedOp { id, at, op };
        // Catch-up or replay may deliver an item's events before the item itself.
        s.apply(&op(1, 10, Op::ItemEvent { item: k, action: Action::Click, ts: 4500 }));
        assert!(s.brief(k, BriefWants::default()).is_none(), "a placeholder is not an item");
        assert_eq!(s.item_count(), 0);
        s.apply(&op(2, 20, Op::UpsertItem { item: item("i1"), seq: 0 }));
        let feats = [ItemFeat::Count { counter: 1, window: Window::Hour }];
        assert_eq!(s.item_features(&[k], &feats, &[], 4600).values, vec![1.0], "the early click counts");
        assert_eq!(s.item_count(), 1);
        // A delete newer than an upsert that arrives after it wins.
        s.apply(&op(4, 40, Op::DeleteItem { item: k, seq: 0 }));
        s.apply(&op(3, 30, Op::UpsertItem { item: item("i1"), seq: 0 }));
        assert!(s.brief(k, BriefWants::default()).unwrap().deleted);
    }

    /// Finding 4 of issue 15: two records for one key in one batch shared a time and a random
    /// op id decided which one stayed. The version is now (time, position in batch, id).
    #[test]
    fn the_later_record_of_a_batch_wins_whatever_the_ids() {
        for (first_id, second_id) in [(1u64, 2u64), (2, 1)] {
            let mut s = FeatureShardState::new(settings());
            let a = LoggedOp {
                id: first_id,
                at: 50,
                op: Op::UpsertItem { item: ItemRecord { price: 1.0, ..item("i1") }, seq: 0 },
            };
            let b = LoggedOp {
                id: second_id,
                at: 50,
                op: Op::UpsertItem { item: ItemRecord { price: 2.0, ..item("i1") }, seq: 1 },
            };
            s.apply(&b);
            s.apply(&a);
            let rows = s.item_features(&[key_of("i1")], &[ItemFeat::Price], &[], 4600);
            assert_eq!(rows.values, vec![2.0], "ids {first_id}, {second_id}");
        }
    }

    /// Finding 4 of issue 15: a delete through a node whose clock is 2 s behind lost to the
    /// upsert it followed. The coordinator observes the brief's version before stamping.
    #[test]
    fn a_delete_from_a_clock_behind_still_follows_the_upsert_it_saw() {
        let t = 1_800_000_000_000i64;
        let ahead = crate::ingest::ops::Hlc::new();
        let (at, seq) = ahead.tick(t + 2000, 1);
        let up = LoggedOp { id: 5, at, op: Op::UpsertItem { item: item("i1"), seq } };
        let mut s = FeatureShardState::new(settings());
        s.apply(&up);
        let k = key_of("i1");
        let seen = s.brief(k, BriefWants::default()).unwrap().version;
        assert_eq!(seen, (at, seq));
        let behind = crate::ingest::ops::Hlc::new();
        behind.observe(t, seen.0, seen.1);
        let (dat, dseq) = behind.tick(t, 1);
        let del = LoggedOp { id: 1, at: dat, op: Op::DeleteItem { item: k, seq: dseq } };
        for order in [[&up, &del], [&del, &up]] {
            let mut r = FeatureShardState::new(settings());
            order.iter().for_each(|o| r.apply(o));
            assert!(r.brief(k, BriefWants::default()).unwrap().deleted, "the delete wins");
        }
        // Without observing, the node behind stamps a version below the upsert's: it loses.
        let (lat, lseq) = crate::ingest::ops::Hlc::new().tick(t, 1);
        assert!((lat, lseq) < (at, seq));
    }

    /// Finding 5: a delete newer than an upsert that arrives first and one that arrives after it
    /// leave the same state.
    #[test]
    fn a_delete_and_an_older_upsert_commute() {
        let k = key_of("i1");
        let up = LoggedOp { id: 9, at: 30, op: Op::UpsertItem { item: item("i1"), seq: 0 } };
        let del = LoggedOp { id: 3, at: 40, op: Op::DeleteItem { item: k, seq: 0 } };
        let mut a = FeatureShardState::new(settings());
        a.apply(&up);
        a.apply(&del);
        let mut b = FeatureShardState::new(settings());
        b.apply(&del);
        b.apply(&up);
        assert!(b.brief(k, BriefWants::default()).unwrap().deleted);
        assert_eq!(a.state_hash(), b.state_hash());
    }

    fn like(user: &str, item: &str, ts: i64) -> UserEvent {
        UserEvent {
            user: key_of(user),
            user_id: user.into(),
            item: key_of(item),
            author_key: key_of("a1"),
            topic: 0,
            embedding: Arc::from(Vec::new()),
            action: Action::Like,
            ts,
        }
    }

    #[test]
    fn unknown_users_are_capped_by_rank_and_upserted_ones_stay() {
        let mut s = FeatureShardState::new(settings());
        s.upsert_user(&UserRecord {
            id: "known".into(),
            geo: String::new(),
            signup_at: 0,
            follows: vec![],
            blocked_authors: vec![],
        });
        s.apply_user_event(&like("known", "i1", 100));
        for u in 0..10 {
            s.apply_user_event(&like(&format!("u{u}"), "i1", 100));
        }
        let c = s.counts();
        assert_eq!((c.unknown_users, c.users), (3, 4));
        assert!(c.unknown_evicted >= 7, "{c:?}");
        assert!(s.snapshot(key_of("known")).known);
        // The three of smallest rank are kept, whatever order the ten arrived in.
        let mut ranked: Vec<String> = (0..10).map(|u| format!("u{u}")).collect();
        ranked.sort_by_key(|u| rank(key_of(u)));
        for (i, u) in ranked.iter().enumerate() {
            assert_eq!(s.snapshot(key_of(u)).known, i < 3, "{u}");
        }
        let mut r = FeatureShardState::new(settings());
        r.upsert_user(&UserRecord {
            id: "known".into(),
            geo: String::new(),
            signup_at: 0,
            follows: vec![],
            blocked_authors: vec![],
        });
        r.apply_user_event(&like("known", "i1", 100));
        for u in (0..10).rev() {
            r.apply_user_event(&like(&format!("u{u}"), "i1", 100));
        }
        assert_eq!(r.state_hash(), s.state_hash(), "the reverse order keeps the same users");
        // Signup unknown: the age feature takes its default instead of ~56 years.
        assert_eq!(s.snapshot(key_of("known")).feature(UserFeat::AgeDays, 1_800_000_000), None);
    }

    #[test]
    fn recent_likes_follow_event_time_in_any_apply_order() {
        let likes = [("i1", 300), ("i2", 100), ("i3", 200), ("i1", 50)];
        let mut orders = vec![];
        for perm in [[0, 1, 2, 3], [3, 2, 1, 0], [1, 3, 0, 2]] {
            let mut s = FeatureShardState::new(settings());
            for i in perm {
                s.apply_user_event(&like("u", likes[i].0, likes[i].1));
            }
            orders.push(s.recent_likes(key_of("u")));
        }
        assert_eq!(orders[0], vec![key_of("i1"), key_of("i3")], "newest first, capped at 2");
        assert!(orders.iter().all(|o| *o == orders[0]), "{orders:?}");
    }

    #[test]
    fn a_colliding_id_never_writes_into_anothers_record() {
        let mut s = FeatureShardState::new(settings());
        // A second id under u1's key, as a hash collision would give.
        s.apply_user_event(&like("u1", "i1", 5));
        s.apply_user_event(&UserEvent { user_id: "intruder".into(), ..like("u1", "i2", 6) });
        assert_eq!(s.recent_likes(key_of("u1")), vec![key_of("i1")], "the intruder's like is dropped");
        s.upsert_item(&ItemRecord { price: 99.0, ..item("i1") });
        let r = s.index[&key_of("i1")];
        s.index.insert(key_of("i1-twin"), r); // i1-twin now shares i1's row, as a collision would
        s.upsert_item(&ItemRecord { id: "i1-twin".into(), price: 1.0, ..item("i1") });
        let rows = s.item_features(&[key_of("i1")], &[ItemFeat::Price], &[], 4600);
        assert_eq!(rows.values, vec![99.0], "i1 keeps its own attributes");
        assert_eq!(&*s.heads[r as usize].id, "i1");
    }

    #[test]
    fn seen_filter_keeps_two_generations_in_any_order() {
        let day = SEEN_GENERATION_SECS;
        let t = 1_700_000_000 - 1_700_000_000 % day;
        let seen = [(1u64, t), (2, t + day), (3, t + 2 * day), (4, t + 2 * day + 5)];
        let mut a = SeenFilter::new(4, 0.01);
        let mut b = SeenFilter::new(4, 0.01);
        seen.iter().for_each(|(i, ts)| a.insert(*i, *ts));
        seen.iter().rev().for_each(|(i, ts)| b.insert(*i, *ts));
        for f in [&a, &b] {
            assert!(f.contains(2) && f.contains(3) && f.contains(4));
            assert!(!f.contains(1), "the oldest generation was dropped");
        }
        assert_eq!(postcard::to_allocvec(&a).unwrap(), postcard::to_allocvec(&b).unwrap());
    }

    #[test]
    fn user_events_update_profile() {
        let mut s = FeatureShardState::new(settings());
        let ev = |item: &str, action| UserEvent {
            user: key_of("u1"),
            user_id: "u1".into(),
            item: key_of(item),
            author_key: key_of("a1"),
            topic: 2,
            embedding: Arc::from(vec![0.0, 1.0, 0.0, 0.0]),
            action,
            ts: 100,
        };
        let events = [("i1", Action::Impression), ("i1", Action::Like), ("i2", Action::Like), ("i3", Action::Like)];
        for (n, (i, a)) in events.into_iter().enumerate() {
            s.apply_user_event(&UserEvent { ts: 100 + n as i64, ..ev(i, a) });
        }
        let snap = s.snapshot(key_of("u1"));
        assert!(snap.seen.as_ref().unwrap().contains(key_of("i1")));
        assert_eq!(snap.recent_likes, vec![key_of("i3"), key_of("i2")]);
        assert_eq!(snap.topic_affinity[2], 6.0);
        assert_eq!(snap.embedding[1], 1.0);
    }
}
