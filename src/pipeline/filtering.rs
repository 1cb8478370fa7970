//! Stage 2: filters (`filters/`) around the hydrators (`hydrators/`). Filters that need only the
//! request and profile run first, so what they remove is never fetched; the hydrators then fetch
//! item state and item feature rows (one call per node); the filters on item state run last.
//! Each removal is counted by the filter that made it.
use std::time::Instant;

use super::components::{self, Batch, FilterPhase, Hydrated, Keep, Query, FILTERS, HYDRATORS};
use super::{Coverage, Pipeline};
use crate::features::shard::{BriefWants, ItemBrief};
use crate::generators::Candidate;
use crate::ids::{Key, KeyMap};

/// Keeps the candidates `keep` kept.
fn retain_kept(cands: &mut Vec<Candidate>, keep: &Keep) {
    let mut i = 0;
    cands.retain(|_| {
        i += 1;
        keep.is_kept(i - 1)
    });
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

    /// Filters the candidates; the hydration between the two filter phases brings the
    /// survivors' feature rows too.
    pub(super) async fn filter(
        &self,
        q: &Query<'_>,
        mut cands: Vec<Candidate>,
        deadline: Instant,
        cov: &mut Coverage,
    ) -> (Vec<Candidate>, Hydrated) {
        let mut removed = vec![0u32; FILTERS.len()];
        let mut keep = Keep::default();
        keep.reset(cands.len());
        components::run_filters(
            FilterPhase::BeforeHydration,
            q,
            &Batch { cands: &cands, briefs: &[] },
            &mut keep,
            &mut removed,
        );
        retain_kept(&mut cands, &keep);
        let mut hydrated = Hydrated::default();
        for h in HYDRATORS {
            if !h.enable(q) {
                continue;
            }
            if let Err(e) = h.hydrate(self, q, &cands, deadline, cov, &mut hydrated).await {
                components::failed(components::STAGE_HYDRATION, h.name(), &e);
            }
        }
        keep.reset(cands.len());
        {
            let briefs: Vec<Option<&ItemBrief>> = cands.iter().map(|c| hydrated.briefs.get(&c.item)).collect();
            let batch = Batch { cands: &cands, briefs: &briefs };
            components::run_filters(FilterPhase::OnItemState, q, &batch, &mut keep, &mut removed);
        }
        for (i, c) in cands.iter().enumerate() {
            if !keep.is_kept(i) {
                hydrated.rows.remove(&c.item);
            }
        }
        retain_kept(&mut cands, &keep);
        for (f, n) in FILTERS.iter().zip(removed) {
            metrics::counter!("recsys_filter_removed_total", "filter" => f.name()).increment(u64::from(n));
            cov.filter_removed.push((f.name(), n));
        }
        (cands, hydrated)
    }
}
