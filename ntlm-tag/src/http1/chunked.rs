//! The chunked transfer coding of a request body (RFC 9112 §7.1), decoded with the strict syntax
//! of hyper's decoder: a size of hex digits (at most 64 bits), optional blanks, extensions (ignored,
//! bounded, never a bare LF) and CRLF; CRLF after each chunk's data; trailer fields after the last
//! chunk (bounded, parsed with `httparse`, passed on as trailers). Anything else is an error: the
//! request is broken off and the connection closes.
//!
//! The decoder works on the bytes already read and says when it needs more, so that it can be
//! tested and fuzzed without I/O, and so that a body dropped unread can be skipped when its end
//! has already arrived.
#![forbid(unsafe_code)]

use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue};
use thiserror::Error;

use super::MAX_HEADERS;

/// Bytes of chunk extensions a body may carry in all (hyper's limit).
const EXTENSIONS_LIMIT: u64 = 16 * 1024;
/// Bytes of trailer fields a body may carry (hyper's limit).
const TRAILERS_LIMIT: usize = 16 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum ChunkError {
    #[error("invalid chunk size line")]
    Size,
    #[error("chunk size over 64 bits")]
    SizeOverflow,
    #[error("chunk extension with a bare LF")]
    ExtensionNewline,
    #[error("chunk extensions over {EXTENSIONS_LIMIT} bytes")]
    ExtensionsTooLong,
    #[error("chunk data not followed by CRLF")]
    DataEnd,
    #[error("trailer fields over {TRAILERS_LIMIT} bytes or {MAX_HEADERS} fields")]
    TrailersTooLarge,
    #[error("malformed trailer fields")]
    Trailers,
    #[error("invalid end of the chunked body")]
    End,
}

/// What the decoder found in the bytes it was given.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    Data(Bytes),
    /// The last chunk and the trailer fields (empty when there were none): the body is complete.
    End(HeaderMap),
    /// The bytes so far are consumed; more are needed.
    NeedMore,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Start,
    Size,
    SizeBlank,
    Extension,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    EndCr,
    Trailer,
    TrailerLf,
    EndLf,
    Done,
}

#[derive(Debug)]
pub struct ChunkedDecoder {
    state: State,
    size: u64,
    extension_bytes: u64,
    trailers: Option<BytesMut>,
    trailer_lines: usize,
}

impl Default for ChunkedDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl ChunkedDecoder {
    pub fn new() -> Self {
        ChunkedDecoder {
            state: State::Start,
            size: 0,
            extension_bytes: 0,
            trailers: None,
            trailer_lines: 0,
        }
    }

    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Consumes what it can of `buf`.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, ChunkError> {
        loop {
            if self.state == State::Done {
                return Ok(Decoded::End(HeaderMap::new()));
            }
            if self.state == State::Data {
                if buf.is_empty() {
                    return Ok(Decoded::NeedMore);
                }
                let n = usize::try_from(self.size)
                    .unwrap_or(usize::MAX)
                    .min(buf.len());
                self.size -= n as u64;
                if self.size == 0 {
                    self.state = State::DataCr;
                }
                return Ok(Decoded::Data(buf.split_to(n).freeze()));
            }
            let Some(&byte) = buf.first() else {
                return Ok(Decoded::NeedMore);
            };
            buf.advance(1);
            self.state = self.step(byte)?;
            if self.state == State::Done {
                return self.trailers().map(Decoded::End);
            }
        }
    }

    fn step(&mut self, byte: u8) -> Result<State, ChunkError> {
        Ok(match (self.state, byte) {
            (State::Start, b) => {
                self.size = 0;
                self.add_digit(b).ok_or(ChunkError::Size)??;
                State::Size
            }
            (State::Size, b'\t' | b' ') => State::SizeBlank,
            (State::Size | State::SizeBlank, b';') => State::Extension,
            (State::Size | State::SizeBlank, b'\r') => State::SizeLf,
            (State::Size, b) => {
                self.add_digit(b).ok_or(ChunkError::Size)??;
                State::Size
            }
            (State::SizeBlank, b'\t' | b' ') => State::SizeBlank,
            (State::SizeBlank, _) => return Err(ChunkError::Size),
            (State::Extension, b'\r') => State::SizeLf,
            (State::Extension, b'\n') => return Err(ChunkError::ExtensionNewline),
            (State::Extension, _) => {
                self.extension_bytes += 1;
                if self.extension_bytes >= EXTENSIONS_LIMIT {
                    return Err(ChunkError::ExtensionsTooLong);
                }
                State::Extension
            }
            (State::SizeLf, b'\n') if self.size == 0 => State::EndCr,
            (State::SizeLf, b'\n') => State::Data,
            (State::SizeLf, _) => return Err(ChunkError::Size),
            (State::DataCr, b'\r') => State::DataLf,
            (State::DataLf, b'\n') => State::Start,
            (State::DataCr | State::DataLf, _) => return Err(ChunkError::DataEnd),
            (State::EndCr, b'\r') => {
                self.push_trailer(byte)?;
                State::EndLf
            }
            (State::EndCr, b) => {
                self.trailers
                    .get_or_insert_with(|| BytesMut::with_capacity(64));
                self.push_trailer(b)?;
                State::Trailer
            }
            (State::Trailer, b'\r') => {
                self.push_trailer(byte)?;
                State::TrailerLf
            }
            (State::Trailer, b) => {
                self.push_trailer(b)?;
                State::Trailer
            }
            (State::TrailerLf, b'\n') => {
                if self.trailer_lines >= MAX_HEADERS {
                    return Err(ChunkError::TrailersTooLarge);
                }
                self.trailer_lines += 1;
                self.push_trailer(byte)?;
                State::EndCr
            }
            (State::TrailerLf, _) => return Err(ChunkError::Trailers),
            (State::EndLf, b'\n') => {
                self.push_trailer(byte)?;
                State::Done
            }
            (State::EndLf, _) => return Err(ChunkError::End),
            // `decode` handles data itself and stops at the end: never stepped through.
            (State::Data | State::Done, _) => return Err(ChunkError::End),
        })
    }

    /// One hex digit of the size; `None`: not a hex digit.
    fn add_digit(&mut self, b: u8) -> Option<Result<(), ChunkError>> {
        let digit = char::from(b).to_digit(16)?;
        Some(
            self.size
                .checked_mul(16)
                .and_then(|s| s.checked_add(u64::from(digit)))
                .map(|s| self.size = s)
                .ok_or(ChunkError::SizeOverflow),
        )
    }

    fn push_trailer(&mut self, b: u8) -> Result<(), ChunkError> {
        if let Some(t) = &mut self.trailers {
            if t.len() >= TRAILERS_LIMIT {
                return Err(ChunkError::TrailersTooLarge);
            }
            t.extend_from_slice(&[b]);
        }
        Ok(())
    }

    fn trailers(&mut self) -> Result<HeaderMap, ChunkError> {
        let Some(bytes) = self.trailers.take() else {
            return Ok(HeaderMap::new());
        };
        let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let Ok(httparse::Status::Complete((_, fields))) =
            httparse::parse_headers(&bytes, &mut fields)
        else {
            return Err(ChunkError::Trailers);
        };
        let mut map = HeaderMap::with_capacity(fields.len());
        for f in fields {
            let name =
                HeaderName::from_bytes(f.name.as_bytes()).map_err(|_| ChunkError::Trailers)?;
            let value = HeaderValue::from_bytes(f.value).map_err(|_| ChunkError::Trailers)?;
            map.append(name, value);
        }
        Ok(map)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decodes `input` fed in pieces of `step` bytes: the data, the trailers, or the error.
    fn decode_all(input: &[u8], step: usize) -> Result<(Vec<u8>, HeaderMap, usize), ChunkError> {
        let mut d = ChunkedDecoder::new();
        let mut buf = BytesMut::new();
        let mut data = Vec::new();
        let mut fed = 0;
        loop {
            match d.decode(&mut buf)? {
                Decoded::Data(b) => data.extend_from_slice(&b),
                Decoded::End(t) => return Ok((data, t, buf.len() + input.len() - fed)),
                Decoded::NeedMore if fed == input.len() => return Err(ChunkError::End),
                Decoded::NeedMore => {
                    let n = step.min(input.len() - fed);
                    buf.extend_from_slice(&input[fed..fed + n]);
                    fed += n;
                }
            }
        }
    }

    #[test]
    fn valid_bodies_decode_whatever_the_pieces() {
        let input = b"5\r\nhello\r\nA;ext=1\r\n0123456789\r\n3 \t\r\nabc\r\n0\r\n\r\nNEXT";
        for step in [1, 2, 3, 7, 100] {
            let (data, trailers, left) = decode_all(input, step).expect("valid");
            assert_eq!(data, b"hello0123456789abc", "step {step}");
            assert!(trailers.is_empty());
            assert_eq!(left, 4, "the next request stays: step {step}");
        }
    }

    #[test]
    fn trailers_are_passed_on() {
        let (data, trailers, _) =
            decode_all(b"1\r\na\r\n0\r\nX-Sum: 1\r\nX-Other: b\r\n\r\n", 4).expect("valid");
        assert_eq!(data, b"a");
        assert_eq!(trailers["x-sum"], "1");
        assert_eq!(trailers["x-other"], "b");
    }

    #[test]
    fn invalid_bodies_are_errors() {
        for (input, error) in [
            (&b"zz\r\nhello\r\n0\r\n\r\n"[..], ChunkError::Size),
            (b"-5\r\nhello\r\n0\r\n\r\n", ChunkError::Size),
            (b"0x5\r\nhello\r\n0\r\n\r\n", ChunkError::Size),
            (b"5 5\r\nhello\r\n0\r\n\r\n", ChunkError::Size),
            (b"\r\nhello\r\n0\r\n\r\n", ChunkError::Size),
            (
                b"10000000000000005\r\nhello\r\n0\r\n\r\n",
                ChunkError::SizeOverflow,
            ),
            (b"5\nhello\r\n0\r\n\r\n", ChunkError::Size),
            (b"5;a\nhello\r\n0\r\n\r\n", ChunkError::ExtensionNewline),
            (b"5\r\nhelloX\r\n0\r\n\r\n", ChunkError::DataEnd),
            (b"5\r\nhello\n0\r\n\r\n", ChunkError::DataEnd),
            (b"0\r\n\rX", ChunkError::End),
            (b"0\r\nX: 1\rX", ChunkError::Trailers),
            (b"0\r\nX 1\r\n\r\n", ChunkError::Trailers),
        ] {
            assert_eq!(
                decode_all(input, 3).map(|_| ()),
                Err(error),
                "{:?}",
                String::from_utf8_lossy(input)
            );
        }
        let long_extension = format!("1;{}\r\na\r\n0\r\n\r\n", "e".repeat(20_000));
        assert_eq!(
            decode_all(long_extension.as_bytes(), 4096).map(|_| ()),
            Err(ChunkError::ExtensionsTooLong)
        );
        let many: String = (0..101).map(|i| format!("X-{i}: a\r\n")).collect();
        assert_eq!(
            decode_all(format!("0\r\n{many}\r\n").as_bytes(), 64).map(|_| ()),
            Err(ChunkError::TrailersTooLarge)
        );
    }
}
