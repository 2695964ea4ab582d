//! HTTP/1.x response heads from backends: `upstream::h1::response_head::parse` (the gateway's own
//! client) against an oracle written here from `httparse` and the rules of hyper's HTTP/1 client
//! (`proto/h1/role.rs`, `Client::parse` and `Client::decoder`), which read responses before, with
//! the gateway's deliberate differences: a response with both `Transfer-Encoding` and
//! `Content-Length` is refused (hyper lets `Transfer-Encoding` win), and so is a head over
//! `MAX_HEAD_BYTES`; a `Connection` line of only `close`/`keep-alive` is read and not kept (it is
//! hop-by-hop, and the client never saw it); `Content-Length` is carried by the framing and kept
//! as a field only on a response to HEAD or a 101.
//!
//! Input: `flags`, then the bytes a backend sends. `flags` bits 0-2: the request's method (GET,
//! HEAD, POST, CONNECT, PUT, OPTIONS, DELETE, PATCH).
//!
//! Checked: the same decision (incomplete, accepted, refused); for an accepted head the same
//! status, version, header fields (the header map and the fields passed as lines together, each
//! name's values in order, byte for byte), framing and keep-alive, and exactly the bytes of the
//! head (and of the interim `1xx` heads before it) taken off the buffer; and that no field the
//! gateway must read or remove went by as a passed line.
use bytes::BytesMut;
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Version, header};
use ntlm_tag::upstream::h1::response_head::{self, MAX_HEAD_BYTES, ResponseFraming};

use crate::header_sanitisation::HOP_BY_HOP;

const METHODS: [&str; 8] = [
    "GET", "HEAD", "POST", "CONNECT", "PUT", "OPTIONS", "DELETE", "PATCH",
];

#[derive(Debug)]
enum Expected {
    Incomplete,
    Refused,
    Accepted(Box<Accepted>),
}

#[derive(Debug)]
struct Accepted {
    /// Bytes of the interim heads and of this one.
    len: usize,
    status: StatusCode,
    version: Version,
    headers: HeaderMap,
    framing: ResponseFraming,
    keep_alive: bool,
}

pub fn check(data: &[u8]) {
    let Some((&flags, bytes)) = data.split_first() else {
        return;
    };
    let method =
        Method::from_bytes(METHODS[usize::from(flags & 7)].as_bytes()).unwrap_or(Method::GET);
    let expected = oracle(bytes, &method);
    let mut buf = BytesMut::from(bytes);
    let ours = response_head::parse(&mut buf, &method);
    let text = String::from_utf8_lossy(bytes);
    match (&expected, ours) {
        (Expected::Incomplete, Ok(None)) => {}
        (Expected::Refused, Err(_)) => {}
        (Expected::Accepted(a), Ok(Some(head))) => {
            let r = &head.response;
            assert_eq!(r.status(), a.status, "status of {text:?}");
            assert_eq!(r.version(), a.version, "version of {text:?}");
            crate::assert_same_fields_by_name(&head.all_fields(), &a.headers, &format!("{text:?}"));
            assert_passed_fields_are_not_read(&head, &text);
            assert_eq!(head.framing, a.framing, "framing of {text:?} to {method}");
            assert_eq!(head.keep_alive, a.keep_alive, "keep-alive of {text:?}");
            assert_eq!(
                &buf[..],
                &bytes[a.len..],
                "the heads' bytes taken, the rest left"
            );
        }
        (expected, ours) => panic!(
            "{text:?} to {method}: hyper's client rules say {expected:?}, the gateway {:?}",
            ours.map(|h| h.map(|h| (h.response, h.framing)))
        ),
    }
}

fn oracle(bytes: &[u8], method: &Method) -> Expected {
    let mut offset = 0;
    loop {
        match one(&bytes[offset..], offset, method) {
            Step::Interim(len) => offset += len,
            Step::Done(expected) => return expected,
        }
    }
}

enum Step {
    /// A 1xx other than 101 of this many bytes: skipped.
    Interim(usize),
    Done(Expected),
}

fn one(bytes: &[u8], before: usize, method: &Method) -> Step {
    let mut fields = [httparse::EMPTY_HEADER; 100];
    let mut res = httparse::Response::new(&mut fields);
    let len = match res.parse(bytes) {
        Ok(httparse::Status::Complete(len)) if len > MAX_HEAD_BYTES => {
            return Step::Done(Expected::Refused);
        }
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if bytes.len() >= MAX_HEAD_BYTES => {
            return Step::Done(Expected::Refused);
        }
        Ok(httparse::Status::Partial) => return Step::Done(Expected::Incomplete),
        Err(_) => return Step::Done(Expected::Refused),
    };
    let (Some(code), Some(version)) = (res.code, res.version) else {
        return Step::Done(Expected::Refused);
    };
    let Ok(status) = StatusCode::from_u16(code) else {
        return Step::Done(Expected::Refused);
    };
    let mut headers = HeaderMap::new();
    // What the gateway keeps: every line but the spent `Connection` ones (the decisions below read
    // them all).
    let mut kept = HeaderMap::new();
    for f in res.headers.iter() {
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(f.name.as_bytes()),
            HeaderValue::from_bytes(f.value),
        ) else {
            return Step::Done(Expected::Refused);
        };
        // `Content-Length` is carried by the framing, and kept as a field only where the client
        // gets no body to measure: on a response to HEAD (the length a GET would get), and on a
        // 101, whose fields all stay for the switch.
        let spent_length = name == header::CONTENT_LENGTH
            && *method != Method::HEAD
            && status != StatusCode::SWITCHING_PROTOCOLS;
        let spent_connection =
            name == header::CONNECTION && crate::is_spent_connection_line(&value);
        if !spent_connection && !spent_length {
            kept.append(name.clone(), value.clone());
        }
        headers.append(name, value);
    }
    if status.is_informational() && status != StatusCode::SWITCHING_PROTOCOLS {
        return Step::Interim(len);
    }
    let http11 = version == 1;
    // hyper's Client::decoder, in its order.
    let (framing, reusable) = match status.as_u16() {
        101 => (ResponseFraming::Empty, false),
        204 | 304 => (ResponseFraming::Empty, true),
        _ if *method == Method::HEAD => (ResponseFraming::Empty, true),
        200..=299 if *method == Method::CONNECT => (ResponseFraming::Empty, false),
        _ => {
            // hyper: content_length_parse_all, every value of every line the same.
            let mut length: Option<u64> = None;
            let mut invalid = false;
            for line in headers.get_all(header::CONTENT_LENGTH) {
                for v in line.to_str().unwrap_or("x").split(',') {
                    let v = v.trim();
                    let n = (!v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
                        .then(|| v.parse::<u64>().ok())
                        .flatten();
                    match (n, length) {
                        (Some(n), Some(l)) if n != l => invalid = true,
                        (Some(n), _) => length = Some(n),
                        (None, _) => invalid = true,
                    }
                }
            }
            if headers.contains_key(header::TRANSFER_ENCODING) {
                if !http11 {
                    return Step::Done(Expected::Refused);
                }
                // The gateway's difference: Transfer-Encoding with Content-Length is refused.
                if headers.contains_key(header::CONTENT_LENGTH) {
                    return Step::Done(Expected::Refused);
                }
                let chunked = headers
                    .get_all(header::TRANSFER_ENCODING)
                    .iter()
                    .next_back()
                    .and_then(|v| v.to_str().ok())
                    .and_then(|s| s.rsplit(',').next())
                    .is_some_and(|l| l.trim().eq_ignore_ascii_case("chunked"));
                if chunked {
                    (ResponseFraming::Chunked, true)
                } else {
                    (ResponseFraming::CloseDelimited, true)
                }
            } else if invalid {
                return Step::Done(Expected::Refused);
            } else {
                match length {
                    Some(0) => (ResponseFraming::Empty, true),
                    Some(n) => (ResponseFraming::Length(n), true),
                    None => (ResponseFraming::CloseDelimited, true),
                }
            }
        }
    };
    // hyper's should_keep_alive.
    let tokens = |t: &str| {
        headers.get_all(header::CONNECTION).iter().any(|v| {
            v.to_str()
                .is_ok_and(|s| s.split(',').any(|x| x.trim().eq_ignore_ascii_case(t)))
        })
    };
    let wants = !tokens("close") && (http11 || tokens("keep-alive"));
    let keep_alive = reusable && wants && framing != ResponseFraming::CloseDelimited;
    Step::Done(Expected::Accepted(Box::new(Accepted {
        len: before + len,
        status,
        version: if http11 {
            Version::HTTP_11
        } else {
            Version::HTTP_10
        },
        headers: kept,
        framing,
        keep_alive,
    })))
}

/// The fields the gateway passes to the client as lines, unread, are none that it must read or
/// remove: not framing or hop-by-hop (RFC 9110 §7.6.1), not an authentication challenge or
/// `Persistent-Auth` (they decide what an upstream connection holds), not one a `Connection` line
/// names, and none at all on a 101. Written out here rather than taken from the gateway.
fn assert_passed_fields_are_not_read(head: &response_head::ResponseHead, text: &str) {
    if head.response.status() == StatusCode::SWITCHING_PROTOCOLS {
        assert!(head.passed.is_empty(), "fields passed on a 101: {text:?}");
    }
    let named: Vec<String> = head
        .response
        .headers()
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .collect();
    for (name, _) in head.passed.iter() {
        let name = String::from_utf8_lossy(name).to_ascii_lowercase();
        let read = HOP_BY_HOP
            .iter()
            .chain(&["content-length", "www-authenticate", "persistent-auth"])
            .any(|r| *r == name);
        assert!(
            !read && !named.contains(&name),
            "{name} passed unread in {text:?}"
        );
    }
}
