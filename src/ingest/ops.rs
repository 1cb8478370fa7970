//! Partition ops: what a write becomes once it is routed. A client batch (items, users, events)
//! is turned into ops per (role, partition); each op is logged and applied by every replica of
//! its partition.
//!
//! **An op id covers the op's content.** Every id is a hash of where the op comes from (the event
//! id and the op's slot in the event, or a per-record nonce for upserts) *and* of the op's
//! serialized content (`op_id`). So two replicas can never hold two contents under one id: a
//! retry that derives the same content is the same op everywhere (logged and applied once per
//! partition even when an earlier attempt reached only some replicas), and a retry that derives
//! different content is a different op, which anti-entropy's id digests see and copy to every
//! replica. Why not "content from the event alone": two parts of an event's ops are derived from
//! state at ingest, not from the event: the co-engagement partners (the user's recent likes) and
//! the item facts on the user's profile (author, topic, embedding). Neither can be computed by
//! the partition that applies the op (it holds neither the user's likes nor the item), so the
//! derived content stays, and the id names it.
//!
//! The derivation is made repeatable where it can be: partners are the user's likes from seconds
//! *before* the event (by event time, `Writer::log_events`), so a retry after the user liked
//! another item derives the same partners, plans the same ops and is a duplicate everywhere.
//!
//! Not solved here (an open part of finding 1): a retry whose derivation still changed (the
//! user's recent-likes list, capped at `retrieval.recent_likes`, has since dropped likes older
//! than the event; an older like arrived late; the item was re-upserted with another topic or
//! embedding) logs its changed derived ops as new ops, so those partitions count the event again
//! while the reply says "duplicate" (the item op, from the event alone, decides that, so a
//! re-sent batch stays idempotent for the item's counters). Such retries are counted in
//! `recsys_ingest_rederived_total`. Removing the re-count needs the coordinator to reuse the
//! first attempt's derived content (read back from the event's home partition before planning),
//! a transport query outside this module.
use std::collections::BTreeMap;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::cluster::{Part, Role};
use crate::features::shard::{ItemBrief, UserEvent};
use crate::ids::{self, key_of, partition_of, Key};
use crate::store::{Action, EventRecord, ItemRecord, LoggedOp, UserRecord};

pub const GLOBAL_GEO: &str = "global";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Op {
    // Feature partitions. `seq` is the logical part of the coordinator's hybrid logical clock
    // (`Hlc`): records of one batch take consecutive values, so of two records for one key in one
    // batch the later one wins, and the version (`at`, `seq`, id) is a total order.
    UpsertItem { item: ItemRecord, seq: u32 },
    DeleteItem { item: Key, seq: u32 },
    UpsertUser { user: UserRecord, seq: u32 },
    ItemEvent { item: Key, action: Action, ts: i64 },
    UserEvent(UserEvent),
    // Generator partitions.
    AuthorItem { author: Key, item: Key, created_at: i64 },
    Engagement { geo: Key, item: Key, action: Action, ts: i64 },
    Pair { a: Key, b: Key },
}

/// Ops per partition, ready to send to each partition's replicas.
pub type Plan = BTreeMap<Part, Vec<LoggedOp>>;

/// Last-writer-wins version of an upsert or delete: (`at` ms, `seq`, op id), a total order.
pub type Version = (i64, u32, u64);

impl Op {
    /// A digest of the op's content (its serialized form): what anti-entropy may compare beside
    /// the id, and what the id itself covers.
    pub fn content_hash(&self) -> u64 {
        digest64(&[], self)
    }

    /// The LWW version of an upsert or delete logged as `o`; None for other ops.
    pub fn version(o: &LoggedOp) -> Option<Version> {
        match &o.op {
            Op::UpsertItem { seq, .. } | Op::DeleteItem { seq, .. } | Op::UpsertUser { seq, .. } => {
                Some((o.at, *seq, o.id))
            }
            _ => None,
        }
    }
}

impl LoggedOp {
    /// A digest of everything the op carries besides its id (`at` and the op's content). Equal
    /// ids with unequal content hashes would mean a corrupt or forged op.
    pub fn content_hash(&self) -> u64 {
        digest64(&self.at.to_le_bytes(), &self.op)
    }
}

/// A stable 64-bit hash of `prefix` and the op's postcard form: FNV-1a over the bytes, then a
/// full-avalanche finaliser (the same in every process and build of one format). Not SHA: it runs
/// for every op of every write (tens per event), where a cryptographic hash cost a visible share
/// of a core; op ids were never secrets, the cluster secret authenticates who sends ops.
fn digest64(prefix: &[u8], op: &Op) -> u64 {
    // Serializing plain data into a Vec cannot fail; an empty body would still hash the prefix.
    let body = postcard::to_allocvec(op).unwrap_or_default();
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in prefix.iter().chain(&body) {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    crate::generators::mix(h ^ body.len() as u64)
}

/// The id of an op: its origin (`slot`: event id and place in the event, or an upsert's nonce)
/// and its content, hashed together.
pub fn op_id(slot: u64, op: &Op) -> u64 {
    digest64(&slot.to_le_bytes(), op)
}

/// A hybrid logical clock: (wall ms, logical counter). `tick` never goes back and never repeats,
/// even when the wall clock steps back; `observe` moves it past a version seen from another
/// coordinator (replicas observe the upserts they apply), so a write that follows one it saw
/// gets a larger version even when this node's wall clock is behind the other's. A version more
/// than `MAX_AHEAD_MS` ahead of the wall clock is not observed (a broken peer clock must not
/// drag every later write into the future).
pub struct Hlc {
    last: Mutex<(i64, u32)>,
}

impl Hlc {
    pub const MAX_AHEAD_MS: i64 = 300_000;

    pub const fn new() -> Self {
        Self { last: Mutex::new((i64::MIN, 0)) }
    }

    /// Reserves `n` consecutive versions at one wall time: (ms, first seq). Record `i` of a batch
    /// takes (ms, first + i).
    pub fn tick(&self, wall_ms: i64, n: u32) -> (i64, u32) {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let n = n.max(1);
        let (ms, first) = if wall_ms > last.0 {
            (wall_ms, 0)
        } else if let Some(next) = last.1.checked_add(1).filter(|f| f.checked_add(n).is_some()) {
            (last.0, next)
        } else {
            // The logical counter is spent for this millisecond: move to the next one.
            (last.0 + 1, 0)
        };
        *last = (ms, first + (n - 1));
        (ms, first)
    }

    /// Moves the clock past a version seen elsewhere (bounded, see the type's doc).
    pub fn observe(&self, wall_ms: i64, at: i64, seq: u32) {
        if at > wall_ms.saturating_add(Self::MAX_AHEAD_MS) {
            return;
        }
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if (at, seq) > *last {
            *last = (at, seq);
        }
    }
}

impl Default for Hlc {
    fn default() -> Self {
        Self::new()
    }
}

/// The node's clock for upsert versions (one per process: every coordinator and replica role of
/// the node shares it).
pub static CLOCK: Hlc = Hlc::new();

/// The generator partition holding a geo's trending list. The global list is hit by every event
/// and every request, so it is spread over `global_shards` partitions by item; a request asks
/// them all (one call per node) and merges.
pub fn trending_partition(geo: Key, item: Key, global_shards: u32, parts: u32) -> u32 {
    if geo == key_of(GLOBAL_GEO) && global_shards > 1 {
        partition_of(ids::GEO, geo ^ global_shard_salt(item % u64::from(global_shards)), parts)
    } else {
        partition_of(ids::GEO, geo, parts)
    }
}

/// The partitions holding the global trending list's shards.
pub fn global_trending_partitions(global_shards: u32, parts: u32) -> Vec<u32> {
    let g = key_of(GLOBAL_GEO);
    if global_shards <= 1 {
        return vec![partition_of(ids::GEO, g, parts)];
    }
    (0..u64::from(global_shards)).map(|s| partition_of(ids::GEO, g ^ global_shard_salt(s), parts)).collect()
}

fn global_shard_salt(shard: u64) -> Key {
    if shard == 0 {
        0
    } else {
        key_of(&format!("global-shard-{shard}"))
    }
}

/// Slot of an op derived from an event: which event and which op of it. The op id adds the
/// content (`op_id`).
fn event_slot(event_id: &str, what: &str, n: u64) -> u64 {
    let mut h = key_of(event_id) ^ key_of(what).rotate_left(17);
    h ^= n.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    h ^= h >> 31;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^ (h >> 29)
}

/// The id of the op an event logs in its item's feature partition: its content comes from the
/// event alone, so a read-only check can ask a replica whether it holds an acknowledged event.
pub fn item_event_op_id(event_id: &str, item_id: &str, action: Action, ts_ms: i64) -> u64 {
    let op = Op::ItemEvent { item: key_of(item_id), action, ts: ts_ms.div_euclid(1000) };
    op_id(event_slot(event_id, "item", 0), &op)
}

/// Builds the ops of one client batch.
pub struct Planner {
    pub partitions: u32,
    pub global_shards: u32,
    pub plan: Plan,
}

impl Planner {
    pub fn new(partitions: u32, global_shards: u32) -> Self {
        Self { partitions, global_shards, plan: Plan::new() }
    }

    /// Logs `op` for `partition` with an id covering its origin (`slot`) and its content.
    fn push(&mut self, role: Role, partition: u32, slot: u64, at: i64, op: Op) {
        let id = op_id(slot, &op);
        self.plan.entry(Part::new(role, partition)).or_default().push(LoggedOp { id, at, op });
    }

    /// Upserts are versioned by the coordinator's hybrid logical clock (`at` ms, `seq`): last
    /// writer wins everywhere; a random nonce makes each write its own op.
    pub fn item(&mut self, it: &ItemRecord, at: i64, seq: u32) {
        let k = key_of(&it.id);
        let p = self.partitions;
        let op = Op::UpsertItem { item: it.clone(), seq };
        self.push(Role::Feature, partition_of(ids::ITEM, k, p), rand::random(), at, op);
        if !it.deleted {
            let a = key_of(&it.author);
            let op = Op::AuthorItem { author: a, item: k, created_at: it.created_at };
            // Same item, author and creation time: the same op, so repeated upserts do not grow
            // the author list; another creation time is another op (the newest wins there).
            self.push(Role::Generator, partition_of(ids::AUTHOR, a, p), event_slot(&it.id, "author", a), at, op);
        }
    }

    pub fn user(&mut self, u: &UserRecord, at: i64, seq: u32) {
        let p = partition_of(ids::USER, key_of(&u.id), self.partitions);
        self.push(Role::Feature, p, rand::random(), at, Op::UpsertUser { user: u.clone(), seq });
    }

    pub fn delete(&mut self, item: Key, at: i64, seq: u32) {
        let p = partition_of(ids::ITEM, item, self.partitions);
        self.push(Role::Feature, p, rand::random(), at, Op::DeleteItem { item, seq });
    }

    /// The ops of one event: item counters, the user's profile, trending (global shard and the
    /// event's geo), co-engagement pairs. Returns every op's partition and index in it, the
    /// item op (from the event alone, it decides whether the event is a duplicate) first.
    pub fn event(&mut self, e: &EventRecord, brief: &ItemBrief) -> Vec<(Part, usize)> {
        let before: BTreeMap<Part, usize> = self.plan.iter().map(|(p, v)| (*p, v.len())).collect();
        let home = Part::new(Role::Feature, partition_of(ids::ITEM, key_of(&e.item), self.partitions));
        let home_at = (home, before.get(&home).copied().unwrap_or(0));
        self.event_ops(e, brief);
        let mut at = vec![home_at];
        for (p, v) in &self.plan {
            let from = before.get(p).copied().unwrap_or(0);
            at.extend((from..v.len()).map(|i| (*p, i)).filter(|x| *x != home_at));
        }
        at
    }

    fn event_ops(&mut self, e: &EventRecord, brief: &ItemBrief) {
        let parts = self.partitions;
        let item = key_of(&e.item);
        let user = key_of(&e.user);
        let ts = e.ts_ms.div_euclid(1000);
        let at = e.ts_ms;
        let id = |what: &str, n: u64| event_slot(&e.event_id, what, n);
        let home = Part::new(Role::Feature, partition_of(ids::ITEM, item, parts));
        self.push(Role::Feature, home.partition, id("item", 0), at, Op::ItemEvent { item, action: e.action, ts });
        let ue = UserEvent {
            user,
            user_id: e.user.clone(),
            item,
            author_key: brief.author_key,
            topic: brief.topic,
            embedding: brief.embedding.clone().unwrap_or_else(|| std::sync::Arc::from(Vec::new())),
            action: e.action,
            ts,
        };
        self.push(Role::Feature, partition_of(ids::USER, user, parts), id("user", 0), at, Op::UserEvent(ue));
        let mut geos = vec![key_of(GLOBAL_GEO)];
        if !e.geo.is_empty() && e.geo != GLOBAL_GEO {
            geos.push(key_of(&e.geo));
        }
        for g in geos {
            let p = trending_partition(g, item, self.global_shards, parts);
            self.push(Role::Generator, p, id("geo", g), at, Op::Engagement { geo: g, item, action: e.action, ts });
        }
        // Pairs by slot and content: a retry that derives other partners makes other ops.
        for (j, &other) in e.pairs.iter().enumerate() {
            let j = j as u64;
            let pa = partition_of(ids::COENGAGED, item, parts);
            let pb = partition_of(ids::COENGAGED, other, parts);
            self.push(Role::Generator, pa, id("pair", 2 * j), at, Op::Pair { a: item, b: other });
            self.push(Role::Generator, pb, id("pair", 2 * j + 1), at, Op::Pair { a: other, b: item });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn brief() -> ItemBrief {
        ItemBrief {
            author_key: 1,
            topic: 2,
            deleted: false,
            in_stock: true,
            embedding: None,
            names: None,
            version: (0, 0),
        }
    }

    fn ev(id: &str, pairs: Vec<Key>) -> EventRecord {
        EventRecord {
            event_id: id.into(),
            user: "u1".into(),
            item: "i1".into(),
            action: Action::Like,
            ts_ms: 1_700_000_000_000,
            geo: "de".into(),
            request_id: String::new(),
            pairs,
        }
    }

    fn ops(p: &Planner) -> Vec<(Part, LoggedOp)> {
        p.plan.iter().flat_map(|(k, v)| v.iter().map(move |o| (*k, o.clone()))).collect()
    }

    #[test]
    fn a_retried_event_yields_the_same_ops() {
        let mut a = Planner::new(32, 8);
        let mut b = Planner::new(32, 8);
        a.event(&ev("e1", vec![5, 6]), &brief());
        b.event(&ev("e1", vec![5, 6]), &brief());
        assert_eq!(ops(&a), ops(&b), "same event, same derivation: the same ops, ids and all");
        let mut c = Planner::new(32, 8);
        c.event(&ev("e2", vec![5, 6]), &brief());
        let ids = |p: &Planner| ops(p).into_iter().map(|(_, o)| o.id).collect::<Vec<_>>();
        assert!(ids(&a).iter().all(|i| !ids(&c).contains(i)), "another event, other ids");
    }

    /// Finding 1 of issue 15: a retry that derived other partners (the user liked another item
    /// in between) or other item facts (the item was re-upserted) logged different content under
    /// the same op id, which id digests never repair. Now no id names two contents.
    #[test]
    fn an_op_id_never_names_two_contents() {
        let mut seen: std::collections::HashMap<u64, Op> = std::collections::HashMap::new();
        let other_brief = ItemBrief { topic: 3, embedding: Some(vec![1.0, 0.0].into()), ..brief() };
        let attempts = [(vec![5, 6], brief()), (vec![7, 8], brief()), (vec![5, 6], other_brief)];
        for (pairs, b) in attempts {
            let mut p = Planner::new(32, 8);
            p.event(&ev("e1", pairs), &b);
            for (_, o) in ops(&p) {
                assert_eq!(o.id, op_id_of(&o), "the id is the hash of slot and content");
                if let Some(prev) = seen.insert(o.id, o.op.clone()) {
                    assert_eq!(prev, o.op, "id {} names two contents", o.id);
                }
            }
        }
        // The event's own ops (item counter, trending) derive from the event alone: a retry with
        // other derived parts still repeats them, so the event is not counted twice there.
        let home = |pairs: Vec<Key>| {
            let mut p = Planner::new(32, 8);
            p.event(&ev("e1", pairs), &brief());
            ops(&p)
                .into_iter()
                .filter(|(_, o)| matches!(o.op, Op::ItemEvent { .. } | Op::Engagement { .. }))
                .collect::<Vec<_>>()
        };
        assert_eq!(home(vec![5, 6]), home(vec![7, 8]));
    }

    /// Re-derives an op's id from its content for the check above (the slot is found by trying
    /// the event's slots).
    fn op_id_of(o: &LoggedOp) -> u64 {
        let slots = ["item", "user", "geo", "pair"];
        for what in slots {
            for n in (0..8).chain([key_of(GLOBAL_GEO), key_of("de")]) {
                let id = op_id(event_slot("e1", what, n), &o.op);
                if id == o.id {
                    return id;
                }
            }
        }
        0
    }

    #[test]
    fn the_clock_orders_a_batch_and_never_goes_back() {
        let c = Hlc::new();
        assert_eq!(c.tick(1000, 3), (1000, 0));
        assert_eq!(c.tick(1000, 2), (1000, 3), "same millisecond: the next batch continues");
        assert_eq!(c.tick(900, 1), (1000, 5), "the wall clock stepped back: the clock does not");
        c.observe(1000, 4000, 7);
        assert_eq!(c.tick(1001, 1), (4000, 8), "a version seen from a node ahead is passed");
        c.observe(1001, 1001 + Hlc::MAX_AHEAD_MS + 1, 0);
        assert_eq!(c.tick(1002, 1), (4000, 9), "a version far in the future is not observed");
        assert_eq!(c.tick(5000, 1), (5000, 0));
    }

    #[test]
    fn global_trending_is_spread_over_shards() {
        let parts = global_trending_partitions(8, 32);
        assert_eq!(parts.len(), 8);
        let g = key_of(GLOBAL_GEO);
        for item in 0..100u64 {
            assert!(parts.contains(&trending_partition(g, item, 8, 32)));
        }
        let distinct: std::collections::HashSet<_> = parts.iter().collect();
        assert!(distinct.len() >= 4, "shards land on several partitions: {parts:?}");
        assert_eq!(global_trending_partitions(1, 32), vec![partition_of(ids::GEO, g, 32)]);
    }
}
