//! Client-side subcommands: load, recommend, status, bench, simulate, demo.
pub mod bench;
pub mod demo;
pub mod load;
pub mod output;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::api::pb;
pub use crate::auth::OperatorToken;
use crate::outln;
pub use crate::transport::tls::ClientTls;
use crate::transport::tls::FLAG_KEYS;

/// Where client commands go without `--addr` (or `RECSYS_ADDR`): n1 of `scripts/demo.sh` and of
/// `cluster/local.sh`, the clusters a newcomer starts first.
pub const DEFAULT_ADDR: &str = "127.0.0.1:7401";

/// A channel whose calls carry the operator token (Ingest and Admin need it when one is set).
pub type Authed = InterceptedService<Channel, OperatorToken>;

pub fn admin_client(ch: Channel, token: &OperatorToken) -> pb::admin_client::AdminClient<Authed> {
    pb::admin_client::AdminClient::with_interceptor(ch, token.clone())
}

pub fn ingest_client(ch: Channel, token: &OperatorToken) -> pb::ingest_client::IngestClient<Authed> {
    pb::ingest_client::IngestClient::with_interceptor(ch, token.clone())
}

/// The `--token` flag (or RECSYS_OPERATOR_TOKEN) as a header value; a token that cannot travel
/// in a header is the user's mistake, reported as one line.
pub fn token(flag: Option<&str>) -> anyhow::Result<OperatorToken> {
    OperatorToken::new(flag).map_err(|e| anyhow::anyhow!("--token: {e}"))
}

/// How client commands dial a node that serves TLS (`[tls]` on the node): the CA its
/// certificate must chain to, and a certificate to present (needed only for the internal API of
/// a node with `tls.mutual`; Recommend, Ingest and Admin need none).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct TlsArgs {
    /// PEM CA certificate the node's certificate must chain to: dial over TLS (https).
    #[arg(long, env = "RECSYS_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// PEM client certificate to present (with --tls-key).
    #[arg(long, env = "RECSYS_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "RECSYS_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// The name the node's certificate must carry (default: the host of --addr).
    #[arg(long, env = "RECSYS_TLS_SERVER_NAME")]
    pub tls_server_name: Option<String>,
}

impl TlsArgs {
    /// The flags' TLS settings, files read and checked (None: no --tls-ca, plaintext).
    pub fn load(&self) -> anyhow::Result<Option<ClientTls>> {
        let Some(ca) = &self.tls_ca else {
            if self.tls_cert.is_some() || self.tls_server_name.is_some() {
                anyhow::bail!("--tls-cert, --tls-key and --tls-server-name need --tls-ca (RECSYS_TLS_CA)");
            }
            return Ok(None);
        };
        let server_name = self.tls_server_name.clone().filter(|n| !n.is_empty());
        let t = ClientTls::from_files(FLAG_KEYS, ca, self.tls_cert.as_deref(), self.tls_key.as_deref(), server_name)?;
        Ok(Some(t))
    }

    /// Sets the TLS of every connection this process makes ([`connect`]).
    pub fn install(&self) -> anyhow::Result<()> {
        if let Some(t) = self.load()? {
            crate::transport::tls::install(t)?;
        }
        Ok(())
    }
}

/// A channel to the node at `addr` (`host:port`), over TLS when this process has TLS settings
/// (`--tls-ca`, [`TlsArgs::install`]).
pub async fn connect(addr: &str) -> anyhow::Result<Channel> {
    connect_with(addr, crate::transport::tls::outbound()).await
}

/// [`connect`] with explicit TLS settings (None: plaintext).
pub async fn connect_with(addr: &str, tls: Option<&ClientTls>) -> anyhow::Result<Channel> {
    let ep = crate::transport::tls::endpoint_with(addr, tls).map_err(anyhow::Error::msg)?;
    let url = ep.uri().to_string();
    ep.connect_timeout(Duration::from_secs(3))
        .tcp_nodelay(true)
        .initial_connection_window_size(Some(4 * 1024 * 1024))
        .initial_stream_window_size(Some(2 * 1024 * 1024))
        .connect()
        .await
        .with_context(|| format!("connecting to {}", url.trim_end_matches('/')))
}

/// Waits until the node's health check says SERVING, up to `limit`.
pub async fn wait_serving(addr: &str, limit: Duration) -> anyhow::Result<()> {
    wait_serving_with(addr, crate::transport::tls::outbound(), limit).await
}

/// [`wait_serving`] with explicit TLS settings (None: plaintext).
pub async fn wait_serving_with(addr: &str, tls: Option<&ClientTls>, limit: Duration) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + limit;
    let mut backoff = Duration::from_millis(20);
    loop {
        if let Ok(ch) = connect_with(addr, tls).await {
            let mut h = tonic_health::pb::health_client::HealthClient::new(ch);
            let r = h.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await;
            if let Ok(r) = r {
                if r.into_inner().status == tonic_health::pb::health_check_response::ServingStatus::Serving as i32 {
                    return Ok(());
                }
            }
        }
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!("node at {addr} not SERVING after {limit:?}");
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_millis(500));
    }
}

/// `recsys health`: the node's overall gRPC health (`SERVING`), asked once or, with a non-zero
/// `wait`, until it serves or `wait` has passed. Anything else is an error naming the status.
pub async fn health(addr: &str, wait: Duration) -> anyhow::Result<&'static str> {
    use tonic_health::pb::health_check_response::ServingStatus;
    if !wait.is_zero() {
        wait_serving(addr, wait).await?;
        return Ok("SERVING");
    }
    let ch = connect(addr).await?;
    let mut req = tonic::Request::new(tonic_health::pb::HealthCheckRequest { service: String::new() });
    req.set_timeout(Duration::from_secs(3));
    let r = tonic_health::pb::health_client::HealthClient::new(ch)
        .check(req)
        .await
        .map_err(output::status_error)?
        .into_inner();
    match ServingStatus::try_from(r.status) {
        Ok(ServingStatus::Serving) => Ok("SERVING"),
        Ok(other) => anyhow::bail!("{addr}: {}", other.as_str_name()),
        Err(_) => anyhow::bail!("{addr}: unknown health status {}", r.status),
    }
}

pub fn print_recommendation(r: &pb::RecommendResponse) {
    let models = match &r.models {
        Some(m) if !m.stage1.is_empty() => format!("models {}, {}", m.stage1, m.stage2),
        _ => "heuristic scores (no model)".to_string(),
    };
    outln!("request {}  {models}", r.request_id);
    let mut spaced = false;
    for (i, it) in r.items.iter().enumerate() {
        let ex = it
            .explanation
            .as_ref()
            .map(|e| {
                let mut heads: Vec<_> = e.heads.iter().map(|(k, v)| format!("{k}={v:.3}")).collect();
                heads.sort();
                format!(
                    " stage1={:.3} {} by={} defaulted={}",
                    e.stage1_score,
                    heads.join(" "),
                    e.scored_by,
                    e.defaulted_features
                )
            })
            .unwrap_or_default();
        let why = spacing_note(&r.items, i);
        spaced |= !why.is_empty();
        outln!(
            "  #{:<3} {:<8} author={:<7} score={:>8.4} sources={}{}{}",
            it.rank,
            it.item_id,
            it.author_id,
            it.score,
            it.sources.join("+"),
            ex,
            why
        );
    }
    if spaced {
        outln!("  (^ author spacing: no two items in a row share an author, so a higher score can sit lower)");
    }
    if let Some(c) = &r.coverage {
        let mut gens: Vec<_> = c.generator_candidates.iter().map(|(k, v)| format!("{k}={v}")).collect();
        gens.sort();
        let mut filt: Vec<_> = c.filter_removed.iter().map(|(k, v)| format!("{k}={v}")).collect();
        filt.sort();
        outln!("  candidates: {}  removed: {}", gens.join(" "), filt.join(" "));
        let fallbacks = if c.fallbacks.is_empty() { "none".to_string() } else { c.fallbacks.join(", ") };
        outln!(
            "  degraded: {}  fallbacks: {fallbacks}{}",
            if c.degraded { "yes" } else { "no" },
            if r.diversity_relaxed { "  (author spacing relaxed: only one author left)" } else { "" }
        );
    }
    let t: Vec<_> = r.timings.iter().map(|t| format!("{}={:.2}ms", t.stage, t.micros as f64 / 1000.0)).collect();
    outln!("  timings: {}", t.join(" "));
    if !r.next_page_token.is_empty() {
        outln!("  next_page_token: {}", r.next_page_token);
    }
}

/// Why item `i` sits below an item with a lower score: author spacing moved it down, because the
/// item above it would otherwise follow another item by the same author.
fn spacing_note(items: &[pb::RankedItem], i: usize) -> String {
    let (Some(above), Some(it)) = (i.checked_sub(1).and_then(|j| items.get(j)), items.get(i)) else {
        return String::new();
    };
    if it.score <= above.score {
        return String::new();
    }
    match i.checked_sub(2).and_then(|j| items.get(j)) {
        Some(prev) if prev.author_id == it.author_id => {
            format!("  ^ below #{} by author spacing (same author as #{})", above.rank, prev.rank)
        }
        _ => format!("  ^ below #{} by author spacing", above.rank),
    }
}

/// `recsys status`: nodes, their states and ring views, then each partition's replicas (`*` marks
/// a replica that is alive and serving the partition, as the answering node sees it).
pub fn print_status(s: &pb::ClusterStatusResponse) {
    outln!(
        "cluster seen from {}: ring epoch {} digest {}, {} partitions per role, replication {}",
        s.self_node_id,
        s.ring_epoch,
        s.ring_digest,
        s.partitions_per_role,
        s.replication_factor
    );
    if !s.target_members.is_empty() {
        outln!("membership change in progress: moving to {}", s.target_members.join(", "));
    }
    outln!(
        "  {:<12} {:<22} {:<8} {:>13} {:>6} {:>6} {:>5} {:>8} {:>9} {:>8}  RING",
        "NODE",
        "ADDRESS",
        "STATE",
        "GENERATION",
        "GEN",
        "FEAT",
        "IN",
        "SCORERS",
        "MEM",
        "CPU"
    );
    for n in &s.nodes {
        let agrees = if n.ring_epoch == s.ring_epoch && n.ring_digest == s.ring_digest {
            "same".to_string()
        } else if n.ring_digest.is_empty() {
            "unknown".to_string()
        } else {
            format!("DIFFERS: epoch {} digest {}", n.ring_epoch, n.ring_digest)
        };
        outln!(
            "  {:<12} {:<22} {:<8} {:>13} {:>6} {:>6} {:>5} {:>8} {:>9} {:>8}  {}",
            n.node_id,
            if n.address.is_empty() { "-" } else { &n.address },
            n.state,
            n.generation,
            n.generator_partitions,
            n.feature_partitions,
            n.incoming_partitions,
            n.scorers,
            format!("{:.0}MiB", n.resident_bytes as f64 / (1024.0 * 1024.0)),
            format!("{:.1}s", n.cpu_seconds),
            agrees
        );
    }
    if !s.moves.is_empty() {
        outln!("  moves in progress:");
        outln!("    {:<16} {:<10} {:<10} {:>12} {:>8}", "PARTITION", "FROM", "TO", "BYTES", "ETA");
        for m in &s.moves {
            outln!(
                "    {:<16} {:<10} {:<10} {:>12} {:>7.1}s",
                format!("{}/{}", m.role, m.partition),
                m.from,
                m.to,
                format!("{}/{}", human_bytes(m.bytes_done), human_bytes(m.bytes_total)),
                m.eta_ms as f64 / 1000.0
            );
        }
    }
    let models = s.models.as_ref().map(|m| format!("{}, {}", m.stage1, m.stage2)).unwrap_or("none (heuristic)".into());
    if s.chaos_enabled {
        let faults = if s.active_faults.is_empty() { "none".to_string() } else { s.active_faults.join("; ") };
        outln!("chaos enabled on {}: active faults: {faults}", s.self_node_id);
    }
    outln!(
        "held here: {} items, {} users, {} events; resident memory {:.0} MiB; models: {models}",
        s.items,
        s.users,
        s.events,
        s.resident_bytes as f64 / (1024.0 * 1024.0)
    );
    let under: Vec<String> = s
        .partitions
        .iter()
        .filter(|p| p.live.iter().filter(|l| **l).count() < p.replicas.len())
        .map(|p| format!("{}/{}", p.role, p.partition))
        .collect();
    let none: Vec<String> = s
        .partitions
        .iter()
        .filter(|p| !p.live.iter().any(|l| *l))
        .map(|p| format!("{}/{}", p.role, p.partition))
        .collect();
    outln!(
        "partitions: {} total, {} with a replica down, {} with no live replica{}",
        s.partitions.len(),
        under.len(),
        none.len(),
        if none.is_empty() { String::new() } else { format!(": {}", none.join(" ")) }
    );
    for role in ["generator", "feature"] {
        outln!("  {role} partitions (replicas in ring order, * = live):");
        let line: Vec<String> = s
            .partitions
            .iter()
            .filter(|p| p.role == role)
            .map(|p| {
                let reps: Vec<String> =
                    p.replicas.iter().zip(&p.live).map(|(r, l)| format!("{r}{}", if *l { "*" } else { "" })).collect();
                format!("{:>3}:{}", p.partition, reps.join(","))
            })
            .collect();
        for chunk in line.chunks(6) {
            outln!("    {}", chunk.join("  "));
        }
    }
}

fn human_bytes(b: u64) -> String {
    if b >= 1 << 20 {
        format!("{:.1}M", b as f64 / (1u64 << 20) as f64)
    } else {
        format!("{:.0}K", b as f64 / 1024.0)
    }
}

/// `recsys drain|remove --wait`: follows the change until the ring has committed it and every
/// partition has its replicas live again (bounded by `limit`), printing progress.
pub async fn wait_change(
    addr: &str,
    token: &OperatorToken,
    node: &str,
    limit: Duration,
) -> anyhow::Result<pb::ClusterStatusResponse> {
    let end = std::time::Instant::now() + limit;
    let mut last = String::new();
    loop {
        let ch = connect(addr).await?;
        let s = admin_client(ch, token)
            .cluster_status(pb::ClusterStatusRequest {})
            .await
            .map_err(output::status_error)?
            .into_inner();
        let member = s.nodes.iter().any(|n| n.node_id == node && (n.generator_partitions + n.feature_partitions) > 0);
        let full = s.partitions.iter().all(|p| p.live.iter().all(|l| *l));
        // Every other live node runs the committed table, and the node itself has stopped.
        let agreed = s.nodes.iter().filter(|n| n.live && n.node_id != node).all(|n| n.ring_epoch == s.ring_epoch);
        let gone = !s.nodes.iter().any(|n| n.node_id == node && n.live);
        let line = if s.target_members.is_empty() {
            format!("ring epoch {}: {} {}", s.ring_epoch, node, if member { "is still a member" } else { "is out" })
        } else {
            let bytes: u64 = s.moves.iter().map(|m| m.bytes_done).sum();
            format!(
                "ring epoch {}: {} partitions streaming ({} so far)",
                s.ring_epoch,
                s.moves.len(),
                human_bytes(bytes)
            )
        };
        if line != last {
            outln!("{line}");
            last = line;
        }
        if s.target_members.is_empty() && !member && full && agreed && gone {
            return Ok(s);
        }
        if std::time::Instant::now() >= end {
            anyhow::bail!("the change did not complete within {} s (see recsys status)", limit.as_secs());
        }
        // Polling an operator's view at a human pace, bounded by `limit`.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
