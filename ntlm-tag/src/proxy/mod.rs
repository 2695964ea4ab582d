//! Listeners and the per-connection path: accept → identify → serve requests → stamp → forward.
#![forbid(unsafe_code)]

mod access_log;
mod io;
pub mod rewrite;
pub mod route_timeouts;
pub mod tls;
mod upgrade;

use std::{
    collections::HashMap,
    error::Error as StdError,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Instant,
};

use arc_swap::ArcSwap;
use tokio_rustls::TlsAcceptor;

use bytes::Bytes;
use http::{Request, Response, StatusCode, Version, uri::Authority};
use http_body_util::{Either, Full};
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
};
use tokio::{net::TcpListener, sync::watch};
use tokio_util::task::TaskTracker;

use crate::{
    config::{Limits, ListenerConfig, Timeouts},
    error::ErrorSource,
    guard::{Leg, LockoutGuard, Verdict},
    identity::{
        IdDisplay, IdHash, Identified, Identifier, Identifying, ProxyProtocol,
        trust::TrustedSources,
    },
    metrics::Metrics,
    registry::{Registration, Registry},
    upstream::{ClientBody, ClientUpstream, ResponseTimeout, Retired, Upstream, UpstreamError},
};
use access_log::{AccessRecord, LoggedBody};
use io::{
    head_clock::{ClockedIo, HeadClock},
    prefixed::PrefixedIo,
};
use rewrite::{ClientScheme, ConnectionStamp, StampPolicy};
use route_timeouts::RouteTimeouts;

pub type ProxyBody = Either<crate::upstream::GuardedBody, Full<Bytes>>;

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
    pub id_display: IdDisplay,
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

/// Counts a connection against the limit while it lives.
struct OpenSlot(Arc<Gateway>);

impl Drop for OpenSlot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// State of one client connection, shared by its requests.
struct ClientConnection {
    gateway: Arc<Gateway>,
    live: Arc<Live>,
    /// How log lines name this connection: the keyed hash of its id (`conn=`).
    conn: IdHash,
    /// The full id, for the access log and the connection line, only with `show_full_ids`.
    full_id: Option<Box<str>>,
    client: std::net::IpAddr,
    stamp: ConnectionStamp,
    /// Requests of one HTTP/1.1 connection are sequential, so this lock is never contended there.
    upstream: tokio::sync::Mutex<ClientUpstream>,
    registration: Registration,
    /// After a `101 Switching Protocols`: the tunnel this connection became.
    tunnel: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// When a listener stops accepting.
pub struct ListenerStops {
    /// The gateway stops: connections are closed gracefully too.
    pub shutdown: watch::Receiver<bool>,
    /// A successor took the listener over: stop accepting, connections go on.
    pub hand_over: watch::Receiver<bool>,
}

/// Accepts clients on `listener` until `shutdown` or `hand_over` fires; connections are tracked by
/// `tracker`. On a hand-over it first accepts what the kernel already queued (those connections
/// were recorded by this process's kernel program, not necessarily by the successor's) and returns
/// how many that were.
pub async fn serve_listener(
    listener: TcpListener,
    config: Arc<ListenerConfig>,
    gateway: Arc<Gateway>,
    stops: ListenerStops,
    tracker: TaskTracker,
) -> usize {
    let ListenerStops {
        mut shutdown,
        mut hand_over,
    } = stops;
    let listen_addr: Arc<str> = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default()
        .into();
    let connections_stop = shutdown.clone();
    let admit = |stream, peer| {
        admit(
            stream,
            peer,
            &config,
            &gateway,
            &listen_addr,
            &connections_stop,
            &tracker,
        )
    };
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.changed() => return 0,
            _ = hand_over.changed() => break,
        };
        match accepted {
            Ok((stream, peer)) => admit(stream, peer),
            Err(e) => {
                // EMFILE/ENFILE and friends: keep serving what we have, try again shortly.
                tracing::warn!(listener = %listen_addr, error = %e, "accept failed (raise the fd limit if this is EMFILE)");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
    // The runtime's readiness may lag the kernel's queue: accept on the socket itself until the
    // kernel says the queue is empty.
    let mut drained = 0;
    loop {
        match socket2::SockRef::from(&listener).accept() {
            Ok((socket, peer)) => {
                let Some(peer) = peer.as_socket() else {
                    continue;
                };
                let stream = socket
                    .set_nonblocking(true)
                    .and_then(|()| tokio::net::TcpStream::from_std(socket.into()));
                match stream {
                    Ok(stream) => {
                        drained += 1;
                        admit(stream, peer);
                    }
                    Err(e) => {
                        tracing::warn!(%peer, error = %e, "cannot register a queued connection; closing it")
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => {
                tracing::warn!(listener = %listen_addr, error = %e, "accept failed while handing the listener over; the successor accepts the rest");
                break;
            }
        }
    }
    drained
}

/// One accepted connection: counted against the limit, identified, and served in a task of its own.
fn admit(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    config: &Arc<ListenerConfig>,
    gateway: &Arc<Gateway>,
    listen_addr: &Arc<str>,
    shutdown: &watch::Receiver<bool>,
    tracker: &TaskTracker,
) {
    let live = gateway.live.load_full();
    if gateway.open.fetch_add(1, Ordering::Relaxed) >= live.limits.max_connections {
        gateway.open.fetch_sub(1, Ordering::Relaxed);
        gateway.metrics.connection_refused();
        refuse_over_limit(stream, peer, gateway, &live);
        return;
    }
    let slot = OpenSlot(Arc::clone(gateway));
    // Identify on the accept path (the kernel record is there already), but read any PROXY
    // header or TLS handshake in the connection's own task so a slow peer never holds up the
    // accept loop.
    let proxy = config.proxy_protocol.then(|| ProxyProtocol {
        trusted: &live.trusted,
        header_timeout: live.timeouts.proxy_header,
    });
    let identifying = match gateway
        .identifier
        .accept(stream, peer, proxy, Arc::clone(listen_addr))
    {
        Ok(identifying) => identifying,
        Err(e) => {
            ErrorSource::Internal.count(&gateway.metrics, false);
            tracing::error!(%peer, error = %e, "cannot identify a client connection; closing it");
            return;
        }
    };
    tracker.spawn(handle_connection(
        identifying,
        Arc::clone(config),
        Arc::clone(gateway),
        live,
        slot,
        Arc::clone(listen_addr),
        shutdown.clone(),
    ));
}

/// Over the connection limit: a short 503 (best effort, never blocking the accept loop), then close.
/// It answers no request, but it is a response the client sees: counted and logged like one.
fn refuse_over_limit(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    gateway: &Gateway,
    live: &Live,
) {
    const BUSY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\nContent-Length: 0\r\nRetry-After: 1\r\n\r\n";
    let _ = stream.try_write(BUSY);
    let limit = live.limits.max_connections;
    tracing::warn!(%peer, limit, "connection limit reached; refusing a connection (raise limits.max_connections?)");
    gateway.metrics.request(
        "-",
        StatusCode::SERVICE_UNAVAILABLE.as_u16(),
        std::time::Duration::ZERO,
    );
    if live.access_log {
        AccessRecord::without_request(None, peer.ip(), StatusCode::SERVICE_UNAVAILABLE.as_u16())
            .emit(0);
    }
}

/// One client connection, from accept to close. This future lives as long as the connection, so
/// it only holds small things: the set-up and the serving run in boxed futures of their own (a task
/// is as large as its largest state; memory per idle connection).
#[allow(clippy::too_many_arguments)]
async fn handle_connection(
    identifying: Identifying,
    config: Arc<ListenerConfig>,
    gateway: Arc<Gateway>,
    live: Arc<Live>,
    slot: OpenSlot,
    listener: Arc<str>,
    shutdown: watch::Receiver<bool>,
) {
    let Some(identified) = identifying.await else {
        return;
    };
    let Some((io, connection)) = set_up_connection(identified, &config, &gateway, &live, &listener)
    else {
        return;
    };
    match live.tls.get(&config.address).cloned() {
        None => Box::pin(serve_connection(io, connection, shutdown)).await,
        Some(acceptor) => Box::pin(serve_tls(io, acceptor, connection, shutdown)).await,
    }
    drop(slot);
}

/// Registers an identified connection; `None` when it is closed instead.
fn set_up_connection(
    identified: Identified,
    config: &ListenerConfig,
    gateway: &Arc<Gateway>,
    live: &Arc<Live>,
    listener: &str,
) -> Option<(PrefixedIo<tokio::net::TcpStream>, Arc<ClientConnection>)> {
    let Identified {
        identity,
        id,
        stream,
        prefix,
    } = identified;
    let scheme = if live.tls.contains_key(&config.address) {
        ClientScheme::Https
    } else {
        ClientScheme::Http
    };
    match open_connection(gateway, live, identity, &id, listener, scheme) {
        Ok(c) => Some((PrefixedIo::new(prefix, stream), Arc::new(c))),
        Err(e) => {
            tracing::error!(error = %e, "cannot set up a client connection; closing it");
            None
        }
    }
}

/// TLS termination, then HTTP. The identity of a TLS connection is that of its TCP connection:
/// already resolved.
async fn serve_tls(
    io: PrefixedIo<tokio::net::TcpStream>,
    acceptor: TlsAcceptor,
    connection: Arc<ClientConnection>,
    shutdown: watch::Receiver<bool>,
) {
    let gateway = Arc::clone(&connection.gateway);
    let deadline = connection.live.timeouts.header_read;
    match tokio::time::timeout(deadline, acceptor.accept(io)).await {
        Ok(Ok(tls_stream)) => serve_connection(tls_stream, connection, shutdown).await,
        Ok(Err(e)) => {
            gateway.metrics.tls_failed();
            tracing::info!(conn = %connection.conn, error = %e, "TLS handshake failed");
        }
        Err(_) => {
            gateway.metrics.tls_failed();
            tracing::info!(conn = %connection.conn, "TLS handshake timed out");
        }
    }
}

fn open_connection(
    gateway: &Arc<Gateway>,
    live: &Arc<Live>,
    identity: crate::identity::ConnectionIdentity,
    id: &str,
    listener: &str,
    scheme: ClientScheme,
) -> Result<ClientConnection, Box<dyn StdError + Send + Sync>> {
    let stamp = ConnectionStamp::new(id, identity.client, scheme)?;
    let conn = gateway.id_display.hash(id);
    let full_id: Option<Box<str>> = gateway.id_display.full(id).map(Into::into);
    let upstream = live.upstream.attach(identity.client.ip());
    gateway.metrics.connection(identity.metrics_label());
    tracing::debug!(
        conn = %conn,
        conn_id = full_id.as_deref().map(tracing::field::display),
        client = %identity.client,
        peer = %identity.peer,
        identity_source = identity.source.name(),
        learned_from = identity.learned_from.name(),
        balancer = ?identity.balancer,
        backend = %upstream.backend().authority(),
        "client connection"
    );
    let client = identity.client.ip();
    let registration = gateway.registry.register(
        conn,
        full_id.as_deref().map(str::to_string),
        identity,
        upstream.backend().authority().to_string(),
        upstream.link(),
        listener.to_string(),
    );
    Ok(ClientConnection {
        gateway: Arc::clone(gateway),
        live: Arc::clone(live),
        conn,
        full_id,
        client,
        stamp,
        upstream: tokio::sync::Mutex::new(upstream),
        registration,
        tunnel: std::sync::Mutex::new(None),
    })
}

async fn serve_connection<S>(
    stream: S,
    connection: Arc<ClientConnection>,
    mut shutdown: watch::Receiver<bool>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let timeouts = connection.live.timeouts;
    let max_header_bytes = connection.live.limits.max_header_bytes;
    let http2 = connection.gateway.http2;
    let clock = HeadClock::new();
    let service = {
        let connection = Arc::clone(&connection);
        let clock = Arc::clone(&clock);
        service_fn(move |req| {
            let connection = Arc::clone(&connection);
            let clock = Arc::clone(&clock);
            // Boxed: hyper keeps a slot the size of this future for every connection, idle or not.
            Box::pin(async move {
                clock.request_started();
                let response = handle(req, &connection).await;
                clock.request_done();
                response
            })
        })
    };
    let mut tunnel_shutdown = shutdown.clone();
    let result = if http2 {
        // Sniffs the HTTP/2 preface; HTTP/1.1 otherwise. (HTTP/2 streams have no head to trickle,
        // so hyper's header timer alone bounds HTTP/1.1 heads and idle time here.) Boxed, so that
        // the much larger HTTP/2-capable state does not size every HTTP/1.1 connection's task.
        Box::pin(async move {
            let mut builder = auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(timeouts.header_read)
                .max_buf_size(max_header_bytes)
                .keep_alive(true);
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                result = conn.as_mut() => result,
                _ = shutdown.changed() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            }
        })
        .await
    } else {
        let io = TokioIo::new(ClockedIo::new(stream, Arc::clone(&clock)));
        let conn = http1::Builder::new()
            .timer(TokioTimer::new())
            // hyper's timer runs from the end of the previous response: the idle limit.
            .header_read_timeout(timeouts.idle.max(timeouts.header_read))
            .max_buf_size(max_header_bytes)
            .keep_alive(true)
            .serve_connection(io, service)
            .with_upgrades();
        tokio::pin!(conn);
        tokio::select! {
            result = conn.as_mut() => result,
            _ = clock.head_expired(timeouts.header_read) => {
                tracing::info!(conn = %connection.conn, limit_secs = timeouts.header_read.as_secs_f64(), "request head not complete in time (slowloris?); closing");
                Ok(())
            }
            _ = shutdown.changed() => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        }
        .map_err(Into::into)
    };
    let tunnel = connection.tunnel.lock().ok().and_then(|mut t| t.take());
    if let Some(mut tunnel) = tunnel {
        // The connection became a tunnel (WebSocket): it lives until either side closes it, or
        // until the gateway stops.
        tokio::select! {
            _ = &mut tunnel => {}
            _ = tunnel_shutdown.changed() => tunnel.abort(),
        }
    }
    if let Err(e) = result {
        if let Some(status) = e
            .downcast_ref::<hyper::Error>()
            .and_then(automatic_response)
        {
            // hyper answered a request head it could not parse itself; count and log that answer.
            let gateway = &connection.gateway;
            ErrorSource::Client.count(&gateway.metrics, false);
            gateway
                .metrics
                .request("-", status.as_u16(), std::time::Duration::ZERO);
            tracing::info!(conn = %connection.conn, status = status.as_u16(), error = %error_chain(&*e), "unparsable request head");
            if connection.live.access_log {
                AccessRecord::without_request(
                    Some(connection.conn),
                    connection.client,
                    status.as_u16(),
                )
                .emit(0);
            }
        } else {
            tracing::debug!(conn = %connection.conn, error = %error_chain(&*e), "client connection ended with an error");
        }
    }
}

/// The status hyper's HTTP/1 server sends by itself for a request head it cannot parse (its
/// `Server::on_error`: 431 for a head over the buffer, 414 for a URI over 64 KiB, 400 for a bad
/// method, URI, version or header); `None` when it sends nothing (an HTTP/2 preface on an HTTP/1
/// connection, a closed or timed-out connection).
fn automatic_response(e: &hyper::Error) -> Option<StatusCode> {
    // hyper tells these kinds apart only in its messages.
    let text = e.to_string();
    if !e.is_parse()
        || e.is_parse_status()
        || text.contains("HTTP2 preface")
        || text.contains("internal")
    {
        return None;
    }
    Some(if e.is_parse_too_large() {
        if text.contains("URI") {
            StatusCode::URI_TOO_LONG
        } else {
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
        }
    } else {
        StatusCode::BAD_REQUEST
    })
}

/// NTLM authenticates a TCP connection; HTTP/2 multiplexes requests of many contexts on one. Like
/// IIS, answer an NTLM/Negotiate exchange on an HTTP/2 stream with HTTP_1_1_REQUIRED, and clients
/// retry over HTTP/1.1.
async fn handle(
    req: Request<Incoming>,
    connection: &ClientConnection,
) -> Result<Response<LoggedBody>, h2::Error> {
    if req.version() == Version::HTTP_2 && crate::ntlm::is_ntlm_request(req.headers()) {
        tracing::debug!(conn = %connection.conn, "NTLM over HTTP/2: answering HTTP_1_1_REQUIRED");
        return Err(h2::Error::from(h2::Reason::HTTP_1_1_REQUIRED));
    }
    Ok(forward(req, connection).await)
}

/// Forwards one request to the connection's backend, stamped with the connection id; every
/// response, the backend's or the gateway's own, is counted and gets an access line.
async fn forward(req: Request<Incoming>, connection: &ClientConnection) -> Response<LoggedBody> {
    let gateway = &connection.gateway;
    let started = Instant::now();
    connection.registration.count_request();
    let mut record = connection.live.access_log.then(|| {
        AccessRecord::request(
            connection.conn,
            connection.full_id.as_deref(),
            connection.client,
            (req.method(), req.uri(), req.version(), req.headers()),
            started,
        )
    });
    let (response, backend) = respond(req, connection, record.as_mut()).await;
    let status = response.status().as_u16();
    // Responses made before a backend was chosen count under backend "-", as in the access log.
    gateway.metrics.request(
        backend.as_ref().map_or("-", Authority::as_str),
        status,
        started.elapsed(),
    );
    if let Some(record) = &mut record {
        record.status(status);
        let auth = connection.registration.auth();
        record.auth(auth.name(), auth.user());
    }
    response.map(|body| LoggedBody::new(body, record))
}

/// The response to one request, and the backend that was asked (`None` when the gateway answered
/// without one).
async fn respond(
    mut req: Request<Incoming>,
    connection: &ClientConnection,
    record: Option<&mut AccessRecord>,
) -> (Response<ProxyBody>, Option<Authority>) {
    let gateway = &connection.gateway;
    let live = &connection.live;
    // hyper bounds its read buffer, not the head itself: enforce the configured head size exactly.
    let uri = req.uri();
    let head_size = uri.scheme_str().map_or(0, |s| s.len() + 3)
        + uri.authority().map_or(0, |a| a.as_str().len())
        + uri.path_and_query().map_or(0, |p| p.as_str().len())
        + req
            .headers()
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len() + 4)
            .sum::<usize>();
    if head_size > live.limits.max_header_bytes {
        let limit = live.limits.max_header_bytes;
        return (
            fail(connection, Failure::HeadTooLarge { head_size, limit }),
            None,
        );
    }
    if let Some(codings) = rewrite::unsupported_transfer_coding(req.headers()) {
        // Forwarding would drop the coding (each hop is framed anew, chunked) and pass coded bytes
        // on as content: 501 (RFC 9112 §6.1), and the unread body ends the connection.
        return (fail(connection, Failure::TransferCoding(&codings)), None);
    }
    if let Some(m) = crate::ntlm::ntlm_message(req.headers()) {
        gateway.metrics.ntlm_message(m);
    }
    // What this request's token means for the connection's auth state and the lockout guard.
    let leg = crate::ntlm::client_token(req.headers()).map(|t| Leg::of(&t));
    if let Some(account) = leg.as_ref().and_then(Leg::account)
        && let Some(refusal) = refuse_locked_out(connection, account)
    {
        return (refusal, None);
    }
    let upgrade_to = (req.version() == Version::HTTP_11)
        .then(|| upgrade::requested(req.headers()))
        .flatten();
    let mut client_upgrade = upgrade_to.is_some().then(|| hyper::upgrade::on(&mut req));
    if let Some(deadline) = live.route_timeouts.response_for(req.uri().path()) {
        req.extensions_mut().insert(ResponseTimeout(deadline));
    }
    let (mut parts, body) = req.into_parts();
    parts.version = Version::HTTP_11;
    rewrite::prepare_request(&mut parts.headers, &gateway.policy, &connection.stamp);
    if let Some(protocol) = upgrade_to {
        upgrade::restore(&mut parts.headers, protocol);
    }
    let upstream_req = Request::from_parts(parts, ClientBody::new(body));
    let mut upstream = connection.upstream.lock().await;
    let asked = Instant::now();
    let result = live
        .upstream
        .exchange(&mut upstream, connection.client, upstream_req)
        .await;
    let backend = Arc::clone(upstream.backend());
    if let Some(record) = record {
        record.upstream(backend.authority(), asked.elapsed());
    }
    // The backend moves on failover; the link changes when a connection is bound.
    connection
        .registration
        .set_upstream(backend.authority().as_str(), upstream.link());
    drop(upstream);
    let backend_name = backend.authority();
    let response = match result {
        Ok(response)
            if let Some(codings) = rewrite::unsupported_transfer_coding(response.headers()) =>
        {
            // Each hop is framed anew (chunked): any other coding would reach the client unlabelled,
            // its coded bytes taken for the content. The unread body closes that upstream connection.
            let failure = Failure::BackendTransferCoding {
                backend: backend_name,
                codings: &codings,
            };
            fail(connection, failure)
        }
        Ok(response)
            if response.status() == StatusCode::SWITCHING_PROTOCOLS
                && (client_upgrade.is_none()
                    || !response.headers().contains_key(http::header::UPGRADE)) =>
        {
            // A 101 the client did not ask for, or one that names no protocol: nothing could
            // speak on that connection afterwards.
            fail(
                connection,
                Failure::UnrequestedSwitch {
                    backend: backend_name,
                },
            )
        }
        Ok(mut response) => {
            let switched = response.status() == StatusCode::SWITCHING_PROTOCOLS;
            let upstream_upgrade = switched.then(|| hyper::upgrade::on(&mut response));
            let protocol = response.headers().get(http::header::UPGRADE).cloned();
            let (mut parts, body) = response.into_parts();
            rewrite::prepare_response(&mut parts.headers);
            if let (Some(upstream_upgrade), Some(client_upgrade), Some(protocol)) =
                (upstream_upgrade, client_upgrade.take(), protocol)
            {
                upgrade::restore(&mut parts.headers, protocol);
                let tunnel = upgrade::spawn_tunnel(
                    client_upgrade,
                    upstream_upgrade,
                    connection.conn,
                    &gateway.metrics,
                );
                if let Ok(mut slot) = connection.tunnel.lock() {
                    *slot = Some(tunnel);
                }
            }
            if let Some(Retired(_)) = parts.extensions.get::<Retired>() {
                // The upstream connection reached a cap and closes after this response: the
                // client connection, whose NTLM context lived there, closes with it.
                parts.headers.insert(
                    http::header::CONNECTION,
                    http::HeaderValue::from_static("close"),
                );
            }
            Response::from_parts(parts, Either::Left(body))
        }
        Err(error) => fail(
            connection,
            Failure::Exchange {
                backend: backend_name,
                error: &error,
            },
        ),
    };
    if let Some(leg) = &leg {
        record_auth_outcome(connection, leg, &response);
    }
    (response, Some(backend.authority().clone()))
}

/// A Type3 from a user or address past its lockout threshold: 429 at the gateway, so that neither
/// the backend nor the domain controller counts another bad password. `None`: let it through.
fn refuse_locked_out(connection: &ClientConnection, account: &str) -> Option<Response<ProxyBody>> {
    let Verdict::Refuse {
        kind,
        failures,
        retry_after,
    } = connection.gateway.lockout.check(account, connection.client)
    else {
        return None;
    };
    // Whole seconds, rounded up: a client retrying on time finds the window moved on.
    let retry_secs = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
    let retry_secs = retry_secs.max(1);
    tracing::warn!(
        conn = %connection.conn,
        user = %account,
        client = %connection.client,
        count = kind.name(),
        failures,
        retry_after_secs = retry_secs,
        "NTLM login refused before the backend (429): too many failed logins in the lockout \
         window; the client must stop or fix its password (a trusted client address can go in \
         lockout.allow)"
    );
    connection
        .registration
        .set_auth(crate::guard::AuthState::Failed(Some(account.into())));
    // The half-done handshake at the backend goes with the connection.
    let mut response = gateway_response(
        StatusCode::TOO_MANY_REQUESTS,
        "Too many failed logins; try again later",
        Closes::Connection,
    );
    response.headers_mut().insert(
        http::header::RETRY_AFTER,
        http::HeaderValue::from(retry_secs),
    );
    Some(response)
}

/// The connection's auth state after a request with a token, and the lockout guard's count.
fn record_auth_outcome(connection: &ClientConnection, leg: &Leg, response: &Response<ProxyBody>) {
    let challenged = crate::guard::auth_state::carries_challenge(response.headers());
    let state = leg.outcome(response.status(), challenged);
    if let Some(account) = leg.account() {
        let lockout = &connection.gateway.lockout;
        match &state {
            crate::guard::AuthState::Failed(_) => {
                let failures = lockout.record_failure(account, connection.client);
                tracing::info!(
                    conn = %connection.conn,
                    user = %account,
                    client = %connection.client,
                    failures,
                    "NTLM login failed (the backend answered the Type3 with 401)"
                );
            }
            crate::guard::AuthState::Authenticated(_) => {
                lockout.record_success(account, connection.client);
            }
            _ => {}
        }
    }
    connection.registration.set_auth(state);
}

/// A response the gateway makes itself instead of forwarding one, and why.
enum Failure<'a> {
    /// The request head is over `limits.max_header_bytes` (hyper bounds only its read buffer).
    HeadTooLarge { head_size: usize, limit: usize },
    /// The request has a transfer coding other than chunked.
    TransferCoding(&'a str),
    /// The backend's response has a transfer coding other than chunked.
    BackendTransferCoding {
        backend: &'a Authority,
        codings: &'a str,
    },
    /// A `101` the client did not ask for, or one that names no protocol.
    UnrequestedSwitch { backend: &'a Authority },
    /// The exchange with the backend failed (or the client broke its request off during it).
    Exchange {
        backend: &'a Authority,
        error: &'a UpstreamError,
    },
}

impl Failure<'_> {
    fn source(&self) -> ErrorSource {
        match self {
            Failure::HeadTooLarge { .. } | Failure::TransferCoding(_) => ErrorSource::Client,
            Failure::BackendTransferCoding { .. } | Failure::UnrequestedSwitch { .. } => {
                ErrorSource::Upstream
            }
            Failure::Exchange { error, .. } => error.error_source(),
        }
    }

    /// The status, the text the client reads, and whether the connection closes after it.
    fn response(&self) -> (StatusCode, &'static str, Closes) {
        match self {
            Failure::HeadTooLarge { .. } => (
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "Request Header Fields Too Large",
                Closes::Connection,
            ),
            Failure::TransferCoding(_) => (
                StatusCode::NOT_IMPLEMENTED,
                "Transfer codings other than chunked are not implemented",
                Closes::Connection,
            ),
            Failure::BackendTransferCoding { .. } => {
                (StatusCode::BAD_GATEWAY, "Bad Gateway", Closes::KeepAlive)
            }
            Failure::UnrequestedSwitch { .. } => {
                (StatusCode::BAD_GATEWAY, "Bad Gateway", Closes::Connection)
            }
            Failure::Exchange { error, .. } => {
                let status = error.status();
                let closes = if error.closes_client() {
                    Closes::Connection
                } else {
                    Closes::KeepAlive
                };
                (status, status.canonical_reason().unwrap_or("error"), closes)
            }
        }
    }

    /// The log line: at info for what only the client can fix, as a warning otherwise.
    fn log(&self, conn: IdHash, status: StatusCode) {
        match *self {
            Failure::HeadTooLarge { head_size, limit } => {
                tracing::info!(conn = %conn, head_size, limit, "request head too large; 431");
            }
            Failure::TransferCoding(codings) => {
                tracing::info!(conn = %conn, transfer_encoding = %codings, "transfer coding other than chunked; 501");
            }
            Failure::BackendTransferCoding { backend, codings } => tracing::warn!(
                conn = %conn,
                backend = %backend,
                transfer_encoding = %codings,
                "backend response with a transfer coding other than chunked; 502 (turn off \
                 transfer-coding compression on the backend; Content-Encoding passes)"
            ),
            Failure::UnrequestedSwitch { backend } => tracing::warn!(
                conn = %conn,
                backend = %backend,
                "backend switched protocols without a matching upgrade request; 502"
            ),
            Failure::Exchange { backend, error } => match error.error_source() {
                ErrorSource::Client => tracing::info!(
                    conn = %conn,
                    backend = %backend,
                    status = status.as_u16(),
                    error = %error_chain(error),
                    "bad request from the client"
                ),
                ErrorSource::Upstream | ErrorSource::Internal => tracing::warn!(
                    conn = %conn,
                    backend = %backend,
                    status = status.as_u16(),
                    error = %error_chain(error),
                    "backend request failed"
                ),
            },
        }
    }

    fn timed_out(&self) -> bool {
        matches!(self, Failure::Exchange { error, .. } if error.is_timeout())
    }
}

/// Counts, logs and answers a failure: the one place a gateway-made error response is built.
fn fail(connection: &ClientConnection, failure: Failure<'_>) -> Response<ProxyBody> {
    let source = failure.source();
    source.count(&connection.gateway.metrics, failure.timed_out());
    let (status, text, closes) = failure.response();
    failure.log(connection.conn, status);
    gateway_response(status, text, closes)
}

/// Whether the client connection closes after a gateway-made response.
#[derive(Clone, Copy)]
enum Closes {
    KeepAlive,
    Connection,
}

/// A response the gateway makes itself: a short text body, and `Connection: close` when the
/// connection cannot go on.
fn gateway_response(status: StatusCode, text: &'static str, closes: Closes) -> Response<ProxyBody> {
    let mut response = Response::new(Either::Right(Full::new(Bytes::from(format!("{text}\n")))));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    if let Closes::Connection = closes {
        headers.insert(
            http::header::CONNECTION,
            http::HeaderValue::from_static("close"),
        );
    }
    response
}

/// `error: cause: cause`, so a log line names the root cause (connection refused, reset...).
pub fn error_chain(e: &(dyn StdError + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let s_text = s.to_string();
        if !text.contains(&s_text) {
            text.push_str(": ");
            text.push_str(&s_text);
        }
        source = s.source();
    }
    text
}
