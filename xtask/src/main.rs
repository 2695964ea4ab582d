//! `cargo xtask`: the project's tasks. Each is idempotent and says what it does.

mod apt_sources;
mod bench;
mod demo;
mod fuzz;
mod install;
mod package;
mod package_systemd_test;
mod package_test;
mod setup;
mod unit;
mod vm;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "ntlm-tag build, test and demo tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what is missing: nightly rust-src, the Debian packages (LLVM of that nightly), bpf-linker.
    Setup,
    /// Build the eBPF object that `ntlm-tag` embeds.
    BuildEbpf,
    /// Build the gateway (eBPF object included).
    Build {
        #[arg(long)]
        release: bool,
    },
    /// The full test suite: setup, build, unit tests, network-namespace integration tests (root).
    Test {
        /// Only run tests whose name contains this.
        filter: Option<String>,
    },
    /// `cargo fmt --check` (main, eBPF, fuzz) and `cargo clippy -D warnings` (main, fuzz); the fuzz
    /// targets built and every committed fuzz input replayed (the CI fuzz check); the packaged
    /// systemd unit through `systemd-analyze verify` and `security`.
    Lint,
    /// Install the release binary, an example /etc/ntlm-tag/ntlm-tag.toml, a systemd unit and the man page.
    Install {
        /// Install under this root instead of `/` (packaging, tests).
        #[arg(long, default_value = "/")]
        destdir: PathBuf,
    },
    /// Build the Debian package (cargo-deb) into target/debian; `--test` installs and removes it
    /// in a clean Debian chroot (root).
    Package(package::Args),
    /// Run every fuzz target N seconds (cargo fuzz, nightly; installs cargo-fuzz), or only build them.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Only replay the seeds and regression inputs and build the targets (the CI check).
        #[arg(long)]
        build_only: bool,
        /// Targets to run (default: all).
        targets: Vec<String>,
    },
    /// The integration tests under Debian's 5.10/6.1/6.12 kernels (qemu + virtme-ng) or the host's.
    IntegrationTest(vm::IntegrationTestArgs),
    /// ntlm-tag against nginx, HAProxy and the backend alone, one core per proxy (root; not in CI).
    Bench(bench::Args),
    /// The whole story on a built-in network-namespace topology (root).
    Demo {
        /// Leave the topology up and print how to poke at it.
        #[arg(long)]
        keep: bool,
    },
}

fn main() -> std::process::ExitCode {
    // The error and its causes on one line, never a backtrace: with RUST_BACKTRACE set (as CI
    // environments often have it), anyhow's backtrace of xtask itself would push the failing
    // command's own output (a test's panic message) out of the visible end of the log.
    match run_task(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run_task(cli: Cli) -> Result<()> {
    match cli.task {
        Task::Setup => setup::install_missing(),
        Task::BuildEbpf => build_ebpf(),
        Task::Build { release } => {
            build_ebpf()?;
            build_gateway(release)
        }
        Task::Test { filter } => test(filter.as_deref()),
        Task::Lint => lint(),
        Task::Install { destdir } => {
            build_ebpf()?;
            build_gateway(true)?;
            install::run(&destdir)
        }
        Task::Fuzz {
            seconds,
            build_only,
            targets,
        } => fuzz::run_fuzz(seconds, build_only, &targets),
        Task::Package(args) => package::run_task(&args),
        Task::IntegrationTest(args) => vm::integration_test(&args),
        Task::Bench(args) => bench::run(&args),
        Task::Demo { keep } => {
            setup::install_missing()?;
            build_ebpf()?;
            build_gateway(false)?;
            if !setup::is_root() {
                bail!(
                    "the demo creates network namespaces and loads eBPF programs: run it as root"
                );
            }
            demo::run(keep)
        }
    }
}

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
fn cargo() -> Command {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(root());
    cmd
}

fn build_ebpf() -> Result<()> {
    setup::check_llvm_match()?;
    step("building the eBPF object (nightly, bpfel-unknown-none)");
    let mut cmd = Command::new("cargo");
    cmd.current_dir(root().join("ntlm-tag-ebpf"))
        .env("RUSTUP_TOOLCHAIN", "nightly")
        .env_remove("RUSTC")
        .env_remove("RUSTC_WRAPPER")
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_TARGET_DIR")
        .args([
            "build",
            "--locked",
            "--release",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
        ]);
    run(&mut cmd)
        .context("building the eBPF object failed; `cargo xtask setup` installs what it needs")
}

fn build_gateway(release: bool) -> Result<()> {
    step("building ntlm-tag (and the NTLM test acceptor)");
    let mut cmd = cargo();
    cmd.args([
        "build",
        "--locked",
        "-p",
        "ntlm-tag",
        "-p",
        "ntlm-tag-test-acceptor",
    ]);
    if release {
        cmd.arg("--release");
    }
    run(&mut cmd)
}

fn test(filter: Option<&str>) -> Result<()> {
    setup::install_missing()?;
    build_ebpf()?;
    build_gateway(false)?;
    if !setup::is_root() {
        bail!(
            "the integration tests create network namespaces and load eBPF programs: run as root"
        );
    }
    step("unit and integration tests");
    let mut cmd = cargo();
    cmd.args(["test", "--locked", "--workspace"])
        .env("NTLM_TAG_BIN", root().join("target/debug/ntlm-tag"));
    if let Some(f) = filter {
        cmd.arg(f);
    }
    run(&mut cmd)?;
    step("all tests passed");
    Ok(())
}

fn lint() -> Result<()> {
    step("cargo fmt --check");
    run(cargo().args(["fmt", "--all", "--check"]))?;
    step("cargo clippy -D warnings");
    run(cargo().args([
        "clippy",
        "--locked",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    step("eBPF crate: cargo fmt --check");
    run(Command::new("cargo")
        .current_dir(root().join("ntlm-tag-ebpf"))
        .env("RUSTUP_TOOLCHAIN", "nightly")
        .args(["fmt", "--check"]))?;
    unit::check()?;
    fuzz_check()
}

/// The fuzz crate (its own workspace): formatting, lints, and the CI check that the fuzz targets
/// build. On stable, without cargo-fuzz's instrumentation: the targets are compiled and linked
/// against libFuzzer exactly as written (`cargo build --bins`), and every seed and regression
/// input is replayed through their checks (`cargo test`). What `cargo fuzz build` adds on top
/// (nightly, sanitizer coverage) costs minutes of compiling and checks nothing more of our code.
/// Measured on 2 cores from an empty fuzz/target: clippy 132 s, build 187 s, test 2 s (~5.4 min,
/// against ~9 min for a cold `cargo fuzz build`); seconds when warm.
fn fuzz_check() -> Result<()> {
    let fuzz_dir = root().join("fuzz");
    // The fuzzed code never loads the eBPF object: without a built one, embed a placeholder.
    let placeholder = if fuzz::built_ebpf_object().is_file() {
        None
    } else {
        Some(fuzz::ebpf_object(&fuzz_dir)?)
    };
    let fuzz = || {
        let mut cmd = Command::new("cargo");
        cmd.current_dir(&fuzz_dir).env_remove("CARGO_TARGET_DIR");
        if let Some(p) = &placeholder {
            cmd.env("NTLM_TAG_EBPF_OBJECT", p);
        }
        cmd
    };
    step("fuzz crate: cargo fmt --check");
    run(fuzz().args(["fmt", "--check"]))?;
    step("fuzz crate: cargo clippy -D warnings");
    run(fuzz().args([
        "clippy",
        "--locked",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    step("fuzz crate: the targets build and link against libFuzzer");
    run(fuzz().args(["build", "--locked", "--bins"]))?;
    step("fuzz crate: every seed and regression input passes its target's checks");
    run(fuzz().args(["test", "--locked"]))
}
