//! Header sanitisation: arbitrary client header blocks through `rewrite::prepare_request`, the
//! function the gateway applies to every request before it goes upstream, followed by the field
//! lines the upstream client writes after them (`ConnectionStamp::lines`): together, the fields a
//! backend receives.
//!
//! Input: `flags`, then a header block: `Name: value` lines (LF or CRLF). A line without a colon,
//! a name `http::HeaderName` refuses or a value `HeaderValue` refuses is skipped, as the HTTP parser
//! would have refused it before the gateway saw it. `flags` bit 0: `forwarded_headers`; bit 1:
//! an IPv6 client; bits 2-3: the id header is `Jespa-Connection-Id`, `X-Conn-Id`, `conn_id`, or the
//! first line's name (when it is a valid, non-reserved name); bit 4: the connection came in on a TLS
//! listener.
//!
//! Checked:
//! - exactly one id header remains, with this connection's id;
//! - with `forwarded_headers`, exactly one `X-Forwarded-For`, one `X-Forwarded-Proto` and one
//!   `Forwarded`, the gateway's, whose `proto=` is the `X-Forwarded-Proto` (`https` exactly on TLS
//!   listeners); without, none;
//! - no header whose name folds (ASCII letters and digits, lowercased) to the id header's or to one
//!   of the forwarding headers below keeps a client value: the only such headers left are the ones
//!   the gateway set;
//! - no hop-by-hop header remains, nor one the client's `Connection` named (unless the gateway set
//!   it);
//! - every other client header passes unchanged, all its values in order, and nothing else is added.
use std::net::SocketAddr;

use http::{HeaderMap, HeaderName, HeaderValue};
use ntlm_tag::proxy::rewrite::{
    ClientScheme, ConnectionStamp, StampPolicy, is_reserved_header, prepare_request,
};

pub(crate) const HOP_BY_HOP: [&str; 9] = [
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
/// Written out again here (not taken from the gateway) so that the oracle does not share a mistake.
pub(crate) const FORWARDING: [&str; 15] = [
    "x-forwarded-for",
    "forwarded",
    "x-real-ip",
    "x-client-ip",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x-forwarded-port",
    "x-forwarded-scheme",
    "x-forwarded-ssl",
    "front-end-https",
    "true-client-ip",
    "x-cluster-client-ip",
    "cf-connecting-ip",
    "client-ip",
    "x-original-forwarded-for",
];

#[derive(Debug)]
pub struct Input {
    pub policy: StampPolicy,
    pub client: SocketAddr,
    pub scheme: ClientScheme,
    pub headers: HeaderMap,
}

impl Input {
    pub fn decode(data: &[u8]) -> Option<Self> {
        let (&flags, block) = data.split_first()?;
        let mut lines: Vec<(&[u8], &[u8])> = Vec::new();
        for line in block.split(|&b| b == b'\n') {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if let Some(colon) = line.iter().position(|&b| b == b':') {
                let value = line[colon + 1..].trim_ascii();
                lines.push((&line[..colon], value));
            }
        }
        let id_header = match (flags >> 2) & 3 {
            0 => HeaderName::from_static("jespa-connection-id"),
            1 => HeaderName::from_static("x-conn-id"),
            2 => HeaderName::from_static("conn_id"),
            _ => lines
                .first()
                .and_then(|(n, _)| HeaderName::from_bytes(n).ok())
                .filter(|n| !is_reserved_header(n))
                .unwrap_or(HeaderName::from_static("jespa-connection-id")),
        };
        let client: SocketAddr = if flags & 2 == 2 {
            "[fd00:5418:1::10]:40000".parse().ok()?
        } else {
            "198.18.1.10:40000".parse().ok()?
        };
        let mut headers = HeaderMap::new();
        for (name, value) in lines {
            if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(name), HeaderValue::from_bytes(value)) {
                headers.append(n, v);
            }
        }
        Some(Input {
            policy: StampPolicy::new(id_header, flags & 1 == 1),
            client,
            scheme: if flags & 16 == 16 {
                ClientScheme::Https
            } else {
                ClientScheme::Http
            },
            headers,
        })
    }
}

pub(crate) fn fold(name: &str) -> String {
    name.chars()
        .filter(char::is_ascii_alphanumeric)
        .map(|c| c.to_ascii_lowercase())
        .collect()
}

pub fn check(data: &[u8]) {
    let Some(input) = Input::decode(data) else {
        return;
    };
    let id_text = format!("{}/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", input.client);
    let stamp = ConnectionStamp::new(id_text.clone(), input.client, input.scheme, &input.policy)
        .expect("a valid stamp");
    let proto = input.scheme.as_str();
    assert_eq!(stamp.x_forwarded_proto, proto);
    assert!(
        stamp
            .forwarded
            .to_str()
            .is_ok_and(|f| f.ends_with(&format!(";proto={proto}"))),
        "{:?} for {proto}",
        stamp.forwarded
    );
    let mut out = input.headers.clone();
    prepare_request(&mut out, &input.policy);
    for (name, value) in stamped_fields(stamp.lines()) {
        out.append(name, value);
    }

    let id = input.policy.id_header();
    let values = |name: &str| -> Vec<HeaderValue> { out.get_all(name).iter().cloned().collect() };
    assert_eq!(
        values(id.as_str()),
        vec![stamp.id.clone()],
        "the id header after sanitising {:?}",
        input.headers
    );
    // What the gateway itself set: name -> value.
    let mut ours: Vec<(HeaderName, HeaderValue)> = vec![(id.clone(), stamp.id.clone())];
    if input.policy.forwarded_headers() {
        ours.push((
            HeaderName::from_static("x-forwarded-for"),
            stamp.x_forwarded_for.clone(),
        ));
        ours.push((
            HeaderName::from_static("x-forwarded-proto"),
            stamp.x_forwarded_proto.clone(),
        ));
        ours.push((
            HeaderName::from_static("forwarded"),
            stamp.forwarded.clone(),
        ));
    }
    for (name, value) in &ours {
        if name != id {
            assert_eq!(
                values(name.as_str()),
                vec![value.clone()],
                "{name} after {input:?}"
            );
        }
    }
    if !input.policy.forwarded_headers() {
        for name in ["x-forwarded-for", "x-forwarded-proto", "forwarded"] {
            if name != id.as_str() {
                assert!(
                    out.get(name).is_none(),
                    "{name} with forwarded_headers off: {out:?} from {input:?}"
                );
            }
        }
    }
    let set_by_gateway = |n: &HeaderName| ours.iter().any(|(o, _)| o == n);

    let guarded: Vec<String> = std::iter::once(id.as_str())
        .chain(FORWARDING)
        .map(fold)
        .collect();
    for (name, value) in &out {
        if guarded.contains(&fold(name.as_str())) {
            assert!(
                ours.iter().any(|(n, v)| n == name && v == value),
                "{name}: {value:?} kept a client value (folds like an identity header) from {input:?}"
            );
        }
        assert!(
            !HOP_BY_HOP.contains(&name.as_str()) || set_by_gateway(name),
            "hop-by-hop {name} forwarded from {input:?}"
        );
    }

    let named_by_connection: Vec<String> = input
        .headers
        .get_all("connection")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .collect();
    for name in input.headers.keys() {
        let dropped = HOP_BY_HOP.contains(&name.as_str())
            || named_by_connection.iter().any(|t| t == name.as_str())
            || guarded.contains(&fold(name.as_str()));
        if set_by_gateway(name) {
            continue;
        }
        if dropped {
            assert!(
                out.get(name).is_none(),
                "{name} should have been removed: {out:?} from {input:?}"
            );
        } else {
            let before: Vec<_> = input.headers.get_all(name).iter().collect();
            let after: Vec<_> = out.get_all(name).iter().collect();
            assert_eq!(
                before, after,
                "{name} changed on its way through: {input:?}"
            );
        }
    }
    for name in out.keys() {
        assert!(
            input.headers.contains_key(name) || set_by_gateway(name),
            "{name} appeared from nowhere: {out:?}"
        );
    }
}

/// The stamped field lines, read back as a backend would: `name: value` lines, each ending in CRLF.
fn stamped_fields(lines: &[u8]) -> Vec<(HeaderName, HeaderValue)> {
    let text = std::str::from_utf8(lines).expect("stamped lines are text");
    let Some(body) = text.strip_suffix("\r\n") else {
        assert!(text.is_empty(), "stamped lines end in CRLF: {text:?}");
        return Vec::new();
    };
    body.split("\r\n")
        .map(|line| {
            let (name, value) = line
                .split_once(": ")
                .expect("a stamped line is `name: value`");
            (
                HeaderName::from_bytes(name.as_bytes()).expect("a stamped name"),
                HeaderValue::from_str(value).expect("a stamped value"),
            )
        })
        .collect()
}
