//! `recsys node`: lock the data dir, serve health (NOT_SERVING) and the internal API at once,
//! join the gossip, form (or reload) the ring, replay this node's partitions one at a time from
//! their op logs, catch up with their other replicas, start the scorers, then flip to SERVING.
//! SIGTERM announces `leaving`, drains and stops.
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use ractor::{Actor, ActorProcessingErr, ActorRef, SupervisionEvent};

use crate::api::admin::{AdminService, AdminState};
use crate::api::codes::SpecCodes;
use crate::api::ingest::IngestService;
use crate::api::pb;
use crate::api::recommender::RecommenderService;
use crate::auth::Guard;
use crate::cluster::changes::{Controller, MoveSettings, PartitionCmd};
use crate::cluster::membership::MembershipSettings;
use crate::cluster::metalog::{Entry as MetaEntry, MetaLog};
use crate::cluster::{replication, MemberState, Membership, Part, Ring, RingSpec, Role};
use crate::config::Config;
use crate::features::shard::{FeatureShard, FeatureShardArgs, FeatureShardState};
use crate::features::FeaturePlan;
use crate::generators::{GeneratorArgs, GeneratorShard, GeneratorState};
use crate::ingest::{self, Writer};
use crate::logging::FeatureLogger;
use crate::pipeline::Pipeline;
use crate::ranking::{PageCache, PageTokens};
use crate::scoring::{self, Manifest, Models, ScorerPool};
use crate::store::Store;
use crate::transport::pb as ipb;
use crate::transport::server::InternalService;
use crate::transport::{LocalPartitions, Transport};

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("data dir {0} is locked by another recsys process")]
    Locked(PathBuf),
    #[error("{0}")]
    Startup(String),
}

type FeatureLoader = Arc<dyn Fn(u32) -> FeatureShardState + Send + Sync>;
type GeneratorLoader = Arc<dyn Fn(u32) -> GeneratorState + Send + Sync>;

/// Supervises this node's partition actors: a crashed partition is taken out of service (reads
/// go to its other replicas), rebuilt from its op log, and put back. Partitions are also opened
/// (a move brings one here) and closed (a move took one away) while the node runs.
pub struct PartitionSupervisor;

pub struct PartitionSupervisorArgs {
    pub local: Arc<LocalPartitions>,
    /// Where the partitions log their writes (None: apply only).
    pub store: Option<Store>,
    pub features: Vec<(u32, FeatureShardState)>,
    pub generators: Vec<(u32, GeneratorState)>,
    pub feature_loader: FeatureLoader,
    pub generator_loader: GeneratorLoader,
}

pub struct PartitionSupervisorState {
    local: Arc<LocalPartitions>,
    store: Option<Store>,
    /// Children by actor id (not by registered name: names are process-global in ractor).
    children: std::collections::HashMap<ractor::ActorId, (Role, u32)>,
    feature_loader: FeatureLoader,
    generator_loader: GeneratorLoader,
}

impl PartitionSupervisorState {
    /// Spawns one partition's actor (from `initial`, else from its op log) and installs it.
    async fn spawn(
        &mut self,
        me: &ActorRef<PartitionCmd>,
        role: Role,
        p: u32,
        feature: Option<FeatureShardState>,
        generator: Option<GeneratorState>,
    ) -> Result<(), ActorProcessingErr> {
        let id = if role == Role::Feature {
            let a = FeatureShardArgs {
                partition: p,
                log: self.store.clone(),
                initial: feature,
                load: self.feature_loader.clone(),
            };
            let (r, _) = Actor::spawn_linked(None, FeatureShard, a, me.get_cell()).await?;
            let id = r.get_id();
            self.local.set_feature(p, Some(r));
            id
        } else {
            let a = GeneratorArgs {
                partition: p,
                log: self.store.clone(),
                initial: generator,
                load: self.generator_loader.clone(),
            };
            let (r, _) = Actor::spawn_linked(None, GeneratorShard, a, me.get_cell()).await?;
            let id = r.get_id();
            self.local.set_generator(p, Some(r));
            id
        };
        self.children.insert(id, (role, p));
        Ok(())
    }
}

impl Actor for PartitionSupervisor {
    type Msg = PartitionCmd;
    type State = PartitionSupervisorState;
    type Arguments = PartitionSupervisorArgs;

    async fn pre_start(
        &self,
        me: ActorRef<PartitionCmd>,
        args: PartitionSupervisorArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let mut st = PartitionSupervisorState {
            local: args.local,
            store: args.store,
            children: std::collections::HashMap::new(),
            feature_loader: args.feature_loader,
            generator_loader: args.generator_loader,
        };
        for (p, s) in args.features {
            st.spawn(&me, Role::Feature, p, Some(s), None).await?;
        }
        for (p, s) in args.generators {
            st.spawn(&me, Role::Generator, p, None, Some(s)).await?;
        }
        Ok(st)
    }

    async fn handle(
        &self,
        me: ActorRef<PartitionCmd>,
        msg: PartitionCmd,
        st: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            PartitionCmd::Open(part, reply) => {
                let open = st.local.is_open(part);
                if !open {
                    st.local.set_ready(part, false);
                    st.spawn(&me, part.role, part.partition, None, None).await?;
                    tracing::info!(part = %part, "partition opened here");
                }
                let _ = reply.send(!open);
            }
            PartitionCmd::Close(part, reply) => {
                st.local.set_ready(part, false);
                let actor = match part.role {
                    Role::Feature => st.local.feature_actor(part.partition).map(|a| a.get_cell()),
                    Role::Generator => st.local.generator_actor(part.partition).map(|a| a.get_cell()),
                };
                match part.role {
                    Role::Feature => st.local.set_feature(part.partition, None),
                    Role::Generator => st.local.set_generator(part.partition, None),
                }
                if let Some(cell) = actor {
                    // Forgotten first, so its stop is not taken for a crash to restart; waited
                    // for, so no write it is still applying lands after the log is dropped.
                    st.children.remove(&cell.get_id());
                    let stopped =
                        cell.stop_and_wait(Some("partition moved away".into()), Some(Duration::from_secs(30)));
                    if let Err(e) = stopped.await {
                        tracing::warn!(part = %part, error = %e, "partition actor did not stop in time");
                    }
                }
                if let Some(store) = st.store.clone() {
                    match tokio::task::spawn_blocking(move || store.drop_partition(part)).await {
                        Ok(Ok(n)) => tracing::info!(part = %part, batches = n, "partition dropped here"),
                        Ok(Err(e)) => tracing::warn!(part = %part, error = %e, "dropping the partition's log failed"),
                        Err(e) => tracing::warn!(part = %part, error = %e, "dropping the partition's log failed"),
                    }
                }
                let _ = reply.send(());
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        me: ActorRef<PartitionCmd>,
        ev: SupervisionEvent,
        st: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let Some((cell, err)) = failure(ev) else { return Ok(()) };
        let Some((role, p)) = st.children.remove(&cell.get_id()) else { return Ok(()) };
        tracing::warn!(role = role.as_str(), partition = p, error = %err, "partition actor failed; rebuilding it from its op log");
        metrics::counter!("recsys_actor_restarts_total", "role" => role.as_str()).increment(1);
        // Out of service while it rebuilds: reads go to its replicas, writes to it are refused
        // (and reach it later by hinted handoff or anti-entropy).
        let part = crate::cluster::Part::new(role, p);
        let was_ready = st.local.is_ready(part);
        st.local.set_ready(part, false);
        match role {
            Role::Feature => st.local.set_feature(p, None),
            Role::Generator => st.local.set_generator(p, None),
        }
        st.spawn(&me, role, p, None, None).await?;
        st.local.set_ready(part, was_ready);
        Ok(())
    }
}

/// A child that failed, or was killed (`ActorRef::kill`, as `Admin.InjectFault` does): both are
/// restarted. A child stopped cleanly is the node shutting down.
pub fn failure(ev: SupervisionEvent) -> Option<(ractor::ActorCell, String)> {
    match ev {
        SupervisionEvent::ActorFailed(cell, err) => Some((cell, err.to_string())),
        SupervisionEvent::ActorTerminated(cell, _, Some(reason)) if reason == "killed" => Some((cell, reason)),
        _ => None,
    }
}

/// Loaders that rebuild one partition from the store (supervisor restarts).
pub fn loaders(store: &Store, cfg: &Arc<Config>) -> (FeatureLoader, GeneratorLoader) {
    let (s1, c1) = (store.clone(), cfg.clone());
    let f: FeatureLoader = Arc::new(move |p| {
        ingest::replay_feature(&s1, &c1, p).unwrap_or_else(|e| {
            tracing::error!(partition = p, error = %e, "rebuild failed; partition starts empty");
            FeatureShardState::new(ingest::shard_settings(&c1))
        })
    });
    let (s2, c2) = (store.clone(), cfg.clone());
    let g: GeneratorLoader = Arc::new(move |p| {
        ingest::replay_generator(&s2, &c2, p).unwrap_or_else(|e| {
            tracing::error!(partition = p, error = %e, "rebuild failed; partition starts empty");
            GeneratorState::new(ingest::generator_settings(&c2))
        })
    });
    (f, g)
}

pub struct NodeHandles {
    pub pipeline: Arc<OnceLock<Arc<Pipeline>>>,
    pub writer: Arc<OnceLock<Arc<Writer>>>,
    pub admin: Arc<OnceLock<Arc<AdminState>>>,
    pub logger: Arc<OnceLock<FeatureLogger>>,
    pub transport: Arc<OnceLock<Arc<Transport>>>,
}

async fn resolve(addr: &str, what: &str) -> Result<SocketAddr, NodeError> {
    // A DNS name (a StatefulSet pod's own record) may appear a moment after the pod starts.
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        match tokio::net::lookup_host(addr).await.map(|mut a| a.next()) {
            Ok(Some(a)) => return Ok(a),
            other if Instant::now() >= end => {
                let why = other.err().map(|e| e.to_string()).unwrap_or_else(|| "no address".into());
                return Err(NodeError::Startup(format!("{what} `{addr}`: {why}")));
            }
            _ => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
}

fn page_key(cfg: &Config) -> Vec<u8> {
    let secret = crate::auth::cluster_secret(cfg).unwrap_or_default();
    if secret.is_empty() {
        tracing::warn!("cluster.secret is empty: page tokens are signed with a key derived from the cluster name");
        format!("recsys-default-page-key/{}", cfg.cluster.name).into_bytes()
    } else {
        secret.into_bytes()
    }
}

/// Waits until every initial member has joined the gossip, then forms ring epoch 1.
async fn form_ring(cfg: &Config, membership: &Membership) -> RingSpec {
    let me = cfg.node.node_id.clone();
    let mut initial = cfg.cluster.initial_nodes.clone();
    if initial.is_empty() {
        initial = vec![me.clone()];
    }
    let mut changes = membership.subscribe();
    let mut last_log = Instant::now();
    loop {
        let live: Vec<String> = membership.members().into_iter().filter(|m| m.live).map(|m| m.node_id).collect();
        let missing: Vec<&String> = initial.iter().filter(|n| !live.contains(n)).collect();
        if missing.is_empty() {
            break;
        }
        if last_log.elapsed() > Duration::from_secs(5) {
            let missing: Vec<&str> = missing.iter().map(|s| s.as_str()).collect();
            tracing::info!(missing = %missing.join(","), "waiting for the initial nodes to join");
            last_log = Instant::now();
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), changes.changed()).await;
    }
    RingSpec::new(
        1,
        &initial,
        cfg.cluster.partitions_per_role,
        cfg.cluster.replication_factor,
        cfg.cluster.virtual_nodes,
    )
    .with_scorers(&cfg.cluster.scorer_nodes)
}

pub async fn run(cfg: Config) -> Result<(), NodeError> {
    let cfg = Arc::new(cfg);
    let err = |m: String| NodeError::Startup(m);
    let me = cfg.node.node_id.clone();
    let plan = Arc::new(FeaturePlan::new(&cfg.features, cfg.ingest.embedding_dim).map_err(|e| err(e.to_string()))?);
    if !cfg.cluster.join && !cfg.cluster.initial_nodes.is_empty() && !cfg.cluster.initial_nodes.contains(&me) {
        return Err(err(format!(
            "cluster.initial_nodes ({}) does not name this node `{me}`; to join a running cluster, start it with --join",
            cfg.cluster.initial_nodes.join(", ")
        )));
    }
    if cfg.cluster.join && cfg.node.seeds.is_empty() {
        return Err(err("--join needs seeds: the addresses of nodes of the running cluster".into()));
    }

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
    let scorer_here = cfg.cluster.scorer_nodes.is_empty() || cfg.cluster.scorer_nodes.contains(&me);
    let manifest = if models_dir.join("manifest.json").is_file() {
        let m = Manifest::load(&models_dir, &plan).map_err(|e| err(format!("refusing to start: {e}")))?;
        // Only scorer nodes evaluate stage 1; others need the manifest's columns alone.
        let engine = if scorer_here { cfg.scoring.stage1_engine } else { crate::config::Stage1Engine::Ort };
        let m = m.with_engine(engine).map_err(|e| err(format!("refusing to start: {e}")))?;
        if scorer_here {
            let lib = scoring::find_runtime(cfg.scoring.onnxruntime_lib.as_deref()).ok_or_else(|| {
                err("refusing to start: libonnxruntime not found; run scripts/setup.sh or set ORT_DYLIB_PATH".into())
            })?;
            let t = Instant::now();
            tokio::task::spawn_blocking(move || scoring::init_runtime(&lib))
                .await
                .map_err(|e| err(e.to_string()))?
                .map_err(|e| err(e.to_string()))?;
            tracing::info!(version = %m.version, ms = t.elapsed().as_millis() as u64, "onnxruntime ready");
        }
        Some(Arc::new(m))
    } else {
        tracing::warn!(dir = %models_dir.display(), "no models/manifest.json: serving with heuristic scores");
        None
    };

    let metrics = match &cfg.node.metrics_listen {
        Some(addr) => {
            let addr: SocketAddr = addr.parse().map_err(|e| err(format!("metrics_listen `{addr}`: {e}")))?;
            Some((addr, crate::metrics::install().map_err(|e| err(e.to_string()))?))
        }
        None => None,
    };

    // Serve health, reflection and the internal API right away; the public services answer
    // UNAVAILABLE until loaded, the internal one until the ring has formed.
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
        transport: Arc::new(OnceLock::new()),
    };
    // /metrics and the status page answer from the start, while the node loads.
    let ops_server = match metrics {
        Some((addr, handle)) => {
            let ops = crate::status::Ops::new(me.clone(), handle, handles.admin.clone());
            let task = crate::status::serve(addr, ops).await.map_err(|e| err(format!("metrics_listen: {e}")))?;
            tracing::info!(%addr, "metrics at /metrics, status page at /status");
            Some(task)
        }
        None => None,
    };
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| err(e.to_string()))?;
    let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
    let max_msg = 64 * 1024 * 1024;
    // Internal calls need the cluster secret's MAC; Ingest and Admin the operator token (when
    // configured). Recommender, health and reflection stay open.
    let cluster_key = crate::auth::cluster_secret(&cfg).map(|s| crate::auth::ClusterKey::new(&s));
    let meta_cell: Arc<OnceLock<Arc<MetaLog>>> = Arc::new(OnceLock::new());
    let internal = InternalService {
        transport: handles.transport.clone(),
        pipeline: handles.pipeline.clone(),
        meta: meta_cell.clone(),
        key: cluster_key.clone(),
    };
    let token = crate::auth::operator_token(&cfg);
    if token.as_deref().is_some_and(|t| !t.chars().all(|c| c.is_ascii_graphic())) {
        return Err(err("RECSYS_OPERATOR_TOKEN must be printable ASCII without spaces".into()));
    }
    if token.is_some() && cluster_key.is_none() {
        // The token guards Ingest and Admin; without the secret the internal API (which can
        // stream, write and page every partition) would stay open beside it.
        return Err(err("refusing to start: an operator token is set but no cluster secret (cluster.secret or \
             RECSYS_CLUSTER_SECRET): the internal API would be open to anyone who can reach the port"
            .into()));
    }
    if token.is_none() {
        tracing::info!("cluster.operator_token is empty: Ingest and Admin calls are not authenticated");
    }
    let operator = || crate::auth::Check::Operator(token.clone().map(String::into_bytes));
    let server = tonic::transport::Server::builder()
        .layer(crate::metrics::GrpcMetricsLayer)
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .initial_connection_window_size(Some(8 * 1024 * 1024))
        .initial_stream_window_size(Some(4 * 1024 * 1024))
        .add_service(health_service)
        .add_service(reflection)
        // SpecCodes: the spec's codes for expired deadlines and undecodable requests (see api::codes).
        .add_service(SpecCodes(
            pb::recommender_server::RecommenderServer::new(RecommenderService { pipeline: handles.pipeline.clone() })
                .max_decoding_message_size(max_msg),
        ))
        .add_service(SpecCodes(Guard::new(
            pb::ingest_server::IngestServer::new(IngestService {
                writer: handles.writer.clone(),
                logger: handles.logger.clone(),
            })
            .max_decoding_message_size(max_msg),
            operator(),
        )))
        .add_service(SpecCodes(Guard::new(
            pb::admin_server::AdminServer::new(AdminService { state: handles.admin.clone() }),
            operator(),
        )))
        .add_service(SpecCodes(Guard::new(
            ipb::internal_server::InternalServer::new(internal)
                .max_decoding_message_size(max_msg)
                .max_encoding_message_size(max_msg),
            crate::auth::Check::Internal(cluster_key.clone(), me.clone()),
        )));
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
    tracing::info!(%local, node = %me, "listening (NOT_SERVING while loading)");

    // Gossip on the same port, over UDP.
    let advertise = match &cfg.node.advertise_addr {
        Some(a) => resolve(a, "advertise_addr").await?,
        None if local.ip().is_unspecified() => {
            return Err(err(format!(
                "listen {local} is a wildcard address: set node.advertise_addr / --advertise-addr"
            )))
        }
        None => local,
    };
    for seed in &cfg.node.seeds {
        check_seed(seed).await?;
    }
    let membership = Membership::start(
        MembershipSettings {
            node_id: me.clone(),
            cluster_name: cfg.cluster.name.clone(),
            listen: local,
            advertise,
            seeds: cfg.node.seeds.clone(),
            gossip_interval: Duration::from_millis(cfg.cluster.gossip_interval_ms),
            phi_threshold: cfg.cluster.phi_threshold,
            flap_debounce: Duration::from_millis(cfg.cluster.flap_debounce_ms),
            key: cluster_key.clone(),
        },
        MemberState::Joining,
    )
    .await
    .map_err(|e| err(e.to_string()))?;

    // The ring: the end of the metadata log (cluster/metalog.rs). A node with a persisted log
    // first has a majority of the members confirm it (a node removed while it was away learns it
    // here, whatever the time it takes); a joining node learns the log from its seeds; the first
    // start of a cluster forms the genesis ring over the initial nodes.
    let table = cfg.node.data_dir.join("cluster.json");
    let meta_path = cfg.node.data_dir.join("meta.json");
    // A data dir from before the metadata log: its table becomes the genesis.
    let legacy = if meta_path.exists() { None } else { RingSpec::load(&table).map_err(|e| err(e.to_string()))? };
    let fresh = !meta_path.exists() && legacy.is_none() && !cfg.cluster.join;
    let mut joining = false;
    let meta = match MetaLog::open(&me, &meta_path, legacy, cluster_key.clone()).map_err(|e| err(e.to_string()))? {
        Some(m) => {
            let _ = meta_cell.set(m.clone());
            let weak = Arc::downgrade(&membership);
            m.set_gossip_addr(move |n| weak.upgrade().and_then(|g| g.addr_of(n)));
            let s = m.ring();
            tracing::info!(epoch = s.epoch, index = m.last(), members = %s.members.join(","), "rejoining with the persisted metadata log");
            m.confirm_with_quorum().await;
            m
        }
        None if cfg.cluster.join => {
            joining = true;
            let g = membership.clone();
            let peers = move || {
                let live =
                    g.members().into_iter().filter(|m| m.live && m.node_id != g.node_id && !m.grpc_addr.is_empty());
                live.map(|m| (m.node_id, m.grpc_addr)).collect::<Vec<_>>()
            };
            let m = MetaLog::learn_from_peers(&me, &meta_path, peers, cluster_key.clone())
                .await
                .map_err(|e| err(e.to_string()))?;
            let _ = meta_cell.set(m.clone());
            let weak = Arc::downgrade(&membership);
            m.set_gossip_addr(move |n| weak.upgrade().and_then(|g| g.addr_of(n)));
            tracing::info!(epoch = m.ring().epoch, "joining the running cluster");
            m
        }
        None => {
            let g = form_ring(&cfg, &membership).await;
            let m = MetaLog::open(&me, &meta_path, Some(g.clone()), cluster_key.clone())
                .map_err(|e| err(e.to_string()))?
                .ok_or_else(|| err("metadata log: no genesis".into()))?;
            let _ = meta_cell.set(m.clone());
            let weak = Arc::downgrade(&membership);
            m.set_gossip_addr(move |n| weak.upgrade().and_then(|g| g.addr_of(n)));
            tracing::info!(epoch = g.epoch, members = %g.members.join(","), digest = %g.digest(), "formed the first ring");
            m
        }
    };
    let spec = meta.ring();
    {
        let c = &cfg.cluster;
        if spec.partitions != c.partitions_per_role
            || spec.replication != c.replication_factor
            || spec.vnodes != c.virtual_nodes
        {
            tracing::warn!(
                persisted_partitions = spec.partitions,
                persisted_replication = spec.replication,
                persisted_vnodes = spec.vnodes,
                "the config's cluster placement keys differ from the cluster's ring; the ring is used \
                 (changing placement is a re-sharding, not a restart)"
            );
        }
    }
    if !joining {
        joining = !spec.members.contains(&me) && spec.target.as_ref().is_some_and(|t| t.contains(&me));
        if !spec.members.contains(&me) && !joining {
            return Err(err(format!(
                "this node `{me}` was removed from the cluster (ring epoch {}, decided in the metadata log); to join \
                 again, start it with an empty data dir and --join",
                spec.epoch
            )));
        }
    }
    spec.save(&table).map_err(|e| err(e.to_string()))?;
    let ring = Arc::new(Ring::from_spec(spec));
    membership.set_ring(ring.epoch, &ring.digest, meta.last()).await;
    metrics::gauge!("recsys_ring_epoch").set(ring.epoch as f64);

    // Load: open sled, replay this node's partitions one at a time.
    let t = Instant::now();
    let data_dir = cfg.node.data_dir.clone();
    let cache = cfg.store.cache_capacity_mb;
    let parts_n = ring.partitions;
    let store = tokio::task::spawn_blocking(move || Store::open(&data_dir.join("sled"), cache, parts_n))
        .await
        .map_err(|e| err(e.to_string()))?
        .map_err(|e| err(e.to_string()))?;
    // Everything this node holds: what it owns, and what a change in progress brings it (a move
    // resumed after a crash replays what it had streamed, then streams again).
    let held = ring.held_by(&me);
    let fparts: Vec<u32> = held.iter().filter(|p| p.role == Role::Feature).map(|p| p.partition).collect();
    let gparts: Vec<u32> = held.iter().filter(|p| p.role == Role::Generator).map(|p| p.partition).collect();
    let mut features = Vec::with_capacity(fparts.len());
    let mut generators = Vec::with_capacity(gparts.len());
    let mut ops = 0u64;
    for &p in &fparts {
        let (s, c) = (store.clone(), cfg.clone());
        let st = tokio::task::spawn_blocking(move || ingest::replay_feature(&s, &c, p))
            .await
            .map_err(|e| err(e.to_string()))?
            .map_err(|e| err(format!("replay feature/{p}: {e}")))?;
        ops += store.op_count(Part::new(Role::Feature, p));
        features.push((p, st));
    }
    for &p in &gparts {
        let (s, c) = (store.clone(), cfg.clone());
        let st = tokio::task::spawn_blocking(move || ingest::replay_generator(&s, &c, p))
            .await
            .map_err(|e| err(e.to_string()))?
            .map_err(|e| err(format!("replay generator/{p}: {e}")))?;
        ops += store.op_count(Part::new(Role::Generator, p));
        generators.push((p, st));
    }
    let (items, users): (usize, usize) =
        features.iter().fold((0, 0), |(i, u), (_, s)| (i + s.item_count(), u + s.user_count()));
    tracing::info!(
        items,
        users,
        ops,
        feature_partitions = fparts.len(),
        generator_partitions = gparts.len(),
        ms = t.elapsed().as_millis() as u64,
        "replayed this node's partitions"
    );

    let local_parts = Arc::new(LocalPartitions::new(me.clone(), ring.partitions, store.clone()));
    let max_fault = Duration::from_millis(cfg.chaos.max_duration_ms);
    local_parts.set_faults(Arc::new(crate::chaos::Faults::new(&me, cfg.chaos.enabled, max_fault)));
    let (feature_loader, generator_loader) = loaders(&store, &cfg);
    let args = PartitionSupervisorArgs {
        local: local_parts.clone(),
        store: Some(store.clone()),
        features,
        generators,
        feature_loader,
        generator_loader,
    };
    let (partition_sup, _) =
        Actor::spawn(None, PartitionSupervisor, args).await.map_err(|e| err(format!("partition actors: {e}")))?;
    let partition_cmds = partition_sup.clone();
    if cluster_key.is_none() {
        tracing::warn!(
            "cluster.secret is empty: internal calls between nodes are NOT authenticated (fine for one node on a \
             laptop; set cluster.secret or RECSYS_CLUSTER_SECRET on every node)"
        );
    }
    let transport = Arc::new(
        Transport::new(me.clone(), ring.clone(), local_parts.clone(), membership.clone())
            .map_err(|e| err(e.to_string()))?
            .with_cluster_key(cluster_key)
            .with_meta(meta.clone())
            .with_hedging(cfg.serving.hedge_max_ratio, Duration::from_millis(cfg.serving.hedge_min_delay_ms)),
    );
    let _ = handles.transport.set(transport.clone());

    // Catch up with the other replicas of the partitions this node owns before serving reads of
    // them (incoming ones are streamed by the controller).
    let own = ring.owned_by(&me);
    if !fresh {
        wait_for_replicas(&transport, &own, Duration::from_millis(cfg.cluster.catch_up_wait_ms)).await;
    }
    let c = replication::catch_up(&transport, &own, Duration::from_secs(60)).await;
    tracing::info!(ops = c.ops_pulled, partitions_behind = c.parts_behind, "caught up with the replicas");
    for p in &own {
        local_parts.set_ready(*p, true);
    }
    let controller = Controller::new(
        transport.clone(),
        meta.clone(),
        partition_cmds,
        table.clone(),
        MoveSettings {
            concurrency: cfg.cluster.move_concurrency,
            bytes_per_sec: cfg.cluster.move_bytes_per_sec,
            chunk_bytes: cfg.cluster.move_chunk_bytes,
            consistent: cfg.cluster.consistent_range_movement,
        },
        joining,
    );
    let mut removed = controller.removed.subscribe();
    if !cfg.cluster.consistent_range_movement {
        tracing::warn!("cluster.consistent_range_movement = false: moves complete without down previous owners (acknowledged writes they alone hold can be lost)");
    }
    let addr_task = tokio::spawn(register_address(meta.clone(), me.clone(), advertise.to_string()));
    let controller_task = tokio::spawn(controller.clone().run());

    let pool = match &manifest {
        Some(m) if scorer_here => ScorerPool::new(m.clone(), cfg.scoring.scorers, cfg.scoring.queue_per_scorer)
            .with_nice(cfg.scoring.scorer_nice)
            .start()
            .await
            .map_err(|e| err(format!("refusing to start: {e}")))?,
        // Not a scorer node: the manifest gives the matrix columns; scoring goes to scorer nodes.
        Some(m) => Arc::new(ScorerPool::new(m.clone(), 0, 1)),
        None => Arc::new(ScorerPool::empty()),
    };
    let scorers = if scorer_here { cfg.scoring.scorers } else { 0 };
    let models = Arc::new(
        Models::new(pool, scorers.max(1), cfg.scoring.queue_per_scorer, cfg.scoring.scorer_nice)
            .with_runtime(cfg.scoring.onnxruntime_lib.clone())
            .with_engine(if scorer_here { cfg.scoring.stage1_engine } else { crate::config::Stage1Engine::Ort }),
    );

    let logger = FeatureLogger::start(&cfg.node.data_dir.join("logs"), &plan.names)
        .map_err(|e| err(format!("feature log: {e}")))?;
    let _ = handles.logger.set(logger.clone());
    let pipeline = Arc::new(Pipeline {
        cfg: cfg.clone(),
        plan: plan.clone(),
        transport: transport.clone(),
        models: models.clone(),
        pages: PageCache::new(Duration::from_secs(cfg.serving.page_cache_ttl_secs), cfg.serving.page_cache_capacity),
        tokens: PageTokens::new(&page_key(&cfg)),
        logger: Some(logger),
        inflight: tokio::sync::Semaphore::new(cfg.serving.max_in_flight),
    });
    let _ = handles.pipeline.set(pipeline);
    let _ = handles.writer.set(Arc::new(Writer { cfg: cfg.clone(), transport: transport.clone() }));
    let _ = handles.admin.set(Arc::new(AdminState {
        transport: transport.clone(),
        models: models.clone(),
        plan: plan.clone(),
        models_dir: models_dir.clone(),
        models_root: cfg.scoring.models_root.clone().unwrap_or_else(|| models_dir.clone()),
        changes: controller.clone(),
    }));
    if joining {
        // A joining node serves once the ring has taken it in with its partitions complete.
        tracing::info!("joining: waiting for the partitions to be streamed here and the ring to commit");
        let mut changes = membership.subscribe();
        while !controller.serving_member() {
            let _ = tokio::time::timeout(Duration::from_millis(200), changes.changed()).await;
        }
    }
    membership.set_state(MemberState::Serving).await;
    for s in services {
        health.set_service_status(s, tonic_health::ServingStatus::Serving).await;
    }
    tracing::info!(%local, ms = t.elapsed().as_millis() as u64, "SERVING");

    let anti_entropy =
        tokio::spawn(anti_entropy_loop(transport.clone(), Duration::from_millis(cfg.cluster.anti_entropy_interval_ms)));

    tokio::select! {
        _ = wait_for_signal() => tracing::info!("leaving: draining, then stopping"),
        _ = removed.wait_for(|r| *r) => tracing::info!("drained: every partition moved away; stopping"),
    }
    anti_entropy.abort();
    controller_task.abort();
    addr_task.abort();
    membership.set_state(MemberState::Leaving).await;
    for s in services {
        health.set_service_status(s, tonic_health::ServingStatus::NotServing).await;
    }
    // Let the `leaving` state reach the peers (a few gossip rounds) so they stop routing here
    // before the port closes; requests already running finish meanwhile.
    tokio::time::sleep(Duration::from_millis(cfg.cluster.gossip_interval_ms * 4)).await;
    let _ = shutdown_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(10), server_task).await;
    membership.shutdown().await;
    partition_sup.stop(None);
    models.stop();
    let _ = store.flush().await;
    drop(lock_file);
    if let Some(t) = ops_server {
        t.abort();
    }
    tracing::info!("stopped");
    Ok(())
}

/// A seed must be `host:port` and resolve (a name may take a moment to appear in DNS): a node
/// with a seed it cannot use refuses to start naming it, instead of serving as a cluster of one.
async fn check_seed(seed: &str) -> Result<(), NodeError> {
    let bad = |why: &str| NodeError::Startup(format!("refusing to start: seed `{seed}` {why}"));
    let (host, port) = seed.rsplit_once(':').ok_or_else(|| bad("is not host:port"))?;
    if host.is_empty() {
        return Err(bad("has no host"));
    }
    port.parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(|| bad("has no valid port"))?;
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::net::lookup_host(seed).await.map(|mut a| a.next()) {
            Ok(Some(_)) => return Ok(()),
            other if Instant::now() >= end => {
                let why = other.err().map(|e| e.to_string()).unwrap_or_else(|| "no address".into());
                return Err(bad(&format!("does not resolve: {why}")));
            }
            _ => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
}

/// Records this node's internal address in the metadata log (once, and again when it changes),
/// so peers reach a member at the address the log holds, never one a gossip entry claims.
async fn register_address(meta: Arc<MetaLog>, me: String, addr: String) {
    for attempt in 0..600u32 {
        let ring = meta.ring();
        let involved = ring.members.contains(&me) || ring.target.as_ref().is_some_and(|t| t.contains(&me));
        if meta.logged_addr(&me).as_deref() == Some(addr.as_str()) {
            return;
        }
        if involved {
            match meta
                .propose(MetaEntry::Addr { node: me.clone(), addr: addr.clone() }, &format!("address of {me}"), None)
                .await
            {
                Ok(_) => continue,
                Err(e) => tracing::debug!(attempt, error = %e, "address not recorded yet"),
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Waits (bounded) until, for each partition, some other replica is alive, so a restarted node
/// can pull what it missed before it serves; a node whose peers are all down starts alone.
async fn wait_for_replicas(t: &Transport, own: &[Part], limit: Duration) {
    let end = Instant::now() + limit;
    let mut changes = t.membership.subscribe();
    loop {
        let ring = t.ring();
        let waiting = own.iter().any(|p| {
            let owners = ring.owners(p.role, p.partition);
            owners.len() > 1 && !owners.iter().any(|o| *o != t.node_id && t.membership.is_routable(o))
        });
        let left = end.saturating_duration_since(Instant::now());
        if !waiting || left.is_zero() {
            return;
        }
        let _ = tokio::time::timeout(left.min(Duration::from_millis(500)), changes.changed()).await;
    }
}

/// Background anti-entropy: every interval, when a peer comes back, and right after this process
/// was frozen (its own clock ticks jumped), compare digests with the replicas and pull what is
/// missing. After a freeze, this node's partitions stop serving reads until they caught up.
/// Notices that this process was frozen (SIGSTOP, a VM pause): its own 100 ms ticks jumped by
/// more than a second. On its own task, so that slow work elsewhere (a long catch-up round, a
/// slow hint delivery) is never mistaken for a freeze.
async fn freeze_detector(frozen: Arc<std::sync::atomic::AtomicBool>, wake: Arc<tokio::sync::Notify>) {
    let mut ticker = tokio::time::interval(Duration::from_millis(100));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last = Instant::now();
    loop {
        ticker.tick().await;
        let gap = last.elapsed();
        last = Instant::now();
        if gap > Duration::from_secs(1) {
            tracing::warn!(
                gap_ms = gap.as_millis() as u64,
                "this process was frozen; catching up before serving reads"
            );
            metrics::counter!("recsys_freezes_detected_total").increment(1);
            frozen.store(true, std::sync::atomic::Ordering::Release);
            wake.notify_one();
        }
    }
}

/// Delivers hinted writes to replicas that missed them, on its own task (a slow delivery holds
/// up neither anti-entropy nor the freeze detector).
async fn hint_deliverer(t: Arc<Transport>) {
    let mut ticker = tokio::time::interval(Duration::from_millis(200));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        if !t.hints.is_empty() {
            t.deliver_hints(Duration::from_secs(5)).await;
        }
    }
}

/// Anti-entropy: a full round when a peer comes back, after a freeze, 2 s after start and every
/// sixth period whatever the write rate (a partition written every few seconds never looks
/// settled, so settled-only rounds would never compare it); settled-only rounds in between.
async fn anti_entropy_loop(t: Arc<Transport>, every: Duration) {
    let mut changes = t.membership.subscribe();
    let frozen = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let wake = Arc::new(tokio::sync::Notify::new());
    let detector = tokio::spawn(freeze_detector(frozen.clone(), wake.clone()));
    let hints = tokio::spawn(hint_deliverer(t.clone()));
    let _stop = AbortOnDrop(vec![detector, hints]);
    let mut ticker = tokio::time::interval(Duration::from_millis(100));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_round = Instant::now();
    let mut rounds = 0u64;
    let mut seen = std::collections::HashMap::new();
    // One more full round shortly after turning SERVING: peers start writing here only once
    // their failure detectors and flap debounce let them, after the start-up catch-up ran.
    let mut full_at = Some(Instant::now() + Duration::from_secs(2));
    loop {
        // The partitions owned now (the ring changes with joins and drains).
        let own = t.ring().owned_by(&t.node_id);
        let peer_changed = tokio::select! {
            _ = ticker.tick() => false,
            _ = wake.notified() => false,
            r = changes.changed() => r.is_ok(),
        };
        let was_frozen = frozen.swap(false, std::sync::atomic::Ordering::AcqRel);
        if was_frozen {
            for p in &own {
                t.local.set_ready(*p, false);
            }
        }
        let scheduled = full_at.is_some_and(|at| Instant::now() >= at);
        if scheduled {
            full_at = None;
        }
        if was_frozen || peer_changed || scheduled || last_round.elapsed() >= every {
            rounds += 1;
            let full = was_frozen || peer_changed || scheduled || rounds.is_multiple_of(6);
            let mode = if full { replication::Mode::Full } else { replication::Mode::Settled(&mut seen) };
            let started = Instant::now();
            let s = replication::catch_up_mode(&t, &own, Duration::from_secs(30), mode).await;
            let kind = if full { "full" } else { "settled" };
            metrics::histogram!("recsys_anti_entropy_round_seconds", "mode" => kind)
                .record(started.elapsed().as_secs_f64());
            metrics::counter!("recsys_anti_entropy_partitions_compared_total").increment(u64::from(s.parts_checked));
            if was_frozen {
                for p in &own {
                    t.local.set_ready(*p, true);
                }
                tracing::info!(ops = s.ops_pulled, "caught up after the freeze; serving reads again");
            }
            last_round = Instant::now();
        }
    }
}

/// Aborts its tasks when dropped (the loop that owns them was aborted).
struct AbortOnDrop(Vec<tokio::task::JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
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
