//! The XDP decapsulation program run on crafted frames with `BPF_PROG_TEST_RUN`: no interface, no
//! traffic, every edge case a frame can have.

use aya::{
    Ebpf, TestRunOptions,
    maps::{
        Array, HashMap, MapData, PerCpuArray,
        lpm_trie::{Key, LpmTrie},
    },
    programs::{TestRun as _, Xdp},
};
use ntlm_tag_common::{
    IPIP_ORIGIN_MAP, IPIP_ORIGIN_SLOTS, IpipKey, LOCAL_ADDRS_MAP, OriginSlot, TRUSTED_IPIP_MAP,
    TRUSTED_TOA_MAP, XDP_COUNTERS_MAP, XDP_PROGRAM, XdpCounter, origin_place, v4_mapped,
};
use ntlm_tag_tests::{
    packets::{
        ACK, CLIENT_V4, CLIENT_V6, ELSEWHERE_V4, SYN, TRUSTED_V4, TRUSTED_V6, UNTRUSTED_V4, VIP_V4,
        VIP_V6, XDP_PASS, eth, frame, ipv4, ipv6, tcp, vlan_eth,
    },
    programs::object,
};

const ELSEWHERE_V6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9];
/// Trusted for TOA only, never for tunnels.
const TOA_ONLY_V4: [u8; 4] = [198, 18, 1, 50];

struct Decap {
    ebpf: Ebpf,
}

impl Decap {
    fn load() -> Decap {
        assert!(
            // SAFETY: geteuid has no preconditions.
            unsafe { libc::geteuid() } == 0,
            "BPF_PROG_TEST_RUN needs root (cargo xtask test)"
        );
        let mut ebpf = Ebpf::load_file(object("ntlm-tag-ebpf")).expect("load object");
        let program: &mut Xdp = ebpf
            .program_mut(XDP_PROGRAM)
            .expect(XDP_PROGRAM)
            .try_into()
            .expect("xdp");
        program.load().expect("verifier accepts decap_ipip");
        // The map the trust lists replaced: its name is no longer a constant of the common crate.
        assert!(
            ebpf.map("TRUSTED_LB_V1").is_none(),
            "the shared trust list is gone"
        );
        let mut trusted: LpmTrie<_, [u8; 16], u8> =
            LpmTrie::try_from(ebpf.map_mut(TRUSTED_IPIP_MAP).expect("map")).expect("trie");
        trusted
            .insert(&Key::new(96 + 32, v4_mapped(TRUSTED_V4)), 1, 0)
            .expect("trust v4");
        trusted
            .insert(&Key::new(64, TRUSTED_V6), 1, 0)
            .expect("trust v6");
        let mut toa: LpmTrie<_, [u8; 16], u8> =
            LpmTrie::try_from(ebpf.map_mut(TRUSTED_TOA_MAP).expect("map")).expect("trie");
        toa.insert(&Key::new(96 + 32, v4_mapped(TOA_ONLY_V4)), 1, 0)
            .expect("trust for TOA");
        // What the gateway loads from the host's addresses: the virtual IPs are local.
        let mut local: HashMap<_, [u8; 16], u8> =
            HashMap::try_from(ebpf.map_mut(LOCAL_ADDRS_MAP).expect("map")).expect("hash");
        local.insert(v4_mapped(VIP_V4), 1, 0).expect("local v4");
        local.insert(VIP_V6, 1, 0).expect("local v6");
        Decap { ebpf }
    }

    /// Runs the program on `frame`; returns the action and the frame as it left.
    fn run(&mut self, frame: &[u8]) -> (u32, Vec<u8>) {
        let program: &mut Xdp = self
            .ebpf
            .program_mut(XDP_PROGRAM)
            .expect(XDP_PROGRAM)
            .try_into()
            .expect("xdp");
        let mut out = vec![0u8; frame.len() + 256];
        let result = program
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ..TestRunOptions::default()
            })
            .expect("test run");
        out.truncate(result.data_size_out as usize);
        (result.return_value, out)
    }

    fn counter(&self, c: XdpCounter) -> u64 {
        let counters: PerCpuArray<&MapData, u64> =
            PerCpuArray::try_from(self.ebpf.map(XDP_COUNTERS_MAP).expect("map")).expect("array");
        counters
            .get(&(c as u32), 0)
            .map(|v| v.iter().sum())
            .unwrap_or(0)
    }

    /// The balancer recorded for `key`, read the way sock_ops reads it.
    fn origin(&self, key: &IpipKey) -> Option<[u8; 16]> {
        let (index, words, hash) = origin_place(key);
        self.slot(index).balancer_for(&words, hash)
    }

    fn slot(&self, index: u32) -> OriginSlot {
        let table: Array<&MapData, OriginSlot> =
            Array::try_from(self.ebpf.map(IPIP_ORIGIN_MAP).expect("map")).expect("array");
        table.get(&index, 0).expect("slot")
    }
}

fn key_v4(sport: u16) -> IpipKey {
    IpipKey {
        client_addr: v4_mapped(CLIENT_V4),
        local_addr: v4_mapped(VIP_V4),
        client_port: sport,
        local_port: 8080,
        _pad: [0; 4],
    }
}

#[test]
fn ipv4_in_ipv4_from_a_trusted_balancer_is_decapsulated_and_its_syn_recorded() {
    let mut decap = Decap::load();
    let inner = ipv4(CLIENT_V4, VIP_V4, 6, 0, &tcp(40001, 8080, SYN));
    let input = frame(eth(0x0800), ipv4(TRUSTED_V4, [198, 18, 1, 1], 4, 0, &inner));
    let (action, out) = decap.run(&input);
    assert_eq!(action, XDP_PASS);
    assert_eq!(
        out,
        frame(eth(0x0800), inner),
        "the inner packet behind the same L2 header"
    );
    let origin = decap.origin(&key_v4(40001)).expect("SYN recorded");
    assert_eq!(origin, v4_mapped(TRUSTED_V4));
    assert_eq!(decap.counter(XdpCounter::Decapsulated), 1);

    // Later segments are decapsulated but not recorded again.
    let inner = ipv4(CLIENT_V4, VIP_V4, 6, 0, &tcp(40002, 8080, ACK));
    let (_, out) = decap.run(&frame(
        eth(0x0800),
        ipv4(TRUSTED_V4, [198, 18, 1, 1], 4, 0, &inner),
    ));
    assert_eq!(out, frame(eth(0x0800), inner));
    assert!(decap.origin(&key_v4(40002)).is_none());
}

#[test]
fn ipv6_in_ipv6_and_vlan_tagged_frames_are_decapsulated() {
    let mut decap = Decap::load();
    let inner = ipv6(CLIENT_V6, VIP_V6, 6, &tcp(40003, 8080, SYN));
    let input = frame(eth(0x86dd), ipv6(TRUSTED_V6, VIP_V6, 41, &inner));
    let (action, out) = decap.run(&input);
    assert_eq!(action, XDP_PASS);
    assert_eq!(out, frame(eth(0x86dd), inner));
    let key = IpipKey {
        client_addr: CLIENT_V6,
        local_addr: VIP_V6,
        client_port: 40003,
        local_port: 8080,
        _pad: [0; 4],
    };
    assert_eq!(decap.origin(&key).expect("recorded"), TRUSTED_V6);

    let inner = ipv4(CLIENT_V4, VIP_V4, 6, 0, &tcp(40004, 8080, SYN));
    let input = frame(
        vlan_eth(0x0800),
        ipv4(TRUSTED_V4, [198, 18, 1, 1], 4, 0, &inner),
    );
    let (_, out) = decap.run(&input);
    assert_eq!(out, frame(vlan_eth(0x0800), inner), "the VLAN tag is kept");
    assert!(decap.origin(&key_v4(40004)).is_some());
}

#[test]
fn everything_else_passes_untouched() {
    let mut decap = Decap::load();
    let inner = ipv4(CLIENT_V4, VIP_V4, 6, 0, &tcp(40005, 8080, SYN));
    let tunnel = ipv4(TRUSTED_V4, [198, 18, 1, 1], 4, 0, &inner);
    let mut with_options = tunnel.clone();
    with_options[0] = 0x46;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("plain TCP", frame(eth(0x0800), inner.clone())),
        (
            "untrusted balancer",
            frame(
                eth(0x0800),
                ipv4(UNTRUSTED_V4, [198, 18, 1, 1], 4, 0, &inner),
            ),
        ),
        (
            "outer fragment (MF)",
            frame(
                eth(0x0800),
                ipv4(TRUSTED_V4, [198, 18, 1, 1], 4, 0x2000, &inner),
            ),
        ),
        (
            "outer fragment (offset)",
            frame(
                eth(0x0800),
                ipv4(TRUSTED_V4, [198, 18, 1, 1], 4, 0x0010, &inner),
            ),
        ),
        ("outer IPv4 options", frame(eth(0x0800), with_options)),
        (
            "truncated outer header",
            frame(eth(0x0800), tunnel[..12].to_vec()),
        ),
        (
            "truncated inner header",
            frame(eth(0x0800), tunnel[..30].to_vec()),
        ),
        ("ARP", frame(eth(0x0806), vec![0; 28])),
        // (BPF_PROG_TEST_RUN refuses frames shorter than an Ethernet header.)
        ("Ethernet header only", eth(0x0800)),
        ("VLAN header only", vlan_eth(0x0800)),
        (
            "UDP",
            frame(
                eth(0x0800),
                ipv4(TRUSTED_V4, [198, 18, 1, 1], 17, 0, &[0; 8]),
            ),
        ),
        (
            "IPv6 untrusted",
            frame(
                eth(0x86dd),
                ipv6(
                    [0xfd; 16],
                    VIP_V6,
                    41,
                    &ipv6(CLIENT_V6, VIP_V6, 6, &tcp(1, 2, SYN)),
                ),
            ),
        ),
        (
            "IPv6 fragment header",
            frame(eth(0x86dd), ipv6(TRUSTED_V6, VIP_V6, 44, &[0; 48])),
        ),
    ];
    for (what, input) in cases {
        let (action, out) = decap.run(&input);
        assert_eq!(action, XDP_PASS, "{what}");
        assert_eq!(out, input, "{what} must pass untouched");
    }
    assert_eq!(decap.counter(XdpCounter::Decapsulated), 0);
    assert_eq!(decap.counter(XdpCounter::Untrusted), 2);
    assert!(decap.counter(XdpCounter::Skipped) >= 3);
    assert!(decap.origin(&key_v4(40005)).is_none());
}

#[test]
fn an_inner_packet_that_is_not_tcp_is_passed_untouched_and_counted() {
    let mut decap = Decap::load();
    let udp = [0x9c, 0x41, 0x1f, 0x90, 0, 8, 0, 0];
    let cases = [
        frame(
            eth(0x0800),
            ipv4(
                TRUSTED_V4,
                [198, 18, 1, 1],
                4,
                0,
                &ipv4(CLIENT_V4, VIP_V4, 17, 0, &udp),
            ),
        ),
        frame(
            eth(0x0800),
            ipv4(
                TRUSTED_V4,
                [198, 18, 1, 1],
                4,
                0,
                &ipv4(CLIENT_V4, VIP_V4, 1, 0, &[8, 0, 0, 0, 0, 0, 0, 0]),
            ),
        ),
        frame(
            eth(0x86dd),
            ipv6(TRUSTED_V6, VIP_V6, 41, &ipv6(CLIENT_V6, VIP_V6, 17, &udp)),
        ),
    ];
    for input in &cases {
        let (action, out) = decap.run(input);
        assert_eq!(action, XDP_PASS);
        assert_eq!(&out, input, "a non-TCP inner packet is not decapsulated");
    }
    assert_eq!(decap.counter(XdpCounter::InnerNotTcp), 3);
    assert_eq!(decap.counter(XdpCounter::Decapsulated), 0);
}

#[test]
fn an_inner_packet_for_another_host_is_passed_untouched_and_counted() {
    let mut decap = Decap::load();
    // A SYN through a trusted tunnel to an address that is not this host's: decapsulated, the stack
    // would forward it, and the gateway would relay for whoever reaches the balancer.
    let v4 = frame(
        eth(0x0800),
        ipv4(
            TRUSTED_V4,
            [198, 18, 1, 1],
            4,
            0,
            &ipv4(CLIENT_V4, ELSEWHERE_V4, 6, 0, &tcp(40010, 8080, SYN)),
        ),
    );
    let v6 = frame(
        eth(0x86dd),
        ipv6(
            TRUSTED_V6,
            VIP_V6,
            41,
            &ipv6(CLIENT_V6, ELSEWHERE_V6, 6, &tcp(40011, 8080, SYN)),
        ),
    );
    for input in [&v4, &v6] {
        let (action, out) = decap.run(input);
        assert_eq!(action, XDP_PASS);
        assert_eq!(&out, input, "not decapsulated");
    }
    assert_eq!(decap.counter(XdpCounter::InnerNotLocal), 2);
    assert_eq!(decap.counter(XdpCounter::Decapsulated), 0);
    let key = IpipKey {
        local_addr: v4_mapped(ELSEWHERE_V4),
        ..key_v4(40010)
    };
    assert!(decap.origin(&key).is_none(), "no origin recorded");

    // The same SYN to a local address is decapsulated (the positive of the same fixture).
    let inner = ipv4(CLIENT_V4, VIP_V4, 6, 0, &tcp(40012, 8080, SYN));
    let (_, out) = decap.run(&frame(
        eth(0x0800),
        ipv4(TRUSTED_V4, [198, 18, 1, 1], 4, 0, &inner),
    ));
    assert_eq!(out, frame(eth(0x0800), inner));
    assert_eq!(decap.counter(XdpCounter::Decapsulated), 1);
    assert!(decap.origin(&key_v4(40012)).is_some());
}

#[test]
fn a_balancer_trusted_for_toa_only_is_not_trusted_for_tunnels() {
    let mut decap = Decap::load();
    let input = frame(
        eth(0x0800),
        ipv4(
            TOA_ONLY_V4,
            [198, 18, 1, 1],
            4,
            0,
            &ipv4(CLIENT_V4, VIP_V4, 6, 0, &tcp(40013, 8080, SYN)),
        ),
    );
    let (_, out) = decap.run(&input);
    assert_eq!(out, input);
    assert_eq!(decap.counter(XdpCounter::Untrusted), 1);
    assert_eq!(decap.counter(XdpCounter::Decapsulated), 0);
}

/// The origin table is fixed memory: a SYN that lands in the slot of a connection still being
/// established replaces its record, and that connection then finds no record (it is identified
/// without its balancer), never the newer SYN's balancer.
#[test]
fn a_syn_in_an_occupied_origin_slot_replaces_the_record_and_never_lends_its_balancer() {
    let mut decap = Decap::load();
    let Some(aya::maps::Map::Array(table)) = decap.ebpf.map(IPIP_ORIGIN_MAP) else {
        panic!("the origin table is a preallocated array");
    };
    let table = table.info().expect("info");
    assert_eq!(
        (table.max_entries(), table.value_size()),
        (IPIP_ORIGIN_SLOTS, 64),
        "its size is fixed whatever the SYN rate"
    );
    let second_balancer = [198, 18, 1, 60];
    let mut trusted: LpmTrie<_, [u8; 16], u8> =
        LpmTrie::try_from(decap.ebpf.map_mut(TRUSTED_IPIP_MAP).expect("map")).expect("trie");
    trusted
        .insert(&Key::new(96 + 32, v4_mapped(second_balancer)), 1, 0)
        .expect("trust a second balancer");
    // Two connections of the fixture client that share a slot (consecutive client ports do not:
    // the hash spreads them, so the local port varies too).
    let key = |(client_port, local_port)| IpipKey {
        local_port,
        ..key_v4(client_port)
    };
    let mut first_of_slot = std::collections::HashMap::new();
    let (earlier, later) = (8080..8180)
        .flat_map(|local_port| (1024..=u16::MAX).map(move |client_port| (client_port, local_port)))
        .find_map(|ports| {
            let (index, _, _) = origin_place(&key(ports));
            first_of_slot
                .insert(index, ports)
                .map(|earlier| (earlier, ports))
        })
        .expect("two connections share a slot");
    let syn = |balancer, (client_port, local_port)| {
        let inner = ipv4(CLIENT_V4, VIP_V4, 6, 0, &tcp(client_port, local_port, SYN));
        frame(eth(0x0800), ipv4(balancer, [198, 18, 1, 1], 4, 0, &inner))
    };

    decap.run(&syn(TRUSTED_V4, earlier));
    assert_eq!(decap.origin(&key(earlier)), Some(v4_mapped(TRUSTED_V4)));
    decap.run(&syn(second_balancer, later));
    assert_eq!(decap.origin(&key(later)), Some(v4_mapped(second_balancer)));
    assert_eq!(
        decap.origin(&key(earlier)),
        None,
        "the replaced connection has no record, not the other connection's balancer"
    );
    assert_eq!(decap.counter(XdpCounter::Decapsulated), 2);
}

/// The gateway's TOA search (the code its sock_ops program runs), run in the kernel on crafted TCP
/// headers by the test-only `parse_toa` XDP program.
struct ToaParser {
    ebpf: Ebpf,
}

#[derive(Debug, PartialEq, Eq)]
enum Toa {
    Absent,
    Malformed,
    Found([u8; 16], u16),
}

impl ToaParser {
    fn load(kind: u8) -> ToaParser {
        let mut ebpf = Ebpf::load_file(object("ntlm-tag-test-programs")).expect("load");
        let mut k: aya::maps::Array<_, u32> =
            aya::maps::Array::try_from(ebpf.map_mut("PARSE_TOA_KIND").expect("map"))
                .expect("array");
        k.set(0, u32::from(kind), 0).expect("kind");
        let program: &mut Xdp = ebpf
            .program_mut("parse_toa")
            .expect("parse_toa")
            .try_into()
            .expect("xdp");
        program.load().expect("verifier accepts the TOA parser");
        ToaParser { ebpf }
    }

    /// Parses the options of a TCP header whose data offset is `doff` words.
    fn parse(&mut self, doff: u8, options: &[u8]) -> Toa {
        let mut tcp = tcp(40000, 8080, ACK);
        tcp[12] = doff << 4;
        tcp.extend_from_slice(options);
        let input = frame(eth(0x0800), ipv4(CLIENT_V4, VIP_V4, 6, 0, &tcp));
        let program: &mut Xdp = self
            .ebpf
            .program_mut("parse_toa")
            .expect("parse_toa")
            .try_into()
            .expect("xdp");
        let result = program
            .test_run(TestRunOptions {
                data_in: Some(&input),
                ..TestRunOptions::default()
            })
            .expect("test run");
        assert_eq!(result.return_value, XDP_PASS);
        let out: aya::maps::Array<&MapData, [u8; 19]> =
            aya::maps::Array::try_from(self.ebpf.map("PARSE_TOA_RESULT").expect("map"))
                .expect("array");
        let r = out.get(&0, 0).expect("result");
        match r[0] {
            0 => Toa::Absent,
            1 => Toa::Malformed,
            _ => {
                let mut addr = [0u8; 16];
                addr.copy_from_slice(&r[3..19]);
                Toa::Found(addr, u16::from_be_bytes([r[1], r[2]]))
            }
        }
    }
}

#[test]
fn toa_options_on_crafted_tcp_headers() {
    let mut p = ToaParser::load(254);
    let toa4 = [254, 8, 0x10, 0xe1, 198, 19, 77, 7];
    let found4 = Toa::Found(v4_mapped([198, 19, 77, 7]), 4321);
    // Valid, after MSS/NOP/NOP/SACK-permitted (8 + 8 option bytes: doff 9).
    let opts = [[2, 4, 5, 180, 1, 1, 4, 2].as_slice(), &toa4].concat();
    assert_eq!(p.parse(9, &opts), found4);
    // At the very end of a full 60-byte header.
    let opts = [[1u8; 32].as_slice(), &toa4].concat();
    assert_eq!(p.parse(15, &opts), found4);
    // IPv6 form.
    let mut toa6 = vec![254, 20, 0, 80];
    toa6.extend_from_slice(&CLIENT_V6);
    assert_eq!(p.parse(11, &toa6), Toa::Found(CLIENT_V6, 80));
    // Truncated: the header claims 8 option bytes, the packet holds 4.
    assert_eq!(p.parse(7, &toa4[..4]), Toa::Malformed);
    // Zero-length and odd lengths of the TOA kind.
    assert_eq!(p.parse(6, &[254, 0, 0, 0]), Toa::Malformed);
    assert_eq!(p.parse(7, &[254, 6, 0, 1, 2, 3, 1, 1]), Toa::Malformed);
    // An oversized length of another option hides nothing behind it.
    assert_eq!(
        p.parse(8, &[[3, 200, 0, 1].as_slice(), &toa4].concat()),
        Toa::Absent
    );
    // End-of-list before the option.
    assert_eq!(
        p.parse(8, &[[0, 1, 1, 1].as_slice(), &toa4].concat()),
        Toa::Absent
    );
    // No options at all, and a bogus data offset smaller than the fixed header.
    assert_eq!(p.parse(5, &[]), Toa::Absent);
    assert_eq!(p.parse(2, &[]), Toa::Absent);
    // Another kind is not TOA for this parser.
    let mut other = toa4;
    other[0] = 200;
    assert_eq!(p.parse(7, &other), Toa::Absent);
    let mut p200 = ToaParser::load(200);
    assert_eq!(p200.parse(7, &other), found4);
}
