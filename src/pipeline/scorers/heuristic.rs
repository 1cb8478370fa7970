//! Popularity × freshness from the candidate's own signals: what is served when no model is
//! deployed or the models fail. Needs no scorer, so it never fails.
use std::time::Instant;

use super::super::components::{BoxFuture, ComponentError, Pending, Query, ScoreInput, Scorer};
use super::super::{now_secs, Coverage, Pipeline};

pub struct Heuristic;

impl Scorer for Heuristic {
    fn name(&self) -> &'static str {
        "heuristic"
    }

    fn score<'a>(
        &'a self,
        _p: &'a Pipeline,
        _q: &'a Query<'a>,
        _rid: &'a str,
        input: &'a ScoreInput<'a>,
        _deadline: Instant,
        cov: &'a mut Coverage,
    ) -> BoxFuture<'a, Result<Vec<Pending>, ComponentError>> {
        Box::pin(async move {
            cov.fallback("heuristic_scores");
            let now = now_secs();
            let scored = (0..input.cands.len())
                .filter_map(|i| {
                    let m = input.metas[i].as_ref();
                    let age_h = m.map(|m| ((now - m.created_at).max(0) as f32) / 3600.0).unwrap_or(1000.0);
                    let score = (1.0 + input.cands[i].score.max(0.0)).ln() / (1.0 + age_h / 24.0);
                    input.pending(i, score, 0.0, vec![], "heuristic")
                })
                .collect();
            Ok(scored)
        })
    }
}
