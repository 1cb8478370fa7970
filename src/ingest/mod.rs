//! The write path on the coordinating node: validate, turn records into partition ops
//! (`ops`), send them to every live replica of each partition (`Transport::write`), and
//! acknowledge once they are durable (sled, one flush per batch on each replica) and applied.
//! Also the replay of one partition from its op log at start or after a crash.
pub mod ops;
#[cfg(test)]
mod permutations;
pub mod validate;

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::domain::ops::CLOCK;
use crate::domain::{Action, EventRecord, ItemRecord, Part, Plan, Role, UserRecord};
use crate::features::shard::{BriefWants, FeatureShardState, ItemBrief, ShardSettings};
use crate::generators::{GeneratorSettings, GeneratorState};
use crate::ids::{self, key_of, Key, KeyMap};
use crate::store::{Store, StoreError};
use crate::transport::{ReadQuery, ReadReply, Transport, WriteError};

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
        unknown_cap: cfg.ingest.unknown_users_per_partition,
    }
}

pub fn generator_settings(cfg: &Config) -> GeneratorSettings {
    GeneratorSettings {
        trending_window_hours: cfg.retrieval.trending_window_hours,
        author_recent_items: cfg.retrieval.author_recent_items,
        topic_recent_items: cfg.retrieval.topic_recent_items,
        coengagement_neighbors: cfg.retrieval.coengagement_neighbors,
    }
}

/// Rebuilds one feature partition from its op log: the state of the logged op set (see
/// `FeatureShardState::from_ops`). Blocking: call from a blocking thread.
pub fn replay_feature(store: &Store, cfg: &Config, partition: u32) -> Result<FeatureShardState, StoreError> {
    let ops = store.scan(Part::new(Role::Feature, partition))?;
    Ok(FeatureShardState::from_ops(shard_settings(cfg), ops.iter()))
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
    crate::clock::unix_secs()
}

fn now_ms() -> i64 {
    crate::clock::unix_ms()
}

/// An event's co-engagement partners: the user's likes from event-time seconds *before* the
/// event's, newest first, at most `cap`. Derived from the event's own time, not from when it is
/// written, so a retry after the user liked other items derives the same partners, plans the
/// same ops (ids cover content, `ops`) and is a duplicate. Likes of the same second are left out:
/// profiles keep seconds, and which of two same-second likes arrived first differs between
/// attempts. (Likes older than the event that arrive only between two attempts still change the
/// partners; see `ops` on re-derived retries.)
fn partners(likes: &[(i64, Key)], ts: i64, item: Key, cap: usize) -> Vec<Key> {
    likes.iter().filter(|&&(t, k)| t < ts && k != item).take(cap).map(|(_, k)| *k).collect()
}

/// Records a like in a newest-first list (newest like per item), as the user's partition does.
fn add_like(list: &mut Vec<(i64, Key)>, ts: i64, item: Key, keep: usize) {
    if let Some(i) = list.iter().position(|(_, k)| *k == item) {
        if list[i].0 >= ts {
            return;
        }
        list.remove(i);
    }
    let pos = list.partition_point(|e| *e > (ts, item));
    list.insert(pos, (ts, item));
    list.truncate(keep);
}

/// The node's write coordinator.
pub struct Writer {
    pub cfg: Arc<Config>,
    pub transport: Arc<Transport>,
}

impl Writer {
    pub fn check_size(&self, field: &'static str, n: usize) -> Result<(), IngestError> {
        if n > self.cfg.ingest.max_batch {
            return Err(IngestError::TooLarge { field, got: n, limit: self.cfg.ingest.max_batch });
        }
        if n == 0 {
            return Err(IngestError::Invalid(format!("{field}: batch is empty")));
        }
        Ok(())
    }

    fn planner(&self) -> ops::Planner {
        ops::Planner::new(self.transport.ring().partitions, self.cfg.retrieval.global_trending_shards)
    }

    fn timeout(&self) -> Duration {
        Duration::from_millis(self.cfg.ingest.replica_timeout_ms)
    }

    /// Sends the batch's ops to their replicas; the outcome gets the slowest replica's flush.
    async fn commit(&self, plan: Plan, out: &mut WriteOutcome) -> Result<(), IngestError> {
        let w = self.transport.write(plan, self.timeout()).await?;
        out.flush_micros = w.flush_micros;
        Ok(())
    }

    pub async fn upsert_items(&self, items: Vec<ItemRecord>) -> Result<WriteOutcome, IngestError> {
        self.check_size("items", items.len())?;
        let mut out = WriteOutcome::default();
        let mut planner = self.planner();
        let wall = now_ms();
        // One version per record, in batch order: of two records for one item the later wins.
        let (at, seq0) = CLOCK.tick(wall, items.len() as u32);
        let lim = validate::Limits::new(&self.cfg, wall);
        for (i, it) in items.into_iter().enumerate() {
            match validate::item(i, &it, &lim) {
                Ok(()) => {
                    planner.item(&it, at, seq0 + i as u32);
                    out.accepted += 1;
                }
                Err(e) => out.reject(e.to_string()),
            }
        }
        if out.accepted > 0 {
            self.commit(planner.plan, &mut out).await?;
        }
        metrics::counter!("recsys_ingest_rejected_total", "kind" => "item").increment(u64::from(out.rejected));
        metrics::counter!("recsys_ingest_records_total", "kind" => "item").increment(u64::from(out.accepted));
        Ok(out)
    }

    pub async fn upsert_users(&self, users: Vec<UserRecord>) -> Result<WriteOutcome, IngestError> {
        self.check_size("users", users.len())?;
        let mut out = WriteOutcome::default();
        let mut planner = self.planner();
        let wall = now_ms();
        let (at, seq0) = CLOCK.tick(wall, users.len() as u32);
        let lim = validate::Limits::new(&self.cfg, wall);
        for (i, u) in users.into_iter().enumerate() {
            match validate::user(i, &u, &lim) {
                Ok(()) => {
                    planner.user(&u, at, seq0 + i as u32);
                    out.accepted += 1;
                }
                Err(e) => out.reject(e.to_string()),
            }
        }
        if out.accepted > 0 {
            self.commit(planner.plan, &mut out).await?;
        }
        metrics::counter!("recsys_ingest_rejected_total", "kind" => "user").increment(u64::from(out.rejected));
        metrics::counter!("recsys_ingest_records_total", "kind" => "user").increment(u64::from(out.accepted));
        Ok(out)
    }

    pub async fn delete_items(&self, ids_in: Vec<String>) -> Result<WriteOutcome, IngestError> {
        self.check_size("item_ids", ids_in.len())?;
        let mut out = WriteOutcome::default();
        let keys: Vec<Key> = ids_in.iter().map(|id| key_of(id)).collect();
        let known = self.briefs(&keys, BriefWants::default()).await?;
        let mut planner = self.planner();
        // Versions above the upserts these deletes follow, whichever node's clock stamped them
        // (finding 4 of issue 15: a delete through a node behind lost to an earlier upsert).
        let wall = now_ms();
        for b in known.values() {
            CLOCK.observe(wall, b.version.0, b.version.1);
        }
        let (at, seq0) = CLOCK.tick(wall, ids_in.len() as u32);
        for (i, (id, k)) in ids_in.iter().zip(&keys).enumerate() {
            if let Err(e) = validate::item_id(i, id) {
                out.reject(e.to_string());
            } else if known.contains_key(k) {
                planner.delete(*k, at, seq0 + i as u32);
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
    /// partition no replica answers for is asked again, for its keys only, a few times within
    /// one replica timeout (a copy catching up after a start or a freeze answers a moment
    /// later); still missing, it fails the batch: its events cannot be checked.
    async fn briefs(&self, keys: &[Key], wants: BriefWants) -> Result<KeyMap<ItemBrief>, IngestError> {
        let deadline = Instant::now() + self.timeout();
        let mut attempt = 0u32;
        let mut found = KeyMap::default();
        let mut ask = keys.to_vec();
        loop {
            let (got, cov) = self.transport.briefs("ingest", &ask, wants, deadline).await;
            found.extend(got);
            let Some(p) = cov.missing.first() else { return Ok(found) };
            let parts = self.transport.ring().partitions;
            ask.retain(|k| cov.missing.contains(&ids::partition_of(ids::ITEM, *k, parts)));
            attempt += 1;
            let pause = Duration::from_millis(50 * u64::from(attempt));
            if attempt >= 5 || Instant::now() + pause >= deadline {
                return Err(IngestError::Unavailable(format!(
                    "partition feature/{p}: no replica answered the item lookup of this batch"
                )));
            }
            metrics::counter!("recsys_ingest_lookup_retries_total").increment(1);
            tokio::time::sleep(pause).await;
        }
    }

    /// Per user, the recent likes as (event time s, item), newest first.
    async fn recent_likes(&self, users: Vec<Key>) -> Result<KeyMap<Vec<(i64, Key)>>, IngestError> {
        let deadline = Instant::now() + self.timeout();
        let (replies, _) =
            self.transport.read_keyed("ingest", ids::USER, users, deadline, ReadQuery::RecentLikes).await;
        let mut recent = KeyMap::default();
        for (us, reply) in replies {
            if let ReadReply::RecentLikes(lists) = reply {
                let timed = lists.into_iter().map(|flat| flat.chunks_exact(2).map(|c| (c[1] as i64, c[0])).collect());
                recent.extend(us.into_iter().zip(timed));
            }
        }
        // A user whose partition did not answer gets no co-engagement pairs from this batch.
        Ok(recent)
    }

    /// Events arrive with their index in the client's batch (rejections name it), some of them
    /// possibly rejected already while decoding (`out`).
    pub async fn log_events(
        &self,
        events: Vec<(usize, EventRecord)>,
        mut out: WriteOutcome,
    ) -> Result<(WriteOutcome, Vec<EventRecord>), IngestError> {
        let lim = validate::Limits::new(&self.cfg, now_ms());
        let mut valid = Vec::with_capacity(events.len());
        for (i, e) in events {
            match validate::event(i, &e, &lim) {
                Ok(()) => valid.push((i, e)),
                Err(r) => out.reject(r.to_string()),
            }
        }
        if valid.is_empty() {
            return Ok((out, vec![]));
        }
        let keys: Vec<Key> = valid.iter().map(|(_, e)| key_of(&e.item)).collect();
        let briefs = self.briefs(&keys, BriefWants { embedding: true, names: true }).await?;
        let mut batch_ids = std::collections::HashSet::new();
        let mut ok: Vec<EventRecord> = Vec::with_capacity(valid.len());
        for (i, e) in valid {
            let brief = briefs.get(&key_of(&e.item));
            if brief.is_none() {
                out.reject(format!("events[{i}].item_id: unknown item `{}`", e.item));
            } else if brief.and_then(|b| b.names.as_ref()).is_some_and(|(id, _)| **id != *e.item) {
                // Another item holds this 64-bit key (README, "Entity ids"): never count into it.
                metrics::counter!("recsys_key_collisions_total").increment(1);
                out.reject(format!("events[{i}].item_id: `{}` shares its 64-bit key with another item", e.item));
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
                let list = recent.entry(key_of(&e.user)).or_default();
                e.pairs = partners(list, e.ts_ms.div_euclid(1000), key_of(&e.item), cap);
                add_like(list, e.ts_ms.div_euclid(1000), key_of(&e.item), self.cfg.retrieval.recent_likes);
            }
        }
        let mut planner = self.planner();
        let placed: Vec<Vec<(Part, usize)>> = ok.iter().map(|e| planner.event(e, &briefs[&key_of(&e.item)])).collect();
        let w = self.transport.write(planner.plan, self.timeout()).await?;
        out.flush_micros = w.flush_micros;
        // Idempotency: an event whose item op (derived from the event alone) every replica had
        // already logged is a duplicate. Op ids cover content (`ops`): when a retry derived other
        // partners or item facts, its changed ops are new ops (stored and repaired everywhere,
        // never two contents under one id) and those partitions count them; such re-derived
        // retries are counted in `recsys_ingest_rederived_total`.
        let is_new = |(part, i): &(Part, usize)| w.new.get(part).and_then(|f| f.get(*i)).copied().unwrap_or(false);
        let mut fresh = Vec::with_capacity(ok.len());
        for (e, at) in ok.into_iter().zip(placed) {
            if at.first().is_some_and(is_new) {
                fresh.push(e);
            } else {
                if at.iter().any(is_new) {
                    metrics::counter!("recsys_ingest_rederived_total").increment(1);
                }
                out.duplicates += 1;
            }
        }
        out.accepted = fresh.len() as u32;
        if out.rejected > 0 {
            metrics::counter!("recsys_ingest_rejected_total", "kind" => "event").increment(u64::from(out.rejected));
        }
        metrics::counter!("recsys_ingest_records_total", "kind" => "event").increment(u64::from(out.accepted));
        Ok((out, fresh))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Finding 1 of issue 15, the coordinator's half: partners came from the user's likes at
    /// write time, so a retry after the user liked another item derived others (and logged
    /// other content under the same op id). They now come from the likes older than the event.
    #[test]
    fn a_retry_after_a_later_like_derives_the_same_partners() {
        let mut likes = vec![];
        add_like(&mut likes, 100, 1, 20);
        add_like(&mut likes, 200, 2, 20);
        let first = partners(&likes, 300, 3, 10);
        assert_eq!(first, vec![2, 1]);
        add_like(&mut likes, 300, 3, 20); // the first attempt's like is applied
        add_like(&mut likes, 400, 4, 20); // the user likes another item
        assert_eq!(partners(&likes, 300, 3, 10), first, "the retry derives the same partners");
        assert_eq!(partners(&likes, 300, 3, 1), vec![2], "capped, newest first");
        add_like(&mut likes, 300, 1, 20);
        assert_eq!(partners(&likes, 300, 3, 10), vec![2], "a like of the same second is no partner");
        add_like(&mut likes, 50, 2, 20);
        assert_eq!(likes[..2], [(400, 4), (300, 3)], "an older like of an item does not move it");
    }
}
