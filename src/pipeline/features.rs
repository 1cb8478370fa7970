//! Stage 3: features. Item columns come from the items' feature partitions — fetched in the
//! filtering stage together with the item state, one batch per partition and one call per node —
//! user columns from the profile; cross features are computed here; the matrix is built in the
//! column order of the declared features.
use std::sync::Arc;

use super::{Coverage, Pipeline, Request};
use crate::features::shard::{ItemBrief, ItemFeatureRows, ItemMeta, UserSnapshot};
use crate::features::{self, CrossFeat, FeatureKind};
use crate::generators::Candidate;
use crate::ids::{key_of, Key, KeyMap};

/// What the hydrators fetched, by item key: item state (for the filters) and item feature rows
/// (per item, its cross-feature inputs and its row in the block its partition returned).
#[derive(Default)]
pub struct Hydrated {
    pub briefs: KeyMap<ItemBrief>,
    pub rows: KeyMap<(ItemMeta, Arc<ItemFeatureRows>, u32)>,
}

impl Pipeline {
    /// Builds the feature matrix of the filtered candidates from the rows fetched with their
    /// item state in the filtering stage (one call per node for both).
    #[allow(clippy::type_complexity)]
    pub(super) fn extract(
        &self,
        cands: &[Candidate],
        hydrated: &Hydrated,
        profile: &UserSnapshot,
        r: &Request,
        now: i64,
        cov: &mut Coverage,
    ) -> (Vec<f32>, Vec<Option<ItemMeta>>, Vec<u32>) {
        let plan = &self.plan;
        let width = plan.len();
        let n = cands.len();
        let mut rows = vec![0.0f32; n * width];
        let mut metas: Vec<Option<ItemMeta>> = vec![None; n];
        let mut defaulted = vec![0u32; n];
        let mut item_rows: Vec<Option<(&ItemFeatureRows, usize)>> = vec![None; n];
        for (i, c) in cands.iter().enumerate() {
            if let Some((m, block, j)) = hydrated.rows.get(&c.item) {
                metas[i] = Some(*m);
                item_rows[i] = Some((block.as_ref(), *j as usize));
            }
        }
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
