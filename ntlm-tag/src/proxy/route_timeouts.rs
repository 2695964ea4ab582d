//! Response timeouts per path prefix (`[[timeouts.route]]`).
//!
//! Exchange serves requests whose response is meant to come late: an ActiveSync `Ping` is a long
//! poll answered after up to an hour, and an Outlook Anywhere `RPC_IN_DATA` is answered only when
//! its (up to 1 GiB) body has been sent. One gateway-wide `upstream_response_secs` either cuts
//! those with a 504 or leaves every other request hanging as long. A route timeout applies to the
//! requests whose path starts with its prefix; every other request keeps the default.
#![forbid(unsafe_code)]

use std::time::Duration;

use serde::Serialize;
use thiserror::Error;

use crate::upstream::routes::starts_with_ignoring_ascii_case;

/// One route's response timeout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RouteTimeout {
    /// Matched against the start of the request path, ignoring ASCII case (IIS paths are
    /// case-insensitive: `/Microsoft-Server-ActiveSync` and `/microsoft-server-activesync` are
    /// one virtual directory).
    pub path_prefix: String,
    /// Time from sending the request until the response head, replacing
    /// `timeouts.upstream_response_secs` for this route.
    #[serde(serialize_with = "secs", rename = "response_secs")]
    pub response: Duration,
}

fn secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

/// A route that cannot be used, with the key to fix.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum RouteTimeoutError {
    #[error("{0:?} must start with '/'")]
    NotAPath(String),
    #[error("{0:?} is given twice (ignoring case)")]
    Duplicate(String),
}

/// The configured routes, longest prefix first so that the most specific one wins.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct RouteTimeouts(Vec<RouteTimeout>);

impl RouteTimeouts {
    pub fn new(mut routes: Vec<RouteTimeout>) -> Result<Self, RouteTimeoutError> {
        if let Some(bad) = routes.iter().find(|r| !r.path_prefix.starts_with('/')) {
            return Err(RouteTimeoutError::NotAPath(bad.path_prefix.clone()));
        }
        let mut seen = std::collections::HashSet::new();
        if let Some(twice) = routes
            .iter()
            .find(|r| !seen.insert(r.path_prefix.to_ascii_lowercase()))
        {
            return Err(RouteTimeoutError::Duplicate(twice.path_prefix.clone()));
        }
        routes.sort_by_key(|r| std::cmp::Reverse(r.path_prefix.len()));
        Ok(RouteTimeouts(routes))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The response timeout of the longest prefix of `path`, if a route matches.
    pub fn response_for(&self, path: &str) -> Option<Duration> {
        self.0
            .iter()
            .find(|r| starts_with_ignoring_ascii_case(path, &r.path_prefix))
            .map(|r| r.response)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(prefix: &str, secs: u64) -> RouteTimeout {
        RouteTimeout {
            path_prefix: prefix.to_string(),
            response: Duration::from_secs(secs),
        }
    }

    #[test]
    fn the_longest_matching_prefix_wins_ignoring_case() {
        let routes = RouteTimeouts::new(vec![
            route("/Microsoft-Server-ActiveSync", 3600),
            route("/rpc", 600),
            route("/rpc/rpcproxy.dll", 7200),
        ])
        .expect("valid");
        assert_eq!(
            routes.response_for("/microsoft-server-activesync?Cmd=Ping"),
            Some(Duration::from_secs(3600))
        );
        assert_eq!(
            routes.response_for("/rpc/rpcproxy.dll?mail:6001"),
            Some(Duration::from_secs(7200))
        );
        assert_eq!(
            routes.response_for("/rpc/other"),
            Some(Duration::from_secs(600))
        );
        assert_eq!(routes.response_for("/owa/"), None);
        assert_eq!(routes.response_for("/"), None);
    }

    #[test]
    fn bad_routes_are_refused() {
        assert_eq!(
            RouteTimeouts::new(vec![route("ews", 60)]),
            Err(RouteTimeoutError::NotAPath("ews".into()))
        );
        assert!(matches!(
            RouteTimeouts::new(vec![route("/EWS", 60), route("/abc", 1), route("/ews", 90)]),
            Err(RouteTimeoutError::Duplicate(_))
        ));
    }
}
