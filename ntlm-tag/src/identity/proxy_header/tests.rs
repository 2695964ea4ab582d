use super::*;

fn v2_header(
    command: v2::Command,
    addresses: impl Into<v2::Addresses>,
    tlvs: &[(u8, &[u8])],
) -> Vec<u8> {
    let mut b =
        v2::Builder::with_addresses(v2::Version::Two | command, v2::Protocol::Stream, addresses);
    for (kind, value) in tlvs {
        b = b.write_tlv(*kind, value).expect("tlv");
    }
    b.build().expect("build")
}

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("addr")
}

#[test]
fn v1_tcp4_tcp6_and_unknown() {
    let Ok(Parsed::Complete(h, n)) =
        parse(b"PROXY TCP4 198.19.0.9 198.18.1.1 40000 80\r\nGET / HTTP/1.1\r\n")
    else {
        panic!("complete");
    };
    assert_eq!(h.version, ProxyVersion::V1);
    assert_eq!(h.source, Some(addr("198.19.0.9:40000")));
    assert_eq!(n, 43);
    let Ok(Parsed::Complete(h, _)) = parse(b"PROXY TCP6 fd00:5418::9 fd00:5418::1 4000 80\r\n")
    else {
        panic!("complete");
    };
    assert_eq!(h.source, Some(addr("[fd00:5418::9]:4000")));
    let Ok(Parsed::Complete(h, n)) = parse(b"PROXY UNKNOWN\r\n") else {
        panic!("complete");
    };
    assert_eq!((h.source, n), (None, 15));
}

#[test]
fn partial_headers_ask_for_more() {
    assert_eq!(parse(b""), Ok(Parsed::Incomplete));
    assert_eq!(parse(b"PRO"), Ok(Parsed::Incomplete));
    assert_eq!(parse(b"PROXY TCP4 198.19.0.9"), Ok(Parsed::Incomplete));
    let full = v2_header(
        v2::Command::Proxy,
        (addr("198.19.0.9:1"), addr("198.18.1.1:80")),
        &[],
    );
    for cut in 0..full.len() {
        assert_eq!(parse(&full[..cut]), Ok(Parsed::Incomplete), "cut at {cut}");
    }
}

#[test]
fn plain_http_and_garbage_are_refused_at_once() {
    assert!(matches!(
        parse(b"GET / HTTP/1.1\r\n"),
        Err(ProxyHeaderError::NotProxy(_))
    ));
    assert!(matches!(
        parse(b"\r\n\r\nX"),
        Err(ProxyHeaderError::NotProxy(_))
    ));
    assert!(matches!(
        parse(b"PROXY TCP4 not-an-ip 198.18.1.1 1 2\r\n"),
        Err(ProxyHeaderError::Malformed(_))
    ));
    assert!(matches!(
        parse(b"PROXY TCP4 198.19.0.9 198.18.1.1 99999 80\r\n"),
        Err(ProxyHeaderError::Malformed(_))
    ));
    // A complete line with missing fields is malformed, not a reason to wait.
    for line in [
        &b"PROXY TCP4 garbage\r\n"[..],
        b"PROXY TCP4 198.19.0.9 198.18.1.1 1\r\nGET / HTTP/1.1\r\n",
        b"PROXY \r\n",
    ] {
        assert!(
            matches!(parse(line), Err(ProxyHeaderError::Malformed(_))),
            "{}",
            String::from_utf8_lossy(line)
        );
    }
}

#[test]
fn oversized_headers_are_refused() {
    let mut long = b"PROXY TCP4 ".to_vec();
    long.resize(200, b'1');
    assert_eq!(parse(&long), Err(ProxyHeaderError::Oversized(V1_MAX)));
    let mut v2 = V2_SIGNATURE.to_vec();
    v2.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
    assert_eq!(parse(&v2), Err(ProxyHeaderError::Oversized(V2_MAX)));
}

#[test]
fn v2_local_is_a_health_check_without_client() {
    let bytes = v2_header(v2::Command::Local, v2::Addresses::Unspecified, &[]);
    let Ok(Parsed::Complete(h, n)) = parse(&bytes) else {
        panic!("complete");
    };
    assert_eq!((h.source, n), (None, 16));
}

#[test]
fn v2_tlvs_are_kept() {
    let mut ssl = vec![0x03, 0, 0, 0, 0];
    ssl.extend_from_slice(&[PP2_SUBTYPE_SSL_VERSION, 0, 7]);
    ssl.extend_from_slice(b"TLSv1.3");
    ssl.extend_from_slice(&[PP2_SUBTYPE_SSL_CN, 0, 5]);
    ssl.extend_from_slice(b"alice");
    let aws = [&[0x01u8][..], b"vpce-08d2bf15fac5001c9"].concat();
    let bytes = v2_header(
        v2::Command::Proxy,
        (addr("[fd00:5418::9]:5"), addr("[fd00:5418::1]:80")),
        &[
            (PP2_TYPE_AUTHORITY, b"intranet.example"),
            (PP2_TYPE_UNIQUE_ID, &[0xde, 0xad]),
            (PP2_TYPE_SSL, &ssl),
            (PP2_TYPE_AWS, &aws),
            (PP2_TYPE_AZURE, &[0x01, 0x2a, 0, 0, 0]),
            (0x04, &[]),
        ],
    );
    let Ok(Parsed::Complete(h, _)) = parse(&bytes) else {
        panic!("complete");
    };
    assert_eq!(h.source, Some(addr("[fd00:5418::9]:5")));
    assert_eq!(h.tlvs.authority.as_deref(), Some("intranet.example"));
    assert_eq!(h.tlvs.unique_id.as_deref(), Some("dead"));
    assert_eq!(
        h.tlvs.aws_vpce_id.as_deref(),
        Some("vpce-08d2bf15fac5001c9")
    );
    assert_eq!(h.tlvs.azure_link_id, Some(42));
    let ssl = h.tlvs.ssl.clone().expect("ssl");
    assert!(ssl.client_ssl && ssl.client_cert && ssl.verified);
    assert_eq!(ssl.version.as_deref(), Some("TLSv1.3"));
    assert_eq!(ssl.common_name.as_deref(), Some("alice"));
    assert_eq!(h.tlvs.other_types, vec![0x04]);
    assert_eq!(
        h.tlvs.value(PP2_TYPE_AZURE),
        Some(&[0x01, 0x2a, 0, 0, 0][..])
    );
    assert_eq!(h.tlvs.value(0x04), Some(&[][..]));
    assert_eq!(h.tlvs.value(0x30), None);
}

#[test]
fn truncated_ssl_tlv_is_malformed() {
    let bytes = v2_header(
        v2::Command::Proxy,
        (addr("198.19.0.9:1"), addr("198.18.1.1:80")),
        &[(PP2_TYPE_SSL, &[0x01, 0, 0])],
    );
    assert!(matches!(parse(&bytes), Err(ProxyHeaderError::Malformed(_))));
}

#[tokio::test]
async fn read_returns_the_bytes_after_the_header() {
    let mut input: &[u8] = b"PROXY TCP4 198.19.0.9 198.18.1.1 40000 80\r\nGET / HTTP/1.1\r\n\r\n";
    let (h, rest) = read(&mut input, Duration::from_secs(1))
        .await
        .expect("header");
    assert_eq!(h.source, Some(addr("198.19.0.9:40000")));
    assert_eq!(&rest[..], b"GET / HTTP/1.1\r\n\r\n");
}

#[tokio::test]
async fn read_times_out_on_a_silent_peer() {
    let (_keep, mut silent) = tokio::io::duplex(64);
    let err = read(&mut silent, Duration::from_millis(20))
        .await
        .expect_err("timeout");
    assert!(matches!(err, ProxyHeaderError::Timeout(_)), "{err}");
}
