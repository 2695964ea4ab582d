//! `cargo xtask package --test`: the package installed for real in a clean Debian chroot
//! (debootstrap --variant=minbase, no systemd, from the machine's Debian mirror), then:
//! `apt-get install ./ntlm-tag.deb` (apt resolves the dependencies), `ntlm-tag --version`,
//! `ntlm-tag check` on the packaged configuration (exit 64 naming `listen`: it has no listener
//! until the operator writes one) and on a completed one (exit 0, programs loaded), the service
//! user, the enabled unit, man pages and completions in place; `dpkg -r` leaves only the
//! configuration, `dpkg --purge` leaves nothing with the package's name.
//!
//! The base tree is made once and kept as a tarball in `target/package-chroot`; every run
//! unpacks a fresh copy. The checks run in a shell inside a private mount namespace
//! (`unshare --mount`): the proc and sys mounts the chroot needs vanish with it, whatever
//! happens, and the copy is removed afterwards.

use std::{path::Path, process::Command, time::Instant};

use anyhow::{Context, Result, ensure};

use crate::{apt_sources, root, run, step};

/// The checks, run as `bash -c SCRIPT _ ROOT DEB` in the private mount namespace.
const SCRIPT: &str = r#"
set -euo pipefail
root=$1 deb=$2
mount -t proc proc "$root/proc"
mount --rbind /sys "$root/sys"
mount --make-rslave "$root/sys"
cp /etc/resolv.conf "$root/etc/resolv.conf"
cp "$deb" "$root/tmp/ntlm-tag.deb"
inside() { chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive "$@"; }
leftovers() { inside find / -xdev \( -path /tmp -o -path /proc -o -path /sys \) -prune -o -name '*ntlm-tag*' -print | sort; }
fail() { echo "package test: $*" >&2; exit 1; }

echo "==> apt-get install ./ntlm-tag.deb (dependencies from the Debian mirror)"
inside apt-get update -qq
inside apt-get install -y -qq --no-install-recommends /tmp/ntlm-tag.deb >/dev/null
inside dpkg-query -W -f='${Package} ${Version} ${Status}\n' ntlm-tag

echo "==> ntlm-tag --version"
inside ntlm-tag --version | grep -q '^ntlm-tag [0-9]' || fail "--version"

echo "==> the service user, the enabled unit, documentation"
inside getent passwd ntlm-tag | grep -q '^ntlm-tag:x:[0-9]*:[0-9]*:.*:/usr/sbin/nologin$' || fail "no user ntlm-tag"
test -L "$root/etc/systemd/system/multi-user.target.wants/ntlm-tag.service" || fail "unit not enabled"
grep -q '^ExecStart=/usr/sbin/ntlm-tag ' "$root/usr/lib/systemd/system/ntlm-tag.service" || fail "unit path"
for f in /usr/share/man/man8/ntlm-tag.8.gz /usr/share/man/man5/ntlm-tag.toml.5.gz \
         /usr/share/bash-completion/completions/ntlm-tag /usr/share/zsh/vendor-completions/_ntlm-tag \
         /usr/share/fish/vendor_completions.d/ntlm-tag.fish /usr/share/doc/ntlm-tag/copyright \
         /usr/share/doc/ntlm-tag/LICENSE-MIT /usr/share/doc/ntlm-tag/LICENSE-APACHE \
         /usr/lib/sysusers.d/ntlm-tag.conf; do
    test -s "$root$f" || fail "missing $f"
done
inside dpkg-query -W -f='${Conffiles}\n' ntlm-tag | grep -q '/etc/ntlm-tag/ntlm-tag.toml' || fail "config is no conffile"

echo "==> ntlm-tag check on the packaged configuration: 64, naming listen"
set +e
out=$(inside ntlm-tag check --config /etc/ntlm-tag/ntlm-tag.toml 2>&1); code=$?
set -e
echo "$out" | tail -1
[ "$code" = 64 ] && grep -q '`listen`' <<<"$out" || fail "check exited $code: $out"

echo "==> ntlm-tag check on a completed configuration: 0, kernel programs loaded"
{ echo 'listen = ["127.0.0.1:8080"]'; echo 'backends = ["127.0.0.1:8081"]'; cat "$root/etc/ntlm-tag/ntlm-tag.toml"; } >"$root/tmp/complete.toml"
set +e
out=$(inside ntlm-tag check --config /tmp/complete.toml 2>&1 >/dev/null); code=$?
set -e
[ "$code" = 0 ] && grep -q 'configuration OK' <<<"$out" || fail "check exited $code: $out"
echo "$out" | grep -iE 'verifier|programs' | head -2 || true

echo "==> dpkg -r: only the configuration (and dpkg's and systemd's records of it) stays"
inside dpkg -r ntlm-tag >/dev/null
test -f "$root/etc/ntlm-tag/ntlm-tag.toml" || fail "dpkg -r removed the configuration"
kept='^(/etc/ntlm-tag(/ntlm-tag\.toml)?|/etc/systemd/system/(multi-user\.target\.wants/)?ntlm-tag\.service|/var/lib/dpkg/info/ntlm-tag\.[a-z]+|/var/lib/systemd/deb-systemd-helper-[a-z]+/.*ntlm-tag\.service.*)$'
left=$(leftovers | grep -vE "$kept" || true)
[ -z "$left" ] || fail "after dpkg -r: $left"
inside dpkg-query -W -f='${Status}\n' ntlm-tag | grep -q 'config-files' || fail "not in config-files state"

echo "==> dpkg --purge: nothing left"
inside dpkg --purge ntlm-tag >/dev/null
left=$(leftovers)
[ -z "$left" ] || fail "after dpkg --purge: $left"
! inside dpkg-query -W ntlm-tag >/dev/null 2>&1 || fail "still known to dpkg"
echo "==> package test passed"
"#;

pub fn install_and_remove(deb: &Path, mirror: Option<&str>) -> Result<()> {
    ensure!(
        crate::sys::process::is_root(),
        "the package test makes a chroot and mounts in it: run as root"
    );
    let started = Instant::now();
    let base = base_tarball(mirror)?;
    let tree = tempfile::Builder::new()
        .prefix("chroot-")
        .tempdir_in(root().join("target/package-chroot"))
        .context("cannot create the chroot's directory")?;
    step(&format!(
        "unpacking a fresh chroot in {}",
        tree.path().display()
    ));
    run(Command::new("tar")
        .arg("-xpf")
        .arg(&base)
        .arg("-C")
        .arg(tree.path()))?;
    let deb = deb
        .canonicalize()
        .with_context(|| format!("no package at {}", deb.display()))?;
    let result = run(Command::new("unshare")
        .args([
            "--mount",
            "--propagation",
            "private",
            "--",
            "bash",
            "-c",
            SCRIPT,
            "package-test",
        ])
        .arg(tree.path())
        .arg(&deb));
    // The mounts died with the namespace; the tree goes with the TempDir.
    drop(tree);
    step(&format!(
        "package test took {:.0} s",
        started.elapsed().as_secs_f64()
    ));
    result
}

/// A minbase tree of the machine's Debian suite, made once with debootstrap.
pub(crate) fn base_tarball(mirror: Option<&str>) -> Result<std::path::PathBuf> {
    let mirror = apt_sources::debian_mirror(mirror)?;
    let dir = root().join("target/package-chroot");
    let tarball = dir.join(format!("{}-minbase.tar", mirror.suite));
    if tarball.is_file() {
        step(&format!(
            "chroot base: {} (delete it to make a new one)",
            tarball.display()
        ));
        return Ok(tarball);
    }
    crate::sys::apt::install_missing("debootstrap", &["debootstrap"])?;
    let building = tempfile::Builder::new()
        .prefix("debootstrap-")
        .tempdir_in({
            std::fs::create_dir_all(&dir)?;
            &dir
        })?;
    step(&format!(
        "debootstrap {} (minbase) from the Debian mirror {} (a minute or two, once)",
        mirror.suite, mirror.archive
    ));
    run(Command::new("debootstrap")
        .args(["--variant=minbase", &mirror.suite])
        .arg(building.path())
        .arg(&mirror.archive))
    .context(
        "debootstrap failed; check access to the Debian mirror, or give another with --mirror",
    )?;
    pack_tree(building.path(), &tarball)?;
    Ok(tarball)
}

/// Packs the tree at `root` into `tarball`, which appears only once complete (an interrupted run
/// leaves no half tarball for the next one to trust).
pub(crate) fn pack_tree(root: &Path, tarball: &Path) -> Result<()> {
    let partial = tarball.with_extension("tar.partial");
    run(Command::new("tar")
        .arg("-cpf")
        .arg(&partial)
        .arg("-C")
        .arg(root)
        .arg("."))?;
    std::fs::rename(&partial, tarball)?;
    Ok(())
}
