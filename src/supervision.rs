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

/// One read admitted to a partition's mailbox (bounded per partition by the transport). It
/// travels inside the read's message and gives its slot back when the message is handled or
/// dropped unhandled (the actor stopped), not when the caller stops waiting: the bound counts
/// what the mailbox holds, so a slow partition's queue cannot grow behind callers that gave up.
#[derive(Debug)]
pub struct ReadTicket(Option<std::sync::Arc<std::sync::atomic::AtomicUsize>>);

impl ReadTicket {
    /// A slot of the partition whose queued reads `queued` counts, or None when `max` are queued.
    pub fn admit(queued: &std::sync::Arc<std::sync::atomic::AtomicUsize>, max: usize) -> Option<Self> {
        use std::sync::atomic::Ordering;
        if queued.fetch_add(1, Ordering::AcqRel) >= max {
            queued.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(Self(Some(queued.clone())))
    }

    /// A read outside any bound (tests, tools).
    pub fn untracked() -> Self {
        Self(None)
    }
}

impl Drop for ReadTicket {
    fn drop(&mut self) {
        if let Some(c) = &self.0 {
            c.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
        }
    }
}
