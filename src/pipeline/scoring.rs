//! Stage 4: scoring, by the first scorer of `scorers/` that succeeds: the models (stage 1, light
//! GBDT, on every candidate; stage 2, multi-head net, on the best `stage2_top_n`; the value model
//! Σ wₕ·p(h) as the final score; stage-1 scores when stage 2 fails), else popularity × freshness.
//! Scorers are a role on the ring: the coordinator scores on its own node when it hosts scorers,
//! else ships the matrix in one call to a live scorer node (trying the next one on failure).
use std::time::{Duration, Instant};

use super::components::{self, Query, SCORERS};
use super::{Coverage, Pipeline};
use crate::features::shard::ItemMeta;
use crate::generators::Candidate;
use crate::ids::{key_of, Key};
use crate::scoring::{ScorerPool, Stage};
use crate::transport::pb;

pub struct ScoreInput<'a> {
    pub cands: &'a [Candidate],
    /// The feature matrix, row-major, one row per candidate.
    pub rows: &'a [f32],
    pub metas: &'a [Option<ItemMeta>],
    pub defaulted: &'a [u32],
}

impl ScoreInput<'_> {
    /// Candidate `i` scored; None when its item row was not fetched (it is not served).
    pub fn pending(&self, i: usize, score: f32, stage1: f32, heads: Vec<f32>, by: &'static str) -> Option<Pending> {
        self.metas[i].as_ref()?;
        Some(Pending {
            row: i,
            key: self.cands[i].item,
            score,
            sources: self.cands[i].source,
            stage1,
            heads,
            scored_by: by,
            defaulted: self.defaulted[i],
        })
    }
}

/// A scored candidate before the final re-filter gives it its id and author name.
pub struct Pending {
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
    pub(super) async fn run_model(
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

    /// Runs the first enabled scorer of `SCORERS` that succeeds (the models, else the heuristic);
    /// a failed scorer degrades the reply.
    pub(super) async fn score(
        &self,
        q: &Query<'_>,
        rid: &str,
        input: ScoreInput<'_>,
        deadline: Instant,
        cov: &mut Coverage,
    ) -> Vec<Pending> {
        for s in SCORERS {
            if !s.enable(q) {
                continue;
            }
            match s.score(self, q, rid, &input, deadline, cov).await {
                Ok(scored) => return scored,
                Err(e) => {
                    components::failed(components::STAGE_SCORING, s.name(), &e);
                    cov.degraded = true;
                }
            }
        }
        vec![]
    }
}
