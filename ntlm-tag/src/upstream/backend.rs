//! One backend: its address as configured, its TLS client, health, idle connections and how many
//! client connections it serves.

use std::sync::{
    Arc,
    atomic::{AtomicUsize, Ordering},
};

use http::uri::Authority;
use thiserror::Error;

use crate::metrics::StatusCounters;

use super::{
    health::Health,
    pool::IdleConnections,
    tls::{BackendTls, BackendTlsConfig, BackendTlsError},
};

/// A backend as configured: its address and, for an `https://` backend, how to talk TLS to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendAddress {
    pub authority: Authority,
    pub tls: Option<BackendTlsConfig>,
}

impl BackendAddress {
    pub fn plain(authority: Authority) -> Self {
        BackendAddress {
            authority,
            tls: None,
        }
    }
}

impl std::fmt::Display for BackendAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.tls {
            Some(_) => write!(f, "https://{}", self.authority),
            None => write!(f, "{}", self.authority),
        }
    }
}

/// A backend whose TLS client could not be built (a CA or client certificate file).
#[derive(Debug, Error)]
#[error("backend {backend}: {source}")]
pub struct BackendSetupError {
    pub backend: String,
    #[source]
    pub source: BackendTlsError,
}

/// One backend.
#[derive(Debug)]
pub struct Backend {
    pub(super) authority: Authority,
    /// Set for an `https://` backend.
    pub(super) tls: Option<BackendTls>,
    /// The leaf certificate of the last TLS handshake (DER), for Extended Protection diagnostics.
    pub(super) last_leaf: std::sync::Mutex<Option<Vec<u8>>>,
    pub(super) active: AtomicUsize,
    pub(super) health: Health,
    /// Caps the busy shared upstream connections to this backend, if configured.
    pub(super) permits: Option<Arc<tokio::sync::Semaphore>>,
    /// This backend's response counters.
    pub(super) responses: Arc<StatusCounters>,
    /// Shared keep-alive connections not in use.
    pub(super) idle: IdleConnections,
}

impl Backend {
    pub fn authority(&self) -> &Authority {
        &self.authority
    }

    /// This backend's response counters, for the proxy to count its answers without a lookup.
    pub fn responses(&self) -> &StatusCounters {
        &self.responses
    }

    pub fn is_up(&self) -> bool {
        self.health.is_up()
    }
}

/// A client connection's claim on a backend; keeps the backend's connection count.
#[derive(Debug)]
pub struct Assignment {
    backend: Arc<Backend>,
}

impl Assignment {
    pub(super) fn new(backend: Arc<Backend>) -> Self {
        backend.active.fetch_add(1, Ordering::Relaxed);
        Assignment { backend }
    }

    pub fn backend(&self) -> &Arc<Backend> {
        &self.backend
    }
}

impl Drop for Assignment {
    fn drop(&mut self) {
        self.backend.active.fetch_sub(1, Ordering::Relaxed);
    }
}
