//! `cargo xtask setup`: installs what building and testing need, only what is missing.

use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

use crate::{root, run, step};

/// Debian packages: LLVM 22 for bpf-linker (rustc's own LLVM is 22), and the tools the tests drive.
const PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libclang-22-dev",
    "libpolly-22-dev",
    "zlib1g-dev",
    "libzstd-dev",
    "iproute2",
    "nftables",
    "haproxy",
    "curl",
    "procps",
    "util-linux",
    "python3-venv",
];

/// pyspnego, the NTLM client of the Extended Protection tests (it computes channel bindings from
/// the server's certificate), in a virtualenv of the workspace's own.
const PYSPNEGO_VERSION: &str = "0.12.4";

const BPF_LINKER_VERSION: &str = "0.13.0";

pub fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn debian_packages() -> Result<()> {
    let missing: Vec<&str> = PACKAGES
        .iter()
        .copied()
        .filter(|p| !package_installed(p))
        .collect();
    if missing.is_empty() {
        step("Debian packages: all present");
        return Ok(());
    }
    if !is_root() {
        bail!(
            "missing Debian packages {}; run `sudo cargo xtask setup` or `sudo apt-get install {}`",
            missing.join(" "),
            missing.join(" ")
        );
    }
    step(&format!(
        "installing Debian packages: {}",
        missing.join(" ")
    ));
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    run(Command::new("apt-get")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing))
}

fn package_installed(name: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", name])
        .stderr(Stdio::null())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
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

fn bpf_linker() -> Result<()> {
    let version = Command::new("bpf-linker").arg("--version").output();
    if let Ok(out) = version
        && String::from_utf8_lossy(&out.stdout).contains(BPF_LINKER_VERSION)
    {
        step(&format!("bpf-linker {BPF_LINKER_VERSION}: present"));
        return Ok(());
    }
    step(&format!(
        "installing bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (about a minute)"
    ));
    run(Command::new("cargo")
        .env("LLVM_PREFIX", "/usr/lib/llvm-22")
        .env("RUSTUP_TOOLCHAIN", "stable")
        .args([
            "install",
            "bpf-linker",
            "--locked",
            "--version",
            BPF_LINKER_VERSION,
            "--no-default-features",
            "--features",
            "llvm-22",
        ]))
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
    debian_packages()?;
    rust_src()?;
    bpf_linker()?;
    pyspnego()?;
    step("setup complete");
    Ok(())
}
