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
    let uid = generator(0).next_uid();
    let u = uid.as_str();
    let client = addr("10.0.0.5:40000");
    let aws = [&[0x01u8][..], b"vpce-08d2bf15fac5001c9"].concat();
    let with = tlvs(&[(0xEA, &aws), (0x30, b"link.A_1~")], Some(42));
    assert_eq!(
        t.render(client, &uid, Some(&with)),
        format!("10.0.0.5:40000/vpce-08d2bf15fac5001c9/42/link.A_1~/{u}")
    );
    assert_eq!(
        t.render(client, &uid, None),
        format!("10.0.0.5:40000/-/-/-/{u}")
    );
    // An AWS TLV of another subtype is not the endpoint id.
    let other = tlvs(&[(0xEA, &[0x02, b'x'])], None);
    assert_eq!(
        t.render(client, &uid, Some(&other)),
        format!("10.0.0.5:40000/-/-/-/{u}")
    );
    // Upper-case hex works too.
    let t = IdTemplate::parse("{tlv:0XeA}{uid}", false).expect("valid");
    assert_eq!(t.render(client, &uid, Some(&other)), format!("0x0278{u}"));
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
    let t = IdTemplate::parse("{client_ip} {client_port} {client}|{uid}", false).expect("valid");
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
