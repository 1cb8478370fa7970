use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tonic::{Request, Response, Status};

use super::pb;
use crate::cluster::{MemberState, Role};
use crate::features::shard::FeatureMsg;
use crate::features::FeaturePlan;
use crate::scoring::{Models, ScoringError};
use crate::transport::Transport;

pub struct AdminState {
    pub transport: Arc<Transport>,
    pub models: Arc<Models>,
    pub plan: Arc<FeaturePlan>,
    pub models_dir: std::path::PathBuf,
}

pub struct AdminService {
    pub state: Arc<OnceLock<Arc<AdminState>>>,
}

impl AdminState {
    /// (items, users, events) held in this node's feature partitions.
    async fn counts(&self) -> (u64, u64, u64) {
        let t = &self.transport;
        let calls = t.ring.partitions_of(Role::Feature, &t.node_id).into_iter().filter_map(|p| {
            let a = t.local.feature_actor(p)?;
            Some(async move {
                match a.call(FeatureMsg::Counts, Some(Duration::from_secs(2))).await {
                    Ok(ractor::rpc::CallResult::Success(c)) => Some(c),
                    _ => None,
                }
            })
        });
        futures::future::join_all(calls)
            .await
            .into_iter()
            .flatten()
            .fold((0, 0, 0), |(i, u, e), (a, b, c)| (i + a as u64, u + b as u64, e + c))
    }
}

#[tonic::async_trait]
impl pb::admin_server::Admin for AdminService {
    async fn cluster_status(
        &self,
        _req: Request<pb::ClusterStatusRequest>,
    ) -> Result<Response<pb::ClusterStatusResponse>, Status> {
        let st = super::recommender::ready(&self.state)?;
        let t = &st.transport;
        let ring = &t.ring;
        let scorers = st.models.current();
        let members = t.membership.members();
        // The joined set first (ring order), then nodes gossip knows that have not joined.
        let mut ids: Vec<String> = ring.members().to_vec();
        ids.extend(members.iter().map(|m| m.node_id.clone()).filter(|n| !ring.members().contains(n)));
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
                            t.local.is_ready(crate::cluster::Part::new(role, p))
                        } else {
                            t.membership.is_routable(n)
                        }
                    })
                    .collect();
                let part = crate::cluster::Part::new(role, p);
                let (ops_here, fingerprint_here) = if t.ring.owns(role, p, &t.node_id) {
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
        let (items, users, events) = st.counts().await;
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
            items,
            users,
            events,
            models,
            self_node_id: t.node_id.clone(),
            partitions,
            scorer_nodes: ring.scorer_nodes().to_vec(),
            catch_up_rounds: t.local.catch_up_rounds.load(std::sync::atomic::Ordering::Acquire),
            cpu_seconds,
            resident_bytes,
        }))
    }

    async fn reload_models(
        &self,
        req: Request<pb::ReloadModelsRequest>,
    ) -> Result<Response<pb::ReloadModelsResponse>, Status> {
        let st = super::recommender::ready(&self.state)?;
        let dir = req.into_inner().models_dir;
        let dir = if dir.is_empty() { st.models_dir.clone() } else { std::path::PathBuf::from(dir) };
        if !dir.is_dir() {
            return Err(Status::not_found(format!("models_dir: {} is not a directory", dir.display())));
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
                    _ => Status::invalid_argument(format!("models_dir: {e}; the serving version stays")),
                })
            }
        }
    }
}
