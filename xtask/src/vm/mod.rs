//! `cargo xtask integration-test --kernel <5.10|6.1|6.12|host|all>`: the integration tests under the
//! kernels gateways run on.
//!
//! The test binaries are built once on the host. Each Debian kernel is fetched once into
//! `target/vm-kernels/<series>/` and booted under qemu with virtme-ng (KVM when it can run a stock
//! kernel here, TCG otherwise). The guest sees the host's file system read-only, so it runs the
//! host's test binaries, `ip`, `nft` and `haproxy` unchanged; it writes each binary's output to
//! `target/vm-results/<kernel>/`, which the host reads back to print one line per kernel.
//! `host` runs the same binaries directly. See `docs/kernels.md` for the results.
//!
//! Modules, in the order a run goes: [`kernels`] (which kernels, and fetching Debian's),
//! [`binaries`] (the test binaries, built once and staged), [`accel`] (qemu and virtme-ng, KVM or
//! TCG), [`run`] (on the host, or booted under a kernel), [`guest`] (the script the guest runs)
//! and [`report`] (one line per kernel).

mod accel;
mod binaries;
mod console;
mod guest;
mod kernels;
mod report;
mod run;

use std::{fs, path::PathBuf, time::Duration};

use anyhow::{Context, Result, ensure};

use crate::{
    apt_sources::DebianMirror,
    root,
    sys::{
        self,
        interrupts::{self, TempDir},
    },
};
use accel::VmTools;
use binaries::TestBinary;
use kernels::Target;

/// Arguments of `cargo xtask integration-test`.
#[derive(clap::Args)]
pub struct IntegrationTestArgs {
    /// Kernel to run the integration tests under: 5.10 (Debian 11), 6.1 or 6.12 (Debian 12), `host`
    /// (this machine's kernel, no VM) or `all` (all four). Repeatable.
    #[arg(
        long = "kernel",
        required = true,
        value_name = "5.10|6.1|6.12|host|all"
    )]
    kernels: Vec<String>,
    /// Tests run in parallel within one test binary.
    #[arg(long, default_value_t = 2)]
    test_threads: u32,
    /// Give up on one kernel (boot and all test binaries) after this many minutes.
    #[arg(long, default_value_t = 120)]
    timeout_mins: u64,
    /// Run only these integration test binaries (`tests/<name>.rs`; comma-separated or repeated).
    /// CI uses it for a quicker VM run of the kernel-facing binaries.
    #[arg(long = "only", value_name = "BINARY", value_delimiter = ',')]
    only: Vec<String>,
    /// The Debian mirror to fetch kernels from (default: the main archive in this machine's apt
    /// sources, and its security archive).
    #[arg(long, value_name = "URL")]
    mirror: Option<String>,
    /// Passed to every test binary after `--`: a name filter, `--exact`, `--nocapture`, ...
    #[arg(last = true)]
    test_args: Vec<String>,
}

/// Set to `1` to make the test `harness_selftest::fails_on_purpose_when_asked` fail (in the guest
/// as on the host), which must turn the kernel's line into FAIL and the exit code non-zero: proof
/// that the guest's result comes back. Its binary then runs even when `--only` leaves it out.
const SELFTEST_ENV: &str = "NTLM_TAG_VM_SELFTEST_FAIL";

pub fn integration_test(args: &IntegrationTestArgs) -> Result<()> {
    let targets = kernels::parse_targets(&args.kernels)?;
    ensure!(
        sys::process::is_root(),
        "the integration tests create network namespaces and load eBPF programs, and booting kernels \
         installs packages: run as root (sudo cargo xtask integration-test ...)"
    );
    interrupts::install("stopping VMs and tests, removing temporary files")?;
    crate::setup::install_missing()?;
    crate::build_ebpf()?;
    crate::build_gateway(false)?;
    let selftest = std::env::var(SELFTEST_ENV).is_ok_and(|v| v == "1");
    let tests = binaries::select(binaries::build()?, &args.only, selftest)?;
    let run_dir = TempDir::at(&root().join(format!("target/vm/run-{}", std::process::id())))?;
    let stage = binaries::stage(&tests, &run_dir.path().join("stage"))?;
    let plan = Plan {
        tests,
        stage,
        run_dir: run_dir.path().to_path_buf(),
        threads: args.test_threads,
        test_args: args.test_args.clone(),
        selftest,
        timeout: Duration::from_secs(args.timeout_mins * 60),
    };
    let mut vm: Option<VmTools> = None;
    let mut mirror: Option<DebianMirror> = None;
    let mut reports = Vec::new();
    for target in &targets {
        let report = match target {
            Target::Host => run::on_host(&plan)?,
            Target::Debian(series) => {
                if vm.is_none() {
                    vm = Some(VmTools::prepare()?);
                }
                let tools = vm.as_mut().context("VM tools prepared above")?;
                if mirror.is_none() {
                    mirror = Some(crate::apt_sources::debian_mirror(args.mirror.as_deref())?);
                }
                let mirror = mirror
                    .as_ref()
                    .context("the Debian mirror was read above")?;
                let kernel = kernels::fetch(series, mirror)?;
                run::in_vm(&plan, tools, &kernel)?
            }
        };
        eprintln!("{}", report.line());
        reports.push(report);
    }
    report::summarize(&reports)
}

/// What every kernel runs: the same staged binaries with the same options.
struct Plan {
    tests: Vec<TestBinary>,
    stage: PathBuf,
    run_dir: PathBuf,
    threads: u32,
    test_args: Vec<String>,
    selftest: bool,
    timeout: Duration,
}

/// `target/vm-results/<label>/`, emptied.
fn results_dir(label: &str) -> Result<PathBuf> {
    let dir = root().join("target/vm-results").join(label);
    if dir.exists() {
        fs::remove_dir_all(&dir).with_context(|| format!("cannot clear {}", dir.display()))?;
    }
    fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    Ok(dir)
}
