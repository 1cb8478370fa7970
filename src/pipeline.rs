//! The request coordinator: one task per Recommend call runs the five serving stages, each with
//! its share of the deadline, fanning out to partitions through the router. A partition or
//! scorer that misses its share is recorded in coverage and the request degrades, not fails.
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::Instrument;

use crate::cluster::Router;
use crate::config::Config;
use crate::features::shard::{BriefWants, FeatureMsg, ItemBrief, ItemFeatureRows, ItemMeta, UserSnapshot};
use crate::features::{self, CrossFeat, FeatureKind, FeaturePlan};
use crate::generators::{Candidate, GeneratorMsg, RetrieveQuery};
use crate::ids::{self, key_of, partition_of, Key, KeyMap};
use crate::ingest::GLOBAL_GEO;
use crate::logging::{FeatureLogger, LogLine, ServedRow};
use crate::ranking::{self, PageCache, RankedList, Scored, TokenError};
use crate::scoring::{Models, ScorerPool, Stage};

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

#[derive(Debug, Default, Clone)]
pub struct StageCoverage {
    pub stage: &'static str,
    pub asked: u32,
    pub answered: u32,
    pub missing: Vec<u32>,
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
    pub router: Arc<Router>,
    /// The deployed model version; each request takes the version current when it starts.
    pub models: Arc<Models>,
    pub pages: PageCache,
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
    fn left(&self, stage: usize) -> Duration {
        self.until(stage).saturating_duration_since(Instant::now())
    }
    fn end(&self) -> Instant {
        self.start + self.total
    }
}

fn now_secs() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
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
            return self.next_page(&r);
        }
        // One coordinator actor per request: it owns the request's fan-out, and a panic in it fails
        // that request alone (INTERNAL) instead of the connection's task.
        let (tx, rx) = tokio::sync::oneshot::channel();
        let args = CoordinatorArgs { pipeline: self.clone(), request: r, timeout, reply: tx };
        ractor::Actor::spawn(None, Coordinator, args)
            .await
            .map_err(|e| PipelineError::Internal(format!("coordinator did not start: {e}")))?;
        let res = rx.await.unwrap_or_else(|_| Err(PipelineError::Internal("coordinator failed".into())));
        metrics::counter!("recsys_requests_total", "outcome" => if res.is_ok() { "ok" } else { "error" }).increment(1);
        res
    }

    async fn coordinate(&self, r: Request, timeout: Duration) -> Result<Reply, PipelineError> {
        let rid = new_request_id();
        let span = tracing::info_span!("recommend", request_id = %rid, user = %r.user_id);
        self.run(rid, r, timeout).instrument(span).await
    }

    fn next_page(&self, r: &Request) -> Result<Reply, PipelineError> {
        let (rid, offset) = ranking::parse_token(&r.page_token, &r.user_id).map_err(|e| match e {
            TokenError::Expired => PipelineError::NotFound(format!("page_token: {e}")),
            _ => PipelineError::InvalidArgument(format!("page_token: {e}")),
        })?;
        let list = self.pages.get(&rid).ok_or_else(|| {
            PipelineError::NotFound("page_token: expired or unknown to this node; request the first page again".into())
        })?;
        if list.user != r.user_id {
            return Err(PipelineError::InvalidArgument("page_token: belongs to another user".into()));
        }
        let t = Instant::now();
        let end = (offset + r.k).min(list.items.len());
        let items: Vec<(u32, Scored)> = list
            .items
            .get(offset..end)
            .unwrap_or(&[])
            .iter()
            .enumerate()
            .map(|(i, s)| ((offset + i + 1) as u32, s.clone()))
            .collect();
        let next = if end < list.items.len() { ranking::make_token(&rid, end, &r.user_id) } else { String::new() };
        let diversity_relaxed = page_relaxed(&items);
        self.log_served(&list, &r.surface, offset, end);
        Ok(Reply {
            request_id: rid,
            items,
            next_page_token: next,
            coverage: Coverage::default(),
            timings: vec![("page_cache", t.elapsed())],
            stage1_version: list.stage1_version.clone(),
            stage2_version: list.stage2_version.clone(),
            head_names: list.head_names.clone(),
            diversity_relaxed,
            from_page_cache: true,
        })
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
        let parts = self.router.partitions();
        let now = now_secs();

        // 0. profile
        let t = Instant::now();
        let user_key = key_of(&r.user_id);
        let up = partition_of(ids::USER, user_key, parts);
        let profile = match self.router.feature(up, budget.left(0), move |rp| FeatureMsg::Profile(user_key, rp)).await {
            Ok(p) => {
                cov.stages.push(StageCoverage { stage: "profile", asked: 1, answered: 1, missing: vec![] });
                p
            }
            Err(e) => {
                tracing::warn!(error = %e, "profile partition missing");
                cov.degraded = true;
                cov.fallback("profile_missing");
                cov.stages.push(StageCoverage { stage: "profile", asked: 1, answered: 0, missing: vec![up] });
                UserSnapshot::unknown()
            }
        };
        if !profile.known {
            cov.fallback("cold_start");
        }
        record_stage(&mut timings, "profile", t);

        // 1. retrieval
        let t = Instant::now();
        let candidates = self
            .retrieve(&r, &profile, now, budget.left(1), &mut cov)
            .instrument(tracing::info_span!("retrieval"))
            .await;
        record_stage(&mut timings, "retrieval", t);

        // 2. filtering
        let t = Instant::now();
        let candidates = self
            .filter(candidates, &profile, budget.left(2), &mut cov)
            .instrument(tracing::info_span!("filtering"))
            .await;
        record_stage(&mut timings, "filtering", t);

        // 3. features
        let t = Instant::now();
        if Instant::now() >= budget.end() {
            return Err(PipelineError::DeadlineExceeded { stage: "features" });
        }
        let (rows, metas, defaulted) = self
            .extract(&candidates, &profile, &r, now, budget.left(3), &mut cov)
            .instrument(tracing::info_span!("features"))
            .await;
        record_stage(&mut timings, "features", t);

        // 4. scoring
        let t = Instant::now();
        let scored = self
            .score(&scorers, &candidates, &rows, &metas, &defaulted, budget.left(4), &mut cov)
            .instrument(tracing::info_span!("scoring"))
            .await;
        record_stage(&mut timings, "scoring", t);

        // 5. ranking
        let t = Instant::now();
        let (ranked, relaxed, kept_rows) = self
            .rank(scored, &rows, budget.left(5).max(Duration::from_millis(2)), &mut cov)
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
        });
        let end = r.k.min(list.items.len());
        let items: Vec<(u32, Scored)> =
            list.items[..end].iter().enumerate().map(|(i, s)| ((i + 1) as u32, s.clone())).collect();
        let next = if end < list.items.len() { ranking::make_token(&rid, end, &r.user_id) } else { String::new() };
        let diversity_relaxed = page_relaxed(&items);
        if !next.is_empty() {
            self.pages.insert(list.clone());
        }
        self.log_served(&list, &r.surface, 0, end);
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

    async fn retrieve(
        &self,
        r: &Request,
        profile: &UserSnapshot,
        now: i64,
        left: Duration,
        cov: &mut Coverage,
    ) -> Vec<Candidate> {
        let rc = &self.cfg.retrieval;
        let parts = self.router.partitions();
        let mut queries: HashMap<u32, RetrieveQuery> = HashMap::new();
        let base = RetrieveQuery {
            now,
            trending_limit: rc.trending_limit,
            per_author: rc.follows_per_author,
            per_seed: rc.coengaged_per_item,
            ..Default::default()
        };
        fn q<'a>(m: &'a mut HashMap<u32, RetrieveQuery>, base: &RetrieveQuery, p: u32) -> &'a mut RetrieveQuery {
            m.entry(p).or_insert_with(|| base.clone())
        }
        let geo = if !r.geo.is_empty() { r.geo.clone() } else { profile.geo.clone() };
        // Trending in the user's geo first; the global list fills what the geo cannot (and serves
        // users with no geo at all).
        let mut geos = vec![];
        if !geo.is_empty() && geo != GLOBAL_GEO {
            geos.push((key_of(&geo), 0u8));
        }
        geos.push((key_of(GLOBAL_GEO), geos.len() as u8));
        for (g, group) in geos {
            q(&mut queries, &base, partition_of(ids::GEO, g, parts)).trending_geos.push((g, group));
        }
        for a in &profile.follows {
            q(&mut queries, &base, partition_of(ids::AUTHOR, *a, parts)).authors.push(*a);
        }
        for s in &profile.recent_likes {
            q(&mut queries, &base, partition_of(ids::COENGAGED, *s, parts)).seeds.push(*s);
        }
        let asked = queries.len() as u32;
        let calls = queries.into_iter().map(|(p, q)| {
            let q = Arc::new(q);
            async move { (p, self.router.generator(p, left, move |rp| GeneratorMsg::Retrieve(q, rp)).await) }
        });
        let results = futures::future::join_all(calls).await;
        let mut st = StageCoverage { stage: "retrieval", asked, ..Default::default() };
        // Per generator, keep its best candidates up to its limit, then union with source tags.
        let mut per_gen: [Vec<Candidate>; 3] = Default::default();
        for (p, res) in results {
            match res {
                Ok(cands) => {
                    st.answered += 1;
                    for c in cands {
                        let g = match c.source {
                            features::SRC_TRENDING => 0,
                            features::SRC_FOLLOWS => 1,
                            _ => 2,
                        };
                        per_gen[g].push(c);
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "generator partition missing");
                    metrics::counter!("recsys_partition_misses_total", "stage" => "retrieval").increment(1);
                    st.missing.push(p);
                    cov.degraded = true;
                }
            }
        }
        cov.stages.push(st);
        let limits = [rc.trending_limit, rc.follows_limit, rc.coengaged_limit];
        let names = ["trending", "follows", "coengaged"];
        let mut merged: KeyMap<Candidate> = KeyMap::default();
        for (g, mut list) in per_gen.into_iter().enumerate() {
            list.sort_unstable_by(|a, b| a.group.cmp(&b.group).then(b.score.total_cmp(&a.score)));
            // The same item may come from two seeds of one generator: keep it once.
            let mut seen = std::collections::HashSet::new();
            list.retain(|c| seen.insert(c.item));
            list.truncate(limits[g]);
            metrics::counter!("recsys_generator_candidates_total", "generator" => names[g])
                .increment(list.len() as u64);
            cov.generator_candidates.push((names[g], list.len() as u32));
            for c in list {
                merged
                    .entry(c.item)
                    .and_modify(|m| {
                        m.source |= c.source;
                        m.score = m.score.max(c.score);
                    })
                    .or_insert(c);
            }
        }
        let mut out: Vec<Candidate> = merged.into_values().collect();
        out.sort_unstable_by_key(|c| c.item);
        out
    }

    /// Looks up item state (deleted, stock, author) in the owning feature partitions.
    async fn briefs(
        &self,
        keys: &[Key],
        wants: BriefWants,
        left: Duration,
        stage: &'static str,
        cov: &mut Coverage,
    ) -> KeyMap<ItemBrief> {
        let parts = self.router.partitions();
        let mut by_part: HashMap<u32, Vec<Key>> = HashMap::new();
        for k in keys {
            by_part.entry(partition_of(ids::ITEM, *k, parts)).or_default().push(*k);
        }
        let asked = by_part.len() as u32;
        let calls = by_part.into_iter().map(|(p, ks)| async move {
            let ks2 = ks.clone();
            (p, ks, self.router.feature(p, left, move |rp| FeatureMsg::Briefs(ks2, wants, rp)).await)
        });
        let mut st = StageCoverage { stage, asked, ..Default::default() };
        let mut out = KeyMap::with_capacity_and_hasher(keys.len(), Default::default());
        for (p, ks, res) in futures::future::join_all(calls).await {
            match res {
                Ok(bs) => {
                    st.answered += 1;
                    out.extend(ks.into_iter().zip(bs).filter_map(|(k, b)| b.map(|b| (k, b))));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "feature partition missing in {stage}");
                    metrics::counter!("recsys_partition_misses_total", "stage" => stage).increment(1);
                    st.missing.push(p);
                    cov.degraded = true;
                }
            }
        }
        cov.stages.push(st);
        out
    }

    async fn filter(
        &self,
        cands: Vec<Candidate>,
        profile: &UserSnapshot,
        left: Duration,
        cov: &mut Coverage,
    ) -> Vec<Candidate> {
        let mut removed = [0u32; 5];
        // Seen: the user's bloom filter, fed by impression events.
        let cands: Vec<Candidate> = match &profile.seen {
            Some(seen) => cands
                .into_iter()
                .filter(|c| {
                    let s = seen.contains(c.item);
                    removed[0] += u32::from(s);
                    !s
                })
                .collect(),
            None => cands,
        };
        let keys: Vec<Key> = cands.iter().map(|c| c.item).collect();
        let briefs = self.briefs(&keys, BriefWants::default(), left, "filtering", cov).await;
        let kept: Vec<Candidate> = cands
            .into_iter()
            .filter(|c| {
                let Some(b) = briefs.get(&c.item) else {
                    // Unverifiable (unknown item or its partition missing): never shown.
                    removed[4] += 1;
                    return false;
                };
                let why = if b.deleted {
                    Some(1)
                } else if !b.in_stock {
                    Some(2)
                } else if profile.blocked.binary_search(&b.author_key).is_ok() {
                    Some(3)
                } else {
                    None
                };
                if let Some(w) = why {
                    removed[w] += 1;
                }
                why.is_none()
            })
            .collect();
        for (name, n) in ["seen", "deleted", "out_of_stock", "blocked_author", "unverified"].into_iter().zip(removed) {
            metrics::counter!("recsys_filter_removed_total", "filter" => name).increment(u64::from(n));
            cov.filter_removed.push((name, n));
        }
        kept
    }

    #[allow(clippy::type_complexity)]
    async fn extract(
        &self,
        cands: &[Candidate],
        profile: &UserSnapshot,
        r: &Request,
        now: i64,
        left: Duration,
        cov: &mut Coverage,
    ) -> (Vec<f32>, Vec<Option<ItemMeta>>, Vec<u32>) {
        let parts = self.router.partitions();
        let plan = &self.plan;
        let mut by_part: HashMap<u32, Vec<usize>> = HashMap::new();
        for (i, c) in cands.iter().enumerate() {
            by_part.entry(partition_of(ids::ITEM, c.item, parts)).or_default().push(i);
        }
        let asked = by_part.len() as u32;
        let user_emb: Arc<[f32]> = Arc::from(profile.embedding.as_slice());
        let calls = by_part.into_iter().map(|(p, idx)| {
            let keys: Vec<Key> = idx.iter().map(|i| cands[*i].item).collect();
            let feats = plan.item_feats.clone();
            let user_emb = user_emb.clone();
            async move {
                let res = self
                    .router
                    .feature(p, left, move |rp| FeatureMsg::ItemFeatures { keys, feats, user_emb, now, reply: rp })
                    .await;
                (p, idx, res)
            }
        });
        let results = futures::future::join_all(calls).await;
        let width = plan.len();
        let n = cands.len();
        let mut rows = vec![0.0f32; n * width];
        let mut metas: Vec<Option<ItemMeta>> = vec![None; n];
        let mut defaulted = vec![0u32; n];
        let mut st = StageCoverage { stage: "features", asked, ..Default::default() };
        let mut item_rows: Vec<Option<(Arc<ItemFeatureRows>, usize)>> = vec![None; n];
        for (p, idx, res) in results {
            match res {
                Ok(mut reply) => {
                    st.answered += 1;
                    // Moved, not cloned: each clone is three atomic increments on shared cache lines.
                    let fetched = std::mem::take(&mut reply.meta);
                    let reply = Arc::new(reply);
                    for ((j, i), m) in idx.into_iter().enumerate().zip(fetched) {
                        if m.is_some() {
                            item_rows[i] = Some((reply.clone(), j));
                        }
                        metas[i] = m;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "feature partition missing");
                    metrics::counter!("recsys_partition_misses_total", "stage" => "features").increment(1);
                    st.missing.push(p);
                    cov.degraded = true;
                }
            }
        }
        cov.stages.push(st);
        // User columns are the same for every candidate: a template row carries them (and every
        // default); item and cross columns are then filled per candidate from short column lists.
        let mut template = plan.defaults.clone();
        let mut user_defaulted = 0u32;
        let mut item_cols: Vec<(usize, usize)> = Vec::new();
        let mut cross_cols: Vec<(usize, CrossFeat)> = Vec::new();
        for (col, kind) in plan.kinds.iter().enumerate() {
            match kind {
                FeatureKind::User(f) => match profile.feature(*f, now) {
                    Some(v) if v.is_finite() => template[col] = v,
                    _ => user_defaulted += 1,
                },
                FeatureKind::Item(_) => item_cols.push((col, plan.item_col[col].unwrap_or(0))),
                FeatureKind::Cross(f) => cross_cols.push((col, *f)),
            }
        }
        let geo = if !r.geo.is_empty() { key_of(&r.geo) } else { key_of(&profile.geo) };
        let mut any_default = false;
        for i in 0..n {
            let row = &mut rows[i * width..(i + 1) * width];
            row.copy_from_slice(&template);
            let mut missing = user_defaulted;
            match &item_rows[i] {
                Some((rep, j)) => {
                    let values = &rep.values[j * rep.stride..(j + 1) * rep.stride];
                    for &(col, k) in &item_cols {
                        match values[k] {
                            v if v.is_finite() => row[col] = v,
                            _ => missing += 1,
                        }
                    }
                }
                None => missing += item_cols.len() as u32,
            }
            for &(col, f) in &cross_cols {
                match cross(f, &cands[i], metas[i].as_ref(), profile, geo) {
                    Some(v) if v.is_finite() => row[col] = v,
                    _ => missing += 1,
                }
            }
            defaulted[i] = missing;
            any_default |= metas[i].is_none();
        }
        if any_default {
            cov.fallback("feature_defaults");
        }
        (rows, metas, defaulted)
    }

    #[allow(clippy::too_many_arguments)]
    async fn score(
        &self,
        scorers: &ScorerPool,
        cands: &[Candidate],
        rows: &[f32],
        metas: &[Option<ItemMeta>],
        defaulted: &[u32],
        left: Duration,
        cov: &mut Coverage,
    ) -> Vec<Pending> {
        let width = self.plan.len();
        let n = cands.len();
        let make = |i: usize, score: f32, stage1: f32, heads: Vec<f32>, by: &'static str| -> Option<Pending> {
            metas[i].as_ref()?;
            Some(Pending {
                row: i,
                key: cands[i].item,
                score,
                sources: cands[i].source,
                stage1,
                heads,
                scored_by: by,
                defaulted: defaulted[i],
            })
        };
        let deadline = Instant::now() + left;
        let heuristic = |i: usize| -> f32 {
            // Popularity × freshness from the candidate's own signals.
            let m = metas[i].as_ref();
            let age_h = m.map(|m| ((now_secs() - m.created_at).max(0) as f32) / 3600.0).unwrap_or(1000.0);
            (1.0 + cands[i].score.max(0.0)).ln() / (1.0 + age_h / 24.0)
        };
        let Some(manifest) = scorers.manifest.clone() else {
            cov.fallback("heuristic_scores");
            return (0..n).filter_map(|i| make(i, heuristic(i), 0.0, vec![], "heuristic")).collect();
        };
        let mut present: Vec<usize> = (0..n).filter(|i| metas[*i].is_some()).collect();
        if !manifest.stage1_order.is_empty() {
            // Same scores in any order; sorted rows run faster (see ModelSpec::batch_order).
            let key = |i: usize, c: usize| rows[i * width + c];
            present.sort_unstable_by(|&a, &b| {
                manifest
                    .stage1_order
                    .iter()
                    .map(|&c| key(a, c).total_cmp(&key(b, c)))
                    .find(|o| o.is_ne())
                    .unwrap_or(a.cmp(&b))
            });
        }
        let gather = |idx: &[usize], cols: &[usize]| -> Vec<f32> {
            let mut m = Vec::with_capacity(idx.len() * cols.len());
            for &i in idx {
                let row = &rows[i * width..(i + 1) * width];
                m.extend(cols.iter().map(|c| row[*c]));
            }
            m
        };
        if present.is_empty() {
            return vec![];
        }
        let m1 = gather(&present, &manifest.stage1_columns);
        let s1 = scorers.score(Stage::Light, present.len(), manifest.stage1_columns.len(), m1, left).await;
        let s1 = match s1 {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "stage 1 scoring failed; heuristic fallback");
                cov.degraded = true;
                cov.fallback("heuristic_scores");
                return present.iter().filter_map(|&i| make(i, heuristic(i), 0.0, vec![], "heuristic")).collect();
            }
        };
        let mut order: Vec<(usize, f32)> = present.iter().copied().zip(s1).collect();
        order.sort_unstable_by(|a, b| b.1.total_cmp(&a.1));
        order.truncate(self.cfg.scoring.stage2_top_n);
        let top: Vec<usize> = order.iter().map(|(i, _)| *i).collect();
        let m2 = gather(&top, &manifest.stage2_columns);
        let left2 = deadline.saturating_duration_since(Instant::now());
        let heads = &manifest.stage2.heads;
        match scorers.score(Stage::Heavy, top.len(), manifest.stage2_columns.len(), m2, left2).await {
            Ok(h) => {
                let weights: Vec<f32> =
                    heads.iter().map(|n| self.cfg.scoring.value_model.get(n).copied().unwrap_or(0.0)).collect();
                order
                    .iter()
                    .zip(h.chunks(heads.len()))
                    .filter_map(|((i, s1), ph)| {
                        let value: f32 = ph.iter().zip(&weights).map(|(p, w)| p * w).sum();
                        make(*i, value, *s1, ph.to_vec(), "value_model")
                    })
                    .collect()
            }
            Err(e) => {
                tracing::warn!(error = %e, "stage 2 scoring failed; stage-1 scores kept");
                cov.degraded = true;
                cov.fallback("stage1_only");
                order.iter().filter_map(|(i, s1)| make(*i, *s1, *s1, vec![], "stage1")).collect()
            }
        }
    }

    async fn rank(
        &self,
        scored: Vec<Pending>,
        rows: &[f32],
        left: Duration,
        cov: &mut Coverage,
    ) -> (Vec<Scored>, bool, Vec<Vec<f32>>) {
        let width = self.plan.len();
        let mut scored = scored;
        scored.sort_by(|a, b| b.score.total_cmp(&a.score));
        scored.truncate(self.cfg.serving.ranked_list_len);
        // Final re-filter: item state may have changed while the request ran (deleted, sold out).
        // The same lookup brings the ids and author names, for the ranked list only.
        let keys: Vec<Key> = scored.iter().map(|p| p.key).collect();
        let wants = BriefWants { embedding: false, names: true };
        let mut briefs = self.briefs(&keys, wants, left, "final_refilter", cov).await;
        let mut removed = 0u32;
        let mut row_of: HashMap<Arc<str>, usize> = HashMap::with_capacity(scored.len());
        let mut kept: Vec<Scored> = Vec::with_capacity(scored.len());
        for p in scored {
            let names = briefs.remove(&p.key).filter(|b| !b.deleted && b.in_stock).and_then(|b| b.names);
            let Some((item, author)) = names else {
                removed += 1;
                continue;
            };
            row_of.insert(item.clone(), p.row);
            kept.push(Scored {
                item,
                author,
                score: p.score,
                sources: p.sources,
                stage1: p.stage1,
                heads: p.heads,
                scored_by: p.scored_by,
                defaulted: p.defaulted,
            });
        }
        cov.filter_removed.push(("final_refilter", removed));
        let (ranked, relaxed) = ranking::diversify(kept);
        let kept_rows = ranked
            .iter()
            .map(|s| {
                let i = row_of[&s.item];
                rows[i * width..(i + 1) * width].to_vec()
            })
            .collect();
        (ranked, relaxed, kept_rows)
    }

    fn log_served(&self, list: &RankedList, surface: &str, from: usize, to: usize) {
        let Some(logger) = &self.logger else { return };
        let rows = &list.features;
        let ts = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        for pos in from..to {
            let (Some(s), Some(f)) = (list.items.get(pos), rows.get(pos)) else { continue };
            logger.log(LogLine::Served(ServedRow {
                request_id: list.request_id.clone(),
                user_id: list.user.clone(),
                item_id: s.item.to_string(),
                position: (pos + 1) as u32,
                served_at_ms: ts,
                surface: surface.to_string(),
                stage1_version: list.stage1_version.clone(),
                stage2_version: list.stage2_version.clone(),
                score: s.score,
                stage1_score: s.stage1,
                scored_by: s.scored_by.to_string(),
                sources: s.sources,
                features: f.clone(),
            }));
        }
    }
}

/// A scored candidate before the final re-filter gives it its id and author name.
struct Pending {
    /// Index into the request's candidates and feature rows.
    row: usize,
    key: Key,
    score: f32,
    sources: u8,
    stage1: f32,
    heads: Vec<f32>,
    scored_by: &'static str,
    defaulted: u32,
}

/// The author-spacing rule is reported per page: set when two neighbours on it share an author.
fn page_relaxed(items: &[(u32, Scored)]) -> bool {
    items.windows(2).any(|w| w[0].1.author == w[1].1.author)
}

fn cross(f: CrossFeat, c: &Candidate, m: Option<&ItemMeta>, p: &UserSnapshot, geo: Key) -> Option<f32> {
    let b = |x: bool| if x { 1.0 } else { 0.0 };
    Some(match f {
        CrossFeat::SrcTrending => b(c.source & features::SRC_TRENDING != 0),
        CrossFeat::SrcFollows => b(c.source & features::SRC_FOLLOWS != 0),
        CrossFeat::SrcCoengaged => b(c.source & features::SRC_COENGAGED != 0),
        CrossFeat::NumSources => c.source.count_ones() as f32,
        _ => {
            let m = m?;
            if !p.known {
                return None;
            }
            match f {
                CrossFeat::FollowsAuthor => b(p.follows.binary_search(&m.author_key).is_ok()),
                CrossFeat::TopicAffinity => *p.topic_affinity.get(m.topic as usize)?,
                CrossFeat::AuthorAffinity => p.author_affinity.get(&m.author_key).copied().unwrap_or(0.0),
                CrossFeat::GeoMatch => b(m.geo_key == geo),
                CrossFeat::EmbCosine => m.emb_cosine,
                _ => unreachable!("source features handled above"),
            }
        }
    })
}
