//! The scorers' one shared work queue. Every scorer thread pulls from it, so a chunk waits only
//! until *any* scorer is free (one queue, many servers) instead of behind whichever scorer it
//! was assigned to; that is what keeps the tail short when requests outnumber scorers. Batches
//! are cut into chunks so one large request is scored by several threads at once.
use std::collections::VecDeque;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::Stage;

/// Rows `rows` of a row-major matrix shared by all chunks of one batch.
pub struct Chunk {
    pub stage: Stage,
    pub cols: usize,
    pub data: Arc<Vec<f32>>,
    pub rows: Range<usize>,
    /// The caller has given up after this instant; a chunk still queued then is dropped unscored.
    pub deadline: Instant,
    pub enqueued: Instant,
    pub reply: oneshot::Sender<Result<Vec<f32>, String>>,
}

impl Chunk {
    pub fn matrix(&self) -> &[f32] {
        &self.data[self.rows.start * self.cols..self.rows.end * self.cols]
    }
}

pub struct WorkQueue {
    chunks: Mutex<VecDeque<Chunk>>,
    ready: Condvar,
    capacity: usize,
}

/// How long an idle scorer sleeps before it re-checks its stop flag (a missed wake-up costs at most this).
const IDLE_RECHECK: Duration = Duration::from_millis(250);

impl WorkQueue {
    pub fn new(capacity: usize) -> Self {
        Self { chunks: Mutex::new(VecDeque::new()), ready: Condvar::new(), capacity: capacity.max(1) }
    }

    /// Enqueues all chunks of one batch or none of them (`false` when they do not fit).
    /// `urgent` batches go to the front: stage 2 belongs to a request that already waited for
    /// stage 1, and finishing it first is oldest-request-first.
    pub fn push_all(&self, batch: Vec<Chunk>, urgent: bool) -> bool {
        let n = batch.len();
        {
            let mut q = self.chunks.lock().unwrap_or_else(|p| p.into_inner());
            if q.len() + n > self.capacity {
                return false;
            }
            if urgent {
                for c in batch.into_iter().rev() {
                    q.push_front(c);
                }
            } else {
                q.extend(batch);
            }
            metrics::gauge!("recsys_scoring_queue_chunks").set(q.len() as f64);
        }
        if n == 1 {
            self.ready.notify_one();
        } else {
            self.ready.notify_all();
        }
        true
    }

    /// Blocks (on a scorer thread, never a tokio worker) until a chunk arrives or `stop` is set.
    pub fn pop(&self, stop: &AtomicBool) -> Option<Chunk> {
        let mut q = self.chunks.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if stop.load(Ordering::Acquire) {
                return None;
            }
            if let Some(c) = q.pop_front() {
                metrics::gauge!("recsys_scoring_queue_chunks").set(q.len() as f64);
                return Some(c);
            }
            q = self.ready.wait_timeout(q, IDLE_RECHECK).unwrap_or_else(|p| p.into_inner()).0;
        }
    }

    /// Wakes every idle scorer so a stopping one notices its flag at once.
    pub fn wake_all(&self) {
        self.ready.notify_all();
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.chunks.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(stage: Stage, start: usize) -> (Chunk, oneshot::Receiver<Result<Vec<f32>, String>>) {
        let (tx, rx) = oneshot::channel();
        let data = Arc::new((0..20).map(|i| i as f32).collect::<Vec<_>>());
        let now = Instant::now();
        let c = Chunk {
            stage,
            cols: 2,
            data,
            rows: start..start + 1,
            deadline: now + Duration::from_secs(1),
            enqueued: now,
            reply: tx,
        };
        (c, rx)
    }

    #[test]
    fn batches_are_all_or_nothing_and_urgent_ones_jump_the_queue() {
        let q = WorkQueue::new(3);
        let stop = AtomicBool::new(false);
        assert!(q.push_all(vec![chunk(Stage::Light, 0).0, chunk(Stage::Light, 1).0], false));
        // Two more would exceed the capacity of three: neither is queued.
        assert!(!q.push_all(vec![chunk(Stage::Light, 2).0, chunk(Stage::Light, 3).0], false));
        assert_eq!(q.len(), 2);
        assert!(q.push_all(vec![chunk(Stage::Heavy, 4).0], true));
        let first = q.pop(&stop).unwrap();
        assert_eq!((first.stage, first.rows.start), (Stage::Heavy, 4));
        assert_eq!(first.matrix(), &[8.0, 9.0]);
        assert_eq!(q.pop(&stop).unwrap().rows.start, 0);
        assert_eq!(q.pop(&stop).unwrap().rows.start, 1);
        stop.store(true, Ordering::Release);
        assert!(q.pop(&stop).is_none(), "a stopped scorer takes no more work");
    }
}
