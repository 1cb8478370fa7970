//! Reads of a feature partition: item briefs (for filters and the write path), item feature
//! rows gathered from the dense blocks, user snapshots and recent likes.
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::super::ItemFeat;
use super::profile::{UserSnapshot, EMB_SCALE};
use super::state::*;
use crate::counters::{self, Window};
use crate::domain::Action;
use crate::ids::Key;

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
    /// Geo licensing (None: served everywhere).
    pub regions: Option<Arc<ItemRegions>>,
    /// Lifetime impressions and reports (the report-rate filter).
    pub impressions: u32,
    pub reports: u32,
    /// (`at` ms, `seq`) of the upsert the item's row comes from: a coordinator deleting the
    /// item observes it first (`domain::ops::Hlc`), so the delete's version is above the upsert
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

impl FeatureShardState {
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
            regions: self.heads[r].regions.clone(),
            impressions: self.heads[r].impressions,
            reports: self.heads[r].reports,
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
            hidden_topics: u.hidden_topics.clone(),
            topic_hides: u.topic_hides.clone(),
            author_hides: u.author_hides.clone(),
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

fn cosine(item: &[f32], user: &[f32], user_norm: f32) -> f32 {
    let dot: f32 = item.iter().zip(user).map(|(a, b)| a * b).sum();
    let n = item.iter().map(|v| v * v).sum::<f32>().sqrt() * user_norm;
    if n > 0.0 {
        dot / n
    } else {
        0.0
    }
}
