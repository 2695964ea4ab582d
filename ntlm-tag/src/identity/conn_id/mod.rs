//! The connection id: `<client>/<uid>` by default, where `uid` never repeats and cannot be guessed.
//!
//! `uid` is a random per-process instance nonce (64 bits, 13 characters) followed by AES-128 of a
//! per-process connection counter under a random per-process key (128 bits, 26 characters), both
//! lowercase base32: 39 characters.
//!
//! - Never repeating within a run, without any chance involved: AES under one key is a permutation
//!   of 128-bit blocks, so distinct counters give distinct blocks.
//! - Unique across restarts and gateways: two runs share a prefix only if their 64-bit nonces
//!   collide, and even then their encrypted counters are under independent keys.
//! - Unguessable: the key is drawn from the OS and appears nowhere in any output (the nonce is
//!   drawn separately, nothing is derived from it), so ids seen from one instance tell neither the
//!   key, nor how many connections it counted, nor any other id it issued. For a backend that keys
//!   sessions on the header (Jespa), the id is the session key.
#![forbid(unsafe_code)]

use std::{
    fmt::Write as _,
    net::SocketAddr,
    sync::atomic::{AtomicU64, Ordering},
};

use super::addr_text::AddrText;
use super::proxy_header::{PP2_SUBTYPE_LINK, PP2_TYPE_AWS, ProxyTlvs};
use aes::{
    Aes128,
    cipher::{BlockEncrypt, KeyInit},
};
use thiserror::Error;

/// The default template: the real client's `ip:port` (`[ip]:port` for IPv6), a slash, the uid.
pub const DEFAULT_TEMPLATE: &str = "{client}/{uid}";

/// What a PROXY v2 TLV placeholder renders when the connection's header had no such TLV (or no
/// PROXY v2 header named the client).
pub const MISSING_TLV: &str = "-";
/// Longest TLV value rendered as text; longer ones render as hex of their first bytes.
pub const TLV_TEXT_MAX: usize = 64;
/// Bytes of a TLV value rendered as hex at most (then `~` marks the cut).
pub const TLV_HEX_MAX: usize = 32;

const BASE32: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";
/// Base32 characters of the 64-bit nonce and of the 128-bit encrypted counter.
const NONCE_CHARS: usize = 13;
const TAIL_CHARS: usize = 26;
/// Length of every uid.
pub const UID_CHARS: usize = NONCE_CHARS + TAIL_CHARS;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum TemplateError {
    #[error(
        "unknown placeholder `{{{0}}}` (known: {{client}}, {{client_ip}}, {{client_port}}, {{uid}}, \
         {{aws_vpce_id}}, {{azure_link_id}}, {{tlv:0xNN}})"
    )]
    UnknownPlaceholder(String),
    #[error("`{{{0}}}`: a TLV placeholder names its type as two hex digits, like {{tlv:0xEA}}")]
    BadTlvType(String),
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
    /// PROXY v2 AWS TLV (0xEA), subtype 0x01: the VPC endpoint id.
    AwsVpceId,
    /// PROXY v2 Azure TLV (0xEE), subtype 0x01: the Private Link LinkID (a 32-bit number).
    AzureLinkId,
    /// Any PROXY v2 TLV, by type: its whole value.
    Tlv(u8),
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
                "aws_vpce_id" => Part::AwsVpceId,
                "azure_link_id" => Part::AzureLinkId,
                other => match other.strip_prefix("tlv:") {
                    Some(kind) => Part::Tlv(
                        parse_tlv_type(kind)
                            .ok_or_else(|| TemplateError::BadTlvType(other.to_string()))?,
                    ),
                    None => return Err(TemplateError::UnknownPlaceholder(other.to_string())),
                },
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

    /// True when the template names PROXY v2 TLVs (a listener must receive PROXY headers).
    pub fn uses_proxy_tlvs(&self) -> bool {
        self.parts
            .iter()
            .any(|p| matches!(p, Part::AwsVpceId | Part::AzureLinkId | Part::Tlv(_)))
    }

    /// True when ids rendered from this template can repeat (no `{uid}`).
    pub fn is_reusable(&self) -> bool {
        !self.parts.contains(&Part::Uid)
    }

    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// Renders the id of one connection; `tlvs` are those of the PROXY v2 header that named the
    /// client, if one did.
    pub fn render(&self, client: SocketAddr, uid: &Uid, tlvs: Option<&ProxyTlvs>) -> String {
        let mut out = String::with_capacity(64);
        for part in &self.parts {
            // Writing to a String cannot fail.
            let _ = match part {
                Part::Literal(s) => {
                    out.push_str(s);
                    Ok(())
                }
                Part::Client => {
                    out.push_str(AddrText::socket(canonical(client)).as_str());
                    Ok(())
                }
                Part::ClientIp => {
                    out.push_str(AddrText::ip(canonical(client).ip()).as_str());
                    Ok(())
                }
                Part::ClientPort => write!(out, "{}", client.port()),
                Part::Uid => {
                    out.push_str(uid.as_str());
                    Ok(())
                }
                Part::AwsVpceId => {
                    let id = tlvs
                        .and_then(|t| t.value(PP2_TYPE_AWS))
                        .and_then(|v| v.strip_prefix(&[PP2_SUBTYPE_LINK]));
                    push_tlv_text(&mut out, id);
                    Ok(())
                }
                Part::AzureLinkId => match tlvs.and_then(|t| t.azure_link_id) {
                    Some(link) => write!(out, "{link}"),
                    None => {
                        out.push_str(MISSING_TLV);
                        Ok(())
                    }
                },
                Part::Tlv(kind) => {
                    push_tlv_text(&mut out, tlvs.and_then(|t| t.value(*kind)));
                    Ok(())
                }
            };
        }
        out
    }
}

/// `0xNN` or `0XNN`, two hex digits.
fn parse_tlv_type(text: &str) -> Option<u8> {
    let digits = text
        .strip_prefix("0x")
        .or_else(|| text.strip_prefix("0X"))?;
    if digits.len() != 2 {
        return None;
    }
    u8::from_str_radix(digits, 16).ok()
}

/// A TLV value as it goes into an id: never anything that could break the header or how a
/// backend splits it (no spaces, commas, semicolons, quotes, `/`, `:` or control characters).
/// - missing or empty: [`MISSING_TLV`];
/// - up to [`TLV_TEXT_MAX`] bytes of RFC 3986 unreserved characters (`A-Z a-z 0-9 - . _ ~`), not
///   starting with `0x`: as they are (`vpce-0a1b2c3d`);
/// - anything else: `0x` and lowercase hex of the first [`TLV_HEX_MAX`] bytes, then `~` if the
///   value was longer.
///
/// A balancer is trusted to name the client, yet its TLV bytes are still data: this rendering is
/// what makes any value safe in the header (the same rule for every placeholder).
pub fn push_tlv_text(out: &mut String, value: Option<&[u8]>) {
    let Some(value) = value.filter(|v| !v.is_empty()) else {
        out.push_str(MISSING_TLV);
        return;
    };
    let unreserved = |b: &u8| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~');
    if value.len() <= TLV_TEXT_MAX && value.iter().all(unreserved) && !value.starts_with(b"0x") {
        // All ASCII, checked just above.
        out.extend(value.iter().map(|&b| b as char));
        return;
    }
    out.push_str("0x");
    for b in value.iter().take(TLV_HEX_MAX) {
        // Writing to a String cannot fail.
        let _ = write!(out, "{b:02x}");
    }
    if value.len() > TLV_HEX_MAX {
        out.push('~');
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

/// One connection's unique token: base32 text of a fixed length, on the stack (every new
/// connection makes one and copies it into its id).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Uid([u8; UID_CHARS]);

impl std::fmt::Debug for Uid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), f)
    }
}

impl Uid {
    pub fn as_str(&self) -> &str {
        // Only base32 characters are ever written.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

/// Hands out uids that never repeat and cannot be predicted from the ones seen.
pub struct UidGenerator {
    /// The instance nonce, already in base32 (the same prefix for every uid of this run).
    nonce: [u8; NONCE_CHARS],
    /// The keyed permutation. Its key is never stored anywhere else, logged or printed.
    cipher: Aes128,
    next: AtomicU64,
}

impl std::fmt::Debug for UidGenerator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key: it would let a reader compute every id of this run.
        f.debug_struct("UidGenerator")
            .field("nonce", &self.nonce())
            .finish_non_exhaustive()
    }
}

impl UidGenerator {
    /// A generator with a fresh random nonce and an independent fresh random key, both from the OS.
    pub fn new() -> Result<Self, getrandom::Error> {
        let mut nonce = [0u8; 8];
        getrandom::fill(&mut nonce)?;
        Self::with_nonce(u64::from_be_bytes(nonce))
    }

    /// A generator with the given nonce and a fresh random key (tests and fuzzing: the key must
    /// never be something a caller could know from an id).
    pub fn with_nonce(nonce: u64) -> Result<Self, getrandom::Error> {
        let mut key = [0u8; 16];
        getrandom::fill(&mut key)?;
        Ok(Self::with_nonce_and_key(nonce, key))
    }

    fn with_nonce_and_key(nonce: u64, key: [u8; 16]) -> Self {
        let mut text = [0; NONCE_CHARS];
        write_base32(&mut text, u128::from(nonce));
        UidGenerator {
            nonce: text,
            cipher: Aes128::new(&key.into()),
            next: AtomicU64::new(0),
        }
    }

    /// The instance nonce (base32), the prefix of every uid of this run: logged at start so that an
    /// id can be traced to the gateway run that issued it.
    pub fn nonce(&self) -> &str {
        // Only base32 characters are ever written.
        std::str::from_utf8(&self.nonce).unwrap_or_default()
    }

    pub fn next_uid(&self) -> Uid {
        // 2^64 connections would take 580,000 years at a million a second: the counter never wraps.
        let count = self.next.fetch_add(1, Ordering::Relaxed);
        let mut block = aes::Block::from(u128::from(count).to_be_bytes());
        self.cipher.encrypt_block(&mut block);
        let mut uid = [0; UID_CHARS];
        let (nonce, tail) = uid.split_at_mut(NONCE_CHARS);
        nonce.copy_from_slice(&self.nonce);
        write_base32(tail, u128::from_be_bytes(block.into()));
        Uid(uid)
    }
}

/// Writes the low `5 * out.len()` bits of `v` in base32, most significant first.
fn write_base32(out: &mut [u8], v: u128) {
    let chars = out.len();
    for (i, c) in out.iter_mut().enumerate() {
        *c = BASE32[((v >> ((chars - 1 - i) * 5)) & 31) as usize];
    }
}

#[cfg(test)]
mod tests;
