//! XDP: decapsulate IPv4-in-IPv4 and IPv6-in-IPv6 packets from trusted balancers (the way Katran-style
//! balancers deliver to backends), so the gateway needs no tunnel device. Only an inner packet that is
//! TCP and addressed to one of this host's own addresses is decapsulated: anything else would be
//! routed onwards by the stack, and the gateway would relay for whoever can reach a trusted tunnel. On
//! the SYN of each inner connection it records which balancer delivered it; the sock_ops program joins
//! that record when the connection is established. Every other packet passes untouched, and errors
//! pass too: this program never drops traffic.
//!
//! Offsets are compile-time constants: the L2 header length (14, or 18 with one VLAN tag) is a const
//! generic, and outer headers with IPv4 options or IPv6 extension headers are passed untouched.

use core::mem::size_of;

use aya_ebpf::{
    bindings::xdp_action::XDP_PASS, helpers::bpf_xdp_adjust_head, macros::xdp, programs::XdpContext,
};
use ntlm_tag_common::{IpipKey, LpmAddr, XdpCounter};

use crate::{
    addr::v4_mapped,
    maps::{count_xdp, is_local, is_trusted_for_ipip},
    origin,
};

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88A8;
const IPPROTO_IPIP: u8 = 4;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_IPV6: u8 = 41;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

const IPV4_LEN: usize = 20;
const IPV6_LEN: usize = 40;

#[xdp]
pub fn decap_ipip(ctx: XdpContext) -> u32 {
    // Whatever happens, pass: a parse failure must never cost a packet.
    let _ = try_decap(&ctx);
    XDP_PASS
}

fn try_decap(ctx: &XdpContext) -> Result<(), ()> {
    let ethertype = u16::from_be(read::<u16>(ctx, 12)?);
    match ethertype {
        ETH_P_IP => decap_v4::<14>(ctx),
        ETH_P_IPV6 => decap_v6::<14>(ctx),
        ETH_P_8021Q | ETH_P_8021AD => match u16::from_be(read::<u16>(ctx, 16)?) {
            ETH_P_IP => decap_v4::<18>(ctx),
            ETH_P_IPV6 => decap_v6::<18>(ctx),
            _ => Ok(()),
        },
        _ => Ok(()),
    }
}

/// IPv4-in-IPv4 with an `L2`-byte link header.
fn decap_v4<const L2: usize>(ctx: &XdpContext) -> Result<(), ()> {
    let version_ihl = read::<u8>(ctx, L2)?;
    let protocol = read::<u8>(ctx, L2 + 9)?;
    if protocol != IPPROTO_IPIP {
        return Ok(());
    }
    let frag = u16::from_be(read::<u16>(ctx, L2 + 6)?);
    if version_ihl != 0x45 || frag & 0x3fff != 0 {
        // Outer options or a fragment: leave it to the stack.
        count_xdp(XdpCounter::Skipped);
        return Ok(());
    }
    let outer_src = v4_mapped(read(ctx, L2 + 12)?);
    if !is_trusted_for_ipip(&outer_src) {
        count_xdp(XdpCounter::Untrusted);
        return Ok(());
    }
    let inner = L2 + IPV4_LEN;
    let inner_version_ihl = read::<u8>(ctx, inner)?;
    if inner_version_ihl >> 4 != 4 {
        count_xdp(XdpCounter::Skipped);
        return Ok(());
    }
    if read::<u8>(ctx, inner + 9)? != IPPROTO_TCP {
        count_xdp(XdpCounter::InnerNotTcp);
        return Ok(());
    }
    let inner_dst = v4_mapped(read(ctx, inner + 16)?);
    if !is_local(&inner_dst) {
        count_xdp(XdpCounter::InnerNotLocal);
        return Ok(());
    }
    // Remember the balancer for a new inner TCP connection (its SYN). Inner IPv4 options are rare;
    // such connections are still decapsulated, just not joined to their balancer.
    let inner_frag = u16::from_be(read::<u16>(ctx, inner + 6)?);
    if inner_version_ihl == 0x45 && inner_frag & 0x3fff == 0 {
        let tcp = inner + IPV4_LEN;
        if is_syn(read::<u8>(ctx, tcp + 13)?) {
            let key = IpipKey {
                client_addr: v4_mapped(read(ctx, inner + 12)?),
                local_addr: inner_dst,
                client_port: u16::from_be(read::<u16>(ctx, tcp)?),
                local_port: u16::from_be(read::<u16>(ctx, tcp + 2)?),
                _pad: [0; 4],
            };
            origin::record(&key, outer_src);
        }
    }
    strip::<L2, IPV4_LEN>(ctx, ETH_P_IP)
}

/// IPv6-in-IPv6 with an `L2`-byte link header.
fn decap_v6<const L2: usize>(ctx: &XdpContext) -> Result<(), ()> {
    let next_header = read::<u8>(ctx, L2 + 6)?;
    if next_header != IPPROTO_IPV6 {
        return Ok(());
    }
    let outer_src: LpmAddr = read(ctx, L2 + 8)?;
    if !is_trusted_for_ipip(&outer_src) {
        count_xdp(XdpCounter::Untrusted);
        return Ok(());
    }
    let inner = L2 + IPV6_LEN;
    if read::<u8>(ctx, inner)? >> 4 != 6 {
        count_xdp(XdpCounter::Skipped);
        return Ok(());
    }
    // TCP directly after the inner header: an inner extension header is not looked through (it is
    // passed untouched, like anything else that is not plainly TCP).
    if read::<u8>(ctx, inner + 6)? != IPPROTO_TCP {
        count_xdp(XdpCounter::InnerNotTcp);
        return Ok(());
    }
    let inner_dst: LpmAddr = read(ctx, inner + 24)?;
    if !is_local(&inner_dst) {
        count_xdp(XdpCounter::InnerNotLocal);
        return Ok(());
    }
    let tcp = inner + IPV6_LEN;
    if is_syn(read::<u8>(ctx, tcp + 13)?) {
        let key = IpipKey {
            client_addr: read(ctx, inner + 8)?,
            local_addr: inner_dst,
            client_port: u16::from_be(read::<u16>(ctx, tcp)?),
            local_port: u16::from_be(read::<u16>(ctx, tcp + 2)?),
            _pad: [0; 4],
        };
        origin::record(&key, outer_src);
    }
    strip::<L2, IPV6_LEN>(ctx, ETH_P_IPV6)
}

/// A connection's first segment: SYN without ACK.
#[inline(always)]
fn is_syn(flags: u8) -> bool {
    flags & (TCP_SYN | TCP_ACK) == TCP_SYN
}

/// Drops the `OUTER`-byte outer IP header: the `L2`-byte link header is saved, the packet head moved
/// forward, and the link header written back in front of the inner packet with its ethertype.
fn strip<const L2: usize, const OUTER: usize>(
    ctx: &XdpContext,
    inner_ethertype: u16,
) -> Result<(), ()> {
    let l2: [u8; L2] = read(ctx, 0)?;
    // SAFETY: adjusting the head of the packet this program was given; the kernel checks bounds, and
    // on failure the packet is unchanged.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, OUTER as i32) } != 0 {
        count_xdp(XdpCounter::Skipped);
        return Err(());
    }
    write(ctx, 0, l2)?;
    write(ctx, L2 - 2, inner_ethertype.to_be())?;
    count_xdp(XdpCounter::Decapsulated);
    Ok(())
}

/// Reads a `T` at `offset` after a bounds check against the packet end.
#[inline(always)]
fn read<T: Copy>(ctx: &XdpContext, offset: usize) -> Result<T, ()> {
    let start = ctx.data();
    if start + offset + size_of::<T>() > ctx.data_end() {
        return Err(());
    }
    // SAFETY: [start + offset, start + offset + size_of::<T>()) is inside the packet.
    Ok(unsafe { core::ptr::read_unaligned((start + offset) as *const T) })
}

/// Writes `value` at `offset` after a bounds check against the packet end.
#[inline(always)]
fn write<T: Copy>(ctx: &XdpContext, offset: usize, value: T) -> Result<(), ()> {
    let start = ctx.data();
    if start + offset + size_of::<T>() > ctx.data_end() {
        return Err(());
    }
    // SAFETY: as in `read`, and XDP packet data is writable.
    unsafe { core::ptr::write_unaligned((start + offset) as *mut T, value) };
    Ok(())
}
