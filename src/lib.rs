//! recsys: a recommendation serving cluster. See README.md for the architecture.
pub mod api;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod counters;
pub mod features;
pub mod generators;
pub mod ids;
pub mod ingest;
pub mod logging;
pub mod metrics;
pub mod node;
pub mod pipeline;
pub mod ranking;
pub mod scoring;
pub mod store;
pub mod world;
