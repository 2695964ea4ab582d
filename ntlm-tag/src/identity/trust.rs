//! Which peers may convey a client identity (PROXY header, TOA, IPIP): the trusted balancers.
#![forbid(unsafe_code)]

use std::net::IpAddr;

use ipnet::IpNet;

/// The trusted balancer prefixes. The same list is loaded into the kernel's LPM trie.
#[derive(Debug, Clone, Default)]
pub struct TrustedSources {
    nets: Vec<IpNet>,
}

impl TrustedSources {
    pub fn new(nets: &[IpNet]) -> Self {
        TrustedSources {
            nets: nets.to_vec(),
        }
    }

    /// True when `peer` (IPv4, IPv6 or v4-mapped IPv6) is inside a trusted prefix.
    pub fn contains(&self, peer: IpAddr) -> bool {
        let peer = match peer {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(peer),
            v4 => v4,
        };
        self.nets.iter().any(|n| n.contains(&peer))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trusted() -> TrustedSources {
        TrustedSources::new(&[
            "198.18.1.0/24".parse().expect("net"),
            "fd00:5418:9::/48".parse().expect("net"),
        ])
    }

    #[test]
    fn ipv4_ipv6_and_v4_mapped_peers() {
        let t = trusted();
        assert!(t.contains("198.18.1.100".parse().expect("ip")));
        assert!(t.contains("::ffff:198.18.1.100".parse().expect("ip")));
        assert!(t.contains("fd00:5418:9::1".parse().expect("ip")));
        assert!(!t.contains("198.18.2.1".parse().expect("ip")));
        assert!(!t.contains("fd00:5418:8::1".parse().expect("ip")));
        assert!(!TrustedSources::default().contains("198.18.1.1".parse().expect("ip")));
    }
}
