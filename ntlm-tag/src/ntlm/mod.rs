//! What a client's `Authorization: NTLM|Negotiate <token>` carries: an NTLM message (bare, or
//! wrapped in SPNEGO), a Kerberos token, or something unreadable. Pure functions over bytes.
#![forbid(unsafe_code)]

pub mod message;
mod scheme;

use base64::Engine as _;
use http::{HeaderMap, header};

pub use message::{Authenticate, Message};
pub use scheme::{is_ntlm_challenge, is_ntlm_request};

/// Kerberos v5 mechanism OIDs, DER-encoded: 1.2.840.113554.1.2.2 and Microsoft's
/// 1.2.840.48018.1.2.2.
const KERBEROS_OIDS: [&[u8]; 2] = [
    b"\x06\x09\x2a\x86\x48\x86\xf7\x12\x01\x02\x02",
    b"\x06\x09\x2a\x86\x48\x82\xf7\x12\x01\x02\x02",
];

/// Decoded tokens longer than this are not read (the request head limit bounds them anyway;
/// Kerberos tickets of users in many groups reach tens of kilobytes).
const MAX_TOKEN_BYTES: usize = 64 * 1024;

/// One client token, as far as the gateway can read it without any key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientToken {
    /// An NTLM message, bare (`NTLM`/`Negotiate`) or inside a SPNEGO token.
    Ntlm(Message),
    /// Kerberos, bare or inside SPNEGO: who it names is encrypted.
    Kerberos,
    /// An NTLM/Negotiate token that is neither (broken base64, a malformed message, another mechanism).
    Unreadable,
}

/// The NTLM/Negotiate token of a request's `Authorization`, `None` without one.
pub fn client_token(headers: &HeaderMap) -> Option<ClientToken> {
    let value = headers.get(header::AUTHORIZATION)?.as_bytes().trim_ascii();
    let split = value
        .iter()
        .position(|b| *b == b' ' || *b == b'\t')
        .unwrap_or(value.len());
    let (scheme, token) = value.split_at(split);
    if !(scheme.eq_ignore_ascii_case(b"NTLM") || scheme.eq_ignore_ascii_case(b"Negotiate")) {
        return None;
    }
    Some(read_token(token.trim_ascii()))
}

/// Reads a base64 token as sent after the scheme.
pub fn read_token(base64_token: &[u8]) -> ClientToken {
    if base64_token.len() > MAX_TOKEN_BYTES * 4 / 3 + 4 {
        return ClientToken::Unreadable;
    }
    match base64::engine::general_purpose::STANDARD.decode(base64_token) {
        Ok(bytes) => classify(&bytes),
        Err(_) => ClientToken::Unreadable,
    }
}

/// Classifies decoded token bytes.
///
/// SPNEGO (RFC 4178) wraps the mechanism's token in DER; rather than a full ASN.1 decoder for one
/// field, this finds the NTLM signature (an NTLM message inside SPNEGO is the whole `mechToken`
/// OCTET STRING, and the parser ignores what follows it) or a Kerberos mechanism OID.
pub fn classify(bytes: &[u8]) -> ClientToken {
    if let Some(at) = find(bytes, message::SIGNATURE) {
        return match message::parse(&bytes[at..]) {
            Ok(m) => ClientToken::Ntlm(m),
            Err(_) => ClientToken::Unreadable,
        };
    }
    // GSS-API InitialContextToken ([APPLICATION 0]) or SPNEGO NegTokenResp ([1]) naming Kerberos.
    if matches!(bytes.first(), Some(0x60 | 0xa1))
        && KERBEROS_OIDS.iter().any(|oid| find(bytes, oid).is_some())
    {
        return ClientToken::Kerberos;
    }
    ClientToken::Unreadable
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(value).expect("value"),
        );
        h
    }

    fn b64(bytes: &[u8]) -> String {
        base64::engine::general_purpose::STANDARD.encode(bytes)
    }

    #[test]
    fn ntlm_bare_and_under_negotiate() {
        let t3 = message::tests::type3("CORP", "alice", "WS", &[0; 24]);
        for scheme in ["NTLM", "negotiate"] {
            let Some(ClientToken::Ntlm(Message::Authenticate(a))) =
                client_token(&headers(&format!("{scheme} {}", b64(&t3))))
            else {
                panic!("{scheme}: a Type3");
            };
            assert_eq!(a.account(), "CORP\\alice");
        }
        assert!(matches!(
            client_token(&headers(
                "NTLM TlRMTVNTUAABAAAABoIIAAAAAAAAAAAAAAAAAAAAAAA="
            )),
            Some(ClientToken::Ntlm(Message::Negotiate(_)))
        ));
    }

    #[test]
    fn spnego_wrapped_ntlm_and_kerberos() {
        // NegTokenResp { responseToken OCTET STRING <Type3> }, then a MIC after it.
        let t3 = message::tests::type3("", "bob", "", &[0; 24]);
        let mut spnego = vec![0xa1, 0x82, 0x01, 0x00, 0x30, 0x82, 0x00, 0xfc, 0xa2, 0x82];
        spnego.extend_from_slice(&t3);
        spnego.extend_from_slice(&[0xa3, 0x12, 0x04, 0x10]);
        let Some(ClientToken::Ntlm(Message::Authenticate(a))) =
            client_token(&headers(&format!("Negotiate {}", b64(&spnego))))
        else {
            panic!("a wrapped Type3");
        };
        assert_eq!(a.user, "bob");
        let mut krb = vec![
            0x60, 0x82, 0x05, 0x00, 0x06, 0x06, 0x2b, 0x06, 0x01, 0x05, 0x05, 0x02,
        ];
        krb.extend_from_slice(KERBEROS_OIDS[1]);
        krb.extend_from_slice(&[0; 32]);
        assert_eq!(
            client_token(&headers(&format!("Negotiate {}", b64(&krb)))),
            Some(ClientToken::Kerberos)
        );
    }

    #[test]
    fn other_schemes_and_garbage() {
        assert_eq!(client_token(&headers("Basic YTpi")), None);
        assert_eq!(client_token(&HeaderMap::new()), None);
        assert_eq!(
            client_token(&headers("NTLM !!!")),
            Some(ClientToken::Unreadable)
        );
        assert_eq!(
            client_token(&headers("NTLM")),
            Some(ClientToken::Unreadable)
        );
    }
}
