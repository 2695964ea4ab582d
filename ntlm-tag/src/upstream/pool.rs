//! The shared keep-alive connections (anonymous requests in bind mode, all requests in tag mode).
//! Each backend keeps a stack of idle HTTP/1.1 connections: an exchange takes the most recently used
//! one (or opens one), and its response body hands it back once the response has been read to the
//! end *and* the client's request body has been sent to its end. Connections unused for
//! `upstream_idle_secs`, or closed by the backend, are dropped.
#![forbid(unsafe_code)]

use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

use super::h1::Connection;

/// A backend's idle connections, most recently used last.
#[derive(Default)]
pub struct IdleConnections {
    list: Mutex<Vec<Idle>>,
}

struct Idle {
    connection: Connection,
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
    pub fn take(&self, max_idle: Duration) -> Option<Connection> {
        let mut list = self.list.lock().ok()?;
        while let Some(mut idle) = list.pop() {
            if idle.since.elapsed() < max_idle && idle.connection.is_reusable() {
                return Some(idle.connection);
            }
        }
        None
    }

    pub(super) fn put(&self, connection: Connection) {
        if let Ok(mut list) = self.list.lock() {
            list.push(Idle {
                connection,
                since: Instant::now(),
            });
        }
    }

    /// Drops (and so closes) connections unused for `max_idle` and those the backend closed.
    pub fn sweep(&self, max_idle: Duration) {
        if let Ok(mut list) = self.list.lock() {
            list.retain_mut(|idle| {
                idle.since.elapsed() < max_idle && idle.connection.is_reusable()
            });
        }
    }

    pub fn len(&self) -> usize {
        self.list.lock().map(|l| l.len()).unwrap_or(0)
    }
}
