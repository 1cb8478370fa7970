//! Prometheus metrics: the recorder, a description (HELP, unit) of every metric the node exports,
//! every series registered at zero from start-up (a dashboard or alert sees 0, not "no data"),
//! process metrics and build info rendered at scrape time, and a gRPC layer that counts every
//! call by method and status code.
use std::fmt::Write as _;
use std::task::{Context, Poll};
use std::time::Instant;

use metrics::Unit;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("metrics recorder: {0}")]
    Recorder(String),
}

/// Stages a Recommend call goes through (`recsys_stage_seconds{stage}`).
pub const STAGES: [&str; 6] = ["profile", "retrieval", "filtering", "features", "scoring", "ranking"];
/// Stages that read partitions on other nodes (fan-out metrics' `stage` label).
pub const FANOUT_STAGES: [&str; 7] =
    ["profile", "retrieval", "filtering", "features", "final_refilter", "page", "page_refilter"];
pub const FALLBACKS: [&str; 5] =
    ["profile_missing", "cold_start", "feature_defaults", "heuristic_scores", "stage1_only"];
/// gRPC methods counted by `GrpcMetricsLayer` before any call arrives.
const PUBLIC_METHODS: [&str; 6] = [
    "recsys.v1.Recommender/Recommend",
    "recsys.v1.Ingest/UpsertItems",
    "recsys.v1.Ingest/UpsertUsers",
    "recsys.v1.Ingest/LogEvents",
    "recsys.v1.Admin/ClusterStatus",
    "recsys.v1.Admin/ReloadModels",
];

/// HELP text and unit of every metric the node exports through the recorder (process metrics,
/// build and model info are rendered in `render_extra`).
/// Described metrics that appear only once they have a label value (a peer owed hints).
pub const LAZY: &[&str] = &["recsys_hints_pending_ops_by_peer"];

pub const DESCRIPTIONS: &[(&str, Kind, Option<Unit>, &str)] = &[
    ("recsys_stage_seconds", Kind::Histogram, Some(Unit::Seconds), "Latency of each serving stage of Recommend"),
    ("recsys_requests_total", Kind::Counter, None, "Recommend calls by outcome (ok, degraded, error)"),
    ("recsys_grpc_requests_total", Kind::Counter, None, "gRPC calls served, by method and status code"),
    ("recsys_grpc_seconds", Kind::Histogram, Some(Unit::Seconds), "gRPC call latency as the server saw it, by method"),
    ("recsys_generator_candidates_total", Kind::Counter, None, "Candidates produced per generator"),
    ("recsys_filter_removed_total", Kind::Counter, None, "Candidates removed per filter"),
    (
        "recsys_component_failures_total",
        Kind::Counter,
        None,
        "Pipeline components (sources, hydrators, filters, scorers) dropped from a request because they failed, by stage and component",
    ),
    ("recsys_fallbacks_total", Kind::Counter, None, "Fallbacks used by requests, per kind"),
    (
        "recsys_partition_misses_total",
        Kind::Counter,
        None,
        "Partitions a node did not answer for in a stage (retried on a replica)",
    ),
    (
        "recsys_missing_partitions_total",
        Kind::Counter,
        None,
        "Partitions no replica answered for, per stage (degraded replies)",
    ),
    (
        "recsys_replica_fallbacks_total",
        Kind::Counter,
        None,
        "Partitions answered by a replica other than the preferred one, per stage",
    ),
    (
        "recsys_peer_rpc_seconds",
        Kind::Histogram,
        Some(Unit::Seconds),
        "Latency of calls to peer nodes, per peer and method",
    ),
    ("recsys_peer_rpc_errors_total", Kind::Counter, None, "Failed calls to peer nodes, per peer and method"),
    ("recsys_remote_scoring_total", Kind::Counter, None, "Model stages scored on another node's scorers"),
    ("recsys_ingest_records_total", Kind::Counter, None, "Records acknowledged by the write path, per kind"),
    ("recsys_flush_seconds", Kind::Histogram, Some(Unit::Seconds), "Storage flush latency per write call"),
    ("recsys_replica_write_failures_total", Kind::Counter, None, "Partition writes a replica did not acknowledge"),
    (
        "recsys_hints_delivered_total",
        Kind::Counter,
        None,
        "Ops delivered to replicas that had missed them (hinted handoff)",
    ),
    (
        "recsys_hints_dropped_total",
        Kind::Counter,
        None,
        "Ops dropped from the hint buffer at its bound (anti-entropy repairs them)",
    ),
    ("recsys_hints_pending_ops", Kind::Gauge, None, "Ops held for replicas that missed them"),
    ("recsys_catch_up_rounds_total", Kind::Counter, None, "Anti-entropy rounds completed"),
    ("recsys_catch_up_ops_total", Kind::Counter, None, "Ops pulled from replicas by anti-entropy"),
    (
        "recsys_catch_up_partitions_behind",
        Kind::Gauge,
        None,
        "Partitions still pulling after the last anti-entropy round",
    ),
    (
        "recsys_freezes_detected_total",
        Kind::Counter,
        None,
        "Times this process found its own clock ticks jumped (SIGSTOP, VM pause)",
    ),
    ("recsys_membership_changes_total", Kind::Counter, None, "Peers becoming routable (up) or not (down)"),
    ("recsys_live_nodes", Kind::Gauge, None, "Nodes alive and serving, as this node sees them"),
    ("recsys_ring_epoch", Kind::Gauge, None, "Ring epoch this node runs (raised by each step of a membership change)"),
    (
        "recsys_membership_changes_begun_total",
        Kind::Counter,
        None,
        "Membership changes (join, drain, remove) begun on this node",
    ),
    ("recsys_membership_changes_committed_total", Kind::Counter, None, "Membership changes this node committed"),
    ("recsys_moves_in_progress", Kind::Gauge, None, "Partitions being streamed to this node"),
    ("recsys_moves_completed_total", Kind::Counter, None, "Partitions streamed to this node complete"),
    ("recsys_move_failures_total", Kind::Counter, None, "Partition streams that failed and were tried again"),
    ("recsys_move_bytes_total", Kind::Counter, None, "Op-log bytes streamed to this node by partition moves"),
    ("recsys_partitions_dropped_total", Kind::Counter, None, "Partitions dropped here after moving to other owners"),
    (
        "recsys_partitions_awaiting_handoff",
        Kind::Gauge,
        None,
        "Copies no longer owned here, kept until every owner confirms holding their ops",
    ),
    ("recsys_handoff_ops_pushed_total", Kind::Counter, None, "Ops pushed to new owners before dropping a copy"),
    ("recsys_handoff_failures_total", Kind::Counter, None, "Hand-offs not confirmed (the copy was kept)"),
    (
        "recsys_inconsistent_moves_total",
        Kind::Counter,
        None,
        "Moves completed without a down previous owner (consistent_range_movement = false)",
    ),
    ("recsys_meta_log_index", Kind::Gauge, None, "Last entry of this node's cluster metadata log"),
    (
        "recsys_hints_pending_ops_by_peer",
        Kind::Gauge,
        None,
        "Ops this coordinator keeps on disk for one peer that did not take them (bounded per peer)",
    ),
    (
        "recsys_ingest_lookup_retries_total",
        Kind::Counter,
        None,
        "Item lookups of a write asked again because a partition's replicas had not answered (catching up, shed)",
    ),
    (
        "recsys_partition_reads_shed_total",
        Kind::Counter,
        None,
        "Reads refused at once (RESOURCE_EXHAUSTED) because too many already waited on the partition's actor, per role",
    ),
    (
        "recsys_partition_reads_skipped_total",
        Kind::Counter,
        None,
        "Reads a partition's actor skipped because their caller had already given up (deadline passed or gone), per role",
    ),
    (
        "recsys_hints_refused_total",
        Kind::Counter,
        None,
        "Ops not hinted because the peer's hints were full (those writes failed instead of acking on one disk)",
    ),
    (
        "recsys_anti_entropy_round_seconds",
        Kind::Histogram,
        Some(Unit::Seconds),
        "Anti-entropy rounds by mode (full: every differing bucket; settled: only divergence that stays put)",
    ),
    (
        "recsys_anti_entropy_partitions_compared_total",
        Kind::Counter,
        None,
        "Partition copies compared with a peer by anti-entropy (ops pulled: recsys_catch_up_ops_total)",
    ),
    ("recsys_meta_decided_total", Kind::Counter, None, "Metadata log entries this node got decided as proposer"),
    (
        "recsys_meta_divergence_total",
        Kind::Counter,
        None,
        "A peer offered another entry for a decided metadata slot (refused; never expected)",
    ),
    (
        "recsys_membership_changes_refused_total",
        Kind::Counter,
        None,
        "Membership changes proposed here and not decided (another won, or no quorum)",
    ),
    (
        "recsys_gossip_rejected_total",
        Kind::Counter,
        None,
        "Gossip entries ignored: unsigned or wrongly signed values, or this node's id from another process",
    ),
    (
        "recsys_partitions_lost_total",
        Kind::Counter,
        None,
        "Partitions a removal left with no live copy (started empty here)",
    ),
    ("recsys_actor_restarts_total", Kind::Counter, None, "Actors restarted by their supervisor, per role"),
    (
        "recsys_faults_injected_total",
        Kind::Counter,
        None,
        "Faults injected by Admin.InjectFault (chaos tests), per kind: kill_actor, delay_partition, fail_rpcs",
    ),
    (
        "recsys_model_run_seconds",
        Kind::Histogram,
        Some(Unit::Seconds),
        "Model run time per model stage and engine (stage 1: native or ort)",
    ),
    ("recsys_ingest_rejected_total", Kind::Counter, None, "Records rejected by ingest validation, per kind"),
    (
        "recsys_key_collisions_total",
        Kind::Counter,
        None,
        "Writes dropped because their id shares a 64-bit key with another id",
    ),
    (
        "recsys_deadline_exceeded_total",
        Kind::Counter,
        None,
        "Calls answered DEADLINE_EXCEEDED because their grpc-timeout expired on the server",
    ),
    (
        "recsys_unknown_users",
        Kind::Gauge,
        None,
        "Profiles of never-upserted users held in this node's feature partitions",
    ),
    (
        "recsys_unknown_users_evicted_total",
        Kind::Counter,
        None,
        "Never-upserted user profiles forgotten at the per-partition cap",
    ),
    ("recsys_model_reloads_total", Kind::Counter, None, "Model deploys by outcome"),
    ("recsys_scoring_queue_chunks", Kind::Gauge, None, "Scoring chunks waiting for a scorer"),
    (
        "recsys_scoring_queue_wait_seconds",
        Kind::Histogram,
        Some(Unit::Seconds),
        "Time a scoring chunk waited for a scorer",
    ),
    ("recsys_scoring_shed_total", Kind::Counter, None, "Scoring chunks dropped because their request had given up"),
    (
        "recsys_auth_failures_total",
        Kind::Counter,
        None,
        "Calls refused UNAUTHENTICATED, per credential (internal: cluster secret, operator: token)",
    ),
    ("recsys_hedged_calls_total", Kind::Counter, None, "Hedged partition reads sent to a next replica, per stage"),
    ("recsys_hedge_wins_total", Kind::Counter, None, "Hedged partition reads that answered first, per stage"),
    (
        "recsys_feature_log_dropped_total",
        Kind::Counter,
        None,
        "Served rows not logged because the log writer was behind",
    ),
];

/// Metrics rendered by `render_extra` at scrape time (not through the recorder).
pub const EXTRA: [&str; 9] = [
    "recsys_build_info",
    "recsys_model_info",
    "process_cpu_seconds_total",
    "process_resident_memory_bytes",
    "process_virtual_memory_bytes",
    "process_open_fds",
    "process_max_fds",
    "process_threads",
    "process_start_time_seconds",
];

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

fn describe() {
    for &(name, kind, unit, help) in DESCRIPTIONS {
        match (kind, unit) {
            (Kind::Counter, Some(u)) => metrics::describe_counter!(name, u, help),
            (Kind::Counter, None) => metrics::describe_counter!(name, help),
            (Kind::Gauge, Some(u)) => metrics::describe_gauge!(name, u, help),
            (Kind::Gauge, None) => metrics::describe_gauge!(name, help),
            (Kind::Histogram, Some(u)) => metrics::describe_histogram!(name, u, help),
            (Kind::Histogram, None) => metrics::describe_histogram!(name, help),
        }
    }
}

/// Touches every series whose labels are known up front, so each metric is exported (at zero)
/// from start-up; series with labels only known later (peers) start without those labels. A room
/// whose labels come from its own lists registers those itself (`pipeline::register_zero_series`).
fn register_zeros() {
    use metrics::{counter, gauge, histogram};
    for s in STAGES {
        let _ = histogram!("recsys_stage_seconds", "stage" => s);
    }
    for o in ["ok", "degraded", "error"] {
        counter!("recsys_requests_total", "outcome" => o).absolute(0);
    }
    for m in PUBLIC_METHODS {
        counter!("recsys_grpc_requests_total", "method" => m, "code" => "OK").absolute(0);
        let _ = histogram!("recsys_grpc_seconds", "method" => m);
    }
    for f in FALLBACKS {
        counter!("recsys_fallbacks_total", "fallback" => f).absolute(0);
    }
    for s in FANOUT_STAGES {
        counter!("recsys_partition_misses_total", "stage" => s).absolute(0);
        counter!("recsys_missing_partitions_total", "stage" => s).absolute(0);
        counter!("recsys_replica_fallbacks_total", "stage" => s).absolute(0);
        counter!("recsys_hedged_calls_total", "stage" => s).absolute(0);
        counter!("recsys_hedge_wins_total", "stage" => s).absolute(0);
    }
    for c in ["internal", "operator"] {
        counter!("recsys_auth_failures_total", "credential" => c).absolute(0);
    }
    let _ = histogram!("recsys_peer_rpc_seconds");
    counter!("recsys_peer_rpc_errors_total").absolute(0);
    for s in ["stage1", "stage2"] {
        counter!("recsys_remote_scoring_total", "stage" => s).absolute(0);
    }
    for (model, engine) in [("stage1", "native"), ("stage1", "ort"), ("stage2", "ort")] {
        let _ = histogram!("recsys_model_run_seconds", "model" => model, "engine" => engine);
    }
    for k in ["item", "user", "event"] {
        counter!("recsys_ingest_records_total", "kind" => k).absolute(0);
        counter!("recsys_ingest_rejected_total", "kind" => k).absolute(0);
    }
    let _ = histogram!("recsys_flush_seconds");
    for m in ["full", "settled"] {
        let _ = histogram!("recsys_anti_entropy_round_seconds", "mode" => m);
    }
    for c in [
        "recsys_replica_write_failures_total",
        "recsys_hints_delivered_total",
        "recsys_hints_dropped_total",
        "recsys_catch_up_rounds_total",
        "recsys_catch_up_ops_total",
        "recsys_freezes_detected_total",
        "recsys_scoring_shed_total",
        "recsys_feature_log_dropped_total",
        "recsys_key_collisions_total",
        "recsys_deadline_exceeded_total",
        "recsys_unknown_users_evicted_total",
        "recsys_membership_changes_begun_total",
        "recsys_membership_changes_committed_total",
        "recsys_moves_completed_total",
        "recsys_move_failures_total",
        "recsys_move_bytes_total",
        "recsys_partitions_dropped_total",
        "recsys_partitions_lost_total",
        "recsys_handoff_ops_pushed_total",
        "recsys_handoff_failures_total",
        "recsys_inconsistent_moves_total",
        "recsys_meta_decided_total",
        "recsys_meta_divergence_total",
        "recsys_membership_changes_refused_total",
        "recsys_gossip_rejected_total",
        "recsys_anti_entropy_partitions_compared_total",
        "recsys_hints_refused_total",
        "recsys_ingest_lookup_retries_total",
    ] {
        counter!(c).absolute(0);
    }
    for c in ["up", "down"] {
        counter!("recsys_membership_changes_total", "change" => c).absolute(0);
    }
    for r in ["feature", "generator", "scorer"] {
        counter!("recsys_actor_restarts_total", "role" => r).absolute(0);
    }
    for r in ["feature", "generator"] {
        counter!("recsys_partition_reads_shed_total", "role" => r).absolute(0);
        counter!("recsys_partition_reads_skipped_total", "role" => r).absolute(0);
    }
    for k in ["kill_actor", "delay_partition", "fail_rpcs", "clock_offset"] {
        counter!("recsys_faults_injected_total", "kind" => k).absolute(0);
    }
    for o in ["deployed", "rejected"] {
        counter!("recsys_model_reloads_total", "outcome" => o).absolute(0);
    }
    for g in [
        "recsys_partitions_awaiting_handoff",
        "recsys_meta_log_index",
        "recsys_hints_pending_ops",
        "recsys_catch_up_partitions_behind",
        "recsys_scoring_queue_chunks",
        "recsys_moves_in_progress",
        "recsys_ring_epoch",
    ] {
        gauge!(g).set(0.0);
    }
    gauge!("recsys_live_nodes").set(0.0);
    // Incremented and decremented by the feature partitions: registered, never set here.
    let _ = gauge!("recsys_unknown_users");
    let _ = histogram!("recsys_scoring_queue_wait_seconds");
}

/// Installs the global recorder (real histograms with buckets, so they aggregate across nodes),
/// describes and registers every metric, and keeps histograms drained in the background.
pub fn install() -> Result<PrometheusHandle, MetricsError> {
    let handle = PrometheusBuilder::new()
        .set_buckets(&[0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5])
        .map_err(|e| MetricsError::Recorder(e.to_string()))?
        .install_recorder()
        .map_err(|e| MetricsError::Recorder(e.to_string()))?;
    describe();
    register_zeros();
    let h = handle.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(std::time::Duration::from_secs(5));
        loop {
            every.tick().await;
            h.run_upkeep();
        }
    });
    Ok(handle)
}

/// The Prometheus text of `/metrics`: the recorder's metrics, then build info, the serving model
/// version and process metrics (read at scrape time, as the Prometheus client libraries do).
pub fn render(handle: &PrometheusHandle, model_version: Option<&str>) -> String {
    let mut out = handle.render();
    render_extra(&mut out, model_version);
    out
}

fn render_extra(out: &mut String, model_version: Option<&str>) {
    let mut metric = |name: &str, kind: &str, help: &str, sample: String| {
        let _ = write!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{sample}\n");
    };
    metric(
        "recsys_build_info",
        "gauge",
        "Always 1; labels name the running build",
        format!(
            "recsys_build_info{{version=\"{}\",profile=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION"),
            if cfg!(debug_assertions) { "debug" } else { "release" }
        ),
    );
    metric(
        "recsys_model_info",
        "gauge",
        "Always 1; the label names the model version this node scores with (heuristic: none)",
        format!("recsys_model_info{{version=\"{}\"}} 1", escape(model_version.unwrap_or("heuristic"))),
    );
    let p = ProcessStats::read();
    metric(
        "process_cpu_seconds_total",
        "counter",
        "Total user and system CPU time spent in seconds",
        format!("process_cpu_seconds_total {}", p.cpu_seconds),
    );
    metric(
        "process_resident_memory_bytes",
        "gauge",
        "Resident memory size in bytes",
        format!("process_resident_memory_bytes {}", p.resident_bytes),
    );
    metric(
        "process_virtual_memory_bytes",
        "gauge",
        "Virtual memory size in bytes",
        format!("process_virtual_memory_bytes {}", p.virtual_bytes),
    );
    metric("process_open_fds", "gauge", "Number of open file descriptors", format!("process_open_fds {}", p.open_fds));
    metric(
        "process_max_fds",
        "gauge",
        "Maximum number of open file descriptors",
        format!("process_max_fds {}", p.max_fds),
    );
    metric("process_threads", "gauge", "Number of OS threads", format!("process_threads {}", p.threads));
    metric(
        "process_start_time_seconds",
        "gauge",
        "Start time of the process since unix epoch in seconds",
        format!("process_start_time_seconds {}", p.start_time_seconds),
    );
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// What /proc says about this process (zeros where /proc is not available).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct ProcessStats {
    pub cpu_seconds: f64,
    pub resident_bytes: u64,
    pub virtual_bytes: u64,
    pub open_fds: u64,
    pub max_fds: u64,
    pub threads: u64,
    pub start_time_seconds: f64,
}

impl ProcessStats {
    pub fn read() -> Self {
        // SAFETY: sysconf only reads configuration values.
        let (hz, page) = unsafe { (libc::sysconf(libc::_SC_CLK_TCK), libc::sysconf(libc::_SC_PAGESIZE)) };
        let (hz, page) = (hz.max(1) as f64, page.max(1) as u64);
        let mut s = ProcessStats::default();
        if let Ok(stat) = std::fs::read_to_string("/proc/self/stat") {
            // Fields after the command name (which may hold spaces) start at field 3 (state).
            if let Some((_, rest)) = stat.rsplit_once(')') {
                let f: Vec<&str> = rest.split_whitespace().collect();
                let num = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
                s.cpu_seconds = (num(11) + num(12)) as f64 / hz;
                s.threads = num(17);
                let boot = boot_time().unwrap_or(0) as f64;
                s.start_time_seconds = boot + num(19) as f64 / hz;
                s.virtual_bytes = num(20);
                s.resident_bytes = num(21) * page;
            }
        }
        s.open_fds = std::fs::read_dir("/proc/self/fd").map(|d| d.count() as u64).unwrap_or(0);
        let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: getrlimit writes into the struct we own.
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
            s.max_fds = lim.rlim_cur;
        }
        s
    }
}

fn boot_time() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/stat").ok()?;
    s.lines().find_map(|l| l.strip_prefix("btime ")).and_then(|v| v.trim().parse().ok())
}

/// CPU seconds (user + system) this process has used, and its resident memory in bytes.
pub fn process_stats() -> (f64, u64) {
    let p = ProcessStats::read();
    (p.cpu_seconds, p.resident_bytes)
}

/// gRPC status code names as the gRPC spec (and grpcurl) print them.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

/// A tower layer for the gRPC server: counts each call by method and status code and times it.
/// Unary errors travel in the response headers (trailers-only), success in the trailers, so a
/// response without `grpc-status` in its headers counts as OK.
#[derive(Clone, Copy, Default)]
pub struct GrpcMetricsLayer;

impl<S> tower_layer::Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetrics<S>;
    fn layer(&self, inner: S) -> GrpcMetrics<S> {
        GrpcMetrics { inner }
    }
}

#[derive(Clone)]
pub struct GrpcMetrics<S> {
    inner: S,
}

impl<S, B, RB> tower_service::Service<http::Request<B>> for GrpcMetrics<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = std::pin::Pin<Box<dyn std::future::Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        // Peer-to-peer calls (recsys.internal) and health checks are counted elsewhere or not at all.
        let method = req.uri().path().trim_start_matches('/').to_string();
        let counted = method.starts_with("recsys.v1.");
        let t = Instant::now();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let res = fut.await;
            if counted {
                let code = match &res {
                    Ok(r) => r
                        .headers()
                        .get("grpc-status")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse::<i32>().ok())
                        .map_or("OK", |c| code_name(tonic::Code::from_i32(c))),
                    Err(_) => "UNKNOWN",
                };
                metrics::histogram!("recsys_grpc_seconds", "method" => method.clone())
                    .record(t.elapsed().as_secs_f64());
                metrics::counter!("recsys_grpc_requests_total", "method" => method, "code" => code).increment(1);
            }
            res
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn process_stats_are_read_from_proc() {
        let p = ProcessStats::read();
        assert!(p.resident_bytes > 0 && p.threads >= 1 && p.open_fds >= 3 && p.max_fds >= p.open_fds, "{p:?}");
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
        assert!(p.start_time_seconds > now - 3600.0 && p.start_time_seconds <= now + 1.0, "{p:?}");
    }

    #[test]
    fn every_description_is_a_well_formed_name() {
        for (name, kind, _, help) in DESCRIPTIONS {
            assert!(name.starts_with("recsys_") && !help.is_empty(), "{name}");
            assert_eq!(
                name.ends_with("_total"),
                *kind == Kind::Counter,
                "{name}: counters and only counters end in _total"
            );
        }
    }
}
