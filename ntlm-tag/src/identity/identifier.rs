//! The one call the proxy makes for an accepted connection: [`Identifier::accept`]. It reads the
//! socket cookie and the kernel's record on the accept path, then, in the connection's own task,
//! waits out the accept/sock_ops race, checks and reads a PROXY header, and renders the id.

use std::{future::Future, io, net::SocketAddr, pin::Pin, sync::Arc, time::Duration};

use bytes::Bytes;
use tokio::net::TcpStream;

use super::{
    ConnectionIdentity, IdTemplate, IdentitySource, UidGenerator, canonical,
    proxy_header::{self, ProxyHeaderError},
    trust::TrustedSources,
};
use crate::{
    kernel::{KernelTracker, is_closed, socket_cookie},
    metrics::{Metrics, ProxyRejection},
};

/// A listener that takes the client from PROXY headers, as the connection was accepted under it.
pub struct ProxyProtocol<'a> {
    /// The balancers whose headers are believed (a reload changes them for new connections only).
    pub trusted: &'a TrustedSources,
    /// How long a balancer may take to send the header.
    pub header_timeout: Duration,
}

/// An identified connection: who the client is, its id, and the stream to serve.
pub struct Identified {
    pub identity: ConnectionIdentity,
    /// The connection id (`<client-ip>:<port>/<uid>` by default), rendered once.
    pub id: String,
    pub stream: TcpStream,
    /// Bytes read past the PROXY header: the start of the client's first request.
    pub prefix: Bytes,
}

/// The rest of an identification, run in the connection's task; `None` when the connection was
/// closed instead (logged and counted).
pub type Identifying = Pin<Box<dyn Future<Output = Option<Identified>> + Send>>;

/// Resolves connection identities and renders their ids.
pub struct Identifier {
    kernel: Option<Arc<KernelTracker>>,
    uids: UidGenerator,
    template: IdTemplate,
    metrics: Arc<Metrics>,
}

/// What the PROXY-header step decided, on the accept path (the trust list is a snapshot).
enum ProxyStep {
    None,
    Untrusted,
    Read(Duration),
}

impl Identifier {
    pub fn new(
        kernel: Option<Arc<KernelTracker>>,
        uids: UidGenerator,
        template: IdTemplate,
        metrics: Arc<Metrics>,
    ) -> Self {
        Identifier {
            kernel,
            uids,
            template,
            metrics,
        }
    }

    /// The instance nonce every uid of this run begins with.
    pub fn uid_nonce(&self) -> &str {
        self.uids.nonce()
    }

    /// Identifies an accepted connection. The kernel record is looked up now (it is there
    /// already); the returned future does the rest (settling, a PROXY header) so that a slow peer
    /// never holds up the accept loop. `listener` names the listener in log lines.
    pub fn accept(
        self: &Arc<Self>,
        stream: TcpStream,
        peer: SocketAddr,
        proxy: Option<ProxyProtocol<'_>>,
        listener: Arc<str>,
    ) -> io::Result<Identifying> {
        // Without eBPF nothing is looked up by the cookie: asking for it would only cost a
        // system call per connection.
        let cookie = match self.kernel {
            Some(_) => socket_cookie(&stream).ok(),
            None => None,
        };
        let identity = self.identify(cookie, peer, &stream)?;
        let step = match proxy {
            None => ProxyStep::None,
            Some(p) if p.trusted.contains(identity.peer.ip()) => ProxyStep::Read(p.header_timeout),
            Some(_) => ProxyStep::Untrusted,
        };
        let identifier = Arc::clone(self);
        Ok(Box::pin(async move {
            identifier.finish(stream, identity, step, &listener).await
        }))
    }

    async fn finish(
        &self,
        mut stream: TcpStream,
        mut identity: ConnectionIdentity,
        step: ProxyStep,
        listener: &str,
    ) -> Option<Identified> {
        let closed = || is_closed(&stream).unwrap_or(false);
        if self.settle(&mut identity, closed).await == Settled::ClosedByClient {
            // Reset before the gateway looked: its record is gone, and no reply could reach it.
            self.metrics.closed_before_identified();
            tracing::debug!(peer = %identity.peer, "connection reset by the client before it was identified; closing it");
            return None;
        }
        let peer = identity.peer;
        let mut prefix = Bytes::new();
        match step {
            ProxyStep::None => {}
            ProxyStep::Untrusted => {
                self.metrics.proxy_rejected(ProxyRejection::Untrusted);
                tracing::warn!(
                    %peer,
                    listener = %listener,
                    "closing a connection on a PROXY-protocol listener from a peer outside trusted_lbs \
                     (add its prefix with --trusted-lb if it is your balancer)"
                );
                return None;
            }
            ProxyStep::Read(timeout) => match proxy_header::read(&mut stream, timeout).await {
                Ok((header, rest)) => {
                    identity.apply_proxy_header(&header);
                    prefix = rest;
                }
                Err(e) => {
                    self.metrics.proxy_rejected(rejection(&e));
                    tracing::warn!(%peer, listener = %listener, error = %e, "closing a connection whose PROXY header was not acceptable");
                    return None;
                }
            },
        }
        let uid = self.uids.next_uid();
        let id = self
            .template
            .render(identity.client, &uid, identity.proxy_tlvs.as_deref());
        Some(Identified {
            identity,
            id,
            stream,
            prefix,
        })
    }

    /// The first look: the kernel's record for `cookie`, or the peer address.
    fn identify(
        &self,
        cookie: Option<u64>,
        peer: SocketAddr,
        stream: &TcpStream,
    ) -> io::Result<ConnectionIdentity> {
        if let (Some(kernel), Some(cookie)) = (&self.kernel, cookie) {
            match kernel.lookup(cookie) {
                Some(record) if canonical(record.peer) == canonical(peer) => {
                    return Ok(ConnectionIdentity::from_record(record, cookie));
                }
                Some(record) => {
                    // Never trust a record that disagrees with the socket: fall back, and say so.
                    tracing::warn!(
                        cookie,
                        record_peer = %record.peer,
                        %peer,
                        "kernel record does not match the accepted socket; using the peer address"
                    );
                }
                // Not there (yet): see `settle`.
                None => {}
            }
        }
        // Only the fallback asks the socket for its local address (a getsockname per
        // connection): the kernel's record carries it.
        Ok(ConnectionIdentity::from_peer(
            peer,
            stream.local_addr()?,
            cookie,
        ))
    }

    /// The kernel adds the child socket to the accept queue a moment before the sock_ops
    /// PASSIVE_ESTABLISHED callback records it (on another CPU, accept() can win that race). A
    /// connection identified from its peer while the kernel tracks connections gets a few short
    /// retries before it is counted as a miss and keeps the fallback identity.
    ///
    /// `closed` tells whether the socket is already closed (`TCP_CLOSE`): a client that reset its
    /// connection before the gateway looked has had its record deleted, and never gets one. Such
    /// a connection is not a miss; the caller closes it unserved (nothing can be sent on it).
    async fn settle(
        &self,
        identity: &mut ConnectionIdentity,
        closed: impl Fn() -> bool,
    ) -> Settled {
        let (Some(kernel), Some(cookie)) = (&self.kernel, identity.cookie) else {
            return Settled::Identified;
        };
        if identity.source == IdentitySource::Kernel {
            return Settled::Identified;
        }
        for wait_us in [0, 50, 200, 1_000, 5_000, 20_000] {
            if closed() {
                return Settled::ClosedByClient;
            }
            if wait_us == 0 {
                tokio::task::yield_now().await;
            } else {
                tokio::time::sleep(std::time::Duration::from_micros(wait_us)).await;
            }
            if let Some(record) = kernel.lookup(cookie)
                && canonical(record.peer) == identity.peer
            {
                *identity = ConnectionIdentity::from_record(record, cookie);
                return Settled::Identified;
            }
        }
        if closed() {
            return Settled::ClosedByClient;
        }
        kernel.note_lookup_miss(cookie, identity.peer);
        Settled::Fallback
    }
}

fn rejection(e: &ProxyHeaderError) -> ProxyRejection {
    match e {
        ProxyHeaderError::NotProxy(_) | ProxyHeaderError::Malformed(_) => ProxyRejection::Malformed,
        ProxyHeaderError::Oversized(_) => ProxyRejection::Oversized,
        ProxyHeaderError::Unsupported(_) => ProxyRejection::Unsupported,
        ProxyHeaderError::Timeout(_) => ProxyRejection::Timeout,
        ProxyHeaderError::Closed | ProxyHeaderError::Io(_) => ProxyRejection::Closed,
    }
}

/// How [`Identifier::settle`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Settled {
    /// Identified (from the kernel record, or there is nothing the kernel could add).
    Identified,
    /// No kernel record: the fallback identity stays and the miss was counted.
    Fallback,
    /// The client closed (reset) the connection before its record was found.
    ClosedByClient,
}
