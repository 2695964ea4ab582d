//! `cargo xtask install`: the release binary, an example configuration (every key commented), a
//! systemd unit and the manual page, under `--destdir` (default `/`). Existing configuration is kept.

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

    let unit = place("/etc/systemd/system/ntlm-tag.service");
    step(&format!("installing {}", unit.display()));
    copy(&root().join("packaging/ntlm-tag.service"), &unit, 0o644)?;

    let man = place("/usr/local/share/man/man8/ntlm-tag.8");
    step(&format!("generating the manual page {}", man.display()));
    let page = Command::new(&binary)
        .arg("man")
        .output()
        .context("running ntlm-tag man")?;
    anyhow::ensure!(page.status.success(), "ntlm-tag man failed");
    if let Some(parent) = man.parent() {
        fs::create_dir_all(parent)?;
    }
    fs::write(&man, page.stdout)?;
    set_mode(&man, 0o644)?;

    if destdir == Path::new("/") {
        step(
            "next: edit /etc/ntlm-tag/ntlm-tag.toml, then `systemctl daemon-reload && systemctl enable --now ntlm-tag`",
        );
    }
    Ok(())
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", path.display()))
}
