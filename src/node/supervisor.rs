//! The partition supervisor: starts this node's partition actors, restarts one that crashed
//! (rebuilt from its op log), and opens or closes partitions as moves bring or take them.
use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef, SupervisionEvent};

use crate::cluster::changes::PartitionCmd;
use crate::config::Config;
use crate::domain::Role;
use crate::features::shard::{FeatureShard, FeatureShardArgs, FeatureShardState};
use crate::generators::{GeneratorArgs, GeneratorShard, GeneratorState};
use crate::ingest;
use crate::store::Store;
use crate::supervision::failure;
use crate::transport::LocalPartitions;

type FeatureLoader = Arc<dyn Fn(u32) -> FeatureShardState + Send + Sync>;
type GeneratorLoader = Arc<dyn Fn(u32) -> GeneratorState + Send + Sync>;

/// Supervises this node's partition actors: a crashed partition is taken out of service (reads
/// go to its other replicas), rebuilt from its op log, and put back. Partitions are also opened
/// (a move brings one here) and closed (a move took one away) while the node runs.
pub struct PartitionSupervisor;

pub struct PartitionSupervisorArgs {
    pub local: Arc<LocalPartitions>,
    /// Where the partitions log their writes (None: apply only).
    pub store: Option<Store>,
    pub features: Vec<(u32, FeatureShardState)>,
    pub generators: Vec<(u32, GeneratorState)>,
    pub feature_loader: FeatureLoader,
    pub generator_loader: GeneratorLoader,
}

pub struct PartitionSupervisorState {
    local: Arc<LocalPartitions>,
    store: Option<Store>,
    /// Children by actor id (not by registered name: names are process-global in ractor).
    children: std::collections::HashMap<ractor::ActorId, (Role, u32)>,
    feature_loader: FeatureLoader,
    generator_loader: GeneratorLoader,
}

impl PartitionSupervisorState {
    /// Spawns one partition's actor (from `initial`, else from its op log) and installs it.
    async fn spawn(
        &mut self,
        me: &ActorRef<PartitionCmd>,
        role: Role,
        p: u32,
        feature: Option<FeatureShardState>,
        generator: Option<GeneratorState>,
    ) -> Result<(), ActorProcessingErr> {
        let id = if role == Role::Feature {
            let a = FeatureShardArgs {
                partition: p,
                log: self.store.clone(),
                initial: feature,
                load: self.feature_loader.clone(),
            };
            let (r, _) = Actor::spawn_linked(None, FeatureShard, a, me.get_cell()).await?;
            let id = r.get_id();
            self.local.set_feature(p, Some(r));
            id
        } else {
            let a = GeneratorArgs {
                partition: p,
                log: self.store.clone(),
                initial: generator,
                load: self.generator_loader.clone(),
            };
            let (r, _) = Actor::spawn_linked(None, GeneratorShard, a, me.get_cell()).await?;
            let id = r.get_id();
            self.local.set_generator(p, Some(r));
            id
        };
        self.children.insert(id, (role, p));
        Ok(())
    }
}

impl Actor for PartitionSupervisor {
    type Msg = PartitionCmd;
    type State = PartitionSupervisorState;
    type Arguments = PartitionSupervisorArgs;

    async fn pre_start(
        &self,
        me: ActorRef<PartitionCmd>,
        args: PartitionSupervisorArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let mut st = PartitionSupervisorState {
            local: args.local,
            store: args.store,
            children: std::collections::HashMap::new(),
            feature_loader: args.feature_loader,
            generator_loader: args.generator_loader,
        };
        for (p, s) in args.features {
            st.spawn(&me, Role::Feature, p, Some(s), None).await?;
        }
        for (p, s) in args.generators {
            st.spawn(&me, Role::Generator, p, None, Some(s)).await?;
        }
        Ok(st)
    }

    async fn handle(
        &self,
        me: ActorRef<PartitionCmd>,
        msg: PartitionCmd,
        st: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            PartitionCmd::Open(part, reply) => {
                let open = st.local.is_open(part);
                if !open {
                    st.local.set_ready(part, false);
                    st.spawn(&me, part.role, part.partition, None, None).await?;
                    tracing::info!(part = %part, "partition opened here");
                }
                let _ = reply.send(!open);
            }
            PartitionCmd::Close(part, reply) => {
                st.local.set_ready(part, false);
                let actor = match part.role {
                    Role::Feature => st.local.feature_actor(part.partition).map(|a| a.get_cell()),
                    Role::Generator => st.local.generator_actor(part.partition).map(|a| a.get_cell()),
                };
                match part.role {
                    Role::Feature => st.local.set_feature(part.partition, None),
                    Role::Generator => st.local.set_generator(part.partition, None),
                }
                if let Some(cell) = actor {
                    // Forgotten first, so its stop is not taken for a crash to restart; waited
                    // for, so no write it is still applying lands after the log is dropped.
                    st.children.remove(&cell.get_id());
                    let stopped =
                        cell.stop_and_wait(Some("partition moved away".into()), Some(Duration::from_secs(30)));
                    if let Err(e) = stopped.await {
                        tracing::warn!(part = %part, error = %e, "partition actor did not stop in time");
                    }
                }
                if let Some(store) = st.store.clone() {
                    match tokio::task::spawn_blocking(move || store.drop_partition(part)).await {
                        Ok(Ok(n)) => tracing::info!(part = %part, batches = n, "partition dropped here"),
                        Ok(Err(e)) => tracing::warn!(part = %part, error = %e, "dropping the partition's log failed"),
                        Err(e) => tracing::warn!(part = %part, error = %e, "dropping the partition's log failed"),
                    }
                }
                let _ = reply.send(());
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        me: ActorRef<PartitionCmd>,
        ev: SupervisionEvent,
        st: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let Some((cell, err)) = failure(ev) else { return Ok(()) };
        let Some((role, p)) = st.children.remove(&cell.get_id()) else { return Ok(()) };
        tracing::warn!(role = role.as_str(), partition = p, error = %err, "partition actor failed; rebuilding it from its op log");
        metrics::counter!("recsys_actor_restarts_total", "role" => role.as_str()).increment(1);
        // Out of service while it rebuilds: reads go to its replicas, writes to it are refused
        // (and reach it later by hinted handoff or anti-entropy).
        let part = crate::domain::Part::new(role, p);
        let was_ready = st.local.is_ready(part);
        st.local.set_ready(part, false);
        match role {
            Role::Feature => st.local.set_feature(p, None),
            Role::Generator => st.local.set_generator(p, None),
        }
        st.spawn(&me, role, p, None, None).await?;
        st.local.set_ready(part, was_ready);
        Ok(())
    }
}

/// Loaders that rebuild one partition from the store (supervisor restarts).
pub fn loaders(store: &Store, cfg: &Arc<Config>) -> (FeatureLoader, GeneratorLoader) {
    let (s1, c1) = (store.clone(), cfg.clone());
    let f: FeatureLoader = Arc::new(move |p| {
        ingest::replay_feature(&s1, &c1, p).unwrap_or_else(|e| {
            tracing::error!(partition = p, error = %e, "rebuild failed; partition starts empty");
            FeatureShardState::new(ingest::shard_settings(&c1))
        })
    });
    let (s2, c2) = (store.clone(), cfg.clone());
    let g: GeneratorLoader = Arc::new(move |p| {
        ingest::replay_generator(&s2, &c2, p).unwrap_or_else(|e| {
            tracing::error!(partition = p, error = %e, "rebuild failed; partition starts empty");
            GeneratorState::new(ingest::generator_settings(&c2))
        })
    });
    (f, g)
}
