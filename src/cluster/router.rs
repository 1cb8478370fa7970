//! Reaching a partition. Every stage calls through here with the time it has left; a partition
//! that does not answer in time is reported, never waited for.
use std::sync::RwLock;
use std::time::Duration;

use ractor::rpc::CallResult;
use ractor::{ActorRef, RpcReplyPort};

use super::{Ring, Role};
use crate::features::shard::FeatureMsg;
use crate::generators::GeneratorMsg;

#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum CallError {
    #[error("partition {role:?}/{partition} did not answer within its deadline")]
    Timeout { role: Role, partition: u32 },
    #[error("partition {role:?}/{partition} is unavailable: {reason}")]
    Unavailable { role: Role, partition: u32, reason: String },
}

/// Local actors for the partitions this node serves, indexed by partition number.
pub struct Router {
    pub node_id: String,
    pub ring: Ring,
    // Swapped when a supervisor restarts a partition; never held across an await.
    generators: RwLock<Vec<Option<ActorRef<GeneratorMsg>>>>,
    features: RwLock<Vec<Option<ActorRef<FeatureMsg>>>>,
}

impl Router {
    pub fn new(node_id: String, ring: Ring) -> Self {
        let n = ring.partitions as usize;
        Self { node_id, ring, generators: RwLock::new(vec![None; n]), features: RwLock::new(vec![None; n]) }
    }

    pub fn partitions(&self) -> u32 {
        self.ring.partitions
    }

    pub fn set_generator(&self, p: u32, a: Option<ActorRef<GeneratorMsg>>) {
        self.generators.write().expect("router lock")[p as usize] = a;
    }
    pub fn set_feature(&self, p: u32, a: Option<ActorRef<FeatureMsg>>) {
        self.features.write().expect("router lock")[p as usize] = a;
    }
    pub fn generator_actor(&self, p: u32) -> Option<ActorRef<GeneratorMsg>> {
        self.generators.read().expect("router lock").get(p as usize).cloned().flatten()
    }
    pub fn feature_actor(&self, p: u32) -> Option<ActorRef<FeatureMsg>> {
        self.features.read().expect("router lock").get(p as usize).cloned().flatten()
    }

    pub async fn feature<T: Send + 'static>(
        &self,
        partition: u32,
        timeout: Duration,
        build: impl FnOnce(RpcReplyPort<T>) -> FeatureMsg,
    ) -> Result<T, CallError> {
        let actor = self.feature_actor(partition).ok_or_else(|| self.not_here(Role::Feature, partition))?;
        call(&actor, Role::Feature, partition, timeout, build).await
    }

    pub async fn generator<T: Send + 'static>(
        &self,
        partition: u32,
        timeout: Duration,
        build: impl FnOnce(RpcReplyPort<T>) -> GeneratorMsg,
    ) -> Result<T, CallError> {
        let actor = self.generator_actor(partition).ok_or_else(|| self.not_here(Role::Generator, partition))?;
        call(&actor, Role::Generator, partition, timeout, build).await
    }

    fn not_here(&self, role: Role, partition: u32) -> CallError {
        let owners = self.ring.owners(role, partition).join(",");
        CallError::Unavailable { role, partition, reason: format!("no live replica here (owners: {owners})") }
    }
}

async fn call<M: ractor::Message, T: Send + 'static>(
    actor: &ActorRef<M>,
    role: Role,
    partition: u32,
    timeout: Duration,
    build: impl FnOnce(RpcReplyPort<T>) -> M,
) -> Result<T, CallError> {
    match actor.call(build, Some(timeout)).await {
        Ok(CallResult::Success(v)) => Ok(v),
        Ok(CallResult::Timeout) => Err(CallError::Timeout { role, partition }),
        Ok(CallResult::SenderError) => {
            Err(CallError::Unavailable { role, partition, reason: "partition actor dropped the call".into() })
        }
        Err(e) => Err(CallError::Unavailable { role, partition, reason: e.to_string() }),
    }
}
