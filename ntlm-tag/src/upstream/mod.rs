//! Backends, the upstream connection pool, and pinned connections.
//!
//! Each client connection is assigned one backend for its life (an NTLM context lives in one backend
//! process); it moves only when that backend goes down. Two modes:
//! - `tag`: upstream keep-alive connections are shared by all client connections. Safe only because
//!   every request carries its own connection id.
//! - `pin`: for backends that key NTLM on their own TCP connection (IIS, Exchange): each client
//!   connection gets an upstream connection of its own, never pooled, closed with it. If it dies after
//!   NTLM was seen on it, the client connection is closed too: the client must authenticate again,
//!   never silently continue on a connection authenticated for someone else.
#![forbid(unsafe_code)]

mod client_body;
mod guarded;
pub mod health;
mod pool;

pub use client_body::{ClientBody, ClientBodyState};
pub use guarded::GuardedBody;

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
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::{TokioExecutor, TokioIo},
};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::{
    config::{HealthCheckConfig, Timeouts},
    metrics::Metrics,
};
use health::Health;
use pool::{IdleConnections, Loan};

/// How client connections are tied to upstream connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Shared keep-alive pool; every request stamped with the connection id.
    Tag,
    /// One upstream connection per client connection.
    Pin,
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
    active: AtomicUsize,
    health: Health,
    /// Caps the pooled upstream connections to this backend (tag mode), if configured.
    permits: Option<Arc<tokio::sync::Semaphore>>,
    /// Shared keep-alive connections not in use (tag mode).
    idle: IdleConnections,
}

impl Backend {
    pub fn authority(&self) -> &Authority {
        &self.authority
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

/// Whether a new upstream connection joins the shared pool or belongs to one client connection.
#[derive(Clone, Copy)]
enum Sharing {
    Shared,
    Pinned,
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

/// What goes wrong talking to a backend; the proxy turns it into 502 or 504.
#[derive(Debug, Error)]
pub enum UpstreamError {
    #[error("cannot connect to {backend}: {source}")]
    Connect {
        backend: Authority,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
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
        "the upstream connection pinned to this client's NTLM session on {backend} is gone; closing \
         the client connection so it authenticates again"
    )]
    PinnedLost { backend: Authority },
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
            UpstreamError::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            UpstreamError::BadTarget(_) | UpstreamError::ClientBody { .. } => {
                StatusCode::BAD_REQUEST
            }
            _ => StatusCode::BAD_GATEWAY,
        }
    }

    /// The client connection must be closed after this error: a pinned session was lost, or the
    /// client's framing can no longer be trusted.
    pub fn closes_client(&self) -> bool {
        matches!(
            self,
            UpstreamError::PinnedLost { .. } | UpstreamError::ClientBody { .. }
        )
    }

    /// The client caused this error (its request), not the backend.
    pub fn is_client_error(&self) -> bool {
        matches!(
            self,
            UpstreamError::BadTarget(_) | UpstreamError::ClientBody { .. }
        )
    }
}

/// An upstream connection owned by one client connection (pin mode).
struct Pinned {
    backend: Arc<Backend>,
    sender: SendRequest<ClientBody>,
}

/// A client connection's upstream side: its backend and, in pin mode, its own connection.
pub struct ClientUpstream {
    assignment: Assignment,
    pinned: Option<Pinned>,
    /// NTLM/Negotiate was seen on this client connection's exchanges.
    ntlm_seen: bool,
}

impl ClientUpstream {
    pub fn backend(&self) -> &Arc<Backend> {
        self.assignment.backend()
    }
}

/// The backends, the pool and the policies.
pub struct Upstream {
    backends: Vec<Arc<Backend>>,
    next: AtomicUsize,
    mode: Mode,
    balance: Balance,
    timeouts: Timeouts,
    metrics: Arc<Metrics>,
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
    pub fn new(
        backends: &[Authority],
        mode: Mode,
        balance: Balance,
        timeouts: &Timeouts,
        max_per_backend: usize,
        metrics: Arc<Metrics>,
    ) -> Self {
        let upstream = Upstream {
            backends: backends
                .iter()
                .map(|a| {
                    Arc::new(Backend {
                        authority: a.clone(),
                        active: AtomicUsize::new(0),
                        health: Health::default(),
                        permits: (max_per_backend > 0)
                            .then(|| Arc::new(tokio::sync::Semaphore::new(max_per_backend))),
                        idle: IdleConnections::default(),
                    })
                })
                .collect(),
            next: AtomicUsize::new(0),
            mode,
            balance,
            timeouts: *timeouts,
            metrics,
            checks: std::sync::Mutex::new(Vec::new()),
        };
        upstream.spawn_idle_sweeper();
        upstream
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

    #[cfg(test)]
    pub fn backends(&self) -> &[Arc<Backend>] {
        &self.backends
    }

    /// The upstream side of a new client connection.
    pub fn attach(&self, client: IpAddr) -> ClientUpstream {
        ClientUpstream {
            assignment: Assignment::new(self.choose(client, None)),
            pinned: None,
            ntlm_seen: false,
        }
    }

    /// Picks a backend among the healthy ones (all of them if none is healthy), avoiding `avoid`.
    fn choose(&self, client: IpAddr, avoid: Option<&Arc<Backend>>) -> Arc<Backend> {
        let healthy: Vec<&Arc<Backend>> = self
            .backends
            .iter()
            .filter(|b| b.is_up() && avoid.is_none_or(|a| !Arc::ptr_eq(a, b)))
            .collect();
        let candidates: Vec<&Arc<Backend>> = if healthy.is_empty() {
            self.backends.iter().collect()
        } else {
            healthy
        };
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
    pub async fn exchange(
        &self,
        state: &mut ClientUpstream,
        client: IpAddr,
        mut req: Request<ClientBody>,
    ) -> Result<Response<GuardedBody>, UpstreamError> {
        let client_body = req.body().state();
        if is_ntlm_request(req.headers()) {
            state.ntlm_seen = true;
        }
        if !state.backend().is_up() {
            self.fail_over(state, client)?;
        }
        let backend = Arc::clone(state.backend());
        let deadline = self.timeouts.upstream_response;
        let result = match self.mode {
            Mode::Tag => {
                to_origin_form(&mut req, &backend)?;
                let exchange = async {
                    // With a cap, wait for one of the backend's connections to be free.
                    let permit = match &backend.permits {
                        Some(p) => Arc::clone(p).acquire_owned().await.ok(),
                        None => None,
                    };
                    let (response, loan) = self.send_shared(&backend, req).await?;
                    let metrics = Arc::clone(&self.metrics);
                    let authority = backend.authority.clone();
                    Ok(response
                        .map(|body| GuardedBody::new(body, permit, Some(loan), metrics, authority)))
                };
                match tokio::time::timeout(deadline, exchange).await {
                    Ok(result) => result,
                    Err(_) => Err(UpstreamError::Timeout {
                        backend: backend.authority.clone(),
                        timeout: deadline,
                    }),
                }
            }
            Mode::Pin => self.exchange_pinned(state, req).await.map(|r| {
                r.map(|body| {
                    let authority = backend.authority.clone();
                    GuardedBody::new(body, None, None, Arc::clone(&self.metrics), authority)
                })
            }),
        };
        if client_body.is_broken() {
            // Whatever the upstream side made of it, the request was cut off by the client. A
            // pinned connection that carried part of it is never reused (hyper closes it too).
            if self.mode == Mode::Pin {
                state.pinned = None;
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
            Err(UpstreamError::Connect { .. } | UpstreamError::Timeout { .. }) => {
                let backoff = backend.health.record_failure();
                tracing::warn!(backend = %backend.authority, backoff_secs = backoff.as_secs_f64(), "backend marked down");
            }
            Err(_) => {}
        }
        // In pin mode, a failed exchange on a connection that carried NTLM ends the session: the
        // client connection is closed with it, never continued on a fresh upstream connection.
        if self.mode == Mode::Pin
            && state.ntlm_seen
            && matches!(
                result,
                Err(UpstreamError::Exchange { .. } | UpstreamError::Timeout { .. })
            )
        {
            state.pinned = None;
            return Err(UpstreamError::PinnedLost {
                backend: backend.authority.clone(),
            });
        }
        result
    }

    /// Moves a client connection off a backend that is down. In pin mode with an NTLM session that
    /// means losing the session: the client connection is closed instead.
    fn fail_over(&self, state: &mut ClientUpstream, client: IpAddr) -> Result<(), UpstreamError> {
        let old = Arc::clone(state.backend());
        if self.mode == Mode::Pin && state.ntlm_seen && state.pinned.is_some() {
            return Err(UpstreamError::PinnedLost {
                backend: old.authority.clone(),
            });
        }
        let new = self.choose(client, Some(&old));
        if !Arc::ptr_eq(&new, &old) {
            tracing::info!(from = %old.authority, to = %new.authority, "backend down; moving the client connection");
            state.assignment = Assignment::new(new);
            state.pinned = None;
        }
        Ok(())
    }

    async fn exchange_pinned(
        &self,
        state: &mut ClientUpstream,
        mut req: Request<ClientBody>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let backend = Arc::clone(state.backend());
        let usable = state
            .pinned
            .as_ref()
            .is_some_and(|p| Arc::ptr_eq(&p.backend, &backend) && !p.sender.is_closed());
        if !usable {
            if state.pinned.take().is_some() && state.ntlm_seen {
                return Err(UpstreamError::PinnedLost {
                    backend: backend.authority.clone(),
                });
            }
            state.pinned = Some(self.connect_pinned(&backend).await?);
        }
        let Some(pinned) = state.pinned.as_mut() else {
            return Err(UpstreamError::PinnedLost {
                backend: backend.authority.clone(),
            });
        };
        to_origin_form(&mut req, &backend)?;
        let deadline = self.timeouts.upstream_response;
        let lost = |e: hyper::Error| UpstreamError::Exchange {
            backend: backend.authority.clone(),
            source: Box::new(e),
        };
        let ready = tokio::time::timeout(deadline, pinned.sender.ready()).await;
        match ready {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(lost(e)),
            Err(_) => {
                return Err(UpstreamError::Timeout {
                    backend: backend.authority.clone(),
                    timeout: deadline,
                });
            }
        }
        match tokio::time::timeout(deadline, pinned.sender.send_request(req)).await {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(e)) => Err(lost(e)),
            Err(_) => Err(UpstreamError::Timeout {
                backend: backend.authority.clone(),
                timeout: deadline,
            }),
        }
    }

    /// Sends `req` on one of the backend's shared connections, or on a new one. A request that an
    /// idle connection could not take (the backend had closed it) goes to the next or a new one; a
    /// request that was sent is never sent twice.
    async fn send_shared(
        &self,
        backend: &Arc<Backend>,
        mut req: Request<ClientBody>,
    ) -> Result<(Response<Incoming>, Loan), UpstreamError> {
        let failed = |e: hyper::Error| UpstreamError::Exchange {
            backend: backend.authority.clone(),
            source: Box::new(e),
        };
        while let Some(mut sender) = backend.idle.take(self.timeouts.upstream_idle) {
            if sender.ready().await.is_err() {
                continue;
            }
            match sender.try_send_request(req).await {
                Ok(response) => return Ok((response, Loan::new(sender, backend))),
                Err(mut e) => match e.take_message() {
                    Some(unsent) => req = unsent,
                    None => return Err(failed(e.into_error())),
                },
            }
        }
        let mut sender = self.open(backend, Sharing::Shared).await?;
        sender.ready().await.map_err(failed)?;
        let response = sender.send_request(req).await.map_err(failed)?;
        Ok((response, Loan::new(sender, backend)))
    }

    async fn connect_pinned(&self, backend: &Arc<Backend>) -> Result<Pinned, UpstreamError> {
        let sender = self.open(backend, Sharing::Pinned).await?;
        Ok(Pinned {
            backend: Arc::clone(backend),
            sender,
        })
    }

    /// Opens an HTTP/1.1 connection to `backend` (within the connect timeout); its connection task
    /// runs until the sender is dropped or the backend closes.
    async fn open(
        &self,
        backend: &Arc<Backend>,
        sharing: Sharing,
    ) -> Result<SendRequest<ClientBody>, UpstreamError> {
        let connect_error =
            |source: Box<dyn std::error::Error + Send + Sync>| UpstreamError::Connect {
                backend: backend.authority.clone(),
                source,
            };
        let host = backend.authority.host().trim_matches(['[', ']']);
        let port = backend.authority.port_u16().unwrap_or(80);
        let connect = tokio::net::TcpStream::connect((host, port));
        let stream = match tokio::time::timeout(self.timeouts.upstream_connect, connect).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(connect_error(Box::new(e))),
            Err(_) => {
                return Err(UpstreamError::Timeout {
                    backend: backend.authority.clone(),
                    timeout: self.timeouts.upstream_connect,
                });
            }
        };
        let _ = stream.set_nodelay(true);
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| connect_error(Box::new(e)))?;
        let metrics = Arc::clone(&self.metrics);
        match sharing {
            Sharing::Shared => {
                metrics.upstream_opened.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(async move {
                    let _ = connection.await;
                });
            }
            Sharing::Pinned => {
                metrics.pinned_opened.fetch_add(1, Ordering::Relaxed);
                metrics.pinned_open.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(async move {
                    let _ = connection.await;
                    metrics.pinned_open.fetch_sub(1, Ordering::Relaxed);
                });
            }
        }
        Ok(sender)
    }

    /// Runs active health checks until the process ends.
    pub fn spawn_health_checks(&self, check: HealthCheckConfig) {
        for backend in &self.backends {
            let backend = Arc::clone(backend);
            let check = check.clone();
            let task = tokio::spawn(async move {
                let client: Client<HttpConnector, Empty<Bytes>> =
                    Client::builder(TokioExecutor::new()).build(HttpConnector::new());
                let mut interval = tokio::time::interval(check.interval);
                loop {
                    interval.tick().await;
                    let uri = format!("http://{}{}", backend.authority, check.path);
                    let ok = match Request::get(uri).body(Empty::new()) {
                        Ok(req) => matches!(
                            tokio::time::timeout(check.timeout, client.request(req)).await,
                            Ok(Ok(r)) if r.status().as_u16() == check.expect_status
                        ),
                        Err(_) => false,
                    };
                    if backend.health.record_check(ok) {
                        if ok {
                            tracing::info!(backend = %backend.authority, "health check passes again; backend back in rotation");
                        } else {
                            tracing::warn!(backend = %backend.authority, path = %check.path, "health check failed; backend out of rotation");
                        }
                    }
                }
            });
            if let Ok(mut checks) = self.checks.lock() {
                checks.push(task.abort_handle());
            }
        }
    }
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
        let backends: Vec<Authority> = (0..n)
            .map(|i| format!("10.0.0.{i}:80").parse().expect("authority"))
            .collect();
        Upstream::new(
            &backends,
            Mode::Tag,
            balance,
            &Timeouts::default(),
            0,
            Arc::new(Metrics::default()),
        )
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
