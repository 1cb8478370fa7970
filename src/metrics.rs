//! Prometheus exporter, metric descriptions (see `describe` for every name) and process stats.
use std::net::SocketAddr;

use metrics_exporter_prometheus::PrometheusBuilder;

/// HELP text for every metric the node exports.
fn describe() {
    use metrics::{describe_counter as c, describe_gauge as g, describe_histogram as h};
    h!("recsys_stage_seconds", metrics::Unit::Seconds, "latency of each serving stage");
    c!("recsys_requests_total", "Recommend calls by outcome (ok, degraded, error)");
    c!("recsys_generator_candidates_total", "candidates produced per generator");
    c!("recsys_filter_removed_total", "candidates removed per filter");
    c!("recsys_fallbacks_total", "fallbacks used by requests");
    c!("recsys_partition_misses_total", "partitions a node did not answer for in a stage (retried on a replica)");
    c!("recsys_missing_partitions_total", "partitions no replica answered for, per stage (degraded replies)");
    c!("recsys_replica_fallbacks_total", "partitions answered by a replica other than the preferred one, per stage");
    h!("recsys_peer_rpc_seconds", metrics::Unit::Seconds, "latency of calls to peer nodes, per peer and method");
    c!("recsys_peer_rpc_errors_total", "failed calls to peer nodes, per peer and method");
    c!("recsys_remote_scoring_total", "model stages scored on another node's scorers");
    c!("recsys_ingest_records_total", "records acknowledged by the write path, per kind");
    c!("recsys_ingest_rejected_total", "records rejected by ingest validation, per kind");
    c!("recsys_key_collisions_total", "writes dropped because their id shares a 64-bit key with another id");
    c!(
        "recsys_deadline_exceeded_total",
        "calls answered DEADLINE_EXCEEDED because their grpc-timeout expired on the server"
    );
    g!("recsys_unknown_users", "profiles of never-upserted users held in this node's feature partitions");
    c!("recsys_unknown_users_evicted_total", "never-upserted user profiles forgotten at the per-partition cap");
    h!("recsys_flush_seconds", metrics::Unit::Seconds, "sled flush latency per write call");
    c!("recsys_replica_write_failures_total", "partition writes a replica did not acknowledge");
    c!("recsys_hints_delivered_total", "ops delivered to replicas that had missed them (hinted handoff)");
    c!("recsys_hints_dropped_total", "ops dropped from the hint buffer at its bound (anti-entropy repairs them)");
    g!("recsys_hints_pending_ops", "ops held for replicas that missed them");
    c!("recsys_catch_up_rounds_total", "anti-entropy rounds completed");
    c!("recsys_catch_up_ops_total", "ops pulled from replicas by anti-entropy");
    g!("recsys_catch_up_partitions_behind", "partitions still pulling after the last anti-entropy round");
    c!("recsys_freezes_detected_total", "times this process found its own clock ticks jumped (SIGSTOP, VM pause)");
    c!("recsys_membership_changes_total", "peers becoming routable (up) or not (down)");
    g!("recsys_live_nodes", "nodes alive and serving, as this node sees them");
    c!("recsys_actor_restarts_total", "partition actors restarted by their supervisor, per role");
    h!(
        "recsys_model_run_seconds",
        metrics::Unit::Seconds,
        "model run time per stage and engine (stage 1: native or ort)"
    );
    c!("recsys_model_reloads_total", "model deploys by outcome");
    g!("recsys_scoring_queue_chunks", "scoring chunks waiting for a scorer");
    h!("recsys_scoring_queue_wait_seconds", metrics::Unit::Seconds, "time a scoring chunk waited for a scorer");
    c!("recsys_scoring_shed_total", "scoring chunks dropped because their request had given up");
    c!("recsys_feature_log_dropped_total", "served rows not logged because the log writer was behind");
}

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
    describe();
    Ok(())
}

/// CPU seconds (user + system) this process has used, and its resident memory in bytes, from
/// /proc (zeros where /proc is not available).
pub fn process_stats() -> (f64, u64) {
    let cpu = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            // Fields after the command name (which may hold spaces) start at field 3 (state).
            let rest = s.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
            // SAFETY: sysconf only reads a configuration value.
            let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
            Some(ticks as f64 / hz)
        })
        .unwrap_or(0.0);
    let rss = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let l = s.lines().find(|l| l.starts_with("VmRSS:"))?;
            l.split_whitespace().nth(1)?.parse::<u64>().ok()
        })
        .map_or(0, |kb| kb * 1024);
    (cpu, rss)
}
