//! Stage 1: candidate generators. Each generator partition is asked only for the keys it owns
//! (geos, authors, seed items), one call per node; the global trending list is sharded over
//! several partitions (`retrieval.global_trending_shards`) and merged here.
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use super::{Coverage, Pipeline, Request};
use crate::domain::placement::{global_trending_partitions, GLOBAL_GEO};
use crate::domain::{Part, Role};
use crate::features::shard::UserSnapshot;
use crate::features::{self};
use crate::generators::{Candidate, RetrieveQuery};
use crate::ids::{self, key_of, partition_of, KeyMap};
use crate::transport::{ReadQuery, ReadReply};

/// The generators, in merge order: (name, source bit).
pub const GENERATORS: [(&str, u8); 3] =
    [("trending", features::SRC_TRENDING), ("follows", features::SRC_FOLLOWS), ("coengaged", features::SRC_COENGAGED)];

fn q<'a>(m: &'a mut HashMap<u32, RetrieveQuery>, base: &RetrieveQuery, p: u32) -> &'a mut RetrieveQuery {
    m.entry(p).or_insert_with(|| base.clone())
}

impl Pipeline {
    pub(super) async fn retrieve(
        &self,
        r: &Request,
        profile: &UserSnapshot,
        now: i64,
        deadline: Instant,
        cov: &mut Coverage,
    ) -> Vec<Candidate> {
        let rc = &self.cfg.retrieval;
        let parts = self.transport.ring().partitions;
        let mut queries: HashMap<u32, RetrieveQuery> = HashMap::new();
        let base = RetrieveQuery {
            now,
            per_author: rc.follows_per_author,
            per_seed: rc.coengaged_per_item,
            ..Default::default()
        };
        let geo = if !r.geo.is_empty() { r.geo.clone() } else { profile.geo.clone() };
        // Trending in the user's geo first; the global list fills what the geo cannot (and serves
        // users with no geo at all).
        let mut group = 0u8;
        if !geo.is_empty() && geo != GLOBAL_GEO {
            let g = key_of(&geo);
            q(&mut queries, &base, partition_of(ids::GEO, g, parts)).trending_geos.push((g, 0, rc.trending_limit));
            group = 1;
        }
        let global = key_of(GLOBAL_GEO);
        let shards = global_trending_partitions(rc.global_trending_shards, parts);
        // Items spread evenly over the shards: each returns twice its even share, so the merged
        // list matches an unsharded one except at its tail.
        let per_shard = (2 * rc.trending_limit).div_ceil(shards.len().max(1)).min(rc.trending_limit);
        // Two shards may hash to one partition: it then holds both shares in one list.
        let mut shares: std::collections::BTreeMap<u32, usize> = std::collections::BTreeMap::new();
        for p in shards {
            *shares.entry(p).or_default() += 1;
        }
        for (p, n) in shares {
            q(&mut queries, &base, p).trending_geos.push((global, group, (per_shard * n).min(rc.trending_limit)));
        }
        for a in &profile.follows {
            q(&mut queries, &base, partition_of(ids::AUTHOR, *a, parts)).authors.push(*a);
        }
        for s in &profile.recent_likes {
            q(&mut queries, &base, partition_of(ids::COENGAGED, *s, parts)).seeds.push(*s);
        }
        let asks: Vec<(Part, ReadQuery)> = queries
            .into_iter()
            .map(|(p, q)| (Part::new(Role::Generator, p), ReadQuery::Retrieve(Arc::new(q))))
            .collect();
        let out = self.transport.read_fanout("retrieval", asks, deadline).await;
        if !out.coverage.missing.is_empty() {
            tracing::warn!(missing = ?out.coverage.missing, "generator partitions missing");
        }
        cov.stage(out.coverage);
        // Per generator, keep its best candidates up to its limit, then union with source tags.
        let mut per_gen: [Vec<Candidate>; 3] = Default::default();
        for (_, reply) in out.replies {
            let ReadReply::Retrieve(cands) = reply else { continue };
            for c in cands {
                let g = GENERATORS.iter().position(|(_, bit)| *bit == c.source).unwrap_or(2);
                per_gen[g].push(c);
            }
        }
        let limits = [rc.trending_limit, rc.follows_limit, rc.coengaged_limit];
        let mut merged: KeyMap<Candidate> = KeyMap::default();
        for (g, mut list) in per_gen.into_iter().enumerate() {
            list.sort_unstable_by(|a, b| a.group.cmp(&b.group).then(b.score.total_cmp(&a.score)));
            // The same item may come from two seeds of one generator: keep it once.
            let mut seen = std::collections::HashSet::new();
            list.retain(|c| seen.insert(c.item));
            list.truncate(limits[g]);
            let name = GENERATORS[g].0;
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
