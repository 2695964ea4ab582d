//! Loading the embedded eBPF object and attaching its programs: the object itself, the XDP
//! attachment per interface, the kernel log forwarding, and errors that tell the operator the fix.

use std::io;

use aya::{Ebpf, EbpfLoader};
use ntlm_tag_common::CONN_IDENTITY_MAP;

use super::KernelError;

/// The eBPF object built by `cargo xtask build-ebpf`, embedded at compile time.
pub(super) static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("NTLM_TAG_EBPF_OBJECT"));

pub(super) const PRIVILEGE_HINT: &str = "loading eBPF needs root, or CAP_BPF + CAP_NET_ADMIN + CAP_PERFMON and \
     write access to the cgroup tree; run with sudo, or with --ebpf off to use peer addresses";

/// The oldest kernel the programs load on (tested: Debian 11's 5.10; see docs/kernels.md).
pub const MIN_KERNEL: (u32, u32) = (5, 10);
pub(super) const MIN_KERNEL_TEXT: &str = "5.10";

/// Adds the kernel's age to an error the kernel's refusal of the object caused, when it is older
/// than [`MIN_KERNEL`] (a missing privilege, cgroup or interface is not about the kernel's age).
pub(super) fn explain_old_kernel(e: KernelError) -> KernelError {
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
pub(super) fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.trim().split(['.', '-']);
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// EPERM is missing privilege. (EACCES from a program load is the verifier refusing the program.)
pub(super) fn is_permission(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::EPERM)
}

pub(super) fn hint_for_load(e: &aya::EbpfError) -> &'static str {
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
pub(super) fn load_object(map_entries: u32) -> Result<Ebpf, KernelError> {
    EbpfLoader::new()
        .map_max_entries(CONN_IDENTITY_MAP, map_entries)
        .load(EBPF_OBJECT)
        .map_err(|source| KernelError::Load {
            hint: hint_for_load(&source),
            source,
        })
}

/// Program `name` of the object, as its type `P` (sock_ops, XDP).
pub(super) fn program_of<'a, P>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut P, KernelError>
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
pub(super) fn program_error(source: aya::programs::ProgramError) -> KernelError {
    KernelError::Program {
        hint: hint_for_program(&source),
        source,
    }
}

pub(super) fn hint_for_program(e: &aya::programs::ProgramError) -> &'static str {
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
pub(super) type KernelLog = aya_log::EbpfLogger<&'static dyn log::Log>;

/// The eBPF programs' log buffer (aya-log), if the object has one.
pub(super) fn init_kernel_log(ebpf: &mut Ebpf) -> Option<KernelLog> {
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
pub(super) fn spawn_kernel_log_forwarding(logger: KernelLog) {
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
