//! What the benches share: a p50/p99/ops-per-second summary printed beside criterion's own.
use std::time::{Duration, Instant};

pub fn thread_cpu() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes only the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// (p50 wall µs, CPU µs per batch), after printing them.
pub fn summary(name: &str, mut f: impl FnMut()) -> (f64, f64) {
    let mut h = hdrhistogram::Histogram::<u64>::new(3).unwrap();
    let start = Instant::now();
    let cpu0 = thread_cpu();
    let mut n = 0u64;
    while start.elapsed() < Duration::from_secs(3) {
        let t = Instant::now();
        f();
        h.record(t.elapsed().as_nanos() as u64).unwrap();
        n += 1;
    }
    let cpu = (thread_cpu() - cpu0).as_secs_f64() * 1e6 / n as f64;
    let us = |v: u64| v as f64 / 1000.0;
    println!(
        "{name:<28} p50 {:>8.1} µs  p99 {:>8.1} µs  {:>8.0} batches/s  cpu {cpu:>8.1} µs/batch",
        us(h.value_at_quantile(0.5)),
        us(h.value_at_quantile(0.99)),
        n as f64 / start.elapsed().as_secs_f64()
    );
    (us(h.value_at_quantile(0.5)), cpu)
}
