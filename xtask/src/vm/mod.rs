//! `cargo xtask integration-test --kernel <5.10|6.1|6.12|host|all>`: the integration tests under the
//! kernels gateways run on.
//!
//! The test binaries are built once on the host. Each Debian kernel is fetched once into
//! `target/vm-kernels/<series>/` and booted under qemu with virtme-ng (KVM when it can run a stock
//! kernel here, TCG otherwise). The guest sees the host's file system read-only, so it runs the
//! host's test binaries, `ip`, `nft` and `haproxy` unchanged; it writes each binary's output to
//! `target/vm-results/<kernel>/`, which the host reads back to print one line per kernel.
//! `host` runs the same binaries directly. See `docs/kernels.md` for the results.

use std::{
    fs,
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};

use crate::{apt_sources::DebianMirror, root, run, step};

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
const SELFTEST_BINARY: &str = "harness_selftest";
/// The harness's waits grow by this factor in a guest (`ntlm_tag_tests::gateway::TIME_SCALE_ENV`);
/// set it on the host to override.
const TIME_SCALE_ENV: &str = "NTLM_TAG_TEST_TIME_SCALE";
/// Under TCG a guest runs the gateway's start-up (object parsing, map creation, verification)
/// ~40 times slower than the host: 3-5 s instead of 0.1 s, more with two tests at once. At 6 the
/// 10 000-connection churn in `faults` got 9 500 (6.1) and 4 700 (6.12) connections through.
const TCG_TIME_SCALE: u32 = 20;
const KVM_TIME_SCALE: u32 = 2;
/// Set to `kvm` or `tcg` to skip detecting which accelerator works.
const ACCEL_ENV: &str = "NTLM_TAG_VM_ACCEL";
const VIRTME_NG_VERSION: &str = "1.42";
const HOST_PACKAGES: &[&str] = &[
    "qemu-system-x86",
    "kmod",
    "udev",
    "busybox-static",
    "binutils",
    // virtme-ng goes into a venv (Debian 12 does not package it).
    "python3-venv",
];
const GUEST_CPUS: &str = "2";
const GUEST_MEMORY: &str = "2G";
/// A working KVM boots a stock kernel in seconds; a broken one stalls or dies.
const KVM_PROBE_TIMEOUT: Duration = Duration::from_secs(60);
const PER_BINARY_TIMEOUT_SECS: u64 = 45 * 60;
/// Failing tests named on a kernel's line; the rest are in its `failures.txt`.
const LISTED_FAILURES: usize = 12;

pub fn integration_test(args: &IntegrationTestArgs) -> Result<()> {
    let targets = parse_targets(&args.kernels)?;
    ensure!(
        crate::setup::is_root(),
        "the integration tests create network namespaces and load eBPF programs, and booting kernels \
         installs packages: run as root (sudo cargo xtask integration-test ...)"
    );
    interrupts::install()?;
    crate::setup::install_missing()?;
    crate::build_ebpf()?;
    crate::build_gateway(false)?;
    let selftest = std::env::var(SELFTEST_ENV).is_ok_and(|v| v == "1");
    let tests = select(build_test_binaries()?, &args.only, selftest)?;
    let run_dir = TempDir::new(&root().join(format!("target/vm/run-{}", std::process::id())))?;
    let stage = stage_binaries(&tests, &run_dir.path.join("stage"))?;
    let plan = Plan {
        tests,
        stage,
        run_dir: run_dir.path.clone(),
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
            Target::Host => run_on_host(&plan)?,
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
                let kernel = fetch_kernel(series, mirror)?;
                run_in_vm(&plan, tools, &kernel)?
            }
        };
        eprintln!("{}", report.line());
        reports.push(report);
    }
    summarize(&reports)
}

// ---------------------------------------------------------------------------------------------
// Which kernels

/// A Debian kernel series: its suite and how its unsigned image packages are named,
/// `<prefix><number><suffix>` (the newest number is used).
struct Series {
    name: &'static str,
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

enum Target {
    Host,
    Debian(&'static Series),
}

impl Target {
    fn label(&self) -> &'static str {
        match self {
            Target::Host => "host",
            Target::Debian(s) => s.name,
        }
    }
}

fn parse_targets(given: &[String]) -> Result<Vec<Target>> {
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

// ---------------------------------------------------------------------------------------------
// Test binaries

/// An integration test binary (`tests/*.rs` of a workspace crate).
struct TestBinary {
    name: String,
    path: PathBuf,
}

fn build_test_binaries() -> Result<Vec<TestBinary>> {
    step("building the integration test binaries");
    let out = crate::cargo()
        .args([
            "test",
            "--locked",
            "--workspace",
            "--no-run",
            "--message-format=json",
        ])
        .stderr(Stdio::inherit())
        .output()
        .context("cannot run cargo test --no-run")?;
    ensure!(
        out.status.success(),
        "building the test binaries failed ({}); fix the build, then rerun",
        out.status
    );
    let tests: Vec<TestBinary> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(integration_test_artifact)
        .collect();
    for (i, t) in tests.iter().enumerate() {
        ensure!(
            tests[..i].iter().all(|u| u.name != t.name),
            "two integration test binaries are named {}; rename one (tests/{}.rs)",
            t.name,
            t.name
        );
    }
    ensure!(
        !tests.is_empty(),
        "cargo built no integration test binaries (targets of kind `test`)"
    );
    Ok(tests)
}

/// The binaries `--only` names (all without it), plus the self-test binary when it must fail.
fn select(all: Vec<TestBinary>, only: &[String], selftest: bool) -> Result<Vec<TestBinary>> {
    for name in only {
        ensure!(
            all.iter().any(|t| &t.name == name),
            "--only {name}: no such integration test binary (there are: {})",
            all.iter()
                .map(|t| t.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(all
        .into_iter()
        .filter(|t| {
            only.is_empty() || only.contains(&t.name) || (selftest && t.name == SELFTEST_BINARY)
        })
        .collect())
}

/// The integration test binary a `cargo --message-format=json` line announces, if it is one.
fn integration_test_artifact(line: &str) -> Option<TestBinary> {
    let target = line.split_once(r#""target":{"kind":["test"]"#)?.1;
    let name = json_string_after(target, "name")?;
    let path = json_string_after(line, "executable")?;
    Some(TestBinary {
        name,
        path: PathBuf::from(path),
    })
}

/// The first string value of `"key":"..."` in `text` (cargo's paths and names carry no escapes).
fn json_string_after(text: &str, key: &str) -> Option<String> {
    let start = text.find(&format!(r#""{key}":""#))? + key.len() + 4;
    let value = &text[start..start + text[start..].find('"')?];
    (!value.contains('\\')).then(|| value.to_string())
}

/// Copies the gateway and the test binaries, without debug info, into `dir`: a private snapshot a
/// concurrent build cannot replace mid-run, and a fraction of the bytes the guest reads over 9p.
fn stage_binaries(tests: &[TestBinary], dir: &Path) -> Result<PathBuf> {
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    strip_into(&root().join("target/debug/ntlm-tag"), &dir.join("ntlm-tag"))?;
    for t in tests {
        strip_into(&t.path, &dir.join(&t.name))?;
    }
    Ok(dir.to_path_buf())
}

fn strip_into(from: &Path, to: &Path) -> Result<()> {
    run(Command::new("strip")
        .arg("--strip-debug")
        .arg("-o")
        .arg(to)
        .arg(from))
    .with_context(|| {
        format!(
            "cannot copy {} without debug info; `apt-get install binutils` provides strip",
            from.display()
        )
    })
}

// ---------------------------------------------------------------------------------------------
// Host tools: qemu, virtme-ng

struct VmTools {
    vng: PathBuf,
    accel: Option<Accel>,
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Accel {
    Kvm,
    Tcg,
}

impl VmTools {
    fn prepare() -> Result<Self> {
        install_host_packages()?;
        let vng = install_virtme_ng()?;
        Ok(VmTools { vng, accel: None })
    }
}

fn install_host_packages() -> Result<()> {
    let missing: Vec<&str> = HOST_PACKAGES
        .iter()
        .copied()
        .filter(|p| !package_installed(p))
        .collect();
    if missing.is_empty() {
        step("VM host packages: all present");
        return Ok(());
    }
    step(&format!(
        "installing VM host packages: {}",
        missing.join(" ")
    ));
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    run(Command::new("apt-get")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing))
    .with_context(|| {
        format!(
            "cannot install {}; try `apt-get install` them",
            missing.join(" ")
        )
    })
}

fn package_installed(name: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", name])
        .stderr(Stdio::null())
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

/// virtme-ng in a venv under `target/vm/venv` (Debian 12 does not package it).
fn install_virtme_ng() -> Result<PathBuf> {
    let venv = root().join("target/vm/venv");
    let vng = venv.join("bin/vng");
    let version = Command::new(&vng).arg("--version").output();
    if let Ok(out) = version
        && String::from_utf8_lossy(&out.stdout).contains(VIRTME_NG_VERSION)
    {
        step(&format!("virtme-ng {VIRTME_NG_VERSION}: present"));
        return Ok(vng);
    }
    step(&format!(
        "installing virtme-ng {VIRTME_NG_VERSION} into {}",
        venv.display()
    ));
    // `--clear`: a venv that stopped working (copied or moved: its scripts name the interpreter by
    // absolute path) is rebuilt rather than patched. pip runs as a module for the same reason.
    run(Command::new("python3")
        .args(["-m", "venv", "--clear"])
        .arg(&venv))
    .context("cannot create a Python venv; `apt-get install python3-venv` provides it")?;
    run(Command::new(venv.join("bin/python3")).args([
        "-m",
        "pip",
        "install",
        "--quiet",
        &format!("virtme-ng=={VIRTME_NG_VERSION}"),
    ]))
    .context("cannot install virtme-ng; check network access to the Python package index")?;
    Ok(vng)
}

// ---------------------------------------------------------------------------------------------
// Kernels: newest Debian package of a series, cached under target/vm-kernels/<series>/

/// An unpacked kernel package: `<dir>/boot/vmlinuz-*` and `<dir>/lib/modules/<release>`.
struct Kernel {
    dir: PathBuf,
    vmlinuz: PathBuf,
    package: String,
}

fn kernels_dir() -> PathBuf {
    root().join("target/vm-kernels")
}

fn fetch_kernel(series: &Series, mirror: &DebianMirror) -> Result<Kernel> {
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
    let debs = TempDir::new(&kernels_dir().join(format!("download-{}", series.name)))?;
    run(apt
        .command("apt-get")
        .current_dir(&debs.path)
        .args(["download", "-qq", &package]))
    .with_context(|| format!("cannot download {package}; check access to the Debian mirror"))?;
    let deb = only_file(&debs.path)?;
    let unpacking = TempDir::new(&kernels_dir().join(format!("unpack-{}", series.name)))?;
    run(Command::new("dpkg-deb")
        .arg("-x")
        .arg(&deb)
        .arg(&unpacking.path))
    .with_context(|| format!("cannot unpack {}", deb.display()))?;
    fs::write(unpacking.path.join("package"), format!("{package}\n"))?;
    if dir.exists() {
        fs::remove_dir_all(dir).with_context(|| format!("cannot remove {}", dir.display()))?;
    }
    fs::rename(&unpacking.path, dir)
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

// ---------------------------------------------------------------------------------------------
// Running the tests

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

fn results_dir(label: &str) -> Result<PathBuf> {
    let dir = root().join("target/vm-results").join(label);
    if dir.exists() {
        fs::remove_dir_all(&dir).with_context(|| format!("cannot clear {}", dir.display()))?;
    }
    fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    Ok(dir)
}

fn run_on_host(plan: &Plan) -> Result<Report> {
    let label = Target::Host.label();
    step("running the integration tests on the host kernel");
    let results = results_dir(label)?;
    let started = Instant::now();
    let deadline = started + plan.timeout;
    for t in &plan.tests {
        eprintln!("[host] running {}", t.name);
        let rc = run_test_binary_on_host(plan, t, &results, deadline)?;
        fs::write(results.join(format!("{}.rc", t.name)), format!("{rc}\n"))?;
    }
    fs::write(results.join("done"), "finished\n")?;
    let release = command_stdout(Command::new("uname").arg("-r"))?;
    Ok(Report::read(
        plan,
        label,
        &release,
        &results,
        None,
        started.elapsed(),
    ))
}

/// Runs one test binary with its output in `<results>/<name>.out`; its exit code (124: timed out).
fn run_test_binary_on_host(
    plan: &Plan,
    t: &TestBinary,
    results: &Path,
    deadline: Instant,
) -> Result<i32> {
    let out = fs::File::create(results.join(format!("{}.out", t.name)))?;
    let mut cmd = Command::new(plan.stage.join(&t.name));
    cmd.arg(format!("--test-threads={}", plan.threads))
        .args(&plan.test_args)
        .env("NTLM_TAG_BIN", plan.stage.join("ntlm-tag"))
        .current_dir(root())
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out);
    let child = cmd
        .spawn()
        .with_context(|| format!("cannot start {}", t.name))?;
    let live = interrupts::Live::TestBinary(child.id());
    let _live = interrupts::track(live.clone());
    let timeout = deadline.saturating_duration_since(Instant::now());
    Ok(wait_or_kill(child, timeout, &live)?.map_or(124, |s| s.code().unwrap_or(128)))
}

fn run_in_vm(plan: &Plan, tools: &mut VmTools, kernel: &Kernel) -> Result<Report> {
    let accel = match tools.accel {
        Some(a) => a,
        None => {
            let a = detect_accel(&tools.vng, kernel, &plan.run_dir)?;
            tools.accel = Some(a);
            a
        }
    };
    let label = kernel_label(kernel);
    step(&format!(
        "booting {} under qemu ({accel:?}) and running the integration tests in it",
        kernel.package
    ));
    let results = results_dir(&label)?;
    let script = plan.run_dir.join(format!("guest-{label}.sh"));
    fs::write(&script, guest_script(plan, &results, accel))?;
    fs::write(results.join("accel"), format!("{accel:?}\n"))?;
    let started = Instant::now();
    let mut cmd = vng_command(&tools.vng, kernel, accel);
    cmd.arg("--rwdir")
        .arg(&results)
        .arg("--exec")
        .arg(format!("sh {}", script.display()));
    let status = run_logged(cmd, &results.join("console.log"), &label, plan.timeout)?;
    let release =
        fs::read_to_string(results.join("uname")).unwrap_or_else(|_| kernel.package.clone());
    Ok(Report::read(
        plan,
        &label,
        release.trim(),
        &results,
        Some(status),
        started.elapsed(),
    ))
}

fn kernel_label(kernel: &Kernel) -> String {
    kernel
        .dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| kernel.package.clone())
}

fn vng_command(vng: &Path, kernel: &Kernel, accel: Accel) -> Command {
    let mut cmd = Command::new(vng);
    // vng runs its helpers (virtme-run) from PATH.
    let venv_bin = vng.parent().map(Path::to_path_buf).unwrap_or_default();
    let path = std::env::var_os("PATH").unwrap_or_default();
    let path = std::env::join_paths(std::iter::once(venv_bin).chain(std::env::split_paths(&path)))
        .unwrap_or(path);
    cmd.env("PATH", path)
        .current_dir(root())
        .arg("--run")
        .arg(&kernel.vmlinuz)
        .args(["--force-9p", "--cpus", GUEST_CPUS, "--memory", GUEST_MEMORY]);
    if accel == Accel::Tcg {
        cmd.arg("--disable-kvm");
    }
    cmd
}

/// KVM if a stock kernel boots with it here, TCG otherwise (a paravirtual /dev/kvm can exist and
/// still fail: "failed to set MSR", or a silent stall). The answer is kept per host boot.
fn detect_accel(vng: &Path, kernel: &Kernel, run_dir: &Path) -> Result<Accel> {
    if let Some(forced) = forced_accel()? {
        return Ok(forced);
    }
    if fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        step("accelerator: TCG (/dev/kvm cannot be opened)");
        return Ok(Accel::Tcg);
    }
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let virtualization = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    if !virtualization {
        step(
            "accelerator: TCG (the CPU offers no VT-x/AMD-V; a /dev/kvm without them cannot run a \
             stock kernel, so KVM is not tried; TCG is much slower)",
        );
        return Ok(Accel::Tcg);
    }
    let cache = root().join("target/vm/accel");
    let boot_id = fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    let boot_id = boot_id.trim();
    if let Some(accel) = cached_accel(&cache, boot_id) {
        step(&format!(
            "accelerator: {accel:?} (probed earlier this boot; delete {} to probe again)",
            cache.display()
        ));
        return Ok(accel);
    }
    let accel = probe_kvm(vng, kernel, &run_dir.join("kvm-probe.log"))?;
    fs::write(&cache, format!("{boot_id} {accel:?}\n"))?;
    Ok(accel)
}

fn forced_accel() -> Result<Option<Accel>> {
    match std::env::var(ACCEL_ENV).as_deref() {
        Err(_) => Ok(None),
        Ok("kvm") => Ok(Some(Accel::Kvm)),
        Ok("tcg") => Ok(Some(Accel::Tcg)),
        Ok(other) => bail!("{ACCEL_ENV}={other}: use kvm or tcg"),
    }
}

fn cached_accel(cache: &Path, boot_id: &str) -> Option<Accel> {
    let text = fs::read_to_string(cache).ok()?;
    match text.trim().split_once(' ')? {
        (id, "Kvm") if id == boot_id => Some(Accel::Kvm),
        (id, "Tcg") if id == boot_id => Some(Accel::Tcg),
        _ => None,
    }
}

/// Boots `kernel` once asking for KVM. qemu silently falls back to TCG when KVM cannot start, so
/// the guest reports its CPU model; qemu dying at once or stalling also means TCG.
fn probe_kvm(vng: &Path, kernel: &Kernel, log: &Path) -> Result<Accel> {
    step("probing KVM: booting the kernel once with it");
    let mut cmd = vng_command(vng, kernel, Accel::Kvm);
    cmd.arg("--exec")
        .arg("if grep -q 'QEMU TCG' /proc/cpuinfo; then echo probe: tcg; else echo probe: kvm; fi");
    let status = run_logged(cmd, log, "kvm-probe", KVM_PROBE_TIMEOUT)?;
    let text = fs::read_to_string(log).unwrap_or_default();
    let (accel, why) = if text.contains("probe: kvm") {
        (Accel::Kvm, "KVM booted the kernel".to_string())
    } else if text.contains("probe: tcg") {
        (Accel::Tcg, "qemu fell back to TCG".to_string())
    } else if status.is_none() {
        (Accel::Tcg, "the KVM guest stalled".to_string())
    } else if text.contains("qemu-system") {
        (
            Accel::Tcg,
            format!("qemu with KVM failed: {}", last_line(&text)),
        )
    } else {
        bail!(
            "vng could not start at all ({}): {}",
            status.map_or("timed out".to_string(), |s| s.to_string()),
            last_line(&text)
        );
    };
    step(&format!(
        "accelerator: {accel:?} ({why}; TCG is much slower)"
    ));
    Ok(accel)
}

fn last_line(text: &str) -> &str {
    text.lines().rfind(|l| !l.trim().is_empty()).unwrap_or("")
}

/// Runs `cmd` in its own process group with stdout and stderr copied to `log` (a pipe, not the
/// file itself: qemu reopens its output path and would garble a file), echoing the guest's
/// progress lines (`vm: ...`). Kills the whole group after `timeout`; `None` then.
fn run_logged(
    mut cmd: Command,
    log: &Path,
    label: &str,
    timeout: Duration,
) -> Result<Option<ExitStatus>> {
    use std::os::unix::process::CommandExt;
    let file = Arc::new(Mutex::new(
        fs::File::create(log).with_context(|| format!("cannot create {}", log.display()))?,
    ));
    let mut child = cmd
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    let live = interrupts::Live::Group(child.id());
    let _live = interrupts::track(live.clone());
    let readers = [
        child.stdout.take().map(|s| copy_lines(s, &file, label)),
        child.stderr.take().map(|s| copy_lines(s, &file, label)),
    ];
    let status = wait_or_kill(child, timeout, &live)?;
    for r in readers.into_iter().flatten() {
        let _ = r.join();
    }
    Ok(status)
}

fn copy_lines(
    from: impl std::io::Read + Send + 'static,
    to: &Arc<Mutex<fs::File>>,
    label: &str,
) -> thread::JoinHandle<()> {
    let to = Arc::clone(to);
    let label = label.to_string();
    thread::spawn(move || {
        for line in BufReader::new(from).lines().map_while(Result::ok) {
            if let Some(progress) = line.strip_prefix("vm: ") {
                eprintln!("[{label}] {progress}");
            }
            if let Ok(mut f) = to.lock() {
                let _ = writeln!(f, "{line}");
            }
        }
    })
}

/// Waits for `child`; after `timeout` cleans `live` up (kills the process group, or the test
/// binary with what it started) and returns `None`.
fn wait_or_kill(
    mut child: Child,
    timeout: Duration,
    live: &interrupts::Live,
) -> Result<Option<ExitStatus>> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            eprintln!("timed out after {}s: killing it", timeout.as_secs());
            interrupts::clean_up(live);
            let _ = child.wait();
            return Ok(None);
        }
        thread::sleep(Duration::from_millis(200));
    }
}

fn command_stdout(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

// ---------------------------------------------------------------------------------------------
// The guest side

/// The modules the tests need that Debian builds as modules (veth pairs, nftables NAT for the SNAT
/// balancer, TC for the test balancers' programs, IPIP/IPv6 tunnels for decapsulation tests).
const GUEST_MODULES: &str = "veth nf_tables nf_conntrack nf_nat nft_nat nft_chain_nat nft_masq \
                             nft_ct sch_ingress cls_bpf act_bpf ipip ip6_tunnel tunnel4 tunnel6";

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The factor the harness's waits grow by in a guest: the host's `NTLM_TAG_TEST_TIME_SCALE` if set.
fn time_scale(accel: Accel) -> u32 {
    std::env::var(TIME_SCALE_ENV)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(match accel {
            Accel::Kvm => KVM_TIME_SCALE,
            Accel::Tcg => TCG_TIME_SCALE,
        })
}

fn guest_script(plan: &Plan, results: &Path, accel: Accel) -> String {
    let names: Vec<&str> = plan.tests.iter().map(|t| t.name.as_str()).collect();
    let vars = [
        ("results", results.display().to_string()),
        ("stage", plan.stage.display().to_string()),
        ("threads", plan.threads.to_string()),
        ("selftest", u8::from(plan.selftest).to_string()),
        ("time_scale", time_scale(accel).to_string()),
        ("tests", names.join(" ")),
        ("modules", GUEST_MODULES.to_string()),
        ("per_binary_timeout", PER_BINARY_TIMEOUT_SECS.to_string()),
        ("workspace", root().display().to_string()),
    ];
    let mut script = String::from("#!/bin/sh\n# Generated by cargo xtask integration-test.\n");
    for (k, v) in vars {
        script.push_str(&format!("{k}={}\n", shell_quote(&v)));
    }
    // "$@": the arguments for every test binary.
    let args: Vec<String> = plan.test_args.iter().map(|a| shell_quote(a)).collect();
    script.push_str(&format!("set -- {}\n", args.join(" ")));
    script.push_str(GUEST_BODY);
    script
}

/// Runs inside the guest: prepares what the tests need, runs every binary, records its output and
/// exit code under `$results`, exits non-zero if any failed. `vm: ` lines are echoed on the host.
const GUEST_BODY: &str = r#"
set -u
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
say() { echo "vm: $*"; }
uname -r > "$results/uname"
say "kernel $(uname -r) up"

if ! grep -q ' - cgroup2 ' /proc/self/mountinfo; then
    mkdir -p /sys/fs/cgroup && mount -t cgroup2 cgroup2 /sys/fs/cgroup
fi
mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf
for m in $modules; do
    if modprobe "$m" 2>/dev/null; then echo "$m ok"; else echo "$m MISSING"; fi
done > "$results/modules.txt"
missing=$(grep MISSING "$results/modules.txt" | cut -d' ' -f1 | tr '\n' ' ')
[ -n "$missing" ] && say "modules not available: $missing"

# Run from the guest's RAM, not over 9p.
mkdir -p /run/ntlm-tag-vm && cp "$stage"/* /run/ntlm-tag-vm/ && stage=/run/ntlm-tag-vm

status=0
record() { # name rc
    echo "$2" > "$results/$1.rc"
    [ "$2" = 0 ] || status=1
    say "$1: $(grep '^test result:' "$results/$1.out" | tail -n 1) (exit $2)"
}
cd "$workspace"
export NTLM_TAG_BIN="$stage/ntlm-tag" NTLM_TAG_TEST_TIME_SCALE="$time_scale"
[ "$selftest" = 1 ] && export NTLM_TAG_VM_SELFTEST_FAIL=1 && \
    say "NTLM_TAG_VM_SELFTEST_FAIL=1: harness_selftest fails on purpose"
for t in $tests; do
    say "running $t"
    timeout --kill-after=10 "$per_binary_timeout" \
        "$stage/$t" --test-threads="$threads" "$@" > "$results/$t.out" 2>&1
    record "$t" $?
done

dmesg > "$results/dmesg.txt" 2>&1
echo finished > "$results/done"
say "done (exit $status)"
exit $status
"#;

// ---------------------------------------------------------------------------------------------
// Results

/// libtest's counts and failures of one kernel's run, read back from its results directory.
struct Report {
    label: String,
    release: String,
    passed: u32,
    failed: u32,
    ignored: u32,
    failures: Vec<String>,
    problems: Vec<String>,
    elapsed: Duration,
}

impl Report {
    fn read(
        plan: &Plan,
        label: &str,
        release: &str,
        results: &Path,
        vm_status: Option<Option<ExitStatus>>,
        elapsed: Duration,
    ) -> Report {
        let mut report = Report {
            label: label.to_string(),
            release: release.to_string(),
            passed: 0,
            failed: 0,
            ignored: 0,
            failures: Vec::new(),
            problems: Vec::new(),
            elapsed,
        };
        let names: Vec<&str> = plan.tests.iter().map(|t| t.name.as_str()).collect();
        for name in names {
            report.add_binary(name, results);
        }
        if !results.join("done").is_file() {
            report.problems.push(format!(
                "the run did not finish (see {})",
                results.join("console.log").display()
            ));
        }
        match vm_status {
            Some(None) => report.problems.push("the VM timed out".to_string()),
            Some(Some(s)) if !s.success() && report.failures.is_empty() => {
                report.problems.push(format!("vng exited with {s}"));
            }
            _ => {}
        }
        let _ = fs::write(results.join("failures.txt"), report.why().join("\n") + "\n");
        report
    }

    fn add_binary(&mut self, name: &str, results: &Path) {
        let out = fs::read_to_string(results.join(format!("{name}.out"))).unwrap_or_default();
        let rc = fs::read_to_string(results.join(format!("{name}.rc")))
            .ok()
            .and_then(|t| t.trim().parse::<i32>().ok());
        let summary = out.lines().rev().find_map(parse_summary);
        if let Some((p, f, i)) = summary {
            self.passed += p;
            self.failed += f;
            self.ignored += i;
        }
        let failed: Vec<String> = out
            .lines()
            .filter_map(|l| l.strip_prefix("test ")?.strip_suffix(" ... FAILED"))
            .map(|t| format!("{name}::{t}"))
            .collect();
        self.failures.extend(failed);
        match (rc, summary) {
            (None, _) => self.problems.push(format!("{name} did not finish")),
            (Some(124), _) => self.problems.push(format!("{name} timed out")),
            (Some(rc), None) => self
                .problems
                .push(format!("{name} exited {rc} without a test summary")),
            (Some(rc), Some((_, 0, _))) if rc != 0 => {
                self.problems.push(format!("{name} exited {rc}"));
            }
            _ => {}
        }
    }

    fn passed_all(&self) -> bool {
        self.failed == 0 && self.failures.is_empty() && self.problems.is_empty()
    }

    fn line(&self) -> String {
        let verdict = if self.passed_all() { "PASS" } else { "FAIL" };
        let host = if self.label == "host" { " (host)" } else { "" };
        let mut line = format!(
            "kernel {}{host}: {verdict} ({} passed, {} failed, {} ignored) in {}",
            self.release,
            self.passed,
            self.failed,
            self.ignored,
            minutes(self.elapsed)
        );
        let why = self.why();
        if !why.is_empty() {
            let shown = &why[..why.len().min(LISTED_FAILURES)];
            line.push_str(&format!(": {}", shown.join(", ")));
            if why.len() > shown.len() {
                line.push_str(&format!(
                    " and {} more (all in target/vm-results/{}/failures.txt)",
                    why.len() - shown.len(),
                    self.label
                ));
            }
        }
        line
    }

    /// Failing tests, then other problems (a binary that crashed, a VM that timed out).
    fn why(&self) -> Vec<&str> {
        self.failures
            .iter()
            .chain(&self.problems)
            .map(String::as_str)
            .collect()
    }
}

/// `test result: ok. 9 passed; 1 failed; 2 ignored; ...` → (9, 1, 2).
fn parse_summary(line: &str) -> Option<(u32, u32, u32)> {
    let rest = line.strip_prefix("test result: ")?.split_once(". ")?.1;
    let count = |what: &str| {
        rest.split("; ")
            .find_map(|part| part.strip_suffix(what)?.trim().parse::<u32>().ok())
    };
    Some((count(" passed")?, count(" failed")?, count(" ignored")?))
}

fn minutes(d: Duration) -> String {
    format!("{}m{:02}s", d.as_secs() / 60, d.as_secs() % 60)
}

fn summarize(reports: &[Report]) -> Result<()> {
    eprintln!();
    for r in reports {
        println!("{}", r.line());
    }
    println!(
        "outputs: {}/<kernel>/<test binary>.out",
        root().join("target/vm-results").display()
    );
    let failed = reports.iter().filter(|r| !r.passed_all()).count();
    if failed > 0 {
        bail!(
            "{failed} of {} kernels failed; each test binary's output (gateway log lines included) \
             is in target/vm-results/<kernel>/",
            reports.len()
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Cleanup: temporary directories and every process started, also on Ctrl-C / SIGTERM

/// A directory removed on drop (and on interrupt).
struct TempDir {
    path: PathBuf,
    _live: interrupts::Tracked,
}

impl TempDir {
    fn new(path: &Path) -> Result<Self> {
        if path.exists() {
            fs::remove_dir_all(path).with_context(|| format!("cannot clear {}", path.display()))?;
        }
        fs::create_dir_all(path).with_context(|| format!("cannot create {}", path.display()))?;
        Ok(TempDir {
            path: path.to_path_buf(),
            _live: interrupts::track(interrupts::Live::Dir(path.to_path_buf())),
        })
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

mod interrupts {
    //! What must not outlive xtask: process groups (vng → qemu), test binaries on the host (with
    //! their namespaces and gateways), temporary directories.

    use std::{
        path::PathBuf,
        process::Command,
        sync::{Mutex, atomic::AtomicU64, atomic::Ordering},
    };

    use anyhow::{Context, Result};

    #[derive(Clone)]
    pub enum Live {
        /// A process group, led by this pid.
        Group(u32),
        /// A test binary on the host: its gateways, namespaces and cgroups go with it.
        TestBinary(u32),
        Dir(PathBuf),
    }

    static LIVE: Mutex<Vec<(u64, Live)>> = Mutex::new(Vec::new());
    static NEXT: AtomicU64 = AtomicU64::new(0);

    /// Removes its entry from the list when dropped (the owner cleaned up normally).
    pub struct Tracked(u64);

    pub fn track(live: Live) -> Tracked {
        let id = NEXT.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut l) = LIVE.lock() {
            l.push((id, live));
        }
        Tracked(id)
    }

    impl Drop for Tracked {
        fn drop(&mut self) {
            if let Ok(mut l) = LIVE.lock() {
                l.retain(|(id, _)| *id != self.0);
            }
        }
    }

    /// Kills `pid`'s process group (SIGKILL), or `pid` alone if it leads none.
    fn kill_tree(pid: u32) {
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{pid}")])
            .status();
        let _ = Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status();
    }

    pub fn clean_up(live: &Live) {
        match live {
            Live::Group(pgid) => kill_tree(*pgid),
            Live::TestBinary(pid) => {
                ntlm_tag_tests::cleanup::remove_everything_of(*pid);
                kill_tree(*pid);
            }
            Live::Dir(path) => {
                let _ = std::fs::remove_dir_all(path);
            }
        }
    }

    /// On SIGINT/SIGTERM: processes first (newest first), then directories; then exit 130.
    pub fn install() -> Result<()> {
        let mut signals = signal_hook::iterator::Signals::new([
            signal_hook::consts::SIGINT,
            signal_hook::consts::SIGTERM,
        ])
        .context("cannot install signal handlers")?;
        std::thread::spawn(move || {
            if signals.forever().next().is_some() {
                eprintln!("\ninterrupted: stopping VMs and tests, removing temporary files");
                let live: Vec<Live> = LIVE
                    .lock()
                    .map(|l| l.iter().rev().map(|(_, x)| x.clone()).collect())
                    .unwrap_or_default();
                for l in live.iter().filter(|l| !matches!(l, Live::Dir(_))) {
                    clean_up(l);
                }
                for l in live.iter().filter(|l| matches!(l, Live::Dir(_))) {
                    clean_up(l);
                }
                std::process::exit(130);
            }
        });
        Ok(())
    }
}
