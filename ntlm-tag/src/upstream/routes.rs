//! Routes: path prefixes with backend pools of their own, each with its own health per backend, so
//! that one broken virtual directory (`/owa` failing its check on one backend) takes only its own
//! traffic away from that backend.
//!
//! A request goes to the route with the longest prefix that matches its path on whole segments,
//! case-insensitively (IIS paths are): `/owa` matches `/owa`, `/OWA/` and `/owa/x`, not `/owafoo`.
//! The path is matched as sent (percent-escapes are not decoded). Everything else goes to the
//! default pool (the top-level `backends`).
#![forbid(unsafe_code)]

use std::sync::Arc;

use super::HealthCheckConfig;
use super::{Backend, health::Health};

/// The name the default pool has in metrics, logs and `/healthz`.
pub const DEFAULT_ROUTE: &str = "default";

/// One backend in one pool, with that route's health on it.
#[derive(Debug)]
pub struct Member {
    pub backend: Arc<Backend>,
    /// The route's active check on this backend (its passive health is the backend's own).
    pub check: Arc<Health>,
}

impl Member {
    /// May take new requests of this route: the backend answers, and the route's check passes.
    pub fn is_up(&self) -> bool {
        self.backend.is_up() && self.check.is_up()
    }
}

/// A route's backends.
#[derive(Debug)]
pub struct Pool {
    /// The prefix as configured, or [`DEFAULT_ROUTE`].
    name: Box<str>,
    /// `None` for the default pool.
    prefix: Option<Box<str>>,
    pub members: Vec<Member>,
    pub check: Option<HealthCheckConfig>,
}

impl Pool {
    pub fn new(
        prefix: Option<&str>,
        backends: Vec<Arc<Backend>>,
        check: Option<HealthCheckConfig>,
    ) -> Self {
        Pool {
            name: prefix.unwrap_or(DEFAULT_ROUTE).into(),
            prefix: prefix.map(Into::into),
            members: backends
                .into_iter()
                .map(|backend| Member {
                    backend,
                    check: Arc::default(),
                })
                .collect(),
            check,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The pool of the top-level `backends`: what no route matches.
    pub fn is_default(&self) -> bool {
        self.prefix.is_none()
    }

    /// Whether `path` (without query) is under this pool's prefix, on whole segments.
    fn matches(&self, path: &str) -> bool {
        let Some(prefix) = &self.prefix else {
            return true;
        };
        starts_with_ignoring_ascii_case(path, prefix)
            && matches!(path.as_bytes().get(prefix.len()), None | Some(b'/'))
    }

    pub fn member(&self, backend: &Arc<Backend>) -> Option<&Member> {
        self.members
            .iter()
            .find(|m| Arc::ptr_eq(&m.backend, backend))
    }

    /// `backend` is one of this route's backends (healthy or not).
    pub fn serves(&self, backend: &Arc<Backend>) -> bool {
        self.member(backend).is_some()
    }

    /// `backend` may take new requests of this route.
    pub fn is_up_on(&self, backend: &Arc<Backend>) -> bool {
        self.member(backend).is_some_and(Member::is_up)
    }
}

/// `path` begins with `prefix`, ASCII case ignored (IIS paths are case-insensitive). Shared by the
/// route table and the route timeouts, so both read a prefix the same way.
pub fn starts_with_ignoring_ascii_case(path: &str, prefix: &str) -> bool {
    path.as_bytes()
        .get(..prefix.len())
        .is_some_and(|head| head.eq_ignore_ascii_case(prefix.as_bytes()))
}

/// The routes, longest prefix first, the default pool last.
#[derive(Debug)]
pub struct RouteTable {
    pools: Vec<Pool>,
}

impl RouteTable {
    /// `routes` in any order; `default` serves what none of them matches.
    pub fn new(mut routes: Vec<Pool>, default: Pool) -> Self {
        routes.sort_by_key(|p| std::cmp::Reverse(p.prefix.as_deref().map_or(0, str::len)));
        routes.push(default);
        RouteTable { pools: routes }
    }

    /// The pool for a request path.
    pub fn route(&self, path: &str) -> &Pool {
        self.pools
            .iter()
            .find(|p| p.matches(path))
            .unwrap_or_else(|| self.default_pool())
    }

    pub fn default_pool(&self) -> &Pool {
        // `new` always pushes the default pool last.
        &self.pools[self.pools.len() - 1]
    }

    pub fn pools(&self) -> &[Pool] {
        &self.pools
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(prefix: Option<&str>) -> Pool {
        Pool::new(prefix, Vec::new(), None)
    }

    #[test]
    fn the_longest_prefix_wins_on_whole_segments_in_any_case() {
        let table = RouteTable::new(
            vec![
                pool(Some("/owa")),
                pool(Some("/owa/calendar")),
                pool(Some("/ews")),
            ],
            pool(None),
        );
        let name = |path: &str| table.route(path).name().to_string();
        assert_eq!(name("/owa"), "/owa");
        assert_eq!(name("/OWA/"), "/owa");
        assert_eq!(name("/Owa/x.aspx"), "/owa");
        assert_eq!(name("/owa/Calendar/y"), "/owa/calendar");
        assert_eq!(name("/owafoo"), DEFAULT_ROUTE);
        assert_eq!(name("/ews/exchange.asmx"), "/ews");
        assert_eq!(name("/"), DEFAULT_ROUTE);
        assert_eq!(name(""), DEFAULT_ROUTE);
        // A multi-byte character where the prefix would end is simply no match.
        assert_eq!(name("/ow\u{e9}"), DEFAULT_ROUTE);
    }
}
