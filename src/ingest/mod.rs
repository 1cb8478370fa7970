//! The write path on the coordinating node: validate, turn records into partition ops
//! (`ops`), send them to every live replica of each partition (`Transport::write`), and
//! acknowledge once they are durable (sled, one flush per batch on each replica) and applied.
//! Also the replay of one partition from its op log at start or after a crash.
pub mod ops;

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::cluster::{Part, Role};
use crate::config::Config;
use crate::features::shard::{BriefWants, FeatureShardState, ItemBrief, ShardSettings};
use crate::generators::{GeneratorSettings, GeneratorState};
use crate::ids::{self, key_of, Key, KeyMap};
use crate::store::{Action, EventRecord, ItemRecord, Store, StoreError, UserRecord};
use crate::transport::{ReadQuery, ReadReply, Transport, WriteError};

pub use ops::GLOBAL_GEO;

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("{field}: batch of {got} exceeds the limit of {limit}")]
    TooLarge { field: &'static str, got: usize, limit: usize },
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("internal: {0}")]
    Internal(String),
    #[error("{0}")]
    Unavailable(String),
}

impl From<WriteError> for IngestError {
    fn from(e: WriteError) -> Self {
        IngestError::Unavailable(e.to_string())
    }
}

#[derive(Debug, Default, Clone)]
pub struct WriteOutcome {
    pub accepted: u32,
    pub duplicates: u32,
    pub rejected: u32,
    pub rejections: Vec<String>,
    pub flush_micros: u64,
}

impl WriteOutcome {
    /// Counts a rejected record and keeps its reason (the first ten).
    pub fn reject(&mut self, why: String) {
        self.rejected += 1;
        if self.rejections.len() < 10 {
            self.rejections.push(why);
        }
    }
}

pub fn shard_settings(cfg: &Config) -> ShardSettings {
    ShardSettings {
        emb_dim: cfg.ingest.embedding_dim,
        topics: cfg.ingest.topics as usize,
        recent_likes: cfg.retrieval.recent_likes,
        seen_capacity: cfg.filters.seen_bloom_capacity,
        seen_fp: cfg.filters.seen_bloom_fp_rate,
    }
}

pub fn generator_settings(cfg: &Config) -> GeneratorSettings {
    GeneratorSettings {
        trending_window_hours: cfg.retrieval.trending_window_hours,
        author_recent_items: cfg.retrieval.author_recent_items,
        coengagement_neighbors: cfg.retrieval.coengagement_neighbors,
    }
}

fn valid_id(s: &str) -> bool {
    !s.is_empty() && s.len() <= 256 && !s.chars().any(char::is_control)
}

pub fn validate_item(cfg: &Config, i: usize, it: &ItemRecord) -> Result<(), String> {
    let f = |field: &str, why: &str| Err(format!("items[{i}].{field}: {why}"));
    if !valid_id(&it.id) {
        return f("item_id", "must be 1..=256 printable characters");
    }
    if !valid_id(&it.author) {
        return f("author_id", "must be 1..=256 printable characters");
    }
    if it.geo.len() > 64 {
        return f("geo", "longer than 64 bytes");
    }
    if it.topic >= cfg.ingest.topics {
        return f("topic", &format!("must be below {}", cfg.ingest.topics));
    }
    if !it.embedding.is_empty() && it.embedding.len() != cfg.ingest.embedding_dim {
        return f("embedding", &format!("must have {} values or none", cfg.ingest.embedding_dim));
    }
    if ![it.price, it.quality, it.duration_secs].iter().chain(&it.embedding).all(|v| v.is_finite()) {
        return f("price/quality/duration_secs/embedding", "must be finite numbers");
    }
    Ok(())
}

/// Rebuilds one feature partition from its op log. Blocking: call from a blocking thread.
pub fn replay_feature(store: &Store, cfg: &Config, partition: u32) -> Result<FeatureShardState, StoreError> {
    let mut st = FeatureShardState::new(shard_settings(cfg));
    for o in store.scan(Part::new(Role::Feature, partition))? {
        st.apply(&o);
    }
    Ok(st)
}

/// Rebuilds one generator partition from its op log. Blocking: call from a blocking thread.
pub fn replay_generator(store: &Store, cfg: &Config, partition: u32) -> Result<GeneratorState, StoreError> {
    let mut st = GeneratorState::new(generator_settings(cfg));
    for o in store.scan(Part::new(Role::Generator, partition))? {
        st.apply(&o);
    }
    // Rank trending now, so the first request per geo does not pay the scan.
    st.warm_trending(now_secs());
    Ok(st)
}

fn now_secs() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// The node's write coordinator.
pub struct Writer {
    pub cfg: Arc<Config>,
    pub transport: Arc<Transport>,
}

impl Writer {
    fn check_size(&self, field: &'static str, n: usize) -> Result<(), IngestError> {
        if n > self.cfg.ingest.max_batch {
            return Err(IngestError::TooLarge { field, got: n, limit: self.cfg.ingest.max_batch });
        }
        if n == 0 {
            return Err(IngestError::Invalid(format!("{field}: batch is empty")));
        }
        Ok(())
    }

    fn planner(&self) -> ops::Planner {
        ops::Planner::new(self.transport.ring.partitions, self.cfg.retrieval.global_trending_shards)
    }

    fn timeout(&self) -> Duration {
        Duration::from_millis(self.cfg.ingest.replica_timeout_ms)
    }

    /// Sends the batch's ops to their replicas; the outcome gets the slowest replica's flush.
    async fn commit(&self, plan: ops::Plan, out: &mut WriteOutcome) -> Result<(), IngestError> {
        let w = self.transport.write(plan, self.timeout()).await?;
        out.flush_micros = w.flush_micros;
        Ok(())
    }

    pub async fn upsert_items(&self, items: Vec<ItemRecord>) -> Result<WriteOutcome, IngestError> {
        self.check_size("items", items.len())?;
        let mut out = WriteOutcome::default();
        let mut planner = self.planner();
        let at = now_ms();
        for (i, it) in items.into_iter().enumerate() {
            match validate_item(&self.cfg, i, &it) {
                Ok(()) => {
                    planner.item(&it, at);
                    out.accepted += 1;
                }
                Err(e) => out.reject(e),
            }
        }
        if out.accepted > 0 {
            self.commit(planner.plan, &mut out).await?;
        }
        metrics::counter!("recsys_ingest_records_total", "kind" => "item").increment(u64::from(out.accepted));
        Ok(out)
    }

    pub async fn upsert_users(&self, users: Vec<UserRecord>) -> Result<WriteOutcome, IngestError> {
        self.check_size("users", users.len())?;
        let mut out = WriteOutcome::default();
        let mut planner = self.planner();
        let at = now_ms();
        for (i, u) in users.into_iter().enumerate() {
            if !valid_id(&u.id) {
                out.reject(format!("users[{i}].user_id: must be 1..=256 printable characters"));
            } else if u.geo.len() > 64 {
                out.reject(format!("users[{i}].geo: longer than 64 bytes"));
            } else if let Some(j) = u.follows.iter().chain(&u.blocked_authors).position(|a| !valid_id(a)) {
                out.reject(format!("users[{i}].follows/blocked_authors[{j}]: invalid author id"));
            } else if u.follows.len() > 10_000 || u.blocked_authors.len() > 10_000 {
                out.reject(format!("users[{i}].follows: at most 10000 entries"));
            } else {
                planner.user(&u, at);
                out.accepted += 1;
            }
        }
        if out.accepted > 0 {
            self.commit(planner.plan, &mut out).await?;
        }
        metrics::counter!("recsys_ingest_records_total", "kind" => "user").increment(u64::from(out.accepted));
        Ok(out)
    }

    pub async fn delete_items(&self, ids_in: Vec<String>) -> Result<WriteOutcome, IngestError> {
        self.check_size("item_ids", ids_in.len())?;
        let mut out = WriteOutcome::default();
        let keys: Vec<Key> = ids_in.iter().map(|id| key_of(id)).collect();
        let known = self.briefs(&keys, BriefWants::default()).await?;
        let mut planner = self.planner();
        let at = now_ms();
        for (i, (id, k)) in ids_in.iter().zip(&keys).enumerate() {
            if known.contains_key(k) {
                planner.delete(*k, at);
                out.accepted += 1;
            } else {
                out.reject(format!("item_ids[{i}]: unknown item `{id}`"));
            }
        }
        if out.accepted > 0 {
            self.commit(planner.plan, &mut out).await?;
        }
        Ok(out)
    }

    /// Looks items up in their feature partitions (validation and the user-side update). A
    /// partition no replica answers for fails the batch: its events cannot be checked.
    async fn briefs(&self, keys: &[Key], wants: BriefWants) -> Result<KeyMap<ItemBrief>, IngestError> {
        let deadline = Instant::now() + self.timeout();
        let (found, cov) = self.transport.briefs("ingest", keys, wants, deadline).await;
        if let Some(p) = cov.missing.first() {
            return Err(IngestError::Unavailable(format!(
                "partition feature/{p}: no replica answered the item lookup of this batch"
            )));
        }
        Ok(found)
    }

    async fn recent_likes(&self, users: Vec<Key>) -> Result<KeyMap<Vec<Key>>, IngestError> {
        let deadline = Instant::now() + self.timeout();
        let (replies, _) =
            self.transport.read_keyed("ingest", ids::USER, users, deadline, ReadQuery::RecentLikes).await;
        let mut recent = KeyMap::default();
        for (us, reply) in replies {
            if let ReadReply::RecentLikes(lists) = reply {
                recent.extend(us.into_iter().zip(lists));
            }
        }
        // A user whose partition did not answer gets no co-engagement pairs from this batch.
        Ok(recent)
    }

    pub async fn log_events(&self, events: Vec<EventRecord>) -> Result<(WriteOutcome, Vec<EventRecord>), IngestError> {
        self.check_size("events", events.len())?;
        let mut out = WriteOutcome::default();
        let keys: Vec<Key> = events.iter().map(|e| key_of(&e.item)).collect();
        let briefs = self.briefs(&keys, BriefWants { embedding: true, names: false }).await?;
        let mut batch_ids = std::collections::HashSet::new();
        let mut ok: Vec<EventRecord> = Vec::with_capacity(events.len());
        for (i, e) in events.into_iter().enumerate() {
            if !briefs.contains_key(&key_of(&e.item)) {
                out.reject(format!("events[{i}].item_id: unknown item `{}`", e.item));
            } else if !batch_ids.insert(e.event_id.clone()) {
                // Validated first, then the id claimed: an invalid twin never hides a valid event.
                out.duplicates += 1;
            } else {
                ok.push(e);
            }
        }
        if ok.is_empty() {
            return Ok((out, ok));
        }
        // Co-engagement pairs: each like pairs with the user's most recent likes (capped).
        let cap = self.cfg.retrieval.coengagement_max_pairs_per_event;
        let mut likers: Vec<Key> = ok.iter().filter(|e| e.action == Action::Like).map(|e| key_of(&e.user)).collect();
        likers.sort_unstable();
        likers.dedup();
        if cap > 0 && !likers.is_empty() {
            let mut recent = self.recent_likes(likers).await?;
            ok.sort_by_key(|e| e.ts_ms);
            for e in ok.iter_mut().filter(|e| e.action == Action::Like) {
                let item = key_of(&e.item);
                let list = recent.entry(key_of(&e.user)).or_default();
                e.pairs = list.iter().filter(|k| **k != item).take(cap).copied().collect();
                list.retain(|k| *k != item);
                list.insert(0, item);
                list.truncate(self.cfg.retrieval.recent_likes);
            }
        }
        let mut planner = self.planner();
        let homes: Vec<(Part, usize)> = ok.iter().map(|e| planner.event(e, &briefs[&key_of(&e.item)])).collect();
        let w = self.transport.write(planner.plan, self.timeout()).await?;
        out.flush_micros = w.flush_micros;
        // Idempotency: an event whose item op every replica had already logged is a duplicate.
        let mut fresh = Vec::with_capacity(ok.len());
        for (e, (part, i)) in ok.into_iter().zip(homes) {
            if w.new.get(&part).and_then(|f| f.get(i)).copied().unwrap_or(false) {
                fresh.push(e);
            } else {
                out.duplicates += 1;
            }
        }
        out.accepted = fresh.len() as u32;
        metrics::counter!("recsys_ingest_records_total", "kind" => "event").increment(u64::from(out.accepted));
        Ok((out, fresh))
    }
}
