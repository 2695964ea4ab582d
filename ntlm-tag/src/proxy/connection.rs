//! One client connection, from accept to close: registration, TLS, and the HTTP server with
//! its head clock.

use std::{
    error::Error as StdError,
    sync::{Arc, atomic::Ordering},
};

use tokio_rustls::TlsAcceptor;

use http::StatusCode;
use hyper::{server::conn::http1, service::service_fn};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
};
use tokio::sync::watch;

use super::{
    ClientConnection, Gateway, ListenerConfig, Live,
    access_log::AccessRecord,
    forward::handle,
    io::{
        head_clock::{ClockedIo, HeadClock},
        prefixed::PrefixedIo,
    },
    rewrite::{ClientScheme, ConnectionStamp},
};
use crate::{
    error::{ErrorSource, error_chain},
    identity::{ConnName, Identified, Identifying},
};

/// One client connection, from accept to close. This future lives as long as the connection, so
/// it only holds small things: the set-up and the serving run in boxed futures of their own (a task
/// is as large as its largest state; memory per idle connection).
pub(super) async fn handle_connection(
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

/// TLS termination, then HTTP. The identity of a TLS connection is that of its TCP connection:
/// already resolved.
pub(super) async fn serve_tls(
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

pub(super) fn open_connection(
    gateway: &Arc<Gateway>,
    live: &Arc<Live>,
    identity: crate::identity::ConnectionIdentity,
    id: String,
    listener: &Arc<str>,
    scheme: ClientScheme,
) -> Result<ClientConnection, Box<dyn StdError + Send + Sync>> {
    let full_id: Option<Box<str>> = gateway.id_display.full(&id).map(Into::into);
    let stamp = ConnectionStamp::new(id, identity.client, scheme)?;
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
        full_id.as_deref().map(str::to_string),
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
        stamp,
        upstream: tokio::sync::Mutex::new(upstream),
        registration,
        tunnel: std::sync::Mutex::new(None),
        handshake_started: std::sync::Mutex::new(None),
    })
}

pub(super) async fn serve_connection<S>(
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
                    Some(connection.conn.hash()),
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
pub(super) fn automatic_response(e: &hyper::Error) -> Option<StatusCode> {
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

/// Counts a connection against the limit while it lives.
pub(super) struct OpenSlot(pub(super) Arc<Gateway>);

impl Drop for OpenSlot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}
