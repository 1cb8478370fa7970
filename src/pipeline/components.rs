//! The serving stages as lists of components (the shape of X's `candidate_pipeline`): sources
//! (candidate generators), hydrators, filters and scorers, each with a name and an `enable` test
//! on the request. A stage runs the enabled components of its list in order; a component that
//! fails is dropped from this request (its candidates, removals or scores are not used) and
//! counted by name (`recsys_component_failures_total{stage, component}`). Adding a generator or
//! a filter is one file in `sources/` or `filters/` plus its line in that list.
//!
//! Dispatch is per component per request; the per-candidate loops run inside each component,
//! monomorphic (a filter judges a whole batch through `Keep::retain`).
use std::future::Future;
use std::pin::Pin;
use std::time::Instant;

use super::{Coverage, Pipeline, Request};
use crate::config::{Config, RetrievalConfig};
use crate::features::shard::{ItemBrief, UserSnapshot};
use crate::generators::{Candidate, RetrieveQuery};
use crate::scoring::ScorerPool;

pub use super::filters::FILTERS;
pub use super::hydrators::HYDRATORS;
pub use super::scorers::SCORERS;
pub use super::sources::SOURCES;

/// What a component may look at: the request, the user's profile, and what the coordinator
/// decided for the whole request.
pub struct Query<'a> {
    pub request: &'a Request,
    pub profile: &'a UserSnapshot,
    /// The request's geo, else the profile's (empty: unknown).
    pub geo: &'a str,
    pub now: i64,
    pub cfg: &'a Config,
    /// The model version this request scores with (fixed when the request starts).
    pub scorers: &'a ScorerPool,
}

#[derive(Debug, thiserror::Error)]
pub enum ComponentError {
    #[error("{0}")]
    Failed(String),
}

/// Stage names of the failure counter.
pub const STAGE_RETRIEVAL: &str = "retrieval";
pub const STAGE_HYDRATION: &str = "hydration";
pub const STAGE_FILTERING: &str = "filtering";
pub const STAGE_SCORING: &str = "scoring";

/// Counts (and logs) a component dropped from a request.
pub(super) fn failed(stage: &'static str, component: &'static str, e: &ComponentError) {
    tracing::warn!(stage, component, error = %e, "component failed; dropped from this request");
    metrics::counter!("recsys_component_failures_total", "stage" => stage, "component" => component).increment(1);
}

// ---------------------------------------------------------------- sources

/// A candidate generator. Generator partitions hold the indexes; a source says what to ask of
/// which partition (`plan`), and the coordinator asks every node once for all sources together.
pub trait Source: Send + Sync {
    fn name(&self) -> &'static str;
    /// The tag on this source's candidates (`Candidate::source`): one bit per source.
    fn bit(&self) -> u8;
    fn enable(&self, _q: &Query) -> bool {
        true
    }
    /// Candidates kept from this source, best first, after the merge of its partitions' lists.
    fn limit(&self, cfg: &RetrievalConfig) -> usize;
    /// Adds this source's asks to the partitions' queries.
    fn plan(&self, q: &Query, asks: &mut Asks) -> Result<(), ComponentError>;
}

/// The generator partitions' queries of one request, built by the sources.
pub struct Asks {
    pub parts: u32,
    base: RetrieveQuery,
    queries: std::collections::HashMap<u32, RetrieveQuery>,
}

impl Asks {
    pub(super) fn new(parts: u32, base: RetrieveQuery) -> Self {
        Self { parts, base, queries: Default::default() }
    }

    /// The query for generator partition `p` (created on first use).
    pub fn partition(&mut self, p: u32) -> &mut RetrieveQuery {
        self.queries.entry(p).or_insert_with(|| self.base.clone())
    }

    pub(super) fn into_queries(self) -> impl Iterator<Item = (u32, RetrieveQuery)> {
        self.queries.into_iter()
    }
}

/// The names of the sources in `bits`, in list order (the reply's `sources`).
pub fn source_names(bits: u8) -> Vec<String> {
    SOURCES.iter().filter(|s| bits & s.bit() != 0).map(|s| s.name().to_string()).collect()
}

// ---------------------------------------------------------------- hydrators

/// What hydrators fetch for the candidates: item state (for the filters) and item feature rows
/// (for the features stage), by item key.
pub use super::features::Hydrated;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Fetches data about the candidates from the partitions holding it.
pub trait Hydrator: Send + Sync {
    fn name(&self) -> &'static str;
    fn enable(&self, _q: &Query) -> bool {
        true
    }
    fn hydrate<'a>(
        &'a self,
        p: &'a Pipeline,
        q: &'a Query<'a>,
        cands: &'a [Candidate],
        deadline: Instant,
        cov: &'a mut Coverage,
        out: &'a mut Hydrated,
    ) -> BoxFuture<'a, Result<(), ComponentError>>;
}

// ---------------------------------------------------------------- filters

/// A filter judges candidates either before hydration (from the request and profile alone: what
/// it removes is never fetched) or after it, on the candidates' item state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FilterPhase {
    BeforeHydration,
    OnItemState,
}

/// The candidates a filter judges: `briefs[i]` is candidate `i`'s item state (None: not found
/// on any replica); empty before hydration.
pub struct Batch<'a> {
    pub cands: &'a [Candidate],
    pub briefs: &'a [Option<&'a ItemBrief>],
}

pub trait Filter: Send + Sync {
    fn name(&self) -> &'static str;
    fn phase(&self) -> FilterPhase;
    fn enable(&self, _q: &Query) -> bool {
        true
    }
    /// Removes candidates through `keep.retain`; an error drops this filter's removals.
    fn filter(&self, q: &Query, batch: &Batch, keep: &mut Keep) -> Result<(), ComponentError>;
}

/// Which candidates are still in, and what the running filter removed (to count it, or undo it
/// when the filter fails).
#[derive(Default)]
pub struct Keep {
    mask: Vec<bool>,
    removed_now: Vec<u32>,
}

impl Keep {
    pub(super) fn reset(&mut self, n: usize) {
        self.mask.clear();
        self.mask.resize(n, true);
        self.removed_now.clear();
    }

    /// Calls `keep(i)` for every candidate still in; removes those it answers false for.
    pub fn retain(&mut self, mut keep: impl FnMut(usize) -> bool) {
        for (i, m) in self.mask.iter_mut().enumerate() {
            if *m && !keep(i) {
                *m = false;
                self.removed_now.push(i as u32);
            }
        }
    }

    pub(super) fn is_kept(&self, i: usize) -> bool {
        self.mask[i]
    }

    /// Ends one filter's turn: its removals count (Ok) or are undone (Err). Returns the count.
    fn settle(&mut self, ok: bool) -> u32 {
        if !ok {
            for &i in &self.removed_now {
                self.mask[i as usize] = true;
            }
        }
        let n = if ok { self.removed_now.len() as u32 } else { 0 };
        self.removed_now.clear();
        n
    }
}

/// Runs the enabled filters of `phase` over the batch; `removed[f]` adds what filter `f` (index
/// in `FILTERS`) removed.
pub(super) fn run_filters(phase: FilterPhase, q: &Query, batch: &Batch, keep: &mut Keep, removed: &mut [u32]) {
    for (f, filter) in FILTERS.iter().enumerate() {
        if filter.phase() != phase || !filter.enable(q) {
            continue;
        }
        let res = filter.filter(q, batch, keep);
        if let Err(e) = &res {
            failed(STAGE_FILTERING, filter.name(), e);
        }
        removed[f] += keep.settle(res.is_ok());
    }
}

// ---------------------------------------------------------------- scorers

/// A scored candidate before the final re-filter gives it its id and author name.
pub use super::scoring::{Pending, ScoreInput};

/// Scores the candidates. The stage runs the first enabled scorer of the list that succeeds: the
/// models, then a heuristic that needs nothing but the candidates.
pub trait Scorer: Send + Sync {
    fn name(&self) -> &'static str;
    fn enable(&self, _q: &Query) -> bool {
        true
    }
    fn score<'a>(
        &'a self,
        p: &'a Pipeline,
        q: &'a Query<'a>,
        rid: &'a str,
        input: &'a ScoreInput<'a>,
        deadline: Instant,
        cov: &'a mut Coverage,
    ) -> BoxFuture<'a, Result<Vec<Pending>, ComponentError>>;
}

/// Exports the component series at zero from start-up: candidates per source, removals per
/// filter, failures per component.
pub fn register_zero_series() {
    for s in SOURCES {
        metrics::counter!("recsys_generator_candidates_total", "generator" => s.name()).absolute(0);
    }
    for f in FILTERS {
        metrics::counter!("recsys_filter_removed_total", "filter" => f.name()).absolute(0);
    }
    let zero = |stage: &'static str, component: &'static str| {
        metrics::counter!("recsys_component_failures_total", "stage" => stage, "component" => component).absolute(0)
    };
    SOURCES.iter().for_each(|s| zero(STAGE_RETRIEVAL, s.name()));
    HYDRATORS.iter().for_each(|h| zero(STAGE_HYDRATION, h.name()));
    FILTERS.iter().for_each(|f| zero(STAGE_FILTERING, f.name()));
    SCORERS.iter().for_each(|s| zero(STAGE_SCORING, s.name()));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_filter_leaves_every_candidate_it_removed() {
        let mut keep = Keep::default();
        keep.reset(6);
        keep.retain(|i| i != 1);
        assert_eq!(keep.settle(true), 1);
        keep.retain(|i| i % 2 == 1);
        assert_eq!(keep.settle(false), 0, "a failed filter counts nothing");
        assert!((0..6).all(|i| keep.is_kept(i) == (i != 1)), "and its removals are undone");
    }

    #[test]
    fn names_bits_and_zero_series_cover_every_component() {
        let mut bits = 0u8;
        for s in SOURCES {
            assert_eq!(bits & s.bit(), 0, "{}: a bit of its own", s.name());
            bits |= s.bit();
        }
        assert_eq!(source_names(bits).len(), SOURCES.len());
        let mut names: Vec<&str> = FILTERS.iter().map(|f| f.name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), FILTERS.len(), "filter names are unique");
    }
}
