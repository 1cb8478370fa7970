//! Stage 3: features. Item columns come from the items' feature partitions in one batch per
//! partition (one call per node), user columns from the profile, cross features are computed
//! here; the matrix is built in the column order of the declared features.
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use super::{Coverage, Pipeline, Request};
use crate::cluster::{Part, Role};
use crate::features::shard::{ItemFeatureRows, ItemMeta, UserSnapshot};
use crate::features::{self, CrossFeat, FeatureKind};
use crate::generators::Candidate;
use crate::ids::{self, key_of, partition_of, Key};
use crate::transport::{ReadQuery, ReadReply};

impl Pipeline {
    #[allow(clippy::type_complexity)]
    pub(super) async fn extract(
        &self,
        cands: &[Candidate],
        profile: &UserSnapshot,
        r: &Request,
        now: i64,
        deadline: Instant,
        cov: &mut Coverage,
    ) -> (Vec<f32>, Vec<Option<ItemMeta>>, Vec<u32>) {
        let parts = self.transport.ring.partitions;
        let plan = &self.plan;
        let mut by_part: HashMap<u32, Vec<usize>> = HashMap::new();
        for (i, c) in cands.iter().enumerate() {
            by_part.entry(partition_of(ids::ITEM, c.item, parts)).or_default().push(i);
        }
        let user_emb: Arc<[f32]> = Arc::from(profile.embedding.as_slice());
        let mut idx_of: HashMap<Part, Vec<usize>> = HashMap::with_capacity(by_part.len());
        let asks: Vec<(Part, ReadQuery)> = by_part
            .into_iter()
            .map(|(p, idx)| {
                let part = Part::new(Role::Feature, p);
                let keys: Vec<Key> = idx.iter().map(|i| cands[*i].item).collect();
                idx_of.insert(part, idx);
                let q =
                    ReadQuery::ItemFeatures { keys, feats: plan.item_feats.clone(), user_emb: user_emb.clone(), now };
                (part, q)
            })
            .collect();
        let out = self.transport.read_fanout("features", asks, deadline).await;
        let width = plan.len();
        let n = cands.len();
        let mut rows = vec![0.0f32; n * width];
        let mut metas: Vec<Option<ItemMeta>> = vec![None; n];
        let mut defaulted = vec![0u32; n];
        let mut item_rows: Vec<Option<(Arc<ItemFeatureRows>, usize)>> = vec![None; n];
        for (part, reply) in out.replies {
            let (ReadReply::ItemFeatures(mut reply), Some(idx)) = (reply, idx_of.remove(&part)) else { continue };
            // Moved, not cloned: each clone is three atomic increments on shared cache lines.
            let fetched = std::mem::take(&mut reply.meta);
            let reply = Arc::new(reply);
            for ((j, i), m) in idx.into_iter().enumerate().zip(fetched) {
                if m.is_some() {
                    item_rows[i] = Some((reply.clone(), j));
                }
                metas[i] = m;
            }
        }
        cov.stage(out.coverage);
        // User columns are the same for every candidate: a template row carries them (and every
        // default); item and cross columns are then filled per candidate from short column lists.
        let mut template = plan.defaults.clone();
        let mut user_defaulted = 0u32;
        let mut item_cols: Vec<(usize, usize)> = Vec::new();
        let mut cross_cols: Vec<(usize, CrossFeat)> = Vec::new();
        for (col, kind) in plan.kinds.iter().enumerate() {
            match kind {
                FeatureKind::User(f) => match profile.feature(*f, now) {
                    Some(v) if v.is_finite() => template[col] = v,
                    _ => user_defaulted += 1,
                },
                FeatureKind::Item(_) => item_cols.push((col, plan.item_col[col].unwrap_or(0))),
                FeatureKind::Cross(f) => cross_cols.push((col, *f)),
            }
        }
        let geo = if !r.geo.is_empty() { key_of(&r.geo) } else { key_of(&profile.geo) };
        let mut any_default = false;
        for i in 0..n {
            let row = &mut rows[i * width..(i + 1) * width];
            row.copy_from_slice(&template);
            let mut missing = user_defaulted;
            match &item_rows[i] {
                Some((rep, j)) => {
                    let values = &rep.values[j * rep.stride..(j + 1) * rep.stride];
                    for &(col, k) in &item_cols {
                        match values[k] {
                            v if v.is_finite() => row[col] = v,
                            _ => missing += 1,
                        }
                    }
                }
                None => missing += item_cols.len() as u32,
            }
            for &(col, f) in &cross_cols {
                match cross(f, &cands[i], metas[i].as_ref(), profile, geo) {
                    Some(v) if v.is_finite() => row[col] = v,
                    _ => missing += 1,
                }
            }
            defaulted[i] = missing;
            any_default |= metas[i].is_none();
        }
        if any_default {
            cov.fallback("feature_defaults");
        }
        (rows, metas, defaulted)
    }
}

fn cross(f: CrossFeat, c: &Candidate, m: Option<&ItemMeta>, p: &UserSnapshot, geo: Key) -> Option<f32> {
    let b = |x: bool| if x { 1.0 } else { 0.0 };
    Some(match f {
        CrossFeat::SrcTrending => b(c.source & features::SRC_TRENDING != 0),
        CrossFeat::SrcFollows => b(c.source & features::SRC_FOLLOWS != 0),
        CrossFeat::SrcCoengaged => b(c.source & features::SRC_COENGAGED != 0),
        CrossFeat::NumSources => c.source.count_ones() as f32,
        _ => {
            let m = m?;
            if !p.known {
                return None;
            }
            match f {
                CrossFeat::FollowsAuthor => b(p.follows.binary_search(&m.author_key).is_ok()),
                CrossFeat::TopicAffinity => *p.topic_affinity.get(m.topic as usize)?,
                CrossFeat::AuthorAffinity => p.author_affinity.get(&m.author_key).copied().unwrap_or(0.0),
                CrossFeat::GeoMatch => b(m.geo_key == geo),
                CrossFeat::EmbCosine => m.emb_cosine,
                _ => unreachable!("source features handled above"),
            }
        }
    })
}
