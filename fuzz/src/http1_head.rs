//! HTTP/1.x request heads: `proxy::h1::head::parse` (the gateway's own server) against an oracle
//! written here from `httparse` and the rules of hyper's HTTP/1 server (`proto/h1/role.rs`,
//! `Server::parse` and `on_error`), which served client connections before.
//!
//! Input: `flags`, then the bytes a client sends. `flags` bits 0-2: the head limit, 64 << n bytes;
//! bits 3-7: where the bytes after a head are cut to be fed to the chunked decoder in two pieces.
//!
//! Checked:
//! - the same decision: incomplete, accepted, or refused with the same status (400, 414, 431, or
//!   no answer for an HTTP/2 preface);
//! - for an accepted head: the same method, target, version, header fields (values byte for byte,
//!   in order, after the framing rules drop or keep `Content-Length`, and without a `Connection`
//!   line of only `close`/`keep-alive`, which is read and never forwarded), framing, keep-alive and
//!   `Expect: 100-continue`, and exactly the head's bytes taken off the buffer;
//! - a chunked body after the head decodes to the same data, trailers and error whether it arrives
//!   at once or in two pieces, and the decoder never claims bytes past the body's end.
use bytes::BytesMut;
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri, Version, header};
use ntlm_tag::proxy::h1::{
    chunked::{ChunkedDecoder, Decoded},
    framing::Framing,
    head::{self, RequestHead},
};

/// What hyper's server makes of a head.
#[derive(Debug)]
enum Expected {
    Incomplete,
    /// Refused, with this answer (`None`: closed without one).
    Refused(Option<StatusCode>),
    Accepted(Box<Accepted>),
}

#[derive(Debug)]
struct Accepted {
    len: usize,
    method: Method,
    target: Uri,
    version: Version,
    headers: HeaderMap,
    framing: Framing,
    keep_alive: bool,
    expect_continue: bool,
}

pub fn check(data: &[u8]) {
    let Some((&flags, bytes)) = data.split_first() else {
        return;
    };
    let limit = 64usize << (flags & 7);
    let expected = oracle(bytes, limit);
    let mut buf = BytesMut::from(bytes);
    let ours = head::parse(&mut buf, limit);
    match (&expected, ours) {
        (Expected::Incomplete, Ok(None)) => assert_eq!(&buf[..], bytes, "incomplete: untouched"),
        (Expected::Refused(status), Err(e)) => {
            assert_eq!(*status, e.status(), "refused {bytes:?}: {e}")
        }
        (Expected::Accepted(a), Ok(Some(head))) => {
            compare(a, &head, bytes);
            assert_eq!(
                &buf[..],
                &bytes[a.len..],
                "the head's bytes taken, the rest left"
            );
            if head.framing == Framing::Chunked {
                chunked_in_pieces(&bytes[a.len..], usize::from(flags >> 3));
            }
        }
        (expected, ours) => panic!(
            "{:?}: hyper's rules say {expected:?}, the gateway {:?}",
            String::from_utf8_lossy(bytes),
            ours.map(|h| h.map(|h| (h.request, h.framing)))
        ),
    }
}

fn compare(a: &Accepted, head: &RequestHead, bytes: &[u8]) {
    let r = &head.request;
    let what = String::from_utf8_lossy(&bytes[..a.len]);
    assert_eq!(r.method(), a.method, "method of {what:?}");
    assert_eq!(r.uri(), &a.target, "target of {what:?}");
    assert_eq!(r.version(), a.version, "version of {what:?}");
    crate::assert_same_fields(r.headers(), &a.headers, &format!("{what:?}"));
    assert_eq!(head.framing, a.framing, "framing of {what:?}");
    assert_eq!(head.keep_alive, a.keep_alive, "keep-alive of {what:?}");
    assert_eq!(
        head.expect_continue, a.expect_continue,
        "expect of {what:?}"
    );
}

/// hyper's `Server::parse`, with `max_buf_size` as the head limit.
fn oracle(bytes: &[u8], limit: usize) -> Expected {
    const BAD: Expected = Expected::Refused(Some(StatusCode::BAD_REQUEST));
    const TOO_LARGE: Expected =
        Expected::Refused(Some(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE));
    if bytes.starts_with(b"PRI * HTTP/2.0") {
        return Expected::Refused(None);
    }
    let mut fields = [httparse::EMPTY_HEADER; 100];
    let mut req = httparse::Request::new(&mut fields);
    let len = match req.parse(bytes) {
        Ok(httparse::Status::Complete(len)) if len > limit => return TOO_LARGE,
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if bytes.len() >= limit => return TOO_LARGE,
        Ok(httparse::Status::Partial) => return Expected::Incomplete,
        Err(httparse::Error::TooManyHeaders) => return TOO_LARGE,
        Err(_) => return BAD,
    };
    let (Some(method), Some(path), Some(version)) = (req.method, req.path, req.version) else {
        return BAD;
    };
    if path.len() > 65534 {
        return Expected::Refused(Some(StatusCode::URI_TOO_LONG));
    }
    let Ok(method) = Method::from_bytes(method.as_bytes()) else {
        return BAD;
    };
    let Ok(target) = Uri::try_from(path) else {
        return BAD;
    };
    let http11 = version == 1;
    let mut keep_alive = http11;
    let mut saw_close = false;
    let mut expect_continue = false;
    let (mut is_te, mut is_te_chunked, mut is_cl) = (false, false, false);
    let mut con_len: Option<u64> = None;
    let mut headers = HeaderMap::new();
    for f in req.headers.iter() {
        let Ok(name) = HeaderName::from_bytes(f.name.as_bytes()) else {
            return BAD;
        };
        let Ok(value) = HeaderValue::from_bytes(f.value) else {
            return BAD;
        };
        let text = value.to_str().ok();
        let tokens =
            |t: &str| text.is_some_and(|s| s.split(',').any(|x| x.trim().eq_ignore_ascii_case(t)));
        match name {
            header::TRANSFER_ENCODING => {
                if !http11 {
                    return BAD;
                }
                is_te = true;
                if is_cl && con_len.take().is_some() {
                    headers.remove(header::CONTENT_LENGTH);
                }
                is_te_chunked = text
                    .and_then(|s| s.rsplit(',').next())
                    .is_some_and(|l| l.trim().eq_ignore_ascii_case("chunked"));
            }
            header::CONTENT_LENGTH => {
                is_cl = true;
                if is_te {
                    continue;
                }
                let digits = value.as_bytes();
                if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
                    return BAD;
                }
                let Ok(len) = std::str::from_utf8(digits).unwrap_or("x").parse::<u64>() else {
                    return BAD;
                };
                if let Some(prev) = con_len {
                    if prev != len {
                        return BAD;
                    }
                    continue;
                }
                if len > u64::MAX - 2 {
                    return TOO_LARGE;
                }
                con_len = Some(len);
            }
            header::CONNECTION => {
                if saw_close || tokens("close") {
                    saw_close = true;
                    keep_alive = false;
                } else if !keep_alive {
                    keep_alive = tokens("keep-alive");
                }
                // The gateway's difference: read, and not kept (it is removed before forwarding).
                if crate::is_spent_connection_line(&value) {
                    continue;
                }
            }
            header::EXPECT => {
                expect_continue = value.as_bytes().eq_ignore_ascii_case(b"100-continue");
            }
            _ => {}
        }
        headers.append(name, value);
    }
    if is_te && !is_te_chunked {
        return BAD;
    }
    if is_te && is_cl {
        keep_alive = false;
    }
    let framing = match (is_te, con_len) {
        (true, _) => Framing::Chunked,
        (false, None | Some(0)) => Framing::Empty,
        (false, Some(n)) => Framing::Length(n),
    };
    Expected::Accepted(Box::new(Accepted {
        len,
        method,
        target,
        version: if http11 {
            Version::HTTP_11
        } else {
            Version::HTTP_10
        },
        headers,
        framing,
        keep_alive,
        expect_continue: expect_continue && http11,
    }))
}

/// Data, trailers or error, and the bytes left after the body.
type Outcome = (Vec<u8>, Option<HeaderMap>, Option<String>, usize);

fn decode(pieces: &[&[u8]]) -> Outcome {
    let mut decoder = ChunkedDecoder::new();
    let mut buf = BytesMut::new();
    let mut data = Vec::new();
    let mut pieces = pieces.iter();
    loop {
        match decoder.decode(&mut buf) {
            Ok(Decoded::Data(d)) => {
                assert!(!d.is_empty(), "an empty data frame");
                data.extend_from_slice(&d);
            }
            Ok(Decoded::End(trailers)) => {
                let left = buf.len() + pieces.map(|p| p.len()).sum::<usize>();
                return (data, Some(trailers), None, left);
            }
            Ok(Decoded::NeedMore) => match pieces.next() {
                Some(p) => buf.extend_from_slice(p),
                None => return (data, None, None, 0),
            },
            Err(e) => return (data, None, Some(e.to_string()), 0),
        }
    }
}

fn chunked_in_pieces(body: &[u8], cut: usize) {
    let cut = cut.min(body.len());
    let whole = decode(&[body]);
    let split = decode(&[&body[..cut], &body[cut..]]);
    assert_eq!(
        whole,
        split,
        "{:?} cut at {cut}",
        String::from_utf8_lossy(body)
    );
    assert!(whole.3 <= body.len());
}
