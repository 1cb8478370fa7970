//! `recsys demo` (the main job): start a node, load the synthetic world, show recommendations
//! with explanations and a latency summary, keep serving until interrupted.
//! `recsys simulate`: users with hidden preferences consume recommendations and emit events.
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::signal::unix::{signal, Signal, SignalKind};

use super::bench::{self, BenchSpec};
use super::load;
use crate::api::pb;
use crate::api::pb::recommender_client::RecommenderClient;
use crate::world::World;
use crate::{out, outln};

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
    check_ports_free(&spec)?;
    // SIGTERM (and SIGHUP, a closed terminal) stops the nodes as Ctrl-C does, at any point.
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut hup = signal(SignalKind::hangup()).context("SIGHUP handler")?;
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let mut children = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let dir = spec.data_dir.join(id);
        let metrics = format!("{}:{}", spec.host, spec.metrics_base_port as usize + i);
        outln!("== starting node {id} on {} (metrics {metrics}, data in {})", addrs[i], dir.display());
        let seeds: Vec<&str> = addrs.iter().filter(|a| **a != addrs[i]).map(|a| a.as_str()).collect();
        let mut cmd = tokio::process::Command::new(&exe);
        cmd.args(["node", "--node-id", id, "--listen", &addrs[i], "--data-dir"])
            .arg(&dir)
            .arg("--config")
            .arg(&spec.config)
            .args(["--metrics-listen", &metrics, "--initial-nodes", &ids.join(",")])
            .kill_on_drop(true);
        // A node also gets SIGTERM when the demo dies without stopping it (SIGKILL). This runs on
        // the thread that called block_on, the main thread, which lives as long as the process.
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
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
        sig = stop_signal(&mut term, &mut hup, &mut int) => {
            Err(anyhow::anyhow!("{sig} before the demo finished: the nodes were stopped"))
        }
    };
    let last = addrs.last().cloned().unwrap_or_default();
    // A failure is reported once, by main, after the nodes have stopped.
    if result.is_ok() && !spec.exit_after {
        // The binary as the user would type it from here (target/release/recsys from the repo).
        let cwd = std::env::current_dir().unwrap_or_default();
        let bin = exe.strip_prefix(&cwd).unwrap_or(&exe).display();
        outln!("\nServing until interrupted (Ctrl-C or SIGTERM to pid {}). Try:", std::process::id());
        outln!("  {bin} status --addr {}", addrs[0]);
        outln!("  {bin} recommend --addr {last} --user u42 --k 10 --explain");
        outln!("  {bin} bench --addr {last} --concurrency 4 --requests 2000");
        outln!("  status page: http://{}:{}/status   (metrics: /metrics)", spec.host, spec.metrics_base_port);
        let exited = futures::future::select_all(children.iter_mut().map(|c| Box::pin(c.wait())));
        tokio::select! {
            sig = stop_signal(&mut term, &mut hup, &mut int) => eprintln!("{sig}: stopping the nodes"),
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

/// The first of SIGTERM, SIGHUP or SIGINT, by name.
async fn stop_signal(term: &mut Signal, hup: &mut Signal, int: &mut Signal) -> &'static str {
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = hup.recv() => "SIGHUP",
        _ = int.recv() => "SIGINT",
    }
}

/// Refuses to start when a port a node needs is taken (another cluster, an earlier demo): its
/// nodes would fail to bind only after the demo had asked the other cluster for status and data.
/// Names the port, its use and, where /proc tells, the process holding it.
fn check_ports_free(spec: &DemoSpec) -> anyhow::Result<()> {
    for i in 0..spec.nodes {
        let grpc = spec.base_port as usize + i;
        let metrics = spec.metrics_base_port as usize + i;
        for (port, what, udp) in [(grpc, "gRPC", false), (grpc, "gossip (UDP)", true), (metrics, "metrics", false)] {
            let addr = format!("{}:{port}", spec.host);
            let bound = if udp {
                std::net::UdpSocket::bind(&addr).map(drop)
            } else {
                std::net::TcpListener::bind(&addr).map(drop)
            };
            match bound {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                    let by = port_holder(port as u16, udp).map(|p| format!(" by {p}")).unwrap_or_default();
                    anyhow::bail!(
                        "{addr} (n{}'s {what} port) is already in use{by}: stop that process (another \
                         cluster? `cluster/local.sh down`) or pick free ports with --base-port and \
                         --metrics-base-port",
                        i + 1
                    );
                }
                Err(e) => anyhow::bail!("{addr} (n{}'s {what} port): {e}", i + 1),
            }
        }
    }
    Ok(())
}

/// `pid 4242 (recsys node --node-id n1 …)`: the process with a socket bound to `port` (listening,
/// for TCP), found through /proc/net and /proc/PID/fd. None where /proc does not tell (another
/// user's process without root, another network namespace).
fn port_holder(port: u16, udp: bool) -> Option<String> {
    let tables: &[&str] = if udp { &["/proc/net/udp", "/proc/net/udp6"] } else { &["/proc/net/tcp", "/proc/net/tcp6"] };
    let inodes: Vec<String> = tables
        .iter()
        .filter_map(|t| std::fs::read_to_string(t).ok())
        .flat_map(|text| {
            text.lines()
                .skip(1)
                .filter_map(|l| {
                    let f: Vec<&str> = l.split_whitespace().collect();
                    let local_port = u16::from_str_radix(f.get(1)?.rsplit(':').next()?, 16).ok()?;
                    // TCP: only the listening socket (state 0A); UDP: any bound socket.
                    let state_ok = udp || f.get(3) == Some(&"0A");
                    (local_port == port && state_ok).then(|| f.get(9).map(|s| s.to_string())).flatten()
                })
                .collect::<Vec<_>>()
        })
        .filter(|inode| inode != "0")
        .collect();
    if inodes.is_empty() {
        return None;
    }
    let wanted: Vec<String> = inodes.iter().map(|i| format!("socket:[{i}]")).collect();
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().filter(|n| n.bytes().all(|b| b.is_ascii_digit())) else { continue };
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else { continue };
        let holds = fds
            .flatten()
            .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|l| wanted.iter().any(|w| l.as_os_str() == w.as_str())));
        if holds {
            let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            let mut cmd: String = cmdline
                .split(|b| *b == 0)
                .filter(|a| !a.is_empty())
                .map(String::from_utf8_lossy)
                .collect::<Vec<_>>()
                .join(" ");
            if cmd.chars().count() > 80 {
                cmd = cmd.chars().take(80).collect::<String>() + "…";
            }
            return Some(format!("pid {pid} ({cmd})"));
        }
    }
    None
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
    outln!("\n== cluster status (from n1)");
    super::print_status(&status);
    let world = Arc::new(World::generate(load::synthetic_spec(spec.seed, spec.items, spec.users, spec.events)));
    let marker = spec.data_dir.join(format!("loaded-{}-{}-{}-{}", spec.seed, spec.items, spec.users, spec.events));
    if marker.exists() {
        outln!("== data already loaded (seed {}): the restart kept it", spec.seed);
    } else {
        outln!(
            "\n== loading synthetic world through n1: {} items, {} users, {} events (seed {})",
            spec.items,
            spec.users,
            spec.events,
            spec.seed
        );
        let s = load::load_world_with(ch.clone(), &token, world.clone(), 5000, false).await?;
        outln!(
            "   loaded {} items, {} users, {} events ({} duplicates) in {:.1}s",
            s.items,
            s.users,
            s.events,
            s.duplicates,
            s.seconds
        );
        std::fs::write(&marker, b"")?;
    }
    outln!(
        "\n== recommendations asked of {}, the last node",
        if addrs.len() > 1 { "n".to_string() + &addrs.len().to_string() } else { "n1".into() }
    );
    let ch = super::connect(last).await?;
    let mut rec = RecommenderClient::new(ch.clone());
    for user in ["u1", "u42", "u977", "new-user-without-history"] {
        outln!("\n== Recommend user={user} k=8 explain=true");
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
            outln!("  page 2 (asked of {other}): {}", ids.join(" "));
        }
    }
    outln!("\n== latency summary (400 requests, concurrency 4, through {last})");
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
    out!("{}", report.text);
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
                    crate::domain::Action::Impression => rep.impressions += 1,
                    crate::domain::Action::Click => rep.clicks += 1,
                    crate::domain::Action::Like => rep.likes += 1,
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
