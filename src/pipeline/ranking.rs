//! Stage 5: ranking. Sort by final score, final re-filter against current item state (which also
//! brings ids and author names, for the ranked list only), author spacing.
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use super::filters::geo_licence;
use super::scoring::Pending;
use super::{Coverage, Pipeline};
use crate::features::shard::BriefWants;
use crate::ids::Key;
use crate::ranking::{self, Scored};

impl Pipeline {
    pub(super) async fn rank(
        &self,
        scored: Vec<Pending>,
        rows: &[f32],
        region: Option<Key>,
        deadline: Instant,
        cov: &mut Coverage,
    ) -> (Vec<Scored>, bool, Vec<Vec<f32>>) {
        let width = self.plan.len();
        let mut scored = scored;
        scored.sort_by(|a, b| b.score.total_cmp(&a.score));
        scored.truncate(self.cfg.serving.ranked_list_len);
        // Final re-filter: item state may have changed while the request ran (deleted, sold out,
        // licensed elsewhere).
        let keys: Vec<Key> = scored.iter().map(|p| p.key).collect();
        let wants = BriefWants { embedding: false, names: true };
        let mut briefs = self.briefs(&keys, wants, deadline, "final_refilter", cov).await;
        let mut removed = 0u32;
        let mut row_of: HashMap<Arc<str>, usize> = HashMap::with_capacity(scored.len());
        let mut kept: Vec<Scored> = Vec::with_capacity(scored.len());
        for p in scored {
            let names = briefs
                .remove(&p.key)
                .filter(|b| !b.deleted && b.in_stock && geo_licence::admits(b, region))
                .and_then(|b| b.names);
            let Some((item, author)) = names else {
                removed += 1;
                continue;
            };
            row_of.insert(item.clone(), p.row);
            kept.push(Scored {
                item,
                author,
                score: p.score,
                sources: p.sources,
                stage1: p.stage1,
                heads: p.heads,
                scored_by: p.scored_by,
                defaulted: p.defaulted,
            });
        }
        cov.filter_removed.push(("final_refilter", removed));
        let (ranked, relaxed) = ranking::diversify(kept);
        let kept_rows = ranked
            .iter()
            .map(|s| {
                let i = row_of[&s.item];
                rows[i * width..(i + 1) * width].to_vec()
            })
            .collect();
        (ranked, relaxed, kept_rows)
    }
}
