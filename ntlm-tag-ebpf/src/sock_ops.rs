//! `sock_ops`: record a connection's identity when it is established, forget it when it closes.
//!
//! Attached to the proxy's own cgroup, so it only ever sees sockets the proxy created (its listeners and
//! what they accept); active (outgoing) connections are ignored.

use core::ptr::{addr_of, addr_of_mut, read_volatile};

use aya_ebpf::{
    bindings::{
        BPF_NOEXIST, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB,
        BPF_SOCK_OPS_STATE_CB_FLAG,
    },
    helpers::{bpf_get_socket_cookie, bpf_ktime_get_ns},
    macros::sock_ops,
    programs::SockOpsContext,
};
use aya_log_ebpf::warn;
use ntlm_tag_common::{
    AF_INET, AF_INET6, ClientSource, ConnIdentity, Counter, IpipKey, Setting, ToaOption,
};

use crate::{
    addr::{self, v4_mapped_words},
    maps::{CONN_IDENTITY, OPTION_BUF, SCRATCH, SETTINGS, count, ipip_in_use, is_trusted_for_toa},
    origin,
};

/// `TCP_CLOSE` from the kernel's `enum tcp_state`.
const TCP_CLOSE: u32 = 7;

#[sock_ops]
pub fn track_connections(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => record_established(&ctx),
        // args[1] is the new state.
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == TCP_CLOSE => forget_closed(&ctx),
        _ => {}
    }
    1
}

fn record_established(ctx: &SockOpsContext) {
    // The record is built in a per-CPU scratch slot: on the stack it and its copies would exceed the
    // 512-byte BPF stack.
    let Some(slot) = SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: per-CPU slot, used only by this program run on this CPU.
    let identity = unsafe { &mut *slot };
    if !read_identity(ctx, identity) {
        return;
    }
    apply_toa(ctx, identity);
    if identity.source == ClientSource::Peer as u8 && ipip_in_use() {
        join_ipip(identity);
    }
    // SAFETY: the helper only reads the socket behind the context the kernel passed us.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
    if CONN_IDENTITY
        .insert(cookie, &*identity, u64::from(BPF_NOEXIST))
        .is_err()
    {
        // BPF_NOEXIST: an existing record for this cookie is never overwritten. Cookies are unique per
        // boot, so this only happens when the map update itself fails.
        count(Counter::InsertFailed);
        warn!(
            ctx,
            "ntlm-tag: could not record connection cookie {}", cookie
        );
        return;
    }
    count(Counter::Recorded);
    if ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG as i32).is_err() {
        count(Counter::CallbacksUnavailable);
    }
}

fn forget_closed(ctx: &SockOpsContext) {
    // SAFETY: as above.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
    if CONN_IDENTITY.remove(cookie).is_ok() {
        count(Counter::Deleted);
    }
}

/// Fills `id` from the socket; false for a family other than IPv4/IPv6.
fn read_identity(ctx: &SockOpsContext, id: &mut ConnIdentity) -> bool {
    let ops = ctx.ops;
    // Every context field is loaded unconditionally, each at its own constant offset, before any
    // branch: otherwise the compiler merges the per-family loads into one load through an offset
    // context pointer, which the verifier rejects ("dereference of modified ctx ptr").
    // SAFETY (all reads): `ops` is the context the kernel passed; each field exists in
    // `struct bpf_sock_ops` on every kernel we support, whatever the socket's family.
    let (family, remote4, local4, remote_port, local_port) = unsafe {
        (
            read_volatile(addr_of!((*ops).family)),
            read_volatile(addr_of!((*ops).remote_ip4)),
            read_volatile(addr_of!((*ops).local_ip4)),
            read_volatile(addr_of!((*ops).remote_port)),
            read_volatile(addr_of!((*ops).local_port)),
        )
    };
    let (remote6, local6) = unsafe {
        (
            [
                read_volatile(addr_of!((*ops).remote_ip6[0])),
                read_volatile(addr_of!((*ops).remote_ip6[1])),
                read_volatile(addr_of!((*ops).remote_ip6[2])),
                read_volatile(addr_of!((*ops).remote_ip6[3])),
            ],
            [
                read_volatile(addr_of!((*ops).local_ip6[0])),
                read_volatile(addr_of!((*ops).local_ip6[1])),
                read_volatile(addr_of!((*ops).local_ip6[2])),
                read_volatile(addr_of!((*ops).local_ip6[3])),
            ],
        )
    };
    // The kernel gives IPv4 addresses as one u32 and IPv6 addresses as four, each holding
    // network-order bytes: stored as they are, they are the address bytes.
    let (peer, local) = match family {
        AF_INET => (v4_mapped_words(remote4), v4_mapped_words(local4)),
        AF_INET6 => (remote6, local6),
        _ => return false,
    };
    // remote_port is the network-order port in the upper half of a u32; local_port is in host order.
    let peer_port = u32::from_be(remote_port) as u16;
    // Every field written whole and the addresses a word at a time (see `addr`), without zeroing
    // the record first: on BPF that is a byte-by-byte `memset` loop over its 88 bytes.
    // SAFETY: the address fields of `id` are valid, 4-aligned places (see `addr::store`).
    unsafe {
        addr::store(addr_of_mut!(id.peer_addr), peer);
        addr::store(addr_of_mut!(id.local_addr), local);
        addr::store(addr_of_mut!(id.client_addr), peer);
        addr::store(addr_of_mut!(id.balancer_addr), [0; 4]);
    }
    // SAFETY: no arguments, always safe to call.
    id.established_ns = unsafe { bpf_ktime_get_ns() };
    id.peer_port = peer_port;
    id.local_port = local_port as u16;
    id.client_port = peer_port;
    id.family = family as u16;
    id.source = ClientSource::Peer as u8;
    id._pad = [0; 7];
    true
}

/// If the ACK that completed the handshake carries a TOA option from a peer trusted for TOA, the
/// client it names becomes the connection's original client. With TOA off (kind 0, the default) the
/// packet is not read at all.
fn apply_toa(ctx: &SockOpsContext, id: &mut ConnIdentity) {
    let kind = match SETTINGS.get(Setting::ToaKind as u32) {
        Some(&k) if k != 0 && k < 256 => k as u8,
        _ => return,
    };
    let ops = ctx.ops;
    // SAFETY: skb_data/skb_data_end are packet pointers the verifier checks every access against.
    let (data, end) = unsafe {
        (
            read_volatile(addr_of!((*ops).__bindgen_anon_3.skb_data)) as usize,
            read_volatile(addr_of!((*ops).__bindgen_anon_4.skb_data_end)) as usize,
        )
    };
    let Some(buf) = OPTION_BUF.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: per-CPU slot, used only by this program run on this CPU.
    let toa = crate::toa::find_in_packet(kind, data, end, unsafe { &mut *buf });
    match toa {
        ToaOption::Absent => {}
        ToaOption::Malformed => count(Counter::ToaMalformed),
        ToaOption::Found(client) => {
            if is_trusted_for_toa(&id.peer_addr) {
                id.balancer_addr = id.peer_addr;
                id.client_addr = client.addr;
                id.client_port = client.port;
                id.source = ClientSource::Toa as u8;
                count(Counter::ToaAccepted);
            } else {
                count(Counter::ToaUntrusted);
            }
        }
    }
}

/// If the XDP program decapsulated this connection's SYN from a trusted balancer, name the balancer.
fn join_ipip(id: &mut ConnIdentity) {
    let key = IpipKey {
        client_addr: id.peer_addr,
        local_addr: id.local_addr,
        client_port: id.peer_port,
        local_port: id.local_port,
        _pad: [0; 4],
    };
    let Some(balancer) = origin::take(&key) else {
        return;
    };
    id.balancer_addr = balancer;
    id.source = ClientSource::Ipip as u8;
    count(Counter::IpipJoined);
}
