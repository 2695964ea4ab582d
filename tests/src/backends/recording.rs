//! A test backend that records the headers and the TCP peer of every request it receives.

use std::{convert::Infallible, net::SocketAddr, sync::Arc};

use bytes::Bytes;
use http::{HeaderMap, Response};
use http_body_util::{BodyExt, Full};
use hyper::{server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::{Listening, Shared};
use crate::netns::NetNs;

/// One request as the backend saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    /// The upstream TCP connection's peer (the gateway's side).
    pub peer: SocketAddr,
    pub path: String,
    pub headers: HeaderMap,
    pub body_len: usize,
}

impl Seen {
    /// All values of `name` (case-insensitive).
    pub fn all(&self, name: &str) -> Vec<String> {
        super::header_values(&self.headers, name)
    }
}

/// A recording backend running on its own thread inside a namespace.
pub struct Backend {
    pub addr: SocketAddr,
    seen: Shared<Vec<Seen>>,
    _listening: Listening,
}

impl Backend {
    pub fn start(ns: &NetNs, addr: SocketAddr) -> Backend {
        let seen: Shared<Vec<Seen>> = Arc::default();
        let listening = {
            let seen = Arc::clone(&seen);
            Listening::start(ns, addr, move |stream, peer| {
                serve(stream, peer, Arc::clone(&seen))
            })
        };
        Backend {
            addr,
            seen,
            _listening: listening,
        }
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("seen").clone()
    }

    /// Number of distinct upstream TCP connections that carried requests.
    pub fn tcp_connections(&self) -> usize {
        let mut peers: Vec<SocketAddr> = self.seen().iter().map(|s| s.peer).collect();
        peers.sort();
        peers.dedup();
        peers.len()
    }
}

/// Serves one upstream connection: records every request, answers `id=<its connection id>`.
async fn serve(stream: TcpStream, peer: SocketAddr, seen: Shared<Vec<Seen>>) {
    let service = service_fn(move |req: http::Request<hyper::body::Incoming>| {
        let seen = Arc::clone(&seen);
        async move {
            let path = req.uri().to_string();
            let headers = req.headers().clone();
            let body = req.into_body().collect().await.map(|b| b.to_bytes());
            let body_len = body.map(|b| b.len()).unwrap_or(0);
            let id = headers
                .get("jespa-connection-id")
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                .unwrap_or_default();
            seen.lock().expect("seen").push(Seen {
                peer,
                path,
                headers,
                body_len,
            });
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(format!("id={id}\n")))))
        }
    });
    let _ = http1::Builder::new()
        .serve_connection(TokioIo::new(stream), service)
        .await;
}
