//! A response on the wire: the head (status line, headers, `date:` as hyper adds it) and the body
//! by its framing (RFC 9112 §6.3): `Content-Length`, chunked, or delimited by closing the
//! connection (an HTTP/1.0 client, or a length not known and chunked not allowed). Responses to
//! HEAD, `1xx`, `204` and `304` (and a `2xx` to CONNECT) have no body.
//!
//! The framing headers of the response as forwarded are replaced by the framing the gateway
//! writes, so the client reads exactly the bytes sent.
#![forbid(unsafe_code)]

use std::{future::poll_fn, task::Poll};

use bytes::{Buf, Bytes};
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Version, header, response};
use hyper::body::Body;
use thiserror::Error;
use tokio::io::{AsyncWrite, AsyncWriteExt};

use super::{date, framing, head::has_token};
use crate::http1::passed::PassedFields;

/// What the response to a request must know of the request and the connection.
#[derive(Debug, Clone, Copy)]
pub struct Exchange<'a> {
    pub method: &'a Method,
    pub version: Version,
    /// The connection may carry another request after this response.
    pub keep_alive: bool,
}

/// How the body is delimited on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// Exactly this many bytes (0: no body at all).
    Length(u64),
    Chunked,
    /// Until the connection closes.
    CloseDelimited,
}

/// An encoded head: the body's framing and what the connection does afterwards.
#[derive(Debug)]
pub struct Encoded {
    pub encoding: Encoding,
    /// The connection carries another request after this response.
    pub keep_alive: bool,
    /// Trailer fields declared by `Trailer:` (only those are sent, after a chunked body).
    trailers: Vec<HeaderName>,
    /// The response may have a body (not HEAD, 1xx, 204, 304, 2xx to CONNECT): when it may not,
    /// whatever body it was given is dropped unsent, as hyper does.
    body_allowed: bool,
}

/// What is known of the body's length before it is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyLength {
    Empty,
    Known(u64),
    Unknown,
}

impl BodyLength {
    pub fn of<B: Body>(body: &B) -> Self {
        if body.is_end_stream() {
            BodyLength::Empty
        } else {
            body.size_hint()
                .exact()
                .map_or(BodyLength::Unknown, BodyLength::Known)
        }
    }
}

#[derive(Debug, Error)]
pub enum WriteError {
    #[error("writing to the client: {0}")]
    Io(#[from] std::io::Error),
    #[error("the response body failed: {0}")]
    Body(Box<dyn std::error::Error + Send + Sync>),
    #[error("the response body is longer than its Content-Length")]
    TooLong,
    #[error("the response body ended before its Content-Length")]
    TooShort,
}

/// Writes the head of `parts` into `out`, with the backend's `passed` fields after the map's.
pub fn encode_head(
    parts: &response::Parts,
    passed: Option<&PassedFields>,
    length: BodyLength,
    exchange: Exchange<'_>,
    out: &mut Vec<u8>,
) -> Encoded {
    let status = parts.status;
    let head = *exchange.method == Method::HEAD;
    let connect_ok = *exchange.method == Method::CONNECT && status.is_success();
    let no_length_fields = status.is_informational()
        || connect_ok
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let can_have_body = !head && !no_length_fields;
    let http10 = exchange.version == Version::HTTP_10;
    let headers = &parts.headers;
    let FramingFields {
        transfer_encoding,
        content_length,
        declared_trailers,
        connection,
        has_date,
    } = FramingFields::of(headers);

    let mut framing_field: Option<(&'static str, FieldValue)> = None;
    let chunked_allowed = !http10 && can_have_body;
    let encoding = if status == StatusCode::SWITCHING_PROTOCOLS || connect_ok {
        Encoding::Length(0)
    } else if !transfer_encoding.is_empty() && chunked_allowed {
        let mut codings: Vec<u8> = Vec::new();
        for (i, v) in transfer_encoding.iter().enumerate() {
            if i > 0 {
                codings.extend_from_slice(b", ");
            }
            codings.extend_from_slice(v.as_bytes());
        }
        if !transfer_encoding
            .last()
            .is_some_and(framing::last_coding_is_chunked)
        {
            codings.extend_from_slice(b", chunked");
        }
        framing_field = Some(("transfer-encoding", FieldValue::Bytes(codings.into())));
        Encoding::Chunked
    } else {
        let declared = content_length
            .as_ref()
            .and_then(|v| framing::decimal(v.as_bytes()));
        match (length, declared) {
            (BodyLength::Empty, Some(_)) if head => {
                // The length of what a GET would get.
                framing_field = content_length.as_ref().map(|v| {
                    (
                        "content-length",
                        FieldValue::Bytes(Bytes::copy_from_slice(v.as_bytes())),
                    )
                });
                Encoding::Length(0)
            }
            (BodyLength::Known(n), _) | (BodyLength::Unknown, Some(n)) if !no_length_fields => {
                framing_field = Some(("content-length", FieldValue::Decimal(n)));
                Encoding::Length(n)
            }
            (BodyLength::Unknown, _) if chunked_allowed => {
                framing_field = Some((
                    "transfer-encoding",
                    FieldValue::Bytes(Bytes::from_static(b"chunked")),
                ));
                Encoding::Chunked
            }
            (BodyLength::Unknown, _) if can_have_body => Encoding::CloseDelimited,
            _ => {
                if !no_length_fields && !head {
                    framing_field = Some(("content-length", FieldValue::Decimal(0)));
                }
                Encoding::Length(0)
            }
        }
    };
    let encoding = if can_have_body {
        encoding
    } else {
        Encoding::Length(0)
    };

    // What the connection does afterwards: the client's wish, the response's, the framing's.
    let response_closes = connection.iter().any(|v| has_token(v, "close"));
    let keep_alive = exchange.keep_alive
        && !response_closes
        && encoding != Encoding::CloseDelimited
        && status != StatusCode::SWITCHING_PROTOCOLS;
    let mut connection = connection;
    if status != StatusCode::SWITCHING_PROTOCOLS {
        let says_keep_alive = connection.iter().any(|v| has_token(v, "keep-alive"));
        if http10 && keep_alive && !says_keep_alive {
            connection.push(HeaderValue::from_static("keep-alive"));
        } else if !http10 && !keep_alive && !response_closes {
            connection.push(HeaderValue::from_static("close"));
        }
    }

    out.extend_from_slice(if http10 { b"HTTP/1.0 " } else { b"HTTP/1.1 " });
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("<none>").as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in headers.iter() {
        if Rewritten::of(name).is_none() {
            field(out, name.as_str(), value.as_bytes());
        }
    }
    if let Some(passed) = passed {
        out.extend_from_slice(passed.lines());
    }
    joined(out, "connection", &connection);
    let mut trailers = Vec::new();
    if encoding == Encoding::Chunked && !declared_trailers.is_empty() {
        joined(out, "trailer", &declared_trailers);
        trailers = declared_trailers
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
            .collect();
    }
    match framing_field {
        Some((name, FieldValue::Bytes(value))) => field(out, name, &value),
        Some((name, FieldValue::Decimal(n))) => {
            field(out, name, itoa::Buffer::new().format(n).as_bytes());
        }
        None => {}
    }
    if !has_date && !passed.is_some_and(PassedFields::has_date) {
        out.extend_from_slice(b"date: ");
        date::extend(out);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    Encoded {
        encoding,
        keep_alive,
        trailers,
        body_allowed: can_have_body,
    }
}

/// The value of a framing field the gateway writes: a length is written as digits straight into
/// the head (no string is allocated for it on every response).
enum FieldValue {
    Bytes(Bytes),
    Decimal(u64),
}

/// The fields of a response head that the gateway writes anew for the client's hop (framing,
/// `Connection`, `Trailer`), read in one pass over the fields: a lookup per name cost more than
/// reading a usual response's handful of fields.
struct FramingFields {
    /// Every `Transfer-Encoding` line, in order.
    transfer_encoding: Vec<HeaderValue>,
    /// The first `Content-Length` line (the backend's response was checked for agreeing ones).
    content_length: Option<HeaderValue>,
    declared_trailers: Vec<HeaderValue>,
    connection: Vec<HeaderValue>,
    has_date: bool,
}

impl FramingFields {
    fn of(headers: &HeaderMap) -> Self {
        let mut fields = FramingFields {
            transfer_encoding: Vec::new(),
            content_length: None,
            declared_trailers: Vec::new(),
            connection: Vec::new(),
            has_date: false,
        };
        for (name, value) in headers {
            match Rewritten::of(name) {
                Some(Rewritten::TransferEncoding) => fields.transfer_encoding.push(value.clone()),
                Some(Rewritten::ContentLength) => {
                    fields.content_length.get_or_insert_with(|| value.clone());
                }
                Some(Rewritten::Trailer) => fields.declared_trailers.push(value.clone()),
                Some(Rewritten::Connection) => fields.connection.push(value.clone()),
                None => fields.has_date |= *name == header::DATE,
            }
        }
        fields
    }
}

/// The fields written anew for the client's hop, not copied as they came.
#[derive(Clone, Copy)]
enum Rewritten {
    TransferEncoding,
    ContentLength,
    Trailer,
    Connection,
}

impl Rewritten {
    fn of(name: &HeaderName) -> Option<Self> {
        if *name == header::TRANSFER_ENCODING {
            Some(Rewritten::TransferEncoding)
        } else if *name == header::CONTENT_LENGTH {
            Some(Rewritten::ContentLength)
        } else if *name == header::TRAILER {
            Some(Rewritten::Trailer)
        } else if *name == header::CONNECTION {
            Some(Rewritten::Connection)
        } else {
            None
        }
    }
}

fn field(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

fn joined(out: &mut Vec<u8>, name: &str, values: &[HeaderValue]) {
    if values.is_empty() {
        return;
    }
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    for (i, v) in values.iter().enumerate() {
        if i > 0 {
            out.extend_from_slice(b", ");
        }
        out.extend_from_slice(v.as_bytes());
    }
    out.extend_from_slice(b"\r\n");
}

/// Data up to this size is copied behind what is waiting to be written (one write); larger data
/// is written on its own.
const COALESCE: usize = 16 * 1024;

/// Writes `out` (the head) and then the body by `encoded`'s framing; the body bytes sent.
pub async fn write_body<B, W>(
    mut body: B,
    encoded: &Encoded,
    out: &mut Vec<u8>,
    io: &mut W,
) -> Result<u64, WriteError>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    W: AsyncWrite + Unpin + ?Sized,
{
    let mut left = match encoded.encoding {
        Encoding::Length(n) => Some(n),
        _ => None,
    };
    let mut sent = 0u64;
    if !encoded.body_allowed || (encoded.encoding == Encoding::Length(0) && body.is_end_stream()) {
        drop(body);
        flush(out, io).await?;
        return Ok(0);
    }
    loop {
        // Whatever is ready is coalesced; before waiting for more, what is pending goes out.
        let ready = poll_fn(|cx| {
            Poll::Ready(match std::pin::Pin::new(&mut body).poll_frame(cx) {
                Poll::Ready(frame) => Some(frame),
                Poll::Pending => None,
            })
        })
        .await;
        let frame = match ready {
            Some(frame) => frame,
            None => {
                flush(out, io).await?;
                poll_fn(|cx| std::pin::Pin::new(&mut body).poll_frame(cx)).await
            }
        };
        let frame = match frame {
            None => break,
            Some(Ok(frame)) => frame,
            Some(Err(e)) => return Err(WriteError::Body(e.into())),
        };
        let frame = match frame.into_data() {
            Ok(mut data) => {
                if data.is_empty() {
                    continue;
                }
                if let Some(left) = &mut left {
                    let n = data.len() as u64;
                    if n > *left {
                        return Err(WriteError::TooLong);
                    }
                    *left -= n;
                }
                sent += data.len() as u64;
                if encoded.encoding == Encoding::Chunked {
                    out.extend_from_slice(format!("{:X}\r\n", data.len()).as_bytes());
                }
                if out.len() + data.len() <= COALESCE {
                    out.extend_from_slice(&data);
                } else {
                    flush(out, io).await?;
                    while data.has_remaining() {
                        let n = io.write(&data).await?;
                        if n == 0 {
                            return Err(std::io::Error::from(std::io::ErrorKind::WriteZero).into());
                        }
                        data.advance(n);
                    }
                }
                if encoded.encoding == Encoding::Chunked {
                    out.extend_from_slice(b"\r\n");
                }
                continue;
            }
            Err(frame) => frame,
        };
        if let (Ok(trailers), Encoding::Chunked) = (frame.into_trailers(), encoded.encoding) {
            out.extend_from_slice(b"0\r\n");
            for (name, value) in trailers.iter() {
                if encoded.trailers.contains(name) {
                    field(out, name.as_str(), value.as_bytes());
                }
            }
            out.extend_from_slice(b"\r\n");
            flush(out, io).await?;
            return Ok(sent);
        }
    }
    match (encoded.encoding, left) {
        (_, Some(left)) if left > 0 => return Err(WriteError::TooShort),
        (Encoding::Chunked, _) => out.extend_from_slice(b"0\r\n\r\n"),
        _ => {}
    }
    flush(out, io).await?;
    Ok(sent)
}

/// Writes out what is waiting and empties `out`.
async fn flush<W: AsyncWrite + Unpin + ?Sized>(
    out: &mut Vec<u8>,
    io: &mut W,
) -> std::io::Result<()> {
    if !out.is_empty() {
        io.write_all(out).await?;
        out.clear();
    }
    io.flush().await
}

#[cfg(test)]
mod tests {
    use http::Response;
    use http_body_util::Full;

    use super::*;

    fn encode(
        response: Response<()>,
        length: BodyLength,
        method: &Method,
        version: Version,
        keep_alive: bool,
    ) -> (String, Encoded) {
        let (parts, ()) = response.into_parts();
        let mut out = Vec::new();
        let encoded = encode_head(
            &parts,
            None,
            length,
            Exchange {
                method,
                version,
                keep_alive,
            },
            &mut out,
        );
        (String::from_utf8(out).expect("ascii"), encoded)
    }

    fn response(status: u16, headers: &[(&str, &str)]) -> Response<()> {
        let mut r = Response::new(());
        *r.status_mut() = StatusCode::from_u16(status).expect("status");
        for (k, v) in headers {
            r.headers_mut().append(
                HeaderName::from_bytes(k.as_bytes()).expect("name"),
                HeaderValue::from_str(v).expect("value"),
            );
        }
        r
    }

    /// The head without its date line.
    fn dateless(head: &str) -> String {
        head.lines()
            .filter(|l| !l.starts_with("date: "))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// A backend's passed fields are written as they came, after the map's; its `Date` is the
    /// only one.
    #[test]
    fn passed_fields_are_written_as_they_came() {
        let (parts, ()) = response(200, &[("www-authenticate", "Negotiate abc")]).into_parts();
        let mut passed = PassedFields::default();
        passed.push(b"Server", b"nginx");
        passed.push(b"Date", b"Wed, 02 Dec 2026 13:00:00 GMT");
        passed.note_date();
        let mut out = Vec::new();
        let exchange = Exchange {
            method: &Method::GET,
            version: Version::HTTP_11,
            keep_alive: true,
        };
        encode_head(
            &parts,
            Some(&passed),
            BodyLength::Known(2),
            exchange,
            &mut out,
        );
        assert_eq!(
            String::from_utf8(out).expect("ascii"),
            "HTTP/1.1 200 OK\r\nwww-authenticate: Negotiate abc\r\nServer: nginx\r\n\
             Date: Wed, 02 Dec 2026 13:00:00 GMT\r\ncontent-length: 2\r\n\r\n"
        );
    }

    #[test]
    fn heads_carry_the_framing_the_body_gets_and_a_date() {
        let get = Method::GET;
        let (head, e) = encode(
            response(200, &[("x-a", "1")]),
            BodyLength::Known(5),
            &get,
            Version::HTTP_11,
            true,
        );
        assert!(
            head.contains("\r\ndate: ") && head.ends_with("\r\n\r\n"),
            "{head}"
        );
        assert_eq!(
            dateless(&head),
            "HTTP/1.1 200 OK\nx-a: 1\ncontent-length: 5\n"
        );
        assert_eq!((e.encoding, e.keep_alive), (Encoding::Length(5), true));

        let (head, e) = encode(
            response(200, &[]),
            BodyLength::Unknown,
            &get,
            Version::HTTP_11,
            true,
        );
        assert_eq!(
            dateless(&head),
            "HTTP/1.1 200 OK\ntransfer-encoding: chunked\n"
        );
        assert_eq!(e.encoding, Encoding::Chunked);

        // HTTP/1.0: no chunked; an unknown length ends with the connection.
        let (head, e) = encode(
            response(200, &[]),
            BodyLength::Unknown,
            &get,
            Version::HTTP_10,
            true,
        );
        assert_eq!(dateless(&head), "HTTP/1.0 200 OK\n");
        assert_eq!(
            (e.encoding, e.keep_alive),
            (Encoding::CloseDelimited, false)
        );
        let (head, e) = encode(
            response(200, &[]),
            BodyLength::Known(2),
            &get,
            Version::HTTP_10,
            true,
        );
        assert_eq!(
            dateless(&head),
            "HTTP/1.0 200 OK\nconnection: keep-alive\ncontent-length: 2\n"
        );
        assert!(e.keep_alive);

        // An empty body: Content-Length 0, except where a response has no length fields.
        let (head, _) = encode(
            response(401, &[]),
            BodyLength::Empty,
            &get,
            Version::HTTP_11,
            true,
        );
        assert_eq!(
            dateless(&head),
            "HTTP/1.1 401 Unauthorized\ncontent-length: 0\n"
        );
        for status in [204, 304] {
            let (head, e) = encode(
                response(status, &[("content-length", "7")]),
                BodyLength::Empty,
                &get,
                Version::HTTP_11,
                true,
            );
            assert!(!head.contains("content-length"), "{head}");
            assert_eq!(e.encoding, Encoding::Length(0));
        }
        // HEAD: the length of what GET would get, no body.
        let (head, e) = encode(
            response(200, &[("content-length", "1234")]),
            BodyLength::Empty,
            &Method::HEAD,
            Version::HTTP_11,
            true,
        );
        assert_eq!(dateless(&head), "HTTP/1.1 200 OK\ncontent-length: 1234\n");
        assert_eq!(e.encoding, Encoding::Length(0));
    }

    #[test]
    fn closing_is_said_and_kept() {
        let get = Method::GET;
        let (head, e) = encode(
            response(200, &[]),
            BodyLength::Known(1),
            &get,
            Version::HTTP_11,
            false,
        );
        assert_eq!(
            dateless(&head),
            "HTTP/1.1 200 OK\nconnection: close\ncontent-length: 1\n"
        );
        assert!(!e.keep_alive);
        let (head, e) = encode(
            response(502, &[("connection", "close")]),
            BodyLength::Known(1),
            &get,
            Version::HTTP_11,
            true,
        );
        assert_eq!(
            dateless(&head),
            "HTTP/1.1 502 Bad Gateway\nconnection: close\ncontent-length: 1\n"
        );
        assert!(!e.keep_alive);
        let (head, e) = encode(
            response(101, &[("connection", "upgrade"), ("upgrade", "websocket")]),
            BodyLength::Empty,
            &get,
            Version::HTTP_11,
            true,
        );
        assert_eq!(
            dateless(&head),
            "HTTP/1.1 101 Switching Protocols\nupgrade: websocket\nconnection: upgrade\n"
        );
        assert!(!e.keep_alive);
    }

    async fn written<B>(body: B, encoded: &Encoded) -> (Result<u64, WriteError>, Vec<u8>)
    where
        B: Body<Data = Bytes> + Unpin,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let mut wire = Vec::new();
        let mut out = b"HEAD\r\n".to_vec();
        let r = write_body(body, encoded, &mut out, &mut wire).await;
        (r, wire)
    }

    fn encoded(encoding: Encoding, trailers: &[&str]) -> Encoded {
        Encoded {
            encoding,
            keep_alive: true,
            body_allowed: true,
            trailers: trailers
                .iter()
                .map(|t| HeaderName::from_bytes(t.as_bytes()).expect("name"))
                .collect(),
        }
    }

    #[tokio::test]
    async fn bodies_are_written_by_their_framing() {
        let (r, wire) = written(
            Full::new(Bytes::from("hello")),
            &encoded(Encoding::Length(5), &[]),
        )
        .await;
        assert_eq!(r.expect("written"), 5);
        assert_eq!(wire, b"HEAD\r\nhello");

        let frames = Frames(
            [
                hyper::body::Frame::data(Bytes::from("hello")),
                hyper::body::Frame::data(Bytes::from(" world!")),
            ]
            .into(),
        );
        let (r, wire) = written(frames, &encoded(Encoding::Chunked, &[])).await;
        assert_eq!(r.expect("written"), 12);
        assert_eq!(wire, b"HEAD\r\n5\r\nhello\r\n7\r\n world!\r\n0\r\n\r\n");

        let mut trailers = HeaderMap::new();
        trailers.insert("x-sum", HeaderValue::from_static("1"));
        trailers.insert("x-secret", HeaderValue::from_static("2"));
        let frames = Frames(
            [
                hyper::body::Frame::data(Bytes::from("a")),
                hyper::body::Frame::trailers(trailers),
            ]
            .into(),
        );
        let (r, wire) = written(frames, &encoded(Encoding::Chunked, &["x-sum"])).await;
        assert_eq!(r.expect("written"), 1);
        assert_eq!(wire, b"HEAD\r\n1\r\na\r\n0\r\nx-sum: 1\r\n\r\n");
    }

    #[tokio::test]
    async fn a_response_that_may_have_no_body_gets_its_head_only() {
        let (parts, ()) = response(502, &[]).into_parts();
        let mut out = Vec::new();
        let exchange = Exchange {
            method: &Method::HEAD,
            version: Version::HTTP_11,
            keep_alive: true,
        };
        let body = Full::new(Bytes::from("Bad Gateway\n"));
        let encoded = encode_head(&parts, None, BodyLength::of(&body), exchange, &mut out);
        assert!(encoded.keep_alive);
        let head = out.clone();
        let mut wire = Vec::new();
        let sent = write_body(body, &encoded, &mut out, &mut wire).await;
        assert_eq!(sent.expect("written"), 0);
        assert_eq!(wire, head, "the head alone");
        let head = String::from_utf8(head).expect("ascii");
        assert!(head.contains("content-length: 12\r\n"), "{head}");
    }

    #[tokio::test]
    async fn a_body_that_does_not_match_its_length_is_an_error() {
        let (r, _) = written(
            Full::new(Bytes::from("hello")),
            &encoded(Encoding::Length(4), &[]),
        )
        .await;
        assert!(matches!(r, Err(WriteError::TooLong)));
        let (r, _) = written(
            Full::new(Bytes::from("hello")),
            &encoded(Encoding::Length(6), &[]),
        )
        .await;
        assert!(matches!(r, Err(WriteError::TooShort)));
    }

    /// A body that yields the given frames, each when polled.
    struct Frames(std::collections::VecDeque<hyper::body::Frame<Bytes>>);

    impl Body for Frames {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
            Poll::Ready(self.0.pop_front().map(Ok))
        }
    }
}
