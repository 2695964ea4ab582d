//! `cargo xtask`: the project's tasks. Each is idempotent and says what it does.

mod apt_sources;
mod bench;
mod build;
mod demo;
mod fuzz;
mod install;
mod lint;
mod package;
mod package_systemd_test;
mod package_test;
mod setup;
mod unit;
mod vm;

use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::{Parser, Subcommand};
use xtask::{cargo, root, run, step, sys};

use build::{build_ebpf, build_gateway};

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
    /// `cargo fmt --check` (main, eBPF, fuzz) and `cargo clippy -D warnings` (main, fuzz); no
    /// import cycle between the modules of a crate; the fuzz targets built and every committed
    /// fuzz input replayed (the CI fuzz check); the packaged systemd unit through
    /// `systemd-analyze verify` and `security`.
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
    Bench(xtask::bench_args::Args),
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
        Task::Test { filter } => build::test(filter.as_deref()),
        Task::Lint => lint::lint(),
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
        // Parsed here for `--help` and early errors; the bench binary parses the same arguments.
        Task::Bench(_) => bench::run(),
        Task::Demo { keep } => {
            setup::install_missing()?;
            build_ebpf()?;
            build_gateway(false)?;
            if !sys::process::is_root() {
                bail!(
                    "the demo creates network namespaces and loads eBPF programs: run it as root"
                );
            }
            demo::run(keep)
        }
    }
}
