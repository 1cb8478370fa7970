//! Node configuration: TOML files in `config/`, unknown keys rejected by name, flags override.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("invalid config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid config value `{key}`: {message}")]
    Invalid { key: String, message: String },
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub node: NodeConfig,
    pub cluster: ClusterConfig,
    pub serving: ServingConfig,
    pub retrieval: RetrievalConfig,
    pub filters: FilterConfig,
    pub scoring: ScoringConfig,
    pub ingest: IngestConfig,
    pub store: StoreConfig,
    pub chaos: ChaosConfig,
    /// TLS on the gRPC port and for calls to peers (off unless `cert`, `key` and `ca` are set).
    pub tls: TlsConfig,
    /// Feature declarations (name, source, default), in the order they are logged.
    pub features: Vec<FeatureDecl>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeConfig {
    pub node_id: String,
    pub listen: String,
    pub metrics_listen: Option<String>,
    pub data_dir: PathBuf,
    /// Other nodes' addresses (gossip and gRPC share one port: UDP and TCP).
    pub seeds: Vec<String>,
    /// Address peers reach this node at; defaults to `listen` (set it when listening on 0.0.0.0).
    pub advertise_addr: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// Gossip cluster name: nodes of another cluster are ignored.
    pub name: String,
    /// Node ids the first ring forms over; nodes stay NOT_SERVING until all of them have joined.
    /// Empty: this node alone (a one-node cluster).
    pub initial_nodes: Vec<String>,
    pub partitions_per_role: u32,
    pub replication_factor: u32,
    pub virtual_nodes: u32,
    /// Nodes that run scorers; empty: every node. Others send their matrices to these.
    pub scorer_nodes: Vec<String>,
    pub gossip_interval_ms: u64,
    /// Phi-accrual threshold: a peer is down after about phi × its mean heartbeat interval.
    pub phi_threshold: f64,
    /// A peer that comes back is routed to only after it stayed alive this long.
    pub flap_debounce_ms: u64,
    /// Background anti-entropy round between replicas.
    pub anti_entropy_interval_ms: u64,
    /// At start, how long to wait for peers holding this node's partitions before catching up.
    pub catch_up_wait_ms: u64,
    /// Key for signing page tokens and authenticating internal calls (HMAC, see `auth`); every
    /// node of a cluster must have the same. Empty: page tokens use a key derived from the cluster
    /// name and internal calls are not authenticated (fine on a laptop, not in production). Env:
    /// RECSYS_CLUSTER_SECRET.
    pub secret: String,
    /// Start by joining the running cluster the seeds belong to (a node without a persisted
    /// ring): the ring grows by this node and its partitions are streamed to it.
    pub join: bool,
    /// Partitions streamed to this node at once during a membership change.
    pub move_concurrency: usize,
    /// Bound on the bytes per second this node streams in (all its moves together).
    pub move_bytes_per_sec: u64,
    /// Bytes of op log per streamed chunk.
    pub move_chunk_bytes: u32,
    /// Cassandra's `consistent.rangemovement`: a partition's new copy is complete only when it
    /// holds every op of every previous owner that was not removed, so a move waits for a down
    /// previous owner. `false` lets moves complete without it (logged and counted in
    /// `recsys_inconsistent_moves_total`): acknowledged writes only that owner holds can be lost.
    pub consistent_range_movement: bool,
    /// When set, every Ingest and Admin call needs `authorization: Bearer <token>`. Empty: open.
    /// Env: RECSYS_OPERATOR_TOKEN.
    pub operator_token: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServingConfig {
    pub default_deadline_ms: u64,
    pub max_deadline_ms: u64,
    pub max_k: u32,
    pub surfaces: Vec<String>,
    pub page_cache_ttl_secs: u64,
    pub page_cache_capacity: usize,
    /// Ranked list kept per request for later pages.
    pub ranked_list_len: usize,
    /// Share of the request deadline each stage may use (cumulative budget points).
    pub stage_share: StageShare,
    /// Bound on requests running at once; beyond it Recommend answers RESOURCE_EXHAUSTED.
    pub max_in_flight: usize,
    /// Hedged reads: at most this share of extra calls (0 turns hedging off).
    pub hedge_max_ratio: f64,
    /// A hedge is sent no earlier than this, however fast the peer's recent p95.
    pub hedge_min_delay_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StageShare {
    pub profile: f64,
    pub retrieval: f64,
    pub filtering: f64,
    pub features: f64,
    pub scoring: f64,
    pub ranking: f64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetrievalConfig {
    pub trending_limit: usize,
    pub trending_window_hours: u32,
    pub follows_per_author: usize,
    pub follows_limit: usize,
    pub coengaged_per_item: usize,
    pub coengaged_limit: usize,
    /// Recent likes kept per user; also the seeds of the co-engagement generator.
    pub recent_likes: usize,
    /// Pair updates per like event are capped so a heavy user costs bounded work.
    pub coengagement_max_pairs_per_event: usize,
    /// Neighbours kept per item in the co-engagement index.
    pub coengagement_neighbors: usize,
    /// Recent items kept per author.
    pub author_recent_items: usize,
    /// Topic freshness: the user's top topics asked (0: the source is off) ...
    pub topic_fresh_topics: usize,
    /// ... for this many of each topic's newest items ...
    pub topic_fresh_per_topic: usize,
    /// ... of which this many are kept after the merge.
    pub topic_fresh_limit: usize,
    /// Newest items kept per topic in the generator partitions.
    pub topic_recent_items: usize,
    /// The global trending list (hit by every event and request) is spread over this many
    /// generator partitions.
    pub global_trending_shards: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FilterConfig {
    pub seen_bloom_capacity: usize,
    pub seen_bloom_fp_rate: f64,
    /// A topic is hidden from a user after this many of their hides of its items (0: never).
    pub hide_topic_after: u32,
    /// An author is hidden from a user after this many of their hides of the author's items
    /// (0: never).
    pub hide_author_after: u32,
    /// An item is removed as reported/spam when reports / impressions reaches this rate ...
    pub report_rate_threshold: f64,
    /// ... and it has at least this many reports (0: the report filter is off).
    pub report_min_reports: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScoringConfig {
    pub models_dir: PathBuf,
    /// ReloadModels only loads directories under this root (after resolving symlinks); unset,
    /// the root is `models_dir` itself.
    pub models_root: Option<PathBuf>,
    pub onnxruntime_lib: Option<PathBuf>,
    pub scorers: usize,
    pub stage2_top_n: usize,
    /// Chunks waiting per scorer: the scorers share one queue of `scorers × queue_per_scorer`.
    pub queue_per_scorer: usize,
    /// Nice value of the scorer threads (0–19). Above 0 the async workers win the CPU when both
    /// want it, so cheap stages never wait behind a model run and scoring drains oldest first.
    pub scorer_nice: i32,
    /// Value model: final score = sum of weight × head probability.
    pub value_model: BTreeMap<String, f32>,
    /// What evaluates the stage-1 tree ensemble: `native` (this crate's evaluator, the default;
    /// same scores as the model, several times faster) or `ort` (ONNX Runtime, the reference).
    pub stage1_engine: Stage1Engine,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage1Engine {
    #[default]
    Native,
    Ort,
}

impl Stage1Engine {
    pub fn name(self) -> &'static str {
        match self {
            Stage1Engine::Native => "native",
            Stage1Engine::Ort => "ort",
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngestConfig {
    pub max_batch: usize,
    /// How long a write waits for each replica's acknowledgement.
    pub replica_timeout_ms: u64,
    pub embedding_dim: usize,
    pub topics: u32,
    /// An event dated more than this ahead of the node's clock is rejected (clock skew allowed).
    pub max_event_skew_ms: i64,
    /// An event older than this is rejected (the widest counter window is 7 days).
    pub max_event_age_ms: i64,
    /// Profiles of users never upserted (known only from their events) kept per feature
    /// partition; beyond it the oldest such profile is forgotten. Bounds memory under a stream of
    /// unknown ids.
    pub unknown_users_per_partition: usize,
    /// Owners of a partition that must take a write before it is acknowledged (capped at the
    /// partition's owner count). 1: one owner, with a durable hint on the coordinator for every
    /// owner that did not take it (two disks when R >= 2); R: every owner, no hint stands in.
    pub write_quorum: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    pub cache_capacity_mb: u64,
}

/// Fault injection for chaos tests (`Admin.InjectFault`): compiled in, off unless enabled here.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ChaosConfig {
    pub enabled: bool,
    /// Longest a delay or RPC-failure fault may last; longer requests are refused.
    pub max_duration_ms: u64,
}

/// TLS (rustls) on the one gRPC port, client and internal API alike; see `transport::tls` and
/// docs/cluster.md (TLS). All of `cert`, `key` and `ca` or none: with them the port serves TLS
/// only and peers are dialled over https, their certificates checked against `ca`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// PEM certificate chain this node presents (leaf first).
    pub cert: Option<PathBuf>,
    /// PEM private key of `cert` (PKCS#8, PKCS#1 or SEC1).
    pub key: Option<PathBuf>,
    /// PEM certificate(s) of the CA that signs every node's certificate: peers are verified
    /// against it (and, with `mutual`, the client certificates of callers).
    pub ca: Option<PathBuf>,
    /// Mutual TLS between nodes: this node presents `cert` to its peers, the handshake asks
    /// callers for a certificate (optionally: Recommend clients need none), and every internal
    /// call without a client certificate verified against `ca` is refused (UNAUTHENTICATED).
    pub mutual: bool,
    /// The name a peer's certificate must carry. Empty: the host of the address the peer is
    /// dialled at (its advertise address: an IP SAN or a DNS name), as https checks it.
    pub server_name: String,
}

impl TlsConfig {
    pub fn enabled(&self) -> bool {
        self.cert.is_some() || self.key.is_some() || self.ca.is_some()
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FeatureDecl {
    pub name: String,
    pub source: String,
    #[serde(default)]
    pub default: f32,
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            node_id: "node-1".into(),
            listen: "127.0.0.1:7400".into(),
            metrics_listen: None,
            data_dir: PathBuf::from("data/node-1"),
            seeds: vec![],
            advertise_addr: None,
        }
    }
}
impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            name: "recsys".into(),
            initial_nodes: vec![],
            partitions_per_role: 32,
            replication_factor: 2,
            virtual_nodes: 64,
            scorer_nodes: vec![],
            gossip_interval_ms: 100,
            phi_threshold: 6.0,
            flap_debounce_ms: 300,
            anti_entropy_interval_ms: 5000,
            catch_up_wait_ms: 3000,
            secret: String::new(),
            join: false,
            move_concurrency: 2,
            move_bytes_per_sec: 32 * 1024 * 1024,
            move_chunk_bytes: 1024 * 1024,
            consistent_range_movement: true,
            operator_token: String::new(),
        }
    }
}
impl Default for StageShare {
    fn default() -> Self {
        Self { profile: 0.10, retrieval: 0.25, filtering: 0.10, features: 0.20, scoring: 0.30, ranking: 0.05 }
    }
}
impl Default for ServingConfig {
    fn default() -> Self {
        Self {
            default_deadline_ms: 250,
            max_deadline_ms: 5000,
            max_k: 100,
            surfaces: vec!["home".into(), "related".into()],
            page_cache_ttl_secs: 600,
            page_cache_capacity: 20_000,
            ranked_list_len: 100,
            stage_share: StageShare::default(),
            max_in_flight: 256,
            hedge_max_ratio: 0.05,
            hedge_min_delay_ms: 2,
        }
    }
}
impl Default for RetrievalConfig {
    fn default() -> Self {
        Self {
            trending_limit: 700,
            trending_window_hours: 24,
            follows_per_author: 20,
            follows_limit: 400,
            coengaged_per_item: 40,
            coengaged_limit: 400,
            recent_likes: 20,
            coengagement_max_pairs_per_event: 10,
            coengagement_neighbors: 50,
            author_recent_items: 50,
            topic_fresh_topics: 3,
            topic_fresh_per_topic: 50,
            topic_fresh_limit: 150,
            topic_recent_items: 200,
            global_trending_shards: 8,
        }
    }
}
impl Default for FilterConfig {
    fn default() -> Self {
        Self {
            seen_bloom_capacity: 2048,
            seen_bloom_fp_rate: 0.01,
            hide_topic_after: 3,
            hide_author_after: 2,
            report_rate_threshold: 0.05,
            report_min_reports: 3,
        }
    }
}
impl Default for ScoringConfig {
    fn default() -> Self {
        let value_model = [("click", 1.0), ("like", 2.0), ("share", 3.0), ("hide", -4.0)]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        Self {
            models_dir: PathBuf::from("models"),
            models_root: None,
            onnxruntime_lib: None,
            scorers: 2,
            stage2_top_n: 100,
            queue_per_scorer: 32,
            scorer_nice: 5,
            value_model,
            stage1_engine: Stage1Engine::default(),
        }
    }
}
impl Default for IngestConfig {
    fn default() -> Self {
        Self {
            max_batch: 5000,
            replica_timeout_ms: 3000,
            embedding_dim: 8,
            topics: 20,
            max_event_skew_ms: 300_000,
            max_event_age_ms: 30 * 86_400_000,
            unknown_users_per_partition: 1000,
            write_quorum: 1,
        }
    }
}
impl Default for ChaosConfig {
    fn default() -> Self {
        Self { enabled: false, max_duration_ms: 600_000 }
    }
}
impl Default for StoreConfig {
    fn default() -> Self {
        Self { cache_capacity_mb: 64 }
    }
}

impl Config {
    /// Reads a TOML file; a key the schema does not know is an error naming it.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
        Self::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let cfg: Config = toml::from_str(text)
            .map_err(|e| ConfigError::Parse { path: path.to_path_buf(), message: e.to_string() })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads several files, each overriding the keys of the ones before it (tables merge key by
    /// key; arrays, like the feature list, are replaced whole). A per-node file then holds only
    /// what differs from the shared one.
    pub fn load_layered(paths: &[PathBuf]) -> Result<Self, ConfigError> {
        let mut merged = toml::Value::Table(Default::default());
        let mut last = PathBuf::new();
        for path in paths {
            let text = std::fs::read_to_string(path)
                .map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
            let v: toml::Value = toml::from_str(&text)
                .map_err(|e| ConfigError::Parse { path: path.to_path_buf(), message: e.to_string() })?;
            merge(&mut merged, v);
            last = path.clone();
        }
        let cfg: Config = merged
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Parse { path: last, message: e.to_string() })?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad =
            |key: &str, message: &str| Err(ConfigError::Invalid { key: key.to_string(), message: message.to_string() });
        if self.cluster.partitions_per_role == 0 || self.cluster.partitions_per_role > 4096 {
            return bad("cluster.partitions_per_role", "must be in 1..=4096");
        }
        if self.cluster.replication_factor == 0 {
            return bad("cluster.replication_factor", "must be at least 1");
        }
        if !(10..=10_000).contains(&self.cluster.gossip_interval_ms) {
            return bad("cluster.gossip_interval_ms", "must be in 10..=10000");
        }
        if !(1.0..=100.0).contains(&self.cluster.phi_threshold) {
            return bad("cluster.phi_threshold", "must be in 1..=100");
        }
        if !(1..=64).contains(&self.cluster.move_concurrency) {
            return bad("cluster.move_concurrency", "must be in 1..=64");
        }
        if self.cluster.move_bytes_per_sec < 64 * 1024 {
            return bad("cluster.move_bytes_per_sec", "must be at least 65536");
        }
        if !(4096..=16 * 1024 * 1024).contains(&self.cluster.move_chunk_bytes) {
            return bad("cluster.move_chunk_bytes", "must be in 4096..=16777216");
        }
        if self.retrieval.global_trending_shards == 0 || self.retrieval.global_trending_shards > 64 {
            return bad("retrieval.global_trending_shards", "must be in 1..=64");
        }
        if self.node.node_id.is_empty()
            || self.node.node_id.len() > 64
            || self.node.node_id.contains(char::is_whitespace)
        {
            return bad("node.node_id", "must be 1..=64 characters without spaces");
        }
        if !self.node.node_id.is_ascii() {
            return bad("node.node_id", "must be ASCII (it travels in the internal calls' auth header)");
        }
        if !self.cluster.operator_token.chars().all(|c| c.is_ascii_graphic()) {
            return bad("cluster.operator_token", "must be printable ASCII without spaces");
        }
        if !(0.0..=1.0).contains(&self.serving.hedge_max_ratio) {
            return bad("serving.hedge_max_ratio", "must be in 0..=1");
        }
        if self.serving.max_k == 0 {
            return bad("serving.max_k", "must be at least 1");
        }
        if self.serving.surfaces.is_empty() {
            return bad("serving.surfaces", "at least one surface is required");
        }
        if !(1..=24).contains(&self.retrieval.trending_window_hours) {
            return bad(
                "retrieval.trending_window_hours",
                "must be in 1..=24 (the trending ring holds 24 hourly buckets)",
            );
        }
        if !(0..=19).contains(&self.scoring.scorer_nice) {
            return bad("scoring.scorer_nice", "must be between 0 and 19");
        }
        if self.scoring.scorers == 0 {
            return bad("scoring.scorers", "must be at least 1");
        }
        if !(0..=86_400_000).contains(&self.ingest.max_event_skew_ms) {
            return bad("ingest.max_event_skew_ms", "must be in 0..=86400000 (one day)");
        }
        if !(3_600_000..=10 * 365 * 86_400_000).contains(&self.ingest.max_event_age_ms) {
            return bad("ingest.max_event_age_ms", "must be in 3600000..=315360000000 (one hour to ten years)");
        }
        if self.ingest.unknown_users_per_partition > 1_000_000 {
            return bad("ingest.unknown_users_per_partition", "must be at most 1000000");
        }
        if self.ingest.write_quorum == 0 || self.ingest.write_quorum > self.cluster.replication_factor as usize {
            return Err(ConfigError::Invalid {
                key: "ingest.write_quorum".into(),
                message: format!(
                    "is {}; must be in 1..=cluster.replication_factor ({})",
                    self.ingest.write_quorum, self.cluster.replication_factor
                ),
            });
        }
        if self.ingest.max_batch == 0 {
            return bad("ingest.max_batch", "must be at least 1");
        }
        if !(1..=3_600_000).contains(&self.chaos.max_duration_ms) {
            return bad("chaos.max_duration_ms", "must be in 1..=3600000 (one hour)");
        }
        if self.features.is_empty() {
            return bad("features", "no features declared");
        }
        let mut names = std::collections::HashSet::new();
        for f in &self.features {
            if !names.insert(f.name.as_str()) {
                return bad("features", &format!("feature `{}` declared twice", f.name));
            }
        }
        self.validate_tls()?;
        let s = &self.serving.stage_share;
        let total = s.profile + s.retrieval + s.filtering + s.features + s.scoring + s.ranking;
        if !(0.5..=1.0001).contains(&total) {
            return bad("serving.stage_share", "shares must add up to between 0.5 and 1.0");
        }
        self.validate_limits()
    }

    /// All of `tls.cert`, `tls.key`, `tls.ca` or none (a half-configured TLS is refused rather
    /// than served in plaintext); the files themselves are read and checked at node start.
    fn validate_tls(&self) -> Result<(), ConfigError> {
        let t = &self.tls;
        let bad = |key: &str, message: String| Err(ConfigError::Invalid { key: key.to_string(), message });
        if !t.enabled() {
            if t.mutual {
                return bad("tls.mutual", "needs tls.cert, tls.key and tls.ca".into());
            }
            if !t.server_name.is_empty() {
                return bad("tls.server_name", "needs tls.cert, tls.key and tls.ca".into());
            }
            return Ok(());
        }
        for (key, v) in [("tls.cert", &t.cert), ("tls.key", &t.key), ("tls.ca", &t.ca)] {
            match v {
                None => return bad(key, "missing: TLS needs tls.cert, tls.key and tls.ca together".into()),
                Some(p) if p.as_os_str().is_empty() => return bad(key, "is empty (a PEM file path)".into()),
                Some(_) => {}
            }
        }
        if t.server_name.contains(char::is_whitespace) {
            return bad("tls.server_name", format!("`{}` is not a host name", t.server_name));
        }
        Ok(())
    }

    /// Settings with which a node would start but could not work (every call refused, every
    /// write timed out, nothing kept): refused at start, naming the key and the value.
    fn validate_limits(&self) -> Result<(), ConfigError> {
        fn at_least(key: &str, v: u64, min: u64, why: &str) -> Result<(), ConfigError> {
            if v < min {
                return Err(ConfigError::Invalid {
                    key: key.to_string(),
                    message: format!("{v} is below {min}: {why}"),
                });
            }
            Ok(())
        }
        let (s, i, sc) = (&self.serving, &self.ingest, &self.scoring);
        at_least("serving.max_in_flight", s.max_in_flight as u64, 1, "every Recommend would be refused")?;
        at_least("serving.default_deadline_ms", s.default_deadline_ms, 1, "every request would time out at once")?;
        at_least("serving.max_deadline_ms", s.max_deadline_ms, 1, "every request would time out at once")?;
        if s.default_deadline_ms > s.max_deadline_ms {
            return Err(ConfigError::Invalid {
                key: "serving.default_deadline_ms".into(),
                message: format!("{} is above serving.max_deadline_ms ({})", s.default_deadline_ms, s.max_deadline_ms),
            });
        }
        at_least("serving.ranked_list_len", s.ranked_list_len as u64, 1, "no request could return an item")?;
        at_least("ingest.replica_timeout_ms", i.replica_timeout_ms, 1, "every write would time out")?;
        at_least("ingest.topics", u64::from(i.topics), 1, "no item could be accepted")?;
        at_least("scoring.queue_per_scorer", sc.queue_per_scorer as u64, 1, "no request could be scored")?;
        at_least("scoring.stage2_top_n", sc.stage2_top_n as u64, 1, "no request could be ranked")?;
        at_least(
            "filters.seen_bloom_capacity",
            self.filters.seen_bloom_capacity as u64,
            1,
            "no filter could be built",
        )?;
        let fp = self.filters.seen_bloom_fp_rate;
        if !(fp > 0.0 && fp < 1.0) {
            return Err(ConfigError::Invalid {
                key: "filters.seen_bloom_fp_rate".into(),
                message: format!("{fp} is outside (0, 1)"),
            });
        }
        let rate = self.filters.report_rate_threshold;
        if !(rate > 0.0 && rate <= 1.0) {
            return Err(ConfigError::Invalid {
                key: "filters.report_rate_threshold".into(),
                message: format!("{rate} is outside (0, 1]"),
            });
        }
        Ok(())
    }
}

fn merge(into: &mut toml::Value, from: toml::Value) {
    match (into, from) {
        (toml::Value::Table(a), toml::Value::Table(b)) => {
            for (k, v) in b {
                match a.get_mut(&k) {
                    Some(existing) if existing.is_table() && v.is_table() => merge(existing, v),
                    _ => {
                        a.insert(k, v);
                    }
                }
            }
        }
        (slot, v) => *slot = v,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_key_is_rejected_by_name() {
        let err = Config::parse("[serving]\nmax_kk = 3\n", Path::new("x.toml")).unwrap_err();
        assert!(err.to_string().contains("max_kk"), "{err}");
    }

    #[test]
    fn later_files_override_key_by_key() {
        let dir = std::env::temp_dir().join(format!("recsys-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let node = dir.join("n2.toml");
        std::fs::write(&node, "[node]\nnode_id = \"n2\"\n[cluster]\ninitial_nodes = [\"n1\", \"n2\"]\n").unwrap();
        let cfg = Config::load_layered(&[PathBuf::from("config/node.toml"), node.clone()]).unwrap();
        assert_eq!(cfg.node.node_id, "n2");
        assert_eq!(cfg.cluster.initial_nodes, vec!["n1", "n2"]);
        assert_eq!(cfg.cluster.partitions_per_role, 32, "keys not in the later file stay");
        assert!(cfg.features.len() >= 30);
        std::fs::write(&node, "[cluster]\nreplicas = 2\n").unwrap();
        let err = Config::load_layered(&[PathBuf::from("config/node.toml"), node]).unwrap_err();
        assert!(err.to_string().contains("replicas"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn impossible_limits_refuse_to_start_naming_the_value() {
        let cases = [
            ("[serving]\nmax_in_flight = 0\n", "serving.max_in_flight", "0 is below 1"),
            ("[serving]\ndefault_deadline_ms = 0\n", "serving.default_deadline_ms", "0 is below 1"),
            ("[serving]\ndefault_deadline_ms = 9000\n", "serving.default_deadline_ms", "9000 is above"),
            ("[ingest]\nreplica_timeout_ms = 0\n", "ingest.replica_timeout_ms", "0 is below 1"),
            ("[scoring]\nqueue_per_scorer = 0\n", "scoring.queue_per_scorer", "0 is below 1"),
            ("[filters]\nseen_bloom_fp_rate = 1.5\n", "filters.seen_bloom_fp_rate", "1.5 is outside"),
            (
                "[ingest]\nwrite_quorum = 3\n",
                "ingest.write_quorum",
                "is 3; must be in 1..=cluster.replication_factor (2)",
            ),
            ("[ingest]\nwrite_quorum = 0\n", "ingest.write_quorum", "is 0"),
            ("[filters]\nreport_rate_threshold = 0.0\n", "filters.report_rate_threshold", "0 is outside"),
        ];
        let dir = std::env::temp_dir().join(format!("recsys-cfg-limits-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let over = dir.join("over.toml");
        let load = |text: &str| {
            std::fs::write(&over, text).unwrap();
            Config::load_layered(&[PathBuf::from("config/node.toml"), over.clone()])
        };
        for (text, key, value) in cases {
            let err = load(text).unwrap_err().to_string();
            assert!(err.contains(key) && err.contains(value), "{text}: {err}");
        }
        assert!(load("[serving]\nmax_in_flight = 1\n").is_ok());
        assert!(load("[ingest]\nwrite_quorum = 2\n").is_ok());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn tls_is_all_or_nothing() {
        let parse =
            |t: &str| Config::parse(&format!("{t}\n[[features]]\nname = \"a\"\nsource = \"x\"\n"), Path::new("t"));
        let err = parse("[tls]\ncert = \"c.pem\"\nkey = \"k.pem\"\n").unwrap_err().to_string();
        assert!(err.contains("tls.ca") && err.contains("missing"), "{err}");
        let err = parse("[tls]\nmutual = true\n").unwrap_err().to_string();
        assert!(err.contains("tls.mutual"), "{err}");
        let err = parse("[tls]\ncert = \"\"\nkey = \"k\"\nca = \"c\"\n").unwrap_err().to_string();
        assert!(err.contains("tls.cert") && err.contains("empty"), "{err}");
        let ok = parse("[tls]\ncert = \"c\"\nkey = \"k\"\nca = \"a\"\nmutual = true\n").unwrap();
        assert!(ok.tls.enabled() && ok.tls.mutual);
        assert!(!parse("").unwrap().tls.enabled());
    }

    #[test]
    fn shipped_config_parses() {
        let cfg = Config::load(Path::new("config/node.toml")).unwrap();
        assert!(cfg.features.len() >= 30);
    }
}
