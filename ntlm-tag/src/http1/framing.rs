//! How a request body is delimited (RFC 9112 §6.1-6.3), decided header by header exactly as
//! hyper's HTTP/1 server decides it, so that the gateway and any HTTP/1 hop behind it agree on
//! where a request ends (request smuggling needs two readers that disagree):
//!
//! - `Transfer-Encoding` in an HTTP/1.0 request is refused; in HTTP/1.1 its last coding must be
//!   `chunked` (anything else has no defined length and is refused).
//! - `Transfer-Encoding` wins over `Content-Length`, which is dropped from the forwarded head, and
//!   the connection closes after such a request (§6.1: a server that processes it MUST close).
//! - `Content-Length` is digits only (no sign, no list); repeated identical values are kept once,
//!   different ones are refused.
#![forbid(unsafe_code)]

use http::HeaderValue;
use thiserror::Error;

/// How the body of one request is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body.
    Empty,
    /// `Content-Length` bytes (never 0: that is `Empty`).
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
}

/// A request whose framing is refused; the connection closes after the answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum FramingError {
    #[error("Transfer-Encoding in an HTTP/1.0 request")]
    TransferEncodingInHttp10,
    #[error("Transfer-Encoding whose last coding is not chunked")]
    NotChunkedLast,
    #[error("Content-Length that is not a decimal number")]
    InvalidContentLength,
    #[error("several Content-Length values that differ")]
    DifferentContentLengths,
    #[error("Content-Length beyond what a body can have")]
    ContentLengthTooLarge,
}

/// What to do with the header just looked at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keep {
    /// Keep it.
    Yes,
    /// Leave it out (a repeated `Content-Length`, or one made moot by `Transfer-Encoding`).
    No,
    /// Keep it, and drop the `Content-Length` kept so far: `Transfer-Encoding` replaces it.
    ReplacingContentLength,
}

/// Largest length a body may declare (hyper's `DecodedLength::MAX_LEN`: two values are reserved).
const MAX_LENGTH: u64 = u64::MAX - 2;

/// The framing rules, fed each framing header of a head in order.
#[derive(Debug)]
pub struct FramingRules {
    http11: bool,
    transfer_encoding: bool,
    chunked_last: bool,
    content_length_seen: bool,
    content_length: Option<u64>,
}

impl FramingRules {
    pub fn new(http11: bool) -> Self {
        FramingRules {
            http11,
            transfer_encoding: false,
            chunked_last: false,
            content_length_seen: false,
            content_length: None,
        }
    }

    /// One `Transfer-Encoding` field line.
    pub fn transfer_encoding(&mut self, value: &HeaderValue) -> Result<Keep, FramingError> {
        if !self.http11 {
            return Err(FramingError::TransferEncodingInHttp10);
        }
        self.transfer_encoding = true;
        self.chunked_last = last_coding_is_chunked(value);
        if self.content_length_seen && self.content_length.take().is_some() {
            return Ok(Keep::ReplacingContentLength);
        }
        Ok(Keep::Yes)
    }

    /// One `Content-Length` field line.
    pub fn content_length(&mut self, value: &HeaderValue) -> Result<Keep, FramingError> {
        self.content_length_seen = true;
        if self.transfer_encoding {
            return Ok(Keep::No);
        }
        let length = decimal(value.as_bytes()).ok_or(FramingError::InvalidContentLength)?;
        match self.content_length {
            Some(previous) if previous != length => Err(FramingError::DifferentContentLengths),
            Some(_) => Ok(Keep::No),
            None if length > MAX_LENGTH => Err(FramingError::ContentLengthTooLarge),
            None => {
                self.content_length = Some(length);
                Ok(Keep::Yes)
            }
        }
    }

    /// The framing, and whether the connection must close after this request (it had both
    /// `Transfer-Encoding` and `Content-Length`).
    pub fn finish(self) -> Result<(Framing, bool), FramingError> {
        if self.transfer_encoding {
            if !self.chunked_last {
                return Err(FramingError::NotChunkedLast);
            }
            return Ok((Framing::Chunked, self.content_length_seen));
        }
        Ok(match self.content_length {
            None | Some(0) => (Framing::Empty, false),
            Some(n) => (Framing::Length(n), false),
        })
    }
}

/// Whether the last coding of one `Transfer-Encoding` line is `chunked`.
pub fn last_coding_is_chunked(value: &HeaderValue) -> bool {
    value
        .to_str()
        .ok()
        .and_then(|s| s.rsplit(',').next())
        .is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"))
}

/// A `Content-Length` value: ASCII digits only (`u64::from_str` would take a `+`).
pub fn decimal(bytes: &[u8]) -> Option<u64> {
    if bytes.is_empty() {
        return None;
    }
    bytes.iter().try_fold(0u64, |n, &b| {
        if !b.is_ascii_digit() {
            return None;
        }
        n.checked_mul(10)?.checked_add(u64::from(b - b'0'))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decide(http11: bool, fields: &[(&str, &str)]) -> Result<(Framing, bool), FramingError> {
        let mut rules = FramingRules::new(http11);
        for (name, value) in fields {
            let value = HeaderValue::from_str(value).expect("value");
            match *name {
                "te" => rules.transfer_encoding(&value)?,
                _ => rules.content_length(&value)?,
            };
        }
        rules.finish()
    }

    #[test]
    fn framing_follows_rfc_9112_and_hyper() {
        assert_eq!(decide(true, &[]), Ok((Framing::Empty, false)));
        assert_eq!(decide(true, &[("cl", "0")]), Ok((Framing::Empty, false)));
        assert_eq!(
            decide(true, &[("cl", "5")]),
            Ok((Framing::Length(5), false))
        );
        assert_eq!(
            decide(true, &[("cl", "5"), ("cl", "5")]),
            Ok((Framing::Length(5), false))
        );
        assert_eq!(
            decide(true, &[("cl", "5"), ("cl", "6")]),
            Err(FramingError::DifferentContentLengths)
        );
        for bad in ["+5", "5, 6", "", " 5", "0x5"] {
            assert_eq!(
                decide(true, &[("cl", bad)]),
                Err(FramingError::InvalidContentLength),
                "{bad:?}"
            );
        }
        assert_eq!(
            decide(true, &[("cl", "6"), ("te", "chunked")]),
            Ok((Framing::Chunked, true))
        );
        assert_eq!(
            decide(true, &[("te", "chunked"), ("cl", "zz")]),
            Ok((Framing::Chunked, true))
        );
        assert_eq!(
            decide(true, &[("te", "gzip, chunked")]),
            Ok((Framing::Chunked, false))
        );
        assert_eq!(
            decide(true, &[("te", "chunked, identity")]),
            Err(FramingError::NotChunkedLast)
        );
        assert_eq!(
            decide(true, &[("te", "chunked"), ("te", "identity")]),
            Err(FramingError::NotChunkedLast)
        );
        assert_eq!(
            decide(false, &[("te", "chunked")]),
            Err(FramingError::TransferEncodingInHttp10)
        );
        assert_eq!(
            decide(true, &[("cl", "18446744073709551615")]),
            Err(FramingError::ContentLengthTooLarge)
        );
    }
}
