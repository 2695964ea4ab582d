//! A request on its way to a backend: the head encoded into one buffer, and the body written by its
//! framing (`Content-Length` or chunked), decided as hyper's client decides it so that backends see
//! the same bytes as before.
#![forbid(unsafe_code)]

use std::{
    io,
    pin::Pin,
    task::{Context, Poll, ready},
};

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method, header, request};
use hyper::body::Body;
use thiserror::Error;
use tokio::io::AsyncWrite;

use crate::http1::framing;
use crate::upstream::{ClientBody, client_body::ClientBodyError};

/// Body data up to this size is copied behind the bytes waiting to be written (one write).
const COALESCE: usize = 16 * 1024;

/// How the request body is delimited upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyFraming {
    /// No body is sent.
    None,
    /// Exactly this many bytes.
    Length(u64),
    /// Chunked, with the trailer fields `Trailer:` declared.
    Chunked(Vec<HeaderName>),
}

/// Writes the request head of `parts` into `out` (origin-form target, HTTP/1.1), with the
/// already encoded field lines `stamped` after the request's own, and says how the body goes. A
/// `Content-Length` the request has is kept; a body of known size gets one; a body of unknown size
/// is chunked on every method but CONNECT (whose bytes after the head are a tunnel's): a client
/// that framed a body on a GET has it forwarded, not dropped (hyper's client sent none there); a
/// body already known to be empty sends nothing.
pub fn encode_head(
    parts: &mut request::Parts,
    body: &ClientBody,
    stamped: &[u8],
    out: &mut Vec<u8>,
) -> BodyFraming {
    let headers = &mut parts.headers;
    let framing = if body.is_end_stream() {
        headers.remove(header::TRANSFER_ENCODING);
        BodyFraming::None
    } else if headers.contains_key(header::TRANSFER_ENCODING) {
        headers.remove(header::CONTENT_LENGTH);
        let chunked_last = headers
            .get_all(header::TRANSFER_ENCODING)
            .iter()
            .next_back()
            .is_some_and(framing::last_coding_is_chunked);
        if !chunked_last {
            headers.append(
                header::TRANSFER_ENCODING,
                HeaderValue::from_static("chunked"),
            );
        }
        BodyFraming::Chunked(declared_trailers(headers))
    } else if let Some(length) = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| framing::decimal(v.as_bytes()))
    {
        BodyFraming::Length(length)
    } else if let Some(length) = body.size_hint().exact() {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
        BodyFraming::Length(length)
    } else if parts.method == Method::CONNECT {
        BodyFraming::None
    } else {
        headers.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        BodyFraming::Chunked(declared_trailers(headers))
    };
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.push(b' ');
    let target = match (parts.uri.path_and_query(), parts.uri.authority()) {
        (_, Some(authority)) if parts.method == Method::CONNECT => authority.as_str(),
        (Some(path), _) => path.as_str(),
        (None, _) => "/",
    };
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in parts.headers.iter() {
        field(out, name.as_str().as_bytes(), value.as_bytes());
    }
    out.extend_from_slice(stamped);
    out.extend_from_slice(b"\r\n");
    framing
}

fn declared_trailers(headers: &http::HeaderMap) -> Vec<HeaderName> {
    headers
        .get_all(header::TRAILER)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect()
}

fn field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Why a request could not be sent whole.
#[derive(Debug, Error)]
pub enum SendError {
    /// The client's side of the body broke (its server's error).
    #[error("reading the client's request body: {0}")]
    Client(#[source] ClientBodyError),
    #[error("writing the request to the backend: {0}")]
    Io(#[from] io::Error),
    #[error("the client's request body does not match its Content-Length")]
    Length,
}

/// The bytes of one request still to go: the head, then the body by its framing.
pub struct Outgoing {
    /// Encoded bytes not yet written, from `offset` on.
    pending: Vec<u8>,
    offset: usize,
    /// The body, until it has been read to its end (or when nothing of it is sent).
    body: Option<ClientBody>,
    framing: BodyFraming,
    /// Body bytes left under a `Content-Length`.
    left: u64,
    /// Bytes the backend's socket has taken: 0 means the request never reached it.
    written: u64,
    /// The written bytes are not yet flushed (TLS buffers them).
    unflushed: bool,
}

impl Outgoing {
    pub fn new(head: Vec<u8>, body: ClientBody, framing: BodyFraming) -> Self {
        let (body, left) = match framing {
            BodyFraming::None => (None, 0),
            BodyFraming::Length(n) => (Some(body), n),
            BodyFraming::Chunked(_) => (Some(body), 0),
        };
        Outgoing {
            pending: head,
            offset: 0,
            body,
            framing,
            left,
            written: 0,
            unflushed: false,
        }
    }

    /// Nothing of the request reached the backend yet (and the body was never read).
    pub fn is_unsent(&self) -> bool {
        self.written == 0
    }

    /// The body back, when nothing was sent: the request can go to another connection.
    pub fn into_body(self) -> Option<ClientBody> {
        self.body
    }

    /// Writes what it can; `Ready(Ok)` once the whole request is written and flushed. The body is
    /// read only once the head has been written, so that a request whose head the connection
    /// refused can go elsewhere untouched.
    pub fn poll_send<W: AsyncWrite + Unpin + ?Sized>(
        &mut self,
        io: &mut W,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(), SendError>> {
        loop {
            if self.written > 0
                && self.pending.len() - self.offset < COALESCE
                && let Some(body) = &mut self.body
                && let Poll::Ready(frame) = Pin::new(body).poll_frame(cx)
            {
                self.take(frame)?;
                continue;
            }
            if self.offset < self.pending.len() {
                let n = ready!(Pin::new(&mut *io).poll_write(cx, &self.pending[self.offset..]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::Error::from(io::ErrorKind::WriteZero).into()));
                }
                self.offset += n;
                self.written += n as u64;
                self.unflushed = true;
                if self.offset == self.pending.len() {
                    self.pending.clear();
                    self.offset = 0;
                }
                continue;
            }
            if self.unflushed {
                ready!(Pin::new(&mut *io).poll_flush(cx))?;
                self.unflushed = false;
            }
            if self.body.is_none() {
                return Poll::Ready(Ok(()));
            }
            if self.written == 0 {
                // Only a head of nothing: cannot happen, but never spin.
                return Poll::Ready(Ok(()));
            }
            // The body has nothing ready: its waker is registered.
            return Poll::Pending;
        }
    }

    /// Encodes one frame of the body (or its end) behind the pending bytes.
    fn take(
        &mut self,
        frame: Option<Result<hyper::body::Frame<Bytes>, ClientBodyError>>,
    ) -> Result<(), SendError> {
        let chunked = matches!(self.framing, BodyFraming::Chunked(_));
        let frame = match frame {
            None => {
                if chunked {
                    self.pending.extend_from_slice(b"0\r\n\r\n");
                } else if self.left != 0 {
                    return Err(SendError::Length);
                }
                self.body = None;
                return Ok(());
            }
            Some(Err(e)) => {
                self.body = None;
                return Err(SendError::Client(e));
            }
            Some(Ok(frame)) => frame,
        };
        match frame.into_data() {
            Ok(data) if data.is_empty() => {}
            Ok(data) => {
                if chunked {
                    self.pending
                        .extend_from_slice(format!("{:X}\r\n", data.len()).as_bytes());
                    self.pending.extend_from_slice(&data);
                    self.pending.extend_from_slice(b"\r\n");
                } else {
                    let n = data.len() as u64;
                    if n > self.left {
                        return Err(SendError::Length);
                    }
                    self.left -= n;
                    self.pending.extend_from_slice(&data);
                }
            }
            Err(frame) => {
                if let (Ok(trailers), BodyFraming::Chunked(declared)) =
                    (frame.into_trailers(), &self.framing)
                {
                    self.pending.extend_from_slice(b"0\r\n");
                    for (name, value) in trailers.iter() {
                        if declared.contains(name) {
                            field(
                                &mut self.pending,
                                name.as_str().as_bytes(),
                                value.as_bytes(),
                            );
                        }
                    }
                    self.pending.extend_from_slice(b"\r\n");
                    // The trailers end the body.
                    self.body = None;
                }
            }
        }
        // A body that says it has ended is not polled again (hyper's rule too).
        if self.body.as_ref().is_some_and(Body::is_end_stream) {
            return self.take(None);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Request;
    use http_body_util::{Empty, Full};
    use hyper::body::{Frame, SizeHint};

    /// A body whose size is not known in advance (a chunked client body).
    struct Unknown;

    impl Body for Unknown {
        type Data = Bytes;
        type Error = std::io::Error;

        fn poll_frame(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
            Poll::Ready(None)
        }

        fn size_hint(&self) -> SizeHint {
            SizeHint::default()
        }
    }

    fn encoded(req: Request<ClientBody>) -> (String, BodyFraming) {
        let (mut parts, body) = req.into_parts();
        let mut out = Vec::new();
        let framing = encode_head(&mut parts, &body, b"", &mut out);
        (String::from_utf8(out).expect("ascii"), framing)
    }

    #[test]
    fn heads_take_hyper_clients_framing() {
        let get = Request::get("/a?b")
            .header("host", "h")
            .body(ClientBody::new(Empty::<Bytes>::new()))
            .expect("request");
        assert_eq!(
            encoded(get),
            (
                "GET /a?b HTTP/1.1\r\nhost: h\r\n\r\n".into(),
                BodyFraming::None
            )
        );
        let post = Request::post("/p")
            .body(ClientBody::new(Full::new(Bytes::from_static(b"abc"))))
            .expect("request");
        assert_eq!(
            encoded(post),
            (
                "POST /p HTTP/1.1\r\ncontent-length: 3\r\n\r\n".into(),
                BodyFraming::Length(3)
            )
        );
        let stream = || ClientBody::new(Unknown);
        let unknown = Request::put("/u").body(stream()).expect("request");
        assert_eq!(
            encoded(unknown),
            (
                "PUT /u HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n".into(),
                BodyFraming::Chunked(Vec::new())
            )
        );
        let get_unknown = Request::get("/g").body(stream()).expect("request");
        assert_eq!(encoded(get_unknown).1, BodyFraming::Chunked(Vec::new()));
        let connect = Request::connect("h:443").body(stream()).expect("request");
        assert_eq!(encoded(connect).1, BodyFraming::None);
    }

    #[test]
    fn stamped_lines_follow_the_requests_own_fields() {
        let (mut parts, body) = Request::post("/p")
            .header("host", "h")
            .body(ClientBody::new(Full::new(Bytes::from_static(b"abc"))))
            .expect("request")
            .into_parts();
        let mut out = Vec::new();
        encode_head(&mut parts, &body, b"x-id: 1\r\n", &mut out);
        assert_eq!(
            String::from_utf8(out).expect("ascii"),
            "POST /p HTTP/1.1\r\nhost: h\r\ncontent-length: 3\r\nx-id: 1\r\n\r\n"
        );
    }
}
