//! One client connection, from accept to close: registration, TLS, and the HTTP server (the
//! gateway's own for HTTP/1.x, hyper's for HTTP/2, told apart by the connection preface).

use std::{
    error::Error as StdError,
    sync::{Arc, atomic::Ordering},
};

use tokio_rustls::TlsAcceptor;

use bytes::BytesMut;
use http::StatusCode;
use hyper::{server::conn::http2, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::{io::AsyncReadExt, sync::watch};

use super::{
    ClientConnection, Gateway, ListenerConfig, Live,
    access_log::AccessRecord,
    forward::handle,
    h1::{
        self,
        head::H2_PREFACE,
        reader::{ReadIo, Reader, WriteIo, first_bytes},
    },
    io::prefixed::PrefixedIo,
    rewrite::{ClientScheme, ConnectionStamp},
};
use crate::{
    error::{ErrorSource, error_chain},
    identity::{ConnName, Identified, Identifying},
};

/// One client connection, from accept to close. This future lives as long as the connection, so
/// it only holds small things: the set-up, the preface and TLS, the HTTP/1.x server and a tunnel
/// each run in a boxed future of their own, one after the other, so that an idle connection keeps
/// only this future and the HTTP/1.x server's (a task is as large as its largest state; a future
/// awaiting another keeps its own state too).
pub(super) async fn handle_connection(
    identifying: Identifying,
    config: Arc<ListenerConfig>,
    gateway: Arc<Gateway>,
    live: Arc<Live>,
    slot: OpenSlot,
    listener: Arc<str>,
    mut shutdown: watch::Receiver<bool>,
) {
    let Some(identified) = identifying.await else {
        return;
    };
    let Some((io, connection)) = set_up_connection(identified, &config, &gateway, &live, &listener)
    else {
        return;
    };
    let http1 = match live.tls.get(&config.address).cloned() {
        // Without HTTP/2 there is no preface to wait for: split the stream here, with no boxed
        // step to allocate.
        None if !gateway.http2 => Some(split_tcp(io)),
        None => Box::pin(start_serving(io, &connection, &shutdown)).await,
        Some(acceptor) => Box::pin(start_tls(io, acceptor, &connection, &shutdown)).await,
    };
    if let Some(Http1 { reader, writer }) = http1 {
        let mut tunnel_shutdown = shutdown.clone();
        Box::pin(h1::serve(reader, writer, &connection, &mut shutdown)).await;
        // Most connections never become a tunnel: only those that did pay for its boxed wait.
        if let Some(tunnel) = connection.tunnel.lock().ok().and_then(|mut t| t.take()) {
            Box::pin(run_tunnel(tunnel, &mut tunnel_shutdown)).await;
        }
    }
    drop(slot);
}

/// An HTTP/1.x client connection, ready for the server: its two halves.
pub(super) struct Http1 {
    reader: Reader,
    writer: WriteIo,
}

/// Registers an identified connection; `None` when it is closed instead.
pub(super) fn set_up_connection(
    identified: Identified,
    config: &ListenerConfig,
    gateway: &Arc<Gateway>,
    live: &Arc<Live>,
    listener: &Arc<str>,
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
    match open_connection(gateway, live, identity, id, listener, scheme) {
        Ok(c) => Some((PrefixedIo::new(prefix, stream), Arc::new(c))),
        Err(e) => {
            tracing::error!(error = %e, "cannot set up a client connection; closing it");
            None
        }
    }
}

/// TLS termination, then the preface. The identity of a TLS connection is that of its TCP
/// connection: already resolved.
pub(super) async fn start_tls(
    io: PrefixedIo<tokio::net::TcpStream>,
    acceptor: TlsAcceptor,
    connection: &Arc<ClientConnection>,
    shutdown: &watch::Receiver<bool>,
) -> Option<Http1> {
    let gateway = &connection.gateway;
    let deadline = connection.live.timeouts.header_read;
    match tokio::time::timeout(deadline, acceptor.accept(io)).await {
        Ok(Ok(tls_stream)) => start_serving(tls_stream, connection, shutdown).await,
        Ok(Err(e)) => {
            gateway.metrics.tls_failed();
            tracing::info!(conn = %connection.conn, error = %e, "TLS handshake failed");
            None
        }
        Err(_) => {
            gateway.metrics.tls_failed();
            tracing::info!(conn = %connection.conn, "TLS handshake timed out");
            None
        }
    }
}

pub(super) fn open_connection(
    gateway: &Arc<Gateway>,
    live: &Arc<Live>,
    identity: crate::identity::ConnectionIdentity,
    id: String,
    listener: &Arc<str>,
    scheme: ClientScheme,
) -> Result<ClientConnection, Box<dyn StdError + Send + Sync>> {
    let full_id: Option<Box<str>> = gateway.id_display.full(&id).map(Into::into);
    let stamp = ConnectionStamp::new(id, identity.client, scheme, &gateway.policy)?;
    let conn = Arc::new(ConnName::new(
        stamp.id.clone(),
        Arc::clone(&gateway.id_display),
    ));
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
        Arc::clone(&conn),
        full_id.clone(),
        identity,
        upstream.backend().authority().clone(),
        upstream.link(),
        Arc::clone(listener),
    );
    Ok(ClientConnection {
        gateway: Arc::clone(gateway),
        live: Arc::clone(live),
        conn,
        full_id,
        client,
        tls: scheme == ClientScheme::Https,
        stamp,
        upstream: tokio::sync::Mutex::new(upstream),
        registration,
        tunnel: std::sync::Mutex::new(None),
        handshake_started: std::sync::Mutex::new(None),
    })
}

/// Tells HTTP/2 from HTTP/1.x by the preface (when HTTP/2 is on) and serves HTTP/2 to its end;
/// an HTTP/1.x connection is returned, split, for the server. `None`: nothing more to serve.
pub(super) async fn start_serving<S>(
    mut stream: S,
    connection: &Arc<ClientConnection>,
    shutdown: &watch::Receiver<bool>,
) -> Option<Http1>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let mut first = BytesMut::new();
    if connection.gateway.http2 {
        let timeouts = connection.live.timeouts;
        let wait = timeouts.idle.max(timeouts.header_read);
        match tokio::time::timeout(wait, sniff_http2(&mut stream)).await {
            Ok(Ok(Sniffed::Http2(read))) => {
                // Boxed, so that the much larger HTTP/2 state does not size this future.
                let io = PrefixedIo::new(read.freeze(), stream);
                Box::pin(serve_http2(io, Arc::clone(connection), shutdown.clone())).await;
                return None;
            }
            Ok(Ok(Sniffed::Http1(read))) => first = read,
            Ok(Ok(Sniffed::Closed)) | Err(_) => return None,
            Ok(Err(e)) => {
                tracing::debug!(conn = %connection.conn, error = %e, "client connection ended with an error");
                return None;
            }
        }
    }
    Some(split_http1(stream, first))
}

/// An HTTP/1.x connection split for the server; `first`: the bytes read from it so far.
fn split_http1<S>(stream: S, first: BytesMut) -> Http1
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (read, write) = tokio::io::split(stream);
    Http1 {
        reader: Reader::new(ReadIo::Boxed(Box::new(read)), first),
        writer: WriteIo::Boxed(Box::new(write)),
    }
}

/// A plain TCP connection split for the server: the stream's own halves, and the bytes read past
/// a PROXY header (if any) as the reader's first bytes.
fn split_tcp(io: PrefixedIo<tokio::net::TcpStream>) -> Http1 {
    let (prefix, stream) = io.into_parts();
    let (read, write) = stream.into_split();
    Http1 {
        reader: Reader::new(ReadIo::Tcp(read), BytesMut::from(prefix)),
        writer: WriteIo::tcp(write),
    }
}

/// After the HTTP/1.x server, when the connection became a tunnel (WebSocket): it lives until
/// either side closes it, or until the gateway stops.
async fn run_tunnel(mut tunnel: tokio::task::JoinHandle<()>, shutdown: &mut watch::Receiver<bool>) {
    tokio::select! {
        _ = &mut tunnel => {}
        _ = shutdown.changed() => tunnel.abort(),
    }
}

/// What a connection that may speak HTTP/2 starts with.
enum Sniffed {
    /// The HTTP/2 preface: the bytes read so far.
    Http2(BytesMut),
    /// Anything else: HTTP/1.x, the bytes read so far.
    Http1(BytesMut),
    Closed,
}

/// Reads until the first bytes tell the HTTP/2 preface from an HTTP/1.x request.
async fn sniff_http2<S: tokio::io::AsyncRead + Unpin>(stream: &mut S) -> std::io::Result<Sniffed> {
    let mut read = BytesMut::new();
    loop {
        let n = if read.is_empty() {
            // The stack, not the heap, while the client says nothing.
            read = first_bytes(stream).await?;
            read.len()
        } else {
            read.reserve(H2_PREFACE.len());
            stream.read_buf(&mut read).await?
        };
        if n == 0 {
            return Ok(Sniffed::Closed);
        }
        let seen = read.len().min(H2_PREFACE.len());
        if read[..seen] != H2_PREFACE[..seen] {
            return Ok(Sniffed::Http1(read));
        }
        if seen == H2_PREFACE.len() {
            return Ok(Sniffed::Http2(read));
        }
    }
}

/// HTTP/2 from a client, served by hyper; NTLM requests are answered `HTTP_1_1_REQUIRED`.
async fn serve_http2<S>(
    io: PrefixedIo<S>,
    connection: Arc<ClientConnection>,
    mut shutdown: watch::Receiver<bool>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = {
        let connection = Arc::clone(&connection);
        service_fn(move |req| {
            let connection = Arc::clone(&connection);
            async move { handle(req, &connection).await }
        })
    };
    let conn = http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    let result = tokio::select! {
        result = conn.as_mut() => result,
        _ = shutdown.changed() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(conn = %connection.conn, error = %error_chain(&e), "client connection ended with an error");
    }
}

/// Counts and logs the answer the HTTP/1.x server gave by itself to a request head it could not
/// take (400, 414, 431), which never reached `forward`.
pub(super) fn record_automatic_response(
    connection: &ClientConnection,
    status: StatusCode,
    error: &(dyn std::error::Error + 'static),
) {
    let gateway = &connection.gateway;
    ErrorSource::Client.count(&gateway.metrics, false);
    gateway
        .metrics
        .request("-", status.as_u16(), std::time::Duration::ZERO);
    tracing::info!(conn = %connection.conn, status = status.as_u16(), error = %error_chain(error), "unparsable request head");
    if connection.live.access_log {
        AccessRecord::without_request(
            Some(connection.conn.hash()),
            connection.client,
            status.as_u16(),
        )
        .emit(0);
    }
}

/// Counts a connection against the limit while it lives.
pub(super) struct OpenSlot(pub(super) Arc<Gateway>);

impl Drop for OpenSlot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}
