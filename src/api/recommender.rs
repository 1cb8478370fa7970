use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tonic::{Request, Response, Status};

use super::pb;
use crate::domain::quote;
use crate::ingest::validate::{check_id, MAX_GEO_BYTES, MAX_ID_BYTES};
use crate::pipeline::{self, Pipeline};

pub struct RecommenderService {
    pub pipeline: Arc<OnceLock<Arc<Pipeline>>>,
}

pub(crate) fn ready<T>(cell: &OnceLock<Arc<T>>) -> Result<Arc<T>, Status> {
    cell.get().cloned().ok_or_else(|| Status::unavailable("node is loading its partitions; retry shortly"))
}

/// Checks the caller's values before any work, with the rules ingest applies to the same ids:
/// a user id Recommend accepted but ingest refuses (control characters) would name a profile no
/// event can reach, and a long value must never come back whole in the status message.
pub(crate) fn check_request(r: &pb::RecommendRequest, surfaces: &[String]) -> Result<(), Status> {
    check_id(&r.user_id, MAX_ID_BYTES).map_err(|why| Status::invalid_argument(format!("user_id: {why}")))?;
    if !surfaces.contains(&r.surface) {
        return Err(Status::invalid_argument(format!(
            "surface: unknown surface `{}` (known: {})",
            quote(&r.surface),
            surfaces.join(", ")
        )));
    }
    if let Some(c) = &r.context {
        if c.geo.len() > MAX_GEO_BYTES || c.geo.chars().any(char::is_control) {
            return Err(Status::invalid_argument(format!(
                "context.geo: must be at most {MAX_GEO_BYTES} bytes without control characters (got {} bytes)",
                c.geo.len()
            )));
        }
    }
    Ok(())
}

#[tonic::async_trait]
impl pb::recommender_server::Recommender for RecommenderService {
    async fn recommend(&self, req: Request<pb::RecommendRequest>) -> Result<Response<pb::RecommendResponse>, Status> {
        let p = ready(&self.pipeline)?;
        let serving = &p.cfg.serving;
        let timeout = super::grpc_timeout(req.metadata())
            .unwrap_or(Duration::from_millis(serving.default_deadline_ms))
            .min(Duration::from_millis(serving.max_deadline_ms));
        let r = req.into_inner();
        check_request(&r, &serving.surfaces)?;
        let explain = r.explain;
        let reply = p
            .recommend(
                pipeline::Request {
                    user_id: r.user_id,
                    surface: r.surface,
                    k: r.k as usize,
                    page_token: r.page_token,
                    geo: r.context.map(|c| c.geo).unwrap_or_default(),
                    explain,
                },
                timeout,
            )
            .await?;
        let items = reply
            .items
            .into_iter()
            .map(|(rank, s)| pb::RankedItem {
                item_id: s.item.to_string(),
                score: s.score,
                rank,
                sources: crate::pipeline::source_names(s.sources),
                author_id: s.author.to_string(),
                explanation: explain.then(|| pb::Explanation {
                    stage1_score: s.stage1,
                    heads: reply.head_names.iter().cloned().zip(s.heads).collect(),
                    scored_by: s.scored_by.to_string(),
                    defaulted_features: s.defaulted,
                }),
            })
            .collect();
        let c = reply.coverage;
        Ok(Response::new(pb::RecommendResponse {
            request_id: reply.request_id,
            items,
            next_page_token: reply.next_page_token,
            coverage: Some(pb::Coverage {
                stages: c
                    .stages
                    .into_iter()
                    .map(|s| pb::StageCoverage {
                        stage: s.stage.to_string(),
                        partitions_asked: s.asked,
                        partitions_answered: s.answered,
                        missing_partitions: s.missing,
                        replica_partitions: s.from_replica,
                        failed_nodes: s.failed_nodes,
                    })
                    .collect(),
                fallbacks: c.fallbacks.into_iter().map(String::from).collect(),
                degraded: c.degraded,
                filter_removed: c.filter_removed.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
                generator_candidates: c.generator_candidates.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
            }),
            timings: reply
                .timings
                .into_iter()
                .map(|(s, d)| pb::StageTiming { stage: s.to_string(), micros: d.as_micros() as u64 })
                .collect(),
            models: Some(pb::ModelVersions {
                stage1: reply.stage1_version,
                stage2: reply.stage2_version,
                ..Default::default()
            }),
            diversity_relaxed: reply.diversity_relaxed,
            from_page_cache: reply.from_page_cache,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(user: &str, surface: &str) -> pb::RecommendRequest {
        pb::RecommendRequest { user_id: user.into(), surface: surface.into(), k: 10, ..Default::default() }
    }

    #[test]
    fn user_ids_follow_the_ingest_rule() {
        let surfaces = vec!["home".to_string()];
        assert!(check_request(&req("u1", "home"), &surfaces).is_ok());
        for bad in ["u\u{0}1", "u\n", "\u{1b}[2J", "", "   ", &"u".repeat(257)] {
            let e = check_request(&req(bad, "home"), &surfaces).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{bad:?}");
            assert!(e.message().starts_with("user_id: "), "{}", e.message());
            assert!(!e.message().contains(bad) || bad.is_empty(), "the value is not echoed: {}", e.message());
        }
    }

    #[test]
    fn a_huge_surface_is_quoted_short() {
        let surfaces = vec!["home".to_string()];
        let big = "s".repeat(100 * 1024);
        let e = check_request(&req("u1", &big), &surfaces).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().starts_with("surface: unknown surface"), "{}", e.message());
        assert!(e.message().len() < 200, "{} bytes", e.message().len());
        assert!(e.message().contains("(102400 bytes)"));
    }
}
