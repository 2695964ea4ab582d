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
                Part::Client => write!(out, "{}", canonical(client)),
                Part::ClientIp => write!(out, "{}", canonical(client).ip()),
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

/// One connection's unique token.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Uid(String);

impl Uid {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Hands out uids that never repeat and cannot be predicted from the ones seen.
pub struct UidGenerator {
    /// The instance nonce, already in base32 (the same prefix for every uid of this run).
    nonce: String,
    /// The keyed permutation. Its key is never stored anywhere else, logged or printed.
    cipher: Aes128,
    next: AtomicU64,
}

impl std::fmt::Debug for UidGenerator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key: it would let a reader compute every id of this run.
        f.debug_struct("UidGenerator")
            .field("nonce", &self.nonce)
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
        let mut text = String::with_capacity(NONCE_CHARS);
        push_base32(&mut text, u128::from(nonce), NONCE_CHARS);
        UidGenerator {
            nonce: text,
            cipher: Aes128::new(&key.into()),
            next: AtomicU64::new(0),
        }
    }

    /// The instance nonce (base32), the prefix of every uid of this run: logged at start so that an
    /// id can be traced to the gateway run that issued it.
    pub fn nonce(&self) -> &str {
        &self.nonce
    }

    pub fn next_uid(&self) -> Uid {
        // 2^64 connections would take 580,000 years at a million a second: the counter never wraps.
        let count = self.next.fetch_add(1, Ordering::Relaxed);
        let mut block = aes::Block::from(u128::from(count).to_be_bytes());
        self.cipher.encrypt_block(&mut block);
        let mut out = String::with_capacity(UID_CHARS);
        out.push_str(&self.nonce);
        push_base32(&mut out, u128::from_be_bytes(block.into()), TAIL_CHARS);
        Uid(out)
    }
}

/// Appends the low `5 * chars` bits of `v` in base32, most significant first.
fn push_base32(out: &mut String, v: u128, chars: usize) {
    for i in (0..chars).rev() {
        out.push(BASE32[((v >> (i * 5)) & 31) as usize] as char);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("test address")
    }

    fn generator(nonce: u64) -> UidGenerator {
        UidGenerator::with_nonce(nonce).expect("random key")
    }

    /// The 128-bit block behind a uid's tail.
    fn tail_bits(uid: &Uid) -> u128 {
        uid.as_str()[NONCE_CHARS..].bytes().fold(0u128, |acc, c| {
            let digit = BASE32.iter().position(|&b| b == c).expect("base32") as u128;
            (acc << 5) | digit
        })
    }

    fn tlvs(raw: &[(u8, &[u8])], azure_link_id: Option<u32>) -> ProxyTlvs {
        ProxyTlvs {
            raw: raw.iter().map(|(k, v)| (*k, Box::from(*v))).collect(),
            azure_link_id,
            ..ProxyTlvs::default()
        }
    }

    #[test]
    fn tlv_placeholders_name_the_link_and_say_dash_when_missing() {
        let t = IdTemplate::parse(
            "{client}/{aws_vpce_id}/{azure_link_id}/{tlv:0x30}/{uid}",
            false,
        )
        .expect("valid");
        assert!(t.uses_proxy_tlvs());
        assert!(
            !IdTemplate::parse(DEFAULT_TEMPLATE, false)
                .expect("valid")
                .uses_proxy_tlvs()
        );
        let uid = Uid("u".into());
        let client = addr("10.0.0.5:40000");
        let aws = [&[0x01u8][..], b"vpce-08d2bf15fac5001c9"].concat();
        let with = tlvs(&[(0xEA, &aws), (0x30, b"link.A_1~")], Some(42));
        assert_eq!(
            t.render(client, &uid, Some(&with)),
            "10.0.0.5:40000/vpce-08d2bf15fac5001c9/42/link.A_1~/u"
        );
        assert_eq!(t.render(client, &uid, None), "10.0.0.5:40000/-/-/-/u");
        // An AWS TLV of another subtype is not the endpoint id.
        let other = tlvs(&[(0xEA, &[0x02, b'x'])], None);
        assert_eq!(
            t.render(client, &uid, Some(&other)),
            "10.0.0.5:40000/-/-/-/u"
        );
        // Upper-case hex works too.
        let t = IdTemplate::parse("{tlv:0XeA}{uid}", false).expect("valid");
        assert_eq!(t.render(client, &uid, Some(&other)), "0x0278u");
    }

    #[test]
    fn tlv_values_that_could_break_the_header_render_as_bounded_hex() {
        let text = |v: &[u8]| {
            let mut out = String::new();
            push_tlv_text(&mut out, Some(v));
            out
        };
        assert_eq!(text(b"vpce-1"), "vpce-1");
        assert_eq!(text(b""), MISSING_TLV);
        assert_eq!(text(b"a,b"), "0x612c62");
        assert_eq!(text(b"a;b"), "0x613b62");
        assert_eq!(text(b"a b"), "0x612062");
        assert_eq!(text(b"a\r\nX-Evil: 1"), "0x610d0a582d4576696c3a2031");
        assert_eq!(text(b"a/b:c"), "0x612f623a63");
        assert_eq!(text(&[0xff, 0x00]), "0xff00");
        // Text that looks like hex is hex, so the two forms never collide.
        assert_eq!(text(b"0x12"), "0x30783132");
        assert_eq!(text(&[b'a'; TLV_TEXT_MAX]).len(), TLV_TEXT_MAX);
        let long = text(&[b'a'; TLV_TEXT_MAX + 1]);
        assert_eq!(long, format!("0x{}~", "61".repeat(TLV_HEX_MAX)));
        for bytes in [&[0u8; 1000][..], b"x\x7f", "é".as_bytes()] {
            let id = text(bytes);
            assert!(http::HeaderValue::from_str(&id).is_ok(), "{id:?}");
            assert!(id.len() <= 2 + 2 * TLV_HEX_MAX + 1, "{id:?}");
        }
    }

    #[test]
    fn tlv_placeholders_need_a_type_in_hex() {
        for bad in [
            "{tlv:EA}{uid}",
            "{tlv:0xE}{uid}",
            "{tlv:0xEAA}{uid}",
            "{tlv:0xZZ}{uid}",
            "{tlv:}{uid}",
        ] {
            assert!(
                matches!(
                    IdTemplate::parse(bad, false),
                    Err(TemplateError::BadTlvType(_))
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn default_template_renders_ipv4() {
        let t = IdTemplate::parse(DEFAULT_TEMPLATE, false).expect("valid");
        let uid = generator(0).next_uid();
        assert_eq!(
            t.render(addr("198.18.0.7:40001"), &uid, None),
            format!("198.18.0.7:40001/{}", uid.as_str())
        );
        assert_eq!(uid.as_str().len(), UID_CHARS);
    }

    #[test]
    fn default_template_brackets_ipv6() {
        let t = IdTemplate::parse(DEFAULT_TEMPLATE, false).expect("valid");
        let uid = generator(1).next_uid();
        assert_eq!(
            t.render(addr("[fd00:5418::2]:443"), &uid, None),
            format!("[fd00:5418::2]:443/{}", uid.as_str())
        );
    }

    #[test]
    fn v4_mapped_clients_render_as_ipv4() {
        let t =
            IdTemplate::parse("{client_ip} {client_port} {client}|{uid}", false).expect("valid");
        let uid = generator(0).next_uid();
        assert_eq!(
            t.render(addr("[::ffff:198.18.0.9]:5000"), &uid, None),
            format!("198.18.0.9 5000 198.18.0.9:5000|{}", uid.as_str())
        );
    }

    #[test]
    fn client_ip_of_ipv6_has_no_brackets() {
        let t = IdTemplate::parse("{client_ip}-{uid}", false).expect("valid");
        let uid = generator(0).next_uid();
        assert_eq!(
            t.render(addr("[fd00::1]:1"), &uid, None),
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
        let g = generator(42);
        let uids: HashSet<_> = (0..100_000).map(|_| g.next_uid()).collect();
        assert_eq!(uids.len(), 100_000);
    }

    #[test]
    fn generators_with_different_nonces_never_collide() {
        let a = generator(1);
        let b = generator(2);
        let from_a: HashSet<_> = (0..1000).map(|_| a.next_uid()).collect();
        assert!((0..1000).all(|_| !from_a.contains(&b.next_uid())));
    }

    #[test]
    fn the_tail_is_aes_128_of_the_counter() {
        // FIPS-197 / NIST: AES-128 of the all-zero block under the all-zero key.
        let g = UidGenerator::with_nonce_and_key(0, [0; 16]);
        let first = g.next_uid();
        assert_eq!(&first.as_str()[..NONCE_CHARS], "aaaaaaaaaaaaa");
        assert_eq!(tail_bits(&first), 0x66e9_4bd4_ef8a_2c3b_884c_fa59_ca34_2b2e);
    }

    #[test]
    fn consecutive_uids_share_only_the_nonce() {
        let g = generator(7);
        let uids: Vec<Uid> = (0..1000).map(|_| g.next_uid()).collect();
        for pair in uids.windows(2) {
            assert_eq!(pair[0].as_str()[..NONCE_CHARS], *g.nonce());
            assert_eq!(
                pair[0].as_str()[..NONCE_CHARS],
                pair[1].as_str()[..NONCE_CHARS]
            );
            // A counter (even one multiplied and XORed with a key, as ids once were) changes a few
            // low bits from one connection to the next; a block cipher changes half of all 128,
            // about 64 ± 6. Bounds far outside chance, so the test never flakes.
            let changed = (tail_bits(&pair[0]) ^ tail_bits(&pair[1])).count_ones();
            assert!(
                (24..=104).contains(&changed),
                "{changed} bits changed between {} and {}",
                pair[0].as_str(),
                pair[1].as_str()
            );
        }
        // Nor is the difference between neighbours a constant that would give the next one away.
        let steps: HashSet<u128> = uids
            .windows(2)
            .map(|p| tail_bits(&p[0]) ^ tail_bits(&p[1]))
            .collect();
        assert_eq!(steps.len(), uids.len() - 1);
    }

    #[test]
    fn the_key_is_not_derived_from_anything_printed() {
        // Two runs with the same nonce (the only instance-wide thing a uid shows): if the key came
        // from the nonce, both would issue exactly the same uids.
        let a = generator(0x5eed);
        let b = generator(0x5eed);
        let from_a: HashSet<_> = (0..1000).map(|_| a.next_uid()).collect();
        let from_b: HashSet<_> = (0..1000).map(|_| b.next_uid()).collect();
        assert!(from_a.is_disjoint(&from_b));
    }

    #[test]
    fn the_key_is_never_shown() {
        let key = *b"0123456789abcdef";
        let g = UidGenerator::with_nonce_and_key(3, key);
        let debug = format!("{g:?}");
        assert!(
            !debug.contains("0123456789abcdef") && !debug.contains("48, 49, 50"),
            "{debug}"
        );
        assert!(debug.contains(g.nonce()));
    }

    #[test]
    fn uid_is_lowercase_base32_of_fixed_length() {
        let g = UidGenerator::new().expect("random");
        for _ in 0..100 {
            let uid = g.next_uid();
            assert_eq!(uid.as_str().len(), UID_CHARS);
            assert!(
                uid.as_str().bytes().all(|b| BASE32.contains(&b)),
                "{}",
                uid.as_str()
            );
        }
    }
}
