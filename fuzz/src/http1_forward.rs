//! What a backend receives for a client's HTTP/1.x request head: the head parsed by the gateway's
//! server (`proxy::h1::head::parse`), its fields prepared (`rewrite::prepare_request`), and the
//! upstream client's encoding (`upstream::h1::request::encode_head`) with the connection's stamped
//! lines (`ConnectionStamp::lines`): the bytes written to the backend, read back with `httparse`
//! and compared with an oracle built from the client's own lines.
//!
//! Input: `flags`, then the bytes a client sends. `flags` bit 0: `forwarded_headers`; bit 1: an
//! IPv6 client; bit 2: a TLS listener. Heads the gateway refuses or that are incomplete are left
//! to `http1_head`, and a transfer coding other than one `chunked` to its 501; a head asking to
//! switch protocols (`Upgrade`) or with an absolute- or authority-form target is left to the tests
//! (the gateway restores `Upgrade` and rewrites the target on paths this check does not take).
//!
//! Checked:
//! - the forwarded head is one complete HTTP/1.1 request head, nothing before or after it, with
//!   the client's method and target;
//! - every client field passes byte for byte, each name's values in order, except hop-by-hop
//!   fields, fields named by a `Connection` line, fields whose name folds (letters and digits,
//!   lowercased) like the id header or a forwarding header, and the framing fields;
//! - the framing fields say what the client's framing said: a `Content-Length` of the same length,
//!   or `Transfer-Encoding` ending in `chunked` and no `Content-Length`, or no body;
//! - exactly one id field with this connection's id, and the three forwarding fields with this
//!   connection's values when `forwarded_headers` is on, none when off: no client line, however
//!   spelt or split, adds another.
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http::{HeaderName, Method, Version};
use http_body::{Body, Frame, SizeHint};
use ntlm_tag::proxy::{
    h1::{framing::Framing, head},
    rewrite::{
        ClientScheme, ConnectionStamp, StampPolicy, prepare_request, unsupported_transfer_coding,
    },
};
use ntlm_tag::upstream::{ClientBody, h1::request::encode_head};

use crate::header_sanitisation::{FORWARDING, HOP_BY_HOP, fold};

const HEAD_LIMIT: usize = 16 * 1024;
const ID: &str = "198.18.1.10:40000/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";

/// A request body standing in for the server's: only its framing is read before the head goes.
struct Framed(Framing);

impl Body for Framed {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        Poll::Ready(None)
    }

    fn is_end_stream(&self) -> bool {
        self.0 == Framing::Empty
    }

    fn size_hint(&self) -> SizeHint {
        match self.0 {
            Framing::Empty => SizeHint::with_exact(0),
            Framing::Length(n) => SizeHint::with_exact(n),
            Framing::Chunked => SizeHint::default(),
        }
    }
}

/// The client's lines as `httparse` reads them: lower-cased names, raw values.
fn client_lines(raw: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut headers = [httparse::EMPTY_HEADER; 128];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(raw) {
        Ok(httparse::Status::Complete(_)) => req
            .headers
            .iter()
            .map(|h| (h.name.to_ascii_lowercase(), h.value.to_vec()))
            .collect(),
        other => panic!("the gateway took a head httparse does not: {other:?}"),
    }
}

/// Elements of a comma-separated value, trimmed and lower-cased (none for a value that is not text).
fn tokens(value: &[u8]) -> Vec<String> {
    std::str::from_utf8(value)
        .map(|s| {
            s.split(',')
                .map(|t| t.trim().to_ascii_lowercase())
                .collect()
        })
        .unwrap_or_default()
}

/// A `Connection` line of only `close` and `keep-alive`: read by the server, never forwarded,
/// and naming no field.
fn is_spent(value: &[u8]) -> bool {
    tokens(value)
        .iter()
        .all(|t| t.is_empty() || t == "close" || t == "keep-alive")
}

/// Fields by name (stable: each name's values keep their order).
fn by_name(mut fields: Vec<(String, Vec<u8>)>) -> Vec<(String, Vec<u8>)> {
    fields.sort_by(|a, b| a.0.cmp(&b.0));
    fields
}

pub fn check(data: &[u8]) {
    let Some((&flags, raw)) = data.split_first() else {
        return;
    };
    let policy = StampPolicy::new(
        HeaderName::from_static("jespa-connection-id"),
        flags & 1 == 1,
    );
    let client: SocketAddr = if flags & 2 == 2 {
        "[fd00:5418:1::10]:40000".parse().expect("address")
    } else {
        "198.18.1.10:40000".parse().expect("address")
    };
    let scheme = if flags & 4 == 4 {
        ClientScheme::Https
    } else {
        ClientScheme::Http
    };
    let mut buf = BytesMut::from(raw);
    let Ok(Some(parsed)) = head::parse(&mut buf, HEAD_LIMIT) else {
        return;
    };
    let head_len = raw.len() - buf.len();
    let request = parsed.request;
    if request.headers().contains_key(http::header::UPGRADE)
        || unsupported_transfer_coding(request.headers()).is_some()
        || request.uri().scheme().is_some()
        || request.uri().authority().is_some()
    {
        return;
    }
    let stamp = ConnectionStamp::new(ID, client, scheme, &policy).expect("a valid stamp");
    let (mut parts, ()) = request.into_parts();
    let method = parts.method.clone();
    let target = parts.uri.to_string();
    parts.version = Version::HTTP_11;
    prepare_request(&mut parts.headers, &policy);
    let body = ClientBody::new(Framed(parsed.framing));
    let mut out = Vec::new();
    encode_head(&mut parts, &body, stamp.lines(), &mut out);

    // The backend's reading of it.
    let mut headers = [httparse::EMPTY_HEADER; 160];
    let mut forwarded = httparse::Request::new(&mut headers);
    let status = forwarded.parse(&out);
    assert!(
        matches!(status, Ok(httparse::Status::Complete(n)) if n == out.len()),
        "the forwarded head is not one complete head ({status:?}): {:?}",
        String::from_utf8_lossy(&out)
    );
    assert_eq!(forwarded.method, Some(method.as_str()));
    assert_eq!(forwarded.path, Some(target.as_str()));
    assert_eq!(forwarded.version, Some(1), "forwarded as HTTP/1.1");
    let sent: Vec<(String, Vec<u8>)> = forwarded
        .headers
        .iter()
        .map(|h| (h.name.to_ascii_lowercase(), h.value.to_vec()))
        .collect();

    // The oracle, from the client's lines.
    let lines = client_lines(&raw[..head_len]);
    let named: Vec<String> = lines
        .iter()
        .filter(|(n, v)| n == "connection" && !is_spent(v))
        .flat_map(|(_, v)| tokens(v))
        .collect();
    let guarded: Vec<String> = std::iter::once(policy.id_header().as_str())
        .chain(FORWARDING)
        .map(fold)
        .collect();
    let framing_field = |n: &str| n == "content-length" || n == "transfer-encoding";
    let passes = |n: &str| {
        !HOP_BY_HOP.contains(&n)
            && !named.iter().any(|t| t == n)
            && !guarded.contains(&fold(n))
            && !framing_field(n)
    };
    let expected: Vec<(String, Vec<u8>)> =
        lines.iter().filter(|(n, _)| passes(n)).cloned().collect();
    let stamped: Vec<(String, Vec<u8>)> = stamp
        .fields(&policy)
        .map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec()))
        .collect();
    let context = || {
        format!(
            "client head {:?}, forwarded {:?}",
            String::from_utf8_lossy(&raw[..head_len]),
            String::from_utf8_lossy(&out)
        )
    };

    let passed: Vec<(String, Vec<u8>)> = sent.iter().filter(|(n, _)| passes(n)).cloned().collect();
    assert_eq!(
        by_name(passed),
        by_name(expected),
        "client fields: {}",
        context()
    );
    let identity: Vec<(String, Vec<u8>)> = sent
        .iter()
        .filter(|(n, _)| guarded.contains(&fold(n)))
        .cloned()
        .collect();
    assert_eq!(
        by_name(identity),
        by_name(stamped),
        "stamped fields: {}",
        context()
    );
    for (name, _) in &sent {
        assert!(
            passes(name) || guarded.contains(&fold(name)) || framing_field(name),
            "{name} forwarded: {}",
            context()
        );
    }

    let values = |name: &str| -> Vec<&[u8]> {
        sent.iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
            .collect()
    };
    let lengths = values("content-length");
    let codings = values("transfer-encoding");
    match parsed.framing {
        Framing::Empty => {
            assert!(codings.is_empty(), "no body, yet chunked: {}", context());
            assert!(
                lengths.iter().all(|v| v.iter().all(|b| *b == b'0')),
                "no body, yet a length: {}",
                context()
            );
        }
        Framing::Length(n) => {
            assert!(codings.is_empty(), "a length and chunked: {}", context());
            let read: Vec<Option<u64>> = lengths
                .iter()
                .map(|v| std::str::from_utf8(v).ok().and_then(|s| s.parse().ok()))
                .collect();
            assert_eq!(read, vec![Some(n)], "the length: {}", context());
        }
        Framing::Chunked => {
            assert!(lengths.is_empty(), "chunked and a length: {}", context());
            let last = codings.last().map(|v| tokens(v)).unwrap_or_default();
            assert_eq!(
                last.last().map(String::as_str),
                Some("chunked"),
                "chunked last: {}",
                context()
            );
        }
    }
    // The server forwards only HTTP/1.x methods it parsed; CONNECT would have an authority.
    assert_ne!(method, Method::CONNECT);
}
