//! What every `cargo xtask` task shares, and the bench binary (`ntlm-tag-bench`) with them: the
//! workspace's paths, running commands, the machine side in [`sys`] (Debian packages, child
//! processes, cleaning up on Ctrl-C), and the bench's command line in [`bench_args`], defined once
//! for `cargo xtask bench` and the binary it runs.

pub mod bench_args;
pub mod sys;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

/// The workspace root (the parent of this crate).
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

pub fn step(text: &str) {
    eprintln!("==> {text}");
}

/// Runs `cmd`, failing with the command line when it does not succeed.
pub fn run(cmd: &mut Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {shown}"))?;
    if !status.success() {
        bail!("{shown} failed ({status})");
    }
    Ok(())
}

/// A `cargo` for the stable toolchain, free of settings inherited from the cargo that runs xtask.
pub fn cargo() -> Command {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(root());
    cmd
}
