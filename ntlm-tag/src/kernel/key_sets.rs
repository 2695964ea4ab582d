//! Replacing the contents of several kernel maps that each hold a set of keys (the trust tries, the
//! local-address map) so that a failure half-way never leaves the kernel trusting more than the
//! configuration that keeps running.
//!
//! Every removal is made before any insertion (narrowing before widening), and if any step fails,
//! the steps already made are undone in reverse: the kernel is back at the old contents and the
//! caller keeps its old configuration. The step that fails in practice is an insertion (a full map,
//! memory); if re-inserting a removed key fails during the undo too, the kernel is left with less
//! than before, never more. (Removing a key just inserted is not expected to fail; if it does, an
//! error says to restart.)
#![forbid(unsafe_code)]

use aya::maps::MapError;
use std::net::Ipv6Addr;

use ipnet::{IpNet, Ipv6Net};
use ntlm_tag_common::LpmAddr;

/// `::ffff:0:0/96`: where the kernel keys IPv4 addresses (v4-mapped), and so where an IPv4 prefix
/// lives in its tries.
pub const V4_MAPPED: Ipv6Net = match Ipv6Net::new(Ipv6Addr::new(0, 0, 0, 0, 0, 0xffff, 0, 0), 96) {
    Ok(net) => net,
    Err(_) => panic!("::ffff:0:0/96 is a valid prefix"),
};

/// The prefix in the kernel's key space: IPv6, with IPv4 as v4-mapped (prefix length + 96).
pub fn as_kernel_prefix(net: &IpNet) -> Ipv6Net {
    match net {
        IpNet::V4(v4) => {
            Ipv6Net::new(v4.network().to_ipv6_mapped(), 96 + v4.prefix_len()).unwrap_or(V4_MAPPED)
        }
        IpNet::V6(v6) => *v6,
    }
}

/// A key of a set: prefix length and 16 address bytes (IPv4 v4-mapped, prefix length + 96).
/// Plain address maps use length 128.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SetKey {
    pub prefix_len: u32,
    pub addr: LpmAddr,
}

impl SetKey {
    pub fn of_prefix(net: &IpNet) -> SetKey {
        let v6 = as_kernel_prefix(net);
        SetKey {
            prefix_len: u32::from(v6.prefix_len()),
            addr: v6.network().octets(),
        }
    }

    pub fn of_addr(addr: std::net::IpAddr) -> SetKey {
        let v6 = match addr {
            std::net::IpAddr::V4(v4) => v4.to_ipv6_mapped(),
            std::net::IpAddr::V6(v6) => v6,
        };
        SetKey {
            prefix_len: 128,
            addr: v6.octets(),
        }
    }
}

/// A kernel map seen as a set of keys.
pub trait KeySet {
    /// The map's name, for errors.
    fn name(&self) -> &'static str;
    fn keys(&self) -> Result<Vec<SetKey>, MapError>;
    fn insert(&mut self, key: &SetKey) -> Result<(), MapError>;
    fn remove(&mut self, key: &SetKey) -> Result<(), MapError>;
}

/// A failed step: which map, and why.
#[derive(Debug, thiserror::Error)]
#[error("cannot update map {name}: {source}")]
pub struct KeySetError {
    pub name: &'static str,
    #[source]
    pub source: MapError,
}

#[derive(Debug, Clone, Copy)]
enum Step {
    Removed(usize, SetKey),
    Inserted(usize, SetKey),
}

/// The steps a successful [`replace_all`] made, to undo them if a later part of the same update
/// fails.
#[derive(Debug, Default)]
pub struct Applied {
    steps: Vec<Step>,
}

impl Applied {
    /// Undoes the steps in reverse order (the insertions first, so the kernel narrows before it
    /// widens again). Failures are logged, not returned: there is nothing more to roll back to.
    pub fn undo(self, sets: &mut [&mut dyn KeySet]) {
        for step in self.steps.into_iter().rev() {
            let (index, key, result) = match step {
                Step::Inserted(i, key) => (i, key, sets[i].remove(&key)),
                Step::Removed(i, key) => (i, key, sets[i].insert(&key)),
            };
            if let Err(e) = result {
                tracing::error!(
                    map = sets[index].name(),
                    ?key,
                    error = %e,
                    "cannot roll a kernel map back; restart the gateway to reload it from the configuration"
                );
            }
        }
    }
}

/// Gives `sets[i]` the keys `wanted[i]`: every stale key is removed from every set before any new
/// key is inserted. On failure the steps made are undone and the error names the map.
pub fn replace_all(
    sets: &mut [&mut dyn KeySet],
    wanted: &[Vec<SetKey>],
) -> Result<Applied, KeySetError> {
    let mut applied = Applied::default();
    let mut plan_insert = Vec::new();
    let mut plan_remove = Vec::new();
    for (i, (set, want)) in sets.iter().zip(wanted).enumerate() {
        let have = set.keys().map_err(|source| KeySetError {
            name: set.name(),
            source,
        })?;
        plan_remove.extend(have.iter().filter(|k| !want.contains(k)).map(|k| (i, *k)));
        plan_insert.extend(want.iter().filter(|k| !have.contains(k)).map(|k| (i, *k)));
    }
    let steps = plan_remove
        .into_iter()
        .map(|(i, k)| (false, i, k))
        .chain(plan_insert.into_iter().map(|(i, k)| (true, i, k)));
    for (insert, i, key) in steps {
        let result = if insert {
            sets[i].insert(&key)
        } else {
            sets[i].remove(&key)
        };
        match result {
            Ok(()) => applied.steps.push(if insert {
                Step::Inserted(i, key)
            } else {
                Step::Removed(i, key)
            }),
            Err(source) => {
                let name = sets[i].name();
                applied.undo(sets);
                return Err(KeySetError { name, source });
            }
        }
    }
    Ok(applied)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A set in memory whose insertions fail as `fail` says: the `n`-th insertion only (counting
    /// from 0), or every insertion from the `n`-th on.
    pub struct FakeSet {
        pub name: &'static str,
        pub keys: Vec<SetKey>,
        pub inserts: usize,
        pub fail: Fail,
    }

    #[derive(Clone, Copy)]
    pub enum Fail {
        Never,
        Only(usize),
        From(usize),
    }

    impl FakeSet {
        pub fn with(name: &'static str, nets: &[&str]) -> FakeSet {
            FakeSet {
                name,
                keys: keys(nets),
                inserts: 0,
                fail: Fail::Never,
            }
        }
    }

    impl KeySet for FakeSet {
        fn name(&self) -> &'static str {
            self.name
        }
        fn keys(&self) -> Result<Vec<SetKey>, MapError> {
            Ok(self.keys.clone())
        }
        fn insert(&mut self, key: &SetKey) -> Result<(), MapError> {
            let n = self.inserts;
            self.inserts += 1;
            let fails = match self.fail {
                Fail::Never => false,
                Fail::Only(f) => n == f,
                Fail::From(f) => n >= f,
            };
            if fails {
                return Err(MapError::OutOfBounds {
                    index: 0,
                    max_entries: 0,
                });
            }
            if !self.keys.contains(key) {
                self.keys.push(*key);
            }
            Ok(())
        }
        fn remove(&mut self, key: &SetKey) -> Result<(), MapError> {
            self.keys.retain(|k| k != key);
            Ok(())
        }
    }

    pub fn keys(nets: &[&str]) -> Vec<SetKey> {
        nets.iter()
            .map(|n| SetKey::of_prefix(&n.parse().expect("net")))
            .collect()
    }

    fn sorted(k: &[SetKey]) -> Vec<(u32, LpmAddr)> {
        let mut v: Vec<_> = k.iter().map(|k| (k.prefix_len, k.addr)).collect();
        v.sort();
        v
    }

    const OLD_TOA: [&str; 2] = ["198.18.1.0/24", "198.18.3.0/24"];
    const OLD_IPIP: [&str; 1] = ["198.18.1.100/32"];

    fn wanted() -> [Vec<SetKey>; 2] {
        [
            keys(&["198.18.3.0/24", "0.0.0.0/0", "198.18.9.0/24"]),
            keys(&["198.18.7.0/24"]),
        ]
    }

    #[test]
    fn replaces_every_set() {
        let mut toa = FakeSet::with("toa", &OLD_TOA);
        let mut ipip = FakeSet::with("ipip", &OLD_IPIP);
        let wanted = wanted();
        replace_all(&mut [&mut toa, &mut ipip], &wanted).expect("applied");
        assert_eq!(sorted(&toa.keys), sorted(&wanted[0]));
        assert_eq!(sorted(&ipip.keys), sorted(&wanted[1]));
    }

    #[test]
    fn a_failure_half_way_restores_the_old_contents() {
        // Each insertion in turn fails: toa's two, then ipip's one (made after every removal).
        for (toa_fail, ipip_fail, failing) in [
            (Fail::Only(0), Fail::Never, "toa"),
            (Fail::Only(1), Fail::Never, "toa"),
            (Fail::Never, Fail::Only(0), "ipip"),
        ] {
            let mut toa = FakeSet::with("toa", &OLD_TOA);
            let mut ipip = FakeSet::with("ipip", &OLD_IPIP);
            toa.fail = toa_fail;
            ipip.fail = ipip_fail;
            let err = replace_all(&mut [&mut toa, &mut ipip], &wanted()).expect_err("fails");
            assert_eq!(err.name, failing);
            assert_eq!(sorted(&toa.keys), sorted(&keys(&OLD_TOA)), "{failing}");
            assert_eq!(sorted(&ipip.keys), sorted(&keys(&OLD_IPIP)), "{failing}");
        }
    }

    #[test]
    fn when_the_undo_fails_too_the_kernel_holds_less_never_more() {
        for n in 0..2 {
            let mut toa = FakeSet::with("toa", &OLD_TOA);
            let mut ipip = FakeSet::with("ipip", &OLD_IPIP);
            toa.fail = Fail::From(n);
            ipip.fail = Fail::From(0);
            replace_all(&mut [&mut toa, &mut ipip], &wanted()).expect_err("fails");
            assert!(
                toa.keys.iter().all(|k| keys(&OLD_TOA).contains(k)),
                "{n}: {:?}",
                toa.keys
            );
            assert!(ipip.keys.iter().all(|k| keys(&OLD_IPIP).contains(k)));
        }
    }

    #[test]
    fn applied_steps_can_be_undone_when_a_later_part_fails() {
        let mut toa = FakeSet::with("toa", &["198.18.1.0/24"]);
        let wanted = [keys(&["198.18.2.0/24"])];
        let applied = replace_all(&mut [&mut toa], &wanted).expect("applied");
        applied.undo(&mut [&mut toa]);
        assert_eq!(toa.keys, keys(&["198.18.1.0/24"]));
    }
}
