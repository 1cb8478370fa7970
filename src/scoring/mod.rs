//! Multi-stage scoring through ONNX Runtime. Each scorer is a ractor actor that owns one
//! dedicated OS thread holding its own ort sessions (one per model): inference never runs on the
//! async workers and sessions are never shared behind a lock. Queues are bounded; a full scorer
//! is skipped, and when none can take the job the coordinator falls back.
pub mod manifest;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use ort::session::Session;
use ort::value::TensorRef;
use ractor::{Actor, ActorProcessingErr, ActorRef, SupervisionEvent};
use tokio::sync::oneshot;

pub use manifest::{Manifest, ModelSpec};

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
}

/// Batches at least this large are split across two scorers.
const SPLIT_ROWS: usize = 400;

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

/// A batch to score: `rows × cols` row-major, columns in the model's manifest order.
pub struct ScoreJob {
    pub stage: Stage,
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f32>,
    pub reply: oneshot::Sender<Result<Vec<f32>, String>>,
}

struct LoadedModel {
    session: Session,
    input: String,
    output: String,
    /// Values per row in the output (2 for a binary classifier's probabilities, heads for stage 2).
    width: usize,
    /// Column of the output used (the positive class for stage 1).
    column: Option<usize>,
}

fn load_model(dir: &Path, spec: &ModelSpec) -> Result<LoadedModel, ScoringError> {
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
    fn run(&mut self, rows: usize, cols: usize, data: &[f32]) -> Result<Vec<f32>, String> {
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

/// Body of a scorer thread: loads its own sessions, then serves jobs until its queue closes.
fn scorer_thread(manifest: Arc<Manifest>, jobs: Receiver<ScoreJob>, ready: SyncSender<Result<(), String>>) {
    let loaded = (|| -> Result<(LoadedModel, LoadedModel), ScoringError> {
        Ok((load_model(&manifest.dir, &manifest.stage1)?, load_model(&manifest.dir, &manifest.stage2)?))
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
    while let Ok(job) = jobs.recv() {
        let model = match job.stage {
            Stage::Light => &mut light,
            Stage::Heavy => &mut heavy,
        };
        let started = std::time::Instant::now();
        let out = model.run(job.rows, job.cols, &job.data);
        let stage = if job.stage == Stage::Light { "stage1" } else { "stage2" };
        metrics::histogram!("recsys_model_run_seconds", "model" => stage).record(started.elapsed().as_secs_f64());
        let _ = job.reply.send(out);
    }
}

pub enum ScorerMsg {
    Submit(ScoreJob),
    Crash,
}

pub struct ScorerArgs {
    pub manifest: Arc<Manifest>,
    pub queue: usize,
    pub index: usize,
}

pub struct ScorerState {
    jobs: SyncSender<ScoreJob>,
}

pub struct Scorer;

impl Actor for Scorer {
    type Msg = ScorerMsg;
    type State = ScorerState;
    type Arguments = ScorerArgs;

    async fn pre_start(&self, _me: ActorRef<ScorerMsg>, args: ScorerArgs) -> Result<ScorerState, ActorProcessingErr> {
        let (tx, rx) = sync_channel(args.queue.max(1));
        let (ready_tx, ready_rx) = sync_channel(1);
        let manifest = args.manifest.clone();
        std::thread::Builder::new()
            .name(format!("scorer-{}", args.index))
            .spawn(move || scorer_thread(manifest, rx, ready_tx))?;
        // Waiting for session creation is blocking: do it off the async workers.
        let ready = tokio::task::spawn_blocking(move || ready_rx.recv()).await?;
        match ready {
            Ok(Ok(())) => Ok(ScorerState { jobs: tx }),
            Ok(Err(e)) => Err(e.into()),
            Err(_) => Err("scorer thread exited during start".into()),
        }
    }

    async fn handle(
        &self,
        _me: ActorRef<ScorerMsg>,
        msg: ScorerMsg,
        st: &mut ScorerState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            ScorerMsg::Submit(job) => match st.jobs.try_send(job) {
                Ok(()) => Ok(()),
                Err(TrySendError::Full(job)) => {
                    let _ = job.reply.send(Err("scorer queue full".into()));
                    Ok(())
                }
                Err(TrySendError::Disconnected(job)) => {
                    let _ = job.reply.send(Err("scorer thread is gone".into()));
                    Err("scorer thread is gone".into())
                }
            },
            ScorerMsg::Crash => panic!("crash requested for a supervision test"),
        }
    }
}

/// The node's scorers plus the loaded manifest. Empty when no model is deployed (heuristic scoring).
pub struct ScorerPool {
    pub manifest: Option<Arc<Manifest>>,
    scorers: std::sync::RwLock<Vec<Option<ActorRef<ScorerMsg>>>>,
    next: AtomicUsize,
    inflight: Vec<AtomicUsize>,
    queue: usize,
}

impl ScorerPool {
    pub fn empty() -> Self {
        Self { manifest: None, scorers: Default::default(), next: AtomicUsize::new(0), inflight: vec![], queue: 0 }
    }

    pub fn new(manifest: Arc<Manifest>, n: usize, queue: usize) -> Self {
        Self {
            manifest: Some(manifest),
            scorers: std::sync::RwLock::new(vec![None; n]),
            next: AtomicUsize::new(0),
            inflight: (0..n).map(|_| AtomicUsize::new(0)).collect(),
            queue,
        }
    }

    pub fn len(&self) -> usize {
        self.inflight.len()
    }

    pub fn is_empty(&self) -> bool {
        self.inflight.is_empty()
    }

    pub fn set(&self, i: usize, a: Option<ActorRef<ScorerMsg>>) {
        self.scorers.write().expect("scorer lock")[i] = a;
    }

    pub fn live(&self) -> usize {
        self.scorers.read().expect("scorer lock").iter().filter(|a| a.is_some()).count()
    }

    /// Large batches are cut in two and scored on two scorers at once when at least two are idle
    /// (halving the stage's wall time at low load); under load, or for small batches, one scorer
    /// takes the whole batch so the split never costs queue slots other requests need.
    pub async fn score_split(
        &self,
        stage: Stage,
        rows: usize,
        cols: usize,
        data: Vec<f32>,
        timeout: Duration,
    ) -> Result<Vec<f32>, ScoringError> {
        let idle = self.inflight.iter().filter(|n| n.load(Ordering::Relaxed) == 0).count();
        if rows < SPLIT_ROWS || idle < 2 || self.live() < 2 {
            return self.score(stage, rows, cols, data, timeout).await;
        }
        let half = rows / 2;
        let mut first = data;
        let second = first.split_off(half * cols);
        let (a, b) = tokio::join!(
            self.score(stage, half, cols, first, timeout),
            self.score(stage, rows - half, cols, second, timeout)
        );
        let mut a = a?;
        a.extend(b?);
        Ok(a)
    }

    /// Scores on the least-busy live scorer with queue room; the deadline bounds the wait.
    pub async fn score(
        &self,
        stage: Stage,
        rows: usize,
        cols: usize,
        data: Vec<f32>,
        timeout: Duration,
    ) -> Result<Vec<f32>, ScoringError> {
        let n = self.inflight.len();
        if n == 0 {
            return Err(ScoringError::Failed("no model deployed".into()));
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let pick = (0..n)
            .map(|o| (start + o) % n)
            .filter(|i| self.inflight[*i].load(Ordering::Relaxed) < self.queue)
            .min_by_key(|i| self.inflight[*i].load(Ordering::Relaxed));
        let Some(i) = pick else { return Err(ScoringError::Overloaded) };
        let actor = self.scorers.read().expect("scorer lock")[i].clone();
        let Some(actor) = actor else { return Err(ScoringError::Failed(format!("scorer {i} is restarting"))) };
        let (tx, rx) = oneshot::channel();
        self.inflight[i].fetch_add(1, Ordering::Relaxed);
        let _guard = InflightGuard(&self.inflight[i]);
        actor
            .send_message(ScorerMsg::Submit(ScoreJob { stage, rows, cols, data, reply: tx }))
            .map_err(|e| ScoringError::Failed(e.to_string()))?;
        match tokio::time::timeout(timeout, rx).await {
            Err(_) => Err(ScoringError::Timeout),
            Ok(Err(_)) => Err(ScoringError::Failed("scorer dropped the job".into())),
            Ok(Ok(r)) => r.map_err(ScoringError::Failed),
        }
    }
}

struct InflightGuard<'a>(&'a AtomicUsize);
impl Drop for InflightGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Restarts failed scorers (new thread, new sessions); the pool skips a scorer while it restarts.
pub struct ScorerSupervisor;

pub struct ScorerSupervisorState {
    pool: Arc<ScorerPool>,
    children: std::collections::HashMap<ractor::ActorId, usize>,
    manifest: Arc<Manifest>,
    queue: usize,
}

impl Actor for ScorerSupervisor {
    type Msg = ();
    type State = ScorerSupervisorState;
    type Arguments = Arc<ScorerPool>;

    async fn pre_start(&self, me: ActorRef<()>, pool: Arc<ScorerPool>) -> Result<Self::State, ActorProcessingErr> {
        let manifest = pool.manifest.clone().ok_or("scorer supervisor without a model")?;
        let mut children = std::collections::HashMap::new();
        for i in 0..pool.len() {
            let args = ScorerArgs { manifest: manifest.clone(), queue: pool.queue, index: i };
            let (a, _) = Actor::spawn_linked(None, Scorer, args, me.get_cell()).await?;
            children.insert(a.get_id(), i);
            pool.set(i, Some(a));
        }
        let queue = pool.queue;
        Ok(ScorerSupervisorState { pool, children, manifest, queue })
    }

    async fn handle_supervisor_evt(
        &self,
        me: ActorRef<()>,
        ev: SupervisionEvent,
        st: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        // Only failures restart: a clean stop is the node shutting down.
        if let SupervisionEvent::ActorFailed(cell, _) = ev {
            if let Some(i) = st.children.remove(&cell.get_id()) {
                tracing::warn!(scorer = i, "scorer failed; restarting");
                metrics::counter!("recsys_actor_restarts_total", "role" => "scorer").increment(1);
                st.pool.set(i, None);
                let args = ScorerArgs { manifest: st.manifest.clone(), queue: st.queue, index: i };
                let (a, _) = Actor::spawn_linked(None, Scorer, args, me.get_cell()).await?;
                st.children.insert(a.get_id(), i);
                st.pool.set(i, Some(a));
            }
        }
        Ok(())
    }
}
