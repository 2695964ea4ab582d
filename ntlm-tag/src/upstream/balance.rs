//! Which backend a new client connection goes to: the modes and balancing policies, and the choice.

use std::{
    net::IpAddr,
    sync::{Arc, atomic::Ordering},
};

use serde::{Deserialize, Serialize};

use super::routes::Pool;
use super::{Backend, Upstream};

/// How client connections are tied to upstream connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Shared pool for anonymous requests; an upstream connection that carried NTLM/Negotiate is
    /// bound to its client connection. Safe with every backend.
    Bind,
    /// Shared pool for every request, authenticated or not; only for backends that key NTLM on
    /// the connection-id header (Jespa).
    Tag,
    /// One upstream connection per client connection.
    Pin,
}

impl Mode {
    /// A warning to log when this mode is configured: what it risks and when it is safe.
    pub fn warning(self) -> Option<&'static str> {
        match self {
            Mode::Tag => Some(
                "mode = \"tag\": upstream connections that carried NTLM are shared by all client \
                 connections. Safe only when every backend keys NTLM on the connection-id header \
                 (Jespa); with IIS, Exchange, SharePoint or any backend that authenticates its own \
                 TCP connection, one user's login serves other clients. Use mode = \"bind\" (the \
                 default) unless the backends are header-aware",
            ),
            Mode::Bind | Mode::Pin => None,
        }
    }
}

/// How new client connections are spread over backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Balance {
    /// The healthy backend with the fewest client connections.
    LeastConn,
    /// Rendezvous hash of the client address: a reconnecting client lands on the same backend.
    Hash,
}

impl Upstream {
    /// Picks one of `pool`'s backends among those up for it and not in `avoid` (any of its
    /// backends if none is up).
    pub(super) fn choose(
        &self,
        pool: &Pool,
        client: IpAddr,
        avoid: &[Arc<Backend>],
    ) -> Arc<Backend> {
        self.pick(pool, client, avoid).unwrap_or_else(|| {
            self.pick_from(client, pool.members.iter().map(|m| &m.backend))
                .unwrap_or_else(|| Arc::clone(&self.backends[0]))
        })
    }

    /// One of `pool`'s backends up for it and not in `avoid`, if there is one.
    pub(super) fn pick(
        &self,
        pool: &Pool,
        client: IpAddr,
        avoid: &[Arc<Backend>],
    ) -> Option<Arc<Backend>> {
        let healthy = pool
            .members
            .iter()
            .filter(|m| m.is_up() && !avoid.iter().any(|a| Arc::ptr_eq(a, &m.backend)))
            .map(|m| &m.backend);
        self.pick_from(client, healthy)
    }

    /// One of `candidates` by the balancing policy; `None` when there is none. The candidates are
    /// walked again rather than collected: every new client connection picks a backend, and this
    /// way the pick allocates nothing.
    fn pick_from<'a>(
        &self,
        client: IpAddr,
        candidates: impl Iterator<Item = &'a Arc<Backend>> + Clone,
    ) -> Option<Arc<Backend>> {
        let chosen = match self.balance {
            Balance::LeastConn => {
                let n = candidates.clone().count();
                if n == 0 {
                    return None;
                }
                // The first of the least loaded from a rotating start, so that ties take turns.
                let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
                candidates
                    .cycle()
                    .skip(start)
                    .take(n)
                    .min_by_key(|b| b.active.load(Ordering::Relaxed))
            }
            Balance::Hash => candidates.max_by_key(|b| rendezvous(client, b.authority.as_str())),
        };
        chosen.map(Arc::clone)
    }
}

pub(super) fn rendezvous(client: IpAddr, backend: &str) -> u64 {
    use std::hash::{BuildHasher, Hasher};
    // A fixed-key hasher: the same client maps to the same backend across restarts.
    let mut h =
        std::hash::BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default()
            .build_hasher();
    h.write(client.to_string().as_bytes());
    h.write(backend.as_bytes());
    h.finish()
}
