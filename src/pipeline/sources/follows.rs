//! Follows: the most recent items of the authors the user follows, from the partitions owning
//! those authors.
use super::super::components::{Asks, ComponentError, Query, Source};
use crate::config::RetrievalConfig;
use crate::features::SRC_FOLLOWS;
use crate::ids::{self, partition_of};

pub struct Follows;

impl Source for Follows {
    fn name(&self) -> &'static str {
        "follows"
    }
    fn bit(&self) -> u8 {
        SRC_FOLLOWS
    }
    fn enable(&self, q: &Query) -> bool {
        !q.profile.follows.is_empty()
    }
    fn limit(&self, cfg: &RetrievalConfig) -> usize {
        cfg.follows_limit
    }
    fn plan(&self, q: &Query, asks: &mut Asks) -> Result<(), ComponentError> {
        for a in &q.profile.follows {
            asks.partition(partition_of(ids::AUTHOR, *a, asks.parts)).authors.push(*a);
        }
        Ok(())
    }
}
