//! `cargo xtask bench`: installs what the bench drives, builds release binaries of the gateway,
//! the NTLM acceptor and the bench itself (its load generator must be optimised), then replaces
//! this process by the bench (`bench/`, the `ntlm-tag-bench` crate) with the same arguments.

use std::{ffi::OsString, os::unix::process::CommandExt, process::Command};

use crate::{build_ebpf, root, step, sys};
use anyhow::{Context, Result, bail};

/// Debian packages the bench drives (the NTLM load generator is built in).
const PACKAGES: &[&str] = &["nginx", "haproxy", "wrk", "util-linux", "procps"];

pub fn run() -> Result<()> {
    if !sys::process::is_root() {
        bail!(
            "the bench pins processes to cores, raises RLIMIT_NOFILE and loads eBPF programs: run it as root"
        );
    }
    sys::apt::install_missing("bench packages", PACKAGES)?;
    build()?;
    let binary = root().join("target/release/ntlm-tag-bench");
    let err = Command::new(&binary)
        .args(bench_arguments())
        .current_dir(root())
        .exec();
    Err(err).with_context(|| format!("cannot execute {}", binary.display()))
}

/// The eBPF object, then release builds of the gateway, the acceptor and the bench.
fn build() -> Result<()> {
    build_ebpf()?;
    step("building ntlm-tag, the NTLM acceptor and the bench (release)");
    crate::run(Command::new("cargo").current_dir(root()).args([
        "build",
        "--release",
        "-p",
        "ntlm-tag",
        "-p",
        "ntlm-tag-test-acceptor",
        "-p",
        "ntlm-tag-bench",
    ]))
}

/// What follows `bench` on this command line, for the bench binary to parse again.
fn bench_arguments() -> Vec<OsString> {
    std::env::args_os()
        .skip(1)
        .skip_while(|a| a != "bench")
        .skip(1)
        .collect()
}
