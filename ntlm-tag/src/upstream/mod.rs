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
#![forbid(unsafe_code)]

mod binding;
mod caps;
mod client_body;
mod guarded;
pub mod health;
mod pool;
pub mod routes;
mod settings;
pub mod tls;

pub use caps::{Cap, DedicatedCaps, Retired};
pub use client_body::{ClientBody, ClientBodyState};
pub use guarded::GuardedBody;
pub use settings::{HealthCheckConfig, RouteConfig, Timeouts};

use std::{
    net::IpAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode, Uri, header, uri::Authority};
use http_body_util::Empty;
use hyper::{body::Incoming, client::conn::http1::SendRequest};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::net::TcpStream;
use tokio_util::either::Either;

use crate::epa::diagnosis::{BackendView, BindingClaim, Diagnosis, diagnose};
use crate::metrics::{BindTrigger, Metrics, UpstreamUse};
use health::Health;
use pool::{IdleConnections, Loan};
use routes::{Pool, RouteTable};
use tls::{BackendTls, BackendTlsConfig, BackendTlsError};

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

/// A request extension: this request's response timeout, when its route has one of its own
/// (`[[timeouts.route]]`); `timeouts.upstream_response_secs` otherwise.
#[derive(Debug, Clone, Copy)]
pub struct ResponseTimeout(pub Duration);

/// A request that asks to switch protocols (`Connection: upgrade` with `Upgrade`, e.g. WebSocket):
/// it goes on an upstream connection of its own, which becomes the client's tunnel after a `101`
/// and is never pooled.
pub fn is_upgrade_request(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// A connection to a backend: plain TCP, or TLS over it.
type BackendIo = Either<TcpStream, tokio_rustls::client::TlsStream<TcpStream>>;

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

/// One backend.
#[derive(Debug)]
pub struct Backend {
    authority: Authority,
    /// Set for an `https://` backend.
    tls: Option<BackendTls>,
    /// The leaf certificate of the last TLS handshake (DER), for Extended Protection diagnostics.
    last_leaf: std::sync::Mutex<Option<Vec<u8>>>,
    active: AtomicUsize,
    health: Health,
    /// Caps the busy shared upstream connections to this backend, if configured.
    permits: Option<Arc<tokio::sync::Semaphore>>,
    /// Shared keep-alive connections not in use.
    idle: IdleConnections,
}

impl Backend {
    pub fn authority(&self) -> &Authority {
        &self.authority
    }

    /// Opens a connection within `timeout` (TCP connect and, for TLS, the handshake): the one
    /// place that dials a backend, for exchanges and health checks alike.
    async fn connect(&self, timeout: Duration) -> Result<BackendIo, UpstreamError> {
        let host = self.authority.host().trim_matches(['[', ']']);
        let port = self
            .authority
            .port_u16()
            .unwrap_or(if self.tls.is_some() { 443 } else { 80 });
        let dial =
            async {
                let stream =
                    TcpStream::connect((host, port))
                        .await
                        .map_err(|e| UpstreamError::Connect {
                            backend: self.authority.clone(),
                            source: Box::new(e),
                        })?;
                let _ = stream.set_nodelay(true);
                match &self.tls {
                    None => Ok(Either::Left(stream)),
                    Some(backend_tls) => {
                        let stream = backend_tls.connect(stream).await.map_err(|source| {
                            UpstreamError::Tls {
                                backend: self.authority.clone(),
                                server_name: backend_tls.server_name(),
                                source,
                            }
                        })?;
                        if let (Some(leaf), Ok(mut last)) =
                            (tls::peer_leaf(&stream), self.last_leaf.lock())
                        {
                            *last = Some(leaf.as_ref().to_vec());
                        }
                        Ok(Either::Right(stream))
                    }
                }
            };
        match tokio::time::timeout(timeout, dial).await {
            Ok(result) => result,
            Err(_) => Err(UpstreamError::ConnectTimeout {
                backend: self.authority.clone(),
                timeout,
            }),
        }
    }

    pub fn is_up(&self) -> bool {
        self.health.is_up()
    }
}

fn path_of(uri: &Uri) -> &str {
    uri.path_and_query().map(|p| p.as_str()).unwrap_or("/")
}

/// An HTTP/1.1 connection to the backend takes the origin form; `Host` is the client's, or the
/// backend's when the client sent none.
fn to_origin_form<B>(req: &mut Request<B>, backend: &Backend) -> Result<(), UpstreamError> {
    if req.uri().scheme().is_some() || req.uri().authority().is_some() {
        *req.uri_mut() = path_of(req.uri())
            .parse()
            .map_err(|e: http::uri::InvalidUri| UpstreamError::BadTarget(e.into()))?;
    }
    if !req.headers().contains_key(header::HOST)
        && let Ok(host) = backend.authority.as_str().parse()
    {
        req.headers_mut().insert(header::HOST, host);
    }
    Ok(())
}

/// A client connection's claim on a backend; keeps the backend's connection count.
#[derive(Debug)]
pub struct Assignment {
    backend: Arc<Backend>,
}

impl Assignment {
    fn new(backend: Arc<Backend>) -> Self {
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

/// What a new upstream connection is for.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Sharing {
    /// The shared pool.
    Shared,
    /// Pin mode: one client connection's, from its first request.
    Pinned,
    /// Bind mode: one client connection's, opened for an NTLM/Negotiate leg.
    Bound,
}

/// What goes wrong talking to a backend; the proxy turns it into 502 or 504.
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

    /// The gateway refused the request by its own configuration (a route the client's session
    /// cannot reach), neither the client's nor the backend's fault.
    pub fn is_gateway_refusal(&self) -> bool {
        matches!(self, UpstreamError::Misdirected { .. })
    }

    /// The client caused this error (its request), not the backend.
    pub fn is_client_error(&self) -> bool {
        matches!(
            self,
            UpstreamError::BadTarget(_) | UpstreamError::ClientBody { .. }
        )
    }
}

/// An upstream connection that belongs to one client connection: pinned (pin mode) or bound to
/// its NTLM session (bind mode). Dropping it closes the connection.
struct Dedicated {
    backend: Arc<Backend>,
    sender: SendRequest<ClientBody>,
    link: &'static str,
    /// Age and requests, for `[upstream_caps]`.
    usage: caps::Usage,
    /// Keeps `ntlm_tag_bound_connections` while a bound connection lives.
    _bound: Option<BoundGauge>,
}

/// Counts one bound connection in the metrics while it lives.
struct BoundGauge(Arc<Metrics>);

impl BoundGauge {
    fn new(metrics: &Arc<Metrics>) -> Self {
        metrics.bound_open().inc();
        BoundGauge(Arc::clone(metrics))
    }
}

impl Drop for BoundGauge {
    fn drop(&mut self) {
        self.0.bound_open().dec();
    }
}

/// A client connection's upstream side: its backend and, once it has one, its own connection.
pub struct ClientUpstream {
    assignment: Assignment,
    mode: Mode,
    dedicated: Option<Dedicated>,
    /// NTLM/Negotiate was seen on this client connection's exchanges.
    ntlm_seen: bool,
}

impl ClientUpstream {
    pub fn backend(&self) -> &Arc<Backend> {
        self.assignment.backend()
    }

    /// How this client connection's requests reach the backend now: `shared` (the pool), `bound`
    /// (a connection bound to its NTLM session), `pinned`, or `none` (pin mode, nothing sent yet).
    pub fn link(&self) -> &'static str {
        match (&self.dedicated, self.mode) {
            (Some(d), _) => d.link,
            (None, Mode::Pin) => "none",
            (None, Mode::Bind | Mode::Tag) => "shared",
        }
    }

    /// An upstream connection carries this client's NTLM session: the client is never moved
    /// silently to another connection or backend.
    fn holds_session(&self) -> bool {
        self.dedicated.is_some() && self.ntlm_seen
    }

    fn move_to(&mut self, backend: Arc<Backend>) {
        self.assignment = Assignment::new(backend);
        self.dedicated = None;
    }
}

/// How one attempt on one backend ended.
enum Attempt<T> {
    /// The backend answered, or the exchange failed once (part of) the request may have reached it.
    Done(Result<T, UpstreamError>),
    /// The request never reached the backend (connect refused or timed out, a connection found
    /// dead before a byte was written): it may go to another backend.
    Unsent(Box<Request<ClientBody>>, UpstreamError),
}

impl<T> Attempt<T> {
    fn map<U>(self, f: impl FnOnce(T) -> U) -> Attempt<U> {
        match self {
            Attempt::Done(result) => Attempt::Done(result.map(f)),
            Attempt::Unsent(req, e) => Attempt::Unsent(req, e),
        }
    }
}

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

    /// Picks one of `pool`'s backends among those up for it and not in `avoid` (any of its
    /// backends if none is up).
    fn choose(&self, pool: &Pool, client: IpAddr, avoid: &[Arc<Backend>]) -> Arc<Backend> {
        self.pick(pool, client, avoid).unwrap_or_else(|| {
            self.pick_from(client, pool.members.iter().map(|m| &m.backend).collect())
        })
    }

    /// One of `pool`'s backends up for it and not in `avoid`, if there is one.
    fn pick(&self, pool: &Pool, client: IpAddr, avoid: &[Arc<Backend>]) -> Option<Arc<Backend>> {
        let healthy: Vec<&Arc<Backend>> = pool
            .members
            .iter()
            .filter(|m| m.is_up() && !avoid.iter().any(|a| Arc::ptr_eq(a, &m.backend)))
            .map(|m| &m.backend)
            .collect();
        (!healthy.is_empty()).then(|| self.pick_from(client, healthy))
    }

    fn pick_from(&self, client: IpAddr, candidates: Vec<&Arc<Backend>>) -> Arc<Backend> {
        let n = candidates.len();
        let chosen = match self.balance {
            Balance::LeastConn => {
                let start = self.next.fetch_add(1, Ordering::Relaxed) % n.max(1);
                (0..n)
                    .map(|i| candidates[(start + i) % n])
                    .min_by_key(|b| b.active.load(Ordering::Relaxed))
            }
            Balance::Hash => candidates
                .iter()
                .copied()
                .max_by_key(|b| rendezvous(client, b.authority.as_str())),
        };
        Arc::clone(chosen.unwrap_or(&self.backends[0]))
    }

    /// Sends one (already rewritten) request for a client connection and returns the response.
    ///
    /// A request that never reached its backend goes to another healthy one (each backend once),
    /// and the client connection's affinity moves with it, unless an upstream connection holds the
    /// client's NTLM session. A request that may have reached a backend is never sent again.
    pub async fn exchange(
        &self,
        state: &mut ClientUpstream,
        client: IpAddr,
        mut req: Request<ClientBody>,
    ) -> Result<Response<GuardedBody>, UpstreamError> {
        let client_body = req.body().state();
        let epa_claim = BindingClaim::from_headers(req.headers());
        if let Some(claim) = &epa_claim {
            tracing::debug!(%claim, "NTLMv2 Type3 Extended Protection fields");
        }
        let binds = self.mode == Mode::Bind && binding::request_binds(req.headers());
        if binds || is_ntlm_request(req.headers()) {
            state.ntlm_seen = true;
        }
        let upgrade = is_upgrade_request(req.headers());
        // Whether this request goes on a connection of the client's own (pinned or bound). An
        // upgrade always does: after a 101 its connection is the client's tunnel, never pooled.
        let dedicated = upgrade
            || match self.mode {
                Mode::Pin => true,
                Mode::Bind => binds || state.dedicated.is_some(),
                Mode::Tag => false,
            };
        let had_host = req.headers().contains_key(header::HOST);
        let pool = self.routes.route(req.uri().path());
        if state.holds_session() {
            // The session cannot move: its connection serves every route its backend serves.
            if !pool.serves(state.backend()) {
                return Err(UpstreamError::Misdirected {
                    route: pool.name().to_string(),
                    backend: state.backend().authority.clone(),
                });
            }
        } else if !pool.is_up_on(state.backend()) {
            let old = Arc::clone(state.backend());
            let new = self.choose(pool, client, std::slice::from_ref(&old));
            if !Arc::ptr_eq(&new, &old) {
                tracing::info!(route = pool.name(), from = %old.authority, to = %new.authority, "backend down or not serving this route; moving the client connection");
                state.move_to(new);
            }
        }
        let mut tried: Vec<Arc<Backend>> = Vec::new();
        let (backend, result) = loop {
            let backend = Arc::clone(state.backend());
            if let Err(e) = to_origin_form(&mut req, &backend) {
                break (backend, Err(e));
            }
            let attempt = if dedicated {
                self.send_dedicated(state, req).await
            } else {
                self.send_shared(state, req).await
            };
            match attempt {
                Attempt::Done(result) => break (backend, result),
                Attempt::Unsent(unsent, error) => {
                    if matches!(
                        error,
                        UpstreamError::Connect { .. }
                            | UpstreamError::Tls { .. }
                            | UpstreamError::ConnectTimeout { .. }
                    ) {
                        self.mark_down(&backend);
                    }
                    tried.push(Arc::clone(&backend));
                    // A client whose NTLM session lives on an upstream connection stays with it.
                    let next = if state.holds_session() {
                        None
                    } else {
                        self.pick(pool, client, &tried)
                    };
                    let Some(next) = next else {
                        break (backend, Err(error));
                    };
                    tracing::info!(
                        from = %backend.authority,
                        to = %next.authority,
                        error = %crate::proxy::error_chain(&error),
                        "the request never reached the backend; sending it to another one and moving the client connection there"
                    );
                    self.metrics.upstream_failover();
                    state.move_to(next);
                    req = *unsent;
                    if !had_host {
                        // to_origin_form set the previous backend's name.
                        req.headers_mut().remove(header::HOST);
                    }
                }
            }
        };
        let mut result = self.settle(state, &backend, dedicated, &client_body, result);
        if dedicated && let Ok(response) = &mut result {
            if response.status() == StatusCode::SWITCHING_PROTOCOLS {
                // The connection now carries the tunnel, and closes with it.
                state.dedicated = None;
            } else {
                self.count_dedicated_use(state, response);
            }
        }
        if let (Ok(response), Some(claim)) = (&result, &epa_claim)
            && response.status() == StatusCode::UNAUTHORIZED
            && claim.is_bound()
        {
            self.explain_epa_refusal(&backend, claim);
        }
        result
    }

    /// Counts a response on the client's own connection against `[upstream_caps]`. At a cap the
    /// connection is let go (it closes once this response has been read) and the response is
    /// marked [`Retired`], so that the client connection closes after it too: the NTLM context
    /// and the client connection that holds it end together, never one without the other.
    fn count_dedicated_use(
        &self,
        state: &mut ClientUpstream,
        response: &mut Response<GuardedBody>,
    ) {
        let now = std::time::Instant::now();
        let Some(own) = state.dedicated.as_mut() else {
            return;
        };
        let Some(cap) = own.usage.record_response(&self.caps, now) else {
            return;
        };
        self.metrics.upstream_retired(cap);
        tracing::info!(
            backend = %own.backend.authority,
            link = own.link,
            cap = cap.as_str(),
            requests = own.usage.requests(),
            age_secs = own.usage.age(now).as_secs_f64(),
            "upstream connection reached its [upstream_caps] cap; closing it and its client \
             connection after this response (the client reconnects and authenticates again)"
        );
        state.dedicated = None;
        response.extensions_mut().insert(Retired(cap));
    }

    /// A backend answered 401 to a Type3 with a channel binding: log and count why.
    fn explain_epa_refusal(&self, backend: &Backend, claim: &BindingClaim) {
        let leaf = backend.last_leaf.lock().ok().and_then(|l| l.clone());
        let view = BackendView {
            tls_server_name: backend.tls.as_ref().map(BackendTls::server_name),
            leaf: leaf.as_deref(),
        };
        let Diagnosis { cause, advice } = diagnose(claim, &view);
        self.metrics.epa_refused(cause);
        tracing::warn!(
            backend = %backend.authority,
            cause = cause.name(),
            %claim,
            "Extended Protection: the backend refused a login bound to a TLS channel: {advice}"
        );
    }

    /// Health, NTLM bookkeeping and error classification after the last attempt.
    fn settle(
        &self,
        state: &mut ClientUpstream,
        backend: &Arc<Backend>,
        dedicated: bool,
        client_body: &ClientBodyState,
        result: Result<Response<GuardedBody>, UpstreamError>,
    ) -> Result<Response<GuardedBody>, UpstreamError> {
        if client_body.is_broken() {
            // Whatever the upstream side made of it, the request was cut off by the client. A
            // dedicated connection that carried part of it is never reused (hyper closes it too).
            if dedicated {
                state.dedicated = None;
            }
            if let Err(e) = result {
                return Err(match e {
                    UpstreamError::BadTarget(_) | UpstreamError::ClientBody { .. } => e,
                    other => UpstreamError::ClientBody {
                        source: Box::new(other),
                    },
                });
            }
        }
        match &result {
            Ok(response) => {
                backend.health.record_success();
                if is_ntlm_challenge(response) {
                    state.ntlm_seen = true;
                }
            }
            Err(UpstreamError::Timeout { .. }) => self.mark_down(backend),
            Err(_) => {}
        }
        // A failed exchange on a connection of the client's own that carried NTLM ends the
        // session: the client connection is closed with it, never continued on a fresh upstream
        // connection.
        if dedicated
            && state.ntlm_seen
            && matches!(
                result,
                Err(UpstreamError::Exchange { .. } | UpstreamError::Timeout { .. })
            )
        {
            let link = match self.mode {
                Mode::Pin => "pinned",
                Mode::Bind | Mode::Tag => "bound",
            };
            state.dedicated = None;
            return Err(UpstreamError::SessionLost {
                backend: backend.authority.clone(),
                link,
                timed_out: matches!(result, Err(UpstreamError::Timeout { .. })),
            });
        }
        result
    }

    fn mark_down(&self, backend: &Backend) {
        let backoff = backend.health.record_failure();
        tracing::warn!(backend = %backend.authority, backoff_secs = backoff.as_secs_f64(), "backend marked down");
    }

    /// A request on the shared pool. In bind mode a response that shows the connection now holds
    /// an NTLM context binds it to this client connection instead of returning it to the pool.
    async fn send_shared(
        &self,
        state: &mut ClientUpstream,
        req: Request<ClientBody>,
    ) -> Attempt<Response<GuardedBody>> {
        let backend = Arc::clone(state.backend());
        // With a cap, wait for one of the backend's connections to be free.
        let permit = match &backend.permits {
            Some(p) => {
                let deadline = self.timeouts.upstream_response;
                match tokio::time::timeout(deadline, Arc::clone(p).acquire_owned()).await {
                    Ok(permit) => permit.ok(),
                    Err(_) => {
                        return Attempt::Done(Err(UpstreamError::Timeout {
                            backend: backend.authority.clone(),
                            timeout: deadline,
                        }));
                    }
                }
            }
            None => None,
        };
        let request = req.body().state();
        let (response, sender) = match self.send_checked_out(&backend, req, Sharing::Shared).await {
            Attempt::Done(Ok(sent)) => sent,
            Attempt::Done(Err(e)) => return Attempt::Done(Err(e)),
            Attempt::Unsent(req, e) => return Attempt::Unsent(req, e),
        };
        let loan = if self.mode == Mode::Bind && binding::response_binds(response.headers()) {
            tracing::debug!(backend = %backend.authority, status = response.status().as_u16(), "the response shows an NTLM/Negotiate context on its upstream connection; binding it to the client connection");
            state.ntlm_seen = true;
            state.dedicated = Some(self.bound(&backend, sender, BindTrigger::Response));
            None
        } else {
            Some(Loan::new(sender, &backend, request, permit))
        };
        let metrics = Arc::clone(&self.metrics);
        let authority = backend.authority.clone();
        Attempt::Done(Ok(
            response.map(|body| GuardedBody::new(body, loan, metrics, authority))
        ))
    }

    fn bound(
        &self,
        backend: &Arc<Backend>,
        sender: SendRequest<ClientBody>,
        trigger: BindTrigger,
    ) -> Dedicated {
        self.metrics.bound(trigger);
        Dedicated {
            backend: Arc::clone(backend),
            sender,
            link: "bound",
            usage: caps::Usage::new(std::time::Instant::now()),
            _bound: Some(BoundGauge::new(&self.metrics)),
        }
    }

    /// A request on the client connection's own upstream connection: its pinned one (pin mode),
    /// or the one bound to its NTLM session (bind mode), which an NTLM/Negotiate leg takes out of
    /// the pool's reach (or opens) before the request goes.
    async fn send_dedicated(
        &self,
        state: &mut ClientUpstream,
        req: Request<ClientBody>,
    ) -> Attempt<Response<GuardedBody>> {
        let backend = Arc::clone(state.backend());
        let wrap = |response: Response<Incoming>| {
            let metrics = Arc::clone(&self.metrics);
            let authority = backend.authority.clone();
            response.map(|body| GuardedBody::new(body, None, metrics, authority))
        };
        let usable = state
            .dedicated
            .as_ref()
            .is_some_and(|d| Arc::ptr_eq(&d.backend, &backend) && !d.sender.is_closed());
        if !usable {
            if let Some(lost) = state.dedicated.take()
                && state.ntlm_seen
            {
                return Attempt::Done(Err(UpstreamError::SessionLost {
                    backend: backend.authority.clone(),
                    link: lost.link,
                    timed_out: false,
                }));
            }
            let sharing = match self.mode {
                Mode::Pin => Sharing::Pinned,
                Mode::Bind | Mode::Tag => Sharing::Bound,
            };
            return match self.send_checked_out(&backend, req, sharing).await {
                Attempt::Done(Ok((response, sender))) => {
                    state.dedicated = Some(match sharing {
                        Sharing::Pinned => Dedicated {
                            backend: Arc::clone(&backend),
                            sender,
                            link: "pinned",
                            usage: caps::Usage::new(std::time::Instant::now()),
                            _bound: None,
                        },
                        Sharing::Bound | Sharing::Shared => {
                            self.bound(&backend, sender, BindTrigger::Request)
                        }
                    });
                    Attempt::Done(Ok(wrap(response)))
                }
                Attempt::Done(Err(e)) => Attempt::Done(Err(e)),
                Attempt::Unsent(req, e) => Attempt::Unsent(req, e),
            };
        }
        let Some(own) = state.dedicated.as_mut() else {
            return Attempt::Done(Err(UpstreamError::SessionLost {
                backend: backend.authority.clone(),
                link: "pinned",
                timed_out: false,
            }));
        };
        let deadline = self.timeouts.upstream_response;
        match tokio::time::timeout(deadline, own.sender.ready()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Attempt::Unsent(Box::new(req), self.exchange_error(&backend, e)),
            Err(_) => {
                return Attempt::Done(Err(UpstreamError::Timeout {
                    backend: backend.authority.clone(),
                    timeout: deadline,
                }));
            }
        }
        let attempt = self.send_on(&backend, &mut own.sender, req).await;
        if matches!(attempt, Attempt::Done(_)) {
            self.metrics.upstream_request(UpstreamUse::Reused);
        }
        attempt.map(wrap)
    }

    /// Sends `req` on an idle shared connection of `backend` or, when none takes it, on a new one
    /// opened for `sharing` (pinned connections are always new). Idle connections the backend has
    /// closed are skipped: a request they could not take is never lost, and never sent twice.
    async fn send_checked_out(
        &self,
        backend: &Arc<Backend>,
        mut req: Request<ClientBody>,
        sharing: Sharing,
    ) -> Attempt<(Response<Incoming>, SendRequest<ClientBody>)> {
        let deadline = self.timeouts.upstream_response;
        if sharing != Sharing::Pinned {
            while let Some(mut sender) = backend.idle.take(self.timeouts.upstream_idle) {
                // An idle connection is ready at once, or closed.
                if !matches!(
                    tokio::time::timeout(deadline, sender.ready()).await,
                    Ok(Ok(()))
                ) {
                    continue;
                }
                match self.send_on(backend, &mut sender, req).await {
                    Attempt::Done(result) => {
                        self.metrics.upstream_request(UpstreamUse::Reused);
                        return Attempt::Done(result.map(|r| (r, sender)));
                    }
                    // Closed by the backend before a byte of the request was written.
                    Attempt::Unsent(unsent, _) => req = *unsent,
                }
            }
        }
        let mut sender = match self.open(backend, sharing).await {
            Ok(sender) => sender,
            Err(e) => return Attempt::Unsent(Box::new(req), e),
        };
        match tokio::time::timeout(deadline, sender.ready()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Attempt::Unsent(Box::new(req), self.exchange_error(backend, e)),
            Err(_) => {
                return Attempt::Done(Err(UpstreamError::Timeout {
                    backend: backend.authority.clone(),
                    timeout: deadline,
                }));
            }
        }
        match self.send_on(backend, &mut sender, req).await {
            Attempt::Done(result) => Attempt::Done(result.map(|r| (r, sender))),
            Attempt::Unsent(req, e) => Attempt::Unsent(req, e),
        }
    }

    /// One request on one ready connection, within the response timeout.
    async fn send_on(
        &self,
        backend: &Backend,
        sender: &mut SendRequest<ClientBody>,
        req: Request<ClientBody>,
    ) -> Attempt<Response<Incoming>> {
        let deadline = req
            .extensions()
            .get::<ResponseTimeout>()
            .map_or(self.timeouts.upstream_response, |t| t.0);
        match tokio::time::timeout(deadline, sender.try_send_request(req)).await {
            Ok(Ok(response)) => Attempt::Done(Ok(response)),
            Ok(Err(mut e)) => match e.take_message() {
                Some(unsent) => Attempt::Unsent(
                    Box::new(unsent),
                    self.exchange_error(backend, e.into_error()),
                ),
                None => Attempt::Done(Err(self.exchange_error(backend, e.into_error()))),
            },
            Err(_) => Attempt::Done(Err(UpstreamError::Timeout {
                backend: backend.authority.clone(),
                timeout: deadline,
            })),
        }
    }

    fn exchange_error(&self, backend: &Backend, e: hyper::Error) -> UpstreamError {
        UpstreamError::Exchange {
            backend: backend.authority.clone(),
            source: Box::new(e),
        }
    }

    /// Opens an HTTP/1.1 connection to `backend` (within the connect timeout); its connection task
    /// runs until the sender is dropped or the backend closes.
    async fn open(
        &self,
        backend: &Arc<Backend>,
        sharing: Sharing,
    ) -> Result<SendRequest<ClientBody>, UpstreamError> {
        let started = std::time::Instant::now();
        let io = backend.connect(self.timeouts.upstream_connect).await?;
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .map_err(|e| UpstreamError::Connect {
                backend: backend.authority.clone(),
                source: Box::new(e),
            })?;
        let metrics = Arc::clone(&self.metrics);
        metrics.upstream_connected(started.elapsed());
        match sharing {
            // With upgrades: a 101 hands the connection to the client's tunnel (only requests
            // sent on a connection of the client's own can be upgrades).
            Sharing::Shared | Sharing::Bound => {
                metrics.upstream_request(UpstreamUse::Opened);
                tokio::spawn(async move {
                    let _ = connection.with_upgrades().await;
                });
            }
            Sharing::Pinned => {
                metrics.upstream_request(UpstreamUse::Opened);
                metrics.pinned_open().inc();
                tokio::spawn(async move {
                    let _ = connection.with_upgrades().await;
                    metrics.pinned_open().dec();
                });
            }
        }
        Ok(sender)
    }

    /// Runs active health checks until this Upstream is replaced (a reload) or the process ends:
    /// each route's check (the default pool's is `default_check`) on each of its backends. A
    /// failing check takes the backend out of that route only.
    pub fn spawn_health_checks(&self, default_check: Option<&HealthCheckConfig>) {
        for pool in self.routes.pools() {
            let check = match &pool.check {
                Some(check) => Some(check),
                None if pool.is_default() => default_check,
                None => None,
            };
            let Some(check) = check else {
                continue;
            };
            for member in &pool.members {
                let task = tokio::spawn(run_health_check(
                    pool.name().to_string(),
                    Arc::clone(&member.backend),
                    Arc::clone(&member.check),
                    check.clone(),
                ));
                if let Ok(mut checks) = self.checks.lock() {
                    checks.push(task.abort_handle());
                }
            }
        }
    }
}

/// Probes `check.path` on `backend` every interval; the outcome is `route`'s health there. A pass
/// also ends a passive backoff (the backend answers again).
async fn run_health_check(
    route: String,
    backend: Arc<Backend>,
    health: Arc<Health>,
    check: HealthCheckConfig,
) {
    let mut interval = tokio::time::interval(check.interval);
    loop {
        interval.tick().await;
        let outcome =
            match tokio::time::timeout(check.timeout, probe(&backend, &check.path, check.timeout))
                .await
            {
                Ok(Ok(status)) if status == check.expect_status => Ok(()),
                Ok(Ok(status)) => Err(format!("status {status}")),
                Ok(Err(e)) => Err(e),
                Err(_) => Err(format!("no answer within {:?}", check.timeout)),
            };
        if outcome.is_ok() {
            backend.health.record_success();
        }
        if health.record_check(outcome.is_ok()) {
            match outcome {
                Ok(()) => {
                    tracing::info!(%route, backend = %backend.authority, path = %check.path, "health check passes again; backend back in the route's rotation")
                }
                Err(why) => {
                    tracing::warn!(%route, backend = %backend.authority, path = %check.path, %why, "health check failed; backend out of the route's rotation (other routes keep it)")
                }
            }
        }
    }
}

/// One health-check GET on a new connection (plain or TLS, like every exchange): the status, or
/// why the backend could not be asked (for the log line).
async fn probe(backend: &Backend, path: &str, timeout: Duration) -> Result<u16, String> {
    let io = backend
        .connect(timeout)
        .await
        .map_err(|e| crate::proxy::error_chain(&e))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let req = Request::get(path)
        .header(header::HOST, backend.authority.as_str())
        .header(header::CONNECTION, "close")
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    sender
        .send_request(req)
        .await
        .map(|r| r.status().as_u16())
        .map_err(|e| e.to_string())
}

fn rendezvous(client: IpAddr, backend: &str) -> u64 {
    use std::hash::{BuildHasher, Hasher};
    // A fixed-key hasher: the same client maps to the same backend across restarts.
    let mut h =
        std::hash::BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default()
            .build_hasher();
    h.write(client.to_string().as_bytes());
    h.write(backend.as_bytes());
    h.finish()
}

/// Which NTLM message a request's `Authorization` carries, if any.
pub fn ntlm_message(headers: &HeaderMap) -> Option<crate::metrics::NtlmMessage> {
    use crate::metrics::NtlmMessage;
    let value = headers.get(header::AUTHORIZATION)?.as_bytes();
    let (scheme, token) = value.split_at(value.iter().position(|b| *b == b' ')?);
    let token = token.trim_ascii();
    // base64("NTLMSSP\0") = "TlRMTVNTUAA", then the message type.
    let raw_ntlm = token.starts_with(b"TlRMTVNTUAAB") || token.starts_with(b"TlRMTVNTUAAD");
    if scheme.eq_ignore_ascii_case(b"NTLM")
        || (scheme.eq_ignore_ascii_case(b"Negotiate") && raw_ntlm)
    {
        if token.starts_with(b"TlRMTVNTUAAB") {
            return Some(NtlmMessage::Negotiate);
        }
        if token.starts_with(b"TlRMTVNTUAAD") {
            return Some(NtlmMessage::Authenticate);
        }
        None
    } else if scheme.eq_ignore_ascii_case(b"Negotiate") {
        Some(NtlmMessage::Spnego)
    } else {
        None
    }
}

/// `Authorization: NTLM …` or `Negotiate …` (also the bare scheme).
pub fn is_ntlm_request(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::AUTHORIZATION)
        .iter()
        .any(|v| is_ntlm_scheme(v.as_bytes()))
}

/// A 401 offering NTLM/Negotiate, or a 407 with `Proxy-Authenticate` doing so.
pub fn is_ntlm_challenge<B>(response: &Response<B>) -> bool {
    let name = match response.status() {
        StatusCode::UNAUTHORIZED => header::WWW_AUTHENTICATE,
        StatusCode::PROXY_AUTHENTICATION_REQUIRED => header::PROXY_AUTHENTICATE,
        _ => return false,
    };
    response
        .headers()
        .get_all(name)
        .iter()
        .any(|v| is_ntlm_scheme(v.as_bytes()))
}

fn is_ntlm_scheme(value: &[u8]) -> bool {
    let scheme = value
        .split(|b| *b == b' ' || *b == b',')
        .next()
        .unwrap_or_default();
    scheme.eq_ignore_ascii_case(b"NTLM") || scheme.eq_ignore_ascii_case(b"Negotiate")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upstream(n: usize, balance: Balance) -> Upstream {
        let backends: Vec<BackendAddress> = (0..n)
            .map(|i| BackendAddress::plain(format!("10.0.0.{i}:80").parse().expect("authority")))
            .collect();
        Upstream::new(
            &backends,
            &[],
            Mode::Tag,
            balance,
            &Timeouts::default(),
            0,
            Arc::new(Metrics::default()),
        )
        .expect("plain backends")
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[tokio::test]
    async fn least_connections_spreads_and_skips_backends_that_are_down() {
        let up = upstream(2, Balance::LeastConn);
        let a = up.attach(ip("198.18.0.1"));
        let b = up.attach(ip("198.18.0.2"));
        assert_ne!(a.backend().authority(), b.backend().authority());
        a.backend().health.record_failure();
        for _ in 0..4 {
            let c = up.attach(ip("198.18.0.3"));
            assert_eq!(c.backend().authority(), b.backend().authority());
        }
    }

    #[tokio::test]
    async fn hashing_keeps_a_client_on_one_backend() {
        let up = upstream(5, Balance::Hash);
        let first = up.attach(ip("198.18.0.9")).backend().authority().clone();
        for _ in 0..10 {
            assert_eq!(up.attach(ip("198.18.0.9")).backend().authority(), &first);
        }
        let spread: std::collections::HashSet<_> = (0..50)
            .map(|i| {
                up.attach(ip(&format!("198.18.1.{i}")))
                    .backend()
                    .authority()
                    .clone()
            })
            .collect();
        assert!(spread.len() > 1);
    }

    #[test]
    fn ntlm_detection() {
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            "NTLM TlRMTVNTUAABAAAA".parse().expect("v"),
        );
        assert!(is_ntlm_request(&h));
        h.insert(header::AUTHORIZATION, "negotiate YIIG".parse().expect("v"));
        assert!(is_ntlm_request(&h));
        h.insert(header::AUTHORIZATION, "Basic eDp5".parse().expect("v"));
        assert!(!is_ntlm_request(&h));
        h.insert(header::AUTHORIZATION, "NTLMX abc".parse().expect("v"));
        assert!(!is_ntlm_request(&h));
        let mut r = Response::new(());
        *r.status_mut() = StatusCode::UNAUTHORIZED;
        r.headers_mut().append(
            header::WWW_AUTHENTICATE,
            "Basic realm=x".parse().expect("v"),
        );
        assert!(!is_ntlm_challenge(&r));
        r.headers_mut()
            .append(header::WWW_AUTHENTICATE, "NTLM".parse().expect("v"));
        assert!(is_ntlm_challenge(&r));
        *r.status_mut() = StatusCode::OK;
        assert!(!is_ntlm_challenge(&r));
    }

    #[test]
    fn upstream_requests_take_the_origin_form_and_keep_the_clients_host() {
        let up = upstream(1, Balance::LeastConn);
        let backend = &up.backends()[0];
        let mut absolute = Request::get("http://elsewhere/a/b?c=d")
            .body(())
            .expect("request");
        to_origin_form(&mut absolute, backend).expect("valid");
        assert_eq!(absolute.uri(), "/a/b?c=d");
        assert_eq!(absolute.headers()[header::HOST], "10.0.0.0:80");
        let mut origin = Request::get("/x")
            .header(header::HOST, "intranet.example")
            .body(())
            .expect("request");
        to_origin_form(&mut origin, backend).expect("valid");
        assert_eq!(origin.uri(), "/x");
        assert_eq!(origin.headers()[header::HOST], "intranet.example");
    }
}
