//! The node's background tasks once it serves: anti-entropy rounds, the freeze detector, hinted
//! handoff delivery, and recording this node's address in the metadata log.
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::cluster::metalog::{Entry as MetaEntry, MetaLog};
use crate::cluster::replication;
use crate::transport::Transport;

/// Records this node's internal address in the metadata log (once, and again when it changes),
/// so peers reach a member at the address the log holds, never one a gossip entry claims.
pub(super) async fn register_address(meta: Arc<MetaLog>, me: String, addr: String) {
    for attempt in 0..600u32 {
        let ring = meta.ring();
        let involved = ring.members.contains(&me) || ring.target.as_ref().is_some_and(|t| t.contains(&me));
        if meta.logged_addr(&me).as_deref() == Some(addr.as_str()) {
            return;
        }
        if involved {
            match meta
                .propose(MetaEntry::Addr { node: me.clone(), addr: addr.clone() }, &format!("address of {me}"), None)
                .await
            {
                Ok(_) => continue,
                Err(e) => tracing::debug!(attempt, error = %e, "address not recorded yet"),
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Background anti-entropy: every interval, when a peer comes back, and right after this process
/// was frozen (its own clock ticks jumped), compare digests with the replicas and pull what is
/// missing. After a freeze, this node's partitions stop serving reads until they caught up.
/// Notices that this process was frozen (SIGSTOP, a VM pause): its own 100 ms ticks jumped by
/// more than a second. On its own task, so that slow work elsewhere (a long catch-up round, a
/// slow hint delivery) is never mistaken for a freeze.
async fn freeze_detector(frozen: Arc<std::sync::atomic::AtomicBool>, wake: Arc<tokio::sync::Notify>) {
    let mut ticker = tokio::time::interval(Duration::from_millis(100));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last = Instant::now();
    loop {
        ticker.tick().await;
        let gap = last.elapsed();
        last = Instant::now();
        if gap > Duration::from_secs(1) {
            tracing::warn!(
                gap_ms = gap.as_millis() as u64,
                "this process was frozen; catching up before serving reads"
            );
            metrics::counter!("recsys_freezes_detected_total").increment(1);
            frozen.store(true, std::sync::atomic::Ordering::Release);
            wake.notify_one();
        }
    }
}

/// Delivers hinted writes to replicas that missed them, on its own task (a slow delivery holds
/// up neither anti-entropy nor the freeze detector).
async fn hint_deliverer(t: Arc<Transport>) {
    let mut ticker = tokio::time::interval(Duration::from_millis(200));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        if !t.hints.is_empty() {
            t.deliver_hints(Duration::from_secs(5)).await;
        }
    }
}

/// Anti-entropy: a full round when a peer comes back, after a freeze, 2 s after start and every
/// sixth period whatever the write rate (a partition written every few seconds never looks
/// settled, so settled-only rounds would never compare it); settled-only rounds in between.
pub(super) async fn anti_entropy_loop(t: Arc<Transport>, every: Duration) {
    let mut changes = t.membership.subscribe();
    let frozen = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let wake = Arc::new(tokio::sync::Notify::new());
    let detector = tokio::spawn(freeze_detector(frozen.clone(), wake.clone()));
    let hints = tokio::spawn(hint_deliverer(t.clone()));
    let _stop = AbortOnDrop(vec![detector, hints]);
    let mut ticker = tokio::time::interval(Duration::from_millis(100));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_round = Instant::now();
    let mut rounds = 0u64;
    let mut seen = std::collections::HashMap::new();
    // One more full round shortly after turning SERVING: peers start writing here only once
    // their failure detectors and flap debounce let them, after the start-up catch-up ran.
    let mut full_at = Some(Instant::now() + Duration::from_secs(2));
    loop {
        // The partitions owned now (the ring changes with joins and drains).
        let own = t.ring().owned_by(&t.node_id);
        let peer_changed = tokio::select! {
            _ = ticker.tick() => false,
            _ = wake.notified() => false,
            r = changes.changed() => r.is_ok(),
        };
        let was_frozen = frozen.swap(false, std::sync::atomic::Ordering::AcqRel);
        if was_frozen {
            for p in &own {
                t.local.set_ready(*p, false);
            }
        }
        let scheduled = full_at.is_some_and(|at| Instant::now() >= at);
        if scheduled {
            full_at = None;
        }
        if was_frozen || peer_changed || scheduled || last_round.elapsed() >= every {
            rounds += 1;
            let full = was_frozen || peer_changed || scheduled || rounds.is_multiple_of(6);
            let mode = if full { replication::Mode::Full } else { replication::Mode::Settled(&mut seen) };
            let started = Instant::now();
            let s = replication::catch_up_mode(&t, &own, Duration::from_secs(30), mode).await;
            let kind = if full { "full" } else { "settled" };
            metrics::histogram!("recsys_anti_entropy_round_seconds", "mode" => kind)
                .record(started.elapsed().as_secs_f64());
            metrics::counter!("recsys_anti_entropy_partitions_compared_total").increment(u64::from(s.parts_checked));
            if was_frozen {
                for p in &own {
                    t.local.set_ready(*p, true);
                }
                tracing::info!(ops = s.ops_pulled, "caught up after the freeze; serving reads again");
            }
            last_round = Instant::now();
        }
    }
}

/// Aborts its tasks when dropped (the loop that owns them was aborted).
struct AbortOnDrop(Vec<tokio::task::JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}
