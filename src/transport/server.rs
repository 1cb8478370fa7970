//! The internal service a node answers for its peers: reads and writes of the partitions it
//! holds, scoring on its scorers, later pages of the ranked lists it holds, and anti-entropy.
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tonic::{Request, Response, Status};

use super::client::result_part;
use super::{decode, encode, pb, ReadQuery, Transport};
use crate::cluster::replication::{self, PullAsk};
use crate::cluster::Part;
use crate::pipeline::Pipeline;
use crate::store::LoggedOp;

pub struct InternalService {
    pub transport: Arc<OnceLock<Arc<Transport>>>,
    pub pipeline: Arc<OnceLock<Arc<Pipeline>>>,
}

impl InternalService {
    /// The transport once the ring has formed, after checking that the caller places partitions
    /// the way this node does.
    fn check(&self, env: Option<&pb::Envelope>) -> Result<(Arc<Transport>, Duration), Status> {
        let t = self.transport.get().ok_or_else(|| Status::unavailable("node is starting: no ring yet"))?;
        if t.local.faults().serving_fails() {
            return Err(Status::unavailable(format!("{}: internal rpcs fail (injected fault)", t.node_id)));
        }
        let env = env.ok_or_else(|| Status::invalid_argument("envelope: missing"))?;
        if env.epoch != t.ring.epoch || env.digest != t.ring.digest {
            return Err(Status::failed_precondition(format!(
                "ring mismatch: {} has epoch {} digest {}, caller {} sent epoch {} digest {}",
                t.node_id, t.ring.epoch, t.ring.digest, env.from_node, env.epoch, env.digest
            )));
        }
        let deadline = Duration::from_millis(u64::from(env.deadline_ms.max(1)));
        Ok((t.clone(), deadline))
    }
}

fn failed(part: Part, error: String) -> pb::PartitionResult {
    pb::PartitionResult { role: part.role as u32, partition: part.partition, error, body: vec![] }
}

fn done(part: Part, body: Vec<u8>) -> pb::PartitionResult {
    pb::PartitionResult { role: part.role as u32, partition: part.partition, error: String::new(), body }
}

fn parts_of(asks: &[pb::PartitionAsk]) -> Result<Vec<Part>, Status> {
    asks.iter()
        .map(|a| {
            let r = pb::PartitionResult { role: a.role, partition: a.partition, ..Default::default() };
            result_part(&r).ok_or_else(|| Status::invalid_argument(format!("asks: unknown role {}", a.role)))
        })
        .collect()
}

#[tonic::async_trait]
impl pb::internal_server::Internal for InternalService {
    async fn read(&self, req: Request<pb::ReadRequest>) -> Result<Response<pb::ReadReply>, Status> {
        let req = req.into_inner();
        let (t, deadline) = self.check(req.envelope.as_ref())?;
        let parts = parts_of(&req.asks)?;
        let calls = parts.into_iter().zip(req.asks).map(|(part, a)| {
            let t = t.clone();
            async move {
                let q: ReadQuery = match decode(&a.body) {
                    Ok(q) => q,
                    Err(e) => return failed(part, e),
                };
                match t.local.read(part, q, deadline).await {
                    Ok(r) => done(part, encode(&r)),
                    Err(e) => failed(part, e.to_string()),
                }
            }
        });
        let results = futures::future::join_all(calls).await;
        Ok(Response::new(pb::ReadReply { results }))
    }

    async fn apply(&self, req: Request<pb::ApplyRequest>) -> Result<Response<pb::ApplyReply>, Status> {
        let req = req.into_inner();
        let (t, _) = self.check(req.envelope.as_ref())?;
        let parts = parts_of(&req.asks)?;
        let mut asks = Vec::with_capacity(parts.len());
        let mut results = Vec::new();
        for (part, a) in parts.into_iter().zip(req.asks) {
            match decode::<Vec<LoggedOp>>(&a.body) {
                Ok(ops) => asks.push((part, Arc::new(ops))),
                Err(e) => results.push(failed(part, e)),
            }
        }
        let ring = t.ring.clone();
        let me = t.node_id.clone();
        let (applied, flush_micros) = t.local.apply(asks, |p| ring.owns(p.role, p.partition, &me)).await;
        results.extend(applied.into_iter().map(|(part, r)| match r {
            Ok(flags) => done(part, encode(&flags)),
            Err(e) => failed(part, e),
        }));
        Ok(Response::new(pb::ApplyReply { results, flush_micros }))
    }

    async fn score(&self, req: Request<pb::ScoreRequest>) -> Result<Response<pb::ScoreReply>, Status> {
        let req = req.into_inner();
        let (_, deadline) = self.check(req.envelope.as_ref())?;
        let p = self.pipeline.get().ok_or_else(|| Status::unavailable("node is starting"))?;
        let scores = p.score_here(&req, deadline).await?;
        Ok(Response::new(pb::ScoreReply { scores }))
    }

    async fn page(&self, req: Request<pb::PageRequest>) -> Result<Response<pb::PageReply>, Status> {
        let req = req.into_inner();
        let (_, deadline) = self.check(req.envelope.as_ref())?;
        let p = self.pipeline.get().ok_or_else(|| Status::unavailable("node is starting"))?;
        let page = p.page_here(&req, deadline).await?;
        Ok(Response::new(pb::PageReply { body: encode(&page) }))
    }

    async fn digests(&self, req: Request<pb::DigestsRequest>) -> Result<Response<pb::DigestsReply>, Status> {
        let req = req.into_inner();
        let (t, _) = self.check(req.envelope.as_ref())?;
        let results = parts_of(&req.asks)?
            .into_iter()
            .map(|part| {
                if t.local.is_open(part) {
                    done(part, encode(&t.local.store.digest(part)))
                } else {
                    failed(part, format!("{part} is not open on {}", t.node_id))
                }
            })
            .collect();
        Ok(Response::new(pb::DigestsReply { results }))
    }

    async fn pull(&self, req: Request<pb::PullRequest>) -> Result<Response<pb::PullReply>, Status> {
        let req = req.into_inner();
        let (t, _) = self.check(req.envelope.as_ref())?;
        let parts = parts_of(&req.asks)?;
        let mut jobs = Vec::new();
        let mut results = Vec::new();
        for (part, a) in parts.into_iter().zip(req.asks) {
            if !t.local.is_open(part) {
                results.push(failed(part, format!("{part} is not open on {}", t.node_id)));
                continue;
            }
            match decode::<PullAsk>(&a.body) {
                Ok(p) => jobs.push((part, p)),
                Err(e) => results.push(failed(part, e)),
            }
        }
        let store = t.local.store.clone();
        // Bucket scans read sled: blocking work.
        let pulled = tokio::task::spawn_blocking(move || {
            jobs.into_iter().map(|(part, p)| (part, replication::missing_ops(&store, part, &p))).collect::<Vec<_>>()
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?;
        results.extend(pulled.into_iter().map(|(part, r)| match r {
            Ok(ops) => done(part, encode(&ops)),
            Err(e) => failed(part, e.to_string()),
        }));
        Ok(Response::new(pb::PullReply { results }))
    }
}
