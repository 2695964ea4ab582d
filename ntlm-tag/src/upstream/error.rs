//! What goes wrong on the way to a backend and back.

use std::time::Duration;

use http::{StatusCode, uri::Authority};
use thiserror::Error;

use crate::error::ErrorSource;

/// What goes wrong on the way to a backend and back; [`UpstreamError::error_source`] says whose fault it
/// is (a request the client broke surfaces here too, as the exchange is where it shows).
#[derive(Debug, Error)]
pub enum UpstreamError {
    #[error("cannot connect to {backend}: {source}")]
    Connect {
        backend: Authority,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error(
        "TLS handshake with {backend} (server name {server_name}) failed: {source}; the backend's \
         certificate must hold that name and chain to ca_file (or the system's roots)"
    )]
    Tls {
        backend: Authority,
        server_name: String,
        #[source]
        source: std::io::Error,
    },
    /// Opening a socket failed for want of the gateway's own resources (descriptors, socket
    /// memory, local ports): nothing is wrong with the backend, so it stays in rotation.
    #[error(
        "cannot open a connection to {backend}: the gateway is out of {resource} ({source}); {remedy}"
    )]
    GatewayResources {
        backend: Authority,
        resource: &'static str,
        remedy: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot connect to {backend} within {timeout:?}")]
    ConnectTimeout {
        backend: Authority,
        timeout: Duration,
    },
    #[error("exchange with {backend} failed: {source}")]
    Exchange {
        backend: Authority,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("{backend} did not answer within {timeout:?}")]
    Timeout {
        backend: Authority,
        timeout: Duration,
    },
    #[error(
        "the upstream connection {link} to this client's NTLM session on {backend} is gone; closing \
         the client connection so it authenticates again"
    )]
    SessionLost {
        backend: Authority,
        /// `pinned` or `bound`.
        link: &'static str,
        /// The backend did not answer in time (a 504 rather than a 502; the session is lost
        /// either way, since the connection is abandoned mid-exchange).
        timed_out: bool,
    },
    #[error(
        "route {route}: this client connection's NTLM session lives on an upstream connection to \
         {backend}, which is not in the route's pool; answering 421 and closing the client \
         connection (the client retries on a new connection and authenticates there). Add \
         {backend} to the route's backends if one login should serve both"
    )]
    Misdirected { route: String, backend: Authority },
    #[error("bad request target: {0}")]
    BadTarget(#[from] http::Error),
    /// The client's request body broke (an invalid chunk, the connection closed mid-body) while it
    /// was being sent upstream: the client's fault, not the backend's.
    #[error("the client's request body is malformed or incomplete: {source}")]
    ClientBody {
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl UpstreamError {
    pub fn status(&self) -> StatusCode {
        match self {
            UpstreamError::Timeout { .. }
            | UpstreamError::ConnectTimeout { .. }
            | UpstreamError::SessionLost {
                timed_out: true, ..
            } => StatusCode::GATEWAY_TIMEOUT,
            UpstreamError::BadTarget(_) | UpstreamError::ClientBody { .. } => {
                StatusCode::BAD_REQUEST
            }
            UpstreamError::Misdirected { .. } => StatusCode::MISDIRECTED_REQUEST,
            UpstreamError::GatewayResources { .. } => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::BAD_GATEWAY,
        }
    }

    /// A timeout (504), counted apart from other upstream failures.
    pub fn is_timeout(&self) -> bool {
        matches!(
            self,
            UpstreamError::Timeout { .. }
                | UpstreamError::ConnectTimeout { .. }
                | UpstreamError::SessionLost {
                    timed_out: true,
                    ..
                }
        )
    }

    /// The client connection must be closed after this error: an NTLM session was lost, or the
    /// client's framing can no longer be trusted.
    pub fn closes_client(&self) -> bool {
        matches!(
            self,
            UpstreamError::SessionLost { .. }
                | UpstreamError::ClientBody { .. }
                | UpstreamError::Misdirected { .. }
        )
    }

    /// Whose fault it is: the client's request (a bad target, a body it broke off), the gateway's
    /// own refusal (a route the client's session cannot reach), or the backend's.
    pub fn error_source(&self) -> ErrorSource {
        match self {
            UpstreamError::BadTarget(_) | UpstreamError::ClientBody { .. } => ErrorSource::Client,
            UpstreamError::Misdirected { .. } | UpstreamError::GatewayResources { .. } => {
                ErrorSource::Internal
            }
            UpstreamError::Connect { .. }
            | UpstreamError::Tls { .. }
            | UpstreamError::ConnectTimeout { .. }
            | UpstreamError::Exchange { .. }
            | UpstreamError::Timeout { .. }
            | UpstreamError::SessionLost { .. } => ErrorSource::Upstream,
        }
    }
}

/// The gateway's own shortage behind a failed `connect`, if that is what it was: the resource and
/// what the operator should raise.
pub(super) fn gateway_shortage(e: &std::io::Error) -> Option<(&'static str, &'static str)> {
    match e.raw_os_error()? {
        libc::EMFILE => Some((
            "descriptors",
            "raise LimitNOFILE= in the systemd unit (or `ulimit -n`), or lower limits.max_connections",
        )),
        libc::ENFILE => Some((
            "system-wide descriptors",
            "raise the system's fs.file-max (sysctl)",
        )),
        libc::ENOBUFS | libc::ENOMEM => Some((
            "socket memory",
            "the system is short of socket memory (net.ipv4.tcp_mem, free memory)",
        )),
        libc::EADDRNOTAVAIL => Some((
            "local ports",
            "widen net.ipv4.ip_local_port_range or add backend addresses",
        )),
        _ => None,
    }
}
