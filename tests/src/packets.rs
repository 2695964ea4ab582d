//! Crafted frames for the XDP program: Ethernet (optionally VLAN-tagged), IPv4/IPv6 and TCP headers
//! built byte by byte, for `BPF_PROG_TEST_RUN` in the XDP tests and in the bench.

/// `XDP_PASS`: the verdict for a frame the program leaves to the stack.
pub const XDP_PASS: u32 = 2;
/// The fixture addresses both the XDP tests and the cost measurement use: a trusted balancer, an
/// untrusted one, a client, the virtual IP it reaches (this host's), and another host.
pub const TRUSTED_V4: [u8; 4] = [198, 18, 1, 100];
pub const UNTRUSTED_V4: [u8; 4] = [198, 18, 9, 9];
pub const TRUSTED_V6: [u8; 16] = [0xfd, 0, 0x54, 0x18, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x64];
pub const CLIENT_V4: [u8; 4] = [198, 18, 10, 10];
pub const VIP_V4: [u8; 4] = [198, 18, 20, 1];
pub const CLIENT_V6: [u8; 16] = [
    0xfd, 0, 0x54, 0x18, 0, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10,
];
pub const VIP_V6: [u8; 16] = [0xfd, 0, 0x54, 0x18, 0, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
pub const ELSEWHERE_V4: [u8; 4] = [203, 0, 113, 9];
/// TCP flags.
pub const SYN: u8 = 0x02;
pub const ACK: u8 = 0x10;

/// An Ethernet header (locally administered MACs) announcing `ethertype`.
pub fn eth(ethertype: u16) -> Vec<u8> {
    let mut f = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2];
    f.extend_from_slice(&ethertype.to_be_bytes());
    f
}

/// An Ethernet header with one 802.1Q tag (VLAN 42) before `inner_ethertype`.
pub fn vlan_eth(inner_ethertype: u16) -> Vec<u8> {
    let mut f = eth(0x8100);
    f.extend_from_slice(&[0x00, 0x2a]);
    f.extend_from_slice(&inner_ethertype.to_be_bytes());
    f
}

/// An IPv4 header (no options, checksum left 0: the decapsulation program does not check it) and `payload`;
/// `frag` is the flags + fragment offset field.
pub fn ipv4(src: [u8; 4], dst: [u8; 4], protocol: u8, frag: u16, payload: &[u8]) -> Vec<u8> {
    let total = u16::try_from(20 + payload.len()).unwrap_or(u16::MAX);
    let mut h = vec![0x45, 0];
    h.extend_from_slice(&total.to_be_bytes());
    h.extend_from_slice(&[0, 1]);
    h.extend_from_slice(&frag.to_be_bytes());
    h.extend_from_slice(&[64, protocol, 0, 0]);
    h.extend_from_slice(&src);
    h.extend_from_slice(&dst);
    h.extend_from_slice(payload);
    h
}

/// An IPv6 header (no extension headers) and `payload`.
pub fn ipv6(src: [u8; 16], dst: [u8; 16], next: u8, payload: &[u8]) -> Vec<u8> {
    let mut h = vec![0x60, 0, 0, 0];
    h.extend_from_slice(
        &u16::try_from(payload.len())
            .unwrap_or(u16::MAX)
            .to_be_bytes(),
    );
    h.extend_from_slice(&[next, 64]);
    h.extend_from_slice(&src);
    h.extend_from_slice(&dst);
    h.extend_from_slice(payload);
    h
}

/// A 20-byte TCP header with `flags` (SYN 0x02, ACK 0x10) and no payload.
pub fn tcp(sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    let mut t = Vec::new();
    t.extend_from_slice(&sport.to_be_bytes());
    t.extend_from_slice(&dport.to_be_bytes());
    t.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
    t
}

/// `l2` then `l3`.
pub fn frame(l2: Vec<u8>, l3: Vec<u8>) -> Vec<u8> {
    [l2, l3].concat()
}
