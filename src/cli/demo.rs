//! `recsys demo` (the main job): start a node, load the synthetic world, show recommendations
//! with explanations and a latency summary, keep serving until interrupted.
//! `recsys simulate`: users with hidden preferences consume recommendations and emit events.
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::bench::{self, BenchSpec};
use super::load;
use crate::api::pb;
use crate::api::pb::admin_client::AdminClient;
use crate::api::pb::ingest_client::IngestClient;
use crate::api::pb::recommender_client::RecommenderClient;
use crate::world::World;

pub struct DemoSpec {
    pub listen: String,
    pub data_dir: PathBuf,
    pub config: PathBuf,
    pub metrics_listen: String,
    pub seed: u64,
    pub items: usize,
    pub users: usize,
    pub events: usize,
    pub exit_after: bool,
}

pub async fn run(spec: DemoSpec) -> anyhow::Result<()> {
    let exe = std::env::current_exe()?;
    println!("== starting `recsys node` on {} (data in {})", spec.listen, spec.data_dir.display());
    let mut child = tokio::process::Command::new(exe)
        .args(["node", "--listen", &spec.listen, "--data-dir"])
        .arg(&spec.data_dir)
        .arg("--config")
        .arg(&spec.config)
        .args(["--metrics-listen", &spec.metrics_listen])
        .kill_on_drop(true)
        .spawn()
        .context("spawning the node")?;
    // If the node exits while the demo drives it (bad config, port taken), stop at once.
    let result = tokio::select! {
        r = drive(&spec) => r,
        status = child.wait() => Err(anyhow::anyhow!("the node exited early ({}); see its output above", status?)),
    };
    if let Err(e) = &result {
        eprintln!("demo failed: {e:#}");
    } else if !spec.exit_after {
        println!("\nServing until interrupted (Ctrl-C). Try:");
        println!("  target/release/recsys recommend --addr {} --user u42 --k 10 --explain", spec.listen);
        println!("  grpcurl -plaintext {} list", spec.listen);
        println!("  grpcurl -plaintext -d '{{\"user_id\":\"u7\",\"surface\":\"home\",\"k\":5}}' {} recsys.v1.Recommender/Recommend", spec.listen);
        println!("  curl -s http://{}/metrics | grep recsys_stage", spec.metrics_listen);
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {},
            _ = child.wait() => {},
        }
    }
    // SIGTERM for a clean shutdown (flush, lock released).
    if let Some(pid) = child.id() {
        let _ = std::process::Command::new("kill").arg("-TERM").arg(pid.to_string()).status();
    }
    let _ = tokio::time::timeout(Duration::from_secs(15), child.wait()).await;
    result
}

async fn drive(spec: &DemoSpec) -> anyhow::Result<()> {
    super::wait_serving(&spec.listen, Duration::from_secs(300)).await?;
    let ch = super::connect(&spec.listen).await?;
    let status = AdminClient::new(ch.clone()).cluster_status(pb::ClusterStatusRequest {}).await?.into_inner();
    let world = Arc::new(World::generate(load::synthetic_spec(spec.seed, spec.items, spec.users, spec.events)));
    if status.items >= spec.items as u64 && status.events >= spec.events as u64 {
        println!(
            "== data already loaded ({} items, {} users, {} events): restart kept it",
            status.items, status.users, status.events
        );
    } else {
        println!(
            "== loading synthetic world: {} items, {} users, {} events (seed {})",
            spec.items, spec.users, spec.events, spec.seed
        );
        let s = load::load_world(ch.clone(), world.clone(), 5000, false).await?;
        println!(
            "   loaded {} items, {} users, {} events ({} duplicates) in {:.1}s",
            s.items, s.users, s.events, s.duplicates, s.seconds
        );
    }
    let mut rec = RecommenderClient::new(ch.clone());
    for user in ["u1", "u42", "u977", "new-user-without-history"] {
        println!("\n== Recommend user={user} k=8 explain=true");
        let r = rec
            .recommend(pb::RecommendRequest {
                user_id: user.into(),
                surface: "home".into(),
                k: 8,
                page_token: String::new(),
                context: None,
                explain: true,
            })
            .await?
            .into_inner();
        super::print_recommendation(&r);
        if user == "u42" && !r.next_page_token.is_empty() {
            let p2 = rec
                .recommend(pb::RecommendRequest {
                    user_id: user.into(),
                    surface: "home".into(),
                    k: 8,
                    page_token: r.next_page_token.clone(),
                    context: None,
                    explain: false,
                })
                .await?
                .into_inner();
            let ids: Vec<_> = p2.items.iter().map(|i| format!("{}(#{})", i.item_id, i.rank)).collect();
            println!("  page 2: {}", ids.join(" "));
        }
    }
    println!("\n== latency summary (400 requests, concurrency 4)");
    let report = bench::run(BenchSpec {
        addr: spec.listen.clone(),
        concurrency: 4,
        rate: None,
        requests: 400,
        max_duration: Duration::from_secs(60),
        users: spec.users,
        k: 10,
        deadline_ms: 250,
        warmup: 20,
    })
    .await?;
    print!("{}", report.text);
    Ok(())
}

pub struct SimSpec {
    pub addr: String,
    pub seed: u64,
    pub items: usize,
    pub users: usize,
    pub requests: usize,
    pub k: u32,
}

#[derive(Debug, Default)]
pub struct SimReport {
    pub requests: u64,
    pub impressions: u64,
    pub clicks: u64,
    pub likes: u64,
}

/// Users (with the world's hidden tastes) take what they are served and react; events carry the
/// request id so training can join them to the served feature rows.
pub async fn simulate(spec: SimSpec) -> anyhow::Result<SimReport> {
    let world = World::generate(load::synthetic_spec(spec.seed, spec.items, spec.users, 0));
    let ch = super::connect(&spec.addr).await?;
    let mut rec = RecommenderClient::new(ch.clone());
    let mut ing = IngestClient::new(ch);
    let mut rng = StdRng::seed_from_u64(spec.seed ^ 0x51u64 ^ rand::random::<u64>());
    let mut rep = SimReport::default();
    let t = Instant::now();
    let mut pending = Vec::new();
    for n in 0..spec.requests {
        let u = rng.random_range(0..world.users.len());
        let uid = world.users[u].id.clone();
        let r = match rec
            .recommend(pb::RecommendRequest {
                user_id: uid.clone(),
                surface: "home".into(),
                k: spec.k,
                ..Default::default()
            })
            .await
        {
            Ok(r) => r.into_inner(),
            Err(e) => {
                eprintln!("recommend failed: {e}");
                continue;
            }
        };
        rep.requests += 1;
        let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis() as i64;
        for it in &r.items {
            let Some(idx) = World::item_index(&it.item_id) else { continue };
            let Some(item) = world.items.get(idx) else { continue };
            for (j, a) in world.react(&mut rng, u, item).into_iter().enumerate() {
                match a {
                    crate::store::Action::Impression => rep.impressions += 1,
                    crate::store::Action::Click => rep.clicks += 1,
                    crate::store::Action::Like => rep.likes += 1,
                    _ => {}
                }
                pending.push(pb::Event {
                    event_id: format!("sim-{}-{}-{j}", r.request_id, it.item_id),
                    user_id: uid.clone(),
                    item_id: it.item_id.clone(),
                    action: load::to_pb_action(a) as i32,
                    event_time_ms: now_ms + j as i64 * 1000,
                    geo: world.users[u].geo.clone(),
                    request_id: r.request_id.clone(),
                });
            }
        }
        if pending.len() >= 2000 || n + 1 == spec.requests {
            ing.log_events(pb::LogEventsRequest { events: std::mem::take(&mut pending) }).await?;
        }
        if (n + 1) % 1000 == 0 {
            eprintln!(
                "simulate: {} requests, CTR {:.4} ({:.0} req/s)",
                n + 1,
                rep.clicks as f64 / rep.impressions.max(1) as f64,
                (n + 1) as f64 / t.elapsed().as_secs_f64()
            );
        }
    }
    Ok(rep)
}
