//! HTTP/1.1 message framing shared by both sides of the gateway: the server side of client
//! connections (`proxy::h1`) and the client side towards backends (`upstream::h1`). `framing`
//! decides how a message's body is delimited (RFC 9112 §6), `chunked` decodes a chunked body.
#![deny(unsafe_code)]

pub mod chunked;
pub mod fields;
pub mod framing;
pub mod passed;

use http::HeaderValue;

/// The most header fields a message head may have (hyper's limit).
pub const MAX_HEADERS: usize = 100;

/// Whether a comma-separated header value has `token` (case-insensitive). A value that is not
/// visible ASCII (what `HeaderValue::to_str` takes) has no tokens.
pub fn has_token(value: &HeaderValue, token: &str) -> bool {
    elements(value).is_some_and(|mut e| e.any(|t| t.eq_ignore_ascii_case(token.as_bytes())))
}

/// The elements of a comma-separated value, trimmed (empty ones included); `None` for a value
/// that is not visible ASCII. Byte by byte: the `str` path (validate, split, trim by Unicode
/// rules) cost several hundred instructions per `Connection` header.
fn elements(value: &HeaderValue) -> Option<impl Iterator<Item = &[u8]>> {
    let bytes = value.as_bytes();
    let visible = |b: &u8| *b == b'\t' || (b' '..=b'~').contains(b);
    bytes
        .iter()
        .all(visible)
        .then(|| bytes.split(|b| *b == b',').map(<[u8]>::trim_ascii))
}

/// What a `Connection` header line says.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConnectionTokens {
    /// It has `close`.
    pub close: bool,
    /// It has `keep-alive`.
    pub keep_alive: bool,
    /// It has nothing but `close` and `keep-alive` (and empty elements): it names no header to
    /// remove besides the hop-by-hop ones, so once read it can be dropped whole.
    pub only_close_or_keep_alive: bool,
}

impl ConnectionTokens {
    pub fn of(value: &HeaderValue) -> Self {
        // The usual lines, whole (most backends send one on every response): read without
        // splitting, as the general reading below would read them.
        let bytes = value.as_bytes();
        if bytes.eq_ignore_ascii_case(b"keep-alive") {
            return ConnectionTokens {
                close: false,
                keep_alive: true,
                only_close_or_keep_alive: true,
            };
        }
        if bytes.eq_ignore_ascii_case(b"close") {
            return ConnectionTokens {
                close: true,
                keep_alive: false,
                only_close_or_keep_alive: true,
            };
        }
        let Some(elements) = elements(value) else {
            return ConnectionTokens::default();
        };
        let mut tokens = ConnectionTokens {
            only_close_or_keep_alive: true,
            ..ConnectionTokens::default()
        };
        for element in elements {
            if element.eq_ignore_ascii_case(b"close") {
                tokens.close = true;
            } else if element.eq_ignore_ascii_case(b"keep-alive") {
                tokens.keep_alive = true;
            } else if !element.is_empty() {
                tokens.only_close_or_keep_alive = false;
            }
        }
        tokens
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The byte-wise reading agrees with the `str` one it replaced.
    fn has_token_by_str(value: &HeaderValue, token: &str) -> bool {
        value
            .to_str()
            .is_ok_and(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    }

    const VALUES: [&[u8]; 12] = [
        b"close",
        b"Keep-Alive",
        b" keep-alive , Upgrade",
        b"\tclose\t",
        b"upgrade",
        b"",
        b",,",
        b"closed",
        b"x-close, close",
        b"close, \x80",
        b"keep-alive,\x7f",
        b"keep alive",
    ];

    #[test]
    fn tokens_are_read_as_the_str_rules_read_them() {
        for raw in VALUES {
            let Ok(value) = HeaderValue::from_bytes(raw) else {
                continue;
            };
            for token in ["close", "keep-alive", "upgrade", ""] {
                assert_eq!(
                    has_token(&value, token),
                    has_token_by_str(&value, token),
                    "{raw:?} {token}"
                );
            }
        }
    }

    #[test]
    fn connection_lines_that_name_no_other_header_are_recognised() {
        let of = |raw: &'static str| ConnectionTokens::of(&HeaderValue::from_static(raw));
        assert_eq!(
            of("keep-alive"),
            ConnectionTokens {
                close: false,
                keep_alive: true,
                only_close_or_keep_alive: true
            }
        );
        assert!(of("Close, ").close && of("Close, ").only_close_or_keep_alive);
        assert!(!of("keep-alive, X-Secret").only_close_or_keep_alive);
        assert!(!of("upgrade").only_close_or_keep_alive);
        let opaque =
            ConnectionTokens::of(&HeaderValue::from_bytes(b"close, \x80").expect("obs-text"));
        assert_eq!(opaque, ConnectionTokens::default());
    }
}
