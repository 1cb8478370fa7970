use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tonic::{Request, Response, Status};

use super::pb;
use crate::chaos::ChaosError;
use crate::cluster::changes::{Change, ChangeError};
use crate::cluster::MemberState;
use crate::domain::{quote, Part, Role};
use crate::features::shard::{FeatureMsg, ShardCounts};
use crate::features::FeaturePlan;
use crate::scoring::paths::{self, PathError};
use crate::scoring::{Models, ScoringError};
use crate::transport::Transport;

pub struct AdminState {
    pub transport: Arc<Transport>,
    pub models: Arc<Models>,
    pub plan: Arc<FeaturePlan>,
    pub models_dir: std::path::PathBuf,
    /// ReloadModels loads only directories under this (scoring.models_root).
    pub models_root: std::path::PathBuf,
    /// Membership changes (drain, remove) and the moves they cause.
    pub changes: Arc<crate::cluster::changes::Controller>,
}

pub struct AdminService {
    pub state: Arc<OnceLock<Arc<AdminState>>>,
}

impl AdminState {
    /// Records and unknown-user bookkeeping of this node's feature partitions, summed.
    async fn counts(&self) -> ShardCounts {
        let t = &self.transport;
        let calls = (0..t.local.partitions).filter_map(|p| {
            let a = t.local.feature_actor(p)?;
            Some(async move {
                match a.call(FeatureMsg::Counts, Some(Duration::from_secs(2))).await {
                    Ok(ractor::rpc::CallResult::Success(c)) => Some(c),
                    _ => None,
                }
            })
        });
        futures::future::join_all(calls).await.into_iter().flatten().fold(ShardCounts::default(), |a, c| ShardCounts {
            items: a.items + c.items,
            users: a.users + c.users,
            events: a.events + c.events,
            unknown_users: a.unknown_users + c.unknown_users,
            unknown_evicted: a.unknown_evicted + c.unknown_evicted,
        })
    }
}

fn chaos_status(e: ChaosError) -> Status {
    match e {
        ChaosError::Disabled(_) => Status::failed_precondition(e.to_string()),
        ChaosError::Invalid(_) => Status::invalid_argument(e.to_string()),
        ChaosError::NotFound(_) => Status::not_found(e.to_string()),
        ChaosError::TooMany => Status::resource_exhausted(e.to_string()),
    }
}

/// A partition named by a fault: a partition role, in range, held on this node.
fn fault_part(st: &AdminState, field: &str, role: &str, partition: u32) -> Result<Part, ChaosError> {
    let t = &st.transport;
    let role = match role {
        "generator" => Role::Generator,
        "feature" => Role::Feature,
        _ => return Err(ChaosError::Invalid(format!("{field}.role: `{role}` is not generator or feature"))),
    };
    let partitions = t.ring().partitions;
    if partition >= partitions {
        return Err(ChaosError::Invalid(format!("{field}.partition: {partition} is outside [0, {partitions})")));
    }
    let part = Part::new(role, partition);
    if !t.local.is_open(part) {
        return Err(ChaosError::NotFound(format!("{field}: {part} is not held on {}", t.node_id)));
    }
    Ok(part)
}

impl AdminState {
    /// Applies one fault; returns what was done, in the words `active_faults` uses.
    fn inject(&self, fault: Option<pb::inject_fault_request::Fault>) -> Result<(&'static str, String), ChaosError> {
        use pb::inject_fault_request::Fault;
        let t = &self.transport;
        let faults = t.local.faults();
        faults.check_enabled()?;
        match fault {
            None => Err(ChaosError::Invalid(
                "fault: missing (kill_actor, delay_partition, fail_rpcs or clock_offset)".into(),
            )),
            Some(Fault::KillActor(k)) if k.role == "scorer" => {
                let pool = self.models.current();
                let i = k.index as usize;
                if i >= pool.len() {
                    return Err(ChaosError::NotFound(format!(
                        "kill_actor.index: scorer {i} is not on {} (it runs {})",
                        t.node_id,
                        pool.len()
                    )));
                }
                let a = pool.actor(i).ok_or_else(|| {
                    ChaosError::NotFound(format!("kill_actor.index: scorer {i} on {} is restarting", t.node_id))
                })?;
                a.kill();
                Ok(("kill_actor", format!("killed scorer {i} on {}", t.node_id)))
            }
            Some(Fault::KillActor(k)) => {
                let part = fault_part(self, "kill_actor", &k.role, k.partition)?;
                // The actor is gone at once: calls to it fail fast (their reply ports drop) and
                // the partition goes to its replicas while the supervisor rebuilds it.
                match part.role {
                    Role::Feature => t.local.feature_actor(part.partition).map(|a| a.kill()),
                    Role::Generator => t.local.generator_actor(part.partition).map(|a| a.kill()),
                }
                .ok_or_else(|| ChaosError::NotFound(format!("kill_actor: {part} on {} is restarting", t.node_id)))?;
                Ok(("kill_actor", format!("killed {part} on {}", t.node_id)))
            }
            Some(Fault::DelayPartition(d)) => {
                let part = fault_part(self, "delay_partition", &d.role, d.partition)?;
                Ok(("delay_partition", faults.delay(part, d.delay_ms, d.duration_ms)?))
            }
            Some(Fault::FailRpcs(f)) => Ok(("fail_rpcs", faults.fail_rpcs(f.duration_ms, f.outbound)?)),
            Some(Fault::ClockOffset(c)) => Ok(("clock_offset", faults.clock_offset(c.offset_ms, c.duration_ms)?)),
        }
    }
}

#[tonic::async_trait]
impl pb::admin_server::Admin for AdminService {
    async fn inject_fault(
        &self,
        req: Request<pb::InjectFaultRequest>,
    ) -> Result<Response<pb::InjectFaultResponse>, Status> {
        let st = super::recommender::ready(&self.state)?;
        let (kind, fault) = st.inject(req.into_inner().fault).map_err(chaos_status)?;
        metrics::counter!("recsys_faults_injected_total", "kind" => kind).increment(1);
        tracing::warn!(kind, fault = %fault, "fault injected");
        let active_faults = st.transport.local.faults().active();
        Ok(Response::new(pb::InjectFaultResponse { fault, active_faults }))
    }

    async fn cluster_status(
        &self,
        _req: Request<pb::ClusterStatusRequest>,
    ) -> Result<Response<pb::ClusterStatusResponse>, Status> {
        let st = super::recommender::ready(&self.state)?;
        let t = &st.transport;
        let ring = t.ring();
        let scorers = st.models.current();
        let members = t.membership.members();
        // The joined set first (ring order), then nodes gossip knows that have not joined.
        let mut ids: Vec<String> = ring.members().to_vec();
        // Nodes gossip still remembers but the ring no longer names (drained, removed) are left
        // out unless alive (one starting to join).
        let gossip_live = members.iter().filter(|m| m.live).map(|m| m.node_id.clone());
        for n in ring.target_members().iter().cloned().chain(gossip_live) {
            if !ids.contains(&n) {
                ids.push(n);
            }
        }
        let nodes = ids
            .iter()
            .map(|id| {
                let m = members.iter().find(|m| m.node_id == *id);
                let live = m.is_some_and(|m| m.live);
                let state = match m {
                    Some(m) if m.live => m.state.as_str(),
                    _ => MemberState::Down.as_str(),
                };
                pb::NodeStatus {
                    node_id: id.clone(),
                    address: m.map(|m| m.grpc_addr.clone()).unwrap_or_default(),
                    state: state.to_string(),
                    generator_partitions: ring.partitions_of(Role::Generator, id).len() as u32,
                    feature_partitions: ring.partitions_of(Role::Feature, id).len() as u32,
                    scorers: if *id == t.node_id { scorers.live() as u32 } else { u32::from(ring.is_scorer(id)) },
                    generation: m.map(|m| m.generation).unwrap_or(0),
                    live,
                    ring_epoch: m.map(|m| m.ring_epoch).unwrap_or(0),
                    ring_digest: m.map(|m| m.ring_digest.clone()).unwrap_or_default(),
                    resident_bytes: m.map(|m| m.resident_bytes).unwrap_or(0),
                    cpu_seconds: m.map(|m| m.cpu_seconds).unwrap_or(0.0),
                    incoming_partitions: ring.incoming(id).len() as u32,
                }
            })
            .collect();
        let mut partitions = Vec::with_capacity(2 * ring.partitions as usize);
        for role in Role::ALL {
            for p in 0..ring.partitions {
                let replicas = ring.owners(role, p).to_vec();
                let live = replicas
                    .iter()
                    .map(|n| {
                        if *n == t.node_id {
                            t.local.is_ready(crate::domain::Part::new(role, p))
                        } else {
                            t.membership.is_routable(n)
                        }
                    })
                    .collect();
                let part = crate::domain::Part::new(role, p);
                let (ops_here, fingerprint_here) = if ring.owns(role, p, &t.node_id) {
                    let d = t.local.store.digest(part);
                    let fp = d
                        .iter()
                        .enumerate()
                        .fold(0u64, |acc, (i, (n, x))| acc ^ x.rotate_left(i as u32) ^ (u64::from(*n) << (i % 32)));
                    (t.local.store.op_count(part), format!("{fp:016x}"))
                } else {
                    (0, String::new())
                };
                partitions.push(pb::PartitionReplicas {
                    role: role.as_str().to_string(),
                    partition: p,
                    replicas,
                    live,
                    ops_here,
                    fingerprint_here,
                });
            }
        }
        let counts = st.counts().await;
        let (cpu_seconds, resident_bytes) = crate::metrics::process_stats();
        let models = scorers.manifest.as_ref().map(|m| pb::ModelVersions {
            stage1: format!("{}/stage1", m.version),
            stage2: format!("{}/stage2", m.version),
            stage1_engine: if scorers.is_empty() { String::new() } else { m.stage1_engine().to_string() },
        });
        Ok(Response::new(pb::ClusterStatusResponse {
            nodes,
            ring_epoch: ring.epoch,
            ring_digest: ring.digest.clone(),
            partitions_per_role: ring.partitions,
            replication_factor: ring.replication,
            items: counts.items as u64,
            users: counts.users as u64,
            events: counts.events,
            unknown_users: counts.unknown_users as u64,
            unknown_users_evicted: counts.unknown_evicted,
            models,
            self_node_id: t.node_id.clone(),
            partitions,
            scorer_nodes: ring.scorer_nodes().to_vec(),
            catch_up_rounds: t.local.catch_up_rounds.load(std::sync::atomic::Ordering::Acquire),
            cpu_seconds,
            resident_bytes,
            moves: st
                .changes
                .moves()
                .into_iter()
                .map(|m| pb::Move {
                    role: m.role,
                    partition: m.partition,
                    from: m.from,
                    to: m.to,
                    bytes_done: m.bytes_done,
                    bytes_total: m.bytes_total,
                    eta_ms: m.eta_ms,
                })
                .collect(),
            target_members: if ring.in_transition() { ring.target_members().to_vec() } else { vec![] },
            chaos_enabled: t.local.faults().enabled(),
            active_faults: t.local.faults().active(),
        }))
    }

    async fn drain(&self, req: Request<pb::DrainRequest>) -> Result<Response<pb::MembershipChangeResponse>, Status> {
        let st = super::recommender::ready(&self.state)?;
        let node = node_field(req.into_inner().node_id)?;
        change(&st, Change::Drain(node)).await
    }

    async fn remove_node(
        &self,
        req: Request<pb::RemoveNodeRequest>,
    ) -> Result<Response<pb::MembershipChangeResponse>, Status> {
        let st = super::recommender::ready(&self.state)?;
        let node = node_field(req.into_inner().node_id)?;
        change(&st, Change::Remove(node)).await
    }

    async fn reload_models(
        &self,
        req: Request<pb::ReloadModelsRequest>,
    ) -> Result<Response<pb::ReloadModelsResponse>, Status> {
        let st = super::recommender::ready(&self.state)?;
        let asked = req.into_inner().models_dir;
        let dir = if asked.is_empty() {
            st.models_dir.clone()
        } else if asked.len() > MAX_MODELS_DIR_BYTES || asked.chars().any(char::is_control) {
            // Refused before touching the file system; the value is never echoed whole.
            return Err(Status::invalid_argument(format!(
                "models_dir: must be at most {MAX_MODELS_DIR_BYTES} bytes without control characters (got `{}`)",
                quote(&asked)
            )));
        } else {
            // Only the caller's own spelling is echoed back (at most a short prefix of it), never a
            // resolved path.
            paths::confine_dir(&st.models_root, std::path::Path::new(&asked)).map_err(|e| match e {
                PathError::NotFound => Status::not_found(format!("models_dir: `{}` {e}", quote(&asked))),
                PathError::NoRoot => Status::unavailable(format!("models_dir: {e}")),
                _ => Status::invalid_argument(format!("models_dir: {e}")),
            })?
        };
        if !dir.is_dir() {
            return Err(Status::not_found("models_dir: the configured models directory is not a directory"));
        }
        match st.models.reload(&dir, &st.plan).await {
            Ok((previous, version)) => {
                metrics::counter!("recsys_model_reloads_total", "outcome" => "deployed").increment(1);
                Ok(Response::new(pb::ReloadModelsResponse { previous_version: previous.unwrap_or_default(), version }))
            }
            Err(e) => {
                metrics::counter!("recsys_model_reloads_total", "outcome" => "rejected").increment(1);
                tracing::warn!(dir = %dir.display(), error = %e, "model reload rejected; the serving version stays");
                Err(match e {
                    ScoringError::Overloaded | ScoringError::Timeout | ScoringError::Busy => {
                        Status::unavailable(format!("models_dir: {e}; the serving version stays"))
                    }
                    // Paths in the message are the model directory's, which is under the root.
                    _ => Status::invalid_argument(format!("models_dir: {e}; the serving version stays")),
                })
            }
        }
    }
}

/// A models directory longer than this is no directory under the root (PATH_MAX is 4096).
const MAX_MODELS_DIR_BYTES: usize = 4096;

/// A node id as the config accepts it (`node.node_id`: 1..=64 printable ASCII, no spaces); any
/// other value names no node and is refused here, quoted short, before the change is proposed.
pub(crate) fn node_field(id: String) -> Result<String, Status> {
    let id = id.trim().to_string();
    if id.is_empty() {
        return Err(Status::invalid_argument("node_id: must name a node"));
    }
    if id.len() > 64 || !id.chars().all(|c| c.is_ascii_graphic()) {
        return Err(Status::invalid_argument(format!(
            "node_id: `{}` is not a node id (1..=64 printable ASCII characters without spaces)",
            quote(&id)
        )));
    }
    Ok(id)
}

async fn change(st: &AdminState, c: Change) -> Result<Response<pb::MembershipChangeResponse>, Status> {
    let spec = st.changes.propose(c).await.map_err(|e| match e {
        ChangeError::NotMember(_) => Status::not_found(e.to_string()),
        ChangeError::Refused(_) => Status::failed_precondition(e.to_string()),
        ChangeError::Invalid(_) => Status::invalid_argument(e.to_string()),
        ChangeError::Internal(_) => Status::internal(e.to_string()),
        ChangeError::Conflict(_) => Status::failed_precondition(e.to_string()),
        ChangeError::NoQuorum(_) => Status::unavailable(e.to_string()),
    })?;
    let ring = crate::cluster::Ring::from_spec(spec.clone());
    let moving = ring.target_members().iter().map(|n| ring.incoming(n).len() as u32).sum();
    Ok(Response::new(pb::MembershipChangeResponse {
        epoch: spec.epoch,
        members: spec.members.clone(),
        target_members: spec.target.clone().unwrap_or_default(),
        partitions_moving: moving,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_ids_are_checked_and_quoted_short() {
        assert_eq!(node_field(" n2 ".into()).unwrap(), "n2");
        assert_eq!(node_field("".into()).unwrap_err().code(), tonic::Code::InvalidArgument);
        let big = "n".repeat(100 * 1024);
        let e = node_field(big).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().starts_with("node_id: "), "{}", e.message());
        assert!(e.message().len() < 200, "{} bytes", e.message().len());
        let e = node_field("n\u{1b}[2J".into()).unwrap_err();
        assert!(!e.message().contains('\u{1b}'), "escape codes are not echoed: {}", e.message());
    }
}
