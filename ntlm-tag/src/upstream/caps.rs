//! Optional caps on the upstream connections that belong to one client connection (bound or
//! pinned): an age and a number of requests, like the maintained nginx-ntlm-module forks offer.
//!
//! Such a connection holds the client's NTLM context. Closing it alone would leave the client
//! connection authenticated in the client's eyes while its next request reaches the backend on a
//! fresh, anonymous connection: the login would be lost silently (or, with a backend that answers
//! anonymous requests, the client would be served as nobody). So a cap is enforced at a request
//! boundary and on both sides: the response that reaches it carries `Connection: close`, and the
//! client connection and its upstream connection close after it. The client reconnects and
//! authenticates again, which NTLM clients do by themselves.
#![forbid(unsafe_code)]

use std::time::{Duration, Instant};

use serde::Serialize;

/// `[upstream_caps]`; both off by default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct DedicatedCaps {
    /// Retire a bound or pinned connection at the first response that starts this long after it
    /// was opened (`None`: no limit).
    #[serde(serialize_with = "secs", rename = "max_age_secs")]
    pub max_age: Option<Duration>,
    /// Retire it at its `n`-th response (`None`: no limit).
    #[serde(serialize_with = "count")]
    pub max_requests: Option<u64>,
}

fn secs<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.map_or(0.0, |d| d.as_secs_f64()))
}

fn count<S: serde::Serializer>(n: &Option<u64>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(n.unwrap_or(0))
}

/// Which cap retired a connection (a metric label).
pub use crate::metrics::UpstreamCap as Cap;

/// The age and use of one bound or pinned connection.
#[derive(Debug, Clone, Copy)]
pub struct Usage {
    opened: Instant,
    requests: u64,
}

impl Usage {
    pub fn new(opened: Instant) -> Self {
        Usage {
            opened,
            requests: 0,
        }
    }

    /// Counts one response received at `now`; the cap it reaches, if any.
    pub fn record_response(&mut self, caps: &DedicatedCaps, now: Instant) -> Option<Cap> {
        self.requests += 1;
        if caps.max_requests.is_some_and(|max| self.requests >= max) {
            return Some(Cap::MaxRequests);
        }
        if caps
            .max_age
            .is_some_and(|max| now.duration_since(self.opened) >= max)
        {
            return Some(Cap::MaxAge);
        }
        None
    }

    pub fn requests(&self) -> u64 {
        self.requests
    }

    pub fn age(&self, now: Instant) -> Duration {
        now.duration_since(self.opened)
    }
}

/// Marks a response whose upstream connection reached a cap: the proxy closes the client
/// connection after it.
#[derive(Debug, Clone, Copy)]
pub struct Retired(pub Cap);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_caps_never_retire() {
        let start = Instant::now();
        let mut usage = Usage::new(start);
        for _ in 0..1000 {
            assert_eq!(
                usage.record_response(
                    &DedicatedCaps::default(),
                    start + Duration::from_secs(86_400)
                ),
                None
            );
        }
    }

    #[test]
    fn the_nth_response_reaches_max_requests() {
        let caps = DedicatedCaps {
            max_requests: Some(3),
            ..DedicatedCaps::default()
        };
        let start = Instant::now();
        let mut usage = Usage::new(start);
        assert_eq!(usage.record_response(&caps, start), None);
        assert_eq!(usage.record_response(&caps, start), None);
        assert_eq!(usage.record_response(&caps, start), Some(Cap::MaxRequests));
    }

    #[test]
    fn the_first_response_past_max_age_retires() {
        let caps = DedicatedCaps {
            max_age: Some(Duration::from_secs(300)),
            ..DedicatedCaps::default()
        };
        let start = Instant::now();
        let mut usage = Usage::new(start);
        assert_eq!(
            usage.record_response(&caps, start + Duration::from_secs(299)),
            None
        );
        assert_eq!(
            usage.record_response(&caps, start + Duration::from_secs(300)),
            Some(Cap::MaxAge)
        );
    }
}
