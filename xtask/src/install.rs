//! `cargo xtask install`: the release binary, the hand-over helper the unit's reload runs, an
//! example configuration (every key commented but `user = "ntlm-tag"`), a systemd unit, a
//! sysusers.d entry for that user and the manual pages, under `--destdir` (default `/`). Existing
//! configuration is kept. Installing into `/` also creates the user if it is missing: the gateway
//! refuses to start without it.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result};

use crate::{root, step};

pub fn run(destdir: &Path) -> Result<()> {
    let binary = root().join("target/release/ntlm-tag");
    let place = |relative: &str| -> PathBuf { destdir.join(relative.trim_start_matches('/')) };
    let copy = |from: &Path, to: &Path, mode: u32| -> Result<()> {
        if let Some(parent) = to.parent() {
            fs::create_dir_all(parent).with_context(|| format!("mkdir {}", parent.display()))?;
        }
        fs::copy(from, to)
            .with_context(|| format!("copy {} to {}", from.display(), to.display()))?;
        set_mode(to, mode)
    };

    let sbin = place("/usr/local/sbin/ntlm-tag");
    step(&format!("installing {}", sbin.display()));
    copy(&binary, &sbin, 0o755)?;

    let config = place("/etc/ntlm-tag/ntlm-tag.toml");
    if config.exists() {
        step(&format!("keeping the existing {}", config.display()));
    } else {
        step(&format!(
            "installing the example configuration {}",
            config.display()
        ));
        copy(&root().join("packaging/ntlm-tag.toml"), &config, 0o644)?;
    }

    let hand_over = place(crate::package::INSTALL_HAND_OVER);
    step(&format!("installing {}", hand_over.display()));
    copy(
        &root().join("packaging/ntlm-tag-hand-over"),
        &hand_over,
        0o755,
    )?;

    let unit = place("/etc/systemd/system/ntlm-tag.service");
    step(&format!("installing {}", unit.display()));
    copy(&root().join("packaging/ntlm-tag.service"), &unit, 0o644)?;

    let sysusers = place(SYSUSERS_FILE);
    step(&format!("installing {}", sysusers.display()));
    copy(
        &root().join("packaging/ntlm-tag.sysusers"),
        &sysusers,
        0o644,
    )?;

    for (page, file) in [
        ("command", "/usr/local/share/man/man8/ntlm-tag.8"),
        ("config", "/usr/local/share/man/man5/ntlm-tag.toml.5"),
    ] {
        let man = place(file);
        step(&format!("generating the manual page {}", man.display()));
        let out = Command::new(&binary)
            .args(["man", page])
            .output()
            .context("running ntlm-tag man")?;
        anyhow::ensure!(out.status.success(), "ntlm-tag man {page} failed");
        if let Some(parent) = man.parent() {
            fs::create_dir_all(parent)?;
        }
        fs::write(&man, out.stdout)?;
        set_mode(&man, 0o644)?;
    }

    if destdir == Path::new("/") {
        create_service_user()?;
        step(
            "next: edit /etc/ntlm-tag/ntlm-tag.toml, then `systemctl daemon-reload && systemctl enable --now ntlm-tag`",
        );
    }
    Ok(())
}

/// The user the packaged configuration switches to, and where systemd-sysusers finds its entry (the
/// unit goes to /etc/systemd/system, so the entry goes to /etc as well).
const SERVICE_USER: &str = "ntlm-tag";
const SYSUSERS_FILE: &str = "/etc/sysusers.d/ntlm-tag.conf";

/// Creates the service user if it is missing: with systemd-sysusers where there is one (from the
/// entry just installed), with useradd otherwise. A system user without a home or a login shell.
fn create_service_user() -> Result<()> {
    let exists = Command::new("getent")
        .args(["passwd", SERVICE_USER])
        .output()
        .is_ok_and(|o| o.status.success());
    if exists {
        step(&format!("user {SERVICE_USER} exists"));
        return Ok(());
    }
    let sysusers = Command::new("systemd-sysusers").arg("--version").output();
    if sysusers.is_ok_and(|o| o.status.success()) {
        step(&format!(
            "creating user {SERVICE_USER} (systemd-sysusers {SYSUSERS_FILE})"
        ));
        crate::run(Command::new("systemd-sysusers").arg(SYSUSERS_FILE))
    } else {
        step(&format!("creating user {SERVICE_USER} (useradd)"));
        crate::run(Command::new("useradd").args([
            "--system",
            "--user-group",
            "--no-create-home",
            "--home-dir",
            "/",
            "--shell",
            "/usr/sbin/nologin",
            "--comment",
            "ntlm-tag gateway",
            SERVICE_USER,
        ]))
    }
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", path.display()))
}
