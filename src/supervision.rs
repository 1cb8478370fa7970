//! The restart rule every actor supervisor of a node follows (partitions, scorers): shared here
//! so neither supervisor imports the other's module; and how an actor notices that the caller of
//! a read gave up.
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

/// Whether the caller waiting on `reply` gave up (its deadline passed, or it went away): a
/// partition's actor then skips the read instead of computing it for nobody (counted per role).
pub fn caller_gone<T>(reply: &ractor::RpcReplyPort<T>, role: &'static str) -> bool {
    let gone = reply.is_closed();
    if gone {
        metrics::counter!("recsys_partition_reads_skipped_total", "role" => role).increment(1);
    }
    gone
}
