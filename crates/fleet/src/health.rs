//! One worker's health: passive outlier detection (consecutive failures eject it), active
//! checks, and a circuit breaker with growing backoff. Time is passed in.

use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HealthPolicy {
    pub eject_after_failures: u32,
    pub eject_base: Duration,
    pub eject_max: Duration,
}

/// Closed (routable) → open (ejected until a deadline) → half-open (routable again, but
/// one failure re-ejects with a doubled backoff) → closed after a success.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Breaker {
    Closed,
    Open { until: Instant },
    HalfOpen,
}

#[derive(Clone, Debug)]
pub struct Health {
    policy: HealthPolicy,
    pub breaker: Breaker,
    consecutive_failures: u32,
    /// Ejections since the worker last served successfully (drives the backoff).
    streak: u32,
    /// Ejections ever (a counter for metrics).
    pub ejections: u64,
    /// Whether the active check's last answer was good (`true` until one fails).
    pub check_ok: bool,
}

/// What a report changed, for logs and metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    None,
    Ejected(Duration),
    Readmitted,
}

impl Health {
    pub fn new(policy: HealthPolicy) -> Health {
        Health {
            policy,
            breaker: Breaker::Closed,
            consecutive_failures: 0,
            streak: 0,
            ejections: 0,
            check_ok: true,
        }
    }

    /// May requests go to this worker now? Moves open → half-open once the backoff ran
    /// out and the active check (if any) says the worker answers.
    pub fn routable(&mut self, now: Instant) -> bool {
        match self.breaker {
            Breaker::Closed | Breaker::HalfOpen => self.check_ok,
            Breaker::Open { until } if now >= until && self.check_ok => {
                self.breaker = Breaker::HalfOpen;
                true
            }
            Breaker::Open { .. } => false,
        }
    }

    pub fn success(&mut self) -> Change {
        self.consecutive_failures = 0;
        self.check_ok = true;
        if self.breaker == Breaker::HalfOpen {
            self.breaker = Breaker::Closed;
            self.streak = 0;
            return Change::Readmitted;
        }
        Change::None
    }

    /// A request failed in a way that blames the worker (connection refused or reset,
    /// 5xx other than 503, timeout, a stream cut off).
    pub fn failure(&mut self, now: Instant) -> Change {
        self.consecutive_failures += 1;
        let trip = match self.breaker {
            Breaker::HalfOpen => true,
            Breaker::Closed => self.consecutive_failures >= self.policy.eject_after_failures,
            Breaker::Open { .. } => false,
        };
        if trip {
            self.eject(now)
        } else {
            Change::None
        }
    }

    /// The active check's answer.
    pub fn checked(&mut self, ok: bool, now: Instant) -> Change {
        let was = self.check_ok;
        self.check_ok = ok;
        match (was, ok, &self.breaker) {
            (true, false, Breaker::Closed | Breaker::HalfOpen) => self.eject(now),
            (false, true, Breaker::Closed) => Change::Readmitted,
            _ => Change::None,
        }
    }

    fn eject(&mut self, now: Instant) -> Change {
        let shift = self.streak.min(16);
        let backoff = self
            .policy
            .eject_base
            .saturating_mul(1 << shift)
            .min(self.policy.eject_max);
        self.streak += 1;
        self.ejections += 1;
        self.consecutive_failures = 0;
        self.breaker = Breaker::Open {
            until: now + backoff,
        };
        Change::Ejected(backoff)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn health() -> Health {
        Health::new(HealthPolicy {
            eject_after_failures: 3,
            eject_base: Duration::from_secs(1),
            eject_max: Duration::from_secs(4),
        })
    }

    #[test]
    fn consecutive_failures_eject_with_growing_backoff() {
        let t0 = Instant::now();
        let mut h = health();
        assert_eq!(h.failure(t0), Change::None);
        assert_eq!(h.failure(t0), Change::None);
        assert_eq!(h.failure(t0), Change::Ejected(Duration::from_secs(1)));
        assert!(!h.routable(t0));
        let t1 = t0 + Duration::from_secs(1);
        assert!(h.routable(t1), "half-open after the backoff");
        // One failure while half-open re-ejects, for twice as long.
        assert_eq!(h.failure(t1), Change::Ejected(Duration::from_secs(2)));
        let t2 = t1 + Duration::from_secs(2);
        assert!(h.routable(t2));
        assert_eq!(h.failure(t2), Change::Ejected(Duration::from_secs(4)));
        let t3 = t2 + Duration::from_secs(4);
        assert!(h.routable(t3));
        assert_eq!(
            h.failure(t3),
            Change::Ejected(Duration::from_secs(4)),
            "capped"
        );
        let t4 = t3 + Duration::from_secs(4);
        assert!(h.routable(t4));
        assert_eq!(h.success(), Change::Readmitted);
        assert_eq!(h.breaker, Breaker::Closed);
        assert_eq!(h.ejections, 4);
    }

    #[test]
    fn a_success_resets_the_failure_count() {
        let t0 = Instant::now();
        let mut h = health();
        h.failure(t0);
        h.failure(t0);
        h.success();
        assert_eq!(h.failure(t0), Change::None);
        assert!(h.routable(t0));
    }

    #[test]
    fn a_failed_check_ejects_and_the_worker_returns_only_when_checks_pass() {
        let t0 = Instant::now();
        let mut h = health();
        assert!(matches!(h.checked(false, t0), Change::Ejected(_)));
        let later = t0 + Duration::from_secs(10);
        assert!(
            !h.routable(later),
            "backoff over, but the check still fails"
        );
        h.checked(true, later);
        assert!(h.routable(later));
        assert_eq!(h.success(), Change::Readmitted);
    }
}
