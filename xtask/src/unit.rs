//! `cargo xtask lint`'s check of the packaged systemd unit: `systemd-analyze verify` (any warning
//! fails, not only errors) and `systemd-analyze security` under a ceiling, so that hardening cannot
//! silently regress. Neither needs a running systemd: verify runs against a scratch root holding the
//! host's unit files (for the targets the unit and its defaults name) and an executable at every
//! path the unit runs, since it refuses a unit whose commands are missing.

use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use crate::{root, run, step, sys::apt};

/// The packaged unit, relative to the workspace.
const UNIT: &str = "packaging/ntlm-tag.service";

/// `systemd-analyze security`'s exposure ceiling, in tenths (the unit measures 3.0 of 10 with
/// systemd 252, offline and in the running service; it runs as root until it switches user and
/// needs the host's network, BPF and its cgroup).
const EXPOSURE_CEILING: u32 = 30;

/// Where Debian (merged /usr or not) keeps the system's unit files.
const SYSTEM_UNIT_DIRS: &[&str] = &["/usr/lib/systemd/system", "/lib/systemd/system"];

pub fn check() -> Result<()> {
    apt::install_missing("systemd-analyze (Debian package systemd)", &["systemd"])
        .context("systemd-analyze (Debian package systemd) checks the packaged unit")?;
    let unit = root().join(UNIT);
    let text = std::fs::read_to_string(&unit).with_context(|| format!("cannot read {UNIT}"))?;

    step(&format!("{UNIT}: systemd-analyze verify"));
    let scratch = tempfile::tempdir().context("cannot make a scratch root")?;
    let installed = scratch_root(scratch.path(), &text)?;
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no", "--root"])
        .arg(scratch.path())
        .arg(&installed)
        .output()
        .context("cannot run systemd-analyze")?;
    // Unknown keys and bad values are only warnings (exit 0): fail on any output.
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() || !said.trim().is_empty() {
        bail!(
            "systemd-analyze verify {UNIT} ({}):\n{}",
            out.status,
            said.trim()
        );
    }

    step(&format!(
        "{UNIT}: systemd-analyze security (exposure at most {}.{})",
        EXPOSURE_CEILING / 10,
        EXPOSURE_CEILING % 10
    ));
    run(Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(format!("--threshold={EXPOSURE_CEILING}"))
        .arg(&unit)
        .stdout(std::process::Stdio::null()))
    .with_context(|| {
        format!(
            "{UNIT}: the exposure rose above {}.{}; `systemd-analyze security --offline=yes {UNIT}` \
             shows which setting",
            EXPOSURE_CEILING / 10,
            EXPOSURE_CEILING % 10
        )
    })
}

/// Lays out `dir` as a root for `systemd-analyze verify --root`: the host's unit files, a stub
/// executable at each path the unit runs, and the unit in /etc/systemd/system. Returns the unit's
/// path there.
fn scratch_root(dir: &Path, unit: &str) -> Result<PathBuf> {
    let system = SYSTEM_UNIT_DIRS
        .iter()
        .map(Path::new)
        .find(|d| d.join("sysinit.target").exists())
        .context("no systemd unit files on this host (is the Debian package systemd installed?)")?;
    let target = dir.join("usr/lib/systemd");
    std::fs::create_dir_all(&target)?;
    run(Command::new("cp").arg("-a").arg(system).arg(&target))?;
    for command in executables(unit) {
        let stub = dir.join(command.trim_start_matches('/'));
        if let Some(parent) = stub.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&stub, "#!/bin/sh\n")?;
        std::fs::set_permissions(&stub, std::fs::Permissions::from_mode(0o755))?;
    }
    let installed = dir.join("etc/systemd/system/ntlm-tag.service");
    std::fs::create_dir_all(installed.parent().context("unit path")?)?;
    std::fs::write(&installed, unit)?;
    Ok(installed)
}

/// The absolute program paths of the unit's `Exec*=` lines (without systemd's `-+!@:|` prefixes).
fn executables(unit: &str) -> Vec<String> {
    unit.lines()
        .filter(|l| l.starts_with("Exec"))
        .filter_map(|l| l.split_once('=').map(|(_, v)| v))
        .filter_map(|v| {
            v.trim_start_matches(['-', '+', '!', '@', ':', '|'])
                .split_whitespace()
                .next()
        })
        .filter(|p| p.starts_with('/'))
        .map(str::to_string)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_programs_the_unit_runs() {
        let unit = "[Service]\nExecStartPre=-/usr/sbin/a check\nExecStart=/usr/sbin/a run\n\
                    ExecReload=+/usr/sbin/a reload --admin x\nKillSignal=SIGTERM\n";
        assert_eq!(
            executables(unit),
            ["/usr/sbin/a", "/usr/sbin/a", "/usr/sbin/a"]
        );
    }
}
