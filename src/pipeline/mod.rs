//! The request coordinator: one actor per Recommend call runs the five serving stages, each with
//! its share of the deadline, fanning out to partitions on this node and its peers through the
//! transport. A partition or scorer that misses its share is retried on a replica while time
//! remains, then recorded in coverage, and the request degrades instead of failing.
//!
//! One file per stage: `profile`, `retrieval`, `filtering`, `features`, `scoring`, `ranking`,
//! and `paging` (later pages, on whichever node holds the list). The stages run lists of
//! components (`components`): `sources/`, `hydrators/`, `filters/`, `scorers/`.
mod components;
mod features;
mod filtering;
mod filters;
mod hydrators;
mod paging;
mod profile;
mod ranking;
mod retrieval;
mod scorers;
mod scoring;
mod sources;

pub use components::{
    register_zero_series, source_names, Filter, FilterPhase, Hydrator, Query, Scorer, Source, FILTERS, HYDRATORS,
    SCORERS, SOURCES,
};

use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::Instrument;

pub use crate::transport::StageCoverage;
pub use paging::PageWire;

use crate::config::Config;
use crate::features::FeaturePlan;
use crate::logging::FeatureLogger;
use crate::ranking::{PageCache, PageTokens, RankedList, Scored};
use crate::scoring::Models;
use crate::transport::Transport;

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("deadline exceeded before {stage} could start")]
    DeadlineExceeded { stage: &'static str },
    #[error("too many requests in flight (limit {0})")]
    Overloaded(usize),
    #[error("{0}")]
    Unavailable(String),
    #[error("internal: {0}")]
    Internal(String),
}

/// The per-request coordinator: runs the five stages once, replies, and stops.
pub struct Coordinator;

pub struct CoordinatorArgs {
    pipeline: Arc<Pipeline>,
    request: Request,
    timeout: Duration,
    reply: tokio::sync::oneshot::Sender<Result<Reply, PipelineError>>,
}

impl ractor::Actor for Coordinator {
    type Msg = ();
    type State = Option<CoordinatorArgs>;
    type Arguments = CoordinatorArgs;

    async fn pre_start(
        &self,
        _me: ractor::ActorRef<()>,
        args: CoordinatorArgs,
    ) -> Result<Self::State, ractor::ActorProcessingErr> {
        Ok(Some(args))
    }

    async fn post_start(
        &self,
        me: ractor::ActorRef<()>,
        st: &mut Self::State,
    ) -> Result<(), ractor::ActorProcessingErr> {
        if let Some(a) = st.take() {
            let res = a.pipeline.coordinate(a.request, a.timeout).await;
            let _ = a.reply.send(res);
        }
        me.stop(None);
        Ok(())
    }
}

pub struct Request {
    pub user_id: String,
    pub surface: String,
    pub k: usize,
    pub page_token: String,
    pub geo: String,
    pub explain: bool,
}

#[derive(Debug, Default)]
pub struct Coverage {
    pub stages: Vec<StageCoverage>,
    pub fallbacks: Vec<&'static str>,
    pub degraded: bool,
    pub filter_removed: Vec<(&'static str, u32)>,
    pub generator_candidates: Vec<(&'static str, u32)>,
}

impl Coverage {
    fn fallback(&mut self, f: &'static str) {
        if !self.fallbacks.contains(&f) {
            self.fallbacks.push(f);
            metrics::counter!("recsys_fallbacks_total", "fallback" => f).increment(1);
        }
    }

    /// Adds a stage's fan-out coverage; anything missing makes the reply degraded.
    fn stage(&mut self, c: StageCoverage) {
        if !c.missing.is_empty() {
            self.degraded = true;
            metrics::counter!("recsys_missing_partitions_total", "stage" => c.stage).increment(c.missing.len() as u64);
        }
        self.stages.push(c);
    }
}

pub struct Reply {
    pub request_id: String,
    pub items: Vec<(u32, Scored)>,
    pub next_page_token: String,
    pub coverage: Coverage,
    pub timings: Vec<(&'static str, Duration)>,
    pub stage1_version: String,
    pub stage2_version: String,
    /// Names of the values in each item's `heads`.
    pub head_names: Arc<[String]>,
    pub diversity_relaxed: bool,
    pub from_page_cache: bool,
}

pub struct Pipeline {
    pub cfg: Arc<Config>,
    pub plan: Arc<FeaturePlan>,
    pub transport: Arc<Transport>,
    /// The deployed model version; each request takes the version current when it starts.
    pub models: Arc<Models>,
    pub pages: PageCache,
    pub tokens: PageTokens,
    pub logger: Option<FeatureLogger>,
    pub inflight: tokio::sync::Semaphore,
}

/// Per-stage deadlines: each stage may run until its cumulative share of the budget.
struct Budget {
    start: Instant,
    total: Duration,
    shares: [f64; 6],
}

impl Budget {
    fn until(&self, stage: usize) -> Instant {
        let cum: f64 = self.shares[..=stage].iter().sum();
        self.start + self.total.mul_f64(cum.min(1.0))
    }
    fn end(&self) -> Instant {
        self.start + self.total
    }
}

fn now_secs() -> i64 {
    crate::clock::unix_secs()
}

fn new_request_id() -> String {
    format!("{:016x}", rand::random::<u64>())
}

fn record_stage(timings: &mut Vec<(&'static str, Duration)>, stage: &'static str, t: Instant) {
    let el = t.elapsed();
    metrics::histogram!("recsys_stage_seconds", "stage" => stage).record(el.as_secs_f64());
    timings.push((stage, el));
}

impl Pipeline {
    pub fn validate(&self, r: &Request) -> Result<(), PipelineError> {
        let bad = |m: String| Err(PipelineError::InvalidArgument(m));
        if r.user_id.trim().is_empty() {
            return bad("user_id: must not be empty".into());
        }
        if r.user_id.len() > 256 {
            return bad("user_id: longer than 256 bytes".into());
        }
        if r.geo.len() > 64 {
            return bad("context.geo: longer than 64 bytes".into());
        }
        if r.geo.chars().any(char::is_control) {
            return bad("context.geo: must not contain control characters".into());
        }
        if r.k == 0 {
            return bad("k: must be at least 1".into());
        }
        if r.k > self.cfg.serving.max_k as usize {
            return bad(format!("k: {} is above the maximum of {}", r.k, self.cfg.serving.max_k));
        }
        if !self.cfg.serving.surfaces.contains(&r.surface) {
            return bad(format!(
                "surface: unknown surface `{}` (known: {})",
                r.surface,
                self.cfg.serving.surfaces.join(", ")
            ));
        }
        Ok(())
    }

    pub async fn recommend(self: &Arc<Self>, r: Request, timeout: Duration) -> Result<Reply, PipelineError> {
        self.validate(&r)?;
        let _permit =
            self.inflight.try_acquire().map_err(|_| PipelineError::Overloaded(self.cfg.serving.max_in_flight))?;
        if !r.page_token.is_empty() {
            let res = self.next_page(&r, Instant::now() + timeout).await;
            metrics::counter!("recsys_requests_total", "outcome" => if res.is_ok() { "ok" } else { "error" })
                .increment(1);
            return res;
        }
        // One coordinator actor per request: it owns the request's fan-out, and a panic in it fails
        // that request alone (INTERNAL) instead of the connection's task.
        let (tx, rx) = tokio::sync::oneshot::channel();
        let args = CoordinatorArgs { pipeline: self.clone(), request: r, timeout, reply: tx };
        ractor::Actor::spawn(None, Coordinator, args)
            .await
            .map_err(|e| PipelineError::Internal(format!("coordinator did not start: {e}")))?;
        let res = rx.await.unwrap_or_else(|_| Err(PipelineError::Internal("coordinator failed".into())));
        let outcome = match &res {
            Ok(r) if r.coverage.degraded => "degraded",
            Ok(_) => "ok",
            Err(_) => "error",
        };
        metrics::counter!("recsys_requests_total", "outcome" => outcome).increment(1);
        res
    }

    async fn coordinate(&self, r: Request, timeout: Duration) -> Result<Reply, PipelineError> {
        let rid = new_request_id();
        let span = tracing::info_span!("recommend", request_id = %rid, user = %r.user_id);
        self.run(rid, r, timeout).instrument(span).await
    }

    async fn run(&self, rid: String, r: Request, timeout: Duration) -> Result<Reply, PipelineError> {
        let s = &self.cfg.serving.stage_share;
        let budget = Budget {
            start: Instant::now(),
            total: timeout,
            shares: [s.profile, s.retrieval, s.filtering, s.features, s.scoring, s.ranking],
        };
        let mut cov = Coverage::default();
        let mut timings = Vec::with_capacity(7);
        // The model version is fixed for the whole request, even if a reload lands meanwhile.
        let scorers = self.models.current();
        let now = now_secs();

        let t = Instant::now();
        let profile =
            self.profile(&r.user_id, budget.until(0), &mut cov).instrument(tracing::info_span!("profile")).await;
        record_stage(&mut timings, "profile", t);

        let geo = if !r.geo.is_empty() { r.geo.as_str() } else { profile.geo.as_str() };
        let query = Query { request: &r, profile: &profile, geo, now, cfg: &self.cfg, scorers: &scorers };

        let t = Instant::now();
        let candidates =
            self.retrieve(&query, budget.until(1), &mut cov).instrument(tracing::info_span!("retrieval")).await;
        record_stage(&mut timings, "retrieval", t);

        // Filtering fetches item state and item feature rows in one call per node; it may use the
        // features stage's share of the deadline too.
        let t = Instant::now();
        let (candidates, hydrated) = self
            .filter(&query, candidates, budget.until(3), &mut cov)
            .instrument(tracing::info_span!("filtering"))
            .await;
        record_stage(&mut timings, "filtering", t);

        let t = Instant::now();
        if Instant::now() >= budget.end() {
            return Err(PipelineError::DeadlineExceeded { stage: "features" });
        }
        let (rows, metas, defaulted) = {
            let _span = tracing::info_span!("features").entered();
            self.extract(&candidates, &hydrated, &profile, &r, now, &mut cov)
        };
        drop(hydrated);
        record_stage(&mut timings, "features", t);

        let t = Instant::now();
        let input = scoring::ScoreInput { cands: &candidates, rows: &rows, metas: &metas, defaulted: &defaulted };
        let scored =
            self.score(&query, &rid, input, budget.until(4), &mut cov).instrument(tracing::info_span!("scoring")).await;
        record_stage(&mut timings, "scoring", t);

        let t = Instant::now();
        let ranking_deadline = budget.until(5).max(Instant::now() + Duration::from_millis(2));
        let region = filters::geo_licence::region(geo);
        let (ranked, relaxed, kept_rows) = self
            .rank(scored, &rows, region, ranking_deadline, &mut cov)
            .instrument(tracing::info_span!("ranking"))
            .await;
        record_stage(&mut timings, "ranking", t);

        let (v1, v2, head_names) = match scorers.manifest.as_ref() {
            Some(m) => (format!("{}/stage1", m.version), format!("{}/stage2", m.version), m.head_names.clone()),
            None => (String::new(), String::new(), Arc::from(Vec::new())),
        };
        let list = Arc::new(RankedList {
            request_id: rid.clone(),
            user: r.user_id.clone(),
            items: ranked,
            diversity_relaxed: relaxed,
            stage1_version: v1.clone(),
            stage2_version: v2.clone(),
            head_names: head_names.clone(),
            created: Instant::now(),
            features: kept_rows,
            region,
        });
        let end = r.k.min(list.items.len());
        let items: Vec<(u32, Scored)> =
            list.items[..end].iter().enumerate().map(|(i, s)| ((i + 1) as u32, s.clone())).collect();
        let next = if end < list.items.len() {
            self.tokens.make(&self.transport.node_id, &rid, end, &r.user_id)
        } else {
            String::new()
        };
        let diversity_relaxed = paging::page_relaxed(&items);
        if !next.is_empty() {
            self.pages.insert(list.clone());
        }
        self.log_served(&list, &r.surface, (0..end).collect());
        Ok(Reply {
            request_id: rid,
            items,
            next_page_token: next,
            coverage: cov,
            timings,
            stage1_version: v1,
            stage2_version: v2,
            head_names,
            diversity_relaxed,
            from_page_cache: false,
        })
    }
}
