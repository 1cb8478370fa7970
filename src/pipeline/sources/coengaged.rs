//! Co-engagement: items liked by the same users as the user's recent likes, from the partitions
//! owning those seed items.
use super::super::components::{Asks, ComponentError, Query, Source};
use crate::config::RetrievalConfig;
use crate::features::SRC_COENGAGED;
use crate::ids::{self, partition_of};

pub struct Coengaged;

impl Source for Coengaged {
    fn name(&self) -> &'static str {
        "coengaged"
    }
    fn bit(&self) -> u8 {
        SRC_COENGAGED
    }
    fn enable(&self, q: &Query) -> bool {
        !q.profile.recent_likes.is_empty()
    }
    fn limit(&self, cfg: &RetrievalConfig) -> usize {
        cfg.coengaged_limit
    }
    fn plan(&self, q: &Query, asks: &mut Asks) -> Result<(), ComponentError> {
        for s in &q.profile.recent_likes {
            asks.partition(partition_of(ids::COENGAGED, *s, asks.parts)).seeds.push(*s);
        }
        Ok(())
    }
}
