//! `cargo xtask package --test --systemd`: the package under a real systemd. The package test's
//! Debian tree gets systemd as init (and bpftool), kept as a second tarball in
//! `target/package-chroot`; every run unpacks a fresh copy and boots it with `systemd-nspawn
//! --boot`, which needs no systemd on the host. `package_systemd_test.sh` then installs the
//! package, configures a listener and a backend (the test NTLM acceptor) and checks, against
//! systemd itself: `systemctl start` returning once it serves (a real `curl --ntlm` login), the
//! status line, reloads (good and refused), the sandbox as the kernel reports it for the main
//! process, the sock_ops program in the unit's cgroup, an `apt-get install` of a newer version
//! that hands over without logging out an open NTLM connection, a hand-over whose new process
//! hangs (bounded: the reload fails, nothing stays behind, the service serves on), a stop right
//! after a hand-over (the new main process drains: systemd takes it for its own child, so it does
//! not SIGKILL it), the stop and the journal. With `--upgrade-from OLD.deb` the first package is that one, and the upgrade must do
//! what the postinst promises for it: hand over, or restart when the old package predates
//! hand-overs through the unit.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context, Result, ensure};

use crate::{apt_sources, root, run, step};

/// The checks, run as `bash -c SCRIPT _ ROOT V1 V2 ACCEPTOR PYTHON CLIENT V1_IS_BUILT`.
const SCRIPT: &str = include_str!("package_systemd_test.sh");

/// What the tree needs beyond debootstrap's minbase: systemd as init, and bpftool to see which
/// programs are attached where.
const SYSTEMD_PACKAGES: &[&str] = &["systemd", "systemd-sysv", "bpftool"];

/// Boots the tree and checks `deb`: installed first and upgraded to itself with a higher version,
/// or, with `upgrade_from`, installed over that older package.
pub fn boot_and_check(deb: &Path, upgrade_from: Option<&Path>, mirror: Option<&str>) -> Result<()> {
    ensure!(
        crate::sys::process::is_root(),
        "the systemd test boots a container: run as root"
    );
    crate::sys::apt::install_missing("systemd-nspawn", &["systemd-container"])
        .context("systemd-nspawn (Debian package systemd-container) boots the test's systemd")?;
    let started = Instant::now();
    let acceptor = root().join("target/debug/ntlm-acceptor");
    step("building the test NTLM acceptor (the backend in the container)");
    run(crate::cargo().args(["build", "-p", "ntlm-tag-test-acceptor"]))?;
    let python = root().join("target/pyspnego-venv/bin/python");
    ensure!(
        python.is_file(),
        "{} is missing: `sudo cargo xtask setup` makes it (pyspnego, the keep-alive NTLM client)",
        python.display()
    );
    let client = root().join("tests/clients/ntlm_keepalive_client.py");

    let base = systemd_tarball(mirror)?;
    let dir = root().join("target/package-chroot");
    let tree = tempfile::Builder::new()
        .prefix("systemd-")
        .tempdir_in(&dir)
        .context("cannot create the container's directory")?;
    let root_dir = tree.path().join("root");
    std::fs::create_dir(&root_dir)?;
    step(&format!("unpacking a fresh tree in {}", root_dir.display()));
    run(Command::new("tar")
        .arg("-xpf")
        .arg(&base)
        .arg("-C")
        .arg(&root_dir))?;
    // The tarball's `.` is debootstrap's private temporary directory (0700): the service user
    // could not reach a single file.
    std::fs::set_permissions(
        &root_dir,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )?;
    let deb = deb
        .canonicalize()
        .with_context(|| format!("no package at {}", deb.display()))?;
    let newer = with_newer_version(&deb, tree.path())?;
    let first = match upgrade_from {
        Some(old) => old
            .canonicalize()
            .with_context(|| format!("no package at {}", old.display()))?,
        None => deb.clone(),
    };
    let result = run(Command::new("bash")
        .args(["-c", SCRIPT, "package-systemd-test"])
        .arg(&root_dir)
        .arg(&first)
        .arg(&newer)
        .arg(&acceptor)
        .arg(&python)
        .arg(&client)
        .arg(if upgrade_from.is_none() { "1" } else { "0" }));
    drop(tree);
    step(&format!(
        "systemd test took {:.0} s",
        started.elapsed().as_secs_f64()
    ));
    result
}

/// The package test's minbase tree with [`SYSTEMD_PACKAGES`] installed, made once.
fn systemd_tarball(mirror: Option<&str>) -> Result<PathBuf> {
    let suite = apt_sources::debian_mirror(mirror)?.suite;
    let dir = root().join("target/package-chroot");
    let tarball = dir.join(format!("{suite}-systemd.tar"));
    if tarball.is_file() {
        step(&format!(
            "systemd tree: {} (delete it to make a new one)",
            tarball.display()
        ));
        return Ok(tarball);
    }
    let base = crate::package_test::base_tarball(mirror)?;
    let building = tempfile::Builder::new()
        .prefix("systemd-base-")
        .tempdir_in(&dir)?;
    run(Command::new("tar")
        .arg("-xpf")
        .arg(&base)
        .arg("-C")
        .arg(building.path()))?;
    std::fs::copy("/etc/resolv.conf", building.path().join("etc/resolv.conf"))?;
    step(&format!(
        "installing {} in the tree (once)",
        SYSTEMD_PACKAGES.join(" ")
    ));
    let inside = |args: &[&str]| {
        let mut cmd = Command::new("chroot");
        cmd.arg(building.path())
            .args(["/usr/bin/env", "-i", "PATH=/usr/sbin:/usr/bin:/sbin:/bin"])
            .arg("DEBIAN_FRONTEND=noninteractive")
            .args(args);
        cmd
    };
    run(&mut inside(&["apt-get", "update", "-qq"]))?;
    let mut install = vec!["apt-get", "install", "-y", "-qq", "--no-install-recommends"];
    install.extend(SYSTEMD_PACKAGES);
    run(&mut inside(&install))?;
    crate::package_test::pack_tree(building.path(), &tarball)?;
    Ok(tarball)
}

/// The same package with `+upgradetest` appended to its version, in `dir`: what an upgrade
/// installs over it.
fn with_newer_version(deb: &Path, dir: &Path) -> Result<PathBuf> {
    let unpacked = dir.join("newer");
    run(Command::new("dpkg-deb").arg("-R").arg(deb).arg(&unpacked))?;
    let control = unpacked.join("DEBIAN/control");
    let text = std::fs::read_to_string(&control)?;
    let bumped: String = text
        .lines()
        .map(|line| match line.strip_prefix("Version: ") {
            Some(v) => format!("Version: {v}+upgradetest\n"),
            None => format!("{line}\n"),
        })
        .collect();
    ensure!(bumped != text, "no Version: in {}", control.display());
    std::fs::write(&control, bumped)?;
    let newer = dir.join("ntlm-tag-newer.deb");
    run(Command::new("dpkg-deb")
        .args(["--root-owner-group", "-b"])
        .arg(&unpacked)
        .arg(&newer))?;
    Ok(newer)
}
