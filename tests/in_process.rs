//! The node's pieces wired in one process (real actors, real sled, real ONNX models) to check the
//! failure paths deterministically: a missing partition degrades the answer, a crashed partition
//! is rebuilt from sled by its supervisor, a missing scorer falls back, and ort computes what the
//! training script computed.
mod common;

use std::sync::Arc;
use std::time::Duration;

use ractor::Actor;
use recsys::cluster::membership::MembershipSettings;
use recsys::cluster::{MemberState, Membership, Ring};
use recsys::config::Config;
use recsys::domain::{Part, Role};
use recsys::features::shard::FeatureMsg;
use recsys::features::FeaturePlan;
use recsys::ids::{self, key_of, partition_of};
use recsys::ingest::{self, Writer};
use recsys::node::{PartitionSupervisor, PartitionSupervisorArgs};
use recsys::pipeline::{Pipeline, Request};
use recsys::ranking::{PageCache, PageTokens};
use recsys::scoring::{self, Manifest, Models, ScorerPool, Stage};
use recsys::store::Store;
use recsys::transport::{LocalPartitions, Transport};
use recsys::world::World;

struct Rig {
    pipeline: Arc<Pipeline>,
    local: Arc<LocalPartitions>,
    world: World,
    partitions: u32,
    /// Removed when the rig drops.
    _dir: common::TempDir,
}

fn config() -> Config {
    let mut cfg = Config::load(&common::repo().join("config/node.toml")).unwrap();
    cfg.scoring.models_dir = common::repo().join("models");
    cfg
}

/// One node wired by hand: gossip of one, a ring of one, its partitions under their supervisor.
async fn rig(name: &str, scorers: Option<Arc<ScorerPool>>) -> Rig {
    let cfg = Arc::new(config());
    let dir = common::temp_dir(name);
    let parts = cfg.cluster.partitions_per_role;
    let store = Store::open(&dir.join("sled"), 16, parts).unwrap();
    let plan = Arc::new(FeaturePlan::new(&cfg.features, cfg.ingest.embedding_dim).unwrap());
    let ring = Arc::new(Ring::build(1, &["n1".to_string()], parts, 2, 64));
    let gossip = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = gossip.local_addr().unwrap();
    drop(gossip);
    let settings = MembershipSettings {
        node_id: "n1".into(),
        cluster_name: format!("test-{name}"),
        listen: addr,
        advertise: addr,
        seeds: vec![],
        gossip_interval: Duration::from_millis(100),
        phi_threshold: 6.0,
        flap_debounce: Duration::from_millis(300),
        key: None,
    };
    let membership = Membership::start(settings, MemberState::Serving).await.unwrap();
    let local = Arc::new(LocalPartitions::new("n1".into(), parts, store.clone()));
    let (feature_loader, generator_loader) = recsys::node::loaders(&store, &cfg);
    let args = PartitionSupervisorArgs {
        local: local.clone(),
        store: Some(store.clone()),
        features: (0..parts).map(|p| (p, ingest::replay_feature(&store, &cfg, p).unwrap())).collect(),
        generators: (0..parts).map(|p| (p, ingest::replay_generator(&store, &cfg, p).unwrap())).collect(),
        feature_loader,
        generator_loader,
    };
    Actor::spawn(None, PartitionSupervisor, args).await.unwrap();
    for p in 0..parts {
        local.set_ready(Part::new(Role::Feature, p), true);
        local.set_ready(Part::new(Role::Generator, p), true);
    }
    let transport = Arc::new(Transport::new("n1".into(), ring, local.clone(), membership).unwrap());
    let writer = Writer { cfg: cfg.clone(), transport: transport.clone() };
    let world = World::generate(recsys::cli::load::synthetic_spec(3, 1500, 100, 0));
    writer.upsert_items(world.items.clone()).await.unwrap();
    writer.upsert_users(world.users.clone()).await.unwrap();
    let mut events = Vec::new();
    World::generate(recsys::cli::load::synthetic_spec(3, 1500, 100, 4000)).events(|e| events.push(e));
    for chunk in events.chunks(2000) {
        writer.log_events(chunk.iter().cloned().enumerate().collect(), Default::default()).await.unwrap();
    }
    let pipeline = Arc::new(Pipeline {
        cfg: cfg.clone(),
        plan,
        transport,
        models: Arc::new(Models::fixed(scorers.unwrap_or_else(|| Arc::new(ScorerPool::empty())))),
        pages: PageCache::new(Duration::from_secs(60), 100),
        tokens: PageTokens::new(b"test key"),
        logger: None,
        inflight: tokio::sync::Semaphore::new(16),
    });
    Rig { pipeline, local, world, partitions: parts, _dir: dir }
}

fn req(user: &str) -> Request {
    Request {
        user_id: user.into(),
        surface: "home".into(),
        k: 10,
        page_token: String::new(),
        geo: String::new(),
        explain: true,
    }
}

fn active_user(w: &World) -> String {
    w.users.iter().max_by_key(|u| u.follows.len()).unwrap().id.clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_partitions_degrade_instead_of_failing() {
    let r = rig("degrade", None).await;
    let user = active_user(&r.world);
    let ok = r.pipeline.recommend(req(&user), Duration::from_millis(500)).await.unwrap();
    assert!(!ok.coverage.degraded);
    assert!(ok.coverage.fallbacks.contains(&"heuristic_scores"), "no model deployed here: heuristic expected");
    // Take out the feature partition owning the first recommended item and a generator partition.
    let gone = partition_of(ids::ITEM, key_of(&ok.items[0].1.item), r.partitions);
    r.local.set_feature(gone, None);
    // One shard of the global trending list.
    let geo = recsys::domain::placement::global_trending_partitions(
        r.pipeline.cfg.retrieval.global_trending_shards,
        r.partitions,
    )[0];
    r.local.set_generator(geo, None);
    let d = r.pipeline.recommend(req(&user), Duration::from_millis(500)).await.unwrap();
    assert!(d.coverage.degraded);
    assert!(!d.items.is_empty(), "a request that has anything to return returns it");
    let filtering = d.coverage.stages.iter().find(|s| s.stage == "filtering").unwrap();
    assert_eq!(filtering.missing, vec![gone]);
    assert_eq!(filtering.answered + 1, filtering.asked);
    let retrieval = d.coverage.stages.iter().find(|s| s.stage == "retrieval").unwrap();
    assert!(retrieval.missing.contains(&geo));
    // Candidates of the missing partition cannot be verified, so none of them is served.
    for (_, it) in &d.items {
        assert_ne!(partition_of(ids::ITEM, key_of(&it.item), r.partitions), gone);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashed_partition_is_rebuilt_from_sled() {
    let r = rig("supervise", None).await;
    let p = partition_of(ids::ITEM, key_of(&r.world.items[0].id), r.partitions);
    let before = r.local.feature_actor(p).unwrap();
    let counts = before.call(FeatureMsg::Counts, Some(Duration::from_secs(5))).await.unwrap().unwrap();
    assert!(counts.items > 0);
    before.send_message(FeatureMsg::Crash).unwrap();
    // Wait (bounded) for the supervisor to swap in the rebuilt actor.
    let rebuilt = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            if let Some(a) = r.local.feature_actor(p) {
                if a.get_id() != before.get_id() {
                    return a;
                }
            }
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("supervisor restarted the partition");
    let after = rebuilt.call(FeatureMsg::Counts, Some(Duration::from_secs(5))).await.unwrap().unwrap();
    assert_eq!(after, counts, "the restarted partition reloaded its rows from sled");
    let user = active_user(&r.world);
    let res = r.pipeline.recommend(req(&user), Duration::from_millis(500)).await.unwrap();
    assert!(!res.coverage.degraded);
    assert_eq!(res.items.len(), 10);
}

fn models() -> Arc<Manifest> {
    let cfg = config();
    let plan = FeaturePlan::new(&cfg.features, cfg.ingest.embedding_dim).unwrap();
    let lib = scoring::find_runtime(None).expect("run scripts/setup.sh to fetch libonnxruntime");
    scoring::init_runtime(&lib).unwrap();
    Arc::new(Manifest::load(&cfg.scoring.models_dir, &plan).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scorers_compute_what_training_computed_and_fall_back_when_gone() {
    let manifest = models();
    let pool = ScorerPool::new(manifest.clone(), 2, 4).start().await.unwrap();
    assert_eq!(pool.live(), 2);
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(common::repo().join("models/reference.json")).unwrap()).unwrap();
    let rows: Vec<Vec<f32>> = serde_json::from_value(reference["features"].clone()).unwrap();
    let want1: Vec<f32> = serde_json::from_value(reference["stage1"].clone()).unwrap();
    let want2: Vec<Vec<f32>> = serde_json::from_value(reference["stage2"].clone()).unwrap();
    let flat: Vec<f32> = rows.iter().flatten().copied().collect();
    let cols = rows[0].len();
    let got1 = pool.score(Stage::Light, rows.len(), cols, flat.clone(), Duration::from_secs(5)).await.unwrap();
    let got2 = pool.score(Stage::Heavy, rows.len(), cols, flat, Duration::from_secs(5)).await.unwrap();
    for (g, w) in got1.iter().zip(&want1) {
        assert!((g - w).abs() < 1e-4, "stage 1: ort {g} vs lightgbm {w}");
    }
    for (g, w) in got2.iter().zip(want2.iter().flatten()) {
        assert!((g - w).abs() < 1e-3, "stage 2: ort {g} vs sklearn {w}");
    }

    // A large batch split over both scorers gives exactly the rows' scores in order.
    let big: Vec<f32> = rows.iter().cycle().take(1001).flatten().copied().collect();
    let whole = pool.score_in(Stage::Light, 1001, cols, big.clone(), Duration::from_secs(5), 1).await.unwrap();
    let split = pool.score(Stage::Light, 1001, cols, big, Duration::from_secs(5)).await.unwrap();
    assert_eq!(whole, split);
    assert!((whole[1000] - want1[1000 % want1.len()]).abs() < 1e-4);

    // The full pipeline on the models, then with every scorer gone: heuristic fallback, still an answer.
    let r = rig("scoring", Some(pool.clone())).await;
    let user = active_user(&r.world);
    let ok = r.pipeline.recommend(req(&user), Duration::from_millis(500)).await.unwrap();
    assert!(ok.items.iter().all(|(_, s)| s.scored_by == "value_model" && s.heads.len() == 4));
    pool.set(0, None);
    pool.set(1, None);
    let fb = r.pipeline.recommend(req(&user), Duration::from_millis(500)).await.unwrap();
    assert!(fb.coverage.fallbacks.contains(&"heuristic_scores"));
    assert!(fb.coverage.degraded);
    assert_eq!(fb.items.len(), 10);
}
