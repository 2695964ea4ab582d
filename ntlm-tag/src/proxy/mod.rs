//! Listeners and the per-connection path: accept → identify → serve requests → stamp → forward.
//!
//! One module a step: `listener` accepts and admits (the connection limit, the hand-over drain)
//! and asks `identity` who the client is; `connection` registers the connection, terminates TLS
//! and runs the HTTP server (`h1`, the gateway's own HTTP/1.x server; hyper for HTTP/2) over the
//! streams in `io`; `forward` checks each request, stamps it
//! (`rewrite`) and hands it to `upstream`; `failure` is every response the gateway makes itself.
//! The types here are the state those steps share: the gateway's, a reload's snapshot, and one
//! client connection's.
#![forbid(unsafe_code)]

pub mod accept_errors;
mod access_log;
mod connection;
mod failure;
mod forward;
pub mod h1;
mod io;
mod listener;
mod request_body;
pub mod rewrite;
pub mod route_timeouts;
mod settings;
pub mod tls;
mod upgrade;

pub use listener::{ListenerStops, serve_listener};
pub use settings::{Limits, ListenerConfig};

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, atomic::AtomicUsize},
};

use arc_swap::ArcSwap;
use tokio_rustls::TlsAcceptor;

use bytes::Bytes;
use http_body_util::{Either, Full};

use crate::{
    guard::LockoutGuard,
    identity::{ConnName, IdDisplay, Identifier, trust::TrustedSources},
    metrics::Metrics,
    registry::{Registration, Registry},
    upstream::{ClientUpstream, Timeouts, Upstream},
};
use rewrite::{ConnectionStamp, StampPolicy};
use route_timeouts::RouteTimeouts;

pub type ProxyBody = Either<crate::upstream::UpstreamBody, Full<Bytes>>;

/// What a SIGHUP reload can change. Each connection keeps the snapshot it was accepted with, so a
/// reload never disturbs established connections.
pub struct Live {
    pub upstream: Arc<Upstream>,
    pub trusted: TrustedSources,
    pub limits: Limits,
    pub timeouts: Timeouts,
    /// Response timeouts of the path prefixes that have their own.
    pub route_timeouts: Arc<RouteTimeouts>,
    /// TLS acceptors by configured listener address.
    pub tls: HashMap<SocketAddr, TlsAcceptor>,
    pub access_log: bool,
}

/// Everything the connections of one gateway share.
pub struct Gateway {
    /// Who each connection's client is, and its id.
    pub identifier: Arc<Identifier>,
    /// How logs and the admin table show ids: a keyed hash, the full id only on request.
    pub id_display: Arc<IdDisplay>,
    pub policy: StampPolicy,
    pub registry: Arc<Registry>,
    pub metrics: Arc<Metrics>,
    /// Counts failed NTLM logins and refuses attempts past the lockout thresholds.
    pub lockout: Arc<LockoutGuard>,
    /// Accept HTTP/2 from clients.
    pub http2: bool,
    pub live: ArcSwap<Live>,
    /// Client connections open now (for the connection limit).
    pub open: AtomicUsize,
}

/// State of one client connection, shared by its requests.
struct ClientConnection {
    gateway: Arc<Gateway>,
    live: Arc<Live>,
    /// How log lines name this connection: the keyed hash of its id (`conn=`), computed when
    /// first shown.
    conn: Arc<ConnName>,
    /// The full id, for the access log and the connection line, only with `show_full_ids`.
    full_id: Option<Box<str>>,
    client: std::net::IpAddr,
    /// Accepted on a TLS listener: closing it sends a close_notify first.
    tls: bool,
    stamp: ConnectionStamp,
    /// Requests of one HTTP/1.1 connection are sequential, so this lock is never contended there.
    upstream: tokio::sync::Mutex<ClientUpstream>,
    registration: Registration,
    /// After a `101 Switching Protocols`: the tunnel this connection became.
    tunnel: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// When the NTLM/Negotiate handshake under way began (its first token), for the handshake
    /// duration metric; None outside a handshake.
    handshake_started: std::sync::Mutex<Option<std::time::Instant>>,
}

impl ClientConnection {
    /// A request carries an NTLM/Negotiate token: the first one of a handshake starts its clock.
    fn handshake_began(&self) {
        if let Ok(mut started) = self.handshake_started.lock() {
            started.get_or_insert_with(std::time::Instant::now);
        }
    }

    /// The handshake ended (a verdict, or a refusal at the gateway): how long it took, if one was
    /// under way.
    fn handshake_ended(&self) -> Option<std::time::Duration> {
        let started = self.handshake_started.lock().ok()?.take()?;
        Some(started.elapsed())
    }
}
