//! The upstream side's settings, as the configuration builds them: timeouts, health checks, routes.
#![forbid(unsafe_code)]

use std::time::Duration;

use serde::Serialize;

use super::BackendAddress;

/// A path prefix served by a pool of its own, with its own health check: an IIS or Exchange
/// virtual directory (`/owa`, `/ews`) that can break on one backend while the others work.
#[derive(Debug, Clone, Serialize)]
pub struct RouteConfig {
    /// As configured, without a trailing `/`; matched case-insensitively on whole path segments.
    pub path_prefix: String,
    #[serde(skip)]
    pub backends: Vec<BackendAddress>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheckConfig>,
}

/// Active health checks of the backends.
#[derive(Debug, Clone, Serialize)]
pub struct HealthCheckConfig {
    pub path: String,
    #[serde(serialize_with = "secs", rename = "interval_secs")]
    pub interval: Duration,
    #[serde(serialize_with = "secs", rename = "timeout_secs")]
    pub timeout: Duration,
    pub expect_status: u16,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct Timeouts {
    #[serde(serialize_with = "secs", rename = "upstream_connect_secs")]
    pub upstream_connect: Duration,
    #[serde(serialize_with = "secs", rename = "upstream_response_secs")]
    pub upstream_response: Duration,
    #[serde(serialize_with = "secs", rename = "upstream_idle_secs")]
    pub upstream_idle: Duration,
    #[serde(serialize_with = "secs", rename = "header_read_secs")]
    pub header_read: Duration,
    /// Keep-alive idle time between requests on a client connection.
    #[serde(serialize_with = "secs", rename = "idle_secs")]
    pub idle: Duration,
    #[serde(serialize_with = "secs", rename = "drain_secs")]
    pub drain: Duration,
    /// After an upgrade handed the listeners to a successor: how long the old process keeps serving
    /// its established connections before it closes the rest.
    #[serde(serialize_with = "secs", rename = "upgrade_drain_secs")]
    pub upgrade_drain: Duration,
    #[serde(serialize_with = "secs", rename = "proxy_header_secs")]
    pub proxy_header: Duration,
}

fn secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            upstream_connect: Duration::from_secs(5),
            upstream_response: Duration::from_secs(60),
            upstream_idle: Duration::from_secs(90),
            header_read: Duration::from_secs(15),
            // IIS's default connection timeout: authenticated NTLM connections survive think time.
            idle: Duration::from_secs(120),
            drain: Duration::from_secs(10),
            // Long: an authenticated NTLM connection lost to an upgrade costs its user a new login.
            upgrade_drain: Duration::from_secs(3600),
            proxy_header: Duration::from_secs(5),
        }
    }
}
