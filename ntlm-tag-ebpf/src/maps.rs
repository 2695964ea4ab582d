//! Every map of the object, in one place: the programs share them, and userspace finds them by the
//! names in `ntlm-tag-common` (a layout change gets a new `_V<n>` name).

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, lpm_trie::Key},
};
use ntlm_tag_common::{
    CONN_IDENTITY_DEFAULT_ENTRIES, COUNTERS_SLOTS, ConnIdentity, Counter, IPIP_ORIGIN_SLOTS,
    LOCAL_ADDRS_ENTRIES, LpmAddr, OriginSlot, SETTINGS_SLOTS, TRUSTED_PREFIX_ENTRIES,
    XDP_COUNTERS_SLOTS, XdpCounter,
};

/// Socket cookie → identity of the connection.
#[map(name = "CONN_IDENTITY_V1")]
pub static CONN_IDENTITY: LruHashMap<u64, ConnIdentity> =
    LruHashMap::with_max_entries(CONN_IDENTITY_DEFAULT_ENTRIES, 0);

#[map(name = "COUNTERS_V1")]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTERS_SLOTS, 0);

#[map(name = "XDP_COUNTERS_V1")]
pub static XDP_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(XDP_COUNTERS_SLOTS, 0);

/// Balancer prefixes trusted to name the client in a TOA option, as v4-mapped IPv6 prefixes.
#[map(name = "TRUSTED_TOA_V1")]
pub static TRUSTED_TOA: LpmTrie<LpmAddr, u8> = LpmTrie::with_max_entries(
    TRUSTED_PREFIX_ENTRIES,
    aya_ebpf::bindings::BPF_F_NO_PREALLOC,
);

/// Balancer prefixes whose IPIP / IPv6-in-IPv6 tunnels are decapsulated, as v4-mapped IPv6 prefixes.
#[map(name = "TRUSTED_IPIP_V1")]
pub static TRUSTED_IPIP: LpmTrie<LpmAddr, u8> = LpmTrie::with_max_entries(
    TRUSTED_PREFIX_ENTRIES,
    aya_ebpf::bindings::BPF_F_NO_PREALLOC,
);

/// This host's own addresses (IPv4 v4-mapped): the only inner destinations XDP decapsulates for.
#[map(name = "LOCAL_ADDRS_V1")]
pub static LOCAL_ADDRS: HashMap<LpmAddr, u8> = HashMap::with_max_entries(LOCAL_ADDRS_ENTRIES, 0);

/// Which balancer delivered each decapsulated connection, in the slot of its inner 4-tuple (see
/// `ntlm_tag_common::OriginSlot`). An array rather than a hash map: recording a SYN is then a few
/// stores, where a hash-table insert (allocation, bucket lock, LRU lists) was most of the cost of
/// a tunnelled SYN.
#[map(name = "IPIP_ORIGIN_V2")]
pub static IPIP_ORIGIN: Array<OriginSlot> = Array::with_max_entries(IPIP_ORIGIN_SLOTS, 0);

/// Slot 0 becomes 1 once XDP has recorded a tunnel origin: until then sock_ops skips the lookup in
/// [`IPIP_ORIGIN`] on every new connection, as it always would miss.
#[map(name = "IPIP_IN_USE_V1")]
pub static IPIP_IN_USE: Array<u32> = Array::with_max_entries(1, 0);

/// Per-CPU scratch space for the record being built (too big for the 512-byte stack with copies).
#[map(name = "SCRATCH_V1")]
pub static SCRATCH: PerCpuArray<ConnIdentity> = PerCpuArray::with_max_entries(1, 0);

/// Per-CPU copy of a TCP header's options, parsed at variable offsets in map memory.
#[map(name = "OPTION_BUF_V1")]
pub static OPTION_BUF: PerCpuArray<[u8; 64]> = PerCpuArray::with_max_entries(1, 0);

/// Settings from userspace, indexed by `ntlm_tag_common::Setting`.
#[map(name = "SETTINGS_V1")]
pub static SETTINGS: Array<u32> = Array::with_max_entries(SETTINGS_SLOTS, 0);

/// True when `addr` (16 bytes, IPv4 v4-mapped) is inside a prefix trusted for TOA.
#[inline(always)]
pub fn is_trusted_for_toa(addr: &LpmAddr) -> bool {
    TRUSTED_TOA.get(&Key::new(128, *addr)).is_some()
}

/// True when `addr` (16 bytes, IPv4 v4-mapped) is inside a prefix trusted for IPIP.
#[inline(always)]
pub fn is_trusted_for_ipip(addr: &LpmAddr) -> bool {
    TRUSTED_IPIP.get(&Key::new(128, *addr)).is_some()
}

/// True when `addr` (16 bytes, IPv4 v4-mapped) is one of this host's addresses.
#[inline(always)]
pub fn is_local(addr: &LpmAddr) -> bool {
    // SAFETY: the value is only tested for presence, never read after the lookup.
    unsafe { LOCAL_ADDRS.get(addr) }.is_some()
}

/// True once XDP has recorded any tunnel origin (see [`IPIP_IN_USE`]).
#[inline(always)]
pub fn ipip_in_use() -> bool {
    IPIP_IN_USE.get(0).is_some_and(|&used| used != 0)
}

/// Notes that XDP records tunnel origins; written only the first time, so the shared slot's cache
/// line is not dirtied by every SYN.
#[inline(always)]
pub fn mark_ipip_in_use() {
    if let Some(slot) = IPIP_IN_USE.get_ptr_mut(0) {
        // SAFETY: `slot` points to a live, aligned u32 in the map; a racing write stores the same 1.
        unsafe {
            if *slot == 0 {
                *slot = 1;
            }
        }
    }
}

#[inline(always)]
pub fn count(counter: Counter) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // An atomic add although the slot is per CPU: sock_ops runs in process context too (a
        // close), where a softirq on the same CPU can run this program for another socket between
        // a plain load and store, losing one of the two counts. The result is unused, so this
        // compiles to BPF's plain atomic add, which every supported kernel (5.10+) accepts.
        // (`AtomicU64` has no read-modify-write operations on the BPF target, hence the intrinsic.)
        // SAFETY: `slot` points to a live, aligned u64 in the map for the program's run.
        unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(slot, 1) };
    }
}

#[inline(always)]
pub fn count_xdp(counter: XdpCounter) {
    if let Some(slot) = XDP_COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe { *slot += 1 };
    }
}
