//! Which peers may convey a client identity: the trusted balancers, one list per mechanism (PROXY
//! header, TOA option, IPIP tunnel), and how a prefix is written so that userspace and the kernel
//! agree on what it covers.
#![forbid(unsafe_code)]

use std::net::IpAddr;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use crate::kernel::{V4_MAPPED, as_kernel_prefix};

/// A prefix as it is kept and shown: host bits cleared, and a v4-mapped IPv6 prefix
/// (`::ffff:198.18.1.0/120`) rewritten as the IPv4 prefix it means (`198.18.1.0/24`). The kernel keys
/// IPv4 as v4-mapped, so both spellings trust the same peers there; rewriting makes userspace (and
/// `ntlm-tag check`) say the same.
pub fn normalise(net: IpNet) -> IpNet {
    match net.trunc() {
        IpNet::V6(v6) if v6.prefix_len() >= 96 && V4_MAPPED.contains(&v6.network()) => {
            match (
                v6.network().to_ipv4_mapped(),
                v6.prefix_len().checked_sub(96),
            ) {
                (Some(v4), Some(len)) => Ipv4Net::new(v4, len).map_or(IpNet::V6(v6), IpNet::V4),
                _ => IpNet::V6(v6),
            }
        }
        other => other,
    }
}

/// What all of an address family a prefix covers, if it does: such a prefix trusts every peer of
/// that family, which is worth a warning at start-up.
pub fn covers_a_whole_family(net: &IpNet) -> Option<&'static str> {
    match net {
        IpNet::V4(v4) if v4.prefix_len() == 0 => Some("every IPv4 address"),
        IpNet::V6(v6) if v6.prefix_len() == 0 => Some("every IPv6 and every IPv4 address"),
        // The kernel keys IPv4 as ::ffff:a.b.c.d, so an IPv6 prefix around ::ffff:0:0/96 (`::/8`,
        // `::/80`) trusts all of IPv4 there, and here too.
        IpNet::V6(v6) if v6.prefix_len() <= 96 && v6.contains(&V4_MAPPED.network()) => {
            Some("every IPv4 address (the kernel keys IPv4 as ::ffff:0:0/96)")
        }
        _ => None,
    }
}

/// A list of trusted balancer prefixes, as the PROXY-protocol listeners check it.
#[derive(Debug, Clone, Default)]
pub struct TrustedSources {
    /// In the kernel's key space, so that a prefix covers exactly the peers it covers there.
    nets: Vec<Ipv6Net>,
}

impl TrustedSources {
    pub fn new(nets: &[IpNet]) -> Self {
        TrustedSources {
            nets: nets.iter().map(as_kernel_prefix).collect(),
        }
    }

    /// True when `peer` (IPv4, IPv6 or v4-mapped IPv6) is inside a trusted prefix, exactly when
    /// the kernel's tries would say so for the same list.
    pub fn contains(&self, peer: IpAddr) -> bool {
        let peer = match peer {
            IpAddr::V4(v4) => v4.to_ipv6_mapped(),
            IpAddr::V6(v6) => v6,
        };
        self.nets.iter().any(|n| n.contains(&peer))
    }
}

/// The effective trust lists, one per way a balancer can convey a client. A balancer trusted for one
/// mechanism is not thereby trusted for another: a NAT balancer passes TCP options through, so a
/// client behind a balancer trusted only for PROXY protocol could otherwise write its own TOA option.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustLists {
    /// Who may send a PROXY v1/v2 header (checked in userspace): `trusted_lbs`.
    pub proxy: Vec<IpNet>,
    /// Whose TOA option names the client (kernel): `toa_trusted_lbs`, else `trusted_lbs`; empty
    /// when TOA is off.
    pub toa: Vec<IpNet>,
    /// Whose IPIP / IPv6-in-IPv6 tunnels XDP decapsulates (kernel): `ipip_trusted_lbs`, else
    /// `trusted_lbs`; empty when XDP is off.
    pub ipip: Vec<IpNet>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().expect("net")
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    fn trusted() -> TrustedSources {
        TrustedSources::new(&[net("198.18.1.0/24"), net("fd00:5418:9::/48")])
    }

    #[test]
    fn ipv4_ipv6_and_v4_mapped_peers() {
        let t = trusted();
        assert!(t.contains(ip("198.18.1.100")));
        assert!(t.contains(ip("::ffff:198.18.1.100")));
        assert!(t.contains(ip("fd00:5418:9::1")));
        assert!(!t.contains(ip("198.18.2.1")));
        assert!(!t.contains(ip("fd00:5418:8::1")));
        assert!(!TrustedSources::default().contains(ip("198.18.1.1")));
    }

    #[test]
    fn v4_mapped_prefixes_become_the_ipv4_prefix_they_mean() {
        assert_eq!(
            normalise(net("::ffff:198.18.1.0/120")),
            net("198.18.1.0/24")
        );
        assert_eq!(
            normalise(net("::ffff:198.18.1.7/128")),
            net("198.18.1.7/32")
        );
        assert_eq!(normalise(net("::ffff:0.0.0.0/96")), net("0.0.0.0/0"));
        // Host bits are cleared, in either family.
        assert_eq!(
            normalise(net("::ffff:198.18.1.9/120")),
            net("198.18.1.0/24")
        );
        assert_eq!(normalise(net("198.18.5.7/24")), net("198.18.5.0/24"));
        // Other IPv6 prefixes stay as they are.
        assert_eq!(normalise(net("fd00:5418::/48")), net("fd00:5418::/48"));
        assert_eq!(normalise(net("::/0")), net("::/0"));
        assert_eq!(
            normalise(net("::ffff:0:0/95")),
            net("::ffff:0:0/95").trunc()
        );
    }

    #[test]
    fn userspace_agrees_with_the_kernel_on_v4_mapped_prefixes() {
        // Given either spelling (normalised or not), an IPv4 peer inside is trusted, one outside
        // is not: as in the kernel's trie, where both are ::ffff:198.18.1.0/120.
        for list in [
            vec![net("::ffff:198.18.1.0/120")],
            vec![normalise(net("::ffff:198.18.1.0/120"))],
        ] {
            let t = TrustedSources::new(&list);
            assert!(t.contains(ip("198.18.1.77")), "{list:?}");
            assert!(t.contains(ip("::ffff:198.18.1.77")), "{list:?}");
            assert!(!t.contains(ip("198.18.2.77")), "{list:?}");
            assert_eq!(
                as_kernel_prefix(&list[0]),
                "::ffff:198.18.1.0/120".parse::<Ipv6Net>().expect("net")
            );
        }
        // An IPv6 prefix around the v4-mapped range trusts IPv4 peers in the kernel, so here too.
        let t = TrustedSources::new(&[net("::/0")]);
        assert!(t.contains(ip("203.0.113.9")));
        let t = TrustedSources::new(&[net("fd00::/8")]);
        assert!(!t.contains(ip("203.0.113.9")));
    }

    #[test]
    fn prefixes_covering_a_whole_family_are_recognised() {
        assert!(covers_a_whole_family(&net("0.0.0.0/0")).is_some());
        assert!(covers_a_whole_family(&net("::/0")).is_some());
        assert!(covers_a_whole_family(&net("::/8")).is_some());
        assert!(covers_a_whole_family(&normalise(net("::ffff:0:0/96"))).is_some());
        assert!(covers_a_whole_family(&net("0.0.0.0/1")).is_none());
        assert!(covers_a_whole_family(&net("198.18.0.0/15")).is_none());
        assert!(covers_a_whole_family(&net("fd00::/8")).is_none());
        assert!(covers_a_whole_family(&net("::ffff:0:0/97")).is_none());
    }
}
