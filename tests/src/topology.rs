//! The standard topology: clients → gateway → backend, each in its own network namespace.
//!
//! ```text
//!  client ns                  gateway ns                         backend ns
//!  198.18.1.10..40 ──veth── 198.18.1.1 | 198.18.2.1 ──veth── 198.18.2.2
//!  fd00:5418:1::10..        fd00:5418:1::1 | fd00:5418:2::1      fd00:5418:2::2
//! ```

use std::net::{IpAddr, SocketAddr};

use crate::netns::{NetNs, addr, veth};

pub const GATEWAY_V4: &str = "198.18.1.1";
pub const GATEWAY_V6: &str = "fd00:5418:1::1";
pub const BACKEND_V4: &str = "198.18.2.2";
pub const BACKEND_PORT: u16 = 8081;
pub const GATEWAY_PORT: u16 = 8080;

/// Number of client addresses configured in the client namespace.
pub const CLIENT_ADDRESSES: u8 = 30;

pub struct Topology {
    pub client: NetNs,
    pub gateway: NetNs,
    pub backend: NetNs,
}

impl Topology {
    pub fn new() -> Topology {
        let client = NetNs::new("cl");
        let gateway = NetNs::new("gw");
        let backend = NetNs::new("be");
        veth(&client, "eth0", &gateway, "down0");
        veth(&gateway, "up0", &backend, "eth0");
        for i in 0..CLIENT_ADDRESSES {
            addr(&client, "eth0", &format!("198.18.1.{}/24", 10 + i));
            addr(&client, "eth0", &format!("fd00:5418:1::{:x}/64", 0x10 + i));
        }
        addr(&gateway, "down0", "198.18.1.1/24");
        addr(&gateway, "down0", "fd00:5418:1::1/64");
        addr(&gateway, "up0", "198.18.2.1/24");
        addr(&gateway, "up0", "fd00:5418:2::1/64");
        addr(&backend, "eth0", "198.18.2.2/24");
        addr(&backend, "eth0", "fd00:5418:2::2/64");
        Topology {
            client,
            gateway,
            backend,
        }
    }

    /// The i-th client IPv4 address.
    pub fn client_v4(i: u8) -> IpAddr {
        format!("198.18.1.{}", 10 + i).parse().expect("address")
    }

    /// The i-th client IPv6 address.
    pub fn client_v6(i: u8) -> IpAddr {
        format!("fd00:5418:1::{:x}", 0x10 + i)
            .parse()
            .expect("address")
    }

    pub fn gateway_addr() -> SocketAddr {
        SocketAddr::new(GATEWAY_V4.parse().expect("address"), GATEWAY_PORT)
    }

    pub fn gateway_addr_v6() -> SocketAddr {
        SocketAddr::new(GATEWAY_V6.parse().expect("address"), GATEWAY_PORT)
    }

    pub fn backend_addr() -> SocketAddr {
        SocketAddr::new(BACKEND_V4.parse().expect("address"), BACKEND_PORT)
    }
}

impl Default for Topology {
    fn default() -> Self {
        Self::new()
    }
}
