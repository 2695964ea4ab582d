//! Where the header fields of a parsed head lie, as offsets into the head's bytes: what is left of
//! `httparse`'s borrowed result once the head is split off its buffer, so that names and values
//! become slices of the head (no copy).
#![deny(unsafe_code)]

use std::ops::Range;

use bytes::Bytes;
use http::HeaderValue;

/// Fields held on the stack; a head with more (rare: a browser sends about a dozen) spills to the
/// heap. Zeroing this many positions costs less than an allocation, zeroing all 100 more.
const INLINE: usize = 16;

/// One field: its name and value as offsets into the head (a head is far below 4 GiB).
#[derive(Clone, Copy, Default)]
pub struct FieldAt {
    name: (u32, u32),
    value: (u32, u32),
}

impl Default for FieldPositions {
    fn default() -> Self {
        Self::new()
    }
}

impl FieldAt {
    pub fn name(self) -> Range<usize> {
        self.name.0 as usize..self.name.1 as usize
    }

    pub fn value(self) -> Range<usize> {
        self.value.0 as usize..self.value.1 as usize
    }

    /// The field's value as a slice of `head`, the bytes it was recorded from, not checked again:
    /// `httparse` (default configuration: no obsolete line folding) accepts in a value exactly
    /// the bytes a `HeaderValue` may hold (HTAB, 0x20–0x7E, 0x80–0xFF; never CR, LF or NUL), and
    /// checking them twice cost about 100 instructions a field. hyper makes its values the same
    /// way. A unit test below holds httparse to that byte set.
    #[allow(unsafe_code)]
    pub fn header_value(self, head: &Bytes) -> HeaderValue {
        let bytes = head.slice(self.value());
        debug_assert!(HeaderValue::from_bytes(&bytes).is_ok());
        // SAFETY: not a memory-safety matter: `HeaderValue`'s invariant is its byte set, which
        // httparse enforced on these bytes when it parsed the head (see above).
        unsafe { HeaderValue::from_maybe_shared_unchecked(bytes) }
    }
}

/// The positions of a head's fields, in order.
pub struct FieldPositions {
    inline: [FieldAt; INLINE],
    len: usize,
    spilled: Vec<FieldAt>,
}

impl FieldPositions {
    /// No fields yet. Made where it is used and filled in place by [`FieldPositions::record`]: it
    /// is a few hundred bytes, and returning it by value copied it twice per head.
    pub fn new() -> Self {
        FieldPositions {
            inline: [FieldAt::default(); INLINE],
            len: 0,
            spilled: Vec::new(),
        }
    }

    /// Records the positions of `headers` within `head` (the buffer they were parsed from).
    pub fn record(&mut self, head: &[u8], headers: &[httparse::Header<'_>]) {
        let base = head.as_ptr() as usize;
        let at = |s: &[u8]| {
            let start = s.as_ptr() as usize - base;
            // A head is bounded (at most 64 KiB): its offsets fit in 32 bits.
            (start as u32, (start + s.len()) as u32)
        };
        let field = |h: &httparse::Header<'_>| FieldAt {
            name: at(h.name.as_bytes()),
            value: at(h.value),
        };
        self.len = headers.len();
        if headers.len() <= INLINE {
            for (slot, h) in self.inline.iter_mut().zip(headers) {
                *slot = field(h);
            }
        } else {
            self.spilled = headers.iter().map(field).collect();
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_slice(&self) -> &[FieldAt] {
        if self.len <= INLINE {
            &self.inline[..self.len]
        } else {
            &self.spilled
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn positions(raw: &[u8]) -> (FieldPositions, Vec<(String, String)>) {
        let mut headers = [httparse::EMPTY_HEADER; 100];
        let mut req = httparse::Request::new(&mut headers);
        assert!(req.parse(raw).expect("valid head").is_complete());
        let expected = req
            .headers
            .iter()
            .map(|h| {
                (
                    h.name.to_string(),
                    String::from_utf8(h.value.to_vec()).expect("ascii"),
                )
            })
            .collect();
        let mut positions = FieldPositions::new();
        positions.record(raw, req.headers);
        (positions, expected)
    }

    fn check(raw: &[u8]) {
        let (positions, expected) = positions(raw);
        assert_eq!(positions.len(), expected.len());
        let found: Vec<(String, String)> = positions
            .as_slice()
            .iter()
            .map(|f| {
                (
                    String::from_utf8(raw[f.name()].to_vec()).expect("ascii"),
                    String::from_utf8(raw[f.value()].to_vec()).expect("ascii"),
                )
            })
            .collect();
        assert_eq!(found, expected);
    }

    #[test]
    fn positions_point_at_every_name_and_value_in_order() {
        check(b"GET / HTTP/1.1\r\nHost: a\r\nX-Empty:\r\nAccept: */*\r\n\r\n");
        check(b"GET / HTTP/1.1\r\n\r\n");
    }

    /// What [`FieldAt::header_value`] relies on: every byte httparse lets into a value is one a
    /// `HeaderValue` may hold, in requests and in responses.
    #[test]
    fn httparse_accepts_in_a_value_only_what_a_header_value_may_hold() {
        for byte in 0..=u8::MAX {
            let value = [b'a', byte, b'b'];
            let mut request = b"GET / HTTP/1.1\r\nX: ".to_vec();
            let mut response = b"HTTP/1.1 200 OK\r\nX: ".to_vec();
            for raw in [&mut request, &mut response] {
                raw.extend_from_slice(&value);
                raw.extend_from_slice(b"\r\n\r\n");
            }
            let mut headers = [httparse::EMPTY_HEADER; 4];
            let request_ok = httparse::Request::new(&mut headers)
                .parse(&request)
                .is_ok_and(|s| s.is_complete());
            let mut headers = [httparse::EMPTY_HEADER; 4];
            let response_ok = httparse::Response::new(&mut headers)
                .parse(&response)
                .is_ok_and(|s| s.is_complete());
            let valid = HeaderValue::from_bytes(&value).is_ok();
            assert!(!request_ok || valid, "request value byte {byte:#04x}");
            assert!(!response_ok || valid, "response value byte {byte:#04x}");
        }
    }

    #[test]
    fn heads_with_more_fields_than_the_stack_holds_spill_to_the_heap() {
        for count in [INLINE - 1, INLINE, INLINE + 1, 99] {
            let mut raw = b"GET / HTTP/1.1\r\n".to_vec();
            for i in 0..count {
                raw.extend_from_slice(format!("X-Field-{i}: value {i}\r\n").as_bytes());
            }
            raw.extend_from_slice(b"\r\n");
            check(&raw);
        }
    }
}
