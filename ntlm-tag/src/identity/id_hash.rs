//! How a connection id appears in logs and the admin table: as a short keyed hash, by default.
//!
//! The full id is a credential to a backend that keys sessions on it (Jespa): whoever reads it from
//! a log file or the admin table can send it to the backend as that connection. So logs and the
//! admin table name a connection by HMAC-SHA256 of its id under a random per-run key, the first 48
//! bits in hex: enough to correlate the lines of one gateway run, of no use without the key (which
//! never leaves the process), and different in every run. `show_full_ids` (an opt-in that logs a
//! warning) shows the full id as well.
#![forbid(unsafe_code)]

use std::{
    fmt,
    sync::{Arc, OnceLock},
};

use http::HeaderValue;
use ring::hmac;

/// Bytes of the HMAC kept: 48 bits, 12 hex digits.
const HASH_BYTES: usize = 6;

/// A connection id's keyed hash, shown as 12 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct IdHash([u8; HASH_BYTES]);

impl fmt::Display for IdHash {
    /// The digits made on the stack and written once: this names the connection on every log
    /// line, and a formatted write per byte cost more than the rest of the field.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut digits = [0u8; 2 * HASH_BYTES];
        for (pair, b) in digits.chunks_exact_mut(2).zip(self.0) {
            pair[0] = HEX[usize::from(b >> 4)];
            pair[1] = HEX[usize::from(b & 0xf)];
        }
        f.write_str(std::str::from_utf8(&digits).map_err(|_| fmt::Error)?)
    }
}

impl fmt::Debug for IdHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Hashes ids for display, with a key drawn at start.
pub struct IdDisplay {
    key: hmac::Key,
    show_full_ids: bool,
}

impl fmt::Debug for IdDisplay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdDisplay")
            .field("show_full_ids", &self.show_full_ids)
            .finish_non_exhaustive()
    }
}

impl IdDisplay {
    /// A fresh random key from the OS.
    pub fn new(show_full_ids: bool) -> Result<Self, getrandom::Error> {
        let mut key = [0u8; 32];
        getrandom::fill(&mut key)?;
        Ok(IdDisplay {
            key: hmac::Key::new(hmac::HMAC_SHA256, &key),
            show_full_ids,
        })
    }

    pub fn hash(&self, id: &str) -> IdHash {
        self.hash_bytes(id.as_bytes())
    }

    fn hash_bytes(&self, id: &[u8]) -> IdHash {
        let tag = hmac::sign(&self.key, id);
        let mut out = [0u8; HASH_BYTES];
        out.copy_from_slice(&tag.as_ref()[..HASH_BYTES]);
        IdHash(out)
    }

    /// `id` itself when the operator asked for full ids, else nothing.
    pub fn full<'a>(&self, id: &'a str) -> Option<&'a str> {
        self.show_full_ids.then_some(id)
    }

    pub fn shows_full_ids(&self) -> bool {
        self.show_full_ids
    }
}

/// How log lines, the access log and the admin table name one connection: the keyed hash of its
/// id, computed the first time it is shown. The HMAC is most of what registering a connection
/// costs; a connection that logs nothing and is never listed (access log off) never pays it.
pub struct ConnName {
    /// The id, shared with the header value every request is stamped with (a clone of it is a
    /// reference count, not a copy).
    id: HeaderValue,
    display: Arc<IdDisplay>,
    hash: OnceLock<IdHash>,
}

impl ConnName {
    pub fn new(id: HeaderValue, display: Arc<IdDisplay>) -> Self {
        ConnName {
            id,
            display,
            hash: OnceLock::new(),
        }
    }

    pub fn hash(&self) -> IdHash {
        *self
            .hash
            .get_or_init(|| self.display.hash_bytes(self.id.as_bytes()))
    }
}

impl fmt::Display for ConnName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.hash(), f)
    }
}

impl fmt::Debug for ConnName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "198.18.0.7:40001/abcdefghijklmnopqrstuvwxyz234567abcdefghi";

    #[test]
    fn the_hash_is_stable_within_a_run_and_differs_between_runs() {
        let a = IdDisplay::new(false).expect("random");
        let b = IdDisplay::new(false).expect("random");
        assert_eq!(a.hash(ID), a.hash(ID));
        assert_ne!(a.hash(ID), b.hash(ID), "keyed with a per-run secret");
        assert_ne!(a.hash(ID), a.hash("198.18.0.7:40001/other"));
    }

    #[test]
    fn the_digits_are_the_bytes_in_lowercase_hex() {
        let hash = IdHash([0x00, 0x0f, 0xa0, 0x5a, 0xff, 0x10]);
        assert_eq!(hash.to_string(), "000fa05aff10");
    }

    #[test]
    fn the_hash_is_twelve_hex_digits_and_shows_nothing_of_the_id() {
        let d = IdDisplay::new(false).expect("random");
        let shown = d.hash(ID).to_string();
        assert_eq!(shown.len(), 12);
        assert!(
            shown
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        );
        assert!(!ID.contains(&shown));
        assert_eq!(d.full(ID), None);
        assert!(!format!("{d:?}").contains("key:"));
    }

    #[test]
    fn a_connection_name_is_the_hash_of_its_id_and_hides_the_id() {
        let d = Arc::new(IdDisplay::new(false).expect("random"));
        let name = ConnName::new(HeaderValue::from_static(ID), Arc::clone(&d));
        assert_eq!(name.hash(), d.hash(ID));
        assert_eq!(name.to_string(), d.hash(ID).to_string());
        assert_eq!(format!("{name:?}"), d.hash(ID).to_string());
    }

    #[test]
    fn full_ids_only_on_request() {
        let d = IdDisplay::new(true).expect("random");
        assert_eq!(d.full(ID), Some(ID));
        assert!(d.shows_full_ids());
    }
}
