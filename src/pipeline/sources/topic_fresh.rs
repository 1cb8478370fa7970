//! Topic freshness (the seed: "find the most relevant topics for a user and find the freshest
//! content from each"): the user's top topics by engagement (the profile's topic affinities,
//! positive only, ties by topic), then the newest items of each from the generator partitions
//! owning those topics.
use super::super::components::{Asks, ComponentError, Query, Source};
use crate::config::RetrievalConfig;
use crate::features::SRC_TOPIC_FRESH;
use crate::ids::{self, partition_of, topic_key};

pub struct TopicFresh;

impl Source for TopicFresh {
    fn name(&self) -> &'static str {
        "topic_fresh"
    }
    fn bit(&self) -> u8 {
        SRC_TOPIC_FRESH
    }
    fn enable(&self, q: &Query) -> bool {
        q.cfg.retrieval.topic_fresh_topics > 0 && q.profile.topic_affinity.iter().any(|a| *a > 0.0)
    }
    fn limit(&self, cfg: &RetrievalConfig) -> usize {
        cfg.topic_fresh_limit
    }
    fn plan(&self, q: &Query, asks: &mut Asks) -> Result<(), ComponentError> {
        let rc = &q.cfg.retrieval;
        let mut top: Vec<(f32, u32)> = q
            .profile
            .topic_affinity
            .iter()
            .enumerate()
            .filter(|(_, a)| **a > 0.0)
            .map(|(t, a)| (*a, t as u32))
            .collect();
        top.sort_unstable_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        for &(_, t) in top.iter().take(rc.topic_fresh_topics) {
            let key = topic_key(t);
            let ask = asks.partition(partition_of(ids::TOPIC, key, asks.parts));
            ask.topics.push(key);
            ask.per_topic = rc.topic_fresh_per_topic;
        }
        Ok(())
    }
}
