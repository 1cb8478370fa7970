//! `recsys-chaos` (run it as `chaos/run [--short] [--markdown FILE] [SCENARIO…]`): runs fault
//! scenarios (`chaos/scenarios/*.toml`) against real node processes and prints one row each:
//! requests, answered within deadline, degraded, p99 during the fault, acknowledged writes lost,
//! time until full coverage. Exits non-zero when a scenario misses its bar (≥ 99.9 % of Recommend
//! calls answered within their deadline — degraded answers count, errors do not — and no
//! acknowledged write lost).
mod balancer;
mod cluster;
mod scenario;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use recsys::api::pb;
use recsys::api::pb::admin_client::AdminClient;
use recsys::api::pb::ingest_client::IngestClient;
use recsys::api::pb::recommender_client::RecommenderClient;
use recsys::cli::load::{load_world, synthetic_spec};
use recsys::world::World;
use tonic::transport::Channel;

use cluster::Cluster;
use scenario::{Action, Scenario};

const EVENTS_PER_BATCH: usize = 40;
/// Recommend calls in flight at once (beyond it a call counts as an error: the client is the
/// bottleneck, not the cluster).
const MAX_IN_FLIGHT: usize = 512;
/// How long after the last scheduled action "during the fault" lasts for the p99 column.
const FAULT_TAIL: Duration = Duration::from_secs(5);
const COVERAGE_LIMIT: Duration = Duration::from_secs(120);

/// The checkout whose `target/release/recsys`, scenarios and configs a run uses: this crate's,
/// or `RECSYS_CHAOS_REPO` (a frozen copy, so a long run is not cut by a rebuild of the checkout).
fn repo() -> PathBuf {
    match std::env::var_os("RECSYS_CHAOS_REPO") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => PathBuf::from(env!("CARGO_MANIFEST_DIR")),
    }
}

struct Args {
    short: bool,
    markdown: Option<PathBuf>,
    scenarios: Vec<String>,
    /// `--nemesis` / `--seed N`: run one randomized schedule drawn from the seed.
    nemesis: Option<u64>,
    seconds: f64,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut a = Args { short: false, markdown: None, scenarios: Vec::new(), nemesis: None, seconds: 120.0 };
    let mut it = std::env::args().skip(1);
    while let Some(x) = it.next() {
        match x.as_str() {
            "--short" => a.short = true,
            "--nemesis" => a.nemesis = Some(0),
            "--seed" => {
                let v = it.next().context("--seed needs a number")?;
                a.nemesis = Some(v.parse().with_context(|| format!("--seed `{v}`: not a number"))?);
            }
            "--seconds" => {
                let v = it.next().context("--seconds needs a number")?;
                let secs: f64 = v.parse().with_context(|| format!("--seconds `{v}`: not a number"))?;
                if !(30.0..=3600.0).contains(&secs) {
                    bail!("--seconds {secs}: must be in 30..=3600");
                }
                a.seconds = secs;
            }
            "--markdown" => a.markdown = Some(it.next().context("--markdown needs a file")?.into()),
            "-h" | "--help" => {
                println!(
                    "usage: chaos/run [--short] [--markdown FILE] [SCENARIO…]  (names in chaos/scenarios/)\n       \
                     chaos/run --nemesis --seed N --seconds S [--markdown FILE]  (a randomized fault schedule)"
                );
                std::process::exit(0);
            }
            s if s.starts_with('-') => bail!("unknown flag {s}"),
            s => a.scenarios.push(s.to_string()),
        }
    }
    Ok(a)
}

#[derive(Default)]
struct Calls {
    /// (sent at, since the load started; latency; outcome)
    done: Vec<(Duration, Duration, Outcome)>,
    errors: Vec<String>,
}

#[derive(Clone, Copy, PartialEq)]
enum Outcome {
    Ok,
    Degraded,
    Late,
    Error,
}

#[derive(Default)]
struct Writes {
    ledger: Vec<Vec<pb::Event>>,
    errors: usize,
    first_error: Option<String>,
}

struct Row {
    name: String,
    status: String,
    requests: usize,
    answered_pct: f64,
    degraded_pct: f64,
    p99_fault_ms: Option<f64>,
    acked: usize,
    lost: Option<usize>,
    coverage_s: Option<f64>,
    pass: bool,
    notes: Vec<String>,
}

fn events(world: &World, tag: &str, batch: usize) -> Vec<pb::Event> {
    (0..EVENTS_PER_BATCH)
        .map(|j| {
            let i = (batch * EVENTS_PER_BATCH + j) * 7 % world.items.len();
            pb::Event {
                event_id: format!("chaos-{tag}-{batch}-{j}"),
                user_id: world.users[(batch + j) % world.users.len()].id.clone(),
                item_id: world.items[i].id.clone(),
                action: if j % 4 == 0 { pb::Action::Like } else { pb::Action::Click } as i32,
                event_time_ms: world.spec.now * 1000,
                geo: "us".into(),
                request_id: String::new(),
            }
        })
        .collect()
}

/// The ClusterStatus fields a membership change adds (`moves = 18`, `target_members = 19`),
/// decoded beside the ones this build knows, so the runner's join/drain/remove actions compile
/// before that change lands. Move's field numbers are assumed in the order the interface lists
/// them (role, partition, from, to, bytes_done, bytes_total, eta_ms).
#[derive(Clone, PartialEq, prost::Message)]
struct StatusLite {
    #[prost(message, repeated, tag = "1")]
    nodes: Vec<pb::NodeStatus>,
    #[prost(uint32, tag = "5")]
    replication_factor: u32,
    #[prost(message, repeated, tag = "11")]
    partitions: Vec<pb::PartitionReplicas>,
    #[prost(message, repeated, tag = "18")]
    moves: Vec<MoveLite>,
    #[prost(string, repeated, tag = "19")]
    target_members: Vec<String>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct MoveLite {
    #[prost(string, tag = "1")]
    role: String,
    #[prost(uint32, tag = "2")]
    partition: u32,
    #[prost(string, tag = "3")]
    from: String,
    #[prost(string, tag = "4")]
    to: String,
}

async fn status_lite(addr: &str, limit: Duration) -> anyhow::Result<StatusLite> {
    let fut = async {
        let ch = recsys::cli::connect(addr).await?;
        let mut g = tonic::client::Grpc::new(ch);
        g.ready().await.context("admin channel")?;
        let path = http::uri::PathAndQuery::from_static("/recsys.v1.Admin/ClusterStatus");
        let codec = tonic_prost::ProstCodec::<pb::ClusterStatusRequest, StatusLite>::default();
        let mut req = tonic::Request::new(pb::ClusterStatusRequest {});
        req.set_timeout(limit);
        let r = g.unary(req, path, codec).await.map_err(|s| anyhow::anyhow!("{:?}: {}", s.code(), s.message()))?;
        anyhow::Ok(r.into_inner())
    };
    tokio::time::timeout(limit, fut).await.map_err(|_| anyhow::anyhow!("{addr}: status timed out"))?
}

async fn status(addr: &str) -> anyhow::Result<pb::ClusterStatusResponse> {
    let fut = async {
        let ch = recsys::cli::connect(addr).await?;
        let mut req = tonic::Request::new(pb::ClusterStatusRequest {});
        req.set_timeout(Duration::from_secs(2));
        let r = AdminClient::new(ch)
            .cluster_status(req)
            .await
            .map_err(|s| anyhow::anyhow!("{:?}: {}", s.code(), s.message()))?;
        anyhow::Ok(r.into_inner())
    };
    tokio::time::timeout(Duration::from_secs(3), fut).await.map_err(|_| anyhow::anyhow!("{addr}: status timed out"))?
}

/// Full coverage as every answering node sees it: no membership change in progress, the expected
/// members listed, and every partition with R live replicas.
async fn full_coverage(c: &Mutex<Cluster>, r: u32) -> bool {
    let (addrs, expected): (Vec<String>, Vec<String>) = {
        let c = c.lock().unwrap_or_else(|e| e.into_inner());
        let addrs = (0..c.nodes.len()).filter(|i| c.answering(*i)).map(|i| c.nodes[i].addr.clone()).collect();
        let expected = c.nodes.iter().filter(|n| !n.gone).map(|n| n.id.clone()).collect();
        (addrs, expected)
    };
    if addrs.is_empty() {
        return false;
    }
    for a in addrs {
        let Ok(s) = status_lite(&a, Duration::from_secs(1)).await else { return false };
        if !s.target_members.is_empty() {
            return false;
        }
        let members: Vec<&String> = s.nodes.iter().map(|n| &n.node_id).collect();
        if expected.iter().any(|e| !members.contains(&e)) {
            return false;
        }
        let r = r.min(s.replication_factor.max(1)) as usize;
        if s.partitions.iter().any(|p| p.live.iter().filter(|l| **l).count() < r) {
            return false;
        }
    }
    true
}

/// Waits (bounded) until every partition's copies on `nodes` hold identical op sets, compared
/// whole and read-only (`recsys::verify::divergent`); the last difference when they do not.
async fn converged(nodes: &[(String, String)], partitions: u32, limit: Duration) -> Result<(), String> {
    let end = Instant::now() + limit;
    loop {
        let last = match recsys::verify::divergent(nodes, partitions, None).await {
            Ok(d) if d.is_empty() => return Ok(()),
            Ok(d) => format!("{} partitions differ, e.g. {}", d.len(), d[0]),
            Err(e) => e.to_string(),
        };
        if Instant::now() >= end {
            return Err(last);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Does this build have the membership commands (join/drain/remove)?
fn has_membership(repo: &Path) -> bool {
    std::process::Command::new(repo.join("target/release/recsys"))
        .args(["drain", "--help"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn overrides(s: &Scenario) -> String {
    format!(
        "[cluster]\nreplication_factor = {}\nanti_entropy_interval_ms = 2000\n\
         [scoring]\nscorers = 1\n[store]\ncache_capacity_mb = 16\n[ingest]\nreplica_timeout_ms = 2000\n\
         [chaos]\nenabled = true\n{}\n",
        s.replication, s.config
    )
}

async fn inject(addr: &str, fault: pb::inject_fault_request::Fault) -> anyhow::Result<String> {
    let ch = recsys::cli::connect(addr).await?;
    let mut req = tonic::Request::new(pb::InjectFaultRequest { fault: Some(fault) });
    req.set_timeout(Duration::from_secs(5));
    let r = AdminClient::new(ch)
        .inject_fault(req)
        .await
        .map_err(|s| anyhow::anyhow!("InjectFault on {addr}: {:?}: {}", s.code(), s.message()))?;
    Ok(r.into_inner().fault)
}

/// The first partition of `role` held on the node at `addr`.
async fn held_partition(addr: &str, role: &str) -> anyhow::Result<u32> {
    let s = status(addr).await?;
    s.partitions
        .iter()
        .find(|p| p.role == role && !p.fingerprint_here.is_empty())
        .map(|p| p.partition)
        .with_context(|| format!("{addr} holds no {role} partition"))
}

/// A CLI command of the node binary (drain/remove), bounded.
async fn recsys_cmd(args: Vec<String>, limit: Duration) -> anyhow::Result<()> {
    let mut cmd = tokio::process::Command::new(repo().join("target/release/recsys"));
    cmd.args(&args).kill_on_drop(true);
    let out = tokio::time::timeout(limit, cmd.output())
        .await
        .map_err(|_| anyhow::anyhow!("recsys {} did not finish in {limit:?}", args.join(" ")))??;
    if !out.status.success() {
        bail!("recsys {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

type Job = Box<dyn FnOnce() + Send>;

/// Runs `f` on the one thread that starts node processes. They get PR_SET_PDEATHSIG, which fires
/// when the *thread* that forked them exits (a tokio blocking thread retires after 10 s idle), so
/// they are all forked from this thread, which lives as long as the runner. Blocking work, off the
/// async workers; the queue is bounded.
async fn on_spawner<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> anyhow::Result<T> {
    static TX: std::sync::OnceLock<std::sync::mpsc::SyncSender<Job>> = std::sync::OnceLock::new();
    let tx = TX.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Job>(16);
        std::thread::Builder::new()
            .name("node-spawner".into())
            .spawn(move || {
                for job in rx {
                    job();
                }
            })
            .expect("spawner thread");
        tx
    });
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let job: Job = Box::new(move || {
        let _ = done_tx.send(f());
    });
    let tx = tx.clone();
    // A full queue blocks the sender: hand it over from a blocking thread.
    tokio::task::spawn_blocking(move || tx.send(job)).await?.map_err(|_| anyhow::anyhow!("spawner thread gone"))?;
    done_rx.await.map_err(|_| anyhow::anyhow!("spawner dropped the job"))
}

/// Process and network actions: signals, spawns, `ip` commands — blocking, run off the async workers.
fn process_action(c: &Mutex<Cluster>, a: &Action) -> anyhow::Result<String> {
    let lock = || c.lock().unwrap_or_else(|e| e.into_inner());
    match a {
        Action::Sigkill { node } => {
            let mut c = lock();
            let i = c.index(node)?;
            c.signal(i, libc::SIGKILL)?;
        }
        Action::Sigstop { node } => {
            let mut c = lock();
            let i = c.index(node)?;
            c.signal(i, libc::SIGSTOP)?;
        }
        Action::Sigcont { node } => {
            let mut c = lock();
            let i = c.index(node)?;
            c.signal(i, libc::SIGCONT)?;
        }
        Action::Restart { node } => {
            let mut c = lock();
            let i = c.index(node)?;
            c.spawn(i, false)?;
        }
        Action::RestartKilled => {
            let mut c = lock();
            let dead: Vec<usize> = (0..c.nodes.len()).filter(|i| !c.nodes[*i].gone && !c.running(*i)).collect();
            for i in &dead {
                c.spawn(*i, false)?;
            }
            let ids: Vec<&str> = dead.iter().map(|i| c.nodes[*i].id.as_str()).collect();
            return Ok(format!("restarted {}", ids.join(",")));
        }
        Action::Isolate { node } | Action::Heal { node } => {
            let c = lock();
            c.link(c.index(node)?, matches!(a, Action::Heal { .. }))?;
        }
        Action::Join { node } => {
            let mut c = lock();
            let i = c.add_node(node)?;
            c.spawn(i, true)?;
        }
        _ => bail!("not a process action: {}", a.describe()),
    }
    Ok(a.describe())
}

async fn apply(c: &Arc<Mutex<Cluster>>, a: &Action, load_addr: &str) -> anyhow::Result<String> {
    use pb::inject_fault_request::Fault;
    let lock = || c.lock().unwrap_or_else(|e| e.into_inner());
    let addr_of = |id: &str| -> anyhow::Result<String> {
        let c = lock();
        Ok(c.nodes[c.index(id)?].addr.clone())
    };
    match a {
        Action::KillActor { node, role, partition, index } => {
            let addr = addr_of(node)?;
            let partition = match (role.as_str(), partition) {
                ("scorer", _) => 0,
                (_, Some(p)) => *p,
                (r, None) => held_partition(&addr, r).await?,
            };
            let f = pb::KillActorFault { role: role.clone(), partition, index: *index };
            return inject(&addr, Fault::KillActor(f)).await;
        }
        Action::Delay { node, role, partition, delay_ms, for_ms } => {
            let addr = addr_of(node)?;
            let partition = match partition {
                Some(p) => *p,
                None => held_partition(&addr, role).await?,
            };
            let f =
                pb::DelayPartitionFault { role: role.clone(), partition, delay_ms: *delay_ms, duration_ms: *for_ms };
            return inject(&addr, Fault::DelayPartition(f)).await;
        }
        Action::ClockOffset { node, offset_ms, for_ms } => {
            let addr = addr_of(node)?;
            let f = pb::ClockOffsetFault { offset_ms: *offset_ms, duration_ms: *for_ms };
            return inject(&addr, Fault::ClockOffset(f)).await;
        }
        Action::FailRpcs { node, for_ms, outbound } => {
            let addr = addr_of(node)?;
            let f = pb::FailRpcsFault { duration_ms: *for_ms, outbound: *outbound };
            return inject(&addr, Fault::FailRpcs(f)).await;
        }
        Action::Drain { node } | Action::Remove { node } => {
            let verb = if matches!(a, Action::Drain { .. }) { "drain" } else { "remove" };
            {
                let mut c = lock();
                let i = c.index(node)?;
                c.nodes[i].gone = true;
            }
            let args = ["--addr", load_addr, "--node", node, "--wait"].map(String::from);
            let mut all = vec![verb.to_string()];
            all.extend(args);
            // In the background: the load goes on while partitions move.
            let c2 = c.clone();
            let node = node.clone();
            tokio::spawn(async move {
                if let Err(e) = recsys_cmd(all, Duration::from_secs(300)).await {
                    eprintln!("  {e}");
                }
                let mut c = c2.lock().unwrap_or_else(|e| e.into_inner());
                if let Ok(i) = c.index(&node) {
                    c.reap(i);
                }
            });
        }
        Action::KillMoveSource => {
            let end = Instant::now() + Duration::from_secs(30);
            loop {
                let s = status_lite(load_addr, Duration::from_secs(1)).await?;
                if let Some(m) = s.moves.first() {
                    let mut c = lock();
                    let i = c.index(&m.from)?;
                    c.signal(i, libc::SIGKILL)?;
                    return Ok(format!("SIGKILL {} (source of {}/{} → {})", m.from, m.role, m.partition, m.to));
                }
                if Instant::now() >= end {
                    bail!("no partition move appeared within 30 s");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        // Signals, spawns, `ip`: blocking, off the async workers.
        other => {
            let (c2, a) = (c.clone(), other.clone());
            let done = on_spawner(move || process_action(&c2, &a)).await??;
            // A (re)started node gets calls once its health says SERVING (polled, bounded).
            let starting: Vec<(usize, String)> = {
                let c = lock();
                (0..c.nodes.len())
                    .filter(|i| c.running(*i) && !c.nodes[*i].serving)
                    .map(|i| (i, c.nodes[i].addr.clone()))
                    .collect()
            };
            for (i, addr) in starting {
                let c = c.clone();
                tokio::spawn(async move {
                    if recsys::cli::wait_serving(&addr, Duration::from_secs(120)).await.is_ok() {
                        c.lock().unwrap_or_else(|e| e.into_inner()).nodes[i].serving = true;
                    }
                });
            }
            return Ok(done);
        }
    }
    Ok(a.describe())
}

/// Sums a counter's series by its label value over the node's /metrics (plain HTTP/1.1 GET).
fn scrape_counter(addr: &str, metric: &str, into: &mut std::collections::BTreeMap<String, f64>) {
    use std::io::{Read, Write};
    let Ok(sa) = addr.parse::<std::net::SocketAddr>() else { return };
    let Ok(mut s) = std::net::TcpStream::connect_timeout(&sa, Duration::from_secs(1)) else { return };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if write!(s, "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").is_err() {
        return;
    }
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    for l in body.lines().filter(|l| l.starts_with(&format!("{metric}{{"))) {
        let label = l.split('"').nth(1).unwrap_or("").to_string();
        let v: f64 = l.rsplit(' ').next().and_then(|v| v.parse().ok()).unwrap_or(0.0);
        *into.entry(label).or_default() += v;
    }
}

fn percentile(mut v: Vec<f64>, q: f64) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let i = ((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1;
    Some(v[i])
}

async fn run_scenario(s: &Scenario) -> anyhow::Result<Row> {
    let repo = repo();
    let dir = std::env::temp_dir().join(format!("recsys-chaos-{}-{}", s.name, std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let (name, n, ov, netns) = (s.name.clone(), s.nodes, overrides(s), s.network == "netns");
    let cluster = on_spawner(move || Cluster::start(&repo, &name, n, &ov, netns, dir)).await??;
    let cluster = Arc::new(Mutex::new(cluster));
    let res = drive(s, &cluster).await;
    if let Err(e) = &res {
        let mut c = cluster.lock().unwrap_or_else(|e| e.into_inner());
        eprintln!("{}: {e:#}", s.name);
        for i in 0..c.nodes.len() {
            let state = match c.nodes[i].child.as_mut().map(|ch| ch.try_wait()) {
                None => "not running (killed or never started)".to_string(),
                Some(Ok(None)) => "running".to_string(),
                Some(Ok(Some(st))) => format!("exited: {st}"),
                Some(Err(e)) => e.to_string(),
            };
            let n = &c.nodes[i];
            eprintln!("--- {} at {}: {state}; log (last lines) ---\n{}", n.id, n.addr, c.log_tail(&n.id, 15));
        }
    }
    // Dropping the cluster (the last Arc) kills the nodes and removes the temp dir: blocking work.
    tokio::task::spawn_blocking(move || drop(cluster)).await?;
    res
}

async fn drive(s: &Scenario, cluster: &Arc<Mutex<Cluster>>) -> anyhow::Result<Row> {
    let t0 = Instant::now();
    let addrs: Vec<String> =
        cluster.lock().unwrap_or_else(|e| e.into_inner()).nodes.iter().map(|n| n.addr.clone()).collect();
    // Bounded wait for SERVING; a node that exited (bad config, no ONNX Runtime) fails at once.
    let end = Instant::now() + Cluster::wait_timeout();
    for (i, a) in addrs.iter().enumerate() {
        while recsys::cli::wait_serving(a, Duration::from_secs(1)).await.is_err() {
            let mut c = cluster.lock().unwrap_or_else(|e| e.into_inner());
            if c.reap(i) {
                bail!("{} exited during start-up", c.nodes[i].id);
            }
            if Instant::now() >= end {
                bail!("{} not SERVING after {:?}", c.nodes[i].id, Cluster::wait_timeout());
            }
        }
        cluster.lock().unwrap_or_else(|e| e.into_inner()).nodes[i].serving = true;
    }
    // Every node routes to every other (gossip up, flap debounce passed) before the world is loaded.
    let end = Instant::now() + Duration::from_secs(30);
    while !full_coverage(cluster, s.replication).await {
        if Instant::now() >= end {
            bail!("the cluster did not reach full coverage within 30 s of start-up");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let [items, users, evs] = s.world;
    let world = Arc::new(World::generate(synthetic_spec(21, items, users, evs)));
    load_world(recsys::cli::connect(&addrs[0]).await?, world.clone(), 2000, true).await?;
    let (load_idx, load_addrs): (Vec<usize>, Vec<String>) = {
        let c = cluster.lock().unwrap_or_else(|e| e.into_inner());
        let idx = s.load_nodes.iter().map(|id| c.index(id)).collect::<Result<Vec<_>, _>>()?;
        let addrs = idx.iter().map(|i| c.nodes[*i].addr.clone()).collect();
        (idx, addrs)
    };
    println!(
        "{}: {} nodes up and loaded in {:.1} s; load on {} for {} s",
        s.name,
        s.nodes,
        t0.elapsed().as_secs_f64(),
        s.load_nodes.join(","),
        s.duration_secs
    );
    let lb = balancer::Balancer::new(&load_addrs)?;
    let recs: Vec<RecommenderClient<Channel>> = lb.channels.iter().map(|c| RecommenderClient::new(c.clone())).collect();
    let ings: Vec<IngestClient<Channel>> = lb.channels.iter().map(|c| IngestClient::new(c.clone())).collect();
    let duration = Duration::from_secs_f64(s.duration_secs);
    let _ = &load_idx;
    let prober = lb.probe(Instant::now() + duration + Duration::from_secs(5));
    let deadline = Duration::from_millis(s.deadline_ms);
    let start = Instant::now();
    let calls = Arc::new(Mutex::new(Calls::default()));
    let writes = Arc::new(Mutex::new(Writes::default()));

    // Writer: one batch in flight at a time, at event_batch_rate; acknowledged batches go in the ledger.
    let writer = (s.event_batch_rate > 0.0).then(|| {
        let (w, world, ings, tag) = (writes.clone(), world.clone(), ings.clone(), s.name.clone());
        let lb = lb.clone();
        let every = Duration::from_secs_f64(1.0 / s.event_batch_rate);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut batch = 0;
            while start.elapsed() < duration {
                tick.tick().await;
                let evs = events(&world, &tag, batch);
                // The same balancer as the Recommend calls. A batch whose call never reached a
                // server is sent once more through another node (events are idempotent by id).
                let res = lb
                    .call_twice(Duration::from_secs(5), |k, left| {
                        let mut c = ings[k].clone();
                        let mut r = tonic::Request::new(pb::LogEventsRequest { events: evs.clone() });
                        r.set_timeout(left);
                        async move { c.log_events(r).await }
                    })
                    .await;
                let mut w = w.lock().unwrap_or_else(|e| e.into_inner());
                match res {
                    Ok(Ok(_)) => w.ledger.push(evs),
                    Ok(Err(e)) => {
                        w.errors += 1;
                        w.first_error.get_or_insert(format!("{:?}: {}", e.code(), e.message()));
                    }
                    Err(_) => {
                        w.errors += 1;
                        w.first_error.get_or_insert("no reply within 6 s".into());
                    }
                }
                batch += 1;
            }
        })
    });

    // The schedule, in its own task (an action may wait, e.g. for a move to appear).
    let last_at = s.schedule.last().map(|st| Duration::from_secs_f64(st.at_secs));
    let first_at = s.schedule.first().map(|st| Duration::from_secs_f64(st.at_secs));
    let coverage_t0: Arc<Mutex<Option<Instant>>> = Arc::default();
    let sched = {
        let (steps, c, la, ct0) = (s.schedule.clone(), cluster.clone(), load_addrs[0].clone(), coverage_t0.clone());
        tokio::spawn(async move {
            let mut log = Vec::new();
            let n = steps.len();
            for (k, st) in steps.into_iter().enumerate() {
                let at = start + Duration::from_secs_f64(st.at_secs);
                tokio::time::sleep_until(at.into()).await;
                let r = apply(&c, &st.action, &la).await;
                let when = start.elapsed().as_secs_f64();
                match r {
                    Ok(d) => {
                        println!("  t={when:.1}s {d}");
                        log.push(d);
                    }
                    Err(e) => return Err(e.context(format!("step at {} s: {}", st.at_secs, st.action.describe()))),
                }
                if k + 1 == n {
                    *ct0.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
                }
            }
            anyhow::Ok(log)
        })
    };

    // Coverage observer: from the last action, until every partition has R live replicas again.
    let cov = {
        let (c, ct0, r) = (cluster.clone(), coverage_t0.clone(), s.replication);
        tokio::spawn(async move {
            let t = loop {
                if let Some(t) = *ct0.lock().unwrap_or_else(|e| e.into_inner()) {
                    break t;
                }
                if start.elapsed() > duration + COVERAGE_LIMIT {
                    return None;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            };
            while t.elapsed() < COVERAGE_LIMIT {
                if full_coverage(&c, r).await {
                    return Some(t.elapsed());
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            None
        })
    };

    // Open-loop Recommend load.
    let sem = Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT));
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / s.recommend_rate));
    let mut tasks = Vec::new();
    let mut n = 0usize;
    while start.elapsed() < duration {
        tick.tick().await;
        let sent = start.elapsed();
        let Ok(permit) = sem.clone().try_acquire_owned() else {
            let mut c = calls.lock().unwrap_or_else(|e| e.into_inner());
            c.done.push((sent, Duration::ZERO, Outcome::Error));
            c.errors.push("client: too many calls in flight".into());
            continue;
        };
        // The client's balancer: only what a client observes (health, its own errors).
        let user = world.users[(n * 37) % world.users.len()].id.clone();
        let calls = calls.clone();
        let (lb, recs) = (lb.clone(), recs.clone());
        tasks.push(tokio::spawn(async move {
            let _permit = permit;
            let t = Instant::now();
            let res = lb
                .call_twice(deadline, |k, left| {
                    let mut client = recs[k].clone();
                    let mut r = tonic::Request::new(pb::RecommendRequest {
                        user_id: user.clone(),
                        surface: "home".into(),
                        k: 10,
                        ..Default::default()
                    });
                    r.set_timeout(left);
                    async move { client.recommend(r).await }
                })
                .await;
            let lat = t.elapsed();
            let mut c = calls.lock().unwrap_or_else(|e| e.into_inner());
            let outcome = match res {
                Ok(Ok(r)) if lat > deadline => {
                    let _ = r;
                    Outcome::Late
                }
                Ok(Ok(r)) => {
                    if r.into_inner().coverage.is_some_and(|c| c.degraded) {
                        Outcome::Degraded
                    } else {
                        Outcome::Ok
                    }
                }
                Ok(Err(e)) => {
                    c.errors.push(format!("{:?}: {}", e.code(), e.message()));
                    Outcome::Error
                }
                Err(_) => {
                    c.errors.push("no reply within 3× the deadline".into());
                    Outcome::Error
                }
            };
            c.done.push((sent, lat, outcome));
        }));
        n += 1;
    }
    for t in tasks {
        t.await?;
    }
    if let Some(w) = writer {
        w.await?;
    }
    let actions = sched.await??;
    // Any node still frozen is resumed (a schedule without its SIGCONT).
    {
        let mut c = cluster.lock().unwrap_or_else(|e| e.into_inner());
        for i in 0..c.nodes.len() {
            if c.nodes[i].stopped {
                c.signal(i, libc::SIGCONT)?;
            }
        }
    }
    let coverage = cov.await?;

    prober.abort();
    // The ledger, read-only (`recsys::verify`): every acknowledged event must be on every one of
    // R copies, asked of each copy; nothing is re-sent, so a loss cannot be repaired away. Then
    // the copies must hold identical op sets (compared whole, not by the digest anti-entropy
    // equalises). A node still down, copies that never converge, or missing coverage fail.
    let mut notes = Vec::new();
    let mut fail = Vec::new();
    let all_up = {
        let c = cluster.lock().unwrap_or_else(|e| e.into_inner());
        c.nodes.iter().enumerate().all(|(i, n)| n.gone || c.answering(i))
    };
    if !all_up {
        fail.push("a node is still down at the end: its copies cannot be checked".to_string());
    }
    let nodes: Vec<(String, String)> = {
        let c = cluster.lock().unwrap_or_else(|e| e.into_inner());
        (0..c.nodes.len())
            .filter(|i| c.answering(*i) && !c.nodes[*i].gone)
            .map(|i| (c.nodes[i].id.clone(), c.nodes[i].addr.clone()))
            .collect()
    };
    let partitions = status(&nodes.first().map(|n| n.1.clone()).unwrap_or_default()).await?.partitions_per_role;
    let w = std::mem::take(&mut *writes.lock().unwrap_or_else(|e| e.into_inner()));
    let check =
        recsys::verify::ledger(&nodes, w.ledger.iter().flatten(), partitions, s.replication as usize, None).await?;
    let lost = check.missing;
    if !check.problems.is_empty() {
        notes.push(format!("ledger: {}", check.problems.iter().take(3).cloned().collect::<Vec<_>>().join("; ")));
    }
    match converged(&nodes, partitions, Duration::from_secs(30)).await {
        Ok(()) => {}
        Err(d) => fail.push(format!("copies had not converged 30 s after the load: {d}")),
    }
    // The metadata log, read from every node: one history, each ring epoch decided once.
    match recsys::verify::metadata(&nodes, None).await {
        Ok(m) => {
            notes.push(format!("metadata log: {} entries, {} ring epochs, each decided once", m.entries, m.epochs));
            fail.extend(m.problems);
        }
        Err(e) => fail.push(format!("metadata log: {e}")),
    }
    if coverage.is_none() && first_at.is_some() {
        fail.push("full coverage was not reached again after the last action".to_string());
    }
    if w.errors > 0 {
        notes.push(format!(
            "{} write batches refused (not acknowledged, not in the ledger), first: {}",
            w.errors,
            w.first_error.unwrap_or_default()
        ));
    }

    let c = std::mem::take(&mut *calls.lock().unwrap_or_else(|e| e.into_inner()));
    let requests = c.done.len();
    let answered = c.done.iter().filter(|d| matches!(d.2, Outcome::Ok | Outcome::Degraded)).count();
    let degraded = c.done.iter().filter(|d| d.2 == Outcome::Degraded).count();
    let late = c.done.iter().filter(|d| d.2 == Outcome::Late).count();
    let window = first_at.zip(last_at).map(|(f, l)| (f, l + FAULT_TAIL));
    let p99 = window.and_then(|(from, to)| {
        let v: Vec<f64> = c
            .done
            .iter()
            .filter(|d| d.0 >= from && d.0 <= to && d.2 != Outcome::Error)
            .map(|d| d.1.as_secs_f64() * 1000.0)
            .collect();
        percentile(v, 0.99)
    });
    if late > 0 {
        notes.push(format!("{late} replies arrived after their deadline"));
    }
    if !c.errors.is_empty() {
        let mut kinds: Vec<String> = c.errors.clone();
        kinds.sort();
        kinds.dedup();
        notes.push(format!(
            "{} errors, e.g. {}",
            c.errors.len(),
            kinds.iter().take(3).cloned().collect::<Vec<_>>().join(" | ")
        ));
    }
    // Actor restarts the supervisors counted (the nodes' own metrics; blocking reads off the workers).
    let metrics: Vec<String> = {
        let c = cluster.lock().unwrap_or_else(|e| e.into_inner());
        (0..c.nodes.len()).filter(|i| c.answering(*i)).map(|i| c.nodes[i].metrics.clone()).collect()
    };
    let restarts = tokio::task::spawn_blocking(move || {
        let mut m = std::collections::BTreeMap::new();
        for a in &metrics {
            scrape_counter(a, "recsys_actor_restarts_total", &mut m);
        }
        m
    })
    .await?;
    let restarted: Vec<String> = restarts.iter().filter(|(_, v)| **v > 0.0).map(|(k, v)| format!("{k} {v}")).collect();
    if !restarted.is_empty() {
        notes.push(format!("actor restarts (recsys_actor_restarts_total, live nodes): {}", restarted.join(", ")));
    }
    let answered_pct = 100.0 * answered as f64 / requests.max(1) as f64;
    let available = answered_pct >= 99.9 || s.safety_only;
    let pass = requests > 0 && available && lost == 0 && fail.is_empty();
    notes.extend(fail);
    let _ = actions;
    Ok(Row {
        name: s.name.clone(),
        status: if pass { "pass".into() } else { "FAIL".into() },
        requests,
        answered_pct,
        degraded_pct: 100.0 * degraded as f64 / requests.max(1) as f64,
        p99_fault_ms: p99,
        acked: w.ledger.len() * EVENTS_PER_BATCH,
        lost: Some(lost),
        coverage_s: coverage.map(|d| d.as_secs_f64()),
        pass,
        notes,
    })
}

fn pending(s: &Scenario, why: &str) -> Row {
    Row {
        name: s.name.clone(),
        status: format!("pending ({why})"),
        requests: 0,
        answered_pct: 0.0,
        degraded_pct: 0.0,
        p99_fault_ms: None,
        acked: 0,
        lost: None,
        coverage_s: None,
        pass: false,
        notes: vec![],
    }
}

fn cells(r: &Row) -> [String; 8] {
    let pending = r.lost.is_none();
    let dash = || "—".to_string();
    [
        r.name.clone(),
        if pending { dash() } else { r.requests.to_string() },
        if pending { dash() } else { format!("{:.2} %", r.answered_pct) },
        if pending { dash() } else { format!("{:.1} %", r.degraded_pct) },
        r.p99_fault_ms.map(|v| format!("{v:.0} ms")).unwrap_or_else(dash),
        match r.lost {
            Some(l) => format!("{l} of {}", r.acked),
            None => dash(),
        },
        match (pending, r.coverage_s) {
            (true, _) => dash(),
            // The observer polls every ~0.1 s: a faster recovery shows as "< 0.1 s".
            (false, Some(s)) if s < 0.1 => "< 0.1 s".into(),
            (false, Some(s)) => format!("{s:.1} s"),
            (false, None) => "not within 120 s".into(),
        },
        r.status.clone(),
    ]
}

const HEADER: [&str; 8] = [
    "scenario",
    "requests",
    "answered within deadline",
    "degraded",
    "p99 during fault",
    "acked writes lost",
    "time to full coverage",
    "result",
];

fn print_table(rows: &[Row]) {
    let all: Vec<[String; 8]> = std::iter::once(HEADER.map(String::from)).chain(rows.iter().map(cells)).collect();
    let widths: Vec<usize> = (0..8).map(|k| all.iter().map(|r| r[k].chars().count()).max().unwrap_or(0)).collect();
    for r in &all {
        let line: Vec<String> = r.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        println!("{}", line.join("  ").trim_end());
    }
    for r in rows.iter().filter(|r| !r.notes.is_empty()) {
        for n in &r.notes {
            println!("  {}: {n}", r.name);
        }
    }
}

fn markdown(rows: &[Row]) -> String {
    let mut s = format!("| {} |\n|{}\n", HEADER.join(" | "), "---|".repeat(8));
    for r in rows {
        s.push_str(&format!("| {} |\n", cells(r).join(" | ")));
    }
    s
}

fn scenario_files(dir: &Path, names: &[String]) -> anyhow::Result<Vec<PathBuf>> {
    if names.is_empty() {
        let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
            .with_context(|| dir.display().to_string())?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "toml"))
            .collect();
        v.sort();
        return Ok(v);
    }
    names
        .iter()
        .map(|n| {
            let p = PathBuf::from(n);
            if p.is_file() {
                Ok(p)
            } else {
                let q = dir.join(format!("{}.toml", n.trim_end_matches(".toml")));
                if q.is_file() {
                    Ok(q)
                } else {
                    bail!("no scenario `{n}` (looked for {} and {})", p.display(), q.display())
                }
            }
        })
        .collect()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> std::process::ExitCode {
    match real_main().await {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => std::process::ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}

async fn real_main() -> anyhow::Result<bool> {
    let args = parse_args()?;
    let repo = repo();
    std::env::set_current_dir(&repo)?;
    if !repo.join("target/release/recsys").is_file() {
        bail!("target/release/recsys is missing: run chaos/run (it builds it) or cargo build --release");
    }
    let files = match args.nemesis {
        Some(_) => Vec::new(),
        None => scenario_files(&repo.join("chaos/scenarios"), &args.scenarios)?,
    };
    let mut scenarios = Vec::new();
    if let Some(seed) = args.nemesis {
        // Network isolation needs namespaces (root and `ip`); without them the nemesis draws none.
        // SAFETY: geteuid has no preconditions and cannot fail.
        let root = unsafe { libc::geteuid() } == 0;
        let netns = root && (Path::new("/usr/sbin/ip").exists() || Path::new("/sbin/ip").exists());
        let s = scenario::nemesis(seed, args.seconds, netns);
        println!("nemesis seed {seed}: {} steps", s.schedule.len());
        for st in &s.schedule {
            println!("  t={:.1}s {}", st.at_secs, st.action.describe());
        }
        scenarios.push(s);
    }
    for f in files {
        let s = Scenario::load(&f)?;
        if !args.short || s.short || !args.scenarios.is_empty() {
            scenarios.push(s);
        }
    }
    let (membership, started) = {
        let r = repo.clone();
        tokio::task::spawn_blocking(move || (has_membership(&r), chrono_free_now())).await?
    };
    let mut rows = Vec::new();
    for s in &scenarios {
        println!("== {}: {}", s.name, s.description);
        let needs_membership = s.requires.iter().any(|r| r == "membership");
        if needs_membership && !membership {
            println!("   pending: this build has no `recsys drain` (node join/drain/remove not merged yet)");
            rows.push(pending(s, "needs join/drain/remove")); // `pass` is false: pending fails
            continue;
        }
        let t = Instant::now();
        let row = match run_scenario(s).await {
            Ok(r) => r,
            Err(e) => {
                let mut r = pending(s, "");
                r.status = "FAIL (did not run through)".into();
                r.pass = false;
                r.lost = Some(0);
                r.notes.push(format!("{e:#}"));
                r
            }
        };
        println!("   {} in {:.0} s", row.status, t.elapsed().as_secs_f64());
        rows.push(row);
    }
    println!();
    print_table(&rows);
    if let Some(p) = &args.markdown {
        let text = format!(
            "Run of {started} ({} scenarios, `chaos/run{}`):\n\n{}",
            rows.len(),
            if args.short { " --short" } else { "" },
            markdown(&rows)
        );
        std::fs::write(p, text).with_context(|| p.display().to_string())?;
        println!("\nmarkdown table written to {}", p.display());
    }
    Ok(rows.iter().all(|r| r.pass))
}

/// UTC date and time from the system clock, without a date crate.
fn chrono_free_now() -> String {
    let out = std::process::Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"]).output();
    out.ok().map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string()).unwrap_or_default()
}
