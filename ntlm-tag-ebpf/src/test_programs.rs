//! Test-only programs, never loaded by the gateway: they play the parts of load balancers that do
//! not exist as packages here.
//!
//! - `write_toa` (sock_ops, on a client's cgroup): puts a TOA option on the ACK that completes each
//!   handshake, as LVS FULLNAT / DPVS do.
//! - `encap_ipip` (TC egress on a balancer's interface): encapsulates IPv4 TCP packets for a virtual
//!   IP in IPv4 towards a gateway, as Katran-style balancers do.
#![no_std]
#![no_main]

#[path = "toa.rs"]
mod toa;

use aya_ebpf::{
    bindings::{
        BPF_F_ADJ_ROOM_ENCAP_L3_IPV4, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_HDR_OPT_LEN_CB, BPF_SOCK_OPS_WRITE_HDR_OPT_CB,
        BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG, TC_ACT_OK, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC,
    },
    helpers::{bpf_reserve_hdr_opt, bpf_store_hdr_opt},
    macros::{classifier, map, sock_ops, xdp},
    maps::{Array, PerCpuArray},
    programs::{SockOpsContext, TcContext, XdpContext},
};
use ntlm_tag_common::ToaOption;

/// The option to write: `[kind, len, port_hi, port_lo, address...]`; len 8 (IPv4) or 20 (IPv6).
#[map(name = "TOA_OPTION")]
static TOA_OPTION: Array<[u8; 20]> = Array::with_max_entries(1, 0);

/// `[virtual IP, outer source, outer destination]`, IPv4 addresses in network order.
#[map(name = "ENCAP_CONFIG")]
static ENCAP_CONFIG: Array<[u32; 3]> = Array::with_max_entries(1, 0);

/// `parse_toa` input: the option kind to look for (slot 0).
#[map(name = "PARSE_TOA_KIND")]
static PARSE_TOA_KIND: Array<u32> = Array::with_max_entries(1, 0);

/// `parse_toa` output: `[status (0 absent, 1 malformed, 2 found), port hi, port lo, address (16)]`.
#[map(name = "PARSE_TOA_RESULT")]
static PARSE_TOA_RESULT: Array<[u8; 19]> = Array::with_max_entries(1, 0);

#[map(name = "PARSE_TOA_BUF")]
static PARSE_TOA_BUF: PerCpuArray<[u8; 64]> = PerCpuArray::with_max_entries(1, 0);

/// Runs the gateway's TOA option search (`toa.rs`, shared with its sock_ops program) on an
/// Ethernet/IPv4/TCP frame and stores the outcome; for `BPF_PROG_TEST_RUN` on crafted packets.
#[xdp]
pub fn parse_toa(ctx: XdpContext) -> u32 {
    const XDP_PASS: u32 = 2;
    let (data, end) = (ctx.data(), ctx.data_end());
    // Ethernet (14) + IPv4 without options (20).
    if data + 34 > end {
        return XDP_PASS;
    }
    // SAFETY: data + 34 <= end was checked above.
    let (version_ihl, protocol) =
        unsafe { (*((data + 14) as *const u8), *((data + 23) as *const u8)) };
    if version_ihl != 0x45 || protocol != 6 {
        return XDP_PASS;
    }
    let kind = PARSE_TOA_KIND.get(0).copied().unwrap_or(254) as u8;
    let (Some(buf), Some(result)) = (
        PARSE_TOA_BUF.get_ptr_mut(0),
        PARSE_TOA_RESULT.get_ptr_mut(0),
    ) else {
        return XDP_PASS;
    };
    // SAFETY: per-CPU scratch slot / result slot used only by this run (tests run one at a time).
    let (buf, result) = unsafe { (&mut *buf, &mut *result) };
    *result = [0; 19];
    match toa::find_in_packet(kind, data + 34, end, buf) {
        ToaOption::Absent => {}
        ToaOption::Malformed => result[0] = 1,
        ToaOption::Found(client) => {
            result[0] = 2;
            let port = client.port.to_be_bytes();
            result[1] = port[0];
            result[2] = port[1];
            result[3..19].copy_from_slice(&client.addr);
        }
    }
    XDP_PASS
}

#[sock_ops]
pub fn write_toa(ctx: SockOpsContext) -> u32 {
    let Some(option) = TOA_OPTION.get(0) else {
        return 1;
    };
    let len = option[1];
    match ctx.op() {
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => {
            let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG) as i32);
        }
        BPF_SOCK_OPS_HDR_OPT_LEN_CB => {
            // SAFETY: reserving option space on the packet this callback is for.
            unsafe { bpf_reserve_hdr_opt(ctx.ops, u32::from(len), 0) };
        }
        BPF_SOCK_OPS_WRITE_HDR_OPT_CB => {
            let ptr = option.as_ptr() as *mut core::ffi::c_void;
            // SAFETY: `ptr` points at 20 bytes of map memory; the length is one of two constants.
            unsafe {
                if len == 8 {
                    bpf_store_hdr_opt(ctx.ops, ptr, 8, 0);
                } else if len == 20 {
                    bpf_store_hdr_opt(ctx.ops, ptr, 20, 0);
                }
            }
            // Only the handshake's final ACK carries it.
            let _ = ctx.set_cb_flags((ctx.cb_flags() & !BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG) as i32);
        }
        _ => {}
    }
    1
}

#[classifier]
pub fn encap_ipip(ctx: TcContext) -> i32 {
    let _ = try_encap(&ctx);
    TC_ACT_OK
}

fn try_encap(ctx: &TcContext) -> Result<(), i64> {
    let Some(config) = ENCAP_CONFIG.get(0) else {
        return Ok(());
    };
    let [vip, outer_src, outer_dst] = *config;
    if u16::from_be(ctx.load::<u16>(12)?) != 0x0800 {
        return Ok(());
    }
    if ctx.load::<u8>(14 + 9)? != 6 || ctx.load::<u32>(14 + 16)? != vip {
        return Ok(());
    }
    let inner_len = u16::from_be(ctx.load::<u16>(14 + 2)?);
    ctx.adjust_room(
        20,
        BPF_ADJ_ROOM_MAC,
        u64::from(BPF_F_ADJ_ROOM_ENCAP_L3_IPV4),
    )?;
    let total = (inner_len + 20).to_be_bytes();
    let src = outer_src.to_ne_bytes();
    let dst = outer_dst.to_ne_bytes();
    let mut header: [u8; 20] = [
        0x45, 0, total[0], total[1], 0, 0, 0x40, 0, 64, 4, 0, 0, src[0], src[1], src[2], src[3],
        dst[0], dst[1], dst[2], dst[3],
    ];
    let mut sum: u32 = 0;
    let mut i = 0;
    while i < 20 {
        sum += u32::from(u16::from_be_bytes([header[i], header[i + 1]]));
        i += 2;
    }
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    let checksum = (!(sum as u16)).to_be_bytes();
    header[10] = checksum[0];
    header[11] = checksum[1];
    ctx.store(14, &header, 0)?;
    Ok(())
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
