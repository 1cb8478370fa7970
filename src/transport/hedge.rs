//! Hedged reads: a remote partition call that has not answered by that peer's recent p95 (per
//! peer and read kind) is also sent to the next replica; the first answer wins. `Latencies` keeps
//! the last `WINDOW` successful call times per (peer, kind); `Budget` caps hedges at a share of
//! the primary calls (a token bucket: each primary call adds `ratio` tokens, a hedge costs one).
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// Recent samples kept per (peer, kind).
pub const WINDOW: usize = 256;
/// No p95 (so no hedging) before this many samples.
pub const MIN_SAMPLES: usize = 16;
/// The p95 is recomputed every this many samples (a 256-element selection, about a microsecond).
const RECOMPUTE_EVERY: u32 = 8;
/// Tokens the budget holds at most: a burst of this many hedges after a quiet period.
const BUDGET_CAP: u64 = 5;
const MILLI: u64 = 1000;

struct Ring {
    micros: Vec<u32>,
    next: usize,
    since: u32,
    p95: Option<u32>,
}

impl Ring {
    fn new() -> Self {
        Self { micros: Vec::with_capacity(WINDOW), next: 0, since: 0, p95: None }
    }

    fn push(&mut self, us: u32) {
        if self.micros.len() < WINDOW {
            self.micros.push(us);
        } else {
            self.micros[self.next] = us;
        }
        self.next = (self.next + 1) % WINDOW;
        self.since += 1;
        if self.micros.len() >= MIN_SAMPLES && (self.p95.is_none() || self.since >= RECOMPUTE_EVERY) {
            self.since = 0;
            self.p95 = Some(p95(&self.micros));
        }
    }
}

/// The 95th percentile (nearest rank) of a non-empty sample.
pub fn p95(samples: &[u32]) -> u32 {
    let mut v = samples.to_vec();
    let rank = ((v.len() as f64) * 0.95).ceil() as usize;
    let i = rank.clamp(1, v.len()) - 1;
    *v.select_nth_unstable(i).1
}

/// Recent call latencies per (peer, read kind). The lock is held for a push or a lookup only,
/// never across an await.
#[derive(Default)]
pub struct Latencies {
    rings: Mutex<HashMap<(String, &'static str), Ring>>,
}

impl Latencies {
    pub fn record(&self, peer: &str, kind: &'static str, took: Duration) {
        let us = took.as_micros().min(u128::from(u32::MAX)) as u32;
        let mut m = self.rings.lock().unwrap_or_else(|p| p.into_inner());
        match m.get_mut(&(peer.to_string(), kind)) {
            Some(r) => r.push(us),
            None => {
                let mut r = Ring::new();
                r.push(us);
                m.insert((peer.to_string(), kind), r);
            }
        }
    }

    /// The peer's recent p95 for this kind (None until `MIN_SAMPLES` calls answered).
    pub fn p95(&self, peer: &str, kind: &'static str) -> Option<Duration> {
        let m = self.rings.lock().unwrap_or_else(|p| p.into_inner());
        m.get(&(peer.to_string(), kind)).and_then(|r| r.p95).map(|us| Duration::from_micros(u64::from(us)))
    }
}

/// Caps hedges at `ratio` extra calls per primary call (token bucket in thousandths, lock-free).
pub struct Budget {
    milli: AtomicU64,
    per_call: u64,
}

impl Budget {
    pub fn new(ratio: f64) -> Self {
        let per_call = (ratio.clamp(0.0, 1.0) * MILLI as f64).round() as u64;
        Self { milli: AtomicU64::new(0), per_call }
    }

    pub fn enabled(&self) -> bool {
        self.per_call > 0
    }

    /// A primary remote call was made.
    pub fn primary(&self) {
        if self.per_call == 0 {
            return;
        }
        let cap = BUDGET_CAP * MILLI;
        let _ = self.milli.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| Some((t + self.per_call).min(cap)));
    }

    /// Takes one hedge's token; false when the budget is spent.
    pub fn try_hedge(&self) -> bool {
        self.milli.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| t.checked_sub(MILLI)).is_ok()
    }
}

/// When to hedge a call to a peer: its p95 for this kind, never below `min_delay`; None when
/// hedging is off or the peer has too few samples yet.
pub struct Policy {
    pub latencies: Latencies,
    pub budget: Budget,
    pub min_delay: Duration,
}

impl Policy {
    pub fn new(ratio: f64, min_delay: Duration) -> Self {
        Self { latencies: Latencies::default(), budget: Budget::new(ratio), min_delay }
    }

    pub fn delay(&self, peer: &str, kind: &'static str) -> Option<Duration> {
        if !self.budget.enabled() {
            return None;
        }
        self.latencies.p95(peer, kind).map(|p| p.max(self.min_delay))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn p95_of_a_window_and_its_bound() {
        let l = Latencies::default();
        for _ in 0..(MIN_SAMPLES - 1) {
            l.record("n2", "hydrate", Duration::from_millis(1));
        }
        assert_eq!(l.p95("n2", "hydrate"), None, "too few samples");
        l.record("n2", "hydrate", Duration::from_millis(1));
        assert_eq!(l.p95("n2", "hydrate"), Some(Duration::from_millis(1)));
        // 95 fast and 5 slow of every 100: the p95 is still fast; 10 slow of 100: slow.
        let l = Latencies::default();
        for i in 0..200u32 {
            l.record("n2", "profile", Duration::from_micros(if i % 100 < 95 { 500 } else { 9000 }));
        }
        assert_eq!(l.p95("n2", "profile"), Some(Duration::from_micros(500)));
        for i in 0..WINDOW as u32 {
            l.record("n2", "profile", Duration::from_micros(if i % 10 == 0 { 9000 } else { 500 }));
        }
        assert_eq!(l.p95("n2", "profile"), Some(Duration::from_micros(9000)));
        // Per peer and per kind; the window forgets: 256 fast samples replace the slow ones.
        assert_eq!(l.p95("n3", "profile"), None);
        assert_eq!(l.p95("n2", "hydrate"), None);
        for _ in 0..WINDOW {
            l.record("n2", "profile", Duration::from_micros(700));
        }
        assert_eq!(l.p95("n2", "profile"), Some(Duration::from_micros(700)));
        assert_eq!(p95(&[5]), 5);
        assert_eq!(p95(&(1..=100).collect::<Vec<u32>>()), 95);
    }

    #[test]
    fn budget_allows_about_five_percent_and_caps_bursts() {
        let b = Budget::new(0.05);
        assert!(!b.try_hedge(), "nothing earned yet");
        let mut hedges = 0;
        for _ in 0..10_000 {
            b.primary();
            if b.try_hedge() {
                hedges += 1;
            }
        }
        assert_eq!(hedges, 500, "5 % of 10000 primary calls");
        // After a quiet stretch the bucket holds at most BUDGET_CAP hedges.
        for _ in 0..100_000 {
            b.primary();
        }
        let burst = (0..100).filter(|_| b.try_hedge()).count();
        assert_eq!(burst as u64, BUDGET_CAP);
        let off = Budget::new(0.0);
        off.primary();
        assert!(!off.enabled() && !off.try_hedge());
    }

    #[test]
    fn delay_has_a_floor_and_is_off_without_budget() {
        let p = Policy::new(0.05, Duration::from_millis(2));
        for _ in 0..MIN_SAMPLES {
            p.latencies.record("n2", "briefs", Duration::from_micros(300));
        }
        assert_eq!(p.delay("n2", "briefs"), Some(Duration::from_millis(2)), "the floor");
        for _ in 0..WINDOW {
            p.latencies.record("n2", "briefs", Duration::from_millis(7));
        }
        assert_eq!(p.delay("n2", "briefs"), Some(Duration::from_millis(7)));
        let off = Policy::new(0.0, Duration::from_millis(2));
        for _ in 0..MIN_SAMPLES {
            off.latencies.record("n2", "briefs", Duration::from_millis(7));
        }
        assert_eq!(off.delay("n2", "briefs"), None);
    }
}
