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
    pub seeds: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    pub partitions_per_role: u32,
    pub replication_factor: u32,
    pub virtual_nodes: u32,
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
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FilterConfig {
    pub seen_bloom_capacity: usize,
    pub seen_bloom_fp_rate: f64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScoringConfig {
    pub models_dir: PathBuf,
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
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngestConfig {
    pub max_batch: usize,
    pub embedding_dim: usize,
    pub topics: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    pub cache_capacity_mb: u64,
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
        }
    }
}
impl Default for ClusterConfig {
    fn default() -> Self {
        Self { partitions_per_role: 32, replication_factor: 2, virtual_nodes: 64 }
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
        }
    }
}
impl Default for FilterConfig {
    fn default() -> Self {
        Self { seen_bloom_capacity: 2048, seen_bloom_fp_rate: 0.01 }
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
            onnxruntime_lib: None,
            scorers: 2,
            stage2_top_n: 100,
            queue_per_scorer: 32,
            scorer_nice: 5,
            value_model,
        }
    }
}
impl Default for IngestConfig {
    fn default() -> Self {
        Self { max_batch: 5000, embedding_dim: 8, topics: 20 }
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

    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad =
            |key: &str, message: &str| Err(ConfigError::Invalid { key: key.to_string(), message: message.to_string() });
        if self.cluster.partitions_per_role == 0 || self.cluster.partitions_per_role > 4096 {
            return bad("cluster.partitions_per_role", "must be in 1..=4096");
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
        if self.ingest.max_batch == 0 {
            return bad("ingest.max_batch", "must be at least 1");
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
        let s = &self.serving.stage_share;
        let total = s.profile + s.retrieval + s.filtering + s.features + s.scoring + s.ranking;
        if !(0.5..=1.0001).contains(&total) {
            return bad("serving.stage_share", "shares must add up to between 0.5 and 1.0");
        }
        Ok(())
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
    fn shipped_config_parses() {
        let cfg = Config::load(Path::new("config/node.toml")).unwrap();
        assert!(cfg.features.len() >= 30);
    }
}
