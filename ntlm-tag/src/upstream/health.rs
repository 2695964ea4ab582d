//! Backend health: passive (failed connects and timeouts take a backend out, with exponential backoff)
//! and optional active checks (a GET on a path, expecting a status).
#![forbid(unsafe_code)]

use std::{
    sync::{
        Mutex,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

#[derive(Debug, Default)]
pub struct Health {
    failures: AtomicU32,
    down_until: Mutex<Option<Instant>>,
    /// Set by active checks: down until a check succeeds.
    check_failed: std::sync::atomic::AtomicBool,
}

impl Health {
    /// True when new connections may be sent here.
    pub fn is_up(&self) -> bool {
        if self.check_failed.load(Ordering::Relaxed) {
            return false;
        }
        match self.down_until.lock() {
            Ok(until) => until.is_none_or(|t| Instant::now() >= t),
            Err(_) => true,
        }
    }

    /// A connect failure or timeout: out for a backoff that doubles with each consecutive failure.
    /// Returns the backoff.
    pub fn record_failure(&self) -> Duration {
        let n = self.failures.fetch_add(1, Ordering::Relaxed).min(16);
        let backoff = FIRST_BACKOFF.saturating_mul(1 << n.min(5)).min(MAX_BACKOFF);
        if let Ok(mut until) = self.down_until.lock() {
            *until = Some(Instant::now() + backoff);
        }
        backoff
    }

    /// A successful exchange: the backend is fully back.
    pub fn record_success(&self) {
        if self.failures.swap(0, Ordering::Relaxed) != 0
            && let Ok(mut until) = self.down_until.lock()
        {
            *until = None;
        }
    }

    /// Result of an active check. Returns true when the state changed.
    pub fn record_check(&self, ok: bool) -> bool {
        let was_failed = self.check_failed.swap(!ok, Ordering::Relaxed);
        if ok {
            self.record_success();
        }
        was_failed == ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_take_a_backend_out_and_success_brings_it_back() {
        let h = Health::default();
        assert!(h.is_up());
        assert_eq!(h.record_failure(), Duration::from_secs(1));
        assert!(!h.is_up());
        assert_eq!(h.record_failure(), Duration::from_secs(2));
        h.record_success();
        assert!(h.is_up());
    }

    #[test]
    fn backoff_is_capped() {
        let h = Health::default();
        let last = (0..20).map(|_| h.record_failure()).last();
        assert_eq!(last, Some(MAX_BACKOFF));
    }

    #[test]
    fn active_checks_override_until_they_pass() {
        let h = Health::default();
        assert!(h.record_check(false));
        assert!(!h.is_up());
        assert!(!h.record_check(false));
        assert!(h.record_check(true));
        assert!(h.is_up());
    }
}
