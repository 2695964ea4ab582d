//! The client side's settings, as the configuration builds them: listeners and resource limits.
#![forbid(unsafe_code)]

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use super::tls::TlsCertConfig;

/// One listening address.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    pub address: SocketAddr,
    /// Expect a PROXY protocol header (v1 or v2) from a trusted balancer before any HTTP.
    #[serde(default)]
    pub proxy_protocol: bool,
    /// Terminate TLS with these certificates (the first is the default; others are chosen by SNI).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tls: Vec<TlsCertConfig>,
}

/// Resource limits.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Limits {
    /// Client connections open at once; more are refused with 503 and counted.
    pub max_connections: usize,
    /// Largest request head (request line + headers); larger gets 431.
    pub max_header_bytes: usize,
    /// Shared (pooled) upstream connections per backend (0: no cap); requests queue for a free
    /// one, within the upstream response timeout. Bound and pinned connections are not counted.
    pub max_upstream_per_backend: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 10_000,
            // Negotiate/Kerberos tokens of users in many groups run to tens of kilobytes.
            max_header_bytes: 64 * 1024,
            max_upstream_per_backend: 0,
        }
    }
}
