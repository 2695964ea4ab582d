//! The three bpf() commands an XDP hand-over needs, on descriptors this process owns: create an
//! XDP bpf_link, point a link at another program (atomically), and ask a link what it is.
//!
//! Written by hand because aya 0.14 keeps an `FdLink`'s descriptor private: aya can neither give
//! one to another process (SCM_RIGHTS) nor build one from a descriptor it received, except through
//! a bpffs pin, which needs a mounted, writable bpffs the unprivileged gateway does not have.
//! The layouts are the leading fields of `union bpf_attr` and `struct bpf_link_info` from
//! `<linux/bpf.h>`; the kernel accepts a shorter `bpf_attr` (the rest reads as zero).

use std::{
    io,
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
};

/// `enum bpf_cmd` values.
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_LINK_UPDATE: libc::c_long = 29;
/// `enum bpf_attach_type`: BPF_XDP.
const BPF_XDP: u32 = 37;
/// `enum bpf_link_type`: BPF_LINK_TYPE_XDP.
const BPF_LINK_TYPE_XDP: u32 = 6;

/// `XDP_FLAGS_SKB_MODE` (generic) and `XDP_FLAGS_DRV_MODE` (native) from `<linux/if_link.h>`.
pub(super) const XDP_FLAGS_SKB_MODE: u32 = 2;
pub(super) const XDP_FLAGS_DRV_MODE: u32 = 4;

/// `bpf_attr.link_create`, up to `flags`.
#[repr(C)]
struct LinkCreate {
    prog_fd: u32,
    target_ifindex: u32,
    attach_type: u32,
    flags: u32,
}

/// `bpf_attr.link_update`.
#[repr(C)]
struct LinkUpdate {
    link_fd: u32,
    new_prog_fd: u32,
    flags: u32,
    old_prog_fd: u32,
}

/// `bpf_attr.info`.
#[repr(C)]
struct GetInfo {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// `struct bpf_link_info` up to `xdp.ifindex` (the union after `prog_id` is 8-byte aligned), with
/// room to spare: the kernel writes at most `info_len` bytes.
#[repr(C)]
#[derive(Default)]
struct LinkInfo {
    link_type: u32,
    id: u32,
    prog_id: u32,
    _pad: u32,
    xdp_ifindex: u32,
    _rest: [u32; 11],
}

/// What the kernel says about a bpf_link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct XdpLinkInfo {
    /// The program the link runs now.
    pub prog_id: u32,
    /// The interface it is attached to; 0 once that interface is gone (the link is then defunct).
    pub ifindex: u32,
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a valid, initialised `#[repr(C)]` prefix of `union bpf_attr` for `cmd`,
    // readable and writable for the size passed, and lives across the call. Pointers inside it (the
    // info buffer) are set by the callers to memory that also outlives the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            (attr as *mut T).cast::<libc::c_void>(),
            std::mem::size_of::<T>() as libc::c_uint,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Attaches `program` to interface `ifindex` with a new XDP bpf_link (Linux 5.9+), in the mode
/// `flags` names. The link lives while any descriptor refers to it, in this process or another.
pub(super) fn create_xdp_link(
    program: BorrowedFd<'_>,
    ifindex: u32,
    flags: u32,
) -> io::Result<OwnedFd> {
    let mut attr = LinkCreate {
        prog_fd: program.as_raw_fd() as u32,
        target_ifindex: ifindex,
        attach_type: BPF_XDP,
        flags,
    };
    let fd = bpf(BPF_LINK_CREATE, &mut attr)?;
    // SAFETY: BPF_LINK_CREATE returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Makes `link` run `program` from now on: one atomic switch in the kernel, with no moment in which
/// the interface runs neither program. Updating a link to the program it runs changes nothing.
pub(super) fn update_link(link: BorrowedFd<'_>, program: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = LinkUpdate {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: program.as_raw_fd() as u32,
        flags: 0,
        old_prog_fd: 0,
    };
    bpf(BPF_LINK_UPDATE, &mut attr).map(|_| ())
}

/// The program and interface of the XDP bpf_link `link`; an error if it is not an XDP link.
pub(super) fn xdp_link_info(link: BorrowedFd<'_>) -> io::Result<XdpLinkInfo> {
    let mut info = LinkInfo::default();
    let mut attr = GetInfo {
        bpf_fd: link.as_raw_fd() as u32,
        info_len: std::mem::size_of::<LinkInfo>() as u32,
        info: (&mut info as *mut LinkInfo) as u64,
    };
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    if info.link_type != BPF_LINK_TYPE_XDP {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("bpf_link of type {}, not XDP", info.link_type),
        ));
    }
    Ok(XdpLinkInfo {
        prog_id: info.prog_id,
        ifindex: info.xdp_ifindex,
    })
}

/// The index of interface `name` in this network namespace, if there is one.
pub(super) fn interface_index(name: &str) -> Option<u32> {
    let name = std::ffi::CString::new(name).ok()?;
    // SAFETY: `name` is a valid NUL-terminated string that outlives the call; the function only
    // reads it and returns 0 when there is no such interface.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    (index != 0).then_some(index)
}
