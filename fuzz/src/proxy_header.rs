//! The PROXY v1/v2 path as the proxy uses it: `proxy_header::parse` on the bytes received so far, and
//! `proxy_header::read` (the loop the gateway runs on a trusted balancer's connection) fed the same
//! bytes in small chunks.
//!
//! Input: the bytes a balancer sends at the start of a connection (a real PROXY header is a seed
//! as it is). The chunk size for `read` is derived from the input, so every input is replayed the
//! same way.
//!
//! Checked, for every input:
//! - a `Complete(header, consumed)` has `0 < consumed <= input.len()`, `header.length == consumed`,
//!   and fits its version's limits (v1: one CRLF-terminated line of at most 107 bytes; v2: exactly
//!   16 + the declared length, at most `V2_MAX`);
//! - `source` is present exactly when the header is a PROXY command (v2) or `TCP4`/`TCP6` line (v1)
//!   with TCP addresses, `destination` likewise, each of the family the header declares, and for
//!   v2 equal to the address bytes on the wire;
//! - every strict prefix of a complete header parses as `Incomplete` (the reader waits, never
//!   decides early), and the complete header parses the same with or without the bytes after it;
//! - `Incomplete` only while more bytes could still complete a header within the limits;
//! - `read` agrees with a one-shot `parse` of the whole input: the same header, the bytes after it
//!   handed back (as far as they were read), the same error, or `Closed`/`Oversized` when the input
//!   ends before a complete header.
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    pin::Pin,
    sync::LazyLock,
    task::{Context, Poll},
    time::Duration,
};

use ntlm_tag::identity::proxy_header::{
    self, Parsed, ProxyHeader, ProxyHeaderError, ProxyVersion, V2_MAX,
};
use tokio::io::{AsyncRead, ReadBuf};

const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
const V1_MAX: usize = 107;

static RUNTIME: LazyLock<tokio::runtime::Runtime> = LazyLock::new(|| {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a current-thread runtime")
});

pub fn check(data: &[u8]) {
    let whole = proxy_header::parse(data);
    match &whole {
        Ok(Parsed::Complete(header, consumed)) => {
            check_complete(data, header, *consumed);
            check_prefixes(data, header, *consumed);
        }
        Ok(Parsed::Incomplete) => check_incomplete(data),
        Err(_) => {}
    }
    check_read(data, &whole);
}

fn check_complete(data: &[u8], h: &ProxyHeader, consumed: usize) {
    assert!(
        consumed > 0 && consumed <= data.len(),
        "consumed {consumed} of {} bytes: {data:?}",
        data.len()
    );
    assert_eq!(h.length, consumed, "header length vs consumed: {data:?}");
    assert_eq!(
        h.source.is_some(),
        h.destination.is_some(),
        "source and destination come together: {h:?}"
    );
    match h.version {
        ProxyVersion::V1 => check_v1(&data[..consumed], h),
        ProxyVersion::V2 => check_v2(&data[..consumed], h),
    }
}

fn check_v1(line: &[u8], h: &ProxyHeader) {
    assert!(
        line.len() <= V1_MAX,
        "v1 line of {} bytes accepted",
        line.len()
    );
    assert!(
        line.starts_with(b"PROXY "),
        "v1 without its prefix: {line:?}"
    );
    assert!(line.ends_with(b"\r\n"), "v1 line without CRLF: {line:?}");
    assert_eq!(
        line.windows(2).position(|w| w == b"\r\n"),
        Some(line.len() - 2),
        "v1 header runs past its first CRLF: {line:?}"
    );
    let text = String::from_utf8_lossy(&line[6..line.len() - 2]);
    let fields: Vec<&str> = text.split(' ').collect();
    match fields[0] {
        "TCP4" | "TCP6" => {
            let (Some(source), Some(destination)) = (h.source, h.destination) else {
                panic!("{} line without addresses: {line:?} -> {h:?}", fields[0]);
            };
            let v4 = fields[0] == "TCP4";
            assert_eq!(source.is_ipv4(), v4, "{line:?} -> {h:?}");
            assert_eq!(destination.is_ipv4(), v4, "{line:?} -> {h:?}");
            // Where the text is in the canonical form, it must be what was parsed.
            if fields.len() == 5 {
                let expect = |ip: &str, port: &str| -> Option<SocketAddr> {
                    let ip: IpAddr = if v4 {
                        IpAddr::V4(ip.parse().ok()?)
                    } else {
                        IpAddr::V6(ip.parse().ok()?)
                    };
                    Some(SocketAddr::new(ip, port.parse().ok()?))
                };
                if let Some(s) = expect(fields[1], fields[3]) {
                    assert_eq!(source, s, "{line:?}");
                }
                if let Some(d) = expect(fields[2], fields[4]) {
                    assert_eq!(destination, d, "{line:?}");
                }
            }
        }
        "UNKNOWN" => assert!(h.source.is_none(), "UNKNOWN with a source: {h:?}"),
        other => panic!("v1 protocol {other:?} accepted: {line:?} -> {h:?}"),
    }
}

fn check_v2(header: &[u8], h: &ProxyHeader) {
    assert!(
        header.len() >= 16 && header.starts_with(V2_SIGNATURE),
        "v2 without its fixed part: {header:?}"
    );
    let declared = 16 + u16::from_be_bytes([header[14], header[15]]) as usize;
    assert_eq!(header.len(), declared, "v2 length field vs consumed");
    assert!(declared <= V2_MAX, "v2 header of {declared} bytes accepted");
    assert_eq!(header[12] >> 4, 2, "v2 version nibble: {header:?}");
    let command = header[12] & 0x0f;
    let (family, transport) = (header[13] >> 4, header[13] & 0x0f);
    let port = |at: usize| u16::from_be_bytes([header[at], header[at + 1]]);
    let expected = match (command, family, transport) {
        (0, _, _) => None, // LOCAL: the balancer's own connection
        (1, 0, _) => None, // PROXY with AF_UNSPEC: the balancer does not know the client
        (1, 1, 1) => Some((
            SocketAddr::new(
                Ipv4Addr::from(<[u8; 4]>::try_from(&header[16..20]).expect("4")).into(),
                port(24),
            ),
            SocketAddr::new(
                Ipv4Addr::from(<[u8; 4]>::try_from(&header[20..24]).expect("4")).into(),
                port(26),
            ),
        )),
        (1, 2, 1) => Some((
            SocketAddr::new(
                Ipv6Addr::from(<[u8; 16]>::try_from(&header[16..32]).expect("16")).into(),
                port(48),
            ),
            SocketAddr::new(
                Ipv6Addr::from(<[u8; 16]>::try_from(&header[32..48]).expect("16")).into(),
                port(50),
            ),
        )),
        _ => panic!(
            "v2 command {command:#x} family {family:#x} transport {transport:#x} accepted: {h:?}"
        ),
    };
    assert_eq!(
        h.source.zip(h.destination),
        expected,
        "v2 addresses: {header:?}"
    );
}

/// Every strict prefix of a complete header is `Incomplete`; the header alone parses the same.
fn check_prefixes(data: &[u8], h: &ProxyHeader, consumed: usize) {
    let exact = proxy_header::parse(&data[..consumed]);
    assert_eq!(
        exact,
        Ok(Parsed::Complete(Box::new(h.clone()), consumed)),
        "the header without what follows it parses differently: {data:?}"
    );
    let lengths: Vec<usize> = if consumed <= 160 {
        (0..consumed).collect()
    } else {
        let mut l = vec![
            0,
            1,
            11,
            12,
            15,
            16,
            consumed / 2,
            consumed - 2,
            consumed - 1,
        ];
        l.retain(|&n| n < consumed);
        l
    };
    for n in lengths {
        let r = proxy_header::parse(&data[..n]);
        assert_eq!(
            r,
            Ok(Parsed::Incomplete),
            "a {n}-byte prefix of a complete {consumed}-byte header is not Incomplete: {:?}",
            &data[..consumed]
        );
    }
}

/// `Incomplete` only while a header could still complete within its limits.
fn check_incomplete(data: &[u8]) {
    if data.starts_with(V2_SIGNATURE) && data.len() >= 16 {
        let declared = 16 + u16::from_be_bytes([data[14], data[15]]) as usize;
        assert!(
            data.len() < declared && declared <= V2_MAX,
            "Incomplete with {} of {declared} bytes: {data:?}",
            data.len()
        );
    } else {
        assert!(
            data.len() < V1_MAX.max(16),
            "Incomplete after {} bytes: {data:?}",
            data.len()
        );
    }
}

/// Hands out `data` at most `chunk` bytes per read, then EOF.
struct Chunked<'a> {
    data: &'a [u8],
    chunk: usize,
}

impl AsyncRead for Chunked<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let n = self.chunk.min(self.data.len()).min(buf.remaining());
        let (now, later) = self.data.split_at(n);
        buf.put_slice(now);
        self.data = later;
        Poll::Ready(Ok(()))
    }
}

fn check_read(data: &[u8], whole: &Result<Parsed, ProxyHeaderError>) {
    // 1..=16 bytes per read, from the input itself (deterministic for replays).
    let chunk = 1 + data
        .iter()
        .fold(data.len(), |a, &b| a.wrapping_add(b as usize))
        % 16;
    let mut reader = Chunked { data, chunk };
    let read = RUNTIME.block_on(proxy_header::read(&mut reader, Duration::from_secs(60)));
    match (whole, &read) {
        (Ok(Parsed::Complete(h, consumed)), Ok((got, rest))) => {
            assert_eq!(**h, *got, "read() and parse() disagree: {data:?}");
            assert!(
                data[*consumed..].starts_with(rest),
                "read() handed back bytes that do not follow the header: {rest:?} in {data:?}"
            );
        }
        (
            Ok(Parsed::Incomplete),
            Err(ProxyHeaderError::Closed | ProxyHeaderError::Oversized(_)),
        ) => {}
        (Err(e), Err(got)) => {
            // The same decision, though `read` may reach it on a shorter prefix.
            assert_eq!(
                std::mem::discriminant(e),
                std::mem::discriminant(got),
                "read() failed with {got:?}, parse() with {e:?}: {data:?}"
            );
        }
        _ => panic!(
            "read() in {chunk}-byte chunks gave {read:?}, parse() of the whole input {whole:?}: {data:?}"
        ),
    }
}
