//! Real `target/release/recsys node` processes for one scenario: on 127.0.0.1 with free ports, or
//! each in its own network namespace on a bridge (so a node can be cut off the network). Data dirs
//! live under one temp dir; dropping the cluster kills every node (SIGCONT first, then SIGKILL),
//! removes the namespaces and the bridge, and the temp dir. Nodes also get PR_SET_PDEATHSIG, so
//! they die with the runner even when it is killed itself.
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("{0}")]
    Spawn(String),
    #[error("network namespace setup: {0}")]
    Netns(String),
    #[error("{0}")]
    NotRunning(String),
}

pub struct Node {
    pub id: String,
    pub addr: String,
    pub metrics: String,
    pub child: Option<Child>,
    pub stopped: bool,
    /// Taken out of the cluster on purpose (drained, removed): no longer expected back.
    pub gone: bool,
    /// Health says SERVING since its last start (a client's balancer sends it calls only then).
    pub serving: bool,
    /// Started with `--join` (restarts join again rather than name the initial members).
    pub joined: bool,
    data: PathBuf,
    /// netns mode: the namespace and the bridge-side veth.
    ns: Option<(String, String)>,
}

pub struct Cluster {
    pub dir: PathBuf,
    pub nodes: Vec<Node>,
    config: PathBuf,
    bin: PathBuf,
    netns: Option<Netns>,
    initial: Vec<String>,
}

struct Netns {
    tag: String,
    bridge: String,
    subnet: String,
}

fn free_port() -> Result<u16, ClusterError> {
    for _ in 0..100 {
        let t = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| ClusterError::Spawn(e.to_string()))?;
        let port = t.local_addr().map_err(|e| ClusterError::Spawn(e.to_string()))?.port();
        if std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    Err(ClusterError::Spawn("no free port for TCP and UDP".into()))
}

fn ip(args: &[&str]) -> Result<(), ClusterError> {
    let out = Command::new("ip").args(args).output().map_err(|e| ClusterError::Netns(format!("ip: {e}")))?;
    if !out.status.success() {
        return Err(ClusterError::Netns(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

impl Cluster {
    /// Starts n1..nN with `overrides` laid over config/node.toml.
    pub fn start(
        repo: &Path,
        name: &str,
        n: usize,
        overrides: &str,
        netns: bool,
        dir: PathBuf,
    ) -> Result<Cluster, ClusterError> {
        let config = dir.join("overrides.toml");
        std::fs::write(&config, overrides).map_err(|e| ClusterError::Spawn(e.to_string()))?;
        let initial: Vec<String> = (1..=n).map(|i| format!("n{i}")).collect();
        let mut c = Cluster {
            dir,
            nodes: Vec::new(),
            config,
            bin: repo.join("target/release/recsys"),
            netns: None,
            initial: initial.clone(),
        };
        if netns {
            // Names stay under 15 characters: rc<pid % 100000><b|h|n><i>.
            let tag = format!("rc{}", std::process::id() % 100_000);
            let oct = 100 + std::process::id() % 100;
            let nt = Netns { bridge: format!("{tag}b"), subnet: format!("10.213.{oct}"), tag };
            ip(&["link", "add", &nt.bridge, "type", "bridge"])?;
            c.netns = Some(nt);
            let nt = c.netns.as_ref().expect("set above");
            ip(&["addr", "add", &format!("{}.1/24", nt.subnet), "dev", &nt.bridge])?;
            ip(&["link", "set", &nt.bridge, "up"])?;
        }
        for id in &initial {
            c.add_node(id)?;
            let _ = name;
        }
        for i in 0..c.nodes.len() {
            c.spawn(i, false)?;
        }
        Ok(c)
    }

    /// Allocates an address (and in netns mode a namespace) for a new node id.
    pub fn add_node(&mut self, id: &str) -> Result<usize, ClusterError> {
        let i = self.nodes.len();
        let data = self.dir.join(id);
        let (addr, metrics, ns) = match &self.netns {
            None => (format!("127.0.0.1:{}", free_port()?), format!("127.0.0.1:{}", free_port()?), None),
            Some(nt) => {
                let ns = format!("{}n{}", nt.tag, i + 1);
                let host = format!("{}h{}", nt.tag, i + 1);
                let peer = format!("{}p{}", nt.tag, i + 1);
                let a = format!("{}.{}", nt.subnet, 10 + i);
                ip(&["netns", "add", &ns])?;
                ip(&["link", "add", &host, "type", "veth", "peer", "name", &peer])?;
                ip(&["link", "set", &peer, "netns", &ns])?;
                ip(&["link", "set", &host, "master", &nt.bridge, "up"])?;
                ip(&["-n", &ns, "addr", "add", &format!("{a}/24"), "dev", &peer])?;
                ip(&["-n", &ns, "link", "set", &peer, "up"])?;
                ip(&["-n", &ns, "link", "set", "lo", "up"])?;
                (format!("{a}:7400"), format!("{a}:9400"), Some((ns, host)))
            }
        };
        self.nodes.push(Node {
            id: id.to_string(),
            addr,
            metrics,
            child: None,
            stopped: false,
            gone: false,
            serving: false,
            joined: false,
            data,
            ns,
        });
        Ok(i)
    }

    pub fn index(&self, id: &str) -> Result<usize, ClusterError> {
        self.nodes.iter().position(|n| n.id == id).ok_or_else(|| ClusterError::NotRunning(format!("no node {id}")))
    }

    /// Starts node i (again) on its address and data dir; `join`: as a node joining a running
    /// cluster (`--join`, seeds = the others) instead of one of the initial members.
    pub fn spawn(&mut self, i: usize, join: bool) -> Result<(), ClusterError> {
        let join = join || self.nodes[i].joined;
        let me = &self.nodes[i];
        let seeds: Vec<&str> =
            self.nodes.iter().filter(|n| n.id != me.id && !n.gone).map(|n| n.addr.as_str()).collect();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("{}.log", me.id)))
            .map_err(|e| ClusterError::Spawn(e.to_string()))?;
        let log2 = log.try_clone().map_err(|e| ClusterError::Spawn(e.to_string()))?;
        let mut cmd = match &me.ns {
            Some((ns, _)) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&self.bin);
                c
            }
            None => Command::new(&self.bin),
        };
        cmd.args(["node", "--config", "config/node.toml", "--config"])
            .arg(&self.config)
            .args(["--node-id", &me.id, "--listen", &me.addr, "--data-dir"])
            .arg(&me.data)
            .args(["--seeds", &seeds.join(","), "--metrics-listen", &me.metrics, "--log-format", "json"]);
        if join {
            cmd.arg("--join");
        } else {
            cmd.args(["--initial-nodes", &self.initial.join(",")]);
        }
        cmd.env("RUST_LOG", "warn,recsys::node=info").stdin(Stdio::null()).stdout(log).stderr(log2);
        // SAFETY: prctl(PR_SET_PDEATHSIG) in the child before exec; async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|e| ClusterError::Spawn(format!("{}: {e}", self.bin.display())))?;
        let n = &mut self.nodes[i];
        n.child = Some(child);
        n.stopped = false;
        n.serving = false;
        n.joined = join;
        Ok(())
    }

    pub fn running(&self, i: usize) -> bool {
        self.nodes[i].child.is_some()
    }

    /// Answers calls: running and not stopped.
    pub fn answering(&self, i: usize) -> bool {
        self.running(i) && !self.nodes[i].stopped
    }

    pub fn signal(&mut self, i: usize, sig: i32) -> Result<(), ClusterError> {
        let n = &mut self.nodes[i];
        let child = n.child.as_mut().ok_or_else(|| ClusterError::NotRunning(format!("{} is not running", n.id)))?;
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(child.id() as i32, sig) };
        match sig {
            libc::SIGKILL => {
                let _ = child.wait();
                n.child = None;
                n.stopped = false;
            }
            libc::SIGSTOP => n.stopped = true,
            libc::SIGCONT => n.stopped = false,
            _ => {}
        }
        Ok(())
    }

    /// netns mode: the node's link to the bridge goes down (isolate) or up (heal).
    pub fn link(&self, i: usize, up: bool) -> Result<(), ClusterError> {
        let (_, host) = self.nodes[i]
            .ns
            .as_ref()
            .ok_or_else(|| ClusterError::Netns("isolate/heal need `network = \"netns\"`".into()))?;
        ip(&["link", "set", host, if up { "up" } else { "down" }])
    }

    /// The node exited by itself (a drained node stops): reap it.
    pub fn reap(&mut self, i: usize) -> bool {
        let n = &mut self.nodes[i];
        match n.child.as_mut().map(|c| c.try_wait()) {
            Some(Ok(Some(_))) => {
                n.child = None;
                true
            }
            _ => n.child.is_none(),
        }
    }

    /// The last lines of a node's log (for a failed scenario's report).
    pub fn log_tail(&self, id: &str, lines: usize) -> String {
        let text = std::fs::read_to_string(self.dir.join(format!("{id}.log"))).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    pub fn wait_timeout() -> Duration {
        Duration::from_secs(90)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            if let Some(mut c) = n.child.take() {
                // SAFETY: signals to our own children.
                unsafe {
                    libc::kill(c.id() as i32, libc::SIGCONT);
                    libc::kill(c.id() as i32, libc::SIGKILL);
                }
                let _ = c.wait();
            }
            if let Some((ns, _)) = &n.ns {
                let _ = ip(&["netns", "del", ns]);
            }
        }
        if let Some(nt) = &self.netns {
            let _ = ip(&["link", "del", &nt.bridge]);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
