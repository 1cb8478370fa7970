//! Streaming incoming partitions here: which to start (within the concurrency bound), the
//! chunked, throttled stream from a current owner, and the closing catch-up.
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::super::replication;
use super::progress::MoveReport;
use super::Controller;
use crate::domain::{LoggedOp, Part};
use crate::transport::{decode, pb};

/// A shared token bucket over the bytes this node streams in.
pub(super) struct Throttle {
    rate: f64,
    state: Mutex<(f64, Instant)>,
}

impl Throttle {
    pub(super) fn new(bytes_per_sec: u64) -> Self {
        Self { rate: bytes_per_sec as f64, state: Mutex::new((bytes_per_sec as f64, Instant::now())) }
    }

    /// Charges `bytes`; returns how long to wait before the next chunk (the debt at `rate`).
    pub(super) fn charge(&self, bytes: usize) -> Duration {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let refill = now.duration_since(s.1).as_secs_f64() * self.rate;
        s.0 = (s.0 + refill).min(self.rate) - bytes as f64;
        s.1 = now;
        if s.0 >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-s.0 / self.rate)
        }
    }
}

impl Controller {
    /// Starts streams for incoming partitions, within the concurrency bound.
    pub(super) fn start_moves(self: &Arc<Self>) {
        let ring = self.t.ring();
        if !ring.in_transition() || !self.all_live_caught_up(&ring) {
            return;
        }
        let incoming = ring.incoming(self.me());
        let mut p = self.progress.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        for part in incoming {
            if p.running.len() >= self.settings.concurrency {
                break;
            }
            if p.streamed.contains(&part) || p.running.contains_key(&part) {
                continue;
            }
            if p.retry_at.get(&part).is_some_and(|(at, _)| *at > now) {
                continue;
            }
            let failures = p.retry_at.get(&part).map_or(0, |(_, n)| *n);
            // A current owner that is alive and serving reads of it.
            let sources: Vec<String> = ring
                .owners(part.role, part.partition)
                .iter()
                .filter(|o| *o != self.me() && self.t.membership.is_routable(o))
                .cloned()
                .collect();
            let Some(from) = (!sources.is_empty()).then(|| sources[failures % sources.len()].clone()) else {
                // No live copy: when every current owner is gone for good (removed), there is
                // nothing to stream; the partition starts empty here and the loss is counted.
                let gone = ring.owners(part.role, part.partition).iter().all(|o| ring.spec.removed.contains(o));
                if gone {
                    tracing::error!(part = %part, "no live replica holds this partition: it starts empty here");
                    metrics::counter!("recsys_partitions_lost_total").increment(1);
                    p.streamed.insert(part);
                }
                continue;
            };
            let report = MoveReport {
                role: part.role.as_str().to_string(),
                partition: part.partition,
                from: from.clone(),
                to: self.me().to_string(),
                ..Default::default()
            };
            p.running.insert(part, report);
            metrics::gauge!("recsys_moves_in_progress").set(p.running.len() as f64);
            let me = self.clone();
            let epoch = ring.epoch;
            tokio::spawn(async move {
                let started = Instant::now();
                let r = me.stream(part, &from, epoch).await;
                let mut p = me.progress.lock().unwrap_or_else(|e| e.into_inner());
                let report = p.running.remove(&part);
                match r {
                    Ok(()) => {
                        let bytes = report.map(|r| r.bytes_done).unwrap_or(0);
                        tracing::info!(part = %part, from = %from, bytes, ms = started.elapsed().as_millis() as u64, "partition streamed here");
                        metrics::counter!("recsys_moves_completed_total").increment(1);
                        p.streamed.insert(part);
                        p.retry_at.remove(&part);
                    }
                    Err(e) => {
                        tracing::warn!(part = %part, from = %from, error = %e, "partition stream failed; trying again");
                        metrics::counter!("recsys_move_failures_total").increment(1);
                        let n = p.retry_at.get(&part).map_or(0, |(_, n)| *n) + 1;
                        p.retry_at.insert(part, (Instant::now() + Duration::from_secs(1), n));
                    }
                }
                metrics::gauge!("recsys_moves_in_progress").set(p.running.len() as f64);
                drop(p);
                me.wake.notify_one();
            });
        }
    }

    /// Streams one partition's op log from `from`, then closes the gap with one anti-entropy
    /// round against the current owners.
    pub(super) async fn stream(&self, part: Part, from: &str, epoch: u64) -> Result<(), String> {
        let client = self.t.peer(from).ok_or_else(|| format!("no address for {from}"))?;
        let mut batch = 0u64;
        let (mut bytes_done, mut ops_done) = (0u64, 0u64);
        let started = Instant::now();
        // Bounded: a partition of n batches takes n / (batches per chunk) rounds; the bound only
        // guards against a source whose log never ends (reaching it is a failure, not a success).
        let mut ended = false;
        for _ in 0..1_000_000 {
            if self.t.ring().epoch != epoch {
                // The change was replaced or committed meanwhile: stop; the loop decides again.
                if !self.t.ring().incoming(self.me()).contains(&part) {
                    return Err("the membership change moved on".into());
                }
            }
            let timeout = Duration::from_secs(10);
            let req = pb::StreamRequest {
                envelope: Some(self.t.envelope(timeout)),
                role: part.role as u32,
                partition: part.partition,
                from_batch: batch,
                max_bytes: self.settings.chunk_bytes,
            };
            let t0 = Instant::now();
            let reply = client.clone().stream(self.t.request(req, timeout)).await;
            self.t.observe(from, "stream", t0, reply.is_ok());
            let reply = reply.map_err(|s| format!("{from}: {}", s.message()))?.into_inner();
            let size = reply.body.len();
            let ops: Vec<LoggedOp> = decode(&reply.body)?;
            ops_done += ops.len() as u64;
            bytes_done += size as u64;
            metrics::counter!("recsys_move_bytes_total").increment(size as u64);
            if !ops.is_empty() {
                let (results, _) = self.t.local.apply(vec![(part, Arc::new(ops))], |_| true).await;
                for (_, r) in results {
                    r.map_err(|e| format!("applying streamed ops: {e}"))?;
                }
            }
            let total = if ops_done > 0 && reply.ops_total > ops_done {
                bytes_done * reply.ops_total / ops_done
            } else {
                bytes_done
            };
            let rate = bytes_done as f64 / started.elapsed().as_secs_f64().max(1e-3);
            {
                let mut p = self.progress.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(r) = p.running.get_mut(&part) {
                    r.bytes_done = bytes_done;
                    r.bytes_total = total;
                    r.eta_ms = ((total.saturating_sub(bytes_done)) as f64 / rate * 1000.0) as u64;
                }
            }
            if reply.done {
                ended = true;
                break;
            }
            batch = reply.next_batch;
            let wait = self.throttle.charge(size);
            if !wait.is_zero() {
                // The throttle itself: a pause between chunks, not a synchronisation.
                tokio::time::sleep(wait).await;
            }
        }
        if !ended {
            return Err(format!("the stream from {from} did not end"));
        }
        // Consistent range movement: every previous owner that was not removed, alive or not.
        let ring = self.t.ring();
        let previous: Vec<String> = ring
            .owners(part.role, part.partition)
            .iter()
            .filter(|o| *o != self.me() && !ring.spec.removed.contains(o))
            .cloned()
            .collect();
        let down: Vec<&String> = previous.iter().filter(|o| !self.t.membership.takes_writes(o)).collect();
        if !down.is_empty() {
            if self.settings.consistent {
                return Err(format!(
                    "previous owner(s) {} down: the move waits for them (they may hold acknowledged writes)",
                    down.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(",")
                ));
            }
            tracing::warn!(part = %part, down = ?down, "consistent_range_movement is off: completing without a down previous owner");
            metrics::counter!("recsys_inconsistent_moves_total").increment(1);
        }
        let c =
            replication::catch_up_from(&self.t, &[(part, previous)], Duration::from_secs(30), replication::Mode::Full)
                .await;
        if c.peers_failed > 0 {
            return Err(format!("closing catch-up: {} replica(s) did not answer", c.peers_failed));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throttle_charges_debt_at_its_rate() {
        let t = Throttle::new(1_000_000);
        assert_eq!(t.charge(500_000), Duration::ZERO, "within the first second's allowance");
        let wait = t.charge(1_500_000);
        assert!(wait >= Duration::from_millis(900) && wait <= Duration::from_millis(1100), "{wait:?}");
    }
}
