//! Which kernels (`--kernel 5.10|6.1|6.12|host|all`), and each Debian kernel's newest package,
//! fetched with a private apt and cached unpacked under `target/vm-kernels/<series>/`.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, ensure};

use crate::{apt_sources::DebianMirror, root, run, step, sys::interrupts::TempDir};

/// A Debian kernel series: its suite and how its unsigned image packages are named,
/// `<prefix><number><suffix>` (the newest number is used).
pub struct Series {
    pub name: &'static str,
    suite: Suite,
    prefix: &'static str,
    suffix: &'static str,
}

#[derive(Clone, Copy)]
enum Suite {
    Bullseye,
    Bookworm,
}

impl Suite {
    fn name(self) -> &'static str {
        match self {
            Suite::Bullseye => "bullseye",
            Suite::Bookworm => "bookworm",
        }
    }
}

const SERIES: &[Series] = &[
    Series {
        name: "5.10",
        suite: Suite::Bullseye,
        prefix: "linux-image-5.10.0-",
        suffix: "-amd64-unsigned",
    },
    Series {
        name: "6.1",
        suite: Suite::Bookworm,
        prefix: "linux-image-6.1.0-",
        suffix: "-amd64-unsigned",
    },
    Series {
        name: "6.12",
        suite: Suite::Bookworm,
        prefix: "linux-image-6.12.",
        suffix: "+deb12-amd64-unsigned",
    },
];

pub enum Target {
    Host,
    Debian(&'static Series),
}

impl Target {
    pub fn label(&self) -> &'static str {
        match self {
            Target::Host => "host",
            Target::Debian(s) => s.name,
        }
    }
}

pub fn parse_targets(given: &[String]) -> Result<Vec<Target>> {
    let mut names: Vec<&str> = Vec::new();
    for k in given {
        let expanded: Vec<&str> = match k.as_str() {
            "all" => SERIES.iter().map(|s| s.name).chain(["host"]).collect(),
            other => vec![other],
        };
        for name in expanded {
            if !names.contains(&name) {
                names.push(name);
            }
        }
    }
    names.into_iter().map(parse_target).collect()
}

fn parse_target(name: &str) -> Result<Target> {
    if name == "host" {
        return Ok(Target::Host);
    }
    SERIES
        .iter()
        .find(|s| s.name == name)
        .map(Target::Debian)
        .with_context(|| {
            format!("unknown kernel `{name}`: use --kernel 5.10, 6.1, 6.12, host or all")
        })
}

/// An unpacked kernel package: `<dir>/boot/vmlinuz-*` and `<dir>/lib/modules/<release>`.
pub struct Kernel {
    pub dir: PathBuf,
    pub vmlinuz: PathBuf,
    pub package: String,
}

fn kernels_dir() -> PathBuf {
    root().join("target/vm-kernels")
}

pub fn fetch(series: &Series, mirror: &DebianMirror) -> Result<Kernel> {
    let dir = kernels_dir().join(series.name);
    let marker = dir.join("package");
    if !marker.is_file() {
        download_and_unpack(series, mirror, &dir)?;
    }
    let package = fs::read_to_string(&marker)
        .with_context(|| format!("cannot read {}", marker.display()))?
        .trim()
        .to_string();
    let vmlinuz = find_vmlinuz(&dir.join("boot"))?;
    step(&format!(
        "kernel {}: {package} (cached in {}; delete it to fetch the newest)",
        series.name,
        dir.display()
    ));
    Ok(Kernel {
        dir,
        vmlinuz,
        package,
    })
}

fn download_and_unpack(series: &Series, mirror: &DebianMirror, dir: &Path) -> Result<()> {
    let apt = PrivateApt::for_suite(series.suite, mirror)?;
    let package = newest_package(&apt, series)?;
    step(&format!("downloading {package}"));
    let debs = TempDir::at(&kernels_dir().join(format!("download-{}", series.name)))?;
    run(apt
        .command("apt-get")
        .current_dir(debs.path())
        .args(["download", "-qq", &package]))
    .with_context(|| format!("cannot download {package}; check access to the Debian mirror"))?;
    let deb = only_file(debs.path())?;
    let unpacking = TempDir::at(&kernels_dir().join(format!("unpack-{}", series.name)))?;
    run(Command::new("dpkg-deb")
        .arg("-x")
        .arg(&deb)
        .arg(unpacking.path()))
    .with_context(|| format!("cannot unpack {}", deb.display()))?;
    fs::write(unpacking.path().join("package"), format!("{package}\n"))?;
    if dir.exists() {
        fs::remove_dir_all(dir).with_context(|| format!("cannot remove {}", dir.display()))?;
    }
    fs::rename(unpacking.path(), dir)
        .with_context(|| format!("cannot move the unpacked kernel to {}", dir.display()))
}

/// apt with its own sources, lists and cache under `target/vm-kernels/apt-<suite>/`, so fetching
/// Debian 11's kernel on Debian 12 never touches the system's apt configuration.
struct PrivateApt {
    options: Vec<String>,
}

impl PrivateApt {
    fn for_suite(suite: Suite, mirror: &DebianMirror) -> Result<Self> {
        let base = kernels_dir().join(format!("apt-{}", suite.name()));
        for d in ["lists/partial", "cache/archives/partial"] {
            fs::create_dir_all(base.join(d))
                .with_context(|| format!("cannot create {}", base.join(d).display()))?;
        }
        let sources = base.join("sources.list");
        let keyring = "[signed-by=/usr/share/keyrings/debian-archive-keyring.gpg]";
        let s = suite.name();
        let mut list = format!("deb {keyring} {} {s} main\n", mirror.archive);
        if let Some(security) = &mirror.security {
            list.push_str(&format!("deb {keyring} {security} {s}-security main\n"));
        }
        fs::write(&sources, list)?;
        let options = [
            format!("Dir::Etc::sourcelist={}", sources.display()),
            "Dir::Etc::sourceparts=-".to_string(),
            format!("Dir::State::Lists={}", base.join("lists").display()),
            format!("Dir::Cache={}", base.join("cache").display()),
            "APT::Sandbox::User=root".to_string(),
        ]
        .into_iter()
        .flat_map(|o| ["-o".to_string(), o])
        .collect();
        let apt = PrivateApt { options };
        step(&format!("apt-get update for Debian {s} (private lists)"));
        run(apt.command("apt-get").args(["update", "-qq"])).with_context(|| {
            format!(
                "cannot read Debian {s}'s package lists from the Debian mirror {}; check access \
                 to it, or give another with --mirror",
                mirror.archive
            )
        })?;
        Ok(apt)
    }

    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        cmd.args(&self.options);
        cmd
    }
}

/// The newest `<prefix><number><suffix>` package (not cloud, not rt), by its number.
fn newest_package(apt: &PrivateApt, series: &Series) -> Result<String> {
    let out = apt
        .command("apt-cache")
        .args(["search", "--names-only", &format!("^{}", series.prefix)])
        .output()
        .context("cannot run apt-cache search")?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter_map(|name| {
            let number = name
                .strip_prefix(series.prefix)?
                .strip_suffix(series.suffix)?;
            Some((number.parse::<u32>().ok()?, name.to_string()))
        })
        .max()
        .map(|(_, name)| name)
        .with_context(|| {
            format!(
                "no {}N{} package in Debian {}; has Debian renamed its kernel packages?",
                series.prefix,
                series.suffix,
                series.suite.name()
            )
        })
}

fn only_file(dir: &Path) -> Result<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .collect();
    ensure!(files.len() == 1, "expected one .deb in {}", dir.display());
    Ok(files.remove(0))
}

fn find_vmlinuz(boot: &Path) -> Result<PathBuf> {
    fs::read_dir(boot)
        .with_context(|| format!("cannot read {}", boot.display()))?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .with_context(|| format!("no vmlinuz-* in {}", boot.display()))
}
