//! The header fields of a backend's response that the gateway neither reads nor changes (`Server`,
//! `Content-Type`, `Set-Cookie`, `Date`…), kept as the lines the client receives: they go from the
//! backend's head to the client's without becoming `HeaderMap` entries, which cost a few hundred
//! instructions a field to build, search, write out and drop again on every response.
//!
//! Which fields are passed like this is decided where a response head is parsed
//! (`upstream::h1::response_head`): every field the gateway reads or rewrites (framing,
//! hop-by-hop, authentication challenges, anything a `Connection` line names) stays in the header
//! map instead. A response for an HTTP/2 client gets its passed fields merged back into the map
//! ([`PassedFields::merge_into`]), as hyper's HTTP/2 server writes the map.
#![forbid(unsafe_code)]

use http::{HeaderMap, HeaderName, HeaderValue};

/// Passed fields, encoded as `name: value\r\n` lines (names as the backend wrote them).
#[derive(Debug, Default)]
pub struct PassedFields {
    lines: Vec<u8>,
    has_date: bool,
}

impl PassedFields {
    /// Room for `bytes` of lines (a head's size is the bound: one allocation per response).
    pub fn with_capacity(bytes: usize) -> Self {
        PassedFields {
            lines: Vec::with_capacity(bytes),
            has_date: false,
        }
    }

    /// Appends one field. `name` and `value` are as a parser of HTTP/1 heads accepted them: a
    /// token, and a value without CR, LF or NUL.
    pub fn push(&mut self, name: &[u8], value: &[u8]) {
        debug_assert!(HeaderName::from_bytes(name).is_ok());
        debug_assert!(HeaderValue::from_bytes(value).is_ok());
        self.lines.extend_from_slice(name);
        self.lines.extend_from_slice(b": ");
        self.lines.extend_from_slice(value);
        self.lines.extend_from_slice(b"\r\n");
    }

    /// Notes that one of the passed fields is `Date` (the client's encoder adds one otherwise).
    pub fn note_date(&mut self) {
        self.has_date = true;
    }

    pub fn has_date(&self) -> bool {
        self.has_date
    }

    /// The encoded lines, each ending in CRLF.
    pub fn lines(&self) -> &[u8] {
        &self.lines
    }

    pub fn is_empty(&self) -> bool {
        self.lines.is_empty()
    }

    /// Drops every field (the head's fields all went to the header map after all).
    pub fn clear(&mut self) {
        self.lines.clear();
        self.has_date = false;
    }

    /// Each field's name and value, in order.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.lines
            .split(|b| *b == b'\n')
            .filter(|line| !line.is_empty())
            .filter_map(|line| {
                let line = line.strip_suffix(b"\r").unwrap_or(line);
                let colon = line.iter().position(|b| *b == b':')?;
                let (name, value) = line.split_at(colon);
                Some((name, value[1..].trim_ascii_start()))
            })
    }

    /// Appends every field to `headers`, after the fields already there.
    pub fn merge_into(&self, headers: &mut HeaderMap) {
        for (name, value) in self.iter() {
            // Both were accepted by the HTTP/1 parser, whose byte sets are `http`'s.
            if let (Ok(name), Ok(value)) =
                (HeaderName::from_bytes(name), HeaderValue::from_bytes(value))
            {
                headers.append(name, value);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_come_back_as_they_went_in() {
        let mut passed = PassedFields::with_capacity(64);
        passed.push(b"Server", b"nginx");
        passed.push(b"X-Empty", b"");
        passed.push(b"Set-Cookie", b"a=b; Path=/: x");
        passed.push(b"set-cookie", b"c=d");
        assert_eq!(
            passed.lines(),
            b"Server: nginx\r\nX-Empty: \r\nSet-Cookie: a=b; Path=/: x\r\nset-cookie: c=d\r\n"
        );
        let fields: Vec<_> = passed.iter().collect();
        assert_eq!(
            fields,
            [
                (&b"Server"[..], &b"nginx"[..]),
                (b"X-Empty", b""),
                (b"Set-Cookie", b"a=b; Path=/: x"),
                (b"set-cookie", b"c=d"),
            ]
        );
        let mut headers = HeaderMap::new();
        headers.insert("www-authenticate", HeaderValue::from_static("NTLM"));
        passed.merge_into(&mut headers);
        assert_eq!(headers.len(), 5);
        assert_eq!(headers["server"], "nginx");
        let cookies: Vec<_> = headers.get_all("set-cookie").iter().collect();
        assert_eq!(cookies, ["a=b; Path=/: x", "c=d"]);
    }

    /// Passed names are not checked again (see [`PassedFields::push`]): httparse must accept in a
    /// response's field name exactly the bytes `HeaderName` takes, or an HTTP/2 client would lose
    /// a field an HTTP/1 client gets.
    #[test]
    fn the_parser_accepts_exactly_the_name_bytes_header_names_take() {
        for b in 0..=255u8 {
            let name = [b'x', b, b'y'];
            let mut head = b"HTTP/1.1 200 OK\r\n".to_vec();
            head.extend_from_slice(&name);
            head.extend_from_slice(b": v\r\n\r\n");
            let mut fields = [httparse::EMPTY_HEADER; 4];
            let mut response = httparse::Response::new(&mut fields);
            // Taken whole as one name (a colon ends a name: "x" with the value "y: v").
            let parsed = matches!(response.parse(&head), Ok(httparse::Status::Complete(_)))
                && response
                    .headers
                    .first()
                    .is_some_and(|h| h.name.as_bytes() == name);
            assert_eq!(
                parsed,
                HeaderName::from_bytes(&name).is_ok(),
                "byte {b:#04x} in a field name"
            );
        }
    }

    #[test]
    fn clearing_forgets_the_date_too() {
        let mut passed = PassedFields::default();
        passed.push(b"Date", b"Wed, 02 Dec 2026 13:00:00 GMT");
        passed.note_date();
        assert!(passed.has_date() && !passed.is_empty());
        passed.clear();
        assert!(!passed.has_date() && passed.is_empty());
    }
}
