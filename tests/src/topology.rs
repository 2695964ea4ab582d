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

    /// The backend namespace's address on another `port` (for a second or third backend).
    pub fn backend_at(port: u16) -> SocketAddr {
        SocketAddr::new(BACKEND_V4.parse().expect("address"), port)
    }

    /// `http://<gateway>/<path>`: a URL for curl (`path` starts with `/`).
    pub fn url(path: &str) -> String {
        format!("http://{}{path}", Self::gateway_addr())
    }
}

impl Default for Topology {
    fn default() -> Self {
        Self::new()
    }
}

/// Four namespaces in a row, joined by veth pairs: client `eth0` — `down0` balancer `up0` —
/// `down0` gateway `up0` — `eth0` backend (addresses are the caller's).
pub fn balanced_chain() -> (NetNs, NetNs, NetNs, NetNs) {
    let client = NetNs::new("cl");
    let balancer = NetNs::new("lb");
    let gateway = NetNs::new("gw");
    let backend = NetNs::new("be");
    veth(&client, "eth0", &balancer, "down0");
    veth(&balancer, "up0", &gateway, "down0");
    veth(&gateway, "up0", &backend, "eth0");
    (client, balancer, gateway, backend)
}

/// Clients behind an nftables load balancer that DNATs a virtual IP to the gateway and SNATs every
/// client to one source `ip:port`, so successive clients reach the gateway with the same `ip:port`:
///
/// ```text
///  client ns                  balancer ns (nftables)                 gateway ns       backend ns
///  198.18.10.10..  ──veth──  198.18.10.1 (VIP :80) | 198.18.1.100 ──  198.18.1.1 | 198.18.2.1 ── 198.18.2.2
///                            snat to 198.18.1.100:40000
/// ```
pub struct SnatTopology {
    pub client: NetNs,
    pub balancer: NetNs,
    pub gateway: NetNs,
    pub backend: NetNs,
}

pub const SNAT_VIP: &str = "198.18.10.1";
pub const SNAT_SOURCE: &str = "198.18.1.100";
pub const SNAT_PORT: u16 = 40_000;

impl SnatTopology {
    pub fn new() -> SnatTopology {
        let (client, balancer, gateway, backend) = balanced_chain();
        for i in 0..4 {
            addr(&client, "eth0", &format!("198.18.10.{}/24", 10 + i));
        }
        client.ip(&["route", "add", "default", "via", SNAT_VIP]);
        addr(&balancer, "down0", "198.18.10.1/24");
        addr(&balancer, "up0", "198.18.1.100/24");
        addr(&gateway, "down0", "198.18.1.1/24");
        addr(&gateway, "up0", "198.18.2.1/24");
        addr(&backend, "eth0", "198.18.2.2/24");
        let rules = format!(
            "table ip ntlmtag_lb {{
               chain pre {{ type nat hook prerouting priority dstnat; policy accept;
                 ip daddr {SNAT_VIP} tcp dport 80 dnat to {gw}:{gw_port}; }}
               chain post {{ type nat hook postrouting priority srcnat; policy accept;
                 oifname \"up0\" ip protocol tcp snat to {SNAT_SOURCE}:{SNAT_PORT}; }}
             }}",
            gw = GATEWAY_V4,
            gw_port = GATEWAY_PORT,
        );
        let mut nft = balancer.command("nft");
        nft.args(["-f", "-"])
            .stdin(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = nft.spawn().expect("nft");
        std::io::Write::write_all(child.stdin.as_mut().expect("stdin"), rules.as_bytes())
            .expect("write rules");
        drop(child.stdin.take());
        let out = child.wait_with_output().expect("nft");
        assert!(
            out.status.success(),
            "nft rules rejected: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // (After the NAT rules: they load conntrack, which owns the other keys.) Forward, and forget
        // a closed connection at once, reset or closed by the client (TIME_WAIT), so the single SNAT
        // port is free for the next client right away (what a busy balancer's port reuse looks like).
        let mut sysctl = balancer.command("sysctl");
        sysctl.args([
            "-qw",
            "net.ipv4.ip_forward=1",
            "net.netfilter.nf_conntrack_tcp_timeout_close=0",
            "net.netfilter.nf_conntrack_tcp_timeout_time_wait=0",
        ]);
        assert!(sysctl.status().expect("sysctl").success());
        SnatTopology {
            client,
            balancer,
            gateway,
            backend,
        }
    }

    pub fn vip() -> SocketAddr {
        SocketAddr::new(SNAT_VIP.parse().expect("address"), 80)
    }

    pub fn client_v4(i: u8) -> IpAddr {
        format!("198.18.10.{}", 10 + i).parse().expect("address")
    }

    pub fn snat_peer() -> SocketAddr {
        SocketAddr::new(SNAT_SOURCE.parse().expect("address"), SNAT_PORT)
    }
}

impl Default for SnatTopology {
    fn default() -> Self {
        Self::new()
    }
}

/// Clients behind a Katran-style balancer that encapsulates in IPIP towards the gateway, which owns the
/// virtual IP and decapsulates with XDP (no tunnel device):
///
/// ```text
///  client ns           balancer ns                       gateway ns                      backend ns
///  198.18.10.10.. ── 198.18.10.1 | 198.18.1.100 ─(IPIP)─ 198.18.1.1 (XDP), VIP 198.18.20.1 ── 198.18.2.2
/// ```
/// The balancer's TC egress program (test-only) encapsulates; the gateway answers clients directly
/// through the balancer's routing (direct server return).
pub struct IpipTopology {
    pub client: NetNs,
    pub balancer: NetNs,
    pub gateway: NetNs,
    pub backend: NetNs,
}

pub const IPIP_VIP: &str = "198.18.20.1";

impl IpipTopology {
    pub fn new() -> IpipTopology {
        let (client, balancer, gateway, backend) = balanced_chain();
        // Room for the 20-byte outer header.
        balancer.ip(&["link", "set", "up0", "mtu", "1600"]);
        gateway.ip(&["link", "set", "down0", "mtu", "1600"]);
        for i in 0..4 {
            addr(&client, "eth0", &format!("198.18.10.{}/24", 10 + i));
        }
        client.ip(&["route", "add", "default", "via", SNAT_VIP]);
        addr(&balancer, "down0", "198.18.10.1/24");
        addr(&balancer, "up0", "198.18.1.100/24");
        balancer.ip(&["route", "add", &format!("{IPIP_VIP}/32"), "via", GATEWAY_V4]);
        addr(&gateway, "down0", "198.18.1.1/24");
        addr(&gateway, "lo", &format!("{IPIP_VIP}/32"));
        addr(&gateway, "up0", "198.18.2.1/24");
        gateway.ip(&["route", "add", "198.18.10.0/24", "via", SNAT_SOURCE]);
        addr(&backend, "eth0", "198.18.2.2/24");
        let mut sysctl = balancer.command("sysctl");
        sysctl.args(["-qw", "net.ipv4.ip_forward=1"]);
        assert!(sysctl.status().expect("sysctl").success());
        IpipTopology {
            client,
            balancer,
            gateway,
            backend,
        }
    }

    pub fn vip() -> SocketAddr {
        SocketAddr::new(IPIP_VIP.parse().expect("address"), GATEWAY_PORT)
    }

    pub fn client_v4(i: u8) -> IpAddr {
        format!("198.18.10.{}", 10 + i).parse().expect("address")
    }
}

impl Default for IpipTopology {
    fn default() -> Self {
        Self::new()
    }
}
