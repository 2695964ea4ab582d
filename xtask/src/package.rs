//! `cargo xtask package`: the Debian package, built by cargo-deb from `[package.metadata.deb]` in
//! ntlm-tag/Cargo.toml. What the package needs beyond the repository's files is staged first in
//! `target/package-staging`: the unit with the package's binary path, the sysusers.d entry, the
//! manual pages and the shell completions (both printed by the built binary, so they match it).
//! `--test` then installs the package in a clean Debian chroot (see `package_test`); `--systemd`
//! boots it under a real systemd and upgrades it there (see `package_systemd_test`).

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context, Result, bail, ensure};

use crate::{root, run, step};

/// The cargo-deb release `cargo xtask package` installs when it is missing.
const CARGO_DEB_VERSION: &str = "3.8.0";

/// Where the installed binary lives in the package; the repository's unit names the path
/// `cargo xtask install` uses.
const PACKAGE_BINARY: &str = "/usr/sbin/ntlm-tag";
const INSTALL_BINARY: &str = "/usr/local/sbin/ntlm-tag";
/// The same for the hand-over helper the unit's first `ExecReload=` runs.
const PACKAGE_HAND_OVER: &str = "/usr/lib/ntlm-tag/hand-over";
pub const INSTALL_HAND_OVER: &str = "/usr/local/lib/ntlm-tag/hand-over";

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Install the package in a clean Debian chroot and check it: dpkg -i (apt resolves the
    /// dependencies), --version, check, the service user, dpkg -r and --purge (root).
    #[arg(long)]
    test: bool,
    /// With --test: also boot systemd in a Debian tree (systemd-nspawn) and check the installed
    /// service there: start, status, reload, sandbox, eBPF, an upgrade that keeps a logged-in
    /// connection, stop and the journal.
    #[arg(long, requires = "test")]
    systemd: bool,
    /// With --systemd: install this older package first and upgrade from it to the one just built
    /// (instead of from the one just built to itself with a higher version). The postinst must hand
    /// over when the old package has the unit's hand-over (/usr/lib/ntlm-tag/hand-over), and
    /// restart otherwise; either way the service runs the new binary and a fresh login passes.
    #[arg(long, requires = "systemd", value_name = "DEB")]
    upgrade_from: Option<PathBuf>,
    /// The Debian mirror of the test chroot (default: this machine's apt sources).
    #[arg(long, value_name = "URL")]
    mirror: Option<String>,
}

pub fn run_task(args: &Args) -> Result<()> {
    ensure_cargo_deb()?;
    crate::build_ebpf()?;
    step("building ntlm-tag (release)");
    run(crate::cargo().args(["build", "--locked", "--release", "-p", "ntlm-tag"]))?;
    let staging = root().join("target/package-staging");
    stage(&root().join("target/release/ntlm-tag"), &staging)?;
    let deb = cargo_deb()?;
    step(&format!("package: {}", deb.display()));
    if args.test {
        crate::package_test::install_and_remove(&deb, args.mirror.as_deref())?;
        if args.systemd {
            crate::package_systemd_test::boot_and_check(
                &deb,
                args.upgrade_from.as_deref(),
                args.mirror.as_deref(),
            )?;
        }
    }
    Ok(())
}

/// cargo-deb at [`CARGO_DEB_VERSION`], installed with cargo when missing or another version.
fn ensure_cargo_deb() -> Result<()> {
    let version = Command::new("cargo")
        .args(["deb", "--version"])
        .stderr(Stdio::null())
        .output();
    if version.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(CARGO_DEB_VERSION)) {
        step(&format!("cargo-deb {CARGO_DEB_VERSION}: present"));
        return Ok(());
    }
    step(&format!(
        "installing cargo-deb {CARGO_DEB_VERSION} (a few minutes, once)"
    ));
    run(Command::new("cargo").args([
        "install",
        "cargo-deb",
        "--locked",
        "--version",
        CARGO_DEB_VERSION,
    ]))
}

/// Writes what the package's assets and maintainer scripts name under `staging`.
fn stage(binary: &Path, staging: &Path) -> Result<()> {
    step(&format!(
        "staging the unit, man pages and completions in {}",
        staging.display()
    ));
    if staging.exists() {
        fs::remove_dir_all(staging)?;
    }
    fs::create_dir_all(staging)?;
    let unit = fs::read_to_string(root().join("packaging/ntlm-tag.service"))?;
    fs::write(staging.join("ntlm-tag.service"), package_unit(&unit)?)?;
    for file in ["ntlm-tag.sysusers", "postinst"] {
        fs::copy(root().join("packaging").join(file), staging.join(file))?;
    }
    for (page, file) in [("command", "ntlm-tag.8"), ("config", "ntlm-tag.toml.5")] {
        let roff = output_of(Command::new(binary).args(["man", page]))?;
        let path = staging.join(file);
        fs::write(&path, roff)?;
        check_man_page(&path)?;
        // Debian policy: manual pages are compressed with gzip -9n.
        run(Command::new("gzip").args(["-9n"]).arg(&path))?;
    }
    for (shell, file) in [
        ("bash", "ntlm-tag.bash"),
        ("zsh", "_ntlm-tag"),
        ("fish", "ntlm-tag.fish"),
    ] {
        let script = output_of(Command::new(binary).args(["completions", shell]))?;
        fs::write(staging.join(file), script)?;
    }
    Ok(())
}

/// The repository's unit with the package's paths; fails when the unit names the binary nowhere
/// (it would then start something else).
fn package_unit(unit: &str) -> Result<String> {
    ensure!(
        unit.contains(INSTALL_BINARY) || unit.contains(PACKAGE_BINARY),
        "packaging/ntlm-tag.service names neither {INSTALL_BINARY} nor {PACKAGE_BINARY}"
    );
    Ok(unit
        .replace(INSTALL_BINARY, PACKAGE_BINARY)
        .replace(INSTALL_HAND_OVER, PACKAGE_HAND_OVER))
}

/// `man --warnings` must render the page without a word on stderr (at 80 columns, as a terminal
/// reader sees it).
fn check_man_page(path: &Path) -> Result<()> {
    let out = Command::new("man")
        .args(["--warnings", "-l"])
        .arg(path)
        .env("MANWIDTH", "80")
        .env("MAN_KEEP_FORMATTING", "0")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .context("cannot run man (apt-get install man-db)")?;
    let warnings = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.success() && warnings.trim().is_empty(),
        "man --warnings -l {}: {}",
        path.display(),
        warnings.trim()
    );
    Ok(())
}

fn output_of(cmd: &mut Command) -> Result<Vec<u8>> {
    let shown = format!("{cmd:?}");
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {shown}"))?;
    if !out.status.success() {
        bail!("{shown} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(out.stdout)
}

/// Runs cargo-deb on the built binary and returns the .deb's path (the last line it prints).
fn cargo_deb() -> Result<PathBuf> {
    step("cargo deb");
    let out = crate::cargo()
        .args(["deb", "--locked", "--no-build", "-p", "ntlm-tag"])
        .stderr(Stdio::inherit())
        .output()
        .context("cannot run cargo deb")?;
    ensure!(out.status.success(), "cargo deb failed ({})", out.status);
    let text = String::from_utf8_lossy(&out.stdout);
    let deb = text
        .lines()
        .rev()
        .find(|l| l.trim_end().ends_with(".deb"))
        .with_context(|| format!("cargo deb printed no .deb path: {text}"))?;
    Ok(PathBuf::from(deb.trim()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_packaged_unit_starts_the_packaged_binary() {
        let unit = fs::read_to_string(root().join("packaging/ntlm-tag.service")).expect("unit");
        let packaged = package_unit(&unit).expect("the unit names the binary");
        assert!(packaged.contains(&format!("ExecStart={PACKAGE_BINARY} ")));
        assert!(packaged.contains(&format!("ExecReload={PACKAGE_HAND_OVER} {PACKAGE_BINARY} ")));
        assert!(!packaged.contains("/usr/local"), "{packaged}");
    }
}
