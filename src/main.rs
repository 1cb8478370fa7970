use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use recsys::api::pb;
use recsys::cli;
use recsys::cli::output::{self, LogFormat};
use recsys::config::Config;
use recsys::{out, outln};

#[derive(Parser)]
#[command(name = "recsys", version, about = "A recommendation serving cluster")]
struct Cli {
    /// Log lines on stderr: text (coloured only on a terminal) or json (one object per line).
    #[arg(long, global = true, value_enum, default_value = "text", env = "RECSYS_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a node: gRPC API, partition actors, scorers.
    Node {
        /// Config files; later ones override the keys of earlier ones.
        #[arg(long, default_value = "config/node.toml")]
        config: Vec<PathBuf>,
        #[arg(long)]
        node_id: Option<String>,
        /// gRPC (TCP) and gossip (UDP) address.
        #[arg(long)]
        listen: Option<String>,
        /// Address peers reach this node at (defaults to --listen).
        #[arg(long)]
        advertise_addr: Option<String>,
        /// Comma-separated addresses of other nodes.
        #[arg(long, value_delimiter = ',')]
        seeds: Vec<String>,
        /// Comma-separated node ids the first ring forms over.
        #[arg(long, value_delimiter = ',')]
        initial_nodes: Vec<String>,
        #[arg(long)]
        data_dir: Option<PathBuf>,
        #[arg(long)]
        metrics_listen: Option<String>,
        #[arg(long)]
        models_dir: Option<PathBuf>,
        /// Join the running cluster the seeds belong to: the ring grows by this node and its
        /// partitions are streamed here before it serves (a node with an empty data dir).
        #[arg(long)]
        join: bool,
    },
    /// The main job: start a local cluster (3 nodes by default), load a synthetic world through
    /// one node, show recommendations asked of another, keep serving.
    Demo {
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        #[arg(long, default_value = "127.0.0.1")]
        host: String,
        /// n1 listens on this port, n2 on the next, ...
        #[arg(long, default_value_t = 7401)]
        base_port: u16,
        #[arg(long, default_value_t = 9401)]
        metrics_base_port: u16,
        #[arg(long, default_value = "data/demo")]
        data_dir: PathBuf,
        #[arg(long, default_value = "config/node.toml")]
        config: PathBuf,
        #[arg(long, default_value_t = 42)]
        seed: u64,
        #[arg(long, default_value_t = 100_000)]
        items: usize,
        #[arg(long, default_value_t = 10_000)]
        users: usize,
        #[arg(long, default_value_t = 1_000_000)]
        events: usize,
        /// Stop after the summary instead of serving until interrupted.
        #[arg(long)]
        exit: bool,
    },
    /// Load a synthetic world (or JSON-lines files) through the Ingest API.
    Load {
        /// The node to ask (gRPC address).
        #[arg(long, default_value = cli::DEFAULT_ADDR, env = "RECSYS_ADDR")]
        addr: String,
        #[command(flatten)]
        tls: cli::TlsArgs,
        #[arg(long, default_value_t = 42)]
        seed: u64,
        #[arg(long, default_value_t = 100_000)]
        items: usize,
        #[arg(long, default_value_t = 10_000)]
        users: usize,
        #[arg(long, default_value_t = 1_000_000)]
        events: usize,
        #[arg(long, default_value_t = 5000)]
        batch: usize,
        /// JSON-lines items file instead of the synthetic world.
        #[arg(long)]
        items_file: Option<PathBuf>,
        #[arg(long)]
        users_file: Option<PathBuf>,
        /// JSON-lines events: {"event_id","user","item","action":"click","ts_ms", "geo"?, "request_id"?}.
        #[arg(long)]
        events_file: Option<PathBuf>,
        #[arg(long)]
        quiet: bool,
        /// Operator token for Ingest/Admin calls (a cluster with cluster.operator_token set).
        #[arg(long, env = "RECSYS_OPERATOR_TOKEN", hide_env_values = true)]
        token: Option<String>,
    },
    /// Ask a node for recommendations (any node answers; the reply lists the ranked items, what
    /// each stage covered, fallbacks and per-stage timings).
    Recommend {
        /// The node to ask (gRPC address).
        #[arg(long, default_value = cli::DEFAULT_ADDR, env = "RECSYS_ADDR")]
        addr: String,
        #[command(flatten)]
        tls: cli::TlsArgs,
        /// The user to recommend for (an unknown user gets a cold-start answer from trending).
        #[arg(long)]
        user: String,
        /// How many items per page (1 to the node's serving.max_k, 100 by default).
        #[arg(long, default_value_t = 10)]
        k: u32,
        /// The surface asking (one of the node's serving.surfaces: home, related).
        #[arg(long, default_value = "home")]
        surface: String,
        /// The user's region, to rank trending items of that region first (empty: global only).
        #[arg(long, default_value = "")]
        geo: String,
        /// The next page: the `next_page_token` printed with the previous page (any node serves it).
        #[arg(long, default_value = "")]
        page_token: String,
        /// Print each item's stage-1 score, per-head scores, scorer and defaulted features.
        #[arg(long)]
        explain: bool,
        /// The call's deadline (grpc-timeout) in ms; without it the node uses
        /// serving.default_deadline_ms (250).
        #[arg(long)]
        deadline_ms: Option<u64>,
    },
    /// Exit 0 when the node's gRPC health check says SERVING, else 1 with the status on stderr
    /// (for container health checks and scripts; needs no token).
    Health {
        /// The node to ask (gRPC address).
        #[arg(long, default_value = cli::DEFAULT_ADDR, env = "RECSYS_ADDR")]
        addr: String,
        #[command(flatten)]
        tls: cli::TlsArgs,
        /// Keep asking until SERVING, for up to this many seconds (0: ask once).
        #[arg(long, default_value_t = 0)]
        wait_secs: u64,
    },
    /// Cluster status: nodes, partitions, ring epoch, data counts.
    Status {
        /// The node to ask (gRPC address).
        #[arg(long, default_value = cli::DEFAULT_ADDR, env = "RECSYS_ADDR")]
        addr: String,
        #[command(flatten)]
        tls: cli::TlsArgs,
        /// Operator token for Ingest/Admin calls (a cluster with cluster.operator_token set).
        #[arg(long, env = "RECSYS_OPERATOR_TOKEN", hide_env_values = true)]
        token: Option<String>,
    },
    /// Move every partition of a live node to the other members; the node then leaves and stops.
    Drain {
        /// The node to ask (gRPC address).
        #[arg(long, default_value = cli::DEFAULT_ADDR, env = "RECSYS_ADDR")]
        addr: String,
        #[command(flatten)]
        tls: cli::TlsArgs,
        /// The node to drain (its id).
        #[arg(long)]
        node: String,
        /// Follow the moves until the change is complete.
        #[arg(long)]
        wait: bool,
        #[arg(long, default_value_t = 600)]
        wait_seconds: u64,
        /// Operator token for Admin calls (a cluster with cluster.operator_token set).
        #[arg(long, env = "RECSYS_OPERATOR_TOKEN", hide_env_values = true)]
        token: Option<String>,
    },
    /// Take a dead node out of the ring and re-replicate its partitions from surviving replicas.
    Remove {
        /// The node to ask (gRPC address).
        #[arg(long, default_value = cli::DEFAULT_ADDR, env = "RECSYS_ADDR")]
        addr: String,
        #[command(flatten)]
        tls: cli::TlsArgs,
        #[arg(long)]
        node: String,
        #[arg(long)]
        wait: bool,
        #[arg(long, default_value_t = 600)]
        wait_seconds: u64,
        /// Operator token for Admin calls (a cluster with cluster.operator_token set).
        #[arg(long, env = "RECSYS_OPERATOR_TOKEN", hide_env_values = true)]
        token: Option<String>,
    },
    /// Deploy the model version in a directory without a restart (checked, canaried, then swapped).
    Reload {
        /// The node to ask (gRPC address).
        #[arg(long, default_value = cli::DEFAULT_ADDR, env = "RECSYS_ADDR")]
        addr: String,
        #[command(flatten)]
        tls: cli::TlsArgs,
        /// Directory with manifest.json and the ONNX files, as the node sees it; empty: the node's
        /// configured scoring.models_dir.
        #[arg(long, default_value = "")]
        models_dir: String,
        /// Operator token for Ingest/Admin calls (a cluster with cluster.operator_token set).
        #[arg(long, env = "RECSYS_OPERATOR_TOKEN", hide_env_values = true)]
        token: Option<String>,
    },
    /// Chaos testing: inject a fault on one node (refused unless its config has `[chaos] enabled = true`).
    Fault {
        /// The node to ask (gRPC address).
        #[arg(long, default_value = cli::DEFAULT_ADDR, env = "RECSYS_ADDR")]
        addr: String,
        #[command(flatten)]
        tls: cli::TlsArgs,
        /// Operator token for Admin calls (a cluster with cluster.operator_token set).
        #[arg(long, env = "RECSYS_OPERATOR_TOKEN", hide_env_values = true)]
        token: Option<String>,
        #[command(subcommand)]
        fault: FaultCmd,
    },
    /// Load generator: closed loop at a concurrency, or open loop at a fixed rate.
    Bench {
        /// The node to ask (gRPC address).
        #[arg(long, default_value = cli::DEFAULT_ADDR, env = "RECSYS_ADDR")]
        addr: String,
        #[command(flatten)]
        tls: cli::TlsArgs,
        #[arg(long, default_value_t = 4)]
        concurrency: usize,
        /// Requests per second (open loop); omit for closed loop at --concurrency.
        #[arg(long)]
        rate: Option<f64>,
        #[arg(long, default_value_t = 2000)]
        requests: usize,
        #[arg(long, default_value_t = 60)]
        max_seconds: u64,
        #[arg(long, default_value_t = 10_000)]
        users: usize,
        #[arg(long, default_value_t = 10)]
        k: u32,
        #[arg(long, default_value_t = 250)]
        deadline_ms: u64,
        #[arg(long, default_value_t = 50)]
        warmup: usize,
        /// Operator token for the cluster status reads (CPU and memory per node).
        #[arg(long, env = "RECSYS_OPERATOR_TOKEN", hide_env_values = true)]
        token: Option<String>,
    },
    /// Simulated users consume recommendations and emit events (for training data).
    Simulate {
        /// The node to ask (gRPC address).
        #[arg(long, default_value = cli::DEFAULT_ADDR, env = "RECSYS_ADDR")]
        addr: String,
        #[command(flatten)]
        tls: cli::TlsArgs,
        #[arg(long, default_value_t = 42)]
        seed: u64,
        #[arg(long, default_value_t = 100_000)]
        items: usize,
        #[arg(long, default_value_t = 10_000)]
        users: usize,
        #[arg(long, default_value_t = 5000)]
        requests: usize,
        #[arg(long, default_value_t = 10)]
        k: u32,
    },
}

#[derive(Subcommand)]
enum FaultCmd {
    /// Kill a partition actor (--role generator|feature --partition P) or a scorer (--role scorer
    /// --index I) on the node; its supervisor rebuilds it.
    Kill {
        #[arg(long)]
        role: String,
        #[arg(long, default_value_t = 0)]
        partition: u32,
        #[arg(long, default_value_t = 0)]
        index: u32,
    },
    /// Delay the node's replies for one partition by --ms for --for-ms.
    Delay {
        #[arg(long)]
        role: String,
        #[arg(long)]
        partition: u32,
        #[arg(long)]
        ms: u32,
        #[arg(long)]
        for_ms: u32,
    },
    /// Make the node's internal RPCs fail (UNAVAILABLE) for --for-ms: the ones it serves, and
    /// with --outbound the ones it makes too.
    FailRpcs {
        #[arg(long)]
        for_ms: u32,
        #[arg(long)]
        outbound: bool,
    },
}

impl FaultCmd {
    fn request(self) -> pb::InjectFaultRequest {
        use pb::inject_fault_request::Fault;
        let fault = match self {
            FaultCmd::Kill { role, partition, index } => {
                Fault::KillActor(pb::KillActorFault { role, partition, index })
            }
            FaultCmd::Delay { role, partition, ms, for_ms } => {
                Fault::DelayPartition(pb::DelayPartitionFault { role, partition, delay_ms: ms, duration_ms: for_ms })
            }
            FaultCmd::FailRpcs { for_ms, outbound } => {
                Fault::FailRpcs(pb::FailRpcsFault { duration_ms: for_ms, outbound })
            }
        };
        pb::InjectFaultRequest { fault: Some(fault) }
    }
}

fn main() -> ExitCode {
    // Usage errors: clap prints them (one line + a hint) and exits with 2.
    let cli = Cli::parse();
    let serves = matches!(cli.cmd, Cmd::Node { .. } | Cmd::Demo { .. });
    // A node logs what it does; client commands print their results and log only warnings.
    let filter = if serves { "info,ort=warn,sled=warn,h2=warn,tower=warn" } else { "warn,ort=warn,sled=warn,h2=warn" };
    output::init_logging(cli.log_format, filter);
    // SIGPIPE stays ignored (Rust's default): results go through `outln!`, which stops quietly when
    // stdout's reader has gone away (`recsys recommend ... | head -3`), and a socket closed under a
    // write is a transport error with its message, not a silent death with code 141.
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line, no backtrace: these are the user's mistakes or the world's (a node not
            // running); bugs panic and keep their backtrace.
            eprintln!("error: {}", output::error_line(&e));
            ExitCode::FAILURE
        }
    }
}

impl Cmd {
    /// The TLS flags of a client command (None: a command that runs nodes, configured by `[tls]`).
    fn tls(&self) -> Option<&cli::TlsArgs> {
        match self {
            Cmd::Node { .. } | Cmd::Demo { .. } => None,
            Cmd::Load { tls, .. }
            | Cmd::Recommend { tls, .. }
            | Cmd::Health { tls, .. }
            | Cmd::Status { tls, .. }
            | Cmd::Drain { tls, .. }
            | Cmd::Remove { tls, .. }
            | Cmd::Reload { tls, .. }
            | Cmd::Fault { tls, .. }
            | Cmd::Bench { tls, .. }
            | Cmd::Simulate { tls, .. } => Some(tls),
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    // Client commands dial over TLS with --tls-ca (every connection this process makes).
    if let Some(t) = cli.cmd.tls() {
        t.install()?;
    }
    match cli.cmd {
        Cmd::Node {
            config,
            node_id,
            listen,
            advertise_addr,
            seeds,
            initial_nodes,
            data_dir,
            metrics_listen,
            models_dir,
            join,
        } => {
            let mut cfg = Config::load_layered(&config)?;
            if let Some(v) = advertise_addr {
                cfg.node.advertise_addr = Some(v);
            }
            if !initial_nodes.is_empty() {
                cfg.cluster.initial_nodes = initial_nodes;
            }
            if let Some(v) = node_id {
                cfg.node.node_id = v;
            }
            if let Some(v) = listen {
                cfg.node.listen = v;
            }
            // `--seeds ""` (a cluster of one started by a script) names no seed.
            let seeds: Vec<String> =
                seeds.into_iter().map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect();
            if !seeds.is_empty() {
                cfg.node.seeds = seeds;
            }
            if let Some(v) = data_dir {
                cfg.node.data_dir = v;
            }
            if let Some(v) = metrics_listen {
                cfg.node.metrics_listen = Some(v);
            }
            if let Some(v) = models_dir {
                cfg.scoring.models_dir = v;
            }
            if join {
                cfg.cluster.join = true;
            }
            cfg.validate()?;
            recsys::node::run(cfg).await?;
        }
        Cmd::Demo { nodes, host, base_port, metrics_base_port, data_dir, config, seed, items, users, events, exit } => {
            cli::demo::run(cli::demo::DemoSpec {
                nodes,
                host,
                base_port,
                metrics_base_port,
                data_dir,
                config,
                seed,
                items,
                users,
                events,
                exit_after: exit,
            })
            .await?;
        }
        Cmd::Load {
            addr,
            seed,
            items,
            users,
            events,
            batch,
            items_file,
            users_file,
            events_file,
            quiet,
            token,
            ..
        } => {
            let token = cli::token(token.as_deref())?;
            cli::wait_serving(&addr, Duration::from_secs(120)).await?;
            let ch = cli::connect(&addr).await?;
            let s = if items_file.is_some() || users_file.is_some() || events_file.is_some() {
                let (i, u, e) = (items_file.as_deref(), users_file.as_deref(), events_file.as_deref());
                cli::load::load_files(ch, &token, i, u, e, batch, quiet).await?
            } else {
                let world =
                    Arc::new(recsys::world::World::generate(cli::load::synthetic_spec(seed, items, users, events)));
                cli::load::load_world_with(ch, &token, world, batch, quiet).await?
            };
            outln!(
                "loaded {} items, {} users, {} events ({} duplicates, {} rejected) in {:.1}s",
                s.items,
                s.users,
                s.events,
                s.duplicates,
                s.rejected,
                s.seconds
            );
        }
        Cmd::Recommend { addr, user, k, surface, geo, page_token, explain, deadline_ms, .. } => {
            let ch = cli::connect(&addr).await?;
            let mut c = pb::recommender_client::RecommenderClient::new(ch);
            let mut req = tonic::Request::new(pb::RecommendRequest {
                user_id: user,
                surface,
                k,
                page_token,
                context: Some(pb::RequestContext { geo }),
                explain,
            });
            if let Some(ms) = deadline_ms {
                req.set_timeout(Duration::from_millis(ms));
            }
            match c.recommend(req).await {
                Ok(r) => cli::print_recommendation(&r.into_inner()),
                Err(s) => return Err(output::status_error(s)),
            }
        }
        Cmd::Health { addr, wait_secs, .. } => {
            let status = cli::health(&addr, Duration::from_secs(wait_secs)).await?;
            outln!("{addr}: {status}");
        }
        Cmd::Status { addr, token, .. } => {
            let token = cli::token(token.as_deref())?;
            let ch = cli::connect(&addr).await?;
            let s = match cli::admin_client(ch, &token).cluster_status(pb::ClusterStatusRequest {}).await {
                Ok(r) => r.into_inner(),
                Err(s) => return Err(output::status_error(s)),
            };
            cli::print_status(&s);
        }
        Cmd::Drain { addr, node, wait, wait_seconds, token, .. } => {
            membership_change(&addr, token, &node, wait, wait_seconds, true).await?
        }
        Cmd::Remove { addr, node, wait, wait_seconds, token, .. } => {
            membership_change(&addr, token, &node, wait, wait_seconds, false).await?
        }
        Cmd::Reload { addr, models_dir, token, .. } => {
            let token = cli::token(token.as_deref())?;
            let ch = cli::connect(&addr).await?;
            let req = pb::ReloadModelsRequest { models_dir };
            match cli::admin_client(ch, &token).reload_models(req).await {
                Ok(r) => {
                    let r = r.into_inner();
                    let from = if r.previous_version.is_empty() { "heuristic" } else { &r.previous_version };
                    outln!("deployed {} (was {from})", r.version);
                }
                Err(s) => return Err(output::status_error(s)),
            }
        }
        Cmd::Fault { addr, token, fault, .. } => {
            let token = cli::token(token.as_deref())?;
            let ch = cli::connect(&addr).await?;
            let mut req = tonic::Request::new(fault.request());
            req.set_timeout(Duration::from_secs(10));
            match cli::admin_client(ch, &token).inject_fault(req).await {
                Ok(r) => {
                    let r = r.into_inner();
                    outln!("{}", r.fault);
                    for f in r.active_faults {
                        outln!("  active: {f}");
                    }
                }
                Err(s) => return Err(output::status_error(s)),
            }
        }
        Cmd::Bench { addr, concurrency, rate, requests, max_seconds, users, k, deadline_ms, warmup, token, .. } => {
            let token = cli::token(token.as_deref())?;
            cli::wait_serving(&addr, Duration::from_secs(120)).await?;
            let r = cli::bench::run(cli::bench::BenchSpec {
                addr,
                concurrency,
                rate,
                requests,
                max_duration: Duration::from_secs(max_seconds),
                users,
                k,
                deadline_ms,
                warmup,
                token,
            })
            .await?;
            out!("{}", r.text);
        }
        Cmd::Simulate { addr, seed, items, users, requests, k, .. } => {
            cli::wait_serving(&addr, Duration::from_secs(120)).await?;
            let r = cli::demo::simulate(cli::demo::SimSpec { addr, seed, items, users, requests, k })
                .await
                .context("simulate")?;
            outln!(
                "simulated {} requests: {} impressions, {} clicks (CTR {:.4}), {} likes",
                r.requests,
                r.impressions,
                r.clicks,
                r.clicks as f64 / r.impressions.max(1) as f64,
                r.likes
            );
        }
    }
    Ok(())
}

/// `recsys drain` (`drain`) or `recsys remove`: begins the change, then follows it with `--wait`.
async fn membership_change(
    addr: &str,
    token: Option<String>,
    node: &str,
    wait: bool,
    wait_seconds: u64,
    drain: bool,
) -> anyhow::Result<()> {
    let token = cli::token(token.as_deref())?;
    let mut admin = cli::admin_client(cli::connect(addr).await?, &token);
    let node_id = node.to_string();
    let r = if drain {
        admin.drain(pb::DrainRequest { node_id }).await
    } else {
        admin.remove_node(pb::RemoveNodeRequest { node_id }).await
    };
    let r = r.map_err(output::status_error)?.into_inner();
    print_change(if drain { "draining" } else { "removing" }, node, &r);
    if wait {
        cli::wait_change(addr, &token, node, Duration::from_secs(wait_seconds)).await?;
        if drain {
            outln!("{node} drained: its partitions live on the other members");
        } else {
            outln!("{node} removed: every partition has its replicas again");
        }
    }
    Ok(())
}

fn print_change(what: &str, node: &str, r: &pb::MembershipChangeResponse) {
    if r.target_members.is_empty() {
        outln!("{node}: nothing to do (ring epoch {}, members {})", r.epoch, r.members.join(", "));
    } else {
        outln!(
            "{what} {node}: ring epoch {}, {} → {}, {} partitions get a new owner",
            r.epoch,
            r.members.join(", "),
            r.target_members.join(", "),
            r.partitions_moving
        );
    }
}
