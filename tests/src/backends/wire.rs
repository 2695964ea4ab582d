//! A recording backend that keeps every request's body and the bytes each upstream connection
//! carried, so a test can check what went over the wire, not only what a parser made of it.

use std::{
    convert::Infallible,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderMap, Response};
use http_body_util::{BodyExt, Full};
use hyper::{server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};

use super::{Listening, Shared};
use crate::{
    netns::NetNs,
    raw::{Leftover, Message, ambiguities, parse_messages},
    wait::{eventually_within, scaled},
};

/// One request as the backend's HTTP parser saw it, with its whole body.
#[derive(Debug, Clone)]
pub struct WireRequest {
    /// The upstream TCP connection's peer (the gateway's side).
    pub peer: SocketAddr,
    pub method: String,
    pub target: String,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
    /// The body could not be read to its end (the upstream connection broke mid-body).
    pub body_error: Option<String>,
}

impl WireRequest {
    pub fn all(&self, name: &str) -> Vec<String> {
        super::header_values(&self.headers, name)
    }

    /// The one `Jespa-Connection-Id` (panics when there is not exactly one).
    pub fn id(&self) -> String {
        let ids = self.all("jespa-connection-id");
        assert_eq!(ids.len(), 1, "exactly one id header: {self:?}");
        ids[0].clone()
    }
}

/// A recording backend that keeps each request's body and the raw bytes of each upstream connection.
pub struct WireBackend {
    pub addr: SocketAddr,
    requests: Shared<Vec<WireRequest>>,
    wires: Shared<Vec<(SocketAddr, Shared<Vec<u8>>)>>,
    _listening: Listening,
}

impl WireBackend {
    pub fn start(ns: &NetNs, addr: SocketAddr) -> WireBackend {
        let requests: Shared<Vec<WireRequest>> = Arc::default();
        let wires: Shared<Vec<(SocketAddr, Shared<Vec<u8>>)>> = Arc::default();
        let listening = {
            let requests = Arc::clone(&requests);
            let wires = Arc::clone(&wires);
            Listening::start(ns, addr, move |stream, peer| {
                let log: Shared<Vec<u8>> = Arc::default();
                wires.lock().expect("wires").push((peer, Arc::clone(&log)));
                let requests = Arc::clone(&requests);
                async move {
                    let service = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let requests = Arc::clone(&requests);
                        async move {
                            let (parts, body) = req.into_parts();
                            let (body, body_error) = match body.collect().await {
                                Ok(b) => (b.to_bytes().to_vec(), None),
                                Err(e) => (Vec::new(), Some(e.to_string())),
                            };
                            requests.lock().expect("requests").push(WireRequest {
                                peer,
                                method: parts.method.to_string(),
                                target: parts.uri.to_string(),
                                headers: parts.headers,
                                body,
                                body_error,
                            });
                            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(
                                b"ok\n",
                            ))))
                        }
                    });
                    let tap = Tap { inner: stream, log };
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(tap), service)
                        .await;
                }
            })
        };
        WireBackend {
            addr,
            requests,
            wires,
            _listening: listening,
        }
    }

    pub fn requests(&self) -> Vec<WireRequest> {
        self.requests.lock().expect("requests").clone()
    }

    /// The bytes each upstream connection carried so far, by the gateway-side peer.
    pub fn wires(&self) -> Vec<(SocketAddr, Vec<u8>)> {
        self.wires
            .lock()
            .expect("wires")
            .iter()
            .map(|(p, l)| (*p, l.lock().expect("wire").clone()))
            .collect()
    }

    /// Every request on every upstream connection, parsed from the raw bytes; panics on bytes that
    /// do not frame as HTTP/1.1 or on a request a recipient could read two ways.
    pub fn wire_requests(&self) -> Vec<Message> {
        let mut all = Vec::new();
        for (peer, bytes) in self.wires() {
            let (msgs, leftover) = parse_messages(&bytes, false, false);
            assert!(
                !matches!(leftover, Leftover::Garbage(_)),
                "upstream connection from {peer} carried bytes that do not frame: {leftover:?} in {:?}",
                String::from_utf8_lossy(&bytes)
            );
            for m in &msgs {
                let found = ambiguities(m);
                assert!(
                    found.is_empty(),
                    "forwarded ambiguously on {peer}: {found:?} in {:?}",
                    String::from_utf8_lossy(&m.head)
                );
            }
            all.extend(msgs);
        }
        all
    }

    /// Waits until `check` holds on the recorded requests (10 s at most, times the harness's time
    /// scale), returning them.
    pub fn wait_for(&self, what: &str, check: impl Fn(&[WireRequest]) -> bool) -> Vec<WireRequest> {
        eventually_within(
            what,
            scaled(Duration::from_secs(10)),
            || self.requests(),
            |requests| check(requests),
        )
    }
}

/// A stream that records what it reads.
struct Tap {
    inner: TcpStream,
    log: Shared<Vec<u8>>,
}

impl AsyncRead for Tap {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            let new = buf.filled()[before..].to_vec();
            self.log.lock().expect("wire").extend_from_slice(&new);
        }
        polled
    }
}

impl AsyncWrite for Tap {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
