//! The write path: validate, deduplicate, make durable (sled, one flush per batch), then apply to
//! the owning partitions. A write is acknowledged only after the flush. The same `route_*`
//! functions split records by partition for live writes and for the replay on start.
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::cluster::{CallError, Router};
use crate::config::Config;
use crate::features::shard::{BriefWants, FeatureShardState, ItemBrief, ShardSettings, UserEvent};
use crate::generators::{GeneratorSettings, GeneratorState};
use crate::ids::{self, key_of, partition_of, Key, KeyMap};
use crate::store::{Action, EventRecord, ItemRecord, Store, StoreError, UserRecord};

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
    #[error("write is durable but partition apply failed: {0}")]
    Apply(#[from] CallError),
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

pub const GLOBAL_GEO: &str = "global";

/// Internal calls of the write path get a generous fixed deadline; they are local actor calls.
const APPLY_TIMEOUT: Duration = Duration::from_secs(10);

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

/// Apply plans: the messages each partition gets for a set of records.
#[derive(Default)]
pub struct Routed {
    pub feature_items: HashMap<u32, Vec<ItemRecord>>,
    pub feature_deletes: HashMap<u32, Vec<Key>>,
    pub feature_users: HashMap<u32, Vec<UserRecord>>,
    pub feature_item_events: HashMap<u32, Vec<(Key, Action, i64)>>,
    pub feature_user_events: HashMap<u32, Vec<UserEvent>>,
    pub gen_author_items: HashMap<u32, Vec<(Key, Key, i64)>>,
    pub gen_engagement: HashMap<u32, Vec<(Key, Key, Action, i64)>>,
    pub gen_pairs: HashMap<u32, Vec<(Key, Key)>>,
}

impl Routed {
    pub fn items(&mut self, parts: u32, items: &[ItemRecord]) {
        for it in items {
            let k = key_of(&it.id);
            self.feature_items.entry(partition_of(ids::ITEM, k, parts)).or_default().push(it.clone());
            if !it.deleted {
                let a = key_of(&it.author);
                self.gen_author_items.entry(partition_of(ids::AUTHOR, a, parts)).or_default().push((
                    a,
                    k,
                    it.created_at,
                ));
            }
        }
    }

    pub fn users(&mut self, parts: u32, users: &[UserRecord]) {
        for u in users {
            self.feature_users.entry(partition_of(ids::USER, key_of(&u.id), parts)).or_default().push(u.clone());
        }
    }

    pub fn event(&mut self, parts: u32, e: &EventRecord, brief: &ItemBrief) {
        let item = key_of(&e.item);
        let user = key_of(&e.user);
        let ts = e.ts_ms.div_euclid(1000);
        self.feature_item_events.entry(partition_of(ids::ITEM, item, parts)).or_default().push((item, e.action, ts));
        self.feature_user_events.entry(partition_of(ids::USER, user, parts)).or_default().push(UserEvent {
            user,
            user_id: e.user.clone(),
            item,
            author_key: brief.author_key,
            topic: brief.topic,
            embedding: brief.embedding.clone().unwrap_or_default(),
            action: e.action,
            ts,
        });
        let mut geos = vec![key_of(GLOBAL_GEO)];
        if !e.geo.is_empty() && e.geo != GLOBAL_GEO {
            geos.push(key_of(&e.geo));
        }
        for g in geos {
            self.gen_engagement.entry(partition_of(ids::GEO, g, parts)).or_default().push((g, item, e.action, ts));
        }
        for &other in &e.pairs {
            self.gen_pairs.entry(partition_of(ids::COENGAGED, item, parts)).or_default().push((item, other));
            self.gen_pairs.entry(partition_of(ids::COENGAGED, other, parts)).or_default().push((other, item));
        }
    }

    /// Applies the plan straight to partition states (replay on start, no actors yet).
    pub fn apply_to_states(
        self,
        features: &mut HashMap<u32, FeatureShardState>,
        generators: &mut HashMap<u32, GeneratorState>,
    ) {
        for (p, items) in self.feature_items {
            if let Some(s) = features.get_mut(&p) {
                items.iter().for_each(|i| s.upsert_item(i));
            }
        }
        for (p, users) in self.feature_users {
            if let Some(s) = features.get_mut(&p) {
                users.iter().for_each(|u| s.upsert_user(u));
            }
        }
        for (p, evs) in self.feature_item_events {
            if let Some(s) = features.get_mut(&p) {
                evs.into_iter().for_each(|(k, a, ts)| s.apply_item_event(k, a, ts));
            }
        }
        for (p, evs) in self.feature_user_events {
            if let Some(s) = features.get_mut(&p) {
                evs.iter().for_each(|e| s.apply_user_event(e));
            }
        }
        for (p, v) in self.gen_author_items {
            if let Some(s) = generators.get_mut(&p) {
                v.into_iter().for_each(|(a, i, t)| s.add_author_item(a, i, t));
            }
        }
        for (p, v) in self.gen_engagement {
            if let Some(s) = generators.get_mut(&p) {
                v.into_iter().for_each(|(g, i, a, t)| s.add_engagement(g, i, a, t));
            }
        }
        for (p, v) in self.gen_pairs {
            if let Some(s) = generators.get_mut(&p) {
                v.into_iter().for_each(|(a, b)| s.add_pair(a, b));
            }
        }
    }

    /// Applies the plan through the partition actors (live writes).
    pub async fn apply(self, router: &Router) -> Result<(), CallError> {
        use crate::features::shard::FeatureMsg as F;
        use crate::generators::GeneratorMsg as G;
        let t = APPLY_TIMEOUT;
        let mut calls: Vec<futures::future::BoxFuture<'_, Result<(), CallError>>> = Vec::new();
        for (p, v) in self.feature_items {
            calls.push(Box::pin(router.feature(p, t, move |r| F::UpsertItems(Arc::new(v), r))));
        }
        for (p, v) in self.feature_deletes {
            calls.push(Box::pin(async move { router.feature(p, t, move |r| F::DeleteItems(v, r)).await.map(|_| ()) }));
        }
        for (p, v) in self.feature_users {
            calls.push(Box::pin(router.feature(p, t, move |r| F::UpsertUsers(Arc::new(v), r))));
        }
        for (p, v) in self.feature_item_events {
            calls.push(Box::pin(router.feature(p, t, move |r| F::ItemEvents(v, r))));
        }
        for (p, v) in self.feature_user_events {
            calls.push(Box::pin(router.feature(p, t, move |r| F::UserEvents(v, r))));
        }
        for (p, v) in self.gen_author_items {
            calls.push(Box::pin(router.generator(p, t, move |r| G::AuthorItems(v, r))));
        }
        for (p, v) in self.gen_engagement {
            calls.push(Box::pin(router.generator(p, t, move |r| G::Engagement(v, r))));
        }
        for (p, v) in self.gen_pairs {
            calls.push(Box::pin(router.generator(p, t, move |r| G::Pairs(v, r))));
        }
        for r in futures::future::join_all(calls).await {
            r?;
        }
        Ok(())
    }
}

/// Partition states rebuilt from the store, by partition number.
pub type Replayed = (HashMap<u32, FeatureShardState>, HashMap<u32, GeneratorState>);

/// Rebuilds partition states from the store: all of this node's partitions at start, or one
/// partition after its actor crashed. Blocking: call from a blocking thread.
pub fn replay(store: &Store, cfg: &Config, feature_parts: &[u32], gen_parts: &[u32]) -> Result<Replayed, StoreError> {
    let parts = cfg.cluster.partitions_per_role;
    let ss = shard_settings(cfg);
    let gs = generator_settings(cfg);
    let mut features: HashMap<u32, FeatureShardState> =
        feature_parts.iter().map(|p| (*p, FeatureShardState::new(ss.clone()))).collect();
    let mut generators: HashMap<u32, GeneratorState> =
        gen_parts.iter().map(|p| (*p, GeneratorState::new(gs.clone()))).collect();
    let mut briefs: KeyMap<ItemBrief> = KeyMap::default();
    let mut routed = Routed::default();
    let mut items = Vec::new();
    for it in store.scan_items() {
        let it = it?;
        let mut emb = vec![0.0; cfg.ingest.embedding_dim];
        emb.iter_mut().zip(&it.embedding).for_each(|(d, s)| *d = *s);
        briefs.insert(
            key_of(&it.id),
            ItemBrief {
                author_key: key_of(&it.author),
                topic: it.topic,
                deleted: it.deleted,
                in_stock: it.in_stock,
                embedding: Some(Arc::from(emb)),
                names: None,
            },
        );
        items.push(it);
    }
    routed.items(parts, &items);
    drop(items);
    let users: Vec<UserRecord> = store.scan_users().collect::<Result<_, _>>()?;
    routed.users(parts, &users);
    drop(users);
    routed.apply_to_states(&mut features, &mut generators);
    // Events in chunks so the routed plan stays small.
    let mut routed = Routed::default();
    let mut n = 0usize;
    for e in store.scan_events() {
        let e = e?;
        if let Some(b) = briefs.get(&key_of(&e.item)) {
            routed.event(parts, &e, b);
        }
        n += 1;
        if n.is_multiple_of(50_000) {
            std::mem::take(&mut routed).apply_to_states(&mut features, &mut generators);
        }
    }
    routed.apply_to_states(&mut features, &mut generators);
    // Rank trending now, so the first request per geo does not pay the scan.
    let now =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
    for g in generators.values_mut() {
        g.warm_trending(now);
    }
    Ok((features, generators))
}

/// The node's write coordinator.
pub struct Writer {
    pub cfg: Arc<Config>,
    pub store: Store,
    pub router: Arc<Router>,
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

    async fn flush(&self, out: &mut WriteOutcome) -> Result<(), IngestError> {
        let t = Instant::now();
        self.store.flush().await?;
        let el = t.elapsed();
        out.flush_micros = el.as_micros() as u64;
        metrics::histogram!("recsys_flush_seconds").record(el.as_secs_f64());
        Ok(())
    }

    pub async fn upsert_items(&self, items: Vec<ItemRecord>) -> Result<WriteOutcome, IngestError> {
        self.check_size("items", items.len())?;
        let mut out = WriteOutcome::default();
        let mut ok = Vec::with_capacity(items.len());
        for (i, it) in items.into_iter().enumerate() {
            match validate_item(&self.cfg, i, &it) {
                Ok(()) => ok.push(it),
                Err(e) => out.reject(e),
            }
        }
        if !ok.is_empty() {
            let store = self.store.clone();
            let batch = Arc::new(ok);
            let b2 = batch.clone();
            tokio::task::spawn_blocking(move || store.put_items(&b2))
                .await
                .map_err(|e| IngestError::Internal(e.to_string()))??;
            self.flush(&mut out).await?;
            let mut routed = Routed::default();
            routed.items(self.router.partitions(), &batch);
            routed.apply(&self.router).await?;
            out.accepted = batch.len() as u32;
        }
        metrics::counter!("recsys_ingest_records_total", "kind" => "item").increment(u64::from(out.accepted));
        Ok(out)
    }

    pub async fn upsert_users(&self, users: Vec<UserRecord>) -> Result<WriteOutcome, IngestError> {
        self.check_size("users", users.len())?;
        let mut out = WriteOutcome::default();
        let mut ok = Vec::with_capacity(users.len());
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
                ok.push(u);
            }
        }
        if !ok.is_empty() {
            let store = self.store.clone();
            let batch = Arc::new(ok);
            let b2 = batch.clone();
            tokio::task::spawn_blocking(move || store.put_users(&b2))
                .await
                .map_err(|e| IngestError::Internal(e.to_string()))??;
            self.flush(&mut out).await?;
            let mut routed = Routed::default();
            routed.users(self.router.partitions(), &batch);
            routed.apply(&self.router).await?;
            out.accepted = batch.len() as u32;
        }
        metrics::counter!("recsys_ingest_records_total", "kind" => "user").increment(u64::from(out.accepted));
        Ok(out)
    }

    pub async fn delete_items(&self, ids_in: Vec<String>) -> Result<WriteOutcome, IngestError> {
        self.check_size("item_ids", ids_in.len())?;
        let mut out = WriteOutcome::default();
        let store = self.store.clone();
        let found = tokio::task::spawn_blocking(move || {
            ids_in.into_iter().map(|id| store.get_item(&id).map(|r| (id, r))).collect::<Result<Vec<_>, _>>()
        })
        .await
        .map_err(|e| IngestError::Internal(e.to_string()))??;
        let mut tombstones = Vec::new();
        for (i, (id, rec)) in found.into_iter().enumerate() {
            match rec {
                None => out.reject(format!("item_ids[{i}]: unknown item `{id}`")),
                Some(mut r) => {
                    r.deleted = true;
                    tombstones.push(r);
                }
            }
        }
        if !tombstones.is_empty() {
            let store = self.store.clone();
            let t2 = tombstones.clone();
            tokio::task::spawn_blocking(move || store.put_items(&t2))
                .await
                .map_err(|e| IngestError::Internal(e.to_string()))??;
            self.flush(&mut out).await?;
            let mut routed = Routed::default();
            for t in &tombstones {
                let k = key_of(&t.id);
                routed.feature_deletes.entry(partition_of(ids::ITEM, k, self.router.partitions())).or_default().push(k);
            }
            routed.apply(&self.router).await?;
            out.accepted = tombstones.len() as u32;
        }
        Ok(out)
    }

    /// Looks items up in their feature partitions (for validation and for the user-side update).
    async fn briefs(&self, keys: &[Key]) -> Result<KeyMap<ItemBrief>, IngestError> {
        let parts = self.router.partitions();
        let mut by_part: HashMap<u32, Vec<Key>> = HashMap::new();
        for k in keys {
            by_part.entry(partition_of(ids::ITEM, *k, parts)).or_default().push(*k);
        }
        let calls = by_part.into_iter().map(|(p, ks)| async move {
            let ks2 = ks.clone();
            let r = self
                .router
                .feature(p, APPLY_TIMEOUT, move |reply| {
                    crate::features::shard::FeatureMsg::Briefs(ks2, BriefWants { embedding: true, names: false }, reply)
                })
                .await?;
            Ok::<_, CallError>(ks.into_iter().zip(r).filter_map(|(k, b)| b.map(|b| (k, b))).collect::<Vec<_>>())
        });
        let mut out = KeyMap::default();
        for r in futures::future::join_all(calls).await {
            out.extend(r?);
        }
        Ok(out)
    }

    pub async fn log_events(&self, events: Vec<EventRecord>) -> Result<(WriteOutcome, Vec<EventRecord>), IngestError> {
        self.check_size("events", events.len())?;
        let mut out = WriteOutcome::default();
        let keys: Vec<Key> = events.iter().map(|e| key_of(&e.item)).collect();
        let briefs = self.briefs(&keys).await?;
        let mut batch_ids = std::collections::HashSet::new();
        let mut ok: Vec<EventRecord> = Vec::with_capacity(events.len());
        for (i, e) in events.into_iter().enumerate() {
            if !batch_ids.insert(e.event_id.clone()) {
                out.duplicates += 1;
            } else if !briefs.contains_key(&key_of(&e.item)) {
                out.reject(format!("events[{i}].item_id: unknown item `{}`", e.item));
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
        let mut recent: KeyMap<Vec<Key>> = KeyMap::default();
        if cap > 0 && !likers.is_empty() {
            let parts = self.router.partitions();
            let mut by_part: HashMap<u32, Vec<Key>> = HashMap::new();
            for u in likers {
                by_part.entry(partition_of(ids::USER, u, parts)).or_default().push(u);
            }
            for (p, users) in by_part {
                let u2 = users.clone();
                let lists = self
                    .router
                    .feature(p, APPLY_TIMEOUT, move |r| crate::features::shard::FeatureMsg::RecentLikes(u2, r))
                    .await?;
                recent.extend(users.into_iter().zip(lists));
            }
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
        // Idempotency: an id already stored (an earlier or a concurrent retry) is acknowledged, not applied.
        let store = self.store.clone();
        let (ok, fresh) = tokio::task::spawn_blocking(move || store.insert_new_events(&ok).map(|f| (ok, f)))
            .await
            .map_err(|e| IngestError::Internal(e.to_string()))??;
        let before = ok.len();
        let ok: Vec<EventRecord> = ok.into_iter().zip(fresh).filter_map(|(e, new)| new.then_some(e)).collect();
        out.duplicates += (before - ok.len()) as u32;
        self.flush(&mut out).await?;
        let ok = Arc::new(ok);
        let mut routed = Routed::default();
        for e in ok.iter() {
            routed.event(self.router.partitions(), e, &briefs[&key_of(&e.item)]);
        }
        routed.apply(&self.router).await?;
        out.accepted = ok.len() as u32;
        metrics::counter!("recsys_ingest_records_total", "kind" => "event").increment(u64::from(out.accepted));
        let ok = Arc::try_unwrap(ok).unwrap_or_else(|a| (*a).clone());
        Ok((out, ok))
    }
}
