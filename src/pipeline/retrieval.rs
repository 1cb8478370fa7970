//! Stage 1: retrieval. Every enabled source (`sources/`) plans what it asks of which generator
//! partition; the partitions are asked once per node for all sources together; each source's
//! candidates are cut to its limit, counted, and the lists are merged with their source tags.
use std::sync::Arc;
use std::time::Instant;

use super::components::{self, Asks, Query, SOURCES};
use super::{Coverage, Pipeline};
use crate::domain::{Part, Role};
use crate::generators::{Candidate, RetrieveQuery};
use crate::ids::KeyMap;
use crate::transport::{ReadQuery, ReadReply};

impl Pipeline {
    pub(super) async fn retrieve(&self, q: &Query<'_>, deadline: Instant, cov: &mut Coverage) -> Vec<Candidate> {
        let rc = &self.cfg.retrieval;
        let base = RetrieveQuery {
            now: q.now,
            per_author: rc.follows_per_author,
            per_seed: rc.coengaged_per_item,
            ..Default::default()
        };
        let mut asks = Asks::new(self.transport.ring().partitions, base);
        // Per source: whether its candidates count (enabled and planned without error).
        let mut active = vec![false; SOURCES.len()];
        for (i, s) in SOURCES.iter().enumerate() {
            if !s.enable(q) {
                continue;
            }
            match s.plan(q, &mut asks) {
                Ok(()) => active[i] = true,
                Err(e) => components::failed(components::STAGE_RETRIEVAL, s.name(), &e),
            }
        }
        let asks: Vec<(Part, ReadQuery)> = asks
            .into_queries()
            .map(|(p, q)| (Part::new(Role::Generator, p), ReadQuery::Retrieve(Arc::new(q))))
            .collect();
        let out = self.transport.read_fanout("retrieval", asks, deadline).await;
        if !out.coverage.missing.is_empty() {
            tracing::warn!(missing = ?out.coverage.missing, "generator partitions missing");
        }
        cov.stage(out.coverage);
        // Per source, keep its best candidates up to its limit, then union with source tags.
        let bits: Vec<u8> = SOURCES.iter().map(|s| s.bit()).collect();
        let mut per_source: Vec<Vec<Candidate>> = vec![Vec::new(); SOURCES.len()];
        for (_, reply) in out.replies {
            let ReadReply::Retrieve(cands) = reply else { continue };
            for c in cands {
                if let Some(s) = bits.iter().position(|b| *b == c.source).filter(|s| active[*s]) {
                    per_source[s].push(c);
                }
            }
        }
        let mut merged: KeyMap<Candidate> = KeyMap::default();
        for (s, mut list) in per_source.into_iter().enumerate() {
            list.sort_unstable_by(|a, b| a.group.cmp(&b.group).then(b.score.total_cmp(&a.score)));
            // The same item may come from two seeds of one source: keep it once.
            let mut seen = std::collections::HashSet::new();
            list.retain(|c| seen.insert(c.item));
            list.truncate(SOURCES[s].limit(rc));
            let name = SOURCES[s].name();
            metrics::counter!("recsys_generator_candidates_total", "generator" => name).increment(list.len() as u64);
            cov.generator_candidates.push((name, list.len() as u32));
            for c in list {
                merged
                    .entry(c.item)
                    .and_modify(|m| {
                        m.source |= c.source;
                        m.score = m.score.max(c.score);
                    })
                    .or_insert(c);
            }
        }
        let mut out: Vec<Candidate> = merged.into_values().collect();
        out.sort_unstable_by_key(|c| c.item);
        out
    }
}
