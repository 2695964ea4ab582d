//! A raw-TCP backend that misbehaves on cue (resets mid-response, never answers, answers before
//! the body, …), recording what each upstream connection carried and who closed it.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use super::{Listening, Shared};
use crate::{netns::NetNs, raw::find, wait::eventually_within};

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
    /// Answers `200` with both `Content-Length` and `Transfer-Encoding: chunked` (readers that
    /// disagree on which one delimits the body split responses apart: response smuggling), and
    /// keeps the connection open.
    AnswerLengthAndChunked,
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
    _listening: Listening,
}

impl ScriptedBackend {
    pub fn start(ns: &NetNs, addr: SocketAddr, script: Script) -> ScriptedBackend {
        let conns: Shared<Vec<ConnLog>> = Arc::default();
        let listening = {
            let conns = Arc::clone(&conns);
            Listening::start(ns, addr, move |stream, peer| {
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
                scripted(stream, script, Arc::clone(&conns), index)
            })
        };
        ScriptedBackend {
            addr,
            conns,
            _listening: listening,
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
        eventually_within(what, timeout, || self.connections(), |conns| check(conns))
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
            Script::AnswerLengthAndChunked => {
                let _ = stream
                    .write_all(
                        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
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
