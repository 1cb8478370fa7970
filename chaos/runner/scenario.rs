//! A scenario file (`chaos/scenarios/NAME.toml`): the cluster, the load and the fault schedule.
use std::path::{Path, PathBuf};

use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    #[serde(skip)]
    pub name: String,
    pub description: String,
    /// In the quick subset (`chaos/run --short`, run by scripts/test.sh).
    #[serde(default)]
    pub short: bool,
    /// Nodes n1..nN started with the cluster.
    pub nodes: usize,
    pub replication: u32,
    /// "loopback" (127.0.0.1, free ports) or "netns" (each node in its own network namespace on a
    /// bridge, so a node can be cut off the network for real).
    #[serde(default = "loopback")]
    pub network: String,
    /// Recommend calls per second (open loop) and event batches (40 events each) per second.
    pub recommend_rate: f64,
    pub event_batch_rate: f64,
    pub duration_secs: f64,
    /// Each Recommend call's deadline (grpc-timeout).
    pub deadline_ms: u64,
    /// Nodes the load is sent to (a client's balancer routes around failed nodes); default: the
    /// nodes no node-level action targets.
    #[serde(default)]
    pub load_nodes: Vec<String>,
    /// Synthetic world: items, users, events loaded before the load starts.
    #[serde(default = "world_default")]
    pub world: [usize; 3],
    /// A capability this scenario needs from the node binary ("membership": join/drain/remove);
    /// without it the scenario is reported pending, not run.
    #[serde(default)]
    pub requires: Vec<String>,
    /// Extra TOML laid over the runner's node overrides.
    #[serde(default)]
    pub config: String,
    /// Judged on safety alone (no acknowledged write missing, copies converged, every ring epoch
    /// decided once); availability is reported, not a bar (the nemesis).
    #[serde(default)]
    pub safety_only: bool,
    pub schedule: Vec<Step>,
}

fn loopback() -> String {
    "loopback".into()
}

fn world_default() -> [usize; 3] {
    [3000, 300, 20_000]
}

/// At `at_secs` after the load started: one action.
#[derive(Debug, Clone, Deserialize)]
pub struct Step {
    pub at_secs: f64,
    #[serde(flatten)]
    pub action: Action,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case", deny_unknown_fields)]
pub enum Action {
    /// SIGKILL the node's process.
    Sigkill {
        node: String,
    },
    /// SIGSTOP / SIGCONT the node's process.
    Sigstop {
        node: String,
    },
    Sigcont {
        node: String,
    },
    /// Start a killed node again on its data dir.
    Restart {
        node: String,
    },
    /// Start every killed node (not drained or removed) again.
    RestartKilled,
    /// Admin.InjectFault kill_actor on `node`: role generator|feature (partition: the first one
    /// the node holds when omitted) or scorer (index).
    KillActor {
        node: String,
        role: String,
        partition: Option<u32>,
        #[serde(default)]
        index: u32,
    },
    /// Admin.InjectFault delay_partition.
    Delay {
        node: String,
        role: String,
        partition: Option<u32>,
        delay_ms: u32,
        for_ms: u32,
    },
    /// Admin.InjectFault fail_rpcs.
    FailRpcs {
        node: String,
        for_ms: u32,
        #[serde(default)]
        outbound: bool,
    },
    /// Admin.InjectFault clock_offset: the node's clock is `offset_ms` off for `for_ms`.
    ClockOffset {
        node: String,
        offset_ms: i32,
        for_ms: u32,
    },
    /// Cut the node off the network (netns scenarios: its veth goes down) / put it back.
    Isolate {
        node: String,
    },
    Heal {
        node: String,
    },
    /// Start a new node with `--join` (seeds: the running nodes).
    Join {
        node: String,
    },
    /// `recsys drain --node N --wait` / `recsys remove --node N --wait` through a load node.
    Drain {
        node: String,
    },
    Remove {
        node: String,
    },
    /// SIGKILL the source node of the first partition move ClusterStatus lists (waits for one,
    /// bounded).
    KillMoveSource,
}

impl Action {
    pub fn describe(&self) -> String {
        match self {
            Action::Sigkill { node } => format!("SIGKILL {node}"),
            Action::Sigstop { node } => format!("SIGSTOP {node}"),
            Action::Sigcont { node } => format!("SIGCONT {node}"),
            Action::Restart { node } => format!("restart {node}"),
            Action::RestartKilled => "restart the killed nodes".into(),
            Action::KillActor { node, role, partition, index } => match (role.as_str(), partition) {
                ("scorer", _) => format!("kill scorer {index} on {node}"),
                (_, Some(p)) => format!("kill {role}/{p} on {node}"),
                (_, None) => format!("kill a {role} actor on {node}"),
            },
            Action::Delay { node, role, delay_ms, for_ms, .. } => {
                format!("delay a {role} partition on {node} by {delay_ms} ms for {for_ms} ms")
            }
            Action::FailRpcs { node, for_ms, outbound } => {
                format!("fail {node}'s internal rpcs for {for_ms} ms (outbound: {outbound})")
            }
            Action::ClockOffset { node, offset_ms, for_ms } => {
                format!("step {node}'s clock by {offset_ms:+} ms for {for_ms} ms")
            }
            Action::Isolate { node } => format!("isolate {node}"),
            Action::Heal { node } => format!("heal {node}"),
            Action::Join { node } => format!("join {node}"),
            Action::Drain { node } => format!("drain {node}"),
            Action::Remove { node } => format!("remove {node}"),
            Action::KillMoveSource => "SIGKILL the source of a move".into(),
        }
    }
}

impl Scenario {
    pub fn load(path: &Path) -> Result<Self, ScenarioError> {
        let bad = |message: String| ScenarioError::Invalid { path: path.to_path_buf(), message };
        let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
        let mut s: Scenario = toml::from_str(&text).map_err(|e| bad(e.to_string()))?;
        s.name = path.file_stem().and_then(|n| n.to_str()).unwrap_or("scenario").to_string();
        if s.nodes == 0 || s.nodes > 9 {
            return Err(bad("nodes: must be in 1..=9".into()));
        }
        if s.replication == 0 || s.replication as usize > s.nodes {
            return Err(bad("replication: must be in 1..=nodes".into()));
        }
        let rates_ok = s.recommend_rate > 0.0 && s.recommend_rate <= 500.0;
        if !rates_ok || !(0.0..=50.0).contains(&s.event_batch_rate) {
            return Err(bad("recommend_rate must be in (0, 500], event_batch_rate in [0, 50]".into()));
        }
        if !(1.0..=600.0).contains(&s.duration_secs) || s.deadline_ms == 0 {
            return Err(bad("duration_secs must be in [1, 600] and deadline_ms positive".into()));
        }
        if !["loopback", "netns"].contains(&s.network.as_str()) {
            return Err(bad(format!("network: `{}` is not loopback or netns", s.network)));
        }
        if s.schedule.windows(2).any(|w| w[1].at_secs < w[0].at_secs) {
            return Err(bad("schedule: steps must be in time order".into()));
        }
        if s.load_nodes.is_empty() {
            // Every node, the faulted ones included: the client finds out what a client can.
            s.load_nodes = (1..=s.nodes).map(|i| format!("n{i}")).collect();
        }
        if s.load_nodes.is_empty() {
            return Err(bad("load_nodes: no node left to send the load to".into()));
        }
        Ok(s)
    }
}

/// A randomized fault schedule (Jepsen's nemesis) drawn from `seed`: one episode at a time, each a
/// kill and restart, a freeze and resume, a network isolation and heal (netns), failed internal
/// RPCs, a clock stepped forward or back (up to 30 s, within the internal MAC's window), or a
/// membership change (a node joins; a joined node is drained, or killed and removed),
/// under load through every node. Membership changes are at least 20 s apart.
pub fn nemesis(seed: u64, seconds: f64, netns: bool) -> Scenario {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut schedule = Vec::new();
    let mut step = |at: f64, action: Action| schedule.push(Step { at_secs: (at * 10.0).round() / 10.0, action });
    let mut members: Vec<String> = (1..=3).map(|i| format!("n{i}")).collect();
    let mut joined: Vec<String> = Vec::new();
    let mut next_id = 4;
    let mut last_change = f64::NEG_INFINITY;
    let mut t = 4.0;
    // The last 12 s are quiet: every fault has ended before the checks.
    while t < seconds - 12.0 {
        let kinds = if netns { 8 } else { 7 };
        let kind = rng.random_range(0..kinds);
        let target = members[rng.random_range(0..members.len())].clone();
        let membership_ok = t - last_change >= 20.0;
        let end = match kind {
            0 => {
                let d = rng.random_range(2.0..7.0);
                step(t, Action::Sigkill { node: target.clone() });
                step(t + d, Action::Restart { node: target });
                t + d
            }
            1 => {
                let d = rng.random_range(0.5..3.0);
                step(t, Action::Sigstop { node: target.clone() });
                step(t + d, Action::Sigcont { node: target });
                t + d
            }
            2 => {
                let d = rng.random_range(1000..5000u32);
                step(t, Action::FailRpcs { node: target, for_ms: d, outbound: rng.random_bool(0.5) });
                t + f64::from(d) / 1000.0
            }
            3 if membership_ok && next_id <= 6 => {
                let node = format!("n{next_id}");
                next_id += 1;
                step(t, Action::Join { node: node.clone() });
                members.push(node.clone());
                joined.push(node);
                last_change = t;
                t + 3.0
            }
            4 if membership_ok && !joined.is_empty() => {
                let node = joined.remove(rng.random_range(0..joined.len()));
                members.retain(|m| *m != node);
                step(t, Action::Drain { node });
                last_change = t;
                t + 3.0
            }
            5 if membership_ok && !joined.is_empty() => {
                let node = joined.remove(rng.random_range(0..joined.len()));
                members.retain(|m| *m != node);
                step(t, Action::Sigkill { node: node.clone() });
                step(t + 2.0, Action::Remove { node });
                last_change = t;
                t + 3.0
            }
            6 => {
                let d = rng.random_range(2000..8000u32);
                let offset = rng.random_range(1000..30_000i32) * if rng.random_bool(0.5) { 1 } else { -1 };
                step(t, Action::ClockOffset { node: target, offset_ms: offset, for_ms: d });
                t + f64::from(d) / 1000.0
            }
            7 => {
                let d = rng.random_range(1.0..5.0);
                step(t, Action::Isolate { node: target.clone() });
                step(t + d, Action::Heal { node: target });
                t + d
            }
            _ => t,
        };
        t = end + rng.random_range(1.5..4.0);
    }
    Scenario {
        name: format!("nemesis-{seed}"),
        description: format!("randomized nemesis, seed {seed}, {seconds} s{}", if netns { ", netns" } else { "" }),
        short: false,
        nodes: 3,
        replication: 2,
        network: if netns { "netns" } else { "loopback" }.into(),
        recommend_rate: 20.0,
        event_batch_rate: 4.0,
        duration_secs: seconds,
        deadline_ms: 300,
        load_nodes: (1..=3).map(|i| format!("n{i}")).collect(),
        world: world_default(),
        requires: vec!["membership".into()],
        config: String::new(),
        safety_only: true,
        schedule,
    }
}
