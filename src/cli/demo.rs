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
use crate::api::pb::recommender_client::RecommenderClient;
use crate::world::World;

pub struct DemoSpec {
    /// Nodes to start (n1..nN); 1 runs a one-node cluster.
    pub nodes: usize,
    pub host: String,
    /// n1 listens on this port, n2 on the next, ...
    pub base_port: u16,
    pub metrics_base_port: u16,
    pub data_dir: PathBuf,
    pub config: PathBuf,
    pub seed: u64,
    pub items: usize,
    pub users: usize,
    pub events: usize,
    pub exit_after: bool,
}

impl DemoSpec {
    fn addr(&self, i: usize) -> String {
        format!("{}:{}", self.host, self.base_port as usize + i)
    }
}

pub async fn run(spec: DemoSpec) -> anyhow::Result<()> {
    anyhow::ensure!((1..=9).contains(&spec.nodes), "--nodes: between 1 and 9");
    let exe = std::env::current_exe()?;
    let ids: Vec<String> = (1..=spec.nodes).map(|i| format!("n{i}")).collect();
    let addrs: Vec<String> = (0..spec.nodes).map(|i| spec.addr(i)).collect();
    let mut children = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let dir = spec.data_dir.join(id);
        let metrics = format!("{}:{}", spec.host, spec.metrics_base_port as usize + i);
        println!("== starting node {id} on {} (metrics {metrics}, data in {})", addrs[i], dir.display());
        let seeds: Vec<&str> = addrs.iter().filter(|a| **a != addrs[i]).map(|a| a.as_str()).collect();
        let mut cmd = tokio::process::Command::new(&exe);
        cmd.args(["node", "--node-id", id, "--listen", &addrs[i], "--data-dir"])
            .arg(&dir)
            .arg("--config")
            .arg(&spec.config)
            .args(["--metrics-listen", &metrics, "--initial-nodes", &ids.join(",")])
            .kill_on_drop(true);
        if !seeds.is_empty() {
            cmd.args(["--seeds", &seeds.join(",")]);
        }
        children.push(cmd.spawn().context("spawning a node")?);
    }
    // If a node exits while the demo drives the cluster (bad config, port taken), stop at once.
    let exited = futures::future::select_all(children.iter_mut().map(|c| Box::pin(c.wait())));
    let result = tokio::select! {
        r = drive(&spec, &addrs) => r,
        (status, i, _) = exited => Err(anyhow::anyhow!("node n{} exited early ({}); see its output above", i + 1, status?)),
    };
    let last = addrs.last().cloned().unwrap_or_default();
    // A failure is reported once, by main, after the nodes have stopped.
    if result.is_ok() && !spec.exit_after {
        // The binary as the user would type it from here (target/release/recsys from the repo).
        let cwd = std::env::current_dir().unwrap_or_default();
        let bin = exe.strip_prefix(&cwd).unwrap_or(&exe).display();
        println!("\nServing until interrupted (Ctrl-C). Try:");
        println!("  {bin} status --addr {}", addrs[0]);
        println!("  {bin} recommend --addr {last} --user u42 --k 10 --explain");
        println!("  {bin} bench --addr {last} --concurrency 4 --requests 2000");
        println!("  status page: http://{}:{}/status   (metrics: /metrics)", spec.host, spec.metrics_base_port);
        let exited = futures::future::select_all(children.iter_mut().map(|c| Box::pin(c.wait())));
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {},
            _ = exited => {},
        }
    }
    // SIGTERM for a clean shutdown (flush, lock released).
    for child in &children {
        if let Some(pid) = child.id() {
            let _ = std::process::Command::new("kill").arg("-TERM").arg(pid.to_string()).status();
        }
    }
    for child in &mut children {
        let _ = tokio::time::timeout(Duration::from_secs(15), child.wait()).await;
    }
    result
}

async fn drive(spec: &DemoSpec, addrs: &[String]) -> anyhow::Result<()> {
    for a in addrs {
        super::wait_serving(a, Duration::from_secs(300)).await?;
    }
    let first = &addrs[0];
    let last = addrs.last().unwrap_or(first);
    let ch = super::connect(first).await?;
    // The nodes inherit RECSYS_OPERATOR_TOKEN from this process; so do its own calls.
    let token = super::OperatorToken::from_env();
    let status = super::admin_client(ch.clone(), &token)
        .cluster_status(pb::ClusterStatusRequest {})
        .await
        .map_err(super::output::status_error)?
        .into_inner();
    println!("\n== cluster status (from n1)");
    super::print_status(&status);
    let world = Arc::new(World::generate(load::synthetic_spec(spec.seed, spec.items, spec.users, spec.events)));
    let marker = spec.data_dir.join(format!("loaded-{}-{}-{}-{}", spec.seed, spec.items, spec.users, spec.events));
    if marker.exists() {
        println!("== data already loaded (seed {}): the restart kept it", spec.seed);
    } else {
        println!(
            "\n== loading synthetic world through n1: {} items, {} users, {} events (seed {})",
            spec.items, spec.users, spec.events, spec.seed
        );
        let s = load::load_world_with(ch.clone(), &token, world.clone(), 5000, false).await?;
        println!(
            "   loaded {} items, {} users, {} events ({} duplicates) in {:.1}s",
            s.items, s.users, s.events, s.duplicates, s.seconds
        );
        std::fs::write(&marker, b"")?;
    }
    println!(
        "\n== recommendations asked of {}, the last node",
        if addrs.len() > 1 { "n".to_string() + &addrs.len().to_string() } else { "n1".into() }
    );
    let ch = super::connect(last).await?;
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
            .await
            .map_err(super::output::status_error)?
            .into_inner();
        super::print_recommendation(&r);
        if user == "u42" && !r.next_page_token.is_empty() {
            // Page 2 through another node: the token names the node holding the ranking.
            let other = addrs.get(1).unwrap_or(first);
            let p2 = RecommenderClient::new(super::connect(other).await?)
                .recommend(pb::RecommendRequest {
                    user_id: user.into(),
                    surface: "home".into(),
                    k: 8,
                    page_token: r.next_page_token.clone(),
                    context: None,
                    explain: false,
                })
                .await
                .map_err(super::output::status_error)?
                .into_inner();
            let ids: Vec<_> = p2.items.iter().map(|i| format!("{}(#{})", i.item_id, i.rank)).collect();
            println!("  page 2 (asked of {other}): {}", ids.join(" "));
        }
    }
    println!("\n== latency summary (400 requests, concurrency 4, through {last})");
    let report = bench::run(BenchSpec {
        addr: last.clone(),
        concurrency: 4,
        rate: None,
        requests: 400,
        max_duration: Duration::from_secs(60),
        users: spec.users,
        k: 10,
        deadline_ms: 250,
        warmup: 20,
        token: token.clone(),
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
    let mut ing = super::ingest_client(ch, &super::OperatorToken::from_env());
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
