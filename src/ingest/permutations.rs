//! Property test of issue 15's finding 5: the state built from one op set is the same whatever
//! order the ops arrive in, in whatever chunks, with whatever repeats (live writes in planner
//! order, anti-entropy pulls appended in (`at`, id) order, move streams in log order, retries).
//! It compares full-state hashes (`state_hash`), not op-id digests.
use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use proptest::prelude::*;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use super::ops::Planner;
use crate::domain::ops::Hlc;
use crate::domain::{Action, EventRecord, ItemRecord, LoggedOp, Part, Role, UserRecord};
use crate::features::shard::{FeatureShardState, ItemBrief, ShardSettings};
use crate::generators::{GeneratorSettings, GeneratorState};
use crate::ids::key_of;

fn shard_settings(unknown_cap: usize) -> ShardSettings {
    // Small caps, so eviction and bounded lists are exercised by small op sets.
    ShardSettings { emb_dim: 3, topics: 4, recent_likes: 2, seen_capacity: 8, seen_fp: 0.01, unknown_cap }
}

fn generator_settings() -> GeneratorSettings {
    GeneratorSettings {
        trending_window_hours: 24,
        author_recent_items: 3,
        topic_recent_items: 3,
        coengagement_neighbors: 2,
    }
}

/// A replica of one partition as the node keeps it: ops deduplicated by id (the store), applied
/// once each, rebuilt from its log when the state asks for it (the actor).
struct Replica {
    part: Part,
    cap: usize,
    ids: HashSet<u64>,
    log: Vec<LoggedOp>,
    feature: FeatureShardState,
    generator: GeneratorState,
    rebuilds: usize,
}

impl Replica {
    fn new(part: Part, cap: usize) -> Self {
        Self {
            part,
            cap,
            ids: HashSet::new(),
            log: vec![],
            feature: FeatureShardState::new(shard_settings(cap)),
            generator: GeneratorState::new(generator_settings()),
            rebuilds: 0,
        }
    }

    /// One `Apply` message: the new ops of the chunk are logged and applied.
    fn apply(&mut self, chunk: &[LoggedOp]) {
        for o in chunk {
            if self.ids.insert(o.id) {
                self.log.push(o.clone());
                match self.part.role {
                    Role::Feature => self.feature.apply(o),
                    Role::Generator => self.generator.apply(o),
                }
            }
        }
        if self.feature.needs_rebuild() {
            self.feature = FeatureShardState::from_ops(shard_settings(self.cap), self.log.iter());
            self.rebuilds += 1;
        }
    }

    fn hash(&self) -> [u8; 32] {
        match self.part.role {
            Role::Feature => self.feature.state_hash(),
            _ => self.generator.state_hash(),
        }
    }
}

/// A random op set, as coordinators would plan it: items upserted (twice in one batch, with
/// other creation times, deleted), users upserted or only seen in events, events with derived
/// partners and item facts, and retries that derived other content.
fn op_set(seed: u64) -> BTreeMap<Part, Vec<LoggedOp>> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    let clock = Hlc::new();
    let mut planner = Planner::new(2, 2);
    let n_items = rng.random_range(2..8);
    let n_users = rng.random_range(2..9);
    let item = |i: usize, rng: &mut rand::rngs::StdRng| ItemRecord {
        id: format!("i{i}"),
        author: format!("a{}", i % 3),
        topic: rng.random_range(0..4),
        geo: "de".into(),
        price: rng.random_range(0..100) as f32,
        quality: 0.5,
        duration_secs: 10.0,
        is_video: rng.random_bool(0.5),
        in_stock: true,
        created_at: now - rng.random_range(0..5) * 3600,
        embedding: (0..3).map(|_| rng.random_range(-1.0f32..1.0)).collect(),
        deleted: rng.random_bool(0.1),
        // Regions and hidden topics are part of the state the hash covers.
        allowed_regions: if rng.random_bool(0.3) { vec!["de".into()] } else { vec![] },
        blocked_regions: if rng.random_bool(0.3) { vec!["us".into(), "fr".into()] } else { vec![] },
    };
    for _ in 0..rng.random_range(1..4) {
        // A batch: several records, sometimes two of one item (the later must win).
        let batch: Vec<ItemRecord> =
            (0..rng.random_range(1..5)).map(|_| item(rng.random_range(0..n_items), &mut rng)).collect();
        let wall = (now - rng.random_range(0..3)) * 1000;
        let (at, seq) = clock.tick(wall, batch.len() as u32);
        for (i, it) in batch.iter().enumerate() {
            planner.item(it, at, seq + i as u32);
        }
    }
    for _ in 0..rng.random_range(0..3) {
        let (at, seq) = clock.tick((now - rng.random_range(0..3)) * 1000, 1);
        planner.delete(key_of(&format!("i{}", rng.random_range(0..n_items))), at, seq);
    }
    for u in 0..n_users {
        if rng.random_bool(0.4) {
            let rec = UserRecord {
                id: format!("u{u}"),
                geo: "de".into(),
                signup_at: now - 86_400,
                follows: vec![format!("a{}", rng.random_range(0..3))],
                blocked_authors: vec![],
                hidden_topics: (0..rng.random_range(0..3)).map(|_| rng.random_range(0..4)).collect(),
            };
            let (at, seq) = clock.tick((now - rng.random_range(0..3)) * 1000, 1);
            planner.user(&rec, at, seq);
        }
    }
    let actions = [Action::Impression, Action::Click, Action::Like, Action::Share, Action::Hide, Action::Report];
    for e in 0..rng.random_range(1..40) {
        let it = rng.random_range(0..n_items);
        let ev = EventRecord {
            event_id: format!("e{e}"),
            user: format!("u{}", rng.random_range(0..n_users)),
            item: format!("i{it}"),
            action: actions[rng.random_range(0..actions.len())],
            ts_ms: (now - rng.random_range(0..3 * 86_400)) * 1000,
            geo: if rng.random_bool(0.5) { "de".into() } else { String::new() },
            request_id: String::new(),
            pairs: (0..rng.random_range(0..3)).map(|_| key_of(&format!("i{}", rng.random_range(0..n_items)))).collect(),
        };
        let brief = |rng: &mut rand::rngs::StdRng| ItemBrief {
            author_key: key_of(&format!("a{}", it % 3)),
            topic: rng.random_range(0..4),
            deleted: false,
            in_stock: true,
            embedding: Some(Arc::from((0..3).map(|_| rng.random_range(-1.0f32..1.0)).collect::<Vec<_>>())),
            names: None,
            version: (0, 0),
            regions: None,
            impressions: 0,
            reports: 0,
        };
        let b = brief(&mut rng);
        planner.event(&ev, &b);
        if rng.random_bool(0.15) {
            // A retry through another coordinator that derived other partners and item facts.
            let again =
                EventRecord { pairs: vec![key_of(&format!("i{}", rng.random_range(0..n_items)))], ..ev.clone() };
            let b2 = brief(&mut rng);
            planner.event(&again, &b2);
        }
    }
    planner.plan
}

/// Delivers `ops` in the given order, in random chunks, some ops repeated.
fn deliver(part: Part, cap: usize, ops: &[LoggedOp], rng: &mut rand::rngs::StdRng) -> Replica {
    let mut stream: Vec<LoggedOp> = ops.to_vec();
    for _ in 0..rng.random_range(0..4) {
        if !ops.is_empty() {
            let dup = ops[rng.random_range(0..ops.len())].clone();
            let at = rng.random_range(0..=stream.len());
            stream.insert(at, dup);
        }
    }
    let mut r = Replica::new(part, cap);
    let mut rest = &stream[..];
    while !rest.is_empty() {
        let n = rng.random_range(1..=rest.len().min(7));
        r.apply(&rest[..n]);
        rest = &rest[n..];
    }
    r
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    #[test]
    fn one_op_set_gives_one_state_in_any_order(set_seed in any::<u64>(), order_seed in any::<u64>()) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(order_seed);
        // Unknown-user caps from none to more than the users.
        let cap = (set_seed % 5) as usize * 2;
        for (part, ops) in op_set(set_seed) {
            // The replay of a log: each op once (a retry plans some ops twice), as a whole set.
            let mut once = HashSet::new();
            let logged: Vec<LoggedOp> = ops.iter().filter(|o| once.insert(o.id)).cloned().collect();
            let canonical = {
                let mut r = Replica::new(part, cap);
                r.feature = FeatureShardState::from_ops(shard_settings(cap), logged.iter());
                if part.role == Role::Generator {
                    logged.iter().for_each(|o| r.generator.apply(o));
                }
                r.hash()
            };
            let live = deliver(part, cap, &ops, &mut rng);
            let mut pulled = ops.clone();
            pulled.sort_by_key(|o| (o.at, o.id));
            let pulled = deliver(part, cap, &pulled, &mut rng);
            let mut shuffled = ops.clone();
            shuffled.shuffle(&mut rng);
            let shuffled = deliver(part, cap, &shuffled, &mut rng);
            let mut reversed = ops.clone();
            reversed.reverse();
            let reversed = deliver(part, cap, &reversed, &mut rng);
            for (name, r) in [("live", &live), ("pulled", &pulled), ("shuffled", &shuffled), ("reversed", &reversed)] {
                prop_assert_eq!(r.hash(), canonical, "{} order of {} ({} ops)", name, part, ops.len());
            }
        }
    }
}

/// The hash sees what the ops did: one more like, or another content under the same slot,
/// changes it (so the property above can fail).
#[test]
fn the_state_hash_covers_content() {
    let set = op_set(7);
    let (part, ops) = set.iter().find(|(p, v)| p.role == Role::Feature && v.len() > 3).expect("a feature partition");
    let full = FeatureShardState::from_ops(shard_settings(3), ops.iter()).state_hash();
    let fewer = FeatureShardState::from_ops(shard_settings(3), ops[..ops.len() - 1].iter()).state_hash();
    assert_ne!(full, fewer, "{part}: one op less, another state");
}
