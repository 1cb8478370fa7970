//! The load client's balancer: it knows only what a client can observe — each node's gRPC health
//! (probed every 200 ms) and the errors its own calls get — never what the runner did to a node.
//! A node whose health is not SERVING, or whose last call failed at the transport (refused,
//! reset, timed out), is skipped for a second; when every node looks bad the calls go round all
//! of them anyway. Calls go to every load node, the faulted ones included.
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
    /// Calls `call(node, time left)` on the picked node; a call that never reached a server
    /// (refused, reset, no answer at all) is tried once more on another node within the same
    /// `deadline`, as gRPC clients retry transparently. The client-side wait is 3 × the deadline.
    pub async fn call_twice<T, F, Fut>(&self, deadline: Duration, call: F) -> Result<Result<T, tonic::Status>, Elapsed>
    where
        F: Fn(usize, Duration) -> Fut,
        Fut: std::future::Future<Output = Result<T, tonic::Status>>,
    {
        let t = Instant::now();
        let mut last = None;
        for _try in 0..2 {
            let left = deadline.saturating_sub(t.elapsed());
            if left.is_zero() && last.is_some() {
                break;
            }
            let k = self.pick();
            let got = tokio::time::timeout(deadline * 3, call(k, left.max(Duration::from_millis(1)))).await;
            let retry = match &got {
                Ok(Err(e)) => transport_failure(e),
                Err(_) => true,
                Ok(Ok(_)) => false,
            };
            if retry {
                self.failed(k);
            }
            last = Some(got);
            if !retry {
                break;
            }
        }
        last.expect("the first try always runs")
    }
}

/// Whether an error says the call never got a server's answer (worth trying another node).
pub fn transport_failure(s: &tonic::Status) -> bool {
    matches!(s.code(), tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled)
}
