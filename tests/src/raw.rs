//! Raw HTTP/1.1 for hostile-input and fault tests: a client that sends exactly the bytes it is
//! given and parses what comes back, and the parser the wire backend
//! ([`crate::backends::wire`]) checks upstream bytes with.

use std::{
    io,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

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
        let stream = crate::client::connect(Some(SocketAddr::new(src, 0)), dst, false).await;
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
