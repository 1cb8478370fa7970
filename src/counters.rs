//! Event-time windowed counters: three ring levels (12 × 5 min, 24 × 1 h, 7 × 1 day) so that
//! "last hour", "last day" and "last 7 days" slide with time instead of counting forever.
//! Slots live in a caller-owned dense block (`SLOTS` u32 per counter) so a partition keeps
//! all its counters in one `Vec<u32>`.

pub const LEVELS: [(i64, usize); 3] = [(300, 12), (3600, 24), (86_400, 7)];
pub const SLOTS: usize = 12 + 24 + 7;
/// Head bucket per level, then the running total of each level's live slots.
pub const WIDTH: usize = SLOTS + 6;
const TOTALS: usize = SLOTS + 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Window {
    Hour = 0,
    Day = 1,
    Week = 2,
}

impl Window {
    fn level(self) -> usize {
        match self {
            Window::Hour => 0,
            Window::Day => 1,
            Window::Week => 2,
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "1h" => Some(Window::Hour),
            "1d" => Some(Window::Day),
            "7d" => Some(Window::Week),
            _ => None,
        }
    }
}

fn level_offset(level: usize) -> usize {
    LEVELS[..level].iter().map(|(_, n)| n).sum()
}

/// An event further than this ahead of the applying node's clock never moves a ring. Ingest
/// rejects such events far earlier (`ingest.max_event_skew_ms`); one found here was logged before
/// that check existed or by a node with a broken clock, and advancing a head to it would empty
/// every window of the counter (and keep it empty, replay included) until real time caught up.
pub const FUTURE_GUARD_SECS: i64 = 86_400;

fn beyond_guard(ts: i64) -> bool {
    let now =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
    ts > now.saturating_add(FUTURE_GUARD_SECS)
}

/// Adds `n` at event time `ts` (unix seconds) to the counter stored in `cell` (`WIDTH` u32).
/// Returns false (and changes nothing) for an event beyond `FUTURE_GUARD_SECS`.
pub fn add(cell: &mut [u32], ts: i64, n: u32) -> bool {
    if beyond_guard(ts) {
        return false;
    }
    for (level, &(width, len)) in LEVELS.iter().enumerate() {
        let off = level_offset(level);
        let bucket = (ts.max(0) / width) as u32;
        let head = cell[SLOTS + level];
        if bucket > head {
            // Clear the slots the head moves over: they held buckets that fell out of the window.
            let steps = (bucket - head).min(len as u32);
            for s in 1..=steps {
                let slot = off + ((head + s) as usize % len);
                cell[TOTALS + level] = cell[TOTALS + level].saturating_sub(cell[slot]);
                cell[slot] = 0;
            }
            cell[SLOTS + level] = bucket;
        } else if bucket + len as u32 <= head {
            continue; // older than this level's window
        }
        let slot = &mut cell[off + (bucket as usize % len)];
        *slot = slot.saturating_add(n);
        cell[TOTALS + level] = cell[TOTALS + level].saturating_add(n);
    }
    true
}

/// Events in the window ending at `now` (unix seconds). The valid buckets are the intersection of
/// the ring's live range (head-len, head] and the window (now-len, now]: one modulo, then a run.
pub fn sum(cell: &[u32], now: i64, window: Window) -> u32 {
    let level = window.level();
    let (width, len) = LEVELS[level];
    let off = level_offset(level);
    let head = i64::from(cell[SLOTS + level]);
    let now_b = now.max(0) / width;
    if now_b == head {
        // The common case for active items: the window is exactly the ring's live range.
        return cell[TOTALS + level];
    }
    let hi = head.min(now_b);
    let lo = (head.max(now_b) - len as i64 + 1).max(0);
    if hi < lo {
        return 0;
    }
    let slots = &cell[off..off + len];
    let mut i = (lo as usize) % len;
    let mut total = 0u32;
    for _ in lo..=hi {
        total = total.saturating_add(slots[i]);
        i += 1;
        if i == len {
            i = 0;
        }
    }
    total
}

/// A small standalone hourly ring used by the trending index (one per geo × item).
#[derive(Debug, Clone, Default)]
pub struct HourRing {
    head: u32,
    slots: [f32; 24],
}

impl HourRing {
    /// Same guard as `add`: an event a day ahead of the clock never moves the ring.
    pub fn add(&mut self, ts: i64, w: f32) {
        if beyond_guard(ts) {
            return;
        }
        let b = (ts.max(0) / 3600) as u32;
        if b > self.head {
            let steps = (b - self.head).min(24);
            for s in 1..=steps {
                self.slots[((self.head + s) % 24) as usize] = 0.0;
            }
            if self.head == 0 {
                self.slots = [0.0; 24];
            }
            self.head = b;
        } else if b + 24 <= self.head {
            return;
        }
        self.slots[(b % 24) as usize] += w;
    }

    pub fn sum(&self, now: i64, hours: u32) -> f32 {
        let now_b = (now.max(0) / 3600) as u32;
        let mut total = 0.0;
        for k in 0..hours.min(24) {
            let Some(b) = now_b.checked_sub(k) else { break };
            if b <= self.head && b + 24 > self.head {
                total += self.slots[(b % 24) as usize];
            }
        }
        total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_slide_with_event_time() {
        let mut c = vec![0u32; WIDTH];
        let t0 = 1_700_000_000;
        add(&mut c, t0, 1); // will age out of 1h and 1d
        add(&mut c, t0 + 2 * 86_400, 2);
        add(&mut c, t0 + 3 * 86_400 - 600, 3);
        let now = t0 + 3 * 86_400;
        assert_eq!(sum(&c, now, Window::Hour), 3);
        assert_eq!(sum(&c, now, Window::Day), 3);
        assert_eq!(sum(&c, now, Window::Week), 6);
        // Ten days later nothing is left in any window.
        assert_eq!(sum(&c, now + 10 * 86_400, Window::Week), 0);
    }

    #[test]
    fn late_events_within_window_count() {
        let mut c = vec![0u32; WIDTH];
        let now = 1_700_000_000;
        add(&mut c, now, 1);
        add(&mut c, now - 1200, 1); // 20 min late: still inside 1h
        add(&mut c, now - 7200, 1); // 2h late: in 1d, not in 1h
        assert_eq!(sum(&c, now, Window::Hour), 2);
        assert_eq!(sum(&c, now, Window::Day), 3);
    }

    fn naive(cell: &[u32], now: i64, window: Window) -> u32 {
        let level = window.level();
        let (width, len) = LEVELS[level];
        let off = level_offset(level);
        let head = cell[SLOTS + level];
        let now_b = (now.max(0) / width) as u32;
        (0..len as u32)
            .filter_map(|k| now_b.checked_sub(k))
            .filter(|b| *b <= head && b + (len as u32) > head)
            .map(|b| cell[off + (b as usize % len)])
            .sum()
    }

    #[test]
    fn fast_sum_matches_definition() {
        let mut c = vec![0u32; WIDTH];
        let t0 = 1_700_000_000i64;
        let mut x = 12345u64;
        for _ in 0..500 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            add(&mut c, t0 + (x >> 40) as i64 % (9 * 86_400), 1);
            for probe in [t0, t0 + 3_600, t0 + 5 * 86_400, t0 + 9 * 86_400, t0 + 20 * 86_400] {
                for w in [Window::Hour, Window::Day, Window::Week] {
                    assert_eq!(sum(&c, probe, w), naive(&c, probe, w));
                }
            }
        }
    }

    #[test]
    fn an_event_far_in_the_future_wipes_no_window() {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
        // Mid-hour, so `now - 60` and `now` share an hour bucket whenever the test runs (run in
        // the first minute of an hour it failed).
        let now = now - now.rem_euclid(3600) + 1800;
        let mut c = vec![0u32; WIDTH];
        let mut r = HourRing::default();
        add(&mut c, now - 60, 3);
        r.add(now - 60, 3.0);
        assert!(!add(&mut c, now + 30 * 86_400, 1), "a month ahead is ignored");
        r.add(now + 30 * 86_400, 1.0);
        add(&mut c, now, 1);
        r.add(now, 1.0);
        assert_eq!(sum(&c, now, Window::Hour), 4);
        assert_eq!(r.sum(now, 1), 4.0);
    }

    #[test]
    fn hour_ring_forgets_old_hours() {
        let mut r = HourRing::default();
        let now = 1_700_000_000;
        r.add(now - 30 * 3600, 5.0);
        r.add(now - 3600, 2.0);
        r.add(now, 1.0);
        assert_eq!(r.sum(now, 24), 3.0);
        assert_eq!(r.sum(now, 1), 1.0);
    }
}
