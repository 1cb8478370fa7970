//! The load client's balancer: it knows only what a client can observe — each node's gRPC health
//! (probed every 200 ms) and the errors its own calls get — never what the runner did to a node.
//! A node whose health is not SERVING, or whose last call failed at the transport (refused,
//! reset, timed out), is skipped for a second; when every node looks bad the calls go round all
//! of them anyway. Calls go to every load node, the faulted ones included; a call unanswered by
//! half its deadline is hedged on another node (a client's hedging policy).
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::time::error::Elapsed;
use tonic::transport::{Channel, Endpoint};

pub struct Balancer {
    pub channels: Vec<Channel>,
    healthy: Vec<AtomicBool>,
    bad_until: Mutex<Vec<Instant>>,
    next: AtomicUsize,
}

/// How long a node stays skipped after a transport-level failure of a call to it.
const PENALTY: Duration = Duration::from_secs(1);

impl Balancer {
    /// Lazy channels (a node down at the start is simply not reachable yet).
    pub fn new(addrs: &[String]) -> anyhow::Result<Arc<Self>> {
        let channels = addrs
            .iter()
            .map(|a| {
                Ok(Endpoint::from_shared(format!("http://{a}"))?
                    .connect_timeout(Duration::from_millis(200))
                    .tcp_nodelay(true)
                    .connect_lazy())
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let n = channels.len();
        Ok(Arc::new(Self {
            channels,
            healthy: (0..n).map(|_| AtomicBool::new(true)).collect(),
            bad_until: Mutex::new(vec![Instant::now(); n]),
            next: AtomicUsize::new(0),
        }))
    }

    /// Probes every node's health until `until` (bounded by the caller's run).
    pub fn probe(self: &Arc<Self>, until: Instant) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(200));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            while Instant::now() < until {
                tick.tick().await;
                let checks = me.channels.iter().map(|ch| {
                    let mut h = tonic_health::pb::health_client::HealthClient::new(ch.clone());
                    async move {
                        let mut r =
                            tonic::Request::new(tonic_health::pb::HealthCheckRequest { service: String::new() });
                        r.set_timeout(Duration::from_millis(150));
                        let r = tokio::time::timeout(Duration::from_millis(180), h.check(r)).await;
                        matches!(r, Ok(Ok(ref x)) if x.get_ref().status
                            == tonic_health::pb::health_check_response::ServingStatus::Serving as i32)
                    }
                });
                let results = futures::future::join_all(checks).await;
                for (i, ok) in results.into_iter().enumerate() {
                    me.healthy[i].store(ok, Ordering::Release);
                }
            }
        })
    }

    /// The next node to call: round robin over those that look up, else over all.
    pub fn pick(&self) -> usize {
        let n = self.channels.len();
        let now = Instant::now();
        let bad = self.bad_until.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        (0..n)
            .map(|k| (start + k) % n)
            .find(|i| self.healthy[*i].load(Ordering::Acquire) && bad[*i] <= now)
            .unwrap_or(start % n)
    }

    /// A call to node `i` failed at the transport (the node did not answer as a server would).
    pub fn failed(&self, i: usize) {
        self.bad_until.lock().unwrap_or_else(|e| e.into_inner())[i] = Instant::now() + PENALTY;
    }
}

impl Balancer {
    /// The next node to call other than `not` (the same when it is the only one).
    fn pick_other(&self, not: usize) -> usize {
        let n = self.channels.len();
        (0..2 * n).map(|_| self.pick()).find(|k| *k != not).unwrap_or(not)
    }

    /// Calls `call(node, time left)` on the picked node, as a gRPC client with a hedging
    /// policy does: when it has not answered by half the `deadline` (a frozen or cut-off node
    /// gives no sign before then), the same call goes to another node and the first answer
    /// wins; a call that never reached a server (refused, reset) is tried once more on another
    /// node within the same `deadline`. The client-side wait is 3 × the deadline. Recommend is a
    /// read, so sending it twice is safe; an event batch is idempotent by event id (both
    /// coordinators may count an event new; the ledger check is by op id).
    pub async fn call_twice<T, F, Fut>(&self, deadline: Duration, call: F) -> Result<Result<T, tonic::Status>, Elapsed>
    where
        F: Fn(usize, Duration) -> Fut,
        Fut: std::future::Future<Output = Result<T, tonic::Status>>,
    {
        let t = Instant::now();
        let k = self.pick();
        let mut first = Box::pin(tokio::time::timeout(deadline * 3, call(k, deadline)));
        let got = match tokio::time::timeout(deadline / 2, &mut first).await {
            Ok(got) => got,
            Err(_) => {
                let k2 = self.pick_other(k);
                let left = deadline.saturating_sub(t.elapsed()).max(Duration::from_millis(1));
                let mut second = Box::pin(tokio::time::timeout(deadline * 3, call(k2, left)));
                tokio::select! {
                    a = &mut first => {
                        if settled(&a) {
                            return a;
                        }
                        self.failed(k);
                        let b = second.await;
                        if !settled(&b) {
                            self.failed(k2);
                        }
                        return b;
                    }
                    b = &mut second => {
                        if settled(&b) {
                            return b;
                        }
                        self.failed(k2);
                        let a = first.await;
                        if !settled(&a) {
                            self.failed(k);
                        }
                        return a;
                    }
                }
            }
        };
        if settled(&got) {
            return got;
        }
        self.failed(k);
        let left = deadline.saturating_sub(t.elapsed());
        if left.is_zero() {
            return got;
        }
        let k2 = self.pick_other(k);
        let again = tokio::time::timeout(deadline * 3, call(k2, left)).await;
        if !settled(&again) {
            self.failed(k2);
        }
        again
    }
}

/// A server's answer (a reply, or an error a server gave): nothing to retry elsewhere.
fn settled<T>(r: &Result<Result<T, tonic::Status>, Elapsed>) -> bool {
    match r {
        Ok(Ok(_)) => true,
        Ok(Err(e)) => !transport_failure(e),
        Err(_) => false,
    }
}

/// Whether an error says the call never got a server's answer (worth trying another node).
pub fn transport_failure(s: &tonic::Status) -> bool {
    matches!(s.code(), tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled)
}
