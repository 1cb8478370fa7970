//! The node's wall clock. Everything that stamps or judges time by the calendar (event ages,
//! upsert versions, page-token expiry, the internal MAC's window, trending windows) reads it
//! here, so the chaos suite can step one node's clock (`clock_offset` fault) without touching
//! the host's: a node whose clock is off is a fault every real cluster meets.
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The host's clock plus an offset that ends by itself.
pub struct Clock {
    /// Milliseconds added to the host's clock (0: none).
    offset_ms: AtomicI64,
    /// When the offset ends, in milliseconds since `START`.
    until_ms: AtomicI64,
}

static START: OnceLock<Instant> = OnceLock::new();

/// This process's clock.
pub static NODE: Clock = Clock::new();

fn since_start_ms() -> i64 {
    START.get_or_init(Instant::now).elapsed().as_millis() as i64
}

impl Clock {
    pub const fn new() -> Self {
        Self { offset_ms: AtomicI64::new(0), until_ms: AtomicI64::new(0) }
    }

    /// The offset in effect now (0: none; one atomic load when none is set).
    pub fn offset_ms(&self) -> i64 {
        let off = self.offset_ms.load(Ordering::Acquire);
        if off == 0 {
            return 0;
        }
        if since_start_ms() >= self.until_ms.load(Ordering::Acquire) {
            // Only this offset ends: a step set meanwhile stays.
            let _ = self.offset_ms.compare_exchange(off, 0, Ordering::AcqRel, Ordering::Acquire);
            return 0;
        }
        off
    }

    /// Unix time in milliseconds, as this clock reads.
    pub fn unix_ms(&self) -> i64 {
        let host = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0);
        host.saturating_add(self.offset_ms())
    }

    /// Steps the clock by `offset_ms` for `duration` (replacing an earlier offset); it steps
    /// back by itself when the duration ends.
    pub fn set_offset(&self, offset_ms: i64, duration: Duration) {
        self.until_ms.store(since_start_ms().saturating_add(duration.as_millis() as i64), Ordering::Release);
        self.offset_ms.store(offset_ms, Ordering::Release);
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

/// Unix time in milliseconds, as this node sees it.
pub fn unix_ms() -> i64 {
    NODE.unix_ms()
}

/// Unix time in seconds, as this node sees it.
pub fn unix_secs() -> i64 {
    unix_ms().div_euclid(1000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_offset_moves_the_clock_and_ends_by_itself() {
        let c = Clock::new();
        let before = c.unix_ms();
        c.set_offset(-60_000, Duration::from_millis(20));
        assert!(c.unix_ms() <= before - 59_000);
        assert_eq!(c.offset_ms(), -60_000);
        // Ends by itself: an offset whose end has passed reads as none.
        c.set_offset(5_000, Duration::ZERO);
        assert_eq!(c.offset_ms(), 0);
        assert!(c.unix_ms() >= before);
    }
}
