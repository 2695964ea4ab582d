//! Auth-aware connections and lockout protection: who each client connection authenticated as,
//! and a gateway that stops a client looping on a bad password before the domain locks the account.
#![forbid(unsafe_code)]

pub mod auth_state;
pub mod lockout;

use std::sync::atomic::Ordering;

pub use auth_state::{AuthState, Leg};
pub use lockout::{KeyKind, LockoutConfig, LockoutGuard, Verdict};

/// What `/metrics` shows of the lockout guard: running totals, read at scrape time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LockoutTotals {
    pub failures: u64,
    /// Refusals by the count that was over its threshold, in [`lockout::KEY_KIND_NAMES`] order.
    pub refused: [u64; 3],
    pub tracked: u64,
    pub evicted: u64,
}

impl LockoutGuard {
    pub fn totals(&self) -> LockoutTotals {
        let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        LockoutTotals {
            failures: get(&self.counters.failures),
            refused: self.counters.refused.each_ref().map(get),
            tracked: u64::try_from(self.tracked()).unwrap_or(u64::MAX),
            evicted: get(&self.counters.evicted),
        }
    }
}
