//! The connection id: `<client>/<uid>` by default, where `uid` never repeats.
//!
//! `uid` is a random per-process nonce (50 bits, drawn at start) followed by a per-process sequence
//! number passed through a keyed permutation of 40-bit numbers, both in lowercase base32 (18
//! characters). The sequence makes ids unique within one run without any chance involved (a
//! permutation never maps two numbers to one); the nonce makes them unique across restarts and
//! across gateways; the permutation keeps the token opaque (it does not count connections).
#![forbid(unsafe_code)]

use std::{
    fmt::Write as _,
    net::SocketAddr,
    sync::atomic::{AtomicU64, Ordering},
};

use thiserror::Error;

/// The default template: the real client's `ip:port` (`[ip]:port` for IPv6), a slash, the uid.
pub const DEFAULT_TEMPLATE: &str = "{client}/{uid}";

const BASE32: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";
const NONCE_CHARS: usize = 10;
const SEQ_BITS: u32 = 40;
const SEQ_MASK: u64 = (1 << SEQ_BITS) - 1;
/// Odd, so multiplying by it is a bijection modulo 2^40.
const SEQ_MULTIPLIER: u64 = 0x9e37_79b9_7f4a_7c15 & SEQ_MASK | 1;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum TemplateError {
    #[error(
        "unknown placeholder `{{{0}}}` (known: {{client}}, {{client_ip}}, {{client_port}}, {{uid}})"
    )]
    UnknownPlaceholder(String),
    #[error("unbalanced `{{` or `}}` at byte {0}")]
    Unbalanced(usize),
    #[error(
        "the template has no {{uid}}: ids would repeat whenever a client ip:port is reused (NAT, terminal servers, \
         reconnects) and a new client could inherit another user's NTLM session; add {{uid}} or set \
         allow_reusable_ids = true"
    )]
    ReusableIds,
    #[error("the template contains a character that is not allowed in an HTTP header value: {0:?}")]
    InvalidCharacter(char),
    #[error("the template is empty")]
    Empty,
    #[error(
        "the template starts or ends with a space: HTTP strips it from a header value (RFC 9110 \
         §5.5), so the backend would see an id other than the one the gateway logs and lists"
    )]
    SurroundingWhitespace,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    Client,
    ClientIp,
    ClientPort,
    Uid,
}

/// A parsed, validated connection-id template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdTemplate {
    parts: Vec<Part>,
    source: String,
}

impl IdTemplate {
    /// Parses `template`. Without `{uid}` it is refused unless `allow_reusable_ids`.
    pub fn parse(template: &str, allow_reusable_ids: bool) -> Result<Self, TemplateError> {
        if template.is_empty() {
            return Err(TemplateError::Empty);
        }
        if let Some(c) = template.chars().find(|c| !(' '..='~').contains(c)) {
            return Err(TemplateError::InvalidCharacter(c));
        }
        if template.starts_with(' ') || template.ends_with(' ') {
            return Err(TemplateError::SurroundingWhitespace);
        }
        let mut parts = Vec::new();
        let mut literal = String::new();
        let mut rest = template;
        let mut offset = 0;
        while let Some(pos) = rest.find(['{', '}']) {
            if rest.as_bytes()[pos] == b'}' {
                return Err(TemplateError::Unbalanced(offset + pos));
            }
            literal.push_str(&rest[..pos]);
            let after = &rest[pos + 1..];
            let end = after
                .find('}')
                .ok_or(TemplateError::Unbalanced(offset + pos))?;
            let name = &after[..end];
            if name.contains('{') {
                return Err(TemplateError::Unbalanced(offset + pos));
            }
            let part = match name {
                "client" => Part::Client,
                "client_ip" => Part::ClientIp,
                "client_port" => Part::ClientPort,
                "uid" => Part::Uid,
                other => return Err(TemplateError::UnknownPlaceholder(other.to_string())),
            };
            if !literal.is_empty() {
                parts.push(Part::Literal(std::mem::take(&mut literal)));
            }
            parts.push(part);
            let consumed = pos + 1 + end + 1;
            offset += consumed;
            rest = &rest[consumed..];
        }
        literal.push_str(rest);
        if !literal.is_empty() {
            parts.push(Part::Literal(literal));
        }
        if !allow_reusable_ids && !parts.contains(&Part::Uid) {
            return Err(TemplateError::ReusableIds);
        }
        Ok(IdTemplate {
            parts,
            source: template.to_string(),
        })
    }

    /// True when ids rendered from this template can repeat (no `{uid}`).
    pub fn is_reusable(&self) -> bool {
        !self.parts.contains(&Part::Uid)
    }

    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// Renders the id of one connection.
    pub fn render(&self, client: SocketAddr, uid: &Uid) -> String {
        let mut out = String::with_capacity(64);
        for part in &self.parts {
            // Writing to a String cannot fail.
            let _ = match part {
                Part::Literal(s) => {
                    out.push_str(s);
                    Ok(())
                }
                Part::Client => write!(out, "{}", canonical(client)),
                Part::ClientIp => write!(out, "{}", canonical(client).ip()),
                Part::ClientPort => write!(out, "{}", client.port()),
                Part::Uid => {
                    out.push_str(uid.as_str());
                    Ok(())
                }
            };
        }
        out
    }
}

/// Shows a v4-mapped IPv6 address (from a dual-stack listener) as the IPv4 address it is.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => addr,
        },
        SocketAddr::V4(_) => addr,
    }
}

/// One connection's unique token.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Uid(String);

impl Uid {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Hands out uids that never repeat.
#[derive(Debug)]
pub struct UidGenerator {
    nonce: String,
    /// XOR key of the sequence permutation (derived from the nonce).
    key: u64,
    next: AtomicU64,
}

impl UidGenerator {
    /// A generator with a fresh random nonce.
    pub fn new() -> Result<Self, getrandom::Error> {
        let mut bytes = [0u8; 8];
        getrandom::fill(&mut bytes)?;
        Ok(Self::with_nonce(u64::from_le_bytes(bytes)))
    }

    /// A generator with a given nonce (tests).
    pub fn with_nonce(nonce: u64) -> Self {
        let mut text = String::with_capacity(NONCE_CHARS);
        for i in (0..NONCE_CHARS).rev() {
            text.push(BASE32[((nonce >> (i * 5)) & 31) as usize] as char);
        }
        UidGenerator {
            nonce: text,
            key: nonce.rotate_left(23).wrapping_mul(0x2545_f491_4f6c_dd1d) & SEQ_MASK,
            next: AtomicU64::new(0),
        }
    }

    pub fn next_uid(&self) -> Uid {
        let seq = self.next.fetch_add(1, Ordering::Relaxed);
        let mut out = String::with_capacity(NONCE_CHARS + 8 + 13);
        out.push_str(&self.nonce);
        // A bijection on 40-bit numbers: multiply by an odd constant, then XOR a key.
        let low = ((seq & SEQ_MASK).wrapping_mul(SEQ_MULTIPLIER) & SEQ_MASK) ^ self.key;
        for i in (0..8).rev() {
            out.push(BASE32[((low >> (i * 5)) & 31) as usize] as char);
        }
        // Past 2^40 connections in one run, the high part keeps ids unique.
        let high = seq >> SEQ_BITS;
        if high > 0 {
            push_base32(&mut out, high);
        }
        Uid(out)
    }
}

/// Appends `v` in base32 with the fewest digits (at least one).
fn push_base32(out: &mut String, mut v: u64) {
    let mut digits = [0u8; 13];
    let mut n = 0;
    loop {
        digits[n] = BASE32[(v & 31) as usize];
        n += 1;
        v >>= 5;
        if v == 0 {
            break;
        }
    }
    for d in digits[..n].iter().rev() {
        out.push(*d as char);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("test address")
    }

    #[test]
    fn default_template_renders_ipv4() {
        let t = IdTemplate::parse(DEFAULT_TEMPLATE, false).expect("valid");
        let uid = UidGenerator::with_nonce(0).next_uid();
        assert_eq!(
            t.render(addr("198.18.0.7:40001"), &uid),
            format!("198.18.0.7:40001/{}", uid.as_str())
        );
        assert_eq!(uid.as_str().len(), 18);
    }

    #[test]
    fn default_template_brackets_ipv6() {
        let t = IdTemplate::parse(DEFAULT_TEMPLATE, false).expect("valid");
        let uid = UidGenerator::with_nonce(1).next_uid();
        assert_eq!(
            t.render(addr("[fd00:5418::2]:443"), &uid),
            format!("[fd00:5418::2]:443/{}", uid.as_str())
        );
    }

    #[test]
    fn v4_mapped_clients_render_as_ipv4() {
        let t =
            IdTemplate::parse("{client_ip} {client_port} {client}|{uid}", false).expect("valid");
        let uid = UidGenerator::with_nonce(0).next_uid();
        assert_eq!(
            t.render(addr("[::ffff:198.18.0.9]:5000"), &uid),
            format!("198.18.0.9 5000 198.18.0.9:5000|{}", uid.as_str())
        );
    }

    #[test]
    fn client_ip_of_ipv6_has_no_brackets() {
        let t = IdTemplate::parse("{client_ip}-{uid}", false).expect("valid");
        let uid = UidGenerator::with_nonce(0).next_uid();
        assert_eq!(
            t.render(addr("[fd00::1]:1"), &uid),
            format!("fd00::1-{}", uid.as_str())
        );
    }

    #[test]
    fn template_without_uid_is_refused_unless_allowed() {
        assert_eq!(
            IdTemplate::parse("{client_ip}:{client_port}", false),
            Err(TemplateError::ReusableIds)
        );
        let t = IdTemplate::parse("{client_ip}:{client_port}", true).expect("allowed");
        assert!(t.is_reusable());
    }

    #[test]
    fn malformed_templates_are_refused() {
        assert_eq!(
            IdTemplate::parse("{uid", false),
            Err(TemplateError::Unbalanced(0))
        );
        assert_eq!(
            IdTemplate::parse("x}{uid}", false),
            Err(TemplateError::Unbalanced(1))
        );
        assert_eq!(
            IdTemplate::parse("{user}{uid}", false),
            Err(TemplateError::UnknownPlaceholder("user".into()))
        );
        assert_eq!(
            IdTemplate::parse("{uid}\n", false),
            Err(TemplateError::InvalidCharacter('\n'))
        );
        assert_eq!(IdTemplate::parse("", true), Err(TemplateError::Empty));
        for t in [" {client}/{uid}", "{client}/{uid} ", "  {uid}  ", " "] {
            assert_eq!(
                IdTemplate::parse(t, true),
                Err(TemplateError::SurroundingWhitespace),
                "{t:?}"
            );
        }
        // Inner spaces stay part of the value.
        assert!(IdTemplate::parse("{client} {uid}", false).is_ok());
    }

    #[test]
    fn uids_never_repeat_within_a_generator() {
        let g = UidGenerator::with_nonce(42);
        let uids: HashSet<_> = (0..100_000).map(|_| g.next_uid()).collect();
        assert_eq!(uids.len(), 100_000);
    }

    #[test]
    fn generators_with_different_nonces_never_collide() {
        let a = UidGenerator::with_nonce(1);
        let b = UidGenerator::with_nonce(2);
        let from_a: HashSet<_> = (0..1000).map(|_| a.next_uid()).collect();
        assert!((0..1000).all(|_| !from_a.contains(&b.next_uid())));
    }

    #[test]
    fn uids_do_not_show_a_sequence() {
        let g = UidGenerator::with_nonce(7);
        let a = g.next_uid();
        let b = g.next_uid();
        // Same nonce, then tails that differ in more than the last character.
        assert_eq!(a.as_str()[..10], b.as_str()[..10]);
        assert_ne!(a.as_str()[10..17], b.as_str()[10..17]);
    }

    #[test]
    fn the_permutation_is_a_bijection_beyond_2_to_the_40() {
        let g = UidGenerator::with_nonce(9);
        g.next.store(SEQ_MASK - 2, Ordering::Relaxed);
        let uids: HashSet<_> = (0..6).map(|_| g.next_uid()).collect();
        assert_eq!(uids.len(), 6);
        assert!(uids.iter().any(|u| u.as_str().len() > 18));
    }

    #[test]
    fn uid_is_short_and_header_safe() {
        let g = UidGenerator::new().expect("random");
        let uid = g.next_uid();
        assert!(uid.as_str().len() <= 23);
        assert!(uid.as_str().bytes().all(|b| b.is_ascii_alphanumeric()));
    }
}
