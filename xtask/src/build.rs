//! `cargo xtask build-ebpf`, `build` and `test`: the eBPF object (nightly), the gateway with the
//! test acceptor, and the whole test suite.

use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::{cargo, root, run, setup, step, sys};

pub fn build_ebpf() -> Result<()> {
    setup::check_llvm_match()?;
    step("building the eBPF object (nightly, bpfel-unknown-none)");
    let mut cmd = Command::new("cargo");
    cmd.current_dir(root().join("ntlm-tag-ebpf"))
        .env("RUSTUP_TOOLCHAIN", "nightly")
        .env_remove("RUSTC")
        .env_remove("RUSTC_WRAPPER")
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_TARGET_DIR")
        .args([
            "build",
            "--locked",
            "--release",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
        ]);
    run(&mut cmd)
        .context("building the eBPF object failed; `cargo xtask setup` installs what it needs")
}

pub fn build_gateway(release: bool) -> Result<()> {
    step("building ntlm-tag (and the NTLM test acceptor)");
    let mut cmd = cargo();
    cmd.args([
        "build",
        "--locked",
        "-p",
        "ntlm-tag",
        "-p",
        "ntlm-tag-test-acceptor",
    ]);
    if release {
        cmd.arg("--release");
    }
    run(&mut cmd)
}

pub fn test(filter: Option<&str>) -> Result<()> {
    setup::install_missing()?;
    build_ebpf()?;
    build_gateway(false)?;
    if !sys::process::is_root() {
        bail!(
            "the integration tests create network namespaces and load eBPF programs: run as root"
        );
    }
    step("unit and integration tests");
    let mut cmd = cargo();
    cmd.args(["test", "--locked", "--workspace"])
        .env("NTLM_TAG_BIN", root().join("target/debug/ntlm-tag"));
    if let Some(f) = filter {
        cmd.arg(f);
    }
    run(&mut cmd)?;
    step("all tests passed");
    Ok(())
}
