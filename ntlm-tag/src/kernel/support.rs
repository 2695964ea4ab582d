//! What `ntlm-tag check` can learn about this host without changing it: whether the embedded eBPF
//! programs pass this kernel's verifier (loaded, never attached, dropped at once), whether cgroup v2
//! is mounted, and whether a network interface exists in this network namespace.

use std::fmt;

pub use super::sys::interface_exists;

use aya::programs::{SockOps, Xdp};
use ntlm_tag_common::{SOCK_OPS_PROGRAM, XDP_PROGRAM};

use super::{
    KernelError, cgroup::find_cgroup2_mount, explain_old_kernel, load_object, program_error,
    program_of, sys,
};

/// The kernel's side of a configuration, as `check` reports it.
#[derive(Debug)]
pub struct KernelSupport {
    /// `uname -r`.
    pub release: String,
    /// The programs loaded (and were unloaded again), or why not.
    pub programs: Result<(), String>,
    /// Where cgroup v2 is mounted, or why it is not usable.
    pub cgroup2: Result<String, String>,
}

impl KernelSupport {
    /// True when `run` could attach the programs (as far as can be known without attaching).
    pub fn usable(&self) -> bool {
        self.programs.is_ok() && self.cgroup2.is_ok()
    }
}

impl fmt::Display for KernelSupport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "kernel {}", self.release)?;
        match &self.programs {
            Ok(()) => writeln!(
                f,
                "  eBPF programs: pass the verifier (loaded, not attached)"
            )?,
            Err(e) => writeln!(f, "  eBPF programs: cannot load: {e}")?,
        }
        match &self.cgroup2 {
            Ok(mount) => writeln!(f, "  cgroup v2: mounted at {mount}"),
            Err(e) => writeln!(f, "  cgroup v2: {e}"),
        }
    }
}

/// Loads the sock_ops program (and the XDP program when `with_xdp`) into the kernel and drops them:
/// the verifier runs exactly as at start-up, but nothing is attached and no cgroup is created.
pub fn probe(with_xdp: bool) -> KernelSupport {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|r| r.trim().to_string())
        .unwrap_or_else(|e| format!("unknown ({e})"));
    KernelSupport {
        release,
        programs: load_programs(with_xdp)
            .map_err(|e| format!("{:#}", anyhow::Error::from(explain_old_kernel(e)))),
        cgroup2: find_cgroup2_mount()
            .map(|p| p.display().to_string())
            .map_err(|e| e.to_string()),
    }
}

fn load_programs(with_xdp: bool) -> Result<(), KernelError> {
    // Kernels before 5.11 charge maps to RLIMIT_MEMLOCK; start-up raises it the same way.
    let _ = sys::raise_memlock_limit();
    // The smallest connection map: the probe only needs the maps to exist for the verifier.
    let mut ebpf = load_object(1)?;
    let sock_ops: &mut SockOps = program_of(&mut ebpf, SOCK_OPS_PROGRAM)?;
    sock_ops.load().map_err(program_error)?;
    if with_xdp {
        let xdp: &mut Xdp = program_of(&mut ebpf, XDP_PROGRAM)?;
        xdp.load().map_err(program_error)?;
    }
    Ok(())
}
