//! HTTP/1.1 message framing shared by both sides of the gateway: the server side of client
//! connections (`proxy::h1`) and the client side towards backends (`upstream::h1`). `framing`
//! decides how a message's body is delimited (RFC 9112 §6), `chunked` decodes a chunked body.
#![forbid(unsafe_code)]

pub mod chunked;
pub mod framing;

use http::HeaderValue;

/// The most header fields a message head may have (hyper's limit).
pub const MAX_HEADERS: usize = 100;

/// Whether a comma-separated header value has `token` (case-insensitive).
pub fn has_token(value: &HeaderValue, token: &str) -> bool {
    value
        .to_str()
        .is_ok_and(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
}
