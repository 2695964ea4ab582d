//! XDP on the configured interfaces. Each attachment is a bpf_link whose descriptor this process
//! holds, so that an upgrade can hand it to the successor, which swaps its own program into the
//! link in one atomic step: no moment without decapsulation, and no second attachment (the kernel
//! refuses a second XDP link on an interface with EBUSY).
//!
//! A link lives while any descriptor refers to it: the process that hands its links over keeps
//! its own descriptors until it exits, and the successor's keep the links (now running the
//! successor's program) attached after that.

use std::{
    io,
    os::fd::{AsFd, OwnedFd},
    sync::Mutex,
};

use aya::{
    Ebpf,
    programs::{Xdp, XdpMode},
};
use ntlm_tag_common::XDP_PROGRAM;

use super::{
    KernelError,
    bpf_link::{
        XDP_FLAGS_DRV_MODE, XDP_FLAGS_SKB_MODE, create_xdp_link, interface_index, update_link,
        xdp_link_info,
    },
    load::{program_error, program_of},
};

/// How the XDP program is attached to one interface (shown by the admin endpoint's `/kernel`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct XdpAttachment {
    pub interface: String,
    /// `native` (driver) or `generic` (skb).
    pub mode: &'static str,
    /// The kernel's id of this process's XDP program (`ip -d link` and `bpftool net` show the id
    /// of the program an interface runs).
    pub program_id: u32,
}

/// An XDP link the running gateway handed over (an upgrade), for the interface it is attached to.
#[derive(Debug)]
pub struct InheritedXdpLink {
    pub interface: String,
    /// `native` or `generic`, as the running gateway attached it (a link keeps its mode).
    pub mode: String,
    pub link: OwnedFd,
}

/// What the running gateway handed over (an upgrade): its links, and its XDP program, to swap
/// back into them should this process fail after swapping its own in.
#[derive(Debug, Default)]
pub struct InheritedXdp {
    pub links: Vec<InheritedXdpLink>,
    pub program: Option<OwnedFd>,
}

/// A second descriptor of one of this process's XDP links, for a successor.
#[derive(Debug)]
pub struct HandedXdpLink {
    pub interface: String,
    pub mode: &'static str,
    pub link: OwnedFd,
}

/// What this process can give a successor: its links, and the interfaces attached without one.
#[derive(Debug, Default)]
pub struct XdpHandover {
    pub links: Vec<HandedXdpLink>,
    /// This process's XDP program, for the successor to swap back should it fail.
    pub program: Option<OwnedFd>,
    /// Interfaces attached through netlink (kernels without XDP bpf_links, before 5.9): nothing to
    /// hand over, so an upgrade that configures them is refused.
    pub netlink: Vec<String>,
}

enum Holding {
    /// A bpf_link running this process's program.
    Link(OwnedFd),
    /// A link the running gateway handed over, still running its program until
    /// [`XdpLinks::take_over`].
    Inherited(OwnedFd),
    /// Attached through netlink (no bpf_link on this kernel); aya's program object holds it.
    Netlink,
}

struct Attached {
    interface: String,
    mode: &'static str,
    holding: Holding,
    /// Handed over by the running gateway (whose program ran in it before this process's).
    inherited: bool,
}

/// This process's XDP program and its attachments.
pub(super) struct XdpLinks {
    /// A second descriptor of this process's XDP program, to point links at.
    program: Option<OwnedFd>,
    program_id: u32,
    attached: Mutex<Vec<Attached>>,
    /// The running gateway's program (an upgrade), until this process took over.
    previous: Option<OwnedFd>,
}

impl XdpLinks {
    /// Loads the XDP program and attaches it to each of `interfaces`: through a link the running
    /// gateway handed over when there is one for that interface (the program is swapped in later,
    /// by [`take_over`](Self::take_over)), else through a new link, native mode first, generic if
    /// the driver cannot run XDP itself.
    pub(super) fn attach(
        ebpf: &mut Ebpf,
        interfaces: &[String],
        inherited: InheritedXdp,
    ) -> Result<Self, KernelError> {
        let InheritedXdp {
            links: mut inherited,
            program: previous,
        } = inherited;
        let mut links = XdpLinks {
            program: None,
            program_id: 0,
            attached: Mutex::new(Vec::new()),
            previous,
        };
        if interfaces.is_empty() {
            drop_unused(inherited);
            return Ok(links);
        }
        let program: &mut Xdp = program_of(ebpf, XDP_PROGRAM)?;
        program.load().map_err(program_error)?;
        let own = program.fd().map_err(program_error)?;
        let own = own
            .as_fd()
            .try_clone_to_owned()
            .map_err(|source| KernelError::XdpLink {
                interface: interfaces.join(", "),
                source,
            })?;
        links.program_id = program.info().map_err(program_error)?.id();
        let mut attached = Vec::new();
        for interface in interfaces {
            let handed = inherited
                .iter()
                .position(|l| &l.interface == interface)
                .map(|i| inherited.swap_remove(i));
            let one = match handed.and_then(usable) {
                Some(link) => Attached {
                    interface: interface.clone(),
                    mode: mode_name(&link.mode),
                    holding: Holding::Inherited(link.link),
                    inherited: true,
                },
                None => attach_new(program, own.as_fd(), interface)?,
            };
            tracing::info!(
                interface = %one.interface,
                mode = one.mode,
                program_id = links.program_id,
                taken_over = one.inherited,
                "XDP IPIP decapsulation attached"
            );
            attached.push(one);
        }
        drop_unused(inherited);
        links.program = Some(own);
        links.attached = Mutex::new(attached);
        Ok(links)
    }

    /// Swaps this process's program into the links the running gateway handed over (an upgrade,
    /// once everything else is ready). Returns how many it swapped.
    pub(super) fn take_over(&self) -> Result<usize, KernelError> {
        let Some(program) = &self.program else {
            return Ok(0);
        };
        let mut attached = self.attached.lock().map_err(|_| KernelError::Poisoned)?;
        let mut swapped = 0;
        for one in attached.iter_mut() {
            let link = match std::mem::replace(&mut one.holding, Holding::Netlink) {
                Holding::Inherited(link) => link,
                other => {
                    one.holding = other;
                    continue;
                }
            };
            let updated = update_link(link.as_fd(), program.as_fd());
            if let Err(source) = updated {
                one.holding = Holding::Inherited(link);
                return Err(KernelError::XdpLink {
                    interface: one.interface.clone(),
                    source,
                });
            }
            one.holding = Holding::Link(link);
            swapped += 1;
            tracing::info!(
                interface = %one.interface,
                program_id = self.program_id,
                "upgrade: XDP on this interface runs this process's program now (swapped in the \
                 running gateway's link, no gap in decapsulation)"
            );
        }
        Ok(swapped)
    }

    /// Points every link of this process back at its own program: after an upgrade that failed
    /// once the successor may have swapped its program in. Returns how many it put back.
    pub(super) fn restore(&self) -> usize {
        let Some(program) = &self.program else {
            return 0;
        };
        let Ok(attached) = self.attached.lock() else {
            return 0;
        };
        let mut restored = 0;
        for one in attached.iter() {
            let Holding::Link(link) = &one.holding else {
                continue;
            };
            // Already its own, or defunct (its interface is gone): nothing to put back.
            let running = xdp_link_info(link.as_fd());
            if running.is_ok_and(|i| i.prog_id == self.program_id || i.ifindex == 0) {
                continue;
            }
            match update_link(link.as_fd(), program.as_fd()) {
                Ok(()) => {
                    restored += 1;
                    tracing::warn!(
                        interface = %one.interface,
                        program_id = self.program_id,
                        "upgrade failed after the successor swapped its XDP program in; this \
                         process's program runs on the interface again"
                    );
                }
                Err(e) => tracing::error!(
                    interface = %one.interface,
                    error = %e,
                    "upgrade failed after the successor swapped its XDP program in, and this \
                     process cannot put its own back: tunnelled connections are decapsulated \
                     without naming their balancer; restart the service"
                ),
            }
        }
        restored
    }

    /// Swaps the running gateway's program back into the links this process took over (an
    /// upgrade that failed after [`take_over`](Self::take_over): the old process goes on as before).
    /// Returns how many it swapped back.
    pub(super) fn give_back(&self) -> usize {
        let (Some(previous), Ok(attached)) = (&self.previous, self.attached.lock()) else {
            return 0;
        };
        let mut given = 0;
        for one in attached.iter().filter(|a| a.inherited) {
            let Holding::Link(link) = &one.holding else {
                continue;
            };
            match update_link(link.as_fd(), previous.as_fd()) {
                Ok(()) => {
                    given += 1;
                    tracing::warn!(
                        interface = %one.interface,
                        "upgrade failed after this process swapped its XDP program in; the \
                         running gateway's program runs on the interface again"
                    );
                }
                Err(e) => tracing::error!(
                    interface = %one.interface,
                    error = %e,
                    "upgrade failed after this process swapped its XDP program in, and the running \
                     gateway's program cannot be put back; restart the service"
                ),
            }
        }
        given
    }

    /// Second descriptors of this process's links, for a successor.
    pub(super) fn handover(&self) -> io::Result<XdpHandover> {
        let attached = self
            .attached
            .lock()
            .map_err(|_| io::Error::other("XDP attachment lock poisoned"))?;
        let mut handover = XdpHandover::default();
        if let Some(program) = &self.program {
            handover.program = Some(program.try_clone()?);
        }
        for one in attached.iter() {
            match &one.holding {
                Holding::Link(link) | Holding::Inherited(link) => {
                    handover.links.push(HandedXdpLink {
                        interface: one.interface.clone(),
                        mode: one.mode,
                        link: link.try_clone()?,
                    })
                }
                Holding::Netlink => handover.netlink.push(one.interface.clone()),
            }
        }
        Ok(handover)
    }

    pub(super) fn attachments(&self) -> Vec<XdpAttachment> {
        let Ok(attached) = self.attached.lock() else {
            return Vec::new();
        };
        attached
            .iter()
            .map(|one| XdpAttachment {
                interface: one.interface.clone(),
                mode: one.mode,
                program_id: self.program_id,
            })
            .collect()
    }
}

/// A new attachment on `interface`: a bpf_link in native mode, else in generic mode; through
/// netlink (aya) on a kernel without XDP links.
fn attach_new(
    program: &mut Xdp,
    own: std::os::fd::BorrowedFd<'_>,
    interface: &str,
) -> Result<Attached, KernelError> {
    let ifindex = interface_index(interface).ok_or_else(|| KernelError::Xdp {
        interface: interface.to_string(),
        source: aya::programs::ProgramError::UnknownInterface {
            name: interface.to_string(),
        },
    })?;
    let attached = |mode, holding| Attached {
        interface: interface.to_string(),
        mode,
        holding,
        inherited: false,
    };
    let native = match create_xdp_link(own, ifindex, XDP_FLAGS_DRV_MODE) {
        Ok(link) => return Ok(attached("native", Holding::Link(link))),
        Err(e) => e,
    };
    let generic = match create_xdp_link(own, ifindex, XDP_FLAGS_SKB_MODE) {
        Ok(link) => {
            tracing::info!(%interface, reason = %native, "native XDP unavailable; using generic (skb) mode");
            return Ok(attached("generic", Holding::Link(link)));
        }
        Err(e) => e,
    };
    if generic.raw_os_error() != Some(libc::EINVAL) {
        return Err(KernelError::XdpLink {
            interface: interface.to_string(),
            source: generic,
        });
    }
    // EINVAL: no XDP bpf_links on this kernel (before 5.9). aya attaches through netlink.
    tracing::info!(%interface, "this kernel has no XDP bpf_links; attaching through netlink (an upgrade cannot take this attachment over)");
    let mode = match program.attach(interface, XdpMode::Driver) {
        Ok(_) => "native",
        Err(native) => match program.attach(interface, XdpMode::Skb) {
            Ok(_) => {
                tracing::info!(%interface, reason = %native, "native XDP unavailable; using generic (skb) mode");
                "generic"
            }
            Err(source) => {
                return Err(KernelError::Xdp {
                    interface: interface.to_string(),
                    source,
                });
            }
        },
    };
    Ok(attached(mode, Holding::Netlink))
}

/// An inherited link if it is an XDP link still attached to the interface it is named for (an
/// interface deleted and created again has another index, and its old link is defunct).
fn usable(link: InheritedXdpLink) -> Option<InheritedXdpLink> {
    let info = xdp_link_info(link.link.as_fd());
    let index = interface_index(&link.interface);
    match (&info, index) {
        (Ok(info), Some(index)) if info.ifindex == index => Some(link),
        _ => {
            tracing::warn!(
                interface = %link.interface,
                link = ?info,
                interface_index = ?index,
                "upgrade: the XDP link the running gateway handed over for this interface is no \
                 longer attached to it; attaching anew"
            );
            None
        }
    }
}

/// Links handed over for interfaces this configuration no longer names: closing this process's
/// descriptor leaves them to the old process, whose program runs on them until it exits.
fn drop_unused(inherited: Vec<InheritedXdpLink>) {
    for link in inherited {
        tracing::info!(
            interface = %link.interface,
            "upgrade: the configuration no longer names this `xdp` interface; it stays attached, \
             running the old process's program, until that process exits (after its drain)"
        );
    }
}

fn mode_name(mode: &str) -> &'static str {
    if mode == "native" {
        "native"
    } else {
        "generic"
    }
}
