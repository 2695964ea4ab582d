//! The host side of a VM: qemu (Debian packages), virtme-ng (a venv), and whether qemu can use
//! KVM here or must emulate (TCG).

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context, Result, bail};

use super::{console::run_logged, kernels::Kernel};
use crate::{root, run, step, sys::apt};

/// Set to `kvm` or `tcg` to skip detecting which accelerator works.
const ACCEL_ENV: &str = "NTLM_TAG_VM_ACCEL";
const VIRTME_NG_VERSION: &str = "1.42";
const HOST_PACKAGES: &[&str] = &[
    "qemu-system-x86",
    "kmod",
    "udev",
    "busybox-static",
    "binutils",
    // virtme-ng goes into a venv (Debian 12 does not package it).
    "python3-venv",
];
const GUEST_CPUS: &str = "2";
const GUEST_MEMORY: &str = "2G";
/// Set to a qemu memory size (`4G`, `6144M`) to give the guest more than [`GUEST_MEMORY`]: the
/// 100,000-connection test needs about 4G (kernel socket memory on both ends of every connection).
const MEMORY_ENV: &str = "NTLM_TAG_VM_MEMORY";
/// A working KVM boots a stock kernel in seconds; a broken one stalls or dies.
const KVM_PROBE_TIMEOUT: Duration = Duration::from_secs(60);

pub struct VmTools {
    pub vng: PathBuf,
    accel: Option<Accel>,
}

#[derive(Clone, Copy, PartialEq, Debug)]
pub enum Accel {
    Kvm,
    Tcg,
}

impl VmTools {
    pub fn prepare() -> Result<Self> {
        apt::install_missing("VM host packages", HOST_PACKAGES)?;
        let vng = install_virtme_ng()?;
        Ok(VmTools { vng, accel: None })
    }

    /// The accelerator for `kernel`'s runs: probed with the first kernel, then kept.
    pub fn accel(&mut self, kernel: &Kernel, run_dir: &Path) -> Result<Accel> {
        if let Some(a) = self.accel {
            return Ok(a);
        }
        let a = detect_accel(&self.vng, kernel, run_dir)?;
        self.accel = Some(a);
        Ok(a)
    }
}

/// virtme-ng in a venv under `target/vm/venv` (Debian 12 does not package it).
fn install_virtme_ng() -> Result<PathBuf> {
    let venv = root().join("target/vm/venv");
    let vng = venv.join("bin/vng");
    let version = Command::new(&vng).arg("--version").output();
    if let Ok(out) = version
        && String::from_utf8_lossy(&out.stdout).contains(VIRTME_NG_VERSION)
    {
        step(&format!("virtme-ng {VIRTME_NG_VERSION}: present"));
        return Ok(vng);
    }
    step(&format!(
        "installing virtme-ng {VIRTME_NG_VERSION} into {}",
        venv.display()
    ));
    // `--clear`: a venv that stopped working (copied or moved: its scripts name the interpreter by
    // absolute path) is rebuilt rather than patched. pip runs as a module for the same reason.
    run(Command::new("python3")
        .args(["-m", "venv", "--clear"])
        .arg(&venv))
    .context("cannot create a Python venv; `apt-get install python3-venv` provides it")?;
    run(Command::new(venv.join("bin/python3")).args([
        "-m",
        "pip",
        "install",
        "--quiet",
        &format!("virtme-ng=={VIRTME_NG_VERSION}"),
    ]))
    .context("cannot install virtme-ng; check network access to the Python package index")?;
    Ok(vng)
}

pub fn vng_command(vng: &Path, kernel: &Kernel, accel: Accel) -> Command {
    let mut cmd = Command::new(vng);
    // vng runs its helpers (virtme-run) from PATH.
    let venv_bin = vng.parent().map(Path::to_path_buf).unwrap_or_default();
    let path = std::env::var_os("PATH").unwrap_or_default();
    let path = std::env::join_paths(std::iter::once(venv_bin).chain(std::env::split_paths(&path)))
        .unwrap_or(path);
    cmd.env("PATH", path)
        .current_dir(root())
        .arg("--run")
        .arg(&kernel.vmlinuz)
        .args(["--force-9p", "--cpus", GUEST_CPUS, "--memory"])
        .arg(guest_memory());
    if accel == Accel::Tcg {
        cmd.arg("--disable-kvm");
    }
    cmd
}

/// The guest's memory: [`MEMORY_ENV`] when set (qemu checks the size), [`GUEST_MEMORY`] otherwise.
fn guest_memory() -> String {
    std::env::var(MEMORY_ENV)
        .ok()
        .map(|m| m.trim().to_string())
        .filter(|m| !m.is_empty())
        .unwrap_or_else(|| GUEST_MEMORY.to_string())
}

/// KVM if a stock kernel boots with it here, TCG otherwise (a paravirtual /dev/kvm can exist and
/// still fail: "failed to set MSR", or a silent stall). The answer is kept per host boot.
fn detect_accel(vng: &Path, kernel: &Kernel, run_dir: &Path) -> Result<Accel> {
    if let Some(forced) = forced_accel()? {
        return Ok(forced);
    }
    if fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        step("accelerator: TCG (/dev/kvm cannot be opened)");
        return Ok(Accel::Tcg);
    }
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let virtualization = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    if !virtualization {
        step(
            "accelerator: TCG (the CPU offers no VT-x/AMD-V; a /dev/kvm without them cannot run a \
             stock kernel, so KVM is not tried; TCG is much slower)",
        );
        return Ok(Accel::Tcg);
    }
    let cache = root().join("target/vm/accel");
    let boot_id = fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    let boot_id = boot_id.trim();
    if let Some(accel) = cached_accel(&cache, boot_id) {
        step(&format!(
            "accelerator: {accel:?} (probed earlier this boot; delete {} to probe again)",
            cache.display()
        ));
        return Ok(accel);
    }
    let accel = probe_kvm(vng, kernel, &run_dir.join("kvm-probe.log"))?;
    fs::write(&cache, format!("{boot_id} {accel:?}\n"))?;
    Ok(accel)
}

fn forced_accel() -> Result<Option<Accel>> {
    match std::env::var(ACCEL_ENV).as_deref() {
        Err(_) => Ok(None),
        Ok("kvm") => Ok(Some(Accel::Kvm)),
        Ok("tcg") => Ok(Some(Accel::Tcg)),
        Ok(other) => bail!("{ACCEL_ENV}={other}: use kvm or tcg"),
    }
}

fn cached_accel(cache: &Path, boot_id: &str) -> Option<Accel> {
    let text = fs::read_to_string(cache).ok()?;
    match text.trim().split_once(' ')? {
        (id, "Kvm") if id == boot_id => Some(Accel::Kvm),
        (id, "Tcg") if id == boot_id => Some(Accel::Tcg),
        _ => None,
    }
}

/// Boots `kernel` once asking for KVM. qemu silently falls back to TCG when KVM cannot start, so
/// the guest reports its CPU model; qemu dying at once or stalling also means TCG.
fn probe_kvm(vng: &Path, kernel: &Kernel, log: &Path) -> Result<Accel> {
    step("probing KVM: booting the kernel once with it");
    let mut cmd = vng_command(vng, kernel, Accel::Kvm);
    cmd.arg("--exec")
        .arg("if grep -q 'QEMU TCG' /proc/cpuinfo; then echo probe: tcg; else echo probe: kvm; fi");
    let status = run_logged(cmd, log, "kvm-probe", KVM_PROBE_TIMEOUT)?;
    let text = fs::read_to_string(log).unwrap_or_default();
    let (accel, why) = if text.contains("probe: kvm") {
        (Accel::Kvm, "KVM booted the kernel".to_string())
    } else if text.contains("probe: tcg") {
        (Accel::Tcg, "qemu fell back to TCG".to_string())
    } else if status.is_none() {
        (Accel::Tcg, "the KVM guest stalled".to_string())
    } else if text.contains("qemu-system") {
        (
            Accel::Tcg,
            format!("qemu with KVM failed: {}", last_line(&text)),
        )
    } else {
        bail!(
            "vng could not start at all ({}): {}",
            status.map_or("timed out".to_string(), |s| s.to_string()),
            last_line(&text)
        );
    };
    step(&format!(
        "accelerator: {accel:?} ({why}; TCG is much slower)"
    ));
    Ok(accel)
}

fn last_line(text: &str) -> &str {
    text.lines().rfind(|l| !l.trim().is_empty()).unwrap_or("")
}
