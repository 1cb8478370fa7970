//! Trending: the user's geo first (group 0), the global list after it (group 1), which fills
//! what the geo cannot and serves users with no geo at all. The global list, hit by every request
//! and event, is spread over `retrieval.global_trending_shards` partitions and merged here.
use super::super::components::{Asks, ComponentError, Query, Source};
use crate::config::RetrievalConfig;
use crate::domain::placement::{global_trending_partitions, GLOBAL_GEO};
use crate::features::SRC_TRENDING;
use crate::ids::{self, key_of, partition_of};

pub struct Trending;

impl Source for Trending {
    fn name(&self) -> &'static str {
        "trending"
    }
    fn bit(&self) -> u8 {
        SRC_TRENDING
    }
    fn limit(&self, cfg: &RetrievalConfig) -> usize {
        cfg.trending_limit
    }
    fn plan(&self, q: &Query, asks: &mut Asks) -> Result<(), ComponentError> {
        let rc = &q.cfg.retrieval;
        let parts = asks.parts;
        let mut group = 0u8;
        if !q.geo.is_empty() && q.geo != GLOBAL_GEO {
            let g = key_of(q.geo);
            asks.partition(partition_of(ids::GEO, g, parts)).trending_geos.push((g, 0, rc.trending_limit));
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
            asks.partition(p).trending_geos.push((global, group, (per_shard * n).min(rc.trending_limit)));
        }
        Ok(())
    }
}
