//! `recsys node`: lock the data dir, serve health (NOT_SERVING) at once, replay sled into the
//! partition actors, load the models into the scorers, then flip to SERVING. SIGTERM drains.
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use ractor::{Actor, ActorProcessingErr, ActorRef, SupervisionEvent};

use crate::api::admin::{AdminService, AdminState};
use crate::api::ingest::IngestService;
use crate::api::pb;
use crate::api::recommender::RecommenderService;
use crate::cluster::{Member, MemberState, Ring, Role, Router};
use crate::config::Config;
use crate::features::shard::{FeatureShard, FeatureShardArgs, FeatureShardState};
use crate::features::FeaturePlan;
use crate::generators::{GeneratorArgs, GeneratorShard, GeneratorState};
use crate::ingest::{self, Writer};
use crate::logging::FeatureLogger;
use crate::pipeline::Pipeline;
use crate::ranking::PageCache;
use crate::scoring::{self, Manifest, Models, ScorerPool};
use crate::store::Store;

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("data dir {0} is locked by another recsys process")]
    Locked(PathBuf),
    #[error("{0}")]
    Startup(String),
}

type FeatureLoader = Arc<dyn Fn(u32) -> FeatureShardState + Send + Sync>;
type GeneratorLoader = Arc<dyn Fn(u32) -> GeneratorState + Send + Sync>;

/// Supervises this node's partition actors: a crashed partition is taken out of the router,
/// rebuilt from sled, and put back.
pub struct PartitionSupervisor;

pub struct PartitionSupervisorArgs {
    pub router: Arc<Router>,
    pub features: Vec<(u32, FeatureShardState)>,
    pub generators: Vec<(u32, GeneratorState)>,
    pub feature_loader: FeatureLoader,
    pub generator_loader: GeneratorLoader,
}

pub struct PartitionSupervisorState {
    router: Arc<Router>,
    /// Children by actor id (not by registered name: names are process-global in ractor).
    children: std::collections::HashMap<ractor::ActorId, (Role, u32)>,
    feature_loader: FeatureLoader,
    generator_loader: GeneratorLoader,
}

impl Actor for PartitionSupervisor {
    type Msg = ();
    type State = PartitionSupervisorState;
    type Arguments = PartitionSupervisorArgs;

    async fn pre_start(
        &self,
        me: ActorRef<()>,
        args: PartitionSupervisorArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let mut children = std::collections::HashMap::new();
        for (p, st) in args.features {
            let a = FeatureShardArgs { partition: p, initial: Some(st), load: args.feature_loader.clone() };
            let (r, _) = Actor::spawn_linked(None, FeatureShard, a, me.get_cell()).await?;
            children.insert(r.get_id(), (Role::Feature, p));
            args.router.set_feature(p, Some(r));
        }
        for (p, st) in args.generators {
            let a = GeneratorArgs { partition: p, initial: Some(st), load: args.generator_loader.clone() };
            let (r, _) = Actor::spawn_linked(None, GeneratorShard, a, me.get_cell()).await?;
            children.insert(r.get_id(), (Role::Generator, p));
            args.router.set_generator(p, Some(r));
        }
        Ok(PartitionSupervisorState {
            router: args.router,
            children,
            feature_loader: args.feature_loader,
            generator_loader: args.generator_loader,
        })
    }

    async fn handle_supervisor_evt(
        &self,
        me: ActorRef<()>,
        ev: SupervisionEvent,
        st: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let SupervisionEvent::ActorFailed(cell, err) = ev else { return Ok(()) };
        let Some((role, p)) = st.children.remove(&cell.get_id()) else { return Ok(()) };
        let role_name = if role == Role::Feature { "feature" } else { "generator" };
        tracing::warn!(role = role_name, partition = p, error = %err, "partition actor failed; reloading it from the store");
        metrics::counter!("recsys_actor_restarts_total", "role" => role_name).increment(1);
        let id = if role == Role::Feature {
            st.router.set_feature(p, None);
            let a = FeatureShardArgs { partition: p, initial: None, load: st.feature_loader.clone() };
            let (r, _) = Actor::spawn_linked(None, FeatureShard, a, me.get_cell()).await?;
            let id = r.get_id();
            st.router.set_feature(p, Some(r));
            id
        } else {
            st.router.set_generator(p, None);
            let a = GeneratorArgs { partition: p, initial: None, load: st.generator_loader.clone() };
            let (r, _) = Actor::spawn_linked(None, GeneratorShard, a, me.get_cell()).await?;
            let id = r.get_id();
            st.router.set_generator(p, Some(r));
            id
        };
        st.children.insert(id, (role, p));
        Ok(())
    }
}

pub struct NodeHandles {
    pub pipeline: Arc<OnceLock<Arc<Pipeline>>>,
    pub writer: Arc<OnceLock<Arc<Writer>>>,
    pub admin: Arc<OnceLock<Arc<AdminState>>>,
    pub logger: Arc<OnceLock<FeatureLogger>>,
}

pub async fn run(cfg: Config) -> Result<(), NodeError> {
    let cfg = Arc::new(cfg);
    let err = |m: String| NodeError::Startup(m);
    let plan = Arc::new(FeaturePlan::new(&cfg.features, cfg.ingest.embedding_dim).map_err(|e| err(e.to_string()))?);

    std::fs::create_dir_all(&cfg.node.data_dir)
        .map_err(|e| err(format!("data dir {}: {e}", cfg.node.data_dir.display())))?;
    let lock_file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(cfg.node.data_dir.join("LOCK"))
        .map_err(|e| err(e.to_string()))?;
    if lock_file.try_lock().is_err() {
        return Err(NodeError::Locked(cfg.node.data_dir.clone()));
    }

    // Models are checked before anything is served: a manifest naming unknown features is refused.
    let models_dir = cfg.scoring.models_dir.clone();
    let manifest = if models_dir.join("manifest.json").is_file() {
        let m = Manifest::load(&models_dir, &plan).map_err(|e| err(format!("refusing to start: {e}")))?;
        let lib = scoring::find_runtime(cfg.scoring.onnxruntime_lib.as_deref()).ok_or_else(|| {
            err("refusing to start: libonnxruntime not found; run scripts/setup.sh or set ORT_DYLIB_PATH".into())
        })?;
        let t = Instant::now();
        tokio::task::spawn_blocking(move || scoring::init_runtime(&lib))
            .await
            .map_err(|e| err(e.to_string()))?
            .map_err(|e| err(e.to_string()))?;
        tracing::info!(version = %m.version, ms = t.elapsed().as_millis() as u64, "onnxruntime ready");
        Some(Arc::new(m))
    } else {
        tracing::warn!(dir = %models_dir.display(), "no models/manifest.json: serving with heuristic scores");
        None
    };

    if let Some(addr) = &cfg.node.metrics_listen {
        let addr: SocketAddr = addr.parse().map_err(|e| err(format!("metrics_listen `{addr}`: {e}")))?;
        crate::metrics::install(Some(addr)).map_err(|e| err(format!("metrics exporter: {e}")))?;
    }

    // Serve health and reflection right away; the recsys services answer UNAVAILABLE until loaded.
    let addr: SocketAddr = cfg.node.listen.parse().map_err(|e| err(format!("listen `{}`: {e}", cfg.node.listen)))?;
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| err(format!("bind {addr}: {e}")))?;
    let local = listener.local_addr().map_err(|e| err(e.to_string()))?;
    let (health, health_service) = tonic_health::server::health_reporter();
    let services = ["", "recsys.v1.Recommender", "recsys.v1.Ingest", "recsys.v1.Admin"];
    for s in services {
        health.set_service_status(s, tonic_health::ServingStatus::NotServing).await;
    }
    let handles = NodeHandles {
        pipeline: Arc::new(OnceLock::new()),
        writer: Arc::new(OnceLock::new()),
        admin: Arc::new(OnceLock::new()),
        logger: Arc::new(OnceLock::new()),
    };
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| err(e.to_string()))?;
    let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
    let max_msg = 64 * 1024 * 1024;
    let server = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .initial_connection_window_size(Some(4 * 1024 * 1024))
        .initial_stream_window_size(Some(2 * 1024 * 1024))
        .add_service(health_service)
        .add_service(reflection)
        .add_service(
            pb::recommender_server::RecommenderServer::new(RecommenderService { pipeline: handles.pipeline.clone() })
                .max_decoding_message_size(max_msg),
        )
        .add_service(
            pb::ingest_server::IngestServer::new(IngestService {
                writer: handles.writer.clone(),
                logger: handles.logger.clone(),
            })
            .max_decoding_message_size(max_msg),
        )
        .add_service(pb::admin_server::AdminServer::new(AdminService { state: handles.admin.clone() }));
    let mut rx = shutdown_rx.clone();
    // Small replies on a persistent connection: without TCP_NODELAY, Nagle + delayed ACK add ~40 ms.
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    let server_task = tokio::spawn(async move {
        server
            .serve_with_incoming_shutdown(incoming, async move {
                let _ = rx.wait_for(|v| *v).await;
            })
            .await
    });
    tracing::info!(%local, node = %cfg.node.node_id, "listening (NOT_SERVING while loading)");
    println!("recsys node {} listening on {local}", cfg.node.node_id);

    // Load: open sled, replay every partition this node owns.
    let t = Instant::now();
    let data_dir = cfg.node.data_dir.clone();
    let cache = cfg.store.cache_capacity_mb;
    let store = tokio::task::spawn_blocking(move || Store::open(&data_dir.join("sled"), cache))
        .await
        .map_err(|e| err(e.to_string()))?
        .map_err(|e| err(e.to_string()))?;
    let members =
        vec![Member { node_id: cfg.node.node_id.clone(), address: local.to_string(), state: MemberState::Serving }];
    let ring = Ring::build(
        1,
        std::slice::from_ref(&cfg.node.node_id),
        cfg.cluster.partitions_per_role,
        cfg.cluster.replication_factor,
        cfg.cluster.virtual_nodes,
    );
    let fparts = ring.partitions_of(Role::Feature, &cfg.node.node_id);
    let gparts = ring.partitions_of(Role::Generator, &cfg.node.node_id);
    let router = Arc::new(Router::new(cfg.node.node_id.clone(), ring));
    let (store2, cfg2, f2, g2) = (store.clone(), cfg.clone(), fparts.clone(), gparts.clone());
    let (mut fstates, mut gstates) = tokio::task::spawn_blocking(move || ingest::replay(&store2, &cfg2, &f2, &g2))
        .await
        .map_err(|e| err(e.to_string()))?
        .map_err(|e| err(format!("replay: {e}")))?;
    let (items, users, events) = {
        let s = store.clone();
        tokio::task::spawn_blocking(move || s.counts()).await.map_err(|e| err(e.to_string()))?
    };
    tracing::info!(items, users, events, ms = t.elapsed().as_millis() as u64, "replayed partitions from sled");
    println!("loaded {items} items, {users} users, {events} events from sled in {} ms", t.elapsed().as_millis());

    let (s3, c3) = (store.clone(), cfg.clone());
    let feature_loader: FeatureLoader = Arc::new(move |p| match ingest::replay(&s3, &c3, &[p], &[]) {
        Ok((mut f, _)) => f.remove(&p).unwrap_or_else(|| FeatureShardState::new(ingest::shard_settings(&c3))),
        Err(e) => {
            tracing::error!(partition = p, error = %e, "reload failed; partition starts empty");
            FeatureShardState::new(ingest::shard_settings(&c3))
        }
    });
    let (s4, c4) = (store.clone(), cfg.clone());
    let generator_loader: GeneratorLoader = Arc::new(move |p| match ingest::replay(&s4, &c4, &[], &[p]) {
        Ok((_, mut g)) => g.remove(&p).unwrap_or_else(|| GeneratorState::new(ingest::generator_settings(&c4))),
        Err(e) => {
            tracing::error!(partition = p, error = %e, "reload failed; partition starts empty");
            GeneratorState::new(ingest::generator_settings(&c4))
        }
    });
    let args = PartitionSupervisorArgs {
        router: router.clone(),
        features: fparts.iter().map(|p| (*p, fstates.remove(p).expect("replayed"))).collect(),
        generators: gparts.iter().map(|p| (*p, gstates.remove(p).expect("replayed"))).collect(),
        feature_loader,
        generator_loader,
    };
    let (partition_sup, _) =
        Actor::spawn(None, PartitionSupervisor, args).await.map_err(|e| err(format!("partition actors: {e}")))?;

    let pool = match &manifest {
        Some(m) => ScorerPool::new(m.clone(), cfg.scoring.scorers, cfg.scoring.queue_per_scorer)
            .with_nice(cfg.scoring.scorer_nice)
            .start()
            .await
            .map_err(|e| err(format!("refusing to start: {e}")))?,
        None => Arc::new(ScorerPool::empty()),
    };
    let models = Arc::new(
        Models::new(pool, cfg.scoring.scorers, cfg.scoring.queue_per_scorer, cfg.scoring.scorer_nice)
            .with_runtime(cfg.scoring.onnxruntime_lib.clone()),
    );

    let logger = FeatureLogger::start(&cfg.node.data_dir.join("logs"), &plan.names)
        .map_err(|e| err(format!("feature log: {e}")))?;
    let _ = handles.logger.set(logger.clone());
    let pipeline = Arc::new(Pipeline {
        cfg: cfg.clone(),
        plan: plan.clone(),
        router: router.clone(),
        models: models.clone(),
        pages: PageCache::new(Duration::from_secs(cfg.serving.page_cache_ttl_secs), cfg.serving.page_cache_capacity),
        logger: Some(logger),
        inflight: tokio::sync::Semaphore::new(cfg.serving.max_in_flight),
    });
    let _ = handles.pipeline.set(pipeline);
    let _ = handles.writer.set(Arc::new(Writer { cfg: cfg.clone(), store: store.clone(), router: router.clone() }));
    let _ = handles.admin.set(Arc::new(AdminState {
        router: router.clone(),
        store: store.clone(),
        members,
        models: models.clone(),
        plan: plan.clone(),
        models_dir: models_dir.clone(),
    }));
    for s in services {
        health.set_service_status(s, tonic_health::ServingStatus::Serving).await;
    }
    tracing::info!(ms = t.elapsed().as_millis() as u64, "SERVING");
    println!("SERVING on {local} (ready in {} ms)", t.elapsed().as_millis());

    wait_for_signal().await;
    tracing::info!("shutting down");
    for s in services {
        health.set_service_status(s, tonic_health::ServingStatus::NotServing).await;
    }
    let _ = shutdown_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(10), server_task).await;
    partition_sup.stop(None);
    models.stop();
    let _ = store.flush().await;
    drop(lock_file);
    println!("stopped");
    Ok(())
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
}
