//! Raw HTTP/1.1 for hostile-input and fault tests: a client that sends exactly the bytes it is
//! given and parses what comes back, a recording backend that keeps every request's body and the
//! bytes each upstream connection carried, and a scripted raw-TCP backend that misbehaves on cue.

use std::{
    convert::Infallible,
    io,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{HeaderMap, Response};
use http_body_util::{BodyExt, Full};
use hyper::{server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf},
    net::{TcpListener, TcpSocket, TcpStream},
    sync::oneshot,
};

use crate::netns::NetNs;

// ---------------------------------------------------------------------------------------------
// Parsing HTTP/1.1 messages from raw bytes (responses for the client, requests for the wire check)

/// One HTTP/1.1 message parsed from raw bytes.
#[derive(Debug, Clone)]
pub struct Message {
    /// The start line (`HTTP/1.1 400 Bad Request`, `POST /x HTTP/1.1`).
    pub start: String,
    /// Header lines as sent (name, value), in order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// The raw head, start line to the empty line, as sent.
    pub head: Vec<u8>,
}

impl Message {
    /// The status code of a response.
    pub fn status(&self) -> u16 {
        self.start
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0)
    }

    /// The request target of a request.
    pub fn target(&self) -> &str {
        self.start.split(' ').nth(1).unwrap_or("")
    }

    /// Values of `name` (case-insensitive).
    pub fn all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

/// What [`parse_messages`] could not make sense of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Leftover {
    /// Nothing: every byte belongs to a complete message.
    None,
    /// An incomplete message (more bytes could complete it).
    Partial(usize),
    /// Bytes that do not frame as HTTP/1.1 (why).
    Garbage(String),
}

/// Parses consecutive HTTP/1.1 messages. `responses`: framing by status (1xx/204/304 carry no
/// body); a response without length runs to the end (complete only if `eof`). Requests without
/// Content-Length or chunked Transfer-Encoding have no body.
pub fn parse_messages(mut buf: &[u8], responses: bool, eof: bool) -> (Vec<Message>, Leftover) {
    let mut out = Vec::new();
    while !buf.is_empty() {
        let Some(head_end) = find(buf, b"\r\n\r\n") else {
            return (out, Leftover::Partial(buf.len()));
        };
        let head = &buf[..head_end + 4];
        let text = String::from_utf8_lossy(&head[..head_end]).into_owned();
        let mut lines = text.split("\r\n");
        let start = lines.next().unwrap_or("").to_string();
        let mut headers = Vec::new();
        for line in lines {
            let Some((n, v)) = line.split_once(':') else {
                return (out, Leftover::Garbage(format!("header line {line:?}")));
            };
            headers.push((n.to_string(), v.trim().to_string()));
        }
        let mut msg = Message {
            start,
            headers,
            body: Vec::new(),
            head: head.to_vec(),
        };
        let rest = &buf[head.len()..];
        let chunked = msg
            .all("transfer-encoding")
            .iter()
            .any(|v| v.to_ascii_lowercase().contains("chunked"));
        let length = msg
            .all("content-length")
            .first()
            .map(|v| v.parse::<usize>());
        let status = msg.status();
        let consumed = if responses && (status / 100 == 1 || status == 204 || status == 304) {
            0
        } else if chunked {
            match dechunk(rest) {
                Ok(Some((body, used))) => {
                    msg.body = body;
                    used
                }
                Ok(None) => return (out, Leftover::Partial(buf.len())),
                Err(e) => return (out, Leftover::Garbage(e)),
            }
        } else if let Some(length) = length {
            let Ok(length) = length else {
                return (out, Leftover::Garbage("bad content-length".into()));
            };
            if rest.len() < length {
                return (out, Leftover::Partial(buf.len()));
            }
            msg.body = rest[..length].to_vec();
            length
        } else if responses {
            if !eof {
                return (out, Leftover::Partial(buf.len()));
            }
            msg.body = rest.to_vec();
            rest.len()
        } else {
            0
        };
        buf = &rest[consumed..];
        out.push(msg);
    }
    (out, Leftover::None)
}

/// A chunked body: `Ok(Some((body, bytes used)))`, `Ok(None)` if incomplete.
fn dechunk(mut rest: &[u8]) -> Result<Option<(Vec<u8>, usize)>, String> {
    let total = rest.len();
    let mut body = Vec::new();
    loop {
        let Some(eol) = find(rest, b"\r\n") else {
            return Ok(None);
        };
        let line = String::from_utf8_lossy(&rest[..eol]);
        let size_text = line.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_text, 16)
            .map_err(|_| format!("chunk size {size_text:?}"))?;
        rest = &rest[eol + 2..];
        if size == 0 {
            // Trailers, then the empty line.
            loop {
                let Some(eol) = find(rest, b"\r\n") else {
                    return Ok(None);
                };
                rest = &rest[eol + 2..];
                if eol == 0 {
                    return Ok(Some((body, total - rest.len())));
                }
            }
        }
        if rest.len() < size + 2 {
            return Ok(None);
        }
        body.extend_from_slice(&rest[..size]);
        if &rest[size..size + 2] != b"\r\n" {
            return Err("chunk not followed by CRLF".into());
        }
        rest = &rest[size + 2..];
    }
}

pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Problems a recipient could read two ways, in the head of a message as sent on the wire.
/// Empty when the message is unambiguous.
pub fn ambiguities(m: &Message) -> Vec<String> {
    let mut found = Vec::new();
    let te = m.all("transfer-encoding");
    let cl = m.all("content-length");
    if !te.is_empty() && !cl.is_empty() {
        found.push(format!(
            "Content-Length {cl:?} with Transfer-Encoding {te:?}"
        ));
    }
    if cl.len() > 1 {
        found.push(format!("{} Content-Length fields {cl:?}", cl.len()));
    }
    if te.len() > 1 || te.iter().any(|v| !v.eq_ignore_ascii_case("chunked")) {
        found.push(format!("Transfer-Encoding {te:?}"));
    }
    let head = String::from_utf8_lossy(&m.head);
    for line in head.split("\r\n").skip(1) {
        if line.starts_with([' ', '\t']) {
            found.push(format!("obs-fold line {line:?}"));
        }
        if line.contains('\n') || line.contains('\r') {
            found.push(format!("bare CR/LF in {line:?}"));
        }
        if let Some((name, _)) = line.split_once(':')
            && name.contains([' ', '\t'])
        {
            found.push(format!("whitespace in header name {name:?}"));
        }
    }
    found
}

// ---------------------------------------------------------------------------------------------
// The raw client

/// How a raw exchange ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The peer closed (FIN).
    Closed,
    /// The peer reset the connection.
    Reset,
    /// Still open when the wait ended.
    Open,
}

/// What came back on a raw connection.
#[derive(Debug, Clone)]
pub struct Reply {
    pub responses: Vec<Message>,
    pub leftover: Leftover,
    pub end: End,
    pub bytes: Vec<u8>,
}

impl Reply {
    pub fn statuses(&self) -> Vec<u16> {
        self.responses.iter().map(Message::status).collect()
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes).into_owned()
    }
}

/// A TCP connection from the client namespace that sends raw bytes.
pub struct RawClient {
    stream: TcpStream,
    pub local: SocketAddr,
    received: Vec<u8>,
    end: End,
}

impl RawClient {
    /// Connects from `src` (port chosen by the kernel) to `dst`.
    pub async fn connect(src: IpAddr, dst: SocketAddr) -> RawClient {
        let socket = if dst.is_ipv4() {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        }
        .expect("socket");
        socket
            .bind(SocketAddr::new(src, 0))
            .unwrap_or_else(|e| panic!("bind {src}: {e}"));
        let stream = tokio::time::timeout(Duration::from_secs(10), socket.connect(dst))
            .await
            .unwrap_or_else(|_| panic!("connect to {dst} timed out"))
            .unwrap_or_else(|e| panic!("connect to {dst}: {e}"));
        stream.set_nodelay(true).expect("nodelay");
        let local = stream.local_addr().expect("local addr");
        RawClient {
            stream,
            local,
            received: Vec::new(),
            end: End::Open,
        }
    }

    /// Writes `bytes`; an error (the gateway already closed) is returned, not a panic.
    pub async fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes).await
    }

    /// Reads until `done(responses so far)` holds, the peer closes or resets, or `timeout` passes.
    pub async fn read_until(
        &mut self,
        timeout: Duration,
        done: impl Fn(&[Message]) -> bool,
    ) -> Reply {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut buf = vec![0u8; 64 * 1024];
        while self.end == End::Open {
            let (responses, _) = parse_messages(&self.received, true, false);
            if done(&responses) {
                break;
            }
            match tokio::time::timeout_at(deadline, self.stream.read(&mut buf)).await {
                Err(_) => break,
                Ok(Ok(0)) => self.end = End::Closed,
                Ok(Ok(n)) => self.received.extend_from_slice(&buf[..n]),
                Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionReset => self.end = End::Reset,
                Ok(Err(e)) => panic!("reading from the gateway: {e}"),
            }
        }
        let (responses, leftover) = parse_messages(&self.received, true, self.end != End::Open);
        Reply {
            responses,
            leftover,
            end: self.end,
            bytes: self.received.clone(),
        }
    }

    /// Reads until `n` responses arrived or the connection ended (10 s at most).
    pub async fn responses(&mut self, n: usize) -> Reply {
        self.read_until(Duration::from_secs(10), |r| r.len() >= n)
            .await
    }

    /// Waits (10 s at most) for the gateway to close the connection, after any responses.
    pub async fn until_closed(&mut self) -> Reply {
        self.read_until(Duration::from_secs(10), |_| false).await
    }

    /// Closes with RST.
    pub fn reset(self) {
        let _ = self.stream.set_zero_linger();
        drop(self.stream);
    }
}

/// One raw exchange: connect from `src`, send `bytes`, read until the gateway closes the
/// connection or `n` responses arrived (10 s at most).
pub async fn exchange(src: IpAddr, dst: SocketAddr, bytes: &[u8], n: usize) -> (SocketAddr, Reply) {
    let mut c = RawClient::connect(src, dst).await;
    // A gateway that rejects early may close before everything was written.
    let _ = c.send(bytes).await;
    let reply = c.responses(n).await;
    (c.local, reply)
}

// ---------------------------------------------------------------------------------------------
// The recording backend

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
        self.headers
            .get_all(name)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect()
    }

    /// The one `Jespa-Connection-Id` (panics when there is not exactly one).
    pub fn id(&self) -> String {
        let ids = self.all("jespa-connection-id");
        assert_eq!(ids.len(), 1, "exactly one id header: {self:?}");
        ids[0].clone()
    }
}

type Shared<T> = Arc<Mutex<T>>;

/// A recording backend that keeps each request's body and the raw bytes of each upstream connection.
pub struct WireBackend {
    pub addr: SocketAddr,
    requests: Shared<Vec<WireRequest>>,
    wires: Shared<Vec<(SocketAddr, Shared<Vec<u8>>)>>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl WireBackend {
    pub fn start(ns: &NetNs, addr: SocketAddr) -> WireBackend {
        let requests: Shared<Vec<WireRequest>> = Arc::default();
        let wires: Shared<Vec<(SocketAddr, Shared<Vec<u8>>)>> = Arc::default();
        let (stop_tx, mut stop_rx) = oneshot::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = {
            let requests = Arc::clone(&requests);
            let wires = Arc::clone(&wires);
            ns.spawn(move || async move {
                let listener = TcpListener::bind(addr)
                    .await
                    .unwrap_or_else(|e| panic!("backend bind {addr}: {e}"));
                let _ = ready_tx.send(());
                loop {
                    let (stream, peer) = tokio::select! {
                        accepted = listener.accept() => match accepted {
                            Ok(pair) => pair,
                            Err(_) => continue,
                        },
                        _ = &mut stop_rx => return,
                    };
                    let log: Shared<Vec<u8>> = Arc::default();
                    wires.lock().expect("wires").push((peer, Arc::clone(&log)));
                    let requests = Arc::clone(&requests);
                    tokio::spawn(async move {
                        let service =
                            service_fn(move |req: http::Request<hyper::body::Incoming>| {
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
                                    Ok::<_, Infallible>(Response::new(Full::new(
                                        Bytes::from_static(b"ok\n"),
                                    )))
                                }
                            });
                        let tap = Tap { inner: stream, log };
                        let _ = http1::Builder::new()
                            .serve_connection(TokioIo::new(tap), service)
                            .await;
                    });
                }
            })
        };
        ready_rx
            .recv()
            .unwrap_or_else(|_| panic!("backend on {addr} failed to start"));
        WireBackend {
            addr,
            requests,
            wires,
            stop: Some(stop_tx),
            thread: Some(thread),
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
        poll_until(
            what,
            crate::gateway::scaled(Duration::from_secs(10)),
            || self.requests(),
            check,
        )
    }
}

impl Drop for WireBackend {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
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

// ---------------------------------------------------------------------------------------------
// The scripted raw-TCP backend

/// What the scripted backend does once a request head has arrived.
#[derive(Debug, Clone, Copy)]
pub enum Script {
    /// Sends a response head promising `promised` body bytes, `sent` of them, then resets (RST).
    ResetMidResponse { promised: usize, sent: usize },
    /// Resets (RST) without answering.
    ResetBeforeResponse,
    /// Never answers; keeps reading (and counting) until the gateway closes.
    NeverAnswer,
    /// Answers `200 ok` as a keep-alive response (no `Connection: close`), then closes the
    /// connection: a backend whose keep-alive timeout fires right after a response.
    AnswerThenClose,
    /// Answers `200` with `Transfer-Encoding: gzip, chunked` (a coding the gateway cannot pass on)
    /// and keeps the connection open.
    AnswerGzipChunked,
    /// Keep-alive, request after request, answering each as soon as its head has arrived, the way
    /// IIS answers an unauthenticated POST: a request with a body gets `401` + `WWW-Authenticate:
    /// NTLM` before any of the body is read (the body is then read and discarded), one without a
    /// body `200 ok`.
    AnswerBeforeBody,
    /// Keep-alive, request after request: `200 ok` with `Persistent-Auth: true`, the header IIS
    /// sends when the connection stays authenticated (e.g. after Kerberos).
    AnswerPersistentAuth,
}

/// One upstream connection as the scripted backend saw it.
#[derive(Debug, Clone)]
pub struct ConnLog {
    pub peer: SocketAddr,
    /// Bytes received.
    pub received: usize,
    /// The first request head (up to its empty line).
    pub head: Vec<u8>,
    /// The gateway closed (FIN) or reset its side.
    pub closed_by_gateway: bool,
    /// This backend closed or reset it (per its script).
    pub closed_by_backend: bool,
    /// Requests answered on it.
    pub answered: usize,
}

/// A raw-TCP backend that misbehaves as scripted, on every connection.
pub struct ScriptedBackend {
    pub addr: SocketAddr,
    conns: Shared<Vec<ConnLog>>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ScriptedBackend {
    pub fn start(ns: &NetNs, addr: SocketAddr, script: Script) -> ScriptedBackend {
        let conns: Shared<Vec<ConnLog>> = Arc::default();
        let (stop_tx, mut stop_rx) = oneshot::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = {
            let conns = Arc::clone(&conns);
            ns.spawn(move || async move {
                let listener = TcpListener::bind(addr)
                    .await
                    .unwrap_or_else(|e| panic!("backend bind {addr}: {e}"));
                let _ = ready_tx.send(());
                loop {
                    let (stream, peer) = tokio::select! {
                        accepted = listener.accept() => match accepted {
                            Ok(pair) => pair,
                            Err(_) => continue,
                        },
                        _ = &mut stop_rx => return,
                    };
                    let index = {
                        let mut c = conns.lock().expect("conns");
                        c.push(ConnLog {
                            peer,
                            received: 0,
                            head: Vec::new(),
                            closed_by_gateway: false,
                            closed_by_backend: false,
                            answered: 0,
                        });
                        c.len() - 1
                    };
                    tokio::spawn(scripted(stream, script, Arc::clone(&conns), index));
                }
            })
        };
        ready_rx
            .recv()
            .unwrap_or_else(|_| panic!("backend on {addr} failed to start"));
        ScriptedBackend {
            addr,
            conns,
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }

    pub fn connections(&self) -> Vec<ConnLog> {
        self.conns.lock().expect("conns").clone()
    }

    /// Waits until `check` holds on the connections (`timeout` at most), returning them.
    pub fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        check: impl Fn(&[ConnLog]) -> bool,
    ) -> Vec<ConnLog> {
        poll_until(what, timeout, || self.connections(), check)
    }
}

impl Drop for ScriptedBackend {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn scripted(mut stream: TcpStream, script: Script, conns: Shared<Vec<ConnLog>>, i: usize) {
    match script {
        Script::AnswerBeforeBody | Script::AnswerPersistentAuth => {
            return answer_each(stream, script, conns, i).await;
        }
        _ => {}
    }
    let mut buf = vec![0u8; 64 * 1024];
    let mut head: Vec<u8> = Vec::new();
    let mut acted = false;
    loop {
        let n = match stream.read(&mut buf).await {
            Ok(0) | Err(_) => {
                conns.lock().expect("conns")[i].closed_by_gateway = true;
                return;
            }
            Ok(n) => n,
        };
        let complete = {
            let mut c = conns.lock().expect("conns");
            c[i].received += n;
            if c[i].head.is_empty() {
                head.extend_from_slice(&buf[..n]);
                if let Some(end) = find(&head, b"\r\n\r\n") {
                    c[i].head = head[..end + 4].to_vec();
                }
            }
            !c[i].head.is_empty()
        };
        if !complete || acted {
            continue;
        }
        acted = true;
        match script {
            Script::ResetMidResponse { promised, sent } => {
                let mut out =
                    format!("HTTP/1.1 200 OK\r\nContent-Length: {promised}\r\n\r\n").into_bytes();
                out.extend(std::iter::repeat_n(b'x', sent));
                let _ = stream.write_all(&out).await;
                let _ = stream.flush().await;
                let _ = stream.set_zero_linger();
                conns.lock().expect("conns")[i].closed_by_backend = true;
                return;
            }
            Script::ResetBeforeResponse => {
                let _ = stream.set_zero_linger();
                conns.lock().expect("conns")[i].closed_by_backend = true;
                return;
            }
            Script::NeverAnswer | Script::AnswerBeforeBody | Script::AnswerPersistentAuth => {}
            Script::AnswerGzipChunked => {
                let _ = stream
                    .write_all(
                        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
                    )
                    .await;
            }
            Script::AnswerThenClose => {
                let _ = stream
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n")
                    .await;
                let _ = stream.shutdown().await;
                conns.lock().expect("conns")[i].closed_by_backend = true;
                return;
            }
        }
    }
}

/// The keep-alive scripts ([`Script::AnswerBeforeBody`], [`Script::AnswerPersistentAuth`]) on one
/// connection: each request is answered as soon as its head has arrived, then its body is read.
async fn answer_each(mut stream: TcpStream, script: Script, conns: Shared<Vec<ConnLog>>, i: usize) {
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    // Reads more into `buf`; false when the gateway closed the connection.
    async fn more(
        stream: &mut TcpStream,
        buf: &mut Vec<u8>,
        chunk: &mut [u8],
        conns: &Shared<Vec<ConnLog>>,
        i: usize,
    ) -> bool {
        match stream.read(chunk).await {
            Ok(0) | Err(_) => {
                conns.lock().expect("conns")[i].closed_by_gateway = true;
                false
            }
            Ok(n) => {
                conns.lock().expect("conns")[i].received += n;
                buf.extend_from_slice(&chunk[..n]);
                true
            }
        }
    }
    loop {
        let head_end = loop {
            if let Some(end) = find(&buf, b"\r\n\r\n") {
                break end + 4;
            }
            if !more(&mut stream, &mut buf, &mut chunk, &conns, i).await {
                return;
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        {
            let mut c = conns.lock().expect("conns");
            if c[i].head.is_empty() {
                c[i].head = buf[..head_end].to_vec();
            }
        }
        buf.drain(..head_end);
        let answer: &[u8] = if let Script::AnswerPersistentAuth = script {
            b"HTTP/1.1 200 OK\r\nPersistent-Auth: true\r\nContent-Length: 3\r\n\r\nok\n"
        } else if length > 0 {
            b"HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: NTLM\r\nContent-Length: 0\r\n\r\n"
        } else {
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n"
        };
        if stream.write_all(answer).await.is_err() {
            return;
        }
        conns.lock().expect("conns")[i].answered += 1;
        while buf.len() < length {
            if !more(&mut stream, &mut buf, &mut chunk, &conns, i).await {
                return;
            }
        }
        buf.drain(..length);
    }
}

/// Reads `state` until `check` holds on it, returning it; panics with the last state after
/// `timeout` (a stuck test, not a speed assertion).
fn poll_until<T: std::fmt::Debug>(
    what: &str,
    timeout: Duration,
    state: impl Fn() -> Vec<T>,
    check: impl Fn(&[T]) -> bool,
) -> Vec<T> {
    let deadline = Instant::now() + timeout;
    loop {
        let current = state();
        if check(&current) {
            return current;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {current:#?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}
