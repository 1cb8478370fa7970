//! Stage 2: filters. The seen filter runs on the profile's bloom filter; the rest on item state
//! (deleted, out of stock, blocked author) looked up in the items' feature partitions. A filter
//! is one entry in `FILTERS` plus its test in `reason`.
use std::sync::Arc;
use std::time::Instant;

use super::features::Hydrated;
use super::{Coverage, Pipeline};
use crate::features::shard::{BriefWants, ItemBrief, UserSnapshot};
use crate::generators::Candidate;
use crate::ids::{self, Key, KeyMap};
use crate::transport::{ReadQuery, ReadReply};

/// Filters in the order they are applied (and counted in coverage).
pub const FILTERS: [&str; 5] = ["seen", "deleted", "out_of_stock", "blocked_author", "unverified"];

/// Why item state removes a candidate (an index into `FILTERS`), if it does.
fn reason(b: &ItemBrief, profile: &UserSnapshot) -> Option<usize> {
    if b.deleted {
        Some(1)
    } else if !b.in_stock {
        Some(2)
    } else if profile.blocked.binary_search(&b.author_key).is_ok() {
        Some(3)
    } else {
        None
    }
}

impl Pipeline {
    /// Item state per key from the owning feature partitions (replicas on failure).
    pub(super) async fn briefs(
        &self,
        keys: &[Key],
        wants: BriefWants,
        deadline: Instant,
        stage: &'static str,
        cov: &mut Coverage,
    ) -> KeyMap<ItemBrief> {
        let (briefs, c) = self.transport.briefs(stage, keys, wants, deadline).await;
        cov.stage(c);
        briefs
    }

    /// Filters the candidates; the same call per partition brings the survivors' feature rows.
    pub(super) async fn filter(
        &self,
        cands: Vec<Candidate>,
        profile: &UserSnapshot,
        now: i64,
        deadline: Instant,
        cov: &mut Coverage,
    ) -> (Vec<Candidate>, Hydrated) {
        let mut removed = [0u32; FILTERS.len()];
        let cands: Vec<Candidate> = match &profile.seen {
            Some(seen) => cands
                .into_iter()
                .filter(|c| {
                    let s = seen.contains(c.item);
                    removed[0] += u32::from(s);
                    !s
                })
                .collect(),
            None => cands,
        };
        let (briefs, mut hydrated) = self.hydrate(&cands, profile, now, deadline, cov).await;
        let kept: Vec<Candidate> = cands
            .into_iter()
            .filter(|c| {
                // Unverifiable (unknown item, or its partition missing on every replica): never shown.
                let why = briefs.get(&c.item).map_or(Some(4), |b| reason(b, profile));
                if let Some(w) = why {
                    removed[w] += 1;
                }
                why.is_none()
            })
            .collect();
        for (name, n) in FILTERS.into_iter().zip(removed) {
            metrics::counter!("recsys_filter_removed_total", "filter" => name).increment(u64::from(n));
            cov.filter_removed.push((name, n));
        }
        if kept.len() < hydrated.rows.len() {
            let keep: std::collections::HashSet<Key> = kept.iter().map(|c| c.item).collect();
            hydrated.rows.retain(|k, _| keep.contains(k));
        }
        (kept, hydrated)
    }

    /// Item state and item feature rows of the candidates, one call per node.
    async fn hydrate(
        &self,
        cands: &[Candidate],
        profile: &UserSnapshot,
        now: i64,
        deadline: Instant,
        cov: &mut Coverage,
    ) -> (KeyMap<ItemBrief>, Hydrated) {
        let user_emb: Arc<[f32]> = Arc::from(profile.embedding.as_slice());
        let feats = &self.plan.item_feats;
        let (replies, c) = self
            .transport
            .read_keyed("filtering", ids::ITEM, cands.iter().map(|c| c.item), deadline, |keys| ReadQuery::Hydrate {
                keys,
                feats: feats.clone(),
                user_emb: user_emb.clone(),
                now,
            })
            .await;
        cov.stage(c);
        let mut briefs = KeyMap::with_capacity_and_hasher(cands.len(), Default::default());
        let mut hydrated = Hydrated::default();
        hydrated.rows.reserve(cands.len());
        for (keys, reply) in replies {
            let ReadReply::Hydrate(bs, mut rows) = reply else { continue };
            // Moved, not cloned: each clone of the block is an atomic increment on a shared line.
            let metas = std::mem::take(&mut rows.meta);
            let block = Arc::new(rows);
            for (j, ((k, b), m)) in keys.into_iter().zip(bs).zip(metas).enumerate() {
                if let (Some(b), Some(m)) = (b, m) {
                    briefs.insert(k, b);
                    hydrated.rows.insert(k, (m, block.clone(), j as u32));
                }
            }
        }
        (briefs, hydrated)
    }
}
