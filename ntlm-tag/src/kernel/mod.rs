//! The only place that touches aya and raw syscalls: load the embedded eBPF object, attach it to the
//! proxy's own cgroup, and look up connection records by socket cookie.

pub mod cgroup;
mod key_sets;
pub mod local_addrs;
pub mod privileges;
mod sockopt;
pub mod support;
pub mod tcp_state;

use std::{
    io,
    net::{IpAddr, Ipv6Addr, SocketAddr},
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{
        Array, HashMap, MapData, PerCpuArray,
        lpm_trie::{Key, LpmTrie},
    },
    programs::{CgroupAttachMode, SockOps, Xdp, XdpMode},
};
use ntlm_tag_common::{
    CONN_IDENTITY_MAP, COUNTERS_MAP, ClientSource, ConnIdentity, Counter, LOCAL_ADDRS_MAP, LpmAddr,
    SETTINGS_MAP, SOCK_OPS_PROGRAM, Setting, TRUSTED_IPIP_MAP, TRUSTED_TOA_MAP, XDP_COUNTERS_MAP,
    XDP_PROGRAM, XdpCounter,
};
use thiserror::Error;

use key_sets::{KeySet, KeySetError, SetKey};

pub use cgroup::{CgroupError, OwnCgroup};
pub use sockopt::{monotonic_ns, socket_cookie};

/// The eBPF object built by `cargo xtask build-ebpf`, embedded at compile time.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("NTLM_TAG_EBPF_OBJECT"));

const PRIVILEGE_HINT: &str = "loading eBPF needs root, or CAP_BPF + CAP_NET_ADMIN + CAP_PERFMON and \
     write access to the cgroup tree; run with sudo, or with --ebpf off to use peer addresses";

#[derive(Debug, Error)]
pub enum KernelError {
    #[error("cannot set up the proxy's own cgroup: {0}")]
    Cgroup(#[from] CgroupError),
    #[error("cannot load the eBPF object: {source}; {hint}")]
    Load {
        #[source]
        source: aya::EbpfError,
        hint: &'static str,
    },
    #[error(
        "the eBPF object has no {what} `{name}` (the binary was built from a mismatched object)"
    )]
    Missing {
        what: &'static str,
        name: &'static str,
    },
    #[error("cannot load the sock_ops program: {source}; {hint}")]
    Program {
        #[source]
        source: aya::programs::ProgramError,
        hint: &'static str,
    },
    #[error("cannot attach the sock_ops program to cgroup {cgroup}: {source}; {hint}")]
    Attach {
        cgroup: String,
        #[source]
        source: aya::programs::ProgramError,
        hint: &'static str,
    },
    #[error(
        "cannot attach XDP to interface {interface}: {source} (does it exist in this network namespace?)"
    )]
    Xdp {
        interface: String,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error(
        "{source}. This kernel ({release}) is older than {MIN_KERNEL_TEXT}, the oldest the eBPF programs \
         run on: their sock_ops program reads the TCP header (skb_data, Linux 5.10) to find TOA options, \
         and they log through a BPF ring buffer (5.8). Without them there are no kernel connection \
         records, TOA or XDP decapsulation; PROXY protocol from trusted balancers and peer addresses \
         (--ebpf auto or off) still work"
    )]
    KernelTooOld {
        release: String,
        #[source]
        source: Box<KernelError>,
    },
    #[error("a kernel map lock was poisoned by a panic")]
    Poisoned,
    #[error("cannot open map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("{0}; the kernel keeps the lists it had")]
    Update(#[from] KeySetError),
    #[error(
        "cannot read this host's addresses (XDP decapsulates only tunnels addressed to them): {0}"
    )]
    LocalAddresses(#[source] io::Error),
}

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
    fn from_raw(raw: &ConnIdentity) -> Self {
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

fn ip_from_bytes(bytes: [u8; 16]) -> IpAddr {
    let v6 = Ipv6Addr::from(bytes);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

/// What the kernel side is configured with.
#[derive(Debug, Clone)]
pub struct KernelOptions {
    pub map_entries: u32,
    /// TCP option kind of TOA; 0 turns TOA parsing off.
    pub toa_kind: u8,
    /// Balancer prefixes whose TOA options the kernel believes (empty: none).
    pub toa_trusted: Vec<ipnet::IpNet>,
    /// Balancer prefixes whose tunnels XDP decapsulates (empty: none).
    pub ipip_trusted: Vec<ipnet::IpNet>,
    /// Interfaces to decapsulate IPIP / IPv6-in-IPv6 on (XDP).
    pub xdp_interfaces: Vec<String>,
}

/// How the XDP program was attached to one interface.
#[derive(Debug, Clone, serde::Serialize)]
pub struct XdpAttachment {
    pub interface: String,
    /// `native` (driver) or `generic` (skb).
    pub mode: &'static str,
}

/// Counters the kernel programs keep, summed over CPUs.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct KernelCounters {
    pub recorded: u64,
    pub deleted: u64,
    pub insert_failed: u64,
    pub callbacks_unavailable: u64,
    pub toa_accepted: u64,
    pub toa_untrusted: u64,
    pub toa_malformed: u64,
    pub ipip_joined: u64,
    pub xdp_decapsulated: u64,
    pub xdp_untrusted: u64,
    pub xdp_skipped: u64,
    pub xdp_inner_not_tcp: u64,
    pub xdp_inner_not_local: u64,
    /// Accepted connections that had no record (userspace).
    pub lookup_misses: u64,
}

/// The loaded and attached kernel programs and their maps. Dropping it detaches the programs and
/// removes the proxy's cgroup.
pub struct KernelTracker {
    identities: HashMap<MapData, u64, ConnIdentity>,
    counters: PerCpuArray<MapData, u64>,
    xdp_counters: PerCpuArray<MapData, u64>,
    xdp: Vec<XdpAttachment>,
    /// The maps userspace configures, under one lock so that reloads apply one at a time.
    configurable: Mutex<Configurable>,
    map_entries: u32,
    lookup_misses: AtomicU64,
    last_miss_warning: Mutex<Option<Instant>>,
    /// The programs' aya-log buffer until [`KernelTracker::forward_kernel_log`] takes it.
    kernel_log: Mutex<Option<KernelLog>>,
    // Field order is drop order: the programs (and their cgroup link) go before the cgroup.
    _ebpf: Ebpf,
    cgroup: OwnCgroup,
}

impl KernelTracker {
    /// Moves the process into its own cgroup, loads the embedded programs and attaches them there.
    /// Must run before the listening sockets are created, so that they belong to that cgroup. When
    /// the kernel refuses the programs and is older than [`MIN_KERNEL`], the error says so and what
    /// still works.
    /// With `join`, the process joins that cgroup instead of creating its own (an upgrade: the
    /// listening sockets handed over were created there) and attaches its programs beside those of
    /// the process that created it.
    pub fn start(
        options: &KernelOptions,
        join: Option<&std::path::Path>,
    ) -> Result<Self, KernelError> {
        Self::load_and_attach(options, join).map_err(explain_old_kernel)
    }

    fn load_and_attach(
        options: &KernelOptions,
        join: Option<&std::path::Path>,
    ) -> Result<Self, KernelError> {
        let map_entries = options.map_entries;
        if let Err(e) = sockopt::raise_memlock_limit() {
            // Only kernels before 5.11 need it; there the map creation below fails with a clear error.
            tracing::debug!(error = %e, "could not raise RLIMIT_MEMLOCK");
        }
        let cgroup = match join {
            Some(path) => OwnCgroup::join(path)?,
            None => OwnCgroup::create()?,
        };
        let mut ebpf = load_object(map_entries)?;
        let kernel_log = init_kernel_log(&mut ebpf);
        let program: &mut SockOps = program_of(&mut ebpf, SOCK_OPS_PROGRAM)?;
        program.load().map_err(program_error)?;
        // The cgroup is ours (shared only during an upgrade). `Single` is what bpf_link (5.7+)
        // requires; links always coexist with other links (the other process's during an upgrade)
        // and with programs on ancestor cgroups.
        program
            .attach(cgroup.file(), CgroupAttachMode::Single)
            .map_err(|source| KernelError::Attach {
                cgroup: cgroup.path().display().to_string(),
                hint: hint_for_program(&source),
                source,
            })?;
        let xdp = attach_xdp(&mut ebpf, &options.xdp_interfaces)?;
        let identities = take_map(&mut ebpf, CONN_IDENTITY_MAP)
            .and_then(|m| HashMap::try_from(m).map_err(map_error(CONN_IDENTITY_MAP)))?;
        let counters = take_map(&mut ebpf, COUNTERS_MAP)
            .and_then(|m| PerCpuArray::try_from(m).map_err(map_error(COUNTERS_MAP)))?;
        let xdp_counters = take_map(&mut ebpf, XDP_COUNTERS_MAP)
            .and_then(|m| PerCpuArray::try_from(m).map_err(map_error(XDP_COUNTERS_MAP)))?;
        let configurable = Configurable {
            toa: NamedTrie::take(&mut ebpf, TRUSTED_TOA_MAP)?,
            ipip: NamedTrie::take(&mut ebpf, TRUSTED_IPIP_MAP)?,
            local: LocalAddrs(
                take_map(&mut ebpf, LOCAL_ADDRS_MAP)
                    .and_then(|m| HashMap::try_from(m).map_err(map_error(LOCAL_ADDRS_MAP)))?,
            ),
            settings: take_map(&mut ebpf, SETTINGS_MAP)
                .and_then(|m| Array::try_from(m).map_err(map_error(SETTINGS_MAP)))?,
        };
        tracing::info!(
            cgroup = %cgroup.path().display(),
            map_entries,
            "eBPF sock_ops program attached to the proxy's own cgroup"
        );
        let tracker = KernelTracker {
            identities,
            counters,
            xdp_counters,
            xdp,
            configurable: Mutex::new(configurable),
            map_entries,
            lookup_misses: AtomicU64::new(0),
            last_miss_warning: Mutex::new(None),
            kernel_log: Mutex::new(kernel_log),
            _ebpf: ebpf,
            cgroup,
        };
        tracker.configure(options)?;
        Ok(tracker)
    }

    /// Loads the trust lists, this host's addresses and the TOA kind into the kernel's maps
    /// (start-up and reload). All or nothing: what narrows trust is applied before what widens it,
    /// and on a failure everything applied is undone, so the kernel never trusts more than the
    /// configuration the caller keeps running.
    pub fn configure(&self, options: &KernelOptions) -> Result<(), KernelError> {
        let local = if options.xdp_interfaces.is_empty() {
            Vec::new()
        } else {
            local_addrs::host_addresses().map_err(KernelError::LocalAddresses)?
        };
        let wanted = [
            options.toa_trusted.iter().map(SetKey::of_prefix).collect(),
            options.ipip_trusted.iter().map(SetKey::of_prefix).collect(),
            local.iter().copied().map(SetKey::of_addr).collect(),
        ];
        let mut c = self
            .configurable
            .lock()
            .map_err(|_| KernelError::Poisoned)?;
        let old_kind = c
            .settings
            .get(&(Setting::ToaKind as u32), 0)
            .map_err(map_error(SETTINGS_MAP))?;
        let new_kind = u32::from(options.toa_kind);
        // Turning TOA off narrows trust: first. Turning it on (or changing the kind) widens it:
        // last, once the trust list it reads is in place.
        if new_kind == 0 && old_kind != 0 {
            c.set_toa_kind(0)?;
        }
        let Configurable {
            toa,
            ipip,
            local: local_map,
            settings,
        } = &mut *c;
        let sets: &mut [&mut dyn KeySet] = &mut [toa, ipip, local_map];
        let applied = match key_sets::replace_all(sets, &wanted) {
            Ok(applied) => applied,
            Err(e) => {
                if new_kind != old_kind {
                    let _ = settings.set(Setting::ToaKind as u32, old_kind, 0);
                }
                return Err(e.into());
            }
        };
        if new_kind != 0
            && new_kind != old_kind
            && let Err(e) = settings.set(Setting::ToaKind as u32, new_kind, 0)
        {
            applied.undo(sets);
            return Err(map_error(SETTINGS_MAP)(e));
        }
        tracing::debug!(
            toa_kind = new_kind,
            toa_prefixes = wanted[0].len(),
            ipip_prefixes = wanted[1].len(),
            local_addresses = wanted[2].len(),
            "kernel trust lists loaded"
        );
        Ok(())
    }

    /// Starts forwarding the programs' log messages into our tracing output, on the current tokio
    /// runtime. [`start`](Self::start) runs before the runtime exists (the user switch must happen
    /// while the process has one thread), so this is a step of its own.
    pub fn forward_kernel_log(&self) {
        let taken = match self.kernel_log.lock() {
            Ok(mut logger) => logger.take(),
            Err(_) => None,
        };
        if let Some(logger) = taken {
            spawn_kernel_log_forwarding(logger);
        }
    }

    /// Reloads this host's addresses into the map XDP checks inner destinations against (an
    /// address added or removed since start-up or the last reload). Returns how many there are.
    pub fn refresh_local_addresses(&self) -> Result<usize, KernelError> {
        let local = local_addrs::host_addresses().map_err(KernelError::LocalAddresses)?;
        let wanted = [local.iter().copied().map(SetKey::of_addr).collect()];
        let mut c = self
            .configurable
            .lock()
            .map_err(|_| KernelError::Poisoned)?;
        key_sets::replace_all(&mut [&mut c.local], &wanted)?;
        Ok(local.len())
    }

    pub fn cgroup_path(&self) -> &std::path::Path {
        self.cgroup.path()
    }

    /// True when a map lookup works from this process now (without CAP_BPF, kernels 5.8 to 5.18 refuse
    /// every bpf() command while unprivileged BPF is disabled; see `privileges::bpf_gate`).
    pub fn lookups_work(&self) -> bool {
        match self.identities.get(&0, 0) {
            Ok(_) | Err(aya::maps::MapError::KeyNotFound) => true,
            Err(_) => false,
        }
    }

    pub fn map_entries(&self) -> u32 {
        self.map_entries
    }

    /// The record of the connection with socket `cookie`, if the kernel has one.
    pub fn lookup(&self, cookie: u64) -> Option<KernelRecord> {
        match self.identities.get(&cookie, 0) {
            Ok(raw) => Some(KernelRecord::from_raw(&raw)),
            Err(_) => None,
        }
    }

    /// Counts an accepted connection without a record, warning at most once a minute.
    pub fn note_lookup_miss(&self, cookie: u64, peer: SocketAddr) {
        let misses = self.lookup_misses.fetch_add(1, Ordering::Relaxed) + 1;
        let Ok(mut last) = self.last_miss_warning.lock() else {
            return;
        };
        if last.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
            *last = Some(Instant::now());
            tracing::warn!(
                cookie,
                %peer,
                misses,
                map_entries = self.map_entries,
                "no kernel record for an accepted connection; using the peer address. If this repeats, \
                 the connection map may be full (raise map_entries)"
            );
        }
    }

    /// Where the XDP program runs.
    pub fn xdp_attachments(&self) -> &[XdpAttachment] {
        &self.xdp
    }

    pub fn counters(&self) -> KernelCounters {
        let read = |c: Counter| -> u64 {
            self.counters
                .get(&(c as u32), 0)
                .map(|per_cpu| per_cpu.iter().sum())
                .unwrap_or(0)
        };
        let read_xdp = |c: XdpCounter| -> u64 {
            self.xdp_counters
                .get(&(c as u32), 0)
                .map(|per_cpu| per_cpu.iter().sum())
                .unwrap_or(0)
        };
        KernelCounters {
            recorded: read(Counter::Recorded),
            deleted: read(Counter::Deleted),
            insert_failed: read(Counter::InsertFailed),
            callbacks_unavailable: read(Counter::CallbacksUnavailable),
            toa_accepted: read(Counter::ToaAccepted),
            toa_untrusted: read(Counter::ToaUntrusted),
            toa_malformed: read(Counter::ToaMalformed),
            ipip_joined: read(Counter::IpipJoined),
            xdp_decapsulated: read_xdp(XdpCounter::Decapsulated),
            xdp_untrusted: read_xdp(XdpCounter::Untrusted),
            xdp_skipped: read_xdp(XdpCounter::Skipped),
            xdp_inner_not_tcp: read_xdp(XdpCounter::InnerNotTcp),
            xdp_inner_not_local: read_xdp(XdpCounter::InnerNotLocal),
            lookup_misses: self.lookup_misses.load(Ordering::Relaxed),
        }
    }

    /// All records in the map (for the admin listener; walks the whole map).
    pub fn records(&self) -> Vec<(u64, KernelRecord)> {
        self.identities
            .iter()
            .filter_map(Result::ok)
            .map(|(cookie, raw)| (cookie, KernelRecord::from_raw(&raw)))
            .collect()
    }
}

/// The oldest kernel the programs load on (tested: Debian 11's 5.10; see docs/kernels.md).
pub const MIN_KERNEL: (u32, u32) = (5, 10);
const MIN_KERNEL_TEXT: &str = "5.10";

/// Adds the kernel's age to an error the kernel's refusal of the object caused, when it is older
/// than [`MIN_KERNEL`] (a missing privilege, cgroup or interface is not about the kernel's age).
fn explain_old_kernel(e: KernelError) -> KernelError {
    let refused = match &e {
        KernelError::Load { hint, .. }
        | KernelError::Program { hint, .. }
        | KernelError::Attach { hint, .. } => *hint != PRIVILEGE_HINT,
        _ => false,
    };
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    match kernel_version(&release) {
        Some(v) if refused && v < MIN_KERNEL => KernelError::KernelTooOld {
            release: release.trim().to_string(),
            source: Box::new(e),
        },
        _ => e,
    }
}

/// `5.10.0-46-amd64` → (5, 10).
fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.trim().split(['.', '-']);
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// Loads the XDP program and attaches it to each interface: native mode first, generic if the
/// driver cannot run XDP itself.
fn attach_xdp(ebpf: &mut Ebpf, interfaces: &[String]) -> Result<Vec<XdpAttachment>, KernelError> {
    if interfaces.is_empty() {
        return Ok(Vec::new());
    }
    let program: &mut Xdp = program_of(ebpf, XDP_PROGRAM)?;
    program.load().map_err(program_error)?;
    let mut attached = Vec::new();
    for interface in interfaces {
        let mode = match program.attach(interface, XdpMode::Driver) {
            Ok(_) => "native",
            Err(native) => match program.attach(interface, XdpMode::Skb) {
                Ok(_) => {
                    tracing::info!(%interface, reason = %native, "native XDP unavailable; using generic (skb) mode");
                    "generic"
                }
                Err(source) => {
                    return Err(KernelError::Xdp {
                        interface: interface.clone(),
                        source,
                    });
                }
            },
        };
        tracing::info!(%interface, mode, "XDP IPIP decapsulation attached");
        attached.push(XdpAttachment {
            interface: interface.clone(),
            mode,
        });
    }
    Ok(attached)
}

/// The maps userspace writes: the trust tries, the local addresses and the settings.
struct Configurable {
    toa: NamedTrie,
    ipip: NamedTrie,
    local: LocalAddrs,
    settings: Array<MapData, u32>,
}

impl Configurable {
    fn set_toa_kind(&mut self, kind: u32) -> Result<(), KernelError> {
        self.settings
            .set(Setting::ToaKind as u32, kind, 0)
            .map_err(map_error(SETTINGS_MAP))
    }
}

/// A trust trie and its name.
struct NamedTrie {
    name: &'static str,
    trie: LpmTrie<MapData, LpmAddr, u8>,
}

impl NamedTrie {
    fn take(ebpf: &mut Ebpf, name: &'static str) -> Result<Self, KernelError> {
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
struct LocalAddrs(HashMap<MapData, LpmAddr, u8>);

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

fn take_map(ebpf: &mut Ebpf, name: &'static str) -> Result<aya::maps::Map, KernelError> {
    ebpf.take_map(name)
        .ok_or(KernelError::Missing { what: "map", name })
}

fn map_error(name: &'static str) -> impl Fn(aya::maps::MapError) -> KernelError {
    move |source| KernelError::Map { name, source }
}

/// EPERM is missing privilege. (EACCES from a program load is the verifier refusing the program.)
fn is_permission(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::EPERM)
}

fn hint_for_load(e: &aya::EbpfError) -> &'static str {
    // The errno sits at the end of the source chain (map creation → syscall), not in the top message.
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(&s.to_string());
        source = s.source();
    }
    if text.contains("Operation not permitted") || text.contains("Permission denied") {
        PRIVILEGE_HINT
    } else {
        "the kernel may be too old for the maps used (LRU hash: Linux 4.10+)"
    }
}

/// The embedded eBPF object, loaded with a connection map of `map_entries` (programs not yet in
/// the kernel): the start-up path and `check`'s verifier probe share it.
fn load_object(map_entries: u32) -> Result<Ebpf, KernelError> {
    EbpfLoader::new()
        .map_max_entries(CONN_IDENTITY_MAP, map_entries)
        .load(EBPF_OBJECT)
        .map_err(|source| KernelError::Load {
            hint: hint_for_load(&source),
            source,
        })
}

/// Program `name` of the object, as its type `P` (sock_ops, XDP).
fn program_of<'a, P>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut P, KernelError>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(KernelError::Missing {
            what: "program",
            name,
        })?
        .try_into()
        .map_err(|source| KernelError::Program {
            source,
            hint: "unexpected program type",
        })
}

/// A program the kernel refused to load, with the hint that tells the operator what to do.
fn program_error(source: aya::programs::ProgramError) -> KernelError {
    KernelError::Program {
        hint: hint_for_program(&source),
        source,
    }
}

fn hint_for_program(e: &aya::programs::ProgramError) -> &'static str {
    let io = match e {
        aya::programs::ProgramError::LoadError { io_error, .. } => Some(io_error),
        aya::programs::ProgramError::SyscallError(s) => Some(&s.io_error),
        _ => None,
    };
    match io {
        Some(io) if is_permission(io) => PRIVILEGE_HINT,
        Some(io) if io.raw_os_error() == Some(libc::EACCES) => {
            "the kernel's verifier rejected the program; this kernel lacks a feature it uses (see the README's \
             kernel table), or run with --ebpf off"
        }
        Some(io) if io.raw_os_error() == Some(libc::EINVAL) => {
            "the kernel rejected the program: sock_ops state callbacks need Linux 4.16+, socket cookies in \
             sock_ops 5.x; see the README's kernel table"
        }
        _ => "see the README's kernel table for the features each kernel has",
    }
}

/// The programs' aya-log buffer, read into the `log` facade (which tracing-subscriber forwards).
type KernelLog = aya_log::EbpfLogger<&'static dyn log::Log>;

/// The eBPF programs' log buffer (aya-log), if the object has one.
fn init_kernel_log(ebpf: &mut Ebpf) -> Option<KernelLog> {
    match aya_log::EbpfLogger::init(ebpf) {
        Ok(logger) => Some(logger),
        Err(e) => {
            tracing::debug!(error = %e, "eBPF programs log nothing (no log map)");
            None
        }
    }
}

/// Forwards the eBPF programs' log messages (aya-log) into our tracing output. The logger must live as
/// long as the programs; it is flushed whenever its fd becomes readable.
fn spawn_kernel_log_forwarding(logger: KernelLog) {
    // SAFETY: the logger owns its ring-buffer fd, keeps it open until dropped, and always returns the
    // same fd; the AsyncFd owns the logger, so the fd outlives the registration.
    let registered = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
    };
    let Ok(mut fd) = registered else {
        tracing::warn!("cannot watch the eBPF log buffer; kernel-side warnings will not be shown");
        return;
    };
    tokio::spawn(async move {
        loop {
            let Ok(mut guard) = fd.readable_mut().await else {
                return;
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_versions() {
        assert_eq!(kernel_version("5.10.0-46-amd64\n"), Some((5, 10)));
        assert_eq!(kernel_version("6.12.117+deb12-amd64"), Some((6, 12)));
        assert_eq!(kernel_version("4.19.0"), Some((4, 19)));
        assert_eq!(kernel_version("6.1"), Some((6, 1)));
        assert_eq!(kernel_version("garbage"), None);
        assert!(kernel_version("5.9.16").is_some_and(|v| v < MIN_KERNEL));
        assert!(kernel_version("5.10.0").is_some_and(|v| v >= MIN_KERNEL));
    }

    #[test]
    fn an_old_kernel_refusing_the_program_names_the_minimum_and_what_still_works() {
        let e = KernelError::KernelTooOld {
            release: "5.4.0-150-generic".to_string(),
            source: Box::new(KernelError::Missing {
                what: "program",
                name: "x",
            }),
        };
        let text = e.to_string();
        assert!(
            text.contains("(5.4.0-150-generic) is older than 5.10"),
            "{text}"
        );
        assert!(text.contains("skb_data"), "{text}");
        assert!(text.contains("PROXY protocol"), "{text}");
    }
}
