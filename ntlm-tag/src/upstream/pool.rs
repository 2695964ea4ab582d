//! The shared keep-alive connections (anonymous requests in bind mode, all requests in tag mode).
//! Each backend keeps a stack of idle HTTP/1.1 connections: an exchange takes the most recently used
//! one (or opens one), and hands it back once the backend's response has been read to the end *and*
//! the client's request body has been sent to its end. Connections unused for
//! `upstream_idle_secs`, or closed by the backend, are dropped. hyper's own client connections,
//! without a general-purpose pool's per-request task and hashing.
#![forbid(unsafe_code)]

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use hyper::client::conn::http1::SendRequest;
use tokio::sync::OwnedSemaphorePermit;

use super::{Backend, ClientBody, ClientBodyState};

/// A backend's idle connections, most recently used last.
#[derive(Default)]
pub struct IdleConnections {
    list: Mutex<Vec<Idle>>,
}

struct Idle {
    sender: SendRequest<ClientBody>,
    since: Instant,
}

impl std::fmt::Debug for IdleConnections {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdleConnections")
            .field("len", &self.len())
            .finish()
    }
}

impl IdleConnections {
    /// The most recently used connection that is still open and not idle for `max_idle`.
    pub fn take(&self, max_idle: Duration) -> Option<SendRequest<ClientBody>> {
        let mut list = self.list.lock().ok()?;
        while let Some(idle) = list.pop() {
            if !idle.sender.is_closed() && idle.since.elapsed() < max_idle {
                return Some(idle.sender);
            }
        }
        None
    }

    fn put(&self, sender: SendRequest<ClientBody>) {
        if sender.is_closed() {
            return;
        }
        if let Ok(mut list) = self.list.lock() {
            list.push(Idle {
                sender,
                since: Instant::now(),
            });
        }
    }

    /// Drops (and so closes) connections unused for `max_idle` and those the backend closed.
    pub fn sweep(&self, max_idle: Duration) {
        if let Ok(mut list) = self.list.lock() {
            list.retain(|idle| !idle.sender.is_closed() && idle.since.elapsed() < max_idle);
        }
    }

    pub fn len(&self) -> usize {
        self.list.lock().map(|l| l.len()).unwrap_or(0)
    }
}

/// A shared connection on loan to one exchange. Given back when the response has been read to the
/// end and the request body sent; dropped otherwise, which closes it (a half-read response or a
/// half-sent body must never meet the next request).
pub struct Loan {
    sender: SendRequest<ClientBody>,
    backend: Arc<Backend>,
    /// The request body this exchange sends.
    request: ClientBodyState,
    /// The backend's connection permit (`max_upstream_per_backend`), held while the connection is busy.
    permit: Option<OwnedSemaphorePermit>,
}

impl Loan {
    pub fn new(
        sender: SendRequest<ClientBody>,
        backend: &Arc<Backend>,
        request: ClientBodyState,
        permit: Option<OwnedSemaphorePermit>,
    ) -> Self {
        Loan {
            sender,
            backend: Arc::clone(backend),
            request,
            permit,
        }
    }

    /// The response has been read to its end: back to the pool once the request body is sent too.
    pub fn response_done(self) {
        let request = self.request.clone();
        request.give_back_when_sent(self);
    }

    /// Both directions are done: the connection is idle.
    pub(super) fn give_back(self) {
        self.backend.idle.put(self.sender);
        drop(self.permit);
    }

    /// The connection leaves the pool for good (bound to one client connection).
    pub fn into_sender(self) -> SendRequest<ClientBody> {
        self.sender
    }
}
