//! Request and response header rewriting: remove what a client must not choose (identity headers and
//! their look-alikes, hop-by-hop headers), then stamp the connection id and the forwarding headers.
#![forbid(unsafe_code)]

use std::net::SocketAddr;

use http::{
    HeaderMap, HeaderName, HeaderValue,
    header::{CONNECTION, FORWARDED, TE, TRAILER, TRANSFER_ENCODING, UPGRADE},
};

/// Headers that describe one hop, never forwarded (RFC 9110 §7.6.1), besides those `Connection` names.
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Client-supplied headers that claim who the client is; the gateway sets them itself or not at all.
const FORWARDING_HEADERS: [&str; 4] = ["x-forwarded-for", "forwarded", "x-real-ip", "x-client-ip"];

/// Standard headers that must not be chosen as the connection-id header.
const RESERVED: [&str; 12] = [
    "host",
    "content-length",
    "content-type",
    "authorization",
    "www-authenticate",
    "cookie",
    "set-cookie",
    "expect",
    "x-forwarded-for",
    "forwarded",
    "x-real-ip",
    "x-client-ip",
];

/// True when `name` is a standard, hop-by-hop or forwarding header.
pub fn is_reserved_header(name: &HeaderName) -> bool {
    let n = name.as_str();
    RESERVED.contains(&n) || HOP_BY_HOP.contains(&n)
}

/// `name` folded the way lenient backends (CGI, some servlet containers) fold header names: letters and
/// digits only, lowercase. `Jespa_Connection_Id` and `jespa.connection.id` fold like
/// `Jespa-Connection-Id`.
fn fold(name: &str) -> impl Iterator<Item = u8> + '_ {
    name.bytes()
        .filter(u8::is_ascii_alphanumeric)
        .map(|b| b.to_ascii_lowercase())
}

fn folds_equal(a: &str, b: &str) -> bool {
    fold(a).eq(fold(b))
}

/// What the gateway stamps on upstream requests.
#[derive(Debug, Clone)]
pub struct StampPolicy {
    pub id_header: HeaderName,
    pub forwarded_headers: bool,
}

/// The per-connection header values, rendered once when the connection is accepted.
#[derive(Debug, Clone)]
pub struct ConnectionStamp {
    pub id: HeaderValue,
    pub x_forwarded_for: HeaderValue,
    pub forwarded: HeaderValue,
}

impl ConnectionStamp {
    /// Renders the values for a connection. `id` was rendered from a validated template, so it is a
    /// valid header value; anything else is an internal error.
    pub fn new(id: &str, client: SocketAddr) -> Result<Self, http::header::InvalidHeaderValue> {
        let ip = client.ip();
        let node = match client {
            SocketAddr::V4(v4) => format!("\"{}:{}\"", v4.ip(), v4.port()),
            SocketAddr::V6(v6) => format!("\"[{}]:{}\"", v6.ip(), v6.port()),
        };
        Ok(ConnectionStamp {
            id: HeaderValue::from_str(id)?,
            x_forwarded_for: HeaderValue::from_str(&ip.to_string())?,
            forwarded: HeaderValue::from_str(&format!("for={node};proto=http"))?,
        })
    }
}

/// Removes hop-by-hop headers, including those named by `Connection`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [CONNECTION, TE, TRAILER, TRANSFER_ENCODING, UPGRADE] {
        headers.remove(name);
    }
    for name in [
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
    ] {
        headers.remove(name);
    }
}

/// Prepares a client request's headers for the backend: strips hop-by-hop headers, every client copy
/// of the identity headers (any case and look-alikes), and stamps this connection's values.
pub fn prepare_request(headers: &mut HeaderMap, policy: &StampPolicy, stamp: &ConnectionStamp) {
    strip_hop_by_hop(headers);
    let id_name = policy.id_header.as_str();
    let forged: Vec<HeaderName> = headers
        .keys()
        .filter(|k| {
            let k = k.as_str();
            folds_equal(k, id_name) || FORWARDING_HEADERS.iter().any(|f| folds_equal(k, f))
        })
        .cloned()
        .collect();
    for name in forged {
        headers.remove(name);
    }
    headers.insert(policy.id_header.clone(), stamp.id.clone());
    if policy.forwarded_headers {
        headers.insert("x-forwarded-for", stamp.x_forwarded_for.clone());
        headers.insert(FORWARDED, stamp.forwarded.clone());
    }
}

/// The transfer codings of a message other than one `chunked`, if it has any (`gzip, chunked` gives
/// `Some("gzip, chunked")`). The gateway removes `Transfer-Encoding` and lets the HTTP layer frame
/// each hop (chunked): any other coding would be lost on the way and its coded bytes passed on as
/// if they were the content. RFC 9112 §6.1: a server that receives a transfer coding it does not
/// understand SHOULD answer 501 (Not Implemented); the gateway does so and never forwards it.
pub fn unsupported_transfer_coding(headers: &HeaderMap) -> Option<String> {
    let values: Vec<&HeaderValue> = headers.get_all(TRANSFER_ENCODING).iter().collect();
    let mut codings = 0usize;
    let mut only_chunked = true;
    for v in &values {
        let Ok(text) = v.to_str() else {
            only_chunked = false;
            continue;
        };
        // Empty list elements are allowed (RFC 9110 §5.6.1) and mean nothing.
        for coding in text.split(',').map(str::trim).filter(|c| !c.is_empty()) {
            codings += 1;
            only_chunked &= coding.eq_ignore_ascii_case("chunked");
        }
    }
    if values.is_empty() || (only_chunked && codings == 1) {
        return None;
    }
    Some(
        values
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect::<Vec<_>>()
            .join(", "),
    )
}

/// Prepares a backend response for the client: hop-by-hop headers are removed; everything else,
/// including several `WWW-Authenticate` values, passes in order.
pub fn prepare_response(headers: &mut HeaderMap) {
    strip_hop_by_hop(headers);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(forwarded_headers: bool) -> StampPolicy {
        StampPolicy {
            id_header: HeaderName::from_static("jespa-connection-id"),
            forwarded_headers,
        }
    }

    fn stamp() -> ConnectionStamp {
        ConnectionStamp::new(
            "198.18.0.2:4000/abc",
            "198.18.0.2:4000".parse().expect("addr"),
        )
        .expect("valid")
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).expect("name"),
                HeaderValue::from_str(v).expect("value"),
            );
        }
        h
    }

    #[test]
    fn client_identity_headers_and_look_alikes_are_replaced() {
        let mut h = headers(&[
            ("Jespa-Connection-Id", "forged-1"),
            ("JESPA-CONNECTION-ID", "forged-2"),
            ("jespa_connection_id", "forged-3"),
            ("Jespa.Connection.Id", "forged-4"),
            ("jespaconnectionid", "forged-5"),
            ("X-Forwarded-For", "203.0.113.9"),
            ("x_forwarded_for", "203.0.113.9"),
            ("Forwarded", "for=203.0.113.9"),
            ("X-Real-IP", "203.0.113.9"),
            ("Accept", "*/*"),
        ]);
        prepare_request(&mut h, &policy(true), &stamp());
        let ids: Vec<_> = h.get_all("jespa-connection-id").iter().collect();
        assert_eq!(ids, vec!["198.18.0.2:4000/abc"]);
        assert_eq!(h["x-forwarded-for"], "198.18.0.2");
        assert_eq!(h["forwarded"], "for=\"198.18.0.2:4000\";proto=http");
        assert_eq!(h["accept"], "*/*");
        for (name, value) in &h {
            assert!(
                !value
                    .as_bytes()
                    .windows(6)
                    .any(|w| w == b"forged" || w == b"203.0."),
                "{name} kept a client value"
            );
        }
        assert_eq!(h.len(), 4);
    }

    #[test]
    fn forwarding_headers_can_be_turned_off_but_client_copies_still_go() {
        let mut h = headers(&[("X-Forwarded-For", "203.0.113.9"), ("Forwarded", "for=x")]);
        prepare_request(&mut h, &policy(false), &stamp());
        assert!(h.get("x-forwarded-for").is_none());
        assert!(h.get("forwarded").is_none());
        assert_eq!(h["jespa-connection-id"], "198.18.0.2:4000/abc");
    }

    #[test]
    fn hop_by_hop_and_connection_named_headers_are_removed() {
        let mut h = headers(&[
            ("Connection", "keep-alive, X-Secret"),
            ("X-Secret", "1"),
            ("Keep-Alive", "timeout=5"),
            ("TE", "trailers"),
            ("Upgrade", "websocket"),
            ("Proxy-Authorization", "Basic eA=="),
            ("Authorization", "NTLM TlRMTVNTUAABAAAA"),
        ]);
        prepare_request(&mut h, &policy(false), &stamp());
        assert!(h.get("x-secret").is_none());
        assert!(h.get("keep-alive").is_none());
        assert!(h.get("te").is_none());
        assert!(h.get("upgrade").is_none());
        assert!(h.get("proxy-authorization").is_none());
        assert_eq!(h["authorization"], "NTLM TlRMTVNTUAABAAAA");
    }

    #[test]
    fn several_www_authenticate_values_pass_in_order() {
        let mut h = headers(&[
            ("WWW-Authenticate", "Negotiate"),
            ("WWW-Authenticate", "NTLM"),
            ("Connection", "close"),
        ]);
        prepare_response(&mut h);
        let values: Vec<_> = h.get_all("www-authenticate").iter().collect();
        assert_eq!(values, vec!["Negotiate", "NTLM"]);
        assert!(h.get("connection").is_none());
    }

    #[test]
    fn only_a_single_chunked_transfer_coding_is_supported() {
        for ok in [&[][..], &["chunked"], &["Chunked"], &[" chunked , "]] {
            let h = headers(
                &ok.iter()
                    .map(|v| ("Transfer-Encoding", *v))
                    .collect::<Vec<_>>(),
            );
            assert_eq!(unsupported_transfer_coding(&h), None, "{ok:?}");
        }
        for bad in [
            &["gzip, chunked"][..],
            &["gzip", "chunked"],
            &["chunked, chunked"],
            &["deflate,chunked"],
            &["x-custom, chunked"],
            &[""],
        ] {
            let h = headers(
                &bad.iter()
                    .map(|v| ("Transfer-Encoding", *v))
                    .collect::<Vec<_>>(),
            );
            assert!(unsupported_transfer_coding(&h).is_some(), "{bad:?}");
        }
        let h = headers(&[
            ("Transfer-Encoding", "gzip"),
            ("Transfer-Encoding", "chunked"),
        ]);
        assert_eq!(
            unsupported_transfer_coding(&h).as_deref(),
            Some("gzip, chunked")
        );
    }

    #[test]
    fn ipv6_clients_are_bracketed_in_forwarded() {
        let s =
            ConnectionStamp::new("x", "[fd00:5418::2]:443".parse().expect("addr")).expect("valid");
        assert_eq!(s.forwarded, "for=\"[fd00:5418::2]:443\";proto=http");
        assert_eq!(s.x_forwarded_for, "fd00:5418::2");
    }

    #[test]
    fn reserved_headers_cannot_carry_the_id() {
        for name in ["host", "authorization", "connection", "x-forwarded-for"] {
            assert!(is_reserved_header(&HeaderName::from_static(name)), "{name}");
        }
        assert!(!is_reserved_header(&HeaderName::from_static(
            "jespa-connection-id"
        )));
    }
}
