//! Criterion benches of the serving hot paths, plus a p50/p99/ops-per-second summary of each:
//! stage-1 GBDT and stage-2 MLP through ort (one session, one thread, as a scorer runs them),
//! gathering 1000 candidates' item features from a feature partition, and author spacing.
//! `cargo bench --bench hot_paths` (needs `scripts/setup.sh` for libonnxruntime).
use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use criterion::Criterion;
use recsys::config::Config;
use recsys::domain::{Action, ItemRecord};
use recsys::features::shard::{FeatureShardState, ShardSettings};
use recsys::features::FeaturePlan;
use recsys::ranking::{diversify, Scored};
use recsys::scoring::{self, Manifest, ScorerPool, Stage};

mod common;
use common::summary;

fn shard_with_items(n: usize) -> FeatureShardState {
    let mut s = FeatureShardState::new(ShardSettings {
        emb_dim: 8,
        topics: 20,
        recent_likes: 20,
        seen_capacity: 2048,
        seen_fp: 0.01,
        unknown_cap: 1000,
    });
    let now = 1_700_000_000i64;
    for i in 0..n {
        s.upsert_item(&ItemRecord {
            id: format!("i{i}"),
            author: format!("a{}", i % 500),
            topic: (i % 20) as u32,
            geo: "us".into(),
            price: 1.0,
            quality: 0.5,
            duration_secs: 60.0,
            is_video: false,
            in_stock: true,
            created_at: now - (i as i64 % 86_400),
            embedding: vec![0.1; 8],
            deleted: false,
            allowed_regions: vec![],
            blocked_regions: vec![],
        });
        let k = recsys::ids::key_of(&format!("i{i}"));
        for j in 0..10 {
            s.apply_item_event(k, Action::Impression, now - j * 700);
            s.apply_item_event(k, Action::Click, now - j * 1300);
        }
    }
    s
}

fn main() {
    let cfg = Config::load(Path::new("config/node.toml")).expect("run from the repository root");
    let plan = FeaturePlan::new(&cfg.features, cfg.ingest.embedding_dim).unwrap();
    let mut c = Criterion::default().configure_from_args().sample_size(30);

    // Feature gather: 1000 candidates from one partition's dense blocks.
    let mut shard = shard_with_items(20_000);
    let keys: Vec<u64> = (0..1000).map(|i| recsys::ids::key_of(&format!("i{}", i * 17))).collect();
    let now = 1_700_000_100;
    let user_emb: Vec<f32> = (0..cfg.ingest.embedding_dim).map(|d| d as f32 / 10.0).collect();
    c.bench_function("item_features_1000", |b| {
        b.iter(|| black_box(shard.item_features(&keys, &plan.item_feats, &user_emb, now)))
    });
    summary("item_features_1000", || {
        black_box(shard.item_features(&keys, &plan.item_feats, &user_emb, now));
    });

    // Ranking: author spacing over a scored list of 100.
    let scored: Vec<Scored> = (0..100)
        .map(|i| Scored {
            item: Arc::from(format!("i{i}")),
            author: Arc::from(format!("a{}", i % 7)),
            score: (i * 37 % 101) as f32,
            sources: 1,
            stage1: 0.0,
            heads: vec![],
            scored_by: "stage1",
            defaulted: 0,
        })
        .collect();
    c.bench_function("diversify_100", |b| b.iter(|| black_box(diversify(scored.clone()))));
    summary("diversify_100", || {
        black_box(diversify(scored.clone()));
    });

    // ONNX scoring through the scorer actors (dedicated threads, own sessions).
    let Some(lib) = scoring::find_runtime(None) else {
        println!("libonnxruntime not found: run scripts/setup.sh for the scoring benches");
        c.final_summary();
        return;
    };
    scoring::init_runtime(&lib).unwrap();
    let manifest = Arc::new(Manifest::load(Path::new("models"), &plan).unwrap());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let pool = rt.block_on(ScorerPool::new(manifest.clone(), 1, 4).start()).unwrap();
    let cols = manifest.stage1_columns.len();
    let rows1: Vec<f32> = (0..1000 * cols).map(|i| ((i * 7919) % 1000) as f32 / 100.0).collect();
    let rows2: Vec<f32> = rows1[..100 * cols].to_vec();
    let score = |stage: Stage, rows: usize, data: &Vec<f32>| {
        rt.block_on(pool.score(stage, rows, cols, data.clone(), Duration::from_secs(5))).unwrap()
    };
    c.bench_function("stage1_gbdt_1000", |b| b.iter(|| black_box(score(Stage::Light, 1000, &rows1))));
    c.bench_function("stage2_mlp_100", |b| b.iter(|| black_box(score(Stage::Heavy, 100, &rows2))));
    summary("stage1_gbdt_1000", || {
        black_box(score(Stage::Light, 1000, &rows1));
    });
    summary("stage2_mlp_100", || {
        black_box(score(Stage::Heavy, 100, &rows2));
    });
    c.final_summary();
}
