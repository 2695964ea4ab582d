//! Types shared by the kernel programs (`ntlm-tag-ebpf`) and the proxy (`ntlm-tag`).
//!
//! Everything here is `#[repr(C)]` plain data with explicit padding, because the same bytes are written by
//! the kernel and read by userspace. When a layout changes, the map it lives in gets a new versioned name
//! so that an old program and a new loader never disagree silently.
#![no_std]

/// Name of the LRU hash map `socket cookie (u64) -> ConnIdentity`.
pub const CONN_IDENTITY_MAP: &str = "CONN_IDENTITY_V1";
/// Default number of entries of [`CONN_IDENTITY_MAP`]; userspace may resize it before loading.
pub const CONN_IDENTITY_DEFAULT_ENTRIES: u32 = 262_144;

/// Name of the per-CPU array of `u64` counters, indexed by [`Counter`].
pub const COUNTERS_MAP: &str = "COUNTERS_V1";
/// Number of slots in [`COUNTERS_MAP`]; room is left for counters added later.
pub const COUNTERS_SLOTS: u32 = 16;

/// Name of the LPM trie of balancer prefixes trusted to convey a client in a TOA option: key
/// [`LpmAddr`]-shaped (`u32` prefix length, then 16 address bytes; IPv4 as v4-mapped with prefix
/// length + 96), value `u8` 1. One trie per mechanism, so that a balancer trusted for one way of
/// conveying a client (PROXY protocol, IPIP) is not thereby trusted for another.
pub const TRUSTED_TOA_MAP: &str = "TRUSTED_TOA_V1";
/// Name of the LPM trie of balancer prefixes whose IPIP / IPv6-in-IPv6 tunnels XDP decapsulates
/// (same layout as [`TRUSTED_TOA_MAP`]).
pub const TRUSTED_IPIP_MAP: &str = "TRUSTED_IPIP_V1";
/// Most prefixes each trust list may hold (each of [`TRUSTED_TOA_MAP`] and [`TRUSTED_IPIP_MAP`]).
pub const TRUSTED_PREFIX_ENTRIES: u32 = 1024;

/// Name of the hash map `LpmAddr -> u8` of this host's own addresses (IPv4 v4-mapped), filled by
/// userspace at start-up and on reload. XDP decapsulates only tunnelled packets addressed to one of
/// them, so the gateway never relays a tunnel's inner packet onwards.
pub const LOCAL_ADDRS_MAP: &str = "LOCAL_ADDRS_V1";
/// Most local addresses [`LOCAL_ADDRS_MAP`] holds.
pub const LOCAL_ADDRS_ENTRIES: u32 = 4096;

/// Name of the array of `u32` settings, indexed by [`Setting`].
pub const SETTINGS_MAP: &str = "SETTINGS_V1";
pub const SETTINGS_SLOTS: u32 = 8;

/// Indices into [`SETTINGS_MAP`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Setting {
    /// TCP option kind that carries TOA (0, the array's initial value: TOA off, options not read).
    ToaKind = 0,
}

/// TOA option lengths: kind, length, port (2), then IPv4 (4) or IPv6 (16).
pub const TOA_LEN_V4: u8 = 8;
pub const TOA_LEN_V6: u8 = 20;

/// Name of the array of [`OriginSlot`]s the XDP program fills (on the SYN of each decapsulated
/// connection) and the sock_ops program reads and clears. A direct-mapped table: the slot of a
/// connection is [`origin_slot`] of its [`IpipKey`], so recording a SYN is a few stores into a
/// preallocated array (no hash-table insert, no allocation, no lock), and the memory is fixed
/// whatever the SYN rate.
pub const IPIP_ORIGIN_MAP: &str = "IPIP_ORIGIN_V2";
/// Slots of [`IPIP_ORIGIN_MAP`] (a power of two; 64 bytes each, 8 MiB). A record is lost, never
/// confused, when another SYN lands in its slot before its handshake completes: with `h` handshakes
/// in flight, about `h / IPIP_ORIGIN_SLOTS` of connections are identified without their balancer.
pub const IPIP_ORIGIN_SLOTS: u32 = 1 << 17;
const _: () = assert!(IPIP_ORIGIN_SLOTS.is_power_of_two());

/// Name of the XDP program that decapsulates IPIP / IPv6-in-IPv6 from trusted balancers.
pub const XDP_PROGRAM: &str = "decap_ipip";

/// Per-CPU counters of the XDP program (`XDP_COUNTERS_V1`), indexed by [`XdpCounter`].
pub const XDP_COUNTERS_MAP: &str = "XDP_COUNTERS_V1";
pub const XDP_COUNTERS_SLOTS: u32 = 8;

#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XdpCounter {
    /// Packets decapsulated.
    Decapsulated = 0,
    /// Tunnel packets from a source outside the trust list, passed untouched.
    Untrusted = 1,
    /// Tunnel packets that could not be decapsulated (fragments, truncated, options), passed untouched.
    Skipped = 2,
    /// Tunnel packets from a trusted source whose inner packet is not TCP, passed untouched.
    InnerNotTcp = 3,
    /// Tunnel packets from a trusted source whose inner packet is not addressed to this host, passed
    /// untouched (decapsulating them would make the gateway a relay).
    InnerNotLocal = 4,
}

/// The inner connection of a decapsulated packet, as the accepted socket will see it. 8-aligned so
/// that it is five 64-bit words ([`IpipKey::words`]) for the slot hash and the stores.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IpipKey {
    /// The client (inner source), 16 bytes, IPv4 v4-mapped.
    pub client_addr: [u8; 16],
    /// The gateway address the client connected to (inner destination).
    pub local_addr: [u8; 16],
    pub client_port: u16,
    pub local_port: u16,
    pub _pad: [u8; 4],
}

const _: () = assert!(core::mem::size_of::<IpipKey>() == 40);

impl IpipKey {
    /// The key as the five words a slot stores it in.
    #[inline(always)]
    pub fn words(&self) -> [u64; 5] {
        // SAFETY: IpipKey is 40 bytes of plain data with its padding explicit, as is [u64; 5].
        unsafe { core::mem::transmute::<IpipKey, [u64; 5]>(*self) }
    }
}

/// One slot of [`IPIP_ORIGIN_MAP`]: which balancer delivered the SYN of connection `key`.
///
/// Slots are shared by every CPU (the ACK that completes a handshake may be processed on another
/// CPU than its SYN) and written without a lock (`bpf_spin_lock` needs a map value described in
/// BTF, which this object's map definitions are not), so two SYNs landing in the same slot at
/// once, or a reader racing a writer, can leave words of two records mixed. `check` is [`origin_check`] of the key and balancer as written: a
/// reader uses a slot only if its key is the connection's own and `check` matches what it read, so a
/// mixed slot is a miss (the connection identified without its balancer), never another record's
/// balancer. 0 marks an empty or used slot.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OriginSlot {
    pub key: [u64; 5],
    /// The balancer (outer source), 16 bytes, IPv4 v4-mapped, as two words.
    pub balancer: [u64; 2],
    pub check: u64,
}

const _: () = assert!(core::mem::size_of::<OriginSlot>() == 64);

impl OriginSlot {
    /// The slot content naming `balancer` (16 bytes, IPv4 v4-mapped) as the origin of the key with
    /// words `key` and hash `key_hash` ([`origin_key_hash`]).
    #[inline(always)]
    pub fn record(key: [u64; 5], key_hash: u64, balancer: [u8; 16]) -> OriginSlot {
        // SAFETY: 16 bytes and two u64 have the same size and every bit pattern is valid for both.
        let balancer = unsafe { core::mem::transmute::<[u8; 16], [u64; 2]>(balancer) };
        OriginSlot {
            key,
            balancer,
            check: origin_check(key_hash, &balancer),
        }
    }

    /// The balancer this slot names for the key with words `key` and hash `key_hash`, if it holds
    /// an intact record of that key: not empty, the same key, and a check that matches the words
    /// read (a slot mixed from two records fails it).
    #[inline(always)]
    pub fn balancer_for(&self, key: &[u64; 5], key_hash: u64) -> Option<[u8; 16]> {
        if self.check == 0
            || self.key != *key
            || self.check != origin_check(key_hash, &self.balancer)
        {
            return None;
        }
        // SAFETY: as in `record`.
        Some(unsafe { core::mem::transmute::<[u64; 2], [u8; 16]>(self.balancer) })
    }
}

/// Where the record of `key` lives: its slot index, its words and the hash they give.
#[inline(always)]
pub fn origin_place(key: &IpipKey) -> (u32, [u64; 5], u64) {
    let words = key.words();
    let hash = origin_key_hash(&words);
    (origin_slot(hash), words, hash)
}

/// Multiplier of the slot hash (2^64 / golden ratio, odd: multiplying by it is a bijection).
const ORIGIN_MIX: u64 = 0x9e37_79b9_7f4a_7c15;

/// One step of the slot hash: a bijection of `h` for a fixed `word`, and of `word` for a fixed `h`.
#[inline(always)]
const fn mix(h: u64, word: u64) -> u64 {
    let h = (h ^ word).wrapping_mul(ORIGIN_MIX);
    h ^ (h >> 29)
}

/// The hash of a key's words; [`origin_slot`] and [`origin_check`] derive from it. Hand-written
/// rather than a hashing crate's: both eBPF programs compute it, where it must be a few
/// instructions per word with no loop the verifier has to walk and no memory function.
#[inline(always)]
pub const fn origin_key_hash(key: &[u64; 5]) -> u64 {
    mix(
        mix(mix(mix(mix(ORIGIN_MIX, key[0]), key[1]), key[2]), key[3]),
        key[4],
    )
}

/// The slot of a key with hash `key_hash` (its top bits: the best mixed).
#[inline(always)]
pub const fn origin_slot(key_hash: u64) -> u32 {
    (key_hash >> (64 - IPIP_ORIGIN_SLOTS.trailing_zeros())) as u32
}

/// The check word of a slot holding the key with hash `key_hash` and `balancer`: for a given key,
/// two balancers whose first words are equal (every IPv4 one) never share a check.
#[inline(always)]
pub const fn origin_check(key_hash: u64, balancer: &[u64; 2]) -> u64 {
    mix(mix(key_hash, balancer[0]), balancer[1])
}

/// Name of the sock_ops program that records and forgets connections.
pub const SOCK_OPS_PROGRAM: &str = "track_connections";

/// The test-only object (`ntlm-tag-test-programs`, never loaded by the gateway): a sock_ops program
/// that writes a TOA option into a cgroup's SYNs, and a TC egress program that encapsulates in
/// IPIP the way a Katran-style balancer does, with the maps that configure them.
pub const TEST_WRITE_TOA_PROGRAM: &str = "write_toa";
/// One `[u8; 20]`: the TOA option [`TEST_WRITE_TOA_PROGRAM`] writes.
pub const TEST_TOA_OPTION_MAP: &str = "TOA_OPTION";
pub const TEST_ENCAP_PROGRAM: &str = "encap_ipip";
/// One `[u32; 3]`: virtual IP, outer source, outer destination of [`TEST_ENCAP_PROGRAM`].
pub const TEST_ENCAP_CONFIG_MAP: &str = "ENCAP_CONFIG";

/// `AF_INET` and `AF_INET6`, as the kernel reports them in `bpf_sock_ops.family`.
pub const AF_INET: u32 = 2;
pub const AF_INET6: u32 = 10;

/// Indices into [`COUNTERS_MAP`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// A passive connection was established and its identity recorded.
    Recorded = 0,
    /// A recorded connection reached `TCP_CLOSE` and its record was deleted.
    Deleted = 1,
    /// Inserting a record failed (the map refused the update).
    InsertFailed = 2,
    /// State callbacks could not be enabled, so the record will only leave by LRU eviction.
    CallbacksUnavailable = 3,
    /// A TOA option from a trusted peer named the client.
    ToaAccepted = 4,
    /// A TOA option arrived from a peer outside the trust list and was ignored.
    ToaUntrusted = 5,
    /// A TOA option had a length that is neither the IPv4 nor the IPv6 form, and was ignored.
    ToaMalformed = 6,
    /// A connection was matched to the balancer that delivered it through IPIP.
    IpipJoined = 7,
}

/// How the original client of a connection was learned. Stored as a `u8` in [`ConnIdentity::source`].
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientSource {
    /// The TCP peer itself is the client.
    Peer = 0,
    /// A PROXY protocol v1 header from a trusted balancer.
    ProxyV1 = 1,
    /// A PROXY protocol v2 header from a trusted balancer.
    ProxyV2 = 2,
    /// A TOA TCP option from a trusted balancer.
    Toa = 3,
    /// The inner header of an IPIP packet decapsulated from a trusted balancer.
    Ipip = 4,
}

impl ClientSource {
    pub const fn from_u8(v: u8) -> Option<Self> {
        match v {
            0 => Some(ClientSource::Peer),
            1 => Some(ClientSource::ProxyV1),
            2 => Some(ClientSource::ProxyV2),
            3 => Some(ClientSource::Toa),
            4 => Some(ClientSource::Ipip),
            _ => None,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            ClientSource::Peer => "peer",
            ClientSource::ProxyV1 => "proxy-v1",
            ClientSource::ProxyV2 => "proxy-v2",
            ClientSource::Toa => "toa",
            ClientSource::Ipip => "ipip",
        }
    }
}

/// What the kernel knows about one accepted connection, keyed by socket cookie.
///
/// Addresses are 16 bytes in network order; IPv4 addresses are stored v4-mapped (`::ffff:a.b.c.d`) so
/// that one layout serves both families. Ports are in host order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnIdentity {
    /// The TCP peer as the socket sees it (the client, or the balancer in front of it).
    pub peer_addr: [u8; 16],
    /// The local address the connection was accepted on.
    pub local_addr: [u8; 16],
    /// The original client.
    pub client_addr: [u8; 16],
    /// The balancer that conveyed the client (all zero when `source` is `Peer`).
    pub balancer_addr: [u8; 16],
    /// `CLOCK_MONOTONIC` nanoseconds when the connection was established.
    pub established_ns: u64,
    pub peer_port: u16,
    pub local_port: u16,
    pub client_port: u16,
    /// Address family of the socket: [`AF_INET`] or [`AF_INET6`] (as a `u16` to keep the layout packed).
    pub family: u16,
    /// A [`ClientSource`] as `u8`.
    pub source: u8,
    pub _pad: [u8; 7],
}

const _: () = assert!(core::mem::size_of::<ConnIdentity>() == 88);
const _: () = assert!(core::mem::align_of::<ConnIdentity>() == 8);

impl ConnIdentity {
    pub const fn zeroed() -> Self {
        ConnIdentity {
            peer_addr: [0; 16],
            local_addr: [0; 16],
            client_addr: [0; 16],
            balancer_addr: [0; 16],
            established_ns: 0,
            peer_port: 0,
            local_port: 0,
            client_port: 0,
            family: 0,
            source: 0,
            _pad: [0; 7],
        }
    }
}

/// What a TOA option says: the original client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ToaClient {
    /// 16 bytes, IPv4 v4-mapped.
    pub addr: [u8; 16],
    pub port: u16,
}

/// Result of looking for a TOA option among a TCP header's options.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ToaOption {
    /// No option of the TOA kind.
    Absent,
    /// An option of the TOA kind with a length that is neither 8 nor 20.
    Malformed,
    Found(ToaClient),
}

/// Most option bytes a TCP header can carry (60-byte header minus 20 fixed bytes).
pub const TCP_MAX_OPTION_BYTES: usize = 40;

/// Finds the TOA option in TCP options. `byte(i)` returns the i-th byte of the options area (the TCP
/// header after its 20 fixed bytes) or `None` past its end; `len` is the options length from the
/// header's data offset. The eBPF program calls this same function with a bounds-checked packet
/// accessor, so the fuzzed and unit-tested parser is the one the kernel runs.
#[inline(always)]
pub fn find_toa(kind: u8, len: usize, byte: impl Fn(usize) -> Option<u8>) -> ToaOption {
    let mut off = 0usize;
    // Bounded: every step advances `off` by at least one byte and the area is at most 40 bytes. (No
    // separate step counter: it would keep the verifier from merging equivalent loop states.)
    while off < len && off < TCP_MAX_OPTION_BYTES {
        let Some(k) = byte(off) else {
            return ToaOption::Absent;
        };
        match k {
            0 => return ToaOption::Absent, // end of option list
            1 => {
                off += 1; // no-operation
                continue;
            }
            _ => {}
        }
        // The length byte must lie within `len` too: a kind byte that is the last byte of the
        // area ends the list, whatever follows it in the packet (payload). `Absent`, as a bounded
        // accessor has always answered it.
        if off + 1 >= len {
            return ToaOption::Absent;
        }
        let Some(l) = byte(off + 1) else {
            return ToaOption::Absent;
        };
        let l = l as usize;
        if l < 2 || off + l > len {
            // A zero/one length or an option running past the header: the list is malformed.
            return if k == kind {
                ToaOption::Malformed
            } else {
                ToaOption::Absent
            };
        }
        if k == kind {
            return read_toa(off, l, &byte);
        }
        off += l;
    }
    ToaOption::Absent
}

#[inline(always)]
fn read_toa(off: usize, l: usize, byte: &impl Fn(usize) -> Option<u8>) -> ToaOption {
    // The length first: the caller checked that `l` bytes lie within `len`, so only an option of
    // 8 or 20 bytes may have its port and address read.
    if l != TOA_LEN_V4 as usize && l != TOA_LEN_V6 as usize {
        return ToaOption::Malformed;
    }
    let b = |i: usize| byte(off + i);
    let (Some(p0), Some(p1)) = (b(2), b(3)) else {
        return ToaOption::Malformed;
    };
    let port = u16::from_be_bytes([p0, p1]);
    let mut addr = [0u8; 16];
    if l == TOA_LEN_V4 as usize {
        let (Some(a), Some(b1), Some(c), Some(d)) = (b(4), b(5), b(6), b(7)) else {
            return ToaOption::Malformed;
        };
        addr = v4_mapped([a, b1, c, d]);
    } else if l == TOA_LEN_V6 as usize {
        let mut i = 0;
        while i < 16 {
            let Some(v) = b(4 + i) else {
                return ToaOption::Malformed;
            };
            addr[i] = v;
            i += 1;
        }
    } else {
        return ToaOption::Malformed;
    }
    ToaOption::Found(ToaClient { addr, port })
}

/// Writes an IPv4 address (network-order bytes) as a v4-mapped IPv6 address.
pub const fn v4_mapped(v4: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, v4[0], v4[1], v4[2], v4[3],
    ]
}

/// Key of the trust tries' data part, and of [`LOCAL_ADDRS_MAP`]: 16 address bytes (IPv4 v4-mapped).
pub type LpmAddr = [u8; 16];

#[cfg(feature = "user")]
// SAFETY: plain repr(C) data with explicit padding; every bit pattern is valid.
unsafe impl aya::Pod for IpipKey {}
#[cfg(feature = "user")]
// SAFETY: as above.
unsafe impl aya::Pod for OriginSlot {}

#[cfg(feature = "user")]
// SAFETY: ConnIdentity is repr(C), Copy, has no padding holes left implicit and every bit pattern is valid.
unsafe impl aya::Pod for ConnIdentity {}

#[cfg(test)]
extern crate std;

#[cfg(test)]
mod tests {
    use std::vec;

    use super::*;

    fn parse(kind: u8, opts: &[u8]) -> ToaOption {
        find_toa(kind, opts.len(), |i| opts.get(i).copied())
    }

    #[test]
    fn finds_ipv4_toa_after_other_options() {
        // MSS, NOP, NOP, SACK-permitted... then TOA 254 len 8 port 4321 ip 198.19.77.7
        let opts = [2, 4, 5, 180, 1, 1, 4, 2, 254, 8, 0x10, 0xe1, 198, 19, 77, 7];
        assert_eq!(
            parse(254, &opts),
            ToaOption::Found(ToaClient {
                addr: v4_mapped([198, 19, 77, 7]),
                port: 4321
            })
        );
    }

    #[test]
    fn finds_ipv6_toa() {
        let mut opts = vec![200, 20, 0, 80];
        let ip = [0xfd, 0, 0x54, 0x18, 0, 0x77, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7];
        opts.extend_from_slice(&ip);
        assert_eq!(
            parse(200, &opts),
            ToaOption::Found(ToaClient { addr: ip, port: 80 })
        );
    }

    #[test]
    fn other_kinds_and_end_of_list_mean_absent() {
        assert_eq!(parse(254, &[2, 4, 5, 180]), ToaOption::Absent);
        assert_eq!(
            parse(254, &[0, 254, 8, 0, 1, 1, 2, 3, 4]),
            ToaOption::Absent
        );
        assert_eq!(parse(254, &[]), ToaOption::Absent);
        assert_eq!(parse(200, &[254, 8, 0, 1, 1, 2, 3, 4]), ToaOption::Absent);
    }

    #[test]
    fn bad_lengths_are_malformed_or_absent_never_a_panic() {
        // Zero length of the TOA kind.
        assert_eq!(parse(254, &[254, 0]), ToaOption::Malformed);
        // Length 6: neither form.
        assert_eq!(parse(254, &[254, 6, 0, 1, 2, 3]), ToaOption::Malformed);
        // Truncated: claims 8, header ends after 5.
        assert_eq!(parse(254, &[254, 8, 0, 1, 2]), ToaOption::Malformed);
        // Oversized length of another kind running past the end.
        assert_eq!(parse(254, &[3, 200, 0]), ToaOption::Absent);
        // Kind byte as the very last byte.
        assert_eq!(parse(254, &[1, 1, 1, 254]), ToaOption::Absent);
        // Every 0..=255 length for the TOA kind, with and without room.
        for l in 0..=255u8 {
            let mut opts = vec![254, l];
            opts.resize(40, 1);
            let r = parse(254, &opts);
            assert!(
                matches!(r, ToaOption::Found(_)) == (l == 8 || l == 20),
                "{l}: {r:?}"
            );
        }
    }

    /// Runs `find_toa` with an accessor that answers past `len` (options followed by payload) and
    /// returns the result and the highest index it read.
    fn parse_past_len(kind: u8, len: usize, bytes: &[u8]) -> (ToaOption, Option<usize>) {
        let max = core::cell::Cell::new(None::<usize>);
        let r = find_toa(kind, len, |i| {
            max.set(Some(max.get().map_or(i, |m: usize| m.max(i))));
            bytes.get(i).copied()
        });
        (r, max.get())
    }

    #[test]
    fn never_reads_at_or_past_len() {
        // A kind byte as the last byte within len, a well-formed TOA right after it (fuzz
        // regression `reads-one-past-len`): byte(len) is not the option's length.
        let (r, max) = parse_past_len(254, 1, &[254, 8, 0, 1, 198, 19, 0, 1]);
        assert_eq!(r, ToaOption::Absent);
        assert_eq!(max, Some(0));
        // A 2-byte option of the TOA kind at the end (fuzz regression
        // `reads-port-of-a-2-byte-option`): its port bytes are not read.
        let (r, max) = parse_past_len(59, 2, &[59, 2, 4, 5, 180, 4, 2, 8]);
        assert_eq!(r, ToaOption::Malformed);
        assert_eq!(max, Some(1));
        // Every length of the TOA kind at the end of every area size: no read at or past len.
        for len in 0..=TCP_MAX_OPTION_BYTES {
            for l in 0..=255u8 {
                let mut bytes = vec![1u8; len.saturating_sub(2)];
                bytes.extend_from_slice(&[254, l]);
                bytes.resize(64, 0xee);
                let (_, max) = parse_past_len(254, len, &bytes);
                assert!(max.is_none_or(|m| m < len), "len {len} l {l}: read {max:?}");
            }
        }
    }

    #[test]
    fn option_at_the_very_end_of_a_full_header() {
        let mut opts = vec![1u8; 32];
        opts.extend_from_slice(&[254, 8, 0, 9, 198, 19, 0, 1]);
        assert_eq!(opts.len(), 40);
        assert_eq!(
            parse(254, &opts),
            ToaOption::Found(ToaClient {
                addr: v4_mapped([198, 19, 0, 1]),
                port: 9
            })
        );
    }

    fn ipip_key(client: [u8; 4], client_port: u16) -> IpipKey {
        IpipKey {
            client_addr: v4_mapped(client),
            local_addr: v4_mapped([198, 18, 0, 10]),
            client_port,
            local_port: 443,
            _pad: [0; 4],
        }
    }

    #[test]
    fn an_origin_record_names_its_balancer_to_its_own_key_only() {
        let balancer = v4_mapped([198, 18, 1, 1]);
        let (index, words, hash) = origin_place(&ipip_key([203, 0, 113, 7], 40001));
        assert!(index < IPIP_ORIGIN_SLOTS);
        let slot = OriginSlot::record(words, hash, balancer);
        assert_eq!(slot.balancer_for(&words, hash), Some(balancer));
        for other in [
            ipip_key([203, 0, 113, 7], 40002),
            ipip_key([203, 0, 113, 8], 40001),
        ] {
            let (_, other_words, other_hash) = origin_place(&other);
            assert_eq!(slot.balancer_for(&other_words, other_hash), None);
        }
        let emptied = OriginSlot { check: 0, ..slot };
        assert_eq!(emptied.balancer_for(&words, hash), None);
        let never_written = OriginSlot {
            key: [0; 5],
            balancer: [0; 2],
            check: 0,
        };
        assert_eq!(never_written.balancer_for(&words, hash), None);
    }

    /// Two writers racing on one slot leave each of its eight words from one record or the other:
    /// whatever the mix, a reader gets its own record's balancer or nothing.
    #[test]
    fn a_slot_mixed_from_two_records_never_names_the_other_balancer() {
        let v6 = |last: u8| {
            let mut a = [0xfd, 0, 0x54, 0x18, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
            a[15] = last;
            a
        };
        let pairs = [
            // Two clients through two IPv4 balancers: detected by construction (see `origin_check`).
            (
                (
                    ipip_key([203, 0, 113, 7], 40001),
                    v4_mapped([198, 18, 1, 1]),
                ),
                (
                    ipip_key([203, 0, 113, 9], 51000),
                    v4_mapped([198, 18, 1, 2]),
                ),
            ),
            // The same connection delivered twice, by two balancers (a SYN retransmitted via another).
            (
                (
                    ipip_key([203, 0, 113, 7], 40001),
                    v4_mapped([198, 18, 1, 1]),
                ),
                (ipip_key([203, 0, 113, 7], 40001), v4_mapped([10, 0, 0, 1])),
            ),
            (
                (ipip_key([203, 0, 113, 7], 40001), v6(1)),
                (ipip_key([192, 0, 2, 1], 40001), v6(2)),
            ),
        ];
        for ((key_a, bal_a), (key_b, bal_b)) in pairs {
            let (_, words_a, hash_a) = origin_place(&key_a);
            let (_, words_b, hash_b) = origin_place(&key_b);
            let a = OriginSlot::record(words_a, hash_a, bal_a);
            let b = OriginSlot::record(words_b, hash_b, bal_b);
            let word = |s: &OriginSlot, i: usize| match i {
                0..5 => s.key[i],
                5 | 6 => s.balancer[i - 5],
                _ => s.check,
            };
            for mask in 0u32..256 {
                let from = |i: usize| if mask & (1 << i) == 0 { &a } else { &b };
                let mixed = OriginSlot {
                    key: core::array::from_fn(|i| word(from(i), i)),
                    balancer: [word(from(5), 5), word(from(6), 6)],
                    check: word(from(7), 7),
                };
                for (words, hash) in [(words_a, hash_a), (words_b, hash_b)] {
                    let Some(found) = mixed.balancer_for(&words, hash) else {
                        continue;
                    };
                    // Only a record of this very key, read whole (its balancer and check words;
                    // the key words are this key's), may answer.
                    let intact = [&a, &b].into_iter().find(|r| {
                        r.key == words && r.balancer == mixed.balancer && r.check == mixed.check
                    });
                    assert!(
                        intact.is_some_and(|r| r.balancer_for(&words, hash) == Some(found)),
                        "mask {mask:#010b}: {found:?} from a mixed slot"
                    );
                }
            }
        }
    }

    #[test]
    fn origin_slots_spread_over_the_table() {
        // The ports of one client, as a balancer delivers them: no slot crowded.
        let mut counts = vec![0u8; IPIP_ORIGIN_SLOTS as usize];
        for port in 0..=u16::MAX {
            let (index, _, _) = origin_place(&ipip_key([203, 0, 113, 7], port));
            counts[index as usize] += 1;
        }
        assert!(counts.iter().all(|&c| c <= 8), "{:?}", counts.iter().max());
    }
}
