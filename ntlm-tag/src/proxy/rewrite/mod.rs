//! Request and response header rewriting: remove what a client must not choose (identity headers and
//! their look-alikes, hop-by-hop headers), then stamp the connection id and the forwarding headers.
#![forbid(unsafe_code)]

use std::net::SocketAddr;

use bytes::{Bytes, BytesMut};

use crate::{http1::ConnectionTokens, identity::AddrText};
use http::{
    HeaderMap, HeaderName, HeaderValue,
    header::{
        CONNECTION, FORWARDED, PROXY_AUTHENTICATE, PROXY_AUTHORIZATION, TE, TRAILER,
        TRANSFER_ENCODING, UPGRADE,
    },
};

/// Headers that describe one hop, never forwarded (RFC 9110 §7.6.1), besides those `Connection` names.
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

/// Client-supplied headers that claim who the client is or how it connected (address, scheme,
/// host, port), as proxies, CDNs and frameworks spell them; the gateway sets some of them itself
/// and none of them may come from a client. `Front-End-Https` is Microsoft's (Exchange, OWA).
const FORWARDING_HEADERS: [&str; 15] = [
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

/// Standard headers that must not be chosen as the connection-id header (besides the forwarding
/// and hop-by-hop ones).
const RESERVED: [&str; 8] = [
    "host",
    "content-length",
    "content-type",
    "authorization",
    "www-authenticate",
    "cookie",
    "set-cookie",
    "expect",
];

/// Whether `name` is one of [`HOP_BY_HOP`]. The seven that `http` knows are compared as
/// `HeaderName`s (an enum inside `http`, no text read), the other two by their text: every field
/// of every message, both ways, goes through this.
fn is_hop_by_hop(name: &HeaderName) -> bool {
    *name == CONNECTION
        || *name == TE
        || *name == TRAILER
        || *name == TRANSFER_ENCODING
        || *name == UPGRADE
        || *name == PROXY_AUTHENTICATE
        || *name == PROXY_AUTHORIZATION
        || matches!(name.as_str(), "keep-alive" | "proxy-connection")
}

/// True when `name` is a standard, hop-by-hop or forwarding header.
pub fn is_reserved_header(name: &HeaderName) -> bool {
    let n = name.as_str();
    RESERVED.contains(&n) || HOP_BY_HOP.contains(&n) || FORWARDING_HEADERS.contains(&n)
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
    id_header: HeaderName,
    forwarded_headers: bool,
    /// The id header's name folded once (every request's field names are compared with it), or
    /// `None` when its fold is longer than the buffer names are folded into.
    id_folded: Option<Box<[u8]>>,
}

impl StampPolicy {
    pub fn new(id_header: HeaderName, forwarded_headers: bool) -> Self {
        let mut buf = [0u8; FOLD_MAX];
        let id_folded = fold_into(id_header.as_str(), &mut buf).map(Box::from);
        StampPolicy {
            id_header,
            forwarded_headers,
            id_folded,
        }
    }

    /// The header that carries the connection id.
    pub fn id_header(&self) -> &HeaderName {
        &self.id_header
    }

    /// Whether `X-Forwarded-For`, `X-Forwarded-Proto` and `Forwarded` are stamped too.
    pub fn forwarded_headers(&self) -> bool {
        self.forwarded_headers
    }
}

/// How the client reached the gateway: a plain or a TLS listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientScheme {
    Http,
    Https,
}

impl ClientScheme {
    pub fn as_str(self) -> &'static str {
        match self {
            ClientScheme::Http => "http",
            ClientScheme::Https => "https",
        }
    }
}

/// The per-connection header values, rendered once when the connection is accepted, and the
/// field lines they make under the gateway's [`StampPolicy`], encoded once: the upstream client
/// writes those bytes after each request's own fields, so stamping a request neither inserts
/// into its header map nor encodes anything.
#[derive(Debug, Clone)]
pub struct ConnectionStamp {
    pub id: HeaderValue,
    pub x_forwarded_for: HeaderValue,
    /// `http` or `https`, the same scheme as `proto=` in `forwarded`.
    pub x_forwarded_proto: HeaderValue,
    pub forwarded: HeaderValue,
    lines: Bytes,
}

impl ConnectionStamp {
    /// Renders the values for a connection. `id` was rendered from a validated template, so it is a
    /// valid header value; anything else is an internal error.
    ///
    /// Every new connection renders these: the three values are slices of one buffer (one
    /// allocation, and stamping a request copies none: a slice is a reference count).
    pub fn new(
        id: impl AsRef<str>,
        client: SocketAddr,
        scheme: ClientScheme,
        policy: &StampPolicy,
    ) -> Result<Self, http::header::InvalidHeaderValue> {
        let id = id.as_ref().as_bytes();
        let ip = AddrText::ip(client.ip());
        let ip = ip.as_str().as_bytes();
        let mut buf = BytesMut::with_capacity(id.len() + 2 * ip.len() + 32);
        buf.extend_from_slice(id);
        buf.extend_from_slice(ip);
        let forwarded_at = buf.len();
        buf.extend_from_slice(b"for=\"");
        if client.is_ipv6() {
            buf.extend_from_slice(b"[");
            buf.extend_from_slice(ip);
            buf.extend_from_slice(b"]");
        } else {
            buf.extend_from_slice(ip);
        }
        buf.extend_from_slice(b":");
        buf.extend_from_slice(itoa::Buffer::new().format(client.port()).as_bytes());
        buf.extend_from_slice(b"\";proto=");
        buf.extend_from_slice(scheme.as_str().as_bytes());
        let buf = buf.freeze();
        let mut stamp = ConnectionStamp {
            id: HeaderValue::from_maybe_shared(buf.slice(..id.len()))?,
            x_forwarded_for: HeaderValue::from_maybe_shared(buf.slice(id.len()..forwarded_at))?,
            x_forwarded_proto: HeaderValue::from_static(scheme.as_str()),
            forwarded: HeaderValue::from_maybe_shared(buf.slice(forwarded_at..))?,
            lines: Bytes::new(),
        };
        let mut lines = Vec::with_capacity(buf.len() + 96);
        for (name, value) in stamp.fields(policy) {
            lines.extend_from_slice(name.as_str().as_bytes());
            lines.extend_from_slice(b": ");
            lines.extend_from_slice(value.as_bytes());
            lines.extend_from_slice(b"\r\n");
        }
        stamp.lines = Bytes::from(lines);
        Ok(stamp)
    }

    /// The fields stamped on every upstream request under `policy`, in the order they are
    /// written: the id, then (when on) `x-forwarded-for`, `x-forwarded-proto` and `forwarded`.
    pub fn fields<'a>(
        &'a self,
        policy: &'a StampPolicy,
    ) -> impl Iterator<Item = (&'a HeaderName, &'a HeaderValue)> {
        let forwarding = policy.forwarded_headers.then_some([
            (&X_FORWARDED_FOR, &self.x_forwarded_for),
            (&X_FORWARDED_PROTO, &self.x_forwarded_proto),
            (&FORWARDED_NAME, &self.forwarded),
        ]);
        std::iter::once((&policy.id_header, &self.id)).chain(forwarding.into_iter().flatten())
    }

    /// [`ConnectionStamp::fields`] encoded as HTTP/1.1 field lines (`name: value\r\n` each).
    pub fn lines(&self) -> &[u8] {
        &self.lines
    }
}

/// Removes hop-by-hop headers, including those named by `Connection`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none (and without `Connection` nothing else is named): one pass over the
    // names instead of a lookup per listed header.
    let mut hop_by_hop = headers.keys().filter(|k| is_hop_by_hop(k));
    let Some(first) = hop_by_hop.next() else {
        return;
    };
    // Most others carry only `Connection: keep-alive` (or `close`), which names no header present:
    // remove it without collecting names (every keep-alive response from the backend).
    let only_connection = first == CONNECTION && hop_by_hop.next().is_none();
    if only_connection
        && headers
            .get_all(CONNECTION)
            .iter()
            .all(|v| ConnectionTokens::of(v).only_close_or_keep_alive)
    {
        headers.remove(CONNECTION);
        return;
    }
    let named: Vec<&str> = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect();
    let named_by_connection = |name: &str| named.iter().any(|t| t.eq_ignore_ascii_case(name));
    // One pass over the names (usually just `Connection: keep-alive` goes) rather than a lookup
    // per listed header.
    let doomed: Vec<HeaderName> = headers
        .keys()
        .filter(|k| is_hop_by_hop(k) || named_by_connection(k.as_str()))
        .cloned()
        .collect();
    for name in doomed {
        headers.remove(name);
    }
}

/// Header names up to this long are folded on the stack; longer ones take the iterator path.
const FOLD_MAX: usize = 64;

/// [`FORWARDING_HEADERS`], folded (a unit test keeps the two lists in step).
const FORWARDING_FOLDED: [&[u8]; 15] = [
    b"xforwardedfor",
    b"forwarded",
    b"xrealip",
    b"xclientip",
    b"xforwardedproto",
    b"xforwardedhost",
    b"xforwardedport",
    b"xforwardedscheme",
    b"xforwardedssl",
    b"frontendhttps",
    b"trueclientip",
    b"xclusterclientip",
    b"cfconnectingip",
    b"clientip",
    b"xoriginalforwardedfor",
];

/// Each byte folded: letters lowercased, digits kept, anything else 0 (left out).
const FOLDED_BYTE: [u8; 256] = {
    let mut table = [0u8; 256];
    let mut b = 0;
    while b < 256 {
        let byte = b as u8;
        if byte.is_ascii_alphanumeric() {
            table[b] = byte.to_ascii_lowercase();
        }
        b += 1;
    }
    table
};

/// Whether some forwarding header's fold starts with this byte.
const FORWARDING_FIRST: [bool; 256] = {
    let mut table = [false; 256];
    let mut i = 0;
    while i < FORWARDING_FOLDED.len() {
        table[FORWARDING_FOLDED[i][0] as usize] = true;
        i += 1;
    }
    table
};

/// `name` folded into `buf`, or `None` when the fold does not fit. A table lookup per byte: every
/// field name of every request may be folded, and the iterator chain cost several times more.
fn fold_into<'a>(name: &str, buf: &'a mut [u8; FOLD_MAX]) -> Option<&'a [u8]> {
    let mut n = 0;
    for &b in name.as_bytes() {
        let folded = FOLDED_BYTE[usize::from(b)];
        if folded != 0 {
            *buf.get_mut(n)? = folded;
            n += 1;
        }
    }
    Some(&buf[..n])
}

/// Whether `folded` is one of [`FORWARDING_FOLDED`]. Their lengths are compared before any byte:
/// most names have a length none of them has.
fn is_forwarding_folded(folded: &[u8]) -> bool {
    FORWARDING_FOLDED
        .iter()
        .any(|f| f.len() == folded.len() && *f == folded)
}

/// Whether a client header named `name` claims an identity: the id header or a forwarding header,
/// in any case or look-alike spelling. `id_folded` is the id header's fold when it fits.
fn claims_identity(name: &str, id_name: &str, id_folded: Option<&[u8]>) -> bool {
    if let Some(id) = id_folded {
        // The fold's first byte rules out most names (`accept`, `user-agent`, `host`) before any
        // folding: neither the id's fold nor a forwarding header's starts with it.
        let first = name
            .bytes()
            .map(|b| FOLDED_BYTE[usize::from(b)])
            .find(|f| *f != 0);
        match first {
            // Folds to nothing: the id header only if the id's name folds to nothing too (a
            // name of punctuation only, `+`), never a forwarding header.
            None => return id.is_empty(),
            Some(f) if !FORWARDING_FIRST[usize::from(f)] && id.first() != Some(&f) => return false,
            Some(_) => {}
        }
    }
    let mut buf = [0u8; FOLD_MAX];
    match (fold_into(name, &mut buf), id_folded) {
        (Some(folded), Some(id)) => folded == id || is_forwarding_folded(folded),
        _ => folds_equal(name, id_name) || FORWARDING_HEADERS.iter().any(|f| folds_equal(name, f)),
    }
}

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static FORWARDED_NAME: HeaderName = FORWARDED;

/// Prepares a client request's headers for the backend: strips hop-by-hop headers and every client
/// copy of the identity headers (any case and look-alikes). The connection's own values go after
/// them on the wire ([`ConnectionStamp::lines`]); none of their names is left in `headers`.
pub fn prepare_request(headers: &mut HeaderMap, policy: &StampPolicy) {
    strip_hop_by_hop(headers);
    let id_name = policy.id_header.as_str();
    let id_folded = policy.id_folded.as_deref();
    let forged = |k: &HeaderName| claims_identity(k.as_str(), id_name, id_folded);
    // Checked first so that the usual request (nothing forged) allocates nothing here.
    if headers.keys().any(forged) {
        let names: Vec<HeaderName> = headers.keys().filter(|k| forged(k)).cloned().collect();
        for name in names {
            headers.remove(name);
        }
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
mod tests;
