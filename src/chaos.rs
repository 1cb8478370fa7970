//! Fault injection for chaos tests (`Admin.InjectFault`, `recsys fault`): the registry of this
//! node's active faults. Compiled in always; every fault is refused unless `[chaos] enabled =
//! true`. Delays and failing RPCs expire by themselves (at most `chaos.max_duration_ms`); a kill
//! is carried out by the admin service on the actor itself and is not kept here.
//!
//! Hooks, each one cheap when nothing is injected (one atomic load):
//! - `LocalPartitions::read` sleeps `read_delay(part)` before asking the actor (local and
//!   internal reads both pass there);
//! - the internal service answers UNAVAILABLE while `serving_fails()`;
//! - `Transport::peer` has no client for any peer while `outbound_fails()` (every outbound
//!   internal call then fails at once, as for a peer with no address).
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::domain::Part;

/// Active faults kept at once (older ones must expire before more are added).
const MAX_ACTIVE: usize = 64;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ChaosError {
    #[error("chaos.enabled is false on {0}")]
    Disabled(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{MAX_ACTIVE} faults are active on this node already; wait for some to expire")]
    TooMany,
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    Delay { part: Part, delay: Duration },
    FailRpcs { outbound: bool },
    ClockOffset { ms: i32 },
}

/// The largest clock step the suite may inject (twice the internal MAC's window: beyond it the
/// node's internal calls are refused, a fault worth seeing too).
const MAX_CLOCK_OFFSET_MS: i32 = 600_000;

#[derive(Debug, Clone, Copy)]
struct Active {
    kind: Kind,
    until: Instant,
}

impl Active {
    fn describe(&self, now: Instant) -> String {
        let left = self.until.saturating_duration_since(now).as_secs_f64();
        match self.kind {
            Kind::Delay { part, delay } => format!("delay {part} by {} ms, {left:.1} s left", delay.as_millis()),
            Kind::FailRpcs { outbound } => {
                let dir = if outbound { "served+outbound" } else { "served" };
                format!("fail internal rpcs ({dir}), {left:.1} s left")
            }
            Kind::ClockOffset { ms } => format!("clock off by {ms:+} ms, {left:.1} s left"),
        }
    }
}

pub struct Faults {
    node_id: String,
    enabled: bool,
    max_duration: Duration,
    /// Some fault may be active (false: the hooks skip the lock).
    any: AtomicBool,
    active: Mutex<Vec<Active>>,
}

impl Faults {
    pub fn new(node_id: &str, enabled: bool, max_duration: Duration) -> Self {
        Self {
            node_id: node_id.to_string(),
            enabled,
            max_duration,
            any: AtomicBool::new(false),
            active: Mutex::new(Vec::new()),
        }
    }

    pub fn disabled() -> Self {
        Self::new("", false, Duration::ZERO)
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Refused unless chaos is enabled on this node.
    pub fn check_enabled(&self) -> Result<(), ChaosError> {
        if self.enabled {
            Ok(())
        } else {
            Err(ChaosError::Disabled(self.node_id.clone()))
        }
    }

    /// The active faults, expired ones dropped.
    fn with_active<T>(&self, f: impl FnOnce(&mut Vec<Active>, Instant) -> T) -> T {
        let mut a = self.active.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        a.retain(|x| x.until > now);
        let out = f(&mut a, now);
        self.any.store(!a.is_empty(), Ordering::Release);
        out
    }

    fn find(&self, pred: impl Fn(&Kind) -> Option<Duration>) -> Option<Duration> {
        if !self.any.load(Ordering::Acquire) {
            return None;
        }
        self.with_active(|a, _| a.iter().filter_map(|x| pred(&x.kind)).max())
    }

    /// How long reads of `part` are held back here now.
    pub fn read_delay(&self, part: Part) -> Option<Duration> {
        self.find(|k| match *k {
            Kind::Delay { part: p, delay } if p == part => Some(delay),
            _ => None,
        })
    }

    /// The internal RPCs this node serves fail now.
    pub fn serving_fails(&self) -> bool {
        self.find(|k| matches!(k, Kind::FailRpcs { .. }).then_some(Duration::ZERO)).is_some()
    }

    /// The internal RPCs this node makes fail now.
    pub fn outbound_fails(&self) -> bool {
        self.find(|k| matches!(k, Kind::FailRpcs { outbound: true }).then_some(Duration::ZERO)).is_some()
    }

    fn duration(&self, ms: u32) -> Result<Duration, ChaosError> {
        let d = Duration::from_millis(u64::from(ms));
        if d.is_zero() || d > self.max_duration {
            return Err(ChaosError::Invalid(format!(
                "duration_ms: {ms} is outside [1, {}] (chaos.max_duration_ms)",
                self.max_duration.as_millis()
            )));
        }
        Ok(d)
    }

    fn add(&self, kind: Kind, d: Duration) -> Result<String, ChaosError> {
        self.with_active(|a, now| {
            if a.len() >= MAX_ACTIVE {
                return Err(ChaosError::TooMany);
            }
            let f = Active { kind, until: now + d };
            a.push(f);
            Ok(f.describe(now))
        })
    }

    /// Delays reads of `part` by `delay_ms` for `duration_ms` (the caller checked the partition).
    pub fn delay(&self, part: Part, delay_ms: u32, duration_ms: u32) -> Result<String, ChaosError> {
        self.check_enabled()?;
        if delay_ms == 0 || Duration::from_millis(u64::from(delay_ms)) > self.max_duration {
            return Err(ChaosError::Invalid(format!(
                "delay_partition.delay_ms: {delay_ms} is outside [1, {}]",
                self.max_duration.as_millis()
            )));
        }
        let d = self.duration(duration_ms).map_err(|e| ChaosError::Invalid(format!("delay_partition.{e}")))?;
        self.add(Kind::Delay { part, delay: Duration::from_millis(u64::from(delay_ms)) }, d)
    }

    /// Fails this node's internal RPCs (served, and made when `outbound`) for `duration_ms`.
    pub fn fail_rpcs(&self, duration_ms: u32, outbound: bool) -> Result<String, ChaosError> {
        self.check_enabled()?;
        let d = self.duration(duration_ms).map_err(|e| ChaosError::Invalid(format!("fail_rpcs.{e}")))?;
        self.add(Kind::FailRpcs { outbound }, d)
    }

    /// Steps this node's clock by `offset_ms` for `duration_ms` (the newest step replaces an
    /// earlier one).
    pub fn clock_offset(&self, offset_ms: i32, duration_ms: u32) -> Result<String, ChaosError> {
        self.check_enabled()?;
        if offset_ms == 0 || offset_ms.unsigned_abs() > MAX_CLOCK_OFFSET_MS as u32 {
            return Err(ChaosError::Invalid(format!(
                "clock_offset.offset_ms: {offset_ms} is outside ±[1, {MAX_CLOCK_OFFSET_MS}]"
            )));
        }
        let d = self.duration(duration_ms).map_err(|e| ChaosError::Invalid(format!("clock_offset.{e}")))?;
        self.with_active(|a, _| a.retain(|x| !matches!(x.kind, Kind::ClockOffset { .. })));
        let out = self.add(Kind::ClockOffset { ms: offset_ms }, d)?;
        crate::clock::NODE.set_offset(i64::from(offset_ms), d);
        tracing::warn!(offset_ms, duration_ms, "chaos: this node's clock is stepped");
        Ok(out)
    }

    /// What is active now, one line each.
    pub fn active(&self) -> Vec<String> {
        self.with_active(|a, now| a.iter().map(|x| x.describe(now)).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Role;

    #[test]
    fn refused_unless_enabled_and_validated() {
        let off = Faults::new("n1", false, Duration::from_secs(60));
        assert_eq!(off.fail_rpcs(1000, true), Err(ChaosError::Disabled("n1".into())));
        assert_eq!(off.fail_rpcs(1000, true).unwrap_err().to_string(), "chaos.enabled is false on n1");
        let on = Faults::new("n1", true, Duration::from_secs(60));
        assert!(on.fail_rpcs(0, false).unwrap_err().to_string().starts_with("fail_rpcs.duration_ms"));
        assert!(on.fail_rpcs(61_000, false).is_err());
        let p = Part::new(Role::Feature, 3);
        assert!(on.delay(p, 0, 1000).unwrap_err().to_string().starts_with("delay_partition.delay_ms"));
    }

    #[test]
    fn faults_apply_and_expire() {
        let f = Faults::new("n1", true, Duration::from_secs(60));
        let p = Part::new(Role::Feature, 3);
        assert_eq!(f.read_delay(p), None);
        f.delay(p, 200, 60).unwrap();
        assert_eq!(f.read_delay(p), Some(Duration::from_millis(200)));
        assert_eq!(f.read_delay(Part::new(Role::Generator, 3)), None);
        f.fail_rpcs(60, false).unwrap();
        assert!(f.serving_fails());
        assert!(!f.outbound_fails());
        assert_eq!(f.active().len(), 2);
        // Bounded wait for expiry (the fault's own clock), not a sleep used as synchronisation.
        let end = Instant::now() + Duration::from_secs(5);
        while !f.active().is_empty() {
            assert!(Instant::now() < end, "faults did not expire");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(f.read_delay(p), None);
        assert!(!f.serving_fails());
    }
}
