//! Prometheus exporter and metric descriptions. Names: `recsys_stage_seconds{stage}`,
//! `recsys_generator_candidates_total{generator}`, `recsys_filter_removed_total{filter}`,
//! `recsys_partition_misses_total{stage}`, `recsys_fallbacks_total{fallback}`,
//! `recsys_requests_total{outcome}`, `recsys_ingest_records_total{kind}`, `recsys_flush_seconds`,
//! `recsys_model_run_seconds{model}`, `recsys_actor_restarts_total{role}`.
use std::net::SocketAddr;

use metrics_exporter_prometheus::PrometheusBuilder;

pub fn install(listen: Option<SocketAddr>) -> Result<(), String> {
    let builder = match listen {
        // Real histograms (buckets, seconds) rather than client-side summaries, so they aggregate.
        Some(addr) => PrometheusBuilder::new()
            .with_http_listener(addr)
            .set_buckets(&[0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5])
            .map_err(|e| e.to_string())?,
        None => return Ok(()),
    };
    builder.install().map_err(|e| e.to_string())?;
    metrics::describe_histogram!("recsys_stage_seconds", "latency of each serving stage");
    metrics::describe_counter!("recsys_generator_candidates_total", "candidates produced per generator");
    metrics::describe_counter!("recsys_filter_removed_total", "candidates removed per filter");
    metrics::describe_counter!("recsys_partition_misses_total", "partitions that did not answer in time");
    metrics::describe_counter!("recsys_fallbacks_total", "fallbacks used by requests");
    metrics::describe_histogram!("recsys_flush_seconds", "sled flush latency per write batch");
    Ok(())
}
