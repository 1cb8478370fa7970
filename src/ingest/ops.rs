//! Partition ops: what a write becomes once it is routed. A client batch (items, users, events)
//! is turned into ops per (role, partition); each op is logged and applied by every replica of
//! its partition. Event ops take ids derived from the event id, so a retried event is the same op
//! everywhere and is applied once per partition even when an earlier attempt reached only some.
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::cluster::{Part, Role};
use crate::features::shard::{ItemBrief, UserEvent};
use crate::ids::{self, key_of, partition_of, Key};
use crate::store::{Action, EventRecord, ItemRecord, LoggedOp, UserRecord};

pub const GLOBAL_GEO: &str = "global";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Op {
    // Feature partitions.
    UpsertItem(ItemRecord),
    DeleteItem(Key),
    UpsertUser(UserRecord),
    ItemEvent { item: Key, action: Action, ts: i64 },
    UserEvent(UserEvent),
    // Generator partitions.
    AuthorItem { author: Key, item: Key, created_at: i64 },
    Engagement { geo: Key, item: Key, action: Action, ts: i64 },
    Pair { a: Key, b: Key },
}

/// Ops per partition, ready to send to each partition's replicas.
pub type Plan = BTreeMap<Part, Vec<LoggedOp>>;

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

/// Id of an op derived from an event: the same event always yields the same ids. Public for
/// read-only checks that ask a replica whether it holds an event's ops.
pub fn event_op_id(event_id: &str, what: &str, n: u64) -> u64 {
    let mut h = key_of(event_id) ^ key_of(what).rotate_left(17);
    h ^= n.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    h ^= h >> 31;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^ (h >> 29)
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

    fn push(&mut self, role: Role, partition: u32, id: u64, at: i64, op: Op) {
        self.plan.entry(Part::new(role, partition)).or_default().push(LoggedOp { id, at, op });
    }

    /// Upserts are versioned by the coordinator's clock (`at`, ms): last writer wins everywhere.
    pub fn item(&mut self, it: &ItemRecord, at: i64) {
        let k = key_of(&it.id);
        let p = self.partitions;
        self.push(Role::Feature, partition_of(ids::ITEM, k, p), rand::random(), at, Op::UpsertItem(it.clone()));
        if !it.deleted {
            let a = key_of(&it.author);
            let op = Op::AuthorItem { author: a, item: k, created_at: it.created_at };
            // Same item and author: the same op, so repeated upserts do not grow the author list.
            self.push(Role::Generator, partition_of(ids::AUTHOR, a, p), event_op_id(&it.id, "author", a), at, op);
        }
    }

    pub fn user(&mut self, u: &UserRecord, at: i64) {
        let p = partition_of(ids::USER, key_of(&u.id), self.partitions);
        self.push(Role::Feature, p, rand::random(), at, Op::UpsertUser(u.clone()));
    }

    pub fn delete(&mut self, item: Key, at: i64) {
        let p = partition_of(ids::ITEM, item, self.partitions);
        self.push(Role::Feature, p, rand::random(), at, Op::DeleteItem(item));
    }

    /// The ops of one event: item counters, the user's profile, trending (global shard and the
    /// event's geo), co-engagement pairs. Returns the item op's partition and index in it, whose
    /// "new" flag says whether the event was a duplicate.
    pub fn event(&mut self, e: &EventRecord, brief: &ItemBrief) -> (Part, usize) {
        let parts = self.partitions;
        let item = key_of(&e.item);
        let user = key_of(&e.user);
        let ts = e.ts_ms.div_euclid(1000);
        let at = e.ts_ms;
        let id = |what: &str, n: u64| event_op_id(&e.event_id, what, n);
        let home = Part::new(Role::Feature, partition_of(ids::ITEM, item, parts));
        let index = self.plan.get(&home).map_or(0, |v| v.len());
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
        // Pairs by slot: a retry that derives other partners still maps onto the same ops.
        for (j, &other) in e.pairs.iter().enumerate() {
            let j = j as u64;
            let pa = partition_of(ids::COENGAGED, item, parts);
            let pb = partition_of(ids::COENGAGED, other, parts);
            self.push(Role::Generator, pa, id("pair", 2 * j), at, Op::Pair { a: item, b: other });
            self.push(Role::Generator, pb, id("pair", 2 * j + 1), at, Op::Pair { a: other, b: item });
        }
        (home, index)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn brief() -> ItemBrief {
        ItemBrief { author_key: 1, topic: 2, deleted: false, in_stock: true, embedding: None, names: None }
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

    #[test]
    fn a_retried_event_yields_the_same_ops() {
        let mut a = Planner::new(32, 8);
        let mut b = Planner::new(32, 8);
        a.event(&ev("e1", vec![5, 6]), &brief());
        b.event(&ev("e1", vec![7, 8]), &brief());
        let ids = |p: &Planner| -> Vec<(Part, u64)> {
            p.plan
                .iter()
                .flat_map(|(k, v)| v.iter().map(move |o| (*k, o.id)))
                .filter(|(k, _)| k.role == Role::Feature)
                .collect()
        };
        assert_eq!(ids(&a), ids(&b));
        let mut c = Planner::new(32, 8);
        c.event(&ev("e2", vec![5, 6]), &brief());
        assert_ne!(ids(&a), ids(&c));
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
