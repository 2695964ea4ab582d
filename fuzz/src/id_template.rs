//! Connection-id templates: `IdTemplate::parse` on arbitrary text, `render` for arbitrary client
//! addresses, with uids from `UidGenerator`.
//!
//! Input: `flags`, 16 address bytes, 2 port bytes (big-endian), 8 nonce bytes, then the template
//! (UTF-8, lossily). `flags` bit 0: `allow_reusable_ids`; bits 1-2: the client address is IPv4
//! (first 4 bytes), IPv6, IPv4 v4-mapped into IPv6 (a dual-stack listener), or IPv6 with a scope id;
//! bit 3: the connection came with PROXY v2 TLVs, made from the nonce bytes: an AWS VPC endpoint
//! id (0xEA, subtype 0x01, the 8 bytes), an Azure LinkID (the low 32 bits), and a TLV of type
//! `nonce[0]` whose value is the 8 bytes repeated `nonce[1]` times (up to 2040 bytes).
//!
//! Checked:
//! - a template is accepted only if it is non-empty printable ASCII that neither starts nor ends
//!   with a space (HTTP strips such spaces from header values); `allow_reusable_ids` accepts a
//!   superset, exactly the templates without `{uid}` more, and parses the rest identically;
//!   `is_reusable` is "has no `{uid}`"; `as_str` gives the template back;
//! - a rendered id is a valid header value, and `ConnectionStamp::new` (what the gateway does
//!   with it on every accepted connection) accepts it;
//! - it is the template with each placeholder replaced by the canonical client (v4-mapped shown as
//!   IPv4), its ip, its port, the uid, or the TLV's rendering (`-` when missing);
//! - a TLV value renders as at most 64 unreserved characters (`A-Z a-z 0-9 - . _ ~`) that are the
//!   value itself, or `0x` and hex of at most 32 bytes then `~`: never anything else;
//! - with `{uid}` it contains the uid and two uids give two ids; without, the id never changes;
//! - uids are `UID_CHARS` (39) lowercase base32 characters that start with the instance nonce,
//!   and two in a row differ (the key is random: the input only chooses the nonce).
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6};

use http::HeaderValue;
use ntlm_tag::{
    identity::{
        conn_id::{
            IdTemplate, MISSING_TLV, TLV_HEX_MAX, TLV_TEXT_MAX, TemplateError, UID_CHARS, Uid,
            UidGenerator, canonical, push_tlv_text,
        },
        proxy_header::ProxyTlvs,
    },
    proxy::rewrite::{ClientScheme, ConnectionStamp, StampPolicy},
};

pub const HEADER_BYTES: usize = 1 + 16 + 2 + 8;

#[derive(Debug)]
pub struct Input {
    pub allow_reusable: bool,
    pub client: SocketAddr,
    pub nonce: u64,
    pub tlvs: Option<ProxyTlvs>,
    pub template: String,
}

impl Input {
    pub fn decode(data: &[u8]) -> Option<Self> {
        if data.len() < HEADER_BYTES {
            return None;
        }
        let flags = data[0];
        let a: [u8; 16] = data[1..17].try_into().ok()?;
        let port = u16::from_be_bytes([data[17], data[18]]);
        let nonce = u64::from_be_bytes(data[19..27].try_into().ok()?);
        let v4 = Ipv4Addr::new(a[0], a[1], a[2], a[3]);
        let client = match (flags >> 1) & 3 {
            0 => SocketAddr::new(IpAddr::V4(v4), port),
            1 => SocketAddr::new(IpAddr::V6(Ipv6Addr::from(a)), port),
            2 => SocketAddr::new(IpAddr::V6(v4.to_ipv6_mapped()), port),
            _ => SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(a),
                port,
                nonce as u32,
                (nonce >> 32) as u32,
            )),
        };
        let n = nonce.to_be_bytes();
        let tlvs = (flags & 8 != 0).then(|| ProxyTlvs {
            raw: vec![
                (0xEA, [&[0x01u8][..], &n].concat().into()),
                (n[0], n.repeat(usize::from(n[1])).into()),
            ],
            azure_link_id: Some(nonce as u32),
            ..ProxyTlvs::default()
        });
        Some(Input {
            allow_reusable: flags & 1 == 1,
            client,
            nonce,
            tlvs,
            template: String::from_utf8_lossy(&data[HEADER_BYTES..]).into_owned(),
        })
    }
}

pub fn check(data: &[u8]) {
    let Some(input) = Input::decode(data) else {
        return;
    };
    let t = input.template.as_str();
    let strict = IdTemplate::parse(t, false);
    let lax = IdTemplate::parse(t, true);
    let has_uid = t.contains("{uid}");

    match (&strict, &lax) {
        (Ok(s), Ok(l)) => {
            assert_eq!(s, l, "allow_reusable_ids changed the parse of {t:?}");
            assert!(
                has_uid,
                "accepted without allow_reusable_ids and without {{uid}}: {t:?}"
            );
        }
        (Err(TemplateError::ReusableIds), Ok(_)) => {
            assert!(!has_uid, "refused as reusable though it has {{uid}}: {t:?}");
        }
        (Err(a), Err(b)) => assert_eq!(a, b, "two reasons to refuse {t:?}"),
        _ => panic!("allow_reusable_ids narrowed what is accepted: {t:?}: {strict:?} vs {lax:?}"),
    }
    let Ok(template) = (if input.allow_reusable { lax } else { strict }) else {
        return;
    };
    assert!(!t.is_empty(), "empty template accepted");
    assert!(
        t.chars().all(|c| (' '..='~').contains(&c)),
        "non-printable template accepted: {t:?}"
    );
    assert!(
        !t.starts_with(' ') && !t.ends_with(' '),
        "a template with surrounding spaces accepted: {t:?}"
    );
    assert_eq!(template.as_str(), t);
    assert_eq!(template.is_reusable(), !has_uid, "is_reusable of {t:?}");

    let uids = UidGenerator::with_nonce(input.nonce).expect("random key");
    let (u1, u2) = (uids.next_uid(), uids.next_uid());
    for u in [&u1, &u2] {
        assert_eq!(u.as_str().len(), UID_CHARS, "uid {u:?}");
        assert!(
            u.as_str().starts_with(uids.nonce()),
            "uid {u:?} lacks the nonce"
        );
        assert!(
            u.as_str()
                .bytes()
                .all(|b| b.is_ascii_lowercase() || (b'2'..=b'7').contains(&b)),
            "uid {u:?} is not base32"
        );
    }
    assert_ne!(
        u1, u2,
        "two uids in a row are equal (nonce {:#x})",
        input.nonce
    );

    if let Some(tlvs) = &input.tlvs {
        for (_, value) in &tlvs.raw {
            check_tlv_text(value);
        }
    }
    let id = template.render(input.client, &u1, input.tlvs.as_ref());
    assert!(
        HeaderValue::from_str(&id).is_ok(),
        "{t:?} rendered for {} is not a header value: {id:?}",
        input.client
    );
    let policy = StampPolicy::new(http::HeaderName::from_static("jespa-connection-id"), true);
    if let Err(e) = ConnectionStamp::new(id.clone(), input.client, ClientScheme::Https, &policy) {
        panic!(
            "ConnectionStamp::new refused {id:?} for {}: {e}",
            input.client
        );
    }
    assert_eq!(
        id,
        expand(t, input.client, &u1, input.tlvs.as_ref()),
        "{t:?} rendered for {}",
        input.client
    );
    let other = template.render(input.client, &u2, input.tlvs.as_ref());
    if has_uid {
        assert!(id.contains(u1.as_str()), "{id:?} lacks its uid {u1:?}");
        assert_ne!(id, other, "two uids, one id: {t:?}");
    } else {
        assert_eq!(id, other, "an id without {{uid}} changed: {t:?}");
    }
}

/// A TLV value's rendering is the value itself when short unreserved text, else bounded hex.
fn check_tlv_text(value: &[u8]) {
    let mut out = String::new();
    push_tlv_text(&mut out, Some(value));
    let unreserved = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | '~');
    assert!(out.chars().all(unreserved), "{value:?} rendered {out:?}");
    if value.is_empty() {
        assert_eq!(out, MISSING_TLV);
    } else if out.as_bytes() == value {
        assert!(
            value.len() <= TLV_TEXT_MAX && !out.starts_with("0x"),
            "{out:?}"
        );
    } else {
        let hex = out
            .strip_prefix("0x")
            .unwrap_or_else(|| panic!("{value:?} rendered {out:?}"));
        let hex = hex.strip_suffix('~').unwrap_or(hex);
        assert!(hex.len() <= 2 * TLV_HEX_MAX, "{out:?} is too long");
        assert_eq!(
            hex.len(),
            2 * value.len().min(TLV_HEX_MAX),
            "{value:?} rendered {out:?}"
        );
        assert_eq!(out.ends_with('~'), value.len() > TLV_HEX_MAX, "{out:?}");
    }
}

/// What a TLV placeholder becomes, by the documented rules.
fn tlv(value: Option<&[u8]>) -> String {
    let mut out = String::new();
    push_tlv_text(&mut out, value);
    out
}

/// The template with its placeholders replaced (it was accepted, so braces only open placeholders).
fn expand(t: &str, client: SocketAddr, uid: &Uid, tlvs: Option<&ProxyTlvs>) -> String {
    let client = canonical(client);
    let mut out = String::new();
    let mut rest = t;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let close = open
            + rest[open..]
                .find('}')
                .expect("accepted templates are balanced");
        match &rest[open + 1..close] {
            "client" => out.push_str(&client.to_string()),
            "client_ip" => out.push_str(&client.ip().to_string()),
            "client_port" => out.push_str(&client.port().to_string()),
            "uid" => out.push_str(uid.as_str()),
            "aws_vpce_id" => out.push_str(&tlv(tlvs
                .and_then(|t| t.value(0xEA))
                .and_then(|v| v.strip_prefix(&[0x01])))),
            "azure_link_id" => match tlvs.and_then(|t| t.azure_link_id) {
                Some(link) => out.push_str(&link.to_string()),
                None => out.push_str(MISSING_TLV),
            },
            other => {
                let kind = other
                    .strip_prefix("tlv:0x")
                    .or_else(|| other.strip_prefix("tlv:0X"))
                    .and_then(|hex| u8::from_str_radix(hex, 16).ok())
                    .unwrap_or_else(|| {
                        panic!("accepted an unknown placeholder {other:?} in {t:?}")
                    });
                out.push_str(&tlv(tlvs.and_then(|t| t.value(kind))));
            }
        }
        rest = &rest[close + 1..];
    }
    out.push_str(rest);
    out
}
