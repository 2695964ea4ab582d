//! Whether reading the kernel's maps, through fds the gateway already holds, needs a capability
//! once it has switched user. That is decided by the bpf() syscall's `kernel.unprivileged_bpf_disabled`
//! gate (1 or 2: set), which moved over kernel versions:
//!
//! - before 5.8, every bpf() command was refused without CAP_SYS_ADMIN while it is set;
//! - from 5.8 (CAP_BPF) to 5.18, every command, map lookups included, without CAP_BPF (or CAP_SYS_ADMIN);
//! - from 5.19 ("bpf: refine kernel.unprivileged_bpf_disabled behaviour") only map creation and
//!   program loads are gated; lookups, updates and iteration through a held fd need nothing;
//! - from 6.5 that check lives in map creation and program load themselves.
//!
//! Distribution kernels carry backports, so the version is only the explanation: the answer comes
//! from trying. `capable()` reads only the effective set, so a lookup made while CAP_BPF and
//! CAP_SYS_ADMIN are lowered from it tells what the process can do after the switch. The gate treats
//! every map command alike (lookup, update, next key), so a lookup stands for the trust-list updates
//! a reload makes too.

use caps::{CapSet, Capability, CapsHashSet};

use super::PrivilegeError;

/// What the gateway keeps after the switch, and why (for the start-up log).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LookupNeeds {
    pub keep: CapsHashSet,
    pub reason: String,
}

/// Decides what map lookups need, by trying `lookup` (true when a lookup works) with fewer
/// effective capabilities. Runs while still root; the effective set is restored before returning.
pub fn what_lookups_need(lookup: &dyn Fn() -> bool) -> Result<LookupNeeds, PrivilegeError> {
    let kernel = Kernel::read();
    if with_effective_lowered(&[Capability::CAP_BPF, Capability::CAP_SYS_ADMIN], lookup)? {
        return Ok(LookupNeeds {
            keep: CapsHashSet::new(),
            reason: format!(
                "this kernel ({}, kernel.unprivileged_bpf_disabled = {}) lets a process without \
                 capabilities read maps through fds it holds",
                kernel.release, kernel.unprivileged_bpf_disabled
            ),
        });
    }
    if !caps::runtime::thread_all_supported().contains(&Capability::CAP_BPF) {
        return Ok(LookupNeeds {
            keep: CapsHashSet::new(),
            reason: format!(
                "this kernel ({}) has no CAP_BPF: map lookups would need CAP_SYS_ADMIN, which is never kept",
                kernel.release
            ),
        });
    }
    if with_effective_lowered(&[Capability::CAP_SYS_ADMIN], lookup)? {
        return Ok(LookupNeeds {
            keep: CapsHashSet::from([Capability::CAP_BPF]),
            reason: format!(
                "kernel.unprivileged_bpf_disabled = {} and this kernel ({}) refuses every bpf() command, \
                 map lookups included, to a process without CAP_BPF (Linux 5.8 to 5.18); set the sysctl \
                 to 0 or run a 5.19+ kernel to keep nothing",
                kernel.unprivileged_bpf_disabled, kernel.release
            ),
        });
    }
    Ok(LookupNeeds {
        keep: CapsHashSet::new(),
        reason: format!(
            "map lookups fail on this kernel ({}) even with CAP_BPF; nothing is kept for them",
            kernel.release
        ),
    })
}

/// Runs `probe` with `lowered` removed from the effective set, then restores the set.
fn with_effective_lowered(
    lowered: &[Capability],
    probe: &dyn Fn() -> bool,
) -> Result<bool, PrivilegeError> {
    let effective = caps::read(None, CapSet::Effective).map_err(PrivilegeError::caps("read"))?;
    let mut reduced = effective.clone();
    for cap in lowered {
        reduced.remove(cap);
    }
    caps::set(None, CapSet::Effective, &reduced)
        .map_err(PrivilegeError::caps("lower the effective set"))?;
    let worked = probe();
    caps::set(None, CapSet::Effective, &effective)
        .map_err(PrivilegeError::caps("restore the effective set"))?;
    Ok(worked)
}

/// The facts the start-up log explains a decision with.
struct Kernel {
    release: String,
    unprivileged_bpf_disabled: String,
}

impl Kernel {
    fn read() -> Self {
        let read = |path: &str| {
            std::fs::read_to_string(path)
                .map(|s| s.trim().to_string())
                .unwrap_or_else(|_| "unknown".to_string())
        };
        Kernel {
            release: read("/proc/sys/kernel/osrelease"),
            unprivileged_bpf_disabled: read("/proc/sys/kernel/unprivileged_bpf_disabled"),
        }
    }
}
