//! The restart rule every actor supervisor of a node follows (partitions, scorers): shared here
//! so neither supervisor imports the other's module.
use ractor::SupervisionEvent;

/// A child that failed, or was killed (`ActorRef::kill`, as `Admin.InjectFault` does): both are
/// restarted. A child stopped cleanly is the node shutting down.
pub fn failure(ev: SupervisionEvent) -> Option<(ractor::ActorCell, String)> {
    match ev {
        SupervisionEvent::ActorFailed(cell, err) => Some((cell, err.to_string())),
        SupervisionEvent::ActorTerminated(cell, _, Some(reason)) if reason == "killed" => Some((cell, reason)),
        _ => None,
    }
}
