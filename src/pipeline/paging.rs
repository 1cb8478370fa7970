//! Delivery: later pages of a ranked list. The token names the node holding the list; any node
//! serves the page by asking that node, which cuts the page from the same list (so pages never
//! repeat an item) after a re-filter against current item state (so an item deleted or sold out
//! since page 1 is not served on page 2).
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::filters::geo_licence;
use super::{Coverage, Pipeline, PipelineError, Reply, Request};
use crate::features::shard::BriefWants;
use crate::ids::{key_of, Key};
use crate::logging::{LogLine, ServedRow};
use crate::ranking::{RankedList, Scored, ScoredWire, TokenError};
use crate::transport::{decode, pb};

/// A page as the holding node returns it.
#[derive(Debug, Serialize, Deserialize)]
pub struct PageWire {
    pub request_id: String,
    pub items: Vec<(u32, ScoredWire)>,
    pub next_page_token: String,
    pub stage1_version: String,
    pub stage2_version: String,
    pub head_names: Vec<String>,
    pub refiltered: u32,
    pub degraded: bool,
}

/// The author-spacing rule is reported per page: set when two neighbours on it share an author.
pub(super) fn page_relaxed(items: &[(u32, Scored)]) -> bool {
    items.windows(2).any(|w| w[0].1.author == w[1].1.author)
}

impl Pipeline {
    pub(super) async fn next_page(&self, r: &Request, deadline: Instant) -> Result<Reply, PipelineError> {
        let t = Instant::now();
        let (node, rid, offset) = self.tokens.parse(&r.page_token, &r.user_id).map_err(|e| match e {
            TokenError::Expired => PipelineError::NotFound(format!("page_token: {e}")),
            _ => PipelineError::InvalidArgument(format!("page_token: {e}")),
        })?;
        // Geo licensing of later pages: the holder re-filters for the region its list was built
        // for, or for this request's own `context.geo` when it names one; a remote holder does
        // not see this request's geo, so its page is checked here as well.
        let region = geo_licence::region(&r.geo);
        let wire = if node == self.transport.node_id {
            self.page_local(&rid, &r.user_id, offset, r.k, &r.surface, region, deadline).await?
        } else {
            let mut wire = self.page_remote(&node, &rid, r, offset, deadline).await?;
            if region.is_some() && !wire.items.is_empty() {
                let keys: Vec<Key> = wire.items.iter().map(|(_, s)| key_of(&s.item)).collect();
                let mut cov = Coverage::default();
                let briefs = self.briefs(&keys, BriefWants::default(), deadline, "page_refilter", &mut cov).await;
                let before = wire.items.len();
                wire.items
                    .retain(|(_, s)| briefs.get(&key_of(&s.item)).is_some_and(|b| geo_licence::admits(b, region)));
                wire.refiltered += (before - wire.items.len()) as u32;
                wire.degraded |= cov.degraded;
            }
            wire
        };
        let items: Vec<(u32, Scored)> = wire.items.into_iter().map(|(rank, s)| (rank, Scored::from(s))).collect();
        let mut coverage = Coverage { degraded: wire.degraded, ..Default::default() };
        coverage.filter_removed.push(("page_refilter", wire.refiltered));
        Ok(Reply {
            request_id: wire.request_id,
            diversity_relaxed: page_relaxed(&items),
            items,
            next_page_token: wire.next_page_token,
            coverage,
            timings: vec![("page_cache", t.elapsed())],
            stage1_version: wire.stage1_version,
            stage2_version: wire.stage2_version,
            head_names: Arc::from(wire.head_names),
            from_page_cache: true,
        })
    }

    async fn page_remote(
        &self,
        node: &str,
        rid: &str,
        r: &Request,
        offset: usize,
        deadline: Instant,
    ) -> Result<PageWire, PipelineError> {
        let t = &self.transport;
        let gone = || {
            PipelineError::NotFound(format!(
                "page_token: node {node}, which holds this ranking, is not serving; request the first page again"
            ))
        };
        if !t.membership.is_routable(node) {
            return Err(gone());
        }
        let client = t.peer(node).ok_or_else(gone)?;
        let left = deadline.saturating_duration_since(Instant::now());
        let req = pb::PageRequest {
            envelope: Some(t.envelope(left)),
            request_id: rid.to_string(),
            user_id: r.user_id.clone(),
            // Bounded by the token parser (MAX_PAGE_OFFSET), so this never saturates in practice.
            offset: u32::try_from(offset).unwrap_or(u32::MAX),
            k: r.k as u32,
            surface: r.surface.clone(),
        };
        let started = Instant::now();
        let res = client.clone().page(t.request(req, left)).await;
        t.observe(node, "page", started, res.is_ok());
        match res {
            Ok(reply) => decode(&reply.into_inner().body).map_err(PipelineError::Internal),
            Err(s) => Err(match s.code() {
                tonic::Code::NotFound => PipelineError::NotFound(s.message().to_string()),
                tonic::Code::InvalidArgument => PipelineError::InvalidArgument(s.message().to_string()),
                tonic::Code::DeadlineExceeded | tonic::Code::Cancelled => {
                    PipelineError::DeadlineExceeded { stage: "page" }
                }
                _ => PipelineError::Unavailable(format!(
                    "page_token: node {node} did not serve the page: {}",
                    s.message()
                )),
            }),
        }
    }

    /// The Page call of a peer.
    pub async fn page_here(&self, req: &pb::PageRequest, timeout: Duration) -> Result<PageWire, tonic::Status> {
        let k = (req.k as usize).clamp(1, self.cfg.serving.max_k as usize);
        self.page_local(
            &req.request_id,
            &req.user_id,
            req.offset as usize,
            k,
            &req.surface,
            None,
            Instant::now() + timeout,
        )
        .await
        .map_err(tonic::Status::from)
    }

    /// Cuts a page from a list held here, re-filtering its items against current item state.
    #[allow(clippy::too_many_arguments)]
    async fn page_local(
        &self,
        rid: &str,
        user: &str,
        offset: usize,
        k: usize,
        surface: &str,
        region: Option<Key>,
        deadline: Instant,
    ) -> Result<PageWire, PipelineError> {
        let list = self.pages.get(rid).ok_or_else(|| {
            PipelineError::NotFound(
                "page_token: expired or unknown to the node holding it; request the first page again".into(),
            )
        })?;
        if list.user != user {
            return Err(PipelineError::InvalidArgument("page_token: belongs to another user".into()));
        }
        let mut cov = Coverage::default();
        let mut positions = Vec::with_capacity(k);
        let mut pos = offset.min(list.items.len());
        let mut refiltered = 0u32;
        let region = region.or(list.region);
        // Check a little more than a page at a time: most items pass.
        while positions.len() < k && pos < list.items.len() {
            let end = (pos + (k - positions.len()) * 2).min(list.items.len());
            let keys: Vec<Key> = list.items[pos..end].iter().map(|s| key_of(&s.item)).collect();
            let briefs = self.briefs(&keys, BriefWants::default(), deadline, "page_refilter", &mut cov).await;
            for (i, key) in (pos..end).zip(keys) {
                if positions.len() == k {
                    pos = i;
                    break;
                }
                match briefs.get(&key) {
                    Some(b) if !b.deleted && b.in_stock && geo_licence::admits(b, region) => positions.push(i),
                    _ => refiltered += 1,
                }
                pos = i + 1;
            }
        }
        let items: Vec<(u32, ScoredWire)> =
            positions.iter().map(|&i| ((i + 1) as u32, ScoredWire::from(&list.items[i]))).collect();
        let next = if pos < list.items.len() {
            self.tokens.make(&self.transport.node_id, rid, pos, user)
        } else {
            String::new()
        };
        self.log_served(&list, surface, positions);
        Ok(PageWire {
            request_id: rid.to_string(),
            items,
            next_page_token: next,
            stage1_version: list.stage1_version.clone(),
            stage2_version: list.stage2_version.clone(),
            head_names: list.head_names.to_vec(),
            refiltered,
            degraded: cov.degraded,
        })
    }

    pub(super) fn log_served(&self, list: &RankedList, surface: &str, positions: Vec<usize>) {
        let Some(logger) = &self.logger else { return };
        let rows = &list.features;
        let ts = crate::clock::unix_ms();
        for pos in positions {
            let (Some(s), Some(f)) = (list.items.get(pos), rows.get(pos)) else { continue };
            logger.log(LogLine::Served(ServedRow {
                request_id: list.request_id.clone(),
                user_id: list.user.clone(),
                item_id: s.item.to_string(),
                position: (pos + 1) as u32,
                served_at_ms: ts,
                surface: surface.to_string(),
                stage1_version: list.stage1_version.clone(),
                stage2_version: list.stage2_version.clone(),
                score: s.score,
                stage1_score: s.stage1,
                scored_by: s.scored_by.to_string(),
                sources: s.sources,
                features: f.clone(),
            }));
        }
    }
}
