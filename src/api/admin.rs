use std::sync::{Arc, OnceLock};

use tonic::{Request, Response, Status};

use super::pb;
use crate::cluster::{Member, Role, Router};
use crate::scoring::ScorerPool;
use crate::store::Store;

pub struct AdminState {
    pub router: Arc<Router>,
    pub store: Store,
    pub members: Vec<Member>,
    pub scorers: Arc<ScorerPool>,
}

pub struct AdminService {
    pub state: Arc<OnceLock<Arc<AdminState>>>,
}

#[tonic::async_trait]
impl pb::admin_server::Admin for AdminService {
    async fn cluster_status(
        &self,
        _req: Request<pb::ClusterStatusRequest>,
    ) -> Result<Response<pb::ClusterStatusResponse>, Status> {
        let st = super::recommender::ready(&self.state)?;
        let ring = &st.router.ring;
        let nodes = st
            .members
            .iter()
            .map(|m| pb::NodeStatus {
                node_id: m.node_id.clone(),
                address: m.address.clone(),
                state: m.state.as_str().to_string(),
                generator_partitions: ring.partitions_of(Role::Generator, &m.node_id).len() as u32,
                feature_partitions: ring.partitions_of(Role::Feature, &m.node_id).len() as u32,
                scorers: if m.node_id == st.router.node_id { st.scorers.live() as u32 } else { 0 },
            })
            .collect();
        let store = st.store.clone();
        // sled's len() walks the tree: off the async workers.
        let (items, users, events) =
            tokio::task::spawn_blocking(move || store.counts()).await.map_err(|e| Status::internal(e.to_string()))?;
        let models = st.scorers.manifest.as_ref().map(|m| pb::ModelVersions {
            stage1: format!("{}/stage1", m.version),
            stage2: format!("{}/stage2", m.version),
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
            self_node_id: st.router.node_id.clone(),
        }))
    }
}
