//! A request head: parsed with `httparse` by the rules of hyper's HTTP/1 server (the same
//! accept/reject decisions, statuses and header values), and bounded by the configured head size.
//!
//! Header values are slices of the received bytes (no copy), as in hyper.
#![forbid(unsafe_code)]

use std::mem::MaybeUninit;

use bytes::BytesMut;
use http::{HeaderMap, HeaderName, Method, Request, StatusCode, Uri, Version, header};
use thiserror::Error;

use super::framing::{Framing, FramingError, FramingRules, Keep};
use crate::http1::{ConnectionTokens, fields::FieldPositions};

/// Header fields a head may have (hyper's default; more is answered 431), and the token test.
pub use crate::http1::{MAX_HEADERS, has_token};
/// Longest request target (hyper's; longer is answered 414).
pub const MAX_URI_LEN: usize = (u16::MAX - 1) as usize;
/// Header fields the gateway may add to a request's map on its way upstream (`Host` when the
/// client sent none; `Connection` and `Upgrade` restored on an upgrade). The stamped fields are
/// not among them: they are written after the map's fields.
const ADDED_FIELDS: usize = 2;
/// What an HTTP/2 connection starts with.
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// A complete request head, and what it means for its connection.
#[derive(Debug)]
pub struct RequestHead {
    pub request: Request<()>,
    pub framing: Framing,
    /// The client may send another request on this connection afterwards.
    pub keep_alive: bool,
    /// `Expect: 100-continue` on an HTTP/1.1 request.
    pub expect_continue: bool,
}

/// A head the gateway refuses; the connection closes after the answer.
#[derive(Debug, Error)]
pub enum HeadError {
    #[error("request head over {limit} bytes, or over {MAX_HEADERS} header fields")]
    TooLarge { limit: usize },
    #[error("request target over {MAX_URI_LEN} bytes")]
    UriTooLong,
    #[error("malformed request head: {0}")]
    Malformed(&'static str),
    #[error("request framing: {0}")]
    Framing(#[from] FramingError),
    #[error("an HTTP/2 connection preface")]
    Http2Preface,
}

impl HeadError {
    /// The answer, as hyper's server gives it; `None`: close without one.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            HeadError::TooLarge { .. }
            | HeadError::Framing(FramingError::ContentLengthTooLarge) => {
                Some(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE)
            }
            HeadError::UriTooLong => Some(StatusCode::URI_TOO_LONG),
            HeadError::Malformed(_) | HeadError::Framing(_) => Some(StatusCode::BAD_REQUEST),
            HeadError::Http2Preface => None,
        }
    }
}

/// Takes a complete head off the front of `buf`: `Ok(None)` while it is incomplete (and under
/// `max_head_bytes`, request line and headers together).
pub fn parse(buf: &mut BytesMut, max_head_bytes: usize) -> Result<Option<RequestHead>, HeadError> {
    if buf.starts_with(&H2_PREFACE[..14]) {
        return Err(HeadError::Http2Preface);
    }
    // The parser's header array is not zeroed first: at the 100 fields a head may have, that
    // cost more than parsing a usual head.
    let mut fields = FieldPositions::new();
    let (len, method, target, http11) = {
        let mut headers = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut []);
        let parsed = httparse::ParserConfig::default().parse_request_with_uninit_headers(
            &mut req,
            buf,
            &mut headers,
        );
        let len = match parsed {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) if buf.len() >= max_head_bytes => {
                return Err(HeadError::TooLarge {
                    limit: max_head_bytes,
                });
            }
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(e) => return Err(from_httparse(e, &req, max_head_bytes)),
        };
        if len > max_head_bytes {
            return Err(HeadError::TooLarge {
                limit: max_head_bytes,
            });
        }
        let (Some(method), Some(path), Some(version)) = (req.method, req.path, req.version) else {
            return Err(HeadError::Malformed("incomplete request line"));
        };
        if path.len() > MAX_URI_LEN {
            return Err(HeadError::UriTooLong);
        }
        let method =
            Method::from_bytes(method.as_bytes()).map_err(|_| HeadError::Malformed("method"))?;
        let base = buf.as_ptr() as usize;
        let at = |s: &[u8]| {
            let start = s.as_ptr() as usize - base;
            (start, start + s.len())
        };
        fields.record(buf, req.headers);
        (len, method, at(path.as_bytes()), version == 1)
    };
    let count = fields.len();
    let head = buf.split_to(len).freeze();
    let uri = Uri::from_maybe_shared(head.slice(target.0..target.1))
        .map_err(|_| HeadError::Malformed("request target"))?;
    // Room for what the gateway may add: growing the map to take it would rehash it.
    let mut headers = HeaderMap::with_capacity(count + ADDED_FIELDS);
    let mut rules = FramingRules::new(http11);
    let mut keep_alive = http11;
    let mut saw_close = false;
    let mut expect_continue = false;
    for field in fields.as_slice() {
        let name = HeaderName::from_bytes(&head[field.name()])
            .map_err(|_| HeadError::Malformed("header name"))?;
        let value = field.header_value(&head);
        let keep = match name {
            header::TRANSFER_ENCODING => rules.transfer_encoding(&value)?,
            header::CONTENT_LENGTH => rules.content_length(&value)?,
            header::CONNECTION => {
                let tokens = ConnectionTokens::of(&value);
                // Once a line asks to close, a later keep-alive does not undo it.
                if saw_close || tokens.close {
                    saw_close = true;
                    keep_alive = false;
                } else if !keep_alive {
                    keep_alive = tokens.keep_alive;
                }
                // Read here, and removed on the way upstream (hop-by-hop) unless it names another
                // header to remove with it, or asks to switch protocols.
                if tokens.only_close_or_keep_alive {
                    Keep::No
                } else {
                    Keep::Yes
                }
            }
            header::EXPECT => {
                expect_continue = value.as_bytes().eq_ignore_ascii_case(b"100-continue");
                Keep::Yes
            }
            _ => Keep::Yes,
        };
        match keep {
            Keep::Yes => {
                headers.append(name, value);
            }
            Keep::No => {}
            Keep::ReplacingContentLength => {
                headers.remove(header::CONTENT_LENGTH);
                headers.append(name, value);
            }
        }
    }
    let (framing, close_after) = rules.finish()?;
    let mut request = Request::new(());
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.version_mut() = if http11 {
        Version::HTTP_11
    } else {
        Version::HTTP_10
    };
    *request.headers_mut() = headers;
    Ok(Some(RequestHead {
        request,
        framing,
        keep_alive: keep_alive && !close_after,
        expect_continue: expect_continue && http11,
    }))
}

fn from_httparse(e: httparse::Error, req: &httparse::Request<'_, '_>, limit: usize) -> HeadError {
    match e {
        httparse::Error::TooManyHeaders => HeadError::TooLarge { limit },
        httparse::Error::Token if req.method.is_none() => HeadError::Malformed("method"),
        httparse::Error::Token => HeadError::Malformed("request target"),
        httparse::Error::Version => HeadError::Malformed("version"),
        httparse::Error::HeaderName => HeadError::Malformed("header name"),
        httparse::Error::HeaderValue => HeadError::Malformed("header value"),
        httparse::Error::NewLine => HeadError::Malformed("line ending"),
        httparse::Error::Status => HeadError::Malformed("status"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(s: &str) -> Result<Option<RequestHead>, HeadError> {
        let mut buf = BytesMut::from(s.as_bytes());
        parse(&mut buf, 1024)
    }

    #[test]
    fn a_head_is_parsed_and_the_rest_stays_in_the_buffer() {
        let mut buf = BytesMut::from(
            &b"POST /a?b HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabcGET"[..],
        );
        let head = parse(&mut buf, 1024).expect("valid").expect("complete");
        assert_eq!(head.request.method(), Method::POST);
        assert_eq!(head.request.uri(), "/a?b");
        assert_eq!(head.request.headers()["host"], "x");
        assert_eq!(head.framing, Framing::Length(3));
        assert!(head.keep_alive && !head.expect_continue);
        assert_eq!(&buf[..], b"abcGET");
    }

    #[test]
    fn incomplete_heads_wait_and_heads_over_the_limit_are_refused() {
        assert!(
            parse_str("GET / HTTP/1.1\r\nHost: x\r\n")
                .expect("valid")
                .is_none()
        );
        let long = format!("GET / HTTP/1.1\r\nX: {}\r\n", "a".repeat(1100));
        assert!(matches!(parse_str(&long), Err(HeadError::TooLarge { .. })));
        let complete = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(1010));
        assert!(matches!(
            parse_str(&complete),
            Err(HeadError::TooLarge { .. })
        ));
        let many: String = (0..101).map(|i| format!("X-{i}: a\r\n")).collect();
        let mut buf = BytesMut::from(format!("GET / HTTP/1.1\r\n{many}\r\n").as_bytes());
        let e = parse(&mut buf, 1 << 16).expect_err("too many fields");
        assert_eq!(
            e.status(),
            Some(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE)
        );
    }

    #[test]
    fn connection_semantics_follow_the_version() {
        let h = |s: &str| parse_str(s).expect("valid").expect("complete");
        assert!(!h("GET / HTTP/1.0\r\n\r\n").keep_alive);
        assert!(h("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n").keep_alive);
        assert!(!h("GET / HTTP/1.1\r\nConnection: close\r\n\r\n").keep_alive);
        assert!(
            !h("GET / HTTP/1.1\r\nConnection: close\r\nConnection: keep-alive\r\n\r\n").keep_alive
        );
        assert!(h("POST / HTTP/1.1\r\nExpect: 100-Continue\r\n\r\n").expect_continue);
        assert!(!h("POST / HTTP/1.0\r\nExpect: 100-continue\r\n\r\n").expect_continue);
        let te_cl = h("POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert_eq!(te_cl.framing, Framing::Chunked);
        assert!(!te_cl.keep_alive);
        assert!(!te_cl.request.headers().contains_key(header::CONTENT_LENGTH));
    }

    #[test]
    fn malformed_heads_get_400_and_a_preface_nothing() {
        for bad in [
            "GET / HTTP/1.1\r\nX-Note: one\r\n two\r\n\r\n",
            "GET / HTTP/1.1\r\nHost : x\r\n\r\n",
            "G(T / HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.2\r\n\r\n",
            "GET / HTTP/1.1\r\nContent-Length: +5\r\n\r\n",
            "GET / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
        ] {
            let e = parse_str(bad).expect_err(bad);
            assert_eq!(e.status(), Some(StatusCode::BAD_REQUEST), "{bad:?}: {e}");
        }
        let e = parse_str("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").expect_err("preface");
        assert_eq!(e.status(), None);
    }
}
