//! The only place that touches aya and raw syscalls: load the embedded eBPF object, attach it to the
//! proxy's own cgroup, and look up connection records by socket cookie.

mod bpf_link;
pub mod cgroup;
mod counters;
mod key_sets;
mod load;
pub mod local_addrs;
mod maps;
pub mod privileges;
mod settings;
pub mod support;
mod sys;
mod xdp;

use std::{
    io,
    net::SocketAddr,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use aya::{
    Ebpf,
    maps::{Array, HashMap, MapData, PerCpuArray},
    programs::{CgroupAttachMode, SockOps},
};
use ntlm_tag_common::{
    CONN_IDENTITY_MAP, COUNTERS_MAP, ConnIdentity, LOCAL_ADDRS_MAP, SETTINGS_MAP, SOCK_OPS_PROGRAM,
    Setting, TRUSTED_IPIP_MAP, TRUSTED_TOA_MAP, XDP_COUNTERS_MAP,
};
use thiserror::Error;

use key_sets::{KeySet, KeySetError, SetKey};

pub use cgroup::{CgroupError, OwnCgroup};
pub use counters::{KernelCounters, KernelEvent, Slot};
pub use load::MIN_KERNEL;
pub use maps::KernelRecord;

pub use key_sets::{V4_MAPPED, as_kernel_prefix};
use load::{
    KernelLog, MIN_KERNEL_TEXT, explain_old_kernel, hint_for_program, init_kernel_log, load_object,
    program_error, program_of, spawn_kernel_log_forwarding,
};
use maps::{Configurable, LocalAddrs, NamedTrie, map_error, take_map};
pub use settings::{EbpfConfig, EbpfMode};
pub use sys::{is_closed, monotonic_ns, running_as_root, socket_cookie};
use xdp::XdpLinks;
pub use xdp::{HandedXdpLink, InheritedXdp, InheritedXdpLink, XdpAttachment, XdpHandover};

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
        "cannot attach XDP to interface {interface}: {source}{}",
        xdp_hint(source, interface)
    )]
    XdpLink {
        interface: String,
        #[source]
        source: io::Error,
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

/// What to do about an XDP link the kernel refused.
fn xdp_hint(e: &io::Error, interface: &str) -> String {
    match e.raw_os_error() {
        Some(libc::EBUSY | libc::EEXIST) => format!(
            " (another XDP program is attached there, e.g. a running gateway's: take it over with \
             `ntlm-tag upgrade`, or remove it with `ip link set dev {interface} xdp off`)"
        ),
        Some(libc::EPERM) => format!("; {}", load::PRIVILEGE_HINT),
        _ => String::new(),
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

/// The loaded and attached kernel programs and their maps. Dropping it detaches the programs and
/// removes the proxy's cgroup.
pub struct KernelTracker {
    identities: HashMap<MapData, u64, ConnIdentity>,
    counters: PerCpuArray<MapData, u64>,
    xdp_counters: PerCpuArray<MapData, u64>,
    xdp: XdpLinks,
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
    /// `inherited` are the XDP links the running gateway handed over (an upgrade): their program is
    /// swapped for this process's by [`take_over_xdp`](Self::take_over_xdp), not here.
    pub fn start(
        options: &KernelOptions,
        join: Option<&std::path::Path>,
        inherited: InheritedXdp,
    ) -> Result<Self, KernelError> {
        Self::load_and_attach(options, join, inherited).map_err(explain_old_kernel)
    }

    fn load_and_attach(
        options: &KernelOptions,
        join: Option<&std::path::Path>,
        inherited: InheritedXdp,
    ) -> Result<Self, KernelError> {
        let map_entries = options.map_entries;
        if let Err(e) = sys::raise_memlock_limit() {
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
        let xdp = XdpLinks::attach(&mut ebpf, &options.xdp_interfaces, inherited)?;
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
    pub fn xdp_attachments(&self) -> Vec<XdpAttachment> {
        self.xdp.attachments()
    }

    /// Upgrade, successor side, once ready to serve: swaps this process's XDP program into the
    /// links the running gateway handed over. Returns how many.
    pub fn take_over_xdp(&self) -> Result<usize, KernelError> {
        self.xdp.take_over()
    }

    /// Upgrade, successor side, when the hand-over fails after [`take_over_xdp`](Self::take_over_xdp):
    /// swaps the running gateway's program back into its links. Returns how many.
    pub fn give_back_xdp(&self) -> usize {
        self.xdp.give_back()
    }

    /// Upgrade, running side: second descriptors of the XDP links, for a successor.
    pub fn xdp_handover(&self) -> io::Result<XdpHandover> {
        self.xdp.handover()
    }

    /// Upgrade, running side, after a successor failed: points the XDP links back at this
    /// process's program if the successor had swapped its own in. Returns how many it put back.
    pub fn restore_xdp(&self) -> usize {
        self.xdp.restore()
    }

    pub fn counters(&self) -> KernelCounters {
        let sum = |map: &PerCpuArray<MapData, u64>, index: u32| -> u64 {
            map.get(&index, 0)
                .map(|per_cpu| per_cpu.iter().sum())
                .unwrap_or(0)
        };
        KernelCounters::read(|slot| match slot {
            Slot::SockOps(c) => sum(&self.counters, c as u32),
            Slot::Xdp(c) => sum(&self.xdp_counters, c as u32),
            Slot::Userspace => self.lookup_misses.load(Ordering::Relaxed),
        })
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

#[cfg(test)]
mod tests {
    use super::{load::kernel_version, *};

    #[test]
    fn a_refused_xdp_link_says_what_to_do() {
        let busy = KernelError::XdpLink {
            interface: "eth1".to_string(),
            source: io::Error::from_raw_os_error(libc::EBUSY),
        };
        let text = busy.to_string();
        assert!(text.contains("ntlm-tag upgrade"), "{text}");
        assert!(text.contains("ip link set dev eth1 xdp off"), "{text}");
        let other = KernelError::XdpLink {
            interface: "eth1".to_string(),
            source: io::Error::from_raw_os_error(libc::EOPNOTSUPP),
        };
        assert!(!other.to_string().contains("upgrade"), "{other}");
    }

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
