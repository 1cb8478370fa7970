use std::sync::{Arc, OnceLock};

use tonic::{Request, Response, Status};

use super::pb;
use crate::cluster::{Member, Role, Router};
use crate::features::FeaturePlan;
use crate::scoring::{Models, ScoringError};
use crate::store::Store;

pub struct AdminState {
    pub router: Arc<Router>,
    pub store: Store,
    pub members: Vec<Member>,
    pub models: Arc<Models>,
    pub plan: Arc<FeaturePlan>,
    pub models_dir: std::path::PathBuf,
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
        let scorers = st.models.current();
        let nodes = st
            .members
            .iter()
            .map(|m| pb::NodeStatus {
                node_id: m.node_id.clone(),
                address: m.address.clone(),
                state: m.state.as_str().to_string(),
                generator_partitions: ring.partitions_of(Role::Generator, &m.node_id).len() as u32,
                feature_partitions: ring.partitions_of(Role::Feature, &m.node_id).len() as u32,
                scorers: if m.node_id == st.router.node_id { scorers.live() as u32 } else { 0 },
            })
            .collect();
        let store = st.store.clone();
        // sled's len() walks the tree: off the async workers.
        let (items, users, events) =
            tokio::task::spawn_blocking(move || store.counts()).await.map_err(|e| Status::internal(e.to_string()))?;
        let models = scorers.manifest.as_ref().map(|m| pb::ModelVersions {
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
