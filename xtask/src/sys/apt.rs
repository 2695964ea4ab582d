//! Debian packages: which are installed, and `apt-get install` of the missing ones.

use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

use crate::{run, step, sys::process::is_root};

pub fn is_installed(name: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", name])
        .stderr(Stdio::null())
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

/// True when apt knows a package of this name (after `apt-get update`).
fn is_available(name: &str) -> bool {
    Command::new("apt-cache")
        .args(["show", "--no-all-versions", name])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Installs the packages of `packages` that are missing, saying so as `what` (`VM host
/// packages`); root only, otherwise an error saying what to install.
pub fn install_missing(what: &str, packages: &[&str]) -> Result<()> {
    install_missing_or(what, packages, |unknown| {
        format!("apt has no {unknown}: check the machine's Debian sources")
    })
}

/// [`install_missing`], with `when_unknown` saying what to do when apt does not know a package.
pub fn install_missing_or(
    what: &str,
    packages: &[&str],
    when_unknown: impl Fn(&str) -> String,
) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| !is_installed(p))
        .collect();
    if missing.is_empty() {
        step(&format!("{what}: all present"));
        return Ok(());
    }
    if !is_root() {
        bail!(
            "missing Debian packages {}; run `sudo cargo xtask setup` or `sudo apt-get install {}`",
            missing.join(" "),
            missing.join(" ")
        );
    }
    step(&format!("installing {what}: {}", missing.join(" ")));
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    if let Some(unknown) = missing.iter().find(|p| !is_available(p)) {
        bail!("{}", when_unknown(unknown));
    }
    run(Command::new("apt-get")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing))
    .with_context(|| {
        format!(
            "cannot install {}; try `apt-get install` them",
            missing.join(" ")
        )
    })
}
