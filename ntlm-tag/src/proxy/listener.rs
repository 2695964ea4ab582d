//! Accepting clients: one task per listener, the connection limit, and the hand-over drain.

use std::{
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
};

use http::StatusCode;
use tokio::{net::TcpListener, sync::watch};
use tokio_util::task::TaskTracker;

use super::ListenerConfig;
use super::{
    Gateway, Live,
    accept_errors::AcceptErrors,
    access_log::AccessRecord,
    connection::{OpenSlot, handle_connection},
};
use crate::{error::ErrorSource, identity::ProxyProtocol};

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
    accept_without_delay(&listener, &listen_addr);
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
    let mut errors = AcceptErrors::new(listen_addr.to_string());
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.changed() => return 0,
            _ = hand_over.changed() => break,
        };
        match accepted {
            Ok((stream, peer)) => {
                errors.accepted();
                admit(stream, peer);
            }
            Err(e) => {
                // Out of descriptors (or memory): established connections go on in their own
                // tasks; new ones wait in the kernel's queue until the pause ends.
                let pause = errors.failed(&e, gateway.open.load(Ordering::Relaxed));
                if !pause.is_zero() {
                    tokio::select! {
                        () = tokio::time::sleep(pause) => {}
                        _ = shutdown.changed() => return 0,
                        _ = hand_over.changed() => break,
                    }
                }
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

/// Turns Nagle's algorithm off for the connections `listener` accepts. Linux copies a listener's
/// TCP_NODELAY into every connection it accepts, so it is set once here instead of a setsockopt
/// per connection. (After a hand-over from a version that did not set it, connections already
/// queued go without it: Nagle may then delay their small writes.)
fn accept_without_delay(listener: &TcpListener, listen_addr: &str) {
    if let Err(e) = socket2::SockRef::from(listener).set_tcp_nodelay(true) {
        tracing::warn!(listener = %listen_addr, error = %e, "cannot set TCP_NODELAY on the listener; small responses may be delayed (Nagle)");
    }
}

/// One accepted connection: counted against the limit, identified, and served in a task of its own.
pub(super) fn admit(
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
pub(super) fn refuse_over_limit(
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn accepted_connections_have_nagle_off() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        accept_without_delay(&listener, "test");
        let addr = listener.local_addr().expect("addr");
        let _client = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let (accepted, _) = listener.accept().await.expect("accept");
        assert!(accepted.nodelay().expect("TCP_NODELAY"));
    }
}
