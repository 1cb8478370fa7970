//! Helpers for tests that run real `recsys node` processes.
#![allow(dead_code)]
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

pub struct NodeProc {
    pub child: Child,
    pub addr: String,
    pub lines: mpsc::Receiver<String>,
}

/// A fresh directory under the system temp dir, removed when dropped (also when a test fails),
/// so test runs leave nothing behind in /tmp.
pub struct TempDir(PathBuf);

impl std::ops::Deref for TempDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for TempDir {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn temp_dir(name: &str) -> TempDir {
    let d = std::env::temp_dir().join(format!("recsys-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    TempDir(d)
}

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Forwards a child's stdout and stderr lines (stderr prefixed) to one channel.
fn output_lines(child: &mut Child) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    let out = child.stdout.take().unwrap();
    let err = child.stderr.take().unwrap();
    let tx2 = tx.clone();
    std::thread::spawn(move || {
        for l in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    std::thread::spawn(move || {
        for l in BufReader::new(err).lines().map_while(Result::ok) {
            let _ = tx2.send(format!("stderr: {l}"));
        }
    });
    rx
}

/// Starts a node on an ephemeral port and returns once it has printed its address.
pub fn start_node(data_dir: &Path, extra: &[&str]) -> Result<NodeProc, String> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_recsys"))
        .current_dir(repo())
        .args(["node", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data_dir)
        .args(extra)
        .args(["--log-format", "json"])
        .env("RUST_LOG", "warn,recsys::node=info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    let rx = output_lines(&mut child);
    let mut seen = Vec::new();
    loop {
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(l) => {
                if let Some(addr) = listening_addr(&l) {
                    return Ok(NodeProc { child, addr, lines: rx });
                }
                seen.push(l);
            }
            Err(_) => {
                let _ = child.kill();
                let status = child.wait().map(|s| s.to_string()).unwrap_or_default();
                return Err(format!("node did not start ({status}); output:\n{}", seen.join("\n")));
            }
        }
    }
}

/// The gRPC address from the node's JSON log event `listening ...` (field `local`).
fn listening_addr(line: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(line.strip_prefix("stderr: ")?).ok()?;
    if !v["message"].as_str()?.starts_with("listening") {
        return None;
    }
    v["local"].as_str().map(String::from)
}

impl NodeProc {
    /// SIGTERM and wait for a clean exit.
    pub fn stop(mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
        let status = self.child.wait().unwrap();
        std::mem::forget(self);
        status
    }

    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        std::mem::forget(self);
    }

    /// Waits for a line of output containing `needle`.
    pub fn wait_line(&self, needle: &str, limit: Duration) -> Option<String> {
        let end = std::time::Instant::now() + limit;
        while let Some(left) = end.checked_duration_since(std::time::Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(l) if l.contains(needle) => return Some(l),
                Ok(_) => {}
                Err(_) => return None,
            }
        }
        None
    }
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `recsys node` expecting it to refuse to start; returns its combined output.
pub fn node_fails(data_dir: &Path, extra: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_recsys"))
        .current_dir(repo())
        .args(["node", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data_dir)
        .args(extra)
        .output()
        .unwrap();
    assert!(!out.status.success(), "node started but should have refused");
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// A free loopback port for both TCP (gRPC) and UDP (gossip), never one this test process
/// handed out before: a port is only probed, not held, so the OS may offer it again to the next
/// call, and two nodes of one cluster would then fight over it.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    for _ in 0..100 {
        let t = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = t.local_addr().unwrap().port();
        let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
        if !given.contains(&port) && std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            given.push(port);
            return port;
        }
    }
    panic!("no free port for TCP and UDP");
}

/// A local cluster of real `recsys node` processes on loopback, n1..nN.
pub struct Cluster {
    pub dir: TempDir,
    pub ids: Vec<String>,
    pub addrs: Vec<String>,
    /// Each node's metrics listener (`/metrics`, `/status`, `/status.json`).
    pub metrics: Vec<String>,
    pub nodes: Vec<Option<NodeProc>>,
    config: PathBuf,
    /// Nodes n1..n{initial} formed the first ring; later ones were started with `--join`.
    initial: usize,
    /// A config file laid over `overrides` for one node only (per-node TLS certificates).
    node_configs: Vec<Option<PathBuf>>,
}

impl Cluster {
    /// `overrides` is TOML laid over config/node.toml for every node (small worlds, one scorer).
    pub fn start(name: &str, n: usize, overrides: &str) -> Cluster {
        Self::start_with(name, n, overrides, |_| None)
    }

    /// [`Cluster::start`] with a TOML laid over `overrides` for some nodes (`per_node(i)` for n{i+1}).
    pub fn start_with(name: &str, n: usize, overrides: &str, per_node: impl Fn(usize) -> Option<String>) -> Cluster {
        let dir = temp_dir(name);
        let config = dir.join("overrides.toml");
        std::fs::write(&config, overrides).unwrap();
        let ids: Vec<String> = (1..=n).map(|i| format!("n{i}")).collect();
        let addrs: Vec<String> = (0..n).map(|_| format!("127.0.0.1:{}", free_port())).collect();
        let metrics: Vec<String> = (0..n).map(|_| format!("127.0.0.1:{}", free_port())).collect();
        let node_configs = (0..n).map(|i| per_node(i).map(|t| write_node_config(&dir, &ids[i], &t))).collect();
        let mut c = Cluster { dir, ids, addrs, metrics, nodes: Vec::new(), config, initial: n, node_configs };
        for i in 0..n {
            let p = c.spawn(i).unwrap_or_else(|e| panic!("node n{} did not start: {e}", i + 1));
            c.nodes.push(Some(p));
        }
        c
    }

    fn spawn(&self, i: usize) -> Result<NodeProc, String> {
        self.spawn_as(i, i >= self.initial)
    }

    fn spawn_as(&self, i: usize, join: bool) -> Result<NodeProc, String> {
        let seeds: Vec<&str> = self.addrs.iter().filter(|a| **a != self.addrs[i]).map(|a| a.as_str()).collect();
        let data = self.dir.join(&self.ids[i]);
        let mut child = Command::new(env!("CARGO_BIN_EXE_recsys"))
            .current_dir(repo())
            .args(["node", "--config", "config/node.toml", "--config"])
            .arg(&self.config)
            .args(self.node_configs.get(i).cloned().flatten().map(|p| vec!["--config".into(), p]).unwrap_or_default())
            .args(["--node-id", &self.ids[i], "--listen", &self.addrs[i], "--data-dir"])
            .arg(&data)
            .args(["--seeds", &seeds.join(","), "--initial-nodes", &self.ids[..self.initial].join(",")])
            .args(["--metrics-listen", &self.metrics[i]])
            .args(if join { &["--join"][..] } else { &[][..] })
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| e.to_string())?;
        let lines = output_lines(&mut child);
        Ok(NodeProc { child, addr: self.addrs[i].clone(), lines })
    }

    /// Waits (bounded) until every running node's health says SERVING.
    pub async fn wait_serving(&self) {
        for (i, n) in self.nodes.iter().enumerate() {
            if n.is_some() {
                wait_health(&self.addrs[i], Duration::from_secs(90)).await;
            }
        }
    }

    pub fn kill9(&mut self, i: usize) {
        if let Some(n) = self.nodes[i].take() {
            n.kill9();
        }
    }

    pub fn signal(&self, i: usize, sig: &str) {
        let pid = self.nodes[i].as_ref().expect("node running").child.id();
        let ok = Command::new("kill").arg(format!("-{sig}")).arg(pid.to_string()).status().unwrap().success();
        assert!(ok, "kill -{sig} {pid}");
    }

    /// Starts node i again on its port and data dir.
    pub fn restart(&mut self, i: usize) {
        assert!(self.nodes[i].is_none(), "node n{} still running", i + 1);
        self.nodes[i] = Some(self.spawn(i).expect("node restarts"));
    }

    /// Starts node i again on its port and data dir, with `--join`.
    pub fn restart_joining(&mut self, i: usize) {
        assert!(self.nodes[i].is_none(), "node n{} still running", i + 1);
        self.nodes[i] = Some(self.spawn_as(i, true).expect("node restarts"));
    }

    /// Output lines of node i (bounded wait) until one contains `needle`.
    pub fn wait_line(&self, i: usize, needle: &str, limit: Duration) -> Option<String> {
        self.nodes[i].as_ref().expect("node running").wait_line(needle, limit)
    }

    /// Starts one more node, n{N+1}, with `--join` (its partitions are streamed to it before it
    /// serves); returns its index.
    pub fn join(&mut self) -> usize {
        self.join_with(None)
    }

    /// [`Cluster::join`] with a TOML laid over `overrides` for the new node only.
    pub fn join_with(&mut self, node_toml: Option<&str>) -> usize {
        let i = self.ids.len();
        self.ids.push(format!("n{}", i + 1));
        let cfg = node_toml.map(|t| write_node_config(&self.dir, &self.ids[i], t));
        self.node_configs.push(cfg);
        self.addrs.push(format!("127.0.0.1:{}", free_port()));
        self.metrics.push(format!("127.0.0.1:{}", free_port()));
        let p = self.spawn(i).unwrap_or_else(|e| panic!("node n{} did not start: {e}", i + 1));
        self.nodes.push(Some(p));
        i
    }

    /// Waits (bounded) for node i to exit on its own (a drained node stops); its exit status.
    pub async fn wait_exit(&mut self, i: usize, limit: Duration) -> std::process::ExitStatus {
        let mut p = self.nodes[i].take().expect("node running");
        let end = std::time::Instant::now() + limit;
        loop {
            if let Some(st) = p.child.try_wait().unwrap() {
                return st;
            }
            assert!(std::time::Instant::now() < end, "n{} did not stop within {limit:?}", i + 1);
            // Bounded polling of the child's exit, without blocking a runtime worker.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn pid(&self, i: usize) -> u32 {
        self.nodes[i].as_ref().expect("node running").child.id()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for n in self.nodes.iter_mut() {
            if let Some(p) = n.take() {
                // Resume a paused node first, so SIGKILL and wait do not hang on it.
                let _ = Command::new("kill").arg("-CONT").arg(p.child.id().to_string()).status();
                p.kill9();
            }
        }
        // The nodes are stopped; `dir` is removed when the fields drop.
    }
}

fn write_node_config(dir: &Path, id: &str, toml: &str) -> PathBuf {
    let p = dir.join(format!("{id}.toml"));
    std::fs::write(&p, toml).unwrap();
    p
}

/// Waits (bounded, polling health, never a blind sleep) until the node at `addr` is SERVING.
pub async fn wait_health(addr: &str, limit: Duration) {
    recsys::cli::wait_serving(addr, limit).await.unwrap_or_else(|e| panic!("{e}"));
}

/// A plain HTTP/1.1 GET over a fresh connection: (status code, content type, body).
pub fn http_get(addr: &str, path: &str) -> std::io::Result<(u16, String, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let code = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let ctype = head
        .lines()
        .find_map(|l| l.split_once(':').filter(|(k, _)| k.eq_ignore_ascii_case("content-type")))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_default();
    Ok((code, ctype, body.to_string()))
}

/// Resident memory of a process in MiB, from /proc.
pub fn rss_mib(pid: u32) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// One batch of events for a ledger of acknowledged writes: 40 events with ids `{tag}-{batch}-{j}`
/// (deterministic, so a re-sent batch is the same events).
pub fn ledger_events(world: &recsys::world::World, tag: &str, batch: usize) -> Vec<recsys::api::pb::Event> {
    use recsys::api::pb;
    (0..40)
        .map(|j| {
            let i = (batch * 40 + j) * 7 % world.items.len();
            pb::Event {
                event_id: format!("{tag}-{batch}-{j}"),
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

/// Re-sends every acknowledged batch through `addr`: each event must already be logged on every
/// live replica of its partition, so the batch comes back all duplicates.
pub async fn check_ledger(addr: &str, ledger: &[Vec<recsys::api::pb::Event>], via: &str) {
    use recsys::api::pb;
    let ch = recsys::cli::connect(addr).await.unwrap();
    let mut ing = pb::ingest_client::IngestClient::new(ch);
    for (b, evs) in ledger.iter().enumerate() {
        let r = ing.log_events(pb::LogEventsRequest { events: evs.clone() }).await.unwrap().into_inner();
        assert_eq!(
            (r.accepted, r.duplicates),
            (0, evs.len() as u32),
            "acknowledged batch {b} is missing on some replica (re-sent through {via})"
        );
    }
}

/// The cluster as `addr` sees it (Admin.ClusterStatus, no token).
pub async fn status(addr: &str) -> recsys::api::pb::ClusterStatusResponse {
    use recsys::api::pb;
    let ch = recsys::cli::connect(addr).await.unwrap();
    pb::admin_client::AdminClient::new(ch).cluster_status(pb::ClusterStatusRequest {}).await.unwrap().into_inner()
}

/// Waits (bounded, polling status) until the ring, as `addr` sees it, has exactly `members`, no
/// change in progress, every partition's `replication` replicas live, and every live node on the
/// same epoch.
pub async fn wait_settled(
    addr: &str,
    members: &[&str],
    replication: usize,
    limit: Duration,
) -> recsys::api::pb::ClusterStatusResponse {
    use std::collections::HashSet;
    let end = std::time::Instant::now() + limit;
    loop {
        let s = status(addr).await;
        let holding: HashSet<&str> = s
            .nodes
            .iter()
            .filter(|n| n.generator_partitions + n.feature_partitions > 0)
            .map(|n| n.node_id.as_str())
            .collect();
        let want: HashSet<&str> = members.iter().copied().collect();
        let live = s.partitions.iter().all(|p| p.live.iter().all(|l| *l) && p.replicas.len() == replication);
        let agreed = s.nodes.iter().filter(|n| n.live).all(|n| n.ring_epoch == s.ring_epoch);
        if s.target_members.is_empty() && holding == want && live && agreed {
            return s;
        }
        assert!(
            std::time::Instant::now() < end,
            "not settled on {members:?} after {limit:?}: epoch {}, target {:?}, holding {holding:?}, {} moves",
            s.ring_epoch,
            s.target_members,
            s.moves.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A metric's value (summed over the series whose labels contain `labels`) from /metrics.
pub fn metric(metrics_addr: &str, name: &str, labels: &str) -> f64 {
    let Ok((_, _, body)) = http_get(metrics_addr, "/metrics") else { return 0.0 };
    body.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#') && l.contains(labels))
        .filter(|l| l[name.len()..].starts_with([' ', '{']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Read-only ledger check (`recsys::verify`): every acknowledged event's op on every owner,
/// asked of each copy before anything is re-sent. Returns what is wrong (empty: nothing lost).
pub async fn ledger_missing(
    nodes: &[(String, String)],
    ledger: &[Vec<recsys::api::pb::Event>],
    partitions: u32,
    replication: usize,
    secret: Option<&str>,
) -> Vec<String> {
    recsys::verify::ledger(nodes, ledger.iter().flatten(), partitions, replication, secret).await.unwrap().problems
}
