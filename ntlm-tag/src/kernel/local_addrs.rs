//! This host's own addresses, which XDP decapsulates tunnels for. Read with `getifaddrs` (through the
//! `if-addrs` crate) in the network namespace the gateway runs in, at start-up, on every reload, and
//! whenever the kernel announces an address change (rtnetlink), so that a virtual IP added later is
//! served without a reload.
//!
//! Why the host's addresses and not the listeners': a listener on `0.0.0.0` or `[::]` accepts on
//! every local address (a balancer's virtual IP on `lo` included), so the listeners alone cannot
//! say which addresses are ours; the host's addresses are exactly what the stack would deliver
//! locally, and nothing it would route onwards. Loopback addresses are left out: no tunnel has a
//! reason to carry packets for them.
#![forbid(unsafe_code)]

use std::{io, net::IpAddr, sync::Weak};

use netlink_sys::{AsyncSocket, AsyncSocketExt, SocketAddr, TokioSocket, protocols::NETLINK_ROUTE};

use super::KernelTracker;

/// Every non-loopback address of every interface, without duplicates.
pub fn host_addresses() -> io::Result<Vec<IpAddr>> {
    let mut out: Vec<IpAddr> = Vec::new();
    for interface in if_addrs::get_if_addrs()? {
        let ip = interface.ip();
        if !ip.is_loopback() && !out.contains(&ip) {
            out.push(ip);
        }
    }
    Ok(out)
}

/// A subscription to the kernel's address-change announcements (rtnetlink `RTMGRP_IPV4_IFADDR` and
/// `RTMGRP_IPV6_IFADDR`) in this network namespace. Made before the gateway drops privileges.
pub struct AddressWatch(TokioSocket);

impl AddressWatch {
    pub fn subscribe() -> io::Result<Self> {
        let mut socket = TokioSocket::new(NETLINK_ROUTE)?;
        let groups = (libc::RTMGRP_IPV4_IFADDR | libc::RTMGRP_IPV6_IFADDR) as u32;
        socket.socket_mut().bind(&SocketAddr::new(0, groups))?;
        Ok(AddressWatch(socket))
    }

    /// Refreshes the kernel's local-address map on every announcement, until the tracker is gone.
    /// The announcement's content is not parsed: any change means "read the addresses again". A
    /// receive error (an overrun, `ENOBUFS`) means changes were missed, so it refreshes too.
    pub async fn run(self, kernel: Weak<KernelTracker>) {
        loop {
            let received = self.0.recv_from_full().await;
            let Some(kernel) = kernel.upgrade() else {
                return;
            };
            if let Err(e) = &received {
                tracing::debug!(error = %e, "address announcements were lost; re-reading the addresses");
            }
            match kernel.refresh_local_addresses() {
                Ok(count) => tracing::info!(
                    local_addresses = count,
                    "this host's addresses changed; XDP decapsulates tunnels addressed to the new set"
                ),
                Err(e) => tracing::error!(
                    error = %e,
                    "cannot reload this host's addresses into the kernel; tunnels to a new address are \
                     not decapsulated until a reload (SIGHUP) succeeds"
                ),
            }
        }
    }
}
