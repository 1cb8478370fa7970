//! Candidate sources (stage 1), in merge order. A source is one file here plus its line in
//! `SOURCES`; its index lives in the generator partitions (`crate::generators`).
mod coengaged;
mod follows;
mod topic_fresh;
mod trending;

use super::components::Source;

pub static SOURCES: &[&dyn Source] =
    &[&trending::Trending, &follows::Follows, &coengaged::Coengaged, &topic_fresh::TopicFresh];
