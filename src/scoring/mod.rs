//! Multi-stage scoring through ONNX Runtime. Each scorer is a ractor actor that owns one
//! dedicated OS thread holding its own ort sessions (one per model): inference never runs on the
//! async workers and sessions are never shared behind a lock. All scorer threads pull chunks
//! from one bounded FIFO queue (see `queue`); when it is full the coordinator falls back.
pub mod manifest;
pub mod paths;
mod queue;
pub mod trees;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use ort::session::Session;
use ort::value::TensorRef;
use ractor::{Actor, ActorProcessingErr, ActorRef, SupervisionEvent};
use tokio::sync::oneshot;

pub use manifest::{Manifest, ModelSpec};
use queue::Chunk;
pub use queue::WorkQueue;

#[derive(Debug, thiserror::Error)]
pub enum ScoringError {
    #[error("onnxruntime library: {0}")]
    Runtime(String),
    #[error("model {path}: {message}")]
    Model { path: PathBuf, message: String },
    #[error("manifest {path}: {message}")]
    Manifest { path: PathBuf, message: String },
    #[error("all scorers are busy")]
    Overloaded,
    #[error("scorer failed: {0}")]
    Failed(String),
    #[error("scoring did not finish within its deadline")]
    Timeout,
    #[error("another model reload is in progress")]
    Busy,
}

/// Smallest chunk worth its own model run (an ort run has a fixed cost of tens of microseconds).
const MIN_CHUNK_ROWS: usize = 200;
/// The native engine scores a 1000-row stage-1 batch in well under a millisecond: splitting it
/// over scorers would cost more in hand-offs and cache misses than it saves, so it stays whole
/// up to this size.
const NATIVE_CHUNK_ROWS: usize = 4096;

static ORT_ENV: OnceLock<ort::environment::Environment> = OnceLock::new();

/// Where to look for libonnxruntime: config, `ORT_DYLIB_PATH`, then the copy `scripts/setup.sh` fetched.
pub fn find_runtime(configured: Option<&Path>) -> Option<PathBuf> {
    let mut candidates: Vec<PathBuf> = vec![];
    if let Some(p) = configured {
        candidates.push(p.to_path_buf());
    }
    if let Ok(p) = std::env::var("ORT_DYLIB_PATH") {
        candidates.push(PathBuf::from(p));
    }
    let rel = Path::new(".cache/onnxruntime/libonnxruntime.so.1.32.0");
    candidates.push(rel.to_path_buf());
    if let Ok(exe) = std::env::current_exe() {
        // target/release/recsys → the repository root two levels up.
        for up in exe.ancestors().skip(1).take(4) {
            candidates.push(up.join(rel));
        }
    }
    candidates.into_iter().find(|p| p.is_file())
}

pub fn init_runtime(lib: &Path) -> Result<(), ScoringError> {
    if ORT_ENV.get().is_some() {
        return Ok(());
    }
    let env = ort::init_from(lib)
        .map_err(|e| ScoringError::Runtime(format!("{}: {e}", lib.display())))?
        .with_name("recsys")
        .with_telemetry(false)
        .build()
        .map_err(|e| ScoringError::Runtime(e.to_string()))?;
    let _ = ORT_ENV.set(env);
    Ok(())
}

pub fn load_session(path: &Path) -> Result<Session, ScoringError> {
    let env = ORT_ENV.get().ok_or_else(|| ScoringError::Runtime("not initialised".into()))?;
    let err = |e: String| ScoringError::Model { path: path.to_path_buf(), message: e };
    Session::builder(env)
        .map_err(|e| err(e.to_string()))?
        .with_intra_threads(1)
        .map_err(|e| err(e.to_string()))?
        .with_inter_threads(1)
        .map_err(|e| err(e.to_string()))?
        .commit_from_file(path)
        .map_err(|e| err(e.to_string()))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Light,
    Heavy,
}

impl Stage {
    pub fn name(self) -> &'static str {
        match self {
            Stage::Light => "stage1",
            Stage::Heavy => "stage2",
        }
    }
}

/// One ONNX model in one ort session (a scorer thread's own; benches and tests use it directly).
pub struct LoadedModel {
    session: Session,
    input: String,
    output: String,
    /// Values per row in the output (2 for a binary classifier's probabilities, heads for stage 2).
    width: usize,
    /// Column of the output used (the positive class for stage 1).
    column: Option<usize>,
}

pub fn load_model(dir: &Path, spec: &ModelSpec) -> Result<LoadedModel, ScoringError> {
    let path = dir.join(&spec.file);
    let session = load_session(&path)?;
    let input = session
        .inputs()
        .first()
        .map(|o| o.name().to_string())
        .ok_or_else(|| ScoringError::Model { path: path.clone(), message: "model has no input".into() })?;
    if !session.outputs().iter().any(|o| o.name() == spec.output) {
        let names: Vec<_> = session.outputs().iter().map(|o| o.name().to_string()).collect();
        return Err(ScoringError::Model {
            path,
            message: format!("output `{}` not found (model has {names:?})", spec.output),
        });
    }
    Ok(LoadedModel {
        session,
        input,
        output: spec.output.clone(),
        width: spec.output_width,
        column: spec.output_column,
    })
}

impl LoadedModel {
    pub fn run(&mut self, rows: usize, cols: usize, data: &[f32]) -> Result<Vec<f32>, String> {
        let input = TensorRef::from_array_view(([rows, cols], data)).map_err(|e| e.to_string())?;
        let outputs = self.session.run(ort::inputs![self.input.as_str() => input]).map_err(|e| e.to_string())?;
        let (_, values) = outputs[self.output.as_str()].try_extract_tensor::<f32>().map_err(|e| e.to_string())?;
        if values.len() != rows * self.width {
            return Err(format!("output has {} values, expected {}×{}", values.len(), rows, self.width));
        }
        Ok(match self.column {
            Some(c) => values.chunks(self.width).map(|r| r[c]).collect(),
            None => values.to_vec(),
        })
    }
}

/// Stage 1 as a scorer thread holds it: the shared native ensemble (read-only, one copy per
/// version) or the thread's own ort session.
enum Light {
    Native(Arc<trees::TreeEnsemble>),
    Ort(LoadedModel),
}

/// Tells the scorer's actor when its thread ends without being asked to (a panic), so the
/// supervisor restarts it instead of the pool counting a dead scorer as live.
struct ExitNotice {
    stop: Arc<AtomicBool>,
    actor: ActorRef<ScorerMsg>,
}

impl Drop for ExitNotice {
    fn drop(&mut self) {
        if !self.stop.load(Ordering::Acquire) {
            let _ = self.actor.send_message(ScorerMsg::ThreadExited);
        }
    }
}

/// Lowers this thread's scheduling priority (see `scoring.scorer_nice`). Linux nice values are
/// per thread, so only the scorer thread changes.
fn lower_priority(nice: i32) {
    if nice <= 0 {
        return;
    }
    // SAFETY: gettid has no preconditions; setpriority on our own thread id only changes this thread.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, nice) };
    if rc != 0 {
        tracing::warn!(nice, error = %std::io::Error::last_os_error(), "could not lower the scorer thread's priority");
    }
}

/// Body of a scorer thread: loads its own sessions, then scores chunks from the shared queue
/// until its actor stops.
fn scorer_thread(
    manifest: Arc<Manifest>,
    queue: Arc<WorkQueue>,
    stop: Arc<AtomicBool>,
    actor: ActorRef<ScorerMsg>,
    nice: i32,
    ready: SyncSender<Result<(), String>>,
) {
    let loaded = (|| -> Result<(Light, LoadedModel), ScoringError> {
        let light = match &manifest.stage1_native {
            Some(e) => Light::Native(e.clone()),
            None => Light::Ort(load_model(&manifest.dir, &manifest.stage1)?),
        };
        Ok((light, load_model(&manifest.dir, &manifest.stage2)?))
    })();
    let (mut light, mut heavy) = match loaded {
        Ok(m) => {
            let _ = ready.send(Ok(()));
            m
        }
        Err(e) => {
            let _ = ready.send(Err(e.to_string()));
            return;
        }
    };
    let _notice = ExitNotice { stop: stop.clone(), actor };
    lower_priority(nice);
    while let Some(chunk) = queue.pop(&stop) {
        let started = Instant::now();
        metrics::histogram!("recsys_scoring_queue_wait_seconds").record((started - chunk.enqueued).as_secs_f64());
        if started >= chunk.deadline {
            // The caller has already timed out: scoring it would only delay the chunks behind it.
            metrics::counter!("recsys_scoring_shed_total").increment(1);
            let _ = chunk.reply.send(Err("deadline passed while queued".into()));
            continue;
        }
        let (out, stage, engine) = match (chunk.stage, &mut light) {
            (Stage::Light, Light::Native(e)) => {
                let res = if chunk.cols != e.inputs() {
                    Err(format!("{} columns for a model of {} inputs", chunk.cols, e.inputs()))
                } else {
                    let mut out = Vec::with_capacity(chunk.rows.len());
                    e.predict(chunk.matrix(), &mut out).map(|_| out).map_err(|e| e.to_string())
                };
                (res, "stage1", "native")
            }
            (Stage::Light, Light::Ort(m)) => (m.run(chunk.rows.len(), chunk.cols, chunk.matrix()), "stage1", "ort"),
            (Stage::Heavy, _) => (heavy.run(chunk.rows.len(), chunk.cols, chunk.matrix()), "stage2", "ort"),
        };
        metrics::histogram!("recsys_model_run_seconds", "model" => stage, "engine" => engine)
            .record(started.elapsed().as_secs_f64());
        let _ = chunk.reply.send(out);
    }
}

pub enum ScorerMsg {
    /// The scorer's thread ended on its own: fail the actor so the supervisor restarts it.
    ThreadExited,
    Crash,
}

pub struct ScorerArgs {
    pub manifest: Arc<Manifest>,
    pub queue: Arc<WorkQueue>,
    pub index: usize,
    pub nice: i32,
}

/// Dropping the state (actor stopped or failed) retires the thread after its current chunk.
pub struct ScorerState {
    stop: Arc<AtomicBool>,
    queue: Arc<WorkQueue>,
}

impl Drop for ScorerState {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        self.queue.wake_all();
    }
}

pub struct Scorer;

impl Actor for Scorer {
    type Msg = ScorerMsg;
    type State = ScorerState;
    type Arguments = ScorerArgs;

    async fn pre_start(&self, me: ActorRef<ScorerMsg>, args: ScorerArgs) -> Result<ScorerState, ActorProcessingErr> {
        let (ready_tx, ready_rx) = sync_channel(1);
        let stop = Arc::new(AtomicBool::new(false));
        let (manifest, queue, flag, nice) = (args.manifest.clone(), args.queue.clone(), stop.clone(), args.nice);
        std::thread::Builder::new()
            .name(format!("scorer-{}", args.index))
            .spawn(move || scorer_thread(manifest, queue, flag, me, nice, ready_tx))?;
        let state = ScorerState { stop, queue: args.queue };
        // Waiting for session creation is blocking: do it off the async workers.
        match tokio::task::spawn_blocking(move || ready_rx.recv()).await? {
            Ok(Ok(())) => Ok(state),
            Ok(Err(e)) => Err(e.into()),
            Err(_) => Err("scorer thread exited during start".into()),
        }
    }

    async fn handle(
        &self,
        _me: ActorRef<ScorerMsg>,
        msg: ScorerMsg,
        _st: &mut ScorerState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            ScorerMsg::ThreadExited => Err("scorer thread exited".into()),
            ScorerMsg::Crash => panic!("crash requested for a supervision test"),
        }
    }
}

/// The node's scorers, their shared queue and the loaded manifest. Empty when no model is
/// deployed (heuristic scoring).
pub struct ScorerPool {
    pub manifest: Option<Arc<Manifest>>,
    scorers: std::sync::RwLock<Vec<Option<ActorRef<ScorerMsg>>>>,
    queue: Arc<WorkQueue>,
    nice: i32,
    /// Set by `start`: dropping the pool (the last request on a replaced model version finished)
    /// stops its supervisor and scorers.
    supervisor: OnceLock<ActorRef<()>>,
}

impl ScorerPool {
    pub fn empty() -> Self {
        Self {
            manifest: None,
            scorers: Default::default(),
            queue: Arc::new(WorkQueue::new(1)),
            nice: 0,
            supervisor: OnceLock::new(),
        }
    }

    /// `n` scorers sharing one queue of at most `n × queue_per_scorer` chunks.
    pub fn new(manifest: Arc<Manifest>, n: usize, queue_per_scorer: usize) -> Self {
        Self {
            manifest: Some(manifest),
            scorers: std::sync::RwLock::new(vec![None; n]),
            queue: Arc::new(WorkQueue::new(n * queue_per_scorer)),
            nice: 0,
            supervisor: OnceLock::new(),
        }
    }

    /// Starts the scorers under their supervisor (each loads its own sessions). An ONNX file ort
    /// cannot load fails here, before the pool serves anything.
    pub async fn start(self) -> Result<Arc<Self>, ScoringError> {
        let pool = Arc::new(self);
        if pool.manifest.is_none() {
            return Ok(pool);
        }
        let (sup, _) = Actor::spawn(None, ScorerSupervisor, pool.clone())
            .await
            .map_err(|e| ScoringError::Failed(format!("scorers did not start: {}", startup_cause(&e.to_string()))))?;
        let _ = pool.supervisor.set(sup);
        Ok(pool)
    }

    /// Stops the supervisor first (so nothing is restarted), then every scorer.
    pub fn stop(&self) {
        if let Some(sup) = self.supervisor.get() {
            sup.stop(None);
        }
        for a in self.scorers.read().unwrap_or_else(|p| p.into_inner()).iter().flatten() {
            a.stop(None);
        }
    }

    /// Scorer threads started from now on run at this nice value.
    pub fn with_nice(mut self, nice: i32) -> Self {
        self.nice = nice;
        self
    }

    pub fn len(&self) -> usize {
        self.scorers.read().expect("scorer lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn set(&self, i: usize, a: Option<ActorRef<ScorerMsg>>) {
        self.scorers.write().expect("scorer lock")[i] = a;
    }

    /// Scorer `i`'s actor (None while it restarts or when there is no such scorer).
    pub fn actor(&self, i: usize) -> Option<ActorRef<ScorerMsg>> {
        self.scorers.read().expect("scorer lock").get(i).cloned().flatten()
    }

    pub fn live(&self) -> usize {
        self.scorers.read().expect("scorer lock").iter().filter(|a| a.is_some()).count()
    }

    /// Scores `rows × cols` (row-major, manifest column order) and returns the outputs in row
    /// order. Batches of at least `2 × MIN_CHUNK_ROWS` rows are cut into one chunk per live scorer.
    pub async fn score(
        &self,
        stage: Stage,
        rows: usize,
        cols: usize,
        data: Vec<f32>,
        timeout: Duration,
    ) -> Result<Vec<f32>, ScoringError> {
        self.score_in(stage, rows, cols, data, timeout, usize::MAX).await
    }

    /// `score` cut into at most `max_parts` chunks.
    pub async fn score_in(
        &self,
        stage: Stage,
        rows: usize,
        cols: usize,
        data: Vec<f32>,
        timeout: Duration,
        max_parts: usize,
    ) -> Result<Vec<f32>, ScoringError> {
        if self.manifest.is_none() {
            return Err(ScoringError::Failed("no model deployed".into()));
        }
        let live = self.live();
        if live == 0 {
            return Err(ScoringError::Failed("no scorer is running".into()));
        }
        if data.len() != rows * cols {
            return Err(ScoringError::Failed(format!("{} values for {rows}×{cols}", data.len())));
        }
        let native = stage == Stage::Light && self.manifest.as_ref().is_some_and(|m| m.stage1_native.is_some());
        let min_rows = if native { NATIVE_CHUNK_ROWS } else { MIN_CHUNK_ROWS };
        let parts = (rows / min_rows).clamp(1, live.min(max_parts).max(1));
        let data = Arc::new(data);
        let now = Instant::now();
        let mut batch = Vec::with_capacity(parts);
        let mut replies = Vec::with_capacity(parts);
        for p in 0..parts {
            let (tx, rx) = oneshot::channel();
            batch.push(Chunk {
                stage,
                cols,
                data: data.clone(),
                rows: rows * p / parts..rows * (p + 1) / parts,
                deadline: now + timeout,
                enqueued: now,
                reply: tx,
            });
            replies.push(rx);
        }
        if !self.queue.push_all(batch, stage == Stage::Heavy) {
            return Err(ScoringError::Overloaded);
        }
        let gather = async {
            let mut out = Vec::new();
            for rx in replies {
                match rx.await {
                    Ok(Ok(v)) => out.extend(v),
                    Ok(Err(e)) => return Err(ScoringError::Failed(e)),
                    Err(_) => return Err(ScoringError::Failed("scorer dropped the job".into())),
                }
            }
            Ok(out)
        };
        tokio::time::timeout(timeout, gather).await.unwrap_or(Err(ScoringError::Timeout))
    }
}

/// ractor wraps a failed child start in one "Actor panicked during startup '…'" per supervision
/// level; the operator needs only the innermost reason (the ort error).
fn startup_cause(msg: &str) -> &str {
    let mut m = msg;
    while let Some(rest) = m.strip_prefix("Actor panicked during startup '") {
        m = rest.strip_suffix('\'').unwrap_or(rest);
    }
    m
}

impl Drop for ScorerPool {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The deployed model version. A reload builds a whole new pool (manifest checked against the
/// declared features, sessions loaded by new scorer threads, a canary row scored) and only then
/// swaps it in; any failure leaves the serving version untouched. Requests hold the pool they
/// started with, so the old version finishes its in-flight work and stops when the last one drops it.
pub struct Models {
    current: std::sync::RwLock<Arc<ScorerPool>>,
    /// Set while a reload runs; a second one is refused rather than queued (no lock across awaits).
    reloading: AtomicBool,
    scorers: usize,
    queue_per_scorer: usize,
    nice: i32,
    /// Configured libonnxruntime, for a node that started without a model.
    runtime: Option<PathBuf>,
    /// Stage-1 engine every version is deployed with.
    engine: crate::config::Stage1Engine,
}

impl Models {
    pub fn new(pool: Arc<ScorerPool>, scorers: usize, queue_per_scorer: usize, nice: i32) -> Self {
        Self {
            current: std::sync::RwLock::new(pool),
            reloading: Default::default(),
            scorers,
            queue_per_scorer,
            nice,
            runtime: None,
            engine: Default::default(),
        }
    }

    pub fn with_engine(mut self, engine: crate::config::Stage1Engine) -> Self {
        self.engine = engine;
        self
    }

    pub fn with_runtime(mut self, lib: Option<PathBuf>) -> Self {
        self.runtime = lib;
        self
    }

    /// A fixed pool (tests, benches); `reload` still works with one scorer.
    pub fn fixed(pool: Arc<ScorerPool>) -> Self {
        Self::new(pool, 1, 8, 0)
    }

    pub fn current(&self) -> Arc<ScorerPool> {
        self.current.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Deploys the version in `dir`; returns (previous version, new version).
    pub async fn reload(
        &self,
        dir: &Path,
        plan: &Arc<crate::features::FeaturePlan>,
    ) -> Result<(Option<String>, String), ScoringError> {
        if self.reloading.swap(true, Ordering::AcqRel) {
            return Err(ScoringError::Busy);
        }
        let _done = ReloadGuard(&self.reloading);
        let manifest = {
            let (dir, plan, runtime, engine) = (dir.to_path_buf(), plan.clone(), self.runtime.clone(), self.engine);
            tokio::task::spawn_blocking(move || {
                let m = Manifest::load(&dir, &plan)?.with_engine(engine)?;
                if ORT_ENV.get().is_none() {
                    let lib = find_runtime(runtime.as_deref()).ok_or_else(|| {
                        ScoringError::Runtime("libonnxruntime not found; run scripts/setup.sh".into())
                    })?;
                    init_runtime(&lib)?;
                }
                Ok::<_, ScoringError>(m)
            })
            .await
            .map_err(|e| ScoringError::Failed(e.to_string()))??
        };
        let manifest = Arc::new(manifest);
        let version = manifest.version.clone();
        let pool =
            ScorerPool::new(manifest.clone(), self.scorers, self.queue_per_scorer).with_nice(self.nice).start().await?;
        // Canary: one row of declared defaults through both stages must give finite outputs of the
        // declared width (catches a model whose shapes disagree with its manifest).
        let canary = |cols: &[usize]| cols.iter().map(|c| plan.defaults[*c]).collect::<Vec<f32>>();
        let checks = [
            (Stage::Light, canary(&manifest.stage1_columns), 1),
            (Stage::Heavy, canary(&manifest.stage2_columns), manifest.stage2.output_width),
        ];
        for (stage, row, width) in checks {
            let cols = row.len();
            let out = pool.score(stage, 1, cols, row, Duration::from_secs(5)).await.map_err(|e| {
                ScoringError::Model { path: dir.to_path_buf(), message: format!("canary row through {stage:?}: {e}") }
            })?;
            if out.len() != width || !out.iter().all(|v| v.is_finite()) {
                return Err(ScoringError::Model {
                    path: dir.to_path_buf(),
                    message: format!("canary row through {stage:?}: expected {width} finite values, got {out:?}"),
                });
            }
        }
        let old = std::mem::replace(&mut *self.current.write().unwrap_or_else(|p| p.into_inner()), pool);
        let previous = old.manifest.as_ref().map(|m| m.version.clone());
        tracing::info!(from = ?previous, to = %version, stage1_engine = manifest.stage1_engine(), "model version deployed");
        Ok((previous, version))
    }

    /// Stops the serving version's scorers (node shutdown).
    pub fn stop(&self) {
        self.current().stop();
    }
}

struct ReloadGuard<'a>(&'a AtomicBool);
impl Drop for ReloadGuard<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// Restarts failed scorers (new thread, new sessions); the pool skips a scorer while it restarts.
pub struct ScorerSupervisor;

pub struct ScorerSupervisorState {
    /// Weak: the pool owns the supervisor, not the other way round (see `ScorerPool::drop`).
    pool: std::sync::Weak<ScorerPool>,
    children: std::collections::HashMap<ractor::ActorId, usize>,
    manifest: Arc<Manifest>,
}

impl Actor for ScorerSupervisor {
    type Msg = ();
    type State = ScorerSupervisorState;
    type Arguments = Arc<ScorerPool>;

    async fn pre_start(&self, me: ActorRef<()>, pool: Arc<ScorerPool>) -> Result<Self::State, ActorProcessingErr> {
        let manifest = pool.manifest.clone().ok_or("scorer supervisor without a model")?;
        let mut children = std::collections::HashMap::new();
        for i in 0..pool.len() {
            let args = ScorerArgs { manifest: manifest.clone(), queue: pool.queue.clone(), index: i, nice: pool.nice };
            let (a, _) = Actor::spawn_linked(None, Scorer, args, me.get_cell()).await?;
            children.insert(a.get_id(), i);
            pool.set(i, Some(a));
        }
        Ok(ScorerSupervisorState { pool: Arc::downgrade(&pool), children, manifest })
    }

    async fn handle_supervisor_evt(
        &self,
        me: ActorRef<()>,
        ev: SupervisionEvent,
        st: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        // Only failures restart: a clean stop is the node shutting down.
        if let Some((cell, _)) = crate::supervision::failure(ev) {
            let Some(pool) = st.pool.upgrade() else { return Ok(()) };
            if let Some(i) = st.children.remove(&cell.get_id()) {
                tracing::warn!(scorer = i, "scorer failed; restarting");
                metrics::counter!("recsys_actor_restarts_total", "role" => "scorer").increment(1);
                pool.set(i, None);
                let args =
                    ScorerArgs { manifest: st.manifest.clone(), queue: pool.queue.clone(), index: i, nice: pool.nice };
                let (a, _) = Actor::spawn_linked(None, Scorer, args, me.get_cell()).await?;
                st.children.insert(a.get_id(), i);
                pool.set(i, Some(a));
            }
        }
        Ok(())
    }
}
