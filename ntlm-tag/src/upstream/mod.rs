//! Backends and the shared upstream connection pool.
//!
//! In `tag` mode upstream keep-alive connections are shared by all client connections: that is safe
//! only because every request carries its own connection id. Each client connection is assigned one
//! backend for its whole life (NTLM state lives in one backend process).
#![forbid(unsafe_code)]

use std::sync::{
    Arc,
    atomic::{AtomicUsize, Ordering},
};

use http::{Uri, uri::Authority};
use hyper::body::Incoming;
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::{TokioExecutor, TokioTimer},
};

use crate::config::Timeouts;

/// One backend and the number of client connections currently assigned to it.
#[derive(Debug)]
pub struct Backend {
    authority: Authority,
    active: AtomicUsize,
}

impl Backend {
    pub fn authority(&self) -> &Authority {
        &self.authority
    }

    /// The upstream URI for a client request's path and query.
    pub fn uri_for(&self, client_uri: &Uri) -> Result<Uri, http::Error> {
        let path = client_uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        Uri::builder()
            .scheme("http")
            .authority(self.authority.clone())
            .path_and_query(path)
            .build()
    }
}

/// Keeps a backend's count of assigned connections while a client connection lives.
#[derive(Debug)]
pub struct Assignment {
    backend: Arc<Backend>,
}

impl Assignment {
    pub fn backend(&self) -> &Arc<Backend> {
        &self.backend
    }
}

impl Drop for Assignment {
    fn drop(&mut self) {
        self.backend.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The backends and the pooled HTTP/1.1 client.
pub struct Upstream {
    backends: Vec<Arc<Backend>>,
    next: AtomicUsize,
    client: Client<HttpConnector, Incoming>,
}

impl Upstream {
    pub fn new(backends: &[Authority], timeouts: &Timeouts) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(timeouts.upstream_connect));
        connector.enforce_http(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(timeouts.upstream_idle)
            .http1_preserve_header_case(false)
            .build(connector);
        Upstream {
            backends: backends
                .iter()
                .map(|a| {
                    Arc::new(Backend {
                        authority: a.clone(),
                        active: AtomicUsize::new(0),
                    })
                })
                .collect(),
            next: AtomicUsize::new(0),
            client,
        }
    }

    pub fn client(&self) -> &Client<HttpConnector, Incoming> {
        &self.client
    }

    /// Assigns a backend to a new client connection: the one with the fewest active connections,
    /// ties broken round-robin so an idle gateway still spreads load.
    pub fn assign(&self) -> Assignment {
        let n = self.backends.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed) % n.max(1);
        let backend = (0..n)
            .map(|i| &self.backends[(start + i) % n])
            .min_by_key(|b| b.active.load(Ordering::Relaxed))
            .cloned()
            .unwrap_or_else(|| Arc::clone(&self.backends[0]));
        backend.active.fetch_add(1, Ordering::Relaxed);
        Assignment { backend }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upstream(n: usize) -> Upstream {
        let backends: Vec<Authority> = (0..n)
            .map(|i| format!("10.0.0.{i}:80").parse().expect("authority"))
            .collect();
        Upstream::new(&backends, &Timeouts::default())
    }

    #[tokio::test]
    async fn assignments_spread_by_least_connections() {
        let up = upstream(2);
        let a = up.assign();
        let b = up.assign();
        assert_ne!(a.backend().authority(), b.backend().authority());
        drop(a);
        let c = up.assign();
        let d = up.assign();
        // c takes the freed backend; d ties and goes round-robin.
        assert_ne!(c.backend().authority(), b.backend().authority());
        assert!(d.backend().active.load(Ordering::Relaxed) >= 1);
    }

    #[test]
    fn upstream_uri_keeps_path_and_query() {
        let b = Backend {
            authority: "10.0.0.1:8080".parse().expect("authority"),
            active: AtomicUsize::new(0),
        };
        let uri = b.uri_for(&"/a/b?c=d".parse().expect("uri")).expect("valid");
        assert_eq!(uri, "http://10.0.0.1:8080/a/b?c=d");
        let uri = b.uri_for(&"*".parse().expect("uri")).expect("valid");
        assert_eq!(uri.path(), "*");
    }
}
