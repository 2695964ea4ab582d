//! This host's own addresses, which XDP decapsulates tunnels for. Read with `getifaddrs` (through the
//! `if-addrs` crate) in the network namespace the gateway runs in, at start-up and on every reload.
//!
//! Why the host's addresses and not the listeners': a listener on `0.0.0.0` or `[::]` accepts on
//! every local address (a balancer's virtual IP on `lo` included), so the listeners alone cannot
//! say which addresses are ours; the host's addresses are exactly what the stack would deliver
//! locally, and nothing it would route onwards. Loopback addresses are left out: no tunnel has a
//! reason to carry packets for them.
#![forbid(unsafe_code)]

use std::{io, net::IpAddr};

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
