//! Failed NTLM logins counted in a sliding window, per user at one client address, per client
//! address and (optionally) per user everywhere; past a threshold the gateway refuses further
//! attempts itself, so that neither the backend nor the domain controller sees them.
#![forbid(unsafe_code)]

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    net::IpAddr,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use arc_swap::ArcSwap;
use serde::Serialize;

/// The `[lockout]` settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LockoutConfig {
    pub enabled: bool,
    /// Failures of one user from one client address (a client looping on a stale password).
    pub max_failures: u32,
    /// Failures of all users from one client address (password spraying); 0: not counted.
    pub max_failures_per_address: u32,
    /// Failures of one user from every address (guessing from many addresses); 0: not counted.
    pub max_failures_per_user: u32,
    #[serde(serialize_with = "secs", rename = "window_secs")]
    pub window: Duration,
    /// Client prefixes never refused and never counted.
    pub allow: Vec<ipnet::IpNet>,
    /// Keys tracked at most; past it the least recently failed key is forgotten.
    pub max_tracked: usize,
}

fn secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

impl Default for LockoutConfig {
    fn default() -> Self {
        LockoutConfig {
            enabled: true,
            // Active Directory's usual policy locks at 5 bad passwords in 30 minutes: stop at 4.
            max_failures: 4,
            max_failures_per_address: 16,
            max_failures_per_user: 0,
            window: Duration::from_secs(30 * 60),
            allow: Vec::new(),
            max_tracked: 100_000,
        }
    }
}

/// What a count is kept for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum KeyKind {
    UserAtAddress = 0,
    Address = 1,
    User = 2,
}

pub const KEY_KIND_NAMES: [&str; 3] = ["user_at_address", "address", "user"];

impl KeyKind {
    pub fn name(self) -> &'static str {
        KEY_KIND_NAMES[self as usize]
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    UserAtAddress(Box<str>, IpAddr),
    Address(IpAddr),
    User(Box<str>),
}

impl Key {
    fn kind(&self) -> KeyKind {
        match self {
            Key::UserAtAddress(..) => KeyKind::UserAtAddress,
            Key::Address(_) => KeyKind::Address,
            Key::User(_) => KeyKind::User,
        }
    }
}

/// Whether an attempt may go to the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    /// Refused until the oldest counted failure leaves the window.
    Refuse {
        kind: KeyKind,
        failures: u32,
        retry_after: Duration,
    },
}

#[derive(Debug)]
struct Failures {
    /// The newest failures, at most the threshold of their key (older ones cannot matter).
    times: VecDeque<Instant>,
    /// Position in the eviction order.
    touched: u64,
}

#[derive(Debug, Default)]
struct Table {
    counts: HashMap<Key, Failures>,
    /// Keys by when they last failed, oldest first.
    order: BTreeMap<u64, Key>,
    next_touch: u64,
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct LockoutCounters {
    pub failures: AtomicU64,
    pub refused: [AtomicU64; 3],
    pub evicted: AtomicU64,
}

/// The lockout guard of one gateway: its state outlives reloads, its settings do not.
#[derive(Debug)]
pub struct LockoutGuard {
    config: ArcSwap<LockoutConfig>,
    table: Mutex<Table>,
    pub counters: LockoutCounters,
}

impl LockoutGuard {
    pub fn new(config: LockoutConfig) -> Self {
        LockoutGuard {
            config: ArcSwap::from_pointee(config),
            table: Mutex::new(Table::default()),
            counters: LockoutCounters::default(),
        }
    }

    /// New settings (a reload); counts are kept.
    pub fn reconfigure(&self, config: LockoutConfig) {
        self.config.store(config.into());
    }

    /// Keys tracked now.
    pub fn tracked(&self) -> usize {
        self.table.lock().map(|t| t.counts.len()).unwrap_or(0)
    }

    /// May a Type3 naming `account` from `client` go to the backend?
    pub fn check(&self, account: &str, client: IpAddr) -> Verdict {
        self.check_at(account, client, Instant::now())
    }

    /// Counts a Type3 the backend refused; returns the failures now counted for the user at that
    /// address (0 when the guard is off or the address is allowed).
    pub fn record_failure(&self, account: &str, client: IpAddr) -> u32 {
        self.record_failure_at(account, client, Instant::now())
    }

    /// A successful login clears the user's counts, as the domain controller clears its bad
    /// password count; the address keeps its count (a sprayer may know one password).
    pub fn record_success(&self, account: &str, client: IpAddr) {
        let account: Box<str> = account.to_lowercase().into();
        if let Ok(mut table) = self.table.lock() {
            table.remove(&Key::UserAtAddress(account.clone(), client));
            table.remove(&Key::User(account));
        }
    }

    fn applies(config: &LockoutConfig, client: IpAddr) -> bool {
        config.enabled && !config.allow.iter().any(|net| net.contains(&client))
    }

    fn keys(config: &LockoutConfig, account: &str, client: IpAddr) -> Vec<(Key, u32)> {
        let account: Box<str> = account.to_lowercase().into();
        [
            (
                Key::UserAtAddress(account.clone(), client),
                config.max_failures,
            ),
            (Key::Address(client), config.max_failures_per_address),
            (Key::User(account), config.max_failures_per_user),
        ]
        .into_iter()
        .filter(|(_, threshold)| *threshold > 0)
        .collect()
    }

    fn check_at(&self, account: &str, client: IpAddr, now: Instant) -> Verdict {
        let config = self.config.load();
        if !Self::applies(&config, client) {
            return Verdict::Allow;
        }
        let Ok(mut table) = self.table.lock() else {
            return Verdict::Allow;
        };
        for (key, threshold) in Self::keys(&config, account, client) {
            let Some(failures) = table.counts.get_mut(&key) else {
                continue;
            };
            expire(&mut failures.times, now, config.window);
            let count = failures.times.len() as u32;
            if count >= threshold
                && let Some(oldest) = failures.times.front()
            {
                let retry_after = (*oldest + config.window).saturating_duration_since(now);
                self.counters.refused[key.kind() as usize].fetch_add(1, Ordering::Relaxed);
                return Verdict::Refuse {
                    kind: key.kind(),
                    failures: count,
                    retry_after,
                };
            }
        }
        Verdict::Allow
    }

    fn record_failure_at(&self, account: &str, client: IpAddr, now: Instant) -> u32 {
        let config = self.config.load();
        if !Self::applies(&config, client) {
            return 0;
        }
        self.counters.failures.fetch_add(1, Ordering::Relaxed);
        let Ok(mut table) = self.table.lock() else {
            return 0;
        };
        let mut user_at_address = 0;
        for (key, threshold) in Self::keys(&config, account, client) {
            let kind = key.kind();
            let times = table.touch(key, config.max_tracked, &self.counters.evicted);
            expire(times, now, config.window);
            times.push_back(now);
            while times.len() > threshold as usize {
                times.pop_front();
            }
            if kind == KeyKind::UserAtAddress {
                user_at_address = times.len() as u32;
            }
        }
        user_at_address
    }
}

fn expire(times: &mut VecDeque<Instant>, now: Instant, window: Duration) {
    while times
        .front()
        .is_some_and(|t| now.saturating_duration_since(*t) >= window)
    {
        times.pop_front();
    }
}

impl Table {
    /// The failures of `key`, made the most recently touched; a new key past `max` evicts the
    /// least recently touched one.
    fn touch(&mut self, key: Key, max: usize, evicted: &AtomicU64) -> &mut VecDeque<Instant> {
        let touched = self.next_touch;
        self.next_touch += 1;
        if let Some(old) = self.counts.get(&key).map(|f| f.touched) {
            self.order.remove(&old);
        } else {
            while self.counts.len() >= max.max(1) {
                let Some((_, oldest)) = self.order.pop_first() else {
                    break;
                };
                self.counts.remove(&oldest);
                evicted.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.order.insert(touched, key.clone());
        let failures = self.counts.entry(key).or_insert_with(|| Failures {
            times: VecDeque::new(),
            touched,
        });
        failures.touched = touched;
        &mut failures.times
    }

    fn remove(&mut self, key: &Key) {
        if let Some(f) = self.counts.remove(key) {
            self.order.remove(&f.touched);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    fn guard() -> LockoutGuard {
        LockoutGuard::new(LockoutConfig::default())
    }

    #[test]
    fn a_looping_client_is_stopped_at_the_threshold_and_released_by_the_window() {
        let g = guard();
        let t0 = Instant::now();
        let a = ip("192.0.2.1");
        for i in 0..4 {
            assert_eq!(
                g.check_at("CORP\\Alice", a, t0),
                Verdict::Allow,
                "attempt {i}"
            );
            g.record_failure_at("CORP\\Alice", a, t0 + Duration::from_secs(i));
        }
        // Case-insensitive: the same account however the client spells it.
        let Verdict::Refuse {
            kind,
            failures,
            retry_after,
        } = g.check_at("corp\\ALICE", a, t0 + Duration::from_secs(10))
        else {
            panic!("the fifth attempt is refused");
        };
        assert_eq!((kind, failures), (KeyKind::UserAtAddress, 4));
        assert_eq!(retry_after, Duration::from_secs(30 * 60 - 10));
        // The same user elsewhere, another user here: allowed.
        assert_eq!(
            g.check_at("CORP\\alice", ip("192.0.2.2"), t0),
            Verdict::Allow
        );
        assert_eq!(g.check_at("CORP\\bob", a, t0), Verdict::Allow);
        // Once the oldest failure leaves the window, one more attempt may go.
        assert_eq!(
            g.check_at("CORP\\alice", a, t0 + Duration::from_secs(30 * 60)),
            Verdict::Allow
        );
        assert_eq!(g.counters.refused[0].load(Ordering::Relaxed), 1);
    }

    #[test]
    fn spraying_from_one_address_is_stopped_and_success_clears_the_user() {
        let g = guard();
        let t0 = Instant::now();
        let a = ip("2001:db8::1");
        for i in 0..16 {
            g.record_failure_at(&format!("CORP\\user{i}"), a, t0);
        }
        assert!(matches!(
            g.check_at("CORP\\user99", a, t0),
            Verdict::Refuse {
                kind: KeyKind::Address,
                ..
            }
        ));
        let b = ip("2001:db8::2");
        for _ in 0..3 {
            g.record_failure_at("CORP\\carol", b, t0);
        }
        g.record_success("corp\\carol", b);
        assert_eq!(g.record_failure_at("CORP\\carol", b, t0), 1);
    }

    #[test]
    fn allowlisted_addresses_and_a_disabled_guard_count_nothing() {
        let g = LockoutGuard::new(LockoutConfig {
            allow: vec!["10.0.0.0/8".parse().expect("net")],
            ..LockoutConfig::default()
        });
        let t0 = Instant::now();
        for _ in 0..10 {
            assert_eq!(g.record_failure_at("u", ip("10.1.2.3"), t0), 0);
        }
        assert_eq!(g.check_at("u", ip("10.1.2.3"), t0), Verdict::Allow);
        assert_eq!(g.tracked(), 0);
        g.reconfigure(LockoutConfig {
            enabled: false,
            ..LockoutConfig::default()
        });
        for _ in 0..10 {
            g.record_failure_at("u", ip("192.0.2.9"), t0);
        }
        assert_eq!(g.check_at("u", ip("192.0.2.9"), t0), Verdict::Allow);
    }

    #[test]
    fn tracked_keys_are_bounded_and_the_oldest_goes_first() {
        let g = LockoutGuard::new(LockoutConfig {
            max_tracked: 4,
            max_failures_per_address: 0,
            ..LockoutConfig::default()
        });
        let t0 = Instant::now();
        for i in 0..4 {
            g.record_failure_at("old", ip(&format!("192.0.2.{i}")), t0);
        }
        // Keep the first key fresh; the next new key evicts the second.
        g.record_failure_at("old", ip("192.0.2.0"), t0);
        g.record_failure_at("new", ip("198.51.100.1"), t0);
        assert_eq!(g.tracked(), 4);
        assert_eq!(g.counters.evicted.load(Ordering::Relaxed), 1);
        assert_eq!(g.record_failure_at("old", ip("192.0.2.0"), t0), 3);
        assert_eq!(g.record_failure_at("old", ip("192.0.2.1"), t0), 1);
    }
}
