//! Kernel side of ntlm-tag: records who is behind every connection the proxy accepts.
//!
//! The programs are thin entry points; the logic lives in `try_*` functions. Map names and layouts come
//! from `ntlm-tag-common` so the proxy never repeats a string.
#![no_std]
#![no_main]
// `atomic_xadd`: the counters' atomic add (see `maps::count`).
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod addr;
mod maps;
mod origin;
mod sock_ops;
mod toa;
mod xdp;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any path that could reach here; this only satisfies the compiler.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
