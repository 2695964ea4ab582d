//! Dialling a backend (TCP, TLS) and sending a request on a connection: the one place that opens
//! upstream connections, for exchanges and health checks alike.

use std::{sync::Arc, time::Duration};

use http::{Request, Response, Uri, header};
use tokio::net::TcpStream;
use tokio_util::either::Either;

use super::h1::{self, Connection, ExchangeError, Failed, UpstreamBody};
use super::{Backend, ClientBody, ResponseTimeout, Upstream, UpstreamError, tls};
use crate::metrics::UpstreamUse;

/// A connection to a backend: plain TCP, or TLS over it.
/// The TLS stream is boxed: rustls's state is over a kilobyte, and every future that holds a
/// connection (the exchange's, nested several deep) would carry and copy it on a plain backend too.
pub(super) type BackendIo = Either<TcpStream, Box<tokio_rustls::client::TlsStream<TcpStream>>>;

/// How one attempt on one backend ended.
pub(super) enum Attempt<T> {
    /// The backend answered, or the exchange failed once (part of) the request may have reached it.
    Done(Result<T, UpstreamError>),
    /// The request never reached the backend (connect refused or timed out, a connection found
    /// dead before a byte was written): it may go to another backend.
    Unsent(Box<Request<ClientBody>>, UpstreamError),
}

/// What a new upstream connection is for.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Sharing {
    /// The shared pool.
    Shared,
    /// Pin mode: one client connection's, from its first request.
    Pinned,
    /// Bind mode: one client connection's, opened for an NTLM/Negotiate leg.
    Bound,
}

impl Backend {
    /// Opens a connection within `timeout` (TCP connect and, for TLS, the handshake): the one
    /// place that dials a backend, for exchanges and health checks alike.
    pub(super) async fn connect(&self, timeout: Duration) -> Result<BackendIo, UpstreamError> {
        let host = self.authority.host().trim_matches(['[', ']']);
        let port = self
            .authority
            .port_u16()
            .unwrap_or(if self.tls.is_some() { 443 } else { 80 });
        let dial =
            async {
                let stream = TcpStream::connect((host, port)).await.map_err(|e| {
                    match super::error::gateway_shortage(&e) {
                        Some((resource, remedy)) => UpstreamError::GatewayResources {
                            backend: self.authority.clone(),
                            resource,
                            remedy,
                            source: e,
                        },
                        None => UpstreamError::Connect {
                            backend: self.authority.clone(),
                            source: Box::new(e),
                        },
                    }
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
                        Ok(Either::Right(Box::new(stream)))
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
}

impl Upstream {
    /// Sends `req` on an idle shared connection of `backend` or, when none takes it, on a new one
    /// opened for `sharing` (pinned connections are always new). Idle connections the backend has
    /// closed are skipped: a request they could not take is never lost, and never sent twice.
    /// The response body closes its connection once read unless told where it goes
    /// ([`UpstreamBody::return_to`]).
    pub(super) async fn send_checked_out(
        &self,
        backend: &Arc<Backend>,
        mut req: Request<ClientBody>,
        stamped: &[u8],
        sharing: Sharing,
    ) -> Attempt<Response<UpstreamBody>> {
        if sharing != Sharing::Pinned {
            while let Some(connection) = backend.idle.take(self.timeouts.upstream_idle) {
                match self.send_on(backend, connection, req, stamped).await {
                    Attempt::Done(result) => {
                        self.metrics.upstream_request(UpstreamUse::Reused);
                        return Attempt::Done(result);
                    }
                    // Closed by the backend before a byte of the request was written.
                    Attempt::Unsent(unsent, _) => req = *unsent,
                }
            }
        }
        // Boxed: dialling (TCP and TLS) is a large future, and keep-alive requests never await it.
        let connection = match Box::pin(self.open(backend, sharing)).await {
            Ok(connection) => connection,
            Err(e) => return Attempt::Unsent(Box::new(req), e),
        };
        self.send_on(backend, connection, req, stamped).await
    }

    /// One request on one connection, within the response timeout (up to the response head).
    pub(super) async fn send_on(
        &self,
        backend: &Backend,
        connection: Connection,
        req: Request<ClientBody>,
        stamped: &[u8],
    ) -> Attempt<Response<UpstreamBody>> {
        let deadline = req
            .extensions()
            .get::<ResponseTimeout>()
            .map_or(self.timeouts.upstream_response, |t| t.0);
        let sent = h1::send(connection, req, stamped, &self.metrics, &backend.authority);
        match tokio::time::timeout(deadline, sent).await {
            Ok(Ok(response)) => Attempt::Done(Ok(response)),
            Ok(Err(Failed::Unsent(unsent, e))) => {
                Attempt::Unsent(unsent, self.exchange_error(backend, e))
            }
            Ok(Err(Failed::Sent(e))) => Attempt::Done(Err(self.exchange_error(backend, e))),
            Err(_) => Attempt::Done(Err(UpstreamError::Timeout {
                backend: backend.authority.clone(),
                timeout: deadline,
            })),
        }
    }

    /// Opens an HTTP/1.1 connection to `backend` (within the connect timeout).
    pub(super) async fn open(
        &self,
        backend: &Arc<Backend>,
        sharing: Sharing,
    ) -> Result<Connection, UpstreamError> {
        let started = std::time::Instant::now();
        let io = backend.connect(self.timeouts.upstream_connect).await?;
        self.metrics.upstream_connected(started.elapsed());
        self.metrics.upstream_request(UpstreamUse::Opened);
        let connection = Connection::new(io);
        Ok(match sharing {
            Sharing::Shared | Sharing::Bound => connection,
            Sharing::Pinned => connection.pinned(&self.metrics),
        })
    }

    pub(super) fn exchange_error(&self, backend: &Backend, e: ExchangeError) -> UpstreamError {
        UpstreamError::Exchange {
            backend: backend.authority.clone(),
            source: Box::new(e),
        }
    }
}

pub(super) fn path_of(uri: &Uri) -> &str {
    uri.path_and_query().map(|p| p.as_str()).unwrap_or("/")
}

/// An HTTP/1.1 connection to the backend takes the origin form; `Host` is the client's, or the
/// backend's when the client sent none.
pub(super) fn to_origin_form<B>(
    req: &mut Request<B>,
    backend: &Backend,
) -> Result<(), UpstreamError> {
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
