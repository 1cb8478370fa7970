//! Stage 4: multi-stage scoring. Stage 1 (light GBDT) on every candidate, stage 2 (multi-head
//! net) on the best `stage2_top_n`, the value model Σ wₕ·p(h) as the final score. Scorers are a
//! role on the ring: the coordinator scores on its own node when it hosts scorers, else ships the
//! matrix in one call to a live scorer node (trying the next one on failure). Fallbacks: stage-1
//! scores when stage 2 fails, popularity × freshness when no scorer answers or no model is deployed.
use std::time::{Duration, Instant};

use super::{now_secs, Coverage, Pipeline};
use crate::features::shard::ItemMeta;
use crate::generators::Candidate;
use crate::ids::{key_of, Key};
use crate::scoring::{ScorerPool, Stage};
use crate::transport::pb;

pub(super) struct ScoreInput<'a> {
    pub cands: &'a [Candidate],
    pub rows: &'a [f32],
    pub metas: &'a [Option<ItemMeta>],
    pub defaulted: &'a [u32],
}

/// A scored candidate before the final re-filter gives it its id and author name.
pub(super) struct Pending {
    /// Index into the request's candidates and feature rows.
    pub row: usize,
    pub key: Key,
    pub score: f32,
    pub sources: u8,
    pub stage1: f32,
    pub heads: Vec<f32>,
    pub scored_by: &'static str,
    pub defaulted: u32,
}

impl Pipeline {
    /// Runs one model stage here or on a scorer node.
    #[allow(clippy::too_many_arguments)]
    async fn run_model(
        &self,
        rid: &str,
        scorers: &ScorerPool,
        stage: Stage,
        rows: usize,
        cols: usize,
        matrix: Vec<f32>,
        deadline: Instant,
    ) -> Result<Vec<f32>, String> {
        let t = &self.transport;
        if t.ring().is_scorer(&t.node_id) && scorers.live() > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            return scorers.score(stage, rows, cols, matrix, left).await.map_err(|e| e.to_string());
        }
        let version = scorers.manifest.as_ref().map(|m| m.version.clone()).unwrap_or_default();
        // Start at a node picked by the request id, so coordinators spread over the scorer nodes.
        let ring = t.ring();
        let nodes: Vec<&String> =
            ring.scorer_nodes().iter().filter(|n| **n != t.node_id && t.membership.is_routable(n)).collect();
        if nodes.is_empty() {
            return Err("no scorer node is reachable".into());
        }
        let start = (key_of(rid) % nodes.len() as u64) as usize;
        let mut last = String::new();
        let mut matrix = Some(matrix);
        for i in 0..nodes.len() {
            let node = nodes[(start + i) % nodes.len()];
            let mut left = deadline.saturating_duration_since(Instant::now());
            if left < Duration::from_millis(1) {
                break;
            }
            // A node budget, as in the read fan-out: a frozen scorer leaves time for the next one.
            if i + 1 < nodes.len() {
                left = left.mul_f64(0.6);
            }
            let Some(client) = t.peer(node) else { continue };
            let req = pb::ScoreRequest {
                envelope: Some(t.envelope(left)),
                stage: if stage == Stage::Light { 1 } else { 2 },
                rows: rows as u32,
                cols: cols as u32,
                // Moved into the last attempt; copied only while another node could be tried.
                matrix: if i + 1 == nodes.len() { matrix.take() } else { matrix.clone() }.unwrap_or_default(),
                version: version.clone(),
            };
            let started = Instant::now();
            let res = client.clone().score(t.request(req, left)).await;
            t.observe(node, "score", started, res.is_ok());
            match res {
                Ok(r) => {
                    metrics::counter!("recsys_remote_scoring_total", "stage" => stage.name()).increment(1);
                    return Ok(r.into_inner().scores);
                }
                Err(s) => last = format!("{node}: {}", s.message()),
            }
        }
        Err(if last.is_empty() { "scoring ran out of time".into() } else { last })
    }

    /// The Score call of a peer: the matrix on this node's scorers, if they run the same version.
    pub async fn score_here(&self, req: &pb::ScoreRequest, timeout: Duration) -> Result<Vec<f32>, tonic::Status> {
        let scorers = self.models.current();
        let mine = scorers.manifest.as_ref().map(|m| m.version.as_str()).unwrap_or("");
        if mine != req.version {
            return Err(tonic::Status::failed_precondition(format!(
                "version: this node scores with `{mine}`, the caller built its matrix for `{}`",
                req.version
            )));
        }
        let stage = match req.stage {
            1 => Stage::Light,
            2 => Stage::Heavy,
            s => return Err(tonic::Status::invalid_argument(format!("stage: {s} is not 1 or 2"))),
        };
        let (rows, cols) = (req.rows as usize, req.cols as usize);
        if rows.checked_mul(cols) != Some(req.matrix.len()) {
            return Err(tonic::Status::invalid_argument(format!(
                "matrix: {} values for {rows}×{cols}",
                req.matrix.len()
            )));
        }
        scorers
            .score(stage, rows, cols, req.matrix.clone(), timeout)
            .await
            .map_err(|e| tonic::Status::unavailable(format!("scorers: {e}")))
    }

    pub(super) async fn score(
        &self,
        rid: &str,
        scorers: &ScorerPool,
        input: ScoreInput<'_>,
        deadline: Instant,
        cov: &mut Coverage,
    ) -> Vec<Pending> {
        let ScoreInput { cands, rows, metas, defaulted } = input;
        let width = self.plan.len();
        let n = cands.len();
        let make = |i: usize, score: f32, stage1: f32, heads: Vec<f32>, by: &'static str| -> Option<Pending> {
            metas[i].as_ref()?;
            Some(Pending {
                row: i,
                key: cands[i].item,
                score,
                sources: cands[i].source,
                stage1,
                heads,
                scored_by: by,
                defaulted: defaulted[i],
            })
        };
        let heuristic = |i: usize| -> f32 {
            // Popularity × freshness from the candidate's own signals.
            let m = metas[i].as_ref();
            let age_h = m.map(|m| ((now_secs() - m.created_at).max(0) as f32) / 3600.0).unwrap_or(1000.0);
            (1.0 + cands[i].score.max(0.0)).ln() / (1.0 + age_h / 24.0)
        };
        let Some(manifest) = scorers.manifest.clone() else {
            cov.fallback("heuristic_scores");
            return (0..n).filter_map(|i| make(i, heuristic(i), 0.0, vec![], "heuristic")).collect();
        };
        let mut present: Vec<usize> = (0..n).filter(|i| metas[*i].is_some()).collect();
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
            return vec![];
        }
        let m1 = gather(&present, &manifest.stage1_columns);
        let c1 = manifest.stage1_columns.len();
        let s1 = match self.run_model(rid, scorers, Stage::Light, present.len(), c1, m1, deadline).await {
            Ok(s) if s.len() == present.len() => s,
            res => {
                let e = res.err().unwrap_or_else(|| "wrong number of scores".into());
                tracing::warn!(error = %e, "stage 1 scoring failed; heuristic fallback");
                cov.degraded = true;
                cov.fallback("heuristic_scores");
                return present.iter().filter_map(|&i| make(i, heuristic(i), 0.0, vec![], "heuristic")).collect();
            }
        };
        let mut order: Vec<(usize, f32)> = present.iter().copied().zip(s1).collect();
        // Ties by candidate index, so the stage-2 cut does not depend on the batch order.
        order.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        order.truncate(self.cfg.scoring.stage2_top_n);
        let top: Vec<usize> = order.iter().map(|(i, _)| *i).collect();
        let m2 = gather(&top, &manifest.stage2_columns);
        let heads = &manifest.stage2.heads;
        let c2 = manifest.stage2_columns.len();
        match self.run_model(rid, scorers, Stage::Heavy, top.len(), c2, m2, deadline).await {
            Ok(h) if h.len() == top.len() * heads.len() => {
                let weights: Vec<f32> =
                    heads.iter().map(|n| self.cfg.scoring.value_model.get(n).copied().unwrap_or(0.0)).collect();
                order
                    .iter()
                    .zip(h.chunks(heads.len()))
                    .filter_map(|((i, s1), ph)| {
                        let value: f32 = ph.iter().zip(&weights).map(|(p, w)| p * w).sum();
                        make(*i, value, *s1, ph.to_vec(), "value_model")
                    })
                    .collect()
            }
            res => {
                let e = res.err().unwrap_or_else(|| "wrong number of scores".into());
                tracing::warn!(error = %e, "stage 2 scoring failed; stage-1 scores kept");
                cov.degraded = true;
                cov.fallback("stage1_only");
                order.iter().filter_map(|(i, s1)| make(*i, *s1, *s1, vec![], "stage1")).collect()
            }
        }
    }
}
