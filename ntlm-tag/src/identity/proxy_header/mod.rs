//! PROXY protocol v1 and v2 headers (parsed with the `ppp` crate), read before any HTTP on listeners
//! configured for it. Only called for peers in the trust list.
#![forbid(unsafe_code)]

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use bytes::{Bytes, BytesMut};
use ppp::{HeaderResult, PartialResult, v1, v2};
use serde::Serialize;
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt};

/// The v2 signature; every v2 header starts with it.
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// The v1 prefix.
const V1_PREFIX: &[u8; 6] = b"PROXY ";
/// A v1 header is at most 107 bytes including CRLF.
const V1_MAX: usize = 107;
/// Largest v2 header accepted (16-byte fixed part + addresses + TLVs). Real balancers send far less.
pub const V2_MAX: usize = 4096;

/// PP2 TLV types kept on the identity.
const PP2_TYPE_AUTHORITY: u8 = 0x02;
const PP2_TYPE_UNIQUE_ID: u8 = 0x05;
const PP2_TYPE_SSL: u8 = 0x20;
const PP2_SUBTYPE_SSL_VERSION: u8 = 0x21;
const PP2_SUBTYPE_SSL_CN: u8 = 0x22;
pub const PP2_TYPE_AWS: u8 = 0xEA;
pub const PP2_TYPE_AZURE: u8 = 0xEE;
/// The subtype of the AWS VPC endpoint id and of the Azure Private Link LinkID.
pub const PP2_SUBTYPE_LINK: u8 = 0x01;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyVersion {
    V1,
    V2,
}

/// What a PROXY header said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyHeader {
    pub version: ProxyVersion,
    /// The original client; `None` for LOCAL (v2) and UNKNOWN (v1): the balancer's own connection,
    /// e.g. a health check, whose identity stays the peer.
    pub source: Option<SocketAddr>,
    pub destination: Option<SocketAddr>,
    pub tlvs: ProxyTlvs,
    /// Bytes of the header (for metrics and logs).
    pub length: usize,
}

/// The TLVs of a v2 header that the gateway keeps.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ProxyTlvs {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub authority: Option<String>,
    /// Hex of PP2_TYPE_UNIQUE_ID.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unique_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ssl: Option<SslTlv>,
    /// AWS (0xEA, subtype 0x01): the VPC endpoint id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub aws_vpce_id: Option<String>,
    /// Azure (0xEE, subtype 0x01): the Private Link LinkID.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub azure_link_id: Option<u32>,
    /// Other TLV types seen, for the record.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub other_types: Vec<u8>,
    /// Every TLV as received (type, value), for the id template's `{tlv:0xNN}` placeholders;
    /// bounded by the header's size ([`V2_MAX`]).
    #[serde(skip)]
    pub raw: Vec<(u8, Box<[u8]>)>,
}

impl ProxyTlvs {
    /// The value of the first TLV of type `kind`.
    pub fn value(&self, kind: u8) -> Option<&[u8]> {
        self.raw.iter().find(|(k, _)| *k == kind).map(|(_, v)| &**v)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SslTlv {
    /// The client connected over TLS to the balancer.
    pub client_ssl: bool,
    /// The client presented a certificate on this connection.
    pub client_cert: bool,
    /// The certificate verified (verify field == 0).
    pub verified: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub common_name: Option<String>,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ProxyHeaderError {
    #[error("not a PROXY protocol header (the connection starts with {0:?})")]
    NotProxy(String),
    #[error("malformed PROXY header: {0}")]
    Malformed(String),
    #[error("PROXY header longer than {0} bytes")]
    Oversized(usize),
    #[error("unsupported PROXY header: {0}")]
    Unsupported(&'static str),
    #[error("no complete PROXY header within {0:?}")]
    Timeout(Duration),
    #[error("the connection closed before a complete PROXY header")]
    Closed,
    #[error("reading the PROXY header failed: {0}")]
    Io(String),
}

/// Result of parsing the bytes received so far.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// A complete header of `consumed` bytes.
    Complete(Box<ProxyHeader>, usize),
    /// A valid prefix of a header; read more.
    Incomplete,
}

/// Parses a PROXY header from the start of `buf`. Pure: the fuzz target calls it directly.
pub fn parse(buf: &[u8]) -> Result<Parsed, ProxyHeaderError> {
    let is_v2 = starts_like(buf, V2_SIGNATURE);
    let is_v1 = starts_like(buf, V1_PREFIX);
    if !is_v2 && !is_v1 {
        let shown: String = buf.iter().take(16).map(|&b| b as char).collect();
        return Err(ProxyHeaderError::NotProxy(shown));
    }
    if is_v1 && !is_v2 {
        let line_end = buf.windows(2).position(|w| w == b"\r\n");
        match line_end {
            None if buf.len() >= V1_MAX => return Err(ProxyHeaderError::Oversized(V1_MAX)),
            None => return Ok(Parsed::Incomplete),
            Some(end) if end + 2 > V1_MAX => return Err(ProxyHeaderError::Oversized(V1_MAX)),
            Some(end) => {
                // The whole line is here: anything ppp calls "incomplete" (missing fields) is
                // malformed, never a reason to wait for more bytes.
                return match v1::Header::try_from(&buf[..end + 2]) {
                    Ok(h) => Ok(Parsed::Complete(Box::new(from_v1(&h, end + 2)), end + 2)),
                    Err(e) => Err(ProxyHeaderError::Malformed(e.to_string())),
                };
            }
        }
    }
    if is_v2 && buf.len() >= 16 {
        let declared = 16 + u16::from_be_bytes([buf[14], buf[15]]) as usize;
        if declared > V2_MAX {
            return Err(ProxyHeaderError::Oversized(V2_MAX));
        }
    }
    let result = HeaderResult::parse(buf);
    if result.is_incomplete() {
        return Ok(Parsed::Incomplete);
    }
    match result {
        HeaderResult::V1(Ok(h)) => {
            let consumed = h.header.len();
            Ok(Parsed::Complete(Box::new(from_v1(&h, consumed)), consumed))
        }
        HeaderResult::V1(Err(e)) => Err(ProxyHeaderError::Malformed(e.to_string())),
        HeaderResult::V2(Ok(h)) => {
            let consumed = h.len();
            from_v2(&h, consumed).map(|p| Parsed::Complete(Box::new(p), consumed))
        }
        HeaderResult::V2(Err(e)) => Err(ProxyHeaderError::Malformed(e.to_string())),
    }
}

/// True when `buf` and `prefix` agree on their common length.
fn starts_like(buf: &[u8], prefix: &[u8]) -> bool {
    let n = buf.len().min(prefix.len());
    buf[..n] == prefix[..n]
}

fn from_v1(h: &v1::Header<'_>, length: usize) -> ProxyHeader {
    let (source, destination) = match h.addresses {
        v1::Addresses::Tcp4(a) => (
            Some(SocketAddr::new(IpAddr::V4(a.source_address), a.source_port)),
            Some(SocketAddr::new(
                IpAddr::V4(a.destination_address),
                a.destination_port,
            )),
        ),
        v1::Addresses::Tcp6(a) => (
            Some(SocketAddr::new(IpAddr::V6(a.source_address), a.source_port)),
            Some(SocketAddr::new(
                IpAddr::V6(a.destination_address),
                a.destination_port,
            )),
        ),
        v1::Addresses::Unknown => (None, None),
    };
    ProxyHeader {
        version: ProxyVersion::V1,
        source,
        destination,
        tlvs: ProxyTlvs::default(),
        length,
    }
}

fn from_v2(h: &v2::Header<'_>, length: usize) -> Result<ProxyHeader, ProxyHeaderError> {
    let tlvs = read_tlvs(h)?;
    let local = ProxyHeader {
        version: ProxyVersion::V2,
        source: None,
        destination: None,
        tlvs: tlvs.clone(),
        length,
    };
    if h.command == v2::Command::Local {
        return Ok(local);
    }
    match (h.protocol, h.addresses) {
        (v2::Protocol::Stream, v2::Addresses::IPv4(a)) => Ok(ProxyHeader {
            source: Some(SocketAddr::new(IpAddr::V4(a.source_address), a.source_port)),
            destination: Some(SocketAddr::new(
                IpAddr::V4(a.destination_address),
                a.destination_port,
            )),
            ..local
        }),
        (v2::Protocol::Stream, v2::Addresses::IPv6(a)) => Ok(ProxyHeader {
            source: Some(SocketAddr::new(IpAddr::V6(a.source_address), a.source_port)),
            destination: Some(SocketAddr::new(
                IpAddr::V6(a.destination_address),
                a.destination_port,
            )),
            ..local
        }),
        // UNSPEC with PROXY: the balancer does not know the client; treat like LOCAL (RFC text).
        (_, v2::Addresses::Unspecified) => Ok(local),
        (v2::Protocol::Datagram, _) => Err(ProxyHeaderError::Unsupported(
            "UDP (DGRAM) on a TCP listener",
        )),
        (_, v2::Addresses::Unix(_)) => Err(ProxyHeaderError::Unsupported("AF_UNIX addresses")),
        (v2::Protocol::Unspecified, _) => {
            Err(ProxyHeaderError::Unsupported("unspecified transport"))
        }
    }
}

fn read_tlvs(h: &v2::Header<'_>) -> Result<ProxyTlvs, ProxyHeaderError> {
    let mut out = ProxyTlvs::default();
    for tlv in h.tlvs() {
        let tlv = tlv.map_err(|e| ProxyHeaderError::Malformed(format!("TLV: {e}")))?;
        let value: &[u8] = &tlv.value;
        out.raw.push((tlv.kind, value.into()));
        match tlv.kind {
            PP2_TYPE_AUTHORITY => out.authority = Some(String::from_utf8_lossy(value).into()),
            PP2_TYPE_UNIQUE_ID => out.unique_id = Some(hex(value)),
            PP2_TYPE_SSL => out.ssl = Some(read_ssl(value)?),
            PP2_TYPE_AWS => {
                if let [PP2_SUBTYPE_LINK, id @ ..] = value {
                    out.aws_vpce_id = Some(String::from_utf8_lossy(id).into());
                }
            }
            PP2_TYPE_AZURE => {
                if let [PP2_SUBTYPE_LINK, a, b, c, d] = value {
                    out.azure_link_id = Some(u32::from_le_bytes([*a, *b, *c, *d]));
                }
            }
            other => out.other_types.push(other),
        }
    }
    Ok(out)
}

/// PP2_TYPE_SSL: client (1 byte), verify (4 bytes), then sub-TLVs.
fn read_ssl(value: &[u8]) -> Result<SslTlv, ProxyHeaderError> {
    let [client, v0, v1, v2, v3, rest @ ..] = value else {
        return Err(ProxyHeaderError::Malformed(
            "SSL TLV shorter than 5 bytes".into(),
        ));
    };
    let mut ssl = SslTlv {
        client_ssl: client & 0x01 != 0,
        client_cert: client & 0x02 != 0,
        verified: u32::from_be_bytes([*v0, *v1, *v2, *v3]) == 0,
        ..SslTlv::default()
    };
    let mut rest = rest;
    while let [kind, l0, l1, tail @ ..] = rest {
        let len = u16::from_be_bytes([*l0, *l1]) as usize;
        let Some((value, next)) = tail.split_at_checked(len) else {
            return Err(ProxyHeaderError::Malformed(
                "SSL sub-TLV runs past its TLV".into(),
            ));
        };
        match *kind {
            PP2_SUBTYPE_SSL_VERSION => ssl.version = Some(String::from_utf8_lossy(value).into()),
            PP2_SUBTYPE_SSL_CN => ssl.common_name = Some(String::from_utf8_lossy(value).into()),
            _ => {}
        }
        rest = next;
    }
    Ok(ssl)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Reads a PROXY header from `stream` within `timeout`. Returns the header and any bytes received
/// after it (the start of the HTTP request), which the caller must serve first.
pub async fn read<S: AsyncRead + Unpin>(
    stream: &mut S,
    timeout: Duration,
) -> Result<(ProxyHeader, Bytes), ProxyHeaderError> {
    let work = async {
        let mut buf = BytesMut::with_capacity(256);
        loop {
            match parse(&buf)? {
                Parsed::Complete(header, consumed) => {
                    let rest = buf.split_off(consumed).freeze();
                    return Ok((*header, rest));
                }
                Parsed::Incomplete => {
                    if buf.len() >= V2_MAX {
                        return Err(ProxyHeaderError::Oversized(V2_MAX));
                    }
                    let n = stream
                        .read_buf(&mut buf)
                        .await
                        .map_err(|e| ProxyHeaderError::Io(e.to_string()))?;
                    if n == 0 {
                        return Err(ProxyHeaderError::Closed);
                    }
                }
            }
        }
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| ProxyHeaderError::Timeout(timeout))?
}

#[cfg(test)]
mod tests;
