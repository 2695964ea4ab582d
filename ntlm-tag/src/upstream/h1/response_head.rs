//! A backend's response head: parsed with `httparse`, and its body's framing decided by RFC 9112
//! §6.3 as a client must (the request's method matters), by hyper's client rules where the RFC
//! leaves a choice, and stricter where a response could smuggle: a response with both
//! `Transfer-Encoding` and `Content-Length`, or with `Content-Length` values that differ, is
//! refused (502), and its connection is closed, never reused.
#![forbid(unsafe_code)]

use std::mem::MaybeUninit;

use bytes::BytesMut;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Response, StatusCode, Version, header};
use thiserror::Error;

use crate::http1::{
    ConnectionTokens,
    fields::{FieldAt, FieldPositions},
    framing,
    passed::PassedFields,
};

/// Header fields a response head may have (hyper's client default).
pub const MAX_HEADERS: usize = 100;
/// Bytes a response head may take, status line and headers together. Far above what backends
/// send (nginx's default `proxy_buffer_size` is 4-8 KiB); a longer head is refused.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;

/// How a response body is delimited on the wire (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseFraming {
    /// No body: a response to HEAD, a 1xx, 204 or 304, a 2xx to CONNECT, or `Content-Length: 0`.
    Empty,
    /// `Content-Length` bytes (never 0: that is `Empty`).
    Length(u64),
    /// `Transfer-Encoding` whose last coding is `chunked`.
    Chunked,
    /// Until the backend closes the connection: no length, or a last coding other than chunked.
    CloseDelimited,
}

/// A complete response head.
///
/// Its fields are split in two: those the gateway reads or rewrites are in `response`'s header
/// map; the others are in `passed`, as the lines the client receives (see [`PassedFields`]).
/// `Content-Length` is in neither (the framing carries it, and each hop is framed anew) except
/// on a response to HEAD, where it is the length a GET would get. A `101`'s fields, and those of
/// a head whose `Connection` line names a field to remove, are all in the map.
#[derive(Debug)]
pub struct ResponseHead {
    pub response: Response<()>,
    pub framing: ResponseFraming,
    /// The connection may carry another request after this response: the backend did not ask to
    /// close it, the body has a length of its own, and it did not switch protocols.
    pub keep_alive: bool,
    pub passed: PassedFields,
}

impl ResponseHead {
    /// Every field the client will get, in one map (the passed ones after the others): for tests
    /// and the fuzz targets, which compare whole heads.
    pub fn all_fields(&self) -> HeaderMap {
        let mut headers = self.response.headers().clone();
        self.passed.merge_into(&mut headers);
        headers
    }
}

/// A response head the gateway refuses (502); its connection is closed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ResponseHeadError {
    #[error("response head over {MAX_HEAD_BYTES} bytes or {MAX_HEADERS} header fields")]
    TooLarge,
    #[error("malformed response head: {0}")]
    Malformed(&'static str),
    #[error("Transfer-Encoding in an HTTP/1.0 response")]
    TransferEncodingInHttp10,
    #[error("a response with both Transfer-Encoding and Content-Length (a smuggling attempt?)")]
    TransferEncodingAndContentLength,
    #[error("Content-Length that is not a decimal number")]
    InvalidContentLength,
    #[error("several Content-Length values that differ")]
    DifferentContentLengths,
}

/// Takes a complete response head off the front of `buf`: `Ok(None)` while it is incomplete.
/// Interim `1xx` responses other than `101` are skipped (their heads are consumed), as hyper's
/// client does: the gateway answers `Expect: 100-continue` itself.
pub fn parse(
    buf: &mut BytesMut,
    method: &Method,
) -> Result<Option<ResponseHead>, ResponseHeadError> {
    loop {
        let Some(head) = parse_one(buf, method)? else {
            return Ok(None);
        };
        let status = head.response.status();
        if status.is_informational() && status != StatusCode::SWITCHING_PROTOCOLS {
            continue;
        }
        return Ok(Some(head));
    }
}

fn parse_one(
    buf: &mut BytesMut,
    method: &Method,
) -> Result<Option<ResponseHead>, ResponseHeadError> {
    if buf.is_empty() {
        return Ok(None);
    }
    // Where each field lies in the head, so that values become slices of it (no copy); the
    // parser's header array is left uninitialised (zeroing 100 fields per response costs more
    // than parsing a typical head).
    let mut fields = FieldPositions::new();
    let (len, code, http11) = {
        let mut uninit = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut parsed = httparse::Response::new(&mut []);
        let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
            &mut parsed,
            buf,
            &mut uninit,
        ) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD_BYTES => {
                return Err(ResponseHeadError::TooLarge);
            }
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => return Err(ResponseHeadError::TooLarge),
            Err(e) => return Err(ResponseHeadError::Malformed(describe(e))),
        };
        if len > MAX_HEAD_BYTES {
            return Err(ResponseHeadError::TooLarge);
        }
        let (Some(code), Some(version)) = (parsed.code, parsed.version) else {
            return Err(ResponseHeadError::Malformed("incomplete status line"));
        };
        fields.record(buf, parsed.headers);
        (len, code, version == 1)
    };
    let head = buf.split_to(len).freeze();
    let status =
        StatusCode::from_u16(code).map_err(|_| ResponseHeadError::Malformed("status code"))?;
    // A 101's fields stay whole: after it, the connection is the tunnel's.
    let may_pass = status != StatusCode::SWITCHING_PROTOCOLS;
    let keeps_length = *method == Method::HEAD;
    let mut headers = HeaderMap::new();
    let mut passed = PassedFields::with_capacity(if may_pass { len } else { 0 });
    let mut facts = Facts::default();
    for &field in fields.as_slice() {
        let name_bytes = &head[field.name()];
        let role = Role::of(name_bytes);
        if may_pass && matches!(role, Role::Passed | Role::Date) {
            passed.push(name_bytes, &head[field.value()]);
            if role == Role::Date {
                passed.note_date();
            }
            continue;
        }
        let value = field.header_value(&head);
        let keep =
            facts.note(role, &value) && (role != Role::ContentLength || keeps_length || !may_pass);
        if keep {
            let name = match role {
                Role::ContentLength => header::CONTENT_LENGTH,
                Role::TransferEncoding => header::TRANSFER_ENCODING,
                Role::Connection => header::CONNECTION,
                Role::Read | Role::Date | Role::Passed => HeaderName::from_bytes(name_bytes)
                    .map_err(|_| ResponseHeadError::Malformed("header name"))?,
            };
            headers.append(name, value);
        }
    }
    if facts.names_fields && !passed.is_empty() {
        // A `Connection` line names fields to remove, maybe passed ones: the map gets them all,
        // and the hop-by-hop rewrite removes what it names.
        passed.clear();
        keep_all(&head, fields.as_slice(), &mut headers)?;
    }
    let (framing, framing_keeps) = decide_framing(status, method, http11, &facts)?;
    let keep_alive = framing_keeps
        && framing != ResponseFraming::CloseDelimited
        && !facts.close
        && (http11 || facts.keep_alive);
    let mut response = Response::new(());
    *response.status_mut() = status;
    *response.version_mut() = if http11 {
        Version::HTTP_11
    } else {
        Version::HTTP_10
    };
    *response.headers_mut() = headers;
    Ok(Some(ResponseHead {
        response,
        framing,
        keep_alive,
        passed,
    }))
}

/// Appends to `headers` the fields of `head` that were passed.
fn keep_all(
    head: &bytes::Bytes,
    fields: &[FieldAt],
    headers: &mut HeaderMap,
) -> Result<(), ResponseHeadError> {
    for &field in fields {
        if matches!(Role::of(&head[field.name()]), Role::Passed | Role::Date) {
            let name = HeaderName::from_bytes(&head[field.name()])
                .map_err(|_| ResponseHeadError::Malformed("header name"))?;
            headers.append(name, field.header_value(head));
        }
    }
    Ok(())
}

/// What the gateway does with a response field, by its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    ContentLength,
    TransferEncoding,
    Connection,
    /// Read or removed on the way to the client: hop-by-hop fields (RFC 9110 §7.6.1) and the
    /// authentication challenges and `Persistent-Auth` that decide what an upstream connection
    /// holds.
    Read,
    /// Passed on untouched; the client's encoder adds one when a response has none.
    Date,
    /// Passed on untouched.
    Passed,
}

impl Role {
    /// Compared as bytes, ASCII case-insensitively, after one comparison of lengths: this runs
    /// for every field of every response, and most names fall through at the length.
    fn of(name: &[u8]) -> Role {
        let is = |known: &[u8]| name.eq_ignore_ascii_case(known);
        match name.len() {
            2 if is(b"te") => Role::Read,
            4 if is(b"date") => Role::Date,
            7 if is(b"trailer") || is(b"upgrade") => Role::Read,
            10 if is(b"connection") => Role::Connection,
            10 if is(b"keep-alive") => Role::Read,
            14 if is(b"content-length") => Role::ContentLength,
            15 if is(b"persistent-auth") => Role::Read,
            16 if is(b"proxy-connection") || is(b"www-authenticate") => Role::Read,
            17 if is(b"transfer-encoding") => Role::TransferEncoding,
            18 if is(b"proxy-authenticate") => Role::Read,
            19 if is(b"proxy-authorization") => Role::Read,
            _ => Role::Passed,
        }
    }
}

/// What the framing and keep-alive decisions need from a head, noted field by field as the
/// header map is built (one pass, no lookups afterwards).
struct Facts {
    /// Every `Content-Length` value so far (lines and comma-separated lists), which must agree, as
    /// hyper reads them: the first bad or differing one is kept as the error.
    content_length: Result<Option<u64>, ResponseHeadError>,
    has_content_length: bool,
    /// The last `Transfer-Encoding` line: its last coding decides the framing.
    last_transfer_encoding: Option<HeaderValue>,
    /// `Connection: close` on any line.
    close: bool,
    /// `Connection: keep-alive` on any line (what keeps an HTTP/1.0 connection).
    keep_alive: bool,
    /// A `Connection` line names something besides `close` and `keep-alive`.
    names_fields: bool,
}

impl Default for Facts {
    fn default() -> Self {
        Facts {
            content_length: Ok(None),
            has_content_length: false,
            last_transfer_encoding: None,
            close: false,
            keep_alive: false,
            names_fields: false,
        }
    }
}

impl Facts {
    /// Notes one field; `false`: leave it out of the response. A `Connection` line of only
    /// `close`/`keep-alive` says nothing past this hop (the gateway removes hop-by-hop headers
    /// before the client sees them): it is read here and not kept.
    fn note(&mut self, role: Role, value: &HeaderValue) -> bool {
        match role {
            Role::ContentLength => {
                self.has_content_length = true;
                if let Ok(length) = self.content_length {
                    self.content_length = add_content_length(length, value);
                }
            }
            Role::TransferEncoding => self.last_transfer_encoding = Some(value.clone()),
            Role::Connection => {
                let tokens = ConnectionTokens::of(value);
                self.close |= tokens.close;
                self.keep_alive |= tokens.keep_alive;
                self.names_fields |= !tokens.only_close_or_keep_alive;
                return !tokens.only_close_or_keep_alive;
            }
            Role::Read | Role::Date | Role::Passed => {}
        }
        true
    }
}

/// `length` (the `Content-Length` so far) with the values of one more line, which must agree.
fn add_content_length(
    mut length: Option<u64>,
    line: &HeaderValue,
) -> Result<Option<u64>, ResponseHeadError> {
    // The usual line, one number: read without splitting, as the general reading below would.
    if let Some(n) = framing::decimal(line.as_bytes()) {
        return match length {
            Some(previous) if previous != n => Err(ResponseHeadError::DifferentContentLengths),
            _ => Ok(Some(n)),
        };
    }
    let line = line
        .to_str()
        .map_err(|_| ResponseHeadError::InvalidContentLength)?;
    for value in line.split(',') {
        let n = framing::decimal(value.trim().as_bytes())
            .ok_or(ResponseHeadError::InvalidContentLength)?;
        match length {
            Some(previous) if previous != n => {
                return Err(ResponseHeadError::DifferentContentLengths);
            }
            _ => length = Some(n),
        }
    }
    Ok(length)
}

/// The body's framing (RFC 9112 §6.3, in its order), and whether the connection can carry another
/// request afterwards as far as the framing goes (not after a switch of protocols).
fn decide_framing(
    status: StatusCode,
    method: &Method,
    http11: bool,
    facts: &Facts,
) -> Result<(ResponseFraming, bool), ResponseHeadError> {
    // 1. HEAD, 1xx, 204 and 304 have no body, whatever their headers say.
    if status == StatusCode::SWITCHING_PROTOCOLS {
        return Ok((ResponseFraming::Empty, false));
    }
    if *method == Method::HEAD
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        return Ok((ResponseFraming::Empty, true));
    }
    // 2. A 2xx to CONNECT turns the connection into a tunnel: never reused for HTTP.
    if *method == Method::CONNECT && status.is_success() {
        return Ok((ResponseFraming::Empty, false));
    }
    let content_length = facts.content_length.clone()?;
    if let Some(last_coding_line) = &facts.last_transfer_encoding {
        if !http11 {
            return Err(ResponseHeadError::TransferEncodingInHttp10);
        }
        // 3. The RFC lets Transfer-Encoding win; a response that has both is refused instead.
        if facts.has_content_length {
            return Err(ResponseHeadError::TransferEncodingAndContentLength);
        }
        // 4. The last coding decides: chunked, or else the body runs until the connection closes.
        let framing = if framing::last_coding_is_chunked(last_coding_line) {
            ResponseFraming::Chunked
        } else {
            ResponseFraming::CloseDelimited
        };
        return Ok((framing, true));
    }
    // 5-7. A valid Content-Length, or else the body runs until the connection closes.
    Ok(match content_length {
        Some(0) => (ResponseFraming::Empty, true),
        Some(n) => (ResponseFraming::Length(n), true),
        None => (ResponseFraming::CloseDelimited, true),
    })
}

fn describe(e: httparse::Error) -> &'static str {
    match e {
        httparse::Error::HeaderName => "header name",
        httparse::Error::HeaderValue => "header value",
        httparse::Error::NewLine => "line ending",
        httparse::Error::Status => "status",
        httparse::Error::Token => "token",
        httparse::Error::TooManyHeaders => "too many header fields",
        httparse::Error::Version => "version",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(method: Method, raw: &str) -> Result<Option<ResponseHead>, ResponseHeadError> {
        let mut buf = BytesMut::from(raw);
        parse(&mut buf, &method)
    }

    fn framing_of(method: Method, raw: &str) -> Result<(ResponseFraming, bool), ResponseHeadError> {
        head(method, raw).map(|h| {
            let h = h.expect("complete head");
            (h.framing, h.keep_alive)
        })
    }

    #[test]
    fn responses_without_a_body_follow_rfc_9112_6_3() {
        use ResponseFraming::*;
        // HEAD: the length is that of a GET, no body follows.
        assert_eq!(
            framing_of(Method::HEAD, "HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n"),
            Ok((Empty, true))
        );
        assert_eq!(
            framing_of(
                Method::HEAD,
                "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
            ),
            Ok((Empty, true))
        );
        for status in ["204 No Content", "304 Not Modified"] {
            assert_eq!(
                framing_of(
                    Method::GET,
                    &format!("HTTP/1.1 {status}\r\ncontent-length: 9\r\n\r\n")
                ),
                Ok((Empty, true)),
                "{status}"
            );
        }
        // A 2xx to CONNECT is a tunnel; a 101 hands the connection over: neither is reused.
        assert_eq!(
            framing_of(Method::CONNECT, "HTTP/1.1 200 OK\r\n\r\n"),
            Ok((Empty, false))
        );
        assert_eq!(
            framing_of(
                Method::GET,
                "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n"
            ),
            Ok((Empty, false))
        );
        assert_eq!(
            framing_of(Method::GET, "HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"),
            Ok((Empty, true))
        );
    }

    #[test]
    fn bodies_are_delimited_by_chunked_length_or_close() {
        use ResponseFraming::*;
        assert_eq!(
            framing_of(
                Method::GET,
                "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
            ),
            Ok((Chunked, true))
        );
        assert_eq!(
            framing_of(
                Method::POST,
                "HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\ntransfer-encoding: chunked\r\n\r\n"
            ),
            Ok((Chunked, true))
        );
        // A last coding other than chunked: the body ends when the connection does.
        assert_eq!(
            framing_of(
                Method::GET,
                "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked, gzip\r\n\r\n"
            ),
            Ok((CloseDelimited, false))
        );
        assert_eq!(
            framing_of(Method::GET, "HTTP/1.1 200 OK\r\ncontent-length: 12\r\n\r\n"),
            Ok((Length(12), true))
        );
        // Identical values, on lines or in a list, are one length (RFC 9110 §8.6, hyper).
        assert_eq!(
            framing_of(
                Method::GET,
                "HTTP/1.1 200 OK\r\ncontent-length: 7\r\ncontent-length: 7, 7\r\n\r\n"
            ),
            Ok((Length(7), true))
        );
        assert_eq!(
            framing_of(Method::GET, "HTTP/1.1 200 OK\r\n\r\n"),
            Ok((CloseDelimited, false))
        );
        assert_eq!(
            framing_of(Method::GET, "HTTP/1.0 200 OK\r\ncontent-length: 3\r\n\r\n"),
            Ok((Length(3), false))
        );
        assert_eq!(
            framing_of(
                Method::GET,
                "HTTP/1.0 200 OK\r\ncontent-length: 3\r\nconnection: keep-alive\r\n\r\n"
            ),
            Ok((Length(3), true))
        );
        assert_eq!(
            framing_of(
                Method::GET,
                "HTTP/1.1 200 OK\r\ncontent-length: 3\r\nconnection: keep-alive, close\r\n\r\n"
            ),
            Ok((Length(3), false))
        );
    }

    #[test]
    fn hostile_responses_are_refused() {
        use ResponseHeadError::*;
        let cases: &[(&str, ResponseHeadError)] = &[
            (
                "HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\n",
                DifferentContentLengths,
            ),
            (
                "HTTP/1.1 200 OK\r\ncontent-length: 5, 6\r\n\r\n",
                DifferentContentLengths,
            ),
            (
                "HTTP/1.1 200 OK\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n",
                TransferEncodingAndContentLength,
            ),
            (
                "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 5\r\n\r\n",
                TransferEncodingAndContentLength,
            ),
            (
                "HTTP/1.0 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
                TransferEncodingInHttp10,
            ),
            (
                "HTTP/1.1 200 OK\r\ncontent-length: +5\r\n\r\n",
                InvalidContentLength,
            ),
            (
                "HTTP/1.1 200 OK\r\ncontent-length: 0x5\r\n\r\n",
                InvalidContentLength,
            ),
            (
                "HTTP/1.1 200 OK\r\ncontent-length: \r\n\r\n",
                InvalidContentLength,
            ),
            (
                "HTTP/1.1 200 OK\r\ncontent-length: 99999999999999999999\r\n\r\n",
                InvalidContentLength,
            ),
            (
                "HTTP/1.1 200 OK\r\nx: a\r\n b\r\n\r\n",
                Malformed("header name"),
            ),
            ("HTTP/1.1 2000 OK\r\n\r\n", Malformed("status")),
            ("HTTP/2.0 200 OK\r\n\r\n", Malformed("version")),
        ];
        for (raw, expected) in cases {
            match head(Method::GET, raw) {
                Err(e) => assert_eq!(&e, expected, "{raw:?}"),
                Ok(h) => panic!("{raw:?} accepted: {h:?}"),
            }
        }
    }

    #[test]
    fn oversized_heads_are_refused_before_they_complete() {
        let mut raw = String::from("HTTP/1.1 200 OK\r\n");
        while raw.len() < MAX_HEAD_BYTES {
            raw.push_str(
                "x-filler: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n",
            );
        }
        // Incomplete, but already too long.
        assert_eq!(
            head(Method::GET, &raw).err(),
            Some(ResponseHeadError::TooLarge)
        );
        let many: String = (0..=MAX_HEADERS).map(|i| format!("x-{i}: v\r\n")).collect();
        assert_eq!(
            head(Method::GET, &format!("HTTP/1.1 200 OK\r\n{many}\r\n")).err(),
            Some(ResponseHeadError::TooLarge)
        );
    }

    #[test]
    fn interim_responses_are_skipped_and_partial_heads_wait() {
        let mut buf = BytesMut::from(
            "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 102 Processing\r\n\r\nHTTP/1.1 401 Unauthorized\r\ncontent-length: 0\r\n\r\nrest",
        );
        let h = parse(&mut buf, &Method::POST)
            .expect("valid")
            .expect("complete");
        assert_eq!(h.response.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(&buf[..], b"rest");
        let mut partial = BytesMut::from("HTTP/1.1 200 OK\r\ncontent-le");
        assert!(matches!(parse(&mut partial, &Method::GET), Ok(None)));
        assert_eq!(partial.len(), 27, "an incomplete head stays in the buffer");
    }

    /// A `Connection` line of only `close`/`keep-alive` is read and not kept (the client never
    /// sees a hop-by-hop header); one that names another header stays for the hop-by-hop rewrite
    /// to remove both.
    #[test]
    fn connection_lines_are_read_and_only_kept_when_they_name_other_headers() {
        let accepted = |connection: &str| {
            let raw =
                format!("HTTP/1.1 200 OK\r\ncontent-length: 2\r\nConnection: {connection}\r\n\r\n");
            head(Method::GET, &raw).expect("valid").expect("complete")
        };
        let keep_alive = accepted("keep-alive");
        assert!(keep_alive.keep_alive);
        assert!(
            !keep_alive
                .response
                .headers()
                .contains_key(header::CONNECTION)
        );
        let close = accepted("Close");
        assert!(!close.keep_alive);
        assert!(!close.response.headers().contains_key(header::CONNECTION));
        let naming = accepted("close, X-Hop");
        assert!(!naming.keep_alive);
        assert_eq!(
            naming.response.headers()[header::CONNECTION],
            "close, X-Hop"
        );
    }

    fn passed(head: &ResponseHead) -> String {
        String::from_utf8(head.passed.lines().to_vec()).expect("ascii")
    }

    /// The fields the gateway neither reads nor changes go to the client as lines, in order and
    /// with the backend's spelling; the ones it reads stay in the map; `Content-Length` stays
    /// only on a response to HEAD.
    #[test]
    fn fields_the_gateway_does_not_read_are_passed_as_lines() {
        let raw = "HTTP/1.1 401 Unauthorized\r\nServer: Microsoft-IIS/10.0\r\n\
                   WWW-Authenticate: NTLM\r\nSet-Cookie: a=1\r\nDate: Wed, 02 Dec 2026 13:00:00 GMT\r\n\
                   www-authenticate: Negotiate\r\nset-cookie: b=2\r\nPersistent-Auth: true\r\n\
                   Content-Length: 5\r\nConnection: keep-alive\r\n\r\n";
        let get = head(Method::GET, raw).expect("valid").expect("complete");
        assert_eq!(
            passed(&get),
            "Server: Microsoft-IIS/10.0\r\nSet-Cookie: a=1\r\n\
             Date: Wed, 02 Dec 2026 13:00:00 GMT\r\nset-cookie: b=2\r\n"
        );
        assert!(get.passed.has_date());
        let map = get.response.headers();
        let challenges: Vec<_> = map.get_all(header::WWW_AUTHENTICATE).iter().collect();
        assert_eq!(challenges, ["NTLM", "Negotiate"]);
        assert_eq!(map["persistent-auth"], "true");
        assert_eq!(map.len(), 3, "{map:?}");
        assert_eq!(get.framing, ResponseFraming::Length(5));

        let to_head = head(Method::HEAD, raw).expect("valid").expect("complete");
        assert_eq!(to_head.response.headers()[header::CONTENT_LENGTH], "5");
        assert_eq!(to_head.response.headers().len(), 4);
        assert_eq!(all_names(&to_head).len(), 8);
    }

    fn all_names(head: &ResponseHead) -> Vec<String> {
        head.all_fields()
            .iter()
            .map(|(n, _)| n.as_str().to_owned())
            .collect()
    }

    /// A field a `Connection` line names must be removed: it cannot have gone by as a line.
    #[test]
    fn a_connection_line_that_names_fields_keeps_every_field_in_the_map() {
        let raw = "HTTP/1.1 200 OK\r\nX-Hop: 1\r\nServer: s\r\nConnection: X-Hop\r\n\
                   Content-Length: 0\r\n\r\n";
        let h = head(Method::GET, raw).expect("valid").expect("complete");
        assert!(h.passed.is_empty() && !h.passed.has_date());
        let map = h.response.headers();
        assert_eq!(map["x-hop"], "1");
        assert_eq!(map["server"], "s");
        assert_eq!(map[header::CONNECTION], "X-Hop");
    }

    /// After a 101 the connection is a tunnel, and the upgrade reads the head whole.
    #[test]
    fn a_switch_of_protocols_keeps_every_field_in_the_map() {
        let raw = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
                   Connection: Upgrade\r\nSec-WebSocket-Accept: x\r\n\r\n";
        let h = head(Method::GET, raw).expect("valid").expect("complete");
        assert!(h.passed.is_empty());
        assert_eq!(h.response.headers()["sec-websocket-accept"], "x");
        assert_eq!(h.response.headers()[header::UPGRADE], "websocket");
    }

    /// Every field the gateway reads or removes on a response is kept in the map, in any case.
    #[test]
    fn the_fields_the_gateway_reads_are_never_passed() {
        let read = crate::proxy::rewrite::HOP_BY_HOP.iter().copied().chain([
            "content-length",
            "www-authenticate",
            "persistent-auth",
        ]);
        for name in read {
            for spelling in [name.to_owned(), name.to_ascii_uppercase()] {
                assert_ne!(Role::of(spelling.as_bytes()), Role::Passed, "{spelling}");
                assert_ne!(Role::of(spelling.as_bytes()), Role::Date, "{spelling}");
            }
        }
        assert_eq!(Role::of(b"DATE"), Role::Date);
        for name in [
            "server",
            "set-cookie",
            "content-type",
            "x-te",
            "tex",
            "upgrade-insecure",
        ] {
            assert_eq!(Role::of(name.as_bytes()), Role::Passed, "{name}");
        }
    }
}
