//! Backends, the upstream connection pool, and the connections that belong to one client.
//!
//! Each client connection is assigned one backend for its life (an NTLM context lives in one backend
//! process); it moves only when that backend goes down, when a request never reached it, or when a
//! request's [route](routes) is not served (or not healthy) there. Three modes:
//! - `bind` (the default, safe with every backend): anonymous requests share keep-alive connections;
//!   an upstream connection that carries any NTLM/Negotiate leg (see [`binding`]) is bound to its
//!   client connection from then on: never pooled again, used for all its later requests, closed
//!   with it.
//! - `tag`: upstream keep-alive connections are shared by all client connections, authenticated or
//!   not. Safe only with a backend that keys NTLM on the connection-id header (Jespa).
//! - `pin`: each client connection gets an upstream connection of its own from its first request.
//!
//! A bound or pinned connection that dies after NTLM was seen on it closes the client connection
//! too: the client must authenticate again, never silently continue on a connection authenticated
//! for someone else, or on a fresh one as nobody.
//!
//! Routes and sessions: a client connection whose NTLM session lives on an upstream connection to
//! backend B keeps using that connection for every later request whose route B serves, healthy for
//! that route or not (the session cannot move). A request for a route whose pool does not contain
//! B is answered `421 Misdirected Request` with `Connection: close` and logged: it is never sent
//! on another connection (it would arrive there anonymous, or on someone else's), and the client
//! retries on a new connection, which is routed afresh.
//!
//! Where each step lives: [`exchange`](Upstream::exchange) (route, affinity, failover, the outcome
//! for the session) asks `balance` for a backend, then `shared` (the pool) or `dedicated` (pinned
//! and bound connections), which send through `connect` on the gateway's own HTTP/1.1 client
//! (`h1`); `health` keeps backends in or out of rotation, `error` says what went wrong.
#![forbid(unsafe_code)]

mod backend;
mod balance;
mod binding;
mod caps;
mod client_body;
mod connect;
mod dedicated;
pub mod epa_diagnosis;
mod error;
mod exchange;
pub mod h1;
pub mod health;
mod pool;
pub mod routes;
mod settings;
mod shared;
#[cfg(test)]
mod tests;
pub mod tls;

pub use backend::{Backend, BackendAddress, BackendSetupError};
pub use balance::{Balance, Mode};
pub use caps::{Cap, DedicatedCaps, Retired};
pub use client_body::{ClientBody, ClientBodyState};
pub use dedicated::ClientUpstream;
pub use error::UpstreamError;
pub use exchange::is_upgrade_request;
pub use h1::{PendingUpstreamUpgrade, UpstreamBody, UpstreamUpgrade};
pub use settings::{HealthCheckConfig, RouteConfig, Timeouts};

use std::{
    net::IpAddr,
    sync::{Arc, atomic::AtomicUsize},
    time::Duration,
};

use self::{
    backend::Assignment,
    health::Health,
    pool::IdleConnections,
    routes::{Pool, RouteTable},
    tls::BackendTls,
};
use crate::metrics::Metrics;

/// A request extension: this request's response timeout, when its route has one of its own
/// (`[[timeouts.route]]`); `timeouts.upstream_response_secs` otherwise.
#[derive(Debug, Clone, Copy)]
pub struct ResponseTimeout(pub Duration);

/// One backend's health for one route, for `/healthz` and `backend_up{backend,route}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendState {
    pub route: String,
    pub backend: String,
    pub up: bool,
}

/// The backends, the routes, the pool and the policies.
pub struct Upstream {
    /// Every backend once, whichever routes name it: one set of connections per backend.
    backends: Vec<Arc<Backend>>,
    routes: RouteTable,
    next: AtomicUsize,
    mode: Mode,
    balance: Balance,
    timeouts: Timeouts,
    metrics: Arc<Metrics>,
    /// Caps on bound and pinned connections (off by default).
    caps: DedicatedCaps,
    /// Active health-check tasks; stopped when this Upstream is replaced by a reload.
    checks: std::sync::Mutex<Vec<tokio::task::AbortHandle>>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        if let Ok(checks) = self.checks.lock() {
            checks.iter().for_each(tokio::task::AbortHandle::abort);
        }
    }
}

impl Upstream {
    /// Builds the backends' TLS clients (reading their CA and client certificate files): an
    /// error names the backend and the file.
    pub fn new(
        backends: &[BackendAddress],
        routes: &[RouteConfig],
        mode: Mode,
        balance: Balance,
        timeouts: &Timeouts,
        max_per_backend: usize,
        metrics: Arc<Metrics>,
    ) -> Result<Self, BackendSetupError> {
        let mut all: Vec<Arc<Backend>> = Vec::new();
        // The backend named `address`, made on first mention.
        let mut backend = |address: &BackendAddress| -> Result<Arc<Backend>, BackendSetupError> {
            if let Some(known) = all.iter().find(|b| b.authority == address.authority) {
                return Ok(Arc::clone(known));
            }
            let tls = address
                .tls
                .as_ref()
                .map(|t| BackendTls::new(t, address.authority.host()))
                .transpose()
                .map_err(|source| BackendSetupError {
                    backend: address.to_string(),
                    source,
                })?;
            let made = Arc::new(Backend {
                authority: address.authority.clone(),
                tls,
                last_leaf: std::sync::Mutex::new(None),
                active: AtomicUsize::new(0),
                health: Health::default(),
                permits: (max_per_backend > 0)
                    .then(|| Arc::new(tokio::sync::Semaphore::new(max_per_backend))),
                responses: metrics.backend_counters(address.authority.as_str()),
                idle: IdleConnections::default(),
            });
            all.push(Arc::clone(&made));
            Ok(made)
        };
        let default = Pool::new(
            None,
            backends
                .iter()
                .map(&mut backend)
                .collect::<Result<_, _>>()?,
            None,
        );
        let mut pools = Vec::with_capacity(routes.len());
        for route in routes {
            let members = route
                .backends
                .iter()
                .map(&mut backend)
                .collect::<Result<_, _>>()?;
            pools.push(Pool::new(
                Some(&route.path_prefix),
                members,
                route.health_check.clone(),
            ));
        }
        let upstream = Upstream {
            backends: all,
            routes: RouteTable::new(pools, default),
            next: AtomicUsize::new(0),
            mode,
            balance,
            timeouts: *timeouts,
            metrics,
            caps: DedicatedCaps::default(),
            checks: std::sync::Mutex::new(Vec::new()),
        };
        upstream.spawn_idle_sweeper();
        Ok(upstream)
    }

    /// Closes shared connections left idle for `upstream_idle_secs`, until this Upstream is
    /// replaced (a reload) or the process ends.
    fn spawn_idle_sweeper(&self) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return; // Unit tests without a runtime: idle connections are also dropped on checkout.
        };
        let backends = self.backends.clone();
        let max_idle = self.timeouts.upstream_idle;
        let period = (max_idle / 2).max(Duration::from_millis(100));
        let task = runtime.spawn(async move {
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                backends.iter().for_each(|b| b.idle.sweep(max_idle));
            }
        });
        if let Ok(mut checks) = self.checks.lock() {
            checks.push(task.abort_handle());
        }
    }

    /// Caps the age and requests of bound and pinned connections (`[upstream_caps]`).
    pub fn with_dedicated_caps(mut self, caps: DedicatedCaps) -> Self {
        self.caps = caps;
        self
    }

    pub fn backends(&self) -> &[Arc<Backend>] {
        &self.backends
    }

    /// Every route's view of each of its backends, the default pool last.
    pub fn states(&self) -> Vec<BackendState> {
        self.routes
            .pools()
            .iter()
            .flat_map(|pool| {
                pool.members.iter().map(|m| BackendState {
                    route: pool.name().to_string(),
                    backend: m.backend.authority.to_string(),
                    up: m.is_up(),
                })
            })
            .collect()
    }

    /// The upstream side of a new client connection: a backend of the default pool (a request for
    /// a route moves it when that route is not served there).
    pub fn attach(&self, client: IpAddr) -> ClientUpstream {
        ClientUpstream {
            assignment: Assignment::new(self.choose(self.routes.default_pool(), client, &[])),
            mode: self.mode,
            dedicated: None,
            ntlm_seen: false,
        }
    }
}
