use super::*;

fn policy(forwarded_headers: bool) -> StampPolicy {
    StampPolicy::new(
        HeaderName::from_static("jespa-connection-id"),
        forwarded_headers,
    )
}

fn stamp() -> ConnectionStamp {
    ConnectionStamp::new(
        "198.18.0.2:4000/abc",
        "198.18.0.2:4000".parse().expect("addr"),
        ClientScheme::Http,
        &policy(true),
    )
    .expect("valid")
}

/// The fields a backend receives: the client's, prepared, then the stamped ones.
fn stamp_request(headers: &mut HeaderMap, policy: &StampPolicy, stamp: &ConnectionStamp) {
    prepare_request(headers, policy);
    for (name, value) in stamp.fields(policy) {
        assert!(
            !headers.contains_key(name),
            "{name} left in the map beside the stamped one"
        );
        headers.append(name.clone(), value.clone());
    }
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
    stamp_request(&mut h, &policy(true), &stamp());
    let ids: Vec<_> = h.get_all("jespa-connection-id").iter().collect();
    assert_eq!(ids, vec!["198.18.0.2:4000/abc"]);
    assert_eq!(h["x-forwarded-for"], "198.18.0.2");
    assert_eq!(h["forwarded"], "for=\"198.18.0.2:4000\";proto=http");
    assert_eq!(h["x-forwarded-proto"], "http");
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
    assert_eq!(h.len(), 5);
}

#[test]
fn every_forwarding_header_and_its_look_alikes_are_replaced() {
    let mut pairs = Vec::new();
    for name in FORWARDING_HEADERS {
        pairs.push((name.to_string(), "forged".to_string()));
        pairs.push((name.to_uppercase().replace('-', "_"), "forged".to_string()));
        pairs.push((name.replace('-', "."), "forged".to_string()));
    }
    pairs.push(("Accept".into(), "*/*".into()));
    let mut h = HeaderMap::new();
    for (k, v) in &pairs {
        h.append(
            HeaderName::from_bytes(k.as_bytes()).expect("name"),
            HeaderValue::from_str(v).expect("value"),
        );
    }
    stamp_request(&mut h, &policy(true), &stamp());
    for (name, value) in &h {
        assert_ne!(value, "forged", "{name} kept a client value");
    }
    let names: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
    assert_eq!(
        names.len(),
        5,
        "only the gateway's own headers and Accept: {names:?}"
    );
}

#[test]
fn tls_listeners_say_https_in_forwarded_and_x_forwarded_proto() {
    let s = ConnectionStamp::new(
        "198.18.0.2:4000/abc",
        "198.18.0.2:4000".parse().expect("addr"),
        ClientScheme::Https,
        &policy(true),
    )
    .expect("valid");
    let mut h = headers(&[("X-Forwarded-Proto", "http"), ("Forwarded", "proto=http")]);
    stamp_request(&mut h, &policy(true), &s);
    assert_eq!(h["forwarded"], "for=\"198.18.0.2:4000\";proto=https");
    assert_eq!(
        h.get_all("x-forwarded-proto").iter().collect::<Vec<_>>(),
        vec!["https"]
    );
}

#[test]
fn forwarding_headers_can_be_turned_off_but_client_copies_still_go() {
    let mut h = headers(&[("X-Forwarded-For", "203.0.113.9"), ("Forwarded", "for=x")]);
    stamp_request(&mut h, &policy(false), &stamp());
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
    stamp_request(&mut h, &policy(false), &stamp());
    assert!(h.get("x-secret").is_none());
    assert!(h.get("keep-alive").is_none());
    assert!(h.get("te").is_none());
    assert!(h.get("upgrade").is_none());
    assert!(h.get("proxy-authorization").is_none());
    assert_eq!(h["authorization"], "NTLM TlRMTVNTUAABAAAA");
}

#[test]
fn a_plain_keep_alive_connection_header_goes_and_nothing_else() {
    for value in [
        "keep-alive",
        "Keep-Alive",
        "close",
        "keep-alive, close",
        " , keep-alive",
    ] {
        let mut h = headers(&[
            ("Connection", value),
            ("Content-Length", "3"),
            ("X-Other", "1"),
        ]);
        prepare_response(&mut h);
        assert!(h.get("connection").is_none(), "{value}");
        assert_eq!(h["content-length"], "3");
        assert_eq!(h["x-other"], "1");
    }
    // A named header still goes (the general path).
    let mut h = headers(&[("Connection", "keep-alive, x-other"), ("X-Other", "1")]);
    prepare_response(&mut h);
    assert!(h.get("connection").is_none() && h.get("x-other").is_none());
    // So does a Keep-Alive header next to it.
    let mut h = headers(&[("Connection", "keep-alive"), ("Keep-Alive", "timeout=5")]);
    prepare_response(&mut h);
    assert!(h.get("connection").is_none() && h.get("keep-alive").is_none());
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
    let s = ConnectionStamp::new(
        "x",
        "[fd00:5418::2]:443".parse().expect("addr"),
        ClientScheme::Http,
        &policy(true),
    )
    .expect("valid");
    assert_eq!(s.forwarded, "for=\"[fd00:5418::2]:443\";proto=http");
    assert_eq!(s.x_forwarded_for, "fd00:5418::2");
}

#[test]
fn the_stamped_lines_are_the_fields_encoded_in_order() {
    let with = stamp();
    assert_eq!(
        String::from_utf8_lossy(with.lines()),
        "jespa-connection-id: 198.18.0.2:4000/abc\r\nx-forwarded-for: 198.18.0.2\r\n\
         x-forwarded-proto: http\r\nforwarded: for=\"198.18.0.2:4000\";proto=http\r\n"
    );
    let without = ConnectionStamp::new(
        "198.18.0.2:4000/abc",
        "198.18.0.2:4000".parse().expect("addr"),
        ClientScheme::Http,
        &policy(false),
    )
    .expect("valid");
    assert_eq!(
        without.lines(),
        b"jespa-connection-id: 198.18.0.2:4000/abc\r\n"
    );
}

#[test]
fn hop_by_hop_names_are_recognised_as_the_list_spells_them_and_no_others() {
    for name in HOP_BY_HOP {
        assert!(is_hop_by_hop(&HeaderName::from_static(name)), "{name}");
    }
    for name in [
        "keep-alive-x",
        "x-upgrade",
        "tee",
        "proxy",
        "host",
        "connections",
    ] {
        assert!(!is_hop_by_hop(&HeaderName::from_static(name)), "{name}");
    }
}

#[test]
fn folding_matches_the_iterator_it_replaced() {
    let long = "a".repeat(FOLD_MAX + 1);
    for name in [
        "x-forwarded-for",
        "X_Real.IP",
        "",
        "--",
        "x1-2y",
        "Ab9",
        long.as_str(),
    ] {
        let mut buf = [0u8; FOLD_MAX];
        let by_iterator: Vec<u8> = fold(name).collect();
        match fold_into(name, &mut buf) {
            Some(folded) => assert_eq!(folded, by_iterator.as_slice(), "{name}"),
            None => assert!(by_iterator.len() > FOLD_MAX, "{name}"),
        }
        assert_eq!(
            is_forwarding_folded(&by_iterator),
            FORWARDING_FOLDED.contains(&by_iterator.as_slice()),
            "{name}"
        );
    }
}

#[test]
fn names_ruled_out_by_their_first_byte_are_those_the_full_fold_rules_out() {
    let mut names: Vec<String> = FORWARDING_HEADERS.iter().map(|n| n.to_string()).collect();
    names.extend(
        [
            "-jespa-connection-id",
            "_x_real_ip",
            "--",
            "+",
            "accept",
            "user-agent",
            "host",
        ]
        .map(String::from),
    );
    names.extend((b'0'..=b'z').map(|b| format!("-{}-forwarded-for", b as char)));
    // The usual id header, and one of punctuation only, which folds to nothing.
    for id in ["jespa-connection-id", "+"] {
        let mut id_buf = [0u8; FOLD_MAX];
        let id_folded = fold_into(id, &mut id_buf);
        for name in &names {
            let by_full_fold =
                folds_equal(name, id) || FORWARDING_HEADERS.iter().any(|f| folds_equal(name, f));
            assert_eq!(
                claims_identity(name, id, id_folded),
                by_full_fold,
                "{name} with id header {id}"
            );
        }
    }
}

#[test]
fn the_folded_forwarding_names_match_the_names() {
    let folded: Vec<Vec<u8>> = FORWARDING_HEADERS
        .iter()
        .map(|h| fold(h).collect())
        .collect();
    assert_eq!(folded, FORWARDING_FOLDED.map(<[u8]>::to_vec));
}

#[test]
fn long_header_names_are_still_compared_by_their_fold() {
    let long_id = format!("x-{}", "a".repeat(FOLD_MAX));
    let policy = StampPolicy::new(
        HeaderName::from_bytes(long_id.as_bytes()).expect("name"),
        false,
    );
    let look_alike = long_id.replace('-', "_").to_uppercase();
    let mut h = headers(&[(&look_alike, "forged"), ("accept", "*/*")]);
    stamp_request(&mut h, &policy, &stamp());
    assert_eq!(h.get_all(policy.id_header()).iter().count(), 1);
    assert_eq!(h[policy.id_header()], "198.18.0.2:4000/abc");
    assert!(h.contains_key("accept"));
}

#[test]
fn reserved_headers_cannot_carry_the_id() {
    for name in [
        "host",
        "authorization",
        "connection",
        "x-forwarded-for",
        "x-forwarded-proto",
        "true-client-ip",
    ] {
        assert!(is_reserved_header(&HeaderName::from_static(name)), "{name}");
    }
    assert!(!is_reserved_header(&HeaderName::from_static(
        "jespa-connection-id"
    )));
}
