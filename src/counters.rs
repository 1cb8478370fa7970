//! Event-time windowed counters: three ring levels (12 × 5 min, 24 × 1 h, 7 × 1 day) so that
//! "last hour", "last day" and "last 7 days" slide with time instead of counting forever.
//! Slots live in a caller-owned dense block (`SLOTS` u32 per counter) so a partition keeps
//! all its counters in one `Vec<u32>`.

pub const LEVELS: [(i64, usize); 3] = [(300, 12), (3600, 24), (86_400, 7)];
pub const SLOTS: usize = 12 + 24 + 7;
/// Head bucket per level, stored next to the slots.
pub const WIDTH: usize = SLOTS + 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Window {
    Hour,
    Day,
    Week,
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

/// Adds `n` at event time `ts` (unix seconds) to the counter stored in `cell` (`WIDTH` u32).
pub fn add(cell: &mut [u32], ts: i64, n: u32) {
    for (level, &(width, len)) in LEVELS.iter().enumerate() {
        let off = level_offset(level);
        let bucket = (ts.max(0) / width) as u32;
        let head = cell[SLOTS + level];
        if bucket > head {
            // Clear the slots the head moves over: they held buckets that fell out of the window.
            let steps = (bucket - head).min(len as u32);
            for s in 1..=steps {
                cell[off + ((head + s) as usize % len)] = 0;
            }
            if head == 0 {
                cell[off..off + len].fill(0);
            }
            cell[SLOTS + level] = bucket;
        } else if bucket + len as u32 <= head {
            continue; // older than this level's window
        }
        let slot = &mut cell[off + (bucket as usize % len)];
        *slot = slot.saturating_add(n);
    }
}

/// Events in the window ending at `now` (unix seconds).
pub fn sum(cell: &[u32], now: i64, window: Window) -> u32 {
    let level = window.level();
    let (width, len) = LEVELS[level];
    let off = level_offset(level);
    let head = cell[SLOTS + level];
    let now_b = (now.max(0) / width) as u32;
    let mut total = 0u32;
    for k in 0..len as u32 {
        let Some(b) = now_b.checked_sub(k) else { break };
        if b <= head && b + (len as u32) > head {
            total = total.saturating_add(cell[off + (b as usize % len)]);
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
    pub fn add(&mut self, ts: i64, w: f32) {
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
