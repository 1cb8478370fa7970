//! The deployed models: stage 1 (light GBDT) on every candidate, stage 2 (multi-head net) on the
//! best `scoring.stage2_top_n`, the value model Σ wₕ·p(h) as the final score. Stage-1 scores are
//! kept (degraded, `stage1_only`) when stage 2 fails; a stage-1 failure fails this scorer.
use std::time::Instant;

use super::super::components::{BoxFuture, ComponentError, Pending, Query, ScoreInput, Scorer};
use super::super::{Coverage, Pipeline};
use crate::scoring::Stage;

pub struct Models;

impl Scorer for Models {
    fn name(&self) -> &'static str {
        "models"
    }

    fn enable(&self, q: &Query) -> bool {
        q.scorers.manifest.is_some()
    }

    fn score<'a>(
        &'a self,
        p: &'a Pipeline,
        q: &'a Query<'a>,
        rid: &'a str,
        input: &'a ScoreInput<'a>,
        deadline: Instant,
        cov: &'a mut Coverage,
    ) -> BoxFuture<'a, Result<Vec<Pending>, ComponentError>> {
        Box::pin(async move {
            let scorers = q.scorers;
            let Some(manifest) = scorers.manifest.clone() else {
                return Err(ComponentError::Failed("no model deployed".into()));
            };
            let rows = input.rows;
            let width = p.plan.len();
            let n = input.cands.len();
            let mut present: Vec<usize> = (0..n).filter(|i| input.metas[*i].is_some()).collect();
            if !manifest.stage1_order.is_empty() && manifest.stage1_native.is_none() {
                // Same scores in any order; sorted rows run faster (see ModelSpec::batch_order).
                let key = |i: usize, c: usize| rows[i * width + c];
                present.sort_unstable_by(|&a, &b| {
                    manifest
                        .stage1_order
                        .iter()
                        .map(|&c| key(a, c).total_cmp(&key(b, c)))
                        .find(|o| o.is_ne())
                        .unwrap_or(a.cmp(&b))
                });
            }
            let gather = |idx: &[usize], cols: &[usize]| -> Vec<f32> {
                let mut m = Vec::with_capacity(idx.len() * cols.len());
                for &i in idx {
                    let row = &rows[i * width..(i + 1) * width];
                    m.extend(cols.iter().map(|c| row[*c]));
                }
                m
            };
            if present.is_empty() {
                return Ok(vec![]);
            }
            let m1 = gather(&present, &manifest.stage1_columns);
            let c1 = manifest.stage1_columns.len();
            let s1 = match p.run_model(rid, scorers, Stage::Light, present.len(), c1, m1, deadline).await {
                Ok(s) if s.len() == present.len() => s,
                res => {
                    let e = res.err().unwrap_or_else(|| "wrong number of scores".into());
                    return Err(ComponentError::Failed(format!("stage 1: {e}")));
                }
            };
            let mut order: Vec<(usize, f32)> = present.iter().copied().zip(s1).collect();
            // Ties by candidate index, so the stage-2 cut does not depend on the batch order.
            order.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            order.truncate(p.cfg.scoring.stage2_top_n);
            let top: Vec<usize> = order.iter().map(|(i, _)| *i).collect();
            let m2 = gather(&top, &manifest.stage2_columns);
            let heads = &manifest.stage2.heads;
            let c2 = manifest.stage2_columns.len();
            Ok(match p.run_model(rid, scorers, Stage::Heavy, top.len(), c2, m2, deadline).await {
                Ok(h) if h.len() == top.len() * heads.len() => {
                    let weights: Vec<f32> =
                        heads.iter().map(|n| p.cfg.scoring.value_model.get(n).copied().unwrap_or(0.0)).collect();
                    order
                        .iter()
                        .zip(h.chunks(heads.len()))
                        .filter_map(|((i, s1), ph)| {
                            let value: f32 = ph.iter().zip(&weights).map(|(p, w)| p * w).sum();
                            input.pending(*i, value, *s1, ph.to_vec(), "value_model")
                        })
                        .collect()
                }
                res => {
                    let e = res.err().unwrap_or_else(|| "wrong number of scores".into());
                    tracing::warn!(error = %e, "stage 2 scoring failed; stage-1 scores kept");
                    cov.degraded = true;
                    cov.fallback("stage1_only");
                    order.iter().filter_map(|(i, s1)| input.pending(*i, *s1, *s1, vec![], "stage1")).collect()
                }
            })
        })
    }
}
