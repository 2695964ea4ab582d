//! Running the test binaries: on the host directly, or in a guest booted under a kernel, each
//! binary's output and exit code written to `target/vm-results/<kernel>/`.

use std::{
    fs,
    io::{BufRead, BufReader, Write},
    path::Path,
    process::{Command, ExitStatus, Stdio},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};

use super::{
    Plan,
    accel::{VmTools, vng_command},
    binaries::TestBinary,
    guest,
    kernels::{Kernel, Target},
    report::Report,
    results_dir,
};
use crate::{
    root, step,
    sys::{
        interrupts::{self, Live},
        process,
    },
};

/// Runs every test binary on this machine's kernel.
pub fn on_host(plan: &Plan) -> Result<Report> {
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
    let release = process::stdout_of(Command::new("uname").arg("-r"))?;
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
    let live = Live::Harness(child.id());
    let _live = interrupts::track(live.clone());
    let timeout = deadline.saturating_duration_since(Instant::now());
    Ok(process::wait_or_kill(child, timeout, &live)?.map_or(124, |s| s.code().unwrap_or(128)))
}

/// Boots `kernel` under qemu and runs every test binary in it.
pub fn in_vm(plan: &Plan, tools: &mut VmTools, kernel: &Kernel) -> Result<Report> {
    let accel = tools.accel(kernel, &plan.run_dir)?;
    let label = kernel_label(kernel);
    step(&format!(
        "booting {} under qemu ({accel:?}) and running the integration tests in it",
        kernel.package
    ));
    let results = results_dir(&label)?;
    let script = plan.run_dir.join(format!("guest-{label}.sh"));
    fs::write(&script, guest::script(plan, &results, accel))?;
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

/// Runs `cmd` in its own process group with stdout and stderr copied to `log` (a pipe, not the
/// file itself: qemu reopens its output path and would garble a file), echoing the guest's
/// progress lines (`vm: ...`). Kills the whole group after `timeout`; `None` then.
pub fn run_logged(
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
    let live = Live::Group(child.id());
    let _live = interrupts::track(live.clone());
    let readers = [
        child.stdout.take().map(|s| copy_lines(s, &file, label)),
        child.stderr.take().map(|s| copy_lines(s, &file, label)),
    ];
    let status = process::wait_or_kill(child, timeout, &live)?;
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
