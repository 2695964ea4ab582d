//! Running the test binaries: on the host directly, or in a guest booted under a kernel, each
//! binary's output and exit code written to `target/vm-results/<kernel>/`.

use std::{
    fs,
    path::Path,
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context, Result};

use super::{
    Plan,
    accel::{VmTools, vng_command},
    binaries::TestBinary,
    console, guest,
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
    Ok(interrupts::wait_or_kill(child, timeout, &live)?.map_or(124, |s| s.code().unwrap_or(128)))
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
    let status = console::run_logged(cmd, &results.join("console.log"), &label, plan.timeout)?;
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
