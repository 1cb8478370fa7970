//! `recsys node`: lock the data dir, serve health (NOT_SERVING) and the internal API at once,
//! join the gossip, form (or reload) the ring, replay this node's partitions one at a time from
//! their op logs, catch up with their other replicas, start the scorers, then flip to SERVING.
//! SIGTERM announces `leaving`, drains and stops.
//!
//! Where things are: `mod.rs` is the start-up sequence and shutdown (`run`); `servers.rs` builds
//! the gRPC port (public and internal services); `supervisor.rs` keeps the partition actors;
//! `background.rs` holds the loops that run while the node serves.
mod background;
mod servers;
mod supervisor;

pub use supervisor::{loaders, PartitionSupervisor, PartitionSupervisorArgs, PartitionSupervisorState};

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use ractor::Actor;

use crate::api::admin::AdminState;
use crate::cluster::changes::{Controller, MoveSettings};
use crate::cluster::membership::MembershipSettings;
use crate::cluster::metalog::MetaLog;
use crate::cluster::{replication, MemberState, Membership, Ring, RingSpec};
use crate::config::Config;
use crate::domain::{Part, Role};
use crate::features::FeaturePlan;
use crate::ingest::{self, Writer};
use crate::logging::FeatureLogger;
use crate::pipeline::Pipeline;
use crate::ranking::{PageCache, PageTokens};
use crate::scoring::{self, Manifest, Models, ScorerPool};
use crate::store::Store;
use crate::transport::{LocalPartitions, Transport};

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("data dir {0} is locked by another recsys process")]
    Locked(PathBuf),
    #[error("{0}")]
    Startup(String),
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

/// The key page tokens are signed with: the cluster secret, else a random key decided once in
/// the metadata log (every node signs and checks alike; nobody derives it from the config).
async fn page_key(cfg: &Config, meta: &Arc<MetaLog>) -> Vec<u8> {
    match crate::auth::cluster_secret(cfg) {
        Some(secret) => secret.into_bytes(),
        None => meta.ensure_page_key().await.into_bytes(),
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
    // TLS (transport/tls.rs): its files are read and checked before anything is served.
    let tls = {
        let c = cfg.clone();
        tokio::task::spawn_blocking(move || crate::transport::tls::for_node(&c))
            .await
            .map_err(|e| err(e.to_string()))?
            .map_err(|e| err(format!("refusing to start: {e}")))?
    };

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
            let handle = crate::metrics::install().map_err(|e| err(e.to_string()))?;
            crate::pipeline::register_zero_series();
            Some((addr, handle))
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
    let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
    let cluster_key = crate::auth::cluster_secret(&cfg).map(|s| crate::auth::ClusterKey::new(&s));
    let meta_cell: Arc<OnceLock<Arc<MetaLog>>> = Arc::new(OnceLock::new());
    let server_task = servers::serve(
        &cfg,
        &handles,
        meta_cell.clone(),
        cluster_key.clone(),
        tls.as_ref(),
        listener,
        health_service,
        shutdown_rx,
    )?;
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
    let meta = match MetaLog::open(&me, &cfg.cluster.name, &meta_path, legacy, cluster_key.clone())
        .map_err(|e| err(e.to_string()))?
    {
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
            let m = MetaLog::learn_from_peers(&me, &cfg.cluster.name, &meta_path, peers, cluster_key.clone())
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
            // A node that lost its data dir must not form the genesis again and vote with no
            // memory of its votes: asked first, the peers' logs say whether it had one.
            let peers: Vec<(String, String)> = membership
                .members()
                .into_iter()
                .filter(|m| m.live && m.node_id != me && !m.grpc_addr.is_empty())
                .map(|m| (m.node_id, m.grpc_addr))
                .collect();
            MetaLog::check_not_forgotten(&me, &cfg.cluster.name, &g, peers, cluster_key.clone())
                .await
                .map_err(|e| err(e.to_string()))?;
            let m = MetaLog::open(&me, &cfg.cluster.name, &meta_path, Some(g.clone()), cluster_key.clone())
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
            .with_write_quorum(cfg.ingest.write_quorum)
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
    let addr_task = tokio::spawn(background::register_address(meta.clone(), me.clone(), advertise.to_string()));
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
        tokens: PageTokens::new(&page_key(&cfg, &meta).await),
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

    let anti_entropy = tokio::spawn(background::anti_entropy_loop(
        transport.clone(),
        Duration::from_millis(cfg.cluster.anti_entropy_interval_ms),
    ));

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

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
}
