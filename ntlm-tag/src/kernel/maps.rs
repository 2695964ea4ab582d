//! The maps userspace reads and writes, by the names in `ntlm-tag-common`: connection records
//! decoded, and the sets (trust tries, local addresses) and settings a reload replaces.
#![forbid(unsafe_code)]

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use aya::{
    Ebpf,
    maps::{
        Array, HashMap, MapData,
        lpm_trie::{Key, LpmTrie},
    },
};
use ntlm_tag_common::{
    ClientSource, ConnIdentity, LOCAL_ADDRS_MAP, LpmAddr, SETTINGS_MAP, Setting,
};

use super::{
    KernelError,
    key_sets::{KeySet, SetKey},
};

/// What the kernel recorded about one connection, in userspace types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelRecord {
    pub peer: SocketAddr,
    pub local: SocketAddr,
    pub client: SocketAddr,
    pub learned_from: ClientSource,
    pub balancer: Option<IpAddr>,
    pub established_ns: u64,
}

impl KernelRecord {
    pub(super) fn from_raw(raw: &ConnIdentity) -> Self {
        let balancer = ip_from_bytes(raw.balancer_addr);
        KernelRecord {
            peer: SocketAddr::new(ip_from_bytes(raw.peer_addr), raw.peer_port),
            local: SocketAddr::new(ip_from_bytes(raw.local_addr), raw.local_port),
            client: SocketAddr::new(ip_from_bytes(raw.client_addr), raw.client_port),
            learned_from: ClientSource::from_u8(raw.source).unwrap_or(ClientSource::Peer),
            balancer: (!balancer.is_unspecified()).then_some(balancer),
            established_ns: raw.established_ns,
        }
    }
}

pub(super) fn ip_from_bytes(bytes: [u8; 16]) -> IpAddr {
    let v6 = Ipv6Addr::from(bytes);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

/// The maps userspace writes: the trust tries, the local addresses and the settings.
pub(super) struct Configurable {
    pub(super) toa: NamedTrie,
    pub(super) ipip: NamedTrie,
    pub(super) local: LocalAddrs,
    pub(super) settings: Array<MapData, u32>,
}

impl Configurable {
    pub(super) fn set_toa_kind(&mut self, kind: u32) -> Result<(), KernelError> {
        self.settings
            .set(Setting::ToaKind as u32, kind, 0)
            .map_err(map_error(SETTINGS_MAP))
    }
}

/// A trust trie and its name.
pub(super) struct NamedTrie {
    name: &'static str,
    trie: LpmTrie<MapData, LpmAddr, u8>,
}

impl NamedTrie {
    pub(super) fn take(ebpf: &mut Ebpf, name: &'static str) -> Result<Self, KernelError> {
        let trie =
            take_map(ebpf, name).and_then(|m| LpmTrie::try_from(m).map_err(map_error(name)))?;
        Ok(NamedTrie { name, trie })
    }
}

impl KeySet for NamedTrie {
    fn name(&self) -> &'static str {
        self.name
    }
    fn keys(&self) -> Result<Vec<SetKey>, aya::maps::MapError> {
        self.trie
            .keys()
            .map(|k| {
                k.map(|k| SetKey {
                    prefix_len: k.prefix_len(),
                    addr: k.data(),
                })
            })
            .collect()
    }
    fn insert(&mut self, key: &SetKey) -> Result<(), aya::maps::MapError> {
        self.trie.insert(&Key::new(key.prefix_len, key.addr), 1, 0)
    }
    fn remove(&mut self, key: &SetKey) -> Result<(), aya::maps::MapError> {
        self.trie.remove(&Key::new(key.prefix_len, key.addr))
    }
}

/// The local-address map (keys are whole addresses).
pub(super) struct LocalAddrs(pub(super) HashMap<MapData, LpmAddr, u8>);

impl KeySet for LocalAddrs {
    fn name(&self) -> &'static str {
        LOCAL_ADDRS_MAP
    }
    fn keys(&self) -> Result<Vec<SetKey>, aya::maps::MapError> {
        self.0
            .keys()
            .map(|k| {
                k.map(|addr| SetKey {
                    prefix_len: 128,
                    addr,
                })
            })
            .collect()
    }
    fn insert(&mut self, key: &SetKey) -> Result<(), aya::maps::MapError> {
        self.0.insert(key.addr, 1, 0)
    }
    fn remove(&mut self, key: &SetKey) -> Result<(), aya::maps::MapError> {
        self.0.remove(&key.addr)
    }
}

pub(super) fn take_map(ebpf: &mut Ebpf, name: &'static str) -> Result<aya::maps::Map, KernelError> {
    ebpf.take_map(name)
        .ok_or(KernelError::Missing { what: "map", name })
}

pub(super) fn map_error(name: &'static str) -> impl Fn(aya::maps::MapError) -> KernelError {
    move |source| KernelError::Map { name, source }
}
