//! `cargo xtask setup`: installs what building and testing need, only what is missing.
//!
//! The eBPF object is built by the `nightly` toolchain and linked by bpf-linker, which must be built
//! against the same LLVM major as that nightly's rustc (it reads the bitcode rustc emits). The LLVM
//! version is read from `rustc +nightly -vV` rather than written down, so that the day nightly moves
//! to a new LLVM, setup installs the matching LLVM and rebuilds bpf-linker, or says what is missing.

use std::{
    path::PathBuf,
    process::{Command, Stdio},
};

use anyhow::{Context, Result, bail};

use crate::{root, run, step, sys::apt};

/// Debian packages the tests drive (the LLVM ones follow the nightly; see [`llvm_packages`]).
const TOOL_PACKAGES: &[&str] = &[
    "zlib1g-dev",
    "libzstd-dev",
    "iproute2",
    "nftables",
    "haproxy",
    "curl",
    "procps",
    "util-linux",
    "python3-venv",
    // systemd-analyze, with which `cargo xtask lint` checks the packaged unit.
    "systemd",
    // The manual pages' tests render them with groff -ww; `cargo xtask package` with man.
    "groff-base",
    "man-db",
];

/// pyspnego, the NTLM client of the Extended Protection tests (it computes channel bindings from
/// the server's certificate), in a virtualenv of the workspace's own.
const PYSPNEGO_VERSION: &str = "0.12.4";

const BPF_LINKER_VERSION: &str = "0.13.0";

/// The LLVM majors bpf-linker [`BPF_LINKER_VERSION`] can be built against (its `llvm-N` features).
const BPF_LINKER_LLVM: std::ops::RangeInclusive<u32> = 21..=23;

/// What bpf-linker needs to build against LLVM `major` (Debian / apt.llvm.org names).
fn llvm_packages(major: u32) -> Vec<String> {
    ["llvm", "libclang", "libpolly"]
        .iter()
        .map(|p| format!("{p}-{major}-dev"))
        .collect()
}

/// `LLVM version: 22.1.4` in `rustc -vV` → 22.
fn parse_llvm_major(verbose_version: &str) -> Option<u32> {
    verbose_version
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version:"))
        .and_then(|v| v.trim().split('.').next()?.parse().ok())
}

/// The LLVM major of the nightly rustc that builds the eBPF object.
pub fn nightly_llvm() -> Result<u32> {
    let out = Command::new("rustc")
        .args(["+nightly", "-vV"])
        .output()
        .context("cannot run `rustc +nightly -vV` (is rustup installed?)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "`rustc +nightly -vV` failed ({}): install the nightly toolchain with `cargo xtask setup`",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    parse_llvm_major(&text)
        .with_context(|| format!("no `LLVM version:` line in `rustc +nightly -vV`:\n{text}"))
}

/// `libLLVM.so.22.1 => ...` or `libLLVM-22.so => ...` in `ldd` output → 22.
fn parse_linked_llvm(ldd: &str) -> Option<u32> {
    ldd.lines().find_map(|l| {
        let name = l.split_whitespace().next()?;
        let rest = name
            .strip_prefix("libLLVM.so.")
            .or_else(|| name.strip_prefix("libLLVM-"))?;
        rest.split(['.', '-']).next()?.parse().ok()
    })
}

/// The installed bpf-linker, from PATH.
fn bpf_linker_path() -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join("bpf-linker"))
        .find(|p| p.is_file())
}

/// The LLVM major the installed bpf-linker links (its shared libLLVM); `None` if there is no
/// bpf-linker or it does not link LLVM dynamically.
fn bpf_linker_llvm() -> Option<u32> {
    let out = Command::new("ldd").arg(bpf_linker_path()?).output().ok()?;
    parse_linked_llvm(&String::from_utf8_lossy(&out.stdout))
}

/// Fails, saying what to install, when bpf-linker and the nightly rustc use different LLVM majors
/// (the eBPF object would then fail to link with an obscure bitcode error).
pub fn check_llvm_match() -> Result<()> {
    let nightly = nightly_llvm()?;
    match bpf_linker_llvm() {
        Some(linked) if linked != nightly => bail!(
            "bpf-linker links LLVM {linked}, but the nightly rustc uses LLVM {nightly}, so it cannot \
             link the eBPF object. Run `sudo cargo xtask setup`: it installs {} and rebuilds \
             bpf-linker against LLVM {nightly}",
            llvm_packages(nightly).join(" ")
        ),
        _ => Ok(()),
    }
}

fn debian_packages(llvm: u32) -> Result<()> {
    let wanted: Vec<String> = llvm_packages(llvm)
        .into_iter()
        .chain(TOOL_PACKAGES.iter().map(|p| p.to_string()))
        .collect();
    let wanted: Vec<&str> = wanted.iter().map(String::as_str).collect();
    apt::install_missing_or(
        &format!("Debian packages (LLVM {llvm})"),
        &wanted,
        |unknown| {
            format!(
                "the nightly rustc uses LLVM {llvm}, but apt has no {unknown}: add the LLVM {llvm} \
                 repository of https://apt.llvm.org (`wget https://apt.llvm.org/llvm.sh; sudo bash \
                 llvm.sh {llvm}`), then run `sudo cargo xtask setup` again"
            )
        },
    )
}

fn rust_src() -> Result<()> {
    let toolchains = Command::new("rustup")
        .args(["toolchain", "list"])
        .output()
        .context("rustup is needed to build the eBPF object")?;
    if !String::from_utf8_lossy(&toolchains.stdout)
        .lines()
        .any(|l| l.starts_with("nightly"))
    {
        step("installing the nightly toolchain (builds the eBPF object)");
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))?;
    }
    let installed = Command::new("rustup")
        .args(["component", "list", "--toolchain", "nightly", "--installed"])
        .output()?;
    if String::from_utf8_lossy(&installed.stdout)
        .lines()
        .any(|l| l.starts_with("rust-src"))
    {
        step("nightly rust-src: present");
        return Ok(());
    }
    step("installing nightly rust-src");
    run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
}

/// Fails when no bpf-linker build of [`BPF_LINKER_VERSION`] can match the nightly's LLVM, before
/// any package for that LLVM is installed.
fn bpf_linker_supports(llvm: u32) -> Result<()> {
    if !BPF_LINKER_LLVM.contains(&llvm) {
        bail!(
            "the nightly rustc uses LLVM {llvm}; bpf-linker {BPF_LINKER_VERSION} builds against LLVM \
             {}..={} only. Raise BPF_LINKER_VERSION in xtask/src/setup.rs to a release with an \
             `llvm-{llvm}` feature (its Cargo.toml lists them)",
            BPF_LINKER_LLVM.start(),
            BPF_LINKER_LLVM.end()
        );
    }
    Ok(())
}

fn bpf_linker(llvm: u32) -> Result<()> {
    let version = Command::new("bpf-linker").arg("--version").output();
    let installed = version
        .as_ref()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).contains(BPF_LINKER_VERSION));
    match bpf_linker_llvm() {
        Some(linked) if installed && linked == llvm => {
            step(&format!(
                "bpf-linker {BPF_LINKER_VERSION} (LLVM {llvm}): present"
            ));
            return Ok(());
        }
        // A statically linked build cannot be asked; its version is all there is to go by.
        None if installed => {
            step(&format!(
                "bpf-linker {BPF_LINKER_VERSION}: present (LLVM not visible; assumed {llvm})"
            ));
            return Ok(());
        }
        Some(linked) if installed => step(&format!(
            "bpf-linker links LLVM {linked}, the nightly uses LLVM {llvm}: rebuilding it"
        )),
        _ => {}
    }
    step(&format!(
        "installing bpf-linker {BPF_LINKER_VERSION} against LLVM {llvm} (about a minute)"
    ));
    run(Command::new("cargo")
        .env("LLVM_PREFIX", format!("/usr/lib/llvm-{llvm}"))
        .env("RUSTUP_TOOLCHAIN", "stable")
        .args([
            "install",
            "bpf-linker",
            "--locked",
            "--force",
            "--version",
            BPF_LINKER_VERSION,
            "--no-default-features",
            "--features",
        ])
        .arg(format!("llvm-{llvm}")))
}

/// `target/pyspnego-venv` with pyspnego at [`PYSPNEGO_VERSION`]; nothing to do when it is there.
fn pyspnego() -> Result<()> {
    let venv = root().join("target/pyspnego-venv");
    let python = venv.join("bin/python");
    let installed = Command::new(&python)
        .args([
            "-c",
            "import importlib.metadata as m; print(m.version('pyspnego'))",
        ])
        .stderr(Stdio::null())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == PYSPNEGO_VERSION)
        .unwrap_or(false);
    if installed {
        step(&format!("pyspnego {PYSPNEGO_VERSION}: present"));
        return Ok(());
    }
    step(&format!(
        "installing pyspnego {PYSPNEGO_VERSION} into {}",
        venv.display()
    ));
    run(Command::new("python3").arg("-m").arg("venv").arg(&venv))?;
    run(Command::new(&python).args([
        "-m",
        "pip",
        "install",
        "-q",
        "--disable-pip-version-check",
        &format!("pyspnego=={PYSPNEGO_VERSION}"),
    ]))
}

pub fn install_missing() -> Result<()> {
    // The nightly first: its LLVM decides which LLVM packages and which bpf-linker build to install.
    rust_src()?;
    let llvm = nightly_llvm()?;
    bpf_linker_supports(llvm)?;
    debian_packages(llvm)?;
    bpf_linker(llvm)?;
    pyspnego()?;
    step("setup complete");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_llvm_major_of_rustc() {
        let vv = "rustc 1.97.0-nightly (59807616e 2026-11-20)\nbinary: rustc\nhost: \
                  x86_64-unknown-linux-gnu\nrelease: 1.97.0-nightly\nLLVM version: 22.1.4\n";
        assert_eq!(parse_llvm_major(vv), Some(22));
        assert_eq!(parse_llvm_major("rustc 1.0\n"), None);
    }

    #[test]
    fn reads_the_llvm_bpf_linker_links() {
        let ldd = "\tlinux-vdso.so.1 (0x00007ffd)\n\tlibLLVM.so.22.1 => \
                   /usr/lib/llvm-22/lib/libLLVM.so.22.1 (0x00007fc7bc200000)\n";
        assert_eq!(parse_linked_llvm(ldd), Some(22));
        assert_eq!(
            parse_linked_llvm("\tlibLLVM-23.so => /usr/lib/libLLVM-23.so\n"),
            Some(23)
        );
        assert_eq!(parse_linked_llvm("\tlibc.so.6 => /lib/libc.so.6\n"), None);
        assert_eq!(
            llvm_packages(23),
            ["llvm-23-dev", "libclang-23-dev", "libpolly-23-dev"]
        );
    }
}
